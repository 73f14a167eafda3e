"""The one displacement-field convention of DeepSalReg, and the field algebra built on it.

Convention (used everywhere in the library; physical-space conversion lives only in ``geometry.py``):

* A field ``u`` is a tensor of shape ``(B, nd, *S)`` with ``S = (H, W)`` in 2D or ``(D, H, W)`` in 3D.
* It lives on the **fixed** image grid and is in **voxel units** of that grid.
* Channel ``i`` is the displacement along array axis ``i`` (2D: channel 0 = rows/H, 1 = columns/W;
  3D: 0 = D, 1 = H, 2 = W). For a SimpleITK image read as an array, array axes are reversed ITK
  index axes: array axis 0 of a 3D array is ITK index k (z).
* It maps fixed to moving (the resampling convention of ITK and Slicer's "from parent" transform):
  the warped moving image is ``W(x) = M(x + u(x))``, and a fixed landmark ``p`` corresponds to the
  moving point ``p + u(p)``.
* Sampling uses ``align_corners=True`` voxel centres: voxel index ``i`` sits at normalised coordinate
  ``2 i / (n - 1) - 1``.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = [
    "identity_grid",
    "warp",
    "compose",
    "resize_field",
    "integrate_velocity",
    "jacobian_determinant",
    "folding_fraction",
    "spatial_dims",
]


def spatial_dims(x: torch.Tensor) -> int:
    """Number of spatial dimensions of a ``(B, C, *S)`` tensor (2 or 3)."""
    nd = x.dim() - 2
    if nd not in (2, 3):
        raise ValueError(f"expected a (B, C, H, W) or (B, C, D, H, W) tensor, got shape {tuple(x.shape)}")
    return nd


def identity_grid(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates of a grid of spatial ``shape``: tensor ``(nd, *shape)``, channel i = index along axis i."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def _normalised_sampling_grid(field: torch.Tensor, input_shape) -> torch.Tensor:
    """Absolute voxel positions ``x + u(x)`` as a ``grid_sample`` grid (last dim in x, y[, z] order)."""
    nd = spatial_dims(field)
    positions = identity_grid(field.shape[2:], field.device, field.dtype).unsqueeze(0) + field
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in input_shape], device=field.device, dtype=field.dtype)
    positions = positions * scale.view(1, nd, *([1] * nd)) - 1.0
    # grid_sample wants (B, *S, nd) with the last axis ordered (W, H[, D]): reverse the channels.
    return positions.movedim(1, -1).flip(-1)


def warp(image: torch.Tensor, field: torch.Tensor, mode: str = "linear", padding: str = "border") -> torch.Tensor:
    """Resample ``image`` at ``x + field(x)``: returns ``W(x) = M(x + u(x))`` on the field's grid.

    Args:
        image: ``(B, C, *S_in)`` moving image (or a field to be carried along, see ``compose``).
        field: ``(B, nd, *S)`` displacement in voxels of the image grid (``S`` may differ from ``S_in``
            only when the caller has scaled the field accordingly; normally ``S == S_in``).
        mode: ``"linear"`` for intensities, ``"nearest"`` for label maps.
        padding: ``"border"`` (replicate the edge) or ``"zeros"``.
    Returns:
        ``(B, C, *S)`` warped image.
    """
    nd = spatial_dims(image)
    if field.shape[1] != nd or field.dim() != image.dim():
        raise ValueError(f"field of shape {tuple(field.shape)} does not fit an image of shape {tuple(image.shape)}")
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    grid = _normalised_sampling_grid(field, image.shape[2:])
    sample_mode = "bilinear" if mode == "linear" else "nearest"
    if field.dtype != image.dtype:
        grid = grid.to(image.dtype)
    return _grid_sample(image, grid, sample_mode, padding)


def _grid_sample(image: torch.Tensor, grid: torch.Tensor, mode: str, padding: str) -> torch.Tensor:
    """``F.grid_sample(..., align_corners=True)``; on a CPU a single image is sampled as one batch entry per
    thread, each a slab of the output's first axis.

    Why: torch's CPU sampling kernels run batch entries in parallel and each entry on one thread, so a
    registration (batch 1) sampled on one core. Split into slabs, a warp with its backward ran 1.7-2x faster
    on 2 cores (3D: 80x64x64 and 16x112x112 images, 40x32x32 fields; 2D: 256^2-1024^2). The image is shared,
    not copied (an expanded view); the samples are the same, voxel for voxel.
    """
    slabs = min(torch.get_num_threads(), grid.shape[1] // 2) if grid.shape[0] == 1 else 1
    if slabs < 2 or image.device.type != "cpu" or grid.shape[1:-1].numel() < 4096:
        return F.grid_sample(image, grid, mode=mode, padding_mode=padding, align_corners=True)
    rows = grid.shape[1]
    per = -(-rows // slabs)
    if per * slabs > rows:  # pad the last slab by repeating the last row (its samples are dropped below)
        grid = torch.cat([grid, grid[:, -1:].expand(1, per * slabs - rows, *grid.shape[2:])], dim=1)
    out = F.grid_sample(image.expand(slabs, *image.shape[1:]), grid.reshape(slabs, per, *grid.shape[2:]),
                        mode=mode, padding_mode=padding, align_corners=True)  # (slabs, C, per, ...)
    out = out.transpose(0, 1).reshape(1, image.shape[1], per * slabs, *out.shape[3:])
    return out[:, :, :rows] if per * slabs > rows else out


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Field of ``x -> phi_outer(phi_inner(x))`` with ``phi(x) = x + u(x)``.

    Warping by the result equals warping by ``outer`` first and then by ``inner``:
    ``warp(M, compose(outer, inner)) ~= warp(warp(M, outer), inner)``.
    """
    return inner + warp(outer, inner, padding="border")


