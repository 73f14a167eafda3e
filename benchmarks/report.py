"""Markdown tables of a benchmark run (``results.md``) and the status of the issue's targets."""
from __future__ import annotations

import math

import numpy as np

from .methods import METHODS

#: per dataset: (title, [(metric key, column title, format, better)], note)
COLUMNS = {
    "liver": ("ETH liver 4D-MRI, landmark TRE (mm)", [
        ("tre_mean", "TRE mean", "{:.2f}"), ("tre_median", "TRE median", "{:.2f}"),
        ("tre_liver_mean", "TRE liver", "{:.2f}"), ("tre_outside_mean", "TRE outside", "{:.2f}")]),
    "brain": ("Brain T1 inter-subject, both directions, mean Dice over the 30 labels", [
        ("dice_mean", "Dice", "{:.3f}")]),
    "prostate": ("PROMISE12 prostate inter-subject, gland Dice", [("dice_mean", "gland Dice", "{:.3f}")]),
    "hands": ("FAIR hand X-rays, landmark error (px)", [
        ("tre_mean", "mean", "{:.2f}"), ("tre_median", "median", "{:.2f}")]),
    "anhir": ("ANHIR histology, landmark error (original px) and rTRE", [
        ("tre_median", "TRE median", "{:.1f}"), ("rtre_median", "rTRE median", "{:.4f}"),
        ("rtre_mean", "rTRE mean", "{:.4f}")]),
    "drive": ("DRIVE with known synthetic deformations: end-point error (px), vessel Dice", [
        ("epe_mean", "EPE mean", "{:.2f}"), ("epe_p95", "EPE p95", "{:.2f}"), ("dice_mean", "vessel Dice", "{:.3f}")]),
}


def _f(value, fmt="{:.2f}"):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def aggregate(rows: list[dict], dataset: str) -> list[dict]:
    """Per method: means over the dataset's pairs of every metric, time and memory."""
    by = {}
    for r in rows:
        if r["dataset"] == dataset:
            by.setdefault(r["method"], []).append(r)
    out = []
    for method in METHODS:
        runs = by.get(method)
        if not runs:
            continue
        ok = [r for r in runs if r.get("ok")]
        entry = dict(method=method, pairs=len(runs), ok=len(ok), notes=sorted({r.get("note") for r in ok if r.get("note")}),
                     errors=sorted({r.get("error", "")[:120] for r in runs if not r.get("ok")}))
        keys = set().union(*[r["metrics"].keys() for r in ok]) if ok else set()
        for key in keys:
            values = [r["metrics"].get(key) for r in ok if isinstance(r["metrics"].get(key), (int, float))]
            entry[key] = float(np.mean(values)) if values else None
        for key in ("wall_s", "peak_mb"):
            values = [r[key] for r in ok if r.get(key) is not None]
            entry[key] = float(np.mean(values)) if values else None
        out.append(entry)
    return out


