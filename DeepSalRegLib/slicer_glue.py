"""Glue between 3D Slicer's MRML scene and DeepSalRegLib: the one place where nodes meet the library.

Everything here takes the scene or the nodes as arguments and imports ``slicer`` and ``vtk`` inside the
functions, so the module imports anywhere (plain Python, PythonSlicer, Slicer) and is tested against real
MRML with the ``slicer-core`` wheel. Nothing here imports torch.

Conventions (the library's are in ``warp.py``; this module only converts to and from Slicer's):

* Slicer's world is **RAS**; SimpleITK images, transform files, landmark files and the library are **LPS**.
  The two differ by ``F = diag(-1, -1, 1)`` applied to points, directions and vectors.
* A volume node's ``IJKToRAS`` matrix is ``F @ [direction * spacing | origin]`` of the SimpleITK image.
  A 2D image is a volume with one slice (``k``); its slice position in RAS is ``z_ras``.
* A library displacement field ``d`` (SimpleITK vector image, LPS mm, on the fixed grid) maps a fixed point
  ``p`` to the moving point ``p + d(p)``. That is ITK's resampling transform and Slicer's transform
  **"from parent"**; Slicer inverts it itself when it shows the moving volume in fixed space.
* Landmarks are ``(N, nd)`` arrays of LPS mm; markups control points are read in the node's local
  coordinates (not world), so moving landmarks stay in moving space after they are placed under the result.

Sections: volumes, transforms, landmarks, display, results (files or a ``RegistrationResult`` -> nodes),
running the library (in-process, or as a child process with progress lines and cancel).
"""
from __future__ import annotations

import collections
import csv
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import DeviceError, InputError, ModelError, OutputError
from .quality import DEFAULT_QUALITY, preset

__all__ = [
    "lps_to_ras",
    "ras_to_lps",
    "ijk_to_ras_matrix",
    "image_to_volume_node",
    "volume_node_to_image",
    "displacement_to_transform_node",
    "transform_node_to_displacement",
    "load_transform_file",
    "landmarks_to_markups",
    "markups_to_landmarks",
    "tre_to_table",
    "color_node_id",
    "show_transform_grid",
    "show_saliency",
    "show_confidence",
    "own_linear_transforms",
    "show_jacobian",
    "RegistrationOptions",
    "RegistrationOutputs",
    "OutputNodes",
    "ResultNodes",
    "outputs_from_result",
    "outputs_from_folder",
    "import_outputs",
    "register_nodes",
    "parse_progress_line",
    "cli_arguments",
    "error_for_exit_code",
    "ChildProcess",
    "RegistrationJob",
]

# Flips LPS <-> RAS (its own inverse).
_FLIP = np.array([-1.0, -1.0, 1.0])

# ---------------------------------------------------------------------------------------------------------
# Volumes
# ---------------------------------------------------------------------------------------------------------


def lps_to_ras(points) -> np.ndarray:
    """``(N, 2|3)`` LPS points (mm) -> ``(N, 3)`` RAS points; 2D points get ``z = 0``."""
    pts = np.atleast_2d(np.asarray(points, dtype=float))
    out = np.zeros((pts.shape[0], 3))
    out[:, : pts.shape[1]] = pts
    return out * _FLIP


def ras_to_lps(points, dimension: int = 3) -> np.ndarray:
    """``(N, 3)`` RAS points (mm) -> ``(N, dimension)`` LPS points (2D drops z)."""
    pts = np.atleast_2d(np.asarray(points, dtype=float))
    return (pts * _FLIP)[:, :dimension]


def _geometry_3d(image: sitk.Image):
    """Origin, spacing and direction of an image as 3D LPS quantities (a 2D image becomes one slice)."""
    nd = image.GetDimension()
    if nd not in (2, 3):
        raise InputError(f"only 2D and 3D images can be shown in Slicer, got a {nd}D image")
    origin = np.zeros(3)
    origin[:nd] = image.GetOrigin()
    spacing = np.ones(3)
    spacing[:nd] = image.GetSpacing()
    direction = np.eye(3)
    direction[:nd, :nd] = np.reshape(image.GetDirection(), (nd, nd))
    return origin, spacing, direction


def ijk_to_ras_matrix(image: sitk.Image, z_ras: float = 0.0) -> np.ndarray:
    """The 4x4 ``IJKToRAS`` matrix of a volume node holding ``image``.

    Args:
        image: 2D or 3D SimpleITK image (LPS geometry).
        z_ras: RAS z of the slice when ``image`` is 2D (ignored for 3D).
    """
    origin, spacing, direction = _geometry_3d(image)
    matrix = np.eye(4)
    matrix[:3, :3] = (_FLIP[:, None] * direction) * spacing[None, :]
    matrix[:3, 3] = _FLIP * origin
    if image.GetDimension() == 2:
        matrix[2, 3] = z_ras
    return matrix


