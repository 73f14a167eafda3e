"""Reading and writing images, transforms and landmarks (SimpleITK and plain text).

* Physical coordinates are ITK's: LPS millimetres, x, y[, z] order. Slicer's RAS files (``.fcsv``,
  markups ``.json`` with ``coordinateSystem`` RAS) are converted on the way in and out (RAS = LPS with
  x and y negated).
* Transforms map fixed to moving (ITK's resampling convention, Slicer's "from parent"): a fixed
  point ``p`` corresponds to the moving point ``T(p)``.
* Every write is atomic: the file is written under a temporary name in the destination folder and
  renamed over the destination, so a failed write leaves the old file (or no file) behind.

Errors a user can fix raise ``InputError`` (bad input) or ``OutputError`` (destination not writable),
each with a one-line message.
"""
from __future__ import annotations

import csv
import hashlib
import io as _stdio
import json
import os
import uuid
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, Union

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError
from .geometry import array_index_to_physical, as_scalar_image, displacement_transform, validate_image

__all__ = [
    "read_image",
    "read_label_image",
    "write_image",
    "check_output_path",
    "write_transform",
    "read_transform",
    "read_landmarks",
    "read_landmark_columns",
    "write_landmarks",
    "read_pixel_landmarks_rc",
    "transform_points",
    "target_registration_error",
    "IMAGE_EXTENSIONS",
    "TRANSFORM_EXTENSIONS",
    "LANDMARK_EXTENSIONS",
]

PathLike = Union[str, os.PathLike]

#: Single-file image formats we write (two-file formats such as .mhd/.nhdr cannot be renamed atomically).
IMAGE_EXTENSIONS = (".nrrd", ".nii.gz", ".nii", ".mha", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_COMPRESSED = (".nrrd", ".nii.gz", ".mha")
#: ITK transform files (``sitk.WriteTransform``).
_TRANSFORM_FILES = (".h5", ".hdf5", ".tfm", ".txt")
#: Displacement-field images (vector pixels, one component per dimension, LPS mm).
_FIELD_IMAGES = (".nrrd", ".mha", ".nii.gz", ".nii")
TRANSFORM_EXTENSIONS = _TRANSFORM_FILES + _FIELD_IMAGES
LANDMARK_EXTENSIONS = (".csv", ".fcsv", ".json")

_MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
_FCSV_COLUMNS = ["id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc", "associatedNodeID"]


def _title(text: str) -> str:
    return text[:1].upper() + text[1:]


def _listed(extensions: Sequence[str]) -> str:
    return ", ".join(extensions)


def _extension(path: PathLike) -> str:
    """Lower-case extension, with the double ones we know (``.nii.gz``; ``.mrk.json`` counts as ``.json``)."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def _one_line(error: BaseException) -> str:
    """The most telling line of an exception (SimpleITK puts the reason on the last line)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__).rstrip(".")


# --------------------------------------------------------------------------------------------------
# atomic writing
# --------------------------------------------------------------------------------------------------


