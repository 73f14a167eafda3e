"""Transform nodes <-> the library's displacement fields ("from parent" = fixed -> moving), transform files,
and the moving volume's own transforms kept as the start of a registration.

Part of ``DeepSalRegLib.slicer_glue`` (conventions in its package docstring).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .coordinates import _FLIP, _numpy_matrix, _vtk_matrix, ijk_to_ras_matrix, lps_to_ras, ras_to_lps
from .volumes import _vtk_image_from_array


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
