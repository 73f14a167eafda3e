"""RAS <-> LPS and the 4x4 matrices between Slicer's IJK-to-RAS and SimpleITK geometry.

Part of ``DeepSalRegLib.slicer_glue`` (conventions in its package docstring).
"""
from __future__ import annotations


import numpy as np
import SimpleITK as sitk

from ..errors import InputError


# Flips LPS <-> RAS (its own inverse).
_FLIP = np.array([-1.0, -1.0, 1.0])


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
