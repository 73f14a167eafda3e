"""End to end on CPU: tiny HDF5 -> supervised and unsupervised training -> kill and resume to the same
weights -> evaluation -> the result loads in ``register``. Tiny images and a few steps each."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DeepSalRegLib import register
from DeepSalRegLib.networks import file_sha256, load_checkpoint
from training import evaluate, export_model, make_dataset, train
from training.checkpoints import load_state, weights_digest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--set", "model.overrides={global_widths: [[4, 4], [8, 8], [8, 8]], local_widths: [4, 4], local_dilations: [1, 2, 1]}",
        "--set", "train.batch_size=2", "--set", "train.log_every=1", "--set", "train.progress=false",
        "--set", "train.tensorboard=false", "--set", "data.val_samples=2", "--set", "train.lr=1e-3",
        "--set", "train.threads=1"]  # one thread: the same float summation order in every process


def _train(*args):
    return train.main(TINY + [str(a) for a in args])


def _digest(path):
    return weights_digest(load_checkpoint(path)[0])


def test_supervised_on_synthetic_images_without_shared_data(tmp_path):
    data = tmp_path / "syn.h5"
    assert make_dataset.main([str(data), "--synthetic", "6", "--shape", "24", "24", "--val-fraction", "0.34"]) == 0
    out = tmp_path / "run"
    assert _train("--data", data, "--out", out, "--steps", 3, "--set", "data.outliers.probability=0.5",
                  "--set", "train.val_every=3", "--set", "train.tensorboard=true") == 0
    for name in ("config.yaml", "state.pt", "model.pt", "last.pt", "log.csv", "val.csv"):
        assert (out / name).is_file(), name
    assert list((out / "tb").iterdir())
    log = (out / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,epoch,loss,epe") and len(log) == 4
    state = load_state(out / "state.pt")  # weights_only=True inside
    assert state["position"]["step"] == 3 and state["best"]["metric"] == "epe"
    model, payload = load_checkpoint(out / "model.pt")
    assert payload["training"]["mode"] == "supervised"
    # the exported file is a register() model
    rng = np.random.default_rng(0)
    fixed = sitk.GetImageFromArray(rng.random((24, 24)).astype(np.float32))
    result = register(fixed, fixed, model=str(out / "model.pt"), device="cpu")
    assert result.displacement.GetSize() == (24, 24)
    # synthetic evaluation (end-point error) of the trained model and of the identity
    rows = evaluate.evaluate_synthetic(data, 2, str(out / "model.pt"), 0, "cpu", 1.0, 3.0)
    assert len(rows) == 2 and all(np.isfinite(r["epe"]) and r["epe_identity"] > 0 for r in rows)

    # unsupervised loss on synthetic pairs (the JSM ablation set-up): validation still scores the EPE
    ablation = tmp_path / "unsup_synthetic"
    assert _train("--data", data, "--out", ablation, "--mode", "unsupervised", "--steps", 2, "--set", "data.pairs=synthetic",
                  "--set", "model.overrides.jsm_input=false", "--set", "loss.registration.jsm_weight=none") == 0
    assert (ablation / "val.csv").read_text().splitlines()[1].split(",")[2] != ""  # epe column

    # export into a models folder: weights, card and registry entry with the right sha256
    models = tmp_path / "models"
    models.mkdir()
    path = export_model.export(out, "tiny-2d", "a tiny test model", models_dir=models)
    entry = json.loads((models / "registry.json").read_text())["tiny-2d"]
    assert entry["sha256"] == file_sha256(path) and entry["ndim"] == 2 and entry["card"] == "tiny-2d.md"
    card = (models / "tiny-2d.md").read_text()
    assert "make_dataset.py" in card and "seed 0" in card and entry["sha256"] in card and "cpu_count" not in card


def test_matching_preset_trains_and_stops_at_its_wall_clock_cap(tmp_path):
    """The GPU recipe's cap (train.max_minutes): the run stops early, validated and checkpointed, and the
    matching network it wrote rebuilds itself in register()."""
    data = tmp_path / "syn.h5"
    assert make_dataset.main([str(data), "--synthetic", "4", "--shape", "32", "32", "--val-fraction", "0.5"]) == 0
    out = tmp_path / "capped"
    assert train.main(["--data", str(data), "--out", str(out), "--steps", "50", "--set", "model.preset=matching-2d",
                       "--set", "model.overrides={local_widths: [4, 4], local_dilations: [1, 2, 1]}",
                       "--set", "train.max_minutes=0.0001", "--set", "train.log_every=1", "--set", "train.threads=1",
                       "--set", "train.tensorboard=false", "--set", "data.val_samples=2", "--set", "data.crop=[32,32]",
                       "--set", "train.batch_size=2"]) == 0
    state = load_state(out / "state.pt")
    assert state["position"]["step"] == 1  # stopped at the first step past the cap, not at 50
    assert (out / "val.csv").read_text().splitlines()[1].startswith("1,")
    model, payload = load_checkpoint(out / "model.pt")
    assert payload["config"]["global_type"] == "matching"
    image = sitk.GetImageFromArray(np.random.default_rng(1).random((32, 32)).astype(np.float32))
    assert register(image, image, model=str(out / "model.pt"), iterations=0).displacement.GetSize() == (32, 32)


def test_end_to_end_real_images_kill_resume_evaluate(shared_data, tmp_path, capsys):
    data = tmp_path / "real.h5"
    slices = sorted((shared_data / "templates").glob("ants_r*slice.jpg"))
    assert make_dataset.main([str(data), *map(str, slices), "--spacing", "8", "--shape", "32", "32",
                              "--val-fraction", "0.34", "--pairs", "inter"]) == 0
    common = ["--data", data, "--set", "data.flip=0.5", "--set", "train.checkpoint_every=2", "--set", "train.val_every=2",
              "--set", "data.samples_per_epoch=4"]  # epochs of 2 batches: the resume crosses an epoch boundary

    # supervised, uninterrupted
    ref = tmp_path / "sup_ref"
    assert _train(*common, "--out", ref, "--steps", 5) == 0
    # the same run killed (SIGKILL, no clean-up) after the checkpoint of step 2, then rerun
    killed = tmp_path / "sup_killed"
    cmd = [sys.executable, str(REPO / "training" / "train.py"), *map(str, common), "--out", str(killed),
           "--steps", "5", "--interrupt-after", "2", *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr
    assert load_state(killed / "state.pt")["position"]["step"] == 2
    assert _train(*common, "--out", killed, "--steps", 5) == 0
    assert _digest(killed / "last.pt") == _digest(ref / "last.pt")
    position = lambda run: {k: load_state(run / "state.pt")["position"][k] for k in ("step", "epoch", "batch")}  # noqa: E731
    assert position(killed) == position(ref) == dict(step=5, epoch=2, batch=1)
    steps = [line.split(",")[0] for line in (killed / "log.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4", "5"]  # no duplicated rows after the resume

    # unsupervised on real inter-subject pairs (JSM-weighted loss of the preset)
    unsup = tmp_path / "unsup"
    assert _train(*common, "--out", unsup, "--mode", "unsupervised", "--steps", 3) == 0
    val = (unsup / "val.csv").read_text()
    assert val.startswith("step,loss") and len(val.splitlines()) == 3
    assert load_checkpoint(unsup / "model.pt")[1]["training"]["mode"] == "unsupervised"

    # evaluation through register(): dataset pairs and the hand X-ray suite pair, with the report files
    out = tmp_path / "eval"
    assert evaluate.main(["--dataset", str(data), "--limit", "2", "--model", str(unsup / "model.pt"),
                          "--out", str(out), "--run", str(unsup)]) == 0
    assert evaluate.main(["--suite", "shared", "--only", "hands", "--data-root", str(shared_data),
                          "--model", str(ref / "model.pt"), "--model", "none", "--iterations", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| hands | sup_ref/model.pt | 2 | 1 | TRE mm | 21.682 |" in printed
    results = json.loads((out / "results.json").read_text())
    assert len(results["rows"]) == 2 and {"folding_percent", "sd_log_jacobian", "seconds"} <= set(results["rows"][0])
    assert (out / "evaluation.png").stat().st_size > 1000 and "| dataset |" in (out / "summary.md").read_text()


def test_user_errors_are_one_line(tmp_path, capsys):
    assert train.main(["--data", str(tmp_path / "none.h5"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: dataset") and "does not exist" in err and len(err.strip().splitlines()) == 1
    assert train.main(["--set", "train.stpes=2"]) == 2
    assert "did you mean 'steps'" in capsys.readouterr().err
    data = tmp_path / "syn.h5"
    make_dataset.main([str(data), "--synthetic", "4", "--shape", "16", "16"])
    out = tmp_path / "run"
    assert _train("--data", data, "--out", out, "--steps", 1) == 0
    capsys.readouterr()
    # resuming the folder with another network is refused (exit code 3 = model error)
    assert train.main(["--data", str(data), "--out", str(out), "--steps", "2", "--set", "train.progress=false"]) == 3
    err = capsys.readouterr().err
    assert "holds a different network" in err and len(err.strip().splitlines()) == 1
    assert train.main(["--data", str(data), "--out", str(out), "--resume", "never"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert evaluate.main(["--pairs", str(tmp_path / "none.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    for script in ("train.py", "make_dataset.py", "evaluate.py"):
        help_text = subprocess.run([sys.executable, str(REPO / "training" / script), "--help"],
                                   capture_output=True, text=True).stdout
        assert "Examples:" in help_text and "python training/" in help_text


def test_evaluate_pairs_csv_with_landmarks_labels_and_centring(shared_data, tmp_path):
    from DeepSalRegLib import io

    fair = shared_data / "fair"
    moving, fixed = io.read_image(fair / "hands-T.jpg"), io.read_image(fair / "hands-R.jpg")
    mp, fp = io.read_pixel_landmarks_rc(fair / "hands_landmarks_pixel_rc.csv", [moving, fixed])
    io.write_landmarks(fp, tmp_path / "f.csv")
    io.write_landmarks(mp, tmp_path / "m.csv")
    labels = sitk.Cast(sitk.BinaryThreshold(fixed, 60, 255), sitk.sitkUInt8)
    sitk.WriteImage(labels, str(tmp_path / "lab.nrrd"))
    (tmp_path / "pairs.csv").write_text(
        "dataset,name,fixed,moving,fixed_landmarks,moving_landmarks,fixed_labels,moving_labels,labels,centre\n"
        f"hands,p1,{fair / 'hands-R.jpg'},{fair / 'hands-T.jpg'},f.csv,m.csv,lab.nrrd,lab.nrrd,1,1\n")
    cases = evaluate.cases_from_csv(tmp_path / "pairs.csv")
    assert len(cases) == 1 and cases[0].ndim == 2 and cases[0].dataset == "hands"
    row = evaluate.evaluate_case(cases[0], "none", 0, "cpu", affine=False)  # no stage at all: the identity
    assert row["tre_before"] == pytest.approx(21.68, abs=0.01)  # both images have the same extent: no shift
    assert row["dice_before"] == pytest.approx(1.0) and row["dice_after"] == pytest.approx(1.0)
    assert row["folding_percent"] == 0.0


def test_shared_suite_cases_load_their_own_files(shared_data):
    cases = evaluate.shared_suite(shared_data, ("eth_liver", "prostate"), prostate_pairs=1)
    assert [c.dataset for c in cases] == ["eth_liver"] * 4 + ["prostate"]
    liver = cases[0].load()
    assert liver["fixed"].GetSize() == (166, 195, 25) and liver["fixed_points"].shape == liver["moving_points"].shape
    prostate = cases[-1].load()  # centred: the moving image's centre lies on the fixed one's
    centre = lambda im: np.array(im.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in im.GetSize()]))  # noqa: E731
    assert np.allclose(centre(prostate["fixed"]), centre(prostate["moving"]), atol=1e-6)
    assert np.allclose(centre(prostate["moving"]), centre(prostate["moving_labels"]), atol=1e-6)
