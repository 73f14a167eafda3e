"""The test-time optimiser and the recomputed velocity smoothing of ``optimise.py`` against torch's own."""
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from DeepSalRegLib.optimise import Adam, _SmoothedVelocity
from DeepSalRegLib.saliency import gaussian_smooth

ROOT = Path(__file__).resolve().parents[1]


def _rosenbrock(p):
    return (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2 + (p[2:] ** 2).sum()


@pytest.mark.parametrize("steps, final_fraction", [(None, 1.0), (40, 0.25), (40, 0.1)])
def test_adam_follows_torch_optim_step_for_step(steps, final_fraction):
    start = torch.tensor([-1.2, 1.0, 0.5, -0.3], dtype=torch.float64)
    ours, theirs = start.clone().requires_grad_(), start.clone().requires_grad_()
    lr = 0.05
    mine = Adam([ours], lr=lr, steps=steps, final_fraction=final_fraction)
    reference = torch.optim.Adam([theirs], lr=lr)
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=steps, eta_min=final_fraction * lr)
                if steps else None)
    for _ in range(steps or 40):
        _rosenbrock(ours).backward()
        mine.step()
        reference.zero_grad()
        _rosenbrock(theirs).backward()
        reference.step()
        if schedule is not None:
            schedule.step()
    assert ours.grad is None  # step() clears the gradients
    assert float((ours.detach() - start).abs().max()) > 0.1  # it moved
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-10, atol=1e-10)
    if steps:  # the cosine ends at final_fraction * lr
        assert math.isclose(mine.current_lr(), final_fraction * lr, rel_tol=1e-12)


@pytest.mark.parametrize("shape", [(1, 2, 17, 23), (1, 3, 9, 11, 13)])
def test_recomputed_smoothing_has_the_gradient_of_the_smoothing(shape):
    torch.manual_seed(0)
    v = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(*shape, dtype=torch.float64)
    (_SmoothedVelocity.apply(v, 1.5) * weight).sum().backward()
    ours = v.grad.clone()
    v.grad = None
    (gaussian_smooth(v, 1.5, "replicate") * weight).sum().backward()
    torch.testing.assert_close(ours, v.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_SmoothedVelocity.apply(v, 1.5), gaussian_smooth(v, 1.5, "replicate"))


