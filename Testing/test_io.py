"""io.py: file round-trips, RAS/LPS landmark conventions, transform files, atomic writes and one-line errors."""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DeepSalRegLib import io
from DeepSalRegLib.errors import InputError, OutputError
from DeepSalRegLib.geometry import displacement_image, voxel_field_to_physical

# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------

ROTATION_3D = np.array(
    [[0.8660254, -0.5, 0.0], [0.4330127, 0.75, -0.5], [0.25, 0.4330127, 0.8660254]]
)  # rotation about z by 30 deg, then about x by 30 deg


def volume(shape=(9, 11, 13), seed=0) -> sitk.Image:
    image = sitk.GetImageFromArray(np.random.default_rng(seed).random(shape).astype(np.float32) * 100)
    image.SetSpacing((0.7, 1.3, 2.5))
    image.SetOrigin((-12.0, 34.5, 7.25))
    image.SetDirection(ROTATION_3D.flatten().tolist())
    return image


def sinusoid_displacement(grid: sitk.Image, amplitude=3.0) -> sitk.Image:
    shape = tuple(reversed(grid.GetSize()))
    coords = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    nd = len(shape)
    u = np.stack([amplitude * np.sin(2 * np.pi * coords[(i + 1) % nd] / shape[(i + 1) % nd] + i) for i in range(nd)])
    return displacement_image(voxel_field_to_physical(u, grid), grid)


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message and message.endswith("."), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


# ----------------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz", ".nii", ".mha"])
def test_image_round_trip_keeps_geometry_and_values(tmp_path, ext):
    image = volume()
    path = io.write_image(image, tmp_path / "sub" / f"image{ext}")
    assert path.is_file() and leftovers(path.parent) == []
    back = io.read_image(path, "fixed image")
    assert back.GetSize() == image.GetSize() and back.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))


def test_compressed_formats_are_compressed(tmp_path):
    smooth = sitk.GetImageFromArray(np.zeros((20, 30, 40), dtype=np.float32))
    smooth[5, 5, 5] = 1.0
    assert b"gzip" in (io.write_image(smooth, tmp_path / "a.nrrd")).read_bytes()[:400]
    assert (io.write_image(smooth, tmp_path / "a.mha")).stat().st_size < 20 * 30 * 40
    assert (io.write_image(smooth, tmp_path / "a.nii.gz")).read_bytes()[:2] == b"\x1f\x8b"


def test_png_round_trip_and_colour_picture_reads_grey(tmp_path):
    grey = np.random.default_rng(1).integers(0, 255, (17, 23)).astype(np.uint8)
    back = io.read_image(io.write_image(sitk.GetImageFromArray(grey), tmp_path / "g.png"))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), grey)
    rgb = np.stack([grey, grey // 2, grey // 4], axis=-1)
    back = io.read_image(io.write_image(sitk.GetImageFromArray(rgb, isVector=True), tmp_path / "c.png"))
    expected = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(back), expected, rtol=1e-5)


def test_one_slice_volume_file_reads_as_2d(tmp_path):
    vol = sitk.GetImageFromArray(np.random.default_rng(2).random((1, 12, 14)).astype(np.float32))
    vol.SetSpacing((0.5, 0.6, 3.0))
    vol.SetOrigin((1.0, 2.0, 3.0))
    image = io.read_image(io.write_image(vol, tmp_path / "slice.nrrd"))
    assert image.GetDimension() == 2 and image.GetSize() == (14, 12)
    assert image.GetSpacing() == (0.5, 0.6) and image.GetOrigin() == (1.0, 2.0)


def write_dicom_series(folder: Path, image: sitk.Image) -> None:
    image = sitk.Cast(image, sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = "1.2.826.0.1.3680043.2.1125.1.42"
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        tags = {
            "0008|0060": "MR",
            "0020|000d": series + ".1",
            "0020|000e": series,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": f"{image.GetSpacing()[1]}\\{image.GetSpacing()[0]}",
        }
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)


def test_dicom_series_folder(tmp_path):
    array = (np.random.default_rng(3).random((6, 10, 12)) * 1000).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((-10.0, 20.0, 30.0))
    write_dicom_series(tmp_path, image)
    back = io.read_image(tmp_path, "moving image")
    assert back.GetSize() == (12, 10, 6)
    np.testing.assert_allclose(back.GetSpacing(), (0.8, 0.9, 2.5), atol=1e-4)
    np.testing.assert_allclose(back.GetOrigin(), (-10.0, 20.0, 30.0), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), array)


