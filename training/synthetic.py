"""Synthetic training pairs with known ground truth: random smooth deformations, outliers, synthetic images.

Every field here follows the library convention (``DeepSalRegLib/warp.py``): shape ``(nd, *S)``, voxels of
the fixed grid, channel ``i`` along array axis ``i``, mapping fixed to moving, ``W(x) = M(x + u(x))``.

A supervised pair is built from one source image ``I`` (the moving image) and a random field ``u``:
``fixed = I(x + u(x))``. Then ``u`` is *exactly* the field a registration of (fixed, moving) should find,
with no inversion needed. A synthetic outlier (the thesis's missing-correspondence case: a tumour in one
image, a resection cavity in the other) is a soft ellipsoid inserted into, or a structure removed from,
only one of the two images; the motion around it is unchanged, so ``u`` stays the ground truth.

All randomness comes from a ``torch.Generator`` passed in, so a sample is a pure function of its seed
(which is what makes training resumable and independent of the number of data-loader workers).
Images are ``(1, *S)`` float tensors with intensities in [0, 1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from DeepSalRegLib.saliency import gaussian_smooth
from DeepSalRegLib.warp import integrate_velocity, resize_field, warp

__all__ = [
    "DeformationSettings",
    "OutlierSettings",
    "IntensitySettings",
    "random_smooth_field",
    "random_affine_field",
    "insert_outlier",
    "augment_intensity",
    "random_shapes_image",
    "make_supervised_pair",
]


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand((), generator=generator))


@dataclass
class DeformationSettings:
    """How large and how smooth the random deformations are.

    Attributes:
        max_displacement: largest displacement of the smooth part, in voxels (the amplitude of each
            sample is drawn uniformly in ``[0, max_displacement]``).
        control_points: coarse-grid sizes of the random velocity components (one per scale); fewer
            points give smoother, more global motion.
        diffeomorphic: integrate the random velocity by scaling and squaring, so the ground truth never
            folds.
        rotation_deg, scale, translation: random affine part (degrees, relative scale, voxels).
    """

    max_displacement: float = 8.0
    control_points: tuple = (4, 8)
    diffeomorphic: bool = True
    rotation_deg: float = 5.0
    scale: float = 0.05
    translation: float = 4.0


@dataclass
class OutlierSettings:
    """Synthetic missing correspondences.

    Attributes:
        probability: chance that a pair gets one outlier.
        radius: range of the ellipsoid semi-axes as fractions of the image size.
        kinds: ``"insert"`` (a blob of new intensity: a lesion present in one image only) and/or
            ``"remove"`` (a region flattened or emptied: a resection cavity / a structure missing).
    """

    probability: float = 0.0
    radius: tuple = (0.05, 0.15)
    kinds: tuple = ("insert", "remove")


@dataclass
class IntensitySettings:
    """Independent intensity changes of each image (robustness to contrast and noise)."""

    gamma: tuple = (0.7, 1.4)
    noise: float = 0.02
    bias: float = 0.15


def random_affine_field(shape, settings: DeformationSettings, generator: torch.Generator) -> torch.Tensor:
    """Random small affine motion about the image centre as a ``(nd, *S)`` voxel field."""
    nd = len(shape)
    centre = torch.tensor([(n - 1) / 2.0 for n in shape]).view(nd, *([1] * nd))
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0) - centre
    angle = lambda: math.radians(_uniform(generator, -settings.rotation_deg, settings.rotation_deg))  # noqa: E731
    if nd == 2:
        a = angle()
        matrix = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    else:
        matrix = torch.eye(3)
        for i, j in ((0, 1), (0, 2), (1, 2)):
            a = angle()
            r = torch.eye(3)
            r[i, i] = r[j, j] = math.cos(a)
            r[i, j], r[j, i] = -math.sin(a), math.sin(a)
            matrix = r @ matrix
    scales = torch.tensor([1.0 + _uniform(generator, -settings.scale, settings.scale) for _ in range(nd)])
    matrix = matrix @ torch.diag(scales)
    shift = torch.tensor([_uniform(generator, -settings.translation, settings.translation) for _ in range(nd)])
    moved = torch.einsum("ij,j...->i...", matrix, grid) + shift.view(nd, *([1] * nd))
    return moved - grid


def random_smooth_field(shape, settings: DeformationSettings, generator: torch.Generator) -> torch.Tensor:
    """Random smooth (optionally diffeomorphic) deformation plus a small affine part: ``(nd, *S)`` voxels.

    The smooth part is built, and integrated, on a grid 4x coarser than ``shape`` (it has no detail finer
    than that anyway) and then resized with ``resize_field``, which rescales the voxel magnitudes.
    """
    shape = tuple(int(n) for n in shape)
    nd = len(shape)
    mode = "bilinear" if nd == 2 else "trilinear"
    small = tuple(max(8, n // 4) for n in shape)
    velocity = torch.zeros(1, nd, *small)
    amplitude = _uniform(generator, 0.0, settings.max_displacement)
    for level, points in enumerate(settings.control_points):
        coarse = torch.randn(1, nd, *[int(points)] * nd, generator=generator)
        component = F.interpolate(coarse, size=small, mode=mode, align_corners=True)
        # the linear interpolation leaves creases at the control points: smooth them away
        component = gaussian_smooth(component, 0.25 * min(small) / max(int(points) - 1, 1), "replicate")
        peak = component.abs().amax().clamp_min(1e-6)
        velocity = velocity + component / peak * amplitude / (2 ** level)
    # amplitudes are in full-resolution voxels: express them in coarse voxels before integrating
    to_small = torch.tensor([(m - 1) / max(n - 1, 1) for m, n in zip(small, shape)]).view(1, nd, *([1] * nd))
    velocity = velocity * to_small
    smooth = integrate_velocity(velocity, 7) if settings.diffeomorphic else velocity
    smooth = resize_field(smooth, shape)
    return smooth[0] + random_affine_field(shape, settings, generator)


def _ellipsoid(shape, generator, settings: OutlierSettings, image: torch.Tensor) -> torch.Tensor:
    """Soft ellipsoid mask ``(1, *S)`` centred inside the image's bright (foreground) voxels."""
    nd = len(shape)
    foreground = (image[0] > 0.2 * image.max()).nonzero()
    if len(foreground):
        centre = foreground[int(torch.randint(len(foreground), (), generator=generator))].float()
    else:
        centre = torch.tensor([_uniform(generator, 0, n - 1) for n in shape])
    radii = torch.tensor([max(1.5, _uniform(generator, *settings.radius) * n) for n in shape])
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)
    r = torch.sqrt((((grid - centre.view(nd, *([1] * nd))) / radii.view(nd, *([1] * nd))) ** 2).sum(0))
    return torch.sigmoid((1.0 - r) * radii.mean() / 1.0).unsqueeze(0)  # ~1 voxel soft edge


