"""Speed and memory scaling with image size: the network, the saliency map, instance optimisation, the
whole ``register()`` call, and the peers on the same inputs.

Components (each size in its own process, see ``measure.py``):

* ``network``: forward pass of ``modern-2d`` / ``modern-3d`` (random weights; speed does not depend on them);
* ``jsm``: ``joint_saliency_map`` forward;
* ``io_iteration``: one instance-optimisation step at full resolution (``instance_optimise`` with one pyramid
  level; time per step, averaged over a few steps including one JSM refresh);
* ``register_net``: ``register()`` end to end (read files, resample, network, export to a physical
  transform) with an untrained checkpoint, without the affine stage: the "3D 128^3 pair under 3 s" target;
* ``register_io``: ``register()`` with instance optimisation (100 iterations) from the identity, no affine;
* ``ants-syn`` / ``elastix-bspline``: the peers on the same files (only at the sizes where they fit
  the time budget), for ratios measured in the same run on the same machine.

Inputs: real images resampled to each size (2D: two T1 slices of different subjects; 3D: the two T1
brains), so the peers see realistic content; random smooth images when the data are absent. On a GPU,
the torch components are also timed on the GPU (absolute GPU numbers come only from there).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .machine import load_average

__all__ = ["plan", "run", "case_io", "case_register"]

SIZES = {
    "full": {2: [128, 256, 512, 1024], 3: [64, 96, 128, (160, 192, 224), 256]},
    "quick": {2: [128, 256], 3: [32, 64]},
    "tiny": {2: [64], 3: [24]},
}
#: sizes (largest) at which the slow paths run: instance optimisation end to end and the peers
REGISTER_IO_MAX = {"full": {2: 256, 3: 64}, "quick": {2: 128, 3: 32}, "tiny": {2: 64, 3: 0}}
PEERS_MAX = {"full": {2: 256, 3: 64}, "quick": {2: 128, 3: 32}, "tiny": {2: 0, 3: 0}}
IO_STEP_MAX = {"full": {2: 1024, 3: 256}, "quick": {2: 256, 3: 64}, "tiny": {2: 64, 3: 24}}
#: a case whose memory, extrapolated linearly in voxels from the previous size, would exceed this share
#: of the machine's available memory is skipped (a shared machine must not be pushed into swapping/OOM)
MEMORY_SHARE = 0.6


def _shape(size, dim):
    return tuple(size) if isinstance(size, (tuple, list)) else (int(size),) * dim


def _label(shape):
    return "x".join(map(str, shape)) if len(set(shape)) > 1 else f"{shape[0]}^{len(shape)}"


# --------------------------------------------------------------------------------------------------
# child-process cases
# --------------------------------------------------------------------------------------------------


def setup_torch():
    import torch  # noqa: F401

    import DeepSalRegLib.optimise  # noqa: F401
    import DeepSalRegLib.registration  # noqa: F401


def case_io(shape, device="cpu", steps=3):
    """Seconds per instance-optimisation step at full resolution on ``shape`` (random smooth images)."""
    from DeepSalRegLib.optimise import instance_optimise

    from .bench_core import _images, _sync

    fixed, moving = _images(shape, device)
    instance_optimise(fixed, moving, None, 1, levels=(1,))  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    instance_optimise(fixed, moving, None, steps, levels=(1,), jsm_every=steps)
    _sync(device)
    return dict(median_s=(time.perf_counter() - t0) / steps, steps=steps)


def case_register(fixed, moving, model, iterations, max_voxels, device="cpu", affine=False):
    """``register()`` end to end on two files; returns its own step timings.

    ``affine=False`` by default: the rows time the network path (``register_net``) and the refinement from the
    identity (``register_io``); the affine stage's cost is in the accuracy rows (``deepsalreg-affine-net``)
    and in ``key_timings``.
    """
    from DeepSalRegLib.registration import register

    t0 = time.perf_counter()
    result = register(fixed, moving, model=model, iterations=iterations, device=device, max_voxels=max_voxels,
                      affine=affine)
    total = time.perf_counter() - t0
    return dict(median_s=total, steps_s={k: round(v, 4) for k, v in result.timings.items()},
                working_grid=result.metrics["working_grid"])


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------


def _resized(image: sitk.Image, shape) -> sitk.Image:
    """``image``'s content resampled to ``shape`` voxels (ITK size order), then given 1 mm isotropic spacing,
    so that ``register()``'s working grid is exactly ``shape`` (the content is stretched, which does not
    matter for timing)."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    extent = [sz * sp for sz, sp in zip(image.GetSize(), image.GetSpacing())]
    spacing = [e / n for e, n in zip(extent, shape)]
    ref = sitk.Image([int(n) for n in shape], sitk.sitkFloat32)
    ref.SetSpacing(spacing)
    ref.SetOrigin(image.GetOrigin())
    ref.SetDirection(image.GetDirection())
    sigma = [max(0.0, (s_new / s_old - 1) / 2) * s_old for s_new, s_old in zip(spacing, image.GetSpacing())]
    if max(sigma) > 0:
        image = sitk.SmoothingRecursiveGaussian(image, [max(s, 1e-3) for s in sigma])
    out = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    out.SetSpacing([1.0] * len(shape))
    return out


