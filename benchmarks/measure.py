"""Isolated measurement: run one benchmark case in a fresh Python process; report its time and peak memory.

Why a process per case: torch, ITK and ANTs allocate outside Python's heap (``tracemalloc`` sees none of
it) and the C allocator keeps freed memory, so a peak measured inside a long-lived process is polluted by
every earlier case. A fresh process gives a clean high-water mark.

Peak memory (CPU): the child's peak resident set size minus its resident size just before the case
starts (after the imports and ``setup``), i.e. the case's own working memory, inputs included. On Linux
the peak is ``VmHWM`` and its high-water mark is reset at that point (``/proc/self/clear_refs``), so
neither a transient peak of the imports nor the parent's size (which ``ru_maxrss`` inherits across
``exec``) can leak into the figure; elsewhere ``ru_maxrss`` is used (an over-estimate).
Peak memory (CUDA): ``torch.cuda.max_memory_allocated`` when the case used the GPU.

Protocol: the parent sends ``{"target": "module:function", "kwargs": {...}, "setup": "module:function"?}``
as JSON on stdin to ``python -m benchmarks.measure``; the child calls ``setup()`` (heavy imports, lazy
library loading), records the baseline, calls ``target(**kwargs)`` (which returns a JSON-able dict) and
prints one line ``@@RESULT@@ {json}``.
"""
from __future__ import annotations

import importlib
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

__all__ = ["run_isolated", "run_inline", "thread_env", "current_rss_mb", "peak_rss_mb"]

_MARK = "@@RESULT@@"
REPO_ROOT = Path(__file__).resolve().parents[1]


def thread_env(threads: int | None = None) -> dict:
    """Environment that pins torch, OpenMP, BLAS and ITK (ANTs and elastix use ITK's pool) to ``threads``
    (default: every core)."""
    threads = int(threads or os.cpu_count() or 1)
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        env[key] = str(threads)
    # How idle OpenMP threads wait is chosen by the child from the load when it starts (the engine's own
    # rule, DeepSalRegLib.threads, as the command line applies it), so every method gets the same rule.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def current_rss_mb() -> float:
    """Resident set size now, in MiB (Linux ``/proc``; falls back to the peak elsewhere)."""
    value = _status_mb("VmRSS")
    return value if value is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident set size of this process's own memory, in MiB.

    Linux: ``VmHWM`` (the high-water mark of this address space, which ``_reset_peak`` can reset).
    ``ru_maxrss`` is not used there: after ``exec`` it starts at the *parent's* resident size (the kernel
    carries the pre-exec address space's peak over), so a parent that imported torch would inflate
    every child's figure. Elsewhere: ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    value = _status_mb("VmHWM")
    if value is not None:
        return value
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _reset_peak() -> bool:
    """Reset this process's peak-RSS high-water mark to its current RSS (Linux >= 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _resolve(name: str):
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


def _cuda_peak_mb():
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def _child() -> None:
    from DeepSalRegLib.threads import choose_wait_policy

    wait_policy = choose_wait_policy()  # before any method imports torch
    spec = json.loads(sys.stdin.read())
    out = dict(ok=False, wait_policy=wait_policy)
    try:
        if spec.get("setup"):
            _resolve(spec["setup"])()
        target = _resolve(spec["target"])
        _reset_peak()
        baseline = current_rss_mb()
        t0 = time.perf_counter()
        result = target(**spec.get("kwargs", {}))
        out.update(ok=True, wall_s=time.perf_counter() - t0, result=result)
        out.update(baseline_rss_mb=baseline, peak_rss_mb=peak_rss_mb() - baseline)
        out["cuda_peak_mb"] = _cuda_peak_mb()
    except BaseException as exc:  # report everything, the parent decides
        out.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                   traceback=traceback.format_exc()[-2000:])
    sys.stdout.write("\n" + _MARK + " " + json.dumps(out) + "\n")
    sys.stdout.flush()


def run_isolated(target: str, kwargs: dict | None = None, setup: str | None = None, timeout: float = 3600,
                 threads: int | None = None, python: str | None = None) -> dict:
    """Run ``target(**kwargs)`` in a fresh interpreter; returns the child's report.

    Args:
        target: ``"module:function"``; the function returns a JSON-able dict (its ``result``).
        kwargs: JSON-able keyword arguments.
        setup: optional ``"module:function"`` run before the memory baseline (heavy imports, warm-up).
        timeout: seconds before the child is killed (reported as an error, not raised).
        threads: CPU threads for torch/ITK/OpenMP (default: all cores).
        python: interpreter (default: this one, so optional peers installed here are visible).
    Returns:
        ``{"ok", "wall_s", "peak_rss_mb", "baseline_rss_mb", "cuda_peak_mb", "result"}`` or
        ``{"ok": False, "error": ..., "traceback": ...}``. ``wall_s`` is the target's own time (no
        interpreter start, no imports).
    """
    spec = json.dumps(dict(target=target, kwargs=kwargs or {}, setup=setup))
    try:
        proc = subprocess.run([python or sys.executable, "-m", "benchmarks.measure"], input=spec, text=True,
                              capture_output=True, timeout=timeout, env=thread_env(threads), cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return dict(ok=False, error=f"timed out after {timeout:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(ok=False, error=f"child exited with code {proc.returncode}: {' | '.join(tail)[:400]}")


def run_inline(target: str, kwargs: dict | None = None, setup: str | None = None) -> dict:
    """Same report as ``run_isolated`` but in this process (fast, for tiny CI runs): no memory figure."""
    try:
        if setup:
            _resolve(setup)()
        t0 = time.perf_counter()
        result = _resolve(target)(**(kwargs or {}))
        return dict(ok=True, wall_s=time.perf_counter() - t0, result=result, peak_rss_mb=None, cuda_peak_mb=None)
    except Exception as exc:
        return dict(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                    traceback=traceback.format_exc()[-2000:])


if __name__ == "__main__":
    _child()
