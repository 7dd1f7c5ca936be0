"""compose, integrate and world-space resample."""

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

import medfast as mf
from tests.conftest import SCIPY_MODE, SCIPY_ORDER, identity_grid


def smooth_field(batch, channels, shape, scale, dtype=torch.float64):
    ndim = len(shape)
    coarse = torch.randn(batch, channels, *([4] * ndim), dtype=dtype)
    up = F.interpolate(coarse, size=shape, mode="trilinear" if ndim == 3 else "bilinear", align_corners=True)
    return up * scale


@pytest.mark.parametrize("ndim", [2, 3])
def test_compose_with_zero_field_is_identity(ndim):
    shape = (12, 10, 9)[:ndim] if ndim == 3 else (12, 10)
    a = torch.randn(2, ndim, *shape, dtype=torch.float64) * 2
    zero = torch.zeros_like(a)
    torch.testing.assert_close(mf.compose(a, zero), a, atol=1e-12, rtol=0)
    torch.testing.assert_close(mf.compose(zero, a), a, atol=1e-12, rtol=0)


def test_compose_matches_sequential_warps():
    shape = (24, 22, 20)
    g = identity_grid(shape)
    image = (torch.sin(0.3 * g[0]) + torch.cos(0.25 * g[1]) * torch.sin(0.2 * g[2]))[None, None]
    a = smooth_field(1, 3, shape, 1.5)
    b = smooth_field(1, 3, shape, 1.5)
    two_steps = mf.warp(mf.warp(image, a, mode="cubic", padding="border"), b, mode="cubic", padding="border")
    one_step = mf.warp(image, mf.compose(a, b), mode="cubic", padding="border")
    wrong_order = mf.warp(image, mf.compose(b, a), mode="cubic", padding="border")
    inner = (slice(None), slice(None)) + (slice(4, -4),) * 3
    err = (two_steps - one_step)[inner].abs().max()
    # Left: linear interpolation of `a` inside compose; the wrong order is an order of magnitude off.
    assert err < 0.06
    assert err < 0.1 * (two_steps - wrong_order)[inner].abs().max()


def test_integrate_small_velocity_is_close_to_velocity():
    v = smooth_field(2, 3, (16, 16, 16), 0.05)
    u = mf.integrate(v, steps=7)
    assert (u - v).abs().max() < 0.05 * v.abs().max()
    assert torch.equal(mf.integrate(v, steps=0), v)


@pytest.mark.parametrize("ndim", [2, 3])
def test_integrate_inverse_consistency(ndim):
    shape = (32, 32, 32)[:ndim]
    v = smooth_field(1, ndim, shape, 2.0)
    fwd, bwd = mf.integrate(v), mf.integrate(-v)
    residual = mf.compose(fwd, bwd)
    inner = (slice(None), slice(None)) + (slice(6, -6),) * ndim
    assert residual[inner].abs().max() < 0.05 * v.abs().max()
    assert fwd.abs().max() > 0.5 * v.abs().max()  # the fields are not trivially small


def test_integrate_is_differentiable():
    v = smooth_field(1, 2, (8, 9), 1.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: mf.integrate(x, steps=3), (v,), atol=1e-7)


def test_compose_bad_inputs():
    a = torch.zeros(1, 3, 5, 5, 5)
    with pytest.raises(ValueError, match="same grid"):
        mf.compose(a, torch.zeros(1, 3, 5, 5, 6))
    with pytest.raises(TypeError, match="velocity must be float32 or float64"):
        mf.integrate(a.half())
    with pytest.raises(ValueError, match=r"steps must be an int in \[0, 64\]"):
        mf.integrate(a, steps=-1)
    with pytest.raises(ValueError, match=r"steps must be an int in \[0, 64\]"):
        mf.integrate(a, steps=1100)  # 2.0 ** 1100 would overflow
    with pytest.raises(ValueError, match=r"ddf_a must have shape \(B, 3, \*spatial\)"):
        mf.compose(torch.zeros(1, 2, 5, 5, 5), a)


