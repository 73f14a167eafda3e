"""The HDF5 training-data format, pair sampling, augmentation and resumable sampling.

File layout (``FORMAT = "deepsalreg-dataset"``, ``VERSION = 1``); ``N`` images of one array shape ``S``::

    attrs:  format, version, ndim, shape (S, array order), spacing (mm, ITK x-y-z order), alignment
            ("centre": each image centred on its own grid; "physical": all on one grid), intensity (how
            images were normalised), history (the commands that wrote the file)
    images      (N, *S) float32 in [0, 1]   chunked one image per chunk, gzip, appendable (maxshape None)
    labels      (N, *S) int16               label map on the same grid (0 where the image has none)
    has_labels  (N,) bool
    origin      (N, nd) float64             per-image grid origin (mm, ITK order)
    direction   (N, nd*nd) float64          per-image grid direction (row-major, ITK)
    names       (N,) str                    source file of each image
    subjects    (N,) str                    subject id (intra-subject pairs share it)
    split       (N,) uint8                  0 = train, 1 = validation (whole subjects go to one side)
    landmarks/<i>   (K, nd) float64         physical LPS points of image i (only images that have them)
    pairs/intra, pairs/inter, pairs/atlas   (P, 2) int32 (fixed index, moving index), same split only

Every sample is a pure function of ``(seed, epoch, index)``: the sampler yields ``(epoch, index)`` tags and
the dataset seeds a private ``torch.Generator`` from them. That is what makes a killed run resume to the
same weights, whatever the number of data-loader workers or processes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from DeepSalRegLib.errors import InputError

from .synthetic import (
    DeformationSettings,
    IntensitySettings,
    OutlierSettings,
    augment_intensity,
    make_supervised_pair,
)

__all__ = [
    "FORMAT",
    "VERSION",
    "PAIR_KINDS",
    "RegistrationH5",
    "Augmentation",
    "SyntheticPairs",
    "RealPairs",
    "ResumableSampler",
    "FixedSampler",
    "sample_generator",
]

FORMAT = "deepsalreg-dataset"
VERSION = 1
PAIR_KINDS = ("intra", "inter", "atlas")
SPLITS = {"train": 0, "val": 1}


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator whose stream depends only on ``(seed, epoch, index)`` (``epoch = -1``: validation)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) + 1, int(index)]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class RegistrationH5:
    """Read access to one dataset file; opens lazily so that it can be handed to data-loader workers.

    Args:
        path: the ``.h5`` file written by ``training/make_dataset.py``.
    Raises:
        InputError: missing file, not a DeepSalReg dataset, or a newer format version.
    """

    def __init__(self, path):
        import h5py

        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise InputError(f"dataset {self.path} does not exist (build one with training/make_dataset.py).")
        try:
            with h5py.File(self.path, "r") as f:
                attrs = dict(f.attrs)
                if attrs.get("format") != FORMAT:
                    raise InputError(f"{self.path} is not a DeepSalReg dataset (no format={FORMAT!r} attribute).")
                if int(attrs.get("version", 0)) > VERSION:
                    raise InputError(f"{self.path} was written by a newer DeepSalReg (dataset version {attrs['version']}).")
                self.ndim = int(attrs["ndim"])
                self.shape = tuple(int(n) for n in attrs["shape"])
                self.spacing = tuple(float(s) for s in attrs["spacing"])
                self.count = int(f["images"].shape[0])
                self._split = f["split"][:].astype(np.uint8)
                self._has_labels = f["has_labels"][:].astype(bool)
                self._pairs = {k: f["pairs"][k][:].astype(np.int64) if k in f.get("pairs", {}) else np.zeros((0, 2), np.int64)
                               for k in PAIR_KINDS}
                self._landmark_keys = set(f["landmarks"].keys()) if "landmarks" in f else set()
        except InputError:
            raise
        except (OSError, KeyError) as exc:
            raise InputError(f"cannot read dataset {self.path}: {str(exc).splitlines()[0]}") from None
        self._file = None
        self._pid = None

    def _h5(self):
        import h5py

        if self._file is None or self._pid != os.getpid():  # one handle per (worker) process
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        """Close this process's file handle (reopened on the next read)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._pid = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, None
        return state

    def __len__(self) -> int:
        return self.count

    def indices(self, split: str | None = None) -> np.ndarray:
        """Image indices of a split (``"train"``, ``"val"``) or all of them (``None``)."""
        if split is None:
            return np.arange(self.count)
        return np.flatnonzero(self._split == SPLITS[split])

    def pairs(self, kind: str, split: str | None = None) -> np.ndarray:
        """``(P, 2)`` (fixed, moving) index pairs of a kind, restricted to a split."""
        if kind not in PAIR_KINDS:
            raise InputError(f"pair kind must be one of {', '.join(PAIR_KINDS)}, got {kind!r}.")
        pairs = self._pairs[kind]
        if split is not None and len(pairs):
            keep = (self._split[pairs[:, 0]] == SPLITS[split]) & (self._split[pairs[:, 1]] == SPLITS[split])
            pairs = pairs[keep]
        return pairs

    def has_labels(self, i: int) -> bool:
        return bool(self._has_labels[i])

    def image(self, i: int) -> torch.Tensor:
        """Image ``i`` as ``(1, *S)`` float32 in [0, 1]."""
        return torch.from_numpy(np.asarray(self._h5()["images"][i], dtype=np.float32)).unsqueeze(0)

    def labels(self, i: int) -> torch.Tensor:
        """Label map ``i`` as ``(1, *S)`` int16 (zeros when the image has none)."""
        return torch.from_numpy(np.asarray(self._h5()["labels"][i], dtype=np.int16)).unsqueeze(0)

    def landmarks(self, i: int) -> np.ndarray | None:
        """Physical LPS landmarks ``(K, nd)`` of image ``i`` or None."""
        key = f"{i:06d}"
        return self._h5()["landmarks"][key][:] if key in self._landmark_keys else None

    def name(self, i: int) -> str:
        value = self._h5()["names"][i]
        return value.decode() if isinstance(value, bytes) else str(value)

    def grid(self, i: int):
        """``sitk.Image`` (zeros) carrying image ``i``'s grid geometry."""
        import SimpleITK as sitk

        f = self._h5()
        grid = sitk.Image([int(n) for n in reversed(self.shape)], sitk.sitkFloat32)
        grid.SetSpacing(self.spacing)
        grid.SetOrigin([float(v) for v in f["origin"][i]])
        grid.SetDirection([float(v) for v in f["direction"][i]])
        return grid


