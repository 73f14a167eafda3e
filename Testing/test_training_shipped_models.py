"""The shipped default models: registry entries, checksums, sizes, model cards, loadable by name."""
from __future__ import annotations

import pytest

from DeepSalRegLib import models
from DeepSalRegLib.networks import PRESETS, file_sha256

ENTRIES = sorted(models.registry().items())


@pytest.mark.parametrize("name,entry", ENTRIES, ids=[n for n, _ in ENTRIES])
def test_shipped_model_is_complete(name, entry):
    weights = models.MODELS_DIR / entry["file"]
    card = models.MODELS_DIR / entry["card"]
    assert weights.is_file() and weights.stat().st_size < 5e6  # a few MB at most
    assert file_sha256(weights) == entry["sha256"]
    text = card.read_text()
    for section in ("## Training", "## Data and licences", "## Evaluation", entry["sha256"], "python training/train.py"):
        assert section in text, section
    net, payload, resolved = models.load(name, entry["ndim"])
    assert resolved == name and net.ndim == entry["ndim"]
    preset = payload["training"]["config"]["model"]["preset"]
    assert preset in PRESETS and not preset.startswith("thesis")  # a modern or matching design


def test_default_resolves_by_dimension():
    names = dict(ENTRIES)
    for nd in (2, 3):
        if f"default-{nd}d" in names:
            assert models.resolve("default", nd)[2] == f"default-{nd}d"
