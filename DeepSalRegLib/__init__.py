"""DeepSalReg: unsupervised global-to-local deformable registration with a joint saliency map.

The public API fits on one screen::

    import DeepSalRegLib
    result = DeepSalRegLib.register("fixed.nrrd", "moving.nrrd", iterations=50)
    result.save("out/")          # transform (.h5 + displacement image), warped, saliency, Jacobian, report

Importing this package is cheap: torch and SimpleITK are imported only when a function needs them,
so the Slicer module can load without torch installed.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["register", "RegistrationResult", "__version__"]


def __getattr__(name):  # PEP 562: lazy access to the heavy parts
    if name in ("register", "RegistrationResult"):
        from . import registration

        return getattr(registration, name)
    raise AttributeError(f"module 'DeepSalRegLib' has no attribute {name!r}")