@dataclass
class Augmentation:
    """Spatial and intensity augmentation shared by both training modes.

    Attributes:
        crop: array-order crop size (``None``: whole images); a crop larger than an image is clamped.
        flip: probability of flipping each axis (both images together; the ground truth follows).
        swap: probability of exchanging fixed and moving (real pairs only).
        intensity: independent gamma / bias / noise of each image (``None``: off).
    """

    crop: tuple | None = None
    flip: float = 0.0
    swap: float = 0.5
    intensity: IntensitySettings | None = None


def _crop_window(shape, crop, generator):
    if crop is None:
        return tuple(slice(None) for _ in shape)
    if len(crop) != len(shape):
        raise InputError(f"crop {tuple(crop)} has {len(crop)} axes but the images are {len(shape)}D.")
    window = []
    for n, c in zip(shape, crop):
        c = min(int(c), n)
        start = int(torch.randint(n - c + 1, (), generator=generator))
        window.append(slice(start, start + c))
    return tuple(window)


def _flip_axes(nd, probability, generator):
    if probability <= 0:
        return []
    draws = torch.rand(nd, generator=generator)
    return [axis for axis in range(nd) if draws[axis] < probability]


class _Files:
    """Several dataset files of one dimension, addressed as ``(file, index)``."""

    def __init__(self, paths):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        if not paths:
            raise InputError("no dataset given (set data.path to an .h5 file built by training/make_dataset.py).")
        self.files = [RegistrationH5(p) for p in paths]
        dims = {f.ndim for f in self.files}
        if len(dims) > 1:
            raise InputError(f"the datasets mix 2D and 3D images ({', '.join(str(f.path) for f in self.files)}).")
        self.ndim = dims.pop()

    def check_shapes(self, crop):
        shapes = {f.shape for f in self.files}
        if crop is None and len(shapes) > 1:
            raise InputError(f"the datasets hold images of different shapes {sorted(shapes)}; set data.crop to train on them together.")


