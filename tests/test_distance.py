"""medfast.distance_transform against scipy.ndimage.distance_transform_edt, plus operator plumbing
(opcheck, torch.compile), bad inputs, and CUDA against CPU (skipped without a GPU)."""

import numpy as np
import pytest
import torch
from scipy import ndimage

import medfast as mf
from tests.conftest import requires_cuda, simd_and_generic

ops = torch.ops.medfast


def scipy_edt(mask: torch.Tensor, spacing=None) -> np.ndarray:
    m = mask.detach().cpu().numpy()
    return np.stack([ndimage.distance_transform_edt(x, sampling=spacing) for x in m])


def assert_matches(got: torch.Tensor, ref: np.ndarray, rtol=2e-6):
    assert got.shape == ref.shape
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), torch.from_numpy(ref), rtol=rtol, atol=1e-5)


def random_mask(shape, background: float) -> torch.Tensor:
    """Foreground (True) except for a fraction `background` of voxels."""
    return torch.rand(shape) >= background


@pytest.mark.parametrize("background", [0.5, 0.1, 0.01, 0.001])
@pytest.mark.parametrize("shape", [(2, 31, 17), (1, 64, 64), (2, 13, 9, 11), (1, 24, 32, 20)])
def test_matches_scipy_random(shape, background):
    mask = random_mask(shape, background)
    mask.view(-1)[torch.randint(mask.numel(), (1,))] = False  # at least one background voxel
    assert_matches(mf.distance_transform(mask), scipy_edt(mask))


@pytest.mark.parametrize("spacing", [None, (0.7, 1.0, 1.0), (2.5, 0.3, 1.1)])
def test_first_axis_pass_on_lines(spacing):
    # lines along the first axis (the binary first pass alone decides them): background at both ends,
    # only at the start or the end, even and odd gaps (ties between two backgrounds), a single one;
    # float64, so the values must be exact to the last bits
    cols = [[0, 5, 12, 20, 36], [0], [36], [17], [3, 4], [10, 16]]
    mask = torch.ones(1, 37, len(cols), 2, dtype=torch.bool)
    for j, zeros in enumerate(cols):
        mask[0, zeros, j, :] = False
    mask[0, :, 0, 1] = True  # a full line: its distances come from the neighbouring line
    got = mf.distance_transform(mask, spacing, dtype=torch.float64)
    torch.testing.assert_close(got, torch.from_numpy(scipy_edt(mask, spacing)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 40, 33), (1, 15, 22, 17)])
def test_single_background_voxel(shape):
    mask = torch.ones(shape, dtype=torch.bool)
    mask.view(-1)[mask.numel() // 3] = False
    assert_matches(mf.distance_transform(mask), scipy_edt(mask))
    corner = torch.ones(shape, dtype=torch.bool)
    corner.view(-1)[-1] = False
    assert_matches(mf.distance_transform(corner), scipy_edt(corner))


@pytest.mark.parametrize("shape", [(2, 7, 5), (2, 4, 6, 3)])
def test_all_background_is_zero(shape):
    out = mf.distance_transform(torch.zeros(shape))
    assert out.dtype == torch.float32 and (out == 0).all()


@pytest.mark.parametrize(
    "shape, spacing",
    [((1, 9, 12), (1.0, 1.0)), ((1, 7, 5), (0.3, 1.7)), ((1, 5, 6, 4), (2.0, 0.5, 1.25)), ((1, 1, 1, 5), None)],
)
def test_all_foreground_matches_scipy_virtual_background(shape, spacing):
    mask = torch.ones(shape, dtype=torch.int32)
    assert_matches(mf.distance_transform(mask, spacing), scipy_edt(mask, spacing))


def test_mixed_batch_with_empty_and_full_elements():
    mask = random_mask((4, 12, 10, 9), 0.05)
    mask[1] = True
    mask[2] = False
    mask[3] = True
    mask[3, 5, 4, 3] = False
    assert_matches(mf.distance_transform(mask, (1.5, 1.0, 0.7)), scipy_edt(mask, (1.5, 1.0, 0.7)))


@pytest.mark.parametrize(
    "shape, spacing",
    [((2, 25, 19), (0.7, 2.3)), ((2, 25, 19), 1.5), ((2, 11, 14, 9), (3.0, 0.8, 1.1)), ((1, 16, 16, 16), [5, 1, 1])],
)
def test_anisotropic_spacing(shape, spacing):
    mask = random_mask(shape, 0.02)
    mask.view(-1)[0] = False
    sampling = spacing if not isinstance(spacing, float) else (spacing,) * (len(shape) - 1)
    assert_matches(mf.distance_transform(mask, spacing), scipy_edt(mask, sampling))


def test_long_lines_keep_float32_precision():
    mask = random_mask((1, 4000, 9), 0.0005)
    mask[0, 0, 0] = False
    assert_matches(mf.distance_transform(mask, (0.37, 2.1)), scipy_edt(mask, (0.37, 2.1)), rtol=1e-6)


@pytest.mark.parametrize("shape", [(3, 1, 17), (2, 17, 1), (2, 1, 1), (2, 1, 9, 8), (2, 7, 1, 1), (1, 1, 1, 1)])
def test_size_one_axes(shape):
    mask = random_mask(shape, 0.3)
    assert_matches(mf.distance_transform(mask, [1.3] * (len(shape) - 1)), scipy_edt(mask, [1.3] * (len(shape) - 1)))


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int8, torch.int64, torch.float16, torch.float32])
def test_mask_dtypes(dtype):
    values = torch.randint(-2, 3, (2, 13, 11)).to(dtype)
    mask = values != 0
    out = mf.distance_transform(values)
    assert out.dtype == torch.float32
    assert_matches(out, scipy_edt(mask))