def resize_field(field: torch.Tensor, size) -> torch.Tensor:
    """Resample a field to spatial ``size`` and rescale its voxel magnitudes to the new grid.

    With ``align_corners=True`` a displacement of one old voxel spans ``(n_new - 1) / (n_old - 1)`` new voxels.
    The sampling is linear interpolation at ``align_corners=True`` positions (``F.interpolate``'s, no
    anti-aliasing); in 3D it is applied one axis at a time as a product with a small interpolation matrix
    (``_interpolate_3d``).
    """
    nd = spatial_dims(field)
    size = tuple(int(s) for s in size)
    if tuple(field.shape[2:]) == size:
        return field
    if nd == 3 and max(field.shape[2:]) <= _MATRIX_INTERPOLATION_MAX_AXIS:
        out = _interpolate_3d(field, size)
    else:
        out = F.interpolate(field, size=size, mode="bilinear" if nd == 2 else "trilinear", align_corners=True)
    scale = torch.tensor(
        [(n_new - 1) / max(n_old - 1, 1) for n_new, n_old in zip(size, field.shape[2:])],
        device=field.device,
        dtype=field.dtype,
    )
    return out * scale.view(1, nd, *([1] * nd))


#: ``resize_field`` interpolates a 3D field by matrix products when its longest axis has at most this many voxels
_MATRIX_INTERPOLATION_MAX_AXIS = 256


@functools.lru_cache(maxsize=64)
def _interpolation_matrix(n_new: int, n_old: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(n_new, n_old)`` linear interpolation at ``align_corners=True`` positions: row ``i`` samples the old
    axis at ``i (n_old - 1) / (n_new - 1)`` (two non-zero weights)."""
    matrix = torch.zeros(n_new, n_old, dtype=torch.float64)
    if n_old == 1 or n_new == 1:
        matrix[:, 0] = 1.0
    else:
        position = torch.arange(n_new, dtype=torch.float64) * (n_old - 1) / (n_new - 1)
        low = position.floor().long().clamp(max=n_old - 2)
        frac = position - low
        rows = torch.arange(n_new)
        matrix[rows, low] = 1.0 - frac
        matrix[rows, low + 1] += frac
    return matrix.to(dtype=dtype, device=device)


def _interpolate_3d(field: torch.Tensor, size) -> torch.Tensor:
    """``F.interpolate(field, size, mode="trilinear", align_corners=True)`` as three matrix products, one per axis.

    Why: on a CPU the products (and their backward, two more) run 3-5x faster than ``F.interpolate`` with its
    backward, whose CPU kernel dominated a refinement step's upsampling (session 17, NOTES: a 12x80x80 ->
    24x160x160 velocity increment 15.5 -> 2.8 ms); the values agree to float32 rounding.
    """
    b, c, d, h, w = field.shape
    new_d, new_h, new_w = size
    args = (field.dtype, field.device)
    out = field @ _interpolation_matrix(new_w, w, *args).T  # (b, c, d, h, W)
    out = _interpolation_matrix(new_h, h, *args) @ out  # (b, c, d, H, W)
    out = _interpolation_matrix(new_d, d, *args) @ out.reshape(b, c, d, new_h * new_w)
    return out.reshape(b, c, new_d, new_h, new_w)


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Integrate a stationary velocity field by scaling and squaring: ``u = exp(v)`` (voxel units).

    ``u <- v / 2**steps``, then ``steps`` times ``u <- u + u(x + u(x))`` (``compose(u, u)``).
    The result is diffeomorphic when ``v`` is smooth enough.
    """
    if steps < 0:
        raise ValueError("steps must be >= 0")
    u = velocity / (2 ** steps)
    for _ in range(steps):
        u = compose(u, u)
    return u


def _central_gradient(t: torch.Tensor, axis: int) -> torch.Tensor:
    """d t / d axis (axis counts spatial axes) with central differences inside and one-sided ones at the ends."""
    dim = axis + 2
    n = t.shape[dim]
    if n < 2:
        return torch.zeros_like(t)
    front = t.narrow(dim, 1, 1) - t.narrow(dim, 0, 1)
    back = t.narrow(dim, n - 1, 1) - t.narrow(dim, n - 2, 1)
    if n == 2:
        return torch.cat([front, back], dim=dim)
    middle = (t.narrow(dim, 2, n - 2) - t.narrow(dim, 0, n - 2)) / 2
    return torch.cat([front, middle, back], dim=dim)


def jacobian_determinant(field: torch.Tensor) -> torch.Tensor:
    """Determinant of the Jacobian of ``phi(x) = x + u(x)``: ``(B, 1, *S)``.

    Computed in voxel units with central differences. Because ``u`` is expressed in voxels of the same
    grid it is differentiated on, the determinant equals the physical one for any spacing.
    Values <= 0 mark folding; 1 means locally volume preserving.
    """
    nd = spatial_dims(field)
    jac = [[_central_gradient(field[:, i : i + 1], j) for j in range(nd)] for i in range(nd)]
    for i in range(nd):
        jac[i][i] = jac[i][i] + 1.0
    if nd == 2:
        return jac[0][0] * jac[1][1] - jac[0][1] * jac[1][0]
    return (
        jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
        - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
        + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0])
    )


def folding_fraction(field: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Fraction (0..1) of voxels (inside ``mask`` if given) where the Jacobian determinant is <= 0."""
    det = jacobian_determinant(field)
    folded = det <= 0
    if mask is not None:
        mask = mask.to(torch.bool).expand_as(folded)
        total = int(mask.sum())
        return float((folded & mask).sum()) / total if total else 0.0
    return float(folded.float().mean())
