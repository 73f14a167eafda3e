"""Evaluation metrics, one definition each, used by ``register()``, ``training/`` and ``benchmarks/``.

Arrays are numpy arrays on one grid (array axis order); displacement fields are ``(*S, nd)`` in physical
units (mm or px); Jacobian determinants are of the map ``p -> p + d(p)``.
"""
from __future__ import annotations

import numpy as np

__all__ = ["LOG_JACOBIAN_CLIP", "dice_per_label", "jacobian_statistics", "end_point_error"]

#: determinants are clipped here before the logarithm (as Learn2Reg does), so folding does not give -inf
LOG_JACOBIAN_CLIP = 1e-9


def dice_per_label(fixed_labels: np.ndarray, warped_labels: np.ndarray, labels) -> dict[int, float]:
    """Dice ``2|A & B| / (|A| + |B|)`` of each label in ``labels`` present in either map: ``{label: dice}``."""
    out = {}
    for label in labels:
        a, b = fixed_labels == label, warped_labels == label
        total = int(a.sum()) + int(b.sum())
        if total:
            out[int(label)] = 2.0 * int((a & b).sum()) / total
    return out


def jacobian_statistics(det: np.ndarray, region: np.ndarray | None = None) -> dict[str, float]:
    """``folding_fraction`` (share of ``det <= 0``) and ``sd_log_jacobian`` (SD of ``log det``, clipped at
    ``LOG_JACOBIAN_CLIP``) over ``region`` (a boolean mask; everywhere when None)."""
    values = np.asarray(det if region is None else det[region], dtype=np.float64)
    if values.size == 0:
        return dict(folding_fraction=0.0, sd_log_jacobian=0.0)
    log_det = np.log(np.clip(values, LOG_JACOBIAN_CLIP, None))
    return dict(folding_fraction=float((values <= 0).mean()), sd_log_jacobian=float(log_det.std()))


def end_point_error(field: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-voxel end-point error ``|d - d_true|`` of two ``(*S, nd)`` displacement fields (same units)."""
    return np.sqrt(((np.asarray(field, dtype=np.float64) - truth) ** 2).sum(-1))
