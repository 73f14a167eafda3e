"""The memory estimate checked before a registration starts (``DeepSalRegLib/memory.py``)."""
import pytest
import SimpleITK as sitk

import DeepSalRegLib
from DeepSalRegLib import memory
from DeepSalRegLib.errors import MemoryLimitError


def test_the_estimate_grows_with_the_fixed_grid_and_refuses_what_cannot_fit():
    small = memory.estimate_peak_bytes((200, 200, 200), (200, 200, 200))
    large = memory.estimate_peak_bytes((300, 300, 300), (300, 300, 300))
    # measured peak RSS of `deepsalreg register` on such uint8 pairs: 1.87 GB and 3.44 GB (memory.py)
    assert 1.87e9 <= small <= 1.3 * 1.87e9 and 3.44e9 <= large <= 1.3 * 3.44e9
    huge = memory.estimate_peak_bytes((600, 600, 600), (600, 600, 600))
    assert huge > 8e9  # the 600^3 pair: refused on an 8 GB machine, not killed half-way
    with pytest.raises(MemoryLimitError, match=r"needs about 2\d\.\d GB .* 8\.0 GB are available"):
        memory.check_memory((600, 600, 600), (600, 600, 600), available=8e9)
    assert memory.check_memory((64, 64), (64, 64), available=8e9) < 8e9


def test_register_refuses_before_the_work(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 1e6)
    image = sitk.Image([32, 32], sitk.sitkFloat32) + 1.0
    image[5, 5] = 3.0
    with pytest.raises(MemoryLimitError):
        DeepSalRegLib.register(image, image, model="none")
    # the check can be turned off by a caller who knows better
    result = DeepSalRegLib.register(image, image, model="none", iterations=0, memory_check=False)
    assert result.displacement.GetSize() == (32, 32)
