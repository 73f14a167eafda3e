"""A few hundred optimisation steps of the whole network on one real pair lower the loss and align the images."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepSalRegLib.losses import RegistrationLoss
from DeepSalRegLib.networks import PRESETS, build_model


def _tensor(image: sitk.Image, shrink: int = 1) -> torch.Tensor:
    if shrink > 1:
        image = sitk.BinShrink(image, [shrink] * image.GetDimension())
    a = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))
    lo, hi = np.percentile(a, [0.5, 99.5])
    return torch.from_numpy(np.clip((a - lo) / (hi - lo), 0, 1)).float()[None, None]


def _ncc(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def _overfit(preset, fixed, moving, steps, lr):
    torch.manual_seed(0)
    model = build_model(preset)
    loss_fn = RegistrationLoss(**PRESETS[preset]["loss"])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = model(fixed, moving)
        loss, _ = loss_fn(out, fixed)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        out = model(fixed, moving)
    return losses, out


@pytest.mark.shared_data
def test_2d_hand_xray_pair(shared_data):
    fixed = _tensor(sitk.ReadImage(str(shared_data / "fair" / "hands-R.jpg"), sitk.sitkFloat32))
    moving = _tensor(sitk.ReadImage(str(shared_data / "fair" / "hands-T.jpg"), sitk.sitkFloat32))
    losses, out = _overfit("modern-2d", fixed, moving, steps=200, lr=2e-3)
    assert np.mean(losses[-10:]) < np.mean(losses[:5]) - 0.05
    before, after = _ncc(fixed, moving), _ncc(fixed, out["warped"])
    assert after > before + 0.05, (before, after)
    # landmarks (0-based row, col; T = moving, R = fixed): p_moving ~ p_fixed + u(p_fixed)
    lm = np.loadtxt(shared_data / "fair" / "hands_landmarks_pixel_rc.csv", delimiter=",", comments="#")
    moving_rc, fixed_rc = lm[:, :2], lm[:, 2:]
    grid = torch.from_numpy(fixed_rc[:, ::-1].copy()).float()  # (x=col, y=row) for grid_sample
    grid = (grid / 127.0 * 2 - 1).view(1, 1, -1, 2)
    u = torch.nn.functional.grid_sample(out["flow"], grid, align_corners=True)[0, :, 0].T.numpy()
    tre_before = np.linalg.norm(fixed_rc - moving_rc, axis=1).mean()
    tre_after = np.linalg.norm(fixed_rc + u - moving_rc, axis=1).mean()
    print(f"hands: NCC {before:.3f} -> {after:.3f}, landmark error {tre_before:.2f} -> {tre_after:.2f} px")
    assert tre_after < 0.95 * tre_before, (tre_before, tre_after)


@pytest.mark.shared_data
def test_3d_brain_pair(shared_data):
    fixed = _tensor(sitk.ReadImage(str(shared_data / "fair" / "brain3D_reference.nii.gz")), shrink=4)
    moving = _tensor(sitk.ReadImage(str(shared_data / "fair" / "brain3D_template.nii.gz")), shrink=4)
    losses, out = _overfit("modern-3d", fixed, moving, steps=150, lr=2e-3)
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:5])
    before, after = _ncc(fixed, moving), _ncc(fixed, out["warped"])
    assert after > before + 0.02, (before, after)
