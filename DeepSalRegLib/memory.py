"""Memory a registration will need, checked before the work starts.

A registration holds a few full-resolution copies on the FIXED image grid at the end (the float64
displacement field and the transform built from it, the warped image, the saliency and Jacobian maps),
besides the working-grid tensors (bounded by the working-grid voxel budget). Measured with
``/usr/bin/time -v`` on 3D uint8 pairs (2 CPU cores, session 6): 200^3 1.87 GB, 300^3 3.44 GB peak RSS,
i.e. about 1.1 GB plus 88 bytes per fixed voxel; the moving image adds its float32 copy and a mask.
``estimate_peak_bytes`` uses those numbers with a margin; ``check_memory`` refuses a pair that would not fit
in the memory available now (a 600^3 uint8 pair needs about 21 GB) with one line instead of being killed
half-way.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import MemoryLimitError

__all__ = ["estimate_peak_bytes", "available_bytes", "check_memory"]

_BASE = {2: 0.6e9, 3: 1.2e9}  # torch, the network and the working-grid tensors (working grid at its budget)
_PER_FIXED_VOXEL = 95.0  # bytes: float64 field + its transform copy, warped, saliency, Jacobian, temporaries
_PER_MOVING_VOXEL = 10.0  # bytes: the float32 image as read and its field-of-view mask


def estimate_peak_bytes(fixed_size, moving_size) -> float:
    """Estimated peak memory (bytes) of ``register()`` for images of these sizes (voxels per axis)."""
    nd = len(fixed_size)
    return _BASE.get(nd, _BASE[3]) + _PER_FIXED_VOXEL * math.prod(fixed_size) + _PER_MOVING_VOXEL * math.prod(moving_size)


def available_bytes() -> float | None:
    """Memory this process may still use: the smaller of the system's available memory and the room left
    under a cgroup (container) limit; None where neither can be read."""
    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(float(line.split()[1]) * 1024)
                break
    except OSError:
        pass
    try:
        cap = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if cap != "max":
            used = float(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            limits.append(float(cap) - used)
    except (OSError, ValueError):
        pass
    if not limits and hasattr(os, "sysconf"):
        try:
            limits.append(float(os.sysconf("SC_AVPHYS_PAGES")) * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            pass
    return min(limits) if limits else None


def check_memory(fixed_size, moving_size, available: float | None = None) -> float:
    """Raise ``MemoryLimitError`` when the estimate exceeds the available memory; returns the estimate."""
    need = estimate_peak_bytes(fixed_size, moving_size)
    room = available_bytes() if available is None else available
    if room is not None and need > room:
        size = "x".join(str(n) for n in fixed_size)
        raise MemoryLimitError(
            f"this pair needs about {need / 1e9:.1f} GB of memory (fixed image {size} voxels) but "
            f"{room / 1e9:.1f} GB are available; free memory, or register copies resampled to a coarser grid "
            "(the result is computed on a grid of at most 160^3 voxels anyway)")
    return need
