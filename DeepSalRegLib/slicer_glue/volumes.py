"""Volume nodes <-> SimpleITK images (voxels and full geometry, 2D images as one-slice volumes).

Part of ``DeepSalRegLib.slicer_glue`` (conventions in its package docstring).
"""
from __future__ import annotations


import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .coordinates import _FLIP, _numpy_matrix, _vtk_matrix, ijk_to_ras_matrix


def _vtk_image_from_array(array: np.ndarray, components: int):
    """A ``vtkImageData`` holding ``array`` of shape ``(K, J, I[, C])`` (deep copy; origin 0, spacing 1)."""
    import vtk
    from vtk.util import numpy_support

    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    k, j, i = array.shape[:3]
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(i, j, k)
    flat = np.ascontiguousarray(array).reshape(-1, components) if components > 1 else np.ascontiguousarray(array).ravel()
    scalars = numpy_support.numpy_to_vtk(flat, deep=True)
    scalars.SetNumberOfComponents(components)
    scalars.SetName("ImageScalars")
    image_data.GetPointData().SetScalars(scalars)
    return image_data


def image_to_volume_node(image: sitk.Image, scene, name: str | None = None, node=None, z_ras: float = 0.0):
    """Put a SimpleITK image into a (new or given) volume node with its full geometry.

    Args:
        image: 2D or 3D image; multi-component images become ``vtkMRMLVectorVolumeNode``.
        scene: the ``vtkMRMLScene`` that receives a new node (ignored when ``node`` is given).
        name: name of a new node.
        node: an existing volume node to fill (its display node is kept).
        z_ras: RAS z of the slice for a 2D image.
    Returns:
        The volume node.
    """
    components = image.GetNumberOfComponentsPerPixel()
    array = sitk.GetArrayFromImage(image)
    if image.GetDimension() == 2:
        array = array[np.newaxis]
    if node is None:
        class_name = "vtkMRMLVectorVolumeNode" if components > 1 else "vtkMRMLScalarVolumeNode"
        node = scene.AddNewNodeByClass(class_name, name or "")
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras_matrix(image, z_ras)))
    node.SetAndObserveImageData(_vtk_image_from_array(array, components))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def _ijk_to_ras_of(node) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return _numpy_matrix(matrix)


def _is_planar(ras_direction: np.ndarray, shape_ijk) -> bool:
    """True when a volume has one slice whose i, j axes lie in the RAS xy plane and k along z."""
    return shape_ijk[2] == 1 and np.allclose(ras_direction[2, :2], 0, atol=1e-6) and np.allclose(
        ras_direction[:2, 2], 0, atol=1e-6
    )


def volume_node_to_image(node, dimension: int | None = None, to_frame: np.ndarray | None = None) -> sitk.Image:
    """A SimpleITK image (LPS geometry) with the voxels and geometry of a volume node.

    Parent transforms of the node are ignored (the image is the volume as stored, as Slicer writes it) unless
    ``to_frame`` is given: a 4x4 RAS matrix from the node's coordinates to another frame (its linear parent
    transforms, see ``own_linear_transforms``), applied to the geometry (no resampling).

    Args:
        node: scalar or vector volume node with image data.
        dimension: 2 or 3; ``None`` gives a 2D image for a single axial-plane slice and 3D otherwise.
        to_frame: optional RAS matrix node -> frame.
    """
    from vtk.util import numpy_support

    image_data = node.GetImageData() if node is not None else None
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        raise InputError(f"volume {node.GetName() if node is not None else None!r} has no image data")
    i, j, k = image_data.GetDimensions()
    components = image_data.GetNumberOfScalarComponents()
    array = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())
    array = array.reshape((k, j, i, components) if components > 1 else (k, j, i)).copy()
    matrix = _ijk_to_ras_of(node)
    if to_frame is not None:
        matrix = np.asarray(to_frame, dtype=float) @ matrix
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    ras_direction = matrix[:3, :3] / spacing
    lps_direction = _FLIP[:, None] * ras_direction
    lps_origin = _FLIP * matrix[:3, 3]
    if dimension is None:
        dimension = 2 if _is_planar(ras_direction, (i, j, k)) else 3
    if dimension == 2:
        if not _is_planar(ras_direction, (i, j, k)):
            raise InputError(f"volume {node.GetName()!r} is not a single axial slice; it cannot be used as 2D")
        image = sitk.GetImageFromArray(array[0], isVector=components > 1)
        image.SetOrigin(lps_origin[:2].tolist())
        image.SetSpacing(spacing[:2].tolist())
        image.SetDirection(lps_direction[:2, :2].ravel().tolist())
    else:
        image = sitk.GetImageFromArray(array, isVector=components > 1)
        image.SetOrigin(lps_origin.tolist())
        image.SetSpacing(spacing.tolist())
        image.SetDirection(lps_direction.ravel().tolist())
    return image


def _slice_z(node) -> float:
    """RAS z of the first slice of a volume node (where 2D results are placed)."""
    return float(_ijk_to_ras_of(node)[2, 3]) if node is not None else 0.0
