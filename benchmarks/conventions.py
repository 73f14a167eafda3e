"""Check, for every method, which way its written transform points, on a pair with a known answer.

The pair: ``moving(q) = g(q)`` and ``fixed(p) = g(p + t)`` for a smooth asymmetric pattern ``g`` (a few
Gaussian blobs) and a known translation ``t`` in mm, on grids with anisotropic spacing and a non-zero
origin (so index/physical mix-ups show). The correct fixed -> moving transform is ``T(p) = p + t``. Each
method registers the pair and writes its transform file; the file is read back exactly as in
``evaluation.py`` and the mean displacement over the central part of the fixed grid is compared with
``t``. Verdicts: ``fixed->moving`` (mean within 30 % of ``t``), ``reversed`` (close to ``-t``), or
``unclear`` (neither: the method did not recover the motion, so the direction cannot be told).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DeepSalRegLib import io as dio

from .evaluation import dense_field

__all__ = ["make_translation_pair", "check"]

CASES = {
    2: dict(size=(72, 64), spacing=(1.0, 1.25), origin=(-30.0, 12.0), t=(3.0, -2.0)),
    3: dict(size=(32, 28, 24), spacing=(1.5, 1.8, 2.25), origin=(10.0, -20.0, 5.0), t=(3.0, -2.0, 2.5)),
}


def _pattern(points: np.ndarray, centre: np.ndarray, extent: np.ndarray, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    nd = points.shape[1]
    value = np.zeros(len(points))
    for _ in range(7):
        c = centre + (rng.random(nd) - 0.5) * 0.6 * extent
        sigma = (0.06 + 0.08 * rng.random()) * extent.min()
        value += (0.5 + rng.random()) * np.exp(-0.5 * (((points - c) / sigma) ** 2).sum(1))
    return value


def make_translation_pair(dim: int, folder: Path) -> dict:
    """Write the known-translation pair for ``dim`` into ``folder``; returns a case dict with ``t``."""
    spec = CASES[dim]
    grid = sitk.Image(list(spec["size"]), sitk.sitkFloat32)
    grid.SetSpacing(spec["spacing"])
    grid.SetOrigin(spec["origin"])
    shape = tuple(reversed(spec["size"]))
    index = np.indices(shape).reshape(dim, -1)[::-1].T
    points = np.asarray(spec["origin"]) + index * np.asarray(spec["spacing"])
    extent = np.asarray(spec["size"]) * np.asarray(spec["spacing"])
    centre = np.asarray(spec["origin"]) + extent / 2
    t = np.asarray(spec["t"])
    folder.mkdir(parents=True, exist_ok=True)
    case = dict(name=f"convention_{dim}d", dataset="conventions", dim=dim, units="mm", dsr={}, t=t.tolist())
    for role, shift in (("moving", 0.0), ("fixed", 1.0)):
        image = sitk.GetImageFromArray(_pattern(points + shift * t, centre, extent).reshape(shape).astype(np.float32))
        image.CopyInformation(grid)
        path = folder / f"{role}.mha"
        sitk.WriteImage(image, str(path))
        case[role] = str(path)
    return case


def verdict(transform_path, case: dict) -> dict:
    """Mean displacement of the written transform over the central half of the fixed grid vs ``t``."""
    fixed = sitk.ReadImage(case["fixed"])
    d = dense_field(dio.read_transform(transform_path), fixed)
    core = tuple(slice(n // 4, n - n // 4) for n in d.shape[:-1])
    mean = d[core].reshape(-1, d.shape[-1]).mean(0)
    t = np.asarray(case["t"])
    tol = 0.3 * np.linalg.norm(t)
    if np.linalg.norm(mean - t) < tol:
        status = "fixed->moving"
    elif np.linalg.norm(mean + t) < tol:
        status = "reversed"
    else:
        status = "unclear"
    return dict(expected=t.round(3).tolist(), recovered=mean.round(3).tolist(), status=status)


def check(methods, work: Path, runner, dims=(2, 3), skip=None, log=print) -> list[dict]:
    """Run every method of ``methods`` on the known pairs; ``runner(method, case, outdir)`` returns the
    measure report of ``methods.run_method``; ``skip(method, dim)`` leaves a combination out (e.g. a
    network without trained weights, whose identity field says nothing). One row per method and dimension."""
    rows = []
    for dim in dims:
        case = make_translation_pair(dim, Path(work) / "conventions" / f"{dim}d")
        for method in methods:
            if skip is not None and skip(method, dim):
                continue
            outdir = Path(work) / "conventions" / f"{dim}d" / method
            report = runner(method, case, outdir)
            row = dict(method=method, dim=dim)
            if not report.get("ok"):
                row.update(status="failed", error=report.get("error"))
            else:
                row.update(verdict(report["result"]["transform"], case))
                row["transform_file"] = Path(report["result"]["transform"]).name
            log(f"  convention {dim}D {method:20s} {row['status']:14s} recovered {row.get('recovered')} "
                f"expected {row.get('expected', case['t'])}")
            rows.append(row)
    return rows
