"""Similarity terms, JSM weighting and regularisers."""
import pytest
import torch

from DeepSalRegLib.losses import (RegistrationLoss, charbonnier_similarity, fixed_box_means,
                                  gradient_magnitude_similarity, jsm_weight, lncc_similarity, mse_similarity, negative_jacobian_penalty,
                                  smoothness)
from DeepSalRegLib.networks import build_model
from DeepSalRegLib.warp import identity_grid


def _image(shape=(48, 48)):
    return torch.nn.functional.interpolate(torch.rand(1, 1, 12, 12), size=shape, mode="bicubic", align_corners=True)


@pytest.mark.parametrize("term", [charbonnier_similarity, mse_similarity, lncc_similarity, gradient_magnitude_similarity])
def test_similarities_are_minimal_for_identical_images(term):
    a = _image()
    b = torch.roll(a, 3, dims=3)
    assert term(a, a) < term(a, b)
    assert term(a, a) < 2e-3


def test_lncc_ignores_local_affine_intensity_changes():
    a = _image()
    assert lncc_similarity(a, 3 * a + 2) < 1e-3
    assert mse_similarity(a, 3 * a + 2) > 1


@pytest.mark.parametrize("shape", [(40, 36), (20, 18, 16)])
def test_lncc_with_precomputed_fixed_means_is_the_same_loss_and_gradient(shape):
    """The refinement and the affine stage pass ``fixed_box_means`` once per level: same value, same gradient."""
    torch.manual_seed(0)
    fixed = torch.rand(1, 1, *shape)
    weight = torch.rand(1, 1, *shape)
    moving = 0.5 * fixed + 0.5 * torch.rand(1, 1, *shape)
    grads = []
    for means in (None, fixed_box_means(fixed, 7)):
        warped = moving.clone().requires_grad_(True)
        loss = lncc_similarity(fixed, warped, weight, window=7, fixed_means=means)
        loss.backward()
        grads.append((float(loss), warped.grad))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-9)


def test_weighted_mean_uses_only_weighted_voxels():
    a, b = torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
    b[..., :4] = 1.0
    w = torch.zeros(1, 1, 8, 8)
    w[..., 4:] = 1.0
    assert mse_similarity(a, b, w) == 0
    assert mse_similarity(a, b) == pytest.approx(0.5)


def test_jsm_weight_is_detached_and_floored():
    jsm = torch.rand(1, 1, 8, 8, requires_grad=True)
    w = jsm_weight(jsm, alpha=0.2)
    assert not w.requires_grad and w.min() >= 0.2 and w.max() <= 1.0


def test_regularisers_vanish_on_translations_and_bending_on_affine():
    shape = (16, 16, 16)
    x = identity_grid(shape).unsqueeze(0)
    translation = torch.ones(1, 3, *shape)
    affine = 0.1 * x.roll(1, dims=1)
    for kind in ("diffusion", "tv", "bending"):
        assert smoothness(translation, kind) < 2e-3
    assert smoothness(affine, "bending") < 1e-10 < smoothness(affine, "diffusion")
    wiggle = torch.sin(x) * 0.5
    assert smoothness(wiggle, "bending") > 0.01


def test_negative_jacobian_penalty_only_for_folding():
    shape = (12, 12)
    x = identity_grid(shape).unsqueeze(0)
    assert negative_jacobian_penalty(0.2 * x) == 0
    mirror = torch.zeros_like(x)
    mirror[:, 0] = -2.0 * x[:, 0]  # phi(x) = (-x0, x1): det = -1 everywhere
    assert negative_jacobian_penalty(mirror) == pytest.approx(1.0)
    assert negative_jacobian_penalty(-2.0 * x) == 0  # phi(x) = -x is a rotation in 2D, not a fold


def test_registration_loss_parts_and_modes():
    model = build_model("modern-2d")
    fixed, moving = _image(), torch.roll(_image(), 2, dims=2)
    out = model(fixed, moving)
    total, parts = RegistrationLoss(jsm_weight="coarse+refined", jacobian_weight=1.0)(out, fixed)
    assert set(parts) == {"similarity", "smoothness", "similarity_coarse", "smoothness_coarse", "jacobian"}
    assert total.requires_grad
    _, none_parts = RegistrationLoss(jsm_weight="none")(out, fixed)
    assert none_parts["similarity"] != pytest.approx(parts["similarity"])
    with pytest.raises(ValueError):
        RegistrationLoss(jsm_weight="everything")
    # the refinement's confidence weight in training (opt-in): the data terms are weighted differently
    total_c, corr_parts = RegistrationLoss(jsm_weight="coarse+refined", correspondence=True)(out, fixed)
    assert total_c.requires_grad
    assert corr_parts["similarity"] != pytest.approx(parts["similarity"])