def test_float64_output():
    mask = random_mask((2, 9, 10, 11), 0.1)
    ref = scipy_edt(mask, (0.9, 1.1, 1.3))
    out = mf.distance_transform(mask.double(), (0.9, 1.1, 1.3))
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-12)
    out = mf.distance_transform(mask, (0.9, 1.1, 1.3), dtype=torch.float64)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-12)


def test_non_contiguous_input():
    base = random_mask((12, 3, 10, 14), 0.1)
    mask = base.permute(1, 3, 0, 2)[:, ::2]  # (3, 7, 12, 10), strided
    assert not mask.is_contiguous()
    out = mf.distance_transform(mask, (1.0, 2.0, 0.5))
    assert out.is_contiguous()
    assert_matches(out, scipy_edt(mask, (1.0, 2.0, 0.5)))


def test_requires_grad_mask_is_read_detached():
    mask = (torch.rand(1, 10, 10) > 0.3).float().requires_grad_()
    out = mf.distance_transform(mask)
    assert not out.requires_grad
    assert_matches(out, scipy_edt(mask))


def test_output_is_deterministic():
    mask = random_mask((2, 20, 18, 16), 0.05)
    assert torch.equal(mf.distance_transform(mask), mf.distance_transform(mask))


@pytest.mark.parametrize("shape", [(2, 9, 7), (1, 5, 6, 4)])
def test_opcheck(shape):
    mask = random_mask(shape, 0.2)
    spacing = [1.0, 0.5, 2.0][: len(shape) - 1]
    torch.library.opcheck(ops.distance_transform.default, (mask, spacing, torch.float32))
    torch.library.opcheck(ops.distance_transform.default, (mask.double(), spacing, torch.float64))


def test_torch_compile_fullgraph():
    def fn(mask):
        return mf.distance_transform(mask > 0.5, (1.0, 2.0, 1.0)).square().mean(dim=(1, 2, 3))

    compiled = torch.compile(fn, backend="inductor", fullgraph=True)
    mask = torch.rand(2, 10, 9, 8)
    torch.testing.assert_close(compiled(mask), fn(mask))


