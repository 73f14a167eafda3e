"""Physical space: working grids, resampling, and voxel fields <-> ITK physical displacement fields.

This is the one place where the voxel convention of ``warp.py`` meets physical space.

* Physical space is ITK's world frame (LPS, millimetres); points and vectors are ordered x, y[, z],
  which is ITK *index* order. Arrays (``sitk.GetArrayFromImage``) use the reverse order: array axis 0
  of a 3D array is index k (z).
* A voxel field ``u`` has shape ``(nd, *S)`` on a grid (a ``sitk.Image`` whose array shape is ``S``),
  channel ``i`` along array axis ``i``, in voxels of that grid, mapping fixed to moving
  (``W(x) = M(x + u(x))``, see ``warp.py``).
* A physical field ``d`` has shape ``(*S, nd)`` on the same grid, vector components in x, y[, z]
  order, in mm. At a grid point ``p``: ``d(p) = Direction @ diag(spacing) @ u_itk(p)``, where
  ``u_itk`` is ``u``'s channels reversed. ITK's displacement-field transform maps ``p -> p + d(p)``,
  exactly the voxel rule ``index -> index + u``, so the same field resamples the moving image
  identically in SimpleITK, 3D Slicer and ``warp.warp``.

numpy and SimpleITK only: no torch here (pass ``tensor.detach().cpu().numpy()``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError

__all__ = [
    "as_scalar_image",
    "validate_image",
    "make_working_grid",
    "grid_size",
    "centred_grid",
    "grid_shape",
    "same_grid",
    "field_of_view",
    "resample_onto",
    "normalise_intensity",
    "array_index_to_physical",
    "physical_to_array_index",
    "voxel_affine_to_physical",
    "voxel_field_to_physical",
    "physical_field_to_voxel",
    "displacement_image",
    "resample_displacement",
    "displacement_transform",
]

MIN_VOXELS_PER_AXIS = 4
_LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R BT.601, as most picture viewers use for grey


def _title(name: str) -> str:
    return name[:1].upper() + name[1:]


# --------------------------------------------------------------------------------------------------
# Images: scalar, 2D/3D, usable
# --------------------------------------------------------------------------------------------------


def _drop_axis(image: sitk.Image, axis: int) -> sitk.Image:
    """Remove index axis ``axis`` (of size 1), keeping the other axes' spacing, origin and direction.

    The physical row dropped from the direction is the one the removed axis points along, so an axial
    slice keeps (x, y) and a sagittal one keeps (y, z). When what is left is not a rotation (an oblique
    slice), the in-plane direction becomes the identity and only origin and spacing are kept.
    """
    nd = image.GetDimension()
    direction = np.array(image.GetDirection()).reshape(nd, nd)
    row = int(np.argmax(np.abs(direction[:, axis])))
    keep_rows = [r for r in range(nd) if r != row]
    keep_cols = [c for c in range(nd) if c != axis]
    sub = direction[np.ix_(keep_rows, keep_cols)]
    if not np.allclose(sub.T @ sub, np.eye(nd - 1), atol=1e-4):
        sub = np.eye(nd - 1)
    size = list(image.GetSize())
    size[axis] = 0
    out = sitk.Extract(image, size, [0] * nd, sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOIDENTITY)
    out.SetSpacing([image.GetSpacing()[c] for c in keep_cols])
    out.SetOrigin([image.GetOrigin()[r] for r in keep_rows])
    out.SetDirection(sub.flatten().tolist())
    return out


def _collapse_singleton_axes(image: sitk.Image) -> sitk.Image:
    """Drop size-1 index axes while the image has more than two dimensions (one-slice volume -> 2D)."""
    while image.GetDimension() > 2 and 1 in image.GetSize():
        image = _drop_axis(image, list(image.GetSize()).index(1))
    return image


def as_scalar_image(image: sitk.Image, name: str = "image", labels: bool = False) -> sitk.Image:
    """Return ``image`` as a 2D or 3D scalar image with its geometry.

    Intensities become float32; colour pictures (2D with 2-4 components: grey+alpha, RGB, RGBA) become
    grey by luminance. A volume with a single slice becomes a 2D image with the in-plane spacing,
    origin and direction. With ``labels=True`` the integer pixel type is kept, a multi-component picture
    is accepted only when its colour channels are equal, and float pixels must hold whole numbers
    (they become int32).

    Args:
        image: any image SimpleITK can hold.
        name: how error messages call the image (e.g. ``"fixed image"``).
        labels: treat the image as a label map / mask instead of intensities.
    Returns:
        A scalar ``sitk.Image`` of dimension 2 or 3.
    Raises:
        InputError: 4D (or higher) images, multi-component volumes, non-integer label maps.
    """
    image = _collapse_singleton_axes(image)
    nd = image.GetDimension()
    if nd not in (2, 3):
        raise InputError(f"{_title(name)} is {nd}D (size {image.GetSize()}); only 2D and 3D images can be registered.")
    ncomp = image.GetNumberOfComponentsPerPixel()
    if ncomp > 1:
        if nd != 2 or ncomp > 4:
            raise InputError(
                f"{_title(name)} has {ncomp} components per voxel; "
                "only scalar volumes (or 2D colour pictures) are supported."
            )
        channels = [sitk.VectorIndexSelectionCast(image, c, sitk.sitkFloat32) for c in range(ncomp)]
        colour = channels[:3] if ncomp >= 3 else channels[:1]
        if labels:
            arrays = [sitk.GetArrayViewFromImage(c) for c in colour]
            if any(not np.array_equal(arrays[0], a) for a in arrays[1:]):
                raise InputError(f"{_title(name)} is a colour picture; a label map needs one value per pixel.")
            image = sitk.VectorIndexSelectionCast(image, 0)
        elif len(colour) == 3:
            image = colour[0] * _LUMINANCE[0] + colour[1] * _LUMINANCE[1] + colour[2] * _LUMINANCE[2]
        else:
            image = colour[0]
    if not labels:
        return sitk.Cast(image, sitk.sitkFloat32) if image.GetPixelID() != sitk.sitkFloat32 else image
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        values = sitk.GetArrayViewFromImage(image)
        if not np.all(np.isfinite(values)) or not np.array_equal(values, np.round(values)):
            raise InputError(f"{_title(name)} holds non-integer values; a label map needs whole numbers.")
        image = sitk.Cast(image, sitk.sitkInt32)
    return image


def validate_image(image: sitk.Image, name: str = "image") -> sitk.Image:
    """Check that ``image`` can be registered and return it unchanged.

    Raises:
        InputError: (one sentence naming the image) when an axis has fewer than 4 voxels, the image
            holds NaN or infinite values, or all its voxels are equal.
    """
    size = image.GetSize()
    if min(size) < MIN_VOXELS_PER_AXIS:
        raise InputError(
            f"{_title(name)} is too small (size {size}); every axis needs at least {MIN_VOXELS_PER_AXIS} voxels."
        )
    values = sitk.GetArrayViewFromImage(image)
    if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
        raise InputError(f"{_title(name)} contains NaN or infinite values.")
    low, high = values.min(), values.max()
    if low == high:
        raise InputError(f"{_title(name)} is constant (every voxel is {low:g}); there is nothing to register.")
    return image


# --------------------------------------------------------------------------------------------------
# Working grid and resampling
# --------------------------------------------------------------------------------------------------


def _matrix(image: sitk.Image) -> np.ndarray:
    """``Direction @ diag(spacing)``: physical offset (mm, x-y-z) of one voxel step along each index axis."""
    nd = image.GetDimension()
    return np.array(image.GetDirection()).reshape(nd, nd) @ np.diag(image.GetSpacing())


def grid_shape(grid: sitk.Image) -> tuple[int, ...]:
    """Array shape ``S`` of a grid (reversed ITK size): ``(H, W)`` or ``(D, H, W)``."""
    return tuple(reversed(grid.GetSize()))


def make_working_grid(
    fixed: sitk.Image,
    multiple: int = 8,
    max_voxels: int | None = None,
    spacing: float | Sequence[float] | None = None,
) -> sitk.Image:
    """Reference grid on which the networks see both images.

    It has the fixed image's direction, covers its whole physical extent (voxel edges included), is
    centred on it, and has a size that is a multiple of ``multiple`` along every axis (extra voxels
    are split evenly on both sides by moving the origin along the direction axes).

    Args:
        fixed: the fixed image (only its geometry is used).
        multiple: every axis' size is a multiple of this (the networks' downsampling factor).
        max_voxels: if set, the spacing is coarsened (isotropically) until the grid holds at most this
            many voxels (or every axis is down to ``multiple``).
        spacing: mm, one value (isotropic) or one per ITK axis (x, y[, z]). Default: isotropic at the
            finest fixed spacing, so a 1.37 x 1.37 x 4 mm volume gets a 1.37 mm isotropic grid.
    Returns:
        A zero float32 ``sitk.Image`` carrying the grid's geometry; ``grid_shape`` gives its array shape.
    """
    nd = fixed.GetDimension()
    if multiple < 1:
        raise InputError(f"multiple must be a positive integer, got {multiple}.")
    if spacing is None:
        step = np.full(nd, min(fixed.GetSpacing()), dtype=float)
    else:
        step = np.broadcast_to(np.asarray(spacing, dtype=float), (nd,)).copy()
        if np.any(step <= 0) or not np.all(np.isfinite(step)):
            raise InputError(f"working-grid spacing must be positive, got {spacing}.")
    extent = np.asarray(fixed.GetSize(), dtype=float) * np.asarray(fixed.GetSpacing())
    size, step = grid_size(extent, step, multiple, max_voxels)
    return centred_grid(fixed, size, step)


def grid_size(extent, step, multiple: int = 1, max_voxels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(size, step)`` of a grid covering ``extent`` (mm, ITK axis order) at ``step`` (mm): each size rounded up
    to a multiple of ``multiple``; with ``max_voxels`` the step is coarsened isotropically until the grid holds
    at most that many voxels (or every axis is down to ``multiple``). The one rule of the working grid and of
    the training datasets' grid."""
    extent = np.asarray(extent, dtype=float)
    step = np.asarray(step, dtype=float).copy()
    nd = extent.size

    def size_for(s: np.ndarray) -> np.ndarray:
        # 1e-6: an extent that is an exact multiple of the step must not gain a voxel from rounding.
        n = np.ceil(extent / s - 1e-6).astype(int)
        return np.maximum(multiple, multiple * np.ceil(n / multiple).astype(int))

    size = size_for(step)
    if max_voxels is not None:
        while np.prod(size, dtype=float) > max_voxels and np.any(size > multiple):
            step = step * max(1.01, (np.prod(size, dtype=float) / max_voxels) ** (1.0 / nd))
            size = size_for(step)
    return size, step


