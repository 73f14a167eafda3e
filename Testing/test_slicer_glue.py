"""Tier B: the MRML glue (``DeepSalRegLib.slicer_glue``) against real MRML from the ``slicer-core`` wheel.

Every check compares the glue with an independent reference: SimpleITK's own geometry and transforms,
Slicer's own readers and writers (volume, transform and markups storage nodes), or hand-computed numbers.
Needs ``pip install slicer-core==5.12.4.0 vtk==9.6.0``; skipped otherwise (a different PyPI package is also
called ``slicer``, hence the ``vtkMRMLScene`` check).
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core==5.12.4.0 vtk==9.6.0)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core (no vtkMRMLScene); "
                "pip install slicer-core==5.12.4.0 vtk==9.6.0", allow_module_level=True)

import vtk  # noqa: E402  (comes with slicer-core)

from DeepSalRegLib import io, slicer_glue as glue  # noqa: E402
from DeepSalRegLib.errors import InputError  # noqa: E402

FLIP = np.array([-1.0, -1.0, 1.0])


# ---------------------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def scene(monkeypatch):
    """A fresh MRML scene, also set as ``slicer.mrmlScene`` for the ``slicer.util`` functions."""
    mrml = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", mrml, raising=False)
    yield mrml
    mrml.Clear(1)


def rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_image(size=(11, 9, 7), spacing=(1.5, 0.8, 2.5), origin=(12.0, -30.0, 44.0), angles=(0.2, -0.35, 0.5),
                  dtype=np.int16, seed=0):
    """A 3D image with anisotropic spacing, an off-centre origin and an oblique (rotated) direction."""
    array = np.random.default_rng(seed).integers(-1000, 1000, size=size[::-1]).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(rotation(*angles).ravel().tolist())
    return image


def planar_image(size=(13, 10), spacing=(0.7, 1.3), origin=(5.0, -8.0), angle=0.4):
    array = np.random.default_rng(1).random(size[::-1]).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    c, s = np.cos(angle), np.sin(angle)
    image.SetDirection((c, -s, s, c))
    return image


def smooth_field(reference: sitk.Image) -> sitk.Image:
    """A known, smooth, non-uniform LPS displacement field (mm) on ``reference``'s grid."""
    nd = reference.GetDimension()
    index = np.meshgrid(*[np.arange(n, dtype=float) for n in reference.GetSize()[::-1]], indexing="ij")[::-1]  # i, j[, k]
    components = [2.0 * np.sin(index[0] / 3.0) + 0.5, -1.5 * np.cos(index[1] / 4.0), 0.8 * np.sin(index[-1] / 2.0 + 1)]
    field = np.stack(components[:nd], axis=-1)
    image = sitk.GetImageFromArray(field, isVector=True)
    image.CopyInformation(reference)
    return image


def interior_points(image: sitk.Image, count=12, seed=3) -> np.ndarray:
    """Random LPS points strictly inside the grid (between voxel centres, away from the border)."""
    rng = np.random.default_rng(seed)
    size = np.asarray(image.GetSize())
    continuous = rng.uniform(1.0, size - 2.0, size=(count, image.GetDimension()))
    return np.array([image.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in continuous])


def ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def assert_same_geometry(a: sitk.Image, b: sitk.Image):
    assert a.GetDimension() == b.GetDimension()
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def transform_ras(node, points_ras, inverse=False) -> np.ndarray:
    transform = node.GetTransformToParent() if inverse else node.GetTransformFromParent()
    return np.array([transform.TransformPoint(p.tolist()) for p in points_ras])


# ---------------------------------------------------------------------------------------------------------
# volumes
# ---------------------------------------------------------------------------------------------------------