@pytest.mark.parametrize("shape,window", [((1, 3, 11, 9), 7), ((2, 2, 5, 13), 3), ((1, 5, 9, 6, 11), 7), ((1, 1, 4, 8, 7), 9)])
def test_box_mean_equals_average_pooling_without_the_padding(shape, window):
    import torch.nn.functional as F

    from DeepSalRegLib.losses import box_mean

    torch.manual_seed(0)
    t = torch.rand(*shape, dtype=torch.float64)
    pool = F.avg_pool2d if len(shape) == 4 else F.avg_pool3d
    if min(shape[2:]) >= window:  # (avg_pool refuses a box larger than the image; box_mean clips it)
        expected = pool(t, window, stride=1, padding=window // 2, count_include_pad=False)
        assert torch.allclose(box_mean(t, window), expected, atol=1e-12)
    # independent check at one voxel: the mean over the box clipped to the image
    index = tuple(n // 3 for n in shape[2:])
    box = tuple(slice(max(0, i - window // 2), i + window // 2 + 1) for i in index)
    assert float(box_mean(t, window)[(0, 0) + index]) == pytest.approx(float(t[(0, 0) + box].mean()), abs=1e-12)


def test_box_means_of_flat_windows_have_no_variance_wherever_they_are():
    """A window over a flat region has variance 0 where the image is 0 (background) and within float32 rounding
    elsewhere, wherever it is along a long axis (the LNCC's stabiliser is 1e-6: running sums left residues
    growing along the axis that gave flat regions a gradient, NOTES sessions 10 and 17)."""
    from DeepSalRegLib.losses import box_mean

    image = torch.full((1, 1, 90, 2000), 0.31372549)
    image[..., 300:] = 0.7019608
    image[..., 50:, :] = 0.0
    means = box_mean(torch.cat([image, image * image], dim=1), 7)
    variance = means[:, 1] - means[:, 0] ** 2
    flat = torch.ones_like(variance, dtype=torch.bool)
    flat[..., 297:303] = False
    flat[..., 47:53, :] = False
    assert float(variance[flat].abs().max()) < 4e-7
    assert float(variance[..., 53:, :].abs().max()) == 0.0
    assert float(variance[..., :47, 297:303].min()) > 1e-3  # the windows across an edge see it
    assert float(variance[..., 47:53, :].min()) > 1e-3


def test_lncc_with_every_voxel_counted_is_the_plain_lncc_value_and_gradient():
    torch.manual_seed(0)
    fixed = torch.rand(1, 1, 9, 11, 10)
    warped = torch.rand(1, 1, 9, 11, 10, requires_grad=True)
    weight = torch.rand(1, 1, 9, 11, 10)
    plain = lncc_similarity(fixed, warped, weight, window=5)
    (g_plain,) = torch.autograd.grad(plain, warped)
    ones = torch.ones_like(fixed)
    counted = lncc_similarity(fixed, warped, weight, window=5, fixed_means=fixed_box_means(fixed, 5, ones), counted=ones)
    (g_counted,) = torch.autograd.grad(counted, warped)
    assert float(counted) == pytest.approx(float(plain), abs=1e-6)
    assert torch.allclose(g_counted, g_plain, atol=1e-6)


@pytest.mark.parametrize("shape", [(40, 40), (16, 18, 20)])
def test_what_is_not_counted_cannot_change_the_lncc_of_its_neighbours(shape):
    """A region left out of the windows' statistics (``counted`` 0, e.g. tissue that has no counterpart) gives its
    neighbours nothing to gain: whatever the warped image shows there, the loss is the same (without ``counted``,
    windows next to it did better when the region shrank: session 16-17 NOTES), and without the region it does
    change."""
    torch.manual_seed(0)
    fixed = torch.rand(1, 1, *shape)
    warped = 0.7 * fixed + 0.3 * torch.rand(1, 1, *shape)
    region = torch.zeros(1, 1, *shape, dtype=torch.bool)
    region[(0, 0) + tuple(slice(n // 3, n // 2) for n in shape)] = True
    counted = (~region).float()
    other = warped.clone()
    other[region] = torch.rand(int(region.sum()))  # another content where nothing is counted
    means = fixed_box_means(fixed, 7, counted)

    def loss(w, **kw):
        return float(lncc_similarity(fixed, w, counted, window=7, **kw))

    assert loss(other, fixed_means=means, counted=counted) == pytest.approx(loss(warped, fixed_means=means,
                                                                                  counted=counted), abs=1e-6)
    assert abs(loss(other) - loss(warped)) > 1e-3  # the plain LNCC's windows next to the region see it


def test_lncc_batch_reduction_is_each_elements_own_weighted_mean():
    """``reduction="batch"`` (the affine stage's rotation probes): element k's loss as if computed alone."""
    torch.manual_seed(0)
    fixed, warped = torch.rand(3, 1, 12, 10, 9), torch.rand(3, 1, 12, 10, 9)
    weight = torch.rand(3, 1, 12, 10, 9)
    batch = lncc_similarity(fixed, warped, weight, window=5, reduction="batch")
    alone = torch.stack([lncc_similarity(fixed[k:k + 1], warped[k:k + 1], weight[k:k + 1], window=5) for k in range(3)])
    assert batch.shape == (3,)
    assert torch.allclose(batch, alone, atol=1e-6)
