"""Known deformations and local alterations of real images (the ground truth of the DRIVE and
missing-correspondence benchmarks).

Construction of a pair with a known answer: take a real image ``I`` as the MOVING image and a smooth
random displacement ``d`` on its grid; the FIXED image is ``F(p) = I(p + d(p))`` (``sitk.Resample`` of
``I`` through ``T(p) = p + d(p)``). Then ``T`` is exactly the fixed -> moving transform a registration
should return, known at every fixed point, with no inversion needed. Alterations (a lesion, a removed
region, a local contrast change) are then applied to the moving image only, so the fixed image holds
structure the moving one lacks (or the other way round) in a known region.

All functions work in 2D and 3D on ``sitk.Image`` with physical geometry; sizes are in mm (pixels for
pictures, whose spacing is 1).
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

__all__ = ["random_smooth_field", "deform", "physical_points", "alteration_mask", "alter", "ALTERATIONS"]

ALTERATIONS = ("lesion", "removal", "contrast")


def random_smooth_field(reference: sitk.Image, max_displacement: float, control_spacing: float,
                        seed: int = 0, mask: sitk.Image | None = None) -> sitk.Image:
    """A smooth random displacement field on ``reference``'s grid (vector float64, physical units).

    A cubic B-spline with control points every ``control_spacing`` and random coefficients, densified
    and scaled so that its largest displacement (inside ``mask`` if given) is ``max_displacement``.
    Keep ``max_displacement`` below about ``0.4 * control_spacing`` for a fold-free field.
    """
    nd = reference.GetDimension()
    extent = [sz * sp for sz, sp in zip(reference.GetSize(), reference.GetSpacing())]
    mesh = [max(1, int(round(e / control_spacing))) for e in extent]
    bspline = sitk.BSplineTransformInitializer(reference, mesh, 3)
    rng = np.random.default_rng(seed)
    params = rng.standard_normal(len(bspline.GetParameters()))
    bspline.SetParameters(params.tolist())
    field = sitk.TransformToDisplacementField(bspline, sitk.sitkVectorFloat64, reference.GetSize(),
                                              reference.GetOrigin(), reference.GetSpacing(),
                                              reference.GetDirection())
    d = sitk.GetArrayFromImage(field)
    norm = np.sqrt((d ** 2).sum(-1))
    if mask is not None:
        inside = sitk.GetArrayFromImage(mask) > 0
        norm = norm[inside] if inside.any() else norm
    d *= max_displacement / max(float(norm.max()), 1e-12)
    out = sitk.GetImageFromArray(d, isVector=True)
    out.CopyInformation(reference)
    assert out.GetNumberOfComponentsPerPixel() == nd
    return out


def _transform(field: sitk.Image) -> sitk.DisplacementFieldTransform:
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def deform(image: sitk.Image, field: sitk.Image, labels: bool = False, default: float = 0.0) -> sitk.Image:
    """``image`` resampled through ``p -> p + field(p)`` onto the field's grid (nearest for labels)."""
    interpolator = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    return sitk.Resample(image, field, _transform(field), interpolator, default, image.GetPixelID())


def physical_points(reference: sitk.Image) -> np.ndarray:
    """Physical coordinates of every voxel of ``reference``: ``(N, nd)`` (x, y[, z]), in array (C) order."""
    nd = reference.GetDimension()
    shape = tuple(reversed(reference.GetSize()))
    index = np.indices(shape).reshape(nd, -1)[::-1].T  # ITK index order (x, y[, z])
    direction = np.array(reference.GetDirection()).reshape(nd, nd)
    return np.asarray(reference.GetOrigin()) + (index * np.asarray(reference.GetSpacing())) @ direction.T


def alteration_mask(reference: sitk.Image, centre, radius: float) -> sitk.Image:
    """Soft ball (1 inside, smooth 0..1 edge of width ``radius/4``, 0 outside) around a physical ``centre``."""
    shape = tuple(reversed(reference.GetSize()))
    dist = np.linalg.norm(physical_points(reference) - np.asarray(centre, dtype=float), axis=1)
    edge = max(radius / 4.0, 1e-6)
    soft = np.clip((radius - dist) / edge + 0.5, 0.0, 1.0).reshape(shape)
    out = sitk.GetImageFromArray(soft.astype(np.float32))
    out.CopyInformation(reference)
    return out


def alter(image: sitk.Image, kind: str, centre, radius: float, seed: int = 0) -> tuple[sitk.Image, sitk.Image]:
    """Apply a local alteration to ``image``; returns ``(altered image, hard mask of the altered region)``.

    * ``"lesion"``: a bright textured blob (99th-percentile intensity with noise) that the other image lacks;
    * ``"removal"``: the region's structure is wiped (replaced by a heavily smoothed version of the image);
    * ``"contrast"``: a nonlinear local contrast change (gamma 3 of the locally normalised intensity),
      the structure stays but its appearance changes.
    """
    if kind not in ALTERATIONS:
        raise ValueError(f"alteration must be one of {ALTERATIONS}, got {kind!r}")
    a = sitk.GetArrayFromImage(image).astype(np.float32)
    w = sitk.GetArrayFromImage(alteration_mask(image, centre, radius))
    lo, hi = np.percentile(a, [1, 99])
    rng = np.random.default_rng(seed)
    if kind == "lesion":
        texture = rng.standard_normal(a.shape).astype(np.float32)
        smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(texture), 1.0))
        smooth /= max(float(np.abs(smooth).max()), 1e-6)
        target = hi + 0.15 * (hi - lo) * smooth
    elif kind == "removal":
        blurred = sitk.SmoothingRecursiveGaussian(image, float(radius) * 0.75)
        target = sitk.GetArrayFromImage(blurred).astype(np.float32)
    else:
        inside = w > 0.5
        r_lo, r_hi = np.percentile(a[inside], [1, 99]) if inside.any() else (lo, hi)
        normed = np.clip((a - r_lo) / max(r_hi - r_lo, 1e-6), 0, 1)
        target = r_lo + (r_hi - r_lo) * normed ** 3
    out = sitk.GetImageFromArray((1 - w) * a + w * target)
    out.CopyInformation(image)
    out = sitk.Cast(out, sitk.sitkFloat32)
    hard = sitk.GetImageFromArray((w > 0).astype(np.uint8))
    hard.CopyInformation(image)
    return out, hard
