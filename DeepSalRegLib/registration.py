"""``register()``: one call from two images (files or SimpleITK images) to standard, physical results.

Pipeline (each step's time is recorded in ``RegistrationResult.timings``)::

    read -> working grid (fixed extent, near-isotropic, multiple of the network's stride)
         -> resample both onto it, normalise intensities -> [affine pre-alignment]
         -> network (coarse field, JSM, refined field) on the pre-aligned pair, kept if it lowers the LNCC
         -> [instance optimisation] -> physical displacement field on the FIXED image grid
         -> ITK DisplacementFieldTransform (fixed -> moving, LPS mm) -> warped moving, saliency, Jacobian

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

#: Working-grid voxel budget per dimension (larger inputs are resampled more coarsely, with a warning).
DEFAULT_MAX_VOXELS = {2: 1024 * 1024, 3: 160 * 160 * 160}
#: Least fraction of the fixed image that the moving image must cover in physical space (else: InputError).
MIN_OVERLAP = 0.01

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
        transform: ``sitk.DisplacementFieldTransform`` of that field (fixed -> moving).
        warped: the moving image resampled onto the fixed grid through ``transform``.
        saliency: joint saliency map of fixed and warped (0..1), on the grid of ``displacement``.
        jacobian: Jacobian determinant of ``p -> T(p)`` (<= 0 means folding), on the grid of ``displacement``.
        confidence: the weight the refinement's similarity had at the end (0..1), on the grid of
            ``displacement``: ``alpha + (1 - alpha) * JSM`` (``use_jsm``) inside both fields of view and masks,
            0 outside them. Low means: structure in one image only (a lesion, a cavity, contrast agent), flat
            tissue, or outside a mask: the field there follows its surroundings, not the image content.
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
    transform: sitk.DisplacementFieldTransform
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
    if mask is not None:
        a, b = a[mask], b[mask]
    a = a.astype(np.float64).ravel() - a.mean()
    b = b.astype(np.float64).ravel() - b.mean()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 else 0.0


def _voxels(image: sitk.Image) -> int:
    return int(np.prod(image.GetSize()))


def _rounded(values) -> list:
    return [round(float(v), 1) for v in values]


def _on_grid(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))
    image.CopyInformation(grid)
    return image


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
        max_voxels: working-grid voxel budget (default ``DEFAULT_MAX_VOXELS``); larger inputs are
            registered on a coarser grid (with a warning) and the field is interpolated back.
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

    from . import models
    from .affine import affine_align
    from .losses import jsm_weight, lncc_similarity
    from .memory import FIELD_ON_FIXED_GRID_UP_TO, check_memory
    from .metrics import jacobian_statistics
    from .optimise import JSM_ALPHA, Convergence, downsample, instance_optimise
    from .quality import preset
    from .saliency import joint_saliency_map
    from .warp import compose, jacobian_determinant, resize_field, warp

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

    report(0.06, "resampling onto the working grid")
    budget = max_voxels or DEFAULT_MAX_VOXELS[nd]
    grid = geometry.make_working_grid(fixed_img, multiple=multiple, max_voxels=budget, spacing=spacing)
    natural = geometry.make_working_grid(fixed_img, multiple=multiple, spacing=spacing)
    if memory_check:  # before any full-resolution work
        check_memory(fixed_img.GetSize(), moving_img.GetSize(), _voxels(grid))
    if grid.GetSpacing()[0] > natural.GetSpacing()[0] * 1.001:
        warnings.warn(f"the fixed image is large: registering on a {grid.GetSpacing()[0]:.2f} mm grid "
                      f"({'x'.join(map(str, grid.GetSize()))}) instead of {natural.GetSpacing()[0]:.2f} mm to stay "
                      f"within {budget} voxels; raise max_voxels for more detail")
    f_arr = sitk.GetArrayFromImage(geometry.resample_onto(fixed_img, grid))
    m_arr = sitk.GetArrayFromImage(geometry.resample_onto(moving_img, grid))
    inside_fixed = geometry.field_of_view(fixed_img, grid)
    inside_moving = geometry.field_of_view(moving_img, grid)
    shared = (inside_fixed & inside_moving).sum() / max(int(inside_fixed.sum()), 1)
    if shared < MIN_OVERLAP:
        raise InputError(
            f"The fixed and moving images {'do not overlap' if shared == 0 else 'hardly overlap'} in physical space "
            f"({100 * shared:.2g} % of the fixed image is inside the moving image): check their origins and "
            f"directions (fixed origin {_rounded(fixed_img.GetOrigin())}, moving origin "
            f"{_rounded(moving_img.GetOrigin())} mm, LPS), or place them roughly first (e.g. Slicer's Transforms).")
    # the similarity counts only where both images have data (and inside the user's masks): the working
    # grid's padding and the part of the grid the moving image does not cover are zeros, whose edges a
    # local NCC would otherwise align (ANHIR stain pairs of different sizes failed so)
    f_mask, m_mask = inside_fixed, inside_moving
    if fmask_img is not None:
        f_mask = f_mask & (sitk.GetArrayFromImage(geometry.resample_onto(fmask_img, grid, labels=True)) > 0)
    if mmask_img is not None:
        m_mask = m_mask & (sitk.GetArrayFromImage(geometry.resample_onto(mmask_img, grid, labels=True)) > 0)
    region = f_mask  # where the fixed image counts
    f_norm = geometry.normalise_intensity(f_arr, region)
    m_norm = geometry.normalise_intensity(m_arr, m_mask)

    def tensor(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None].to(torch_device)

    f_t, m_t = tensor(f_norm), tensor(m_norm)
    f_mask_t = None if f_mask.all() else tensor(f_mask)  # None: no masking (cheaper)
    m_mask_t = None if m_mask.all() else tensor(m_mask)
    lap("resample")

    pre = None
    if affine:
        report(0.08, "affine pre-alignment")
        pre = affine_align(f_t, m_t, fixed_mask=f_mask_t, moving_mask=m_mask_t,
                           convergence=Convergence(tolerance=settings.affine_tolerance)
                           if settings.affine_tolerance else None,
                           progress=lambda frac, msg: report(0.08 + 0.04 * frac, msg))
    lap("affine")

    report(0.12, f"network ({model_name})")
    start = pre.field if pre is not None else torch.zeros(1, nd, *f_t.shape[2:], device=torch_device)
    network_kept = None
    with torch.no_grad():
        flow = start
        if net is not None:
            m_in = m_t if pre is None else warp(m_t, pre.field)
            # channels-last weights: the CPU convolutions run 20-25 % faster (128^3: 2.08 -> 1.59 s), same result
            net = net.to(memory_format=torch.channels_last if nd == 2 else torch.channels_last_3d)
            flow_net = net(f_t, m_in, warp_output=False)["flow"].contiguous()
            # the network's field after the affine map (composing with a zero field is the field itself)
            candidate = flow_net if pre is None else compose(start, flow_net)
            # guard: keep the network's field only if it aligns better than its start, by the LNCC it was
            # trained to lower (a pair unlike its training data must not be made worse)
            # (at half resolution above 2^18 voxels: 8x cheaper in 3D, and a comparison needs no fine detail)
            factor = 2 if f_t[0, 0].numel() > 2 ** 18 else 1
            f_g, m_g = downsample(f_t, factor), downsample(m_t, factor)
            size = f_g.shape[2:]
            start_g, candidate_g = resize_field(start, size), resize_field(candidate, size)
            weight = downsample(tensor(region), factor)
            if m_mask_t is not None:  # both on the same support: where both warped moving images have data
                m_mask_g = downsample(m_mask_t, factor)
                weight = weight * warp(m_mask_g, start_g) * warp(m_mask_g, candidate_g)
            loss_start = float(lncc_similarity(f_g, warp(m_g, start_g), weight, window=7))
            loss_net = float(lncc_similarity(f_g, warp(m_g, candidate_g), weight, window=7))
            network_kept = loss_net < loss_start
            if network_kept:
                flow = candidate
            else:
                warnings.warn(f"the network's field did not improve the alignment (LNCC loss {loss_start:.4f} -> "
                              f"{loss_net:.4f}); continuing from the {'affine' if pre is not None else 'identity'} "
                              "alignment")
    lap("network")

    refinement = dict(quality=settings.name if iterations is None else None, levels=[], steps=[], seconds=[])
    if iterations != 0:
        report(0.15, "refining" + (f" ({iterations} iterations)" if iterations else f" ({settings.name})"))
        deadline = None if time_budget is None else t_start + float(time_budget)
        flow = instance_optimise(
            f_t, m_t, flow, iterations,
            fixed_mask=f_mask_t, moving_mask=m_mask_t,
            use_jsm=use_jsm, velocity_factor=settings.velocity_factor,
            convergence=Convergence(max_steps=settings.max_steps, max_steps_finest=settings.max_steps_finest,
                                    tolerance=settings.tolerance, deadline=deadline),
            stats=refinement,
            progress=lambda frac, msg: report(0.15 + 0.75 * frac, msg),
        )
    lap("optimise")

    report(0.9, "exporting the transform")
    with torch.no_grad():
        warped_t = warp(m_t, flow)
        # large volumes: the displayed JSM is computed at half resolution (8x cheaper in 3D: 0.86 s at 128^3)
        jsm_downsample = 2 if f_t[0, 0].numel() > 2 ** 20 else 1
        jsm = joint_saliency_map(f_t, warped_t, downsample=jsm_downsample)[0, 0].cpu().numpy()
        det = jacobian_determinant(flow)[0, 0].cpu().numpy()
        # the weight the refinement's similarity had (``instance_optimise``): JSM-based, inside both images
        weight = jsm_weight(torch.from_numpy(jsm), JSM_ALPHA) if use_jsm else torch.ones(f_t.shape[2:])
        weight = weight * torch.from_numpy(f_mask.astype(np.float32))
        if m_mask_t is not None:
            weight = weight * warp(m_mask_t, flow)[0, 0].cpu()
        weight = weight.numpy()
    u = flow[0].cpu().numpy()
    d_work = geometry.voxel_field_to_physical(u, grid)
    # the field is computed on the working grid; a fixed image much larger than it gets the field on the
    # working grid (interpolated linearly by whoever applies it, as it would be here): a float64 vector field
    # on a 600^3 fixed grid alone would take 5.2 GB, twice (the transform holds its own copy)
    field_grid = fixed_img if _voxels(fixed_img) <= FIELD_ON_FIXED_GRID_UP_TO * _voxels(grid) else grid
    disp = geometry.resample_displacement(geometry.displacement_image(d_work, grid), field_grid)
    transform = geometry.displacement_transform(disp)
    warped = geometry.resample_onto(moving_img, fixed_img, transform=transform)
    # the maps follow the field: on the fixed grid, or on the working grid for a very large fixed image
    saliency = geometry.resample_onto(_on_grid(jsm, grid), field_grid)
    jacobian = geometry.resample_onto(_on_grid(det, grid), field_grid, default=1.0)
    confidence = geometry.resample_onto(_on_grid(weight, grid), field_grid)
    w_norm = warped_t[0, 0].cpu().numpy()
    folding = jacobian_statistics(det, inside_fixed)["folding_fraction"]
    metrics = dict(
        model=model_name, device=str(torch_device), dimension=nd, iterations=sum(refinement["steps"]),
        refinement=refinement,
        working_grid=dict(size=list(grid.GetSize()), spacing_mm=[round(s, 4) for s in grid.GetSpacing()]),
        ncc_before=_ncc(f_norm, m_norm, region), ncc_after=_ncc(f_norm, w_norm, region),
        folding_fraction=folding, sd_log_jacobian=jacobian_statistics(det, region)["sd_log_jacobian"],
        max_displacement_mm=float(np.sqrt((d_work ** 2).sum(-1)).max()),
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
                              warped=warped, saliency=saliency, jacobian=jacobian, timings=timings,
                              metrics=metrics, tre=tre, mapped_landmarks=mapped, landmark_labels=labels,
                              inputs=sources, options=options, confidence=confidence)
