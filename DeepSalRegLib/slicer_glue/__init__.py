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

Modules, one concept each: ``coordinates`` (RAS/LPS, matrices), ``volumes``, ``transforms``, ``landmarks``,
``display``, ``results`` (files or a ``RegistrationResult`` -> nodes), ``running`` (in-process, or as a child
process with progress lines and cancel). The faces use the names re-exported here.
"""
from __future__ import annotations

from .coordinates import ijk_to_ras_matrix, lps_to_ras, ras_to_lps
from .volumes import image_to_volume_node, volume_node_to_image
from .transforms import displacement_to_transform_node, load_transform_file, own_linear_transforms, transform_node_to_displacement
from .landmarks import landmarks_to_markups, markups_to_landmarks, tre_to_table
from .display import CONFIDENCE_MEANING, color_node_id, show_confidence, show_jacobian, show_saliency, show_transform_grid
from .running import ChildProcess, RegistrationJob, RegistrationOptions, cli_arguments, error_for_exit_code, library_parent_folder, parse_progress_line, register_nodes
from .results import OutputNodes, RegistrationOutputs, ResultNodes, import_outputs, outputs_from_folder, outputs_from_result

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
    "CONFIDENCE_MEANING",
    "library_parent_folder",
]