def test_volume_node_puts_every_voxel_where_simpleitk_does(scene):
    image = oblique_image()
    node = glue.image_to_volume_node(image, scene, "oblique")
    matrix = ijk_to_ras(node)
    for ijk in [(0, 0, 0), (10, 8, 6), (3, 7, 2), (5, 0, 6)]:
        ras = matrix @ np.array([*ijk, 1.0])
        lps = np.asarray(image.TransformIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose(ras[:3], FLIP * lps, atol=1e-9)
    # the voxels as Slicer's own array accessor sees them (k, j, i order)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), sitk.GetArrayFromImage(image))


@pytest.mark.parametrize(
    "make",
    [
        lambda: oblique_image(),
        lambda: oblique_image(dtype=np.float32, angles=(0, 0, np.pi / 2)),
        lambda: planar_image(),
    ],
    ids=["3d-int16-oblique", "3d-float32-rotated", "2d-float32"],
)
def test_volume_round_trip_keeps_voxels_type_and_geometry(scene, make):
    image = make()
    back = glue.volume_node_to_image(glue.image_to_volume_node(image, scene))
    assert_same_geometry(back, image)
    assert back.GetPixelID() == image.GetPixelID()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_colour_image_becomes_a_vector_volume_and_comes_back(scene):
    rgb = np.random.default_rng(2).integers(0, 255, size=(6, 8, 3)).astype(np.uint8)
    image = sitk.GetImageFromArray(rgb, isVector=True)
    image.SetSpacing((0.5, 0.25))
    node = glue.image_to_volume_node(image, scene)
    assert node.IsA("vtkMRMLVectorVolumeNode")
    back = glue.volume_node_to_image(node)
    assert back.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), rgb)


def test_slicer_writes_our_volume_as_the_same_image(scene, tmp_path):
    """Slicer's NRRD writer, fed by the glue's node, gives back the original image (independent check)."""
    image = oblique_image()
    node = glue.image_to_volume_node(image, scene)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "written_by_slicer.nrrd"))
    assert storage.WriteData(node)
    written = sitk.ReadImage(str(tmp_path / "written_by_slicer.nrrd"))
    assert_same_geometry(written, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(image))


def test_volume_read_by_slicer_becomes_the_same_image(scene, tmp_path):
    """A file read by Slicer's own reader converts to what SimpleITK reads from that file."""
    image = oblique_image(dtype=np.float32, seed=5)
    sitk.WriteImage(image, str(tmp_path / "input.nrrd"))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "input.nrrd"))
    assert storage.ReadData(node)
    converted = glue.volume_node_to_image(node)
    assert_same_geometry(converted, image)
    np.testing.assert_allclose(sitk.GetArrayFromImage(converted), sitk.GetArrayFromImage(image))


def test_2d_image_is_one_slice_at_the_requested_height(scene):
    image = planar_image()
    node = glue.image_to_volume_node(image, scene, z_ras=-7.5)
    assert node.GetImageData().GetDimensions() == (13, 10, 1)
    matrix = ijk_to_ras(node)
    ras = matrix @ np.array([4.0, 3.0, 0.0, 1.0])
    lps = image.TransformIndexToPhysicalPoint((4, 3))
    np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], -7.5], atol=1e-9)
    assert glue.volume_node_to_image(node).GetDimension() == 2
    assert glue.volume_node_to_image(node, dimension=3).GetDimension() == 3


def test_oblique_single_slice_is_not_taken_for_a_2d_image(scene):
    image = oblique_image(size=(8, 6, 1))
    assert glue.volume_node_to_image(glue.image_to_volume_node(image, scene)).GetDimension() == 3
    with pytest.raises(InputError):
        glue.volume_node_to_image(glue.image_to_volume_node(image, scene), dimension=2)


