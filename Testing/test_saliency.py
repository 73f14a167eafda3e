"""The joint saliency map (DeepSalRegLib.saliency) against its definition and the properties it must have."""
import itertools
import math

import pytest
import torch

from DeepSalRegLib.saliency import (THESIS_OPTIONS, deviatoric_features, joint_saliency_map, local_saliency,
                                    structure_tensor)


def _blobs(shape, centres, radius, seed=0):
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    img = torch.zeros(shape, dtype=torch.float64)
    for c in centres:
        r2 = sum((g - ci) ** 2 for g, ci in zip(grids, c))
        img = img + (r2 < radius ** 2).double()
    return img.view(1, 1, *shape)


def _square(shape, lo, hi):
    img = torch.zeros(1, 1, *shape, dtype=torch.float64)
    img[(slice(None), slice(None)) + tuple(slice(lo, hi) for _ in shape)] = 1.0
    return img


# ---------- an independent, naive implementation of the thesis definition (full tensors, index clamping)

def _full_tensor(unique, nd):
    b, s = unique.shape[0], unique.shape[2:]
    t = torch.zeros(b, nd, nd, *s, dtype=unique.dtype)
    for i in range(nd):
        t[:, i, i] = unique[:, i]
    k = nd
    for i, j in itertools.combinations(range(nd), 2):
        t[:, i, j] = t[:, j, i] = unique[:, k]
        k += 1
    return t


def _naive_distance(a, b, nd, mode):
    d = a - b
    tr2 = (d * d).sum(dim=(1, 2))
    tr = sum(d[:, i, i] for i in range(nd))
    k, c = (3, 8 * math.pi / 15) if mode == "thesis" else (nd, 8 * math.pi / 15 if nd == 3 else math.pi / 2)
    return torch.sqrt(torch.clamp(c * (tr2 - tr ** 2 / k), min=0) + 1e-9) - math.sqrt(1e-9)


def _naive_saliency(img, nd, mode, connectivity):
    t = _full_tensor(structure_tensor(img, 1.0), nd)
    shape = img.shape[2:]
    offsets = [o for o in itertools.product((-1, 0, 1), repeat=nd) if any(o)]
    if connectivity == "face":
        offsets = [o for o in offsets if sum(map(abs, o)) == 1]
    total = 0
    for o in offsets:
        tn = t
        for axis, (n, step) in enumerate(zip(shape, o)):
            tn = tn.index_select(3 + axis, torch.clamp(torch.arange(n) + step, 0, n - 1))
        total = total + _naive_distance(t, tn, nd, mode)
    return (total / (len(offsets) + 1)).unsqueeze(1)


@pytest.mark.parametrize("nd,shape", [(2, (2, 1, 13, 17)), (3, (1, 1, 7, 9, 8))])
@pytest.mark.parametrize("mode", ["exact", "thesis"])
@pytest.mark.parametrize("connectivity", ["full", "face"])
def test_local_saliency_matches_naive_definition(nd, shape, mode, connectivity):
    img = torch.rand(shape, dtype=torch.float64)
    fast = local_saliency(deviatoric_features(structure_tensor(img, 1.0), nd, mode), connectivity)
    assert torch.allclose(fast, _naive_saliency(img, nd, mode, connectivity), atol=1e-12)


@pytest.mark.parametrize("nd", [2, 3])
def test_tensor_distance_is_rotation_invariant(nd):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(nd, nd, dtype=torch.float64, generator=g)
    b = torch.randn(nd, nd, dtype=torch.float64, generator=g)
    a, b = a @ a.T, b @ b.T
    q, _ = torch.linalg.qr(torch.randn(nd, nd, dtype=torch.float64, generator=g))

    def unique(m):
        vals = [m[i, i] for i in range(nd)] + [m[i, j] for i, j in itertools.combinations(range(nd), 2)]
        return torch.stack(vals).view(1, -1, *([1] * nd))

    for mode in ("exact", "thesis"):
        d0 = (deviatoric_features(unique(a), nd, mode) - deviatoric_features(unique(b), nd, mode)).norm()
        d1 = (deviatoric_features(unique(q @ a @ q.T), nd, mode) - deviatoric_features(unique(q @ b @ q.T), nd, mode)).norm()
        assert d0 > 0.1 and torch.isclose(d0, d1, rtol=1e-10)
        if mode == "thesis" and nd == 2:
            continue  # the thesis's 3D constants in 2D are not deviatoric in the plane (documented)
        # adding an isotropic part changes nothing: the distance is deviatoric
        d2 = (deviatoric_features(unique(a + 3 * torch.eye(nd, dtype=torch.float64)), nd, mode)
              - deviatoric_features(unique(b), nd, mode)).norm()
        assert torch.isclose(d0, d2, rtol=1e-10)


