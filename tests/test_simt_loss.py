"""The CUDA kernels of the fused segmentation losses (csrc/loss/loss_kernels.cuh: class sums and their
gradient) run on the CPU under the launch emulation of tests/simt/simt.h (a grid of blocks, each block's
threads as fibers on one thread, dynamic shared memory, __syncthreads), compiled from the same source as
the CUDA build and launched with the launcher's geometry, against the CPU ops
(torch.ops.medfast.softmax_stats / soft_stats and their backward ops). tests/test_loss_cuda.py checks the
real launches on a GPU."""

from __future__ import annotations

import ctypes
import math
import subprocess
import sys

import pytest
import torch

from medfast.ops._loss import _max_cuda_classes
from tests.test_simt import _build, _p

KINDS = {"labels": 0, "softmax": 1, "sigmoid": 2}
H100_SMS, H100_OPTIN = 132, 227 * 1024  # the multiprocessors and opt-in shared memory of an H100
DEFAULT_SMEM = 48 * 1024
SPATIAL = {2: (37, 29), 3: (7, 9, 13)}  # 1073 and 819 voxels: not multiples of a block or a chunk


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return _build(tmp_path_factory, "loss_kernels_emu")


def _plan(values_per_thread: int, itemsize: int) -> int:
    """Threads per block of the launcher (loss_cuda.cu plan(), loss_kernels.cuh plan_threads)."""
    threads = 256
    while threads > 32 and threads * values_per_thread * itemsize > DEFAULT_SMEM:
        threads //= 2
    return threads


def _case(kind, dtype, spatial, B, C, weighted, seed, spread=3.0):
    """logits (B, C, *spatial); target: labels (B, *spatial) with ignored voxels (-1, the ignore index as
    medfast.ops._loss passes it) and labels past C (left out, as under torch.compile), or soft targets
    (B, C, *spatial); voxel weights (B, *spatial) of the logits' dtype (the CUDA launcher converts them to
    its compute type; the CPU op gets the same values) with some zeros, or None."""
    g = torch.Generator().manual_seed(seed)
    logits = (spread * torch.randn(B, C, *spatial, generator=g, dtype=torch.float64)).to(dtype)
    if kind == "labels":
        target = torch.randint(0, C, (B, *spatial), generator=g)
        flat = target.view(-1)
        flat[::7] = -1
        flat[3::11] = C + 2
    elif kind == "softmax":
        target = torch.softmax(2.0 * torch.randn(B, C, *spatial, generator=g, dtype=torch.float64), 1).to(dtype)
    else:  # multi-label 0/1 targets, some soft
        target = torch.rand(B, C, *spatial, generator=g, dtype=torch.float64)
        target = torch.where(target < 0.8, (target < 0.35).double(), target).to(dtype)
    weight = None
    if weighted:
        weight = torch.rand(B, *spatial, generator=g, dtype=torch.float64)
        weight.view(-1)[5::13] = 0.0
        weight = weight.to(dtype)
    gstats = torch.randn(B, C, 4, generator=g, dtype=torch.float64).to(dtype)
    return logits, target, weight, gstats


def _cpu(kind, logits, target, weight, gstats):
    ops = torch.ops.medfast
    if kind == "labels":
        return ops.softmax_stats(logits, target, weight)[0], ops.softmax_stats_backward(gstats, logits, target, weight)
    sig = kind == "sigmoid"
    return (ops.soft_stats(logits, target, weight, sig),
            ops.soft_stats_backward(gstats, logits, target, weight, sig))