def insert_outlier(image: torch.Tensor, generator: torch.Generator, settings: OutlierSettings,
                   kind: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Add one missing-correspondence outlier to ``image`` ``(1, *S)``; returns ``(new image, soft mask)``.

    * ``"insert"``: a blob whose intensity contrasts with its surroundings (a lesion).
    * ``"remove"``: the region is flattened to its mean or emptied to 0 (a structure removed, a cavity).
    """
    kinds = tuple(settings.kinds)
    if kind is None:
        kind = kinds[int(torch.randint(len(kinds), (), generator=generator))]
    if kind not in ("insert", "remove"):
        raise ValueError(f"outlier kind must be 'insert' or 'remove', got {kind!r}")
    mask = _ellipsoid(image.shape[1:], generator, settings, image)
    inside = (mask * image).sum() / mask.sum().clamp_min(1e-6)
    if kind == "insert":
        value = _uniform(generator, 0.0, 1.0)
        if abs(value - float(inside)) < 0.3:
            value = float(inside) + 0.5 if float(inside) < 0.5 else float(inside) - 0.5
        fill = torch.full_like(image, value)
    else:
        fill = torch.full_like(image, float(inside) if torch.rand((), generator=generator) < 0.5 else 0.0)
    return image * (1 - mask) + fill * mask, mask


def augment_intensity(image: torch.Tensor, generator: torch.Generator, settings: IntensitySettings) -> torch.Tensor:
    """Random gamma, smooth multiplicative bias and Gaussian noise of a [0, 1] image ``(1, *S)``; clipped to [0, 1]."""
    shape = image.shape[1:]
    nd = len(shape)
    out = image.clamp(0, 1) ** _uniform(generator, *settings.gamma)
    if settings.bias:
        coarse = torch.randn(1, 1, *[3] * nd, generator=generator) * settings.bias
        bias = F.interpolate(coarse, size=shape, mode="bilinear" if nd == 2 else "trilinear", align_corners=True)
        out = out * torch.exp(bias[0])
    if settings.noise:
        sigma = _uniform(generator, 0.0, settings.noise)
        out = out + sigma * torch.randn(image.shape, generator=generator)
    return out.clamp(0, 1)


def random_shapes_image(shape, generator: torch.Generator, labels=(4, 12)) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic image made of random smooth shapes (SynthMorph-style): ``(image (1,*S), label map (1,*S) int)``.

    A label map is the arg-max of ``K`` smoothed noise volumes; each label gets a random intensity, then
    the image is blurred slightly and given a little noise. Carries no licence restriction.
    """
    shape = tuple(int(n) for n in shape)
    nd = len(shape)
    k = int(torch.randint(labels[0], labels[1] + 1, (), generator=generator))
    # smooth noise made at 1/4 resolution and upsampled: the same shapes at a fraction of the cost
    small = tuple(max(4, n // 4) for n in shape)
    noise = torch.randn(1, k, *small, generator=generator)
    noise = gaussian_smooth(noise, _uniform(generator, 0.05, 0.12) * min(small), "replicate")
    noise = F.interpolate(noise, size=shape, mode="bilinear" if nd == 2 else "trilinear", align_corners=True)
    label_map = noise.argmax(dim=1)  # (1, *S)
    intensities = torch.rand(k, generator=generator)
    image = intensities[label_map].float()
    image = gaussian_smooth(image.unsqueeze(0), _uniform(generator, 0.3, 1.2), "replicate")[0]
    image = image + 0.02 * torch.randn(image.shape, generator=generator)
    lo, hi = image.amin(), image.amax()
    image = (image - lo) / (hi - lo).clamp_min(1e-6)
    return image.clamp(0, 1), label_map.to(torch.int16)


def make_supervised_pair(source: torch.Tensor, generator: torch.Generator,
                         deformation: DeformationSettings = DeformationSettings(),
                         outliers: OutlierSettings = OutlierSettings(),
                         intensity: IntensitySettings | None = IntensitySettings(),
                         labels: torch.Tensor | None = None) -> dict:
    """One training pair with a known field from a source image ``(1, *S)`` in [0, 1].

    Returns a dict of tensors: ``fixed``, ``moving`` ``(1, *S)``; ``flow`` ``(nd, *S)`` (ground truth,
    library convention); ``outlier`` ``(1, *S)`` soft mask of the outlier on the fixed grid (zeros if
    none); with ``labels``, ``fixed_labels`` and ``moving_labels`` ``(1, *S)`` int.
    """
    shape = source.shape[1:]
    flow = random_smooth_field(shape, deformation, generator)
    moving = source
    fixed = warp(source.unsqueeze(0), flow.unsqueeze(0))[0]
    outlier = torch.zeros_like(source)
    if outliers.probability > 0 and torch.rand((), generator=generator) < outliers.probability:
        if torch.rand((), generator=generator) < 0.5:
            fixed, outlier = insert_outlier(fixed, generator, outliers)
        else:
            moving, mask = insert_outlier(moving, generator, outliers)
            outlier = warp(mask.unsqueeze(0), flow.unsqueeze(0))[0]  # where it lands on the fixed grid
    if intensity is not None:
        fixed = augment_intensity(fixed, generator, intensity)
        moving = augment_intensity(moving, generator, intensity)
    out = dict(fixed=fixed, moving=moving, flow=flow, outlier=outlier)
    if labels is not None:
        out["moving_labels"] = labels
        out["fixed_labels"] = warp(labels.unsqueeze(0).float(), flow.unsqueeze(0), mode="nearest")[0].to(labels.dtype)
    return out