def file_sha256(path: PathLike) -> str:
    """Hex sha256 of a file (streamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output_folder(folder: PathLike) -> Path:
    """Refuse, before any work, an output folder that cannot be created or written; returns it as a Path.

    Raises:
        OutputError: the path is a file, sits under a file, or its nearest existing folder is not writable.
    """
    out = Path(folder).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputError(f"Output folder {out} is a file; give a folder.")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise OutputError(f"Output folder {out} cannot be created: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"Output folder {out} cannot be written: {existing} is not writable.")
    return out


def check_output_path(path: PathLike, inputs: Iterable[PathLike] = ()) -> Path:
    """Refuse an output path that would overwrite one of the ``inputs``; returns ``path`` as a Path.

    Raises:
        OutputError: the output is one of the input files (compared after resolving links), or a folder.
    """
    out = Path(path).expanduser()
    if out.is_dir():
        raise OutputError(f"Output {out} is a folder; give a file name.")
    for source in inputs:
        if source is None or not isinstance(source, (str, os.PathLike)):
            continue
        src = Path(source).expanduser()
        same = out.resolve() == src.resolve() or (out.exists() and src.exists() and os.path.samefile(out, src))
        if same:
            raise OutputError(f"Output {out} is also an input; choose another file name so the input is kept.")
    return out


def _write_atomically(path: PathLike, write: Callable[[str], None], what: str) -> Path:
    """Run ``write(temporary_path)`` and rename the result to ``path``; clean up on any failure."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"Cannot write {what} to {path}: it is a folder.")
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not existing.is_dir():
        raise OutputError(f"Cannot write {what} {path}: {existing} is a file, not a folder.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"Cannot create the folder for {what} {path}: {_one_line(error)}.") from None
    ext = _extension(path)
    # The extension stays last: SimpleITK chooses the file format from it.
    temporary = path.parent / f".{path.name[: len(path.name) - len(ext)]}.{uuid.uuid4().hex[:8]}.tmp{ext}"
    try:
        write(str(temporary))
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        raise OutputError(f"Cannot write {what} {path}: {_one_line(error)}.") from None
    finally:
        if temporary.exists():
            try:
                temporary.unlink()
            except OSError:
                pass
    return path


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------


@contextmanager
def _quiet_itk() -> Iterator[None]:
    """Silence ITK warnings for a moment (GDCM's "no series found" when a folder holds no DICOM)."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _read_dicom_series(folder: Path, name: str) -> sitk.Image:
    with _quiet_itk():
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{_title(name)} folder {folder} contains no DICOM series.")
    # Several series in one folder: take the one with the most slices (the main acquisition).
    files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), s) for s in series), key=len)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise InputError(f"{_title(name)} DICOM series in {folder} could not be read: {_one_line(error)}.") from None


def _nifti_bytes_needed(header: bytes) -> int | None:
    """Bytes a NIfTI-1/-2 file must hold (header, extensions and voxels) from its header; None if not NIfTI."""
    for order in "<>":
        size = int(np.frombuffer(header[:4], dtype=f"{order}i4")[0]) if len(header) >= 4 else 0
        if size == 348 and len(header) >= 348:
            dims = np.frombuffer(header[40:56], dtype=f"{order}i2").astype(np.int64)
            bitpix = int(np.frombuffer(header[72:74], dtype=f"{order}i2")[0])
            offset = int(np.frombuffer(header[108:112], dtype=f"{order}f4")[0])
        elif size == 540 and len(header) >= 540:
            dims = np.frombuffer(header[16:80], dtype=f"{order}i8")
            bitpix = int(np.frombuffer(header[14:16], dtype=f"{order}i2")[0])
            offset = int(np.frombuffer(header[168:176], dtype=f"{order}i8")[0])
        else:
            continue
        count = int(np.prod([max(int(n), 1) for n in dims[1:1 + max(1, min(int(dims[0]), 7))]]))
        return max(offset, size) + count * bitpix // 8
    return None


def _check_nifti_complete(path: Path, name: str) -> None:
    """A truncated .nii / .nii.gz is refused (SimpleITK reads the missing part as zeros without a word)."""
    lower = path.name.lower()
    if lower.endswith(".nii"):
        with open(path, "rb") as f:
            needed = _nifti_bytes_needed(f.read(540))
        have = path.stat().st_size
    elif lower.endswith(".nii.gz"):
        decompressor, have, head = zlib.decompressobj(16 + zlib.MAX_WBITS), 0, b""
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                data = decompressor.decompress(chunk)
                head = head if len(head) >= 540 else (head + data)[:540]
                have += len(data)
        if not decompressor.eof:
            raise InputError(f"{_title(name)} {path} is truncated (its compressed data ends early).")
        needed = _nifti_bytes_needed(head)
    else:
        return
    if needed is not None and have < needed:
        raise InputError(f"{_title(name)} {path} is truncated: it holds {have} bytes of the {needed} its header "
                         "describes.")


def _read_file(source: PathLike, name: str) -> sitk.Image:
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"{_title(name)} {path} does not exist.")
    if path.is_dir():
        return _read_dicom_series(path, name)
    try:
        _check_nifti_complete(path, name)
    except (OSError, zlib.error) as error:
        raise InputError(f"{_title(name)} {path} could not be read: {_one_line(error)}.") from None
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(f"{_title(name)} {path} could not be read as an image (unknown or damaged file).") from None


def read_image(source: PathLike | sitk.Image, name: str = "image") -> sitk.Image:
    """Read an intensity image for registration.

    Args:
        source: a file SimpleITK reads (NRRD, NIfTI, MHA, PNG/JPEG/TIFF, ...), a folder holding a DICOM
            series (the largest series is taken), or a ``sitk.Image``.
        name: how messages call it (e.g. ``"fixed image"``).
    Returns:
        A 2D or 3D float32 scalar image with its geometry (colour pictures become grey, one-slice
        volumes become 2D; see ``geometry.as_scalar_image``).
    Raises:
        InputError: missing or unreadable file, folder without DICOM, 4D or vector volume, image that is
            too small, constant or holds NaN/Inf.
    """
    if isinstance(source, sitk.Image):
        return validate_image(as_scalar_image(source, name), name)
    label = f"{name} {Path(source).expanduser()}"
    return validate_image(as_scalar_image(_read_file(source, name), label), label)


def read_label_image(source: PathLike | sitk.Image, name: str = "label image") -> sitk.Image:
    """Read a label map or mask: integer pixel type kept, no normalisation (resample it with ``labels=True``).

    Raises:
        InputError: as ``read_image``, and for colour or non-integer label maps.
    """
    image = source if isinstance(source, sitk.Image) else _read_file(source, name)
    image = as_scalar_image(image, name, labels=True)
    if 0 in image.GetSize():
        raise InputError(f"{_title(name)} is empty (size {image.GetSize()}).")
    return image


def write_image(image: sitk.Image, path: PathLike, compress: bool = True) -> Path:
    """Write an image atomically (parent folders are created); NRRD, NIfTI and MHA are compressed.

    Raises:
        InputError: an extension outside ``IMAGE_EXTENSIONS``.
        OutputError: the destination cannot be written (also when the format cannot hold the pixel
            type, e.g. float to PNG).
    """
    ext = _extension(path)
    if ext not in IMAGE_EXTENSIONS:
        raise InputError(f"Cannot write image {path}: unknown extension {ext!r}; use one of {_listed(IMAGE_EXTENSIONS)}.")
    use_compression = compress and ext in _COMPRESSED
    return _write_atomically(path, lambda tmp: sitk.WriteImage(image, tmp, use_compression), "image")


# --------------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------------


def _as_displacement_image(transform: sitk.Image | sitk.Transform) -> sitk.Image:
    if isinstance(transform, sitk.Image):
        return transform
    specific = transform.Downcast() if hasattr(transform, "Downcast") else transform
    if not isinstance(specific, sitk.DisplacementFieldTransform):
        raise InputError(f"Only displacement fields can be written as images, not a {transform.GetName()}.")
    return specific.GetDisplacementField()


def write_transform(transform: sitk.Image | sitk.Transform, path: PathLike) -> Path:
    """Write a fixed->moving transform, atomically, in the format the extension names.

    * ``.h5`` / ``.hdf5`` / ``.tfm`` / ``.txt``: an ITK transform file (``sitk.WriteTransform``); a
      displacement image becomes a ``DisplacementFieldTransform``.
    * ``.nrrd`` / ``.mha`` / ``.nii.gz`` / ``.nii``: the displacement-field image itself (float32
      vectors, LPS mm, compressed). NRRD/MHA carry ``kinds: vector domain ...``; NIfTI carries ITK's
      intent 1007 with LPS vectors (what ITK and ANTs write; SimpleITK cannot write intent 1006 for its
      vector images). Slicer loads these files as grid transforms ("Transform" in Add Data).

    Args:
        transform: a displacement-field image (vector, ``nd`` components, see
            ``geometry.displacement_image``) or a ``sitk.Transform`` (image formats: displacement fields only).
        path: destination file.
    Raises:
        InputError: unknown extension, or a non-displacement transform for an image format.
        OutputError: the destination cannot be written.
    """
    ext = _extension(path)
    if ext in _TRANSFORM_FILES:
        tx = displacement_transform(transform) if isinstance(transform, sitk.Image) else transform
        return _write_atomically(path, lambda tmp: sitk.WriteTransform(tx, tmp), "transform")
    if ext in _FIELD_IMAGES:
        field = _as_displacement_image(transform)
        if field.GetNumberOfComponentsPerPixel() != field.GetDimension():
            raise InputError(
                f"A displacement field needs {field.GetDimension()} components per voxel, this one has "
                f"{field.GetNumberOfComponentsPerPixel()}."
            )
        field = sitk.Cast(field, sitk.sitkVectorFloat32)
        return _write_atomically(path, lambda tmp: sitk.WriteImage(field, tmp, ext != ".nii"), "transform")
    raise InputError(f"Cannot write transform {path}: unknown extension {ext!r}; use one of {_listed(TRANSFORM_EXTENSIONS)}.")


def read_transform(path: PathLike) -> sitk.Transform:
    """Read an ITK transform file (``.h5``/``.tfm``/``.txt``) or a displacement-field image (``.nrrd``/``.mha``/``.nii``).

    Returns:
        The specific transform type (a displacement image becomes a ``DisplacementFieldTransform``).
    Raises:
        InputError: missing, unreadable or unsuitable file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"Transform file {path} does not exist.")
    ext = _extension(path)
    try:
        if ext in _TRANSFORM_FILES:
            tx = sitk.ReadTransform(str(path))
            return tx.Downcast() if hasattr(tx, "Downcast") else tx
        if ext in _FIELD_IMAGES:
            field = sitk.ReadImage(str(path))
        else:
            raise InputError(f"Transform file {path} has an unknown extension {ext!r}; use one of {_listed(TRANSFORM_EXTENSIONS)}.")
    except RuntimeError:
        raise InputError(f"Transform file {path} could not be read (unknown or damaged file).") from None
    if field.GetNumberOfComponentsPerPixel() != field.GetDimension():
        raise InputError(
            f"{path} is not a displacement field: it has {field.GetNumberOfComponentsPerPixel()} component(s) "
            f"per voxel for a {field.GetDimension()}D grid."
        )
    return displacement_transform(field)