def test_bad_inputs():
    good = torch.ones(1, 5, 5, dtype=torch.bool)
    with pytest.raises(TypeError, match="mask"):
        mf.distance_transform(np.ones((1, 5, 5)))
    with pytest.raises(TypeError, match="mask"):
        mf.distance_transform(torch.ones(1, 5, 5, dtype=torch.complex64))
    with pytest.raises(ValueError, match="mask"):
        mf.distance_transform(torch.ones(5, 5))
    with pytest.raises(ValueError, match="mask"):
        mf.distance_transform(torch.ones(1, 1, 5, 5, 5))
    with pytest.raises(ValueError, match="mask"):
        mf.distance_transform(torch.ones(1, 0, 5))
    with pytest.raises(ValueError, match="spacing"):
        mf.distance_transform(good, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        mf.distance_transform(good, (1.0, 0.0))
    with pytest.raises(ValueError, match="spacing"):
        mf.distance_transform(good, -1.0)
    with pytest.raises(ValueError, match="spacing"):
        mf.distance_transform(good, (1.0, float("nan")))
    with pytest.raises(TypeError, match="spacing"):
        mf.distance_transform(good, "1,1")
    with pytest.raises(TypeError, match="spacing"):
        mf.distance_transform(good, True)
    with pytest.raises(TypeError, match="dtype"):
        mf.distance_transform(good, dtype=torch.float16)


def test_direct_op_call_with_bad_arguments_raises_not_crashes():
    good = torch.ones(1, 5, 5, dtype=torch.bool)
    with pytest.raises(ValueError):
        ops.distance_transform(good, [1.0], torch.float32)
    with pytest.raises(ValueError):
        ops.distance_transform(good, [1.0, -2.0], torch.float32)
    with pytest.raises(ValueError):
        ops.distance_transform(torch.ones(5), [1.0], torch.float32)
    with pytest.raises(ValueError):
        ops.distance_transform(torch.ones(1, 0, 4), [1.0, 1.0], torch.float32)
    with pytest.raises(TypeError):
        ops.distance_transform(good, [1.0, 1.0], torch.int32)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 37, 29), (2, 19, 23, 17), (1, 1, 40, 3)])
def test_cuda_matches_cpu(shape, dtype):
    mask = random_mask(shape, 0.02)
    mask[0].view(-1)[5] = False
    if shape[0] > 1:
        mask[1] = True  # no background: the virtual-background branch
    spacing = [0.8, 1.3, 2.0][: len(shape) - 1]
    cpu = mf.distance_transform(mask, spacing, dtype=dtype)
    gpu = mf.distance_transform(mask.cuda(), spacing, dtype=dtype)
    assert gpu.device.type == "cuda" and gpu.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=tol, atol=tol)
    assert_matches(gpu.cpu(), scipy_edt(mask, spacing))


# ---- seed_distances: the distance transform evaluated at query voxels only (surface metrics) ----


def _seed_reference(seeds, query, spacing):
    """scipy's EDT of ~seeds per batch element, read at the query voxels in C order."""
    out = []
    for s, q in zip(seeds.numpy(), query.numpy()):
        d = ndimage.distance_transform_edt(~s, sampling=spacing) if s.any() else np.full(s.shape, np.inf)
        out.append(d[q])
    return torch.from_numpy(np.concatenate(out))


@pytest.mark.parametrize(
    "shape,spacing",
    [((2, 17, 13, 11), (1.5, 1.0, 0.8)), ((3, 23, 19), (0.7, 1.3)), ((1, 40, 1, 9), (1.0, 2.0, 0.5))],
)
@pytest.mark.parametrize("density", [0.002, 0.05, 0.5])
def test_seed_distances_match_scipy_at_queries(shape, spacing, density):
    from medfast.ops._distance import seed_distances

    seeds = torch.rand(shape) < density
    seeds.view(shape[0], -1)[:, 0] = True  # every element has a seed
    query = torch.rand(shape) < 0.3
    got = seed_distances(seeds, query, spacing)
    want = _seed_reference(seeds, query, spacing)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)


def _ball(shape, centre, radius):
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre)) < radius**2


def _surface(mask):
    return mask & ~torch.from_numpy(ndimage.binary_erosion(mask.numpy()))


@pytest.mark.parametrize(
    "name,seeds,query",
    [
        # near surfaces: every query found by the direct search of its plane
        ("near", _surface(_ball((36, 33, 40), (18, 16, 20), 12)), _surface(_ball((36, 33, 40), (19, 16, 21), 12))),
        # far apart: most planes exceed their search budget and fall back to the envelope pass
        ("far", _surface(_ball((36, 33, 40), (5, 5, 5), 4)), _surface(_ball((36, 33, 40), (28, 26, 32), 6))),
        # one seed, queries everywhere: the first query of each plane has no bound to start from
        ("single seed", _ball((20, 9, 26), (3, 4, 22), 0.5), torch.ones(20, 9, 26, dtype=torch.bool)),
    ],
)
def test_seed_distances_search_and_fallback_match_scipy(name, seeds, query):
    """The 3D queries are searched plane by plane, with the envelope pass as the fallback for expensive
    planes: both (and their mix within one volume) against scipy."""
    from medfast.ops._distance import seed_distances

    seeds, query = seeds[None], query[None]
    for spacing in ((1.5, 1.0, 0.8), (0.6, 1.0, 2.5)):
        got = seed_distances(seeds, query, spacing)
        want = _seed_reference(seeds, query, spacing)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 9, 7, 5), (1, 12, 10, 8), (2, 11, 6, 13), (1, 30, 17, 64)])
