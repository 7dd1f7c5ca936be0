"""Soft / multi-label targets with channels-last logits: read in place in the logits' layout (no copy of the
logits), the gradient in that layout; a target in another layout is copied (the target only). Against MONAI
and the contiguous path."""

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss as MonaiDiceCE
from monai.losses import DiceLoss as MonaiDice

import medfast as mf

ops = torch.ops.medfast
SPATIAL = {2: (37, 29), 3: (9, 11, 7)}  # blocks that do not divide the voxels


def _fmt(ndim):
    return torch.channels_last_3d if ndim == 3 else torch.channels_last


def _case(ndim, activation, C=4, B=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed + 10 * ndim + C)
    logits = (2.0 * torch.randn(B, C, *SPATIAL[ndim], generator=g, dtype=torch.float64)).to(dtype)
    raw = torch.randn(B, C, *SPATIAL[ndim], generator=g, dtype=torch.float64)
    target = (raw.softmax(1) if activation == "softmax" else torch.rand(raw.shape, generator=g, dtype=torch.float64))
    vw = torch.rand(B, *SPATIAL[ndim], generator=g, dtype=torch.float64)
    return logits, target.to(dtype), vw.to(dtype), g


def _grad(loss, x):
    (gx,) = torch.autograd.grad(loss, x)
    return gx


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("target_layout", ["same", "contiguous"])
def test_channels_last_soft_targets_match_monai_and_the_contiguous_path(ndim, activation, target_layout):
    logits, target, _, _ = _case(ndim, activation)
    fmt = _fmt(ndim)
    zl = logits.contiguous(memory_format=fmt).requires_grad_()
    zc = logits.clone().requires_grad_()
    t = target.contiguous(memory_format=fmt) if target_layout == "same" else target
    if activation == "softmax":
        ref = MonaiDiceCE(softmax=True)(zl, target)
    else:  # (MONAI's DiceCELoss takes the softmax cross-entropy with sigmoid=True; ours, as PyTorch's, the BCE)
        ref = MonaiDice(sigmoid=True)(zl, target) + F.binary_cross_entropy_with_logits(zl, target)
    ours = mf.dice_ce_loss(zl, t, activation=activation)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=0)
    g = _grad(ours, zl)
    torch.testing.assert_close(g, _grad(ref, zl), rtol=0, atol=1e-12)
    assert g.is_contiguous(memory_format=fmt) and not g.is_contiguous()  # written in the logits' layout
    # the same blocks of voxels (sigmoid: per class, those of the contiguous rows), the same arithmetic: bitwise,
    # on one thread (the chunks of several threads may split the sigmoid's blocks elsewhere)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours1 = mf.dice_ce_loss(zl, t, activation=activation)
        contiguous = mf.dice_ce_loss(zc, target, activation=activation)
        assert torch.equal(ours1, contiguous) and torch.equal(_grad(ours1, zl), _grad(contiguous, zc))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_channels_last_soft_targets_low_precision_and_weights(ndim, activation, dtype):
    # float32 / float16 / bfloat16 logits with voxel weights, the targets channels-last or contiguous: the op's
    # sums and gradient as the contiguous inputs' (float sums within rounding, gradients per voxel bitwise)
    logits, target, vw, g = _case(ndim, activation, C=5, dtype=dtype)
    fmt = _fmt(ndim)
    zl = logits.contiguous(memory_format=fmt)
    gstats = torch.randn(2, 5, 4, generator=g)
    sig = activation == "sigmoid"
    ref = ops.soft_stats(logits, target, vw, sig, True)
    ref_grad = ops.soft_stats_backward(gstats, logits, target, vw, sig)
    for t in (target.contiguous(memory_format=fmt), target):
        torch.testing.assert_close(ops.soft_stats(zl, t, vw, sig, True), ref, rtol=1e-6, atol=1e-5)
        grad = ops.soft_stats_backward(gstats, zl, t, vw, sig)
        assert grad.is_contiguous(memory_format=fmt) and grad.dtype == dtype
        assert torch.equal(grad, ref_grad)


def test_contiguous_logits_with_a_channels_last_target():
    # the target follows the logits: copied to contiguous here (the logits are read in place)
    logits, target, vw, _ = _case(3, "softmax")
    z = logits.clone().requires_grad_()
    a = mf.dice_ce_loss(z, target.contiguous(memory_format=torch.channels_last_3d), voxel_weight=vw)
    ref = mf.dice_ce_loss(logits, target, voxel_weight=vw)
    assert torch.equal(a, ref)
    assert _grad(a, z).is_contiguous()


def _allocations(fn):
    """Sizes in bytes of the CPU tensor allocations fn makes (the profiler's per-op memory: an op's own)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_channels_last_soft_stats_make_no_copy_of_the_logits(activation, ndim):
    # the sums allocate nothing of the logits' size (they were copied to contiguous, the target too), the
    # backward only its gradient; a target in another layout: one copy, of the target
    logits, target, _, g = _case(ndim, activation, C=6, dtype=torch.float32)
    fmt = _fmt(ndim)
    z, t = logits.contiguous(memory_format=fmt), target.contiguous(memory_format=fmt)
    size = z.numel() * z.element_size()
    sig = activation == "sigmoid"
    gstats = torch.randn(2, 6, 4, generator=g)
    assert max(_allocations(lambda: ops.soft_stats(z, t, None, sig, True))) < size // 4
    big = [a for a in _allocations(lambda: ops.soft_stats_backward(gstats, z, t, None, sig)) if a >= size // 4]
    assert big == [size]  # the gradient
    big = [a for a in _allocations(lambda: ops.soft_stats(z, target, None, sig, True)) if a >= size // 4]
    assert big == [size]  # the target's copy


def test_channels_last_soft_stats_opcheck_and_gradcheck():
    # the fake kernels give the real layouts (the gradient channels-last), and the gradient is right
    logits, target, vw, g = _case(3, "softmax", C=3, B=1)
    z = logits.contiguous(memory_format=torch.channels_last_3d)
    t = target.contiguous(memory_format=torch.channels_last_3d)
    for sig in (False, True):
        torch.library.opcheck(ops.soft_stats.default, (z, t, vw, sig, True))
        torch.library.opcheck(ops.soft_stats_backward.default, (torch.randn(1, 3, 4, generator=g, dtype=z.dtype), z,
                                                                t, vw, sig))
    small = z[..., :3, :4, :2].contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    ts = t[..., :3, :4, :2].contiguous(memory_format=torch.channels_last_3d)
    for activation in ("softmax", "sigmoid"):
        assert torch.autograd.gradcheck(lambda x, a=activation: mf.dice_ce_loss(x, ts, activation=a), (small,))
