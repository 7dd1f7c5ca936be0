"""The CUDA kernels of the distance family (csrc/distance/distance_kernels.cuh: the envelope pass per
axis, the finish, and the seed distances' binary pass, middle-axis pass and queries) run on the CPU under
the launch emulation of tests/simt/simt.h (a grid of blocks, each block's threads as fibers on one
thread), compiled from the same source as the CUDA build and launched in the launcher's order with its
geometry, against the CPU ops (torch.ops.medfast.distance_transform / seed_distances).
tests/test_distance.py checks the real launches on a GPU."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from tests.test_simt import _build, _d, _p

ops = torch.ops.medfast
H100_SMS = 132
THREADS = 128  # distance_kernels.cuh kThreads


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    lib = _build(tmp_path_factory, "distance_kernels_emu")
    lib.emu_distance_blocks.restype = ctypes.c_int64
    return lib


def _sizes(shape):
    return (ctypes.c_int64 * (len(shape) - 1))(*shape[1:])


def _emu_transform(lib, mask, spacing, dtype, sms):
    """distance_cuda's launches on the start buffer of initial_squared (0 on background, +inf elsewhere)."""
    d = torch.zeros(mask.shape, dtype=dtype).masked_fill_(mask != 0, math.inf).contiguous()
    fn = lib.emu_distance_transform_f32 if dtype == torch.float32 else lib.emu_distance_transform_f64
    fn(_p(d), ctypes.c_int64(mask.shape[0]), ctypes.c_int(mask.dim() - 1), _sizes(mask.shape), _d(spacing),
       ctypes.c_int64(sms))
    return d


def _emu_seeds(lib, seeds, query, spacing, sms):
    """seed_distances_cuda's launches: the queries in C order, as the CPU op returns them."""
    s = (seeds != 0).contiguous()
    index = (query != 0).flatten().nonzero().flatten().contiguous()
    out = torch.full((index.numel(),), math.nan, dtype=torch.float32)
    lib.emu_seed_distances(_p(s), _p(index), ctypes.c_int64(index.numel()), ctypes.c_int64(seeds.shape[0]),
                           ctypes.c_int(seeds.dim() - 1), _sizes(seeds.shape), _d(spacing), ctypes.c_int64(sms),
                           _p(out))
    return out


def _tol(dtype):
    return 1e-12 if dtype == torch.float64 else 1e-5


SHAPES = {2: (2, 37, 29), 3: (2, 19, 23, 17)}  # lines and voxels: not multiples of the 128-thread block
SPACINGS = {"iso": (1.0, 1.0, 1.0), "aniso": (0.8, 1.3, 2.0)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("spacing", list(SPACINGS))
@pytest.mark.parametrize("sms", [H100_SMS, 1])
def test_distance_kernels_match_cpu(lib, dtype, ndim, spacing, sms):
    shape = SHAPES[ndim]
    g = torch.Generator().manual_seed(ndim * 7 + sms)
    mask = torch.rand(shape, generator=g) >= 0.03
    mask[0].view(-1)[5] = False
    mask[1] = True  # no background: the virtual-background branch of the finish
    sp = list(SPACINGS[spacing][:ndim])
    got = _emu_transform(lib, mask, sp, dtype, sms)
    want = ops.distance_transform(mask, sp, dtype)
    tol = _tol(dtype)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("background", [0.5, 0.03, 0.002])
def test_distance_kernels_equal_cpu_bitwise(lib, dtype, background):
    # the same arithmetic in the same order on both sides (the binary first pass, the envelope passes,
    # the finish): equal to the last bit, not only within a tolerance
    g = torch.Generator().manual_seed(int(background * 1000))
    mask = torch.rand(2, 19, 23, 17, generator=g) >= background
    mask[0, 3, 4, 5] = False
    sp = [0.7, 1.3, 0.45]
    assert torch.equal(_emu_transform(lib, mask, sp, dtype, H100_SMS), ops.distance_transform(mask, sp, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 7, 5), (2, 4, 6, 3), (1, 1, 40, 3), (3, 1, 1)])
