"""Fused LNCC op against MONAI's LocalNormalizedCrossCorrelationLoss (rectangular kernel):
values and gradients, gradcheck in float64, opcheck, torch.compile and bad inputs."""

import pytest
import torch
from monai.losses import LocalNormalizedCrossCorrelationLoss as MonaiLNCC

import medfast as mf
from medfast.losses import LocalNormalizedCrossCorrelationLoss
from tests.conftest import requires_cuda


def _pair(shape, dtype=torch.float64, B=2, C=1):
    """A correlated pair: target, and pred = smooth nonlinear function of target + noise."""
    t = torch.rand(B, C, *shape, dtype=dtype)
    p = torch.tanh(2 * t - 0.7) + 0.3 * torch.rand(B, C, *shape, dtype=dtype)
    return p.requires_grad_(), t.requires_grad_()


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


@pytest.mark.parametrize("shape,k", [((9, 10, 11), 3), ((12, 7, 9), 5), ((6, 5, 7), 9), ((23, 17), 7), ((8, 9), 3)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_monai_float64(shape, k, reduction):
    p, t = _pair(shape)
    kw = dict(kernel_size=k, reduction=reduction, smooth_nr=1e-4, smooth_dr=1e-3)
    ref = MonaiLNCC(spatial_dims=len(shape), kernel_type="rectangular", **kw)(p, t)
    ours = LocalNormalizedCrossCorrelationLoss(spatial_dims=len(shape), **kw)(p, t)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(ours)  # a generic upstream gradient for "none"
    for a, b in zip(_grads((ours * w).sum(), p, t), _grads((ref * w).sum(), p, t)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_matches_monai_float32_within_1e5(ndim):
    shape = (40, 36, 33) if ndim == 3 else (96, 87)
    p, t = _pair(shape, dtype=torch.float32, B=1, C=2)
    p = (p.detach() * 100).requires_grad_()  # intensities of a few hundred, as in MR/CT
    t = (t.detach() * 100).requires_grad_()
    ref = MonaiLNCC(spatial_dims=ndim, kernel_size=9)(p, t)
    ours = mf.lncc_loss(p, t, kernel_size=9)
    assert abs(ours.item() - ref.item()) < 1e-5
    for a, b in zip(_grads(ours, p, t), _grads(ref, p, t)):
        # gradients are O(1 / numel); compare relative to their scale
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_anisotropic_kernel_and_default_smoothing():
    p, t = _pair((10, 12, 9))
    ours = mf.lncc_loss(p, t, kernel_size=(3, 5, 1))
    # MONAI only takes one size for all axes: compare with the 1-D window along the last axis alone
    ref = MonaiLNCC(spatial_dims=3, kernel_size=7)(p, t)
    assert ours.item() != pytest.approx(ref.item())
    # (k, k, k) through a sequence equals the int form
    torch.testing.assert_close(mf.lncc_loss(p, t, kernel_size=(5, 5, 5)), mf.lncc_loss(p, t, kernel_size=5))
    # the 1-voxel window along an axis: the map is that of each 2-D slice with a (5, 3) window
    ncc3 = mf.local_ncc(p, t, kernel_size=(1, 5, 3))
    ncc2 = torch.stack([mf.local_ncc(p[:, :, i], t[:, :, i], kernel_size=(5, 3)) for i in range(p.shape[2])], 2)
    torch.testing.assert_close(ncc3, ncc2)


def test_identical_images_give_minus_one_and_values_in_range():
    t = torch.rand(1, 1, 16, 16, 16, dtype=torch.float64)
    # (zero padding: p = 2 t stays linear in t across the border, p = 2 t + 1 would not)
    assert mf.lncc_loss(2 * t, t, kernel_size=5, smooth_dr=1e-12).item() == pytest.approx(-1.0, abs=1e-9)
    p, t = _pair((16, 16, 16))
    ncc = mf.local_ncc(p, t, kernel_size=5)
    assert ncc.min() >= 0 and ncc.max() <= 1 + 1e-12


@pytest.mark.parametrize("ndim", [2, 3])
def test_gradcheck(ndim):
    shape = (5, 6, 4) if ndim == 3 else (7, 6)
    p, t = _pair(shape, B=1, C=2)
    torch.autograd.gradcheck(lambda a, b: mf.local_ncc(a, b, kernel_size=3, smooth_nr=1e-3, smooth_dr=1e-4),
                             (p, t))
    torch.autograd.gradcheck(lambda a: mf.lncc_loss(a, t.detach(), kernel_size=(3, 5, 1)[:ndim]), (p,))


def test_opcheck_and_compile():
    p, t = _pair((6, 7, 5), dtype=torch.float32)
    torch.library.opcheck(torch.ops.medfast.lncc.default, (p, t, [3, 3, 3], 0.0, 1e-5))
    torch.library.opcheck(torch.ops.medfast.lncc.default, (p.double(), t.double(), [5, 3, 1], 1e-3, 1e-3))
    g = torch.rand(p.shape)
    sums = torch.ops.medfast.lncc(p.detach(), t.detach(), [3, 3, 3], 0.0, 1e-5)[1]
    torch.library.opcheck(torch.ops.medfast.lncc_backward.default,
                          (g, p.detach(), t.detach(), sums, [3, 3, 3], 0.0, 1e-5))
    compiled = torch.compile(lambda a, b: mf.lncc_loss(a, b, kernel_size=3), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(p, t), mf.lncc_loss(p, t, kernel_size=3))


def test_half_inputs_and_deterministic():
    p, t = _pair((8, 9, 10), dtype=torch.float32)
    out = mf.lncc_loss(p.half(), t.half(), kernel_size=3)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(mf.lncc_loss(p.half().float(), t.half().float(), kernel_size=3).item())
    a = _grads(mf.lncc_loss(p, t, kernel_size=5), p, t)
    b = _grads(mf.lncc_loss(p, t, kernel_size=5), p, t)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_bad_inputs():
    p, t = _pair((6, 6, 6), dtype=torch.float32)
    with pytest.raises(TypeError, match="pred must be a torch.Tensor"):
        mf.lncc_loss(p.detach().numpy(), t)
    with pytest.raises(ValueError, match="target must have pred's shape"):
        mf.lncc_loss(p, t[:, :, :5])
    with pytest.raises(ValueError, match="kernel_size must be positive odd"):
        mf.lncc_loss(p, t, kernel_size=4)
    with pytest.raises(ValueError, match="kernel_size must have 3 entries"):
        mf.lncc_loss(p, t, kernel_size=(3, 3))
    with pytest.raises(TypeError, match="kernel_size must be an int"):
        mf.lncc_loss(p, t, kernel_size=True)
    with pytest.raises(TypeError, match="must be float32"):
        mf.lncc_loss(p.int(), t.int())
    with pytest.raises(ValueError, match="pred must have shape"):
        mf.lncc_loss(p[0, 0], t[0, 0])
    with pytest.raises(ValueError, match="reduction must be one of"):
        mf.lncc_loss(p, t, reduction="max")
    with pytest.raises(ValueError, match="smooth_dr must be > 0"):
        mf.lncc_loss(p, t, smooth_dr=0.0)
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        LocalNormalizedCrossCorrelationLoss(spatial_dims=1)
    with pytest.raises(ValueError, match="kernel_type must be one of"):
        LocalNormalizedCrossCorrelationLoss(kernel_type="gaussian")


@requires_cuda
def test_cuda_matches_cpu():
    p, t = _pair((20, 18, 17), dtype=torch.float32)
    lc = mf.lncc_loss(p, t, kernel_size=(5, 7, 3))
    gc = _grads(lc, p, t)
    pc, tc = p.detach().cuda().requires_grad_(), t.detach().cuda().requires_grad_()
    lg = mf.lncc_loss(pc, tc, kernel_size=(5, 7, 3))
    gg = _grads(lg, pc, tc)
    torch.testing.assert_close(lg.cpu(), lc, rtol=1e-5, atol=1e-6)
    for a, b in zip(gg, gc):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-9)
    p2, t2 = _pair((40, 33), dtype=torch.float64)
    torch.testing.assert_close(mf.local_ncc(p2.cuda(), t2.cuda(), 9).cpu(), mf.local_ncc(p2, t2, 9))


@pytest.mark.parametrize("kernel_size", ["33", (3.7, 3.2), (3, True)])
def test_kernel_size_must_be_ints(kernel_size):
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(TypeError, match="kernel_size must be an int or a sequence of 2 ints"):
        mf.lncc_loss(x, x, kernel_size=kernel_size)