def test_a_registration_does_not_import_torch_dynamo():
    """Importing ``torch._dynamo`` costs about 0.9 s per process on 2 CPU cores (each command-line or Slicer
    registration is a fresh process): the affine stage and the refinement must not trigger it."""
    script = textwrap.dedent(f"""
        import sys, warnings
        sys.path.insert(0, {str(ROOT)!r})
        import torch
        torch.set_num_threads(1)
        from DeepSalRegLib.registration import register
        from DeepSalRegLib.sample_data import SAMPLE_PAIRS
        fixed, moving = SAMPLE_PAIRS["2d"]
        warnings.simplefilter("ignore")
        result = register(fixed, moving, device="cpu", iterations=4)
        assert result.metrics["affine"] is not None
        print("torch._dynamo" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_a_level_stops_once_its_loss_stops_improving():
    from DeepSalRegLib.optimise import Convergence

    rule = Convergence(max_steps=60, min_steps=10, window=5, tolerance=1e-3)
    falling = [1.0 - 0.01 * i for i in range(60)]  # 0.05 per window: keeps going
    assert not any(rule.stop(falling[:n], None) for n in range(1, 60))
    assert rule.stop(falling, None)  # max_steps
    flat = [0.5] * 30
    stops = [n for n in range(1, 31) if rule.stop(flat[:n], None)]
    assert stops[0] == 10  # min_steps, on a window boundary
    assert not rule.stop([0.5] * 12, None)  # only on window boundaries


def test_thin_volumes_keep_coarse_levels_in_plane_and_the_velocity_grid_is_coarser():
    from DeepSalRegLib.optimise import downsample, level_factors, pyramid_levels, velocity_grid

    assert level_factors((16, 112, 112), 8) == (2, 8, 8)
    assert pyramid_levels((16, 112, 112), (8, 4, 2, 1), 2 ** 20) == [8, 4, 2, 1]
    assert downsample(torch.zeros(1, 1, 16, 112, 112), 8).shape[2:] == (8, 14, 14)
    assert pyramid_levels((8, 8), (8, 4, 2, 1), 2 ** 20) == [8]  # nothing coarser than 8 voxels: one level
    assert velocity_grid((48, 96, 80), 2) == (24, 48, 40)
    assert velocity_grid((12, 96, 80), 2) == (12, 48, 40)


def test_a_passed_deadline_ends_each_level_after_one_step():
    import time

    from DeepSalRegLib.optimise import Convergence, instance_optimise

    g = torch.Generator().manual_seed(0)
    fixed = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 64, 64, generator=g), 5, 1, 2)
    moving = torch.roll(fixed, 2, 2)
    stats = {}
    instance_optimise(fixed, moving, None, None, convergence=Convergence(deadline=time.perf_counter() - 1),
                      stats=stats)
    assert stats["steps"] == [1]  # the first level used its (empty) share; the others did not start
    stats = {}
    instance_optimise(fixed, moving, None, None, convergence=Convergence(max_steps=30), stats=stats)
    assert stats["levels"] == [8, 4, 2, 1] and all(1 <= n <= 30 for n in stats["steps"])


def test_finer_check_prefers_the_field_that_aligns_the_sharper_images_in_both_directions():
    from DeepSalRegLib.optimise import _finer_loss_change
    from DeepSalRegLib.warp import warp

    g = torch.Generator().manual_seed(1)
    fixed = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 96, 96, generator=g), 3, 1, 1)
    truth = torch.zeros(1, 2, 96, 96)
    truth[:, 1] = 3.0  # fixed -> moving: 3 voxels along the last axis
    moving = warp(fixed, -truth)  # so that warp(moving, truth) ~ fixed inside the image
    zero = torch.zeros_like(truth)
    for factors in ((1,), (2,), (4, 2, 1)):
        assert _finer_loss_change(fixed, moving, zero, truth, factors, None, None, 7) < 0
        assert _finer_loss_change(fixed, moving, truth, zero, factors, None, None, 7) > 0
    # the moving mask counts too: with nothing of the moving image inside it there is nothing to prefer
    assert not _finer_loss_change(fixed, moving, zero, truth, (1,), None, torch.zeros_like(fixed), 7) < 0


def test_the_finer_judge_remembers_the_kept_field_losses_exactly():
    """``_FinerJudge`` reuses the losses of the field it kept; its judgements equal fresh ones."""
    from DeepSalRegLib.optimise import _FinerJudge, _Pyramid, _finer_loss_change
    from DeepSalRegLib.warp import warp

    g = torch.Generator().manual_seed(2)
    fixed = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 64, 64, generator=g), 3, 1, 1)
    truth = torch.zeros(1, 2, 64, 64)
    truth[:, 0] = 2.0
    moving = warp(fixed, -truth)
    zero, half = torch.zeros_like(truth), truth / 2
    judge = _FinerJudge(_Pyramid(fixed, moving), 7)
    first = judge.change(zero, half, (4, 2, 1))
    assert first == _finer_loss_change(fixed, moving, zero, half, (4, 2, 1), None, None, 7) and first < 0
    judge.accept()  # half became the field
    assert judge.change(half, truth, (2, 1)) == _finer_loss_change(fixed, moving, half, truth, (2, 1), None, None, 7)
    # not accepted: the next judgement starts again from half
    assert judge.change(half, zero, (1,)) == _finer_loss_change(fixed, moving, half, zero, (1,), None, None, 7) > 0


def test_finer_check_rejects_a_correction_that_only_the_coarse_scale_likes():
    """A smooth shift that aligns the blurred images but misaligns their fine texture: the one-level-finer
    judgement (1/4 for a 1/8 level) says better, the mean over every finer scale says worse (as a coarse level
    did around resection cavities in the 3D study, session 14)."""
    from DeepSalRegLib.optimise import _finer_loss_change
    from DeepSalRegLib.warp import warp

    g = torch.Generator().manual_seed(3)
    yy, xx = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    blobs = torch.exp(-((yy - 64) ** 2 + (xx - 60) ** 2) / (2 * 18.0 ** 2))[None, None]
    texture = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 128, 128, generator=g), 3, 1, 1)
    fixed = blobs + 0.1 * texture
    # the moving image: the same texture, but the blob 4 voxels further along the last axis
    moving = torch.exp(-((yy - 64) ** 2 + (xx - 64) ** 2) / (2 * 18.0 ** 2))[None, None] + 0.1 * texture
    shift = torch.zeros(1, 2, 128, 128)
    shift[:, 1] = 4.0  # aligns the blobs, misaligns the texture everywhere
    zero = torch.zeros_like(shift)
    assert _finer_loss_change(fixed, moving, zero, shift, (4,), None, None, 7) < 0
    assert _finer_loss_change(fixed, moving, zero, shift, (4, 2, 1), None, None, 7) > 0


def test_every_level_reports_whether_its_correction_was_kept():
    from DeepSalRegLib.optimise import Convergence, instance_optimise

    g = torch.Generator().manual_seed(0)
    fixed = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 64, 64, generator=g), 5, 1, 2)
    moving = torch.roll(fixed, 2, 2)
    stats = {}
    field = instance_optimise(fixed, moving, None, None, convergence=Convergence(max_steps=30), stats=stats)
    assert len(stats["kept"]) == len(stats["levels"]) and stats["kept"][-1]  # the finest level is never judged
    assert field[0, 0].mean() > 1.0  # the 2-voxel roll is recovered (fixed -> moving: +2 along axis 0)


def test_the_3d_fine_levels_let_the_field_follow_a_sliding_slab():
    """A textured slab slides 3 voxels along an axis between two static slabs (the liver under the abdominal
    wall): the 3D default's weaker fine-level smoothness (``FINE_SMOOTHNESS_WEIGHT``) recovers the known
    field better next to the sliding planes and in the static slabs than the coarse levels' weight would."""
    from DeepSalRegLib.optimise import FINE_SMOOTHNESS_WEIGHT, instance_optimise

    assert FINE_SMOOTHNESS_WEIGHT[3] < 5.0
    g = torch.Generator().manual_seed(2)
    texture = gaussian_smooth(torch.rand(1, 1, 32, 40, 40, generator=g), 1.0, "replicate")
    fixed = (texture - texture.min()) / (texture.max() - texture.min())
    moving = fixed.clone()
    moving[:, :, 10:22] = torch.roll(fixed[:, :, 10:22], 3, dims=3)  # M(x + u(x)) = F(x)
    truth = torch.zeros(1, 3, 32, 40, 40)
    truth[:, 1, 10:22] = 3.0
    errors = {}
    for weight in (None, 5.0):
        field = instance_optimise(fixed, moving, None, None, fine_smoothness_weight=weight, velocity_factor=2)
        error = (field - truth).norm(dim=1)[0, :, 6:-6, 6:-6]  # away from the in-plane borders
        near = torch.cat([error[7:10], error[22:25]]).mean()  # static voxels within 3 of a sliding plane
        static = torch.cat([error[2:9], error[23:30]]).mean()
        errors[weight] = float(near), float(static)
    assert errors[None][0] < 0.92 * errors[5.0][0], errors
    assert errors[None][1] < 0.9 * errors[5.0][1], errors
    assert errors[None][0] < 0.6, errors  # within about a fifth of the slide


@pytest.mark.parametrize("shape", [(96, 96), (40, 40, 40)])
def test_the_confidence_keeps_a_wiped_region_from_being_shrunk_or_stretched(shape):
    """A textured image against itself with a ball wiped flat in the moving image (a missing correspondence, no
    motion: the true field is 0): with the confidence weight (whose missing voxels also leave the windows'
    statistics) the refinement moves the wiped ball much less than the ablation without it, and stays still
    elsewhere."""
    from DeepSalRegLib.optimise import instance_optimise

    torch.manual_seed(0)
    image = gaussian_smooth(torch.rand(1, 1, *shape), 1.5, "replicate")
    image = (image - image.min()) / (image.max() - image.min())
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    ball = sum((g - n / 2) ** 2 for g, n in zip(grids, shape)).sqrt() < 0.15 * shape[0]
    moving = image.clone()
    moving[0, 0][ball] = float(image.mean())
    inside = {}
    for use_jsm in (True, False):
        field = instance_optimise(image, moving, None, iterations=None, use_jsm=use_jsm, velocity_factor=2,
                                  levels=(4, 2, 1))
        size = field.square().sum(dim=1).sqrt()[0]
        inside[use_jsm] = float(size[ball].mean())
        assert float(size[~ball].mean()) < 0.08
    assert inside[True] < 0.85 * inside[False]