def _vtk_matrix(array: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def _numpy_matrix(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


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


# ---------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------


def displacement_to_transform_node(displacement: sitk.Image, scene, node=None, name: str | None = None,
                                   z_ras: float = 0.0):
    """Set a library displacement field as the **from parent** transform of a (new or given) transform node.

    The node then maps a fixed RAS point ``p`` to the moving point ``p + d(p)`` (``d`` converted to RAS),
    exactly as ``sitk.DisplacementFieldTransform(displacement)`` maps the LPS point (linear interpolation;
    outside the grid Slicer keeps the edge displacement where ITK uses zero).

    Args:
        displacement: vector image (LPS mm, ``nd`` components) on the fixed grid, 2D or 3D.
        scene: scene that receives a new node (ignored when ``node`` is given).
        node: an existing ``vtkMRMLTransformNode`` to overwrite.
        name: name of a new node.
        z_ras: RAS z of the slice for a 2D field.
    """
    import vtk

    import slicer

    nd = displacement.GetDimension()
    if displacement.GetNumberOfComponentsPerPixel() != nd:
        raise InputError(
            f"a displacement field needs {nd} components per voxel, got {displacement.GetNumberOfComponentsPerPixel()}"
        )
    vectors = sitk.GetArrayFromImage(displacement).astype(np.float64)
    if nd == 2:
        vectors = np.concatenate([vectors, np.zeros(vectors.shape[:-1] + (1,))], axis=-1)[np.newaxis]
    vectors = vectors * _FLIP  # LPS -> RAS vectors
    matrix = ijk_to_ras_matrix(displacement, z_ras)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)

    grid = _vtk_image_from_array(vectors, 3)
    grid.SetOrigin(*matrix[:3, 3])
    grid.SetSpacing(*spacing)
    direction = np.eye(4)
    direction[:3, :3] = matrix[:3, :3] / spacing
    transform = slicer.vtkOrientedGridTransform()
    transform.SetGridDirectionMatrix(_vtk_matrix(direction))
    transform.SetDisplacementGridData(grid)
    # ITK interpolates displacement fields linearly; Slicer's file reader would choose cubic.
    transform.SetInterpolationModeToLinear()
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTransformNode", name or "")
    node.SetAndObserveTransformFromParent(transform)
    return node


def transform_node_to_displacement(node, reference: sitk.Image) -> sitk.Image:
    """Sample any transform node (linear, grid, B-spline, composite) as a library displacement field.

    The result is on ``reference``'s grid, LPS mm: ``d(p) = T(p) - p`` with ``T`` the node's transform
    from world (the resampling direction), so it round-trips ``displacement_to_transform_node``.
    """
    import vtk
    from vtk.util import numpy_support

    nd = reference.GetDimension()
    shape = reference.GetSize()[::-1]
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, nd)
    index = index[:, ::-1]  # array order (k, j, i) -> ITK index order (i, j, k)
    origin = np.asarray(reference.GetOrigin())
    spacing = np.asarray(reference.GetSpacing())
    direction = np.reshape(reference.GetDirection(), (nd, nd))
    points_lps = origin + (index * spacing) @ direction.T
    points_ras = lps_to_ras(points_lps)

    transform = vtk.vtkGeneralTransform()
    node.GetTransformFromWorld(transform)
    source = vtk.vtkPoints()
    source.SetData(numpy_support.numpy_to_vtk(points_ras, deep=True))
    target = vtk.vtkPoints()
    transform.TransformPoints(source, target)
    mapped_lps = ras_to_lps(numpy_support.vtk_to_numpy(target.GetData()), nd)
    vectors = (mapped_lps - points_lps).reshape(tuple(shape) + (nd,))
    field = sitk.GetImageFromArray(vectors, isVector=True)
    field.CopyInformation(reference)
    return field


def load_transform_file(path, scene, node=None, linear: bool = True):
    """Read an ITK transform file (.h5/.tfm) or displacement image (.nrrd/.mha) with Slicer's own reader.

    Slicer stores such files as a "from parent" transform (ITK's resampling convention) and converts
    LPS to RAS itself. ``linear=True`` switches grid interpolation from Slicer's cubic to ITK's linear.
    """
    import slicer

    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTransformNode", Path(path).stem)
    storage = node.GetStorageNode()
    if storage is None:
        storage = slicer.vtkMRMLTransformStorageNode()
        scene.AddNode(storage)
        node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise InputError(f"Slicer could not read the transform file {path}")
    transform = node.GetTransformFromParent()
    if linear and hasattr(transform, "SetInterpolationModeToLinear"):
        transform.SetInterpolationModeToLinear()
    return node


def _set_registration_references(transform_node, fixed, moving) -> None:
    """Tag a transform node as the result of registering ``moving`` to ``fixed`` (as Slicer's registration modules do)."""
    import slicer

    cls = slicer.vtkMRMLTransformNode
    if fixed is not None:
        transform_node.SetNodeReferenceID(cls.GetFixedNodeReferenceRole(), fixed.GetID())
    if moving is not None:
        transform_node.SetNodeReferenceID(cls.GetMovingNodeReferenceRole(), moving.GetID())


# ---------------------------------------------------------------------------------------------------------
# Landmarks
# ---------------------------------------------------------------------------------------------------------


def landmarks_to_markups(points, scene, labels: Sequence[str] | None = None, name: str | None = None,
                         node=None, z_ras: float = 0.0):
    """Put ``(N, nd)`` LPS landmarks into a (new or given) point-list markups node, replacing its points.

    Args:
        points: landmarks in LPS mm, as ``io.read_landmarks`` returns them.
        labels: one label per point (default ``"1" .. "N"``, the row numbers of the CSV).
        z_ras: RAS z given to 2D points.
    """
    import vtk

    ras = lps_to_ras(points)
    if np.asarray(points).ndim == 2 and np.asarray(points).shape[1] == 2:
        ras[:, 2] = z_ras
    if labels is None:
        labels = [str(i + 1) for i in range(len(ras))]
    if len(labels) != len(ras):
        raise InputError(f"{len(ras)} landmarks but {len(labels)} labels")
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name or "")
    node.RemoveAllControlPoints()
    for point, label in zip(ras, labels):
        node.AddControlPoint(vtk.vtkVector3d(*point), str(label))
    return node


def markups_to_landmarks(node, dimension: int = 3):
    """``(points, labels)`` of a markups node: ``(N, dimension)`` LPS mm in the node's local coordinates."""
    count = node.GetNumberOfControlPoints()
    ras = np.array([node.GetNthControlPointPosition(i) for i in range(count)], dtype=float).reshape(count, 3)
    labels = [node.GetNthControlPointLabel(i) for i in range(count)]
    return ras_to_lps(ras, dimension), labels


