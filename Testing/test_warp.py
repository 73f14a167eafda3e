"""The displacement-field convention and field algebra (DeepSalRegLib.warp)."""
import math

import pytest
import torch

from DeepSalRegLib.warp import (_normalised_sampling_grid, compose, folding_fraction, identity_grid,
                                integrate_velocity, jacobian_determinant, resize_field, warp)


def _smooth_field(shape, amplitude, seed=0):
    g = torch.Generator().manual_seed(seed)
    nd = len(shape)
    coarse = torch.randn(1, nd, *[4] * nd, generator=g) * amplitude
    mode = "bilinear" if nd == 2 else "trilinear"
    return torch.nn.functional.interpolate(coarse, size=shape, mode=mode, align_corners=True)


@pytest.mark.parametrize("shape,shift", [((20, 24), (3, -2)), ((12, 14, 16), (2, -1, 3))])
def test_integer_shift_equals_roll_in_interior(shape, shift):
    image = torch.rand(1, 1, *shape, dtype=torch.float64)
    field = torch.stack([torch.full(shape, float(s), dtype=torch.float64) for s in shift]).unsqueeze(0)
    warped = warp(image, field)
    # W(x) = M(x + s)  <=>  roll by -s
    rolled = torch.roll(image, shifts=tuple(-s for s in shift), dims=tuple(range(2, 2 + len(shape))))
    interior = tuple([slice(None), slice(None)] + [slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, shape)])
    assert torch.allclose(warped[interior], rolled[interior], atol=1e-10)
    # and not the other sign
    wrong = torch.roll(image, shifts=shift, dims=tuple(range(2, 2 + len(shape))))
    assert not torch.allclose(warped[interior], wrong[interior], atol=1e-3)


def test_channel_order_is_array_axis_order():
    image = torch.zeros(1, 1, 10, 10)
    image[0, 0, 6, 2] = 1.0  # row 6, column 2
    field = torch.zeros(1, 2, 10, 10)
    field[0, 0] = 2.0  # +2 along rows only
    warped = warp(image, field)
    assert warped[0, 0, 4, 2] == pytest.approx(1.0, abs=1e-5)  # W(4,2) = M(6,2)
    assert warped.sum() == pytest.approx(1.0, abs=1e-5)


def test_identity_and_nearest_labels():
    labels = torch.randint(0, 5, (1, 1, 9, 11, 7)).float()
    assert torch.allclose(warp(labels, torch.zeros(1, 3, 9, 11, 7)), labels, atol=1e-5)
    field = torch.full((1, 3, 9, 11, 7), 0.4)
    out = warp(labels, field, mode="nearest")
    assert set(out.unique().tolist()) <= set(labels.unique().tolist())


@pytest.mark.parametrize("shape", [(40, 44), (20, 22, 18)])
def test_compose_with_approximate_inverse_is_identity(shape):
    u = _smooth_field(shape, amplitude=1.5).double()
    # fixed-point inverse: v(x) = -u(x + v(x))
    v = -u.clone()
    for _ in range(30):
        v = -warp(u, v)
    residual = compose(u, v)  # x -> x + v -> (x + v) + u(x + v) ~ x
    interior = tuple([slice(None), slice(None)] + [slice(4, n - 4) for n in shape])
    assert residual[interior].abs().max() < 0.02
    assert u.abs().max() > 1.0  # the test is not trivial


def test_compose_matches_sequential_warping():
    shape = (64, 64)
    image = torch.nn.functional.interpolate(torch.rand(1, 1, 6, 6), size=shape, mode="bicubic", align_corners=True)
    a, b = _smooth_field(shape, 3.0, seed=1), _smooth_field(shape, 3.0, seed=2)
    seq = warp(warp(image, a), b)

    def error(field):
        return float((seq - warp(image, field))[..., 8:-8, 8:-8].abs().mean())

    assert error(compose(a, b)) < 0.002
    assert error(compose(b, a)) > 5 * error(compose(a, b))  # order matters, and we got it right
    assert error(a + b) > 5 * error(compose(a, b))


def test_resize_field_scales_magnitudes():
    shape = (17, 33)
    field = torch.zeros(1, 2, *shape)
    field[:, 0] = 1.0
    field[:, 1] = 2.0
    big = resize_field(field, (33, 65))
    assert torch.allclose(big[:, 0], torch.full((1, 33, 65), 2.0))
    assert torch.allclose(big[:, 1], torch.full((1, 33, 65), 4.0))
    # warping the upsampled image by the upsampled field matches upsampling the warped image
    img = torch.nn.functional.interpolate(torch.rand(1, 1, 4, 4), size=shape, mode="bicubic", align_corners=True)
    lin = _smooth_field(shape, 1.0)

    def up(t):
        return torch.nn.functional.interpolate(t, size=(33, 65), mode="bilinear", align_corners=True)

    good = (warp(up(img), resize_field(lin, (33, 65))) - up(warp(img, lin)))[..., 4:-4, 4:-4].abs().max()
    unscaled = (warp(up(img), up(lin)) - up(warp(img, lin)))[..., 4:-4, 4:-4].abs().max()
    assert good < 0.04 and unscaled > 2.5 * good


