"""Resumable training-state checkpoints (``state.pt``): everything a killed run needs to continue exactly.

A state file holds the model (constructor arguments and weights, as ``networks.save_checkpoint`` writes
them), the optimiser, scheduler and gradient-scaler states, the RNG states of torch (CPU and CUDA),
NumPy and Python, the data position (epoch and batch within it), the step, the best validation value
and the configuration. Everything is stored as tensors, numbers, strings, lists and dicts, so the file
loads with ``torch.load(weights_only=True)``. Files are written under a temporary name and renamed, so a
kill during a save leaves the previous state intact.

The exported model files (``model.pt``, ``last.pt``) are plain ``networks.save_checkpoint`` files, which
``register(model=PATH)`` and the model registry load.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from DeepSalRegLib.errors import ModelError
from DeepSalRegLib.io import _write_atomically

__all__ = ["STATE_FORMAT", "rng_state", "set_rng_state", "save_state", "load_state", "weights_digest"]

STATE_FORMAT = "deepsalreg-training-state"
STATE_VERSION = 1


def rng_state() -> dict:
    """RNG states of torch (CPU, every CUDA device), NumPy and Python as tensors and lists."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return dict(
        torch=torch.get_rng_state(),
        cuda=[s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        numpy=dict(kind=str(np_state[0]), keys=torch.from_numpy(np_state[1].astype(np.int64)), pos=int(np_state[2]),
                   has_gauss=int(np_state[3]), cached_gaussian=float(np_state[4])),
        python=dict(version=int(py_version), internal=[int(v) for v in py_internal],
                    gauss=None if py_gauss is None else float(py_gauss)),
    )


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def _atomic_save(payload, path: Path) -> Path:
    return _write_atomically(path, lambda tmp: torch.save(payload, tmp), "training state")


def save_state(path, model, optimizer, scheduler, scaler, position: dict, best: dict, config: dict) -> Path:
    """Write a training state atomically.

    Args:
        model: the bare ``DeepSalRegNet`` (not the DDP wrapper).
        scaler: a ``torch.amp.GradScaler`` or None.
        position: ``{"step", "epoch", "batch"}``: optimiser steps done, current epoch, batches of it done.
        best: ``{"metric", "value", "step"}`` of the best validation so far.
        config: the run's configuration (plain data).
    """
    payload = dict(
        format=STATE_FORMAT, version=STATE_VERSION,
        model_config=model.config,
        model_state={k: v.detach().cpu() for k, v in model.state_dict().items()},
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        scaler=scaler.state_dict() if scaler is not None else None,
        rng=rng_state(),
        position=dict(position), best=dict(best), config=config,
    )
    return _atomic_save(payload, Path(path))


def load_state(path) -> dict:
    """Read a training state (``weights_only=True``); ``ModelError`` for a missing, damaged or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"training state {path} does not exist.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise ModelError(f"cannot read training state {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise ModelError(f"{path} is not a DeepSalReg training state (a model file is resumed with model.init instead).")
    if payload.get("version", 0) > STATE_VERSION:
        raise ModelError(f"{path} was written by a newer DeepSalReg (training-state version {payload['version']}).")
    return payload


def weights_digest(model) -> str:
    """sha256 of a model's parameters and buffers (bytes in state-dict order): equal digests = equal weights."""
    import hashlib

    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