def tre_to_table(scene, before, after, labels: Sequence[str] | None = None, node=None, name: str | None = None):
    """A table node with per-point target registration errors before and after, and their mean.

    Rows are the points (``labels``) followed by a row ``mean``; columns ``Point``, ``Before (mm)``,
    ``After (mm)``.
    """
    import vtk

    before = np.asarray(before, dtype=float).ravel()
    after = np.asarray(after, dtype=float).ravel()
    if before.shape != after.shape:
        raise InputError(f"TRE before has {before.size} points, after has {after.size}")
    if labels is None:
        labels = [str(i + 1) for i in range(before.size)]
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", name or "")
    node.RemoveAllColumns()
    columns = [vtk.vtkStringArray(), vtk.vtkDoubleArray(), vtk.vtkDoubleArray()]
    for column, title in zip(columns, ("Point", "Before (mm)", "After (mm)")):
        column.SetName(title)
    for label, b, a in zip(list(labels) + ["mean"], np.append(before, before.mean()), np.append(after, after.mean())):
        columns[0].InsertNextValue(str(label))
        columns[1].InsertNextValue(float(b))
        columns[2].InsertNextValue(float(a))
    for column in columns:
        node.AddColumn(column)
    node.SetUseColumnTitleAsColumnHeader(True)
    node.Modified()
    return node


# ---------------------------------------------------------------------------------------------------------
# Display
# ---------------------------------------------------------------------------------------------------------

# Key colours (RGB 0..1, evenly spaced) of the maps used when Slicer's colour files are not loaded
# (slicer-core, PythonSlicer): matplotlib's "inferno" and the blue-white-red "coolwarm".
_COLOUR_MAPS = {
    "Inferno": [
        (0.001, 0.0, 0.014), (0.129, 0.047, 0.291), (0.342, 0.062, 0.429), (0.541, 0.135, 0.415),
        (0.736, 0.216, 0.33), (0.894, 0.353, 0.194), (0.978, 0.558, 0.035), (0.975, 0.798, 0.206),
        (0.988, 0.998, 0.645),
    ],
    "DivergingBlueRed": [
        (0.23, 0.299, 0.754), (0.384, 0.51, 0.918), (0.554, 0.69, 0.996), (0.724, 0.815, 0.976),
        (0.867, 0.864, 0.863), (0.96, 0.767, 0.674), (0.957, 0.598, 0.477), (0.865, 0.371, 0.296),
        (0.706, 0.016, 0.15),
    ],
}


def color_node_id(scene, name: str) -> str:
    """ID of a continuous colour table: Slicer's ``<name>.txt`` colour file when loaded, else our own copy.

    Args:
        name: ``"Inferno"`` (saliency) or ``"DivergingBlueRed"`` (Jacobian determinant).
    """
    slicer_id = f"vtkMRMLColorTableNodeFile{name}.txt"
    if scene.GetNodeByID(slicer_id) is not None:
        return slicer_id
    own_name = f"DeepSalReg {name}"
    existing = scene.GetFirstNodeByName(own_name)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
        return existing.GetID()
    keys = np.asarray(_COLOUR_MAPS[name])
    positions = np.linspace(0.0, 1.0, len(keys))
    samples = np.linspace(0.0, 1.0, 256)
    rgb = np.stack([np.interp(samples, positions, keys[:, c]) for c in range(3)], axis=1)
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", own_name)
    table.SetTypeToUser()
    table.SetNumberOfColors(len(rgb))
    for index, (r, g, b) in enumerate(rgb):
        table.SetColor(index, f"{index}", float(r), float(g), float(b), 1.0)
    table.SetAttribute("Category", "Continuous")
    return table.GetID()


def _scalar_display_node(volume):
    if volume.GetDisplayNode() is None:
        volume.CreateDefaultDisplayNodes()
    return volume.GetDisplayNode()


def show_transform_grid(transform_node, region=None, spacing_mm: float | None = None):
    """Show a transform as a deformed grid in the slice views (not in 3D).

    Args:
        region: the volume whose extent bounds the grid (the fixed volume).
        spacing_mm: grid line spacing; by default about 1/12 of the region's largest in-plane extent.
    Returns:
        The transform display node.
    """
    import slicer

    if transform_node.GetDisplayNode() is None:
        transform_node.CreateDefaultDisplayNodes()
    display = transform_node.GetDisplayNode()
    display.SetVisualizationMode(slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID)
    display.SetVisibility(True)
    display.SetVisibility2D(True)
    display.SetVisibility3D(False)
    if region is not None:
        display.SetAndObserveRegionNode(region)
        if spacing_mm is None and region.GetImageData() is not None:
            dims = np.asarray(region.GetImageData().GetDimensions(), dtype=float)
            extent = dims * np.asarray(region.GetSpacing())
            spacing_mm = float(np.round(max(extent.max() / 12.0, 1.0)))
    if spacing_mm is not None:
        display.SetGridSpacingMm(spacing_mm)
    return display


