"""The operators inside torch.autocast, the AMP region a training loop runs its forward in: they take part in
autocast as F.grid_sample does (its float32 list): a float16/bfloat16 image is read in float32, a network's
low-precision displacement / affine / velocity is upcast to the image's position dtype, and the result equals
the op on the upcast inputs outside autocast. Outside autocast the strict dtype checks stay."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import medfast as mf
from medfast.losses import registration as R
from medfast.nets.registration import affine_ddf
from medfast.tasks.registration import RegistrationConfig, RegistrationNet, level_theta, register_pair
from tests.conftest import requires_cuda

LOW = [torch.bfloat16, torch.float16]


def _data(low, ndim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (6, 7, 5) if ndim == 3 else (9, 8)
    image = torch.rand(2, 2, *shape, generator=g)
    ddf = (torch.randn(2, ndim, *shape, generator=g) * 1.5).to(low)  # a network's output under autocast
    theta = (torch.eye(ndim, ndim + 1) + 0.05 * torch.randn(2, ndim, ndim + 1, generator=g)).to(low)
    weight = torch.randn(2, 2, *shape, generator=g)
    return image, ddf, theta, weight


def _leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).requires_grad_()


def _check(fn, low_inputs, up_dtypes, weight_fn, device="cpu", autocast_dtype=torch.bfloat16, exact=True):
    """fn under autocast with low-precision leaves == fn outside autocast with the leaves upcast; gradients
    equal the reference's cast back to each leaf's dtype (as autograd does for F.grid_sample). (Not bitwise on
    CUDA: its backward may sum with atomics.)"""
    tol = {"rtol": 0, "atol": 0} if exact else {}
    leaves = [_leaf(t) for t in low_inputs]
    with torch.autocast(device, dtype=autocast_dtype):
        out = fn(*leaves)
    ref_leaves = [_leaf(t, d) for t, d in zip(low_inputs, up_dtypes)]
    ref = fn(*ref_leaves)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **tol)
    w = weight_fn(ref)
    grads = torch.autograd.grad((out * w).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * w).sum(), ref_leaves)
    for g, rg, leaf in zip(grads, ref_grads, leaves):
        assert g.dtype == leaf.dtype
        torch.testing.assert_close(g, rg.to(leaf.dtype), **tol)
    return out


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("mode", ["linear", "cubic"])
def test_warp_under_autocast_equals_float32_of_upcast_inputs(low, mode):
    image, ddf, _, weight = _data(low)
    out = _check(lambda i, d: mf.warp(i, d, mode=mode), (image, ddf), (torch.float32, torch.float32),
                 lambda r: weight, autocast_dtype=low)
    # the dtype F.grid_sample gives in the same autocast region (on its float32 list)
    grid = torch.zeros(2, 6, 7, 5, 3, dtype=low)
    with torch.autocast("cpu", dtype=low):
        assert out.dtype == F.grid_sample(image, grid, align_corners=True).dtype == torch.float32
        # a half image is read in float32, as grid_sample reads it
        assert F.grid_sample(image.to(low), grid, align_corners=True).dtype == torch.float32
    _check(lambda i, d: mf.warp(i, d, mode=mode), (image.to(low), ddf), (torch.float32, torch.float32),
           lambda r: weight, autocast_dtype=low)


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_warp_theta_and_ddf_under_autocast(ndim):
    image, ddf, theta, weight = _data(torch.bfloat16, ndim)
    _check(lambda i, t, d: mf.affine_warp(i, t, ddf=d), (image, theta, ddf), [torch.float32] * 3,
           lambda r: weight)
    _check(lambda i, t: mf.affine_warp(i, t, shape=[4] * ndim), (image, theta), [torch.float32] * 2,
           lambda r: torch.ones_like(r))


def test_float64_image_upcasts_the_positions_to_float64():
    image, ddf, theta, weight = _data(torch.bfloat16)
    out = _check(lambda i, d: mf.warp(i, d), (image.double(), ddf), (torch.float64, torch.float64),
                 lambda r: weight.double())
    assert out.dtype == torch.float64
    _check(lambda i, t: mf.affine_warp(i, t), (image.double(), theta.float()), (torch.float64, torch.float64),
           lambda r: weight.double())


def test_compose_and_integrate_under_autocast():
    _, ddf, _, _ = _data(torch.bfloat16)
    w = torch.randn(2, 3, 6, 7, 5)
    _check(lambda a, b: mf.compose(a, b), (ddf, ddf.flip(0)), (torch.float32, torch.float32), lambda r: w)
    _check(lambda v: mf.integrate(v, 4), (ddf,), (torch.float32,), lambda r: w, autocast_dtype=torch.float16)
    # a float64 field beside a low-precision one: both float64 (promotion, never a downcast)
    out = _check(lambda a, b: mf.compose(a, b), (ddf.double(), ddf), (torch.float64, torch.float64),
                 lambda r: w.double())
    assert out.dtype == torch.float64


@pytest.mark.parametrize("low", LOW)
def test_resample_of_a_half_image_under_autocast_is_float32(low):
    image, _, _, _ = _data(low)
    a_in = np.diag([1.0, 1.2, 0.9, 1.0])
    a_out = np.diag([0.8, 1.0, 1.1, 1.0])
    a_out[:3, 3] = (0.3, -0.2, 0.1)
    _check(lambda i: mf.resample(i, a_in, a_out, (5, 6, 4)), (image.to(low),), (torch.float32,),
           lambda r: torch.ones_like(r), autocast_dtype=low)


def test_strict_dtypes_outside_autocast_and_no_downcast_inside():
    image, ddf, theta, _ = _data(torch.bfloat16)
    with pytest.raises(TypeError, match="ddf must have dtype torch.float32"):
        mf.warp(image, ddf)
    with pytest.raises(TypeError, match="theta must have dtype torch.float32"):
        mf.affine_warp(image, theta)
    with pytest.raises(TypeError, match="velocity must be float32 or float64"):
        mf.integrate(ddf)
    with pytest.raises(TypeError, match="ddf_a must be float32 or float64"):
        mf.compose(ddf, ddf)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="ddf must have dtype torch.float32 .* got torch.float64"):
            mf.warp(image, ddf.double())
        with pytest.raises(TypeError, match="theta must have dtype torch.float32 .* got torch.float64"):
            mf.affine_warp(image, theta.double())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):  # an autocast region switched off
        with pytest.raises(TypeError, match="ddf must have dtype"):
            mf.warp(image, ddf)


def test_theta_gradient_of_a_backward_run_inside_autocast():
    # (the theta gradient was a matmul, which autocast ran in bfloat16 when backward ran inside the region)
    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 1, 24, 26, 22, generator=g, requires_grad=True)
    theta = (torch.eye(3, 4) + 0.05 * torch.randn(1, 3, 4, generator=g)).requires_grad_()
    w = torch.randn(1, 1, 24, 26, 22, generator=g)
    ref = torch.autograd.grad((mf.affine_warp(image, theta) * w).sum(), (image, theta))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.autograd.grad((mf.affine_warp(image, theta) * w).sum(), (image, theta))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_compile_under_autocast():
    image, ddf, theta, weight = _data(torch.bfloat16)

    def f(i, d, t):
        return (mf.affine_warp(i, t, ddf=mf.integrate(d, 2)) * weight).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    leaves = [_leaf(t) for t in (image, ddf, theta)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = compiled(*leaves)
        expected = f(*leaves)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(expected, leaves)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_registration_losses_under_autocast():
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(2, 1, 12, 13, 11, generator=g)
    target = (pred + 0.2 * torch.rand(2, 1, 12, 13, 11, generator=g)).clamp(0, 1)
    # mutual information: its joint-histogram einsum is a bmm, which CPU autocast ran in bfloat16 (1e-4 off)
    ref = R.global_mutual_information(pred, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = R.global_mutual_information(pred, target)
        lncc = mf.lncc_loss(pred.bfloat16(), target)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(lncc, mf.lncc_loss(pred.bfloat16().float(), target), rtol=0, atol=0)
    # regularizers of a network's bfloat16 displacement: computed in float32 (were bfloat16 arithmetic)
    z = torch.linspace(0, 1, 16)
    ddf = (8 + 4 * torch.sin(3 * z)[:, None, None] * torch.cos(2 * z)[None, :, None]).expand(1, 3, 16, 16, 16)
    for fn in (R.bending_energy, R.gradient_norm):
        _check(fn, (ddf.bfloat16(),), (torch.float32,), lambda r: 1.0)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("low", LOW)
def test_cuda_autocast_equals_float32_of_upcast_inputs(low):
    image, ddf, theta, weight = _data(low)
    image, ddf, theta, weight = image.cuda(), ddf.cuda(), theta.cuda(), weight.cuda()
    kw = {"device": "cuda", "autocast_dtype": low, "exact": False}
    _check(lambda i, d: mf.warp(i, d), (image, ddf), (torch.float32, torch.float32), lambda r: weight, **kw)
    _check(lambda i, t, d: mf.affine_warp(i, t, ddf=d), (image.to(low), theta, ddf), [torch.float32] * 3,
           lambda r: weight, **kw)
    _check(lambda v: mf.integrate(v, 3), (ddf,), (torch.float32,), lambda r: torch.ones_like(r), **kw)
    p = torch.rand(2, 1, 10, 11, 12, device="cuda")
    t = p.sqrt()
    ref = R.global_mutual_information(p, t)
    with torch.autocast("cuda", dtype=low):
        got = R.global_mutual_information(p, t)  # (CUDA autocast lists einsum itself)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def _affine_ddf_np(theta, shape):
    """float64 numpy reference of ``theta @ [x; 1] - x`` on the voxel grid."""
    theta = np.asarray(theta, dtype=np.float64)
    n = len(shape)
    x = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")).reshape(n, -1)
    out = theta[:, :, :n] @ x + theta[:, :, n:] - x
    return out.reshape(theta.shape[0], n, *shape)


def _centred_to_voxel_np(centred, shape):
    centred = np.asarray(centred, dtype=np.float64)
    n = len(shape)
    c = (np.asarray(shape, dtype=np.float64) - 1) / 2
    h = np.maximum(np.asarray(shape, dtype=np.float64) - 1, 1) / 2
    a = h[:, None] * centred[:, :, :n] / h[None, :]
    t = h * centred[:, :, n] + c - a @ c
    return np.concatenate([a, t[..., None]], -1)


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("shape", [(64, 56, 60), (150, 130)])
def test_affine_ddf_and_level_theta_of_float32_affines_under_autocast(low, shape):
    # (the affine maths were matmuls, which autocast ran in bfloat16/float16: 0.37 voxels off at 64^3)
    n = len(shape)
    theta = torch.eye(n, n + 1)[None].clone()
    theta[0] += torch.tensor([[0.01, 0.02, 0.0, 1.3], [-0.02, -0.01, 0.01, -0.7], [0.0, -0.01, 0.005, 0.4]])[:n][
        :, [*range(n), 3]]
    w = torch.randn(1, n, *shape, generator=torch.Generator().manual_seed(0))
    leaf = theta.clone().requires_grad_()
    with torch.autocast("cpu", dtype=low):
        ddf = affine_ddf(leaf, shape)
        (grad,) = torch.autograd.grad((ddf * w).sum(), leaf)  # a backward run inside the region, too
        lt = [level_theta(theta, shape, f) for f in (1, 2)]
    assert ddf.dtype == torch.float32
    np.testing.assert_allclose(ddf.detach().numpy(), _affine_ddf_np(theta, shape), rtol=0, atol=2e-5)
    x = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")).reshape(n, -1)
    wn = w.double().numpy().reshape(n, -1)
    ref_grad = np.concatenate([wn @ x.T, wn.sum(1, keepdims=True)], 1)  # d sum(w ddf) / d theta
    np.testing.assert_allclose(grad[0].numpy(), ref_grad, rtol=1e-5, atol=1e-3)
    for f, got in zip((1, 2), lt):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, level_theta(theta, shape, f), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(lt[0].numpy(), _centred_to_voxel_np(theta, shape), rtol=0, atol=1e-5)


def test_registration_net_affine_part_under_autocast():
    # the network layers run in bfloat16; the voxel affine and its displacement are then float32 maths of the
    # head's output (c, h were built in the head's bfloat16, theta @ grid ran in bfloat16: 0.2 voxels off)
    torch.manual_seed(0)
    net = RegistrationNet(3, 2, 4, depth=1, global_net=True)
    with torch.no_grad():
        net.globalnet.head.bias.add_(torch.tensor([0.01, 0.02, 0, 0.04, -0.02, -0.01, 0.01, -0.02, 0, -0.01,
                                                   0.005, 0.01]))
    seen = {}
    net.globalnet.head.register_forward_hook(lambda m, i, o: seen.update(centred=o.detach()))
    net.local.register_forward_hook(lambda m, i, o: seen.update(u=o.detach()))
    x = torch.rand(1, 2, 40, 48, 44)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theta, ddf = net(x)
    assert seen["centred"].dtype == torch.bfloat16 and theta.dtype == ddf.dtype == torch.float32
    shape = x.shape[2:]
    theta_ref = _centred_to_voxel_np(seen["centred"].float().reshape(1, 3, 4).numpy(), shape)
    np.testing.assert_allclose(theta.detach().numpy(), theta_ref, rtol=0, atol=1e-5)
    ref = _affine_ddf_np(theta_ref, shape) + seen["u"].double().numpy()
    np.testing.assert_allclose(ddf.detach().numpy(), ref, rtol=0, atol=1e-4)


def test_register_pair_inside_autocast_equals_float32():
    # register_pair optimises in float32: an autocast region around it (a validation loop) changes nothing
    # (level_theta's matmul ran in bfloat16, in the forward and in the backward run inside the region)
    z, y, x = np.mgrid[:24, :26, :22]
    fixed = np.exp(-((z - 12) ** 2 + (y - 13) ** 2 + (x - 11) ** 2) / 40.0).astype(np.float32)
    moving = np.exp(-((z - 13.5) ** 2 + (y - 12) ** 2 + (x - 12) ** 2) / 40.0).astype(np.float32)
    cfg = RegistrationConfig(affine_levels=(2, 1), affine_iters=15, deform_levels=(2,), deform_iters=5)
    ref = register_pair(fixed, moving, config=cfg, progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = register_pair(fixed, moving, config=cfg, progress=False)
    torch.testing.assert_close(got.theta, ref.theta, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.ddf, ref.ddf, rtol=0, atol=1e-5)
