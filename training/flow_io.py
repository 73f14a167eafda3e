"""Middlebury ``.flo`` files (the thesis's 2D flow format, ``common/utils_flow.py``) <-> library fields.

The two conventions differ in channel order and, for the thesis, in sign; the conversion is explicit:

* Library field (``DeepSalRegLib/warp.py``): ``(2, H, W)``, channel 0 = rows (y), channel 1 = columns (x),
  voxels, fixed -> moving: ``W(x) = M(x + u(x))``.
* Middlebury ``.flo``: ``(H, W, 2)`` float32, component 0 = ``u`` along x (columns), component 1 = ``v``
  along y (rows), pixels; a pixel ``p`` of frame 1 moves to ``p + (u, v)`` in frame 2. With frame 1 =
  fixed and frame 2 = moving this is the library's sign (``convention="middlebury"``).
* The thesis warps with ``W = M(x - u)`` (``inverse_wraping``), so its flows are the negative
  (``convention="thesis"``).

File layout: the float32 tag ``202021.25`` ("PIEH"), int32 width, int32 height, then ``H*W*2`` float32 in
row-major order with ``u, v`` interleaved; values above ``1e9`` mean "unknown" and are read as NaN.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from DeepSalRegLib.errors import InputError

__all__ = ["read_flo", "write_flo", "field_to_flo", "flo_to_field", "FLO_TAG"]

FLO_TAG = 202021.25
_UNKNOWN = 1e9
_SIGNS = {"middlebury": 1.0, "thesis": -1.0}


def _sign(convention: str) -> float:
    if convention not in _SIGNS:
        raise InputError(f"flow convention must be one of {', '.join(_SIGNS)}, got {convention!r}.")
    return _SIGNS[convention]


def field_to_flo(field, convention: str = "middlebury") -> np.ndarray:
    """Library field ``(2, H, W)`` (rows, columns) -> ``.flo`` array ``(H, W, 2)`` (u = x, v = y)."""
    field = np.asarray(field, dtype=np.float32)
    if field.ndim != 3 or field.shape[0] != 2:
        raise InputError(f"a 2D library field has shape (2, H, W); got {field.shape}.")
    return _sign(convention) * np.stack([field[1], field[0]], axis=-1)


def flo_to_field(flow, convention: str = "middlebury") -> np.ndarray:
    """``.flo`` array ``(H, W, 2)`` (u = x, v = y) -> library field ``(2, H, W)`` (rows, columns)."""
    flow = np.asarray(flow, dtype=np.float32)
    if flow.ndim != 3 or flow.shape[-1] != 2:
        raise InputError(f"a .flo flow has shape (H, W, 2); got {flow.shape}.")
    return _sign(convention) * np.stack([flow[..., 1], flow[..., 0]], axis=0)


def write_flo(path, field, convention: str = "middlebury") -> Path:
    """Write a library field ``(2, H, W)`` as a Middlebury ``.flo`` file (atomically); NaN -> unknown."""
    path = Path(path)
    flow = field_to_flo(field, convention)
    flow = np.where(np.isfinite(flow), flow, np.float32(2 * _UNKNOWN)).astype("<f4")
    height, width = flow.shape[:2]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.array([FLO_TAG], dtype="<f4").tofile(handle)
        np.array([width, height], dtype="<i4").tofile(handle)
        flow.tofile(handle)
    os.replace(tmp, path)
    return path


def read_flo(path, convention: str = "middlebury") -> np.ndarray:
    """Read a Middlebury ``.flo`` file as a library field ``(2, H, W)`` float32 (unknown values -> NaN)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"flow file {path} does not exist.")
    with open(path, "rb") as handle:
        tag = np.fromfile(handle, "<f4", 1)
        if tag.size != 1 or tag[0] != np.float32(FLO_TAG):
            raise InputError(f"{path} is not a Middlebury .flo file (wrong tag).")
        size = np.fromfile(handle, "<i4", 2)
        if size.size != 2 or size.min() <= 0:
            raise InputError(f"{path} has a damaged .flo header.")
        width, height = int(size[0]), int(size[1])
        data = np.fromfile(handle, "<f4", width * height * 2)
    if data.size != width * height * 2:
        raise InputError(f"{path} is truncated: {data.size} values for a {width}x{height} flow.")
    flow = data.reshape(height, width, 2).astype(np.float32)
    flow[np.abs(flow) > _UNKNOWN] = np.nan
    return flo_to_field(flow, convention)