# --------------------------------------------------------------------------------------------------
# landmarks
# --------------------------------------------------------------------------------------------------


def _ras_lps(points: np.ndarray) -> np.ndarray:
    """RAS <-> LPS (its own inverse): negate x and y."""
    out = np.array(points, dtype=np.float64, copy=True)
    out[:, :2] *= -1
    return out


def _floats(values: Sequence[str], path: Path, row: int) -> list[float]:
    try:
        return [float(v) for v in values]
    except ValueError:
        raise InputError(f"Landmark file {path}, row {row}: coordinates {list(values)} are not numbers.") from None


def _csv_rows(path: Path) -> list[list[str]]:
    """Rows of a CSV landmark file (header first), without comment and blank lines."""
    text = path.read_text(encoding="utf-8-sig")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    rows = list(csv.reader(lines))
    if not rows:
        raise InputError(f"Landmark file {path} is empty.")
    for n, row in enumerate(rows[1:]):
        if len(row) < len(rows[0]):
            raise InputError(f"Landmark file {path}, row {n + 2}: {len(row)} values for {len(rows[0])} columns.")
    return rows


def _read_csv(path: Path) -> tuple[np.ndarray, list[str] | None]:
    rows = _csv_rows(path)
    header = [h.strip().lower() for h in rows[0]]
    if "x" not in header or "y" not in header:
        raise InputError(f"Landmark file {path} needs a header row with columns x, y[, z]; found {rows[0]}.")
    axes = [header.index(a) for a in ("x", "y", "z") if a in header]
    label_col = next((header.index(c) for c in ("label", "name") if c in header), None)
    points = [_floats([r[i] for i in axes], path, n + 2) for n, r in enumerate(rows[1:])]
    labels = [r[label_col] for r in rows[1:]] if label_col is not None else None
    return np.array(points, dtype=np.float64).reshape(-1, len(axes)), labels