@pytest.mark.parametrize("fill", ["empty", "full", "one"])
def test_distance_kernels_empty_full_masks(lib, dtype, shape, fill):
    # empty: all background (distance 0); full: no background (the virtual background voxel); one: a
    # single background voxel at the end of the last element
    mask = torch.zeros(shape, dtype=torch.bool) if fill == "empty" else torch.ones(shape, dtype=torch.bool)
    if fill == "one":
        mask.view(-1)[-1] = False
    sp = [0.3, 1.7, 1.1][: len(shape) - 1]
    got = _emu_transform(lib, mask, sp, dtype, H100_SMS)
    want = ops.distance_transform(mask, sp, dtype)
    tol = _tol(dtype)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    if fill == "empty":
        assert (got == 0).all()


def test_distance_kernels_grid_stride(lib):
    # one multiprocessor: 64 blocks of 128 threads = 8192 threads stride over the 9800 lines of the first
    # axis and the 49000 voxels of the finish
    shape = (2, 5, 70, 70)
    assert lib.emu_distance_blocks(ctypes.c_int64(2 * 70 * 70), ctypes.c_int64(1)) == 64
    assert lib.emu_distance_blocks(ctypes.c_int64(2 * 70 * 70), ctypes.c_int64(H100_SMS)) == math.ceil(9800 / 128)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(shape, generator=g) >= 0.01
    got = _emu_transform(lib, mask, [1.5, 1.0, 0.7], torch.float32, 1)
    want = ops.distance_transform(mask, [1.5, 1.0, 0.7], torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 17, 13, 11), (3, 23, 19), (1, 40, 1, 9), (2, 30, 21, 17)])
@pytest.mark.parametrize("density", [0.005, 0.2])
@pytest.mark.parametrize("sms", [H100_SMS, 1])
def test_seed_distance_kernels_match_cpu(lib, shape, density, sms):
    g = torch.Generator().manual_seed(sum(shape) + sms)
    seeds = torch.rand(shape, generator=g) < density
    seeds.view(shape[0], -1)[:, 0] = True
    query = torch.rand(shape, generator=g) < 0.3
    sp = [1.2, 0.9, 2.0][: len(shape) - 1]
    got = _emu_seeds(lib, seeds, query, sp, sms)
    want = ops.seed_distances(seeds, query, sp)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def test_seed_distance_kernels_without_seeds_and_empty_query(lib):
    seeds = torch.zeros(2, 6, 7, 8, dtype=torch.bool)
    seeds[1, 3, 3, 3] = True
    query = torch.ones(2, 6, 7, 8, dtype=torch.bool)
    got = _emu_seeds(lib, seeds, query, [1.0, 1.0, 1.0], H100_SMS)
    torch.testing.assert_close(got, ops.seed_distances(seeds, query, [1.0, 1.0, 1.0]))
    assert torch.isinf(got[: 6 * 7 * 8]).all() and torch.isfinite(got[6 * 7 * 8 :]).all()
    assert _emu_seeds(lib, seeds, torch.zeros_like(query), [1.0, 1.0, 1.0], H100_SMS).numel() == 0


@pytest.mark.parametrize("shape", [(2, 17, 13, 11), (3, 23, 19), (1, 1, 5, 9), (2, 6, 1, 2), (1, 4, 70, 65)])
@pytest.mark.parametrize("sms", [H100_SMS, 1])
def test_surface_kernel_equals_cpu(lib, shape, sms):
    """surface_edges_cuda's kernel (one thread per voxel, the border test per voxel) against the CPU op
    (row by row, the border test per row): the same voxels."""
    g = torch.Generator().manual_seed(sum(shape) + sms)
    for density in (0.7, 1.0):
        mask = (torch.rand(shape, generator=g) < density).contiguous()
        out = torch.zeros_like(mask)
        lib.emu_surface_edges(_p(mask), _p(out), ctypes.c_int64(shape[0]), ctypes.c_int(len(shape) - 1),
                              _sizes(shape), ctypes.c_int64(sms))
        assert torch.equal(out, ops.surface_edges(mask)[0])
