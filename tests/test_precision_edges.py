"""Precision at realistic and extreme magnitudes (a bug hunt), each against an independent reference: the
cross-entropy of large equal logits, nearest rounding just below a half, the float32 distance transform at
100:1 spacings and at spacings whose squares leave float32's range, and float32 LNCC in near-constant windows."""

import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

import medfast as mf
from medfast.metrics import hausdorff_distance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_entropy_of_large_logits_keeps_the_log_sum(dtype):
    y = torch.zeros(1, 2, 2, dtype=torch.long)
    z = torch.full((1, 4, 2, 2), 1e30, dtype=dtype)  # all equal: p = 1/4 (was 0: log 4 lost next to 1e30)
    assert mf.cross_entropy(z, y).item() == pytest.approx(math.log(4), rel=1e-6)
    assert mf.dice_ce_loss(z, y).item() == pytest.approx(mf.dice_loss(z, y).item() + math.log(4), rel=1e-6)
    for big in (1e8, 1e12, 1e15):
        z = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
        z[:, 0], z[:, 1] = big, big - 1.0  # exact in float64 (0.3133 was 0.3132 at 1e12, 0.375 from 1e15)
        z = z.to(dtype)
        assert mf.cross_entropy(z, y).item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-6)


@pytest.mark.parametrize("shape", [(2, 8), (2, 2, 8), (3, 9, 20)])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
def test_nearest_rounds_just_below_a_half_down(shape, padding):
    # 0.49999997f + 0.5 rounds to 1.0f in float32: floor(x + 0.5) read the next voxel, scipy reads this one
    below = float(np.nextafter(np.float32(0.5), np.float32(0)))
    image = torch.arange(float(shape[-1])).expand(1, 1, *shape).contiguous()
    ddf = torch.zeros(1, len(shape), *shape)
    ddf[:, -1] = below
    ddf[:, -1, ..., -1] = -below - 1  # and just above -1.5 at the last column: rounds to n - 2
    out = mf.warp(image, ddf, mode="nearest", padding=padding)
    pos = np.arange(shape[-1], dtype=np.float32) + ddf[(0, -1) + (0,) * (len(shape) - 1)].numpy()
    mode = {"zeros": "grid-constant", "border": "nearest", "reflection": "mirror"}[padding]
    want = ndi.map_coordinates(np.arange(float(shape[-1])), pos[None].astype(np.float64), order=0, mode=mode)
    torch.testing.assert_close(out[(0, 0) + (0,) * (len(shape) - 1)], torch.from_numpy(want).float())
    assert out.eq(out[(slice(None), slice(None)) + (slice(0, 1),) * (len(shape) - 1)]).all()


def test_float32_distance_transform_at_100_to_1_spacing():
    mask = np.ones((1, 3, 1200), dtype=bool)
    mask[0, 1, 1000] = False  # one row down and one column left of (0, 1001)
    mask[0, :, 1002] = False  # the nearest: one column right
    sp = (0.1, 10.0)
    ref = ndi.distance_transform_edt(mask[0], sampling=sp)
    out = mf.distance_transform(torch.from_numpy(mask), spacing=sp, dtype=torch.float32)[0].double().numpy()
    assert out[0, 1001] == pytest.approx(10.0, rel=1e-6)  # was sqrt(100.01): the farther background voxel
    np.testing.assert_allclose(out, ref, rtol=2e-6)
    rng = np.random.default_rng(3)
    masks = rng.random((2, 3, 1500)) > 0.02
    out = mf.distance_transform(torch.from_numpy(masks), spacing=sp, dtype=torch.float32).double().numpy()
    for b in range(2):
        np.testing.assert_allclose(out[b], ndi.distance_transform_edt(masks[b], sampling=sp), rtol=2e-6)