def test_label_image_keeps_integer_labels(tmp_path):
    labels = np.zeros((8, 9, 10), dtype=np.uint16)
    labels[2:5, 3:7, 1:9] = 1000
    back = io.read_label_image(io.write_image(sitk.GetImageFromArray(labels), tmp_path / "labels.nii.gz"))
    assert back.GetPixelID() == sitk.sitkUInt16
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), labels)
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0] = 1
    with pytest.raises(InputError, match="colour"):
        io.read_label_image(sitk.GetImageFromArray(rgb, isVector=True))


def test_read_image_accepts_sitk_images_and_validates_them():
    assert io.read_image(volume()).GetPixelID() == sitk.sitkFloat32
    with pytest.raises(InputError) as err:
        io.read_image(sitk.Image([10, 10], sitk.sitkUInt8), "fixed image")
    assert_one_line(err, "Fixed image", "constant")


def test_read_errors_are_one_line_input_errors(tmp_path):
    with pytest.raises(InputError) as err:
        io.read_image(tmp_path / "missing.nrrd", "fixed image")
    assert_one_line(err, "Fixed image", "missing.nrrd", "does not exist")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(InputError) as err:
        io.read_image(empty, "moving image")
    assert_one_line(err, "Moving image", "no DICOM")

    damaged = tmp_path / "damaged.nrrd"
    damaged.write_bytes(b"NRRD0004\nthis is not an image\n")
    with pytest.raises(InputError) as err:
        io.read_image(damaged)
    assert_one_line(err, "damaged.nrrd", "could not be read")

    four_d = sitk.GetImageFromArray(np.random.default_rng(0).random((2, 5, 6, 7)).astype(np.float32), isVector=False)
    assert four_d.GetDimension() == 4
    sitk.WriteImage(four_d, str(tmp_path / "4d.nrrd"))
    with pytest.raises(InputError) as err:
        io.read_image(tmp_path / "4d.nrrd", "fixed image")
    assert_one_line(err, "4D", "4d.nrrd")

    nan = np.ones((6, 6, 6), dtype=np.float32)
    nan[3, 3, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(tmp_path / "nan.nrrd"))
    with pytest.raises(InputError) as err:
        io.read_image(tmp_path / "nan.nrrd", "moving image")
    assert_one_line(err, "Moving image", "nan.nrrd", "NaN")

    sitk.WriteImage(sitk.GetImageFromArray(np.full((6, 6, 6), 5, dtype=np.uint8)), str(tmp_path / "flat.nrrd"))
    with pytest.raises(InputError) as err:
        io.read_image(tmp_path / "flat.nrrd")
    assert_one_line(err, "flat.nrrd", "constant")


# ----------------------------------------------------------------------------------------------------
# writing: destinations, atomicity
# ----------------------------------------------------------------------------------------------------


def test_unwritable_destination_is_output_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("I am a file, not a folder")
    with pytest.raises(OutputError) as err:
        io.write_image(volume(), blocker / "out" / "image.nrrd")
    assert_one_line(err, "a_file is a file, not a folder")
    with pytest.raises(OutputError):
        io.write_transform(sinusoid_displacement(volume()), blocker / "t.h5")
    with pytest.raises(OutputError):
        io.write_landmarks(np.zeros((2, 3)), blocker / "p.csv")
    (tmp_path / "folder.nrrd").mkdir()
    with pytest.raises(OutputError) as err:
        io.write_image(volume(), tmp_path / "folder.nrrd")  # a folder is not a file name
    assert_one_line(err, "is a folder")
    with pytest.raises(InputError, match="unknown extension"):
        io.write_image(volume(), tmp_path / "image.xyz")


def test_failed_write_keeps_the_existing_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "picture.png"
    io.write_image(sitk.GetImageFromArray(np.arange(64, dtype=np.uint8).reshape(8, 8)), target)
    before = target.read_bytes()
    with pytest.raises(OutputError) as err:  # PNG cannot hold float pixels: SimpleITK refuses mid-way
        io.write_image(volume(), target)
    assert_one_line(err, "picture.png")
    assert target.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_crash_during_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "image.nrrd"
    io.write_image(volume(seed=1), target)
    before = target.read_bytes()

    def crashing_writer(image, path, compress=False):
        Path(path).write_bytes(b"NRRD0004\npartial")  # half a file, then the disk fills up
        raise RuntimeError("ITK ERROR: No space left on device")

    monkeypatch.setattr(io.sitk, "WriteImage", crashing_writer)
    with pytest.raises(OutputError) as err:
        io.write_image(volume(seed=2), target)
    assert_one_line(err, "No space left on device")
    with pytest.raises(OutputError):
        io.write_image(volume(seed=2), tmp_path / "new.nrrd")
    assert target.read_bytes() == before
    assert not (tmp_path / "new.nrrd").exists()
    assert leftovers(tmp_path) == []


