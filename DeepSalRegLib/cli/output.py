"""What the command line prints: progress (a bar for people, ``PROGRESS`` lines for programs) and results."""
from __future__ import annotations

import sys
from pathlib import Path


class _Progress:
    """Progress for humans (a tqdm bar on stderr) or for programs (``PROGRESS <0-100> <message>`` lines)."""

    def __init__(self, lines: bool, quiet: bool, label: str = ""):
        self.lines, self.quiet, self.label = lines, quiet, label
        self.bar = None
        self.last = -1

    def __call__(self, fraction: float, message: str):
        percent = int(round(100 * fraction))
        if self.lines:
            if percent != self.last or fraction >= 1.0:
                print(f"PROGRESS {percent} {message}", flush=True)
                self.last = percent
            return
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=100, desc=self.label or "registering", unit="%", file=sys.stderr,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} {postfix}", leave=False)
        self.bar.n = percent
        self.bar.set_postfix_str(message, refresh=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _refinement_line(m) -> str:
    """'refinement (quality balanced): 112 steps (1/8: 30 not kept, 1/4: 30, 1/2: 32, 1/1: 20)' or 'no refinement'.

    "not kept": the level's correction did not improve the alignment on the finer scales and was dropped
    (``optimise.instance_optimise(finer_check=True)``)."""
    r = m.get("refinement") or {}
    if not r.get("steps"):
        return "no refinement (affine + network only)"
    how = f"quality {r['quality']}" if r.get("quality") else "fixed count"
    kept = list(r.get("kept") or []) + [True] * len(r["steps"])
    levels = ", ".join(f"1/{f}: {n}" + ("" if k else " not kept") for f, n, k in zip(r["levels"], r["steps"], kept))
    return f"refinement ({how}): {sum(r['steps'])} steps ({levels})"


def _print_result(result, outdir, paths, out=None):
    out = out or sys.stdout
    m, t = result.metrics, result.timings
    used = " (its field was not used: it did not improve the alignment)" if m.get("network_kept") is False else ""
    print(f"model: {m['model']}{used} on {m['device']}; working grid {'x'.join(map(str, m['working_grid']['size']))} "
          f"at {m['working_grid']['spacing_mm'][0]} mm; {_refinement_line(m)}", file=out)
    print(f"similarity (NCC, fixed vs moving): {m['ncc_before']:.3f} before -> {m['ncc_after']:.3f} after; "
          f"folding {100 * m['folding_fraction']:.3f} % of voxels; SD log|J| {m['sd_log_jacobian']:.3f}", file=out)
    if result.tre is not None:
        print(f"landmark error (mean TRE): {m['tre_before_mm']:.2f} mm before -> {m['tre_after_mm']:.2f} mm after "
              f"({len(result.tre['after'])} landmarks)", file=out)
    steps = ", ".join(f"{k} {v:.2f} s" for k, v in t.items() if k != "total")
    print(f"time: {t['total']:.2f} s ({steps})", file=out)
    print(f"results in {outdir}: " + ", ".join(sorted(Path(p).name for p in paths.values())), file=out)
