"""Similarity terms, joint-saliency weighting and regularisers (2D and 3D).

Images are ``(B, 1, *S)``; fields follow ``warp.py`` (voxels, ``(B, nd, *S)``). Similarity terms are
*losses* (lower is better). Every similarity accepts an optional per-voxel ``weight`` (``(B, 1, *S)``)
and then returns the weighted mean ``sum(w * r) / sum(w)``; this is how the joint saliency map weights the
alignment residual (``jsm_weight``) and how masks restrict a term.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .warp import jacobian_determinant, resize_field, spatial_dims

__all__ = [
    "box_mean",
    "charbonnier",
    "charbonnier_similarity",
    "gradient_magnitude_similarity",
    "mse_similarity",
    "lncc_similarity",
    "fixed_box_means",
    "jsm_weight",
    "confidence_weight",
    "correspondence_ramp",
    "CORRESPONDENCE_RAMP",
    "smoothness",
    "negative_jacobian_penalty",
    "end_point_error_loss",
    "multiscale_end_point_error_loss",
    "RegistrationLoss",
]

CHARBONNIER_EPS = 1e-3  # thesis value


def charbonnier(x: torch.Tensor, eps: float = CHARBONNIER_EPS) -> torch.Tensor:
    """Robust penalty ``sqrt(x^2 + eps^2)`` (thesis)."""
    return torch.sqrt(x * x + eps * eps)


def _reduce(residual: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """``"mean"`` (weighted), ``"sum"``, or ``"batch"``: the weighted mean of each batch element, ``(B,)``."""
    if reduction == "batch":
        dims = tuple(range(1, residual.dim()))
        if weight is None:
            return residual.mean(dim=dims)
        weight = weight.expand_as(residual)
        return (weight * residual).sum(dim=dims) / weight.sum(dim=dims).clamp_min(1e-8)
    if weight is not None:
        weight = weight.expand_as(residual)
        if reduction == "sum":
            return (weight * residual).sum()
        return (weight * residual).sum() / weight.sum().clamp_min(1e-8)
    return residual.sum() if reduction == "sum" else residual.mean()


def charbonnier_similarity(fixed, warped, weight=None, reduction="mean"):
    """Charbonnier intensity difference ``rho(F - W)`` (thesis data term)."""
    return _reduce(charbonnier(fixed - warped), weight, reduction)


def mse_similarity(fixed, warped, weight=None, reduction="mean"):
    """Mean squared intensity difference."""
    return _reduce((fixed - warped) ** 2, weight, reduction)


def _gradient_magnitude(image: torch.Tensor) -> torch.Tensor:
    """``|grad I|`` from forward differences, zero-padded at the far end (thesis)."""
    nd = spatial_dims(image)
    total = torch.zeros_like(image)
    for axis in range(nd):
        dim = axis + 2
        n = image.shape[dim]
        diff = image.narrow(dim, 1, n - 1) - image.narrow(dim, 0, n - 1)
        pad = [0, 0] * nd
        pad[2 * (nd - 1 - axis) + 1] = 1
        total = total + F.pad(diff, pad) ** 2
    return torch.sqrt(total + 1e-12)


def gradient_magnitude_similarity(fixed, warped, weight=None, reduction="mean"):
    """Charbonnier of the gradient-magnitude difference ``rho(|grad F| - |grad W|)`` (thesis)."""
    return _reduce(charbonnier(_gradient_magnitude(fixed) - _gradient_magnitude(warped)), weight, reduction)


def _box_sums(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Per-axis sums of ``(B, C, *S)`` over ``[i - radius, i + radius]`` clipped to the image (zeros outside).

    Along each axis the window's sum is built from shifted copies by doubling (sums of 1, 2, 4, ... voxels added
    in the binary pieces of the window: 4 additions for a window of 7). Unlike running sums (``cumsum``
    differences) nothing cancels, so the rounding does not grow along the image: float32 is enough.
    """
    width = 2 * radius + 1
    for dim in range(2, x.dim()):
        n = x.shape[dim]
        pad = [0, 0] * (x.dim() - 2)
        pad[2 * (x.dim() - 1 - dim):2 * (x.dim() - dim)] = [radius, radius]
        pieces = {1: F.pad(x, pad)}  # pieces[k][i] = sum of the padded line over [i, i + k)
        k = 1
        while 2 * k <= width:
            piece = pieces[k]
            length = piece.shape[dim] - k
            pieces[2 * k] = piece.narrow(dim, 0, length) + piece.narrow(dim, k, length)
            k *= 2
        out, start = None, 0
        for k in sorted(pieces, reverse=True):
            if width - start >= k:
                part = pieces[k].narrow(dim, start, n)
                out = part.clone() if out is None else out.add_(part)
                start += k
        x = out
    return x


