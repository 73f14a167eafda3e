"""Instance optimisation: refine a field on one pair at test time (the accuracy dial of ``register``).

Starting from the network's field, a residual is optimised coarse to fine (image pyramid) to minimise a
joint-saliency-weighted local NCC plus diffusion regularisation and a folding penalty. The JSM weight is
recomputed (detached) as the alignment improves, so structure present in one image only (missing
correspondence) does not pull the field. Each level's correction is a stationary velocity integrated by
scaling and squaring and composed with the current field, so the refinement does not fold space.
Each level's velocity is Gaussian-smoothed (``velocity_sigma``) before it is integrated: Adam moves every
voxel's parameter by about the same step whatever its gradient, so an unsmoothed velocity turns noise in
weakly constrained regions into a rough field. Defaults (smoothness 5, sigma 1 voxel) were chosen on seven
benchmark pairs after the affine stage and the shipped networks (hands, ANHIR x2, DRIVE, brain, liver,
prostate; ``benchmarks/README.md``): against smoothness 1 without smoothing, DRIVE end-point error 2.45 ->
1.50 px, liver TRE 6.06 -> 3.98 mm, brain Dice 0.649 -> 0.698, ANHIR median TRE 6.3 / 9.3 -> 4.4 / 6.6 px,
SD of log-Jacobian about halved and no folding on any of them; sigma 2 or a window of 11 was better on
DRIVE only. Fields follow ``warp.py`` (voxels, fixed grid, fixed->moving).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .losses import jsm_weight, lncc_similarity, negative_jacobian_penalty, smoothness
from .saliency import gaussian_smooth, joint_saliency_map
from .warp import compose, integrate_velocity, resize_field, spatial_dims, warp

__all__ = ["Adam", "downsample", "instance_optimise", "pyramid_levels"]


class Adam:
    """Adam with a cosine-annealed step: ``torch.optim.Adam`` (betas 0.9/0.999, eps 1e-8) driven by
    ``CosineAnnealingLR(T_max=steps, eta_min=final_fraction * lr)``, step for step.

    The test-time stages (affine, refinement) use this instead of ``torch.optim``: the first use of
    ``torch.optim`` (or ``torch.utils.checkpoint``) in a process imports ``torch._dynamo``, 0.9 s on 2 CPU
    cores, and every command-line or Slicer registration is a fresh process (the 2D demo pair: 1.47 s ->
    0.55 s). ``Testing/test_optimise.py`` checks it against ``torch.optim``. Training keeps ``torch.optim``.

    Usage: compute the loss, ``loss.backward()``, ``opt.step()`` (which also clears the gradients).
    """

    def __init__(self, params, lr: float, steps: int | None = None, final_fraction: float = 1.0,
                 betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, self.steps, self.final_fraction = lr, steps, final_fraction
        self.betas, self.eps = betas, eps
        self.count = 0
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.params]

    def current_lr(self) -> float:
        """The step size of the next step (cosine from ``lr`` to ``final_fraction * lr`` over ``steps``)."""
        if not self.steps:
            return self.lr
        low = self.final_fraction * self.lr
        return low + (self.lr - low) * (1 + math.cos(math.pi * min(self.count, self.steps) / self.steps)) / 2

    @torch.no_grad()
    def step(self) -> None:
        lr = self.current_lr()
        self.count += 1
        b1, b2 = self.betas
        correction1, correction2 = 1 - b1 ** self.count, math.sqrt(1 - b2 ** self.count)
        for p, (m, v) in zip(self.params, self.moments):
            if p.grad is None:
                continue
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.addcdiv_(m, (v.sqrt() / correction2).add_(self.eps), value=-lr / correction1)
            p.grad = None


class _SmoothedVelocity(torch.autograd.Function):
    """``gaussian_smooth(v, sigma, "replicate")`` that keeps no intermediates: the backward pass recomputes
    the smoothing (at 256^3 the padded intermediates were 1.7 GB). ``torch.utils.checkpoint`` does the same
    but imports ``torch._dynamo`` (see ``Adam``)."""

    @staticmethod
    def forward(ctx, velocity, sigma):
        ctx.save_for_backward(velocity)
        ctx.sigma = sigma
        return gaussian_smooth(velocity, sigma, "replicate")

    @staticmethod
    def backward(ctx, grad):
        (velocity,) = ctx.saved_tensors
        with torch.enable_grad():
            v = velocity.detach().requires_grad_()
            smoothed = gaussian_smooth(v, ctx.sigma, "replicate")
        return torch.autograd.grad(smoothed, v, grad)[0], None


def downsample(t: torch.Tensor, factor: int) -> torch.Tensor:
    """Average ``(B, C, *S)`` over ``factor``-wide blocks (a partial last block averages what it holds)."""
    if factor == 1:
        return t
    pool = F.avg_pool2d if spatial_dims(t) == 2 else F.avg_pool3d
    return pool(t, factor, ceil_mode=True)


def pyramid_levels(shape, levels, max_level_voxels: int) -> list[int]:
    """The usable downsampling factors of ``levels`` for a grid of ``shape``: each keeps >= 8 voxels per axis
    and at most ``max_level_voxels`` voxels (the coarsest usable one is kept in any case)."""
    levels = [f for f in levels if min(n // f for n in shape) >= 8] or [1]
    small_enough = [f for f in levels if math.prod(-(-n // f) for n in shape) <= max_level_voxels]
    return small_enough or [max(levels)]


def _exp(velocity: torch.Tensor) -> torch.Tensor:
    """Scaling and squaring with enough steps that each composed increment stays under half a voxel."""
    peak = float(velocity.detach().abs().amax()) if velocity.numel() else 0.0
    steps = max(6, math.ceil(math.log2(max(peak, 1e-6) / 0.5)) + 1)
    return integrate_velocity(velocity, min(steps, 12))


def instance_optimise(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    field: torch.Tensor | None = None,
    iterations: int = 50,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    smoothness_weight: float = 5.0,
    jacobian_weight: float = 0.0,
    jsm_alpha: float = 0.1,
    use_jsm: bool = True,
    learning_rate: float = 0.5,
    max_learning_rate: float = 2.0,
    levels=(8, 4, 2, 1),
    max_level_voxels: int = 2 ** 20,
    window: int = 7,
    jsm_every: int = 10,
    diffeomorphic: bool = True,
    velocity_sigma: float = 1.0,
    progress: Callable[[float, str], None] | None = None,
) -> torch.Tensor:
    """Optimise a displacement field for one pair.

    Args:
        fixed, moving: ``(1, 1, *S)`` images in [0, 1] on the same (working) grid.
        field: ``(1, nd, *S)`` initial field (e.g. the network's); zeros if None.
        iterations: total optimisation steps, split over the pyramid levels (coarse levels are cheap).
        fixed_mask, moving_mask: optional ``(1, 1, *S)`` masks (moving mask on the moving grid); the
            similarity counts only where both are set.
        smoothness_weight: weight of the diffusion regulariser (per level voxels).
        jacobian_weight: weight of the negative-Jacobian (folding) penalty.
        jsm_alpha, use_jsm: the similarity is weighted by ``alpha + (1-alpha) * JSM(F, W)`` when ``use_jsm``.
        learning_rate, max_learning_rate: initial Adam step at full resolution, in voxels of each level; at
            1/f resolution it is ``min(f * learning_rate, max_learning_rate)``; cosine-annealed to 25 % within
            each level.
        levels: downsampling factors of the pyramid, coarse to fine.
        max_level_voxels: levels whose grid holds more voxels than this are skipped (the finest level kept
            then runs at 1/2 or 1/4 resolution and its correction is interpolated): this keeps a large 3D
            refinement at seconds per 10 steps on a CPU.
        window: LNCC window (voxels).
        jsm_every: recompute the JSM weight every this many steps.
        velocity_sigma: Gaussian smoothing (voxels of each level) of the optimised velocity; 0 = none.
        diffeomorphic: optimise each level's correction as a stationary velocity (scaling and squaring)
            composed with the current field, so the refinement itself cannot fold space.
        progress: ``progress(fraction, message)`` callback.
    Returns:
        ``(1, nd, *S)`` refined field (detached).
    """
    nd = spatial_dims(fixed)
    shape = fixed.shape[2:]
    field = torch.zeros(1, nd, *shape, device=fixed.device) if field is None else field.detach()
    if iterations <= 0:
        return field
    levels = pyramid_levels(shape, levels, max_level_voxels)
    # equal steps per level: the coarse ones are cheap and the finest one sets sub-voxel accuracy
    budget = [max(1, round(iterations / len(levels)))] * len(levels)
    budget[-1] = max(1, iterations - sum(budget[:-1]))
    done = 0
    for factor, steps in zip(levels, budget):
        f_l, m_l = downsample(fixed, factor), downsample(moving, factor)
        size = f_l.shape[2:]
        mask_f = downsample(fixed_mask.float(), factor) if fixed_mask is not None else None
        mask_m = downsample(moving_mask.float(), factor) if moving_mask is not None else None
        base = resize_field(field, size)
        residual = torch.zeros_like(base, requires_grad=True)
        # coarse levels take large steps (capture range), the finest small ones (sub-voxel precision);
        # within a level the step is cosine-annealed
        # (with few steps per level, Adam's first sign-like steps would leave a rough field: scale them down)
        lr = min(learning_rate * factor, max_learning_rate) * min(1.0, steps / 30)
        optimiser = Adam([residual], lr=lr, steps=steps, final_fraction=0.25)
        weight = None

        def velocity():
            if velocity_sigma <= 0:
                return residual
            return _SmoothedVelocity.apply(residual, velocity_sigma)

        for step in range(steps):
            v = velocity()  # smoothed once per step, used by the warp and the regulariser
            u = compose(base, _exp(v)) if diffeomorphic else base + v
            warped = warp(m_l, u)
            if use_jsm and (weight is None or step % jsm_every == 0):
                with torch.no_grad():
                    weight = jsm_weight(joint_saliency_map(f_l, warped), jsm_alpha)
            w = weight if use_jsm else torch.ones_like(f_l)
            if mask_f is not None:
                w = w * mask_f
            if mask_m is not None:
                w = w * warp(mask_m, u)
            loss = lncc_similarity(f_l, warped, w, window=window)
            loss = loss + smoothness_weight * smoothness(v if diffeomorphic else u, "diffusion")
            if jacobian_weight:
                loss = loss + jacobian_weight * negative_jacobian_penalty(u, margin=0.05)
            loss.backward()
            optimiser.step()
            done += 1
            if progress is not None and (step % 5 == 0 or step == steps - 1):
                progress(done / iterations, f"refining (1/{factor} resolution) step {done}/{iterations}")
        # apply the level's correction at full resolution (keeps the finer detail of the starting field)
        with torch.no_grad():
            correction = resize_field(velocity().detach(), shape)
            if diffeomorphic:
                field = compose(field, _exp(correction))
            else:
                field = field + correction
    return field