def _set_slice_layers(scene, background=None, foreground=None, foreground_opacity: float | None = None) -> None:
    """Set background/foreground volumes of every slice view of the scene (all slice composite nodes)."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        if background is not None:
            composite.SetBackgroundVolumeID(background.GetID())
        if foreground is not None:
            composite.SetForegroundVolumeID(foreground.GetID())
        if foreground_opacity is not None:
            composite.SetForegroundOpacity(foreground_opacity)


def show_saliency(scene, saliency, fixed=None, opacity: float = 0.4, threshold: float = 0.1):
    """Show the joint saliency map (0..1) in inferno colours as the foreground over the fixed volume.

    Values below ``threshold`` are transparent so that the fixed image shows where saliency is low.
    Returns the saliency display node.
    """
    display = _scalar_display_node(saliency)
    display.SetAndObserveColorNodeID(color_node_id(scene, "Inferno"))
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.SetThreshold(threshold, 1.0e6)
    display.SetApplyThreshold(1)
    _set_slice_layers(scene, background=fixed, foreground=saliency, foreground_opacity=opacity)
    return display


#: what the confidence overlay means, for its colour legend and the node's description
CONFIDENCE_MEANING = ("Alignment confidence: how much the image content drove the deformation here (the weight of "
                      "the similarity: joint saliency, fields of view, masks). Bright: structure seen in both "
                      "images. Dark: structure in one image only (tumour, resection, contrast agent), flat tissue "
                      "or outside a mask: the deformation there follows its surroundings; check it by eye.")


def show_confidence(scene, confidence, fixed=None, opacity: float = 0.4):
    """Show the confidence map (0..1) in inferno colours over the fixed volume, with a colour legend titled
    "Alignment confidence" (its meaning in ``CONFIDENCE_MEANING``, also the node's description). Returns the
    confidence display node."""
    display = _scalar_display_node(confidence)
    display.SetAndObserveColorNodeID(color_node_id(scene, "Inferno"))
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    confidence.SetDescription(CONFIDENCE_MEANING)
    legend = None
    for index in range(confidence.GetNumberOfDisplayNodes()):
        node = confidence.GetNthDisplayNode(index)
        if node is not None and node.IsA("vtkMRMLColorLegendDisplayNode"):
            legend = node
    if legend is None:
        if not scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):  # Slicer's Colors module does it
            import slicer

            scene.RegisterNodeClass(slicer.vtkMRMLColorLegendDisplayNode())
        legend = scene.AddNewNodeByClass("vtkMRMLColorLegendDisplayNode")
        confidence.AddAndObserveDisplayNodeID(legend.GetID())
    legend.SetAndObservePrimaryDisplayNode(display)
    legend.SetTitleText("Alignment confidence (dark: not driven by the images)")
    legend.SetVisibility(True)
    _set_slice_layers(scene, background=fixed, foreground=confidence, foreground_opacity=opacity)
    return display


def show_jacobian(scene, jacobian):
    """Colour the Jacobian determinant with a diverging map centred on 1 (blue: shrinks, red: grows).

    The window spans 0..2, so folding (determinant <= 0) takes the darkest blue. Returns the display node.
    """
    display = _scalar_display_node(jacobian)
    display.SetAndObserveColorNodeID(color_node_id(scene, "DivergingBlueRed"))
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 2.0)
    return display


# ---------------------------------------------------------------------------------------------------------
# Results: a RegistrationResult or a command-line output folder -> nodes
# ---------------------------------------------------------------------------------------------------------


@dataclass
class RegistrationOptions:
    """What the library is asked to do (mirrors ``register()`` and ``deepsalreg register``)."""

    model: str = "default"
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    quality: str = DEFAULT_QUALITY  # quality.PRESETS: the refinement stops by itself when converged
    iterations: int | None = None  # expert: a fixed refinement step count instead (0 = none)
    affine: bool = True  # affine pre-alignment before the network
    time_budget: float | None = None  # seconds: the refinement ends early to finish about then

    def __post_init__(self):
        if self.device not in ("auto", "cpu", "cuda"):
            raise InputError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        self.quality = preset(self.quality).name
        if self.iterations is not None:
            if int(self.iterations) < 0:
                raise InputError(f"iterations must be >= 0, got {self.iterations}")
            self.iterations = int(self.iterations)
        if self.time_budget is not None:
            if not float(self.time_budget) > 0:
                raise InputError(f"the time budget must be a positive number of seconds, got {self.time_budget}")
            self.time_budget = float(self.time_budget)
        self.affine = bool(self.affine)


@dataclass
class RegistrationOutputs:
    """The images and numbers of one registration, whichever way it ran."""

    displacement: sitk.Image
    warped: sitk.Image | None = None
    saliency: sitk.Image | None = None
    jacobian: sitk.Image | None = None
    confidence: sitk.Image | None = None
    tre_before: np.ndarray | None = None
    tre_after: np.ndarray | None = None
    summary: dict = field(default_factory=dict)
    result: object | None = None  # the library's RegistrationResult of an in-process run
    folder: Path | None = None  # the output folder of a command-line run


@dataclass
class OutputNodes:
    """Nodes to fill with the results; ``None`` means create one (the warped volume only when asked)."""

    transform: object | None = None
    warped: object | None = None
    saliency: object | None = None
    jacobian: object | None = None
    tre_table: object | None = None
    create_warped: bool = False
    confidence: object | None = None


@dataclass
class ResultNodes:
    """The nodes that hold one registration's results."""

    transform: object
    warped: object | None
    saliency: object | None
    jacobian: object | None
    tre_table: object | None
    outputs: RegistrationOutputs
    confidence: object | None = None

    @property
    def mean_tre(self) -> tuple[float, float] | None:
        """``(before, after)`` mean TRE in mm, when landmarks were given."""
        if self.outputs.tre_before is None:
            return None
        return float(np.mean(self.outputs.tre_before)), float(np.mean(self.outputs.tre_after))


def _tre_arrays(tre) -> tuple[np.ndarray | None, np.ndarray | None]:
    if tre is None:
        return None, None
    get = tre.get if isinstance(tre, dict) else (lambda key, default=None: getattr(tre, key, default))
    before = get("before_mm", None)
    if before is None:
        before = get("before", None)
    after = get("after_mm", None)
    if after is None:
        after = get("after", None)
    if before is None or after is None:
        return None, None
    return np.asarray(before, dtype=float).ravel(), np.asarray(after, dtype=float).ravel()


def outputs_from_result(result) -> RegistrationOutputs:
    """Collect an in-process ``RegistrationResult``."""
    before, after = _tre_arrays(getattr(result, "tre", None))
    return RegistrationOutputs(
        displacement=result.displacement,
        warped=getattr(result, "warped", None),
        saliency=getattr(result, "saliency", None),
        jacobian=getattr(result, "jacobian", None),
        confidence=getattr(result, "confidence", None),
        tre_before=before,
        tre_after=after,
        summary={"timings": dict(getattr(result, "timings", None) or {}),
                 "metrics": dict(getattr(result, "metrics", None) or {})},
        result=result,
    )


def _read_tre_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"before_mm", "after_mm"} <= set(rows[0]):
        raise OutputError(f"{path} has no before_mm/after_mm columns")
    return (np.array([float(r["before_mm"]) for r in rows]), np.array([float(r["after_mm"]) for r in rows]))