def centred_grid(reference: sitk.Image, size, spacing) -> sitk.Image:
    """A zero float32 image of ITK ``size`` and ``spacing`` (mm) with ``reference``'s direction, centred on it."""
    nd = reference.GetDimension()
    size = np.asarray(size, dtype=int)
    step = np.broadcast_to(np.asarray(spacing, dtype=float), (nd,)).copy()
    direction = np.array(reference.GetDirection()).reshape(nd, nd)
    centre = np.asarray(reference.GetOrigin()) + _matrix(reference) @ ((np.asarray(reference.GetSize()) - 1) / 2.0)
    origin = centre - direction @ (step * (size - 1) / 2.0)
    grid = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    grid.SetSpacing(step.tolist())
    grid.SetDirection(direction.flatten().tolist())
    grid.SetOrigin(origin.tolist())
    return grid


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-6) -> bool:
    """True if ``a`` and ``b`` have the same size, spacing, origin and direction (to ``tolerance``,
    relative to the spacing for the origin): sampling one on the other's grid is then a copy."""
    if a.GetDimension() != b.GetDimension() or a.GetSize() != b.GetSize():
        return False
    spacing_a, spacing_b = np.asarray(a.GetSpacing()), np.asarray(b.GetSpacing())
    return (np.allclose(spacing_a, spacing_b, rtol=tolerance, atol=0)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=tolerance * spacing_a.min())
            and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=tolerance))


