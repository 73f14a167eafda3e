"""Shipped models: lookup by name, sha256 verification, loading.

``registry.json`` (next to this file) maps a model name to its weights file, sha256, dimension and
model card. ``"default"`` resolves to ``default-2d`` or ``default-3d`` by the images' dimension. Any other
string is treated as a path to a checkpoint written by ``networks.save_checkpoint``.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelError

MODELS_DIR = Path(__file__).resolve().parent
REGISTRY_FILE = MODELS_DIR / "registry.json"


def registry() -> dict:
    """Name -> entry (``file``, ``sha256``, ``ndim``, ``card``, ``description``) of the shipped models."""
    if not REGISTRY_FILE.is_file():
        return {}
    try:
        return json.loads(REGISTRY_FILE.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"model registry {REGISTRY_FILE} is damaged: {exc}") from None


def resolve(model: str, ndim: int) -> tuple[Path, str | None, str]:
    """``(weights path, expected sha256 or None, display name)`` for a model name or checkpoint path."""
    name = f"default-{ndim}d" if model == "default" else model
    entries = registry()
    if name in entries:
        entry = entries[name]
        if int(entry.get("ndim", ndim)) != ndim:
            raise ModelError(f"model {name!r} is {entry['ndim']}D but the images are {ndim}D")
        return MODELS_DIR / entry["file"], entry.get("sha256"), name
    path = Path(model).expanduser()
    if path.suffix in (".pt", ".pth") or path.exists():
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        return path, None, str(path)
    known = ", ".join(sorted(entries)) or "none shipped"
    raise ModelError(f"unknown model {model!r} (known: {known}; or give the path of a .pt checkpoint)")


def load(model: str, ndim: int, device="cpu"):
    """Load a model by name or path, verifying the sha256 of shipped weights. Returns ``(net, payload, name)``."""
    from ..networks import load_checkpoint

    path, sha, name = resolve(model, ndim)
    net, payload = load_checkpoint(path, device=device, expected_sha256=sha)
    if net.ndim != ndim:
        raise ModelError(f"model {name!r} is {net.ndim}D but the images are {ndim}D")
    return net, payload, name