def outputs_from_folder(folder) -> RegistrationOutputs:
    """Read what ``deepsalreg register ... -o folder`` wrote (the field from ``displacement.nrrd``,
    else from ``transform.h5``; images, ``tre.csv`` and ``summary.json`` when present)."""
    folder = Path(folder)

    def optional_image(name):
        path = folder / name
        return sitk.ReadImage(str(path)) if path.is_file() else None

    displacement = optional_image("displacement.nrrd")
    if displacement is None and (folder / "transform.h5").is_file():
        transform = sitk.ReadTransform(str(folder / "transform.h5"))
        if transform.GetName() == "CompositeTransform":
            transform = sitk.CompositeTransform(transform).GetNthTransform(0)
        displacement = sitk.DisplacementFieldTransform(transform).GetDisplacementField()
    if displacement is None:
        raise OutputError(f"no displacement.nrrd or transform.h5 in {folder}")
    if displacement.GetPixelID() != sitk.sitkVectorFloat64:
        displacement = sitk.Cast(displacement, sitk.sitkVectorFloat64)
    before = after = None
    if (folder / "tre.csv").is_file():
        before, after = _read_tre_csv(folder / "tre.csv")
    summary = {}
    if (folder / "summary.json").is_file():
        summary = json.loads((folder / "summary.json").read_text())
    return RegistrationOutputs(
        displacement=displacement,
        warped=optional_image("warped.nrrd"),
        saliency=optional_image("saliency.nrrd"),
        jacobian=optional_image("jacobian.nrrd"),
        confidence=optional_image("confidence.nrrd"),
        tre_before=before,
        tre_after=after,
        summary=summary,
        folder=folder,
    )


def _follow_fixed_volume(fixed, nodes) -> None:
    """Results live in the fixed volume's own coordinates: if the fixed volume is under a transform (e.g. a
    manual pre-alignment), put them under the same transform so that everything stays together."""
    parent = fixed.GetParentTransformNode() if fixed is not None else None
    ancestor = parent
    while ancestor is not None:  # never create a loop (fixed volume under the result transform)
        if any(ancestor is node for node in nodes):
            return
        ancestor = ancestor.GetParentTransformNode()
    for node in nodes:
        if node is not None:
            node.SetAndObserveTransformNodeID(parent.GetID() if parent is not None else None)


def import_outputs(scene, outputs: RegistrationOutputs, fixed, moving, nodes: OutputNodes | None = None,
                   moving_landmarks=None, landmark_labels: Sequence[str] | None = None, show: bool = True) -> ResultNodes:
    """Turn registration outputs into nodes and (``show=True``) set up the views.

    * the displacement field becomes the **from parent** transform of the output transform node, tagged with
      the fixed/moving node references and applied to the moving volume (and its landmarks), so the moving
      volume appears aligned on the fixed one; its display shows the deformation grid in the slice views;
    * saliency (inferno overlay on the fixed volume), Jacobian (diverging map) and, when asked, the warped
      volume become volume nodes on the fixed grid; when the fixed volume is under a transform, the results
      (and the output transform) go under that transform too;
    * per-point and mean TRE, when landmarks were given, become a table.
    """
    nodes = nodes or OutputNodes()
    prefix = f"{moving.GetName()} to {fixed.GetName()}" if moving is not None and fixed is not None else "DeepSalReg"
    z_ras = _slice_z(fixed)

    transform = displacement_to_transform_node(
        outputs.displacement, scene, node=nodes.transform, name=scene.GenerateUniqueName(f"{prefix} transform"), z_ras=z_ras
    )
    _set_registration_references(transform, fixed, moving)

    def volume(image, node, suffix, wanted=True):
        if image is None or (node is None and not wanted):
            return None
        return image_to_volume_node(image, scene, name=scene.GenerateUniqueName(f"{prefix} {suffix}"), node=node, z_ras=z_ras)

    warped = volume(outputs.warped, nodes.warped, "warped", wanted=nodes.create_warped)
    saliency = volume(outputs.saliency, nodes.saliency, "saliency")
    jacobian = volume(outputs.jacobian, nodes.jacobian, "Jacobian")
    confidence = volume(outputs.confidence, nodes.confidence, "confidence")
    table = None
    if outputs.tre_before is not None:
        labels = landmark_labels if landmark_labels is not None and len(landmark_labels) == len(outputs.tre_before) else None
        table = tre_to_table(scene, outputs.tre_before, outputs.tre_after, labels, node=nodes.tre_table,
                             name=scene.GenerateUniqueName(f"{prefix} TRE"))

    if moving is not None:
        # above the moving volume's own linear transforms (kept: they were the start), else on the volume
        chain, _ = own_linear_transforms(moving, fixed, transform)
        (chain[-1] if chain else moving).SetAndObserveTransformNodeID(transform.GetID())
    if moving_landmarks is not None and moving_landmarks.GetParentTransformNode() in (None, transform):
        moving_landmarks.SetAndObserveTransformNodeID(transform.GetID())
    _follow_fixed_volume(fixed, [transform, warped, saliency, jacobian, confidence])
    if show:
        show_transform_grid(transform, region=fixed)
        if confidence is not None:
            show_confidence(scene, confidence, fixed)
        elif saliency is not None:
            show_saliency(scene, saliency, fixed)
        if jacobian is not None:
            show_jacobian(scene, jacobian)
    return ResultNodes(transform, warped, saliency, jacobian, table, outputs, confidence)


# ---------------------------------------------------------------------------------------------------------
# Running the library
# ---------------------------------------------------------------------------------------------------------


def own_linear_transforms(moving, fixed=None, output=None):
    """The moving volume's own parent transforms and the RAS matrix they apply: ``(chain, matrix)``.

    Its own are the transforms above it up to (not including) the output transform node or an earlier
    registration result of this moving volume (a transform whose moving-node reference is this volume, as
    registration modules tag them): both are replaced now; or a transform the fixed volume is also under (a
    shared frame). They are kept
    and used as the start (e.g. a manual pre-alignment from the Transforms module): the moving image is
    registered as displayed through them, and the result transform goes above the topmost of them.
    ``matrix`` maps the volume's coordinates to the frame above the chain (identity without a chain).

    Raises:
        InputError: one of them is not linear (harden it or remove it first).
    """
    import vtk

    shared = set()
    node = fixed.GetParentTransformNode() if fixed is not None else None
    while node is not None:
        shared.add(node.GetID())
        node = node.GetParentTransformNode()
    def earlier_result(transform) -> bool:
        role = type(transform).GetMovingNodeReferenceRole()
        return transform.GetNodeReferenceID(role) == moving.GetID()

    chain = []
    node = moving.GetParentTransformNode()
    while node is not None and node is not output and node.GetID() not in shared and not earlier_result(node):
        chain.append(node)
        node = node.GetParentTransformNode()
    if not chain:
        return [], np.eye(4)
    for transform in chain:
        if not transform.IsTransformToWorldLinear() and not transform.IsLinear():
            raise InputError(f"the moving volume is under the non-linear transform {transform.GetName()!r}; harden "
                             "it (Transforms module) or remove it before registering")
    matrix = vtk.vtkMatrix4x4()
    type(chain[0]).GetMatrixTransformBetweenNodes(chain[0], chain[-1].GetParentTransformNode(), matrix)
    return chain, _numpy_matrix(matrix)


