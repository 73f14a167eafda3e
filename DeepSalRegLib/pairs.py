"""The pair list of batch registration, one reader for both batch faces (``deepsalreg batch`` and the Slicer
batch script ``DeepSalReg/Resources/batch_register.py``).

A CSV file with a header row: ``fixed`` and ``moving`` are required; ``fixed_landmarks``, ``moving_landmarks``,
``fixed_mask``, ``moving_mask`` and ``name`` are optional. Relative paths are relative to the CSV file's
folder; column names and cells are stripped; a UTF-8 byte-order mark is accepted. Every pair gets a unique
``name`` (its output sub-folder): the ``name`` cell, else ``<row number>_<moving file stem>``, with ``_``
appended until it is unique.
"""
from __future__ import annotations

import csv
from pathlib import Path

from .errors import InputError

__all__ = ["PAIR_COLUMNS", "read_pairs"]

PAIR_COLUMNS = ("fixed", "moving", "fixed_landmarks", "moving_landmarks", "fixed_mask", "moving_mask", "name")


def read_pairs(path) -> list[dict]:
    """The pairs of a pair list: dicts with every key of ``PAIR_COLUMNS`` (absolute paths or None, and a name).

    Raises:
        InputError: the file is missing or unreadable, or has no ``fixed`` and ``moving`` columns.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"pairs file not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"pairs file {path} could not be read: {error}") from None
    header = {key.strip() for key in rows[0] if key} if rows else set()
    if not {"fixed", "moving"} <= header:
        raise InputError(f"{path} needs a header row with at least the columns fixed and moving (optional: "
                         f"{', '.join(PAIR_COLUMNS[2:])})")
    pairs, names = [], set()
    for number, row in enumerate(rows, start=1):
        row = {key.strip(): (value or "").strip() for key, value in row.items() if key}
        pair = {key: (str((path.parent / row[key]).resolve()) if row.get(key) else None)
                for key in PAIR_COLUMNS if key != "name"}
        name = row.get("name") or f"{number:03d}_{Path(row.get('moving') or 'pair').name.split('.')[0]}"
        while name in names:
            name += "_"
        names.add(name)
        pair["name"] = name
        pairs.append(pair)
    return pairs