def _copy_onto(image: sitk.Image, reference: sitk.Image, pixel: int) -> sitk.Image:
    """``image`` as ``pixel`` type with ``reference``'s geometry: resampling onto a ``same_grid`` (ITK's
    linear interpolation at the grid points gives these values) without an ITK pass (0.04 s per 128^3)."""
    out = sitk.Cast(image, pixel)
    out.CopyInformation(reference)
    return out


def resample_onto(
    image: sitk.Image,
    reference: sitk.Image,
    labels: bool = False,
    default: float = 0.0,
    transform: sitk.Transform | None = None,
) -> sitk.Image:
    """Sample ``image`` on the grid of ``reference`` through physical space.

    Args:
        image: scalar image; intensities are interpolated linearly, labels (``labels=True``) by nearest
            neighbour.
        reference: the grid (size, spacing, origin, direction) of the result.
        labels: keep the pixel type and use nearest-neighbour interpolation.
        default: value outside ``image``.
        transform: maps reference points to ``image`` points (fixed -> moving); identity if None.
    Returns:
        float32 image (labels: the input pixel type) on ``reference``'s grid.
    """
    if image.GetDimension() != reference.GetDimension():
        raise InputError(
            f"cannot resample a {image.GetDimension()}D image onto a {reference.GetDimension()}D grid."
        )
    pixel = image.GetPixelID() if labels else sitk.sitkFloat32
    if transform is None:
        if same_grid(image, reference):
            return _copy_onto(image, reference, pixel)
        transform = sitk.Transform(image.GetDimension(), sitk.sitkIdentity)
    interpolator = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    return sitk.Resample(image, reference, transform, interpolator, float(default), pixel)