def _read_fcsv(path: Path) -> tuple[np.ndarray, list[str]]:
    columns, system, rows = list(_FCSV_COLUMNS), "RAS", []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            key, value = key.strip().lower(), value.strip()
            if key == "columns":
                columns = [c.strip() for c in value.split(",")]
            elif key == "coordinatesystem":
                system = "LPS" if value.upper() in ("LPS", "1") else "RAS"
        elif line.strip():
            rows.append(next(csv.reader([line])))
    index = {c: i for i, c in enumerate(columns)}
    points = np.array([_floats([r[index[a]] for a in ("x", "y", "z")], path, n + 1) for n, r in enumerate(rows)])
    points = points.reshape(-1, 3)
    labels = [r[index["label"]] if "label" in index and len(r) > index["label"] else "" for r in rows]
    return (_ras_lps(points) if system == "RAS" else points), labels


def _read_markups_json(path: Path) -> tuple[np.ndarray, list[str]]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        markups = document["markups"]
    except (ValueError, KeyError, TypeError):
        raise InputError(f"Landmark file {path} is not a Slicer markups JSON file (no 'markups' list).") from None
    points, labels = [], []
    for markup in markups:
        ras = str(markup.get("coordinateSystem", "LPS")).upper() == "RAS"  # Slicer's default is LPS
        for n, cp in enumerate(markup.get("controlPoints", [])):
            if "position" not in cp or len(cp["position"]) != 3:
                raise InputError(f"Landmark file {path}: control point {n + 1} has no position.")
            p = np.array([cp["position"]], dtype=np.float64)
            points.append(_ras_lps(p)[0] if ras else p[0])
            labels.append(str(cp.get("label", "")))
    return np.array(points, dtype=np.float64).reshape(-1, 3), labels


