"""Errors that mean "the user gave us something we cannot use" (as opposed to a bug).

Faces (command line, Slicer module, batch) print these as one line and exit with the code given here;
anything else is an internal error and keeps its traceback.
"""
from __future__ import annotations


class DeepSalRegError(Exception):
    """Base class of the errors a user can cause and fix. ``exit_code`` is what the command line returns."""

    exit_code = 2


class InputError(DeepSalRegError, ValueError):
    """Missing/unreadable file, wrong dimension, empty/constant/NaN image, mismatched pair, bad option."""

    exit_code = 2


class ModelError(DeepSalRegError):
    """Unknown model name, corrupt or mismatched weights (checksum), incompatible checkpoint."""

    exit_code = 3


class DeviceError(DeepSalRegError):
    """A device was asked for that this machine does not have (e.g. ``--device cuda`` without a GPU)."""

    exit_code = 4


class OutputError(DeepSalRegError):
    """The output location cannot be written."""

    exit_code = 5


class MemoryLimitError(DeepSalRegError):
    """The registration would need more memory than this machine has available (checked before the work)."""

    exit_code = 2
