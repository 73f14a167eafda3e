"""geometry.py: the voxel field convention of warp.py against SimpleITK's own physical-space resampling.

The grids used here have anisotropic spacing, a non-zero origin and a rotated direction, so a wrong
axis order, a transposed direction or a missing spacing factor cannot go unnoticed.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepSalRegLib.errors import InputError
from DeepSalRegLib.geometry import (
    array_index_to_physical,
    as_scalar_image,
    displacement_image,
    displacement_transform,
    grid_shape,
    make_working_grid,
    normalise_intensity,
    physical_field_to_voxel,
    physical_to_array_index,
    resample_displacement,
    resample_onto,
    same_grid,
    validate_image,
    voxel_field_to_physical,
)
from DeepSalRegLib.warp import warp

# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def rotation(nd: int, angle_deg: float = 30.0) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    if nd == 2:
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    axis = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k  # Rodrigues


def make_grid(array_shape, spacing, origin, direction) -> sitk.Image:
    grid = sitk.Image(list(reversed(array_shape)), sitk.sitkFloat32)
    grid.SetSpacing(spacing)
    grid.SetOrigin(origin)
    grid.SetDirection(np.asarray(direction).flatten().tolist())
    return grid


GRID_CASES = {
    "2d": dict(spacing=(0.8, 1.3), origin=(12.5, -30.0), direction=rotation(2, 30.0)),
    "3d": dict(spacing=(1.5, 2.0, 2.5), origin=(-40.0, 25.0, 7.5), direction=rotation(3, 35.0)),
}


def sinusoid_field(shape, amplitude=3.0) -> np.ndarray:
    """Smooth (nd, *S) voxel field, several voxels in amplitude, different along every channel."""
    nd = len(shape)
    coords = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    u = np.zeros((nd, *shape))
    for i in range(nd):
        j = (i + 1) % nd
        u[i] = amplitude * np.sin(2 * np.pi * coords[j] / shape[j] + 0.7 * i) * np.cos(np.pi * coords[i] / shape[i])
    return u


def smooth_blobs(shape, seed=0) -> np.ndarray:
    """A smooth synthetic image: a few Gaussian blobs."""
    rng = np.random.default_rng(seed)
    coords = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    out = np.zeros(shape)
    for _ in range(6):
        centre = [rng.uniform(0.2, 0.8) * n for n in shape]
        width = rng.uniform(0.08, 0.2) * min(shape)
        out += rng.uniform(0.5, 1.0) * np.exp(-sum((c - m) ** 2 for c, m in zip(coords, centre)) / (2 * width**2))
    return out


def warp_torch(moving: np.ndarray, u: np.ndarray) -> np.ndarray:
    m = torch.from_numpy(np.ascontiguousarray(moving, dtype=np.float64))[None, None]
    f = torch.from_numpy(np.ascontiguousarray(u, dtype=np.float64))[None]
    return warp(m, f, mode="linear", padding="border")[0, 0].numpy()


def warp_sitk(moving: sitk.Image, grid: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    out = sitk.Resample(moving, grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat64)
    return sitk.GetArrayFromImage(out)


def sampled_inside(u: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Voxels whose sampling position x + u(x) lies inside the grid (no boundary handling involved)."""
    shape = u.shape[1:]
    coords = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    inside = np.ones(shape, dtype=bool)
    for i, n in enumerate(shape):
        pos = coords[i] + u[i]
        inside &= (pos >= margin) & (pos <= n - 1 - margin)
    return inside


def check_warp_matches_sitk(moving_array: np.ndarray, grid: sitk.Image, u: np.ndarray) -> None:
    """Core check: warp.warp in voxels == sitk.Resample with the physical displacement-field transform."""
    moving = sitk.GetImageFromArray(moving_array.astype(np.float64))
    moving.CopyInformation(grid)
    disp = displacement_image(voxel_field_to_physical(u, grid), grid)
    ours = warp_torch(moving_array, u)
    theirs = warp_sitk(moving, grid, displacement_transform(disp))
    inside = sampled_inside(u)
    assert inside.mean() > 0.7
    value_range = float(np.ptp(moving_array))
    error = np.abs(ours - theirs)[inside].max() / value_range
    assert error < 1e-6, f"torch warp and SimpleITK resampling differ by {error:.2e} of the range"
    # The comparison is sensitive: the field with its channels in the wrong (ITK) order disagrees.
    wrong = displacement_image(voxel_field_to_physical(u[::-1].copy(), grid), grid)
    wrong_out = warp_sitk(moving, grid, displacement_transform(wrong))
    assert np.abs(ours - wrong_out)[inside].mean() / value_range > 1e-2


