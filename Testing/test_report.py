"""report.py: the one-PNG summary of a registration.

End to end on the shipped 2D and 3D sample pairs (and a real anisotropic liver MRI pair when the shared
data is present): a valid, small PNG with every panel drawn and not blank, written atomically, with a
one-line ``OutputError`` for an unwritable destination. On synthetic volumes with known geometry: the
display orientation (radiological, independent of the header's index layout), the physical aspect ratio,
the direction of the deformation grid, and the folding marker.

Set ``DEEPSALREG_REPORT_DIR`` to also keep the sample reports there (to look at them).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from DeepSalRegLib import register, report
from DeepSalRegLib.errors import OutputError
from DeepSalRegLib.registration import RegistrationResult
from DeepSalRegLib.sample_data import sample_pair

REPORT_DIR = os.environ.get("DEEPSALREG_REPORT_DIR")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

IDENTITY = np.eye(3)
MNI = np.diag([-1.0, -1.0, 1.0])  # the 3D sample pair's header
# index 0 runs inferior, index 1 left, index 2 anterior (a scanner's sagittal-ish layout with flips)
PERMUTED = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [-1.0, 0.0, 0.0]])
_c, _s = np.cos(np.radians(15)), np.sin(np.radians(15))
OBLIQUE = np.array([[_c, -_s, 0.0], [_s, _c, 0.0], [0.0, 0.0, 1.0]]) @ PERMUTED
DIRECTIONS = {"identity": IDENTITY, "mni": MNI, "permuted": PERMUTED, "oblique": OBLIQUE}


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def physical_points(image: sitk.Image) -> np.ndarray:
    """Physical coordinates ``(*S, nd)`` (LPS mm) of every voxel of ``image`` (numpy order)."""
    nd = image.GetDimension()
    shape = tuple(reversed(image.GetSize()))
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")[::-1], -1)
    matrix = np.array(image.GetDirection()).reshape(nd, nd) @ np.diag(image.GetSpacing())
    return np.asarray(image.GetOrigin()) + index @ matrix.T


def blob_volume(direction: np.ndarray, offset_mm, size=(40, 44, 36), spacing=(1.5, 2.0, 2.5)) -> sitk.Image:
    """A Gaussian blob (sigma 6 mm) ``offset_mm`` (LPS) away from the centre of a volume with this header."""
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetDirection(direction.flatten().tolist())
    image.SetOrigin((10.0, -20.0, 30.0))
    points = physical_points(image)
    centre = points.reshape(-1, 3).mean(0)
    distance2 = ((points - centre - np.asarray(offset_mm)) ** 2).sum(-1)
    array = np.exp(-distance2 / (2 * 6.0**2)).astype(np.float32)
    result = sitk.GetImageFromArray(array)
    result.CopyInformation(image)
    return result


def constant_field(grid: sitk.Image, vector_mm) -> sitk.Image:
    shape = tuple(reversed(grid.GetSize()))
    field = sitk.GetImageFromArray(np.broadcast_to(np.asarray(vector_mm, float), (*shape, len(vector_mm))).copy(),
                                   isVector=True)
    field.CopyInformation(grid)
    return field


def scalar_like(grid: sitk.Image, array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))
    image.CopyInformation(grid)
    return image


def synthetic_result(fixed: sitk.Image, displacement_mm=None, jacobian=None) -> RegistrationResult:
    """A hand-made result (no registration): ``moving = warped = fixed``, constant displacement."""
    nd = fixed.GetDimension()
    array = sitk.GetArrayFromImage(fixed)
    return RegistrationResult(
        fixed=fixed, moving=fixed, transform=None, warped=fixed,
        displacement=constant_field(fixed, displacement_mm if displacement_mm is not None else [0.0] * nd),
        saliency=scalar_like(fixed, array / max(float(array.max()), 1e-6)),
        jacobian=scalar_like(fixed, jacobian if jacobian is not None else np.ones_like(array)),
        metrics=dict(model="synthetic", device="cpu", ncc_before=0.5, ncc_after=0.9, folding_fraction=0.0),
        timings=dict(total=1.0),
    )


def check_png(path: Path, min_size=(800, 500)) -> np.ndarray:
    """A real, small PNG with no temporary file beside it; returns its grey pixels."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert 30_000 < path.stat().st_size < 1_000_000, path.stat().st_size
    assert [p.name for p in path.parent.iterdir()] == [path.name], "temporary files left behind"
    with Image.open(path) as picture:
        picture.verify()
    with Image.open(path) as picture:
        assert picture.width >= min_size[0] and picture.height >= min_size[1], picture.size
        return np.asarray(picture.convert("L"), dtype=float)


