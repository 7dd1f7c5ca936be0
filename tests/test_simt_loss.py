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


def _compute(dtype):
    """The launcher's compute type (loss_cuda.cu compute_t) and the sums' dtype: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _case(kind, dtype, spatial, B, C, weighted, seed, spread=3.0):
    """logits (B, C, *spatial); target: int64 labels (B, *spatial) with labels -1 and past C (out of range:
    left out and reported), or soft targets (B, C, *spatial) of the logits' dtype; voxel weights (B, *spatial)
    of the logits' dtype (the CUDA launcher converts them to its compute type; the CPU op gets the same
    values) with some zeros, or None; gradients of the sums (B, C, 4) in the compute type."""
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
    gstats = torch.randn(B, C, 4, generator=g, dtype=torch.float64).to(_compute(dtype))
    return logits, target, weight, gstats


def _cpu(kind, logits, target, weight, gstats, ignore_index=None, ce=True):
    """The CPU ops: (sums, gradient of the logits (None without gstats), label range (labels) or None)."""
    ops = torch.ops.medfast
    if kind == "labels":
        stats, bad = ops.softmax_stats(logits, target, weight, ignore_index, ce)
        grad = None if gstats is None else ops.softmax_stats_backward(gstats, logits, target, weight, ignore_index)
        return stats, grad, tuple(bad.tolist())
    sig = kind == "sigmoid"
    grad = None if gstats is None else ops.soft_stats_backward(gstats, logits, target, weight, sig)
    return ops.soft_stats(logits, target, weight, sig, ce), grad, None


DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
LABEL_TYPES = {torch.uint8: 0, torch.int32: 1, torch.int64: 2}  # those the kernels read as they are
WHAT = {"sums": 0, "grad": 1, "warp": 2}  # sums_kernel, grad_kernel, label_sums_warp_kernel


def _channels_last(t):
    """Read in place as channels-last by the launcher (loss_launch.h is_channels_last)."""
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return t.dim() in (4, 5) and not t.is_contiguous() and t.is_contiguous(memory_format=fmt)


def _ptr(t):
    if t is None:
        return None
    assert t.is_contiguous() or _channels_last(t)
    return ctypes.c_void_p(t.data_ptr())


def _emu(lib, what, kind, logits, target, weight, gstats=None, sms=H100_SMS, optin=H100_OPTIN, ignore_index=None,
         ce=True):
    """The emulated launch of sums_kernel ("sums"), grad_kernel ("grad") or label_sums_warp_kernel ("warp"), as
    loss_cuda.cu makes it (weights and gradients of the sums converted to the compute type, contiguous or
    channels-last logits read in place): (sums (B, C, 4) of the compute type or the gradient in the logits'
    layout, geometry with the reported label range), or (None, None) where the launcher would refuse (shared
    memory past max(48 KiB, optin))."""
    B, C = logits.shape[:2]
    N = logits[0, 0].numel()
    acc = _compute(logits.dtype)
    cl = _channels_last(logits)
    out = torch.empty_like(logits) if what == "grad" else torch.empty(B, C, 4, dtype=acc)  # (keeps the layout)
    out.fill_(float("nan"))
    w = None if weight is None else weight.to(acc).contiguous()
    g = None if gstats is None else gstats.to(acc).contiguous()
    labels = LABEL_TYPES.get(target.dtype, -1)
    cfg = (ctypes.c_int64 * 14)(WHAT[what], KINDS[kind], DTYPES[logits.dtype], labels, int(cl),
                                int(ignore_index is not None), ignore_index or 0, int(ce), B, C, N, sms, optin,
                                DTYPES.get(target.dtype, -1))
    geo = (ctypes.c_int64 * 6)()
    rc = lib.emu_loss(cfg, _ptr(logits), _ptr(target), _ptr(w), _ptr(g), _ptr(out), geo)
    if rc == 3:
        pytest.skip("the emulation's compiler has no _Float16")
    if rc == 1:
        return None, None
    assert rc == 0
    return out, dict(threads=geo[0], blocks=geo[1], chunk=geo[2], smem=geo[3], range=(geo[4], geo[5]))


def _check_geometry(what, geo, dtype, B, C, N, sms):
    """The launcher's geometry (loss_cuda.cu plan / plan_label_threads, loss_kernels.cuh), in the compute type."""
    item = 8 if dtype == torch.float64 else 4
    if what == "warp":  # rows of C + 4 values at an odd pitch, and the warps' (C, 4) sums
        def values(threads):
            return threads * ((C + 4) | 1) + threads // 32 * C * 4
        threads = 256
        while threads > 32 and values(threads) * item > DEFAULT_SMEM:
            threads //= 2
        assert geo["threads"] == threads and geo["smem"] == values(threads) * item
    else:
        per_thread = (5 * C + 2) if what == "sums" else (C + 4)
        threads = _plan(per_thread, item)
        assert geo["threads"] == threads and geo["smem"] == threads * per_thread * item
    if what == "grad":
        assert geo["blocks"] == max(1, min(math.ceil(B * N / threads), sms * 64))
    else:
        blocks = min(max(1, math.ceil(N / threads)), max(1, sms * 8 // B))
        assert geo["blocks"] == blocks and geo["chunk"] == math.ceil(N / blocks)


def _tol(dtype):
    return (1e-10, 1e-11) if dtype == torch.float64 else (2e-5, 2e-5)


def _assert_sums(sums, ref):
    # each statistic against its own scale (the cross-entropy sums are far larger than the others)
    rtol, atol = _tol(ref.dtype)
    scale = ref.abs().amax(dim=(0, 1), keepdim=True).clamp_min(1.0)
    torch.testing.assert_close(sums / scale, ref / scale, rtol=rtol, atol=atol)


def _assert_grad(grad, ref):
    # the gradient in the logits' layout (the CPU op writes it so), and its values
    assert grad.stride() == ref.stride() and grad.dtype == ref.dtype
    gscale = max(1.0, ref.abs().max().item())
    if ref.dtype in (torch.float16, torch.bfloat16):
        # rounded to 8 or 11 bits from float values that may differ in the last bit (FMA contractions
        # of the CPU's AVX2 loops): one unit in the last place of the stored type
        eps = torch.finfo(ref.dtype).eps
        torch.testing.assert_close(grad.float(), ref.float(), rtol=eps, atol=eps * gscale * 1e-3)
    else:
        rtol, atol = _tol(ref.dtype)
        torch.testing.assert_close(grad / gscale, ref / gscale, rtol=rtol, atol=atol)


def _label_range(labels, ignore_index, C):
    """softmax_stats' report from PyTorch ops: the most negative label (or 0) and the largest >= C (or 0),
    the ignored ones counted as 0."""
    y = labels.long()
    if ignore_index is not None:
        y = y.masked_fill(y == ignore_index, 0)
    hi = int(y.max())
    return min(0, int(y.min())), hi if hi >= C else 0


def _against_cpu(lib, kind, logits, target, weight, gstats, sms=H100_SMS, ignore_index=None, ce=True,
                 kernels=("sums", "grad")):
    """Each emulated kernel against the CPU op (sums, reported label range, gradient and its layout) with
    the launcher's geometry; returns the sums and geometries by kernel."""
    B, C = logits.shape[:2]
    N = logits[0, 0].numel()
    ref_sums, ref_grad, ref_range = _cpu(kind, logits, target, weight, gstats, ignore_index, ce)
    sums, geos = {}, {}
    for what in kernels:
        out, geo = _emu(lib, what, kind, logits, target, weight, gstats if what == "grad" else None, sms=sms,
                        ignore_index=ignore_index, ce=ce)
        _check_geometry(what, geo, logits.dtype, B, C, N, sms)
        if what == "grad":
            _assert_grad(out, ref_grad)
        else:
            # the out-of-range labels the atomics report, as the CPU op's (nothing for soft targets)
            assert geo["range"] == (ref_range if kind == "labels" else (0, 0))
            _assert_sums(out, ref_sums)
            if not ce:  # no cross-entropy sums: E stays exactly 0, as the CPU op's
                assert torch.all(out[..., 3] == 0) and torch.all(ref_sums[..., 3] == 0)
            sums[what] = out
        geos[what] = geo
    return sums, geos


def _compare(lib, kind, dtype, spatial, B, C, weighted, sms, seed=0, spread=3.0):
    logits, target, weight, gstats = _case(kind, dtype, spatial, B, C, weighted, seed, spread)
    _, geos = _against_cpu(lib, kind, logits, target, weight, gstats, sms)
    if kind == "labels":  # no ignore index: the labels -1 and C + 2 reported
        assert geos["sums"]["range"] == (-1, C + 2)
    return geos["sums"], geos["grad"]


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [2, 4, 17, 33, 70])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("sms", [H100_SMS, 1])
def test_label_sums_warp_kernel_matches_cpu(lib, dtype, C, B, weighted, sms):
    # rows of C + 4 values, per-warp sums, classes spread over the lanes (C = 33, 70: lanes take 2 or 3
    # classes); sms = 1: few blocks, many rounds, the last round partly past the chunk; out-of-range labels
    # and zero weights left out
    logits, target, weight, gstats = _case("labels", dtype, (7, 9, 11), B, C, weighted, seed=C + 7 * B, spread=6.0)
    _, geos = _against_cpu(lib, "labels", logits, target, weight, gstats, sms, kernels=("warp",))
    assert geos["warp"]["range"] == (-1, C + 2)  # the labels' -1 and C + 2 (no ignore index): reported


def test_label_sums_warp_kernel_large_logits_and_many_classes(lib):
    # logits spread over hundreds (the max must be the max); 600 float32 classes: 32 threads and the
    # opt-in shared memory of an H100 (87 KB; sums_kernel would need 384 KB), as the launcher plans it
    logits, target, weight, gstats = _case("labels", torch.float32, (5, 6, 7), 2, 9, True, seed=3, spread=80.0)
    _against_cpu(lib, "labels", logits, target, weight, gstats, kernels=("warp",))
    logits, target, weight, gstats = _case("labels", torch.float32, (4, 5, 6), 1, 600, False, seed=4)
    _, geos = _against_cpu(lib, "labels", logits, target, weight, gstats, kernels=("warp",))
    assert geos["warp"]["threads"] == 32 and geos["warp"]["smem"] > 48 * 1024


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
    _, geos = _against_cpu(lib, "labels", logits, target, weight, gstats)
    assert geos["sums"]["threads"] == 32 and geos["sums"]["smem"] <= H100_OPTIN
    logits, target, weight, _ = _case("labels", dtype, (3, 5), 1, most + 1, True, 3)
    assert _emu(lib, "sums", "labels", logits, target, weight)[0] is None
    # and without the opt-in (48 KiB at most), already C = 40 in float64 does not fit
    if dtype == torch.float64:
        logits, target, weight, _ = _case("labels", dtype, (3, 5), 1, 40, False, 3)
        assert _emu(lib, "sums", "labels", logits, target, weight, optin=DEFAULT_SMEM)[0] is None


# ---- Labels in their own dtype, the ignore index, the range report, ce, channels-last logits ----

LABEL_KERNELS = ("sums", "warp", "grad")  # the sums kernel the launcher takes by default, MEDFAST_LOSS_CUDA_SUMS=warp


def _layout(logits, layout):
    if layout == "contiguous":
        return logits
    out = logits.to(memory_format=torch.channels_last if logits.dim() == 4 else torch.channels_last_3d)
    assert _channels_last(out)
    return out


def _labels(label_dtype, ignore_index, B, spatial, C, g):
    """Labels (B, *spatial) of label_dtype in [0, C), with every 7th voxel the ignore index (None: 255, which
    is then out of range) where the dtype holds it, and out-of-range labels spread over every block: C + 2
    throughout, C + 9 (the largest) near the end of the last batch element, and for signed dtypes -1
    throughout and -8 (the most negative) in the middle, so that the report merges many threads' and
    blocks' ranges (atomicMin / atomicMax) and its extremes come from neither the first nor the last
    block."""
    y = torch.randint(0, C, (B, *spatial), generator=g)
    flat = y.view(-1)
    n = flat.numel()
    info = torch.iinfo(label_dtype)
    sentinel = 255 if ignore_index is None else ignore_index
    if info.min <= sentinel <= info.max:
        flat[::7] = sentinel
    flat[3::11] = C + 2
    flat[n - 4] = C + 9
    if info.min < 0:
        flat[5::13] = -1
        flat[n // 2 + 3] = -8
    return y.to(label_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("ignore_index", [None, 1, 255, -100])
@pytest.mark.parametrize("label_dtype", list(LABEL_TYPES))
def test_label_kernels_label_dtypes_ignore_index_and_layouts(lib, dtype, ndim, layout, ignore_index, label_dtype):
    # Each label kernel (the default sums, the warp sums, the gradient) for each label dtype the launcher
    # reads in place, an ignore index absent / a class / past C / negative, contiguous or channels-last
    # logits (2D and 3D; the gradient written in their layout), with ce and without: the sums, the
    # reported range (against the CPU op's and PyTorch's) and the gradient against the CPU op. Several
    # blocks per batch element: 2D one voxel per thread; 3D (sms = 1) threads loop over their chunk.
    B, C = 2, 5
    spatial, sms = (SPATIAL[2], H100_SMS) if ndim == 2 else (SPATIAL[3], 1)
    g = torch.Generator().manual_seed(1000 * ndim + C + (ignore_index or 0) + LABEL_TYPES[label_dtype])
    logits = _layout((3.0 * torch.randn(B, C, *spatial, generator=g, dtype=torch.float64)).to(dtype), layout)
    labels = _labels(label_dtype, ignore_index, B, spatial, C, g)
    weight = torch.rand(B, *spatial, generator=g, dtype=torch.float64).to(dtype)
    weight.view(-1)[5::17] = 0.0
    gstats = torch.randn(B, C, 4, generator=g, dtype=torch.float64).to(dtype)
    sums, geos = _against_cpu(lib, "labels", logits, labels, weight, gstats, sms, ignore_index, True, LABEL_KERNELS)
    expected = _label_range(labels, ignore_index, C)
    assert expected == (0 if label_dtype == torch.uint8 else -8, 255 if ignore_index is None else C + 9)
    for what in ("sums", "warp"):
        assert geos[what]["range"] == expected and geos[what]["blocks"] > 1
    no_ce, _ = _against_cpu(lib, "labels", logits, labels, weight, None, sms, ignore_index, False, ("sums", "warp"))
    for what in ("sums", "warp"):  # I, P, G: the same operations with or without the logarithms
        assert torch.equal(no_ce[what][..., :3], sums[what][..., :3])


@pytest.mark.parametrize("kernel", ["sums", "warp"])
@pytest.mark.parametrize("label_dtype", list(LABEL_TYPES))
def test_label_kernels_report_nothing_for_good_labels(lib, kernel, label_dtype):
    # labels in [0, C) and the ignore index 255 (past C): nothing reported, the buffer stays zeros
    g = torch.Generator().manual_seed(7)
    B, C, spatial = 3, 4, SPATIAL[3]
    logits = torch.randn(B, C, *spatial, generator=g)
    labels = torch.randint(0, C, (B, *spatial), generator=g)
    labels.view(-1)[::5] = 255
    labels = labels.to(label_dtype)
    _, geos = _against_cpu(lib, "labels", logits, labels, None, None, 1, 255, True, (kernel,))
    assert geos[kernel]["range"] == (0, 0)


@pytest.mark.parametrize("C", [17, 33, 70])
@pytest.mark.parametrize("ndim", [2, 3])
def test_label_kernels_channels_last_many_classes(lib, C, ndim):
    # channels-last logits with many classes: a thread reads C adjacent values (the warp kernel's lanes take
    # 1, 2 or 3 classes), the gradient written in the same layout; uint8 labels with ignore index 255
    B = 2
    spatial = (13, 11) if ndim == 2 else (5, 7, 9)
    g = torch.Generator().manual_seed(C * 10 + ndim)
    logits = _layout((4.0 * torch.randn(B, C, *spatial, generator=g)), "channels_last")
    labels = _labels(torch.uint8, 255, B, spatial, C, g)
    weight = torch.rand(B, *spatial, generator=g)
    gstats = torch.randn(B, C, 4, generator=g)
    _, geos = _against_cpu(lib, "labels", logits, labels, weight, gstats, H100_SMS, 255, True, LABEL_KERNELS)
    assert geos["sums"]["range"] == geos["warp"]["range"] == (0, C + 9)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_soft_kernels_without_cross_entropy(lib, kind, dtype, weighted):
    # soft targets, ce = False (the SoftVoxel<.., CE = false> instantiation: no logarithms): E exactly 0,
    # I, P, G the same as with ce = True bitwise, and both against the CPU op
    for ndim, sms in ((2, H100_SMS), (3, 1)):
        logits, target, weight, gstats = _case(kind, dtype, SPATIAL[ndim], 2, 4, weighted, seed=ndim + 3)
        with_ce, _ = _against_cpu(lib, kind, logits, target, weight, gstats, sms, ce=True)
        no_ce, _ = _against_cpu(lib, kind, logits, target, weight, gstats, sms, ce=False, kernels=("sums",))
        assert torch.equal(no_ce["sums"][..., :3], with_ce["sums"][..., :3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("C", [3, 17])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_soft_kernels_channels_last(lib, kind, C, ndim, dtype):
    # channels-last logits and soft targets read in place (SoftVoxel cs = 1, vs = C), the gradient written in
    # their layout, with and without the cross-entropy sums, against the CPU op (which reads them in place too)
    spatial, sms = (SPATIAL[2], H100_SMS) if ndim == 2 else (SPATIAL[3], 1)
    logits, target, weight, gstats = _case(kind, dtype, spatial, 2, C, True, seed=C + ndim)
    logits, target = _layout(logits, "channels_last"), _layout(target, "channels_last")
    for ce in (True, False):
        _against_cpu(lib, kind, logits, target, weight, gstats if ce else None, sms, ce=ce,
                     kernels=("sums", "grad") if ce else ("sums",))


@pytest.mark.parametrize("ce", [True, False])
@pytest.mark.parametrize("target", ["labels_contiguous", "labels_channels_last", "softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loss_kernels_half_precision(lib, dtype, target, ce):
    # float16 / bfloat16 logits (and soft targets) read in their type and computed in float, the sums in
    # float32, the gradient stored in the logits' type (and layout), as the launcher instantiates them
    kind = target.split("_")[0]
    B, C = 2, 6
    for ndim, sms in ((2, H100_SMS), (3, 1)):
        logits, target_t, weight, gstats = _case(kind, dtype, SPATIAL[ndim], B, C, True, seed=ndim + C)
        ignore_index = None
        if kind == "labels":
            g = torch.Generator().manual_seed(ndim)
            ignore_index = 255 if ndim == 3 else None
            target_t = _labels(torch.uint8 if ndim == 3 else torch.int32, ignore_index, B, SPATIAL[ndim], C, g)
            logits = _layout(logits, "channels_last" if target.endswith("channels_last") else "contiguous")
        kernels = LABEL_KERNELS if kind == "labels" else ("sums", "grad")
        _, geos = _against_cpu(lib, kind, logits, target_t, weight, gstats, sms, ignore_index, ce, kernels)
        assert geos["sums"]["smem"] == geos["sums"]["threads"] * (5 * C + 2) * 4  # float scratch


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_soft_kernels_float32_target_of_half_logits(lib, dtype, kind, layout):
    # a float32 target of half logits is read as float32 (SoftVoxel<.., U = float>, as the launcher dispatches
    # it), never rounded to the logits' type: against the CPU op, and the sums are those of float32 logits
    for ndim, sms in ((2, H100_SMS), (3, 1)):
        logits, _, weight, gstats = _case(kind, dtype, SPATIAL[ndim], 2, 5, True, seed=ndim)
        _, target, _, _ = _case(kind, torch.float32, SPATIAL[ndim], 2, 5, False, seed=ndim + 10)
        logits, target = _layout(logits, layout), _layout(target, layout)
        sums, _ = _against_cpu(lib, kind, logits, target, weight, gstats, sms)
        ref, _, _ = _cpu(kind, logits.float(), target, weight.float(), None)
        _assert_sums(sums["sums"], ref)


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


def _emu_finalize(lib, stats, cw, divisor, scalars, flags, g, bad=None, fill=float("nan")):
    """(loss, gradient) of the emulated kernels; ``fill``: what the outputs hold before (a finite sentinel where
    the test expects NaN, so that a kernel that writes nothing cannot pass)."""
    suffix = "f32" if stats.dtype == torch.float32 else "f64"
    B, C = stats.shape[:2]
    out = torch.full((), fill, dtype=stats.dtype)
    grad = torch.full_like(stats, fill)
    opt = [None if t is None else _p(t) for t in (cw, divisor, bad)]
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
    # the label-range report of the sums op (check_labels=False): good labels change nothing, a bad one (a label
    # below 0 or one >= C) makes the loss and every gradient entry NaN
    good = torch.zeros(2, dtype=torch.int64)
    value_g, grad_g = _emu_finalize(lib, stats, cw, divisor, scalars, flags, gout, good)
    torch.testing.assert_close(value_g, ref, rtol=0, atol=0)
    torch.testing.assert_close(grad_g, ref_grad, rtol=0, atol=0)
    for bad in ([-3, 0], [0, C + 2]):
        bad = torch.tensor(bad)
        value_b, grad_b = _emu_finalize(lib, stats, cw, divisor, scalars, flags, gout, bad, fill=123.0)
        assert torch.isnan(value_b) and torch.isnan(grad_b).all()
        assert torch.isnan(torch.ops.medfast.loss_finalize(stats, cw, divisor, scalars, flags, bad))
        assert torch.isnan(torch.ops.medfast.loss_finalize_backward(gout, stats, cw, divisor, scalars, flags,
                                                                      bad)).all()
