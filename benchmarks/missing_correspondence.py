"""The missing-correspondence study: real images where one image of the pair has a structure the other lacks.

For each source image (real 2D T1 brain slices and a DRIVE fundus image) a pair with a known smooth
deformation is built (``synthetic``: moving = the real image, fixed = moving resampled through the known
``T``). Then the MOVING image alone is altered in one disc (``synthetic.alter``):

* ``none``: no alteration (the reference level of every error);
* ``lesion``: a bright textured lesion that the fixed image lacks;
* ``removal``: the structure of the region is wiped;
* ``contrast``: a nonlinear local contrast change.

The disc is mapped to the fixed grid through ``T`` (the altered region), and the same region is used
for ``none`` so the numbers compare like for like. ``evaluation.evaluate`` reports the end-point error
outside the region (minus a margin), inside it, the log-Jacobian error and the folding inside it. The
study's claim: with the JSM, the error outside the altered region stays at its ``none`` level; without
it (and for peers that trust every intensity) the unmatched structure pulls the field.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import synthetic
from .datasets import _shrink, _write, drive_pair
from .shared_data import grey, pixel_units

__all__ = ["prepare", "VARIANTS"]

VARIANTS = ("none",) + synthetic.ALTERATIONS


def _brain_slice(data: Path, name: str, shrink: int, seed: int):
    image = _shrink(pixel_units(grey(sitk.ReadImage(str(data / "templates" / name)))), shrink)
    field = synthetic.random_smooth_field(image, 6.0, control_spacing=48.0, seed=seed)
    fixed = synthetic.deform(image, field)
    a = sitk.GetArrayFromImage(fixed)
    foreground = sitk.GetImageFromArray((a > np.percentile(a, 30)).astype(np.uint8))
    foreground.CopyInformation(fixed)
    foreground = sitk.BinaryMorphologicalClosing(foreground, [3, 3])
    return fixed, image, field, foreground


def _site(fixed: sitk.Image, foreground: sitk.Image, radius: float, seed: int):
    """A physical point inside the foreground, at least ``radius`` from its border (deterministic)."""
    distance = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(foreground, insideIsPositive=True,
                                                                    useImageSpacing=True))
    candidates = np.argwhere(distance > 1.3 * radius)
    if len(candidates) == 0:
        candidates = np.argwhere(distance >= distance.max())
    rng = np.random.default_rng(seed)
    index = candidates[rng.integers(len(candidates))][::-1]
    return np.asarray(fixed.TransformIndexToPhysicalPoint([int(i) for i in index]))


def prepare(data: Path, work: Path, scale: str = "full", log=print) -> list[dict]:
    """Write the study's pairs under ``work/inputs/missing``; returns their cases (with ``altered_mask``)."""
    data, work = Path(data), Path(work)
    sources = []
    slices = {"full": ["ants_r16slice.jpg", "ants_r62slice.jpg"], "quick": ["ants_r16slice.jpg"],
              "tiny": ["ants_r16slice.jpg"]}[scale]
    shrink = {"full": 1, "quick": 2, "tiny": 4}[scale]
    if (data / "templates").is_dir():
        for k, name in enumerate(slices):
            fixed, moving, field, fg = _brain_slice(data, name, shrink, seed=200 + k)
            sources.append((name.split("_")[1].replace("slice.jpg", ""), fixed, moving, field, fg))
    else:
        log(f"  missing-correspondence: {data / 'templates'} not found, brain slices skipped")
    if scale == "full" and (data / "drive").is_dir():
        fixed, moving, field, _, _, fov = drive_pair(data, 22, 2, seed=300)
        sources.append(("drive22", fixed, moving, field, fov))
    cases = []
    for k, (name, fixed, moving, field, fg) in enumerate(sources):
        radius = 0.09 * min(s * sp for s, sp in zip(fixed.GetSize(), fixed.GetSpacing()))
        centre_fixed = _site(fixed, fg, radius, seed=k)
        transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
        centre_moving = np.asarray(transform.TransformPoint(centre_fixed.tolist()))
        folder = work / "inputs" / "missing" / name
        common = dict(dataset="missing", dim=2, units="px", dsr={},
                      fixed=_write(fixed, folder / "fixed.mha"), true_field=_write(field, folder / "true_field.mha"),
                      eval_mask=_write(fg, folder / "eval_mask.nii.gz"), source=name)
        hard = sitk.Cast(synthetic.alteration_mask(moving, centre_moving, radius) > 0, sitk.sitkUInt8)
        region = _write(synthetic.deform(hard, field, labels=True), folder / "altered_region.nii.gz")
        for variant in VARIANTS:
            if variant == "none":
                altered, notes = moving, "no alteration (reference)"
            else:
                altered, _ = synthetic.alter(moving, variant, centre_moving, radius, seed=k)
                notes = f"{variant} in a disc of radius {radius:.0f} px"
            cases.append(dict(common, name=f"missing_{name}_{variant}", variant=variant, altered_mask=region,
                              moving=_write(altered, folder / f"moving_{variant}.mha"), notes=notes))
    return cases


def summarise(rows: list[dict]) -> list[dict]:
    """Per method and alteration: mean over sources of the errors and of their change from ``none``."""
    by = {}
    for r in rows:
        if r.get("dataset") != "missing" or not r.get("ok"):
            continue
        by.setdefault((r["method"], r["source"]), {})[r["variant"]] = r["metrics"]
    table = {}
    for (method, source), variants in by.items():
        base = variants.get("none", {})
        for variant, m in variants.items():
            entry = table.setdefault((method, variant), dict(method=method, variant=variant, n=0, epe_outside=[],
                                                             epe_inside=[], delta_outside=[], logj_inside=[],
                                                             folding=[]))
            entry["n"] += 1
            entry["epe_outside"].append(m.get("epe_outside_mean", np.nan))
            entry["epe_inside"].append(m.get("epe_inside_mean", np.nan))
            entry["logj_inside"].append(m.get("log_jacobian_error_inside", np.nan))
            entry["folding"].append(m.get("folding_fraction", np.nan))
            entry["delta_outside"].append(m.get("epe_outside_mean", np.nan) - base.get("epe_outside_mean", np.nan))
    out = []
    for entry in table.values():
        out.append({k: (float(np.nanmean(v)) if isinstance(v, list) else v) for k, v in entry.items()})
    from .methods import METHODS

    methods = {m: i for i, m in enumerate(METHODS)}
    order = {v: i for i, v in enumerate(VARIANTS)}
    return sorted(out, key=lambda e: (methods.get(e["method"], 99), order.get(e["variant"], 9)))
