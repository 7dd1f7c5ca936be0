"""The one-thread-per-ray / line / sample CUDA kernels of the ultrasound simulator
(csrc/ussim/ussim_kernels.cuh: the ray march forward and backward, the atomic scatter of the property
gradients, the line march, and the PSF's axial, lateral and transposed passes) run on the CPU under the
launch emulation of tests/simt/simt.h (a grid of blocks, each block's threads as fibers on one thread,
atomicAdd), compiled from the same source as the CUDA build and launched in the launcher's order with its
geometry (MEDFAST_USSIM_CUDA_MARCH=thread), against the CPU ops (torch.ops.medfast.ussim_march,
ussim_march_lines, ussim_march_backward, ussim_march_lines_backward, ussim_psf). The warp-cooperative
kernels are in tests/test_simt.py; tests/test_ultrasound.py checks the real launches on a GPU."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from medfast.ops._ussim import noise_table
from tests.test_simt import G_AFF, SHARP_BWD, SHARP_FWD, WATER_BG, _build, _common, _frames, _line_inputs, _p

ops = torch.ops.medfast
H100_SMS = 132
THREADS = 128  # ussim_kernels.cuh kThreads
i64 = ctypes.c_int64


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    lib = _build(tmp_path_factory, "ussim_kernels_emu")
    lib.emu_k_blocks.restype = ctypes.c_int64
    return lib


def _sfx(dtype):
    return "f32" if dtype == torch.float32 else "f64"


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)


def _assert_grad_close(out, ref, dtype):
    """float64 elementwise; float32 against the gradient's scale: the transmission of a monotone run of samples
    (ussim.h, Run) has a kink at the run's end (the loss follows the run's extreme impedance), and where two
    samples' impedances differ by a rounding error the float32 paths (this kernel, the CPU op's AVX2 passes) may
    see the run end one sample apart: a few elements differ by ~1e-5 of the scale."""
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref, **_tol(dtype))
        return
    scale = ref.abs().amax().clamp_min(1e-12)
    torch.testing.assert_close(out / scale, ref / scale, rtol=0, atol=1e-4)


def _coords(B, R, S, D, H, W, dtype, g):
    start = torch.rand(B, R, 1, 3, generator=g, dtype=dtype) * torch.tensor([D, H, W], dtype=dtype)
    step = (torch.rand(B, R, 1, 3, generator=g, dtype=dtype) - 0.5) * 0.2
    coords = (start + torch.arange(S, dtype=dtype)[:, None] * step).contiguous()
    coords[0, -1] = coords[0, -1] - torch.tensor([6.0, 0.0, 0.0], dtype=dtype)  # enters the volume mid-ray
    return coords


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("volumes", ["one", "per_frame"])
@pytest.mark.parametrize("S", [70, 1])
@pytest.mark.parametrize("sms", [H100_SMS, 1])
def test_march_kernel_matches_cpu(lib, dtype, volumes, S, sms):
    g = torch.Generator().manual_seed(S + sms)
    B, R = 3, 50  # 150 rays: two blocks of 128, the second partly idle
    props, _ = _frames(volumes, B, dtype, g)
    D, H, W = props.shape[1:4]
    coords = _coords(B, R, S, D, H, W, dtype, g)
    noise = noise_table(5, rows=256)
    ref = ops.ussim_march(props, coords, noise, G_AFF, 0.03, list(WATER_BG), 11, SHARP_FWD)
    out = torch.full_like(ref, math.nan)
    getattr(lib, f"emu_k_march_{_sfx(dtype)}")(*_common(props, noise, 11, 0.03, SHARP_FWD), _p(coords), i64(B), i64(R),
                                               i64(S), _p(out), None, i64(sms))
    scale = ref.abs().amax().clamp_min(1e-12)
    torch.testing.assert_close(out / scale, ref / scale, rtol=0, atol=2e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("volumes", ["one", "per_frame", "indexed"])
@pytest.mark.parametrize("S", [203, 5])
def test_lines_kernel_matches_cpu(lib, dtype, volumes, S):
    g = torch.Generator().manual_seed(4)
    B, L, E = 2, 67, 3  # 134 lines: two blocks of 128
    props, index = _frames(volumes, B, dtype, g)
    start, step, weights, noise = _line_inputs(props, B, L, E, S, dtype, g)
    ref = ops.ussim_march_lines(props, start, step, weights, noise, G_AFF, 0.03, list(WATER_BG), 11, SHARP_FWD, index)
    out = torch.full_like(ref, math.nan)
    getattr(lib, f"emu_k_lines_{_sfx(dtype)}")(*_common(props, noise, 11, 0.03, SHARP_FWD), _p(start), _p(step),
                                               _p(weights), i64(B), i64(L), i64(E), i64(S), _p(out),
                                               None if index is None else _p(index), i64(H100_SMS))
    scale = ref.abs().amax(dim=(0, 1, 3), keepdim=True).clamp_min(1e-12)
    # float32: the thread's transmission is a running float sum over the S samples (the CPU op's rounds
    # differently); one of 81606 samples of S = 203 is 4.7e-5 of the scale off
    torch.testing.assert_close(out / scale, ref / scale, rtol=0, atol=1e-4 if dtype == torch.float32 else 1e-12)


def _emu_backward(lib, props, coords, grad, noise, index, need_p, need_c, sms, seed=7, att=0.05, sharp=SHARP_BWD,
                 merged=False):
    B, R, S = coords.shape[:3]
    gp = torch.zeros_like(props) if need_p else None
    gc = torch.full_like(coords, math.nan) if need_c else None
    getattr(lib, f"emu_k_backward_{_sfx(coords.dtype)}")(
        *_common(props, noise, seed, att, sharp), _p(coords), _p(grad), i64(B), i64(R), i64(S),
        _p(gp) if need_p else None, _p(gc) if need_c else None, None if index is None else _p(index), i64(sms),
        ctypes.c_int(int(merged)))
    return gp, gc


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("volumes", ["one", "per_frame", "indexed"])
@pytest.mark.parametrize("S", [100, 1])
@pytest.mark.parametrize("which", ["both", "props", "coords"])
def test_backward_and_scatter_kernels_match_cpu(lib, dtype, volumes, S, which):
    g = torch.Generator().manual_seed(9)
    B, R = 3, 45  # 135 rays
    props, index = _frames(volumes, B, dtype, g)
    D, H, W = props.shape[1:4]
    coords = _coords(B, R, S, D, H, W, dtype, g)
    grad = torch.randn(B, R, S, 3, generator=g, dtype=dtype)
    noise = noise_table(3, rows=128)
    need_p, need_c = which in ("both", "props"), which in ("both", "coords")
    gp_ref, gc_ref = ops.ussim_march_backward(grad, props, coords, noise, G_AFF, 0.05, list(WATER_BG), 7, SHARP_BWD,
                                              need_p, need_c, index)
    gp, gc = _emu_backward(lib, props, coords, grad, noise, index, need_p, need_c, H100_SMS)
    if need_p:
        _assert_grad_close(gp, gp_ref, dtype)
    if need_c:
        _assert_grad_close(gc, gc_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("volumes", ["one", "per_frame", "indexed"])
@pytest.mark.parametrize("S", [100, 7])
def test_backward_and_merged_scatter_match_cpu(lib, dtype, volumes, S):
    # march_backward_cuda with MEDFAST_USSIM_CUDA_SCATTER=merged: the backward kernel, then
    # scatter_merged_kernel (ussim_warp.cuh) with the launcher's geometry; 135 rays of S = 100 or 7
    # samples (not multiples of 32: warps span rays and frames, the last one part-filled)
    g = torch.Generator().manual_seed(19)
    B, R = 3, 45
    props, index = _frames(volumes, B, dtype, g)
    D, H, W = props.shape[1:4]
    coords = _coords(B, R, S, D, H, W, dtype, g)
    grad = torch.randn(B, R, S, 3, generator=g, dtype=dtype)
    noise = noise_table(3, rows=128)
    gp_ref, _ = ops.ussim_march_backward(grad, props, coords, noise, G_AFF, 0.05, list(WATER_BG), 7, SHARP_BWD, True,
                                         False, index)
    gp, _ = _emu_backward(lib, props, coords, grad, noise, index, True, False, H100_SMS, merged=True)
    torch.testing.assert_close(gp, gp_ref, **_tol(dtype))


def test_backward_scatter_grid_stride(lib):
    # one multiprocessor: 64 blocks of 128 threads stride over 3 x 40 x 80 = 9600 samples of the scatter,
    # many of them adding into the same voxels of the 9 x 7 x 11 volume
    g = torch.Generator().manual_seed(2)
    B, R, S = 3, 40, 80
    assert lib.emu_k_blocks(i64(B * R * S), i64(1)) == 64 and B * R * S > 64 * THREADS
    props, _ = _frames("per_frame", B, torch.float64, g)
    coords = _coords(B, R, S, *props.shape[1:4], torch.float64, g)
    grad = torch.randn(B, R, S, 3, generator=g, dtype=torch.float64)
    noise = noise_table(3, rows=128)
    gp_ref, gc_ref = ops.ussim_march_backward(grad, props, coords, noise, G_AFF, 0.05, list(WATER_BG), 7, SHARP_BWD,
                                              True, True, None)
    gp, gc = _emu_backward(lib, props, coords, grad, noise, None, True, True, 1)
    torch.testing.assert_close(gp, gp_ref, **_tol(torch.float64))
    torch.testing.assert_close(gc, gc_ref, **_tol(torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("volumes", ["one", "indexed"])
def test_lines_backward_thread_path_matches_cpu(lib, dtype, volumes):
    # march_lines_backward_cuda with MEDFAST_USSIM_CUDA_MARCH=thread: the sub-rays' positions and echo
    # gradients materialised as the launcher does (here in torch), then the ray backward and scatter
    g = torch.Generator().manual_seed(12)
    B, L, E, S = 2, 3, 2, 40
    props, index = _frames(volumes, B, dtype, g)
    D, H, W = props.shape[1:4]
    start = torch.rand(B, L, E, 3, generator=g, dtype=dtype) * torch.tensor([D, H, W], dtype=dtype) - 0.5
    step = (torch.rand(B, L, 3, generator=g, dtype=dtype) - 0.5) * 0.2
    weights = torch.rand(E, S, 3, generator=g, dtype=dtype)
    grad = torch.randn(B, L, 3, S, generator=g, dtype=dtype)
    noise = noise_table(3, rows=128)
    gp_ref, gc_ref = ops.ussim_march_lines_backward(grad, props, start, step, weights, noise, G_AFF, 0.05,
                                                    list(WATER_BG), 7, SHARP_BWD, True, True, index)
    i = torch.arange(S, dtype=dtype)
    coords = (start.unsqueeze(3) + i.unsqueeze(1) * step.unsqueeze(2).unsqueeze(3)).reshape(B, L * E, S, 3)
    gech = (grad.transpose(2, 3).unsqueeze(2) * weights).reshape(B, L * E, S, 3)
    gp, gc = _emu_backward(lib, props, coords.contiguous(), gech.contiguous(), noise, index, True, True, H100_SMS)
    torch.testing.assert_close(gp, gp_ref, **_tol(dtype))
    torch.testing.assert_close(gc, gc_ref.reshape(gc.shape), **_tol(dtype))


def _emu_psf(lib, x, h, w, transpose, sms):
    B, S = x.shape[0], x.shape[3]
    L = x.shape[2] if transpose else x.shape[1]
    shape = (B, L, 3, S) if transpose else (B, 2, L, S)
    out = torch.full(shape, math.nan, dtype=x.dtype)
    getattr(lib, f"emu_k_psf_{_sfx(x.dtype)}")(_p(x), _p(h), _p(w), i64(B), i64(L), i64(h.shape[1]),
                                               i64(w.shape[1]), i64(S), ctypes.c_int(int(transpose)), _p(out),
                                               i64(sms))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dims", [(2, 7, 9, 5, 33), (1, 3, 1, 1, 10), (1, 3, 15, 4, 10), (2, 5, 31, 8, 300)])
@pytest.mark.parametrize("sms", [H100_SMS, 1])
def test_psf_kernels_match_cpu(lib, dtype, transpose, dims, sms):
    # dims (B, L, K, J, S): single taps (K = J = 1), an axial kernel longer than the line (K = 15 > S = 10),
    # and with one multiprocessor 2 x 5 x 3 x 300 = 9000 outputs > 64 x 128 threads (grid-stride)
    B, L, K, J, S = dims
    g = torch.Generator().manual_seed(sum(dims) + int(transpose))
    x = torch.randn((B, 2, L, S) if transpose else (B, L, 3, S), generator=g, dtype=torch.float64).to(dtype)
    h = torch.randn(3, K, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(3, J, S, generator=g, dtype=torch.float64).to(dtype)
    ref = ops.ussim_psf(x, h, w, transpose)
    out = _emu_psf(lib, x, h, w, transpose, sms)
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out / scale, ref / scale, **_tol(dtype))


def test_psf_kernels_are_adjoint(lib):
    # <psf(x), y> = <x, psf^T(y)> for the emulated kernels themselves
    g = torch.Generator().manual_seed(0)
    B, L, K, J, S = 2, 6, 7, 3, 41
    x = torch.randn(B, L, 3, S, generator=g, dtype=torch.float64)
    y = torch.randn(B, 2, L, S, generator=g, dtype=torch.float64)
    h = torch.randn(3, K, generator=g, dtype=torch.float64)
    w = torch.randn(3, J, S, generator=g, dtype=torch.float64)
    lhs = (_emu_psf(lib, x, h, w, False, H100_SMS) * y).sum()
    rhs = (x * _emu_psf(lib, y, h, w, True, H100_SMS)).sum()
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-12, abs=1e-12)
