"""Build (or extend) an HDF5 training dataset from image files, resampled onto one working grid.

Inputs are folders (every image file in them), glob patterns, single files, or CSV files with a header
``image[,labels][,landmarks][,subject]`` (paths relative to the CSV). Each image is read with SimpleITK,
resampled (linear; labels nearest) onto a grid of the common shape and spacing and normalised to [0, 1]
by robust percentiles, exactly as ``register()`` prepares its inputs. With ``--align centre`` (default)
every image gets its own grid centred on it (inter-subject data that is not aligned, e.g. the prostate
set); with ``--align physical`` all images share the first image's grid (data already in one space,
e.g. breathing phases of one patient). The per-image grid geometry is stored, so landmarks (kept in
physical mm) and results can be mapped back.

Examples::

    # 3D, every NIfTI of a folder, 2 mm isotropic 96^3 grid, inter-subject pairs, 10 % validation subjects
    python training/make_dataset.py data/prostate.h5 "../shared/data/promise12/*_t2.nii.gz" \\
        --labels-replace _t2 _prostate --spacing 2 --shape 32 96 96 --pairs inter --val-fraction 0.1

    # 2D from 3D templates: 8 slices per axis of each volume, plus 50 synthetic shape images
    python training/make_dataset.py data/templates2d.h5 ../shared/data/templates/colin27_ch2bet.nii.gz \\
        --slices 8 --spacing 1 --shape 192 192 --synthetic 50

    # from a CSV (image,labels,landmarks,subject), appending to an existing file
    python training/make_dataset.py data/liver.h5 liver.csv --align physical --pairs intra --append
"""
from __future__ import annotations

import argparse
import csv
import glob
import itertools
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import SimpleITK as sitk

from DeepSalRegLib import geometry, io
from DeepSalRegLib.errors import DeepSalRegError, InputError
from DeepSalRegLib.geometry import as_scalar_image, normalise_intensity, resample_onto
from training.datasets import PAIR_KINDS, DatasetWriter

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class Source:
    """One input image (and its optional labels / landmarks); ``axis``/``position`` select a 2D slice."""

    image: Path
    labels: Path | None = None
    landmarks: Path | None = None
    subject: str | None = None
    axis: int | None = None  # ITK index axis removed when slicing a volume
    position: int | None = None

    @property
    def name(self) -> str:
        return str(self.image) if self.axis is None else f"{self.image}[axis {self.axis} slice {self.position}]"


def _is_image(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in IMAGE_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _replaced(path: Path, rule) -> Path | None:
    if not rule:
        return None
    old, new = rule
    if old not in path.name:
        return None
    candidate = path.with_name(path.name.replace(old, new))
    return candidate


def _read_csv(path: Path) -> list[Source]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(line for line in handle if not line.lstrip().startswith("#")))
    if not rows or "image" not in rows[0]:
        raise InputError(f"{path}: a dataset CSV needs a header with an 'image' column (and optional labels, landmarks, subject).")
    base = path.parent

    def resolve(value):
        value = (value or "").strip()
        return (base / value) if value and not Path(value).is_absolute() else (Path(value) if value else None)

    return [Source(resolve(r["image"]), resolve(r.get("labels")), resolve(r.get("landmarks")),
                   (r.get("subject") or "").strip() or None) for r in rows]


