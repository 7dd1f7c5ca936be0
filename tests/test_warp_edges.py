"""Edge cases of the warp family found by a bug hunt: zeros padding beside non-finite image values,
the nearest/reflection tie past the last sample, direct op calls with empty axes, second derivatives,
and the argument checks of compose / resample / integrate."""

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

import medfast as mf
from tests.conftest import identity_grid, simd_and_generic

ops = torch.ops.medfast


def _nan_border(shape, dtype):
    """A NaN-masked background: the image's outer faces are NaN (as some NIfTI volumes are)."""
    img = torch.rand(1, 1, *shape, dtype=dtype) + 1
    for ax in range(len(shape)):
        img.select(2 + ax, 0).fill_(float("nan"))
        img.select(2 + ax, shape[ax] - 1).fill_(float("nan"))
    return img


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zeros_padding_beside_nan_edges_matches_scipy(mode, ndim, dtype):
    # Outside taps weigh 0 but keep an in-range index; a sample with no tap inside must read nothing
    # (it was NaN: 0 x NaN), as scipy's grid-constant: 0 outside, NaN wherever a NaN voxel is read.
    shape = (7, 9, 16) if ndim == 3 else (9, 16)
    g = torch.Generator().manual_seed(ndim)
    img = _nan_border(shape, dtype)
    ddf = (torch.randn(1, ndim, *shape, generator=g, dtype=torch.float64) * 6).to(dtype)
    ddf[..., :3] += 40.0  # far outside: every tap beyond the image
    coords = (identity_grid(shape) + ddf[0].double()).numpy()
    ref = map_coordinates(img[0, 0].double().numpy(), coords, order=0 if mode == "nearest" else 1,
                          mode="grid-constant")
    ref = torch.from_numpy(ref)
    assert (ref == 0).sum() > 20 and ref.isnan().sum() > 5 and (torch.isfinite(ref) & (ref != 0)).sum() > 20

    def run():
        d = ddf.clone().requires_grad_(mode == "linear")
        out = mf.warp(img, d, mode=mode, padding="zeros")
        if mode == "linear":
            out.nan_to_num(0.0).sum().backward()
        return out.detach(), None if d.grad is None else d.grad

    for out, grad in simd_and_generic(run):  # 2D too: the AVX2 rows on a one-plane 3D view
        torch.testing.assert_close(out[0, 0].double(), ref, equal_nan=True, atol=1e-5, rtol=1e-5)
        if grad is not None:
            outside = ref == 0
            assert (grad[0][:, outside] == 0).all()  # no gradient where nothing is read
            assert torch.isfinite(grad[0][:, torch.isfinite(ref)]).all()


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inf_upstream_gradient_of_samples_that_read_nothing_leaves_the_image_gradient_finite(mode, dtype):
    # the float32 AVX2 backward scattered gout x 0 to the clamped taps of such samples: NaN at the far
    # corner where gout was inf (d sqrt / d out at out = 0), where the generic path and CUDA add nothing
    img = torch.rand(1, 1, 10, 11, 12, dtype=dtype) + 0.5
    ddf = torch.zeros(1, 3, 10, 11, 12, dtype=dtype)
    ddf[..., :4] += 50.0  # these outputs sample far outside

    def run():
        i = img.clone().requires_grad_()
        out = mf.warp(i, ddf, mode=mode, padding="zeros")
        assert (out[..., :4] == 0).all()
        out.sqrt().sum().backward()
        return i.grad

    for grad in simd_and_generic(run):
        assert torch.isfinite(grad).all()
    fast, slow = simd_and_generic(run)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_one_inf_voxel_does_not_reach_samples_off_the_far_edge(mode):
    # nearest parked every outside tap at index 0: one inf corner voxel made every outside sample NaN
    img = torch.rand(1, 1, 6, 6, 16)
    img[0, 0, 0, 0, 0] = float("inf")
    img[0, 0, -1, -1, -1] = float("nan")
    for shift in (50.0, -50.0, 1e6):
        ddf = torch.full((1, 3, 6, 6, 16), shift, requires_grad=True)
        out = mf.warp(img, ddf, mode=mode)
        out.sum().backward()
        assert (out == 0).all() and (ddf.grad == 0).all()


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_nearest_reflection_ties_match_scipy(n):
    # x = n - 0.5 (+ periods): scipy rounds first, then mirrors the index (n -> n - 2)
    img = torch.arange(1.0, n + 1, dtype=torch.float64).reshape(1, 1, 1, n)
    xs = torch.arange(-3 * n, 4 * n, dtype=torch.float64) + 0.5
    ddf = torch.zeros(1, 2, 1, xs.numel(), dtype=torch.float64)
    ddf[0, 1, 0] = xs - torch.arange(xs.numel())
    out = mf.warp(img, ddf, mode="nearest", padding="reflection")
    ref = map_coordinates(img[0, 0].numpy(), np.stack([np.zeros(xs.numel()), xs.numpy()]), order=0, mode="mirror")
    torch.testing.assert_close(out.flatten(), torch.from_numpy(ref))
    # and through resample: a 2x downsample puts output voxels on half-voxel positions
    a_in = torch.eye(3, dtype=torch.float64)
    a_out = torch.diag(torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64))
    a_out[1, 2] = 0.5
    res = mf.resample(img, a_in, a_out, (1, (n + 1) // 2 + 1), mode="nearest", padding="reflection")
    pos = 0.5 + 2.0 * np.arange((n + 1) // 2 + 1)
    ref = map_coordinates(img[0, 0].numpy(), np.stack([np.zeros(pos.size), pos]), order=0, mode="mirror")
    torch.testing.assert_close(res.flatten(), torch.from_numpy(ref))


def test_direct_op_calls_refuse_empty_axes_and_integer_images():
    with pytest.raises(ValueError, match="empty spatial axis"):
        ops.warp_forward(torch.zeros(1, 1, 0, 4), None, None, [3, 3], "linear", "zeros")
    with pytest.raises(ValueError, match="empty spatial axis"):
        ops.warp_backward(torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 4, 0), None, None, [3, 3], "linear", "zeros",
                          True, True)
    with pytest.raises(TypeError, match="image must be floating"):
        ops.warp_forward(torch.zeros(1, 1, 4, 4, dtype=torch.int32), None, None, [3, 3], "linear", "zeros")
    with pytest.raises(TypeError, match="image must be floating"):
        ops.spline_prefilter(torch.zeros(1, 1, 4, 4, dtype=torch.int32), "zeros", False)


def test_first_order_gradients_under_create_graph_can_be_modified_in_place():
    # they were views made inside a custom Function: g.clamp_() (clipping a meta-gradient, as with grid_sample)
    # raised a RuntimeError about an internal view; differentiating them again still raises the clear error
    x = torch.randn(1, 1, 5, 6, dtype=torch.float64)
    d = torch.zeros(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    (gd,) = torch.autograd.grad(mf.warp(x, d).square().sum(), d, create_graph=True)
    expected = gd.detach().clamp(-0.1, 0.1)
    gd.clamp_(-0.1, 0.1)
    torch.testing.assert_close(gd.detach(), expected)
    with pytest.raises(RuntimeError, match="medfast.warp: second derivatives"):
        gd.sum().backward()
    p = torch.rand(1, 1, 9, 9, 9, dtype=torch.float64, requires_grad=True)
    (gp,) = torch.autograd.grad(mf.lncc_loss(p, torch.rand_like(p), kernel_size=3), p, create_graph=True)
    gp.mul_(0.5)


def test_second_derivatives_raise_instead_of_silent_zeros():
    x = torch.randn(1, 1, 5, 6, dtype=torch.float64, requires_grad=True)
    d = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    gx, gd = torch.autograd.grad(mf.warp(x, d).square().sum(), (x, d), create_graph=True)
    assert gx.requires_grad and gd.requires_grad  # create_graph without a second backward still works
    with pytest.raises(RuntimeError, match="medfast.warp: second derivatives are not implemented"):
        gd.sum().backward()
    # autograd.grad w.r.t. the op's inputs reaches the error too (allow_unused / materialize_grads gave
    # None / zeros when the error node was not linked to them)
    for kwargs in ({}, {"allow_unused": True}, {"materialize_grads": True}):
        (gd,) = torch.autograd.grad(mf.warp(x, d).square().sum(), d, create_graph=True)
        with pytest.raises(RuntimeError, match="medfast.warp: second derivatives"):
            torch.autograd.grad(gd.square().sum(), d, **kwargs)
    p = torch.rand(1, 1, 9, 9, 9, dtype=torch.float64, requires_grad=True)
    t = torch.rand(1, 1, 9, 9, 9, dtype=torch.float64)
    (gp,) = torch.autograd.grad(mf.lncc_loss(p, t, kernel_size=3), p, create_graph=True)
    with pytest.raises(RuntimeError, match="medfast.lncc_loss: second derivatives"):
        gp.sum().backward()
    (gp,) = torch.autograd.grad(mf.lncc_loss(p, t, kernel_size=3), p, create_graph=True)
    with pytest.raises(RuntimeError, match="medfast.lncc_loss: second derivatives"):
        torch.autograd.grad(gp.sum(), p, allow_unused=True)
    # first derivatives are unchanged by create_graph
    (g1,) = torch.autograd.grad(mf.warp(x, d).square().sum(), d)
    torch.testing.assert_close(gd.detach(), g1)


def test_ultrasound_psf_is_twice_differentiable():
    from medfast.ops._ussim import psf
    from medfast.ultrasound import Probe
    from medfast.ultrasound.simulate import _cached

    probe = Probe.preset("L11-5v", n_lines=8, n_samples=32)
    h, w = _cached("psf_speckle", probe, 1, "cpu", torch.float64, None)
    x = torch.randn(1, 8, 3, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a: psf(a, h, w).square(), (x,))


def test_compose_resample_integrate_bad_arguments():
    d = torch.zeros(1, 2, 5, 6, dtype=torch.float64)
    with pytest.raises(TypeError, match="ddf_a and ddf_b must have one dtype"):
        mf.compose(d, d.float())
    with pytest.raises(ValueError, match="batches must be equal or 1, got 2 and 3"):
        mf.compose(torch.zeros(2, 2, 5, 6), torch.zeros(3, 2, 5, 6))
    with pytest.raises(ValueError, match="ddf_a is on meta but ddf_b is on cpu"):
        mf.compose(d.to("meta"), d)
    with pytest.raises(ValueError, match="steps must be an int in"):
        mf.integrate(d, 1100)
    img = torch.rand(1, 1, 5, 6)
    eye = torch.eye(3)
    with pytest.raises(ValueError, match="affine_in is singular"):
        mf.resample(img, torch.zeros(3, 3), eye, (4, 4))
    with pytest.raises(ValueError, match="affine_in and affine_out batches must be equal or 1, got 2 and 3"):
        mf.resample(img, eye.expand(2, 3, 3), eye.expand(3, 3, 3), (4, 4))
    with pytest.raises(ValueError, match="affine_in is on the meta device"):
        mf.resample(img, eye.to("meta"), eye, (4, 4))
    with pytest.raises(ValueError, match="affine_out must be finite"):
        mf.resample(img, eye, torch.full((3, 3), float("nan")), (4, 4))
    with pytest.raises(TypeError, match="shape_out must be a sequence of 2 ints"):
        mf.resample(img, eye, eye, (4.7, 4))
    with pytest.raises(TypeError, match="shape must be a sequence of 2 ints"):
        mf.affine_warp(img, torch.eye(2, 3)[None], shape="ab")
    # integer-like sizes are fine: NumPy ints and 0-dim integer tensors
    assert mf.resample(img, eye, eye, (np.int64(4), torch.tensor(3))).shape == (1, 1, 4, 3)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("padding", ["border", "reflection"])
def test_channels_last_ddf_takes_the_fast_path_with_the_same_results(mode, padding):
    # a (B, D, H, W, 3) flow viewed as (B, 3, D, H, W) (VoxelMorph's layout) fell to the scalar loop (5x
    # slower); the launcher now copies it once: same values and gradients as the contiguous field
    img = torch.rand(2, 2, 9, 10, 17)
    flow = torch.randn(2, 9, 10, 17, 3) * 2
    results = []
    for ddf in (flow.movedim(-1, 1), flow.movedim(-1, 1).contiguous()):
        i, d = img.clone().requires_grad_(), ddf.detach().requires_grad_()
        out = mf.warp(i, d, mode=mode, padding=padding)
        out.backward(torch.ones_like(out))
        results.append((out, i.grad, d.grad))
    assert results[0][2].shape == (2, 3, 9, 10, 17)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("grads", [(True, True), (False, True), (True, False)])
def test_2d_fast_path_equals_the_scalar_2d_loop(mode, padding, grads):
    # 2D float32 fields run the 3D AVX2 rows on a (B, C, 1, H, W) view (the scalar 2D loop was slower than
    # grid_sample): values and both gradients must be the 2D loop's, with a broadcast image batch too
    g = torch.Generator().manual_seed(3)
    img = torch.rand(1, 3, 21, 34, generator=g)
    ddf = torch.randn(2, 2, 19, 37, generator=g) * 4
    ddf[..., :3] += 30.0  # some samples far outside

    def run():
        i = img.clone().requires_grad_(grads[0])
        d = ddf.clone().requires_grad_(grads[1])
        out = mf.warp(i, d, mode=mode, padding=padding)
        out.backward(torch.rand(out.shape, generator=torch.Generator().manual_seed(4)))
        return out.detach(), i.grad, d.grad

    fast, slow = simd_and_generic(run)
    assert fast[0].shape == (2, 3, 19, 37)
    for a, b in zip(fast, slow, strict=True):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
