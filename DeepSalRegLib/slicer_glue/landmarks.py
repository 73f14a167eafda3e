"""Markups point lists <-> landmark arrays (LPS mm, node-local coordinates), and the TRE table.

Part of ``DeepSalRegLib.slicer_glue`` (conventions in its package docstring).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import InputError
from .coordinates import lps_to_ras, ras_to_lps


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
