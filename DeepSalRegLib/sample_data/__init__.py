"""Small image pairs shipped with the package (demo, Slicer sample data, smoke tests).

Sources, processing and licences: ``README.md`` in this folder; made by ``training/make_sample_data.py``.

``SAMPLE_PAIRS[kind] = (fixed_path, moving_path)`` with ``kind`` ``"2d"`` (BrainWeb PD slice vs. its
B-spline warped copy, ITK examples) or ``"3d"`` (MNI ICBM152 2009a T1 vs. Colin27 T1, 2.5 mm).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError

__all__ = ["SAMPLE_DIR", "SAMPLE_PAIRS", "sample_path", "sample_pair"]

SAMPLE_DIR = Path(__file__).resolve().parent

SAMPLE_PAIRS: dict[str, tuple[Path, Path]] = {
    "2d": (SAMPLE_DIR / "brainweb_pd_fixed.nrrd", SAMPLE_DIR / "brainweb_pd_bsplined_moving.nrrd"),
    "3d": (SAMPLE_DIR / "mni152_t1_fixed.nrrd", SAMPLE_DIR / "colin27_t1_moving.nrrd"),
}


def sample_path(name: str) -> Path:
    """Path of a shipped sample file, e.g. ``sample_path("mni152_t1_fixed.nrrd")``."""
    path = SAMPLE_DIR / name
    if not path.is_file() or path.suffix != ".nrrd":
        available = ", ".join(sorted(p.name for p in SAMPLE_DIR.glob("*.nrrd")))
        raise InputError(f"No sample file named {name!r}; available: {available}.")
    return path


def sample_pair(kind: str) -> tuple[Path, Path]:
    """``(fixed, moving)`` paths of the ``"2d"`` or ``"3d"`` sample pair."""
    if kind not in SAMPLE_PAIRS:
        raise InputError(f"No sample pair {kind!r}; choose one of {', '.join(SAMPLE_PAIRS)}.")
    return SAMPLE_PAIRS[kind]