# ----------------------------------------------------------------------------------------------------
# (a) warping an image: voxel space (torch) == physical space (SimpleITK)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["2d", "3d"])
def test_warp_matches_sitk_on_synthetic_image(case):
    shape = (37, 45) if case == "2d" else (18, 22, 26)
    grid = make_grid(shape, **GRID_CASES[case])
    image = smooth_blobs(shape) + 0.05 * np.random.default_rng(1).random(shape)  # texture at the voxel scale
    check_warp_matches_sitk(image, grid, sinusoid_field(shape))


@pytest.mark.shared_data
def test_warp_matches_sitk_on_brain_slice(shared_data):
    png = sitk.ReadImage(str(shared_data / "templates/itk_examples/BrainProtonDensitySlice.png"))
    moving_array = sitk.GetArrayFromImage(as_scalar_image(png)).astype(np.float64)
    grid = make_grid(moving_array.shape, **GRID_CASES["2d"])
    check_warp_matches_sitk(moving_array, grid, sinusoid_field(moving_array.shape, amplitude=6.0))


@pytest.mark.shared_data
def test_warp_matches_sitk_on_colin27_crop(shared_data):
    colin = sitk.ReadImage(str(shared_data / "templates/colin27_ch2bet.nii.gz"), sitk.sitkFloat32)
    small = sitk.Shrink(colin, [4, 4, 4])[4:40, 6:48, 4:36]  # ITK index order: x, y, z
    moving_array = sitk.GetArrayFromImage(small).astype(np.float64)
    assert np.ptp(moving_array) > 50
    grid = make_grid(moving_array.shape, **GRID_CASES["3d"])
    check_warp_matches_sitk(moving_array, grid, sinusoid_field(moving_array.shape, amplitude=3.0))


@pytest.mark.parametrize("case", ["2d", "3d"])
def test_pipeline_resample_then_warp_matches_single_sitk_resample(case):
    """Moving image on its own grid: resample_onto + warp in voxels ~= one physical resampling."""
    shape = (40, 48) if case == "2d" else (20, 24, 22)
    grid = make_grid(shape, **GRID_CASES[case])
    nd = len(shape)
    # A moving image with its own (axis-aligned, 0.7 mm) grid around the fixed grid's extent.
    lo = array_index_to_physical(np.array(np.meshgrid(*[[0, n - 1] for n in shape])).reshape(nd, -1).T, grid).min(0)
    moving = sitk.Image([int(100 / 0.7)] * nd, sitk.sitkFloat64)
    moving.SetSpacing([0.7] * nd)
    moving.SetOrigin((lo - 20.0).tolist())
    values = smooth_blobs(grid_shape(moving), seed=3)
    moving = sitk.GetImageFromArray(values)
    moving.SetSpacing([0.7] * nd)
    moving.SetOrigin((lo - 20.0).tolist())

    u = sinusoid_field(shape, amplitude=2.5)
    tx = displacement_transform(displacement_image(voxel_field_to_physical(u, grid), grid))
    on_grid = sitk.GetArrayFromImage(resample_onto(moving, grid)).astype(np.float64)
    ours = warp_torch(on_grid, u)
    theirs = warp_sitk(moving, grid, tx)
    inside = sampled_inside(u)
    assert np.abs(ours - theirs)[inside].max() / np.ptp(values) < 0.02  # two interpolations vs one