def normalise_intensity(
    array: np.ndarray, mask: np.ndarray | None = None, low: float = 0.5, high: float = 99.5
) -> np.ndarray:
    """Map intensities to [0, 1] with a robust window: percentiles ``low``..``high`` -> 0..1, clipped.

    Args:
        array: intensities, any shape.
        mask: optional boolean array of the same shape; percentiles are taken inside it.
        low, high: percentiles (0-100) mapped to 0 and 1.
    Returns:
        float32 array of ``array``'s shape in [0, 1] (all zeros if the image is constant).
    """
    array = np.asarray(array, dtype=np.float32)
    values = array[np.asarray(mask, dtype=bool)] if mask is not None else array.ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        values = array[np.isfinite(array)]
    if values.size == 0:
        return np.zeros_like(array)
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:
        lo, hi = values.min(), values.max()
    if hi <= lo:
        return np.zeros_like(array)
    out = (array - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Points and fields: voxel (array order) <-> physical (ITK x-y-z, mm)
# --------------------------------------------------------------------------------------------------


def array_index_to_physical(index: np.ndarray, grid: sitk.Image) -> np.ndarray:
    """Continuous array indices ``(N, nd)`` (array axis order, e.g. row, col) -> physical points ``(N, nd)`` mm."""
    index = np.atleast_2d(np.asarray(index, dtype=float))
    return np.asarray(grid.GetOrigin()) + index[:, ::-1] @ _matrix(grid).T


def physical_to_array_index(points: np.ndarray, grid: sitk.Image) -> np.ndarray:
    """Physical points ``(N, nd)`` mm -> continuous array indices ``(N, nd)`` (array axis order)."""
    points = np.atleast_2d(np.asarray(points, dtype=float))
    itk_index = (points - np.asarray(grid.GetOrigin())) @ np.linalg.inv(_matrix(grid)).T
    return itk_index[:, ::-1]


def field_of_view(image: sitk.Image, grid: sitk.Image) -> np.ndarray:
    """Boolean array on ``grid`` (array order): True where the grid's voxel centre lies inside ``image``'s
    physical extent, decided by ITK's own resampling (nearest neighbour of an image of ones).

    The ones are one byte per voxel of ``image`` (a float copy of a 600^3 volume would take 0.9 GB).
    """
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    return sitk.GetArrayFromImage(resample_onto(ones, grid, labels=True)) > 0


def _check_field_shape(shape: tuple[int, ...], expected: tuple[int, ...], what: str) -> None:
    if tuple(shape) != tuple(expected):
        raise InputError(f"{what} has shape {tuple(shape)} but the grid needs {tuple(expected)}.")


def voxel_affine_to_physical(matrix: np.ndarray, translation: np.ndarray, grid: sitk.Image) -> dict:
    """The affine ``x -> A (x - c) + c + t`` of ``affine.py`` (array-order voxels of ``grid``, ``c`` the grid
    centre) as a physical map ``p -> A_p (p - c_p) + c_p + t_p`` in LPS mm (what ITK's ``AffineTransform``
    with centre ``c_p`` holds): ``{"matrix": A_p, "translation_mm": t_p, "centre_mm": c_p}`` (lists, x-y-z).
    """
    nd = grid.GetDimension()
    m = _matrix(grid)[:, ::-1]  # array-order voxel step -> physical offset (columns reversed)
    a = np.asarray(matrix, dtype=float)
    centre = np.array([(n - 1) / 2 for n in grid_shape(grid)])
    centre_mm = np.asarray(grid.GetOrigin()) + m @ centre
    return dict(matrix=(m @ a @ np.linalg.inv(m)).reshape(nd, nd).tolist(),
                translation_mm=(m @ np.asarray(translation, dtype=float)).tolist(), centre_mm=centre_mm.tolist())


def voxel_field_to_physical(u: np.ndarray, grid: sitk.Image) -> np.ndarray:
    """Voxel displacement field -> physical displacement field on the same grid.

    Args:
        u: ``(nd, *S)`` (or ``(1, nd, *S)``) displacement in voxels of ``grid``, channel i along array
            axis i (``warp.py``'s convention).
        grid: the grid the field lives on; ``S == grid_shape(grid)``.
    Returns:
        ``(*S, nd)`` float64 displacement in mm, components in ITK x, y[, z] order (LPS):
        ``d = Direction @ diag(spacing) @ u[::-1]``.
    """
    u = np.asarray(u)
    nd = grid.GetDimension()
    if u.ndim == nd + 2 and u.shape[0] == 1:
        u = u[0]
    _check_field_shape(u.shape, (nd, *grid_shape(grid)), "voxel field")
    u_itk = np.moveaxis(u[::-1].astype(np.float64), 0, -1)
    return u_itk @ _matrix(grid).T


def physical_field_to_voxel(d: np.ndarray, grid: sitk.Image) -> np.ndarray:
    """Inverse of ``voxel_field_to_physical``: ``(*S, nd)`` mm (x-y-z) -> ``(nd, *S)`` float32 voxels (array order)."""
    d = np.asarray(d, dtype=np.float64)
    nd = grid.GetDimension()
    _check_field_shape(d.shape, (*grid_shape(grid), nd), "physical field")
    u_itk = d @ np.linalg.inv(_matrix(grid)).T
    return np.ascontiguousarray(np.moveaxis(u_itk, -1, 0)[::-1]).astype(np.float32)


def displacement_image(d: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """Wrap a physical field ``(*S, nd)`` (mm, x-y-z) as an ITK displacement-field image with ``grid``'s geometry.

    The result (vector float64, ``nd`` components) is the standard ITK/Slicer displacement field:
    the fixed point ``p`` maps to the moving point ``p + d(p)``.
    """
    d = np.asarray(d, dtype=np.float64)
    nd = grid.GetDimension()
    _check_field_shape(d.shape, (*grid_shape(grid), nd), "physical field")
    image = sitk.GetImageFromArray(d, isVector=True)
    image.SetOrigin(grid.GetOrigin())
    image.SetSpacing(grid.GetSpacing())
    image.SetDirection(grid.GetDirection())
    return image


def _check_displacement(disp: sitk.Image) -> None:
    if disp.GetNumberOfComponentsPerPixel() != disp.GetDimension():
        raise InputError(
            f"a displacement field needs {disp.GetDimension()} components per voxel, "
            f"this image has {disp.GetNumberOfComponentsPerPixel()}."
        )


def resample_displacement(disp: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Sample a displacement-field image on another grid (vector-linear; zero displacement outside).

    The vectors are physical, so no conversion is needed: ``d_ref(p) = d(p)`` at every point ``p`` of
    ``reference`` (e.g. working grid -> fixed image grid before writing the transform).
    """
    _check_displacement(disp)
    if disp.GetDimension() != reference.GetDimension():
        raise InputError(
            f"cannot resample a {disp.GetDimension()}D field onto a {reference.GetDimension()}D grid."
        )
    if same_grid(disp, reference):
        return _copy_onto(disp, reference, sitk.sitkVectorFloat64)
    identity = sitk.Transform(disp.GetDimension(), sitk.sitkIdentity)
    return sitk.Resample(disp, reference, identity, sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)


def displacement_transform(disp: sitk.Image) -> sitk.DisplacementFieldTransform:
    """ITK transform ``p -> p + d(p)`` (fixed -> moving) from a displacement-field image.

    The caller's image is left intact (SimpleITK's constructor empties the image it is given, so it
    gets a copy). Outside the field's grid the displacement is zero.
    """
    _check_displacement(disp)
    if disp.GetPixelID() == sitk.sitkVectorFloat64:
        owned = sitk.Image(disp)
    else:
        owned = sitk.Cast(disp, sitk.sitkVectorFloat64)
    return sitk.DisplacementFieldTransform(owned)