def collect_sources(inputs, labels_replace=None, landmarks_replace=None, exclude_labels=True) -> list[Source]:
    """Expand folders, globs, files and CSVs into a sorted, de-duplicated list of sources."""
    sources: list[Source] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.suffix.lower() == ".csv" and path.is_file():
            sources += _read_csv(path)
            continue
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and _is_image(p))
        elif any(ch in str(item) for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(str(path)) if _is_image(Path(p)))
        elif path.is_file():
            found = [path]
        else:
            raise InputError(f"input {item} is not a file, a folder, a glob pattern that matches, or a CSV.")
        if not found:
            raise InputError(f"no image files found in {item}.")
        for p in found:
            sources.append(Source(p, _replaced(p, labels_replace), _replaced(p, landmarks_replace)))
    if exclude_labels:  # a folder/glob may also match the label files themselves
        label_files = {s.labels.resolve() for s in sources if s.labels}
        sources = [s for s in sources if s.image.resolve() not in label_files]
    seen, unique = set(), []
    for s in sources:
        key = s.image.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(s)
    for s in unique:
        for what, p in (("image", s.image), ("label map", s.labels), ("landmark file", s.landmarks)):
            if p is not None and not p.exists():
                raise InputError(f"{what} {p} (for {s.image.name}) does not exist.")
    if not unique:
        raise InputError("no images to add.")
    return unique


def _header(path: Path):
    """(dimension after dropping singleton axes, size, spacing) without reading the pixels when possible."""
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        size, spacing = list(reader.GetSize()), list(reader.GetSpacing())
    except RuntimeError:
        image = io.read_image(path)
        size, spacing = list(image.GetSize()), list(image.GetSpacing())
    keep = [i for i, n in enumerate(size) if n > 1] if len(size) > 2 else list(range(len(size)))
    return len(keep), [size[i] for i in keep], [spacing[i] for i in keep]


def _slice(image: sitk.Image, axis: int, position: int) -> sitk.Image:
    """2D slice of a volume across ITK index ``axis`` (in-plane spacing kept, identity direction)."""
    size = list(image.GetSize())
    size[axis] = 0
    index = [0] * 3
    index[axis] = position
    out = sitk.Extract(image, size, index, sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOIDENTITY)
    out.SetSpacing([image.GetSpacing()[a] for a in range(3) if a != axis])
    out.SetOrigin((0.0, 0.0))
    out.SetDirection((1.0, 0.0, 0.0, 1.0))
    return out


def expand_slices(sources: list[Source], count: int) -> list[Source]:
    """Replace each 3D source by ``count`` slices per ITK axis from its central 60 %."""
    out = []
    for s in sources:
        nd, size, _ = _header(s.image)
        if nd != 3:
            out.append(s)
            continue
        for axis in range(3):
            n = size[axis]
            positions = np.unique(np.linspace(0.2 * (n - 1), 0.8 * (n - 1), count).round().astype(int))
            for p in positions:
                out.append(Source(s.image, s.labels, None, s.subject or _stem(s.image), axis, int(p)))
    return out


def _load(source: Source, nd: int):
    image = io.read_image(source.image, source.image.name)
    labels = io.read_label_image(source.labels, f"label map {source.labels.name}") if source.labels else None
    if labels is not None:
        if labels.GetSize() != image.GetSize() or not np.allclose(labels.GetSpacing(), image.GetSpacing(), rtol=1e-4) \
                or not np.allclose(labels.GetOrigin(), image.GetOrigin(), atol=1e-3 * max(image.GetSpacing())):
            raise InputError(f"label map {source.labels} does not match image {source.image}: size {labels.GetSize()} vs "
                             f"{image.GetSize()}, spacing {labels.GetSpacing()} vs {image.GetSpacing()}.")
        labels.CopyInformation(image)
    if source.axis is not None:
        image = _slice(image, source.axis, source.position)
        labels = _slice(labels, source.axis, source.position) if labels is not None else None
    image = as_scalar_image(image, source.name)
    if labels is not None:
        labels = as_scalar_image(labels, f"label map {source.labels}", labels=True)
    if image.GetDimension() != nd:
        raise InputError(f"{source.name} is {image.GetDimension()}D but the dataset is {nd}D; "
                         "datasets hold one dimension (use --slices to cut 2D slices from volumes).")
    landmarks = None
    if source.landmarks is not None:
        landmarks, _ = io.read_landmarks(source.landmarks, nd)
    return image, labels, landmarks


