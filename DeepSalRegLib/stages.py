"""The stages of ``register()``: prepare -> affine -> network -> refine -> export.

Each stage takes the ``WorkingPair`` (both images on one working grid, with where each counts) and the
field so far, and returns what the next stage needs. Fields follow ``warp.py`` (voxels of the working
grid, fixed -> moving, ``(1, nd, *S)``); ``export`` turns the field into physical results on the fixed
grid (``geometry.py``: LPS mm, ITK's fixed -> moving resampling convention).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from . import geometry
from .errors import InputError

__all__ = ["GridImage", "WorkingPair", "prepare", "align_affine", "apply_network", "refinement_start", "refine",
           "export", "physical_affine", "written_transform", "MIN_OVERLAP", "NETWORK_START_SIGMA"]

#: Least fraction of the fixed image that the moving image must cover in physical space (else: InputError).
MIN_OVERLAP = 0.01
#: Gaussian sigma (working-grid voxels) of the low-pass applied to the network's correction before the
#: refinement, by dimension: in 3D half a voxel of the refinement's coarsest level (1/8), so the network gives
#: the large-scale motion and the refinement the detail (``refinement_start``); in 2D none (sigma 4 measured on
#: the benchmark's and the wide 2D set in session 12: hands better, ANHIR worse, see NOTES).
NETWORK_START_SIGMA = {2: 0.0, 3: 4.0}


@dataclass
class GridImage:
    """One image on the working grid.

    Attributes:
        array: normalised intensities (``geometry.normalise_intensity``), float32 array ``S`` (array order).
        tensor: the same as ``(1, 1, *S)`` float32 on the registration's device.
        field_of_view: bool array ``S``: where the image has data.
        mask: bool array ``S``: where it counts (its field of view and the user's mask).
    """

    array: np.ndarray
    tensor: object
    field_of_view: np.ndarray
    mask: np.ndarray

    @property
    def mask_tensor(self):
        """``mask`` as a ``(1, 1, *S)`` float tensor, or None when it covers the whole grid (no masking: cheaper)."""
        return None if self.mask.all() else _tensor(self.mask, self.tensor.device)


@dataclass
class WorkingPair:
    """Fixed and moving on the working grid (``grid``: fixed extent, near-isotropic, multiple of the
    network's stride), as read from ``fixed_image`` / ``moving_image``."""

    grid: sitk.Image
    fixed: GridImage
    moving: GridImage
    fixed_image: sitk.Image
    moving_image: sitk.Image

    @property
    def ndim(self) -> int:
        return self.grid.GetDimension()


def _tensor(array, device):
    import torch

    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device)


def _rounded(values) -> list:
    return [round(float(v), 1) for v in values]


def prepare(fixed_image, moving_image, fixed_mask=None, moving_mask=None, *, multiple: int, max_voxels: int,
            spacing=None, device="cpu", memory_check: bool = True) -> WorkingPair:
    """Working grid, memory and overlap checks, resampling and intensity normalisation.

    Raises ``InputError`` when the two images (almost) do not overlap in physical space and
    ``MemoryLimitError`` when the estimated peak memory does not fit (``memory.check_memory``).
    """
    from .memory import check_memory

    grid = geometry.make_working_grid(fixed_image, multiple=multiple, max_voxels=max_voxels, spacing=spacing)
    natural = geometry.make_working_grid(fixed_image, multiple=multiple, spacing=spacing)
    if memory_check:  # before any full-resolution work
        check_memory(fixed_image.GetSize(), moving_image.GetSize(), int(np.prod(grid.GetSize())))
    if grid.GetSpacing()[0] > natural.GetSpacing()[0] * 1.001:
        warnings.warn(f"registering on a {grid.GetSpacing()[0]:.2f} mm working grid "
                      f"({'x'.join(map(str, grid.GetSize()))}) instead of the fixed image's "
                      f"{natural.GetSpacing()[0]:.2f} mm: the budget is {max_voxels} voxels (max_voxels); the warped "
                      f"image is written on the fixed image's grid")
    f_arr = sitk.GetArrayFromImage(geometry.resample_onto(fixed_image, grid))
    m_arr = sitk.GetArrayFromImage(geometry.resample_onto(moving_image, grid))
    inside_fixed = geometry.field_of_view(fixed_image, grid)
    inside_moving = geometry.field_of_view(moving_image, grid)
    shared = (inside_fixed & inside_moving).sum() / max(int(inside_fixed.sum()), 1)
    if shared < MIN_OVERLAP:
        raise InputError(
            f"The fixed and moving images {'do not overlap' if shared == 0 else 'hardly overlap'} in physical space "
            f"({100 * shared:.2g} % of the fixed image is inside the moving image): check their origins and "
            f"directions (fixed origin {_rounded(fixed_image.GetOrigin())}, moving origin "
            f"{_rounded(moving_image.GetOrigin())} mm, LPS), or place them roughly first (e.g. Slicer's Transforms).")
    # the similarity counts only where both images have data (and inside the user's masks): the working
    # grid's padding and the part of the grid the moving image does not cover are zeros, whose edges a
    # local NCC would otherwise align (ANHIR stain pairs of different sizes failed so)
    f_mask, m_mask = inside_fixed, inside_moving
    if fixed_mask is not None:
        f_mask = f_mask & (sitk.GetArrayFromImage(geometry.resample_onto(fixed_mask, grid, labels=True)) > 0)
    if moving_mask is not None:
        m_mask = m_mask & (sitk.GetArrayFromImage(geometry.resample_onto(moving_mask, grid, labels=True)) > 0)
    f_norm = geometry.normalise_intensity(f_arr, f_mask)
    m_norm = geometry.normalise_intensity(m_arr, m_mask)
    return WorkingPair(grid=grid, fixed=GridImage(f_norm, _tensor(f_norm, device), inside_fixed, f_mask),
                       moving=GridImage(m_norm, _tensor(m_norm, device), inside_moving, m_mask),
                       fixed_image=fixed_image, moving_image=moving_image)


def align_affine(pair: WorkingPair, tolerance: float | None, progress=None):
    """The affine pre-alignment (``affine.affine_align``) of the pair; its ``field`` starts the network."""
    from .affine import affine_align
    from .optimise import Convergence

    return affine_align(pair.fixed.tensor, pair.moving.tensor, fixed_mask=pair.fixed.mask_tensor,
                        moving_mask=pair.moving.mask_tensor,
                        convergence=Convergence(tolerance=tolerance) if tolerance else None, progress=progress)


def apply_network(pair: WorkingPair, net, start, start_is_identity: bool):
    """The network's field on the pair pre-aligned by ``start``, composed after it; returns ``(field, kept)``.

    The guard keeps the network's field only if it aligns better than ``start`` by the LNCC (window 7) it
    was trained to lower, over the fixed image's region (a pair unlike its training data must not be made
    worse); the comparison runs at half resolution above 2^18 voxels (8x cheaper in 3D, and a comparison
    needs no fine detail). ``kept`` is None without a network. ``start_is_identity``: ``start`` is the
    zero field (no affine stage), so the moving image goes in as it is.
    """
    import torch

    from .losses import lncc_similarity
    from .optimise import downsample
    from .warp import compose, resize_field, warp

    if net is None:
        return start, None
    f_t, m_t = pair.fixed.tensor, pair.moving.tensor
    m_mask_t = pair.moving.mask_tensor
    with torch.no_grad():
        m_in = m_t if start_is_identity else warp(m_t, start)
        # channels-last weights: the CPU convolutions run 20-25 % faster (128^3: 2.08 -> 1.59 s), same result
        net = net.to(memory_format=torch.channels_last if pair.ndim == 2 else torch.channels_last_3d)
        flow_net = net(f_t, m_in, warp_output=False)["flow"].contiguous()
        # the network's field after the start map (composing with a zero field is the field itself)
        candidate = flow_net if start_is_identity else compose(start, flow_net)
        factor = 2 if f_t[0, 0].numel() > 2 ** 18 else 1
        f_g, m_g = downsample(f_t, factor), downsample(m_t, factor)
        size = f_g.shape[2:]
        start_g, candidate_g = resize_field(start, size), resize_field(candidate, size)
        weight = downsample(_tensor(pair.fixed.mask, f_t.device), factor)
        if m_mask_t is not None:  # both on the same support: where both warped moving images have data
            m_mask_g = downsample(m_mask_t, factor)
            weight = weight * warp(m_mask_g, start_g) * warp(m_mask_g, candidate_g)
        loss_start = float(lncc_similarity(f_g, warp(m_g, start_g), weight, window=7))
        loss_net = float(lncc_similarity(f_g, warp(m_g, candidate_g), weight, window=7))
    kept = loss_net < loss_start
    if not kept:
        warnings.warn(f"the network's field did not improve the alignment (LNCC loss {loss_start:.4f} -> "
                      f"{loss_net:.4f}); continuing from the {'identity' if start_is_identity else 'affine'} alignment")
    return (candidate if kept else start), kept


def refinement_start(start, flow, sigma: float | None = None):
    """Where the refinement starts: ``start`` (the affine field) plus the network's correction ``flow - start``
    low-passed by a Gaussian of ``sigma`` working-grid voxels (default ``NETWORK_START_SIGMA`` of the
    dimension; ``start`` itself is kept exactly). Fields are ``(1, nd, *S)`` in working-grid voxels.

    The refinement regularises its own correction, not the total field, so the network's small-scale errors
    would stay in the result. Measured in session 12 (NOTES): from the unfiltered network field the 3D
    missing-correspondence study's unaltered pairs erred 0.34 mm (affine start 0.21, this start 0.21), while
    the benchmark's liver / brain / prostate stayed within noise of either start.
    """
    from .saliency import gaussian_smooth

    if sigma is None:
        sigma = NETWORK_START_SIGMA[flow.shape[1]]
    if sigma <= 0 or flow is start:
        return flow
    return start + gaussian_smooth(flow - start, sigma, padding="replicate")


def refine(pair: WorkingPair, flow, iterations, settings, use_jsm: bool, deadline=None, stats=None, progress=None):
    """Instance optimisation of ``flow`` (``optimise.instance_optimise``) with the quality preset's stop rule."""
    from .optimise import Convergence, instance_optimise

    return instance_optimise(
        pair.fixed.tensor, pair.moving.tensor, flow, iterations,
        fixed_mask=pair.fixed.mask_tensor, moving_mask=pair.moving.mask_tensor,
        use_jsm=use_jsm, velocity_factor=settings.velocity_factor,
        convergence=Convergence(max_steps=settings.max_steps, max_steps_finest=settings.max_steps_finest,
                                tolerance=settings.tolerance, deadline=deadline),
        stats=stats, progress=progress)


@dataclass
class Exported:
    """``export``'s results: physical images on the field's grid and working-grid arrays for the metrics."""

    displacement: sitk.Image
    transform: sitk.Transform
    warped: sitk.Image
    saliency: sitk.Image
    jacobian: sitk.Image
    confidence: sitk.Image
    field_grid: sitk.Image  # the grid of the written field and maps: the fixed image's, or the working grid
    determinant: np.ndarray  # Jacobian determinant of the written transform, on the field's grid
    fixed_region: np.ndarray  # where the fixed image counts (``pair.fixed.mask``), on the field's grid
    fixed_field_of_view: np.ndarray  # where the fixed image has data, on the field's grid
    displacement_mm: np.ndarray  # physical field on the working grid, (*S, nd)


def physical_affine(pre, grid: sitk.Image) -> sitk.AffineTransform:
    """The affine stage's map (``affine.AffineResult``, working-grid voxels) as an ITK ``AffineTransform``
    (LPS mm, fixed -> moving: ``p -> matrix (p - centre) + centre + translation``)."""
    values = geometry.voxel_affine_to_physical(pre.matrix.cpu().numpy(), pre.translation.cpu().numpy(), grid)
    nd = grid.GetDimension()
    transform = sitk.AffineTransform(nd)
    transform.SetMatrix(np.asarray(values["matrix"], dtype=float).ravel().tolist())
    transform.SetCenter(values["centre_mm"])
    transform.SetTranslation(values["translation_mm"])
    return transform


def written_transform(disp: sitk.Image, affine: sitk.AffineTransform | None) -> sitk.Transform:
    """The transform a result writes: ``p -> p + disp(p)`` on the field's grid.

    With an affine stage it is the composite ``A o D`` of the affine map ``A`` and the displacement field
    ``D(p) = A^-1(p + disp(p))`` (ITK applies a composite's last transform first): equal to ``disp`` on its
    grid and exactly ``A`` outside it, where a displacement field alone would be the identity. Without one
    (or an identity affine) it is the displacement field transform of ``disp``.
    """
    dense = geometry.displacement_transform(disp)
    if affine is None or (np.allclose(affine.GetMatrix(), np.eye(disp.GetDimension()).ravel())
                          and np.allclose(affine.GetTranslation(), 0)):
        return dense
    residual = sitk.TransformToDisplacementField(
        sitk.CompositeTransform([affine.GetInverse(), dense]), sitk.sitkVectorFloat64, disp.GetSize(),
        disp.GetOrigin(), disp.GetSpacing(), disp.GetDirection())
    del dense
    return sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(residual)])


