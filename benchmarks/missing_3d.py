"""The 3D missing-correspondence study: a brain MRI against itself after a resection or a growing tumour.

    python -m benchmarks.missing_3d                      # default, no-JSM, ANTs SyN, elastix (~15 min)
    python -m benchmarks.missing_3d --quick              # one subject, one size, 3 mm (a few minutes)
    python -m benchmarks.missing_3d --methods deepsalreg-affine-net --model-3d runs/x/model.pt --append

Writes ``results.json``, ``results.md`` (table and targets) and ``fields.png`` (error maps through the
altered region, one column per method) into ``benchmarks/results_missing3d`` (``--out``).

Every pair has a known answer. The source is a real T1 brain (``brain_t1``, 2 mm). The FIXED image is
the source through a smooth random deformation ``T`` (``synthetic.random_smooth_field``). The MOVING
image is the source after a local change of anatomy around a centre ``c`` inside the brain, made of
a radial tissue motion ``S`` (moving point -> source point) and new intensities:

* ``resection``: the tissue within ``R`` of ``c`` is removed; the cavity (fluid: the 3rd-percentile
  brain intensity, with noise) keeps ``0.7 R`` and the surrounding brain collapses into it
  (``rho' = rho + 0.3 R exp(-(rho - 0.7 R) / R)`` for ``rho >= 0.7 R``);
* ``tumour``: a tumour grown from ``0.3 R`` to ``R`` pushes the brain outward
  (``rho' = rho - 0.7 R exp(-(rho - R) / R)``) and shows an enhancing rim (bright, 0.15 R thick), a dark
  necrotic core and a hypo-intense oedema halo out to ``1.3 R``;
* ``removal`` / ``contrast``: ``synthetic.alter`` (structure wiped / local contrast change) with no
  tissue motion;
* ``none``: the unaltered pair, the reference level of every error.

Both radial maps are diffeomorphic (their radial derivative stays positive) and map the inside of the
ball linearly onto the source ball it came from (the removed tissue "is" the cavity; the tumour grew from
its seed). The true fixed -> moving map is ``phi(p) = S^-1(T(p))`` (``S`` inverted numerically by ITK),
written as a displacement field on the fixed grid. The altered region on the fixed grid is where
``phi`` lands inside the changed ball (radius ``R``; for the tumour, up to its oedema). Errors are
reported inside it, in a 0-10 mm band around it, and beyond 10 mm (``evaluation.evaluate``). Sizes:
``R`` = 5, 10, 20 mm (10-40 mm wide).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import shared_data, synthetic
from .datasets import _shrink, _write
from .missing_correspondence import _site
from .report import _f

__all__ = ["prepare", "summarise", "KINDS", "RADII_MM", "mass_effect", "main"]

DEFAULT_METHODS = ("deepsalreg-balanced", "deepsalreg-balanced-nojsm", "ants-syn", "elastix-bspline")

KINDS = ("resection", "tumour", "removal", "contrast")
RADII_MM = (5.0, 10.0, 20.0)


def _radial_field(reference: sitk.Image, centre, radius: float, kind: str) -> sitk.Image:
    """``S(q) - q`` on ``reference``'s grid (physical, vector float64): the moving -> source radial motion."""
    nd = reference.GetDimension()
    shape = tuple(reversed(reference.GetSize()))
    offset = synthetic.physical_points(reference) - np.asarray(centre, dtype=float)
    rho = np.linalg.norm(offset, axis=1)
    if kind == "resection":
        inner = 0.7 * radius
        new = np.where(rho < inner, rho * radius / inner, rho + 0.3 * radius * np.exp(-(rho - inner) / radius))
    elif kind == "tumour":
        new = np.where(rho < radius, rho * 0.3, rho - 0.7 * radius * np.exp(-(rho - radius) / radius))
    else:
        raise ValueError(f"no tissue motion for {kind!r}")
    scale = np.where(rho > 1e-9, new / np.maximum(rho, 1e-9), radius / (0.7 * radius) if kind == "resection" else 0.3)
    d = (offset * (scale - 1.0)[:, None]).reshape(shape + (nd,))
    out = sitk.GetImageFromArray(d, isVector=True)
    out.CopyInformation(reference)
    return out


