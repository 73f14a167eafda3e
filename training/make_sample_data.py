"""Make the sample image pairs shipped in ``DeepSalRegLib/sample_data`` from the shared data folder.

Usage (from the repository root)::

    python3 training/make_sample_data.py [--data ../shared/data] [--out DeepSalRegLib/sample_data]

2D pair (ITK examples, Apache-2.0): the BrainWeb proton-density slice and the same slice after ITK's
B-spline example warp, as grey uint8 NRRD with 1 mm pixels. The warped slice has a 20-pixel border,
so its origin is set to (-20, -20) mm: both images then share physical space and differ only by the warp.

3D pair: MNI ICBM152 2009a symmetric T1 (fixed; brain only in this release) and the brain-extracted
Colin27 T1 (moving), both resampled (linear) onto one 2.5 mm grid around the MNI brain (the MNI direction
kept; size a multiple of 8), intensities scaled linearly so that their 99.9th percentile is 255, uint8 NRRD.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from DeepSalRegLib.geometry import make_working_grid, resample_onto  # noqa: E402
from DeepSalRegLib.io import write_image  # noqa: E402

SOURCES = {
    "brainweb_pd_fixed.nrrd": "templates/itk_examples/BrainProtonDensitySlice.png",
    "brainweb_pd_bsplined_moving.nrrd": "templates/itk_examples/BrainProtonDensitySliceBSplined10.png",
    "mni152_t1_fixed.nrrd": "templates/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "colin27_t1_moving.nrrd": "templates/colin27_ch2bet.nii.gz",
}
SPACING_3D = 2.5  # mm
BRAIN_MARGIN = 5.0  # mm around the thresholded MNI brain


def _grey_uint8(path: Path, origin=(0.0, 0.0)) -> sitk.Image:
    """First channel of an ITK example picture (its RGB channels are equal), 1 mm pixels at ``origin``."""
    image = sitk.ReadImage(str(path))
    if image.GetNumberOfComponentsPerPixel() > 1:
        image = sitk.VectorIndexSelectionCast(image, 0)
    image = sitk.Cast(image, sitk.sitkUInt8)
    image.SetSpacing((1.0, 1.0))
    image.SetOrigin(origin)
    return image


def _to_uint8(image: sitk.Image) -> sitk.Image:
    """Linear scaling that puts the 99.9th percentile at 255 (the two templates differ in range), rounded."""
    top = float(np.percentile(sitk.GetArrayViewFromImage(image), 99.9))
    return sitk.Cast(sitk.Clamp(sitk.Round(image * (255.0 / top)), sitk.sitkFloat32, 0, 255), sitk.sitkUInt8)


def make_2d(data: Path, out: Path) -> list[Path]:
    fixed = _grey_uint8(data / SOURCES["brainweb_pd_fixed.nrrd"])
    moving = _grey_uint8(data / SOURCES["brainweb_pd_bsplined_moving.nrrd"], origin=(-20.0, -20.0))
    return [
        write_image(fixed, out / "brainweb_pd_fixed.nrrd"),
        write_image(moving, out / "brainweb_pd_bsplined_moving.nrrd"),
    ]


def make_3d(data: Path, out: Path) -> list[Path]:
    mni = sitk.ReadImage(str(data / SOURCES["mni152_t1_fixed.nrrd"]))
    colin = sitk.ReadImage(str(data / SOURCES["colin27_t1_moving.nrrd"]))
    brain = sitk.OtsuThreshold(mni, 0, 1)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(brain)
    box = stats.GetBoundingBox(1)  # index start (x, y, z) then size
    margin = [int(np.ceil(BRAIN_MARGIN / s)) for s in mni.GetSpacing()]
    start = [max(0, b - m) for b, m in zip(box[:3], margin)]
    stop = [min(n, b + s + m) for b, s, m, n in zip(box[:3], box[3:], margin, mni.GetSize())]
    region = sitk.RegionOfInterest(mni, [e - s for s, e in zip(start, stop)], start)
    grid = make_working_grid(region, multiple=8, spacing=SPACING_3D)
    return [
        write_image(_to_uint8(resample_onto(mni, grid)), out / "mni152_t1_fixed.nrrd"),
        write_image(_to_uint8(resample_onto(colin, grid)), out / "colin27_t1_moving.nrrd"),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="shared data folder")
    parser.add_argument("--out", type=Path, default=REPO / "DeepSalRegLib" / "sample_data", help="output folder")
    args = parser.parse_args(argv)
    for path in make_2d(args.data, args.out) + make_3d(args.data, args.out):
        image = sitk.ReadImage(str(path))
        print(f"{path.name}: size {image.GetSize()}, spacing {image.GetSpacing()}, {path.stat().st_size / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