@pytest.mark.parametrize("shape", [(1, 1, 40, 44), (1, 1, 20, 22, 18)])
def test_range_flat_and_symmetry(shape):
    a = torch.rand(shape, dtype=torch.float64)
    b = a + 0.3 * torch.rand(shape, dtype=torch.float64)
    jsm = joint_saliency_map(a, b)
    assert jsm.shape == shape
    assert jsm.min() >= 0 and jsm.max() <= 1 and jsm.max() > 0.99
    assert torch.allclose(jsm, joint_saliency_map(b, a), atol=1e-12)
    flat = torch.full(shape, 0.7, dtype=torch.float64)
    assert joint_saliency_map(flat, b).abs().max() < 1e-6
    assert joint_saliency_map(a, flat).abs().max() < 1e-6


def test_invariant_to_rotating_both_images():
    smooth = torch.nn.functional.avg_pool2d
    a = smooth(_blobs((64, 64), [(20, 26), (40, 42)], 9), 5, 1, 2)
    b = smooth(_blobs((64, 64), [(21, 27), (40, 40)], 9), 5, 1, 2)
    jsm = joint_saliency_map(a, b)
    # transposition maps forward differences to forward differences: exact
    assert torch.allclose(joint_saliency_map(a.transpose(2, 3), b.transpose(2, 3)), jsm.transpose(2, 3), atol=1e-10)
    # 90 degree rotation flips one axis, which turns forward into backward differences: equal up to a voxel shift
    rotated = joint_saliency_map(torch.rot90(a, 1, (2, 3)), torch.rot90(b, 1, (2, 3)))
    back = torch.rot90(rotated, -1, (2, 3))
    corr = torch.corrcoef(torch.stack([back.flatten(), jsm.flatten()]))[0, 1]
    assert corr > 0.9
    # 3D: any permutation of axes is exact
    c = _blobs((16, 18, 20), [(8, 9, 10)], 5)
    d = _blobs((16, 18, 20), [(8, 10, 10)], 5)
    j3 = joint_saliency_map(c, d)
    perm = (0, 1, 4, 2, 3)
    assert torch.allclose(joint_saliency_map(c.permute(perm), d.permute(perm)), j3.permute(perm), atol=1e-10)


def test_missing_structure_has_no_joint_saliency():
    """A circle only in the fixed image, a square in both: JSM ~0 on the circle, clearly > 0 on the square."""
    shape = (64, 64)
    square = torch.zeros(1, 1, *shape, dtype=torch.float64)
    square[..., 10:26, 10:26] = 1.0
    circle = _blobs(shape, [(44, 44)], 8)
    fixed, warped = square + circle, square.clone()
    for options in ({}, THESIS_OPTIONS):
        jsm = joint_saliency_map(fixed, warped, **options)
        ring = _blobs(shape, [(44, 44)], 10) - _blobs(shape, [(44, 44)], 6)
        edge = _square(shape, 8, 28)[0] - _square(shape, 12, 24)[0]
        on_circle = jsm[ring.bool()].mean()
        on_square = jsm[edge.unsqueeze(0).bool()].mean()
        assert on_circle < 0.02, options
        assert on_square > 0.3, options


def test_misalignment_lowers_joint_saliency():
    fixed = _square((64, 64), 20, 44)
    aligned = joint_saliency_map(fixed, fixed.clone())
    shifted = torch.roll(fixed, 4, dims=3)
    edge = (_square((64, 64), 18, 46) - _square((64, 64), 22, 42)).bool()
    assert joint_saliency_map(fixed, shifted)[edge].mean() < aligned[edge].mean()