def centred_grid(image: sitk.Image, shape, spacing) -> sitk.Image:
    """Grid of array ``shape`` and ``spacing`` with the image's direction, centred on the image
    (``geometry.centred_grid``, which takes the ITK size)."""
    return geometry.centred_grid(image, list(reversed(shape)), spacing)


def choose_grid(sources: list[Source], nd: int, spacing, shape, multiple: int, max_voxels: int):
    """Common (array shape, ITK spacing): given, or covering the largest input at the finest spacing."""
    headers = []
    for s in sources:
        d, size, sp = _header(s.image)
        if s.axis is not None:
            size = [n for a, n in enumerate(size) if a != s.axis]
            sp = [v for a, v in enumerate(sp) if a != s.axis]
            d = 2
        if d != nd:
            raise InputError(f"{s.name} is {d}D but {sources[0].name} is {nd}D; a dataset holds one dimension "
                             "(use --slices to cut 2D slices from volumes).")
        headers.append((size, sp))
    if spacing is None:
        spacing = min(min(sp) for _, sp in headers)
    step = np.broadcast_to(np.asarray(spacing, dtype=float), (nd,)).copy()
    if shape is not None:
        if len(shape) != nd:
            raise InputError(f"--shape has {len(shape)} values but the images are {nd}D.")
        return tuple(int(n) for n in shape), step
    extent = np.max([np.asarray(size) * np.asarray(sp) for size, sp in headers], axis=0)
    n, step = geometry.grid_size(extent, step, multiple, max_voxels)  # the working grid's rule
    return tuple(int(v) for v in reversed(n)), step


def assign_splits(subjects: list[str], val_fraction: float, seed: int, known: dict | None = None) -> dict:
    """Subject -> 0 (train) / 1 (validation); whole subjects go to one side; ``known`` keeps earlier choices."""
    known = dict(known or {})
    new = sorted(set(subjects) - set(known))
    rng = np.random.default_rng(seed)
    order = [new[i] for i in rng.permutation(len(new))]
    n_val = int(round(val_fraction * len(order)))
    if val_fraction > 0 and len(order) >= 2:
        n_val = min(max(n_val, 1), len(order) - 1)
    for k, subject in enumerate(order):
        known[subject] = 1 if k < n_val else 0
    return known


def make_pairs(subjects: list[str], splits: np.ndarray, kinds, max_inter: int, atlas: set, seed: int) -> dict:
    """Pair lists (fixed, moving) over all images: same-split only, both directions."""
    n = len(subjects)
    out = {k: [] for k in PAIR_KINDS}
    normal = [i for i in range(n) if i not in atlas]
    if "intra" in kinds:
        out["intra"] = [(a, b) for a, b in itertools.permutations(normal, 2)
                        if subjects[a] == subjects[b] and splits[a] == splits[b]]
    if "inter" in kinds:
        candidates = [(a, b) for a, b in itertools.permutations(normal, 2)
                      if subjects[a] != subjects[b] and splits[a] == splits[b]]
        if len(candidates) > max_inter:
            rng = np.random.default_rng(seed + 1)
            candidates = [candidates[i] for i in sorted(rng.choice(len(candidates), max_inter, replace=False))]
        out["inter"] = candidates
    if "atlas" in kinds:
        out["atlas"] = [(i, a) for a in sorted(atlas) for i in normal]  # subject fixed, atlas moving
    return out


