"""The one batch loop behind both batch faces: ``deepsalreg batch`` and Slicer's ``batch_register.py``.

A face reads its pair list with ``pairs.read_pairs`` and gives ``run_batch`` a function that registers one
pair into its own folder and returns that pair's summary values (``summary_row`` of its
``RegistrationResult``, which a face may complete, e.g. Slicer with the TRE measured on its markups). The loop owns what
both faces promise: a pair that fails is reported (one line for a user error, the traceback for a bug) and
skipped; ``outdir/summary.csv`` (``SUMMARY_COLUMNS``) is rewritten atomically after every pair, so a batch
stopped half-way still says what it did; the exit code is ``EXIT_BATCH_FAILURES`` when a pair failed.
"""
from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from .errors import DeepSalRegError

__all__ = ["SUMMARY_COLUMNS", "EXIT_BATCH_FAILURES", "run_batch", "summary_row"]

#: Exit code of a batch that finished with failed pairs (both faces; the command line's table of codes).
EXIT_BATCH_FAILURES = 6

SUMMARY_COLUMNS = ["name", "status", "fixed", "moving", "output", "ncc_before", "ncc_after", "tre_before_mm",
                   "tre_after_mm", "folding_percent", "time_s", "error"]


def summary_row(result) -> dict:
    """The summary values of one ``RegistrationResult`` (those its metrics have)."""
    m = result.metrics
    formats = dict(ncc_before=("ncc_before", "{:.4f}", 1), ncc_after=("ncc_after", "{:.4f}", 1),
                   folding_percent=("folding_fraction", "{:.4f}", 100), tre_before_mm=("tre_before_mm", "{:.3f}", 1),
                   tre_after_mm=("tre_after_mm", "{:.3f}", 1))
    return {column: fmt.format(scale * m[key]) for column, (key, fmt, scale) in formats.items()
            if m.get(key) is not None}


def _write_summary(path: Path, rows) -> None:
    from .io import _write_atomically

    lines = [",".join(SUMMARY_COLUMNS)]
    for row in rows:
        lines.append(",".join('"' + str(row.get(c, "")).replace('"', "'") + '"' for c in SUMMARY_COLUMNS))
    _write_atomically(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"), "summary")


def run_batch(pairs: list[dict], outdir: Path, register_pair: Callable, log=print) -> int:
    """Register every pair; returns the exit code (0, or ``EXIT_BATCH_FAILURES``).

    Args:
        pairs: rows of ``pairs.read_pairs`` (``name``, ``fixed``, ``moving``, landmarks, masks).
        outdir: an existing, writable folder; pair ``name`` goes to ``outdir/name``.
        register_pair: ``register_pair(pair, folder, label) -> dict`` registers and saves into ``folder`` and
            returns the pair's summary values (``summary_row``).
        log: where progress lines go (errors go to stderr).
    """
    outdir = Path(outdir)
    summary_path = outdir / "summary.csv"
    rows, failed = [], 0
    for i, pair in enumerate(pairs):
        label = f"[{i + 1}/{len(pairs)}] {pair['name']}"
        folder = outdir / pair["name"]
        row = dict(name=pair["name"], fixed=pair["fixed"], moving=pair["moving"], output=str(folder), status="ok")
        start = time.perf_counter()
        try:
            row.update(register_pair(pair, folder, label))
            log(f"{label}: ok" + (f", NCC {row['ncc_before']} -> {row['ncc_after']}" if row.get("ncc_before") else "")
                + f", {time.perf_counter() - start:.1f} s"
                + (f", TRE {row['tre_before_mm']} -> {row['tre_after_mm']} mm" if row.get("tre_after_mm") else ""))
        except DeepSalRegError as exc:
            failed += 1
            row.update(status="failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            print(f"{label}: FAILED, skipped: {row['error']}", file=sys.stderr, flush=True)
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:  # a bug shows its traceback, and the other pairs still run
            failed += 1
            row.update(status="failed", error=f"internal error: {type(exc).__name__}: {exc}".splitlines()[0])
            print(f"{label}: FAILED with an internal error, skipped:", file=sys.stderr, flush=True)
            traceback.print_exc()
        row["time_s"] = f"{time.perf_counter() - start:.2f}"
        rows.append(row)
        _write_summary(summary_path, rows)
    log(f"{len(pairs) - failed} of {len(pairs)} pairs registered; summary in {summary_path}")
    return EXIT_BATCH_FAILURES if failed else 0