@pytest.mark.parametrize("old,new", [((5, 7, 9), (9, 13, 17)), ((12, 1, 6), (24, 3, 11)), ((16, 12, 10), (8, 6, 5))])
def test_3d_resize_by_interpolation_matrices_equals_trilinear_interpolation_with_its_gradient(old, new):
    """``resize_field`` in 3D interpolates one axis at a time by matrix products: the values and the gradient
    (what a refinement step's backward pass uses) are those of ``F.interpolate(trilinear, align_corners=True)``,
    up- and downsampling, with singleton axes; and the magnitudes are rescaled to the new grid."""
    torch.manual_seed(0)
    field = torch.randn(2, 3, *old, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3, *new, dtype=torch.float64)
    resized = resize_field(field, new)
    (gradient,) = torch.autograd.grad((resized * weights).sum(), field)
    reference = torch.nn.functional.interpolate(field, size=new, mode="trilinear", align_corners=True)
    scale = torch.tensor([(n - 1) / max(o - 1, 1) for n, o in zip(new, old)], dtype=torch.float64).view(1, 3, 1, 1, 1)
    reference = reference * scale
    (expected_gradient,) = torch.autograd.grad((reference * weights).sum(), field)
    assert torch.allclose(resized, reference, atol=1e-12)
    assert torch.allclose(gradient, expected_gradient, atol=1e-12)


@pytest.mark.parametrize("nd", [2, 3])
def test_jacobian_of_affine_field_is_its_determinant(nd):
    shape = (16,) * nd
    a = torch.eye(nd, dtype=torch.float64) + torch.tensor(
        [[0.1, 0.2, -0.05], [-0.1, 0.3, 0.02], [0.04, 0.0, -0.2]], dtype=torch.float64)[:nd, :nd]
    x = identity_grid(shape, dtype=torch.float64)
    u = torch.einsum("ij,j...->i...", a - torch.eye(nd, dtype=torch.float64), x).unsqueeze(0)
    det = jacobian_determinant(u)
    assert torch.allclose(det, torch.full_like(det, float(torch.linalg.det(a))), atol=1e-10)
    assert folding_fraction(u) == 0.0
    flipped = -2.0 * x.unsqueeze(0)  # phi = -x: det = (-1)^nd
    assert folding_fraction(flipped) == (1.0 if nd == 3 else 0.0)


def test_scaling_and_squaring_of_translation_and_rotation():
    shape = (41, 41)
    v = torch.zeros(1, 2, *shape, dtype=torch.float64)
    v[:, 0] = 3.0
    assert torch.allclose(integrate_velocity(v, 7), v, atol=1e-9)
    # a rotation velocity field v(x) = A (x - c) integrates to a rotation by angle theta
    theta = 0.3
    x = identity_grid(shape, dtype=torch.float64) - 20.0
    rot_v = torch.stack([-theta * x[1], theta * x[0]]).unsqueeze(0)
    u = integrate_velocity(rot_v, 8)
    expect = torch.stack([math.cos(theta) * x[0] - math.sin(theta) * x[1],
                          math.sin(theta) * x[0] + math.cos(theta) * x[1]]) - x
    centre = (slice(None), slice(None), slice(12, 29), slice(12, 29))
    assert (u[centre] - expect.unsqueeze(0)[centre]).abs().max() < 0.05
    assert jacobian_determinant(u)[centre].min() > 0.9


def test_errors_are_clear():
    with pytest.raises(ValueError, match="does not fit"):
        warp(torch.rand(1, 1, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="mode"):
        warp(torch.rand(1, 1, 8, 8), torch.zeros(1, 2, 8, 8), mode="cubic")


@pytest.mark.parametrize("shape", [(41, 32, 33), (17, 20, 30), (101, 90), (64, 64)])
@pytest.mark.parametrize("mode,padding", [("linear", "border"), ("linear", "zeros"), ("nearest", "border")])
def test_sampling_in_slabs_per_thread_equals_one_sampling_pass_with_its_gradients(shape, mode, padding):
    """``warp`` samples a single CPU image as one slab per thread (torch runs a batch entry on one thread);
    the samples and the gradients must be those of one ``grid_sample`` pass, also for uneven slabs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # uneven slabs on every shape above
    try:
        g = torch.Generator().manual_seed(1)
        image = torch.randn(1, 2, *[n + 3 for n in shape], generator=g, requires_grad=True)
        field = (_smooth_field(shape, 4.0) + torch.rand(1, len(shape), *shape, generator=g)).requires_grad_()
        weights = torch.randn(1, 2, *shape, generator=g)
        reference = torch.nn.functional.grid_sample(
            image, _normalised_sampling_grid(field, image.shape[2:]), mode="bilinear" if mode == "linear" else "nearest",
            padding_mode=padding, align_corners=True)
        sampled = warp(image, field, mode=mode, padding=padding)
        torch.testing.assert_close(sampled, reference, rtol=0, atol=0)
        wrt = [image, field] if mode == "linear" else [image]
        expected = torch.autograd.grad((reference * weights).sum(), wrt)
        got = torch.autograd.grad((sampled * weights).sum(), wrt)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)