def accuracy_tables(rows: list[dict]) -> list[str]:
    lines = []
    for dataset, (title, columns) in COLUMNS.items():
        table = aggregate(rows, dataset)
        if not table:
            continue
        pairs = sorted({r["case"] for r in rows if r["dataset"] == dataset})
        notes = sorted({r.get("case_notes", "") for r in rows if r["dataset"] == dataset and r.get("case_notes")})
        lines += ["", f"### {title}", "", f"Pairs ({len(pairs)}): {', '.join(pairs)}. " + "; ".join(notes), ""]
        head = ["method"] + [c[1] for c in columns] + ["folding %", "SD logJ", "time / pair (s)", "peak MB / pair"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for e in table:
            label = METHODS[e["method"]][0]
            if e["notes"]:
                label += " *(" + "; ".join(e["notes"]) + ")*"
            if not e["ok"]:
                lines.append(f"| {label} | failed: {'; '.join(e['errors'])} |" + " |" * (len(head) - 2))
                continue
            cells = [_f(e.get(key), fmt) for key, _, fmt in columns]
            folding = e.get("folding_fraction")
            cells += [_f(folding * 100 if folding is not None else None, "{:.3f}"), _f(e.get("sd_log_jacobian"), "{:.3f}"),
                      _f(e.get("wall_s"), "{:.1f}"), _f(e.get("peak_mb"), "{:.0f}")]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def missing_table(summary: list[dict]) -> list[str]:
    if not summary:
        return []
    lines = ["", "| method | alteration | EPE outside (px) | change vs none | EPE inside (px) | "
                 "log-Jacobian error inside | folding % |", "|---|---|---:|---:|---:|---:|---:|"]
    for e in summary:
        lines.append(f"| {METHODS[e['method']][0]} | {e['variant']} | {_f(e['epe_outside'])} | "
                     f"{_f(e['delta_outside'], '{:+.2f}')} | {_f(e['epe_inside'])} | {_f(e['logj_inside'], '{:.3f}')} | "
                     f"{_f(e['folding'] * 100 if e['folding'] is not None else None, '{:.3f}')} |")
    return lines


def scaling_table(rows: list[dict], ratios: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["", "| component | size | device | time (s) | peak memory (MB) | load |", "|---|---|---|---:|---:|---|"]
    for r in rows:
        if r.get("ok"):
            lines.append(f"| {r['component']} | {r['size']} | {r['device']} | {r['time_s']:.3f} | "
                         f"{_f(r.get('peak_mb'), '{:.0f}')} | {r['load_before']:.1f}/{r['load_after']:.1f} |")
        else:
            lines.append(f"| {r['component']} | {r['size']} | {r['device']} | failed: {r.get('error', '')[:80]} | | |")
    if ratios:
        lines += ["", "Peer time / DeepSalReg time on the same files, same run, CPU:", "",
                  "| size | peer | vs | peer (s) | DeepSalReg (s) | ratio |", "|---|---|---|---:|---:|---:|"]
        for q in ratios:
            lines.append(f"| {q['size']} | {q['peer']} | {q['ours']} | {q['peer_s']:.2f} | {q['ours_s']:.2f} | "
                         f"{q['ratio']:.1f}x |")
    return lines


def targets(rows, summary, scaling_rows, models) -> list[dict]:
    """The issue's targets with where this run stands (numbers, not adjectives)."""
    out = []

    def agg(dataset):
        return {e["method"]: e for e in aggregate(rows, dataset) if e["ok"]}

    accuracy_keys = (("liver", "tre_mean", True), ("brain", "dice_mean", False), ("prostate", "dice_mean", False),
                     ("hands", "tre_mean", True), ("anhir", "rtre_median", True), ("drive", "epe_mean", True))

    def versus_peers(method, peer_methods):
        """``(dataset, key, ours, best, best peer, met)`` per dataset where ``method`` and a peer ran."""
        for dataset, key, lower in accuracy_keys:
            a = agg(dataset)
            ours = a.get(method, {}).get(key)
            peers = {m: a[m][key] for m in peer_methods if m in a and a[m].get(key) is not None}
            if ours is None or not peers:
                continue
            best_method = (min if lower else max)(peers, key=peers.get)
            best = peers[best_method]
            yield dataset, key, ours, best, best_method, (ours <= best if lower else ours >= best)

    def worst_folding(method):
        folding = [r["metrics"]["folding_fraction"] for r in rows
                   if r.get("ok") and r["method"] == method and r["dataset"] != "missing"]
        return f"; folding max {max(folding) * 100:.3f} %" if folding else ""

    # the default (quality balanced) against the best peer, and its time per 3D pair against ANTs SyN
    checks = [f"{d} {k}: {ours:.4g} vs best peer {best:.4g} ({m}; {'met' if ok else 'not met'})"
              for d, k, ours, best, m, ok in versus_peers("deepsalreg-balanced", ("ants-syn", "elastix-bspline", "convexadam"))]
    if checks:
        out.append(dict(target="Default (quality balanced) >= best of ANTs SyN, elastix, ConvexAdam per dataset; "
                               "folding < 0.1 %", status="; ".join(checks) + worst_folding("deepsalreg-balanced")))
    times = []
    for dataset in ("liver", "brain", "prostate"):
        a = agg(dataset)
        if "deepsalreg-balanced" in a and "ants-syn" in a:
            ours, ants = a["deepsalreg-balanced"]["wall_s"], a["ants-syn"]["wall_s"]
            times.append(f"{dataset} {ours:.1f} s vs {ants:.1f} s ({ours / ants:.2f}x; {'met' if ours <= ants else 'not met'})")
    if times:
        out.append(dict(target="Default wall time per 3D pair <= ANTs SyN's (same run)", status="; ".join(times)))
    # accuracy of DeepSalReg + IO vs the peers
    for method in ("deepsalreg-io", "deepsalreg-io-200"):
        checks = [f"{d} {k}: {ours:.3f} vs best peer {best:.3f} ({'met' if ok else 'not met'})"
                  for d, k, ours, best, _, ok in versus_peers(method, ("ants-syn", "elastix-bspline"))]
        if checks:
            out.append(dict(target=f"IO accuracy >= ANTs SyN and elastix; folding < 0.1 % ({METHODS[method][0]})",
                            status="; ".join(checks) + worst_folding(method)))
    # network-only speed and usefulness
    net_3d = [r for r in rows if r.get("ok") and r["method"] == "deepsalreg-net" and r["dim"] == 3]
    ants_3d = [r for r in rows if r.get("ok") and r["method"] == "ants-syn" and r["dim"] == 3]
    speed = [f"{q['ratio']:.1f}x at {q['size']}" for q in _ratios(scaling_rows)
             if q["peer"] == "ants-syn" and q["ours"] == "register_net" and q["dim"] == 3]
    if models.get(3) and net_3d and ants_3d:
        ratio = np.mean([r["wall_s"] for r in ants_3d]) / np.mean([r["wall_s"] for r in net_3d])
        status = f"{ratio:.0f}x faster than ANTs SyN (mean time over the real 3D pairs)"
    else:
        status = ("no trained 3D model: the network-only rows ran no network (identity field), accuracy not "
                  "measurable yet")
    if speed:
        status += ("; register() with a modern-3d network (untrained weights, same cost) vs ANTs SyN on the "
                   "same files: " + ", ".join(speed))
    if net_3d or speed:
        out.append(dict(target="network-only >= 100x faster than ANTs SyN per 3D pair, better than identity",
                        status=status))
    versus = []
    for dataset, key in (("hands", "tre_mean"), ("anhir", "rtre_median"), ("drive", "epe_mean"), ("liver", "tre_mean"),
                         ("brain", "dice_mean"), ("prostate", "dice_mean")):
        a = agg(dataset)
        net, ident = a.get("deepsalreg-net", {}), a.get("identity", {})
        with_affine = a.get("deepsalreg-affine-net", {})
        dim = 2 if dataset in ("hands", "anhir", "drive") else 3
        if models.get(dim) and net.get(key) is not None and ident.get(key) is not None:
            line = f"{dataset} {key} {net[key]:.3f} ({net['wall_s']:.2f} s/pair)"
            if with_affine.get(key) is not None:
                line += f", with affine {with_affine[key]:.3f} ({with_affine['wall_s']:.2f} s/pair)"
            versus.append(line + f" vs identity {ident[key]:.3f}")
    if versus:
        out.append(dict(target="network-only clearly better than identity (trained models)", status="; ".join(versus)))
    # CPU end to end 128^3, memory 256^3
    for r in scaling_rows:
        cpu_3d = r.get("ok") and r["dim"] == 3 and r["device"] == "cpu"
        if cpu_3d and r["component"] == "register_net" and r["size"] == "128^3":
            out.append(dict(target="CPU: 3D 128^3 pair < 3 s end to end (network)",
                            status=f"{r['time_s']:.2f} s (load {r['load_before']:.1f}; "
                                   f"{'met' if r['time_s'] < 3 else 'not met'})"))
        if cpu_3d and r["size"] == "256^3" and r["component"] in ("register_net", "io_iteration"):
            peak = r.get("peak_mb") or 0
            out.append(dict(target=f"Memory: 256^3 within 8 GB on CPU ({r['component']})",
                            status=f"{peak / 1024:.2f} GB ({'met' if peak < 8192 else 'not met'})"))
        if r.get("ok") and r["component"] == "network" and r["size"] == "160x192x224" and r["device"].startswith("cuda"):
            out.append(dict(target="GPU: 160x192x224 network < 0.1 s", status=f"{r['time_s']:.3f} s"))
    if not any(r.get("device", "").startswith("cuda") for r in scaling_rows):
        out.append(dict(target="GPU: 160x192x224 network < 0.1 s", status="not measured: no GPU in this run"))
    # missing correspondences
    by = {(e["method"], e["variant"]): e for e in summary}
    lines = []
    for method in ("deepsalreg-balanced", "deepsalreg-balanced-nojsm", "deepsalreg-io", "deepsalreg-io-nojsm",
                   "ants-syn", "elastix-bspline"):
        if (method, "none") not in by:
            continue
        parts = [f"{v} {by[(method, v)]['epe_outside']:.2f} ({by[(method, v)]['delta_outside']:+.2f})"
                 for v in ("lesion", "removal", "contrast") if (method, v) in by]
        inside = by.get((method, "lesion"), {}).get("epe_inside")
        lines.append(f"{method}: EPE outside none {by[(method, 'none')]['epe_outside']:.2f} px, " + ", ".join(parts)
                     + (f"; inside the lesion {inside:.2f} px" if inside is not None else ""))
    if lines:
        out.append(dict(target="Missing correspondences: JSM error outside stays at its level; beats no-JSM and peers",
                        status="; ".join(lines)))
    return out


def _policies(rows) -> str:
    """How many accuracy runs spun or slept while waiting (a run whose process found the cores busy sleeps)."""
    from collections import Counter

    counts = Counter(r.get("wait_policy") or "not recorded" for r in rows)
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items())) or "no runs"