# ----------------------------------------------------------------------------------------------------
# (b) points: the ITK transform moves p to p + d(p), which is the voxel rule index -> index + u
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["2d", "3d"])
def test_transform_point_equals_voxel_rule(case):
    shape = (23, 31) if case == "2d" else (14, 17, 19)
    grid = make_grid(shape, **GRID_CASES[case])
    u = sinusoid_field(shape, amplitude=4.0)
    d = voxel_field_to_physical(u, grid)
    tx = displacement_transform(displacement_image(d, grid))
    rng = np.random.default_rng(5)
    for _ in range(25):
        idx = tuple(int(rng.integers(0, n)) for n in shape)  # array order
        itk_index = idx[::-1]
        p = np.array(grid.TransformIndexToPhysicalPoint(itk_index))
        mapped = np.array(tx.TransformPoint(p.tolist()))
        np.testing.assert_allclose(mapped, p + d[idx], atol=1e-9)
        voxel_rule = np.array(itk_index, dtype=float) + u[(slice(None), *idx)][::-1]
        np.testing.assert_allclose(mapped, grid.TransformContinuousIndexToPhysicalPoint(voxel_rule.tolist()), atol=1e-9)


@pytest.mark.parametrize("case", ["2d", "3d"])
def test_field_and_point_conversions_round_trip(case):
    shape = (11, 13) if case == "2d" else (7, 9, 10)
    grid = make_grid(shape, **GRID_CASES[case])
    u = sinusoid_field(shape).astype(np.float32)
    d = voxel_field_to_physical(u, grid)
    assert d.shape == (*shape, len(shape)) and d.dtype == np.float64
    np.testing.assert_allclose(physical_field_to_voxel(d, grid), u, atol=1e-5)
    np.testing.assert_allclose(voxel_field_to_physical(u[None], grid), d)  # batch of one accepted
    # A physical vector's length survives (direction is a rotation): one voxel along axis 0 = spacing.
    unit = np.zeros_like(u)
    unit[0] = 1.0
    np.testing.assert_allclose(np.linalg.norm(voxel_field_to_physical(unit, grid), axis=-1), grid.GetSpacing()[-1])

    index = np.array([[1.25, 2.5, 3.75][: len(shape)], [0.0] * len(shape)])
    points = array_index_to_physical(index, grid)
    for row, p in zip(index, points):
        np.testing.assert_allclose(p, grid.TransformContinuousIndexToPhysicalPoint(row[::-1].tolist()), atol=1e-9)
    np.testing.assert_allclose(physical_to_array_index(points, grid), index, atol=1e-9)


def test_field_shape_mismatch_is_input_error():
    grid = make_grid((10, 12), **GRID_CASES["2d"])
    with pytest.raises(InputError, match="shape"):
        voxel_field_to_physical(np.zeros((2, 12, 10)), grid)
    with pytest.raises(InputError, match="components"):
        displacement_transform(sitk.Image([8, 8], sitk.sitkVectorFloat64, 3))


@pytest.mark.parametrize("case", ["2d", "3d"])
def test_resample_displacement_preserves_the_mapping(case):
    """Working grid -> fixed grid: the resampled field moves fixed-grid points as the original transform does."""
    fixed_shape = (30, 26) if case == "2d" else (12, 20, 18)
    nd = len(fixed_shape)
    fixed = make_grid(
        fixed_shape, spacing=(0.9, 1.7, 3.0)[:nd], origin=(5.0, -3.0, 11.0)[:nd], direction=rotation(nd, -20.0)
    )
    work = make_working_grid(fixed)
    u = sinusoid_field(grid_shape(work), amplitude=3.0)
    disp = displacement_image(voxel_field_to_physical(u, work), work)
    tx_work = displacement_transform(disp)
    on_fixed = resample_displacement(disp, fixed)
    assert on_fixed.GetSize() == fixed.GetSize() and on_fixed.GetDirection() == fixed.GetDirection()
    d_fixed = sitk.GetArrayFromImage(on_fixed)
    rng = np.random.default_rng(2)
    for _ in range(20):
        idx = tuple(int(rng.integers(0, n)) for n in fixed_shape)
        p = np.array(fixed.TransformIndexToPhysicalPoint(idx[::-1]))
        np.testing.assert_allclose(p + d_fixed[idx], tx_work.TransformPoint(p.tolist()), atol=1e-9)
    assert np.abs(d_fixed).max() > 1.0  # the field is not trivially zero
    assert disp.GetSize() == work.GetSize()  # displacement_transform left the caller's image intact


