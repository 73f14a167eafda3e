"""Pair definitions per dataset: every method gets the same prepared input files.

``prepare(data, work, scale)`` reads the real data (``../shared/data``, see its README), writes
grey float32 images, landmarks (CSV, physical LPS), label maps, masks and known fields to
``work/inputs/<case>/`` and returns one plain-dict *case* per pair (JSON-able, so it can travel to the
method's own process). Keys of a case:

* ``name``, ``dataset``, ``dim``, ``units`` (``"mm"`` or ``"px"``), ``fixed``, ``moving`` (paths);
* optional ``fixed_landmarks``/``moving_landmarks`` (CSV ``x,y[,z]`` physical) and ``landmark_regions``;
* optional ``fixed_labels``/``moving_labels`` and ``label_ids`` (Dice), ``eval_mask`` (fixed grid: where
  folding, log-Jacobian and end-point errors are measured; whole image when absent);
* optional ``true_field`` (displacement image on the fixed grid, fixed -> moving) and ``diagonal``
  (ANHIR's rTRE divisor);
* ``dsr`` (DeepSalReg options for this case, e.g. the working-grid spacing) and ``notes``.

Scales: ``"full"`` (the committed results, ~42 min on 2 cores), ``"quick"`` (one pair per dataset, coarser
grids: 10.5 min on 2 cores with the peers) and ``"tiny"`` (CI: a handful of very small pairs, seconds).
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import shared_data, synthetic

__all__ = ["prepare", "user_grids", "DATASETS"]

DATASETS = ("liver", "brain", "prostate", "hands", "anhir", "drive")


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------


def _write(image: sitk.Image, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return str(path)


def _write_points(points: np.ndarray, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = ["x", "y", "z"][: points.shape[1]]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(axes)
        writer.writerows([[repr(float(v)) for v in p] for p in points])
    return str(path)


def _shrink(image: sitk.Image, factor, labels: bool = False) -> sitk.Image:
    """Downsample by integer factors: block averages for intensities, nearest on the same grid for labels."""
    factors = [int(factor)] * image.GetDimension() if np.isscalar(factor) else [int(f) for f in factor]
    if all(f == 1 for f in factors):
        return image
    averaged = sitk.BinShrink(sitk.Cast(image, sitk.sitkFloat32), factors)
    if not labels:
        return averaged
    return sitk.Resample(image, averaged, sitk.Transform(), sitk.sitkNearestNeighbor, 0, image.GetPixelID())


def _centred(image: sitk.Image) -> sitk.Image:
    """Same pixels, origin moved so the image centre is at the physical origin (direction kept)."""
    image = sitk.Image(image)
    centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()])
    image.SetOrigin([o - c for o, c in zip(image.GetOrigin(), centre)])
    return image


def _case(name, dataset, dim, units, fixed, moving, **extra) -> dict:
    case = dict(name=name, dataset=dataset, dim=dim, units=units, fixed=fixed, moving=moving, dsr={}, notes="")
    case.update(extra)
    return case


# --------------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------------


def liver(data: Path, work: Path, scale: str) -> list[dict]:
    """ETH 4D-MRI liver: exhale (fixed) vs other breathing states, landmarks inside / outside the liver."""
    pairs = shared_data.liver_pairs(data)
    if scale != "full":
        pairs = pairs[:1]
    shrink = {"full": 1, "quick": 2, "tiny": 3}[scale]
    dsr_spacing = {"full": 3.0, "quick": 3.0, "tiny": 4.0}[scale]
    cases = []
    for pair in pairs:
        name = "liver_" + pair.name
        out = work / "inputs" / name
        images = pair.load()
        fixed, moving = (_shrink(images[k], [shrink, shrink, 1]) for k in ("fixed", "moving"))
        cases.append(_case(
            name, "liver", 3, "mm", _write(fixed, out / "fixed.mha"), _write(moving, out / "moving.mha"),
            fixed_landmarks=_write_points(images["fixed_points"], out / "fixed_landmarks.csv"),
            moving_landmarks=_write_points(images["moving_points"], out / "moving_landmarks.csv"),
            landmark_regions=images["landmark_regions"],
            dsr=dict(spacing=dsr_spacing),
            notes=(f"in-plane downsampled x{shrink}" if shrink > 1 else "full resolution")
                  + f"; DeepSalReg working grid {dsr_spacing:g} mm"))
    return cases


def brain(data: Path, work: Path, scale: str) -> list[dict]:
    """Two T1 brains, both directions, Dice over the 30 evaluation labels; downsampled (said in ``notes``)."""
    shrink = {"full": 2, "quick": 3, "tiny": 4}[scale]
    dsr_spacing = {"full": 3.0, "quick": 3.0, "tiny": 4.0}[scale]
    images = {s: _shrink(shared_data.brain_subject(data, s), shrink) for s in "AB"}
    labels = {s: _shrink(shared_data.brain_subject(data, s, labels=True), shrink, labels=True) for s in "AB"}
    label_ids = shared_data.brain_label_values(data)
    directions = [("A", "B"), ("B", "A")] if scale == "full" else [("A", "B")]
    cases = []
    for f, m in directions:
        name = f"brain_{f}_to_{m}"  # fixed f, moving m
        out = work / "inputs" / name
        cases.append(_case(
            name, "brain", 3, "mm", _write(images[f], out / "fixed.mha"), _write(images[m], out / "moving.mha"),
            fixed_labels=_write(labels[f], out / "fixed_labels.nii.gz"),
            moving_labels=_write(labels[m], out / "moving_labels.nii.gz"),
            label_ids=label_ids,
            eval_mask=_write(sitk.Cast(labels[f] > 0, sitk.sitkUInt8), out / "eval_mask.nii.gz"),
            dsr=dict(spacing=dsr_spacing),
            notes=f"downsampled to {shrink} mm ({'x'.join(map(str, images[f].GetSize()))}) to fit the time budget; "
                  f"DeepSalReg working grid {dsr_spacing:g} mm"))
    return cases


def prostate(data: Path, work: Path, scale: str) -> list[dict]:
    """PROMISE12 inter-subject pairs of one site (256x256x23), centred, central 160x160 crop; gland Dice."""
    pairs = {"full": [(26, 27), (28, 29)], "quick": [(26, 27)], "tiny": [(26, 27)]}[scale]
    shrink = {"full": 1, "quick": 2, "tiny": 4}[scale]
    dsr_spacing = {"full": 1.5, "quick": 2.0, "tiny": 4.0}[scale]
    cases = []

    def load(n, labels=False):
        image = shared_data.prostate_case(data, n, labels)
        size = image.GetSize()
        crop = [min(160, size[0]), min(160, size[1]), size[2]]
        start = [(size[0] - crop[0]) // 2, (size[1] - crop[1]) // 2, 0]
        image = sitk.RegionOfInterest(image, crop, start)
        return _centred(_shrink(image, [shrink, shrink, 1], labels=labels))

    for f, m in pairs:
        name = f"prostate_{f:02d}_to_{m:02d}"
        out = work / "inputs" / name
        cases.append(_case(
            name, "prostate", 3, "mm", _write(load(f), out / "fixed.mha"), _write(load(m), out / "moving.mha"),
            fixed_labels=_write(load(f, True), out / "fixed_labels.nii.gz"),
            moving_labels=_write(load(m, True), out / "moving_labels.nii.gz"),
            label_ids=[1], dsr=dict(spacing=dsr_spacing),
            notes=f"DeepSalReg working grid {dsr_spacing:g} mm; nominal 1 mm spacing (true spacing unknown); "
                  "image centres aligned; central 160x160 crop"
                  + (f"; in-plane x{shrink} downsampled" if shrink > 1 else "")))
    return cases


def hands(data: Path, work: Path, scale: str) -> list[dict]:
    """FAIR hand X-rays: reference R (fixed) and template T (moving), 7 landmarks, pixel units."""
    images = shared_data.hands_pair(data).load()
    out = work / "inputs" / "hands"
    return [_case("hands", "hands", 2, "px", _write(images["fixed"], out / "fixed.mha"),
                  _write(images["moving"], out / "moving.mha"),
                  fixed_landmarks=_write_points(images["fixed_points"], out / "fixed_landmarks.csv"),
                  moving_landmarks=_write_points(images["moving_points"], out / "moving_landmarks.csv"), notes="128x128")]


def anhir(data: Path, work: Path, scale: str) -> list[dict]:
    """ANHIR histology stain pairs (HE fixed), landmarks in original pixels, rTRE = TRE / image diagonal."""
    root = data / "anhir"
    pairs = [("rat-kidney", "Rat-Kidney_HE", "Rat-Kidney_PanCytokeratin"),
             ("lesions", "Izd2-29-041-w35_HE", "Izd2-29-041-w35_proSPC")]
    if scale != "full":
        pairs = pairs[1:]
    shrink = {"full": 2, "quick": 4, "tiny": 8}[scale]
    cases = []
    for folder, f_name, m_name in pairs:
        name = f"anhir_{folder}"
        out = work / "inputs" / name
        f_full = shared_data.pixel_units(shared_data.grey(sitk.ReadImage(str(root / folder / f"{f_name}.jpg"))))
        m_full = shared_data.pixel_units(shared_data.grey(sitk.ReadImage(str(root / folder / f"{m_name}.jpg"))))
        f_pts = np.loadtxt(root / folder / f"{f_name}.csv", delimiter=",", skiprows=1, usecols=(1, 2), ndmin=2)
        m_pts = np.loadtxt(root / folder / f"{m_name}.csv", delimiter=",", skiprows=1, usecols=(1, 2), ndmin=2)
        n = min(len(f_pts), len(m_pts))
        diagonal = float(np.hypot(*f_full.GetSize()))
        cases.append(_case(
            name, "anhir", 2, "px", _write(_shrink(f_full, shrink), out / "fixed.mha"),
            _write(_shrink(m_full, shrink), out / "moving.mha"),
            fixed_landmarks=_write_points(f_pts[:n], out / "fixed_landmarks.csv"),
            moving_landmarks=_write_points(m_pts[:n], out / "moving_landmarks.csv"),
            diagonal=diagonal, notes=f"grey, downsampled x{shrink}; errors in original pixels"))
    return cases


def drive_pair(data: Path, number: int, shrink: int, seed: int, max_displacement: float = 8.0):
    """A DRIVE image with a known smooth deformation: ``(fixed, moving, true field, fixed vessels,
    moving vessels, fixed FOV)``; green channel, pixel units (original pixels)."""
    root = data / "drive" / "training"
    image = shared_data.pixel_units(shared_data.grey(sitk.ReadImage(str(root / f"{number:02d}_image.png")), channel=1))
    vessels = shared_data.pixel_units(sitk.Cast(sitk.ReadImage(str(root / f"{number:02d}_vessels.png")) > 0, sitk.sitkUInt8))
    fov = shared_data.pixel_units(sitk.Cast(sitk.ReadImage(str(root / f"{number:02d}_fov.png")) > 0, sitk.sitkUInt8))
    moving = _shrink(image, shrink)
    m_vessels = _shrink(vessels, shrink, labels=True)
    m_fov = _shrink(fov, shrink, labels=True)
    field = synthetic.random_smooth_field(moving, max_displacement, control_spacing=64.0, seed=seed)
    fixed = synthetic.deform(moving, field)
    f_vessels = synthetic.deform(m_vessels, field, labels=True)
    f_fov = sitk.BinaryErode(synthetic.deform(m_fov, field, labels=True), [2] * 2)
    return fixed, moving, field, f_vessels, m_vessels, f_fov


def drive(data: Path, work: Path, scale: str) -> list[dict]:
    """DRIVE fundus images with known synthetic deformations: end-point error and vessel Dice."""
    numbers = {"full": [21, 22], "quick": [21], "tiny": [21]}[scale]
    shrink = {"full": 1, "quick": 2, "tiny": 4}[scale]
    cases = []
    for k, number in enumerate(numbers):
        name = f"drive_{number:02d}"
        out = work / "inputs" / name
        fixed, moving, field, f_vessels, m_vessels, f_fov = drive_pair(data, number, shrink, seed=100 + k)
        cases.append(_case(
            name, "drive", 2, "px", _write(fixed, out / "fixed.mha"), _write(moving, out / "moving.mha"),
            true_field=_write(field, out / "true_field.mha"),
            fixed_labels=_write(f_vessels, out / "fixed_labels.nii.gz"),
            moving_labels=_write(m_vessels, out / "moving_labels.nii.gz"), label_ids=[1],
            eval_mask=_write(f_fov, out / "eval_mask.nii.gz"),
            notes=f"green channel, x{shrink} downsampled; random B-spline field, max 8 px"))
    return cases


_BUILDERS = dict(liver=liver, brain=brain, prostate=prostate, hands=hands, anhir=anhir, drive=drive)


def user_grids(cases: list[dict]) -> list[dict]:
    """The cases with DeepSalReg on ``register()``'s own working grid (what a user gets with no flags): the
    per-dataset ``dsr`` spacing is dropped and the note says so. Peers are unaffected (they never read ``dsr``).
    """
    out = []
    for case in cases:
        note = re.sub(r"DeepSalReg working grid [0-9.]+ mm", "DeepSalReg on its default working grid",
                      case.get("notes", ""))
        if "default working grid" not in note:
            note = (note + "; " if note else "") + "DeepSalReg on its default working grid"
        out.append({**case, "dsr": {}, "notes": note})
    return out


def prepare(data: Path, work: Path, scale: str = "full", datasets=DATASETS, log=print) -> list[dict]:
    """Write the inputs of every pair of ``datasets`` under ``work/inputs``; returns the cases.

    A dataset whose folder is missing is skipped with a printed reason.
    """
    data, work = Path(data), Path(work)
    folders = dict(liver="eth_liver", brain="brain_t1", prostate="promise12", hands="fair", anhir="anhir",
                   drive="drive")
    cases = []
    for name in datasets:
        if not (data / folders[name]).is_dir():
            log(f"  skipping {name}: {data / folders[name]} not found")
            continue
        cases += _BUILDERS[name](data, work, scale)
    return cases