def read_landmarks(path: PathLike, nd: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Read landmarks as physical LPS points.

    Formats (by extension):
        * ``.csv``: a header row with columns ``x``, ``y`` [, ``z``] (any case, other columns allowed;
          ``label`` or ``name`` gives the labels), LPS mm; ``#`` lines are comments. Other columns
          (e.g. the liver data's ``region``) come from ``read_landmark_columns``.
        * ``.fcsv``: Slicer fiducial CSV; RAS unless its header says ``CoordinateSystem = LPS``.
        * ``.json`` / ``.mrk.json``: Slicer markups; ``coordinateSystem`` RAS or LPS (default LPS).

    Args:
        path: the file.
        nd: 2 to drop a third coordinate (points of a 2D image stored by Slicer), 3 to require three.
    Returns:
        ``(points, labels)``: ``(N, nd)`` float64 LPS mm, and N label strings (``"1"``, ``"2"``, ...
        when the file has none).
    Raises:
        InputError: missing or malformed file, unknown extension.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"Landmark file {path} does not exist.")
    ext = _extension(path)
    readers = {".csv": _read_csv, ".fcsv": _read_fcsv, ".json": _read_markups_json}
    if ext not in readers:
        raise InputError(f"Landmark file {path} has an unknown extension {ext!r}; use .csv, .fcsv or .json.")
    try:
        points, labels = readers[ext](path)
    except InputError:
        raise
    except (IndexError, KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError, OSError) as error:
        kind = {".csv": "landmark CSV", ".fcsv": "Slicer .fcsv", ".json": "Slicer markups JSON"}[ext]
        raise InputError(f"Landmark file {path} is not a valid {kind} file ({type(error).__name__}: "
                         f"{_one_line(error)}).") from None
    bad = ~np.isfinite(points).all(axis=1) if len(points) else np.zeros(0, bool)
    if bad.any():
        raise InputError(f"Landmark file {path}: point {int(np.argmax(bad)) + 1} has a coordinate that is not a "
                         "finite number (NaN or Inf).")
    if labels is None or not any(labels):
        labels = [str(i + 1) for i in range(len(points))]
    if nd == 2 and points.shape[1] == 3:
        points = points[:, :2]
    elif nd is not None and points.shape[1] != nd:
        raise InputError(f"Landmark file {path} holds {points.shape[1]}D points; {nd}D points are needed.")
    return points, labels


def read_landmark_columns(path: PathLike) -> dict[str, list[str]]:
    """All columns of a CSV landmark file as strings, keyed by the header (e.g. ``{"x": [...], "region": [...]}``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"Landmark file {path} does not exist.")
    if _extension(path) != ".csv":
        raise InputError(f"Landmark columns can be read from .csv files only, not {path}.")
    rows = _csv_rows(path)
    return {name.strip(): [row[i] for row in rows[1:]] for i, name in enumerate(rows[0])}


def write_landmarks(points: np.ndarray, path: PathLike, labels: Sequence[str] | None = None) -> Path:
    """Write LPS points atomically: ``.csv`` (LPS, columns x,y[,z],label), ``.fcsv`` (RAS), ``.json`` (markups, LPS).

    2D points get z = 0 in the Slicer formats.

    Raises:
        InputError: points not ``(N, 2|3)``, labels of the wrong length, unknown extension.
        OutputError: the destination cannot be written.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] not in (2, 3):
        raise InputError(f"Landmarks must be an (N, 2) or (N, 3) array, got shape {points.shape}.")
    if labels is not None and len(labels) != len(points):
        raise InputError(f"{len(labels)} labels were given for {len(points)} landmarks.")
    names = [str(s) for s in labels] if labels is not None else [f"F-{i + 1}" for i in range(len(points))]
    xyz = np.hstack([points, np.zeros((len(points), 3 - points.shape[1]))])
    ext = _extension(path)
    text = _stdio.StringIO()
    if ext == ".csv":
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["x", "y", "z"][: points.shape[1]] + (["label"] if labels is not None else []))
        for p, name in zip(points, names):
            writer.writerow([repr(float(v)) for v in p] + ([name] if labels is not None else []))
    elif ext == ".fcsv":
        text.write("# Markups fiducial file version = 4.11\n# CoordinateSystem = RAS\n")
        text.write("# columns = " + ",".join(_FCSV_COLUMNS) + "\n")
        writer = csv.writer(text, lineterminator="\n")
        for i, (p, name) in enumerate(zip(_ras_lps(xyz), names)):
            writer.writerow([i + 1, *(repr(float(v)) for v in p), 0, 0, 0, 1, 1, 1, 0, name, "", ""])
    elif ext == ".json":
        control_points = [
            {"id": str(i + 1), "label": name, "position": [float(v) for v in p], "positionStatus": "defined"}
            for i, (p, name) in enumerate(zip(xyz, names))
        ]
        document = {
            "@schema": _MARKUPS_SCHEMA,
            "markups": [
                {"type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm", "controlPoints": control_points}
            ],
        }
        text.write(json.dumps(document, indent=2) + "\n")
    else:
        raise InputError(f"Cannot write landmarks {path}: unknown extension {ext!r}; use .csv, .fcsv or .json.")

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text.getvalue())

    return _write_atomically(path, write, "landmarks")


