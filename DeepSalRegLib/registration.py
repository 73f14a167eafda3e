"""``register()``: one call from two images (files or SimpleITK images) to standard, physical results.

Pipeline (``stages.py``; each step's time is recorded in ``RegistrationResult.timings``)::

    read, check inputs, load the model
    -> prepare: working grid (fixed extent, near-isotropic, multiple of the network's stride), memory and
       overlap checks, both images resampled onto it and normalised (a ``stages.WorkingPair``)
    -> affine: [affine pre-alignment]
    -> network: coarse field, JSM, refined field on the pre-aligned pair, kept if it lowers the LNCC
    -> refine: [instance optimisation, stopping by itself per pyramid level]
    -> export: physical displacement field on the FIXED image grid, ITK DisplacementFieldTransform
       (fixed -> moving, LPS mm), warped moving, saliency, Jacobian, confidence

The transform maps FIXED physical points to MOVING physical points (ITK's resampling convention, Slicer's
"from parent"): ``sitk.Resample(moving, fixed, result.transform)`` reproduces ``result.warped``, and a fixed
landmark ``p`` corresponds to the moving point ``result.transform.TransformPoint(p)``.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from . import geometry, io
from .errors import DeviceError, InputError, OutputError

__all__ = ["register", "RegistrationResult", "resolve_device", "DEFAULT_MAX_VOXELS"]

#: Working-grid voxel budget per dimension (larger inputs are resampled more coarsely, with a warning). In 3D
#: 2^20 (about 100^3), the most the refinement's finest level takes (``optimise.instance_optimise``'s
#: ``max_level_voxels``): with 160^3 (until session 15) a finer grid only fed the network, whose start then
#: misled the refinement on large motion (the full-resolution liver pairs on a 1.37 mm grid: TRE 3.22 mm; 2^20,
#: a 1.87 mm grid: 2.57 mm; a 1 mm brain pair on a 2.02 mm grid: Dice 0.708 -> 0.718 in the same ~12 s; NOTES
#: session 15).
DEFAULT_MAX_VOXELS = {2: 1024 * 1024, 3: 2 ** 20}

ProgressCallback = Callable[[float, str], None]


def resolve_device(device: str = "auto"):
    """``"auto"`` -> CUDA if usable else CPU; ``"cuda"`` without a GPU raises ``DeviceError``."""
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device in ("gpu", "cuda") or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for but no CUDA GPU is available here; use --device cpu or auto.")
        return torch.device("cuda" if device == "gpu" else device)
    if device == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"unknown device {device!r}; use auto, cpu or cuda.")


@dataclass
class RegistrationResult:
    """Everything one registration produced, in physical space on the fixed image grid.

    Attributes:
        fixed, moving: the input images as read (scalar float32).
        displacement: vector image (float64, LPS mm) on the fixed grid (on the working grid for a fixed image
            of more than ``memory.FIELD_ON_FIXED_GRID_UP_TO`` times its voxels); fixed point ``p`` -> ``p + d(p)``.
        transform: the transform written to ``transform.h5`` (fixed -> moving): with the affine stage the ITK
            composite of its affine map (LPS) and a residual displacement field, equal to ``displacement`` on
            its grid and exactly the affine map outside it (``stages.written_transform``); else the
            ``DisplacementFieldTransform`` of ``displacement``.
        warped: the moving image resampled onto the fixed grid through ``transform``.
        saliency: joint saliency map of fixed and warped (0..1), on the grid of ``displacement``.
        jacobian: Jacobian determinant of ``p -> T(p)`` (<= 0 means folding), on the grid of ``displacement``.
        confidence: the weight the refinement's similarity had at the end (0..1), on the grid of
            ``displacement``: ``losses.confidence_weight`` (``use_jsm``: the JSM weight times the structure
            correspondence of the two images) inside both fields of view and masks, 0 outside them. Low
            means: structure in one image only (a lesion, a cavity, contrast agent), flat tissue, or outside
            a mask: the field there follows its surroundings, not the image content.
        timings: seconds per step (``read``, ``resample``, ``affine``, ``network``, ``optimise``, ``export``,
            ``total``).
        metrics: similarity before/after, folding fraction, SD of log-Jacobian, grid and model facts,
            ``network_kept`` (False when the network's field was dropped by the guard) and ``affine``.
        tre: with landmarks, ``{"before": array, "after": array}`` per-point errors in mm, else None.
        mapped_landmarks: fixed landmarks mapped to moving space ``T(p)`` (with landmarks), else None.
        inputs: what was registered (``fixed``, ``moving``, masks, landmarks: paths or objects as given).
        options: the options of the call (model, device, quality, iterations, affine, ...).
    """

    fixed: sitk.Image
    moving: sitk.Image
    displacement: sitk.Image
    transform: sitk.Transform
    warped: sitk.Image
    saliency: sitk.Image
    jacobian: sitk.Image
    timings: dict = dataclass_field(default_factory=dict)
    metrics: dict = dataclass_field(default_factory=dict)
    tre: dict | None = None
    mapped_landmarks: np.ndarray | None = None
    landmark_labels: list | None = None
    inputs: dict = dataclass_field(default_factory=dict)
    options: dict = dataclass_field(default_factory=dict)
    confidence: sitk.Image | None = None

    def summary(self) -> dict:
        """Plain-data summary (what ``summary.json`` holds)."""
        out = dict(metrics=self.metrics, timings={k: round(v, 4) for k, v in self.timings.items()})
        if self.tre is not None:
            out["tre_mm"] = {k: dict(mean=float(np.mean(v)), median=float(np.median(v)), max=float(np.max(v)))
                             for k, v in self.tre.items()}
        return out

    def save(self, outdir, report: bool = True, inputs=(), command=None) -> dict:
        """Write every result into ``outdir`` as a whole; returns ``{name: path}``.

        Files: ``transform.h5`` (ITK transform file), ``displacement.nrrd`` (the same field as an image),
        ``warped.nrrd``, ``saliency.nrrd``, ``jacobian.nrrd``, ``confidence.nrrd``, ``summary.json``, ``report.png`` and, with
        landmarks, ``landmarks_mapped.{csv,fcsv,mrk.json}`` and ``tre.csv``. ``inputs`` are paths that
        must never be overwritten; ``command`` (e.g. ``sys.argv``) is recorded in ``summary.json``.

        Everything is first written into a hidden staging folder inside ``outdir`` and then moved into place
        (a rename per file, milliseconds), ``summary.json`` last. ``summary.json`` records the inputs (paths,
        sha256), the options, versions, the command and the sha256 of every output, so a folder that mixes
        files of two runs (a run killed while moving its files over an earlier result) can be detected.
        Files of ``outdir`` that this run does not write are left alone.
        """
        import shutil
        import uuid

        outdir = io.check_output_folder(outdir)
        names = ["transform.h5", "displacement.nrrd", "warped.nrrd", "saliency.nrrd", "jacobian.nrrd"]
        if self.confidence is not None:
            names.append("confidence.nrrd")
        if self.mapped_landmarks is not None:
            names += [f"landmarks_mapped.{ext}" for ext in ("csv", "fcsv", "mrk.json")]
        if self.tre is not None:
            names.append("tre.csv")
        if report:
            names.append("report.png")
        finals = {name: io.check_output_path(outdir / name, inputs) for name in names + ["summary.json"]}
        try:
            outdir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"Cannot create the output folder {outdir}: {error.strerror or error}.") from None
        staging = outdir / f".deepsalreg-partial-{uuid.uuid4().hex[:8]}"
        try:
            staging.mkdir()

            def staged(name):
                return staging / name

            io.write_transform(self.transform, staged("transform.h5"))  # no second float64 copy of the field
            io.write_transform(self.displacement, staged("displacement.nrrd"))
            io.write_image(self.warped, staged("warped.nrrd"))
            io.write_image(self.saliency, staged("saliency.nrrd"))
            io.write_image(self.jacobian, staged("jacobian.nrrd"))
            if self.confidence is not None:
                io.write_image(self.confidence, staged("confidence.nrrd"))
            if self.mapped_landmarks is not None:
                for ext in ("csv", "fcsv", "mrk.json"):
                    io.write_landmarks(self.mapped_landmarks, staged(f"landmarks_mapped.{ext}"), self.landmark_labels)
            if self.tre is not None:
                rows = ["index,before_mm,after_mm"] + [
                    f"{i},{b:.4f},{a:.4f}" for i, (b, a) in enumerate(zip(self.tre["before"], self.tre["after"]))]
                _write_text(staged("tre.csv"), "\n".join(rows) + "\n")
            if report:
                from .report import write_report

                write_report(self, staged("report.png"))
            summary = self.summary()
            summary["outputs"] = {name: io.file_sha256(staged(name)) for name in names}
            summary["provenance"] = _provenance(self.inputs, self.options, command)
            _write_text(staged("summary.json"), json.dumps(_finite(summary), indent=2, allow_nan=False) + "\n")
            for name in names + ["summary.json"]:
                os.replace(staged(name), finals[name])
        except OSError as error:
            raise OutputError(f"Cannot write the results into {outdir}: {error.strerror or error}.") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return dict(finals)


def _finite(value):
    """JSON-safe copy: NaN and infinities (not valid JSON) become None."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _provenance(inputs: dict, options: dict, command) -> dict:
    """What produced a result: input files (path, sha256), options, versions, the command line."""
    import platform

    import torch

    from . import __version__

    files = {}
    for role, source in (inputs or {}).items():
        if source is None:
            continue
        if isinstance(source, (str, os.PathLike)) and Path(source).is_file():
            files[role] = dict(path=str(Path(source).resolve()), sha256=io.file_sha256(source))
        elif isinstance(source, (str, os.PathLike)):
            files[role] = dict(path=str(Path(source).resolve()))  # a DICOM folder
        else:
            files[role] = dict(path=None, note=f"in-memory {type(source).__name__}")
    return dict(inputs=files, options=options or {}, command=list(command) if command else None,
                versions=dict(deepsalreg=__version__, torch=torch.__version__, simpleitk=sitk.Version_VersionString(),
                              numpy=np.__version__, python=platform.python_version()))


def _write_text(path: Path, text: str) -> Path:
    return io._write_atomically(path, lambda tmp: Path(tmp).write_text(text), "file")


def _ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Normalised cross-correlation of two arrays inside ``mask`` (float32 values, float64 sums: no float64
    copy of a large fixed grid)."""
    if mask is not None:
        a, b = a[mask], b[mask]
    a = a.astype(np.float32).ravel()
    b = b.astype(np.float32).ravel()
    a -= np.float32(a.mean(dtype=np.float64))
    b -= np.float32(b.mean(dtype=np.float64))
    aa, bb = float(np.square(a).sum(dtype=np.float64)), float(np.square(b).sum(dtype=np.float64))
    ab = float(np.multiply(a, b).sum(dtype=np.float64))
    return ab / np.sqrt(aa * bb) if aa > 0 and bb > 0 else 0.0


def _voxels(image: sitk.Image) -> int:
    return int(np.prod(image.GetSize()))


def _landmarks(source, name):
    if source is None:
        return None, None
    if isinstance(source, (str, Path)):
        return io.read_landmarks(source)
    return np.atleast_2d(np.asarray(source, dtype=np.float64)), None


def register(
    fixed,
    moving,
    model: str = "default",
    device: str = "auto",
    iterations: int | None = None,
    fixed_mask=None,
    moving_mask=None,
    fixed_landmarks=None,
    moving_landmarks=None,
    progress: ProgressCallback | None = None,
    max_voxels: int | None = None,
    spacing=None,
    use_jsm: bool = True,
    affine: bool = True,
    quality: str | None = None,
    time_budget: float | None = None,
    memory_check: bool = True,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed``; returns physical-space results on the fixed grid.

    Args:
        fixed, moving: file paths (NRRD, NIfTI, MHA, PNG/JPEG, DICOM folder) or ``sitk.Image``. 2D or 3D
            (a one-slice volume counts as 2D); colour pictures become grey. Sizes, spacings, origins and
            directions may differ: both are resampled through physical space.
        model: a shipped model name (``"default"`` picks ``default-2d``/``default-3d``), a checkpoint path,
            or ``"none"`` (no network: instance optimisation from the identity).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        iterations: None (default): the refinement after the network stops by itself per pyramid level
            (``quality``); ``N > 0``: exactly N refinement steps (the expert's fixed count); 0: no refinement
            (affine + network only).
        quality: ``"fast"``, ``"balanced"`` (default) or ``"accurate"`` (``quality.PRESETS``): how long the
            refinement runs and on which velocity grid.
        fixed_mask, moving_mask: optional label images/paths; the refinement's similarity counts only inside.
        fixed_landmarks, moving_landmarks: optional landmark files (CSV LPS, .fcsv, .mrk.json) or ``(N, nd)``
            arrays of physical LPS points; with both, the TRE before and after is reported.
        progress: ``progress(fraction 0..1, message)`` callback.
        max_voxels: working-grid voxel budget (default: the quality preset's in 3D, ``QualityPreset.max_voxels_3d``,
            else ``DEFAULT_MAX_VOXELS``); larger inputs are registered on a coarser grid (with a warning) and the
            field is interpolated back.
        spacing: working-grid spacing in mm (default: isotropic at the fixed image's finest spacing).
        use_jsm: weight the refinement's similarity by the joint saliency map (False = ablation).
        affine: affine pre-alignment before the network (``affine.py``; ~0.2 s in 2D, 1-2 s for a 3D pair on
            2 CPU cores). False = the network alone (fastest; only for pairs already roughly aligned).
        memory_check: estimate the peak memory first (``memory.py``) and raise ``MemoryLimitError`` when it
            exceeds what is available, instead of being killed half-way.
        time_budget: optional seconds for the whole call: the refinement ends early (each remaining pyramid
            level gets an equal share of the time left) so the result arrives about then.
    """
    import torch

    from . import models, stages
    from .memory import field_on_fixed_grid
    from .metrics import jacobian_statistics
    from .quality import preset

    def report(fraction, message):
        if progress is not None:
            progress(min(1.0, max(0.0, fraction)), message)

    timings = {}
    t_start = t = time.perf_counter()

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - t
        t = now

    if iterations is not None and int(iterations) < 0:
        raise InputError(f"iterations must be a non-negative integer, got {iterations}.")
    iterations = None if iterations is None else int(iterations)
    settings = preset(quality)
    if time_budget is not None and not time_budget > 0:
        raise InputError(f"the time budget must be a positive number of seconds, got {time_budget}.")
    report(0.0, "reading images")
    fixed_img = io.read_image(fixed, "fixed image")
    moving_img = io.read_image(moving, "moving image")
    nd = fixed_img.GetDimension()
    if moving_img.GetDimension() != nd:
        raise InputError(f"The fixed image is {nd}D but the moving image is {moving_img.GetDimension()}D; "
                         "register images of the same dimension.")
    fmask_img = io.read_label_image(fixed_mask, "fixed mask") if fixed_mask is not None else None
    mmask_img = io.read_label_image(moving_mask, "moving mask") if moving_mask is not None else None
    for mask, name in ((fmask_img, "fixed mask"), (mmask_img, "moving mask")):
        if mask is not None and mask.GetDimension() != nd:
            raise InputError(f"The {name} is {mask.GetDimension()}D but the images are {nd}D.")
    fixed_pts, labels = _landmarks(fixed_landmarks, "fixed landmarks")
    moving_pts, _ = _landmarks(moving_landmarks, "moving landmarks")
    if (fixed_pts is None) != (moving_pts is None):
        raise InputError("Give both fixed and moving landmarks (or neither) to measure the registration error.")
    if fixed_pts is not None and (fixed_pts.shape != moving_pts.shape or fixed_pts.shape[1] != nd):
        raise InputError(f"Landmarks do not pair up with {nd}D images: fixed {fixed_pts.shape}, moving {moving_pts.shape}.")
    torch_device = resolve_device(device)
    lap("read")

    report(0.03, "loading model")
    if model == "none":
        net, model_name = None, "none (instance optimisation only)"
        multiple = 8
    else:
        if model == "default" and f"default-{nd}d" not in models.registry():
            warnings.warn(f"no trained default-{nd}d model is shipped yet; using instance optimisation only")
            net, model_name, multiple = None, "none (no shipped default model)", 8
            iterations = iterations or None
        else:
            net, _, model_name = models.load(model, nd, torch_device)
            multiple = net.multiple
    lap("model")

    # stage 1: prepare (working grid, memory and overlap checks, resampling, normalisation)
    report(0.06, "resampling onto the working grid")
    budget = max_voxels or (settings.max_voxels_3d if nd == 3 else None) or DEFAULT_MAX_VOXELS[nd]
    pair = stages.prepare(fixed_img, moving_img, fmask_img, mmask_img, multiple=multiple, max_voxels=budget,
                          spacing=spacing, device=torch_device, memory_check=memory_check)
    grid = pair.grid
    lap("resample")

    # stage 2: affine pre-alignment
    pre = None
    if affine:
        report(0.08, "affine pre-alignment")
        pre = stages.align_affine(pair, settings.affine_tolerance, progress=lambda frac, msg: report(0.08 + 0.04 * frac, msg))
    lap("affine")

    # stage 3: the network, composed after the affine map, kept only if it improves the alignment
    report(0.12, f"network ({model_name})")
    start = pre.field if pre is not None else torch.zeros(1, nd, *grid.GetSize()[::-1], device=torch_device)
    flow, network_kept = stages.apply_network(pair, net, start, start_is_identity=pre is None)
    lap("network")

    # stage 4: refinement (instance optimisation) with the quality preset's convergence stop
    refinement = dict(quality=settings.name if iterations is None else None, levels=[], steps=[], seconds=[], kept=[])
    if iterations != 0:
        report(0.15, "refining" + (f" ({iterations} iterations)" if iterations else f" ({settings.name})"))
        if network_kept:  # the network's large-scale motion; the refinement finds the detail
            flow = stages.refinement_start(start, flow)
        flow = stages.refine(pair, flow, iterations, settings, use_jsm,
                             deadline=None if time_budget is None else t_start + float(time_budget), stats=refinement,
                             progress=lambda frac, msg: report(0.15 + 0.75 * frac, msg))
    lap("optimise")

    # stage 5: export (physical field on the fixed grid; on the working grid for a fixed image over
    # FIELD_ON_FIXED_GRID_UP_TO x its voxels: a float64 vector field on a 600^3 fixed grid alone would take
    # 5.2 GB, twice, as the transform holds its own copy)
    report(0.9, "exporting the transform")
    out = stages.export(pair, flow, use_jsm, field_on_fixed_grid(_voxels(fixed_img), _voxels(grid), nd), affine=pre)
    disp, transform, det = out.displacement, out.transform, out.determinant
    # NCC of the written warped image against the fixed image, on the grid of the written field (the fixed
    # grid, or the working grid for a very large fixed image), over the fixed image's region there
    field_grid = out.field_grid
    fixed_there = sitk.GetArrayFromImage(geometry.resample_onto(fixed_img, field_grid))
    ncc_before = _ncc(fixed_there, sitk.GetArrayFromImage(geometry.resample_onto(moving_img, field_grid)), out.fixed_region)
    ncc_after = _ncc(fixed_there, sitk.GetArrayFromImage(geometry.resample_onto(out.warped, field_grid)), out.fixed_region)
    del fixed_there
    metrics = dict(
        model=model_name, device=str(torch_device), dimension=nd, iterations=sum(refinement["steps"]),
        refinement=refinement,
        working_grid=dict(size=list(grid.GetSize()), spacing_mm=[round(s, 4) for s in grid.GetSpacing()]),
        ncc_before=ncc_before, ncc_after=ncc_after,
        # folding and SD log-Jacobian of the written transform (on its own grid)
        folding_fraction=jacobian_statistics(det, out.fixed_field_of_view)["folding_fraction"],
        sd_log_jacobian=jacobian_statistics(det, out.fixed_region)["sd_log_jacobian"],
        max_displacement_mm=float(np.sqrt((out.displacement_mm ** 2).sum(-1)).max()),
        network_kept=network_kept,
        # the affine stage's map in LPS mm: p -> matrix (p - centre_mm) + centre_mm + translation_mm
        affine=None if pre is None else dict(
            accepted=pre.accepted, **geometry.voxel_affine_to_physical(pre.matrix.cpu().numpy(),
                                                                       pre.translation.cpu().numpy(), grid),
            loss_start=round(pre.loss_start, 5), loss_end=round(pre.loss_end, 5)),
    )
    tre = mapped = None
    if fixed_pts is not None:
        mapped = io.transform_points(transform, fixed_pts)
        tre = dict(before=io.target_registration_error(None, fixed_pts, moving_pts),
                   after=io.target_registration_error(transform, fixed_pts, moving_pts))
        metrics["tre_before_mm"] = float(np.mean(tre["before"]))
        metrics["tre_after_mm"] = float(np.mean(tre["after"]))
    lap("export")
    timings["total"] = time.perf_counter() - t_start
    report(1.0, "done")
    sources = dict(fixed=fixed, moving=moving, fixed_mask=fixed_mask, moving_mask=moving_mask,
                   fixed_landmarks=fixed_landmarks if isinstance(fixed_landmarks, (str, Path)) else None,
                   moving_landmarks=moving_landmarks if isinstance(moving_landmarks, (str, Path)) else None)
    options = dict(model=model, device=device, quality=settings.name, iterations=iterations, affine=affine,
                   use_jsm=use_jsm, time_budget=time_budget, max_voxels=max_voxels,
                   spacing=None if spacing is None else [float(v) for v in np.atleast_1d(spacing)])
    return RegistrationResult(fixed=fixed_img, moving=moving_img, displacement=disp, transform=transform,
                              warped=out.warped, saliency=out.saliency, jacobian=out.jacobian, timings=timings,
                              metrics=metrics, tre=tre, mapped_landmarks=mapped, landmark_labels=labels,
                              inputs=sources, options=options, confidence=out.confidence)