def _rotated_affine(base, angle, zoom, shift):
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    scale = np.diag([zoom, zoom, zoom, 1.0])
    move = np.eye(4)
    move[:3, 3] = shift
    return move @ rot @ base @ scale


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
def test_resample_synthetic_nifti_matches_scipy(tmp_path, mode, padding):
    data = np.random.default_rng(0).random((20, 18, 16)).astype(np.float64)
    affine_in = np.array([[0.9, 0.1, 0, -10], [0, 1.2, 0.05, -12], [0, 0, 2.0, -15], [0, 0, 0, 1]])
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(data, affine_in), path)
    img = nib.load(path)
    affine_out = _rotated_affine(img.affine, 0.2, 1.5, [2.0, -1.0, 3.0])
    shape_out = (14, 13, 11)
    out = mf.resample(torch.from_numpy(np.asarray(img.dataobj))[None, None], img.affine, affine_out, shape_out,
                      mode=mode, padding=padding)
    m = np.linalg.solve(img.affine, affine_out)
    ref = ndi.affine_transform(np.asarray(img.dataobj), m[:3, :3], m[:3, 3], output_shape=shape_out,
                               order=SCIPY_ORDER[mode], mode=SCIPY_MODE[padding])
    np.testing.assert_allclose(out[0, 0].numpy(), ref, atol=1e-6)


def _mni_t1() -> Path | None:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    return path if path.exists() else None


@pytest.mark.skipif(_mni_t1() is None, reason="MNI152 template not found: pip install nilearn")
def test_resample_real_mni_t1_matches_nibabel():
    from nibabel.processing import resample_from_to

    img = nib.load(_mni_t1())
    data = np.asarray(img.dataobj, dtype=np.float32)
    affine_out = _rotated_affine(img.affine, 0.15, 2.0, [1.5, -2.0, 4.0])
    shape_out = (90, 110, 90)
    ref = resample_from_to(nib.Nifti1Image(data, img.affine), (shape_out, affine_out), order=1, mode="constant",
                           cval=0.0).get_fdata()
    out = mf.resample(torch.from_numpy(data)[None, None], img.affine, affine_out, shape_out, mode="linear")
    # The brain-extracted template is 0 at its border, so scipy's "constant" equals "grid-constant".
    np.testing.assert_allclose(out[0, 0].numpy(), ref, atol=1e-3 * data.max())
    assert (ref > 0.1 * data.max()).mean() > 0.1  # the brain is in the field of view


def test_resample_bad_affine():
    image = torch.rand(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match=r"affine_in must be a \(4, 4\)"):
        mf.resample(image, np.eye(3), np.eye(4), (4, 4, 4))
    with pytest.raises(TypeError, match="affine_out must be a torch.Tensor or numpy array"):
        mf.resample(image, np.eye(4), [[1, 0], [0, 1]], (4, 4, 4))


@pytest.mark.parametrize("ndim, batch", [(3, 4), (3, 2), (2, 3)])
def test_resample_broadcasts_one_affine_beside_a_batch(ndim, batch):
    # a (B, n+1, n+1) affine_in with one (n+1, n+1) affine_out, B = n+1: torch.linalg.solve read the
    # single matrix as a batch of vectors and the output was silently wrong (0.97 off on [0, 1] images)
    torch.manual_seed(0)
    shape = (10, 11, 12)[:ndim]
    img = torch.rand(batch, 1, *shape, dtype=torch.float64)
    a_in = torch.eye(ndim + 1, dtype=torch.float64).repeat(batch, 1, 1)
    for b in range(batch):
        a_in[b, :ndim, ndim] = torch.tensor([0.5 * b, -0.3 * b, 0.2][:ndim], dtype=torch.float64)
        a_in[b, 0, 0] = 1.0 + 0.1 * b
    a_out = torch.eye(ndim + 1, dtype=torch.float64)
    a_out[:ndim, ndim] = 1.25
    per_sample = torch.cat([mf.resample(img[b:b + 1], a_in[b], a_out, shape) for b in range(batch)])
    torch.testing.assert_close(mf.resample(img, a_in, a_out, shape), per_sample, rtol=0, atol=1e-12)
    # and the other way round: one affine_in, a batch of affine_out
    a_outs = a_in.clone()
    per_sample = torch.cat([mf.resample(img[b:b + 1], a_out, a_outs[b], shape) for b in range(batch)])
    torch.testing.assert_close(mf.resample(img, a_out, a_outs, shape), per_sample, rtol=0, atol=1e-12)


def test_resample_batch_errors_name_the_affines():
    image = torch.rand(2, 1, 6, 7, 8)
    eye3 = np.eye(4)[None].repeat(3, 0)
    with pytest.raises(ValueError, match="affine_in has a batch of 3 affines but image has a batch of 2"):
        mf.resample(image, eye3, np.eye(4), (3, 3, 3))  # said "theta", which the caller never passed
    with pytest.raises(ValueError, match="affine_out has a batch of 3"):
        mf.resample(image, np.eye(4), eye3, (3, 3, 3))
    assert mf.resample(image[:1], eye3, np.eye(4), (3, 3, 3)).shape == (3, 1, 3, 3, 3)  # batch 1 broadcasts