def _moving_inputs(fixed, moving, fixed_landmarks, moving_landmarks, output=None):
    """``(fixed_image, moving_image, fixed_points, moving_points, labels)`` as registered: the moving volume
    and its landmarks through the moving volume's own linear transforms (``own_linear_transforms``)."""
    import vtk

    fixed_image = volume_node_to_image(fixed)
    dimension = fixed_image.GetDimension()
    chain, matrix = own_linear_transforms(moving, fixed, output)
    moving_image = volume_node_to_image(moving, dimension=dimension, to_frame=matrix if chain else None)
    fixed_points, moving_points, labels = _landmark_inputs(fixed_landmarks, moving_landmarks, dimension)
    if chain and moving_points is not None:
        to_frame = vtk.vtkMatrix4x4()
        if not type(chain[0]).GetMatrixTransformBetweenNodes(moving_landmarks.GetParentTransformNode(),
                                                            chain[-1].GetParentTransformNode(), to_frame):
            raise InputError("the moving landmarks are under a non-linear transform; harden it first")
        moving_points = _in_frame(moving_points, _numpy_matrix(to_frame))
    return fixed_image, moving_image, fixed_points, moving_points, labels


def _in_frame(points_lps: np.ndarray | None, matrix: np.ndarray) -> np.ndarray | None:
    """LPS points mapped by a RAS 4x4 matrix."""
    if points_lps is None or np.allclose(matrix, np.eye(4)):
        return points_lps
    nd = points_lps.shape[1]
    ras = lps_to_ras(points_lps)
    moved = ras @ matrix[:3, :3].T + matrix[:3, 3]
    return ras_to_lps(moved, nd)


def _landmark_inputs(fixed_landmarks, moving_landmarks, dimension: int):
    """Landmark arrays of two markups nodes (both or none), checked to correspond row by row."""
    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise InputError("give both fixed and moving landmarks, or neither")
    if fixed_landmarks is None:
        return None, None, None
    fixed_points, labels = markups_to_landmarks(fixed_landmarks, dimension)
    moving_points, _ = markups_to_landmarks(moving_landmarks, dimension)
    if len(fixed_points) != len(moving_points) or len(fixed_points) == 0:
        raise InputError(
            f"landmarks must correspond one to one: {len(fixed_points)} fixed, {len(moving_points)} moving points"
        )
    return fixed_points, moving_points, labels


def _mask_image(node, dimension: int, name: str):
    """A mask volume node (label map or scalar volume; nonzero = use) as a SimpleITK image, or None."""
    if node is None:
        return None
    image = volume_node_to_image(node, dimension=dimension)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"the {name} {node.GetName()!r} has several components; use a label map")
    return sitk.Cast(sitk.NotEqual(image, 0), sitk.sitkUInt8)


def register_nodes(scene, fixed, moving, options: RegistrationOptions | None = None, nodes: OutputNodes | None = None,
                   fixed_landmarks=None, moving_landmarks=None, register: Callable | None = None,
                   progress: Callable[[float, str], None] | None = None, show: bool = True,
                   fixed_mask=None, moving_mask=None) -> ResultNodes:
    """Register two volume nodes in this process (batch, PythonSlicer) and import the results.

    Args:
        fixed_mask, moving_mask: optional label map (or scalar volume) nodes: the similarity counts only where
            they are nonzero (e.g. leave out a tumour or resection cavity); on their own grids.
        register: the library call (default ``DeepSalRegLib.register``); tests pass a stand-in.
        progress: ``progress(fraction, message)``, passed on to the library.
    """
    options = options or RegistrationOptions()
    fixed_image, moving_image, fixed_points, moving_points, labels = _moving_inputs(
        fixed, moving, fixed_landmarks, moving_landmarks, (nodes or OutputNodes()).transform)
    if register is None:
        from . import register
    masks = {}
    if fixed_mask is not None:
        masks["fixed_mask"] = _mask_image(fixed_mask, fixed_image.GetDimension(), "fixed mask")
    if moving_mask is not None:
        masks["moving_mask"] = _mask_image(moving_mask, fixed_image.GetDimension(), "moving mask")
    result = register(fixed_image, moving_image, model=options.model, device=options.device, **masks,
                      iterations=options.iterations, quality=options.quality, time_budget=options.time_budget,
                      affine=options.affine, fixed_landmarks=fixed_points,
                      moving_landmarks=moving_points, progress=progress)
    return import_outputs(scene, outputs_from_result(result), fixed, moving, nodes, moving_landmarks, labels, show)


_PROGRESS_LINE = re.compile(r"^PROGRESS\s+([0-9]+(?:\.[0-9]*)?)\s*(.*)$")


def parse_progress_line(line: str) -> tuple[float, str] | None:
    """``(fraction 0..1, message)`` of a ``PROGRESS <0-100> <message>`` line, else ``None``."""
    match = _PROGRESS_LINE.match(line.strip())
    if match is None:
        return None
    return min(max(float(match.group(1)) / 100.0, 0.0), 1.0), match.group(2).strip()


