"""Named quality presets: how much refinement ``register()`` does after the affine stage and the network.

Every face maps the same names the same way (command line ``--quality``, ``register(quality=...)``, the Slicer
panel's *Quality* selector, the console logic and headless batch). The refinement of each preset stops by
itself, level by level, once its loss has stopped improving (``optimise.Convergence``); ``iterations=N``
(``--iterations N``) is the expert's fixed step count instead, and ``iterations=0`` skips the refinement
(affine + network only).

What each costs is measured in ``benchmarks/results`` (rows ``deepsalreg-fast``, ``deepsalreg-balanced``,
``deepsalreg-accurate``; session 17 run; on users' own grids ``benchmarks/results_user_grids``); ``README.md``,
the descriptions below and the Slicer panel's tooltip quote those numbers.

This module imports nothing heavy: the Slicer panel reads the names and descriptions without torch.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["QualityPreset", "PRESETS", "DEFAULT_QUALITY", "preset"]


@dataclass(frozen=True)
class QualityPreset:
    """One quality preset.

    Attributes:
        name: what users type (``fast``, ``balanced``, ``accurate``).
        description: one line for help texts.
        max_steps: most refinement steps per pyramid level (a level usually stops earlier, by convergence).
        tolerance: a level stops once its loss, averaged over 5 steps, improved by less than this (the loss is
            the 0..1 local-NCC loss plus the regulariser) from one 5-step window to the next.
        velocity_factor: the refinement's velocity lives on a grid this many times coarser than each level
            (``optimise.velocity_grid``): 2 halves the cost of a step and was as accurate on the benchmark.
        affine_tolerance: the affine stage's level stops once its loss improved by less than this per window.
        max_steps_finest: most steps at full resolution (None: ``max_steps``).
        max_voxels_3d: the 3D working-grid voxel budget of this preset (None: ``registration.DEFAULT_MAX_VOXELS``,
            2^20); ``max_voxels=`` / ``--max-voxels`` overrides it. A 3D step costs about its grid's voxels.
    """

    name: str
    description: str
    max_steps: int
    tolerance: float
    velocity_factor: int = 2
    affine_tolerance: float = 5e-4
    max_steps_finest: int | None = None
    max_voxels_3d: int | None = None


PRESETS = {
    # fast's 3D grid of at most 2^18 voxels (~64^3; session 16, NOTES): on the benchmark's 3D files as they are
    # (2 threads) 2.4-2.7 s per pair instead of 5-8.5 s on the 2^20 grid, liver 2.83 / 2.81 mm, prostate 0.849 /
    # 0.848, brain (2 mm files) 0.652 / 0.695
    "fast": QualityPreset("fast", "short refinement (at most 15 steps per level) on a 3D working grid of at most "
                          "2^18 voxels: 2.5 s per 3D pair on 2 CPU cores; less detail, use balanced around "
                          "lesions and resections", max_steps=15, tolerance=3e-3,
                          max_voxels_3d=2 ** 18),
    "balanced": QualityPreset("balanced", "refinement until converged (at most 40 steps per level, 20 at full "
                              "resolution): the default; 3-3.5 s per 3D pair on a 3 mm grid, 6-9 s on a "
                              "working grid of ~2^20 voxels (2 CPU cores)",
                              max_steps=40, tolerance=1e-3, max_steps_finest=20),
    "accurate": QualityPreset("accurate", "longer refinement with a tighter convergence test (at most 80 steps "
                              "per level, 40 at full resolution) and the affine stage's full step budget; 5 s per "
                              "3D pair on a 3 mm grid, 10-13 s on ~2^20 voxels (2 CPU cores), better on some pairs "
                              "only",
                              max_steps=80, tolerance=3e-4, max_steps_finest=40, affine_tolerance=0.0),
}

#: the preset every face uses when the user says nothing
DEFAULT_QUALITY = "balanced"


def preset(name: str | None) -> QualityPreset:
    """The preset called ``name`` (None: the default); an unknown name raises ``InputError`` listing the known."""
    from .errors import InputError

    key = (name or DEFAULT_QUALITY).strip().lower()
    if key not in PRESETS:
        raise InputError(f"unknown quality {name!r}; use one of: {', '.join(PRESETS)}.")
    return PRESETS[key]