def test_gradcheck_2d_and_3d():
    for shape in [(1, 1, 10, 10), (1, 1, 6, 6, 6)]:
        fixed = torch.rand(shape, dtype=torch.float64)
        warped = torch.rand(shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda w: joint_saliency_map(fixed, w), (warped,))
        assert torch.autograd.gradcheck(lambda w: joint_saliency_map(fixed, w, softmin_tau=0.05), (warped,))


def test_sample_normalisation_does_not_depend_on_the_batch():
    a, b = torch.rand(1, 1, 24, 24), torch.rand(1, 1, 24, 24)
    c, d = 5 * torch.rand(1, 1, 24, 24), torch.rand(1, 1, 24, 24)
    alone = joint_saliency_map(a, b)
    together = joint_saliency_map(torch.cat([a, c]), torch.cat([b, d]))
    assert torch.allclose(alone, together[:1], atol=1e-6)
    thesis_together = joint_saliency_map(torch.cat([a, c]), torch.cat([b, d]), normalisation="batch")
    assert not torch.allclose(joint_saliency_map(a, b, normalisation="batch"), thesis_together[:1], atol=1e-3)


def test_bad_options_are_refused():
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError):
        joint_saliency_map(x, x, connectivity="diagonal")
    with pytest.raises(ValueError):
        joint_saliency_map(x, x, distance="euclid")
    with pytest.raises(ValueError):
        joint_saliency_map(x, torch.rand(1, 1, 8, 9))


def test_downsampled_jsm_approximates_the_full_one_in_3d():
    smooth = torch.nn.functional.avg_pool3d
    a = smooth(_blobs((32, 32, 32), [(12, 12, 14), (20, 22, 18)], 7), 3, 1, 1)
    b = smooth(_blobs((32, 32, 32), [(12, 13, 14), (20, 21, 18)], 7), 3, 1, 1)
    full = joint_saliency_map(a, b, sigma=2.0)
    half = joint_saliency_map(a, b, sigma=1.0, downsample=2)
    assert half.shape == full.shape and half.min() >= 0 and half.max() <= 1
    corr = torch.corrcoef(torch.stack([half.flatten(), full.flatten()]))[0, 1]
    assert corr > 0.8