def cli_arguments(fixed_path, moving_path, output_folder, options: RegistrationOptions,
                  fixed_landmarks_path=None, moving_landmarks_path=None, report: bool = False,
                  fixed_mask_path=None, moving_mask_path=None) -> list[str]:
    """Arguments of ``deepsalreg register`` (after the program) for one pair, with progress lines on.

    ``report=False`` skips ``report.png``: Slicer shows the results itself.
    """
    args = ["register", str(fixed_path), str(moving_path), "-o", str(output_folder),
            "--model", options.model, "--device", options.device, "--quality", options.quality, "--progress-lines"]
    if options.iterations is not None:
        args += ["--iterations", str(options.iterations)]
    if options.time_budget is not None:
        args += ["--time-budget", repr(options.time_budget)]
    if not options.affine:
        args.append("--no-affine")
    if not report:
        args.append("--no-report")
    if fixed_landmarks_path is not None and moving_landmarks_path is not None:
        args += ["--fixed-landmarks", str(fixed_landmarks_path), "--moving-landmarks", str(moving_landmarks_path)]
    if fixed_mask_path is not None:
        args += ["--fixed-mask", str(fixed_mask_path)]
    if moving_mask_path is not None:
        args += ["--moving-mask", str(moving_mask_path)]
    return args


_EXIT_ERRORS = {2: InputError, 3: ModelError, 4: DeviceError, 5: OutputError}


def error_for_exit_code(code: int, output_lines: Sequence[str]) -> Exception:
    """The exception that a command-line exit code stands for, carrying the process's last words."""
    lines = [line for line in output_lines if line.strip()]
    if code in _EXIT_ERRORS:
        message = lines[-1].strip() if lines else f"exit code {code}"
        # "deepsalreg: error: <what>" (or argparse's "usage ... error: <what>") -> "<what>"
        message = re.sub(r"^[\w .:-]*?\berror:\s*", "", message, count=1, flags=re.I) or message
        return _EXIT_ERRORS[code](message)
    if code < 0:
        return RuntimeError(f"the registration process was stopped by signal {-code}")
    tail = "\n".join(lines[-20:])
    return RuntimeError(f"the registration process failed (exit code {code}):\n{tail}")


class Process(Protocol):
    """What ``RegistrationJob`` needs from a started process (``ChildProcess``, or a fake in tests)."""

    def read_lines(self) -> list[str]: ...

    def poll(self) -> int | None: ...

    def cancel(self) -> None: ...