class SyntheticPairs(Dataset):
    """Supervised pairs: random smooth deformations (and optional outliers) of single images.

    ``__getitem__((epoch, k))`` returns ``fixed``, ``moving`` ``(1, *C)``, ``flow`` ``(nd, *C)`` (ground
    truth, library convention), ``outlier`` ``(1, *C)``; ``C`` is the crop (or image) shape.

    Args:
        paths: one dataset file or a list.
        split: ``"train"`` or ``"val"``; ``None`` uses every image.
        length: samples per epoch (default: the number of images).
        deformation, outliers: see ``synthetic``.
        augmentation: crop, flips and intensity changes.
        seed: the run's seed.
    """

    def __init__(self, paths, split="train", length=None, deformation=DeformationSettings(),
                 outliers=OutlierSettings(), augmentation=Augmentation(), seed=0):
        self.data = _Files(paths)
        self.data.check_shapes(augmentation.crop)
        self.items = [(fi, int(i)) for fi, f in enumerate(self.data.files) for i in f.indices(split)]
        if not self.items:
            raise InputError(f"the dataset has no {split} images" + (" (build it with --val-fraction > 0)" if split == "val" else "") + ".")
        self.length = int(length or len(self.items))
        self.deformation, self.outliers, self.augmentation, self.seed = deformation, outliers, augmentation, seed
        self.ndim = self.data.ndim

    def __len__(self):
        return self.length

    def __getitem__(self, tag):
        epoch, k = tag
        g = sample_generator(self.seed, epoch, k)
        fi, i = self.items[k % len(self.items)]
        source = self.data.files[fi].image(i)
        window = (slice(None),) + _crop_window(source.shape[1:], self.augmentation.crop, g)
        source = source[window]
        flips = [a + 1 for a in _flip_axes(self.ndim, self.augmentation.flip, g)]
        if flips:
            source = source.flip(flips)
        pair = make_supervised_pair(source.contiguous(), g, self.deformation, self.outliers, self.augmentation.intensity)
        return {k: v.contiguous() for k, v in pair.items()}