@pytest.mark.parametrize("sigma", [1.0, 1.6])
def test_slab_by_slab_3d_map_equals_the_whole_volume_map(monkeypatch, sigma):
    """Large volumes are computed in slabs with a halo (cache-friendly); values and gradients must not change."""
    import DeepSalRegLib.saliency as saliency

    torch.manual_seed(3)
    fixed = torch.rand(1, 1, 37, 12, 10, dtype=torch.float64, requires_grad=True)
    warped = torch.rand(1, 1, 37, 12, 10, dtype=torch.float64, requires_grad=True)
    whole = joint_saliency_map(fixed, warped, sigma=sigma)
    (grad_whole,) = torch.autograd.grad((whole * torch.linspace(0, 1, whole.numel()).view_as(whole)).sum(), fixed)
    monkeypatch.setattr(saliency, "_SLAB_VOXELS", 8 * 12 * 10 // 2)  # slabs of 8 slices: 5 slabs, 4 seams
    calls = []
    original = saliency._unnormalised_maps
    monkeypatch.setattr(saliency, "_unnormalised_maps", lambda *a, **k: calls.append(1) or original(*a, **k))
    slabs = joint_saliency_map(fixed, warped, sigma=sigma)
    (grad_slabs,) = torch.autograd.grad((slabs * torch.linspace(0, 1, slabs.numel()).view_as(slabs)).sum(), fixed)
    assert len(calls) == 5
    assert torch.allclose(slabs, whole, atol=1e-12, rtol=0)
    assert torch.allclose(grad_slabs, grad_whole, atol=1e-10, rtol=0)


def _blob_image(shape, centres, radius, value=1.0):
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    image = torch.zeros(shape)
    for centre in centres:
        distance = sum((g - c) ** 2 for g, c in zip(grids, centre)).sqrt()
        image = torch.maximum(image, value * torch.sigmoid(2.0 * (radius - distance)))
    return image[None, None]


@pytest.mark.parametrize("nd", [2, 3])
def test_structure_correspondence_is_low_only_where_one_image_has_structure(nd):
    """Textured tissue with two shared blobs; the moving image also has a lesion. Correspondence is ~0 on the
    lesion and ~1 on the shared blobs and on plain tissue, also after a one-voxel shift and whichever image
    holds the lesion. The confidence weight therefore drops on the lesion, where the JSM weight does not
    (the JSM's min(S_F, S_W) there is the tissue's own saliency). Each image's features are divided by their
    mean length (global contrast does not count), so the lesion is kept a small part of the structure."""
    from DeepSalRegLib.losses import confidence_weight, jsm_weight
    from DeepSalRegLib.saliency import structure_correspondence

    shape = (48,) * nd
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    tissue = (0.3 + 0.2 * torch.sin(0.9 * grids[0]) * torch.cos(0.7 * grids[1]))[None, None]
    shared = [(10,) * nd, (10,) + (28,) * (nd - 1)]
    lesion, plain = (28,) * nd, (28,) + (10,) * (nd - 1)
    fixed = torch.maximum(tissue, _blob_image(shape, shared, 4.0))
    moving = torch.maximum(fixed, _blob_image(shape, [lesion], 4.0))

    def at(c_map, centre, r=4):
        return float(c_map[0, 0][tuple(slice(c - r, c + r + 1) for c in centre)].mean())

    for a, b in ((fixed, moving), (moving, fixed), (fixed, torch.roll(moving, 1, dims=2))):
        c = structure_correspondence(a, b)
        assert at(c, lesion) < 0.25, at(c, lesion)
        assert min(at(c, shared[0]), at(c, shared[1]), at(c, plain)) > 0.75
    conf, jsm_w = confidence_weight(fixed, moving), jsm_weight(joint_saliency_map(fixed, moving))
    assert at(conf, lesion) < 0.25 * at(conf, plain)
    assert at(jsm_w, lesion) > 0.8 * at(jsm_w, plain)


def test_structure_correspondence_ignores_global_contrast():
    """The same structure at a third of the contrast (another stain or sequence) still corresponds."""
    from DeepSalRegLib.saliency import structure_correspondence

    image = _blob_image((48, 48), [(12, 12), (12, 34), (34, 20)], 4.0)
    c = structure_correspondence(image, 0.1 + 0.3 * image)
    assert float(c.min()) > 0.9


@pytest.mark.parametrize("nd", [2, 3])
def test_structure_correspondence_equals_its_definition_evaluated_direction_by_direction(nd):
    """One smoothed distance map per offset serves both directions; away from the border (where padding
    decides) the map must equal ``1 - max(U_FW, U_WF)`` with each ``U`` computed on its own."""
    from DeepSalRegLib.saliency import _distance, gaussian_smooth, structure_correspondence

    shape = (22,) * nd
    fixed = _blob_image(shape, [(7,) * nd, (14,) + (8,) * (nd - 1)], 3.0)
    moving = torch.roll(_blob_image(shape, [(7,) * nd, (14,) * nd], 3.0), 1, dims=2)

    def features(image):
        f = deviatoric_features(structure_tensor(image, 1.0), nd)
        return f / f.square().sum(dim=1, keepdim=True).sqrt().mean()

    def unmatched(a, b):  # min over the 3^nd offsets n of G * |a(x) - b(x + n)| (b shifted by rolling)
        costs = [gaussian_smooth(_distance(a, torch.roll(b, [-n for n in offset], dims=list(range(2, 2 + nd)))),
                                 1.0, "replicate")
                 for offset in itertools.product((-1, 0, 1), repeat=nd)]
        size = gaussian_smooth(a.square().sum(dim=1, keepdim=True).sqrt(), 1.0, "replicate")
        return torch.stack(costs).amin(dim=0) / (size + 0.5 * size.mean() + 1e-12)

    a, b = features(fixed), features(moving)
    expected = (1 - torch.maximum(unmatched(a, b), unmatched(b, a))).clamp(0, 1)
    got = structure_correspondence(fixed, moving)
    inside = (slice(None), slice(None)) + (slice(6, -6),) * nd
    torch.testing.assert_close(got[inside], expected[inside], rtol=0, atol=1e-5)
    assert float(got[inside].min()) < 0.5  # the blob only the moving image has is in the compared region