def image_axes(figure):
    return [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]


def check_panels_drawn(figure, rows: int) -> None:
    """Every panel shows an image whose middle is not constant."""
    axes = image_axes(figure)
    assert len(axes) == (8 if rows == 2 else 8 * rows)  # 2D: one slice in two rows of four panels
    for ax in axes:
        images = ax.get_images()
        assert images, f"panel {ax.get_title()!r} is empty"
        data = np.ma.filled(np.ma.asarray(images[0].get_array(), dtype=float), np.nan)
        h, w = data.shape[:2]
        middle = data[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]
        assert np.nanstd(middle) > 1e-4, f"panel {ax.get_title()!r} / {ax.get_ylabel()!r} is blank"


def keep(path: Path, name: str) -> None:
    if REPORT_DIR:
        Path(REPORT_DIR).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(REPORT_DIR) / name)


def run_quietly(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "registering on a ... working grid" (coarser than the fixed image)
        return register(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------
# end to end on the sample pairs
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def result_2d():
    return run_quietly(*sample_pair("2d"), model="none", iterations=20, device="cpu")


@pytest.fixture(scope="module")
def result_3d():
    return run_quietly(*sample_pair("3d"), model="none", iterations=10, device="cpu", max_voxels=32**3)


def test_2d_report(result_2d, tmp_path):
    path = report.write_report(result_2d, tmp_path / "new folder" / "report.png")
    assert path == tmp_path / "new folder" / "report.png"
    pixels = check_png(path)
    h, w = pixels.shape
    assert pixels[h // 3 : 2 * h // 3, w // 4 : 3 * w // 4].std() > 20  # images, not an empty canvas
    keep(path, "report_2d.png")

    figure = report.render_report(result_2d)
    assert report.panel_titles(figure) == list(report.PANELS)  # 2D: two rows of four, every panel titled
    check_panels_drawn(figure, rows=2)
    title = figure._suptitle.get_text()
    assert "model: none" in title and "NCC" in title and "\u2192" in title and "folding" in title
    assert "TRE" not in title  # no landmarks given


def test_3d_report(result_3d, tmp_path):
    path = report.write_report(result_3d, tmp_path / "report.png")
    check_png(path, min_size=(1500, 700))
    keep(path, "report_3d.png")

    figure = report.render_report(result_3d)
    titles = report.panel_titles(figure)
    assert titles[:8] == list(report.PANELS) and titles[8:] == [""] * 16  # column titles on the first row
    rows = [ax.get_ylabel().split("\n")[0] for ax in image_axes(figure)[::8]]
    assert rows == ["Axial", "Coronal", "Sagittal"]
    check_panels_drawn(figure, rows=3)


def test_report_replaces_atomically(result_2d, tmp_path, monkeypatch):
    path = report.write_report(result_2d, tmp_path / "report.png")
    before = path.read_bytes()

    def broken(figure, temporary):
        Path(temporary).write_bytes(b"half a picture")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "_save_png", broken)
    with pytest.raises(OutputError, match="No space left on device"):
        report.write_report(result_2d, path)
    assert path.read_bytes() == before  # the old report is intact
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]  # and no temporary file is left


@pytest.mark.parametrize("where", ["under a file", "a folder"])
def test_unwritable_destination(result_2d, tmp_path, where):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    target = blocker / "report.png" if where == "under a file" else tmp_path
    with pytest.raises(OutputError) as error:
        report.write_report(result_2d, target)
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder"]


def test_import_is_light_and_rendering_leaves_pyplot_alone():
    """``import DeepSalRegLib`` pulls in neither matplotlib nor torch, and drawing a report never imports
    pyplot (so a host application's matplotlib backend, e.g. Slicer's, is left as it was)."""
    code = (
        "import sys, DeepSalRegLib\n"
        "assert 'matplotlib' not in sys.modules and 'torch' not in sys.modules\n"
        "from DeepSalRegLib import report\n"
        "assert 'matplotlib' not in sys.modules\n"
        "import SimpleITK as sitk, numpy as np\n"
        "from DeepSalRegLib.registration import RegistrationResult\n"
        "fixed = sitk.GetImageFromArray(np.random.default_rng(0).random((12, 16)).astype(np.float32))\n"
        "field = sitk.GetImageFromArray(np.zeros((12, 16, 2)), isVector=True)\n"
        "result = RegistrationResult(fixed, fixed, field, None, fixed, fixed, fixed + 1.0)\n"
        "report.render_report(result)\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# ----------------------------------------------------------------------------------------------------
# geometry of the display, on synthetic volumes
# ----------------------------------------------------------------------------------------------------

# blob offset (LPS mm) -> {view: (axis of the picture, expected sign of the centroid offset from the middle)}
# picture axis 0 = rows (down is +), 1 = columns (right is +). Radiological: patient left on the right.
ORIENTATION_CASES = [
    ("left", (18, 0, 0), {"Axial": (1, +1), "Coronal": (1, +1)}),
    ("posterior", (0, 18, 0), {"Axial": (0, +1), "Sagittal": (1, +1)}),
    ("superior", (0, 0, 18), {"Coronal": (0, -1), "Sagittal": (0, -1)}),
]


@pytest.mark.parametrize("header", DIRECTIONS)
@pytest.mark.parametrize("name, offset, expected", ORIENTATION_CASES, ids=[c[0] for c in ORIENTATION_CASES])
def test_display_orientation(header, name, offset, expected):
    image = blob_volume(DIRECTIONS[header], offset)
    orientation = report._Orientation.of(image)
    for view in report._views(orientation):
        if view.name not in expected:
            continue
        picture = view.picture(view.slab(image, orientation), orientation)
        assert picture.shape == (view.n_rows, view.n_cols)
        weights = picture - picture.min()
        axis, sign = expected[view.name]
        coordinate = np.arange(picture.shape[axis]) - (picture.shape[axis] - 1) / 2
        centroid = (weights.sum(1 - axis) * coordinate).sum() / weights.sum()
        assert np.sign(centroid) == sign and abs(centroid) > 2, (header, name, view.name, centroid)


@pytest.mark.parametrize("header", DIRECTIONS)
def test_deformation_grid_direction(header):
    """A constant displacement of +6 mm along L and +4 mm along S: every grid point p + d(p) lies 6 mm to
    the right (axial, coronal) and 4 mm higher (coronal, sagittal) than p in the panels."""
    image = blob_volume(DIRECTIONS[header], (0, 0, 0), size=(20, 22, 18))
    orientation = report._Orientation.of(image)
    field = constant_field(image, [6.0, 0.0, 4.0])
    expected = {"Axial": (6.0, 0.0), "Coronal": (6.0, -4.0), "Sagittal": (0.0, -4.0)}
    for view in report._views(orientation):
        x_mm, y_mm = view.mapped_mm(view.picture(view.slab(field, orientation), orientation), orientation)
        x0, y0 = view.centres()
        # oblique headers: the in-plane axes are the index axes nearest L/P/S, so allow the 15 degree tilt
        tolerance = 1e-6 if header != "oblique" else 1.7
        assert np.allclose(x_mm - x0, expected[view.name][0], atol=tolerance), view.name
        assert np.allclose(y_mm - y0, expected[view.name][1], atol=tolerance), view.name


def test_grid_moves_with_the_warped_image():
    """2D: the grid line of the moving image at x = c is drawn where the warped image shows moving's x = c."""
    moving = sitk.Image([60, 50], sitk.sitkFloat32)
    moving.SetSpacing((0.8, 1.2))
    array = np.zeros((50, 60), np.float32)
    array[:, 30] = 1.0  # a bright column at x = 30 * 0.8 = 24 mm
    moving = scalar_like(moving, array)
    field = constant_field(moving, [4.0, 0.0])  # fixed p -> moving p + 4 mm: content moves 4 mm left
    warped = sitk.Resample(moving, moving, sitk.DisplacementFieldTransform(sitk.Image(field)),
                           sitk.sitkLinear, 0.0)
    orientation = report._Orientation.of(moving)
    view = report._views(orientation)[0]
    x_mm, _ = view.mapped_mm(view.picture(field, orientation), orientation)
    column = sitk.GetArrayFromImage(warped)[25]
    bright_mm = (np.argmax(column) + 0.5) * 0.8  # where the warped picture shows the bright column
    level = (30 + 0.5) * 0.8  # moving's line through that column, in panel mm
    line_mm = np.interp(level, x_mm[25], (np.arange(60) + 0.5) * 0.8)  # where its grid contour is drawn
    assert bright_mm == pytest.approx(line_mm, abs=1e-6)
    assert line_mm == pytest.approx(level - 4.0)


def test_physical_aspect_of_anisotropic_volume():
    """1.37 x 1.37 x 4 mm voxels (the liver MRI): every panel's drawn box has the slice's mm proportions."""
    fixed = blob_volume(IDENTITY, (8, 0, 0), size=(50, 60, 12), spacing=(1.37, 1.37, 4.0))
    figure = report.render_report(synthetic_result(fixed, [2.0, 0.0, 0.0]))
    figure.draw_without_rendering()
    expected = {"Axial": 60 * 1.37 / (50 * 1.37), "Coronal": 12 * 4.0 / (50 * 1.37), "Sagittal": 12 * 4.0 / (60 * 1.37)}
    axes = image_axes(figure)
    for row, name in enumerate(["Axial", "Coronal", "Sagittal"]):
        for ax in axes[8 * row : 8 * row + 8]:
            box = ax.get_window_extent()
            assert box.height / box.width == pytest.approx(expected[name], rel=0.03), (name, ax.get_title())
            image = ax.get_images()[0]
            assert image.get_extent()[1] == pytest.approx(fixed.GetSize()[0 if name != "Sagittal" else 1] * 1.37)


def test_folding_is_marked(tmp_path):
    fixed = blob_volume(MNI, (0, 0, 0), size=(24, 28, 20))
    jacobian = np.ones(tuple(reversed(fixed.GetSize())), np.float32)
    jacobian[8:12, 12:15, 10:13] = -0.3  # a small folded region through the middle slices
    path = report.write_report(synthetic_result(fixed, jacobian=jacobian), tmp_path / "report.png")
    with Image.open(path) as picture:
        pixels = np.asarray(picture.convert("RGB"), dtype=int)
    green = np.array([int(report._FOLD_COLOUR[i : i + 2], 16) for i in (1, 3, 5)])
    assert (np.abs(pixels - green).sum(-1) < 30).sum() > 50  # the marker survives the palette PNG


# ----------------------------------------------------------------------------------------------------
# real data: anisotropic liver MRI with landmarks
# ----------------------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_liver_report_with_landmarks(shared_data, tmp_path):
    folder = shared_data / "eth_liver" / "dataset18"
    result = run_quietly(folder / "exhale.mha", folder / "cyc_1_10.mha", model="none", iterations=10,
                         device="cpu", max_voxels=48**3,
                         fixed_landmarks=folder / "exhale_landmarks.csv",
                         moving_landmarks=folder / "cyc_1_10_landmarks.csv")
    path = report.write_report(result, tmp_path / "report.png")
    check_png(path, min_size=(1500, 500))
    keep(path, "report_liver.png")
    figure = report.render_report(result)
    assert "TRE (mean of" in figure._suptitle.get_text()
    figure.draw_without_rendering()
    coronal = image_axes(figure)[8]  # 25 slices of 4 mm under 166 columns of 1.37 mm: a wide, low panel
    box = coronal.get_window_extent()
    assert box.height / box.width == pytest.approx(25 * 4.0 / (166 * 1.36719), rel=0.03)
