"""Shared pytest fixtures.

Real data lives in ``../shared/data`` next to the checkout (CI has it, a user's clone does not).
Tests that need it take the ``shared_data`` fixture and are skipped, with the reason, when it is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DEEPSALREG_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (set DEEPSALREG_SHARED_DATA to its folder)")
    return SHARED_DATA


def pytest_configure(config):
    """One torch thread: the tests use small tensors, where OpenMP threads cost more than they give and
    a loaded 2-core machine slows down by an order of magnitude (measured: 20 s vs 0.6 s for one case)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of the library tests
        return
    torch.set_num_threads(int(os.environ.get("DEEPSALREG_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.manual_seed(0)
    yield
