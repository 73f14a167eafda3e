"""The memory estimate checked before a registration starts (``DeepSalRegLib/memory.py``)."""
import pytest
import SimpleITK as sitk

import DeepSalRegLib
from DeepSalRegLib import memory
from DeepSalRegLib.errors import MemoryLimitError


def test_the_estimate_covers_the_measured_peaks_and_refuses_what_cannot_fit():
    work = 160 ** 3  # the 3D working-grid budget these pairs are registered on
    small = memory.estimate_peak_bytes((200, 200, 200), (200, 200, 200), work)
    large = memory.estimate_peak_bytes((300, 300, 300), (300, 300, 300), work)
    huge = memory.estimate_peak_bytes((600, 600, 600), (600, 600, 600), work)
    # measured peak RSS of register() + save() on such uint8 pairs: 1.77, 3.76 (session 7) and 4.91 GB
    # (session 6; memory.py); the 600^3 pair's field lives on the working grid, which is why it fits in 8 GB
    for estimate, measured in ((small, 1.77e9), (large, 3.76e9), (huge, 4.91e9)):
        assert measured <= estimate <= 1.35 * measured, (estimate, measured)
    with pytest.raises(MemoryLimitError, match=r"needs about 5\.\d GB .* 4\.0 GB are available"):
        memory.check_memory((600, 600, 600), (600, 600, 600), work, available=4e9)
    assert memory.check_memory((64, 64), (64, 64), available=8e9) < 8e9
    assert memory.check_memory((600, 600, 600), (600, 600, 600), work, available=8e9) < 8e9  # fits in 8 GB


def test_register_refuses_before_the_work(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 1e6)
    image = sitk.Image([32, 32], sitk.sitkFloat32) + 1.0
    image[5, 5] = 3.0
    with pytest.raises(MemoryLimitError):
        DeepSalRegLib.register(image, image, model="none")
    # the check can be turned off by a caller who knows better
    result = DeepSalRegLib.register(image, image, model="none", iterations=0, memory_check=False)
    assert result.displacement.GetSize() == (32, 32)
