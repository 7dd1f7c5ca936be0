"""CUDA kernels run on the CPU under a warp emulation (tests/simt/simt.h: 32 fibers on one thread, shuffles
through a shared slot array), compiled from the same source as the CUDA build, against the CPU ops: the
ultrasound line march, ray backward, lines backward and its scatter, the merged property-gradient scatters
(against the CPU op and the plain scatters, with the atomics counted); the warp op's forward, backward and
warp-merged backward. This is how their arithmetic and shuffle logic are tested on machines without a
GPU; the CUDA tests check them on a GPU (both marches, ``MEDFAST_USSIM_CUDA_MARCH``; both ultrasound
scatters, ``MEDFAST_USSIM_CUDA_SCATTER``; every warp scatter, ``MEDFAST_WARP_CUDA_SCATTER``)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from medfast.ops._ussim import _sharp3, march_lines, noise_table

ROOT = Path(__file__).resolve().parents[1]
WATER_BG = (1.5, 0.0, 0.0, 0.0, 0.0)
G_AFF = [2.3, 0.4, 0.0, 0.7, -0.3, 1.9, 0.2, -5.0, 0.1, 0.0, 2.6, 1.25]
# Interface sharpness per voxel axis (an anisotropic volume: each axis its own), forward and backward cases.
SHARP_FWD = [4.0, 1.5, 2.5]
SHARP_BWD = [2.5, 1.0, 3.5]


def _build(tmp_path_factory, name: str) -> ctypes.CDLL:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    lib = tmp_path_factory.mktemp("simt") / f"{name}.so"
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wall", "-Werror", "-Wno-unknown-pragmas",
           f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'tests' / 'simt'}", str(ROOT / "tests" / "simt" / f"{name}.cpp"),
           "-o", str(lib)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return ctypes.CDLL(str(lib))


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return _build(tmp_path_factory, "ussim_warp_emu")


@pytest.fixture(scope="module")
def warp_emu(tmp_path_factory):
    return _build(tmp_path_factory, "warp_kernels_emu")


def _p(t: torch.Tensor):
    assert t.is_contiguous()
    return ctypes.c_void_p(t.data_ptr())


def _d(values) -> ctypes.Array:
    return (ctypes.c_double * len(values))(*values)


def _common(props, noise, seed, att, sharp):
    i64 = ctypes.c_int64
    return [_p(props), i64(props.shape[0]), i64(props.shape[1]), i64(props.shape[2]), i64(props.shape[3]),
            _p(noise), i64(noise.shape[0]), ctypes.c_uint64(seed), _d(G_AFF), ctypes.c_double(att), _d(WATER_BG),
            _d(_sharp3(sharp))]


def _volume(B, dtype, gen, D=9, H=7, W=11):
    props = torch.stack([1.3 + 0.6 * torch.rand(B, D, H, W, generator=gen, dtype=dtype)] +
                        [torch.rand(B, D, H, W, generator=gen, dtype=dtype) for _ in range(4)], -1)
    props[:, 4, :, :, 0] = -0.2  # clamped impedance
    return props.contiguous()


def _frames(volumes: str, B: int, dtype, gen):
    """props for B frames: one volume ("one"), one per frame ("per_frame"), or 3 volumes picked by a
    volume index ("indexed", frames -> volumes 2, 0, ...); and the index (or None)."""
    if volumes == "indexed":
        return _volume(3, dtype, gen), torch.tensor([2, 0, 2, 1][:B], dtype=torch.int64)
    return _volume(B if volumes == "per_frame" else 1, dtype, gen), None


def _line_inputs(props, B, L, E, S, dtype, g):
    """Sub-ray starts and steps of B x L lines of E sub-rays over the volume of ``props`` (one sub-ray
    starts outside and crosses it), echo weights (E, S, 3) and a noise table."""
    D, H, W = props.shape[1:4]
    start = torch.rand(B, L, E, 3, generator=g, dtype=dtype) * torch.tensor([D, H, W], dtype=dtype) - 1.0
    start[1, 2, 1] = -40.0
    step = (torch.rand(B, L, 3, generator=g, dtype=dtype) - 0.5) * 0.15
    step[1, 2] = torch.tensor([0.4, 0.05, 0.06], dtype=dtype)
    weights = torch.rand(E, S, 3, generator=g, dtype=dtype)
    return start, step, weights, noise_table(5, rows=256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("volumes", ["one", "per_frame", "indexed"])
@pytest.mark.parametrize("S", [203, 64, 5])
def test_warp_line_march_matches_cpu(emu, dtype, volumes, S):
    g = torch.Generator().manual_seed(4)
    B, L, E = 2, 3, 3
    props, index = _frames(volumes, B, dtype, g)
    start, step, weights, noise = _line_inputs(props, B, L, E, S, dtype, g)
    with torch.no_grad():
        ref = march_lines(props, start, step, weights, noise, G_AFF, 0.03, WATER_BG, 11, SHARP_FWD, index)
    out = torch.full_like(ref, float("nan"))
    fn = emu.emu_lines_f32 if dtype == torch.float32 else emu.emu_lines_f64
    i64 = ctypes.c_int64
    fn(*_common(props, noise, 11, 0.03, SHARP_FWD), _p(start), _p(step), _p(weights), i64(B), i64(L), i64(E), i64(S),
       _p(out), None if index is None else _p(index))
    scale = ref.abs().amax(dim=(0, 1, 3), keepdim=True).clamp_min(1e-12)
    torch.testing.assert_close(out / scale, ref / scale, rtol=0, atol=2e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("volumes", ["one", "per_frame", "indexed"])
@pytest.mark.parametrize("S", [100, 64, 33, 1])
@pytest.mark.parametrize("which", ["both", "props", "coords"])
def test_warp_backward_matches_cpu(emu, dtype, volumes, S, which):
    g = torch.Generator().manual_seed(9)
    B, R = 3, 4
    props, index = _frames(volumes, B, dtype, g)
    D, H, W = props.shape[1:4]
    start = torch.rand(B, R, 1, 3, generator=g, dtype=dtype) * torch.tensor([D, H, W], dtype=dtype)
    step = (torch.rand(B, R, 1, 3, generator=g, dtype=dtype) - 0.5) * 0.2
    coords = (start + torch.arange(S, dtype=dtype)[:, None] * step).contiguous()
    coords[1, 3] = coords[1, 3] - torch.tensor([6.0, 0.0, 0.0], dtype=dtype)  # enters the volume mid-ray
    grad = torch.randn(B, R, S, 3, generator=g, dtype=dtype)
    noise = noise_table(3, rows=128)
    need_p, need_c = which in ("both", "props"), which in ("both", "coords")
    gp_ref, gc_ref = torch.ops.medfast.ussim_march_backward(grad, props, coords, noise, G_AFF, 0.05, list(WATER_BG),
                                                            7, SHARP_BWD, need_p, need_c, index)
    gp = torch.zeros_like(props) if need_p else None
    gc = torch.full_like(coords, float("nan")) if need_c else None
    fn = emu.emu_backward_f32 if dtype == torch.float32 else emu.emu_backward_f64
    i64 = ctypes.c_int64
    fn(*_common(props, noise, 7, 0.05, SHARP_BWD), _p(coords), _p(grad), i64(B), i64(R), i64(S),
       _p(gp) if need_p else None, _p(gc) if need_c else None, None if index is None else _p(index))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    if need_p:
        torch.testing.assert_close(gp, gp_ref, **tol)
    if need_c:
        torch.testing.assert_close(gc, gc_ref, **tol)


def _lines_backward_case(volumes, S, dtype, seed, crossing=False):
    """Inputs of ussim_march_lines_backward: 2 frames x 3 lines x 2 sub-rays of S samples; crossing: one
    line steps over a voxel per sample and leaves the volume."""
    g = torch.Generator().manual_seed(seed)
    B, L, E = 2, 3, 2
    props, index = _frames(volumes, B, dtype, g)
    D, H, W = props.shape[1:4]
    start = torch.rand(B, L, E, 3, generator=g, dtype=dtype) * torch.tensor([D, H, W], dtype=dtype) - 0.5
    step = (torch.rand(B, L, 3, generator=g, dtype=dtype) - 0.5) * 0.2
    if crossing:
        step[1, 1] = torch.tensor([0.9, -1.1, 1.3], dtype=dtype)
    weights = torch.rand(E, S, 3, generator=g, dtype=dtype)
    grad = torch.randn(B, L, 3, S, generator=g, dtype=dtype)
    return props, index, start, step, weights, grad, noise_table(3, rows=128)


def _emu_lines_backward(emu, props, index, start, step, weights, grad, noise, gp, gc, merged):
    """The lines backward kernel and the lines scatter (plain or merged) under the emulation, into gp
    (property gradient) and gc (sub-ray position gradients), either may be None."""
    B, L, E = start.shape[:3]
    S = weights.shape[1]
    fn = emu.emu_lines_backward_f32 if props.dtype == torch.float32 else emu.emu_lines_backward_f64
    i64 = ctypes.c_int64
    fn(*_common(props, noise, 7, 0.05, SHARP_BWD), _p(start), _p(step), _p(weights), _p(grad), i64(B), i64(L), i64(E),
       i64(S), None if gp is None else _p(gp), None if gc is None else _p(gc), None if index is None else _p(index),
       ctypes.c_int(int(merged)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("volumes", ["one", "per_frame", "indexed"])
@pytest.mark.parametrize("S", [100, 33])
@pytest.mark.parametrize("which", ["both", "props", "coords"])
def test_warp_lines_backward_matches_cpu(emu, dtype, volumes, S, which):
    # ussim_march_lines_backward on CUDA with MEDFAST_USSIM_CUDA_MARCH=warp: positions and echo gradients
    # of the sub-rays computed in the kernel, then the scatter of the lines (both kernels emulated)
    props, index, start, step, weights, grad, noise = _lines_backward_case(volumes, S, dtype, 12)
    B, L, E = start.shape[:3]
    need_p, need_c = which in ("both", "props"), which in ("both", "coords")
    gp_ref, gc_ref = torch.ops.medfast.ussim_march_lines_backward(grad, props, start, step, weights, noise, G_AFF,
                                                                  0.05, list(WATER_BG), 7, SHARP_BWD, need_p, need_c,
                                                                  index)
    gp = torch.zeros_like(props) if need_p else None
    gc = torch.full((B, L * E, S, 3), float("nan"), dtype=dtype) if need_c else None
    _emu_lines_backward(emu, props, index, start, step, weights, grad, noise, gp, gc, merged=False)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    if need_p:
        torch.testing.assert_close(gp, gp_ref, **tol)
    if need_c:
        torch.testing.assert_close(gc, gc_ref, **tol)


def test_warp_line_march_one_ray(emu):
    # A kernel that cannot fail would prove nothing: a deliberately wrong input (a weight row off by
    # one sample) must change the emulated result, so the comparisons above can catch a shifted scan.
    g = torch.Generator().manual_seed(1)
    props = _volume(1, torch.float64, g)
    start = torch.full((1, 1, 1, 3), 2.0, dtype=torch.float64)
    step = torch.tensor([[[0.1, 0.05, 0.07]]], dtype=torch.float64)
    S = 70
    weights = torch.ones(1, S, 3, dtype=torch.float64)
    noise = noise_table(5, rows=256)
    out = torch.zeros(1, 1, 3, S, dtype=torch.float64)
    i64 = ctypes.c_int64
    emu.emu_lines_f64(*_common(props, noise, 11, 0.03, SHARP_FWD), _p(start), _p(step), _p(weights), i64(1), i64(1),
                      i64(1), i64(S), _p(out), None)
    with torch.no_grad():
        ref = march_lines(props, start, step, weights, noise, G_AFF, 0.03, WATER_BG, 11, SHARP_FWD)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(out[..., 1:], ref[..., :-1])
    assert np.isfinite(out.numpy()).all()


# ---- the merged property-gradient scatter (MEDFAST_USSIM_CUDA_SCATTER=merged, ussim_warp.cuh) -----------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("volumes", ["one", "per_frame", "indexed"])
@pytest.mark.parametrize("S", [100, 33])
def test_warp_lines_backward_merged_scatter_matches_cpu(emu, dtype, volumes, S):
    # the lines backward kernel, then lines_scatter_merged_kernel, against the CPU op's property gradient;
    # one line with a new cell at every sample, leaving the volume
    props, index, start, step, weights, grad, noise = _lines_backward_case(volumes, S, dtype, 13, crossing=True)
    gp_ref, _ = torch.ops.medfast.ussim_march_lines_backward(grad, props, start, step, weights, noise, G_AFF, 0.05,
                                                             list(WATER_BG), 7, SHARP_BWD, True, False, index)
    gp = torch.zeros_like(props)
    _emu_lines_backward(emu, props, index, start, step, weights, grad, noise, gp, None, merged=True)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gp, gp_ref, **tol)


H100_SMS = 132


def _scatter_case(kind, volumes, B, L, E, S, dtype, seed):
    """Volume(s), volume index, sub-ray starts (B, L, E, 3) and steps (B, L, 3), per-sample property
    gradients (B, L E, S, K) for the scatter kernels. kind: "smooth" (steps of ~0.03 voxel: runs of ~30
    lanes share a cell), "crossing" (steps over 1 voxel: a new cell at every sample), "still" (step 0:
    every sample of a sub-ray in one cell, and all sub-rays start at the same point, so a warp's lanes
    differ only by their frame's volume) or "outside" (starts and steps that leave, enter and miss the
    volume: cells wholly or partly outside)."""
    g = torch.Generator().manual_seed(seed)
    if volumes == "indexed":
        props, index = _volume(3, dtype, g), torch.tensor([2, 0, 0, 2, 1, 1][:B], dtype=torch.int64)
    else:
        props, index = _volume(B if volumes == "per_frame" else 1, dtype, g), None
    D, H, W = props.shape[1:4]
    size = torch.tensor([D, H, W], dtype=dtype)
    start = torch.rand(B, L, E, 3, generator=g, dtype=dtype) * (size - 1)
    direction = torch.nn.functional.normalize(torch.randn(B, L, 3, generator=g, dtype=dtype), dim=-1)
    if kind == "smooth":
        step = 0.03 * direction
    elif kind == "crossing":
        step = torch.tensor([1.05, 0.55, 1.25], dtype=dtype) + 0.1 * direction
        start = start * 0.2
    elif kind == "still":
        step = torch.zeros(B, L, 3, dtype=dtype)
        start = start[:1, :1, :1].expand(B, L, E, 3) + 0.0
    else:  # outside
        start = torch.rand(B, L, E, 3, generator=g, dtype=dtype) * (size + 6) - 3
        step = (0.05 + 0.1 * torch.rand(B, L, 1, generator=g, dtype=dtype)) * direction
        start[0, 0] = torch.tensor([-3.0, -2.5, -1.5], dtype=dtype)  # misses the volume for a while
        start[-1, -1] = size + 0.5  # wholly outside beyond the far corner, leaving it
        step[-1, -1] = torch.tensor([0.02, 0.03, 0.01], dtype=dtype)
    gvals = torch.randn(B, L * E, S, 5, generator=g, dtype=dtype)
    return props, index, start.contiguous(), step.contiguous(), gvals


def _emu_scatter(emu, props, index, gvals, merged, sms, start=None, step=None, coords=None, L=1, E=1, sharp=SHARP_BWD):
    """The scatter kernels alone under the emulation: the lines scatter (start, step) or the scatter of
    explicit positions (coords (B, L E, S, 3)), plain or merged; (property gradient, atomics issued)."""
    fn = emu.emu_scatter_f32 if gvals.dtype == torch.float32 else emu.emu_scatter_f64
    fn.restype = ctypes.c_int64
    gp = torch.zeros_like(props)
    i64 = ctypes.c_int64
    B, S = gvals.shape[0], gvals.shape[2]
    n = fn(_p(gp), i64(props.shape[0]), i64(props.shape[1]), i64(props.shape[2]), i64(props.shape[3]),
           _d(_sharp3(sharp)), None if index is None else _p(index), None if start is None else _p(start),
           None if step is None else _p(step), None if coords is None else _p(coords), _p(gvals), i64(B), i64(L),
           i64(E), i64(S), ctypes.c_int(int(merged)), i64(sms))
    return gp, n


def _scatter_tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["smooth", "crossing", "still", "outside"])
@pytest.mark.parametrize("volumes", ["one", "per_frame", "indexed"])
@pytest.mark.parametrize("S", [203, 64, 5])
def test_merged_lines_scatter_matches_plain(emu, dtype, kind, volumes, S):
    # lines_scatter_merged_kernel against lines_scatter_kernel (checked against the CPU op above), launched
    # with the launcher's geometry: 4 frames x 2 lines x 3 sub-rays x S samples, S = 203 and 5 not
    # multiples of 32, the last warp part-filled (S = 203: 4872 samples; S = 5: 120; S = 64: warps full),
    # warps that span sub-rays, lines and frames (S = 5, 64).
    B, L, E = 4, 2, 3
    props, index, start, step, gvals = _scatter_case(kind, volumes, B, L, E, S, dtype, S + len(kind))
    ref, n_plain = _emu_scatter(emu, props, index, gvals, False, H100_SMS, start, step, L=L, E=E)
    gp, n_merged = _emu_scatter(emu, props, index, gvals, True, H100_SMS, start, step, L=L, E=E)
    assert ref.abs().amax() > 0
    scale = ref.abs().amax()
    torch.testing.assert_close(gp / scale, ref / scale, **_scatter_tol(dtype))
    # the heads issue fewer atomics where lanes share cells (never more)
    assert 0 < n_merged <= n_plain
    if kind in ("smooth", "still") and S >= 64:
        assert n_merged * 4 < n_plain, (n_merged, n_plain)
    if kind == "crossing":
        # every lane its own segment: with sharp = 1 (no sharpened impedance weight clamped to 0, whose
        # zero sums the heads skip) the same atomics as the plain scatter
        ref1, n_plain1 = _emu_scatter(emu, props, index, gvals, False, H100_SMS, start, step, L=L, E=E, sharp=1.0)
        gp1, n_merged1 = _emu_scatter(emu, props, index, gvals, True, H100_SMS, start, step, L=L, E=E, sharp=1.0)
        torch.testing.assert_close(gp1, ref1, rtol=0, atol=0)
        assert n_merged1 == n_plain1 > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["smooth", "crossing", "still", "outside"])
@pytest.mark.parametrize("volumes", ["one", "indexed"])
def test_merged_coords_scatter_matches_plain(emu, dtype, kind, volumes):
    # scatter_merged_kernel (explicit positions: the thread march's and the ray backward's scatter) against
    # scatter_kernel, on the materialised positions of the same sub-rays (frames of L E S samples)
    B, L, E, S = 4, 2, 3, 45
    props, index, start, step, gvals = _scatter_case(kind, volumes, B, L, E, S, dtype, 7 + len(kind))
    i = torch.arange(S, dtype=dtype)
    coords = (start.unsqueeze(3) + i.unsqueeze(1) * step.unsqueeze(2).unsqueeze(3)).reshape(B, L * E, S, 3)
    coords = coords.contiguous()
    ref, n_plain = _emu_scatter(emu, props, index, gvals, False, H100_SMS, coords=coords, L=L, E=E)
    gp, n_merged = _emu_scatter(emu, props, index, gvals, True, H100_SMS, coords=coords, L=L, E=E)
    scale = ref.abs().amax()
    assert scale > 0
    torch.testing.assert_close(gp / scale, ref / scale, **_scatter_tol(dtype))
    assert 0 < n_merged <= n_plain
    if kind in ("smooth", "still"):
        assert n_merged * 4 < n_plain, (n_merged, n_plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merged_scatter_grid_stride(emu, dtype):
    # one multiprocessor: 64 blocks of 128 threads stride over 2 x 8 x 3 x 203 = 9744 samples, so the
    # grid-stride loop runs twice and its second pass ends in a part-filled warp (and whole idle warps)
    B, L, E, S = 2, 8, 3, 203
    assert B * L * E * S > 64 * 128 and (B * L * E * S - 64 * 128) % 32 != 0
    props, index, start, step, gvals = _scatter_case("outside", "per_frame", B, L, E, S, dtype, 21)
    ref, n_plain = _emu_scatter(emu, props, index, gvals, False, 1, start, step, L=L, E=E)
    gp, n_merged = _emu_scatter(emu, props, index, gvals, True, 1, start, step, L=L, E=E)
    scale = ref.abs().amax()
    torch.testing.assert_close(gp / scale, ref / scale, **_scatter_tol(dtype))
    assert 0 < n_merged * 2 < n_plain


def test_merged_scatter_keeps_frames_apart(emu):
    # every sample of every sub-ray at one point (step 0): the lanes of a warp share one cell and differ
    # only by their frame's volume (frames -> volumes 2, 0, 0, 2, 1, 1: frames 1, 2 and 4, 5 share theirs);
    # each volume must get exactly the sum of its own frames' gradients
    B, L, E, S = 6, 1, 2, 7
    props, index, start, step, gvals = _scatter_case("still", "indexed", B, L, E, S, torch.float64, 3)
    gp, n_merged = _emu_scatter(emu, props, index, gvals, True, H100_SMS, start, step, L=L, E=E)
    ref, n_plain = _emu_scatter(emu, props, index, gvals, False, H100_SMS, start, step, L=L, E=E)
    torch.testing.assert_close(gp, ref, rtol=1e-12, atol=1e-12)
    per_volume = [gp[v].sum().item() for v in range(3)]
    assert all(abs(x) > 0 for x in per_volume)
    # 84 samples: warp 0 (lanes 0-31: frames 0-2, volumes 2, 0, 0) has 2 segments, warp 1 (frames 2-4:
    # volumes 0, 2, 1) 3, warp 2 (frames 4, 5: volume 1) 1: 6 heads of 8 corners x 5 properties at most
    assert n_merged <= 6 * 40 < n_plain


# ---- the warp op's CUDA kernels: forward, backward (atomics), warp-merged linear backward ---------------

PADDINGS = {"zeros": 0, "border": 1, "reflection": 2}
MODES = {"nearest": 0, "linear": 1, "cubic": 2}
KERNELS = {"forward": 0, "backward": 1, "merged": 2, "ilp2": 3, "ilp4": 4, "ilp1": 5}


def _ints(values) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)


def test_fast_div_is_exact(warp_emu):
    # the kernels' index split divides by FastDiv (multiply-high + shift) for launches under 2^31 outputs
    rng = np.random.default_rng(0)
    div = warp_emu.emu_fast_div
    div.restype = ctypes.c_uint32
    divisors = list(range(1, 300)) + [2**k + o for k in range(9, 31) for o in (-1, 0, 1) if 2**k + o < 2**31] + \
        rng.integers(1, 2**31 - 1, 200).tolist()
    for d in divisors:
        ns = [0, 1, d - 1, d, d + 1, 2**31 - 1, (2**31 - 1) // d * d, (2**31 - 1) // d * d - 1] + \
            rng.integers(0, 2**31, 20).tolist()
        for n in ns:
            if 0 <= n < 2**31:
                assert div(ctypes.c_uint32(n), ctypes.c_uint32(d)) == n // d, (n, d)


def _warp_case(ndim, dtype, field, broadcast, seed):
    # rows of 37 voxels (not a multiple of 32: warps span row ends), 2 channels, batch 2; the smooth
    # field makes neighbouring lanes share taps (the merged hand-over), the rough one mostly not.
    g = torch.Generator().manual_seed(seed)
    out = (5, 37) if ndim == 2 else (3, 4, 37)
    inn = (6, 33) if ndim == 2 else (4, 5, 33)
    B, C = 2, 2
    image = torch.randn(1 if broadcast else B, C, *inn, generator=g, dtype=dtype)
    if field == "rough":
        ddf = 4.0 * torch.randn(B, ndim, *out, generator=g, dtype=dtype)
    else:
        ddf = 0.3 * torch.randn(B, ndim, *[1] * ndim, generator=g, dtype=dtype).expand(B, ndim, *out).clone()
        ddf += 0.05 * torch.randn(B, ndim, *out, generator=g, dtype=dtype)
        ddf[:, -1] += 0.5  # x taps straddle voxel boundaries
    if field == "nan":
        ddf.view(B, ndim, -1)[:, 0, ::7] = float("nan")
    gout = torch.randn(B, C, *out, generator=g, dtype=dtype)
    return image, ddf, gout, out, inn


def _emu_warp(warp_emu, kernel, mode, padding, fast, image, ddf, out_size, inn, out=None, gout=None, gp=None,
              gi=None):
    fn = warp_emu.emu_warp_f32 if image.dtype == torch.float32 else warp_emu.emu_warp_f64
    ndim = ddf.shape[1]
    fn(ctypes.c_int(KERNELS[kernel]), ctypes.c_int(ndim), ctypes.c_int(MODES[mode]), ctypes.c_int(PADDINGS[padding]),
       ctypes.c_int(int(fast)), _p(image), ctypes.c_int64(image.shape[0]), ctypes.c_int64(image.shape[1]),
       _ints(inn), _p(ddf), ctypes.c_int64(ddf.shape[0]), _ints(out_size), None if out is None else _p(out),
       None if gout is None else _p(gout), None if gp is None else _p(gp), None if gi is None else _p(gi))


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("padding", list(PADDINGS))
@pytest.mark.parametrize("fast", [True, False])
def test_warp_forward_kernel_matches_cpu(warp_emu, dtype, ndim, mode, padding, fast):
    image, ddf, _, out_size, inn = _warp_case(ndim, dtype, "nan", True, 3)
    ref = torch.ops.medfast.warp_forward(image, None, ddf, list(out_size), mode, padding)
    out = torch.full_like(ref, 5.0)
    _emu_warp(warp_emu, "forward", mode, padding, fast, image, ddf, out_size, inn, out=out)
    torch.testing.assert_close(out, ref, equal_nan=True, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("padding", list(PADDINGS))
@pytest.mark.parametrize("kernel", ["ilp1", "ilp2", "ilp4"])
@pytest.mark.parametrize("broadcast", [True, False])
def test_warp_forward_ilp_kernel_is_bitwise_the_forward_kernel(warp_emu, dtype, ndim, mode, padding, kernel,
                                                               broadcast):
    # V voxels per thread with 32-bit tap offsets (MEDFAST_WARP_CUDA_FORWARD=ilp1 / ilp2 / ilp4): the same
    # arithmetic per voxel, so the same bits; NaN displacements, several channels, a batch-1 image, and a
    # voxel count (2 x 444) that leaves the last thread of the last pass part-filled
    image, ddf, _, out_size, inn = _warp_case(ndim, dtype, "nan", broadcast, 5)
    ref = torch.full((ddf.shape[0], image.shape[1], *out_size), 5.0, dtype=dtype)
    _emu_warp(warp_emu, "forward", mode, padding, True, image, ddf, out_size, inn, out=ref)
    out = torch.full_like(ref, 7.0)
    _emu_warp(warp_emu, kernel, mode, padding, True, image, ddf, out_size, inn, out=out)
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any()
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(ref))
    cpu = torch.ops.medfast.warp_forward(image, None, ddf, list(out_size), mode, padding)
    torch.testing.assert_close(out, cpu, equal_nan=True, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("padding", list(PADDINGS))
def test_warp_backward_kernel_matches_cpu(warp_emu, dtype, ndim, mode, padding):
    image, ddf, gout, out_size, inn = _warp_case(ndim, dtype, "rough", False, 4)
    need_pos = mode != "nearest"
    gi_ref, gp_ref = torch.ops.medfast.warp_backward(gout, image, None, ddf, list(out_size), mode, padding, True,
                                                     need_pos)
    gi = torch.zeros_like(image)
    gp = torch.full_like(ddf, 7.0) if need_pos else None
    _emu_warp(warp_emu, "backward", mode, padding, True, image, ddf, out_size, inn, gout=gout, gp=gp, gi=gi)
    torch.testing.assert_close(gi, gi_ref, **_tol(dtype))
    if need_pos:
        torch.testing.assert_close(gp, gp_ref, equal_nan=True, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("padding", list(PADDINGS))
@pytest.mark.parametrize("field", ["smooth", "rough", "nan"])
@pytest.mark.parametrize("broadcast", [False, True])
@pytest.mark.parametrize("fast", [True, False])
def test_warp_merged_scatter_matches_cpu(warp_emu, dtype, ndim, padding, field, broadcast, fast):
    # MEDFAST_WARP_CUDA_SCATTER=merged: lanes hand shared taps to their neighbour before the atomics
    image, ddf, gout, out_size, inn = _warp_case(ndim, dtype, field, broadcast, ndim * 10 + len(padding))
    gi_ref, gp_ref = torch.ops.medfast.warp_backward(gout, image, None, ddf, list(out_size), "linear", padding, True,
                                                     True)
    gi = torch.zeros_like(image)
    gp = torch.full_like(ddf, 7.0)
    _emu_warp(warp_emu, "merged", "linear", padding, fast, image, ddf, out_size, inn, gout=gout, gp=gp, gi=gi)
    torch.testing.assert_close(gi, gi_ref, **_tol(dtype))
    torch.testing.assert_close(gp, gp_ref, equal_nan=True, **_tol(dtype))
    # and the image gradient alone (no position gradient: grad_pos null)
    gi2 = torch.zeros_like(image)
    _emu_warp(warp_emu, "merged", "linear", padding, fast, image, ddf, out_size, inn, gout=gout, gi=gi2)
    torch.testing.assert_close(gi2, gi_ref, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("kernel", ["forward", "ilp2", "backward", "merged"])
def test_warp_kernels_read_nothing_outside_under_zeros_padding(warp_emu, dtype, ndim, mode, kernel):
    # NaN image faces (a NaN-masked background) and samples far outside: the kernels give 0 and no
    # gradient there, as the CPU op (warp.h sample_outside), instead of 0 x NaN
    if kernel == "merged" and mode != "linear":
        pytest.skip("the merged scatter is linear only")
    image, ddf, gout, out_size, inn = _warp_case(ndim, dtype, "rough", True, 11)
    for ax in range(ndim):
        image.select(2 + ax, 0).fill_(float("nan"))
    ddf[..., :5] += 60.0
    if kernel in ("forward", "ilp2"):
        ref = torch.ops.medfast.warp_forward(image, None, ddf, list(out_size), mode, "zeros")
        out = torch.full_like(ref, 5.0)
        _emu_warp(warp_emu, kernel, mode, "zeros", True, image, ddf, out_size, inn, out=out)
        assert (ref[..., :5] == 0).all() and ref.isnan().any()
        torch.testing.assert_close(out, ref, equal_nan=True, **_tol(dtype))
        return
    need_pos = mode != "nearest"
    gi_ref, gp_ref = torch.ops.medfast.warp_backward(gout, image, None, ddf, list(out_size), mode, "zeros", True,
                                                     need_pos)
    gi = torch.zeros_like(image)
    gp = torch.full_like(ddf, 7.0) if need_pos else None
    _emu_warp(warp_emu, kernel, mode, "zeros", True, image, ddf, out_size, inn, gout=gout, gp=gp, gi=gi)
    torch.testing.assert_close(gi, gi_ref, **_tol(dtype))
    if need_pos:
        assert (gp_ref[..., :5] == 0).all() and gp_ref.isnan().any()
        torch.testing.assert_close(gp, gp_ref, equal_nan=True, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("padding", list(PADDINGS))
@pytest.mark.parametrize("kernel", ["forward", "ilp2", "backward", "merged"])
def test_warp_kernels_skip_taps_without_weight(warp_emu, dtype, ndim, padding, kernel):
    # Integer displacements: every sample on the grid, where its upper taps weigh 0. Beside inf voxels and
    # with inf upstream gradients those taps added 0 x inf = NaN; the kernels (warp.h tap_product) give the
    # voxel read and send the gradient to it alone, as grid_sample's nearest does at these positions.
    import torch.nn.functional as F

    from medfast._extension import _C

    image, ddf, gout, out_size, inn = _warp_case(ndim, dtype, "rough", True, 13)
    image.view(-1)[::11] = float("inf")
    image.view(-1)[5::23] = -float("inf")
    ddf = ddf.clamp(-3, 3).round()
    gout.view(-1)[::9] = float("inf")
    pos = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in out_size], indexing="ij")) + ddf
    scale = torch.tensor([2.0 / (n - 1) for n in inn], dtype=torch.float64).view(1, ndim, *[1] * ndim)
    grid = (pos * scale - 1.0).movedim(1, -1).flip(-1)
    img = image.double().expand(ddf.shape[0], *image.shape[1:]).requires_grad_()
    ref = F.grid_sample(img, grid, mode="nearest", padding_mode=padding, align_corners=True)
    ref.backward(gout.double())
    gi_ref = img.grad.sum(0, keepdim=True)
    assert ref.isinf().any() and gi_ref.isinf().any() and torch.isfinite(gi_ref).sum() > gi_ref.numel() // 2
    if kernel in ("forward", "ilp2"):
        out = torch.full(ref.shape, 5.0, dtype=dtype)
        _emu_warp(warp_emu, kernel, "linear", padding, True, image, ddf, out_size, inn, out=out)
        assert torch.equal(out.double().nan_to_num(), ref.detach().nan_to_num())
        assert not out.isnan().any()
        return
    _C._set_cpu_simd(False)  # the generic CPU path: the same header arithmetic
    try:
        _, gp_ref = torch.ops.medfast.warp_backward(gout, image, None, ddf, list(out_size), "linear", padding, False,
                                                    True)
    finally:
        _C._set_cpu_simd(True)
    gi = torch.zeros_like(image)
    gp = torch.full_like(ddf, 7.0)
    _emu_warp(warp_emu, kernel, "linear", padding, True, image, ddf, out_size, inn, gout=gout, gp=gp, gi=gi)
    torch.testing.assert_close(gi.double(), gi_ref, equal_nan=True, **_tol(dtype))
    torch.testing.assert_close(gp, gp_ref, equal_nan=True, **_tol(dtype))
