"""Time and peak memory of the core operations: the joint saliency map and each network preset.

    python -m benchmarks.bench_core                  # full table (about 5-10 min on 2 CPU cores)
    python -m benchmarks.bench_core --quick          # small sizes, one repeat (under a minute)
    python -m benchmarks.bench_core --out DIR        # results folder (default benchmarks/results/core)

Cases (CPU, and CUDA too when a GPU is present):

* JSM forward and forward+backward at 2D 256^2 and 3D 64^3, 96^3, 128^3 (``joint_saliency_map`` with
  its defaults), each compared with one 3x3(x3) convolution 16 -> 16 channels on the same grid (the
  ratio says what one JSM costs in units of a small conv layer);
* the naive reference JSM (``reference_jsm.py``: 26-neighbour loop, ``index_select`` clamping, full
  tensors, plain autograd) at 96^3, to show the gain, and its agreement with the library's map;
* a forward pass of each network preset: thesis-2d and modern-2d at 256^2, modern-3d at 64^3 and 128^3
  (random weights: speed does not depend on training).

Every case runs in its own process (``measure.run_isolated``): time is the median of the repeats after
one warm-up; peak memory is the process's peak RSS minus its RSS before the case (inputs included) on
the CPU, ``torch.cuda.max_memory_allocated`` on CUDA. Writes ``core.json`` and ``core.md`` and prints
the table. The machine load (``/proc/loadavg``) is recorded before and after each case: on a shared
machine, timings taken under load are noisy.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from .machine import load_average, machine_info
from .measure import run_isolated

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "core"


# --------------------------------------------------------------------------------------------------
# cases (run in the child process)
# --------------------------------------------------------------------------------------------------


def _setup_torch():
    import torch  # noqa: F401  (imported before the memory baseline)

    import DeepSalRegLib.networks  # noqa: F401
    import DeepSalRegLib.saliency  # noqa: F401

    from . import reference_jsm  # noqa: F401


def _images(shape, device, requires_grad=False):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    nd = len(shape)
    pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
    out = []
    for _ in range(2):
        noise = torch.rand((1, 1, *shape), generator=g)
        img = pool(noise, 5, stride=1, padding=2)  # some structure, not white noise
        out.append(img.to(device).requires_grad_(requires_grad))
    return out


def _sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, repeats, device):
    fn()  # warm-up (allocator, kernels, thread pool)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return dict(median_s=statistics.median(times), min_s=min(times), repeats=repeats)


def case_jsm(shape, device="cpu", backward=False, naive=False, repeats=3):
    """Time the (naive or library) JSM on ``shape``; with ``backward`` also the gradient wrt the warped image."""
    import torch

    from DeepSalRegLib.saliency import joint_saliency_map

    from .reference_jsm import naive_joint_saliency_map

    torch.manual_seed(0)
    jsm = naive_joint_saliency_map if naive else joint_saliency_map
    fixed, warped = _images(shape, device, requires_grad=backward)

    def run():
        if backward:
            warped.grad = None
            jsm(fixed, warped).sum().backward()
        else:
            with torch.no_grad():
                jsm(fixed, warped)

    return _timed(run, repeats, device)


def case_conv(shape, device="cpu", backward=False, channels=16, repeats=3):
    """One 3x3(x3) convolution ``channels -> channels`` (the unit the JSM is compared with)."""
    import torch

    torch.manual_seed(0)
    nd = len(shape)
    conv = (torch.nn.Conv2d if nd == 2 else torch.nn.Conv3d)(channels, channels, 3, padding=1).to(device)
    x = torch.rand((1, channels, *shape), device=device, requires_grad=backward)

    def run():
        if backward:
            x.grad = None
            conv.zero_grad(set_to_none=True)
            conv(x).sum().backward()
        else:
            with torch.no_grad():
                conv(x)

    return _timed(run, repeats, device)


def case_network(preset, shape, device="cpu", repeats=3):
    """Forward pass of a preset (random weights), eval mode, no gradients."""
    import torch

    from DeepSalRegLib.networks import build_model

    torch.manual_seed(0)
    net = build_model(preset).to(device).eval()
    fixed, moving = _images(shape, device)
    params = sum(p.numel() for p in net.parameters())

    def run():
        with torch.no_grad():
            net(fixed, moving)

    out = _timed(run, repeats, device)
    out["parameters"] = params
    return out


def case_agreement(shape):
    """Largest absolute difference between the naive and the library JSM (forward and input gradient)."""
    import torch

    from DeepSalRegLib.saliency import joint_saliency_map

    from .reference_jsm import naive_joint_saliency_map

    fixed, warped = _images(shape, "cpu", requires_grad=True)
    a = joint_saliency_map(fixed, warped)
    (ga,) = torch.autograd.grad((a * a).sum(), warped)
    b = naive_joint_saliency_map(fixed, warped)
    (gb,) = torch.autograd.grad((b * b).sum(), warped)
    return dict(max_abs_diff=float((a - b).abs().max()), max_abs_grad_diff=float((ga - gb).abs().max()),
                max_abs_grad=float(gb.abs().max()))


# --------------------------------------------------------------------------------------------------
# the plan and the table
# --------------------------------------------------------------------------------------------------


def plan(quick: bool, devices):
    """List of ``(group, label, shape, target, kwargs)``."""
    jsm_2d = [(256, 256)]
    jsm_3d = [(64,) * 3] if quick else [(64,) * 3, (96,) * 3, (128,) * 3]
    naive_3d = (64,) * 3 if quick else (96,) * 3
    nets = [("thesis-2d", (256, 256)), ("modern-2d", (256, 256)), ("modern-3d", (64,) * 3)]
    if not quick:
        nets.append(("modern-3d", (128,) * 3))
    repeats = 1 if quick else 3
    cases = []
    for device in devices:
        for shape in jsm_2d + jsm_3d:
            for backward in (False, True):
                mode = "fwd+bwd" if backward else "fwd"
                cases.append(("jsm", f"JSM {mode}", shape, device, "case_jsm",
                              dict(shape=list(shape), device=device, backward=backward, repeats=repeats)))
                cases.append(("conv", f"conv 16->16 {mode}", shape, device, "case_conv",
                              dict(shape=list(shape), device=device, backward=backward, repeats=repeats)))
        for backward in (False, True):
            mode = "fwd+bwd" if backward else "fwd"
            cases.append(("naive", f"naive JSM {mode}", naive_3d, device, "case_jsm",
                          dict(shape=list(naive_3d), device=device, backward=backward, naive=True,
                               repeats=1)))
        for preset, shape in nets:
            cases.append(("network", f"{preset} forward", shape, device, "case_network",
                          dict(preset=preset, shape=list(shape), device=device, repeats=repeats)))
    return cases


def _size(shape):
    return "x".join(str(s) for s in shape) if len(set(shape)) > 1 else f"{shape[0]}^{len(shape)}"


def _memory(report):
    if not report.get("ok"):
        return None
    if report.get("cuda_peak_mb") is not None:
        return report["cuda_peak_mb"]
    return report.get("peak_rss_mb")


def build_rows(results):
    """Table rows with the JSM/conv ratios and the naive/library gain filled in."""
    index = {(r["label"], r["size"], r["device"]): r for r in results}
    rows = []
    for r in results:
        row = dict(r)
        if r["group"] == "jsm":
            conv = index.get((r["label"].replace("JSM", "conv 16->16"), r["size"], r["device"]))
            if conv and conv.get("time_s") and r.get("time_s"):
                row["ratio_to_conv_time"] = r["time_s"] / conv["time_s"]
            if conv and conv.get("peak_mb") and r.get("peak_mb"):
                row["ratio_to_conv_memory"] = r["peak_mb"] / conv["peak_mb"]
        if r["group"] == "naive":
            lib = index.get((r["label"].replace("naive JSM", "JSM"), r["size"], r["device"]))
            if lib and lib.get("time_s") and r.get("time_s"):
                row["naive_over_library_time"] = r["time_s"] / lib["time_s"]
            if lib and lib.get("peak_mb") and r.get("peak_mb"):
                row["naive_over_library_memory"] = r["peak_mb"] / lib["peak_mb"]
        rows.append(row)
    return rows


def _fmt(value, digits=1, unit=""):
    if value is None:
        return "-"
    return f"{value:.{digits}f}{unit}"


def markdown(rows, info, agreement) -> str:
    lines = [
        "# Core operations: time and peak memory",
        "",
        f"Date: {info['date']}. Machine: {info['cpu']} ({info['cores']} cores), torch {info['torch']}, "
        f"{info['threads']} threads; GPU: {info['gpu'] or 'none'}.",
        "Time: median of the repeats after a warm-up. Memory: peak RSS of the case's own process minus its RSS "
        "before the case (CPU), `torch.cuda.max_memory_allocated` (CUDA). Load = 1-min load average before/after "
        "the case (the machine has other users: above the core count, times are inflated).",
        "",
        "| case | size | device | time (ms) | peak memory (MB) | vs conv 16->16 (time / memory) | "
        "naive / library (time / memory) | load |",
        "|---|---|---|---:|---:|---|---|---|",
    ]
    for r in rows:
        if not r.get("ok"):
            lines.append(f"| {r['label']} | {r['size']} | {r['device']} | failed: {r.get('error', '')[:80]} | | | | |")
            continue
        ratio = "-"
        if "ratio_to_conv_time" in r:
            ratio = f"{r['ratio_to_conv_time']:.1f}x / {_fmt(r.get('ratio_to_conv_memory'), 1, 'x')}"
        gain = "-"
        if "naive_over_library_time" in r:
            gain = f"{r['naive_over_library_time']:.1f}x / {_fmt(r.get('naive_over_library_memory'), 1, 'x')}"
        lines.append(
            f"| {r['label']} | {r['size']} | {r['device']} | {r['time_s'] * 1000:.1f} | {_fmt(r.get('peak_mb'), 0)} | "
            f"{ratio} | {gain} | {r['load_before']:.1f}/{r['load_after']:.1f} |")
    if agreement:
        lines += ["", f"Naive vs library JSM agreement at {agreement['size']}: max |difference| "
                      f"{agreement['max_abs_diff']:.2e} (map), {agreement['max_abs_grad_diff']:.2e} "
                      f"(input gradient, largest gradient {agreement['max_abs_grad']:.2e})."]
    return "\n".join(lines) + "\n"


def run(quick=False, out=DEFAULT_OUT, devices=None, timeout=1800, log=print) -> dict:
    import torch

    devices = devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    info = machine_info()
    results = []
    for group, label, shape, device, target, kwargs in plan(quick, devices):
        load_before = load_average()
        report = run_isolated(f"benchmarks.bench_core:{target}", kwargs, setup="benchmarks.bench_core:_setup_torch",
                              timeout=timeout)
        entry = dict(group=group, label=label, size=_size(shape), shape=list(shape), device=device,
                     ok=bool(report.get("ok")), load_before=load_before, load_after=load_average())
        if report.get("ok"):
            entry.update(time_s=report["result"]["median_s"], min_s=report["result"]["min_s"],
                         repeats=report["result"]["repeats"], peak_mb=_memory(report),
                         parameters=report["result"].get("parameters"))
            log(f"  {label:28s} {entry['size']:>8s} {device:5s} {entry['time_s'] * 1000:10.1f} ms "
                f"{entry['peak_mb'] or 0:9.0f} MB  (load {load_before:.1f})")
        else:
            entry["error"] = report.get("error")
            log(f"  {label:28s} {entry['size']:>8s} {device:5s} FAILED: {entry['error']}")
        results.append(entry)
    agreement_shape = (32,) * 3
    agree = run_isolated("benchmarks.bench_core:case_agreement", dict(shape=list(agreement_shape)), timeout=timeout)
    agreement = dict(agree["result"], size=_size(agreement_shape)) if agree.get("ok") else None
    rows = build_rows(results)
    document = dict(machine=info, quick=quick, rows=rows, agreement=agreement,
                    command="python -m benchmarks.bench_core" + (" --quick" if quick else ""))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "core.json").write_text(json.dumps(document, indent=2) + "\n")
    table = markdown(rows, info, agreement)
    (out / "core.md").write_text(table)
    log("\n" + table)
    return document


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/core, "
                        "benchmarks/results_quick/core with --quick)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="devices to measure (default: CPU, plus CUDA when available)")
    args = parser.parse_args(argv)
    out = args.out or (DEFAULT_OUT if not args.quick else DEFAULT_OUT.parents[1] / "results_quick" / "core")
    devices = None if args.device == "all" else [args.device]
    run(quick=args.quick, out=out, devices=devices)


if __name__ == "__main__":
    main()