class RealPairs(Dataset):
    """Unsupervised pairs of real images listed in the file (``pairs/<kind>``).

    ``__getitem__((epoch, k))`` returns ``fixed``, ``moving`` ``(1, *C)`` and, when both images have label
    maps, ``fixed_labels``/``moving_labels`` (int16) with ``has_labels`` True (zeros and False otherwise).

    Args:
        paths: one dataset file or a list.
        kind: ``"intra"``, ``"inter"`` or ``"atlas"`` (or a list of kinds).
        split: ``"train"`` or ``"val"``.
        length: samples per epoch (default: the number of pairs).
        augmentation: crop, flips, swap and intensity changes.
        seed: the run's seed.
    """

    def __init__(self, paths, kind="inter", split="train", length=None, augmentation=Augmentation(), seed=0):
        self.data = _Files(paths)
        self.data.check_shapes(augmentation.crop)
        kinds = [kind] if isinstance(kind, str) else list(kind)
        self.items = [(fi, int(a), int(b)) for fi, f in enumerate(self.data.files)
                      for k in kinds for a, b in f.pairs(k, split)]
        if not self.items:
            raise InputError(f"the dataset has no {'/'.join(kinds)} pairs in its {split} split "
                             "(check make_dataset's --pairs and --val-fraction).")
        self.length = int(length or len(self.items))
        self.augmentation, self.seed, self.ndim = augmentation, seed, self.data.ndim

    def __len__(self):
        return self.length

    def __getitem__(self, tag):
        epoch, k = tag
        g = sample_generator(self.seed, epoch, k)
        fi, a, b = self.items[k % len(self.items)]
        f = self.data.files[fi]
        if self.augmentation.swap and torch.rand((), generator=g) < self.augmentation.swap:
            a, b = b, a
        fixed, moving = f.image(a), f.image(b)
        labelled = f.has_labels(a) and f.has_labels(b)
        fl = f.labels(a) if labelled else torch.zeros(fixed.shape, dtype=torch.int16)
        ml = f.labels(b) if labelled else torch.zeros(fixed.shape, dtype=torch.int16)
        window = (slice(None),) + _crop_window(fixed.shape[1:], self.augmentation.crop, g)
        flips = [ax + 1 for ax in _flip_axes(self.ndim, self.augmentation.flip, g)]
        out = {}
        for name, t in (("fixed", fixed), ("moving", moving), ("fixed_labels", fl), ("moving_labels", ml)):
            t = t[window]
            out[name] = (t.flip(flips) if flips else t).contiguous()
        if self.augmentation.intensity is not None:
            out["fixed"] = augment_intensity(out["fixed"], g, self.augmentation.intensity)
            out["moving"] = augment_intensity(out["moving"], g, self.augmentation.intensity)
        out["has_labels"] = torch.tensor(labelled)
        return out


class ResumableSampler(Sampler):
    """This rank's share of one epoch's shuffled order, as ``(epoch, index)`` tags, from batch ``start`` on.

    The order is ``torch.utils.data.DistributedSampler``'s (seeded by ``seed + epoch``, ``drop_last``), so
    every rank sees a disjoint part; skipping ``start * batch_size`` tags resumes mid-epoch exactly.
    """

    def __init__(self, dataset, batch_size, epoch, start=0, seed=0, rank=0, world_size=1, shuffle=True):
        base = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        base.set_epoch(epoch)
        order = list(base)
        usable = len(order) // batch_size * batch_size
        self.epoch = epoch
        self.tags = [(epoch, int(i)) for i in order[start * batch_size:usable]]
        self.batches = usable // batch_size

    def __iter__(self):
        return iter(self.tags)

    def __len__(self):
        return len(self.tags)


class FixedSampler(Sampler):
    """Validation tags ``(-1, k)`` for ``k < count``: the same samples every time."""

    def __init__(self, count):
        self.tags = [(-1, k) for k in range(int(count))]

    def __iter__(self):
        return iter(self.tags)

    def __len__(self):
        return len(self.tags)