def test_seed_distances_simd_matches_generic_bitwise(shape):
    """The AVX2 forms of the binary pass and of the plane search against the baseline code: identical
    floats (the vector row minimum may read extra true candidates, which cannot change a minimum)."""
    from medfast.ops._distance import seed_distances

    g = torch.Generator().manual_seed(sum(shape))
    seeds = torch.rand(shape, generator=g) < 0.02
    seeds.view(shape[0], -1)[:, -1] = True
    query = torch.rand(shape, generator=g) < 0.3
    fast, slow = simd_and_generic(lambda: seed_distances(seeds, query, (1.3, 0.7, 0.9)))
    assert torch.equal(fast, slow)
    torch.testing.assert_close(fast.double(), _seed_reference(seeds, query, (1.3, 0.7, 0.9)), rtol=1e-6, atol=1e-5)


def test_seed_distances_element_without_seeds_is_inf_and_empty_query():
    from medfast.ops._distance import seed_distances

    seeds = torch.zeros(2, 6, 7, 8, dtype=torch.bool)
    seeds[1, 3, 3, 3] = True
    query = torch.ones(2, 6, 7, 8, dtype=torch.bool)
    got = seed_distances(seeds, query, (1.0, 1.0, 1.0))
    assert torch.isinf(got[: 6 * 7 * 8]).all() and torch.isfinite(got[6 * 7 * 8 :]).all()
    assert seed_distances(seeds, torch.zeros_like(query), (1.0, 1.0, 1.0)).numel() == 0


def test_seed_distances_opcheck_and_bad_arguments():
    seeds = torch.rand(2, 5, 6, 7) < 0.1
    query = torch.rand(2, 5, 6, 7) < 0.5
    torch.library.opcheck(torch.ops.medfast.seed_distances.default, (seeds, query, [1.0, 2.0, 0.5]))
    with pytest.raises(ValueError, match="query must have the seeds' shape"):
        torch.ops.medfast.seed_distances(seeds, query[:, :3], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="spacing must be positive"):
        torch.ops.medfast.seed_distances(seeds, query, [1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="spacing must have 3"):
        torch.ops.medfast.seed_distances(seeds, query, [1.0, 1.0])


@pytest.mark.cuda
@requires_cuda
def test_seed_distances_cuda_matches_cpu():
    from medfast.ops._distance import seed_distances

    seeds = torch.rand(2, 30, 21, 17) < 0.01
    query = torch.rand(2, 30, 21, 17) < 0.2
    cpu = seed_distances(seeds, query, (1.2, 0.9, 2.0))
    gpu = seed_distances(seeds.cuda(), query.cuda(), (1.2, 0.9, 2.0))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-5)


def _element_pairs():
    """Per batch element, a (seeds, query) pair of surfaces whose boxes differ: the query surface beside
    the seed surface along each axis in turn (before and after it), overlapping it, and far in a corner."""
    shape = (26, 23, 29)
    seeds_at = [(6, 11, 14), (19, 11, 14), (13, 5, 14), (13, 17, 14), (13, 11, 6), (13, 11, 22), (13, 11, 14)]
    query_at = [(19, 11, 14), (6, 11, 14), (13, 17, 14), (13, 5, 14), (13, 11, 22), (13, 11, 6), (12, 10, 15)]
    pairs = [(_surface(_ball(shape, s, 4.5)), _surface(_ball(shape, q, 5.5))) for s, q in zip(seeds_at, query_at)]
    pairs.append((_surface(_ball(shape, (3, 3, 3), 2.5)), _surface(_ball(shape, (21, 18, 24), 4))))
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