def _sources(data: Path, dim: int):
    if dim == 2 and (data / "templates" / "ants_r16slice.jpg").is_file():
        return [sitk.ReadImage(str(data / "templates" / f"ants_r{n}slice.jpg"), sitk.sitkFloat32) for n in (16, 64)]
    if dim == 3 and (data / "brain_t1" / "subjectA_t1.nii.gz").is_file():
        return [sitk.ReadImage(str(data / "brain_t1" / f"subject{s}_t1.nii.gz"), sitk.sitkFloat32) for s in "AB"]
    rng = np.random.default_rng(0)
    out = []
    for _ in range(2):
        a = rng.random((64,) * dim).astype(np.float32)
        out.append(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(a), 3.0))
    return out


def write_pair(data: Path, folder: Path, dim: int, shape) -> tuple[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for role, image in zip(("fixed", "moving"), _sources(data, dim)):
        image = sitk.Image(image)
        image.SetSpacing([1.0] * dim)
        image.SetOrigin([0.0] * dim)
        path = folder / f"{role}.mha"
        sitk.WriteImage(_resized(image, tuple(reversed(shape))), str(path))
        paths.append(str(path))
    return paths[0], paths[1]


def untrained_checkpoint(work: Path, dim: int) -> str:
    """An untrained ``modern-{dim}d`` checkpoint (for timing the network path without trained weights)."""
    import torch

    from DeepSalRegLib.networks import build_model, save_checkpoint

    path = Path(work) / "scaling" / f"untrained-modern-{dim}d.pt"
    if not path.is_file():
        torch.manual_seed(0)
        save_checkpoint(path, build_model(f"modern-{dim}d"), note="untrained, for timing only")
    return str(path)


# --------------------------------------------------------------------------------------------------
# the plan and its execution
# --------------------------------------------------------------------------------------------------


def plan(scale: str, devices, peers, data: Path, work: Path):
    """Yields ``(component, dim, shape, device, target, kwargs, setup)``."""
    items = []
    for dim in (2, 3):
        preset = f"modern-{dim}d"
        for size in SIZES[scale][dim]:
            shape = _shape(size, dim)
            biggest = max(shape)
            for device in devices:
                items.append(("network", dim, shape, device, "benchmarks.bench_core:case_network",
                              dict(preset=preset, shape=list(shape), device=device, repeats=1 if scale != "full" else 2),
                              "benchmarks.bench_core:_setup_torch"))
                items.append(("jsm", dim, shape, device, "benchmarks.bench_core:case_jsm",
                              dict(shape=list(shape), device=device, repeats=1 if scale != "full" else 2),
                              "benchmarks.bench_core:_setup_torch"))
                if biggest <= IO_STEP_MAX[scale][dim]:
                    items.append(("io_iteration", dim, shape, device, "benchmarks.scaling:case_io",
                                  dict(shape=list(shape), device=device, steps=2 if biggest >= 256 and dim == 3 else 3),
                                  "benchmarks.scaling:setup_torch"))
            fixed, moving = write_pair(data, Path(work) / "scaling" / f"{dim}d_{_label(shape)}", dim, shape)
            voxels = 8 * int(np.prod(shape))  # a budget that never binds: the working grid is ``shape``
            for device in devices:
                items.append(("register_net", dim, shape, device, "benchmarks.scaling:case_register",
                              dict(fixed=fixed, moving=moving, model=untrained_checkpoint(work, dim), iterations=0,
                                   max_voxels=voxels, device=device), "benchmarks.scaling:setup_torch"))
                if biggest <= REGISTER_IO_MAX[scale][dim]:
                    items.append(("register_io", dim, shape, device, "benchmarks.scaling:case_register",
                                  dict(fixed=fixed, moving=moving, model="none", iterations=100, max_voxels=voxels,
                                       device=device), "benchmarks.scaling:setup_torch"))
            if biggest <= PEERS_MAX[scale][dim]:
                case = dict(name=f"scaling_{dim}d_{_label(shape)}", dim=dim, fixed=fixed, moving=moving, dsr={})
                for peer in peers:
                    from .methods import SETUP

                    items.append((peer, dim, shape, "cpu", "benchmarks.methods:run_method",
                                  dict(method=peer, case=case, outdir=str(Path(work) / "scaling" / case["name"] / peer)),
                                  SETUP[peer]))
    return items


def available_memory_mb() -> float | None:
    """``MemAvailable`` (Linux), in MiB."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def run(scale: str, devices, peers, data: Path, work: Path, isolate=True, timeout=1800, log=print) -> list[dict]:
    """Measure every item of the plan; returns rows ``{component, dim, size, voxels, device, time_s, peak_mb, load}``."""
    from .measure import run_inline, run_isolated

    rows = []
    last = {}  # (component, dim, device) -> (voxels, peak MB) of the previous size
    for component, dim, shape, device, target, kwargs, setup in plan(scale, devices, peers, data, work):
        voxels = int(np.prod(shape))
        previous = last.get((component, dim, device))
        free = available_memory_mb()
        if previous and previous[1] and free and device == "cpu":
            predicted = previous[1] * voxels / previous[0]
            if predicted > MEMORY_SHARE * free:
                reason = (f"skipped: predicted {predicted / 1024:.1f} GB (linear in voxels from "
                          f"{previous[1] / 1024:.1f} GB) > {MEMORY_SHARE:.0%} of the {free / 1024:.1f} GB available")
                rows.append(dict(component=component, dim=dim, size=_label(shape), shape=list(shape), voxels=voxels,
                                 device=device, ok=False, error=reason, predicted_mb=predicted,
                                 load_before=load_average(), load_after=load_average()))
                log(f"  scaling {component:15s} {_label(shape):>12s} {device:5s} {reason}")
                continue
        before = load_average()
        report = (run_isolated(target, kwargs, setup=setup, timeout=timeout) if isolate
                  else run_inline(target, kwargs, setup=setup))
        row = dict(component=component, dim=dim, size=_label(shape), shape=list(shape), voxels=int(np.prod(shape)),
                   device=device, ok=bool(report.get("ok")), load_before=before, load_after=load_average())
        if report.get("ok"):
            result = report["result"]
            row["time_s"] = result.get("median_s", report.get("wall_s"))
            if component in ("ants-syn", "elastix-bspline"):
                row["time_s"] = report["wall_s"]
            row["peak_mb"] = report.get("cuda_peak_mb") if device.startswith("cuda") else report.get("peak_rss_mb")
            row["peak_rss_mb"] = report.get("peak_rss_mb")
            if row["peak_mb"]:
                last[(component, dim, device)] = (voxels, row["peak_mb"])
            if "steps_s" in result:
                row["steps_s"] = result["steps_s"]
            log(f"  scaling {component:15s} {row['size']:>12s} {device:5s} {row['time_s']:9.3f} s "
                f"{row['peak_mb'] if row['peak_mb'] is not None else float('nan'):8.0f} MB (load {before:.1f})")
        else:
            row["error"] = report.get("error")
            log(f"  scaling {component:15s} {row['size']:>12s} {device:5s} FAILED {row['error']}")
        rows.append(row)
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Peer time / DeepSalReg time at each size where both ran on the CPU in this run."""
    index = {(r["component"], r["size"], r["device"]): r for r in rows if r.get("ok")}
    out = []
    for r in rows:
        if r["component"] not in ("ants-syn", "elastix-bspline") or not r.get("ok"):
            continue
        for ours in ("register_net", "register_io"):
            mine = index.get((ours, r["size"], "cpu"))
            if mine and mine["time_s"]:
                out.append(dict(peer=r["component"], ours=ours, size=r["size"], dim=r["dim"],
                                peer_s=r["time_s"], ours_s=mine["time_s"], ratio=r["time_s"] / mine["time_s"]))
    return out
