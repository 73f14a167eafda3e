"""The one command: accuracy and time of every method on the real data, the missing-correspondence study,
speed and memory scaling; writes JSON, a markdown report and PNG plots.

    python -m benchmarks.run                  # full run (benchmarks/results/), ~40+ min on 2 CPU cores
    python -m benchmarks.run --quick          # one small pair per dataset, small sizes (a few minutes)
    python -m benchmarks.run --quick --tiny   # CI: tiny inputs, in-process, seconds
    python -m benchmarks.run --methods deepsalreg-io,ants-syn --skip scaling

The peers (ANTs SyN via antspyx, elastix via itk-elastix) are optional: ``pip install -r
benchmarks/requirements.txt``; a missing one is skipped with its reason. Each method runs in its own
process per pair (time and peak memory, ``measure.py``), writes its transform into
``<out>/work/transforms/<case>/<method>/`` and is evaluated from that file by ``evaluation.evaluate``.
``<out>/work`` (prepared inputs derived from the data, transforms, error maps) is never committed.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from DeepSalRegLib.threads import choose_wait_policy

from . import conventions, datasets, evaluation, missing_correspondence, plots, report, scaling
from .machine import load_average, machine_info
from .measure import run_inline, run_isolated
from .methods import METHODS, SETUP, available, supports, trained_model

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = Path(os.environ.get("DEEPSALREG_SHARED_DATA", HERE.parent.parent / "shared" / "data"))
PARTS = ("conventions", "accuracy", "missing", "scaling")


class Runner:
    """Runs ``methods.run_method`` for one method and case, isolated (own process) or inline."""

    def __init__(self, options: dict, isolate: bool, timeout: float, threads: int):
        self.options, self.isolate, self.timeout, self.threads = options, isolate, timeout, threads
        self.loads = []

    def __call__(self, method: str, case: dict, outdir: Path) -> dict:
        kwargs = dict(method=method, case=case, outdir=str(outdir), options=self.options)
        self.loads.append(load_average())
        if self.isolate:
            report_ = run_isolated("benchmarks.methods:run_method", kwargs, setup=SETUP[method], timeout=self.timeout,
                                   threads=self.threads)
        else:
            report_ = run_inline("benchmarks.methods:run_method", kwargs, setup=SETUP[method])
        report_["load_before"] = self.loads[-1]
        self.loads.append(load_average())
        report_["load_after"] = self.loads[-1]
        return report_


def run_cases(cases, methods, runner: Runner, work: Path, log=print) -> list[dict]:
    """Every method on every case; one row per (case, method) with metrics from the written transform."""
    rows = []
    for case in cases:
        for method in methods:
            if not supports(method, case["dim"]):
                continue
            outdir = work / "transforms" / case["name"] / method
            rep = runner(method, case, outdir)
            row = dict(dataset=case["dataset"], case=case["name"], dim=case["dim"], method=method, ok=bool(rep.get("ok")),
                       units=case.get("units"), case_notes=case.get("notes", ""), load_before=rep["load_before"],
                       load_after=rep["load_after"], wait_policy=rep.get("wait_policy"))
            for key in ("source", "variant"):
                if key in case:
                    row[key] = case[key]
            if rep.get("ok"):
                result = rep["result"]
                row.update(wall_s=rep["wall_s"], peak_mb=rep.get("peak_rss_mb"), transform=result["transform"],
                           note=result.get("note", ""), model=result.get("model"),
                           working_grid=result.get("working_grid"), steps_s=result.get("steps_s"))
                error_map = None
                if case.get("true_field"):
                    error_map = str(outdir / "error_map.nrrd")
                    row["error_map"] = error_map
                try:
                    row["metrics"] = evaluation.evaluate(case, result["transform"], case.get("altered_mask"), error_map)
                except Exception as exc:  # an unreadable transform is a result too
                    row.update(ok=False, error=f"evaluation: {type(exc).__name__}: {exc}"[:300], metrics={})
            else:
                row.update(error=rep.get("error", "unknown error"), metrics={})
            m = row["metrics"]
            headline = next((f"{k}={m[k]:.3f}" for k in ("tre_mean", "dice_mean", "epe_outside_mean", "epe_mean")
                             if k in m), "")
            folding = m.get("folding_fraction", 0) * 100
            log(f"  {case['name']:28s} {method:20s} " + (
                f"{row['wall_s']:8.1f} s {_mb(row['peak_mb'])} MB  {headline}  fold {folding:.3f}%"
                if row["ok"] else f"FAILED {row.get('error')}"))
            rows.append(row)
    return rows


def _mb(value) -> str:
    return f"{value:7.0f}" if value is not None else "      -"


def _json_default(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
    except ImportError:
        pass
    return str(value)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="DeepSalReg benchmarks against ANTs and elastix.")
    parser.add_argument("--quick", action="store_true", help="one small pair per dataset, small sizes (minutes)")
    parser.add_argument("--tiny", action="store_true", help="with --quick: tiny inputs, in-process (CI, seconds)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results, benchmarks/results_quick with --quick)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"shared data folder (default {DEFAULT_DATA})")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: all)")
    parser.add_argument("--user-grids", action="store_true",
                        help="DeepSalReg on register()'s own working grid (no flags, as a user runs it) instead of "
                             "each dataset's working-grid spacing")
    parser.add_argument("--no-peers", action="store_true", help="skip ANTs and elastix even when installed")
    parser.add_argument("--datasets", default=",".join(datasets.DATASETS), help="comma-separated datasets")
    parser.add_argument("--skip", default="", help=f"comma-separated parts to skip: {', '.join(PARTS)}")
    parser.add_argument("--iterations", type=int, default=None, help="DeepSalReg instance-optimisation steps "
                        "(default 100; 50 with --quick, 5 with --tiny)")
    parser.add_argument("--device", default="cpu", help="DeepSalReg device for the accuracy runs (cpu, cuda, auto)")
    parser.add_argument("--model-2d", default=None, help="DeepSalReg 2D model (name or .pt; default: the shipped default-2d)")
    parser.add_argument("--model-3d", default=None, help="DeepSalReg 3D model (name or .pt; default: the shipped default-3d)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for every method")
    parser.add_argument("--inline", action="store_true", help="run methods in this process (no memory figures; "
                        "default with --tiny)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per method and pair")
    parser.add_argument("--replot", action="store_true", help="only rewrite results.md and the PNGs from the "
                        "folder's results.json (after a change to the tables or plots)")
    args = parser.parse_args(argv)

    scale = "tiny" if args.tiny else "quick" if args.quick else "full"
    out = args.out or HERE / ("results" if scale == "full" else "results_quick")
    if args.replot:
        return write_outputs(out, json.loads((out / "results.json").read_text()))
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    iterations = args.iterations if args.iterations is not None else {"full": 100, "quick": 50, "tiny": 5}[scale]
    isolate = not (args.inline or scale == "tiny")
    choose_wait_policy()  # for in-process runs, before torch is imported (children choose their own)
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.time()
    info = machine_info()
    log = print
    log(f"DeepSalReg benchmarks ({scale}) -> {out}")
    log(f"  machine: {info['cpu']}, {info['cores']} cores, load {info['load_average']:.1f}, GPU {info['gpu'] or 'none'}")

    methods = []
    skipped = {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        ok, reason = available(method)
        if ok and args.no_peers and METHODS[method][1] == "peer":
            ok, reason = False, "--no-peers"
        if ok:
            methods.append(method)
        else:
            skipped[method] = reason
            log(f"  skipping {method}: {reason}")
    models = {2: args.model_2d or trained_model(2), 3: args.model_3d or trained_model(3)}
    log(f"  trained models: 2D {models[2] or 'none'}, 3D {models[3] or 'none'} "
        "(network-only rows without a model are the identity: untrained/not available)")
    runner = Runner(dict(iterations=iterations, device=args.device, models={str(k): v for k, v in models.items()}),
                    isolate, args.timeout, args.threads)

    convention_rows = []
    if "conventions" not in skip:
        log("conventions: known translation, every method's written transform read back")
        convention_rows = conventions.check(
            [m for m in methods if m != "identity"], work, runner, log=log,
            skip=lambda method, dim: (method == "deepsalreg-net" and not models[dim]) or not supports(method, dim))

    rows, cases = [], {}
    if "accuracy" not in skip:
        log("accuracy: preparing pairs")
        prepared = datasets.prepare(args.data, work, scale, [d.strip() for d in args.datasets.split(",") if d.strip()],
                                    log=log)
        if args.user_grids:
            prepared = datasets.user_grids(prepared)
        cases.update({c["name"]: c for c in prepared})
        rows += run_cases(prepared, methods, runner, work, log=log)

    summary = []
    if "missing" not in skip:
        log("missing correspondences: preparing pairs")
        prepared = missing_correspondence.prepare(args.data, work, scale, log=log)
        cases.update({c["name"]: c for c in prepared})
        rows += run_cases(prepared, methods, runner, work, log=log)
        summary = missing_correspondence.summarise(rows)

    scaling_rows, ratio_rows = [], []
    if "scaling" not in skip:
        log("scaling: time and peak memory vs image size")
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        peers = [m for m in methods if METHODS[m][1] == "peer" and m != "convexadam"]  # its rows: 3D pairs only
        scaling_rows = scaling.run(scale, devices, peers, args.data, work, isolate=isolate, log=log)
        ratio_rows = scaling.ratios(scaling_rows)
    elif (out / "results.json").is_file():
        # --skip scaling keeps the previous run's scaling rows (each marked with the commit it measured)
        previous = json.loads((out / "results.json").read_text())
        commit = previous.get("machine", {}).get("revision")
        scaling_rows = [dict(row, carried_from=row.get("carried_from") or commit) for row in previous.get("scaling", [])]
        ratio_rows = previous.get("scaling_ratios", [])
        if scaling_rows:
            log(f"scaling: skipped; keeping the {len(scaling_rows)} rows of the previous run (commit {commit})")

    loads = runner.loads + [r["load_before"] for r in scaling_rows] + [load_average()]
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    run_args = dict(command=command.strip(), scale=scale, threads=args.threads, iterations=iterations,
                    load_min=min(loads), load_max=max(loads), isolate=isolate, skipped_methods=skipped,
                    wall_minutes=round((time.time() - t_start) / 60, 1))
    targets = report.targets(rows, summary, scaling_rows, models)
    result = dict(machine=info, run=run_args, models={f"{k}d": v for k, v in models.items()},
                  conventions=convention_rows, rows=rows, missing_summary=summary, scaling=scaling_rows,
                  scaling_ratios=ratio_rows, targets=targets, cases=cases)
    out.mkdir(parents=True, exist_ok=True)
    result = _paths(result, lambda p: os.path.relpath(p, out) if p.startswith(str(out) + os.sep) else p)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    write_outputs(out, result)
    log(f"wrote {out} in {run_args['wall_minutes']} min")
    for t in targets:
        log(f"  target: {t['target']}: {t['status']}")
    return result


def _paths(obj, convert):
    """``obj`` with every string that names a file (``/`` in it, a known suffix) passed through ``convert``."""
    if isinstance(obj, dict):
        return {k: _paths(v, convert) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_paths(v, convert) for v in obj]
    if isinstance(obj, str) and os.sep in obj and obj.endswith((".mha", ".nii.gz", ".nrrd", ".h5", ".tfm", ".csv")):
        return convert(obj)
    return obj


def _cases_from_layout(rows, work: Path) -> dict:
    """Case files of rows from a results.json without ``cases`` (the layout of ``work/inputs``)."""
    cases = {}
    for r in rows:
        if r["dataset"] == "missing":
            folder = work / "inputs" / "missing" / r["source"]
            cases[r["case"]] = dict(fixed=str(folder / "fixed.mha"), moving=str(folder / f"moving_{r['variant']}.mha"),
                                    altered_mask=str(folder / "altered_region.nii.gz"))
        else:
            folder = work / "inputs" / r["case"]
            cases[r["case"]] = dict(fixed=str(folder / "fixed.mha"), moving=str(folder / "moving.mha"))
    return cases


def write_outputs(out: Path, result: dict) -> dict:
    """``results.md`` and the PNGs from a result document (also ``--replot``)."""
    models = {int(k[0]): v for k, v in result["models"].items()}
    result = _paths(result, lambda p: p if os.path.isabs(p) else str(out / p))
    rows, scaling_rows = result["rows"], result["scaling"]
    targets = report.targets(rows, result["missing_summary"], scaling_rows, models)
    result["targets"] = targets
    (out / "results.md").write_text(report.document(result["machine"], result["run"], models, result["conventions"],
                                                    rows, result["missing_summary"], scaling_rows,
                                                    result["scaling_ratios"], targets))
    cases = result.get("cases") or _cases_from_layout(rows, out / "work")
    written = [plots.accuracy_vs_time([r for r in rows if r["dataset"] != "missing"], out / "accuracy_vs_time.png"),
               plots.error_maps(rows, cases, out / "error_maps_missing.png", "missing"),
               plots.error_maps(rows, cases, out / "error_maps_drive.png", "drive"),
               plots.scaling_curves(scaling_rows, out / "scaling.png")]
    print(f"wrote {out / 'results.md'}, " + ", ".join(p.name for p in written if p))
    return result


if __name__ == "__main__":
    main()