def read_pixel_landmarks_rc(path: PathLike, images: Sequence[sitk.Image]) -> list[np.ndarray]:
    """Read 0-based pixel ``(row, col)`` landmark columns and turn them into physical points of their images.

    The file holds one ``row, col`` pair of columns per image (comma separated, ``#`` comments), e.g.
    FAIR's ``hands_landmarks_pixel_rc.csv``: ``T_row, T_col, R_row, R_col`` -> pass ``[moving, fixed]``.
    ``(row, col)`` is the array index of a 2D image, so the point is ``image``'s physical point at ITK
    index ``(col, row)``.

    Returns:
        One ``(N, 2)`` float64 array of physical (LPS) points per image, in the order of ``images``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"Landmark file {path} does not exist.")
    try:
        table = np.atleast_2d(np.loadtxt(path, delimiter=",", comments="#", dtype=np.float64))
    except ValueError:
        raise InputError(f"Landmark file {path} does not hold comma-separated numbers.") from None
    if table.shape[1] != 2 * len(images):
        raise InputError(
            f"Landmark file {path} has {table.shape[1]} columns; {2 * len(images)} (row, col per image) are needed."
        )
    return [array_index_to_physical(table[:, 2 * i : 2 * i + 2], image) for i, image in enumerate(images)]


def transform_points(transform: sitk.Transform | None, points: np.ndarray) -> np.ndarray:
    """Map physical points ``(N, nd)`` with a fixed->moving transform: ``T(p)`` for each row (None: identity)."""
    points = np.atleast_2d(np.asarray(points, dtype=np.float64))
    if transform is None:
        return points.copy()
    if points.shape[1] != transform.GetDimension():
        raise InputError(f"{points.shape[1]}D points cannot be mapped by a {transform.GetDimension()}D transform.")
    return np.array([transform.TransformPoint(p.tolist()) for p in points], dtype=np.float64).reshape(points.shape)


def target_registration_error(
    transform: sitk.Transform | None, fixed_points: np.ndarray, moving_points: np.ndarray
) -> np.ndarray:
    """Per-landmark TRE in mm: ``|T(p_fixed) - p_moving|``, with ``T`` the fixed->moving transform.

    ``transform=None`` gives the initial error (identity). Row i of the fixed points corresponds to row i
    of the moving points.
    """
    fixed_points = np.atleast_2d(np.asarray(fixed_points, dtype=np.float64))
    moving_points = np.atleast_2d(np.asarray(moving_points, dtype=np.float64))
    if fixed_points.shape != moving_points.shape:
        raise InputError(
            f"Fixed and moving landmarks do not pair up: shapes {fixed_points.shape} and {moving_points.shape}."
        )
    return np.linalg.norm(transform_points(transform, fixed_points) - moving_points, axis=1)