def test_check_output_path_refuses_inputs(tmp_path):
    source = tmp_path / "fixed.nrrd"
    io.write_image(volume(), source)
    link = tmp_path / "link.nrrd"
    link.symlink_to(source)
    with pytest.raises(OutputError) as err:
        io.check_output_path(source, [tmp_path / "moving.nrrd", source])
    assert_one_line(err, "also an input")
    with pytest.raises(OutputError):
        io.check_output_path(link, [source])
    with pytest.raises(OutputError):
        io.check_output_path(tmp_path / "x" / ".." / "fixed.nrrd", [str(source)])
    assert io.check_output_path(tmp_path / "out.nrrd", [source, volume()]) == tmp_path / "out.nrrd"


# ----------------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------------


def probe_points(grid: sitk.Image, n=40, seed=4) -> np.ndarray:
    """Physical points inside the grid, on and between voxel centres."""
    rng = np.random.default_rng(seed)
    size = np.array(grid.GetSize())
    index = rng.uniform(0, 1, (n, len(size))) * (size - 1)
    index[: n // 2] = np.round(index[: n // 2])
    return np.array([grid.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in index])


@pytest.mark.parametrize(
    "ext, tolerance",  # ITK files keep float64; displacement images are written as float32
    [(".h5", 1e-9), (".tfm", 1e-6), (".nrrd", 1e-4), (".mha", 1e-4), (".nii.gz", 1e-4), (".nii", 1e-4)],
)
def test_transform_files_round_trip(tmp_path, ext, tolerance):
    disp = sinusoid_displacement(volume(shape=(8, 10, 12)))
    original = sitk.DisplacementFieldTransform(sitk.Image(disp))
    path = io.write_transform(disp, tmp_path / f"transform{ext}")
    assert leftovers(tmp_path) == []
    back = io.read_transform(path)
    assert isinstance(back, sitk.DisplacementFieldTransform)
    points = probe_points(disp)
    expected = io.transform_points(original, points)
    assert np.abs(expected - points).max() > 1.0  # the transform really moves points
    np.testing.assert_allclose(io.transform_points(back, points), expected, atol=tolerance)


def test_h5_and_nrrd_move_points_identically_in_2d_and_3d(tmp_path):
    for name, grid in [("2d", sitk.Image([14, 11], sitk.sitkFloat32)), ("3d", volume(shape=(7, 9, 8)))]:
        if name == "2d":
            grid.SetSpacing((0.9, 1.4))
            grid.SetOrigin((5.0, -7.0))
            grid.SetDirection((0.6, -0.8, 0.8, 0.6))
        disp = sinusoid_displacement(grid)
        h5 = io.read_transform(io.write_transform(disp, tmp_path / f"{name}.h5"))
        nrrd = io.read_transform(io.write_transform(disp, tmp_path / f"{name}.nrrd"))
        points = probe_points(grid)
        np.testing.assert_allclose(io.transform_points(h5, points), io.transform_points(nrrd, points), atol=1e-4)


def test_field_image_headers_say_vector_field(tmp_path):
    disp = sinusoid_displacement(volume(shape=(5, 6, 7)))
    header = io.write_transform(disp, tmp_path / "f.nrrd").read_bytes().split(b"\n\n")[0].decode()
    assert "kinds: vector domain domain domain" in header and "space: left-posterior-superior" in header
    raw = gzip.open(io.write_transform(disp, tmp_path / "f.nii.gz")).read(348)
    assert struct.unpack("<h", raw[68:70])[0] == 1007  # NIFTI_INTENT_VECTOR, ITK/ANTs LPS displacement
    assert struct.unpack("<8h", raw[40:56])[:6] == (5, 7, 6, 5, 1, 3)  # x, y, z, t=1, 3 components


def test_other_transforms_and_transform_errors(tmp_path):
    affine = sitk.AffineTransform(3)
    affine.SetTranslation((1.0, -2.0, 3.0))
    back = io.read_transform(io.write_transform(affine, tmp_path / "affine.tfm"))
    np.testing.assert_allclose(back.TransformPoint((0.0, 0.0, 0.0)), (1.0, -2.0, 3.0))
    with pytest.raises(InputError, match="Only displacement fields"):
        io.write_transform(affine, tmp_path / "affine.nrrd")
    with pytest.raises(InputError) as err:
        io.write_transform(sinusoid_displacement(volume()), tmp_path / "t.xyz")
    assert_one_line(err, "unknown extension")
    with pytest.raises(InputError) as err:
        io.read_transform(tmp_path / "missing.h5")
    assert_one_line(err, "does not exist")
    io.write_image(volume(), tmp_path / "scalar.nrrd")
    with pytest.raises(InputError) as err:
        io.read_transform(tmp_path / "scalar.nrrd")
    assert_one_line(err, "not a displacement field")
    (tmp_path / "junk.h5").write_text("junk")
    with pytest.raises(InputError, match="could not be read"):
        io.read_transform(tmp_path / "junk.h5")


# ----------------------------------------------------------------------------------------------------
# landmarks
# ----------------------------------------------------------------------------------------------------

LPS = np.array([[10.5, -20.25, 30.0], [-1.0, 2.0, -3.125], [0.1, 0.2, 0.3]])
RAS = np.array([[-10.5, 20.25, 30.0], [1.0, -2.0, -3.125], [-0.1, -0.2, 0.3]])  # x and y negated


@pytest.mark.parametrize("ext", [".csv", ".fcsv", ".json", ".mrk.json"])
def test_landmark_round_trip(tmp_path, ext):
    path = io.write_landmarks(LPS, tmp_path / f"points{ext}", labels=["a", "b", "c"])
    points, labels = io.read_landmarks(path)
    np.testing.assert_allclose(points, LPS, atol=1e-12)
    assert labels == ["a", "b", "c"]
    assert leftovers(tmp_path) == []


def test_fcsv_is_written_in_ras_and_read_back_to_lps(tmp_path):
    path = io.write_landmarks(LPS, tmp_path / "points.fcsv")
    text = path.read_text()
    assert "# CoordinateSystem = RAS" in text
    rows = [line.split(",") for line in text.splitlines() if not line.startswith("#")]
    np.testing.assert_allclose(np.array([[float(v) for v in r[1:4]] for r in rows]), RAS)
    slicer_file = tmp_path / "slicer.fcsv"
    slicer_file.write_text(
        "# Markups fiducial file version = 4.11\n# CoordinateSystem = RAS\n"
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
        + "".join(f"{i},{r[0]},{r[1]},{r[2]},0,0,0,1,1,1,0,F-{i},,\n" for i, r in enumerate(RAS))
    )
    points, labels = io.read_landmarks(slicer_file)
    np.testing.assert_allclose(points, LPS)
    assert labels == ["F-0", "F-1", "F-2"]
    lps_file = tmp_path / "lps.fcsv"
    lps_file.write_text(slicer_file.read_text().replace("CoordinateSystem = RAS", "CoordinateSystem = LPS"))
    np.testing.assert_allclose(io.read_landmarks(lps_file)[0], RAS)  # taken as written


def test_markups_json_coordinate_systems(tmp_path):
    path = io.write_landmarks(LPS, tmp_path / "points.mrk.json")
    markup = json.loads(path.read_text())["markups"][0]
    assert markup["coordinateSystem"] == "LPS" and markup["type"] == "Fiducial"
    np.testing.assert_allclose([cp["position"] for cp in markup["controlPoints"]], LPS)
    for system, stored, expected in [("RAS", RAS, LPS), ("LPS", LPS, LPS), (None, LPS, LPS)]:
        control_points = [{"label": f"p{i}", "position": list(p)} for i, p in enumerate(stored)]
        doc = {"markups": [{"type": "Fiducial", "controlPoints": control_points}]}
        if system:
            doc["markups"][0]["coordinateSystem"] = system
        (tmp_path / "m.json").write_text(json.dumps(doc))
        points, labels = io.read_landmarks(tmp_path / "m.json")
        np.testing.assert_allclose(points, expected)
        assert labels == ["p0", "p1", "p2"]


def test_2d_landmarks(tmp_path):
    points2d = LPS[:, :2]
    back, labels = io.read_landmarks(io.write_landmarks(points2d, tmp_path / "p.csv"))
    np.testing.assert_allclose(back, points2d)
    assert labels == ["1", "2", "3"]
    via_slicer, _ = io.read_landmarks(io.write_landmarks(points2d, tmp_path / "p.fcsv"), nd=2)
    np.testing.assert_allclose(via_slicer, points2d)
    with pytest.raises(InputError, match="3D points are needed"):
        io.read_landmarks(tmp_path / "p.csv", nd=3)


def test_landmark_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(InputError) as err:
        io.read_landmarks(bad)
    assert_one_line(err, "x, y")
    bad.write_text("x,y,z\n1,2,three\n")
    with pytest.raises(InputError) as err:
        io.read_landmarks(bad)
    assert_one_line(err, "row 2", "not numbers")
    with pytest.raises(InputError, match="unknown extension"):
        io.read_landmarks(io.write_image(volume(), tmp_path / "v.nrrd"))
    with pytest.raises(InputError, match="does not exist"):
        io.read_landmarks(tmp_path / "none.csv")
    with pytest.raises(InputError, match="labels"):
        io.write_landmarks(LPS, tmp_path / "p.csv", labels=["only one"])
    with pytest.raises(InputError, match="unknown extension"):
        io.write_landmarks(LPS, tmp_path / "p.txt")


# ----------------------------------------------------------------------------------------------------
# landmark errors (TRE)
# ----------------------------------------------------------------------------------------------------


def test_tre_with_known_transforms(tmp_path):
    fixed = LPS
    moving = fixed + np.array([1.0, 2.0, 2.0])
    translation = sitk.TranslationTransform(3, (1.0, 2.0, 2.0))  # fixed -> moving
    np.testing.assert_allclose(io.target_registration_error(translation, fixed, moving), 0.0, atol=1e-12)
    np.testing.assert_allclose(io.target_registration_error(None, fixed, moving), 3.0)
    with pytest.raises(InputError, match="pair up"):
        io.target_registration_error(None, fixed, moving[:2])

    disp = sinusoid_displacement(volume(shape=(8, 10, 12)))
    tx = io.read_transform(io.write_transform(disp, tmp_path / "t.h5"))
    grid_points = probe_points(disp, n=10)
    mapped = io.transform_points(tx, grid_points)
    np.testing.assert_allclose(io.target_registration_error(tx, grid_points, mapped), 0.0, atol=1e-12)


@pytest.mark.shared_data
def test_liver_landmarks_initial_tre(shared_data):
    folder = shared_data / "eth_liver/dataset18"
    fixed, labels = io.read_landmarks(folder / "exhale_landmarks.csv")
    moving, _ = io.read_landmarks(folder / "cyc_1_10_landmarks.csv")
    assert fixed.shape == moving.shape and fixed.shape[1] == 3 and len(labels) == len(fixed) >= 50
    np.testing.assert_allclose(moving[0], [72.3943, 142.2360, 92.0])
    regions = io.read_landmark_columns(folder / "exhale_landmarks.csv")["region"]
    assert set(regions) == {"liver", "outside"} and len(regions) == len(fixed)
    initial = io.target_registration_error(None, fixed, moving).mean()
    assert 5.0 <= initial <= 16.0  # the data README: initial mean TRE 5-16 mm


@pytest.mark.shared_data
def test_fair_hand_pixel_landmarks(shared_data):
    moving = io.read_image(shared_data / "fair/hands-T.jpg", "moving image")
    fixed = io.read_image(shared_data / "fair/hands-R.jpg", "fixed image")
    table = shared_data / "fair/hands_landmarks_pixel_rc.csv"  # T_row, T_col, R_row, R_col
    moving_points, fixed_points = io.read_pixel_landmarks_rc(table, [moving, fixed])
    assert moving_points.shape == fixed_points.shape == (7, 2)
    np.testing.assert_allclose(moving_points[0], [35.238, 39.096])  # (row, col) -> (x = col, y = row)
    initial = io.target_registration_error(None, fixed_points, moving_points).mean()
    assert abs(initial - 21.7) < 0.1  # the data README: initial mean distance 21.7 px (1 px = 1 mm here)


# ----------------------------------------------------------------------------------------------------
# shipped sample data
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, nd", [("2d", 2), ("3d", 3)])
def test_sample_pairs_are_small_readable_and_overlap(kind, nd):
    from DeepSalRegLib.geometry import resample_onto
    from DeepSalRegLib.sample_data import sample_pair

    fixed_path, moving_path = sample_pair(kind)
    fixed, moving = io.read_image(fixed_path, "fixed image"), io.read_image(moving_path, "moving image")
    assert fixed.GetDimension() == moving.GetDimension() == nd
    assert fixed_path.stat().st_size < 400_000 and moving_path.stat().st_size < 400_000
    # Both live in one physical space: the moving image, resampled onto the fixed grid, correlates with it.
    a = sitk.GetArrayFromImage(fixed).ravel()
    b = sitk.GetArrayFromImage(resample_onto(moving, fixed)).ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.8  # 0.86 (2D), 0.93 (3D); a 15 mm shift drops both below 0.65
    with pytest.raises(InputError, match="choose one of"):
        sample_pair("4d")