def export(pair: WorkingPair, flow, use_jsm: bool, field_on_fixed_grid: bool, affine=None) -> Exported:
    """The working-grid field as physical results: the displacement (on the fixed grid, or on the working
    grid when ``field_on_fixed_grid`` is False: a fixed image much larger than the working grid), its ITK
    transform (``written_transform``: the composite of ``affine``, the affine stage's result, and a residual
    field), the warped moving image on the fixed grid, the JSM, the confidence map and the Jacobian
    determinant of the written field (ITK, physical derivatives), so that folding is reported for the
    transform a user applies, not for the working-grid field it was interpolated from."""
    import torch

    from .losses import confidence_weight
    from .optimise import JSM_ALPHA
    from .saliency import joint_saliency_map
    from .warp import warp

    grid = pair.grid
    f_t, m_t, m_mask_t = pair.fixed.tensor, pair.moving.tensor, pair.moving.mask_tensor
    with torch.no_grad():
        warped_t = warp(m_t, flow)  # only for the JSM: the written warped image is ``warped`` below
        # large volumes: the displayed JSM is computed at half resolution (8x cheaper in 3D: 0.86 s at 128^3)
        jsm_downsample = 2 if f_t[0, 0].numel() > 2 ** 20 else 1
        jsm = joint_saliency_map(f_t, warped_t, downsample=jsm_downsample)[0, 0].cpu().numpy()
        # the weight the refinement's similarity had (``instance_optimise``), inside both images
        if use_jsm:
            weight = confidence_weight(f_t, warped_t, JSM_ALPHA, jsm=torch.from_numpy(jsm)[None, None])[0, 0].cpu()
        else:
            weight = torch.ones(f_t.shape[2:])
        weight = weight * torch.from_numpy(pair.fixed.mask.astype(np.float32))
        if m_mask_t is not None:
            weight = weight * warp(m_mask_t, flow)[0, 0].cpu()
        weight = weight.numpy()
    d_work = geometry.voxel_field_to_physical(flow[0].cpu().numpy(), grid)
    field_grid = pair.fixed_image if field_on_fixed_grid else grid
    disp = geometry.resample_displacement(geometry.displacement_image(d_work, grid), field_grid)
    transform = written_transform(disp, None if affine is None else physical_affine(affine, grid))
    warped = geometry.resample_onto(pair.moving_image, pair.fixed_image, transform=transform)
    jacobian = sitk.Cast(sitk.DisplacementFieldJacobianDeterminant(disp), sitk.sitkFloat32)

    def mask_on_field_grid(mask):
        if field_grid is grid:
            return mask
        return sitk.GetArrayFromImage(geometry.resample_onto(_on_grid(mask, grid), field_grid, labels=True)) > 0

    # the maps follow the field: on the fixed grid, or on the working grid for a very large fixed image
    return Exported(displacement=disp, transform=transform, warped=warped,
                    saliency=geometry.resample_onto(_on_grid(jsm, grid), field_grid),
                    jacobian=jacobian, confidence=geometry.resample_onto(_on_grid(weight, grid), field_grid),
                    field_grid=field_grid,
                    determinant=sitk.GetArrayViewFromImage(jacobian), fixed_region=mask_on_field_grid(pair.fixed.mask),
                    fixed_field_of_view=mask_on_field_grid(pair.fixed.field_of_view), displacement_mm=d_work)


def _on_grid(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))
    image.CopyInformation(grid)
    return image
