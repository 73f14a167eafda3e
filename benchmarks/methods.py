"""One adapter per registration method; each writes its fixed -> moving transform to a file.

``run_method(method, case, outdir, options)`` runs in the method's own process (``measure.run_isolated``)
and returns ``{"transform": path, ...}``; ``evaluation.evaluate`` then reads that file back with
SimpleITK, the same way for every method. What each method writes:

* ``identity``: an identity ``.tfm``;
* ``deepsalreg-*``: ``register()``'s displacement field as an ITK ``.h5`` (``DisplacementFieldTransform``);
* ``ants-syn``: ANTsPy ``registration(type_of_transform="SyN")`` (affine + SyN, ANTsPy's defaults); its
  ``fwdtransforms`` (the ones ``apply_transforms`` uses to bring the moving image onto the fixed grid)
  composed by ANTs itself into one displacement field ``.nii.gz`` on the fixed grid;
* ``elastix-bspline``: itk-elastix default ``affine`` then default ``bspline`` parameter maps; transformix's
  deformation field on the fixed grid (``.nrrd``), plus the native ``TransformParameters.*.txt``.

Which way each written field points is not assumed: ``conventions.py`` checks it on a known translation.

The peers are optional (``benchmarks/requirements.txt``); ``available`` says why one cannot run.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import time
from pathlib import Path

__all__ = ["METHODS", "available", "supports", "trained_model", "run_method", "setup"]

#: name -> (short label for tables, family)
METHODS = {
    "identity": ("identity", "baseline"),
    "deepsalreg-net": ("DeepSalReg network only", "deepsalreg"),
    "deepsalreg-affine-net": ("DeepSalReg affine + network (--iterations 0)", "deepsalreg"),
    "deepsalreg-io": ("DeepSalReg + instance optimisation", "deepsalreg"),
    "deepsalreg-io-nojsm": ("DeepSalReg + IO, no JSM (ablation)", "deepsalreg"),
    "deepsalreg-io-200": ("DeepSalReg + IO, 200 iterations", "deepsalreg"),
    "deepsalreg-fast": ("DeepSalReg quality fast", "deepsalreg"),
    "deepsalreg-balanced": ("DeepSalReg default (quality balanced)", "deepsalreg"),
    "deepsalreg-balanced-nojsm": ("DeepSalReg balanced, no JSM (ablation)", "deepsalreg"),
    "deepsalreg-accurate": ("DeepSalReg quality accurate", "deepsalreg"),
    "ants-syn": ("ANTs SyN (antspyx)", "peer"),
    "elastix-bspline": ("elastix affine+B-spline (itk-elastix)", "peer"),
    "convexadam": ("ConvexAdam (convexadam, MIND)", "peer"),
}

#: the quality preset of each ``deepsalreg-<quality>`` row (no fixed step count: the refinement stops itself)
QUALITY_ROWS = {"deepsalreg-fast": "fast", "deepsalreg-balanced": "balanced",
                "deepsalreg-balanced-nojsm": "balanced", "deepsalreg-accurate": "accurate"}

DEFAULT_ITERATIONS = 100  # deepsalreg-io, deepsalreg-io-nojsm; deepsalreg-io-200 runs twice as many


def available(method: str) -> tuple[bool, str]:
    """Whether ``method`` can run here, and if not, why (without importing the heavy peer)."""
    if method not in METHODS:
        return False, f"unknown method {method!r}"
    if method == "ants-syn" and importlib.util.find_spec("ants") is None:
        return False, "antspyx is not installed (pip install -r benchmarks/requirements.txt)"
    if method == "elastix-bspline":
        try:
            importlib.metadata.version("itk-elastix")
        except importlib.metadata.PackageNotFoundError:
            return False, "itk-elastix is not installed (pip install -r benchmarks/requirements.txt)"
    if method == "convexadam" and importlib.util.find_spec("convexAdam") is None:
        return False, "convexadam is not installed (pip install -r benchmarks/requirements.txt)"
    return True, ""


def supports(method: str, dim: int) -> bool:
    """Whether ``method`` registers ``dim``-D images (ConvexAdam: 3D only)."""
    return not (method == "convexadam" and dim != 3)


def trained_model(dim: int) -> str | None:
    """Name of the shipped trained model for ``dim`` (``default-2d``/``default-3d``), or None."""
    from DeepSalRegLib import models

    name = f"default-{dim}d"
    return name if name in models.registry() else None


# --------------------------------------------------------------------------------------------------
# setup (run in the child before its memory baseline: imports and lazy loading are not the method's cost)
# --------------------------------------------------------------------------------------------------


def setup(method: str) -> None:
    import SimpleITK  # noqa: F401

    if method.startswith("deepsalreg"):
        import torch  # noqa: F401

        import DeepSalRegLib.networks  # noqa: F401
        import DeepSalRegLib.optimise  # noqa: F401
        import DeepSalRegLib.registration  # noqa: F401
    elif method == "ants-syn":
        import ants

        ants.registration  # noqa: B018  (force the lazy import)
    elif method == "elastix-bspline":
        import itk

        itk.ElastixRegistrationMethod  # noqa: B018  (itk loads its modules lazily)
        itk.TransformixFilter  # noqa: B018
    elif method == "convexadam":
        import torch  # noqa: F401
        from convexAdam import convex_adam_MIND  # noqa: F401


def setup_identity():
    setup("identity")


def setup_deepsalreg():
    setup("deepsalreg-io")


def setup_ants():
    setup("ants-syn")


def setup_elastix():
    setup("elastix-bspline")


def setup_convexadam():
    setup("convexadam")


SETUP = {"identity": "benchmarks.methods:setup_identity", "deepsalreg-net": "benchmarks.methods:setup_deepsalreg",
         "deepsalreg-affine-net": "benchmarks.methods:setup_deepsalreg",
         "deepsalreg-io": "benchmarks.methods:setup_deepsalreg",
         "deepsalreg-io-nojsm": "benchmarks.methods:setup_deepsalreg",
         "deepsalreg-io-200": "benchmarks.methods:setup_deepsalreg",
         **{m: "benchmarks.methods:setup_deepsalreg" for m in QUALITY_ROWS},
         "ants-syn": "benchmarks.methods:setup_ants", "elastix-bspline": "benchmarks.methods:setup_elastix",
         "convexadam": "benchmarks.methods:setup_convexadam"}


# --------------------------------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------------------------------


def _identity(case, outdir: Path, options) -> dict:
    import SimpleITK as sitk

    path = outdir / "transform.tfm"
    sitk.WriteTransform(sitk.Transform(case["dim"], sitk.sitkIdentity), str(path))
    return dict(transform=str(path))


def _deepsalreg(method, case, outdir: Path, options) -> dict:
    from DeepSalRegLib import io as dio
    from DeepSalRegLib.registration import register

    # the run decides the models once at its start (``options["models"]``), so a model that appears
    # while it runs cannot change the rows half-way
    if options.get("model"):
        model = options["model"]
    elif "models" in options:
        model = options["models"].get(str(case["dim"])) or "none"
    else:
        model = trained_model(case["dim"]) or "none"
    iterations = 0 if method.endswith("-net") else int(options.get("iterations", DEFAULT_ITERATIONS))
    if method == "deepsalreg-io-200":
        iterations *= 2
    quality = QUALITY_ROWS.get(method)
    if quality is not None:
        iterations = None  # the preset's convergence stop
    dsr = dict(case.get("dsr") or {})
    result = register(case["fixed"], case["moving"], model=model, device=options.get("device", "cpu"),
                      iterations=iterations, quality=quality, use_jsm=not method.endswith("-nojsm"),
                      affine=(method != "deepsalreg-net"),
                      spacing=dsr.get("spacing"), max_voxels=dsr.get("max_voxels"))
    path = dio.write_transform(result.displacement, outdir / "transform.h5")
    note = ""
    if model == "none":
        note = ("instance optimisation, no trained model" if iterations
                else "affine only: no trained model" if method == "deepsalreg-affine-net"
                else "untrained/not available: no trained model, identity field")
    return dict(transform=str(path), model=model, iterations=iterations, note=note,
                working_grid=result.metrics.get("working_grid"), device=result.metrics.get("device"),
                steps_s={k: round(v, 3) for k, v in result.timings.items()})


def _ants(case, outdir: Path, options) -> dict:
    import ants

    ants.config._random_seed = 1  # fixed sampling seed, without ANTsPy's one-thread "deterministic" mode
    fixed = ants.image_read(case["fixed"])
    moving = ants.image_read(case["moving"])
    prefix = str(outdir / "ants_")
    reg = ants.registration(fixed, moving, type_of_transform="SyN", outprefix=prefix)
    composed = ants.apply_transforms(fixed=fixed, moving=moving, transformlist=reg["fwdtransforms"],
                                     compose=str(outdir / "ants_composed_"))
    path = outdir / "transform.nii.gz"
    shutil.move(composed, path)
    return dict(transform=str(path), native=[str(Path(p).name) for p in reg["fwdtransforms"]])


def _elastix(case, outdir: Path, options) -> dict:
    import itk

    fixed = itk.imread(case["fixed"], itk.F)
    moving = itk.imread(case["moving"], itk.F)
    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("affine"))
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("bspline"))
    # number_of_threads / SetNumberOfThreads crash itk-elastix 0.25.4 here; ITK's global default
    # (ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS, set by measure.thread_env) pins the threads instead.
    _, result = itk.elastix_registration_method(fixed, moving, parameter_object=parameters, log_to_console=False)
    for i in range(result.GetNumberOfParameterMaps()):
        itk.ParameterObject.WriteParameterFile(result.GetParameterMap(i), str(outdir / f"TransformParameters.{i}.txt"))
    # transformix also writes deformationField.nii into its output directory (default: the current one)
    field = itk.transformix_deformation_field(moving, result, output_directory=str(outdir))
    path = outdir / "transform.nrrd"
    itk.imwrite(field, str(path), compression=True)
    return dict(transform=str(path), native=[f"TransformParameters.{i}.txt"
                                             for i in range(result.GetNumberOfParameterMaps())])


def _convexadam(case, outdir: Path, options) -> dict:
    """ConvexAdam with its defaults (MIND-SSC, convex search, 80 Adam steps) on an isotropic grid.

    ConvexAdam works on arrays in voxel units and assumes isotropic voxels (Learn2Reg data are); the liver
    volumes have 4 mm slices under 1.4 mm pixels. So both images are resampled (through physical space,
    linear) onto an isotropic grid over the fixed image's extent at its finest spacing; its voxel field
    (array axes, ``W(x) = M(x + u(x))``) is then a fixed -> moving map on that grid, written as a physical LPS
    displacement image. 3D only.
    """
    import numpy as np
    import SimpleITK as sitk
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt

    if case["dim"] != 3:
        raise ValueError("ConvexAdam registers 3D volumes only")
    fixed = sitk.ReadImage(case["fixed"], sitk.sitkFloat32)
    step = min(fixed.GetSpacing())
    size = [max(1, int(round(n * s / step))) for n, s in zip(fixed.GetSize(), fixed.GetSpacing())]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing([step] * 3)
    grid.SetDirection(fixed.GetDirection())
    # the same physical extent: the first voxel centre moves by half the change of voxel size
    offset = [(step - s) / 2 for s in fixed.GetSpacing()]
    grid.SetOrigin(fixed.TransformContinuousIndexToPhysicalPoint([o / s for o, s in zip(offset, fixed.GetSpacing())]))
    f_iso = sitk.Resample(fixed, grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    m_iso = sitk.Resample(sitk.ReadImage(case["moving"], sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    u = convex_adam_pt(img_fixed=torch.from_numpy(sitk.GetArrayFromImage(f_iso)),
                       img_moving=torch.from_numpy(sitk.GetArrayFromImage(m_iso)), device=torch.device("cpu"))
    index_xyz = np.asarray(u, dtype=np.float64)[..., ::-1] * step  # array axes (z, y, x) -> x, y, z in mm
    physical = index_xyz @ np.asarray(grid.GetDirection()).reshape(3, 3).T
    field = sitk.GetImageFromArray(physical, isVector=True)
    field.CopyInformation(grid)
    path = outdir / "transform.nrrd"
    sitk.WriteImage(field, str(path), True)
    return dict(transform=str(path), grid=dict(size=size, spacing_mm=step))


def run_method(method: str, case: dict, outdir: str, options: dict | None = None) -> dict:
    """Register ``case`` with ``method``, writing into ``outdir``; returns the transform path and facts."""
    options = dict(options or {})
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if method == "identity":
        out = _identity(case, outdir, options)
    elif method.startswith("deepsalreg"):
        out = _deepsalreg(method, case, outdir, options)
    elif method == "ants-syn":
        out = _ants(case, outdir, options)
    elif method == "elastix-bspline":
        out = _elastix(case, outdir, options)
    elif method == "convexadam":
        out = _convexadam(case, outdir, options)
    else:
        raise ValueError(f"unknown method {method!r}")
    out["method_s"] = time.perf_counter() - t0
    return out
