"""The AVX2 CPU fast path (linear/nearest, float32, 3D, zeros/border) against the generic launcher."""

import pytest
import torch

import medfast as mf
from tests.conftest import simd_and_generic as _both

pytestmark = pytest.mark.skipif(mf.build_info()["cpu_simd"] != "avx2", reason="CPU without AVX2")


def _check_threads(threads, run, atol):
    """run() with the SIMD and the generic path on `threads` threads: close to each other, and the SIMD
    results bitwise equal on a second run."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast, slow = _both(run)
        again, _ = _both(run)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, equal_nan=True)
    for a, b in zip(fast, again):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())  # bitwise reproducible


def _forward_backward(image, theta, ddf, padding, weights, mode="linear"):
    image = image.detach().clone().requires_grad_()
    ddf = None if ddf is None else ddf.detach().clone().requires_grad_()
    theta = None if theta is None else theta.detach().clone().requires_grad_()
    if theta is None:
        out = mf.warp(image, ddf, padding=padding, mode=mode)
    else:
        out = mf.affine_warp(image, theta, ddf=ddf, shape=weights.shape[2:], padding=padding, mode=mode)
    (out * weights).sum().backward()
    return [out.detach()] + [t.grad for t in (image, theta, ddf) if t is not None]


@pytest.mark.parametrize("mode", ["linear", "nearest"])
@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("shape", [(6, 5, 21), (3, 4, 8), (5, 3, 5), (9, 7, 40)])
@pytest.mark.parametrize("image_batch", [1, 2])
def test_simd_matches_generic(mode, padding, shape, image_batch):
    image = torch.rand(image_batch, 3, 7, 9, 11)
    ddf = torch.randn(2, 3, *shape) * 4
    ddf[1, 0, 1, 1, shape[2] // 2] = float("nan")  # a NaN lane in a vector block
    weights = torch.randn(2, 3, *shape)
    fast, slow = _both(lambda: _forward_backward(image, None, ddf, padding, weights, mode))
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("last", [1, 2, 3, 64])
def test_simd_pairs_edge_sizes(padding, last):
    """Linear taps along the contiguous axis are loaded as pairs [p, p + 1]: image widths 1 (no pairs),
    2 and 3 (every tap clamped onto the pair), and a wide smooth field (adjacent lanes share elements)."""
    image = torch.rand(1, 2, 6, 5, last)
    ddf = torch.randn(1, 3, 4, 5, 24) * (3 if last < 64 else 1)
    ddf[:, 2] += torch.linspace(-4, last + 4, 24)  # sweep the whole row, past both ends
    weights = torch.randn(1, 2, 4, 5, 24)
    fast, slow = _both(lambda: _forward_backward(image, None, ddf, padding, weights))
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["linear", "nearest"])
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_simd_affine_and_strided_image(mode, padding):
    big = torch.rand(2, 2, 14, 9, 24)
    image = big[:, :, ::2, :, ::2]  # non-contiguous image: gathers use its strides
    theta = torch.eye(3, 4).repeat(2, 1, 1) + 0.2 * torch.randn(2, 3, 4)
    ddf = torch.randn(2, 3, 5, 6, 17)
    weights = torch.randn(2, 2, 5, 6, 17)
    fast, slow = _both(lambda: _forward_backward(image, theta, ddf, padding, weights, mode))
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    fast, slow = _both(lambda: _forward_backward(image, theta, None, padding, weights, mode))
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_simd_channels_last_ddf_uses_generic_path_correctly():
    image = torch.rand(1, 1, 8, 8, 8)
    ddf = (torch.randn(1, 3, 8, 8, 16) * 2).to(memory_format=torch.channels_last_3d)
    fast, slow = _both(lambda: mf.warp(image, ddf))
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "soft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fused_loss_avx2_matches_generic(activation, dtype):
    """The loss loops compiled for AVX2 + FMA give the generic loops' values and gradients."""
    logits = (torch.randn(2, 5, 9, 10, 11) * 4).to(dtype)
    if activation == "softmax":
        target = torch.randint(0, 5, (2, 9, 10, 11))
        target[0, 0] = 255
        kw = {"ignore_index": 255, "voxel_weight": torch.rand(2, 9, 10, 11)}
    else:
        target = torch.rand(2, 5, 9, 10, 11).to(dtype)
        kw = {"activation": "sigmoid" if activation == "sigmoid" else "softmax"}

    def run():
        z = logits.detach().clone().requires_grad_()
        loss = mf.dice_ce_loss(z, target, **kw)
        loss.backward()
        return loss.detach(), z.grad

    (lf, gf), (ls, gs) = _both(run)
    tol = 1e-12 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(lf, ls, rtol=tol, atol=tol)
    torch.testing.assert_close(gf.double(), gs.double(), rtol=tol, atol=tol * float(gs.abs().max()))


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_simd_chunked_image_gradient(padding):
    """One image plane and several threads: each thread scatters into its own gradient buffer (summed in a
    fixed order); the pair scatter and prefetch on a volume large enough to be split."""
    image = torch.rand(1, 1, 20, 20, 24)
    ddf = torch.nn.functional.interpolate(torch.randn(1, 3, 3, 3, 3) * 3, size=(20, 20, 24), mode="trilinear")
    weights = torch.randn(1, 1, 20, 20, 24)
    _check_threads(2, lambda: _forward_backward(image, None, ddf, padding, weights), atol=1e-5)


@pytest.mark.parametrize("channels", [1, 2, 3, 5])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_simd_row_stencils_shared_by_channels(channels, threads, padding):
    """Linear pairs compute the stencils of a row once and then sweep one channel plane at a time
    (channels 1, 2, 3, 5). Rows with a tail of W % 8 voxels and a NaN lane, channel counts split
    between threads; results bitwise reproducible."""
    image = torch.rand(1, channels, 9, 75, 21)
    ddf = torch.nn.functional.interpolate(torch.randn(1, 3, 3, 4, 3) * 3, size=(8, 70, 21), mode="trilinear")
    ddf[0, 1, 3, 40, 9] = float("nan")
    weights = torch.randn(1, channels, 8, 70, 21)
    _check_threads(threads, lambda: _forward_backward(image, None, ddf, padding, weights), atol=1e-5)


@pytest.mark.parametrize("mode, padding", [("linear", "zeros"), ("linear", "border"), ("nearest", "zeros")])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("scale", [1.0, 12.0])
@pytest.mark.parametrize("affine", [False, True])
def test_simd_one_sweep_backward(mode, padding, channels, threads, scale, affine):
    """Both gradients in one sweep: one thread; or blocks of output slices with disjoint scatter
    targets, even blocks in parallel then odd ones (small displacements), falling back to the
    two-pass scheme when the targets overlap (large ones). Against the generic path; bitwise
    reproducible."""
    image = torch.rand(1, channels, 30, 12, 19)
    ddf = torch.nn.functional.interpolate(torch.randn(1, 3, 3, 3, 3) * scale, size=(28, 12, 19), mode="trilinear")
    ddf[0, 0, 20, 5, 3] = float("nan")
    theta = torch.eye(3, 4).unsqueeze(0) + 0.03 * torch.randn(1, 3, 4) if affine else None
    weights = torch.randn(1, channels, 28, 12, 19)
    _check_threads(threads, lambda: _forward_backward(image, theta, ddf, padding, weights, mode), atol=1e-4)
