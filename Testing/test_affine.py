"""The affine pre-alignment stage: its field convention, its recovery of a known map, and its guard."""
import math

import torch

from DeepSalRegLib.affine import affine_align, affine_field
from DeepSalRegLib.sample_data import SAMPLE_PAIRS
from DeepSalRegLib import io

import SimpleITK as sitk


def _sample_slice() -> torch.Tensor:
    array = sitk.GetArrayFromImage(io.read_image(str(SAMPLE_PAIRS["2d"][0])))
    array = (array - array.min()) / (array.max() - array.min())
    return torch.from_numpy(array.astype("float32"))[None, None]


def test_affine_field_is_the_stated_map_in_voxels():
    """u(x) = (A - I)(x - c) + t with c the grid centre, in array axis order; coarse grids in coarse voxels."""
    a = torch.tensor([[1.1, 0.2], [-0.1, 0.9]])
    t = torch.tensor([3.0, -2.0])
    u = affine_field(a, t, (9, 13))
    c = torch.tensor([4.0, 6.0])
    x = torch.tensor([2.0, 11.0])
    expected = (a - torch.eye(2)) @ (x - c) + t
    assert torch.allclose(u[0, :, 2, 11], expected, atol=1e-6)
    # the same map sampled on a 2x coarser grid (align-corners mapping: 5 x 7 voxels span 9 x 13)
    coarse = affine_field(a, t, (5, 7), scale=[2.0, 2.0])
    assert torch.allclose(coarse[0, :, 1, 5] * 2.0, (a - torch.eye(2)) @ (torch.tensor([2.0, 10.0]) - c) + t, atol=1e-6)

    # a batch of maps (the rotation probes): one field per map, each the map's own
    b = torch.stack([a, torch.eye(2)])
    batch = affine_field(b, torch.stack([t, -t]), (9, 13))
    assert batch.shape == (2, 2, 9, 13)
    assert torch.allclose(batch[0], u[0]) and torch.allclose(batch[1], affine_field(torch.eye(2), -t, (9, 13))[0])


def test_a_known_rotation_scaling_and_shift_is_recovered():
    fixed = _sample_slice()
    angle = math.radians(25)
    a = torch.tensor([[math.cos(angle) * 1.08, -math.sin(angle)], [math.sin(angle), math.cos(angle) * 0.93]])
    t = torch.tensor([5.0, -7.0])
    true = affine_field(a, t, fixed.shape[2:])
    inverse = affine_field(torch.linalg.inv(a), -torch.linalg.inv(a) @ t, fixed.shape[2:])
    from DeepSalRegLib.warp import warp

    moving = warp(fixed, inverse, padding="zeros")  # moving(A(x - c) + c + t) = fixed(x)
    result = affine_align(fixed, moving)
    error = (result.field - true).norm(dim=1)
    assert result.accepted
    assert float(error.mean()) < 0.3, float(error.mean())  # voxels; the true map moves voxels by ~20 on average
    assert float(true.norm(dim=1).mean()) > 10
    # without the rotated starting points the local cost stops in a wrong optimum for this rotation
    plain = affine_align(fixed, moving, start_angles=())
    assert float((plain.field - true).norm(dim=1).mean()) > float(error.mean())


def test_a_pair_that_cannot_be_improved_keeps_the_identity():
    """Aligned images: the optimiser ends near the identity but not better, so the guard returns it exactly."""
    fixed = _sample_slice()
    result = affine_align(fixed, fixed.clone())
    assert result.loss_end >= result.loss_start
    assert not result.accepted
    assert float(result.field.abs().max()) == 0.0
