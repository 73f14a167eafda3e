"""Training configuration: defaults, YAML/JSON files and validated ``--set key=value`` overrides.

A configuration is a nested dict of plain values (it is stored inside checkpoints and must load with
``torch.load(weights_only=True)``). Files and overrides may only use keys that exist in ``DEFAULTS``
(a typo is an error with a suggestion), except inside the free-form sections ``model.overrides`` and
``loss.registration``, which are checked by ``build_model`` / ``RegistrationLoss`` themselves.
"""
from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path

from DeepSalRegLib.errors import InputError

__all__ = ["DEFAULTS", "FREE_SECTIONS", "load_config", "apply_override", "merge", "dump_config"]

#: Every key a configuration may hold, with its default value.
DEFAULTS = {
    "mode": "supervised",  # "supervised" (known synthetic fields, end-point error) or "unsupervised"
    "seed": 0,
    "deterministic": False,  # torch.use_deterministic_algorithms (slower on GPU)
    "output": "runs/train",
    "data": {
        "path": None,  # one .h5 file from make_dataset.py, or a list of them
        "pairs": "inter",  # unsupervised: "intra", "inter", "atlas", a list of them, or "synthetic"
        "samples_per_epoch": None,  # default: number of images (supervised) / pairs (unsupervised)
        "val_samples": 16,  # fixed validation samples drawn from the validation split
        "crop": None,  # array-order crop size, e.g. [64, 64, 64]
        "flip": 0.0,  # probability of flipping each axis
        "swap": 0.5,  # unsupervised: probability of exchanging fixed and moving
        "intensity": {"gamma": [0.7, 1.4], "noise": 0.02, "bias": 0.15},  # null: no intensity augmentation
        "deformation": {  # supervised: the random ground-truth fields (voxels)
            "max_displacement": 8.0,
            "control_points": [4, 8],
            "diffeomorphic": True,
            "rotation_deg": 5.0,
            "scale": 0.05,
            "translation": 4.0,
        },
        "outliers": {"probability": 0.0, "radius": [0.05, 0.15], "kinds": ["insert", "remove"]},
        "workers": 0,  # DataLoader worker processes reading the HDF5
    },
    "model": {
        "preset": "modern-2d",  # a networks.PRESETS name
        "overrides": {},  # DeepSalRegNet constructor arguments replacing the preset's
        "init": None,  # start from the weights of this model file (fine-tuning); its network wins
    },
    "loss": {
        "registration": {},  # RegistrationLoss arguments replacing the preset's loss
        "epe_weight": 1.0,  # supervised: end-point error of the refined field
        "epe_coarse_weight": 0.5,  # supervised: end-point error of the coarse field
        "epe_multiscale_weight": 0.0,  # supervised: mean EPE of the global network's coarser fields
        "similarity_weight": 0.0,  # supervised: add this times the unsupervised loss (hybrid)
    },
    "train": {
        "steps": 1000,  # optimiser steps
        "batch_size": 4,  # per process
        "lr": 1e-4,
        "weight_decay": 0.0,
        "scheduler": "cosine",  # "cosine", "constant" or "step"
        "warmup_steps": 0,
        "grad_clip": 10.0,  # max gradient norm (0: off)
        "max_minutes": 0.0,  # stop (validated and checkpointed) after this much wall time in this process (0: off)
        "amp": "auto",  # automatic mixed precision: "auto" (on CUDA), true, false
        "device": "auto",
        "threads": None,  # torch.set_num_threads (CPU); 1 is polite on shared machines
        "checkpoint_every": 100,
        "val_every": 100,
        "log_every": 10,
        "select": "auto",  # best-model metric: "auto" (EPE supervised / loss unsupervised), "loss", "epe", "dice"
        "progress": "auto",  # progress bar: "auto" (when a terminal), true, false
        "tensorboard": True,
    },
}

#: Sections whose keys are not fixed here (they are passed on as keyword arguments).
FREE_SECTIONS = ("model.overrides", "loss.registration")


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def merge(base: dict, update: dict, defaults: dict = DEFAULTS, prefix: str = "") -> dict:
    """``base`` updated recursively with ``update``; every key must exist in ``defaults``."""
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        dotted = f"{prefix}{key}"
        if prefix.rstrip(".") in FREE_SECTIONS:
            out[key] = value
            continue
        if key not in defaults:
            where = prefix.rstrip(".") or "the top level"
            raise InputError(f"unknown config key {dotted!r}{_suggest(key, defaults)}; {where} has "
                             + ", ".join(sorted(defaults)) + ".")
        default = defaults[key]
        if isinstance(default, dict) and (dotted in FREE_SECTIONS or default):
            if value is None and dotted == "data.intensity":
                out[key] = None
                continue
            if not isinstance(value, dict):
                raise InputError(f"config key {dotted!r} must be a mapping, got {value!r}.")
            out[key] = merge(out.get(key) or {}, value, default, dotted + ".")
        else:
            out[key] = _checked(dotted, default, value)
    return out


def _checked(dotted, default, value):
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InputError(f"config key {dotted!r} must be true or false, got {value!r}.")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"config key {dotted!r} must be a number, got {value!r}.")
        if isinstance(default, int) and not float(value).is_integer():
            raise InputError(f"config key {dotted!r} must be a whole number, got {value!r}.")
        return type(default)(value)
    if isinstance(default, list) and not isinstance(value, (list, tuple)):
        raise InputError(f"config key {dotted!r} must be a list, got {value!r}.")
    return list(value) if isinstance(value, tuple) else value


def _parse_value(text: str):
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


def apply_override(config: dict, assignment: str) -> dict:
    """Apply one ``dotted.key=value`` (the value parsed as YAML: numbers, lists ``[64,64]``, null, true)."""
    if "=" not in assignment:
        raise InputError(f"override {assignment!r} must look like key=value, e.g. train.lr=3e-4.")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    update = _parse_value(text)
    for part in reversed(parts):
        update = {part: update}
    return merge(config, update)


def load_config(path=None, overrides=()) -> dict:
    """Defaults, updated by a YAML/JSON file, then by ``key=value`` overrides (in order)."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise InputError(f"config file {path} does not exist.")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() == ".json":
                loaded = json.loads(text)
            else:
                import yaml

                loaded = yaml.safe_load(text)
        except Exception as exc:  # yaml and json raise different types
            raise InputError(f"cannot parse config file {path}: {str(exc).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise InputError(f"config file {path} must hold a mapping of sections (mode, data, model, loss, train).")
        config = merge(config, loaded or {})
    for assignment in overrides:
        config = apply_override(config, assignment)
    if config["mode"] not in ("supervised", "unsupervised"):
        raise InputError(f"mode must be 'supervised' or 'unsupervised', got {config['mode']!r}.")
    return config


def dump_config(config: dict) -> str:
    """YAML text of a configuration (what ``config.yaml`` in the output folder holds)."""
    import yaml

    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