class DatasetWriter:
    """Creates or appends to a dataset file (used by ``make_dataset.py``; the layout is the module docstring's).

    Args:
        path: the ``.h5`` file.
        ndim, shape, spacing, alignment: the common grid (checked against an existing file when appending).
        append: add to an existing file instead of creating a new one (a new file is written under a
            temporary name and renamed into place by ``close``).
    Raises:
        InputError: appending to a file whose grid, dimension or alignment differs.
    """

    def __init__(self, path, ndim, shape, spacing, alignment, append=False, command=""):
        import h5py

        self.path = Path(path)
        self.ndim, self.shape = int(ndim), tuple(int(n) for n in shape)
        self.spacing = tuple(float(s) for s in spacing)
        if append:
            existing = RegistrationH5(self.path)
            if existing.ndim != self.ndim:
                raise InputError(f"cannot append {self.ndim}D images to the {existing.ndim}D dataset {self.path}.")
            if existing.shape != self.shape or not np.allclose(existing.spacing, self.spacing, rtol=1e-5):
                raise InputError(f"cannot append: {self.path} has grid {existing.shape} at {existing.spacing} mm, "
                                 f"the new images would be {self.shape} at {self.spacing} mm.")
            self._target = self.path
            self.f = h5py.File(self.path, "a")
            built = str(self.f.attrs["alignment"])
            if built != alignment:
                self.f.close()
                raise InputError(f"cannot append with --align {alignment}: {self.path} was built with --align {built}.")
        else:
            self._target = self.path
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            self.f = h5py.File(self._tmp, "w")
            f = self.f
            f.attrs.update(format=FORMAT, version=VERSION, ndim=self.ndim, shape=list(self.shape),
                           spacing=list(self.spacing), alignment=alignment,
                           intensity="resampled linearly, then percentiles 0.5..99.5 (inside the image) -> 0..1, clipped")
            chunk = (1, *self.shape)
            f.create_dataset("images", (0, *self.shape), "f4", maxshape=(None, *self.shape), chunks=chunk,
                             compression="gzip", compression_opts=4, shuffle=True)
            f.create_dataset("labels", (0, *self.shape), "i2", maxshape=(None, *self.shape), chunks=chunk,
                             compression="gzip", compression_opts=4, shuffle=True)
            for name, dtype, extra in (("has_labels", "?", ()), ("origin", "f8", (self.ndim,)),
                                       ("direction", "f8", (self.ndim * self.ndim,)), ("split", "u1", ())):
                f.create_dataset(name, (0, *extra), dtype, maxshape=(None, *extra))
            for name in ("names", "subjects"):
                f.create_dataset(name, (0,), h5py.string_dtype(), maxshape=(None,))
            f.create_group("landmarks")
            f.create_group("pairs")
        history = list(self.f.attrs.get("history", []))
        self.f.attrs["history"] = history + [command]
        self.existing = int(self.f["images"].shape[0])

    @property
    def count(self) -> int:
        return int(self.f["images"].shape[0])

    def subjects(self) -> list[str]:
        return [s.decode() if isinstance(s, bytes) else str(s) for s in self.f["subjects"][:]]

    def splits(self) -> np.ndarray:
        return self.f["split"][:]

    def add(self, image: np.ndarray, origin, direction, name: str, subject: str, split: int,
            labels: np.ndarray | None = None, landmarks: np.ndarray | None = None) -> int:
        """Append one image (``S`` float32 in [0, 1]) with its grid geometry; returns its index."""
        if tuple(image.shape) != self.shape:
            raise InputError(f"{name}: resampled shape {image.shape} differs from the dataset's {self.shape}.")
        i = self.count
        f = self.f
        for key in ("images", "labels", "has_labels", "origin", "direction", "split", "names", "subjects"):
            f[key].resize(i + 1, axis=0)
        f["images"][i] = image.astype(np.float32)
        f["labels"][i] = labels.astype(np.int16) if labels is not None else 0
        f["has_labels"][i] = labels is not None
        f["origin"][i] = np.asarray(origin, dtype=np.float64)
        f["direction"][i] = np.asarray(direction, dtype=np.float64).ravel()
        f["split"][i] = split
        f["names"][i] = name
        f["subjects"][i] = subject
        if landmarks is not None:
            f["landmarks"].create_dataset(f"{i:06d}", data=np.asarray(landmarks, dtype=np.float64))
        return i

    def set_pairs(self, kind: str, pairs) -> None:
        pairs = np.asarray(pairs, dtype=np.int32).reshape(-1, 2)
        group = self.f["pairs"]
        if kind in group:
            del group[kind]
        group.create_dataset(kind, data=pairs)

    def pairs(self, kind: str) -> np.ndarray:
        group = self.f["pairs"]
        return group[kind][:] if kind in group else np.zeros((0, 2), np.int32)

    def close(self, keep: bool = True) -> None:
        self.f.close()
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            if keep:
                os.replace(tmp, self._target)
            else:
                Path(tmp).unlink(missing_ok=True)
