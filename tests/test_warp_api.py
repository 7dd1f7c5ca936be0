"""Operator plumbing of the warp family: opcheck, torch.compile, determinism, memory layouts,
bad inputs."""

import pytest
import torch

import medfast as mf
from tests.conftest import MODES, PADDINGS

ops = torch.ops.medfast


def _inputs(mode, dtype=torch.float32, ndim=3, grad=True):
    shape = (5, 6, 4) if ndim == 3 else (7, 5)
    image = torch.rand(2, 2, *shape, dtype=dtype, requires_grad=grad)
    ddf = (torch.randn(2, ndim, *shape, dtype=dtype) * 2).requires_grad_(grad and mode != "nearest")
    return image, ddf


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_opcheck_warp_forward(mode, padding):
    image, ddf = _inputs(mode)
    shape = list(ddf.shape[2:])
    torch.library.opcheck(ops.warp_forward.default, (image, None, ddf, shape, mode, padding))
    theta = (torch.eye(3, 4) + 0.1 * torch.randn(2, 3, 4)).requires_grad_()
    torch.library.opcheck(ops.warp_forward.default, (image, theta, None, [3, 4, 5], mode, padding))
    torch.library.opcheck(ops.warp_forward.default, (image, theta, ddf, shape, mode, padding))


@pytest.mark.parametrize("mode", MODES)
def test_opcheck_backward_and_prefilter(mode):
    image, ddf = _inputs(mode, grad=False)
    grad = torch.randn(2, 2, *ddf.shape[2:])
    shape = list(ddf.shape[2:])
    for flags in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(ops.warp_backward.default, (grad, image, None, ddf, shape, mode, "zeros", *flags))
    for transpose in (False, True):
        torch.library.opcheck(ops.spline_prefilter.default, (image.requires_grad_(), "border", transpose))