# ----------------------------------------------------------------------------------------------------
# working grid
# ----------------------------------------------------------------------------------------------------


def corners_index(image: sitk.Image) -> np.ndarray:
    """Continuous ITK indices of the image's outer voxel edges."""
    size = image.GetSize()
    return np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in size], indexing="ij")).reshape(len(size), -1).T


def check_covers(work: sitk.Image, fixed: sitk.Image) -> None:
    for c in corners_index(fixed):
        p = fixed.TransformContinuousIndexToPhysicalPoint(c.tolist())
        ci = np.array(work.TransformPhysicalPointToContinuousIndex(p))
        assert np.all(ci >= -0.5 - 1e-6) and np.all(ci <= np.array(work.GetSize()) - 0.5 + 1e-6), (c, ci)


def test_working_grid_liver_like_volume_is_isotropic_multiple_of_8_and_covers_extent():
    fixed = make_grid(
        (25, 195, 166), spacing=(1.36719, 1.36719, 4.0), origin=(-100.0, 20.0, 5.0), direction=rotation(3, 25.0)
    )
    work = make_working_grid(fixed)
    assert np.allclose(work.GetSpacing(), 1.36719)
    assert all(n % 8 == 0 for n in work.GetSize())
    assert work.GetSize() == (168, 200, 80)  # 227, 267 and 100 mm at 1.367 mm, rounded up to 8
    assert work.GetDirection() == fixed.GetDirection()
    assert grid_shape(work) == (80, 200, 168)
    check_covers(work, fixed)
    centre_f = fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()])
    centre_w = work.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in work.GetSize()])
    np.testing.assert_allclose(centre_f, centre_w, atol=1e-9)


def test_working_grid_max_voxels_coarsens_isotropically():
    fixed = make_grid((25, 195, 166), spacing=(1.36719, 1.36719, 4.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3))
    work = make_working_grid(fixed, max_voxels=300_000)
    assert np.prod(work.GetSize()) <= 300_000
    assert work.GetSpacing()[0] > 2.0 and np.allclose(work.GetSpacing(), work.GetSpacing()[0])
    assert all(n % 8 == 0 for n in work.GetSize())
    check_covers(work, fixed)


def test_working_grid_keeps_a_grid_that_already_fits():
    fixed = make_grid((48, 64, 40), spacing=(1.0, 1.0, 1.0), origin=(3.0, -4.0, 5.0), direction=rotation(3, 10.0))
    work = make_working_grid(fixed)
    assert work.GetSize() == fixed.GetSize()
    np.testing.assert_allclose(work.GetOrigin(), fixed.GetOrigin(), atol=1e-9)
    assert work.GetSpacing() == fixed.GetSpacing()


def test_working_grid_explicit_spacing_and_multiple_2d():
    fixed = make_grid((217, 181), spacing=(1.0, 1.0), origin=(0.0, 0.0), direction=np.eye(2))
    work = make_working_grid(fixed, multiple=16, spacing=2.0)
    assert work.GetSpacing() == (2.0, 2.0) and work.GetSize() == (96, 112)
    check_covers(work, fixed)
    with pytest.raises(InputError):
        make_working_grid(fixed, spacing=0.0)


@pytest.mark.shared_data
def test_working_grid_of_real_liver_volume(shared_data):
    fixed = sitk.ReadImage(str(shared_data / "eth_liver/dataset18/exhale.mha"))
    work = make_working_grid(fixed, max_voxels=2_000_000)
    spacing = np.array(work.GetSpacing())
    assert spacing.max() / spacing.min() < 1.01 and spacing.min() >= min(fixed.GetSpacing())
    assert all(n % 8 == 0 for n in work.GetSize()) and np.prod(work.GetSize()) <= 2_000_000
    check_covers(work, fixed)
    on_grid = resample_onto(fixed, work)
    assert sitk.GetArrayViewFromImage(on_grid).max() > 100  # the liver volume lands on the grid


# ----------------------------------------------------------------------------------------------------
# scalar images, validation, resampling, normalisation
# ----------------------------------------------------------------------------------------------------


