"""CUDA path against the CPU path (the same arithmetic, warp.h): every mode, padding and dtype.
Skipped without a GPU; run on a GPU machine with scripts/gpu_check.sh."""

import pytest
import torch

import medfast as mf
from tests.conftest import MODES, PADDINGS, requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda]

TOL = {torch.float64: 1e-10, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def _run(device, image, theta, ddf, mode, padding, weights):
    image = image.detach().to(device).requires_grad_()
    ddf = None if ddf is None else ddf.detach().to(device).requires_grad_(mode != "nearest")
    theta = None if theta is None else theta.detach().to(device).requires_grad_(mode != "nearest")
    if theta is None:
        out = mf.warp(image, ddf, mode=mode, padding=padding)
    else:
        out = mf.affine_warp(image, theta, ddf=ddf, shape=(9, 7, 8), mode=mode, padding=padding)
    (out.float() * weights.to(device)).sum().backward()
    grads = [t.grad for t in (image, theta, ddf) if t is not None and t.grad is not None]
    return [out.detach().cpu()] + [g.cpu() for g in grads]


def _compare(cpu, gpu, dtype):
    assert len(cpu) == len(gpu)
    for a, b in zip(cpu, gpu):
        scale = max(1.0, a.abs().max().item())
        torch.testing.assert_close(b.double(), a.double(), atol=TOL[dtype] * scale, rtol=TOL[dtype])


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_warp_cuda_matches_cpu(ndim, mode, padding, dtype):
    shape = (9, 7, 8)[:ndim] if ndim == 3 else (13, 11)
    image = torch.rand(2, 3, *shape, dtype=dtype)
    ddf = (torch.randn(2, ndim, *shape, dtype=dtype) * 3)
    weights = torch.randn(2, 3, *shape)
    _compare(_run("cpu", image, None, ddf, mode, padding, weights),
             _run("cuda", image, None, ddf, mode, padding, weights), dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_images_cuda_match_float32_cpu(mode, dtype):
    image = torch.rand(1, 2, 10, 9, 8)
    ddf = torch.randn(1, 3, 10, 9, 8) * 2
    weights = torch.randn(1, 2, 10, 9, 8)
    cpu = _run("cpu", image.to(dtype).float(), None, ddf, mode, "border", weights)
    gpu = _run("cuda", image.to(dtype), None, ddf, mode, "border", weights)
    assert gpu[0].dtype == dtype and gpu[1].dtype == dtype
    _compare(cpu, gpu, dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_affine_warp_cuda_matches_cpu(mode, padding):
    image = torch.rand(1, 2, 8, 9, 10, dtype=torch.float64)
    theta = torch.eye(3, 4, dtype=torch.float64) + 0.1 * torch.randn(3, 3, 4, dtype=torch.float64)
    ddf = torch.randn(3, 3, 9, 7, 8, dtype=torch.float64)
    weights = torch.randn(3, 2, 9, 7, 8)
    _compare(_run("cpu", image, theta, ddf, mode, padding, weights),
             _run("cuda", image, theta, ddf, mode, padding, weights), torch.float64)


@pytest.mark.parametrize("padding", PADDINGS)
def test_spline_coefficients_cuda_matches_cpu(padding):
    for shape in [(1, 2, 17, 5, 9), (2, 1, 1, 2, 3), (1, 1, 31, 33)]:
        image = torch.rand(*shape, dtype=torch.float64)
        torch.testing.assert_close(mf.spline_coefficients(image.cuda(), padding).cpu(),
                                   mf.spline_coefficients(image, padding), atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_cuda_deterministic_mode_is_bitwise_reproducible(mode):
    image = torch.rand(1, 2, 40, 36, 32, device="cuda", requires_grad=True)
    ddf = (torch.randn(4, 3, 40, 36, 32, device="cuda") * 3).requires_grad_(mode != "nearest")
    weights = torch.randn(4, 2, 40, 36, 32, device="cuda")
    results = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            image.grad = ddf.grad = None
            out = mf.warp(image, ddf, mode=mode)
            (out * weights).sum().backward()
            grads = [image.grad.clone()] + ([ddf.grad.clone()] if mode != "nearest" else [])
            results.append([out.detach().clone(), *grads])
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    # ... and equal (to rounding) to the default atomic path.
    image.grad = None
    (mf.warp(image, ddf, mode=mode) * weights).sum().backward()
    torch.testing.assert_close(image.grad, results[0][1], atol=1e-4, rtol=1e-4)


def test_cuda_non_contiguous_and_broadcast():
    image = torch.rand(1, 3, 12, 10, 14, device="cuda", dtype=torch.float64)
    ddf = torch.randn(2, 3, 12, 10, 14, device="cuda", dtype=torch.float64)
    ref = mf.warp(image, ddf, mode="cubic")
    cl = mf.warp(image.to(memory_format=torch.channels_last_3d), ddf.to(memory_format=torch.channels_last_3d),
                 mode="cubic")
    torch.testing.assert_close(cl, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(ref.cpu(), mf.warp(image.cpu(), ddf.cpu(), mode="cubic"), atol=1e-10, rtol=0)


def test_cuda_nan_and_huge_displacements():
    image = torch.rand(1, 1, 6, 6, 6, device="cuda")
    ddf = torch.zeros(1, 3, 6, 6, 6, device="cuda")
    ddf[0, 0, 1, 2, 3] = float("nan")
    ddf[0, 1, 2, 2, 2] = 1e30
    out = mf.warp(image, ddf, mode="cubic")
    assert torch.isnan(out).sum() == 1 and out[0, 0, 2, 2, 2] == 0
    torch.cuda.synchronize()


def test_cuda_opcheck_and_compile():
    image = torch.rand(2, 2, 6, 5, 7, device="cuda", requires_grad=True)
    ddf = torch.randn(2, 3, 6, 5, 7, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.medfast.warp_forward.default, (image, None, ddf, [6, 5, 7], "cubic", "border"))
    compiled = torch.compile(lambda i, d: mf.warp(i, d, mode="linear").square().mean(), fullgraph=True)
    torch.testing.assert_close(compiled(image, ddf), mf.warp(image, ddf).square().mean())


def test_mixed_devices_raise():
    image = torch.rand(1, 1, 4, 4, 4, device="cuda")
    with pytest.raises(ValueError, match="ddf is on cpu but image is on cuda"):
        mf.warp(image, torch.zeros(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="theta is on cpu but image is on cuda"):
        mf.affine_warp(image, torch.eye(3, 4)[None])


def test_large_volume_int64_indexing():
    """An output with more than 2^31 elements (B x C x voxels) exercises 64-bit offsets."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    image = torch.rand(1, 1, 64, 64, 64, device="cuda")
    ddf = torch.zeros(1, 3, 1, 1, 1, device="cuda").expand(9, 3, 640, 640, 640)  # 2.36e9 outputs
    out = mf.warp(image, ddf, padding="border")
    assert out.numel() > 2**31
    assert out[8, 0, 639, 639, 639] == image[0, 0, 63, 63, 63]
    del out


@pytest.mark.parametrize("scatter", ["merged", "plain", "auto"])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("smooth", [True, False])
def test_linear_backward_scatter_variants_match_cpu(monkeypatch, scatter, ndim, padding, smooth):
    # The merged scatter hands a tap to the next lane when both hit one voxel: smooth small
    # displacements (most lanes merge), rough ones (few do), rows not a multiple of 32 lanes,
    # NaN lanes, a broadcast image and several channels.
    if scatter == "auto":  # the default: merged here (3 channels)
        monkeypatch.delenv("MEDFAST_WARP_CUDA_SCATTER", raising=False)
    else:
        monkeypatch.setenv("MEDFAST_WARP_CUDA_SCATTER", scatter)
    shape = (6, 37, 45)[3 - ndim:]
    gen = torch.Generator().manual_seed(7)
    image = torch.rand(1, 3, *shape, generator=gen, dtype=torch.float64)
    if smooth:
        ddf = torch.nn.functional.interpolate(torch.randn(2, ndim, *([3] * ndim), generator=gen, dtype=torch.float64),
                                              size=shape, mode="bilinear" if ndim == 2 else "trilinear") * 0.4
    else:
        ddf = torch.randn(2, ndim, *shape, generator=gen, dtype=torch.float64) * 3
    ddf[1, 0].view(-1)[::17] = float("nan")
    weights = torch.randn(2, 3, *shape, generator=gen)
    for dtype in (torch.float64, torch.float32):
        cpu = _run("cpu", image.to(dtype), None, ddf.to(dtype), "linear", padding, weights)
        gpu = _run("cuda", image.to(dtype), None, ddf.to(dtype), "linear", padding, weights)
        for a, b in zip(cpu, gpu):  # NaN positions give NaN outputs and position gradients on both
            assert torch.equal(a.isnan(), b.isnan())
        _compare([t.nan_to_num() for t in cpu], [t.nan_to_num() for t in gpu], dtype)


@pytest.mark.parametrize("variant", ["default", "ilp2", "ilp4"])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_ilp_variants_are_bitwise_forward_kernel(monkeypatch, variant, mode, padding, dtype):
    # MEDFAST_WARP_CUDA_FORWARD: 32-bit tap offsets, 1 (the default) / 2 / 4 voxels per thread; the same
    # arithmetic per voxel as forward_kernel (=one), so the same bits (a voxel count that leaves the last
    # pass part-filled, NaN displacements, a broadcast image with 3 channels, a channels-last image)
    g = torch.Generator().manual_seed(3)
    image = torch.randn(1, 3, 17, 19, 23, generator=g).to(dtype).cuda()
    ddf = (3 * torch.randn(2, 3, 15, 21, 13, generator=g)).cuda()
    ddf[0, 1, 2, 3, 4] = float("nan")
    monkeypatch.setenv("MEDFAST_WARP_CUDA_FORWARD", "one")
    ref = mf.warp(image, ddf, mode=mode, padding=padding)
    ref_cl = mf.warp(image.contiguous(memory_format=torch.channels_last_3d), ddf, mode=mode, padding=padding)
    if variant == "default":
        monkeypatch.delenv("MEDFAST_WARP_CUDA_FORWARD")
    else:
        monkeypatch.setenv("MEDFAST_WARP_CUDA_FORWARD", variant)
    out = mf.warp(image, ddf, mode=mode, padding=padding)
    out_cl = mf.warp(image.contiguous(memory_format=torch.channels_last_3d), ddf, mode=mode, padding=padding)
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any()
    assert torch.equal(out.nan_to_num(), ref.nan_to_num()) and torch.equal(out_cl.nan_to_num(), ref_cl.nan_to_num())


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("variant", ["one", "ilp2"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_zeros_padding_reads_nothing_outside(monkeypatch, mode, variant, deterministic):
    # NaN image faces and samples far outside: 0 and no gradient there on the GPU too (warp.h sample_outside)
    monkeypatch.setenv("MEDFAST_WARP_CUDA_FORWARD", variant)
    img = torch.rand(1, 2, 12, 13, 40, dtype=torch.float64) + 1
    for ax in range(3):
        img.select(2 + ax, 0).fill_(float("nan"))
    ddf = torch.randn(1, 3, 12, 13, 40, dtype=torch.float64) * 4
    ddf[..., :6] += 60.0
    results = []
    for dev in ("cpu", "cuda"):
        i, d = img.to(dev).float().requires_grad_(), ddf.to(dev).float().requires_grad_(mode == "linear")
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        try:
            out = mf.warp(i, d, mode=mode)
            out.nan_to_num(0.0).sum().backward()
        finally:
            torch.use_deterministic_algorithms(False)
        results.append((out.detach().cpu(), None if d.grad is None else d.grad.cpu(), i.grad.cpu()))
    (o_cpu, d_cpu, i_cpu), (o_gpu, d_gpu, i_gpu) = results
    assert (o_cpu[..., :6] == 0).all() and o_cpu.isnan().any()
    torch.testing.assert_close(o_gpu, o_cpu, equal_nan=True, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(i_gpu, i_cpu, equal_nan=True, atol=1e-4, rtol=1e-4)
    if d_cpu is not None:
        assert (d_cpu[..., :6] == 0).all()
        torch.testing.assert_close(d_gpu, d_cpu, equal_nan=True, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
def test_cuda_deterministic_image_grad_ignores_gradients_of_samples_that_read_nothing(mode):
    # the deterministic taps kernel gave such samples index 0 and weight 0: an inf / NaN upstream gradient there
    # made grad_image[..., 0, 0, 0] NaN, where the CPU and the atomic path add nothing
    img = torch.rand(1, 2, 10, 11, 12)
    ddf = torch.zeros(1, 3, 10, 11, 12)
    ddf[..., :4] += 50.0  # wholly outside under zeros padding
    grad = torch.rand(1, 2, 10, 11, 12)
    grad[..., :4] = float("inf")
    grads = []
    for dev, deterministic in (("cpu", False), ("cuda", True), ("cuda", False)):
        i = img.to(dev).detach().requires_grad_()
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        try:
            mf.warp(i, ddf.to(dev), mode=mode).backward(grad.to(dev))
        finally:
            torch.use_deterministic_algorithms(False)
        grads.append(i.grad.cpu())
    if mode != "cubic":  # cubic B-spline taps never read nothing: a far sample still weighs z^d (z the pole)
        assert torch.isfinite(grads[0]).all()
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], atol=1e-4, rtol=1e-4, equal_nan=True)


def test_cuda_ops_refuse_mixed_devices_and_take_empty_batches():
    # direct torch.ops calls: a CPU tensor beside a CUDA one reached the CUDA kernel (an illegal access that
    # poisons the context); a batch of 0 was an invalid launch configuration in the loss sums
    ops = torch.ops.medfast
    a, b = torch.rand(1, 1, 8, 8, 8, device="cuda"), torch.rand(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="device|on"):
        ops.lncc(a, b, [3, 3, 3], 0.0, 1e-5)
    logits, labels = torch.rand(1, 3, 8, 8, 8, device="cuda"), torch.zeros(1, 8, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="on"):
        ops.softmax_stats(logits, labels, None)
    empty, bad = ops.softmax_stats(torch.rand(0, 3, 8, 8, device="cuda"), torch.zeros(0, 8, 8, dtype=torch.long,
                                                                                       device="cuda"), None)
    assert empty.shape == (0, 3, 4) and bad.tolist() == [0, 0]
    # the march backward took a CPU grad beside CUDA coords and handed the kernel a host pointer
    props, coords = torch.rand(1, 8, 8, 8, 5, device="cuda"), torch.rand(1, 4, 6, 3, device="cuda") * 7
    noise = torch.rand(1024, 4, device="cuda")
    with pytest.raises(ValueError, match="grad is on cpu"):
        ops.ussim_march_backward(torch.rand(1, 4, 6, 3), props, coords, noise,
                                 [1.0, 0, 0, 0, 0, 1.0, 0, 0, 0, 0, 1.0, 0], 0.1, [1.0] * 5, 0, 1.0, True, True, None)


def test_cuda_ultrasound_property_gradient_alerts_under_deterministic_mode():
    # float atomics scatter it: PyTorch's rule is an error under use_deterministic_algorithms(True)
    ops = torch.ops.medfast
    props, coords = torch.rand(1, 8, 8, 8, 5, device="cuda"), torch.rand(1, 4, 6, 3, device="cuda") * 7
    noise, grad = torch.rand(1024, 4, device="cuda"), torch.rand(1, 4, 6, 3, device="cuda")
    args = ([1.0, 0, 0, 0, 0, 1.0, 0, 0, 0, 0, 1.0, 0], 0.1, [1.0] * 5, 0, 1.0)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="ultrasound ray march backward.*deterministic"):
            ops.ussim_march_backward(grad, props, coords, noise, *args, True, True, None)
        ops.ussim_march_backward(grad, props, coords, noise, *args, False, True, None)  # positions only: fine
    finally:
        torch.use_deterministic_algorithms(False)