def _emu(lib, what, kind, logits, target, weight, gstats=None, sms=H100_SMS, optin=H100_OPTIN):
    """The emulated launch: (sums (B, C, 4) or gradient (B, C, *S), geometry), or (None, None) where the
    launcher would refuse (shared memory past max(48 KiB, optin))."""
    suffix = "f32" if logits.dtype == torch.float32 else "f64"
    fn = getattr(lib, f"emu_loss_{what}_{suffix}")
    B, C = logits.shape[:2]
    N = logits[0, 0].numel()
    out = torch.full((B, C, 4) if what == "sums" else logits.shape, float("nan"), dtype=logits.dtype)
    geo = (ctypes.c_int64 * 6)()  # + the label range (sums)
    i64 = ctypes.c_int64
    args = [ctypes.c_int(KINDS[kind]), _p(logits), _p(target), None if weight is None else _p(weight)]
    if what == "grad":
        args.append(_p(gstats))
    args += [i64(B), i64(C), i64(N), i64(sms), i64(optin), _p(out), geo]
    rc = fn(*args)
    if rc == 1:
        return None, None
    assert rc == 0
    return out, dict(threads=geo[0], blocks=geo[1], chunk=geo[2], smem=geo[3], range=(geo[4], geo[5]))


def _check_geometry(what, geo, dtype, B, C, N, sms):
    item = 8 if dtype == torch.float64 else 4
    per_thread = (5 * C + 2) if what == "sums" else (C + 4)
    threads = _plan(per_thread, item)
    assert geo["threads"] == threads and geo["smem"] == threads * per_thread * item
    if what == "sums":
        blocks = min(max(1, math.ceil(N / threads)), max(1, sms * 8 // B))
        assert geo["blocks"] == blocks and geo["chunk"] == math.ceil(N / blocks)
    else:
        assert geo["blocks"] == max(1, min(math.ceil(B * N / threads), sms * 64))


def _tol(dtype):
    return (2e-5, 2e-5) if dtype == torch.float32 else (1e-10, 1e-11)


def _compare(lib, kind, dtype, spatial, B, C, weighted, sms, seed=0, spread=3.0):
    logits, target, weight, gstats = _case(kind, dtype, spatial, B, C, weighted, seed, spread)
    N = math.prod(spatial)
    ref_sums, ref_grad = _cpu(kind, logits, target, weight, gstats)
    sums, geo = _emu(lib, "sums", kind, logits, target, weight, sms=sms)
    _check_geometry("sums", geo, dtype, B, C, N, sms)
    grad, ggeo = _emu(lib, "grad", kind, logits, target, weight, gstats, sms=sms)
    _check_geometry("grad", ggeo, dtype, B, C, N, sms)
    if kind == "labels":  # the out-of-range labels the atomics report, as the CPU op's
        assert geo["range"] == tuple(torch.ops.medfast.softmax_stats(logits, target, weight)[1].tolist())
        assert geo["range"] == (-1, C + 2)
    rtol, atol = _tol(dtype)
    # each statistic against its own scale (the cross-entropy sums are far larger than the others)
    scale = ref_sums.abs().amax(dim=(0, 1), keepdim=True).clamp_min(1.0)
    torch.testing.assert_close(sums / scale, ref_sums / scale, rtol=rtol, atol=atol)
    gscale = max(1.0, ref_grad.abs().max().item())
    torch.testing.assert_close(grad / gscale, ref_grad / gscale, rtol=rtol, atol=atol)
    return geo, ggeo


TARGETS = ["labels", "labels_weighted", "softmax", "softmax_weighted", "sigmoid", "sigmoid_weighted"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("C", [2, 4, 17])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("sms", [H100_SMS, 1])
def test_loss_kernels_match_cpu(lib, dtype, ndim, C, B, target, sms):
    # sms = 132: one voxel per thread, many blocks; sms = 1: a few blocks whose threads loop over chunks
    # of several block widths (not multiples of the block size)
    kind = target.split("_")[0]
    geo, _ = _compare(lib, kind, dtype, SPATIAL[ndim], B, C, target.endswith("weighted"), sms,
                      seed=C * 10 + B + ndim)
    if C == 17:  # 87 values per thread: 256 threads would need 87 KiB (f32) / 174 KiB (f64) of shared memory
        assert geo["threads"] == (128 if dtype == torch.float32 else 64)


def _emu_warp_sums(lib, logits, labels, weight, sms=H100_SMS, optin=H100_OPTIN):
    """The class-transposed label sums (MEDFAST_LOSS_CUDA_SUMS=warp): (sums (B, C, 4), geometry)."""
    suffix = "f32" if logits.dtype == torch.float32 else "f64"
    B, C = logits.shape[:2]
    N = logits[0, 0].numel()
    out = torch.full((B, C, 4), float("nan"), dtype=logits.dtype)
    geo = (ctypes.c_int64 * 6)()
    i64 = ctypes.c_int64
    rc = getattr(lib, f"emu_loss_sums_warp_{suffix}")(_p(logits), _p(labels), None if weight is None else _p(weight),
                                                      i64(B), i64(C), i64(N), i64(sms), i64(optin), _p(out), geo)
    if rc == 1:
        return None, None
    assert rc == 0
    return out, dict(threads=geo[0], blocks=geo[1], chunk=geo[2], smem=geo[3], range=(geo[4], geo[5]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [2, 4, 17, 33, 70])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("sms", [H100_SMS, 1])
def test_label_sums_warp_kernel_matches_cpu(lib, dtype, C, B, weighted, sms):
    # rows of C + 4 values, per-warp sums, classes spread over the lanes (C = 33, 70: lanes take 2 or 3
    # classes); sms = 1: few blocks, many rounds, the last round partly past the chunk; ignored and
    # out-of-range labels and zero weights left out
    spatial = (7, 9, 11)
    logits, target, weight, _ = _case("labels", dtype, spatial, B, C, weighted, seed=C + 7 * B, spread=6.0)
    ref = torch.ops.medfast.softmax_stats(logits, target, weight)[0]
    sums, geo = _emu_warp_sums(lib, logits, target, weight, sms=sms)
    assert geo["range"] == (-1, C + 2)  # the labels' -1 and C + 2 (no ignore index): reported
    rtol, atol = _tol(dtype)
    scale = ref.abs().amax(dim=(0, 1), keepdim=True).clamp_min(1.0)
    torch.testing.assert_close(sums / scale, ref / scale, rtol=rtol, atol=atol)
    item = 8 if dtype == torch.float64 else 4
    pitch = (C + 4) | 1
    threads = 256
    while threads > 32 and (threads * pitch + threads // 32 * C * 4) * item > 48 * 1024:
        threads //= 2
    assert geo["threads"] == threads and geo["smem"] == (threads * pitch + threads // 32 * C * 4) * item
    N = math.prod(spatial)
    blocks = min(max(1, math.ceil(N / threads)), max(1, sms * 8 // B))
    assert geo["blocks"] == blocks and geo["chunk"] == math.ceil(N / blocks)


def test_label_sums_warp_kernel_large_logits_and_many_classes(lib):
    # logits spread over hundreds (the max must be the max); 600 float32 classes: 32 threads and the
    # opt-in shared memory of an H100 (87 KB; sums_kernel would need 384 KB), as the launcher plans it
    logits, target, weight, _ = _case("labels", torch.float32, (5, 6, 7), 2, 9, True, seed=3, spread=80.0)
    sums, _ = _emu_warp_sums(lib, logits, target, weight)
    ref = torch.ops.medfast.softmax_stats(logits, target, weight)[0]
    scale = ref.abs().amax(dim=(0, 1), keepdim=True).clamp_min(1.0)
    torch.testing.assert_close(sums / scale, ref / scale, rtol=2e-5, atol=2e-5)
    logits, target, weight, _ = _case("labels", torch.float32, (4, 5, 6), 1, 600, False, seed=4)
    sums, geo = _emu_warp_sums(lib, logits, target, weight)
    assert geo["threads"] == 32 and geo["smem"] > 48 * 1024
    ref = torch.ops.medfast.softmax_stats(logits, target, weight)[0]
    scale = ref.abs().amax(dim=(0, 1), keepdim=True).clamp_min(1.0)
    torch.testing.assert_close(sums / scale, ref / scale, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_kernels_large_logits(lib, kind, dtype):
    # logits spread over hundreds: the softmax must subtract the true maximum (exp of a positive
    # argument overflows), in the one-voxel path of the kernels as in the CPU blocks
    _compare(lib, kind, dtype, (5, 6, 7), 2, 9, True, H100_SMS, seed=11, spread=80.0)


@pytest.mark.parametrize("kind", list(KINDS))
def test_loss_kernels_grid_stride(lib, kind):
    # one multiprocessor: the gradient grid (64 blocks of 256) strides over 51840 voxels, the sums'
    # two blocks per batch element each loop over 8640 voxels
    geo, ggeo = _compare(lib, kind, torch.float32, (24, 24, 30), 3, 4, True, 1, seed=5)
    assert ggeo["blocks"] == 64 and 3 * 24 * 24 * 30 > 3 * 64 * 256
    assert geo["blocks"] == 2 and geo["chunk"] == 8640


@pytest.mark.parametrize("kind", list(KINDS))
def test_loss_kernels_shared_memory_opt_in(lib, kind):
    # C = 40 in float64: 202 values per thread, 51712 bytes at 32 threads, past the default 48 KiB
    geo, _ = _compare(lib, kind, torch.float64, (11, 13), 2, 40, True, H100_SMS, seed=7)
    assert geo["threads"] == 32 and geo["smem"] > DEFAULT_SMEM


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_kernels_class_limit(lib, dtype):
    # the largest C the Python guard sends to the kernels (medfast.ops._loss._max_cuda_classes) runs, one
    # more would not fit the device's shared memory, as the launcher's plan says
    item = 8 if dtype == torch.float64 else 4
    most = _max_cuda_classes(H100_OPTIN, item)
    logits, target, weight, gstats = _case("labels", dtype, (3, 5), 1, most, True, 3)
    sums, geo = _emu(lib, "sums", "labels", logits, target, weight)
    assert geo["threads"] == 32 and geo["smem"] <= H100_OPTIN
    ref_sums, ref_grad = _cpu("labels", logits, target, weight, gstats)
    rtol, atol = _tol(dtype)
    scale = ref_sums.abs().amax(dim=(0, 1), keepdim=True).clamp_min(1.0)
    torch.testing.assert_close(sums / scale, ref_sums / scale, rtol=rtol, atol=atol)
    grad, _ = _emu(lib, "grad", "labels", logits, target, weight, gstats)
    torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=atol)
    logits, target, weight, _ = _case("labels", dtype, (3, 5), 1, most + 1, True, 3)
    assert _emu(lib, "sums", "labels", logits, target, weight)[0] is None
    # and without the opt-in (48 KiB at most), already C = 40 in float64 does not fit
    if dtype == torch.float64:
        logits, target, weight, _ = _case("labels", dtype, (3, 5), 1, 40, False, 3)
        assert _emu(lib, "sums", "labels", logits, target, weight, optin=DEFAULT_SMEM)[0] is None


@pytest.mark.parametrize("threads", [32, 96, 256, 1024])
def test_simt_block_reduction(lib, threads):
    # the emulation itself: shuffles within each warp of a many-warp block, dynamic shared memory and
    # __syncthreads, on a 2D grid
    g = torch.Generator().manual_seed(threads)
    gx, gy, n = 3, 2, 1000
    data = torch.randn(gy, gx, n, generator=g, dtype=torch.float64)
    out = torch.full((gy, gx), float("nan"), dtype=torch.float64)
    lib.emu_simt_block_sum(ctypes.c_int(threads), ctypes.c_int(gx), ctypes.c_int(gy), _p(data), ctypes.c_int64(n),
                           _p(out))
    torch.testing.assert_close(out, data.sum(-1), rtol=1e-12, atol=1e-12)


MISUSES = {0: "lanes diverged at a warp shuffle", 1: "a thread returned while others wait at __syncthreads",
           2: "lanes diverged at a warp shuffle", 3: "wrote past its 64 bytes of dynamic shared memory"}


@pytest.mark.parametrize("mode", [0, 1, 2, 3, 4])
def test_simt_stops_at_misuse(lib, mode):
    # divergent shuffles, a skipped __syncthreads and an out-of-bounds shared-memory write abort the
    # emulation with a message (in a subprocess: abort ends it); mode 4 is the correct kernel
    code = f"import ctypes; ctypes.CDLL({lib._name!r}).emu_simt_misuse({mode}); print('done')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if mode in MISUSES:
        assert res.returncode != 0 and MISUSES[mode] in res.stderr, res.stderr
    else:
        assert res.returncode == 0 and res.stdout.strip() == "done", res.stderr


def test_simt_unwritten_shared_memory_is_nan(lib):
    # each block's shared memory starts as NaN bytes, so a kernel reading it before writing shows
    lib.emu_simt_unwritten_shared.restype = ctypes.c_double
    assert math.isnan(lib.emu_simt_unwritten_shared())


# ---- The finishing op (loss_finalize: finalize_kernel / finalize_backward_kernel, one block) ----

_DICE, _CE, _BACKGROUND, _BATCH, _MEAN, _TRUTH = 1, 2, 4, 8, 16, 32  # csrc/loss/finalize.h FinalizeFlag
FINALIZE_FLAGS = [
    _DICE | _CE | _BACKGROUND | _MEAN | _TRUTH,  # dice_ce_loss, integer labels
    _DICE | _CE | _BATCH | _MEAN | _TRUTH,  # batch Dice without background
    _DICE | _CE | _BACKGROUND | _MEAN,  # soft targets: a given divisor
    _DICE | _CE,  # reduction "sum"
    _DICE | _BATCH | _MEAN,  # dice_loss
    _CE | _MEAN | _TRUTH,  # cross_entropy
]


def _emu_finalize(lib, stats, cw, divisor, scalars, flags, g):
    suffix = "f32" if stats.dtype == torch.float32 else "f64"
    B, C = stats.shape[:2]
    out = torch.full((), float("nan"), dtype=stats.dtype)
    grad = torch.full_like(stats, float("nan"))
    opt = [None if t is None else _p(t) for t in (cw, divisor)]
    getattr(lib, f"emu_loss_finalize_{suffix}")(_p(stats), *opt, ctypes.c_int64(B), ctypes.c_int64(C),
                                                  (ctypes.c_double * 5)(*scalars), ctypes.c_int64(flags), _p(g),
                                                  _p(out), _p(grad))
    return out, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("BC", [(1, 2), (2, 16), (3, 100), (2, 300)])  # B C past 256: threads take several entries
@pytest.mark.parametrize("flags", FINALIZE_FLAGS)
@pytest.mark.parametrize("weighted", [False, True])
def test_finalize_kernel_matches_cpu(lib, dtype, BC, flags, weighted):
    # the kernel with the launcher's geometry (one block of 256 threads, 3 values each in shared memory)
    # against the CPU op, which follows the same reduction order: on the host (no FMA contraction in
    # either build) bitwise the same; on a GPU (nvcc contracts to FMAs) to rounding, tests/test_loss_cuda.py
    B, C = BC
    g = torch.Generator().manual_seed(B * 1000 + C + flags)
    p = torch.rand(B, C, generator=g, dtype=torch.float64) * 40 + 1
    t = torch.rand(B, C, generator=g, dtype=torch.float64) * 40 + 1
    stats = torch.stack([torch.minimum(p, t) * torch.rand(B, C, generator=g, dtype=torch.float64), p, t,
                         torch.rand(B, C, generator=g, dtype=torch.float64) * 60], -1).to(dtype)
    cw = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype) if weighted else None
    divisor = torch.tensor(123.25, dtype=dtype) if (weighted and not flags & _TRUTH) else None
    scalars = [float(C) if not flags & _TRUTH else 1.0, 1e-3, 2e-3, 0.7, 1.3]
    gout = torch.tensor(0.8, dtype=dtype)
    value, grad = _emu_finalize(lib, stats, cw, divisor, scalars, flags, gout)
    ref = torch.ops.medfast.loss_finalize(stats, cw, divisor, scalars, flags)
    ref_grad = torch.ops.medfast.loss_finalize_backward(gout, stats, cw, divisor, scalars, flags)
    torch.testing.assert_close(value, ref, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)
