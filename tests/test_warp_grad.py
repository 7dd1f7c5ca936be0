"""Gradients of the warp family: gradcheck in float64 and the broadcast reduction."""

import pytest
import torch
from torch.autograd import gradcheck

import medfast as mf
from tests.conftest import MODES, PADDINGS


def _away_from_knots(ddf, shape):
    """Linear/nearest are not differentiable at integer positions: keep samples off them."""
    return ddf + 0.05 * (ddf.frac().abs() < 0.05)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_gradcheck_warp(ndim, mode, padding):
    shape = (4, 5) if ndim == 2 else (3, 4, 5)
    image = torch.rand(2, 2, *shape, dtype=torch.float64, requires_grad=True)
    ddf = _away_from_knots(torch.randn(2, ndim, *shape, dtype=torch.float64) * 2, shape)
    ddf.requires_grad_(mode != "nearest")  # nearest has no gradient w.r.t. positions
    assert gradcheck(lambda i, d: mf.warp(i, d, mode=mode, padding=padding), (image, ddf), atol=1e-7)


@pytest.mark.parametrize("mode", ["linear", "cubic"])
@pytest.mark.parametrize("padding", PADDINGS)
def test_gradcheck_affine_warp_theta(mode, padding):
    image = torch.rand(2, 1, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    theta = torch.eye(3, 4, dtype=torch.float64).repeat(2, 1, 1)
    theta = (theta + 0.1 * torch.randn(2, 3, 4, dtype=torch.float64)).requires_grad_()
    ddf = (0.5 * torch.randn(2, 3, 3, 4, 2, dtype=torch.float64)).requires_grad_()
    fn = lambda i, t, d: mf.affine_warp(i, t, ddf=d, mode=mode, padding=padding)  # noqa: E731
    assert gradcheck(fn, (image, theta, ddf), atol=1e-7)
    fn2 = lambda i, t: mf.affine_warp(i, t, shape=(2, 6, 3), mode=mode, padding=padding)  # noqa: E731
    assert gradcheck(fn2, (image, theta), atol=1e-7)


@pytest.mark.parametrize("padding", PADDINGS)
def test_gradcheck_spline_coefficients(padding):
    image = torch.rand(1, 2, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda i: mf.spline_coefficients(i, padding), (image,))
    one = torch.rand(1, 1, 1, 2, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda i: mf.spline_coefficients(i, padding), (one,))


@pytest.mark.parametrize("mode", MODES)
def test_broadcast_image_gradient_is_sum_over_batch(mode):
    image = torch.rand(1, 3, 6, 7, 5, dtype=torch.float64, requires_grad=True)
    ddf = torch.randn(4, 3, 6, 7, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 3, 6, 7, 5, dtype=torch.float64)
    out = mf.warp(image, ddf, mode=mode)
    (out * weights).sum().backward()
    # Reference: an explicit copy per sample.
    image2 = image.detach().expand(4, -1, -1, -1, -1).clone().requires_grad_()
    ddf2 = ddf.detach().clone().requires_grad_()
    out2 = mf.warp(image2, ddf2, mode=mode)
    (out2 * weights).sum().backward()
    torch.testing.assert_close(out, out2)
    assert image.grad.shape == (1, 3, 6, 7, 5)
    torch.testing.assert_close(image.grad, image2.grad.sum(0, keepdim=True))
    torch.testing.assert_close(ddf.grad, ddf2.grad)


def test_broadcast_theta_and_ddf_gradients():
    image = torch.rand(3, 1, 5, 6, 4, dtype=torch.float64)
    theta = (torch.eye(3, 4, dtype=torch.float64) + 0.05 * torch.randn(3, 4, dtype=torch.float64))[None]
    theta.requires_grad_()
    ddf = torch.randn(1, 3, 5, 6, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda t, d: mf.affine_warp(image, t, ddf=d, mode="cubic")  # noqa: E731
    assert gradcheck(fn, (theta, ddf), atol=1e-7)


def test_only_requested_gradients_are_computed():
    image = torch.rand(1, 1, 5, 5, 5)
    ddf = torch.randn(1, 3, 5, 5, 5, requires_grad=True)
    mf.warp(image, ddf).sum().backward()
    assert image.grad is None and ddf.grad is not None and torch.isfinite(ddf.grad).all()


@pytest.mark.parametrize("channels, image_batch", [(1, 1), (3, 1), (2, 2)])
@pytest.mark.parametrize("padding", PADDINGS)
def test_gradients_match_grid_sample_on_larger_volumes(channels, image_batch, padding):
    """Covers both race-free image-gradient schemes of the CPU launcher (per-thread buffers when
    image_batch x channels < threads, whole planes per thread otherwise) in float32 and float64."""
    import torch.nn.functional as F

    from medfast.ops._reference import ddf_to_grid

    for dtype in (torch.float32, torch.float64):
        image = torch.rand(image_batch, channels, 20, 22, 24, dtype=dtype)
        ddf = torch.randn(2, 3, 20, 22, 24, dtype=dtype) * 3
        weights = torch.randn(2, channels, 20, 22, 24, dtype=dtype)
        i1, d1 = image.clone().requires_grad_(), ddf.clone().requires_grad_()
        (mf.warp(i1, d1, padding=padding) * weights).sum().backward()
        i2, d2 = image.clone().requires_grad_(), ddf.clone().requires_grad_()
        expanded = i2.expand(2, -1, -1, -1, -1)
        ref = F.grid_sample(expanded, ddf_to_grid(d2), padding_mode=padding, align_corners=True)
        (ref * weights).sum().backward()
        tol = 1e-4 if dtype == torch.float32 else 1e-9
        torch.testing.assert_close(i1.grad, i2.grad, atol=tol, rtol=tol)
        torch.testing.assert_close(d1.grad, d2.grad, atol=tol * 10, rtol=tol)
