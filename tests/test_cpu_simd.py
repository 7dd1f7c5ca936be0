"""The AVX2 CPU fast path (linear/nearest, float32, 3D and 2D through a one-plane view, zeros/border/reflection)
against the generic launcher."""

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

import medfast as mf
from tests.conftest import PADDINGS, identity_grid
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
@pytest.mark.parametrize("padding", PADDINGS)
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


@pytest.mark.parametrize("padding", PADDINGS)
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
@pytest.mark.parametrize("padding", PADDINGS)
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


@pytest.mark.parametrize("padding", PADDINGS)
def test_simd_chunked_image_gradient(padding):
    """One image plane and several threads: each thread scatters into its own gradient buffer (summed in a
    fixed order); the pair scatter and prefetch on a volume large enough to be split."""
    image = torch.rand(1, 1, 20, 20, 24)
    ddf = torch.nn.functional.interpolate(torch.randn(1, 3, 3, 3, 3) * 3, size=(20, 20, 24), mode="trilinear")
    weights = torch.randn(1, 1, 20, 20, 24)
    _check_threads(2, lambda: _forward_backward(image, None, ddf, padding, weights), atol=1e-5)


@pytest.mark.parametrize("channels", [1, 2, 3, 5])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("padding", PADDINGS)
def test_simd_row_stencils_shared_by_channels(channels, threads, padding):
    """Linear pairs compute the stencils of a row once and then sweep one channel plane at a time
    (channels 1, 2, 3, 5). Rows with a tail of W % 8 voxels and a NaN lane, channel counts split
    between threads; results bitwise reproducible."""
    image = torch.rand(1, channels, 9, 75, 21)
    ddf = torch.nn.functional.interpolate(torch.randn(1, 3, 3, 4, 3) * 3, size=(8, 70, 21), mode="trilinear")
    ddf[0, 1, 3, 40, 9] = float("nan")
    weights = torch.randn(1, channels, 8, 70, 21)
    _check_threads(threads, lambda: _forward_backward(image, None, ddf, padding, weights), atol=1e-5)


@pytest.mark.parametrize("mode, padding", [("linear", "zeros"), ("linear", "border"), ("linear", "reflection"),
                                           ("nearest", "zeros")])
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


def _reflection_positions(n, shape, gen):
    """Positions along an axis of n samples (float32, `shape`) for the reflection fold: fold points and ties
    (k (n - 1), +-1e-3, n - 0.5 + periods), tiny negatives, several periods out, and with probability ~0.1
    a far value (|x| >= 2^22: the AVX2 group takes the scalar taps; 1e13 and inf: clamped to 1e12)."""
    p = max(2 * (n - 1), 1)
    special = [k * (n - 1) + e for k in range(-4, 5) for e in (0.0, 1e-3, -1e-3, 0.5, -0.5)]
    special += [n - 0.5 + k * p for k in range(-3, 4)] + [-1e-10, -0.0, 40.25 * p, -37.75 * p, 1e5 + 0.5, -3e6 - 0.25]
    far = [4194304.0, -4194304.0, 4194303.5, 5e6 + 0.5, -5e6 - 0.5, 3e7, -3e7 + 2, 1e13, float("inf"), float("-inf")]
    x = (torch.rand(shape, generator=gen) * 7 - 3) * p  # about (-3, 4) periods
    pick = torch.rand(shape, generator=gen)
    spec = torch.tensor(special)[torch.randint(len(special), shape, generator=gen)]
    farv = torch.tensor(far)[torch.randint(len(far), shape, generator=gen)]
    x = torch.where(pick < 0.35, spec, x)
    return torch.where(pick > 0.9, farv, x).float()


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("in_shape, out_shape", [
    ((5, 7, 13), (3, 4, 37)), ((1, 6, 19), (2, 3, 29)), ((4, 1, 11), (2, 5, 24)), ((3, 5, 1), (2, 2, 19)),
    ((2, 2, 2), (2, 3, 16)), ((9, 23), (7, 45)), ((1, 17), (3, 33)), ((13, 1), (4, 27)), ((2, 2), (5, 17)),
])
@pytest.mark.parametrize("threads", [1, 2])
def test_simd_reflection_folds_as_the_generic_path_and_scipy(mode, in_shape, out_shape, threads):
    """Reflection (scipy "mirror") in the AVX2 rows, 3D and 2D (one-plane view), odd and size-1 axes: the
    taps at and beyond the edges, several periods out, far (|x| >= 2^22), clamped (1e13, inf) and NaN
    positions, ties of nearest past the last sample. Values and both gradients as the generic path's;
    values as scipy's map_coordinates(mode="mirror") wherever |position| <= 1e8."""
    gen = torch.Generator().manual_seed(len(in_shape) * 100 + sum(in_shape))
    nd = len(in_shape)
    image = torch.rand(1, 2, *in_shape, generator=gen)
    pos = torch.stack([_reflection_positions(n, out_shape, gen) for n in in_shape])[None]
    ddf = pos - identity_grid(out_shape, torch.float32)[None]
    ddf[(0, 0) + (0,) * (nd - 1) + (5,)] = float("nan")  # a NaN lane: the rest of that row is scalar
    weights = torch.randn(1, 2, *out_shape, generator=gen)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast, slow = _both(lambda: _forward_backward(image, None, ddf, "reflection", weights, mode))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, equal_nan=True)
    assert fast[2].isnan().sum() == nd and torch.isfinite(fast[1]).all()
    seen = (identity_grid(out_shape, torch.float32)[None] + ddf)[0].double()  # the float32 positions used
    ref = np.stack([ndi.map_coordinates(image[0, c].double().numpy(), seen.nan_to_num(0).numpy(),
                                        order=0 if mode == "nearest" else 1, mode="mirror") for c in range(2)])
    near = (seen.abs() <= 1e8).all(0)
    assert near.float().mean() > 0.3 and (~near).any()
    torch.testing.assert_close(fast[0][0][:, near].double(), torch.from_numpy(ref)[:, near], atol=1e-5, rtol=1e-5)
