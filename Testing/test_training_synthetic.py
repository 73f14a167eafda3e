"""training/synthetic.py and training/flow_io.py: known fields follow the library convention, outliers,
determinism by seed, and the Middlebury .flo conversion in both directions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from DeepSalRegLib.errors import InputError
from DeepSalRegLib.warp import folding_fraction, warp
from training.flow_io import FLO_TAG, field_to_flo, flo_to_field, read_flo, write_flo
from training.synthetic import (
    DeformationSettings,
    OutlierSettings,
    insert_outlier,
    make_supervised_pair,
    random_shapes_image,
    random_smooth_field,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(48, 40), (20, 24, 16)])
def test_ground_truth_field_is_the_library_convention(shape):
    """fixed = M(x + u(x)) exactly, so warping the moving image with the true field reproduces fixed."""
    image, _ = random_shapes_image(shape, _gen(1))
    pair = make_supervised_pair(image, _gen(2), DeformationSettings(max_displacement=4), intensity=None)
    assert pair["flow"].shape == (len(shape), *shape)
    recon = warp(pair["moving"][None], pair["flow"][None])[0]
    assert torch.allclose(recon, pair["fixed"], atol=1e-6)
    assert pair["flow"].abs().max() > 0.5  # it did move


def test_translation_sign_matches_warp():
    """A pure shift of +3 rows: fixed(x) = moving(x + 3), i.e. content moves up by 3 rows in fixed."""
    settings = DeformationSettings(max_displacement=0, rotation_deg=0, scale=0, translation=0)
    field = random_smooth_field((16, 16), settings, _gen())
    assert torch.equal(field, torch.zeros_like(field))
    moving = torch.zeros(1, 16, 16)
    moving[0, 10, 5] = 1
    shift = torch.zeros(2, 16, 16)
    shift[0] = 3.0
    fixed = warp(moving[None], shift[None])[0]
    assert fixed[0, 7, 5] == 1  # fixed(7) = moving(10)


def test_random_fields_are_smooth_diffeomorphic_and_seeded():
    settings = DeformationSettings(max_displacement=10)
    a = random_smooth_field((64, 64), settings, _gen(5))
    b = random_smooth_field((64, 64), settings, _gen(5))
    c = random_smooth_field((64, 64), settings, _gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert folding_fraction(a[None]) == 0.0
    assert (a[:, 1:] - a[:, :-1]).abs().max() < 1.5  # no jumps between neighbours


def test_outliers_exist_in_one_image_only():
    image, _ = random_shapes_image((40, 40), _gen(3))
    for kind in ("insert", "remove"):
        changed, mask = insert_outlier(image, _gen(4), OutlierSettings(probability=1.0), kind)
        assert mask.shape == image.shape and 0 < float(mask.sum()) < image.numel()
        outside = mask < 1e-3
        assert torch.allclose(changed[outside], image[outside], atol=1e-3)
        assert (changed - image).abs()[mask > 0.9].mean() > 0.05
    pair = make_supervised_pair(image, _gen(7), DeformationSettings(max_displacement=3),
                                OutlierSettings(probability=1.0), intensity=None)
    assert pair["outlier"].sum() > 0
    # away from the outlier the true field still explains the pair
    recon = warp(pair["moving"][None], pair["flow"][None])[0]
    far = pair["outlier"] < 1e-3
    with_outlier_moved = ~far
    assert torch.allclose(recon[far], pair["fixed"][far], atol=2e-2)
    assert (recon - pair["fixed"]).abs()[with_outlier_moved].max() > 0.05


def test_shapes_images_carry_labels():
    image, labels = random_shapes_image((16, 20, 12), _gen(8))
    assert image.shape == labels.shape == (1, 16, 20, 12)
    assert 0 <= float(image.min()) and float(image.max()) <= 1
    assert len(torch.unique(labels)) >= 3


# ------------------------------------------------------------------------------------------------
# Middlebury .flo
# ------------------------------------------------------------------------------------------------


def test_flo_channel_order_is_explicit(tmp_path):
    """Library channel 0 = rows (y) = .flo v; channel 1 = columns (x) = .flo u."""
    field = np.zeros((2, 3, 4), np.float32)
    field[0] = 1.5  # rows
    field[1] = -2.0  # columns
    flow = field_to_flo(field)
    assert flow.shape == (3, 4, 2)
    assert np.all(flow[..., 0] == -2.0) and np.all(flow[..., 1] == 1.5)
    path = write_flo(tmp_path / "f.flo", field)
    raw = np.fromfile(path, "<f4")
    assert raw[0] == np.float32(FLO_TAG)
    assert tuple(np.frombuffer(raw[1:3].tobytes(), "<i4")) == (4, 3)  # width, height
    assert raw[3] == -2.0 and raw[4] == 1.5  # first pixel: u, v


@pytest.mark.parametrize("convention,sign", [("middlebury", 1.0), ("thesis", -1.0)])
def test_flo_round_trip_both_ways(tmp_path, convention, sign):
    rng = np.random.default_rng(0)
    field = rng.normal(size=(2, 7, 9)).astype(np.float32)
    path = write_flo(tmp_path / "a.flo", field, convention)
    assert np.array_equal(read_flo(path, convention), field)
    assert np.array_equal(read_flo(path, "middlebury"), sign * field)
    flow = rng.normal(size=(5, 6, 2)).astype(np.float32)
    assert np.array_equal(field_to_flo(flo_to_field(flow, convention), convention), flow)


def test_flo_errors(tmp_path):
    bad = tmp_path / "bad.flo"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(InputError, match="not a Middlebury"):
        read_flo(bad)
    with pytest.raises(InputError, match="does not exist"):
        read_flo(tmp_path / "none.flo")
    with pytest.raises(InputError, match=r"\(2, H, W\)"):
        field_to_flo(np.zeros((3, 4, 4)))
    with pytest.raises(InputError, match="convention"):
        field_to_flo(np.zeros((2, 4, 4)), "xy")
