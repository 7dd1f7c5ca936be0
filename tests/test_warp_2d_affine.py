"""2D affine_warp on CPU float32 (run by the 3D AVX2 rows on a one-plane view, theta lifted to 3x4) against
F.affine_grid / F.grid_sample in float64, and resample's NumPy route for plain CPU affines against its torch route."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import medfast

PADDINGS = {"zeros": "zeros", "border": "border", "reflection": "reflection"}  # scipy grid-constant/nearest/mirror


def _reference(image, theta, ddf, shape, mode, padding):
    """grid_sample (align_corners=True) on the voxel positions theta @ [x; 1] + ddf, in the dtype of its inputs."""
    axes = torch.meshgrid(*[torch.arange(s, dtype=theta.dtype) for s in shape], indexing="ij")
    hom = torch.stack([*axes, torch.ones(shape, dtype=theta.dtype)])  # (3, H, W)
    pos = torch.einsum("bij,jhw->bihw", theta, hom)
    if ddf is not None:
        pos = pos + ddf
    size = torch.tensor(image.shape[2:], dtype=theta.dtype).view(1, 2, 1, 1)
    grid = (2 * pos / (size - 1) - 1).permute(0, 2, 3, 1).flip(-1)
    if grid.shape[0] != image.shape[0]:
        grid = grid.expand(max(grid.shape[0], image.shape[0]), -1, -1, -1)
        image = image.expand(grid.shape[0], -1, -1, -1)
    return F.grid_sample(image, grid, mode="bilinear" if mode == "linear" else "nearest",
                         padding_mode=PADDINGS[padding], align_corners=True)


def _grads(fn, image, theta, ddf, weights):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (image, theta, ddf)]
    out = fn(*leaves)
    (out * weights).sum().backward()
    return out.detach(), [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("with_ddf", [False, True])
@pytest.mark.parametrize("batches", [(2, 2), (1, 3), (3, 1)])
def test_linear_matches_grid_sample(padding, with_ddf, batches):
    torch.manual_seed(0)
    bi, bt = batches
    shape_in, shape = (13, 17), (11, 19)  # output grid differs from the input's; W not a multiple of 8
    image = torch.randn(bi, 2, *shape_in)
    theta = torch.tensor([[1.1, 0.2, -1.5], [-0.15, 0.9, 2.0]]) + 0.05 * torch.randn(bt, 2, 3)
    ddf = 0.7 * torch.randn(bt, 2, *shape) if with_ddf else None
    weights = torch.randn(max(bi, bt), 2, *shape, dtype=torch.float64)

    def ours(i, t, d):
        return medfast.affine_warp(i, t, shape=shape, ddf=d, padding=padding)

    def ref(i, t, d):
        return _reference(i, t, d, shape, "linear", padding)

    out, (gi, gt, gd) = _grads(ours, image, theta, ddf, weights.float())
    r_out, (r_gi, r_gt, r_gd) = _grads(ref, image.double(), theta.double(), None if ddf is None else ddf.double(),
                                       weights)
    torch.testing.assert_close(out.double(), r_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gi.double(), r_gi, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gt.double(), r_gt, atol=1e-3, rtol=1e-4)  # sums over the grid times coordinates
    if with_ddf:
        torch.testing.assert_close(gd.double(), r_gd, atol=1e-4, rtol=1e-4)
    # and the float64 scalar 2D loop (the route float32 took before) to float32 rounding
    out64, (gi64, gt64, _) = _grads(ours, image.double(), theta.double(), None if ddf is None else ddf.double(),
                                    weights)
    torch.testing.assert_close(out.double(), out64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gt.double(), gt64, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("with_ddf", [False, True])
def test_nearest_matches_grid_sample(padding, with_ddf):
    # eighths plus 0.1 (never a rounding tie, exact in float32): no sample may round differently
    torch.manual_seed(1)
    shape = (12, 21)
    image = torch.randn(2, 3, 10, 18)
    theta = torch.tensor([[[0.875, 0.125, 1.1], [-0.25, 1.125, -2.1]]])
    ddf = torch.randint(-16, 17, (2, 2, *shape)).float() / 8 if with_ddf else None
    weights = torch.randn(2, 3, *shape, dtype=torch.float64)
    out, (gi, _, _) = _grads(lambda i, t, d: medfast.affine_warp(i, t, shape=shape, ddf=d, mode="nearest",
                                                                 padding=padding), image, theta, ddf, weights.float())
    r_out, (r_gi, _, _) = _grads(lambda i, t, d: _reference(i, t, d, shape, "nearest", padding), image.double(),
                                 theta.double(), None if ddf is None else ddf.double(), weights)
    torch.testing.assert_close(out.double(), r_out, atol=0, rtol=0)
    torch.testing.assert_close(gi.double(), r_gi, atol=1e-5, rtol=1e-6)


def test_theta_only_gradients_without_image_grad():
    # position gradient alone (the image needs none), and a theta that moves samples off the image
    torch.manual_seed(2)
    image = torch.randn(1, 1, 16, 16)
    # (perturbed: a sample exactly on a voxel centre has a kink where implementations may pick either side)
    theta = (torch.tensor([[[1.3, 0.4, -3.0], [-0.2, 1.2, 4.0]]]) + 0.01 * torch.randn(1, 2, 3)).requires_grad_()
    medfast.affine_warp(image, theta, shape=(24, 20)).square().sum().backward()
    t64 = theta.detach().double().requires_grad_()
    _reference(image.double(), t64, None, (24, 20), "linear", "zeros").square().sum().backward()
    torch.testing.assert_close(theta.grad.double(), t64.grad, atol=1e-3, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# resample: plain CPU affines take a NumPy float64 solve; tensors that require grad keep the torch route


def _affines(ndim, batch=None, seed=0):
    g = np.random.default_rng(seed)
    shape = (ndim + 1, ndim + 1) if batch is None else (batch, ndim + 1, ndim + 1)
    a = np.zeros(shape)
    a[..., :ndim, :] = g.normal(size=(*shape[:-2], ndim, ndim + 1)) * 0.1
    a[..., :ndim, :ndim] += np.eye(ndim) * 1.5
    a[..., ndim, ndim] = 1
    return a


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("batches", [(None, None), (None, 2), (2, None), (1, 2), (2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resample_numpy_route_matches_torch_route(ndim, batches, dtype):
    shape = (7, 9) if ndim == 2 else (5, 6, 7)
    image = torch.randn(2, 1, *shape, dtype=dtype)
    a_in, a_out = _affines(ndim, batches[0], 1), _affines(ndim, batches[1], 2)
    fast = medfast.resample(image, a_in, torch.from_numpy(a_out), shape)
    slow = medfast.resample(image, torch.from_numpy(a_in).requires_grad_(), torch.from_numpy(a_out), shape)
    torch.testing.assert_close(fast, slow.detach(), atol=1e-6, rtol=1e-6)
    # the independent reference: solve in float64, then affine_warp
    theta = np.linalg.solve(*np.broadcast_arrays(a_in, a_out))[..., :ndim, :].reshape(-1, ndim, ndim + 1)
    ref = medfast.affine_warp(image, torch.from_numpy(theta).to(dtype), shape=shape)
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float16, torch.bfloat16, torch.float32])
def test_resample_numpy_route_affine_dtypes(dtype):
    image = torch.randn(1, 1, 6, 6)
    a_in = torch.tensor([[2, 0, 1], [0, 1, -1], [0, 0, 1]]).to(dtype)
    a_out = torch.eye(3, dtype=dtype)
    theta = torch.linalg.solve(a_in.double(), a_out.double())[:2].float()[None]
    torch.testing.assert_close(medfast.resample(image, a_in, a_out, (6, 6)), medfast.affine_warp(image, theta))


@pytest.mark.parametrize("grad", [False, True])
def test_resample_errors_on_both_routes(grad):
    image = torch.randn(1, 1, 5, 5)
    singular = torch.tensor([[1.0, 2, 0], [2, 4, 0], [0, 0, 1]], dtype=torch.float64, requires_grad=grad)
    with pytest.raises(ValueError, match="affine_in is singular"):
        medfast.resample(image, singular, torch.eye(3), (5, 5))
    nan = torch.eye(3, dtype=torch.float64)
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="affine_out must be finite"):
        medfast.resample(image, torch.eye(3, requires_grad=grad), nan, (5, 5))
    with pytest.raises(ValueError, match="affine_in must be finite"):
        medfast.resample(image, np.diag([np.inf, 1, 1]), torch.eye(3), (5, 5))
    with pytest.raises(ValueError, match="batches must be equal or 1"):
        medfast.resample(image, torch.eye(3).expand(2, 3, 3), torch.eye(3).expand(3, 3, 3), (5, 5))


def test_resample_gradient_reaches_affines():
    image = torch.randn(1, 1, 6, 7, dtype=torch.float64)
    a_in = torch.from_numpy(_affines(2, seed=3)).requires_grad_()
    a_out = torch.from_numpy(_affines(2, seed=4))
    assert torch.autograd.gradcheck(lambda a: medfast.resample(image, a, a_out, (6, 7)), (a_in,))
