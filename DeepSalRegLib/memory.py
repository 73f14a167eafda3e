"""Memory a registration will need, checked before the work starts.

Besides the working-grid tensors (bounded by the working-grid voxel budget, ~1.1 GB in 3D), a registration
holds full-resolution images on the FIXED grid: the inputs as float32, the warped image and, while the
fixed image has at most ``FIELD_ON_FIXED_GRID_UP_TO`` times the working grid's voxels, the
float64 displacement field with the transform's own copy and the saliency and Jacobian maps (larger fixed
images get those on the working grid). Peak RSS measured on 3D uint8 pairs (2 CPU cores, session 6;
``register()`` + ``save()``): 200^3 1.85 GB and 300^3 3.38-3.53 GB (field on the fixed grid: ~1.1 GB +
88 B per fixed voxel), 600^3 4.91 GB (field on the working grid: ~1.1 GB + 17.6 B per fixed voxel).
Session 7 added to the export the Jacobian of the written field (ITK, float64), the NCC of the written
warped image on the same grid (float32 copies) and, with the affine stage, the residual field of the
composite transform; re-measured (matching-3d default model, quality balanced, 1 thread): 200^3 1.77 GB,
300^3 3.76 GB (~89 B per fixed voxel above the base). ``estimate_peak_bytes`` uses those numbers with a margin; ``check_memory`` refuses a pair that would not fit
in the memory available now with one line instead of being killed half-way.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import MemoryLimitError

__all__ = ["FIELD_ON_FIXED_GRID_UP_TO", "field_on_fixed_grid", "estimate_peak_bytes", "available_bytes", "check_memory"]

#: ``register()`` writes the field (and its maps) on the fixed image's grid unless that has more than this many
#: times the working grid's voxels (per dimension); then on the working grid, where it was computed: the rule
#: that bounds memory. 3D: 32 x the 2^20-voxel budget, the same ~33.5 M fixed voxels as 8 x the 160^3 budget
#: before session 15 (a 1 mm brain MRI still gets its field on its own grid).
FIELD_ON_FIXED_GRID_UP_TO = {2: 8, 3: 32}


def field_on_fixed_grid(fixed_voxels: int, working_voxels: int, nd: int) -> bool:
    """Whether ``register()`` writes the field on the fixed image's grid (else on the working grid)."""
    return fixed_voxels <= FIELD_ON_FIXED_GRID_UP_TO[nd] * working_voxels


_BASE = {2: 0.6e9, 3: 1.2e9}  # torch, the network and the working-grid tensors (working grid at its budget)
_PER_FIXED_VOXEL = 100.0  # bytes: float64 field + its transform copy + the composite's residual, warped, maps, NCC
_PER_FIXED_VOXEL_FIELD_ON_WORKING_GRID = 14.0  # bytes: the fixed image and the warped one, temporaries
_PER_MOVING_VOXEL = 6.0  # bytes: the float32 image as read, temporaries


def estimate_peak_bytes(fixed_size, moving_size, working_voxels: int | None = None) -> float:
    """Estimated peak memory (bytes) of ``register()`` + ``save()`` for images of these sizes (voxels per
    axis) and a working grid of ``working_voxels`` voxels (None: as many as the fixed image)."""
    nd = len(fixed_size)
    n_fixed = math.prod(fixed_size)
    working = n_fixed if working_voxels is None else working_voxels
    per_fixed = (_PER_FIXED_VOXEL if field_on_fixed_grid(n_fixed, working, nd)
                 else _PER_FIXED_VOXEL_FIELD_ON_WORKING_GRID)
    return _BASE.get(nd, _BASE[3]) + per_fixed * n_fixed + _PER_MOVING_VOXEL * math.prod(moving_size)


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


def check_memory(fixed_size, moving_size, working_voxels: int | None = None, available: float | None = None) -> float:
    """Raise ``MemoryLimitError`` when the estimate exceeds the available memory; returns the estimate."""
    need = estimate_peak_bytes(fixed_size, moving_size, working_voxels)
    room = available_bytes() if available is None else available
    if room is not None and need > room:
        size = "x".join(str(n) for n in fixed_size)
        working = f" of {working_voxels} voxels" if working_voxels is not None else ""
        raise MemoryLimitError(
            f"this pair needs about {need / 1e9:.1f} GB of memory (fixed image {size} voxels) but "
            f"{room / 1e9:.1f} GB are available; free memory, or register copies resampled to a coarser grid "
            f"(the field is computed on a working grid{working} anyway)")
    return need