def build(args) -> str:
    from training.synthetic import random_shapes_image

    import torch

    t0 = time.time()
    command = "make_dataset.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    out = Path(args.output)
    if out.exists() and not args.append and not args.overwrite:
        raise InputError(f"{out} exists; pass --append to add images or --overwrite to replace it.")
    if args.append and not out.exists():
        raise InputError(f"--append: {out} does not exist yet (leave out --append to create it).")
    sources = collect_sources(args.inputs, args.labels_replace, args.landmarks_replace) if args.inputs else []
    atlas_sources = collect_sources([args.atlas]) if args.atlas else []
    for s in atlas_sources:
        s.subject = "atlas"
    sources += atlas_sources
    if args.slices:
        sources = expand_slices(sources, args.slices)
    if args.append:
        from training.datasets import RegistrationH5

        existing = RegistrationH5(out)
        nd, shape, spacing = existing.ndim, existing.shape, np.asarray(existing.spacing)
        if args.shape is not None and tuple(args.shape) != shape:
            raise InputError(f"--shape {tuple(args.shape)} differs from {out}'s {shape}.")
    elif sources:
        nd = _header(sources[0].image)[0] if sources[0].axis is None else 2
        shape, spacing = choose_grid(sources, nd, args.spacing, args.shape, args.multiple,
                                     args.max_voxels or (256 * 256 if nd == 2 else 128 ** 3))
    else:
        if not args.synthetic or args.shape is None:
            raise InputError("give input images, or --synthetic N with --shape for a synthetic-only dataset.")
        nd, shape = len(args.shape), tuple(args.shape)
        spacing = np.broadcast_to(np.asarray(args.spacing or 1.0, dtype=float), (nd,)).copy()
    if nd not in (2, 3):
        raise InputError(f"images must be 2D or 3D, not {nd}D.")
    writer = DatasetWriter(out, nd, shape, spacing, args.align, append=args.append, command=command)
    ok = False
    try:
        subjects_before = writer.subjects()
        known = dict(zip(subjects_before, writer.splits().tolist()))
        new_subjects = [s.subject or (s.image.parent.name if args.subject_from == "parent" else _stem(s.image)) for s in sources]
        new_subjects += [f"synthetic-{writer.existing + len(sources) + k}" for k in range(args.synthetic)]
        splits = assign_splits(new_subjects, args.val_fraction, args.seed, known)
        reference = None
        if args.align == "physical" and writer.existing:
            reference = ("stored", writer.f["origin"][0], writer.f["direction"][0])
        atlas_index = set(int(i) for i in writer.f.attrs.get("atlas_indices", []))
        n_labels = n_landmarks = 0
        for source, subject in zip(sources, new_subjects):
            image, labels, landmarks = _load(source, nd)
            if args.align == "physical":
                if reference is None:
                    grid = centred_grid(image, shape, spacing)
                    reference = ("grid", grid)
                if reference[0] == "grid":
                    grid = reference[1]
                else:
                    grid = sitk.Image([int(n) for n in reversed(shape)], sitk.sitkFloat32)
                    grid.SetSpacing([float(s) for s in spacing])
                    grid.SetOrigin([float(v) for v in reference[1]])
                    grid.SetDirection([float(v) for v in reference[2]])
            else:
                grid = centred_grid(image, shape, spacing)
            array = sitk.GetArrayFromImage(resample_onto(image, grid))
            inside = sitk.GetArrayFromImage(resample_onto(sitk.Cast(image * 0 + 1, sitk.sitkUInt8), grid, labels=True)) > 0
            if not inside.any():
                raise InputError(f"{source.name} does not overlap the common grid (--align physical needs images in one space).")
            array = normalise_intensity(array, inside)
            label_array = None
            if labels is not None:
                label_array = sitk.GetArrayFromImage(resample_onto(labels, grid, labels=True)).astype(np.int64)
                if label_array.min() < -32768 or label_array.max() > 32767:
                    raise InputError(f"label map {source.labels} holds values outside the int16 range.")
                n_labels += 1
            n_landmarks += landmarks is not None
            index = writer.add(array, grid.GetOrigin(), grid.GetDirection(), source.name, subject, splits[subject],
                               label_array, landmarks)
            if subject == "atlas":
                atlas_index.add(index)
        generator = torch.Generator().manual_seed(args.seed)
        for k in range(args.synthetic):
            subject = new_subjects[len(sources) + k]
            image, label_map = random_shapes_image(shape, generator)
            origin = -np.asarray(spacing) * (np.asarray(list(reversed(shape))) - 1) / 2.0
            writer.add(image[0].numpy(), origin, np.eye(nd), f"synthetic shapes #{k}", subject, splits[subject],
                       label_map[0].numpy())
            n_labels += 1
        all_subjects = writer.subjects()
        pairs = make_pairs(all_subjects, writer.splits(), args.pairs, args.max_inter_pairs, atlas_index, args.seed)
        for kind, value in pairs.items():
            writer.set_pairs(kind, value)
        writer.f.attrs["atlas_indices"] = sorted(atlas_index)
        total = writer.count
        split = writer.splits()
        ok = True
    finally:
        writer.close(keep=ok)
    grid_text = "x".join(map(str, shape))
    spacing_text = "x".join(f"{s:g}" for s in spacing)
    added = total - writer.existing
    return (f"wrote {out}: {total} {nd}D images ({added} added: {len(sources)} from files, {args.synthetic} synthetic; "
            f"{n_labels} with labels, {n_landmarks} with landmarks) on a {grid_text} grid at {spacing_text} mm "
            f"(--align {args.align}); train/val images {int((split == 0).sum())}/{int((split == 1).sum())}; pairs: "
            + ", ".join(f"{k} {len(v)}" for k, v in pairs.items()) + f"; {time.time() - t0:.1f} s")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make_dataset.py", description=__doc__.split("\n\n")[0],
                                epilog="Examples:\n" + __doc__.split("Examples::")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="the .h5 file to write")
    p.add_argument("inputs", nargs="*", help="folders, glob patterns (quote them), image files or CSV files")
    p.add_argument("--labels-replace", nargs=2, metavar=("OLD", "NEW"),
                   help="label map of an image = its file name with OLD replaced by NEW (e.g. _t2 _prostate)")
    p.add_argument("--landmarks-replace", nargs=2, metavar=("OLD", "NEW"),
                   help="landmark CSV of an image = its file name with OLD replaced by NEW (e.g. .mha _landmarks.csv)")
    p.add_argument("--atlas", help="an atlas image: atlas pairs are (each image fixed, atlas moving)")
    p.add_argument("--spacing", type=float, nargs="+", help="grid spacing in mm (one value or one per ITK axis x y [z]); "
                   "default: the finest input spacing")
    p.add_argument("--shape", type=int, nargs="+", help="grid shape in ARRAY order (rows cols, or slices rows cols); "
                   "default: covers the largest input, a multiple of --multiple")
    p.add_argument("--multiple", type=int, default=8, help="default shapes are multiples of this (default 8)")
    p.add_argument("--max-voxels", type=int, help="cap of the default shape (default 256^2 / 128^3); coarsens the spacing")
    p.add_argument("--align", choices=("centre", "physical"), default="centre",
                   help="centre: each image on its own grid centred on it (default); physical: one shared grid")
    p.add_argument("--slices", type=int, default=0, help="cut N 2D slices per axis from each 3D input (2D dataset)")
    p.add_argument("--synthetic", type=int, default=0, help="also add N synthetic random-shape images (with labels)")
    p.add_argument("--subject-from", choices=("stem", "parent"), default="stem",
                   help="subject id of folder/glob inputs: the file stem (default) or the parent folder name")
    p.add_argument("--pairs", nargs="+", choices=PAIR_KINDS, default=list(PAIR_KINDS), help="pair lists to store (default all)")
    p.add_argument("--max-inter-pairs", type=int, default=2000, help="random subset size of inter-subject pairs (default 2000)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="fraction of subjects held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the pair subset and the synthetic images")
    p.add_argument("--append", action="store_true", help="add to an existing file (same grid)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if not 0 <= args.val_fraction < 1:
            raise InputError(f"--val-fraction must be in [0, 1), got {args.val_fraction}.")
        print(build(args))
    except DeepSalRegError as exc:
        print(f"make_dataset.py: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