def test_colour_picture_becomes_luminance():
    rgb = np.zeros((6, 7, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    image = sitk.GetImageFromArray(rgb, isVector=True)
    image.SetSpacing((0.5, 2.0))
    grey = as_scalar_image(image)
    assert grey.GetPixelID() == sitk.sitkFloat32 and grey.GetDimension() == 2
    assert grey.GetSpacing() == (0.5, 2.0)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(grey), 0.299 * 200 + 0.587 * 100 + 0.114 * 50, rtol=1e-6)


@pytest.mark.shared_data
def test_itk_png_slice_becomes_its_grey_values(shared_data):
    png = sitk.ReadImage(str(shared_data / "templates/itk_examples/BrainProtonDensitySlice.png"))
    assert png.GetNumberOfComponentsPerPixel() == 3  # stored as RGB with equal channels
    grey = sitk.GetArrayFromImage(as_scalar_image(png))
    np.testing.assert_allclose(grey, sitk.GetArrayFromImage(png)[..., 0], atol=1e-3)


def test_one_slice_volume_becomes_2d_with_in_plane_geometry():
    vol = sitk.GetImageFromArray(np.arange(1 * 30 * 20, dtype=np.int16).reshape(1, 30, 20))
    vol.SetSpacing((0.5, 0.7, 2.0))
    vol.SetOrigin((1.0, 2.0, 3.0))
    vol.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    flat = as_scalar_image(vol)
    assert flat.GetDimension() == 2 and flat.GetSize() == (20, 30)
    assert flat.GetSpacing() == (0.5, 0.7) and flat.GetOrigin() == (1.0, 2.0)
    assert flat.GetDirection() == (-1.0, 0.0, 0.0, -1.0)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(flat), np.arange(600).reshape(30, 20))

    sagittal = sitk.GetImageFromArray(np.ones((25, 30, 1), dtype=np.uint8))  # size (1, 30, 25)
    sagittal.SetSpacing((3.0, 0.8, 0.9))
    sagittal.SetOrigin((7.0, 8.0, 9.0))
    flat = as_scalar_image(sagittal, labels=True)
    assert flat.GetSize() == (30, 25) and flat.GetSpacing() == (0.8, 0.9) and flat.GetOrigin() == (8.0, 9.0)
    assert flat.GetPixelID() == sitk.sitkUInt8


def test_unsupported_images_raise_one_line_input_errors():
    with pytest.raises(InputError, match="4D") as err:
        as_scalar_image(sitk.Image([8, 8, 8, 3], sitk.sitkFloat32), name="moving image")
    assert "Moving image" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError, match="components"):
        as_scalar_image(sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3))
    with pytest.raises(InputError, match="whole numbers"):
        as_scalar_image(sitk.GetImageFromArray(np.full((5, 5), 0.5, dtype=np.float32)), labels=True)
    labels = as_scalar_image(sitk.GetImageFromArray(np.array([[0, 1.0], [2, 3]], dtype=np.float32)), labels=True)
    assert labels.GetPixelID() == sitk.sitkInt32


@pytest.mark.parametrize(
    "array, match",
    [
        (np.random.default_rng(0).random((3, 40)), "too small"),
        (np.zeros((0, 40)), "too small"),
        (np.full((10, 12), 7.0), "constant"),
        (np.where(np.eye(10) > 0, np.nan, 1.0), "NaN"),
        (np.where(np.eye(10) > 0, np.inf, 1.0), "infinite"),
    ],
)
def test_validate_image_rejects_unusable_images(array, match):
    with pytest.raises(InputError, match=match) as err:
        validate_image(sitk.GetImageFromArray(array.astype(np.float32)), "fixed image")
    message = str(err.value)
    assert message.startswith("Fixed image") and "\n" not in message


def test_validate_image_returns_a_good_image():
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((8, 9)).astype(np.float32))
    assert validate_image(image, "fixed image") is image


