"""How torch's OpenMP threads wait, chosen from the machine's load when a process starts.

OpenMP reads its settings once, when torch is first imported, so ``choose_wait_policy`` must run before
that (the command line, the headless Slicer batch and the benchmark's children call it first thing).

Why it matters (measured on 2 cores, register() on the benchmark's brain / prostate pairs, s per pair):
idle machine, threads that sleep at once while they wait (``OMP_WAIT_POLICY=PASSIVE``) 7.9 / 6.9, threads
that spin briefly (``GOMP_SPINCOUNT=20000``) 5.7 / 5.0, i.e. passive waiting throws away what the second
core gives; but with two other busy processes spinning was 1.7-1.9x slower than passive, and a 2D pair
4x slower. So: spin briefly when the cores we would use are idle, sleep when they are not. A value the
user set (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``) is never changed.
"""
from __future__ import annotations

import os
import time

__all__ = ["choose_wait_policy", "busy_cores"]

_MARK = "DEEPSALREG_WAIT_POLICY"  # set when the policy was chosen here, so a child process chooses again
SPIN_COUNT = "20000"  # libgomp spins ~tens of microseconds before sleeping (its own default is 300000)


def busy_cores(window_s: float = 0.1) -> float | None:
    """Cores kept busy by other processes, averaged over ``window_s`` seconds (Linux ``/proc/stat``).

    This process sleeps during the window, so it does not count itself. ``None`` where ``/proc/stat``
    is not readable (then ``os.getloadavg`` is the caller's fallback).
    """
    def sample():
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total1 - total0
    if elapsed <= 0:
        return None
    return (os.cpu_count() or 1) * (1.0 - (idle1 - idle0) / elapsed)


def choose_wait_policy(environ=None, threads: int | None = None) -> str:
    """Set how OpenMP threads wait in ``environ`` (default ``os.environ``) and return what was chosen.

    Returns ``"user"`` (the user's setting kept), ``"spin"`` (no other process uses the cores this
    process's ``threads`` would run on: ``GOMP_SPINCOUNT`` set) or ``"passive"`` (they are busy:
    ``OMP_WAIT_POLICY=PASSIVE``). ``threads`` defaults to ``OMP_NUM_THREADS`` or every core. A process
    started by one that chose (its environment inherited) chooses again from the load it finds.
    """
    environ = os.environ if environ is None else environ
    if environ.pop(_MARK, None):  # inherited from a parent that chose by itself: choose again for this process
        environ.pop("OMP_WAIT_POLICY", None)
        environ.pop("GOMP_SPINCOUNT", None)
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return "user"
    cores = os.cpu_count() or 1
    try:
        threads = int(threads or environ.get("OMP_NUM_THREADS") or cores)
    except ValueError:
        threads = cores
    busy = busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            busy = float(cores)  # nothing to go by: the safe choice
    if threads > 1 and busy <= cores - min(threads, cores) + 0.25:
        environ["GOMP_SPINCOUNT"] = SPIN_COUNT
        environ[_MARK] = "spin"
    else:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        environ[_MARK] = "passive"
    return environ[_MARK]
