"""Explicit matching for the global network: a feature pyramid and correlation (cost) volumes, coarse to fine.

``MatchingNet`` is the global network of the ``matching-2d`` / ``matching-3d`` presets (PWC-Net's design
in 2D/3D). One small encoder, shared by both images, gives features at 1/2, 1/4 and 1/8 resolution.
From the coarsest level up, the moving features are warped by the field so far, compared with the fixed
features at every displacement within ``radius`` voxels (``cost_volume``: cosine similarity, one channel
per displacement), and a small decoder turns the costs into a correction::

    u_8 = D_8(C(f_8, m_8), f_8)
    u_k = up(u_{k*2}) + D_k(C(f_k, m_k o (x + up(u_{k*2}))), f_k, up(u_{k*2}))    k = 4, 2

Each correction is the cost volume's soft arg-max (the expected displacement under a softmax of the
costs with a learned sharpness) plus a learned residual (zero at initialisation):
training teaches the features what to match, the sharpness how much to trust them and the decoder how to
regularise.
Why explicit matching: a plain encoder-decoder has to *learn* to search for large motion, which it
did not in 2000 CPU steps (NOTES, issue 13); a correlation layer does the search by construction and
the 1/8 level with ``radius=3`` covers +-24 voxels of the input grid.

Fields follow ``warp.py`` (voxels of their own grid, fixed -> moving, channel = array axis).
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .warp import resize_field, warp

__all__ = ["cost_volume", "soft_argmax", "MatchingNet"]


def _displacements(nd: int, radius: int) -> torch.Tensor:
    """All integer displacements with every component in ``[-radius, radius]``: ``(K, nd)``, array-axis order."""
    return torch.tensor(list(itertools.product(range(-radius, radius + 1), repeat=nd)), dtype=torch.float32)


def cost_volume(fixed: torch.Tensor, moving: torch.Tensor, radius: int) -> torch.Tensor:
    """Cosine similarity of ``fixed`` features with ``moving`` features displaced by every offset.

    Args:
        fixed, moving: ``(B, C, *S)`` features on the same grid.
        radius: largest displacement per axis in voxels.
    Returns ``(B, K, *S)`` with ``K = (2 radius + 1)^nd`` in the order of ``_displacements``: channel ``k``
    holds ``<f(x), m(x + d_k)>`` of the channel-normalised features (``moving`` extended by its border values:
    zeros would make every offset that leaves the grid look bad, a pull away from the edges that a soft
    arg-max on a coarse grid turns into a large bias).
    """
    nd = fixed.dim() - 2
    f = F.normalize(fixed, dim=1, eps=1e-6)
    m = F.normalize(moving, dim=1, eps=1e-6)
    m = F.pad(m, [radius] * (2 * nd), mode="replicate")  # as warp()'s border padding: no pull away from edges
    shape = fixed.shape[2:]
    costs = []
    for offset in itertools.product(range(2 * radius + 1), repeat=nd):
        window = (slice(None), slice(None)) + tuple(slice(o, o + n) for o, n in zip(offset, shape))
        costs.append((f * m[window]).sum(dim=1))
    return torch.stack(costs, dim=1)


def soft_argmax(costs: torch.Tensor, displacements: torch.Tensor, sharpness: torch.Tensor) -> torch.Tensor:
    """Expected displacement ``sum_k softmax(sharpness * costs)_k d_k``: ``(B, nd, *S)`` from ``(B, K, *S)``."""
    weights = torch.softmax(costs * sharpness, dim=1)
    return torch.einsum("bk...,kd->bd...", weights, displacements.to(costs.dtype))


def _conv(nd):
    return nn.Conv2d if nd == 2 else nn.Conv3d


def _block(nd, cin, cout, stride=1, dilation=1):
    return nn.Sequential(_conv(nd)(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation),
                         nn.LeakyReLU(0.1))


class _Decoder(nn.Module):
    """Costs (+ fixed features, + field so far) -> correction = soft arg-max + zero-initialised residual."""

    def __init__(self, nd, radius, feature_channels, width, with_flow):
        super().__init__()
        self.register_buffer("displacements", _displacements(nd, radius), persistent=False)
        cin = (2 * radius + 1) ** nd + feature_channels + nd + (nd if with_flow else 0)
        self.body = nn.Sequential(_block(nd, cin, width), _block(nd, width, width, dilation=2),
                                  _block(nd, width, width // 2))
        self.head = _conv(nd)(width // 2, nd, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        # sharpness of the soft arg-max on cosine costs in [-1, 1], log-parametrised to stay positive. It starts
        # at 5: at 1 the weights are nearly uniform and the features get little gradient (a 2D test pair: EPE
        # 2.63 px after 150 steps, against 1.21 at 5 and 2.10 at 10; identity 2.88)
        self.log_sharpness = nn.Parameter(torch.tensor(math.log(5.0)))

    def forward(self, costs, features, flow=None):
        guess = soft_argmax(costs, self.displacements, self.log_sharpness.exp())
        inputs = [costs, features, guess] + ([flow] if flow is not None else [])
        return guess + self.head(self.body(torch.cat(inputs, dim=1)))


class MatchingNet(nn.Module):
    """Feature pyramid + cost volumes at 1/8, 1/4, 1/2 resolution -> field at 1/2 resolution.

    Args:
        ndim: 2 or 3.
        feature_widths: encoder channels at 1/2, 1/4, 1/8.
        radii: search radius (voxels of that level) at 1/8, 1/4, 1/2.
        decoder_widths: decoder width at 1/8, 1/4, 1/2.
        in_channels: accepted for ``GlobalNet`` compatibility; must be 2 (moving, fixed stacked).
    Forward: ``(B, 2, *S)`` (moving, fixed) with ``S`` divisible by 8 -> ``(field at S/2 in its own voxels,
    [field at S/8, field at S/4])``, the interface of ``networks.GlobalNet``.
    """

    multiple = 8

    def __init__(self, ndim, feature_widths=(16, 32, 32), radii=(3, 2, 1), decoder_widths=(32, 32, 16),
                 in_channels=2):
        super().__init__()
        if in_channels != 2:
            raise ValueError("MatchingNet takes the (moving, fixed) pair: in_channels must be 2")
        c1, c2, c3 = feature_widths
        self.encoder = nn.ModuleList([
            nn.Sequential(_block(ndim, 1, c1, stride=2), _block(ndim, c1, c1)),
            nn.Sequential(_block(ndim, c1, c2, stride=2), _block(ndim, c2, c2)),
            nn.Sequential(_block(ndim, c2, c3, stride=2), _block(ndim, c3, c3)),
        ])
        self.radii = tuple(int(r) for r in radii)
        self.decoders = nn.ModuleList([
            _Decoder(ndim, self.radii[0], c3, decoder_widths[0], with_flow=False),
            _Decoder(ndim, self.radii[1], c2, decoder_widths[1], with_flow=True),
            _Decoder(ndim, self.radii[2], c1, decoder_widths[2], with_flow=True),
        ])

    def _pyramid(self, image):
        features = []
        for block in self.encoder:
            image = block(image)
            features.append(image)
        return features  # 1/2, 1/4, 1/8

    def forward(self, x):
        moving, fixed = x[:, :1], x[:, 1:2]
        both = self._pyramid(torch.cat([fixed, moving], dim=0))  # one pass for both images
        n = fixed.shape[0]
        feats_f = [f[:n] for f in both][::-1]  # 1/8, 1/4, 1/2
        feats_m = [f[n:] for f in both][::-1]
        flows, flow = [], None
        for level, (decoder, radius, f, m) in enumerate(zip(self.decoders, self.radii, feats_f, feats_m)):
            if flow is None:
                flow = decoder(cost_volume(f, m, radius), f)
            else:
                flow = resize_field(flow, f.shape[2:])
                flow = flow + decoder(cost_volume(f, warp(m, flow), radius), f, flow)
            flows.append(flow)
        return flows[-1], flows[:-1]