def test_empty_volume_is_an_input_error(scene):
    with pytest.raises(InputError, match="no image data"):
        glue.volume_node_to_image(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty"))


# ---------------------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [oblique_image, planar_image], ids=["3d-oblique", "2d-rotated"])
def test_transform_node_maps_points_exactly_as_simpleitk(scene, make):
    """Fixed point p (LPS) -> p + d(p): SimpleITK in LPS, the node's "from parent" transform in RAS."""
    reference = make()
    field = smooth_field(reference)
    sitk_transform = sitk.DisplacementFieldTransform(sitk.Image(field))
    node = glue.displacement_to_transform_node(field, scene, name="field", z_ras=3.0)

    points = interior_points(reference)
    expected = np.array([sitk_transform.TransformPoint(p.tolist()) for p in points])
    ras = glue.lps_to_ras(points)
    if reference.GetDimension() == 2:
        ras[:, 2] = 3.0
    mapped = transform_ras(node, ras)
    np.testing.assert_allclose(glue.ras_to_lps(mapped, reference.GetDimension()), expected, atol=1e-4)
    # and it really moves them (the test cannot pass with an identity transform)
    assert np.abs(expected - points).max() > 0.5
    # the other way: Slicer's inverse ("to parent", the modelling direction, how the moving volume is shown
    # in fixed space) brings the moving points back; VTK inverts grids iteratively to ~0.01 mm
    expected_ras = glue.lps_to_ras(expected)
    expected_ras[:, 2] = mapped[:, 2]  # 2D: the slice height stays
    np.testing.assert_allclose(transform_ras(node, expected_ras, inverse=True), ras, atol=1e-2)


def test_transform_node_is_a_from_parent_grid_transform(scene):
    node = glue.displacement_to_transform_node(smooth_field(oblique_image()), scene)
    assert node.GetTransformFromParent().IsA("vtkOrientedGridTransform")
    assert not node.IsLinear()


@pytest.mark.parametrize("filename", ["transform.h5", "displacement.nrrd", "displacement.mha"])
def test_library_transform_file_means_the_same_in_slicer(scene, tmp_path, filename):
    """A transform written by the library and read by Slicer's own reader maps points as SimpleITK does."""
    reference = oblique_image()
    field = smooth_field(reference)
    path = io.write_transform(field, tmp_path / filename)
    node = glue.load_transform_file(path, scene)
    library_transform = io.read_transform(path)
    points = interior_points(reference, seed=11)
    expected = np.array([library_transform.TransformPoint(p.tolist()) for p in points])
    np.testing.assert_allclose(glue.ras_to_lps(transform_ras(node, glue.lps_to_ras(points))), expected, atol=1e-3)
    # the glue's own node, built from the same field, agrees with Slicer's reading of the file
    own = glue.displacement_to_transform_node(field, scene)
    np.testing.assert_allclose(transform_ras(own, glue.lps_to_ras(points)), transform_ras(node, glue.lps_to_ras(points)),
                               atol=1e-3)


def test_transform_node_samples_back_to_the_same_field(scene):
    reference = oblique_image()
    field = smooth_field(reference)
    node = glue.displacement_to_transform_node(field, scene)
    sampled = glue.transform_node_to_displacement(node, reference)
    assert_same_geometry(sampled, reference)
    np.testing.assert_allclose(sitk.GetArrayFromImage(sampled), sitk.GetArrayFromImage(field), atol=1e-5)


def test_linear_transform_node_samples_to_its_lps_displacement(scene):
    """Any Slicer transform becomes a library field: a rigid "from parent" transform, checked by hand in LPS."""
    reference = oblique_image(size=(5, 4, 3))
    rotation_ras = rotation(0.1, 0.0, 0.3)
    translation_ras = np.array([4.0, -2.0, 7.0])
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, rotation_ras[r, c])
        matrix.SetElement(r, 3, translation_ras[r])
    node = scene.AddNewNodeByClass("vtkMRMLTransformNode")
    node.SetMatrixTransformFromParent(matrix)
    field = glue.transform_node_to_displacement(node, reference)
    p = np.asarray(reference.TransformIndexToPhysicalPoint((3, 2, 1)))
    q_ras = rotation_ras @ (FLIP * p) + translation_ras
    d = sitk.GetArrayFromImage(field)[1, 2, 3]
    np.testing.assert_allclose(d, FLIP * q_ras - p, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# landmarks
# ---------------------------------------------------------------------------------------------------------


def test_landmarks_land_on_the_voxels_they_name(scene):
    """A landmark at the physical point of voxel (i, j, k) sits on that voxel of the volume node."""
    image = oblique_image()
    volume = glue.image_to_volume_node(image, scene)
    voxels = [(0, 0, 0), (10, 8, 6), (4, 2, 5)]
    points = np.array([image.TransformIndexToPhysicalPoint(v) for v in voxels])
    markups = glue.landmarks_to_markups(points, scene, labels=["a", "b", "c"])
    matrix = ijk_to_ras(volume)
    for n, voxel in enumerate(voxels):
        np.testing.assert_allclose(markups.GetNthControlPointPosition(n), (matrix @ [*voxel, 1.0])[:3], atol=1e-9)
    back, labels = glue.markups_to_landmarks(markups)
    np.testing.assert_allclose(back, points, atol=1e-9)
    assert labels == ["a", "b", "c"]


@pytest.mark.parametrize("extension, storage_class", [(".fcsv", "vtkMRMLMarkupsFiducialStorageNode"),
                                                      (".mrk.json", "vtkMRMLMarkupsJsonStorageNode")])
def test_csv_landmarks_become_the_markups_slicer_reads_from_the_same_points(scene, tmp_path, extension, storage_class):
    """CSV landmarks (LPS) via the glue == Slicer's own reader of the same points in its formats (RAS/LPS)."""
    points = np.array([[75.76, 159.07, 84.0], [135.4, 170.13, 84.0], [-12.5, 3.25, -40.0]])
    io.write_landmarks(points, tmp_path / "points.csv", ["p1", "p2", "p3"])
    io.write_landmarks(points, tmp_path / f"points{extension}", ["p1", "p2", "p3"])
    read_points, labels = io.read_landmarks(tmp_path / "points.csv")
    ours = glue.landmarks_to_markups(read_points, scene, labels)

    theirs = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    storage = getattr(slicer, storage_class)()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / f"points{extension}"))
    assert storage.ReadData(theirs)
    assert theirs.GetNumberOfControlPoints() == ours.GetNumberOfControlPoints() == 3
    for n in range(3):
        np.testing.assert_allclose(ours.GetNthControlPointPosition(n), theirs.GetNthControlPointPosition(n), atol=1e-9)
        assert ours.GetNthControlPointLabel(n) == theirs.GetNthControlPointLabel(n)
    np.testing.assert_allclose(ours.GetNthControlPointPosition(0), [-75.76, -159.07, 84.0])


