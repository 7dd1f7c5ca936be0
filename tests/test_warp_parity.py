"""medfast.warp / affine_warp against independent references: scipy.ndimage and F.grid_sample."""

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

import medfast as mf
from medfast.ops._reference import ddf_to_grid
from tests.conftest import MODES, PADDINGS, SCIPY_MODE, SCIPY_ORDER, identity_grid

SHAPES = {2: (9, 11), 3: (7, 8, 9)}


def scipy_warp(image, coords, mode, padding):
    """image (B, C, *S) and coords (B, ndim, *S_out) -> (B, C, *S_out) via map_coordinates."""
    out = [
        [
            ndi.map_coordinates(image[b, c].numpy(), coords[b].numpy(), order=SCIPY_ORDER[mode],
                                mode=SCIPY_MODE[padding])
            for c in range(image.shape[1])
        ]
        for b in range(coords.shape[0])
    ]
    return torch.from_numpy(np.asarray(out))


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_warp_matches_scipy(ndim, mode, padding):
    shape = SHAPES[ndim]
    image = torch.rand(2, 2, *shape, dtype=torch.float64)
    # Displacements of several voxels: many samples fall outside the image, some far outside.
    ddf = torch.randn(2, ndim, *shape, dtype=torch.float64) * 3
    ddf[:, :, 0] += 25.0
    out = mf.warp(image, ddf, mode=mode, padding=padding)
    ref = scipy_warp(image, identity_grid(shape) + ddf, mode, padding)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_output_grid_differs_from_input_grid(mode, padding):
    image = torch.rand(1, 1, 6, 10, 7, dtype=torch.float64)
    ddf = torch.randn(1, 3, 9, 4, 5, dtype=torch.float64) * 2
    out = mf.warp(image, ddf, mode=mode, padding=padding)
    assert out.shape == (1, 1, 9, 4, 5)
    ref = scipy_warp(image, identity_grid((9, 4, 5)) + ddf, mode, padding)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("mode", ["linear", "nearest"])
@pytest.mark.parametrize("padding", PADDINGS)
def test_warp_matches_grid_sample(ndim, mode, padding):
    shape = SHAPES[ndim]
    image = torch.rand(3, 2, *shape, dtype=torch.float64)
    ddf = torch.randn(3, ndim, *shape, dtype=torch.float64) * 2
    if mode == "nearest":  # keep away from rounding ties (grid_sample rounds half to even)
        frac = (identity_grid(shape) + ddf) % 1
        ddf = torch.where((frac - 0.5).abs() < 1e-3, ddf + 0.01, ddf)
    out = mf.warp(image, ddf, mode=mode, padding=padding)
    gs_mode = "bilinear" if mode == "linear" else "nearest"
    ref = F.grid_sample(image, ddf_to_grid(ddf), mode=gs_mode, padding_mode=padding, align_corners=True)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_affine_warp_with_ddf_matches_scipy(mode, padding):
    image = torch.rand(2, 1, 8, 7, 6, dtype=torch.float64)
    angle = 0.3
    rot = torch.tensor([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    theta = torch.cat([rot * 1.1, torch.tensor([[0.5], [-1.0], [2.0]])], dim=1).to(torch.float64)
    theta = torch.stack([theta, theta * 0.9])
    shape = (5, 9, 4)
    ddf = torch.randn(2, 3, *shape, dtype=torch.float64)
    out = mf.affine_warp(image, theta, ddf=ddf, mode=mode, padding=padding)
    grid = identity_grid(shape)
    pos = torch.einsum("bij,j...->bi...", theta[:, :, :3], grid) + theta[:, :, 3, None, None, None] + ddf
    torch.testing.assert_close(out, scipy_warp(image, pos, mode, padding), atol=1e-6, rtol=0)
    # Without a ddf: scipy.ndimage.affine_transform is the same map.
    out = mf.affine_warp(image, theta, shape=shape, mode=mode, padding=padding)
    for b in range(2):
        ref = ndi.affine_transform(image[b, 0].numpy(), theta[b, :, :3].numpy(), theta[b, :, 3].numpy(),
                                   output_shape=shape, order=SCIPY_ORDER[mode], mode=SCIPY_MODE[padding])
        torch.testing.assert_close(out[b, 0], torch.from_numpy(ref), atol=1e-6, rtol=0)


@pytest.mark.parametrize("padding", PADDINGS)
def test_cubic_interpolates_samples_and_prefilter_reuse(padding):
    image = torch.rand(2, 3, 6, 5, 7, dtype=torch.float64)
    zero = torch.zeros(2, 3, 6, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(mf.warp(image, zero, mode="cubic", padding=padding), image, atol=1e-12, rtol=0)
    ddf = torch.randn(2, 3, 6, 5, 7, dtype=torch.float64)
    coef = mf.spline_coefficients(image, padding)
    assert coef.shape == image.shape and coef.dtype == image.dtype
    torch.testing.assert_close(
        mf.warp(coef, ddf, mode="cubic", padding=padding, prefiltered=True),
        mf.warp(image, ddf, mode="cubic", padding=padding),
        atol=1e-14, rtol=0,
    )


def test_spline_coefficients_match_scipy_mirror():
    image = torch.rand(1, 1, 9, 8, 7, dtype=torch.float64)
    ref = ndi.spline_filter(image[0, 0].numpy(), order=3, mode="mirror")
    torch.testing.assert_close(mf.spline_coefficients(image, "reflection")[0, 0], torch.from_numpy(ref))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_tiny_axes(mode, padding):
    """Axes of length 1, 2 and 3 (fewer samples than cubic taps) still match scipy."""
    image = torch.rand(1, 1, 1, 2, 3, dtype=torch.float64)
    ddf = torch.randn(1, 3, 1, 2, 3, dtype=torch.float64) * 2
    out = mf.warp(image, ddf, mode=mode, padding=padding)
    ref = scipy_warp(image, identity_grid((1, 2, 3)) + ddf, mode, padding)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["linear", "cubic"])
def test_float32_close_to_float64(mode):
    image = torch.rand(1, 2, 12, 13, 14, dtype=torch.float64)
    ddf = torch.randn(1, 3, 12, 13, 14, dtype=torch.float64) * 2
    ref = mf.warp(image, ddf, mode=mode)
    out = mf.warp(image.float(), ddf.float(), mode=mode)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
