"""A naive joint saliency map, written the obvious way, as the baseline that ``bench_core`` compares against.

Same definition as ``DeepSalRegLib.saliency.joint_saliency_map`` with its defaults (exact deviatoric
distance, full connectivity, per-sample normalisation), but computed as one would first write it:

* full ``nd x nd`` structure tensors (``nd**2`` channels, symmetric entries stored twice);
* a loop over all 8 / 26 neighbours, each neighbour tensor gathered with ``index_select`` on clamped
  indices (replicate border), i.e. a full copy of the tensor volume per neighbour;
* the deviatoric distance ``sqrt(c (tr D^2 - tr(D)^2 / nd))`` with plain autograd, which keeps every
  intermediate of every neighbour for the backward pass.

It exists to show what the library's formulation (per-voxel feature vectors, symmetric half of the
neighbours, a custom backward keeping one volume per neighbour pair) saves. Not used by the library.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

__all__ = ["naive_joint_saliency_map"]

_EPS = 1e-9


def _gaussian_smooth(t: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    nd = t.dim() - 2
    radius = max(1, int(math.ceil(4 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=t.dtype, device=t.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    conv = F.conv2d if nd == 2 else F.conv3d
    c = t.shape[1]
    for axis in range(nd):
        shape = [1] * nd
        shape[axis] = k.numel()
        pad = [0] * nd
        pad[axis] = radius
        t = conv(t, k.view(1, 1, *shape).repeat(c, 1, *([1] * nd)), padding=tuple(pad), groups=c)
    return t


def _full_structure_tensor(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """``(B, nd*nd, *S)``: entry ``i*nd + j`` is the smoothed ``g_i g_j`` of forward differences (zero last slice)."""
    nd = image.dim() - 2
    grads = []
    for axis in range(nd):
        dim = axis + 2
        n = image.shape[dim]
        diff = image.narrow(dim, 0, n - 1) - image.narrow(dim, 1, n - 1)
        pad = [0, 0] * nd
        pad[2 * (nd - 1 - axis) + 1] = 1
        grads.append(F.pad(diff, pad))
    products = [grads[i] * grads[j] for i in range(nd) for j in range(nd)]
    return _gaussian_smooth(torch.cat(products, dim=1), sigma)


def _tensor_distance(a: torch.Tensor, b: torch.Tensor, nd: int) -> torch.Tensor:
    """Deviatoric distance of full tensors ``(B, nd*nd, *S)``: ``sqrt(c (tr D^2 - tr(D)^2 / nd))``."""
    c = 8 * math.pi / 15 if nd == 3 else math.pi / 2
    d = a - b
    tr_d2 = sum(d[:, i * nd + j] * d[:, j * nd + i] for i in range(nd) for j in range(nd))
    tr_d = sum(d[:, i * nd + i] for i in range(nd))
    return (torch.sqrt(c * (tr_d2 - tr_d * tr_d / nd) + _EPS) - math.sqrt(_EPS)).unsqueeze(1)


def _neighbour(t: torch.Tensor, offset) -> torch.Tensor:
    """``t`` at ``clamp(x + offset)``, gathered axis by axis with ``index_select`` (a full copy each time)."""
    for axis, o in enumerate(offset):
        if o == 0:
            continue
        n = t.shape[axis + 2]
        index = (torch.arange(n, device=t.device) + o).clamp(0, n - 1)
        t = t.index_select(axis + 2, index)
    return t


def _saliency(tensor: torch.Tensor, nd: int) -> torch.Tensor:
    offsets = [o for o in itertools.product((-1, 0, 1), repeat=nd) if any(o)]
    total = 0
    for offset in offsets:
        total = total + _tensor_distance(tensor, _neighbour(tensor, offset), nd)
    return total / (len(offsets) + 1)


def _normalise(t: torch.Tensor) -> torch.Tensor:
    flat = t.flatten(1)
    lo = flat.min(dim=1).values.view(-1, *([1] * (t.dim() - 1)))
    hi = flat.max(dim=1).values.view(-1, *([1] * (t.dim() - 1)))
    return (t - lo) / (hi - lo + 1e-8)


def naive_joint_saliency_map(fixed: torch.Tensor, warped: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Naive JSM of ``(B, 1, *S)`` images; equals ``joint_saliency_map(fixed, warped)`` up to rounding."""
    nd = fixed.dim() - 2
    t_f = _full_structure_tensor(fixed, sigma)
    t_w = _full_structure_tensor(warped, sigma)
    joint = torch.minimum(_saliency(t_f, nd), _saliency(t_w, nd))
    d = _normalise(_tensor_distance(t_f, t_w, nd))
    return _normalise(joint / (1.0 + d))