class ChildProcess:
    """A command running in the background; a reader thread collects its output lines for ``read_lines``.

    stderr is merged into stdout. Undecodable bytes are replaced (Slicer users run non-UTF-8 locales).
    ``cancel`` kills the whole process tree: PythonSlicer is a launcher that starts the real interpreter as
    its own child, so killing only the launcher would leave the work running.
    """

    def __init__(self, args: Sequence[str], env: dict | None = None, cwd=None):
        kwargs = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                      cwd=None if cwd is None else str(cwd), text=True, encoding="utf-8", errors="replace", bufsize=1)
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True  # its own process group, so cancel reaches grandchildren
        self.args = [str(a) for a in args]
        self._popen = subprocess.Popen(self.args, **kwargs)
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="DeepSalReg output reader", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._popen.pid

    def _read(self) -> None:
        with self._popen.stdout as stream:
            for line in stream:
                self._lines.put(line.rstrip("\r\n"))

    def read_lines(self) -> list[str]:
        lines = []
        while True:
            try:
                lines.append(self._lines.get_nowait())
            except queue.Empty:
                return lines

    def poll(self) -> int | None:
        """The exit code once the process has ended and all its output has been read, else ``None``."""
        if self._reader.is_alive():
            return None
        return self._popen.wait()

    def cancel(self) -> None:
        if self._popen.poll() is not None and not self._reader.is_alive():
            return
        try:
            import psutil  # shipped with Slicer; optional elsewhere

            parent = psutil.Process(self._popen.pid)
            for child in parent.children(recursive=True):
                child.kill()
            parent.kill()
        except ImportError:
            if os.name == "nt":
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._popen.pid)], capture_output=True,
                               creationflags=subprocess.CREATE_NO_WINDOW)
            else:
                try:
                    os.killpg(self._popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        except Exception:  # psutil.NoSuchProcess: it ended meanwhile
            pass
        if os.name != "nt":
            try:  # grandchildren that psutil missed (double fork) share the process group
                os.killpg(self._popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def library_parent_folder() -> Path:
    """The folder that holds the ``DeepSalRegLib`` package (put on the child's ``PYTHONPATH``)."""
    return Path(__file__).resolve().parent.parent


class RegistrationJob:
    """One registration of two volume nodes by the command line in a child process, polled by the caller.

    ``start()`` writes the inputs (volumes with their geometry, landmarks as CSV) into ``workdir`` and
    launches ``python -m DeepSalRegLib.cli register ... --progress-lines``; ``poll()`` (call it from a timer
    in the GUI thread) forwards progress and, at the end, imports the results into the scene; ``wait()``
    polls until done (console and scripts); ``cancel()`` kills the process tree.

    States: ``"ready"``, ``"running"``, ``"succeeded"``, ``"failed"`` (see ``error``), ``"cancelled"``.

    Args:
        scene, fixed, moving: the MRML scene and the two volume nodes.
        options: model, device and iterations.
        nodes: nodes to fill with the results (``None`` members are created).
        fixed_landmarks, moving_landmarks: optional markups nodes (both or neither).
        fixed_mask, moving_mask: optional label map nodes: the similarity counts only where they are nonzero.
        python: interpreter for the child (in Slicer: the ``PythonSlicer`` launcher).
        env: environment of the child (default: this process's); ``DeepSalRegLib``'s folder is prepended
            to ``PYTHONPATH`` and, for ``device="cpu"``, CUDA is hidden.
        command: the program to run instead of ``[python, "-m", "DeepSalRegLib.cli"]`` (tests).
        start_process: ``start_process(args, env, cwd) -> Process`` (default ``ChildProcess``; tests inject fakes).
        workdir: folder for inputs and outputs, kept afterwards (default: a new temporary folder inside
            ``temp_root``, removed when the job ends).
        temp_root: where the temporary folder is made (default: the system's temporary folder).
        on_progress: ``on_progress(fraction, message)``.
        on_log: ``on_log(line)`` for every other output line.
        show: set up the views when the results arrive.
    """

    def __init__(self, scene, fixed, moving, options: RegistrationOptions | None = None, nodes: OutputNodes | None = None,
                 fixed_landmarks=None, moving_landmarks=None, python: str | None = None, env: dict | None = None,
                 command: Sequence[str] | None = None, start_process: Callable[..., Process] | None = None,
                 workdir=None, temp_root=None, on_progress: Callable[[float, str], None] | None = None,
                 on_log: Callable[[str], None] | None = None, show: bool = True, fixed_mask=None, moving_mask=None):
        if fixed is None or moving is None:
            raise InputError("select a fixed and a moving volume")
        self.scene, self.fixed, self.moving = scene, fixed, moving
        self.options = options or RegistrationOptions()
        self.nodes = nodes or OutputNodes()
        self.fixed_landmarks, self.moving_landmarks = fixed_landmarks, moving_landmarks
        self.fixed_mask, self.moving_mask = fixed_mask, moving_mask
        self.command = list(command) if command else [python or sys.executable, "-m", "DeepSalRegLib.cli"]
        self.env = dict(os.environ if env is None else env)
        self.start_process = start_process or ChildProcess
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        self.temp_root = temp_root
        self.on_progress, self.on_log, self.show = on_progress, on_log, show
        self.state = "ready"
        self.error: Exception | None = None
        self.result: ResultNodes | None = None
        self.progress = 0.0
        self.message = ""
        self.output_lines: collections.deque[str] = collections.deque(maxlen=200)
        self.started_at = self.finished_at = None
        self._process: Process | None = None
        self._labels = None

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")

    @property
    def output_folder(self) -> Path:
        return self.workdir / "output"

    def _child_environment(self) -> dict:
        env = dict(self.env)
        library_folder = str(library_parent_folder())
        env["PYTHONPATH"] = os.pathsep.join(p for p in (library_folder, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        if self.options.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = "-1"
        return env

    def write_inputs(self) -> list[str]:
        """Write the inputs into ``workdir/input`` and return the command-line arguments that use them."""
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="DeepSalReg-", dir=self.temp_root))
        inputs = self.workdir / "input"
        inputs.mkdir(parents=True, exist_ok=True)
        fixed_image, moving_image, fixed_points, moving_points, self._labels = _moving_inputs(
            self.fixed, self.moving, self.fixed_landmarks, self.moving_landmarks, self.nodes.transform)
        dimension = fixed_image.GetDimension()
        sitk.WriteImage(fixed_image, str(inputs / "fixed.nrrd"))
        sitk.WriteImage(moving_image, str(inputs / "moving.nrrd"))
        landmark_paths = (None, None)
        if fixed_points is not None:
            from .io import write_landmarks

            landmark_paths = (inputs / "fixed_landmarks.csv", inputs / "moving_landmarks.csv")
            write_landmarks(fixed_points, landmark_paths[0], self._labels)
            write_landmarks(moving_points, landmark_paths[1], self._labels)
        mask_paths = []
        for node, name in ((self.fixed_mask, "fixed_mask"), (self.moving_mask, "moving_mask")):
            mask = _mask_image(node, dimension, name.replace("_", " "))
            if mask is not None:
                sitk.WriteImage(mask, str(inputs / f"{name}.nrrd"), True)
            mask_paths.append(None if mask is None else inputs / f"{name}.nrrd")
        return cli_arguments(inputs / "fixed.nrrd", inputs / "moving.nrrd", self.output_folder, self.options,
                             *landmark_paths, fixed_mask_path=mask_paths[0], moving_mask_path=mask_paths[1])

    def start(self) -> "RegistrationJob":
        if self.state != "ready":
            raise RuntimeError(f"this job was already started (state {self.state})")
        try:
            args = self.write_inputs()
            self.started_at = time.monotonic()
            self._process = self.start_process(self.command + args, env=self._child_environment(),
                                               cwd=library_parent_folder())
        except Exception as error:
            self._finish("failed", error)
            raise
        self.state = "running"
        self._report(0.0, "started")
        return self

    def _report(self, fraction: float, message: str) -> None:
        self.progress, self.message = fraction, message
        if self.on_progress is not None:
            self.on_progress(fraction, message)

    def poll(self) -> bool:
        """Forward new output; at the end import the results. Returns ``True`` once the job has finished."""
        if self.state != "running":
            return self.finished
        for line in self._process.read_lines():
            progress = parse_progress_line(line)
            if progress is not None:
                self._report(*progress)
                continue
            self.output_lines.append(line)
            if self.on_log is not None:
                self.on_log(line)
        code = self._process.poll()
        if code is None:
            return False
        if code != 0:
            self._finish("failed", error_for_exit_code(code, list(self.output_lines)))
            return True
        try:
            outputs = outputs_from_folder(self.output_folder)
            self.result = import_outputs(self.scene, outputs, self.fixed, self.moving, self.nodes,
                                         self.moving_landmarks, self._labels, self.show)
        except Exception as error:  # results missing or unreadable: report, do not leave the job running
            self._finish("failed", error)
            return True
        self._report(1.0, "done")
        self._finish("succeeded", None)
        return True

    def wait(self, timeout: float | None = None, idle: Callable[[], None] | None = None,
             interval: float = 0.05) -> ResultNodes:
        """Poll until the job ends; ``idle()`` runs between polls (e.g. ``slicer.app.processEvents``).

        Returns the result nodes, or raises the job's error (``DeepSalRegError`` for user errors).
        """
        if self.state == "ready":
            self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"registration did not finish within {timeout} s")
            if idle is not None:
                idle()
            time.sleep(interval)
        if self.state == "cancelled":
            raise RuntimeError("registration was cancelled")
        if self.error is not None:
            raise self.error
        return self.result

    def cancel(self) -> None:
        if self.state == "running":
            self._process.cancel()
            self._finish("cancelled", None)
            self._report(self.progress, "cancelled")

    def _finish(self, state: str, error: Exception | None) -> None:
        self.state, self.error = state, error
        self.finished_at = time.monotonic()
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def seconds(self) -> float | None:
        """Wall time of the run so far (or in total, once finished)."""
        if self.started_at is None:
            return None
        return (self.finished_at or time.monotonic()) - self.started_at