def _ratios(scaling_rows):
    from .scaling import ratios

    return ratios(scaling_rows)


def document(info, args, models, conventions, rows, summary, scaling_rows, ratio_rows, target_rows) -> str:
    lines = [
        "# DeepSalReg benchmarks against ANTs and elastix",
        "",
        f"- Date: {info['date']}",
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB RAM, GPU: {info['gpu'] or 'none'}; "
        f"{info['platform']}",
        f"- Software: Python {info['python']}, torch {info['torch']}, SimpleITK {info['simpleitk']}, antspyx "
        f"{info['antspyx'] or 'not installed'}, itk-elastix {info['itk_elastix'] or 'not installed'}; "
        f"{args['threads']} threads for every method (torch, ITK/ANTs/elastix); OpenMP wait policy chosen "
        f"from the load as each method's process starts (DeepSalRegLib.threads): {_policies(rows)}",
        f"- Command: `{args['command']}`" + (f" at commit {info['revision']}" if info.get("revision") else ""),
        f"- Trained models used: 2D {models.get(2) or 'none available'}, 3D {models.get(3) or 'none available'}"
        + ("" if models.get(2) and models.get(3) else
           " (rows 'network only' without a model are the identity field: *untrained/not available*; "
           "'instance optimisation' then starts from the identity)"),
        f"- DeepSalReg instance optimisation: {args['iterations']} iterations. Every method's wall time is its own "
        "registration call from the input files to the written transform (no interpreter start, no imports), "
        "peak memory is its process's peak RSS above the RSS before the call; one process per method and pair.",
        f"- Machine load (1-min average) over the run: {args['load_min']:.1f}-{args['load_max']:.1f} on {info['cores']} "
        "cores: the machine was shared, so absolute times are inflated; ratios measured in the same run are "
        "more reliable than absolute numbers.",
        "",
        "## Targets",
        "",
        "| target | where this run stands |",
        "|---|---|",
    ]
    lines += [f"| {t['target']} | {t['status']} |" for t in target_rows]
    if conventions:
        lines += ["", "## Transform conventions (known translation, written file read back with SimpleITK)", "",
                  "| method | dim | file | expected t | recovered mean displacement | verdict |",
                  "|---|---|---|---|---|---|"]
        for c in conventions:
            lines.append(f"| {c['method']} | {c['dim']}D | {c.get('transform_file', '-')} | {c.get('expected', '-')} | "
                         f"{c.get('recovered', c.get('error', '-'))} | {c['status']} |")
    lines += ["", "## Accuracy, regularity, time and memory per dataset (means over pairs)"]
    lines += accuracy_tables(rows)
    if summary:
        lines += ["", "## Missing correspondences (2D, known deformation; means over source images)", "",
                  "EPE outside = end-point error outside the altered region (and a margin); 'change vs none' = the "
                  "same quantity minus its value on the unaltered pair (0 = unaffected)."]
        lines += missing_table(summary)
    if scaling_rows:
        lines += ["", "## Speed and memory scaling"]
        lines += scaling_table(scaling_rows, ratio_rows)
    return "\n".join(lines) + "\n"
