"""PNG plots of a benchmark run: accuracy vs time per method, error maps, scaling curves."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .methods import METHODS
from .report import COLUMNS, aggregate

_MARKERS = dict(zip(METHODS, itertools.cycle("xo*sD^vP")))  # robust to new methods
_SHORT = {"identity": "identity", "deepsalreg-net": "DSR network",
          "deepsalreg-affine-net": "DSR affine\n+ network", "deepsalreg-io": "DSR + IO",
          "deepsalreg-io-nojsm": "DSR + IO\nno JSM", "deepsalreg-io-200": "DSR + IO\n200 it.",
          "deepsalreg-fast": "DSR fast", "deepsalreg-balanced": "DSR default\n(balanced)",
          "deepsalreg-balanced-nojsm": "DSR balanced\nno JSM", "deepsalreg-accurate": "DSR accurate",
          "ants-syn": "ANTs SyN", "elastix-bspline": "elastix", "convexadam": "ConvexAdam"}
_UNITS = dict(liver="mm", hands="px", anhir="px", drive="px")
_HIGHER_IS_BETTER = ("dice_mean",)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_vs_time(rows: list[dict], path: Path) -> Path | None:
    """One panel per dataset: mean time per pair (log x) against the dataset's main metric."""
    plt = _pyplot()
    panels = [(d, c) for d, c in COLUMNS.items() if aggregate(rows, d)]
    if not panels:
        return None
    cols = min(3, len(panels))
    nrows = int(np.ceil(len(panels) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False)
    for ax, (dataset, (title, columns)) in zip(axes.flat, panels):
        key, name, _ = columns[0]
        for e in aggregate(rows, dataset):
            if not e["ok"] or e.get(key) is None:
                continue
            t = max(e.get("wall_s") or 1e-3, 1e-3)
            ax.scatter([t], [e[key]], marker=_MARKERS[e["method"]], s=50, label=METHODS[e["method"]][0])
        ax.set_xscale("log")
        ax.set_xlabel("time per pair (s)")
        unit = f" ({_UNITS[dataset]})" if dataset in _UNITS and "rtre" not in key and "dice" not in key else ""
        better = "higher" if key in _HIGHER_IS_BETTER else "lower"
        ax.set_ylabel(f"{name}{unit}, {better} is better", fontsize=8)
        ax.set_title(dataset, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = {}, {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    columns = 4
    legend_rows = -(-len(handles) // columns)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=columns, fontsize=8)
    # room below the panels for the legend (about 0.2 inch per legend row), so it never covers an axis label
    fig.tight_layout(rect=(0, min(0.3, (0.25 + 0.2 * legend_rows) / fig.get_figheight()), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def error_maps(rows: list[dict], cases: dict, path: Path, dataset: str = "missing", max_rows: int = 4) -> Path | None:
    """Images and end-point-error maps: one row per case, columns fixed, moving, then each method."""
    plt = _pyplot()
    chosen = [r for r in rows if r["dataset"] == dataset and r.get("ok") and r.get("error_map")]
    if not chosen:
        return None
    names = list(dict.fromkeys(r["case"] for r in chosen))[:max_rows]
    methods = [m for m in METHODS if any(r["method"] == m for r in chosen)]
    fig, axes = plt.subplots(len(names), 2 + len(methods), figsize=(1.9 * (2 + len(methods)) + 1, 2.0 * len(names)),
                             squeeze=False, constrained_layout=True)
    im = None
    vmax = float(np.percentile([r["metrics"].get("epe_p95", 0) for r in chosen], 75)) or 1.0
    for i, name in enumerate(names):
        case = cases[name]
        for j, role in enumerate(("fixed", "moving")):
            axes[i, j].imshow(sitk.GetArrayFromImage(sitk.ReadImage(case[role])), cmap="gray")
            axes[i, j].set_title(f"{role}" if i == 0 else "", fontsize=8)
        if case.get("altered_mask"):
            region = sitk.GetArrayFromImage(sitk.ReadImage(case["altered_mask"]))
            axes[i, 0].contour(region, levels=[0.5], colors="r", linewidths=0.6)
        axes[i, 0].set_ylabel(name.replace("missing_", "").replace("drive_", "drive "), fontsize=8)
        for j, method in enumerate(methods):
            ax = axes[i, 2 + j]
            row = next((r for r in chosen if r["case"] == name and r["method"] == method), None)
            if row is not None:
                im = ax.imshow(sitk.GetArrayFromImage(sitk.ReadImage(row["error_map"])), cmap="magma", vmin=0, vmax=vmax)
                ax.set_xlabel(f"EPE {row['metrics'].get('epe_mean', float('nan')):.2f}", fontsize=7)
            if i == 0:
                ax.set_title(_SHORT.get(method, method), fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, ax=axes[:, 2:].ravel().tolist(), shrink=0.6, label="end-point error (px)")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def scaling_curves(rows: list[dict], path: Path) -> Path | None:
    """Time and peak memory against voxels, 2D and 3D, one line per component and device."""
    plt = _pyplot()
    ok = [r for r in rows if r.get("ok")]
    if not ok:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), squeeze=False)
    for col, dim in enumerate((2, 3)):
        series = {}
        for r in ok:
            if r["dim"] == dim:
                series.setdefault((r["component"], r["device"]), []).append(r)
        for (component, device), items in sorted(series.items()):
            items.sort(key=lambda r: r["voxels"])
            x = [r["voxels"] for r in items]
            label = component + ("" if device == "cpu" else f" ({device})")
            style = "--" if component in ("ants-syn", "elastix-bspline") else "-"
            axes[0, col].plot(x, [r["time_s"] for r in items], style, marker="o", ms=3, label=label)
            mem = [(r["voxels"], r["peak_mb"]) for r in items if r.get("peak_mb")]
            if mem:
                axes[1, col].plot(*zip(*mem), style, marker="o", ms=3, label=label)
        for row, what in enumerate(("time (s)", "peak memory (MB)")):
            ax = axes[row, col]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(f"{dim}D voxels")
            ax.set_ylabel(what)
            ax.grid(alpha=0.3, which="both")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