@pytest.mark.parametrize("mode", ["linear", "cubic"])
def test_torch_compile_inductor(mode):
    image, ddf = _inputs(mode)

    def loss(i, d):
        return (mf.warp(i, d, mode=mode, padding="border") ** 2).mean()

    compiled = torch.compile(loss, backend="inductor", fullgraph=True)
    expected = loss(image, ddf)
    g_expected = torch.autograd.grad(expected, (image, ddf))
    got = compiled(image, ddf)
    g_got = torch.autograd.grad(got, (image, ddf))
    torch.testing.assert_close(got, expected)
    for a, b in zip(g_got, g_expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_deterministic_bitwise(mode):
    image = torch.rand(1, 3, 20, 18, 16, requires_grad=True)
    ddf = (torch.randn(3, 3, 20, 18, 16) * 3).requires_grad_(mode != "nearest")
    weights = torch.randn(3, 3, 20, 18, 16)
    results = []
    with torch.autograd.set_grad_enabled(True):
        torch.use_deterministic_algorithms(True)
        try:
            for _ in range(2):
                image.grad = None
                ddf.grad = None
                out = mf.warp(image, ddf, mode=mode)
                (out * weights).sum().backward()
                results.append((out.detach().clone(), image.grad.clone(),
                                None if ddf.grad is None else ddf.grad.clone()))
        finally:
            torch.use_deterministic_algorithms(False)
    for a, b in zip(results[0], results[1]):
        if a is not None:
            assert torch.equal(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_and_channels_last(mode):
    image = torch.rand(2, 3, 9, 10, 11, dtype=torch.float64)
    ddf = torch.randn(2, 3, 9, 10, 11, dtype=torch.float64) * 2
    ref = mf.warp(image, ddf, mode=mode, padding="reflection")
    image_cl = image.to(memory_format=torch.channels_last_3d)
    ddf_cl = ddf.to(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(mf.warp(image_cl, ddf_cl, mode=mode, padding="reflection"), ref, atol=1e-12, rtol=0)
    # Strided views: every other voxel of a bigger image, a permuted displacement buffer.
    big = torch.zeros(2, 3, 18, 10, 22, dtype=torch.float64)
    big[:, :, ::2, :, ::2] = image
    view = big[:, :, ::2, :, ::2]
    ddf_view = ddf.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3)
    assert not view.is_contiguous() and not ddf_view.is_contiguous()
    torch.testing.assert_close(mf.warp(view, ddf_view, mode=mode, padding="reflection"), ref, atol=1e-12, rtol=0)
    # Gradients through non-contiguous inputs.
    view = view.clone(memory_format=torch.channels_last_3d).requires_grad_()
    mf.warp(view, ddf_view, mode=mode).sum().backward()
    image_c = image.clone().requires_grad_()
    mf.warp(image_c, ddf, mode=mode).sum().backward()
    torch.testing.assert_close(view.grad, image_c.grad)


def test_half_and_bfloat16_images_cpu():
    image = torch.rand(1, 2, 8, 9, 10)
    ddf = torch.randn(1, 3, 8, 9, 10) * 2
    ref = mf.warp(image, ddf, mode="linear")
    for dtype in (torch.float16, torch.bfloat16):
        out = mf.warp(image.to(dtype), ddf, mode="linear")
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cubic_warp_of_a_half_image_uses_float32_coefficients(dtype):
    # the spline coefficients were stored in the image's half dtype: an identity warp moved 1123 of 4096
    # bfloat16 voxels by one ulp, and a general warp was off by more than the output's rounding
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, 16, 15, 14, generator=g).to(dtype)
    identity = mf.warp(image, torch.zeros(1, 3, 16, 15, 14), mode="cubic")
    assert identity.dtype == dtype
    # the interpolating spline at the voxels: the image itself (up to the float32 prefilter's noise, which
    # shows only at values far below the image's scale: a float16 subnormal step at 8e-5)
    torch.testing.assert_close(identity.float(), image.float(), rtol=0, atol=1e-6)
    ddf = (torch.rand(1, 3, 16, 15, 14, generator=g) * 4 - 2).requires_grad_()
    leaf = image.clone().requires_grad_()
    out = mf.warp(leaf, ddf, mode="cubic", padding="border")
    assert out.dtype == dtype
    x = image[0, 0].double().numpy()
    coords = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in x.shape], indexing="ij"))
    ref = scipy_ndimage.map_coordinates(x, (coords + ddf[0].detach().double()).numpy(), order=3, mode="nearest")
    ref = torch.from_numpy(ref)
    # one rounding of the float32 result: within half an ulp of the exact value (plus float32 noise)
    ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))))
    assert bool(((out[0, 0].double() - ref).abs() <= ulp / 2 + 1e-5).all())
    # gradients: the float32 computation's, in each leaf's dtype
    w = torch.randn(1, 1, 16, 15, 14, generator=g).to(dtype)
    got = torch.autograd.grad((out.float() * w.float()).sum(), (leaf, ddf))
    leaf32, ddf32 = image.float().requires_grad_(), ddf.detach().clone().requires_grad_()
    ref_grads = torch.autograd.grad((mf.warp(leaf32, ddf32, mode="cubic", padding="border") * w.float()).sum(),
                                    (leaf32, ddf32))
    assert got[0].dtype == dtype
    torch.testing.assert_close(got[0], ref_grads[0].to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(got[1], ref_grads[1], rtol=0, atol=0)


def test_nan_displacement_gives_nan_voxel_only():
    image = torch.rand(1, 2, 6, 6, 6, requires_grad=True)
    ddf = torch.zeros(1, 3, 6, 6, 6)
    ddf[0, 1, 2, 3, 4] = float("nan")
    ddf.requires_grad_()
    out = mf.warp(image, ddf, mode="cubic")
    nan = torch.isnan(out)
    assert nan[0, :, 2, 3, 4].all() and nan.sum() == 2
    out.nan_to_num().sum().backward()
    assert torch.isfinite(image.grad).all()
    assert torch.isnan(ddf.grad[0, :, 2, 3, 4]).all() and torch.isnan(ddf.grad).sum() == 3


def test_huge_displacements_are_safe():
    image = torch.rand(1, 1, 5, 5, 5)
    for value in (1e30, -1e30, float("inf"), float("-inf")):
        ddf = torch.full((1, 3, 5, 5, 5), value)
        assert (mf.warp(image, ddf, padding="zeros") == 0).all()
        out = mf.warp(image, ddf, mode="cubic", padding="border")
        assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------ bad input


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_bad_inputs():
    image = torch.rand(2, 1, 5, 6, 7)
    ddf = torch.zeros(2, 3, 5, 6, 7)
    _raises(TypeError, "image must be a torch.Tensor", mf.warp, image.numpy(), ddf)
    _raises(ValueError, r"image must have shape \(B, C, H, W\)", mf.warp, image[0, 0], ddf)
    _raises(ValueError, r"image must have shape", mf.warp, image[..., None], ddf)
    _raises(TypeError, "image must be a floating tensor", mf.warp, image.long(), ddf)
    _raises(ValueError, "batch sizes must be equal or 1", mf.warp, image, torch.zeros(3, 3, 5, 6, 7))
    _raises(ValueError, r"ddf must have shape \(B, 3, \*spatial\)", mf.warp, image, torch.zeros(2, 2, 5, 6, 7))
    _raises(ValueError, r"ddf must have shape", mf.warp, image, torch.zeros(2, 3, 5, 6))
    _raises(TypeError, "ddf must have dtype torch.float32", mf.warp, image, ddf.double())
    _raises(TypeError, "ddf must be a torch.Tensor", mf.warp, image, None)
    _raises(ValueError, "ddf is on meta but image is on cpu", mf.warp, image, ddf.to("meta"))
    _raises(ValueError, "image is empty", mf.warp, torch.rand(2, 0, 5, 6, 7), ddf)
    _raises(ValueError, "image is empty", mf.warp, torch.rand(2, 1, 0, 6, 7), ddf)
    _raises(ValueError, "ddf is empty", mf.warp, image, torch.zeros(2, 3, 0, 6, 7))
    _raises(ValueError, "mode must be one of", mf.warp, image, ddf, mode="bilinear")
    _raises(ValueError, "padding must be one of", mf.warp, image, ddf, padding="constant")
    _raises(TypeError, "prefiltered must be a bool", mf.warp, image, ddf, prefiltered="yes")
    _raises(ValueError, "padding must be one of", mf.spline_coefficients, image, "wrap")
    theta = torch.eye(3, 4)[None]
    _raises(ValueError, r"theta must have shape \(B, 3, 4\)", mf.affine_warp, image, torch.eye(3)[None])
    _raises(TypeError, "theta must have dtype", mf.affine_warp, image, theta.double())
    _raises(ValueError, "shape must be 3 positive sizes", mf.affine_warp, image, theta, shape=(4, 4))
    _raises(ValueError, "shape must be 3 positive sizes", mf.affine_warp, image, theta, shape=(4, 0, 4))
    _raises(ValueError, "does not match the ddf", mf.affine_warp, image, theta, shape=(4, 4, 4), ddf=ddf)


def test_direct_op_call_with_bad_arguments_raises_not_crashes():
    image = torch.rand(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="mode must be"):
        ops.warp_forward(image, None, torch.zeros(1, 3, 4, 4, 4), [4, 4, 4], "spline", "zeros")
    with pytest.raises(ValueError, match="ddf shape mismatch"):
        ops.warp_forward(image, None, torch.zeros(1, 3, 4, 4, 4), [4, 4, 5], "linear", "zeros")
    with pytest.raises(TypeError, match="ddf dtype"):
        ops.warp_forward(image, None, torch.zeros(1, 3, 4, 4, 4, dtype=torch.float64), [4, 4, 4], "linear", "zeros")


def test_large_results_are_written_in_full():
    """Results of 8 MiB and more are allocated with huge-page advice (then zero-filled where they
    accumulate): an identity warp returns the image, and its image gradient is the output gradient."""
    image = torch.rand(1, 2, 64, 64, 130, requires_grad=True)
    ddf = torch.zeros(1, 3, 64, 64, 130, requires_grad=True)
    out = mf.warp(image, ddf)
    assert torch.equal(out, image.detach())
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.equal(image.grad, grad)
    assert torch.isfinite(ddf.grad).all()
