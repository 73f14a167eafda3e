"""Registration outputs (a RegistrationResult or a command-line output folder) -> nodes in the scene.

Part of ``DeepSalRegLib.slicer_glue`` (conventions in its package docstring).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import OutputError
from .display import show_confidence, show_jacobian, show_saliency, show_transform_grid
from .landmarks import tre_to_table
from .transforms import _set_registration_references, displacement_to_transform_node, own_linear_transforms
from .volumes import _slice_z, image_to_volume_node


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
