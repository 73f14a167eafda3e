"""Affine pre-alignment: one global linear map, found by optimisation, before the deformable stages.

The classic tools start every deformable registration with an affine stage (ANTs: rigid + affine; elastix:
affine then B-spline). Global motion (a rotated hand, a shifted liver, a different head size) is then
handled by 12 (3D) or 6 (2D) parameters instead of a deformable field's capture range.

Convention (as ``warp.py``): working-grid voxel coordinates ``x`` (array axis order); the map is
``x -> A (x - c) + c + t`` with ``c`` the grid centre, so its displacement field is
``u(x) = (A - I)(x - c) + t`` (fixed -> moving, voxels). The working grid is isotropic, so ``A`` is also the
physical linear part up to the grid's orientation.

The cost is the local NCC of the refinement (``optimise.py``), unweighted: a global map of 6 or 12
parameters cannot be bent locally by structure present in one image only, and on stain pairs of very
different appearance (ANHIR rat kidney) the joint-saliency weight led it to a wrong optimum (TRE 46 px,
against 3 px unweighted). It runs on a coarse pyramid (1/8, 1/4, 1/2 resolution, at most 2^17 voxels per
level): milliseconds to tens of milliseconds per step. The start is the better of the identity and the
centre-of-mass translation; from it and from rotated copies of it (+/-20 and +/-40 degrees about each axis)
a few probe steps at 1/8 resolution (all rotations as one batch) pick the seed of the pyramid (a local cost
alone falls into a wrong optimum for a hand turned by 30 degrees). The result is kept only if its LNCC beats
the start's, so the stage cannot make a pair worse by its own measure. Where only one image has data
(outside its field of view, outside a mask) does not count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .losses import fixed_box_means, lncc_similarity
from .optimise import Adam, Convergence, downsample, pyramid_levels
from .warp import identity_grid, spatial_dims, warp

__all__ = ["AffineResult", "affine_align", "affine_field"]


@dataclass
class AffineResult:
    """Outcome of ``affine_align``.

    Attributes:
        field: ``(1, nd, *S)`` displacement of the affine map on the full working grid (voxels).
        matrix: ``(nd, nd)`` linear part ``A`` (array axis order).
        translation: ``(nd,)`` translation ``t`` in voxels.
        loss_start, loss_end: the LNCC loss at the start and at the end, at the finest level used.
        accepted: False when the optimised map did not beat the start (then ``field`` is the start's: the
            identity or the centre-of-mass translation).
    """

    field: torch.Tensor
    matrix: torch.Tensor
    translation: torch.Tensor
    loss_start: float
    loss_end: float
    accepted: bool


def affine_field(matrix: torch.Tensor, translation: torch.Tensor, shape, scale=None) -> torch.Tensor:
    """Displacement ``(1, nd, *shape)`` of ``x -> A (x - c) + c + t`` in full-grid voxels.

    With ``scale`` (per axis: full-grid voxels per voxel of ``shape``, as ``resize_field``'s align-corners
    mapping), the field is evaluated on a coarse grid and returned in coarse voxels. A batch of maps
    (``matrix`` ``(K, nd, nd)``, ``translation`` ``(K, nd)``) gives ``(K, nd, *shape)``.
    """
    nd = len(shape)
    scale = torch.ones(nd) if scale is None else torch.as_tensor(scale, dtype=matrix.dtype)
    scale = scale.to(matrix.device, matrix.dtype)
    full_shape = [(n - 1) * s + 1 for n, s in zip(shape, scale.tolist())]
    centre = torch.tensor([(n - 1) / 2 for n in full_shape], device=matrix.device, dtype=matrix.dtype)
    x = identity_grid(shape, matrix.device, matrix.dtype) * scale.view(nd, *([1] * nd))
    p = (x - centre.view(nd, *([1] * nd))).reshape(nd, -1)
    eye = torch.eye(nd, device=matrix.device, dtype=matrix.dtype)
    u = (matrix - eye) @ p + translation.unsqueeze(-1)
    return (u / scale.view(nd, 1)).reshape(-1, nd, *shape)


def _rotations(nd: int, angles, device, dtype) -> list[torch.Tensor]:
    """The identity and rotations by +/- each angle (degrees) in the plane of every pair of axes."""
    out = [torch.eye(nd, device=device, dtype=dtype)]
    for i, j in ((0, 1),) if nd == 2 else ((0, 1), (0, 2), (1, 2)):
        for angle in angles:
            for sign in (1.0, -1.0):
                c, s = math.cos(math.radians(sign * angle)), math.sin(math.radians(sign * angle))
                r = torch.eye(nd, device=device, dtype=dtype)
                r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
                out.append(r)
    return out


def _centre_of_mass(image: torch.Tensor) -> torch.Tensor:
    nd = spatial_dims(image)
    weights = image[0, 0].clamp_min(0)
    total = weights.sum()
    grid = identity_grid(image.shape[2:], image.device, image.dtype)
    if float(total) <= 0:
        return torch.tensor([(n - 1) / 2 for n in image.shape[2:]], dtype=image.dtype)
    return (grid * weights).reshape(nd, -1).sum(-1) / total


def affine_align(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    iterations: int = 200,
    levels=(8, 4, 2),
    max_level_voxels: int = 2 ** 17,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    window: int = 7,
    learning_rate: float = 0.02,
    start_angles=(20.0, 40.0),
    probe_steps: int = 15,
    max_seeds: int = 3,
    convergence: Convergence | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> AffineResult:
    """Find the affine map that best aligns ``moving`` to ``fixed`` (both ``(1, 1, *S)`` on one grid, in [0, 1]).

    Args:
        iterations: total Adam steps, split equally over the pyramid levels.
        levels: downsampling factors, coarse to fine; levels over ``max_level_voxels`` are skipped (the
            coarsest is always kept).
        fixed_mask, moving_mask: optional ``(1, 1, *S)`` masks; the similarity counts only where both are set.
        window: the LNCC window (voxels of each level).
        learning_rate: Adam step of the linear part (per step) and of the translation (in units of the
            grid's half extent); cosine-annealed to 10 % within each level.
        start_angles: rotations (degrees, both signs, about each axis in 3D) tried as starting points,
            ``probe_steps`` steps each at the coarsest level, besides no rotation; ``()`` = no probing.
        max_seeds: the pyramid starts from the best-ranked probe; while its result does not beat the start,
            from the next-ranked ones, up to this many in all.
        convergence: optional stopping rule: a level ends early once its loss stops improving
            (``Convergence.stop``; its ``max_steps`` is ignored: a level's budget is its share of ``iterations``).
        progress: ``progress(fraction, message)`` callback.
    """
    nd = spatial_dims(fixed)
    shape = tuple(fixed.shape[2:])
    dev, dtype = fixed.device, fixed.dtype
    radius = max(shape) / 2.0
    levels = pyramid_levels(shape, levels, max_level_voxels)
    eye = torch.eye(nd, device=dev, dtype=dtype)
    linear = torch.zeros(nd, nd, device=dev, dtype=dtype, requires_grad=True)  # A = I + linear
    shift = torch.zeros(nd, device=dev, dtype=dtype, requires_grad=True)      # t = radius * shift

    def level_inputs(factor):
        f_l, m_l = downsample(fixed, factor), downsample(moving, factor)
        size = f_l.shape[2:]
        scale = [(n - 1) / max(m - 1, 1) for n, m in zip(shape, size)]
        w_mask = downsample(fixed_mask.float(), factor) if fixed_mask is not None else None
        m_mask = downsample(moving_mask.float(), factor) if moving_mask is not None else None
        return f_l, m_l, scale, w_mask, m_mask, fixed_box_means(f_l, window)

    def loss_at(f_l, m_l, scale, w_mask, m_mask, f_means, a, t, reduction="mean"):
        """The LNCC loss of the map ``(I + a, radius t)``; a batch of maps (``a`` ``(K, nd, nd)``) with
        ``reduction="batch"`` gives the ``(K,)`` losses of all of them in one pass."""
        u = affine_field(eye + a, radius * t, f_l.shape[2:], scale)
        k = u.shape[0]
        warped = warp(m_l.expand(k, -1, *m_l.shape[2:]), u)
        w = torch.ones_like(warped)
        if w_mask is not None:
            w = w * w_mask
        if m_mask is not None:
            w = w * warp(m_mask.expand(k, -1, *m_mask.shape[2:]), u)
        return lncc_similarity(f_l.expand_as(warped), warped, w, window=window, reduction=reduction,
                               fixed_means=f_means.expand(k, -1, *f_means.shape[2:])), warped

    # start: the identity or the centre-of-mass translation, whichever aligns better (coarsest level) ...
    coarse = level_inputs(levels[0])
    com_shift = (_centre_of_mass(moving) - _centre_of_mass(fixed)).to(dev, dtype) / radius
    zero = torch.zeros(nd, device=dev, dtype=dtype)
    with torch.no_grad():
        shifts = sorted((zero, com_shift), key=lambda t: float(loss_at(*coarse, linear, t)[0]))
        shift.copy_(shifts[0])
    initial = (linear.detach().clone(), shift.detach().clone())
    # ... then a few steps from each of several rotations (a local cost has local optima for large
    # rotations: a hand turned by 30 degrees); the best one seeds the pyramid
    if start_angles:
        # all rotations at once, as a batch: each has its own loss, gradient and (elementwise) Adam state, as
        # if probed one after the other (at 1/8 resolution a step is mostly fixed overhead: 3.5x faster)
        rotations = torch.stack(_rotations(nd, start_angles, dev, dtype))
        probe_linear = (rotations - eye).requires_grad_()
        probe_shift = shifts[0].expand(len(rotations), nd).clone().requires_grad_()
        probe = Adam([probe_linear, probe_shift], lr=learning_rate)
        for _ in range(probe_steps):
            losses, _ = loss_at(*coarse, probe_linear, probe_shift, reduction="batch")
            losses.sum().backward()
            probe.step()
        with torch.no_grad():
            scores = loss_at(*coarse, probe_linear, probe_shift, reduction="batch")[0]
        # the probes' few steps only rank the seeds: the pyramid restarts from a seed's rotation
        seeds = [rotations[int(k)] for k in torch.argsort(scores, stable=True)[:max_seeds]]
    else:
        seeds = [eye]

    # the yardstick for keeping the result: the cost at the finest level used
    finest = coarse if len(levels) == 1 else level_inputs(levels[-1])
    with torch.no_grad():
        loss_start = float(loss_at(*finest, *initial)[0])

    steps_per_level = [max(1, iterations // len(levels))] * len(levels)
    steps_per_level[-1] = max(1, iterations - sum(steps_per_level[:-1]))
    done = 0

    def pyramid(seed) -> float:
        """Optimise from ``seed`` (a rotation) and the start's shift, coarse to fine; the final loss."""
        nonlocal done
        with torch.no_grad():
            linear.copy_(seed - eye)
            shift.copy_(shifts[0])
        for index, (factor, steps) in enumerate(zip(levels, steps_per_level)):
            inputs = coarse if index == 0 else finest if index == len(levels) - 1 else level_inputs(factor)
            optimiser = Adam([linear, shift], lr=learning_rate, steps=steps, final_fraction=0.1)
            losses = []
            for step in range(steps):
                loss, _ = loss_at(*inputs, linear, shift)
                loss.backward()
                optimiser.step()
                done += 1
                losses.append(float(loss.detach()))
                if convergence is not None and convergence.stop(losses, None, steps):
                    break
                if progress is not None and (step % 10 == 0 or step == steps - 1):
                    progress(min(1.0, done / max(iterations, 1)),
                             f"affine pre-alignment (1/{factor} resolution) step {done}")
        with torch.no_grad():
            return float(loss_at(*finest, linear, shift)[0])

    # the best-ranked seed first; the next ones only while the result does not beat the start (a pair whose
    # probes nearly tie can rank a seed first whose pyramid ends in a worse optimum)
    best = None
    for seed in seeds:
        loss_end = pyramid(seed)
        if best is None or loss_end < best[0]:
            best = (loss_end, linear.detach().clone(), shift.detach().clone())
        if loss_end < loss_start:
            break
    loss_end = best[0]
    with torch.no_grad():
        accepted = loss_end < loss_start
        linear.copy_(best[1] if accepted else initial[0])
        shift.copy_(best[2] if accepted else initial[1])
        matrix = (eye + linear).detach()
        translation = (radius * shift).detach()
        field = affine_field(matrix, translation, shape)
    return AffineResult(field=field, matrix=matrix, translation=translation, loss_start=loss_start,
                        loss_end=loss_end, accepted=accepted)