@pytest.mark.parametrize("spacing", [1e-25, 1e-14, 1e14, 1e19, 1e25])
def test_float32_distances_at_extreme_spacings(spacing):
    mask = np.ones((1, 5, 6), bool)
    mask[0, 0, 0] = False
    ref = ndi.distance_transform_edt(mask[0], sampling=spacing)
    out = mf.distance_transform(torch.from_numpy(mask), spacing=spacing)  # float32: inf or 0 before
    assert torch.isfinite(out).all() and out.dtype == torch.float32
    np.testing.assert_allclose(out[0].double().numpy(), ref, rtol=1e-6)
    a = torch.zeros(1, 8, 8, dtype=torch.long)
    a[0, 2:5, 2:5] = 1
    b = a.roll(2, 1)
    hd = hausdorff_distance(a, b, percentile=None, spacing=spacing, num_classes=2)
    assert hd.item() == pytest.approx(2 * spacing, rel=1e-6)


def test_float32_local_ncc_stays_in_0_1_in_near_constant_windows():
    rng = np.random.default_rng(8)
    p = torch.tensor(0.5 + 1e-4 * rng.standard_normal((24, 24, 24)), dtype=torch.float32)[None, None]
    t = torch.tensor(0.5 + 1e-4 * rng.standard_normal((24, 24, 24)), dtype=torch.float32)[None, None]
    p.requires_grad_(True)
    ncc = mf.local_ncc(p, t, 9)
    assert ncc.max().item() <= 1.0 + 1e-6  # was 9.3 (Cauchy-Schwarz broken by rounding); MONAI's 3017
    loss = mf.lncc_loss(p, t, 9)
    assert loss.item() >= -1.0
    loss.backward()
    assert torch.isfinite(p.grad).all()
    # away from the clamp nothing changes: float64 of the same images is never clamped
    ncc64 = mf.local_ncc(p.detach().double(), t.double(), 9)
    assert ncc64.max().item() < 1.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_local_ncc_keeps_nan_from_nan_or_inf_inputs(bad):
    # the clamp of cross^2 must not turn a NaN into a perfect match (ncc 1 and a finite loss with NaN gradients)
    p, t = torch.rand(1, 1, 12, 12, 12), torch.rand(1, 1, 12, 12, 12)
    p[0, 0, 6, 6, 6] = bad
    assert torch.isnan(mf.local_ncc(p, t, 5)[0, 0, 6, 6, 6])
    assert torch.isnan(mf.lncc_loss(p, t, 5))


@pytest.mark.parametrize("spacing", [(1e39, 1.0), (1e31, 1e31), (1e-31, 1.0), (1e-10, 1e6)])
def test_distances_refuse_spacings_float32_cannot_hold(spacing):
    # (1e39, 1) gave NaN and inf (the docs say the output is always finite), (1e-30, 1) distances of 0, and
    # the surface metrics NaN: spacings whose distances float32 cannot represent are refused, named
    mask = torch.ones(1, 6, 7, dtype=torch.bool)
    mask[0, 0, 0] = False
    with pytest.raises(ValueError, match=r"spacing must lie in \[1e-30, 1e30\]"):
        mf.distance_transform(mask, spacing=spacing)
    a = torch.zeros(1, 8, 8, dtype=torch.long)
    a[0, 2:5, 2:5] = 1
    with pytest.raises(ValueError, match="spacing must lie in"):
        hausdorff_distance(a, a.roll(2, 1), spacing=spacing, num_classes=2)


@pytest.mark.parametrize("smooth", [{"smooth_dr": float("nan")}, {"smooth_nr": float("nan")},
                                    {"smooth_dr": float("inf")}])
def test_lncc_refuses_non_finite_smoothing(smooth):
    # NaN passed the `v < 0` check: a NaN loss (and inf gave -0.0)
    with pytest.raises(ValueError, match="must be a non-negative finite number"):
        mf.lncc_loss(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8), 3, **smooth)


@pytest.mark.parametrize("spacing", [(float("nan"), 1, 1), (float("inf"), 1, 1), (1e-30, 1, 1), (1e-9, 1, 1)])
def test_resample_to_spacing_names_a_bad_spacing(spacing):
    # NaN / 1e-30 named an internal shape_out, inf an internal affine_out, 1e-9 tried to allocate 2 TB
    from medfast.data import resample_to_spacing

    with pytest.raises(ValueError, match="spacing"):
        resample_to_spacing(torch.rand(1, 8, 8, 8), np.eye(4), spacing)