def mass_effect(source: sitk.Image, field: sitk.Image, kind: str, centre, radius: float, seed: int = 0):
    """The moving image of ``kind`` and the true fixed -> moving displacement field.

    Args:
        source: the unaltered image (its grid is both images' grid).
        field: ``d`` of ``T(p) = p + d(p)`` (fixed -> source), vector float64 on the same grid.
        kind: one of ``KINDS``; centre (physical), radius (mm).
    Returns ``(moving, true_field, changed)``: the altered moving image, ``phi(p) - p`` with
    ``phi = S^-1 o T``, and a uint8 mask of the changed ball on the moving grid.
    """
    a = sitk.GetArrayFromImage(source).astype(np.float32)
    brain = a[a > np.percentile(a, 30)]
    rng = np.random.default_rng(seed)
    if kind in ("removal", "contrast"):
        moving, changed = synthetic.alter(source, kind, centre, radius, seed=seed)
        return moving, field, changed
    s = _radial_field(source, centre, radius, kind)
    moved = synthetic.deform(source, s)  # M(q) = I(S(q))
    m = sitk.GetArrayFromImage(moved).astype(np.float32)
    shape = m.shape
    rho = np.linalg.norm(synthetic.physical_points(source) - np.asarray(centre, dtype=float), axis=1).reshape(shape)
    noise = rng.standard_normal(shape).astype(np.float32)
    noise = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(noise), 1.0))
    noise /= max(float(np.abs(noise).max()), 1e-6)
    lo, hi = np.percentile(brain, [3, 99])
    edge = max(0.08 * radius, 1.0)

    def inside(r):  # soft ball indicator of radius r
        return np.clip((r - rho) / edge + 0.5, 0.0, 1.0)

    if kind == "resection":
        w = inside(0.7 * radius)
        fluid = lo + 0.05 * (hi - lo) * noise
        m = (1 - w) * m + w * fluid
        changed = rho < radius
    else:
        halo = inside(1.3 * radius) * (1 - inside(radius))
        m = m * (1 - 0.35 * halo)
        rim = inside(radius) * (1 - inside(0.85 * radius))
        core = inside(0.85 * radius)
        m = (1 - rim - core) * m + rim * (hi + 0.1 * (hi - lo) * noise) + core * (lo + 0.3 * (hi - lo) + 0.08 * (hi - lo) * noise)
        changed = rho < 1.3 * radius
    moving = sitk.GetImageFromArray(m.astype(np.float32))
    moving.CopyInformation(source)
    # phi(p) = S^-1(T(p)):  phi(p) - p = d(p) + s_inv(T(p))
    s_inv = sitk.InvertDisplacementField(sitk.Cast(s, sitk.sitkVectorFloat64), maximumNumberOfIterations=50,
                                         maxErrorToleranceThreshold=0.01, meanErrorToleranceThreshold=0.001,
                                         enforceBoundaryCondition=False)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    s_inv_at_t = sitk.Resample(s_inv, source, transform, sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    true = sitk.GetImageFromArray(sitk.GetArrayFromImage(field) + sitk.GetArrayFromImage(s_inv_at_t), isVector=True)
    true.CopyInformation(source)
    changed_image = sitk.GetImageFromArray(changed.astype(np.uint8))
    changed_image.CopyInformation(source)
    return moving, true, changed_image


def _source(data: Path, subject: str, shrink: int, seed: int):
    image = _shrink(shared_data.brain_subject(data, subject), shrink)
    a = sitk.GetArrayFromImage(image)
    foreground = sitk.GetImageFromArray((a > np.percentile(a[a > 0], 5) if (a > 0).any() else a > 0).astype(np.uint8))
    foreground.CopyInformation(image)
    foreground = sitk.BinaryMorphologicalClosing(foreground, [2] * 3)
    field = synthetic.random_smooth_field(image, 4.0, control_spacing=40.0, seed=seed, mask=foreground)
    return image, field, foreground


def prepare(data: Path, work: Path, scale: str = "full", log=print) -> list[dict]:
    """Write the study's pairs under ``work/inputs/missing3d``; returns their cases (``dataset="missing3d"``)."""
    data, work = Path(data), Path(work)
    if not (data / "brain_t1").is_dir():
        log(f"  missing3d: {data / 'brain_t1'} not found, study skipped")
        return []
    subjects = {"full": ["A", "B"], "quick": ["A"], "tiny": ["A"]}[scale]
    shrink = {"full": 2, "quick": 3, "tiny": 4}[scale]
    radii = {"full": RADII_MM, "quick": (10.0,), "tiny": (10.0,)}[scale]
    cases = []
    for k, subject in enumerate(subjects):
        source, field, foreground = _source(data, subject, shrink, seed=400 + k)
        fixed = synthetic.deform(source, field)
        fixed_foreground = synthetic.deform(foreground, field, labels=True)
        folder = work / "inputs" / "missing3d" / subject
        common = dict(dataset="missing3d", dim=3, units="mm", dsr={}, source=f"subject{subject}",
                      fixed=_write(fixed, folder / "fixed.mha"), eval_mask=_write(fixed_foreground, folder / "eval_mask.nii.gz"))
        for radius in radii:
            centre = _site(source, foreground, radius * 1.3, seed=10 * k + int(radius))
            built = []
            for variant in ("none",) + KINDS:
                if variant == "none":
                    moving, true, changed = source, field, None
                else:
                    moving, true, changed = mass_effect(source, field, variant, centre, radius, seed=k)
                transform = sitk.DisplacementFieldTransform(sitk.Cast(true, sitk.sitkVectorFloat64))
                region = None if changed is None else sitk.Resample(
                    sitk.Cast(changed, sitk.sitkUInt8), fixed, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
                built.append((variant, moving, true, region))
            # "beyond 10 mm" is measured from the union of every variant's region, the same voxels for all
            # variants of this size (so the unaltered pair is the like-for-like reference)
            union = built[1][3]
            for _, _, _, region in built[2:]:
                union = sitk.Or(union, region)
            tag = f"r{radius:.0f}"
            union_path = _write(union, folder / f"region_union_{tag}.nii.gz")
            for variant, moving, true, region in built:
                cases.append(dict(common, name=f"missing3d_{subject}_{variant}_{tag}", variant=variant, radius_mm=radius,
                                  moving=_write(sitk.Cast(moving, sitk.sitkFloat32), folder / f"moving_{variant}_{tag}.mha"),
                                  true_field=_write(sitk.Cast(true, sitk.sitkVectorFloat32), folder / f"true_{variant}_{tag}.mha"),
                                  altered_mask=union_path if region is None else _write(region, folder / f"region_{variant}_{tag}.nii.gz"),
                                  far_reference=union_path,
                                  notes=f"{variant}, R = {radius:.0f} mm" if variant != "none" else f"unaltered (reference for R = {radius:.0f} mm)"))
    return cases


def summarise(rows: list[dict]) -> list[dict]:
    """Per method, kind and size: mean over subjects of the errors inside / in the band / beyond, and
    the change beyond 10 mm from the unaltered pair of the same size."""
    by = {}
    for r in rows:
        if r.get("dataset") != "missing3d" or not r.get("ok"):
            continue
        case = r["case"]
        radius = case.rsplit("_r", 1)[-1]
        by.setdefault((row_label(r), r["source"], radius), {})[r["variant"]] = r["metrics"]
    table = {}
    keys = ("epe_inside_mean", "epe_band_mean", "epe_far_mean", "log_jacobian_error_inside", "folding_fraction")
    for (method, _, radius), variants in by.items():
        base = variants.get("none", {})
        for variant, m in variants.items():
            entry = table.setdefault((method, variant, radius), dict(method=method, variant=variant, radius_mm=float(radius),
                                                                     n=0, delta_far=[], **{k: [] for k in keys}))
            entry["n"] += 1
            for k in keys:
                entry[k].append(m.get(k, np.nan))
            entry["delta_far"].append(m.get("epe_far_mean", np.nan) - base.get("epe_far_mean", np.nan))
    out = [{k: (float(np.nanmean(v)) if isinstance(v, list) else v) for k, v in e.items()} for e in table.values()]
    from .methods import METHODS

    methods = {m: i for i, m in enumerate(METHODS)}
    order = {v: i for i, v in enumerate(("none",) + KINDS)}
    return sorted(out, key=lambda e: (methods.get(e["method"].split(" [")[0], 99), e["method"], order.get(e["variant"], 9),
                                      e["radius_mm"]))


def row_label(row: dict) -> str:
    """A row's method, with its model when that is not the shipped default (``method [model folder]``)."""
    model = row.get("model") or ""
    if not model or model.startswith("default") or model == "none":
        return row["method"]
    path = Path(model)
    return f"{row['method']} [{path.parent.name if path.suffix == '.pt' else model}]"


def targets(summary: list[dict]) -> list[dict]:
    """Issue 15's targets per kind and size: default inside and in the band <= ANTs SyN's and <= 0.8x
    the no-JSM ablation's; beyond 10 mm within 0.05 mm of the unaltered pair."""
    index = {(e["method"], e["variant"], e["radius_mm"]): e for e in summary}
    out = []
    for (method, variant, radius), e in index.items():
        if method != "deepsalreg-balanced" or variant == "none":
            continue
        ants = index.get(("ants-syn", variant, radius), {})
        nojsm = index.get(("deepsalreg-balanced-nojsm", variant, radius), {})
        for key, what in (("epe_inside_mean", "inside"), ("epe_band_mean", "band 0-10 mm")):
            ours, peer, ablation = e.get(key), ants.get(key), nojsm.get(key)
            met = None if peer is None or ablation is None else bool(ours <= peer and ours <= 0.8 * ablation)
            out.append(dict(target=f"{variant} R={radius:.0f} mm, {what}: <= ANTs SyN and <= 0.8x no-JSM",
                            value=f"{_f(ours)} mm (ANTs {_f(peer)}, no-JSM {_f(ablation)})",
                            status="n/a" if met is None else "met" if met else "not met"))
        delta = e.get("delta_far")
        out.append(dict(target=f"{variant} R={radius:.0f} mm, beyond 10 mm: within 0.05 mm of the unaltered pair",
                        value=f"{_f(delta, '{:+.3f}')} mm", status="n/a" if delta is None or np.isnan(delta)
                        else "met" if abs(delta) <= 0.05 else "not met"))
    return out


def document(result: dict) -> str:
    from .methods import METHODS

    run, summary = result["run"], result["summary"]
    lines = ["# 3D missing-correspondence study", "",
             f"`{run['command']}` at commit {result['machine'].get('revision', '?')}, {run['wall_minutes']} min, "
             f"load {run['load_min']:.1f}-{run['load_max']:.1f} on {result['machine'].get('cores', '?')} cores. "
             "Pairs: see `benchmarks/missing_3d.py` (a real T1 brain at 2 mm, known smooth deformation; the moving image "
             "gets a resection cavity with collapse, a tumour with mass effect, a wiped region or a local contrast change). "
             "End-point errors in mm inside the altered region, in the 0-10 mm band around it and beyond 10 mm "
             "(same voxels for every variant of a size); change = beyond-10-mm error minus the unaltered pair's.", "",
             "| method | change | R (mm) | inside | band 0-10 mm | beyond 10 mm | change beyond | log-J error inside | folding % | n |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in summary:
        base = e["method"].split(" [")[0]
        name = METHODS.get(base, (base,))[0] + e["method"][len(base):]
        lines.append(f"| {name} | {e['variant']} | {e['radius_mm']:.0f} | {_f(e['epe_inside_mean'])} | {_f(e['epe_band_mean'])} | "
                     f"{_f(e['epe_far_mean'])} | {_f(e['delta_far'], '{:+.3f}')} | {_f(e['log_jacobian_error_inside'], '{:.3f}')} | "
                     f"{_f(e['folding_fraction'] * 100, '{:.3f}')} | {e['n']} |")
    times = {}
    for r in result["rows"]:
        if r.get("ok"):
            times.setdefault(row_label(r), []).append(r["wall_s"])
    lines += ["", "Mean wall time per pair: " + ", ".join(f"{k} {np.mean(v):.1f} s" for k, v in times.items()) + "."]
    if result.get("targets"):
        lines += ["", "## Targets (issue 15)", "", "| target | value | status |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['value']} | {t['status']} |" for t in result["targets"]]
    failed = [r for r in result["rows"] if not r.get("ok")]
    if failed:
        lines += ["", "Failed: " + "; ".join(f"{r['case']} {r['method']}: {r.get('error', '')[:120]}" for r in failed)]
    return "\n".join(lines) + "\n"


def picture(rows: list[dict], cases: dict, path: Path, variants=("resection", "tumour")) -> Path | None:
    """Fixed, moving and each method's end-point-error map on the axial slice through the altered region,
    for the largest size of each of ``variants``."""
    from .plots import _pyplot

    plt = _pyplot()
    ok = [r for r in rows if r.get("ok") and r.get("error_map") and r["dataset"] == "missing3d"]
    # rows kept by --append from an earlier run keep their numbers, but their error maps live in the
    # (untracked) work folder of that run: without the map a row is left out of the picture only
    gone = sorted({row_label(r) for r in ok if not Path(r["error_map"]).is_file()})
    if gone:
        print(f"  picture: no error maps on disk for {', '.join(gone)} (an earlier run's work folder); left out")
    ok = [r for r in ok if Path(r["error_map"]).is_file()]
    chosen = []
    for variant in variants:
        names = sorted({r["case"] for r in ok if r["variant"] == variant}, key=lambda n: float(n.rsplit("_r", 1)[-1]))
        if names:
            chosen.append(names[-1])
    if not chosen:
        return None
    labels = list(dict.fromkeys(row_label(r) for r in ok))
    fig, axes = plt.subplots(len(chosen), 2 + len(labels), figsize=(2.1 * (2 + len(labels)) + 1, 2.3 * len(chosen)),
                             squeeze=False, constrained_layout=True)
    im = None
    for i, name in enumerate(chosen):
        case = cases[name]
        region = sitk.GetArrayFromImage(sitk.ReadImage(case["altered_mask"]))
        z = int(np.argwhere(region > 0).mean(0)[0]) if region.any() else region.shape[0] // 2
        for j, role in enumerate(("fixed", "moving")):
            axes[i, j].imshow(sitk.GetArrayFromImage(sitk.ReadImage(case[role]))[z], cmap="gray", origin="lower")
            axes[i, j].set_title(role if i == 0 else "", fontsize=8)
        axes[i, 0].contour(region[z], levels=[0.5], colors="r", linewidths=0.6)
        axes[i, 0].set_ylabel(name.replace("missing3d_", ""), fontsize=8)
        for j, label in enumerate(labels):
            ax = axes[i, 2 + j]
            row = next((r for r in ok if r["case"] == name and row_label(r) == label), None)
            if row is not None:
                im = ax.imshow(sitk.GetArrayFromImage(sitk.ReadImage(row["error_map"]))[z], cmap="magma", vmin=0, vmax=4,
                               origin="lower")
                ax.contour(region[z], levels=[0.5], colors="c", linewidths=0.5)
                m = row["metrics"]
                ax.set_xlabel(f"in {m.get('epe_inside_mean', float('nan')):.2f} band {m.get('epe_band_mean', float('nan')):.2f}",
                              fontsize=7)
            if i == 0:
                ax.set_title(label.replace("deepsalreg-", "DSR ").replace(" [", "\n["), fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, ax=axes[:, 2:].ravel().tolist(), shrink=0.6, label="end-point error (mm)")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    from .machine import load_average, machine_info
    from .methods import available, trained_model
    from .run import DEFAULT_DATA, HERE, Runner, run_cases

    parser = argparse.ArgumentParser(description="3D missing-correspondence study (resection, tumour, removal, contrast).")
    parser.add_argument("--quick", action="store_true", help="one subject, one size, 3 mm voxels")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"shared data folder (default {DEFAULT_DATA})")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results_missing3d)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated benchmark methods")
    parser.add_argument("--model-3d", default=None, help="DeepSalReg model for the deepsalreg rows (default: shipped default-3d)")
    parser.add_argument("--append", action="store_true", help="keep the folder's earlier rows of other methods/models")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    scale = "quick" if args.quick else "full"
    out = args.out or HERE / ("results_missing3d" if scale == "full" else "results_missing3d_quick")
    work = out / "work"
    t0 = time.time()
    methods = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        ok, reason = available(method)
        if ok:
            methods.append(method)
        else:
            print(f"  skipping {method}: {reason}")
    model = args.model_3d or trained_model(3) or "none"
    runner = Runner(dict(iterations=100, device="cpu", models={"3": model}), True, args.timeout, args.threads)
    cases = prepare(args.data, work, scale)
    if not cases:
        raise SystemExit(f"no study pairs: {args.data / 'brain_t1'} is needed")
    rows = run_cases(cases, methods, runner, work)
    for r in rows:
        r.setdefault("model", model if r["method"].startswith("deepsalreg") else None)
    previous = out / "results.json"
    if args.append and previous.is_file():
        new = {(r["case"], row_label(r)) for r in rows}
        rows = [r for r in json.loads(previous.read_text())["rows"] if (r["case"], row_label(r)) not in new] + rows
    summary = summarise(rows)
    loads = runner.loads + [load_average()]
    command = "python -m benchmarks.missing_3d " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    result = dict(machine=machine_info(), run=dict(command=command.strip(), scale=scale, load_min=min(loads), load_max=max(loads),
                                                   wall_minutes=round((time.time() - t0) / 60, 1)),
                  rows=rows, summary=summary, targets=targets(summary), cases={c["name"]: c for c in cases})
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    os.replace(tmp, previous)
    (out / "results.md").write_text(document(result))
    picture(rows, result["cases"], out / "fields.png")
    print(f"wrote {out / 'results.md'} and {out / 'fields.png'} in {result['run']['wall_minutes']} min")
    return result


if __name__ == "__main__":
    main()