@pytest.mark.parametrize("spacing", [(1.5, 1.0, 0.8), (0.6, 1.0, 2.5), (1.0, 1.0, 1.0)])
def test_seed_distances_per_element_boxes_match_scipy(spacing):
    """Each element's planes are cropped to its own seeds' rows and columns and its queries' planes: queries
    outside that box on every side (the direct search and the envelope fallback both start outside it),
    and elements without seeds or without queries beside the others, against scipy."""
    from medfast.ops._distance import seed_distances

    seeds, query = _element_pairs()
    seeds = torch.cat([seeds, torch.zeros_like(seeds[:1]), seeds[:1]])  # + an element without seeds
    query = torch.cat([query, query[:1], torch.zeros_like(query[:1])])  # + one without queries
    got = seed_distances(seeds, query, spacing)
    want = _seed_reference(seeds, query, spacing)
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)


def test_seed_distances_per_element_equals_one_element_at_a_time():
    """Cropping per element: the batch gives each element exactly what it gives alone (bitwise)."""
    from medfast.ops._distance import seed_distances

    seeds, query = _element_pairs()
    whole = seed_distances(seeds, query, (1.3, 0.7, 0.9))
    parts = torch.cat([seed_distances(s[None], q[None], (1.3, 0.7, 0.9)) for s, q in zip(seeds, query)])
    assert torch.equal(whole, parts)


# ---- surface_edges: the surface voxels of the surface metrics ----


def _surface_reference(mask):
    """mask & ~binary_erosion(mask) per element (scipy: cross structuring element, background outside)."""
    m = mask.numpy()
    out = np.stack([e & ~ndimage.binary_erosion(e) for e in m]) if m.size else m.copy()
    return torch.from_numpy(out)


@pytest.mark.parametrize(
    "shape",
    [(2, 17, 13, 11), (1, 9, 1, 12), (2, 5, 6, 2), (1, 3, 3, 3), (3, 40, 33), (1, 1, 7), (2, 6, 1), (1, 4, 70, 65)],
)
@pytest.mark.parametrize("density", [0.3, 0.9, 1.0, 0.0])
def test_surface_edges_match_scipy(shape, density):
    from medfast.ops._distance import surface_edges

    g = torch.Generator().manual_seed(len(shape) * 100 + int(density * 10))
    mask = torch.rand(shape, generator=g) < density
    edges, counts = surface_edges(mask)
    want = _surface_reference(mask)
    assert edges.dtype == torch.bool and torch.equal(edges, want)
    assert counts.dtype == torch.long and torch.equal(counts, want.flatten(1).sum(1))


def test_surface_edges_of_a_ball_and_a_strided_input():
    from medfast.ops._distance import surface_edges

    ball = _ball((21, 19, 23), (10, 9, 11), 7.5)
    mask = torch.stack([ball, ~ball])  # the complement touches the image border everywhere
    want = _surface_reference(mask)
    edges, counts = surface_edges(mask)
    assert torch.equal(edges, want) and counts.tolist() == want.flatten(1).sum(1).tolist()
    strided = mask.transpose(1, 3)  # not contiguous
    assert torch.equal(surface_edges(strided)[0], _surface_reference(strided.contiguous()))
    assert torch.equal(surface_edges(mask[:, 2:-3])[0], _surface_reference(mask[:, 2:-3].contiguous()))


def test_surface_edges_opcheck_and_bad_arguments():
    mask = torch.rand(2, 5, 6, 7) < 0.6
    torch.library.opcheck(torch.ops.medfast.surface_edges.default, (mask,))
    torch.library.opcheck(torch.ops.medfast.surface_edges.default, (mask[:, 0],))
    with pytest.raises(TypeError, match="mask must be bool"):
        torch.ops.medfast.surface_edges(mask.float())
    with pytest.raises(ValueError, match=r"mask must be \(B, H, W\) or \(B, D, H, W\)"):
        torch.ops.medfast.surface_edges(mask[:, 0, 0])


@pytest.mark.cuda
@requires_cuda
def test_surface_edges_cuda_matches_cpu():
    from medfast.ops._distance import surface_edges

    for shape in [(2, 30, 21, 17), (3, 40, 33), (1, 1, 5, 9)]:
        mask = torch.rand(shape) < 0.7
        cpu_e, cpu_n = surface_edges(mask)
        gpu_e, gpu_n = surface_edges(mask.cuda())
        assert torch.equal(gpu_e.cpu(), cpu_e) and torch.equal(gpu_n.cpu(), cpu_n)
