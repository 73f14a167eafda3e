"""Re-measure the headline timings alone (for a second reading when the shared machine is quieter).

    python -m benchmarks.key_timings [--out benchmarks/results] [--repeats 3]

Cases (CPU, each in its own process, see ``measure.py``): the JSM forward and forward+backward at 96^3 and
128^3, the naive reference JSM forward+backward at 96^3, the ``modern-3d`` forward at 128^3 and
``register()`` end to end with an untrained ``modern-3d`` checkpoint on a 128^3 pair (the "< 3 s"
target), each with the 1-minute load average before and after. Writes ``key_timings.json`` and
``key_timings.md``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .machine import load_average, machine_info
from .measure import run_isolated

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def cases(work: Path, repeats: int):
    from .scaling import untrained_checkpoint, write_pair

    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    fixed, moving = write_pair(data, work / "key" / "3d_128", 3, (128, 128, 128))
    setup = "benchmarks.bench_core:_setup_torch"
    out = []
    for n in (96, 128):
        for backward in (False, True):
            out.append((f"JSM {'fwd+bwd' if backward else 'fwd'} {n}^3", "benchmarks.bench_core:case_jsm",
                        dict(shape=[n] * 3, backward=backward, repeats=repeats), setup))
    out.append(("naive JSM fwd+bwd 96^3", "benchmarks.bench_core:case_jsm",
                dict(shape=[96] * 3, backward=True, naive=True, repeats=1), setup))
    out.append(("modern-3d forward 128^3", "benchmarks.bench_core:case_network",
                dict(preset="modern-3d", shape=[128] * 3, repeats=repeats), setup))
    out.append(("register() network only, 128^3 pair, end to end", "benchmarks.scaling:case_register",
                dict(fixed=fixed, moving=moving, model=untrained_checkpoint(work, 3), iterations=0,
                     max_voxels=8 * 128 ** 3), "benchmarks.scaling:setup_torch"))
    out.append(("register() default (affine + network), 128^3 pair, end to end", "benchmarks.scaling:case_register",
                dict(fixed=fixed, moving=moving, model=untrained_checkpoint(work, 3), iterations=0,
                     max_voxels=8 * 128 ** 3, affine=True), "benchmarks.scaling:setup_torch"))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = []
    for label, target, kwargs, setup in cases(args.out / "work", args.repeats):
        before = load_average()
        report = run_isolated(target, kwargs, setup=setup)
        row = dict(case=label, ok=bool(report.get("ok")), load_before=before, load_after=load_average())
        if report.get("ok"):
            row.update(time_s=report["result"]["median_s"], peak_mb=report.get("peak_rss_mb"),
                       steps_s=report["result"].get("steps_s"))
            print(f"  {label:52s} {row['time_s']:8.3f} s {row['peak_mb']:8.0f} MB (load {before:.1f})")
        else:
            row["error"] = report.get("error")
            print(f"  {label:52s} FAILED {row['error']}")
        rows.append(row)
    info = machine_info()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "key_timings.json").write_text(json.dumps(dict(machine=info, rows=rows), indent=1) + "\n")
    lines = [f"# Key timings, re-measured ({info['date']}, {info['cpu']}, {info['cores']} cores, torch {info['torch']})",
             "", "| case | time (s) | peak memory (MB) | load before/after |", "|---|---:|---:|---|"]
    for r in rows:
        if r["ok"]:
            lines.append(f"| {r['case']} | {r['time_s']:.3f} | {r['peak_mb']:.0f} | "
                         f"{r['load_before']:.1f}/{r['load_after']:.1f} |")
        else:
            lines.append(f"| {r['case']} | failed: {r['error']} | | |")
    for r in rows:
        if r["ok"] and r.get("steps_s"):
            lines += ["", f"{r['case']}, steps (s): " + ", ".join(f"{k} {v:.2f}" for k, v in r["steps_s"].items())]
    (args.out / "key_timings.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