def test_2d_landmarks_get_the_slice_height_and_lose_it_again(scene):
    points = np.array([[1.0, 2.0], [-3.5, 4.25]])
    markups = glue.landmarks_to_markups(points, scene, z_ras=6.0)
    np.testing.assert_allclose(markups.GetNthControlPointPosition(1), [3.5, -4.25, 6.0])
    back, labels = glue.markups_to_landmarks(markups, dimension=2)
    np.testing.assert_allclose(back, points)
    assert labels == ["1", "2"]


def test_markups_are_read_in_local_coordinates(scene):
    """Moving landmarks placed under the result transform still give their moving-space positions."""
    markups = glue.landmarks_to_markups(np.array([[10.0, 20.0, 30.0]]), scene)
    shift = scene.AddNewNodeByClass("vtkMRMLTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 50.0)
    shift.SetMatrixTransformToParent(matrix)
    markups.SetAndObserveTransformNodeID(shift.GetID())
    world = [0.0, 0.0, 0.0]
    markups.GetNthControlPointPositionWorld(0, world)
    assert world[0] == pytest.approx(-10.0 + 50.0)
    np.testing.assert_allclose(glue.markups_to_landmarks(markups)[0], [[10.0, 20.0, 30.0]])


def test_tre_table_lists_each_point_and_the_mean(scene):
    table = glue.tre_to_table(scene, [4.0, 6.0, 11.0], [1.0, 0.5, 3.0], labels=["a", "b", "c"])
    assert table.GetNumberOfRows() == 4 and table.GetNumberOfColumns() == 3
    assert [table.GetColumnName(c) for c in range(3)] == ["Point", "Before (mm)", "After (mm)"]
    assert [table.GetCellText(r, 0) for r in range(4)] == ["a", "b", "c", "mean"]
    assert float(table.GetCellText(3, 1)) == pytest.approx(7.0)
    assert float(table.GetCellText(3, 2)) == pytest.approx(1.5)
    assert float(table.GetCellText(1, 2)) == pytest.approx(0.5)
    with pytest.raises(InputError):
        glue.tre_to_table(scene, [1.0, 2.0], [1.0])


# ---------------------------------------------------------------------------------------------------------
# display
# ---------------------------------------------------------------------------------------------------------


def test_transform_is_shown_as_a_grid_in_the_slice_views(scene):
    fixed = glue.image_to_volume_node(oblique_image(size=(40, 30, 20), spacing=(1.0, 1.0, 3.0)), scene)
    node = glue.displacement_to_transform_node(smooth_field(glue.volume_node_to_image(fixed)), scene)
    display = glue.show_transform_grid(node, region=fixed)
    assert display is node.GetDisplayNode() and display.IsA("vtkMRMLTransformDisplayNode")
    assert display.GetVisualizationMode() == slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID
    assert display.GetVisibility2D() and not display.GetVisibility3D()
    assert display.GetRegionNode() is fixed
    assert display.GetGridSpacingMm() == pytest.approx(5.0)  # largest extent 60 mm / 12
    assert glue.show_transform_grid(node, spacing_mm=7.5).GetGridSpacingMm() == 7.5


def _colour(scene, node_id, index):
    table = scene.GetNodeByID(node_id)
    rgba = [0.0, 0.0, 0.0, 0.0]
    table.GetColor(index, rgba)
    return np.array(rgba[:3])


def test_saliency_is_an_inferno_overlay_on_the_fixed_volume(scene):
    fixed = glue.image_to_volume_node(oblique_image(), scene, "fixed")
    saliency_image = sitk.Cast(sitk.RescaleIntensity(glue.volume_node_to_image(fixed), 0, 1), sitk.sitkFloat32)
    saliency = glue.image_to_volume_node(saliency_image, scene, "saliency")
    views = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]

    display = glue.show_saliency(scene, saliency, fixed, opacity=0.4, threshold=0.1)
    colours = scene.GetNodeByID(display.GetColorNodeID())
    assert colours.IsA("vtkMRMLColorTableNode") and colours.GetNumberOfColors() == 256
    dark, bright = _colour(scene, colours.GetID(), 0), _colour(scene, colours.GetID(), 255)
    assert dark.sum() < 0.1 and bright[0] > 0.95 and bright[1] > 0.95  # black -> pale yellow
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx((0.0, 1.0))
    assert not display.GetAutoWindowLevel()
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(0.1)
    for view in views:
        assert view.GetBackgroundVolumeID() == fixed.GetID()
        assert view.GetForegroundVolumeID() == saliency.GetID()
        assert view.GetForegroundOpacity() == pytest.approx(0.4)
    # a second overlay reuses the colour table instead of adding another one
    count = scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")
    glue.show_saliency(scene, saliency, fixed)
    assert scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") == count


def test_jacobian_gets_a_diverging_map_centred_on_one(scene):
    jacobian = glue.image_to_volume_node(planar_image(), scene, "jacobian")
    display = glue.show_jacobian(scene, jacobian)
    colour_id = display.GetColorNodeID()
    low, middle, high = (_colour(scene, colour_id, i) for i in (0, 128, 255))
    assert low[2] > low[0] and high[0] > high[2]  # blue below 1, red above
    assert np.ptp(middle) < 0.05 and middle.min() > 0.8  # near white at 1
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx((0.0, 2.0))
