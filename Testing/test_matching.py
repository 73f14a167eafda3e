"""Explicit matching (matching.py): the cost volume finds known shifts, in both directions and dimensions,
and the matching network learns a known motion that it did not find at initialisation."""
import pytest
import torch
import torch.nn.functional as F

from DeepSalRegLib.matching import MatchingNet, _displacements, cost_volume, soft_argmax
from DeepSalRegLib.networks import build_model, load_checkpoint, save_checkpoint
from DeepSalRegLib.warp import warp


def _smooth_noise(shape, seed, channels=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels, *shape, generator=g)
    pool = F.avg_pool2d if len(shape) == 2 else F.avg_pool3d
    return pool(x, 3, stride=1, padding=1)


@pytest.mark.parametrize("shift", [(2, -1), (-3, 0, 1)])
def test_cost_volume_peaks_at_the_true_displacement(shift):
    """moving(x + d) = fixed(x) for a shift d: the best channel at interior voxels is d (fixed -> moving)."""
    nd = len(shift)
    shape = (24,) * nd
    moving = _smooth_noise(shape, seed=nd)
    # fixed(x) = moving(x + d): roll moving by -d along each axis
    fixed = torch.roll(moving, shifts=[-s for s in shift], dims=list(range(2, 2 + nd)))
    costs = cost_volume(fixed, moving, radius=3)
    assert costs.shape == (1, 7 ** nd, *shape)
    best = _displacements(nd, 3)[costs.argmax(dim=1)]  # (1, *S, nd)
    interior = (slice(None),) + (slice(4, -4),) * nd
    assert torch.all(best[interior] == torch.tensor(shift, dtype=torch.float32))


def test_soft_argmax_of_a_sharp_peak_is_its_displacement():
    d = _displacements(3, 2)
    costs = torch.full((1, len(d), 2, 2, 2), -1.0)
    k = 17
    costs[:, k] = 1.0
    out = soft_argmax(costs, d, torch.tensor(200.0))
    assert torch.allclose(out, d[k].view(1, 3, 1, 1, 1).expand(1, 3, 2, 2, 2), atol=1e-4)
    uniform = soft_argmax(torch.zeros(1, len(d), 2, 2, 2), d, torch.tensor(1.0))
    assert torch.allclose(uniform, torch.zeros_like(uniform), atol=1e-6)  # symmetric offsets: no preference


@pytest.mark.parametrize("preset,shape", [("matching-2d", (2, 1, 37, 51)), ("matching-3d", (1, 1, 19, 23, 17))])
def test_matching_presets_give_fields_for_odd_sizes_and_round_trip(preset, shape, tmp_path):
    model = build_model(preset).eval()
    assert isinstance(model.global_net, MatchingNet) and model.multiple == 8
    fixed, moving = torch.rand(shape), torch.rand(shape)
    with torch.no_grad():
        out = model(fixed, moving)
    nd = len(shape) - 2
    assert out["flow"].shape == (shape[0], nd, *shape[2:]) and torch.isfinite(out["flow"]).all()
    path = save_checkpoint(tmp_path / "m.pt", model)
    again, payload = load_checkpoint(path)
    assert payload["config"]["global_type"] == "matching"
    with torch.no_grad():
        assert torch.allclose(again(fixed, moving)["flow"], out["flow"], atol=1e-6)


def test_matching_network_learns_a_known_motion():
    """A few supervised steps on smooth images moved by a known smooth field: the end-point error falls well
    below the identity's (untrained, it is no better than the identity)."""
    torch.manual_seed(0)
    model = build_model("matching-2d", local_widths=[8, 8, 8])
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    shape = (64, 64)

    def pair(seed):
        g = torch.Generator().manual_seed(seed)
        image = F.avg_pool2d(torch.rand(1, 1, *shape, generator=g), 5, stride=1, padding=2)
        image = (image - image.min()) / (image.max() - image.min())
        coarse = torch.randn(1, 2, 3, 3, generator=g) * 2.5 + torch.randn(1, 2, 1, 1, generator=g) * 2.0
        flow = F.interpolate(coarse, size=shape, mode="bicubic", align_corners=True)
        return warp(image, flow), image, flow  # fixed = moving(x + u)

    def epe(pred, truth):
        return ((pred - truth) ** 2).sum(1).sqrt()[..., 8:-8, 8:-8].mean()

    test = [pair(1000 + k) for k in range(4)]
    with torch.no_grad():
        before = torch.stack([epe(model(f, m)["flow"], u) for f, m, u in test]).mean()
    identity = torch.stack([epe(torch.zeros_like(u), u) for _, _, u in test]).mean()
    for step in range(200):
        f, m, u = pair(step)
        out = model(f, m)
        loss = epe(out["flow"], u) + 0.5 * epe(out["flow_coarse"], u)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as training does (train.grad_clip)
        opt.step()
    with torch.no_grad():
        after = torch.stack([epe(model(f, m)["flow"], u) for f, m, u in test]).mean()
    assert before > 0.9 * identity  # untrained: it does not match yet
    assert after < 0.5 * identity, (float(identity), float(before), float(after))
