"""The CUDA kernels of the LNCC family (csrc/lncc/lncc_kernels.cuh: the products, the separable box sums,
the ncc, and the backward's adjoint and combine) run on the CPU under the launch emulation of
tests/simt/simt.h (a grid of blocks, each block's threads as fibers on one thread), compiled from the same
source as the CUDA build and launched in the launcher's order with its geometry, against the CPU ops
(torch.ops.medfast.lncc / lncc_backward). tests/test_lncc.py checks the real launches on a GPU."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from tests.test_simt import _build, _p

ops = torch.ops.medfast
H100_SMS = 132
NR, DR = 1e-5, 1e-5


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    lib = _build(tmp_path_factory, "lncc_kernels_emu")
    lib.emu_lncc_blocks.restype = ctypes.c_int64
    return lib


def _i64s(values):
    return (ctypes.c_int64 * len(values))(*values)


def _pair(B, C, spatial, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(B, C, *spatial, generator=g, dtype=torch.float64)
    p = torch.tanh(2 * t - 0.7) + 0.3 * torch.rand(B, C, *spatial, generator=g, dtype=torch.float64)
    grad = torch.randn(B, C, *spatial, generator=g, dtype=torch.float64)
    return p.to(dtype), t.to(dtype), grad.to(dtype)


def _head(x, ks, sms):
    B, C, *spatial = x.shape
    return [ctypes.c_int64(B), ctypes.c_int64(C), ctypes.c_int(len(spatial)), _i64s(spatial), _i64s(ks)]


def _emu_forward(lib, p, t, ks, sms=H100_SMS, nr=NR, dr=DR):
    sfx = "f32" if p.dtype == torch.float32 else "f64"
    out = torch.full_like(p, math.nan)
    sums = torch.full((5, *p.shape), math.nan, dtype=p.dtype)
    getattr(lib, f"emu_lncc_{sfx}")(_p(p), _p(t), *_head(p, ks, sms), ctypes.c_double(nr), ctypes.c_double(dr),
                                    ctypes.c_int64(sms), _p(out), _p(sums))
    return out, sums


def _emu_backward(lib, grad, p, t, sums, ks, sms=H100_SMS, nr=NR, dr=DR):
    sfx = "f32" if p.dtype == torch.float32 else "f64"
    gp, gt = torch.full_like(p, math.nan), torch.full_like(t, math.nan)
    getattr(lib, f"emu_lncc_backward_{sfx}")(_p(grad), _p(p), _p(t), _p(sums), *_head(p, ks, sms),
                                             ctypes.c_double(nr), ctypes.c_double(dr), ctypes.c_int64(sms),
                                             _p(gp), _p(gt))
    return gp, gt


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-11)


def _compare(lib, B, C, spatial, ks, dtype, sms, seed, nr=NR, dr=DR):
    p, t, grad = _pair(B, C, spatial, dtype, seed)
    out, sums = _emu_forward(lib, p, t, ks, sms, nr, dr)
    want_out, want_sums = ops.lncc(p, t, list(ks), nr, dr)
    tol = _tol(dtype)
    torch.testing.assert_close(sums, want_sums, **tol)
    torch.testing.assert_close(out, want_out, **tol)
    # the backward from the CPU op's sums (so that it is checked on its own), and from the emulated ones
    want_gp, want_gt = ops.lncc_backward(grad, p, t, want_sums, list(ks), nr, dr)
    for s in (want_sums, sums):
        gp, gt = _emu_backward(lib, grad, p, t, s.contiguous(), ks, sms, nr, dr)
        scale = max(1.0, want_gp.abs().max().item(), want_gt.abs().max().item())
        torch.testing.assert_close(gp / scale, want_gp / scale, **tol)
        torch.testing.assert_close(gt / scale, want_gt / scale, **tol)


CASES = {
    # spatial, kernel size: windows smaller than, as large as and larger than the image (borders), a
    # radius-0 axis (an odd number of box passes: the launcher's copy back), and no box pass at all
    "2d_k3": ((23, 17), (3, 3)),
    "2d_k7": ((8, 9), (7, 7)),
    "2d_aniso": ((13, 11), (5, 1)),
    "3d_k3": ((9, 10, 11), (3, 3, 3)),
    "3d_k9": ((6, 5, 7), (9, 9, 9)),
    "3d_aniso": ((7, 9, 6), (3, 5, 1)),
    "3d_k1": ((4, 5, 3), (1, 1, 1)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("sms", [H100_SMS, 1])
def test_lncc_kernels_match_cpu(lib, dtype, case, sms):
    spatial, ks = CASES[case]
    _compare(lib, 2, 3, spatial, ks, dtype, sms, seed=len(case) + sms)


def test_lncc_kernels_grid_stride(lib):
    # one multiprocessor: 64 blocks of 256 threads = 16384 threads stride over 2 x 24 x 20 x 18 = 17280
    # voxels (products, ncc, adjoint, combine) and 86400 box-sum entries
    M = 2 * 24 * 20 * 18
    assert lib.emu_lncc_blocks(ctypes.c_int64(M), ctypes.c_int64(1)) == 64 and M > 64 * 256
    assert lib.emu_lncc_blocks(ctypes.c_int64(M), ctypes.c_int64(H100_SMS)) == math.ceil(M / 256)
    _compare(lib, 2, 1, (24, 20, 18), (5, 3, 7), torch.float32, 1, seed=11)


def test_lncc_kernels_smoothing(lib):
    # large smoothing terms (the ncc of flat windows) and constant images
    _compare(lib, 1, 2, (9, 8), (3, 3), torch.float64, H100_SMS, seed=2, nr=1e-2, dr=1e-1)
    p = torch.ones(1, 1, 6, 7, dtype=torch.float64)
    out, sums = _emu_forward(lib, p, 2 * p, (3, 3))
    want_out, want_sums = ops.lncc(p, 2 * p, [3, 3], NR, DR)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(sums, want_sums)
