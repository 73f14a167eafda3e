"""One evaluation for every method: read the written transform back with SimpleITK and measure it.

The transform file (``.h5``/``.tfm`` ITK transform, or a displacement-field image) is read with
``DeepSalRegLib.io.read_transform`` (``sitk.ReadTransform`` / ``sitk.ReadImage``) and interpreted as
the fixed -> moving map ``T`` (``conventions.py`` verifies each method's direction on a known case).
Everything below is computed from ``T`` and the case files only, identically for all methods:

* landmarks: TRE ``|T(p_fixed) - p_moving|`` (mean, median, per region; ANHIR: rTRE = TRE / diagonal);
* labels: moving labels resampled through ``T`` onto the fixed grid (nearest), Dice per label with the
  fixed labels, mean over the case's ``label_ids``;
* the dense field ``d(p) = T(p) - p`` on the fixed grid (``sitk.TransformToDisplacementField``): its
  Jacobian determinant (``sitk.DisplacementFieldJacobianDeterminant``, physical), folding fraction
  (``det <= 0``) and SD of ``log(det)`` inside the case's ``eval_mask`` (whole image without one);
* a known field: end-point error ``|d - d_true|`` (mean, median, 95th percentile) inside the mask; with an
  altered region (missing-correspondence study) also outside and inside it separately, and in distance
  bands around it: ``epe_band_*`` within ``BAND_MM`` of the region, ``epe_far_*`` beyond.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DeepSalRegLib import io as dio
from DeepSalRegLib.metrics import LOG_JACOBIAN_CLIP, dice_per_label, end_point_error, jacobian_statistics

__all__ = ["evaluate", "dense_field", "jacobian", "BAND_MM"]

BAND_MM = 10.0  # width of the band around an altered region (mm; pixels for pictures)


def dense_field(transform: sitk.Transform, grid: sitk.Image) -> np.ndarray:
    """``T(p) - p`` at every point of ``grid``: array ``(*S, nd)`` (x, y[, z] components, physical units)."""
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, grid.GetSize(), grid.GetOrigin(),
                                              grid.GetSpacing(), grid.GetDirection())
    return sitk.GetArrayFromImage(field)


def jacobian(d: np.ndarray, grid: sitk.Image) -> np.ndarray:
    """Jacobian determinant of ``p -> p + d(p)`` (physical derivatives) on ``grid``: array ``S``."""
    image = sitk.GetImageFromArray(d, isVector=True)
    image.CopyInformation(grid)
    return sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(image))


def _stats(values: np.ndarray, prefix: str) -> dict:
    if values.size == 0:
        return {}
    return {f"{prefix}_mean": float(values.mean()), f"{prefix}_median": float(np.median(values)),
            f"{prefix}_p95": float(np.percentile(values, 95))}


def _read_points(path) -> np.ndarray:
    points, _ = dio.read_landmarks(path)
    return points


def evaluate(case: dict, transform_path, altered_mask: str | None = None, error_map: str | None = None) -> dict:
    """All metrics of one method on one case (see the module docstring); plain floats, JSON-able.

    Args:
        case: a case from ``datasets.prepare`` (or the missing-correspondence study).
        transform_path: the method's written transform file.
        altered_mask: optional label image on the fixed grid marking the altered region.
        error_map: optional path where the end-point-error map is written (for the plots).
    """
    fixed = sitk.ReadImage(case["fixed"])
    tx = dio.read_transform(transform_path)
    d = dense_field(tx, fixed)
    region = np.ones(d.shape[:-1], dtype=bool)
    if case.get("eval_mask"):
        region = sitk.GetArrayFromImage(sitk.ReadImage(case["eval_mask"])) > 0
    det = jacobian(d, fixed)
    log_det = np.log(np.clip(det, LOG_JACOBIAN_CLIP, None))
    out = dict(jacobian_statistics(det, region), max_displacement=float(np.sqrt((d ** 2).sum(-1))[region].max()))

    if case.get("fixed_landmarks"):
        f_pts, m_pts = _read_points(case["fixed_landmarks"]), _read_points(case["moving_landmarks"])
        tre = dio.target_registration_error(tx, f_pts, m_pts)
        out.update(tre_mean=float(tre.mean()), tre_median=float(np.median(tre)), tre_max=float(tre.max()),
                   n_landmarks=int(len(tre)))
        regions = case.get("landmark_regions")
        if regions:
            regions = np.asarray(regions)
            for name in sorted(set(regions)):
                out[f"tre_{name}_mean"] = float(tre[regions == name].mean())
                out[f"tre_{name}_median"] = float(np.median(tre[regions == name]))
        if case.get("diagonal"):
            rtre = tre / float(case["diagonal"])
            out.update(rtre_mean=float(rtre.mean()), rtre_median=float(np.median(rtre)))

    if case.get("fixed_labels"):
        f_lab = sitk.ReadImage(case["fixed_labels"])
        m_lab = sitk.ReadImage(case["moving_labels"])
        warped = sitk.Resample(m_lab, f_lab, tx, sitk.sitkNearestNeighbor, 0, m_lab.GetPixelID())
        per_label = dice_per_label(sitk.GetArrayFromImage(f_lab), sitk.GetArrayFromImage(warped), case["label_ids"])
        out.update(dice_mean=float(np.mean(list(per_label.values()))) if per_label else float("nan"),
                   n_labels=len(per_label))

    if case.get("true_field"):
        true = sitk.GetArrayFromImage(sitk.ReadImage(case["true_field"])).astype(np.float64)
        epe = end_point_error(d, true)
        out.update(_stats(epe[region], "epe"))
        if error_map:
            image = sitk.GetImageFromArray((epe * region).astype(np.float32))
            image.CopyInformation(fixed)
            Path(error_map).parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(image, str(error_map), True)
        if altered_mask:
            altered = sitk.ReadImage(altered_mask) > 0
            inside = sitk.GetArrayFromImage(altered) > 0
            # a margin around the region: the regulariser legitimately spreads the disturbance a little
            margin = max(2, int(round(0.25 * np.sqrt(inside.sum() / np.pi))))
            near = sitk.GetArrayFromImage(sitk.BinaryDilate(altered, [margin] * fixed.GetDimension())) > 0
            outside = region & ~near
            true_log_det = np.log(np.clip(jacobian(true, fixed), LOG_JACOBIAN_CLIP, None))
            out.update(_stats(epe[outside], "epe_outside"))
            # distance bands in mm (the 3D study): 0-10 mm around the region, and beyond 10 mm
            def distance_to(mask):
                return sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
                    sitk.Cast(mask, sitk.sitkUInt8), insideIsPositive=False, squaredDistance=False, useImageSpacing=True))

            band = region & ~inside & (distance_to(altered) <= BAND_MM)
            # "far" from a reference region shared by all variants of a study (like-for-like with the unaltered pair)
            reference = sitk.ReadImage(case["far_reference"]) > 0 if case.get("far_reference") else altered
            far = region & (distance_to(reference) > BAND_MM)
            out.update(_stats(epe[band], "epe_band"))
            out.update(_stats(epe[far], "epe_far"))
            out.update(_stats(epe[inside & region], "epe_inside"))
            inside_stats = jacobian_statistics(det, inside)
            out.update(folding_inside=inside_stats["folding_fraction"],
                       sd_log_jacobian_inside=inside_stats["sd_log_jacobian"],
                       log_jacobian_error_inside=float(np.abs(log_det - true_log_det)[inside].mean()))
    return out