def _box_counts(shape, radius: int, device) -> torch.Tensor:
    """Voxels in each clipped box of a grid of spatial ``shape`` (float64, broadcastable to ``(B, C, *S)``)."""
    count = torch.ones((1, 1) + (1,) * len(shape), dtype=torch.float64, device=device)
    for axis, n in enumerate(shape):
        index = torch.arange(n, device=device)
        inside = ((index + radius).clamp(max=n - 1) - (index - radius).clamp(min=0) + 1).to(torch.float64)
        view = [1] * (len(shape) + 2)
        view[axis + 2] = n
        count = count * inside.view(view)
    return count


class _BoxMean(torch.autograd.Function):
    """``box_mean`` with its own backward: the clipped box sum is a symmetric operator, so the gradient is the
    box sum of ``grad / count`` (one pass; autograd's backward of the running sums flipped, padded and
    zero-filled full volumes: 3x the forward's time)."""

    @staticmethod
    def forward(ctx, t, radius):
        ctx.radius = radius
        return _box_sums(t, radius) / _box_counts(t.shape[2:], radius, t.device).to(t.dtype)

    @staticmethod
    def backward(ctx, grad):
        count = _box_counts(grad.shape[2:], ctx.radius, grad.device).to(grad.dtype)
        return _box_sums(grad / count, ctx.radius), None