def test_resample_onto_labels_stay_labels_and_identity_is_exact():
    labels = np.zeros((20, 24), dtype=np.uint8)
    labels[5:12, 6:18] = 3
    labels[12:, :] = 7
    image = sitk.GetImageFromArray(labels)
    ref = sitk.Image([12, 10], sitk.sitkFloat32)
    ref.SetSpacing((2.0, 2.0))
    out = resample_onto(image, ref, labels=True)
    assert out.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayViewFromImage(out))) == {0, 3, 7}
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(out), labels[::2, ::2])
    same = resample_onto(sitk.Cast(image, sitk.sitkFloat32), image)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(same), labels)
    with pytest.raises(InputError):
        resample_onto(image, sitk.Image([4, 4, 4], sitk.sitkFloat32))


@pytest.mark.parametrize("case", ["2d", "3d"])
def test_same_grid_shortcut_equals_itk_resampling(case):
    """Sampling onto an identical grid is a copy (no ITK pass): it must give what ITK's resampler gives, and a
    grid that differs by a tenth of a voxel in origin, or in spacing or direction, must not take the shortcut."""
    shape = (30, 26) if case == "2d" else (12, 20, 18)
    nd = len(shape)
    grid = make_grid(shape, spacing=(0.9, 1.7, 3.0)[:nd], origin=(5.0, -3.0, 11.0)[:nd], direction=rotation(nd, 25.0))
    rng = np.random.default_rng(4)
    image = sitk.GetImageFromArray(rng.random(shape).astype(np.float32))
    image.CopyInformation(grid)
    itk = sitk.Resample(image, grid, sitk.Transform(nd, sitk.sitkIdentity), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    assert same_grid(image, grid)
    np.testing.assert_allclose(sitk.GetArrayFromImage(resample_onto(image, grid)),
                               sitk.GetArrayFromImage(itk), atol=1e-6)
    disp = displacement_image(sinusoid_field(shape, amplitude=2.0).transpose(*range(1, nd + 1), 0), grid)
    itk_disp = sitk.Resample(disp, grid, sitk.Transform(nd, sitk.sitkIdentity), sitk.sitkLinear, 0.0,
                             sitk.sitkVectorFloat64)
    np.testing.assert_allclose(sitk.GetArrayFromImage(resample_displacement(disp, grid)),
                               sitk.GetArrayFromImage(itk_disp), atol=1e-9)
    shifted = sitk.Image(grid)
    shifted.SetOrigin(tuple(np.add(grid.GetOrigin(), 0.1 * min(grid.GetSpacing()))))
    stretched = sitk.Image(grid)
    stretched.SetSpacing(tuple(np.multiply(grid.GetSpacing(), 1.01)))
    turned = make_grid(shape, spacing=grid.GetSpacing(), origin=grid.GetOrigin(), direction=rotation(nd, 26.0))
    for other in (shifted, stretched, turned):
        assert not same_grid(image, other)
        np.testing.assert_allclose(  # the general path: ITK samples the shifted points
            sitk.GetArrayFromImage(resample_onto(image, other)),
            sitk.GetArrayFromImage(sitk.Resample(image, other, sitk.Transform(nd, sitk.sitkIdentity),
                                                     sitk.sitkLinear, 0.0, sitk.sitkFloat32)), atol=1e-6)
        assert not np.allclose(sitk.GetArrayFromImage(resample_onto(image, other)),
                               sitk.GetArrayFromImage(image), atol=1e-3)


def test_normalise_intensity_robust_window():
    array = np.arange(1000, dtype=np.float64).reshape(10, 100)
    array[0, 0] = -1e6  # outliers do not stretch the window
    array[-1, -1] = 1e6
    out = normalise_intensity(array, low=1, high=99)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    lo, hi = np.percentile(array, [1, 99])
    np.testing.assert_allclose(out[5, 0], (500 - lo) / (hi - lo), rtol=1e-5)
    mask = np.zeros_like(array, dtype=bool)
    mask[:5] = True  # window from the first half only (1..499): everything above it clips to 1
    mask[0, 0] = False
    masked = normalise_intensity(array, mask=mask, low=0, high=100)
    assert masked[6:].min() == 1.0 and masked[0, 1] == 0.0
    np.testing.assert_allclose(masked[2, 50], (250 - 1) / (499 - 1), rtol=1e-5)
    assert np.all(normalise_intensity(np.full((4, 4), 3.0)) == 0)
