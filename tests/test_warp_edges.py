"""Edge cases of the warp family found by a bug hunt: zeros padding beside non-finite image values,
the nearest/reflection tie past the last sample, direct op calls with empty axes, second derivatives,
and the argument checks of compose / resample / integrate."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import map_coordinates

import medfast as mf
from medfast.ops._reference import ddf_to_grid
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


# ---- taps with interpolation weight 0 next to inf voxels (warp.h tap_product) ---------------------------


def _inf_image(shape, dtype, seed, faces=True):
    """(1, 2, *shape) values in [1, 2) with +inf and -inf voxels, some on the faces (faces=False: none on
    the last index of an axis, where border padding's clamped pair takes inf - inf as its gradient)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(1, 2, *shape, generator=g, dtype=torch.float64) + 1
    inner = img[0] if faces else img[0][(slice(None),) + (slice(0, -1),) * len(shape)]
    for c, sign in ((0, 1.0), (1, -1.0)):
        plane = inner[c]
        flat = plane.reshape(-1)
        picks = torch.randperm(flat.numel(), generator=g)[: flat.numel() // 20]
        coords = np.unravel_index(picks.numpy(), plane.shape)
        plane[coords] = sign * float("inf")
        plane[tuple(torch.tensor(a) for a in np.unravel_index(picks[:1].numpy(), plane.shape))] = -sign * float("inf")
    if faces:
        img[0, 0].select(0, 0).select(0, 2).fill_(float("inf"))  # an inf on the first face of axis 0
    return img.to(dtype)


def _gs_mode(mode):
    return "bilinear" if mode == "linear" else "nearest"


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("mode", ["linear", "nearest"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inf_voxels_give_inf_not_nan_as_grid_sample(ndim, mode, padding, dtype):
    # A tap with weight 0 multiplied an inf voxel: 0 x inf = NaN. The 2D one-plane view (float32, the 3D AVX2
    # rows) read every pixel a second time through its phantom axis-0 tap, so any inf pixel read made NaN;
    # under zeros padding a sample straddling the edge read its outside tap (clamped onto the edge voxel)
    # with weight 0. grid_sample (align_corners=True: voxel units) and scipy give inf there. Positions are
    # kept off the grid (and nearest off its ties), where grid_sample's normalized coordinates round.
    shape = (9, 13, 17) if ndim == 3 else (11, 21)
    img = _inf_image(shape, dtype, 7 * ndim + len(padding))
    g = torch.Generator().manual_seed(ndim)
    size = (1, ndim, *shape)
    # whole voxels plus a fraction in [0.05, 0.45] or [0.55, 0.95]: 0.05 from the grid and from the ties
    frac = 0.05 + 0.4 * torch.rand(size, generator=g, dtype=torch.float64) + 0.5 * (torch.rand(size, generator=g) > 0.5)
    ddf = (torch.randint(-2, 2, size, generator=g) + frac).to(dtype)
    grid = ddf_to_grid(ddf.double())
    ref = F.grid_sample(img.double(), grid, mode=_gs_mode(mode), padding_mode=padding, align_corners=True)
    pos = identity_grid(shape) + ddf[0].double()
    ref_scipy = torch.stack([torch.from_numpy(map_coordinates(img[0, c].double().numpy(), pos.numpy(), order=int(
        mode == "linear"), mode={"zeros": "grid-constant", "border": "nearest", "reflection": "mirror"}[padding]))
        for c in range(2)])[None]
    assert ref.isinf().sum() > 20 and torch.isfinite(ref).sum() > 100
    # grid_sample's own 0 x inf: border clamps a coordinate beyond the edge onto the edge voxel exactly, and
    # its upper tap (weight 0) may be inf; scipy weighs both taps there (not 0). Elsewhere they agree.
    gs_defined = ~ref.isnan()
    torch.testing.assert_close(ref[gs_defined], ref_scipy[gs_defined])
    # an upstream gradient with inf entries (at samples inside the image, where grid_sample's clamped or
    # reflected taps weigh what ours do): inf to the taps with a weight and nothing to the others
    inside = torch.stack([(pos[i] >= 0) & (pos[i] <= shape[i] - 1) for i in range(ndim)]).all(0)
    gout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    spots = torch.zeros(shape, dtype=torch.bool)
    spots.view(-1)[::7] = True
    gout[0, 0][spots & (inside | (padding == "zeros"))] = float("inf")
    i = img.double().clone().requires_grad_()
    F.grid_sample(i, grid, mode=_gs_mode(mode), padding_mode=padding, align_corners=True).backward(gout)
    assert i.grad.isinf().any() and torch.isfinite(i.grad).sum() > i.grad.numel() // 2

    def run():
        im = img.clone().requires_grad_()
        d = ddf.clone().requires_grad_(mode == "linear")
        out = mf.warp(im, d, mode=mode, padding=padding)
        out.backward(gout.to(dtype))
        return out.detach().double(), im.grad.double()

    for out, gi in simd_and_generic(run):
        torch.testing.assert_close(out, ref_scipy, equal_nan=True, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[gs_defined], ref[gs_defined], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gi, i.grad, equal_nan=True, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inf_voxels_position_gradient_matches_grid_sample(ndim, padding, dtype):
    # d out / d ddf sums d weight / d position x image over the taps; the phantom tap of the 2D one-plane
    # view (and any tap at an exact position along another axis) has coefficient 0: 0 x inf = NaN. Samples
    # with every tap inside (grid_sample scales its clamped / reflected coordinate's gradient by 0 or -1 at
    # the edges): inf or -inf where an inf voxel is read, NaN only where +inf and -inf meet, as grid_sample.
    shape = (9, 13, 17) if ndim == 3 else (11, 21)
    img = _inf_image(shape, dtype, 3 * ndim + len(padding))
    g = torch.Generator().manual_seed(5 + ndim)
    ddf = torch.rand(1, ndim, *shape, generator=g, dtype=torch.float64) * 0.9 + 0.05  # 0.05 .. 0.95 off the grid
    pos = identity_grid(shape) + ddf[0]
    inside = torch.stack([pos[i] < shape[i] - 1 for i in range(ndim)]).all(0)
    ddf = ddf.to(dtype)
    d = ddf.double().clone().requires_grad_()
    F.grid_sample(img.double(), ddf_to_grid(d), mode="bilinear", padding_mode=padding, align_corners=True).sum(
        ).backward()
    ref = d.grad[0][:, inside]
    assert ref.isinf().sum() > 8 and torch.isfinite(ref).sum() > 100

    def run():
        d = ddf.clone().requires_grad_()
        mf.warp(img, d, mode="linear", padding=padding).sum().backward()
        return d.grad[0].double()

    for grad in simd_and_generic(run):
        torch.testing.assert_close(grad[:, inside], ref, equal_nan=True, atol=1e-4, rtol=1e-5)


def _padded_index(i, n, padding):
    """Index i (integer tensor) beyond [0, n) as the paddings extend the image: None outside under zeros."""
    if padding == "zeros":
        return i.clamp(0, n - 1), (i >= 0) & (i < n)
    if padding == "border":
        return i.clamp(0, n - 1), torch.ones_like(i, dtype=torch.bool)
    p = max(2 * (n - 1), 1)
    j = i.remainder(p)
    return torch.minimum(j, p - j) if n > 1 else torch.zeros_like(i), torch.ones_like(i, dtype=torch.bool)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_warp_at_exact_grid_positions_reads_only_its_voxel(ndim, padding, dtype):
    # At an integer position linear interpolation is the voxel's value: the upper tap weighs 0 and must not
    # add 0 x inf. Integer shifts (some outside) against plain indexing; an identity warp's position
    # gradient is the one-sided difference to the next voxel (the image extended by the padding), finite
    # beside an inf voxel that lies along another axis (its coefficient is 0 there).
    shape = (7, 9, 16) if ndim == 3 else (9, 16)
    img = _inf_image(shape, dtype, 11 * ndim + len(padding), faces=padding != "border")
    g = torch.Generator().manual_seed(ndim)
    shift = torch.randint(-1, 2, (1, ndim, *shape), generator=g)
    pos = identity_grid(shape).long() + shift[0]
    idx, valid = zip(*(_padded_index(pos[i], shape[i], padding) for i in range(ndim)))
    ref = torch.where(torch.stack(valid).all(0), img[0][(slice(None), *idx)], torch.zeros((), dtype=dtype))
    assert ref.isinf().sum() > 8

    def run():
        out = mf.warp(img, shift.to(dtype), padding=padding)
        d = torch.zeros(1, ndim, *shape, dtype=dtype, requires_grad=True)
        mf.warp(img, d, padding=padding).sum().backward()
        return out, d.grad

    base = identity_grid(shape).long()
    for out, grad in simd_and_generic(run):
        assert torch.equal(out[0], ref)
        for ax in range(ndim):
            nxt = base.clone()
            nxt[ax] += 1
            nidx, nvalid = zip(*(_padded_index(nxt[i], shape[i], padding) for i in range(ndim)))
            upper = torch.where(torch.stack(nvalid).all(0), img[0][(slice(None), *nidx)], torch.zeros((), dtype=dtype))
            diff = (upper - img[0]).sum(0)  # summed over the channels
            assert torch.isfinite(diff).sum() > diff.numel() // 2
            torch.testing.assert_close(grad[0, ax], diff, equal_nan=True, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_an_axis_longer_than_2_22_samples_reads_its_own_voxels(mode, padding):
    # the float32 AVX2 rows clamp positions to +-2^22 ("far outside"): every sample past index 2^22 of a longer
    # axis read voxel 2^22 and sent its gradient there (only reflection sent such axes to the generic path)
    n = (1 << 22) + 64
    image = torch.arange(n, dtype=torch.float32).reshape(1, 1, 1, 1, n).requires_grad_()
    out = mf.warp(image, torch.zeros(1, 3, 1, 1, n), mode=mode, padding=padding)  # the identity
    assert torch.equal(out, image.detach())
    out.sum().backward()
    assert torch.equal(image.grad, torch.ones_like(image))
    image2d = torch.arange(n, dtype=torch.float32).reshape(1, 1, n, 1)
    # half a voxel along the long axis (float32 resolves 0.5 there, not 0.25); 2D takes the same rows
    shifted = mf.warp(image2d, torch.tensor([0.5, 0.0]).view(1, 2, 1, 1).expand(1, 2, n, 1), mode=mode,
                      padding=padding)[0, 0, :, 0]
    ref = image2d[0, 0, :, 0] + (0.5 if mode == "linear" else 1.0)  # nearest: half up
    ref[-1] = {"zeros": 0.5 * (n - 1), "border": n - 1, "reflection": n - 1.5}[padding] if mode == "linear" else \
        {"zeros": 0.0, "border": n - 1, "reflection": n - 2}[padding]  # (as on a 16-voxel axis)
    torch.testing.assert_close(shifted, ref, rtol=0, atol=0)