def box_mean(t: torch.Tensor, window: int) -> torch.Tensor:
    """Mean of every channel of ``(B, C, *S)`` over a centred ``window``-wide box, ignoring the outside.

    Equal to ``avg_pool(t, window, stride=1, padding=window // 2, count_include_pad=False)``, computed per axis
    from shifted copies (``_box_sums``: about log2(window) additions per axis), faster on a CPU than grouped
    1-D convolutions, ``avg_pool3d`` or running sums. A flat window's variance ``mean(t^2) - mean(t)^2`` is
    exactly 0 where the image is 0 and within float32 rounding (< 4e-7, whatever the image size) elsewhere;
    running sums in float32 left errors growing along the axis (1.5e-7 at 600 pixels, the size of the LNCC's
    stabiliser), and in float64 they cost 2-4x more (session 17, NOTES: float64 sums of any kind cost 0.6-1.2 s
    per 3D pair).
    """
    return _BoxMean.apply(t, window // 2)


def fixed_box_means(fixed: torch.Tensor, window: int = 9, counted: torch.Tensor | None = None) -> torch.Tensor:
    """The part of ``lncc_similarity`` that does not change while the moving image is warped; pass it as
    ``fixed_means`` to skip recomputing it: ``box_mean`` of the fixed image and of its square, ``(B, 2, *S)``;
    with ``counted`` (the same as passed to ``lncc_similarity``), the means over each window's counted voxels
    and, third, the counted share of the window, ``(B, 3, *S)``."""
    with torch.no_grad():
        if counted is None:
            return box_mean(torch.cat([fixed, fixed * fixed], dim=1), window)
        share, sum_f, sum_ff = box_mean(torch.cat([counted, counted * fixed, counted * fixed * fixed], dim=1),
                                        window).split(1, dim=1)
        divisor = share.clamp_min(_COUNTED_SHARE_FLOOR)
        return torch.cat([sum_f / divisor, sum_ff / divisor, share], dim=1)


#: a window's counted share is floored at this before dividing (a window with no counted voxel has no statistics;
#: its centre is not counted either, so its loss carries no weight)
_COUNTED_SHARE_FLOOR = 1e-3


def lncc_similarity(fixed, warped, weight=None, reduction="mean", window: int = 9,
                    fixed_means: torch.Tensor | None = None, counted: torch.Tensor | None = None):
    """``1 - LNCC^2``-style loss: one minus the squared local normalised cross-correlation (box window).

    Returns a value in [0, 1]; 0 for images that are locally affine functions of each other.
    ``fixed_means``: ``fixed_box_means(fixed, window, counted)`` when the same fixed image is compared many times
    (an optimisation): the box means of 3 instead of 5 images per call, 2x cheaper (no gradient flows into
    the fixed image then).
    ``counted``: optional ``(B, 1, *S)`` 0..1 weights of the voxels in each window's statistics (normalised
    convolution: the means, variances and covariance of a window are taken over its counted voxels). ``weight``
    weighs each voxel's loss (its window's), ``counted`` what its window sees: a window next to a region left out
    is judged on the rest of its voxels, so it gains nothing by shrinking or stretching that region.
    """
    if counted is None:
        if fixed_means is None:
            fixed_means = box_mean(torch.cat([fixed, fixed * fixed], dim=1), window)
        mf, mff = fixed_means.unbind(dim=1)
        mw, mfw, mww = box_mean(torch.cat([warped, fixed * warped, warped * warped], dim=1), window).unbind(dim=1)
    else:
        if fixed_means is None:
            fixed_means = fixed_box_means(fixed, window, counted)
        mf, mff, share = fixed_means.unbind(dim=1)
        divisor = share.clamp_min(_COUNTED_SHARE_FLOOR)
        counted_warped = counted * warped
        sums = box_mean(torch.cat([counted_warped, fixed * counted_warped, warped * counted_warped], dim=1), window)
        mw, mfw, mww = (sums / divisor.unsqueeze(1)).unbind(dim=1)
    cross = mfw - mf * mw
    var_f = (mff - mf * mf).clamp_min(0)
    var_w = (mww - mw * mw).clamp_min(0)
    cc = (cross * cross / (var_f * var_w + 1e-6)).unsqueeze(1)
    return _reduce(1.0 - cc.clamp(0, 1), weight, reduction)


_SIMILARITIES = {
    "charbonnier": charbonnier_similarity,
    "mse": mse_similarity,
    "lncc": lncc_similarity,
}


def jsm_weight(jsm: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Per-voxel loss weight ``alpha + (1 - alpha) * stopgrad(JSM)``.

    Detached so the network cannot lower the loss by destroying joint saliency; ``alpha`` keeps gradients
    alive in flat regions (where the JSM is 0 by construction) so smoothness can carry motion there.
    """
    return alpha + (1.0 - alpha) * jsm.detach()


#: ``structure_correspondence`` values mapped linearly onto 0..1 by ``correspondence_ramp`` (below 0.3: no
#: correspondence, weight 0; above 0.6: full weight). Chosen on the 3D study's subject A at R = 10 / 20 mm
#: (session 8, NOTES) and checked on the benchmark's datasets (a softer 0.15 / 0.45 ramp was no better).
CORRESPONDENCE_RAMP = (0.3, 0.6)


def correspondence_ramp(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """``ramp(C)``: ``saliency.structure_correspondence(F, W)`` mapped linearly from ``CORRESPONDENCE_RAMP`` onto
    0..1, ``(B, 1, *S)``, detached: 0 where the structure of one image has no counterpart in the other (missing
    correspondence), 1 where it has."""
    from .saliency import structure_correspondence

    with torch.no_grad():
        low, high = CORRESPONDENCE_RAMP
        return ((structure_correspondence(fixed, warped.detach()) - low) / (high - low)).clamp(0.0, 1.0)


def confidence_weight(fixed: torch.Tensor, warped: torch.Tensor, alpha: float = 0.1, jsm: torch.Tensor | None = None,
                      correspondence: bool = True, ramp: torch.Tensor | None = None) -> torch.Tensor:
    """The similarity weight of the refinement (and optionally of training): ``(B, 1, *S)``, detached.

    ``(alpha + (1 - alpha) JSM) * ramp(C)`` (``correspondence_ramp``): the thesis's JSM weight, switched off where
    the structure of one image has no counterpart in the other (missing correspondence), so that the alignment
    there is carried by the regulariser from the surroundings. ``correspondence=False``: the JSM weight
    alone (the thesis's weighting). ``jsm``, ``ramp``: already computed for this pair.
    """
    from .saliency import joint_saliency_map

    with torch.no_grad():
        warped = warped.detach()
        if jsm is None:
            jsm = joint_saliency_map(fixed, warped)
        weight = jsm_weight(jsm, alpha)
        if correspondence:
            weight = weight * (correspondence_ramp(fixed, warped) if ramp is None else ramp)
    return weight


def smoothness(field: torch.Tensor, kind: str = "diffusion", reduction: str = "mean") -> torch.Tensor:
    """Regulariser of a voxel field.

    * ``"diffusion"``: mean squared forward differences (first order).
    * ``"tv"``: Charbonnier of forward differences (thesis total variation).
    * ``"bending"``: mean squared second derivatives (bending energy, incl. mixed terms).
    """
    nd = spatial_dims(field)

    def diff(t, axis):
        dim = axis + 2
        n = t.shape[dim]
        return t.narrow(dim, 1, n - 1) - t.narrow(dim, 0, n - 1)

    reducer = torch.sum if reduction == "sum" else torch.mean
    if kind == "diffusion":
        return sum(reducer(diff(field, a) ** 2) for a in range(nd)) / (1 if reduction == "sum" else nd)
    if kind == "tv":
        return sum(reducer(charbonnier(diff(field, a))) for a in range(nd)) / (1 if reduction == "sum" else nd)
    if kind == "bending":
        terms = []
        for a in range(nd):
            da = diff(field, a)
            for b in range(a, nd):
                factor = 1.0 if a == b else 2.0
                terms.append(factor * reducer(diff(da, b) ** 2))
        return sum(terms) / (1 if reduction == "sum" else len(terms))
    raise ValueError(f"smoothness kind must be 'diffusion', 'tv' or 'bending', got {kind!r}")


def negative_jacobian_penalty(field: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean of ``relu(margin - det J)``: zero unless the field folds (or compresses below ``margin``)."""
    return F.relu(margin - jacobian_determinant(field)).mean()


def end_point_error_loss(pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean end-point error ``|u_pred - u_true|_2`` (voxels) of ``(B, nd, *S)`` fields, inside ``mask``:
    the supervised term of training (differentiable; ``metrics.end_point_error`` is the evaluation metric)."""
    err = torch.sqrt(((pred - truth) ** 2).sum(dim=1, keepdim=True) + 1e-12)
    if mask is None:
        return err.mean()
    mask = mask.to(err.dtype).expand_as(err)
    return (err * mask).sum() / mask.sum().clamp_min(1e-8)


def multiscale_end_point_error_loss(flows: list, truth: torch.Tensor) -> torch.Tensor:
    """Mean over the global network's coarser fields of their EPE against the true field resized to them.

    FlowNet-style deep supervision: each coarse field (in voxels of its own, coarser grid) is compared with
    ``resize_field(truth)``, which rescales the magnitudes, so coarser levels weigh less. The fields live on
    the padded grid; training crops are multiples of the network's stride, where padded == image grid.
    """
    losses = [end_point_error_loss(f.float(), resize_field(truth, f.shape[2:])) for f in flows]
    return torch.stack(losses).mean()


class RegistrationLoss(nn.Module):
    """The unsupervised training / optimisation objective on a ``DeepSalRegNet`` output dict.

    ``L = sim(F, W_r; w_r) + coarse_weight * sim(F, W_c; w_c) + gradient_weight * grad(F, W_r; w_r)
          + smoothness_weight * R(u_r) + coarse_weight * smoothness_weight * R(u_c) + jacobian_weight * J(u_r)``

    Args:
        similarity: ``"charbonnier"`` (thesis), ``"lncc"`` or ``"mse"``.
        gradient_weight: weight of the gradient-magnitude term (thesis: 20).
        smoothness: regulariser kind (see ``smoothness``); ``smoothness_weight`` its weight.
        jsm_weight: ``"none"`` (thesis), ``"refined"`` or ``"coarse+refined"``: which data terms are weighted
            by ``alpha + (1 - alpha) * stopgrad(JSM(F, W))``.
        jsm_alpha: the floor ``alpha`` of that weight.
        correspondence: multiply that weight by the structure-correspondence ramp (``confidence_weight``),
            as the refinement does; off by default (the shipped models were trained without it).
        coarse_weight: weight of the coarse-field terms (deep supervision of the global network).
        jacobian_weight: weight of the negative-Jacobian penalty.
        reduction: ``"mean"`` or ``"sum"`` (thesis).
    ``forward(output, fixed, mask=None) -> (total, parts)`` where ``parts`` maps term names to floats.
    """

    def __init__(self, similarity="lncc", gradient_weight=0.0, smoothness="diffusion", smoothness_weight=1.0,
                 jsm_weight="coarse+refined", jsm_alpha=0.1, coarse_weight=0.5, jacobian_weight=0.0,
                 reduction="mean", jsm_options=None, correspondence=False):
        super().__init__()
        if similarity not in _SIMILARITIES:
            raise ValueError(f"similarity must be one of {sorted(_SIMILARITIES)}, got {similarity!r}")
        if jsm_weight not in ("none", "refined", "coarse+refined"):
            raise ValueError(f"jsm_weight must be 'none', 'refined' or 'coarse+refined', got {jsm_weight!r}")
        self.similarity, self.gradient_weight = similarity, gradient_weight
        self.smoothness_kind, self.smoothness_weight = smoothness, smoothness_weight
        self.jsm_mode, self.jsm_alpha, self.coarse_weight = jsm_weight, jsm_alpha, coarse_weight
        self.jacobian_weight, self.reduction = jacobian_weight, reduction
        self.jsm_options = dict(jsm_options or {})
        self.correspondence = bool(correspondence)

    def _data(self, fixed, warped, weight):
        value = _SIMILARITIES[self.similarity](fixed, warped, weight, self.reduction)
        if self.gradient_weight:
            value = value + self.gradient_weight * gradient_magnitude_similarity(fixed, warped, weight, self.reduction)
        return value

    def _weight(self, fixed, warped, mask, use_jsm, jsm=None):
        weight = None
        if use_jsm:
            if jsm is None:
                from .saliency import joint_saliency_map

                with torch.no_grad():
                    jsm = joint_saliency_map(fixed, warped.detach(), **self.jsm_options)
            if self.correspondence:
                weight = confidence_weight(fixed, warped, self.jsm_alpha, jsm.detach())
            else:
                weight = jsm_weight(jsm, self.jsm_alpha)
        if mask is not None:
            weight = mask.float() if weight is None else weight * mask.float()
        return weight

    def forward(self, output: dict, fixed: torch.Tensor, mask: torch.Tensor | None = None):
        parts = {}
        w_r = self._weight(fixed, output["warped"], mask, self.jsm_mode != "none")
        parts["similarity"] = self._data(fixed, output["warped"], w_r)
        parts["smoothness"] = self.smoothness_weight * smoothness(output["flow"], self.smoothness_kind, self.reduction)
        if self.coarse_weight and "warped_coarse" in output:
            # the model's own JSM is JSM(F, W_c): reuse it as the coarse weight
            w_c = self._weight(fixed, output["warped_coarse"], mask, self.jsm_mode == "coarse+refined", output.get("jsm"))
            parts["similarity_coarse"] = self.coarse_weight * self._data(fixed, output["warped_coarse"], w_c)
            parts["smoothness_coarse"] = self.coarse_weight * self.smoothness_weight * smoothness(
                output["flow_coarse"], self.smoothness_kind, self.reduction)
        if self.jacobian_weight:
            parts["jacobian"] = self.jacobian_weight * negative_jacobian_penalty(output["flow"])
        total = sum(parts.values())
        return total, {k: float(v.detach()) for k, v in parts.items()}
