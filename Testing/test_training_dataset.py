"""training/make_dataset.py, training/datasets.py and training/config.py: the HDF5 format, pair lists,
splits, appending, clear refusals, deterministic samples and validated configuration overrides."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepSalRegLib.errors import InputError
from DeepSalRegLib.networks import PRESETS
from training import export_model, make_dataset
from training.config import load_config
from pathlib import Path

from training.datasets import Augmentation, RealPairs, RegistrationH5, ResumableSampler, SyntheticPairs

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


def _make(args, capsys=None):
    code = make_dataset.main([str(a) for a in args])
    return code


def test_synthetic_only_dataset(tmp_path, capsys):
    out = tmp_path / "syn.h5"
    assert _make([out, "--synthetic", 6, "--shape", 24, 32, "--spacing", 2, "--val-fraction", 0.3]) == 0
    printed = capsys.readouterr().out
    assert "6 2D images" in printed and "24x32 grid" in printed
    data = RegistrationH5(out)
    assert data.ndim == 2 and data.shape == (24, 32) and data.spacing == (2.0, 2.0)
    assert len(data.indices("val")) == 2 and len(data.indices("train")) == 4
    assert data.image(0).shape == (1, 24, 32) and 0 <= float(data.image(0).min()) <= float(data.image(0).max()) <= 1
    assert data.has_labels(0)
    with h5py.File(out) as f:
        assert f["images"].chunks == (1, 24, 32) and f["images"].compression == "gzip"
        assert f["images"].maxshape[0] is None
    pairs = data.pairs("inter")
    assert len(pairs) and all(data._split[a] == data._split[b] for a, b in pairs)  # same split only


def test_real_images_labels_landmarks_and_append(shared_data, tmp_path, capsys):
    promise = shared_data / "promise12"
    out = tmp_path / "p.h5"
    args = [out, str(promise / "case0[01]_t2.nii.gz"), "--labels-replace", "_t2", "_prostate",
            "--spacing", 8, "--shape", 8, 16, 16, "--pairs", "inter"]
    assert _make(args) == 0
    data = RegistrationH5(out)
    assert len(data) == 2 and data.has_labels(0) and data.labels(0).max() == 1
    assert len(data.pairs("inter")) == 2  # both directions
    # the geometry is stored: the grid is centred on the image
    grid = data.grid(0)
    image = sitk.ReadImage(str(promise / "case00_t2.nii.gz"))
    centre = lambda im: np.array(im.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in im.GetSize()]))  # noqa: E731
    assert np.allclose(centre(grid), centre(image), atol=1e-3)
    data.close()
    # appending keeps the grid and extends the pair lists
    assert _make([out, str(promise / "case04_t2.nii.gz"), "--labels-replace", "_t2", "_prostate", "--append",
                  "--pairs", "inter"]) == 0
    data = RegistrationH5(out)
    assert len(data) == 3 and len(data.pairs("inter")) == 6
    data.close()
    # a 2D picture cannot join a 3D dataset, a different grid cannot be appended
    capsys.readouterr()
    assert _make([out, shared_data / "fair" / "hands-R.jpg", "--append"]) == 2
    assert "is 2D but the dataset is 3D" in capsys.readouterr().err
    assert _make([out, str(promise / "case05_t2.nii.gz"), "--append", "--shape", 8, 8, 8]) == 2
    assert "differs" in capsys.readouterr().err

    # landmarks (physical mm) travel with their image; intra-subject pairs from the CSV's subject column
    liver = shared_data / "eth_liver" / "dataset18"
    csv = tmp_path / "liver.csv"
    csv.write_text("image,landmarks,subject\n"
                   f"{liver / 'exhale.mha'},{liver / 'exhale_landmarks.csv'},d18\n"
                   f"{liver / 'cyc_1_10.mha'},{liver / 'cyc_1_10_landmarks.csv'},d18\n")
    out2 = tmp_path / "liver.h5"
    assert _make([out2, csv, "--align", "physical", "--spacing", 10, "--pairs", "intra"]) == 0
    data = RegistrationH5(out2)
    assert data.landmarks(0).shape[1] == 3 and len(data.landmarks(0)) > 40
    assert len(data.pairs("intra")) == 2 and len(data.pairs("inter")) == 0
    with h5py.File(out2) as f:
        assert np.allclose(f["origin"][0], f["origin"][1])  # one shared grid


def test_refusals(tmp_path, capsys):
    out = tmp_path / "x.h5"
    assert _make([out, tmp_path / "missing.nii.gz"]) == 2
    assert "is not a file" in capsys.readouterr().err
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("path\nfoo.nii.gz\n")
    assert _make([out, bad_csv]) == 2
    assert "'image' column" in capsys.readouterr().err
    img = sitk.GetImageFromArray(np.random.default_rng(0).random((12, 12)).astype(np.float32))
    lab = sitk.GetImageFromArray(np.zeros((10, 12), np.uint8))
    sitk.WriteImage(img, str(tmp_path / "a_img.nrrd"))
    sitk.WriteImage(lab, str(tmp_path / "a_lab.nrrd"))
    assert _make([out, tmp_path / "a_img.nrrd", "--labels-replace", "_img", "_lab"]) == 2
    assert "does not match image" in capsys.readouterr().err
    assert _make([out, "--synthetic", 2, "--shape", 8, 8]) == 0
    assert _make([out, "--synthetic", 2, "--shape", 8, 8]) == 2
    assert "--append" in capsys.readouterr().err
    # weights trained on research-only data cannot be exported into the shipped models
    export_model._check_licence(["../shared/data/templates/colin27_ch2.nii.gz", "synthetic shapes #0"])
    with pytest.raises(InputError, match="research-only"):
        export_model._check_licence(["../shared/data/promise12/case00_t2.nii.gz"])


def test_samples_are_a_function_of_seed_epoch_index(tmp_path):
    out = tmp_path / "syn.h5"
    _make([out, "--synthetic", 4, "--shape", 32, 32])
    ds = SyntheticPairs(out, None, 8, augmentation=Augmentation(crop=(24, 24), flip=0.5), seed=3)
    a, b, c = ds[(0, 5)], ds[(0, 5)], ds[(1, 5)]
    assert a["fixed"].shape == (1, 24, 24) and a["flow"].shape == (2, 24, 24)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["flow"], c["flow"])
    # the sampler splits an epoch between ranks and resumes mid-epoch
    full = ResumableSampler(ds, 2, epoch=1, seed=3)
    later = ResumableSampler(ds, 2, epoch=1, start=2, seed=3)
    assert list(later) == list(full)[4:] and len(full) == 8
    r0, r1 = ResumableSampler(ds, 2, 1, 0, 3, 0, 2), ResumableSampler(ds, 2, 1, 0, 3, 1, 2)
    assert not set(r0.tags) & set(r1.tags) and len(r0) == len(r1) == 4
    real = RealPairs(out, "inter", None, 4, Augmentation(crop=(16, 16)), seed=0)
    sample = real[(0, 1)]
    assert sample["fixed"].shape == (1, 16, 16) and bool(sample["has_labels"])
    with pytest.raises(InputError, match="no intra pairs"):
        RealPairs(out, "intra")
    with pytest.raises(InputError, match="does not exist"):
        RegistrationH5(tmp_path / "none.h5")


def test_config_overrides_and_errors(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mode: unsupervised\ntrain: {steps: 7, lr: 1.0e-3}\nmodel: {overrides: {jsm_input: false}}\n")
    config = load_config(cfg, ["train.lr=3e-4", "data.crop=[32, 32]", "data.intensity=null"])
    assert config["mode"] == "unsupervised" and config["train"]["steps"] == 7
    assert config["train"]["lr"] == 3e-4 and config["data"]["crop"] == [32, 32] and config["data"]["intensity"] is None
    assert config["model"]["overrides"] == {"jsm_input": False}
    assert config["train"]["batch_size"] == 4  # defaults fill the rest
    with pytest.raises(InputError, match="did you mean 'steps'"):
        load_config(cfg, ["train.stpes=3"])
    with pytest.raises(InputError, match="whole number"):
        load_config(None, ["train.steps=2.5"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian: {steps: 3}\n")
    with pytest.raises(InputError, match="unknown config key 'trian'"):
        load_config(bad)
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "none.yaml")


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_are_valid(name):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config["model"]["preset"] in PRESETS


def test_intra_inter_and_atlas_pairs(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("s1_a", "s1_b", "s2_a", "atlas"):
        image = sitk.GetImageFromArray(rng.random((12, 14)).astype(np.float32))
        sitk.WriteImage(image, str(tmp_path / f"{name}.nrrd"))
    table = tmp_path / "images.csv"
    table.write_text("image,subject\ns1_a.nrrd,s1\ns1_b.nrrd,s1\ns2_a.nrrd,s2\n")
    out = tmp_path / "pairs.h5"
    assert make_dataset.main([str(out), str(table), "--atlas", str(tmp_path / "atlas.nrrd")]) == 0
    with RegistrationH5(out) as data:
        assert data.shape == (16, 16)  # covers the largest input, a multiple of 8
        assert sorted(map(tuple, data.pairs("intra").tolist())) == [(0, 1), (1, 0)]
        assert sorted(map(tuple, data.pairs("inter").tolist())) == [(0, 2), (1, 2), (2, 0), (2, 1)]
        assert sorted(map(tuple, data.pairs("atlas").tolist())) == [(0, 3), (1, 3), (2, 3)]  # (subject, atlas)
