"""Readers of the shared data folder (``../shared/data``; sources, licences and protocols in its README).

One place knows the layout of the datasets that several faces read (liver, brain, prostate, hands; the
benchmark alone reads ANHIR and DRIVE, in ``datasets.py``): which files form a pair, where the landmarks and label maps are and how
they are read. Each reader returns :class:`SharedPair` objects whose ``load()`` reads the files only when
called, and returns a dict with the keys

* ``fixed``, ``moving``: SimpleITK images as stored (float32 grey; 2D pictures converted to grey);
* ``fixed_points``, ``moving_points``: physical landmarks (LPS, mm; pixels for 2D pictures), row k of one
  corresponding to row k of the other; ``landmark_regions`` where the dataset labels them;
* ``fixed_labels``, ``moving_labels``, ``label_values``: label maps and the labels to score.

The faces that prepare their own variant of a pair (the benchmark downsamples and crops, the model
evaluation centres prostate pairs) start from these readers. Used by ``training/evaluate.py --suite shared``,
``benchmarks/datasets.py`` and ``benchmarks/missing_3d.py``.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from DeepSalRegLib import io

__all__ = ["SharedPair", "liver_pairs", "brain_pairs", "brain_subject", "brain_label_values", "prostate_ids",
           "prostate_case", "prostate_pairs", "hands_pair", "grey", "pixel_units"]


@dataclass
class SharedPair:
    """One pair of a dataset; ``load()`` returns its images, landmarks and labels (keys in the module doc)."""

    dataset: str
    name: str
    ndim: int
    loader: Callable[[], dict]

    def load(self) -> dict:
        return self.loader()


def grey(image: sitk.Image, channel: int | None = None) -> sitk.Image:
    """Float32 scalar image: one channel (``channel``) or the luminance of a colour picture."""
    if image.GetNumberOfComponentsPerPixel() > 1:
        if channel is not None:
            image = sitk.VectorIndexSelectionCast(image, channel, sitk.sitkFloat32)
        else:
            chans = [sitk.VectorIndexSelectionCast(image, i, sitk.sitkFloat32) for i in range(3)]
            image = 0.299 * chans[0] + 0.587 * chans[1] + 0.114 * chans[2]
    return sitk.Cast(image, sitk.sitkFloat32)


def pixel_units(image: sitk.Image) -> sitk.Image:
    """Pictures in pixel units: spacing 1, origin 0 (JPEG and PNG headers carry arbitrary DPI spacings)."""
    image = sitk.Image(image)
    image.SetSpacing([1.0] * image.GetDimension())
    image.SetOrigin([0.0] * image.GetDimension())
    return image


def _float(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path), sitk.sitkFloat32)


# --------------------------------------------------------------------------------------------------
# ETH 4D-MRI liver: exhale (fixed) against other breathing states, landmarks labelled inside/outside the liver
# --------------------------------------------------------------------------------------------------


def liver_pairs(root: Path) -> list[SharedPair]:
    base = Path(root) / "eth_liver"
    with open(base / "pairs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    pairs = []
    for row in rows:
        def load(row=row):
            return dict(fixed=_float(base / row["fixed"]), moving=_float(base / row["moving"]),
                        fixed_points=io.read_landmarks(base / row["fixed_landmarks"], 3)[0],
                        moving_points=io.read_landmarks(base / row["moving_landmarks"], 3)[0],
                        landmark_regions=io.read_landmark_columns(base / row["fixed_landmarks"]).get("region"))
        name = row["moving"].replace("/", "_").replace(".mha", "")
        pairs.append(SharedPair("liver", name, 3, load))
    return pairs


# --------------------------------------------------------------------------------------------------
# two T1 brains with FreeSurfer-style label maps, Dice over the listed evaluation labels
# --------------------------------------------------------------------------------------------------


def brain_subject(root: Path, subject: str, labels: bool = False) -> sitk.Image:
    """Subject ``"A"`` or ``"B"``: the T1 image (float32) or its label map."""
    base = Path(root) / "brain_t1"
    if labels:
        return sitk.ReadImage(str(base / f"subject{subject}_aseg.nii.gz"))
    return _float(base / f"subject{subject}_t1.nii.gz")


def brain_label_values(root: Path) -> list[int]:
    text = (Path(root) / "brain_t1" / "eval_labels.txt").read_text()
    return [int(v) for v in text.split() if v.strip().lstrip("-").isdigit()]


def brain_pairs(root: Path, directions=(("A", "B"), ("B", "A"))) -> list[SharedPair]:
    """Fixed/moving subject pairs, named ``"A<-B"`` (fixed A, moving B)."""
    pairs = []
    for f, m in directions:
        def load(f=f, m=m):
            return dict(fixed=brain_subject(root, f), moving=brain_subject(root, m),
                        fixed_labels=brain_subject(root, f, True), moving_labels=brain_subject(root, m, True),
                        label_values=brain_label_values(root))
        pairs.append(SharedPair("brain", f"{f}<-{m}", 3, load))
    return pairs


# --------------------------------------------------------------------------------------------------
# PROMISE12 prostate T2 MRI with gland masks (label 1)
# --------------------------------------------------------------------------------------------------


def prostate_ids(root: Path) -> list[int]:
    """Case numbers present in the folder, ascending."""
    names = (p.name.split("_")[0] for p in (Path(root) / "promise12").glob("case*_t2.nii.gz"))
    return sorted(int(n[4:]) for n in names if n[4:].isdigit())


def prostate_case(root: Path, number: int, labels: bool = False) -> sitk.Image:
    """The T2 image (float32) of one case, or its gland mask as uint8 0/1."""
    base = Path(root) / "promise12"
    if labels:
        return sitk.Cast(sitk.ReadImage(str(base / f"case{number:02d}_prostate.nii.gz")) > 0, sitk.sitkUInt8)
    return _float(base / f"case{number:02d}_t2.nii.gz")


def prostate_pairs(root: Path, numbers: list[tuple[int, int]]) -> list[SharedPair]:
    """Inter-subject pairs ``(fixed, moving)`` as stored (no centring: the faces choose)."""
    pairs = []
    for a, b in numbers:
        def load(a=a, b=b):
            return dict(fixed=prostate_case(root, a), moving=prostate_case(root, b),
                        fixed_labels=prostate_case(root, a, True), moving_labels=prostate_case(root, b, True),
                        label_values=[1])
        pairs.append(SharedPair("prostate", f"case{a:02d}<-case{b:02d}", 3, load))
    return pairs


# --------------------------------------------------------------------------------------------------
# FAIR hand X-rays: reference R (fixed) and template T (moving), 7 landmarks, pixel units
# --------------------------------------------------------------------------------------------------


def hands_pair(root: Path) -> SharedPair:
    base = Path(root) / "fair"

    def load():
        fixed, moving = (pixel_units(grey(sitk.ReadImage(str(base / f"hands-{k}.jpg")))) for k in "RT")
        moving_points, fixed_points = io.read_pixel_landmarks_rc(base / "hands_landmarks_pixel_rc.csv", [moving, fixed])
        return dict(fixed=fixed, moving=moving, fixed_points=np.asarray(fixed_points), moving_points=np.asarray(moving_points))
    return SharedPair("hands", "R<-T", 2, load)
