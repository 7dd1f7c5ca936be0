"""Fused losses: the CUDA launcher against the CPU launcher (the same arithmetic, loss.h), values and
gradients, every target kind and option; determinism; many classes (shared-memory plan); bad labels
raise before launch. Skipped without a GPU; run on a GPU machine with scripts/gpu_check.sh."""

import pytest
import torch

import medfast as mf
from medfast.ops._loss import _max_cuda_classes
from tests.conftest import requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda]

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _loss_and_grad(device, logits, target, **kw):
    z = logits.detach().to(device).requires_grad_()
    t = target.to(device)
    vw = kw.pop("voxel_weight", None)
    loss = mf.dice_ce_loss(z, t, voxel_weight=None if vw is None else vw.to(device), **kw)
    loss.backward()
    return loss.detach().cpu().double(), z.grad.cpu().double()


def _compare(logits, target, dtype, **kw):
    cpu_logits = logits.to(dtype).float() if dtype in (torch.float16, torch.bfloat16) else logits.to(dtype)
    lc, gc = _loss_and_grad("cpu", cpu_logits, target, **dict(kw))
    lg, gg = _loss_and_grad("cuda", logits.to(dtype), target, **dict(kw))
    tol = TOL[dtype]
    torch.testing.assert_close(lg, lc, rtol=tol, atol=tol)
    torch.testing.assert_close(gg, gc, rtol=tol, atol=tol * max(1.0, gc.abs().max().item()))


@pytest.mark.parametrize("shape", [(2, 4, 9, 10, 11), (3, 5, 17, 13)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch_dice", [False, True])
def test_labels_cuda_matches_cpu(shape, dtype, batch_dice):
    logits = torch.randn(shape, dtype=torch.float64) * 3
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    _compare(logits, target, dtype, batch_dice=batch_dice, include_background=not batch_dice)


@pytest.mark.parametrize("sums", ["thread", "warp"])  # MEDFAST_LOSS_CUDA_SUMS: sums_kernel or the transposed one
@pytest.mark.parametrize("C", [3, 17, 70])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_label_sums_variants_cuda_match_cpu(monkeypatch, sums, C, dtype):
    monkeypatch.setenv("MEDFAST_LOSS_CUDA_SUMS", sums)
    logits = torch.randn(2, C, 9, 10, 11, dtype=torch.float64) * 4
    target = torch.randint(0, C + 1, (2, 9, 10, 11))
    target[target == C] = 255  # ignored
    _compare(logits, target, dtype, ignore_index=255, voxel_weight=torch.rand(2, 9, 10, 11, dtype=torch.float64),
             batch_dice=C == 17)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_weights_and_ignore_index_cuda_matches_cpu(dtype):
    logits = torch.randn(2, 3, 8, 9, 10, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 8, 9, 10))
    target[target == 3] = 255
    _compare(logits, target, dtype, ignore_index=255, class_weight=[0.2, 1.0, 3.0],
             voxel_weight=torch.rand(2, 8, 9, 10, dtype=dtype))


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_soft_targets_cuda_matches_cpu(activation, dtype):
    logits = torch.randn(2, 4, 7, 8, 9, dtype=torch.float64)
    target = torch.softmax(torch.randn(2, 4, 7, 8, 9, dtype=torch.float64), 1).to(dtype)
    if activation == "sigmoid":
        target = (target > 0.25).to(dtype)
    _compare(logits, target, dtype, activation=activation)


@pytest.mark.parametrize("C", [2, 33, 130, 600])
def test_many_classes_cuda_matches_cpu(C):
    logits = torch.randn(1, C, 6, 7, 8, dtype=torch.float64)
    target = torch.randint(0, C, (1, 6, 7, 8))
    props = torch.cuda.get_device_properties(0)
    if C > _max_cuda_classes(max(48 * 1024, props.shared_memory_per_block_optin), 4):
        # Past the GPU's shared memory (600 float32 classes need 384 KB per block; an H100 has
        # 227 KB): the sums come from PyTorch ops instead, with a warning, and equal the CPU's.
        with pytest.warns(UserWarning, match="past the fused CUDA kernels"):
            _compare(logits, target, torch.float32)
        return
    _compare(logits, target, torch.float32)


def test_cuda_sums_are_bitwise_reproducible():
    z = torch.randn(2, 16, 40, 40, 40, device="cuda", requires_grad=True)
    t = torch.randint(0, 16, (2, 40, 40, 40), device="cuda")
    runs = []
    for _ in range(3):
        z.grad = None
        loss = mf.dice_ce_loss(z, t)
        loss.backward()
        runs.append((loss.detach().clone(), z.grad.clone()))
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])


def test_cuda_bad_label_raises_and_the_context_stays_usable():
    # the range check's result is waited for after the sums kernel is queued (which never reads past C)
    z = torch.randn(1, 3, 4, 4, 4, device="cuda")
    t = torch.randint(0, 3, (1, 4, 4, 4), device="cuda")
    t[0, 0, 0, 0] = 7
    with pytest.raises(ValueError, match="label 7"):
        mf.dice_ce_loss(z, t)
    t[0, 0, 0, 0] = -2
    with pytest.raises(ValueError, match="label -2"):
        mf.dice_loss(z, t)
    t[0, 0, 0, 0] = 255  # the ignore index is no error; another bad label still is
    assert torch.isfinite(mf.dice_ce_loss(z, t, ignore_index=255))
    t[0, 1, 1, 1] = 3
    with pytest.raises(ValueError, match=r"label 3, outside \[0, 2\] for C = 3 classes \(ignore_index = 255\)"):
        mf.cross_entropy(z, t, ignore_index=255)
    torch.cuda.synchronize()  # the context is still usable
    assert torch.isfinite(mf.dice_ce_loss(z, t.clamp(0, 2)))


def test_cuda_check_labels_false_gives_nan_without_a_sync():
    z = torch.randn(2, 3, 5, 6, 7, device="cuda")
    t = torch.randint(0, 3, (2, 5, 6, 7), device="cuda")
    assert torch.equal(mf.dice_ce_loss(z, t, check_labels=False), mf.dice_ce_loss(z, t))
    t[1, 4, 5, 6] = 3
    z.requires_grad_()
    torch.cuda.set_sync_debug_mode("error")  # any device sync in the call raises
    try:
        loss = mf.dice_ce_loss(z, t, check_labels=False)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # the finishing kernel reads the sums kernel's label-range report: NaN loss and gradient
    assert torch.isnan(loss) and torch.isnan(z.grad).all()


def test_cuda_opcheck():
    z = torch.randn(2, 3, 5, 6, 7, device="cuda", dtype=torch.float64)
    t = torch.randint(0, 3, (2, 5, 6, 7), device="cuda")
    torch.library.opcheck(torch.ops.medfast.softmax_stats.default, (z, t, None))
    soft = torch.softmax(torch.randn_like(z), 1)
    torch.library.opcheck(torch.ops.medfast.soft_stats.default, (z, soft, None, False))


FINALIZE_FLAGS = [1 | 2 | 4 | 16 | 32, 1 | 2 | 8 | 16 | 32, 1 | 2 | 4 | 16, 1 | 2, 1 | 8 | 16, 2 | 16 | 32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("BC", [(2, 16), (3, 100)])
@pytest.mark.parametrize("flags", FINALIZE_FLAGS)
def test_cuda_loss_finalize_matches_cpu(dtype, BC, flags):
    # the one-block finishing kernel against the CPU op (same reduction order; FMAs on the GPU: to
    # rounding), bitwise the same run to run
    B, C = BC
    g = torch.Generator().manual_seed(B + C + flags)
    p = torch.rand(B, C, generator=g, dtype=torch.float64) * 40 + 1
    t = torch.rand(B, C, generator=g, dtype=torch.float64) * 40 + 1
    stats = torch.stack([torch.minimum(p, t) * torch.rand(B, C, generator=g, dtype=torch.float64), p, t,
                         torch.rand(B, C, generator=g, dtype=torch.float64) * 60], -1).to(dtype)
    cw = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    divisor = None if flags & 32 else torch.tensor(123.25, dtype=dtype)
    scalars = [1.0 if flags & 32 else float(C), 1e-3, 2e-3, 0.7, 1.3]
    gout = torch.tensor(0.8, dtype=dtype)
    ops = torch.ops.medfast
    ref = ops.loss_finalize(stats, cw, divisor, scalars, flags)
    ref_grad = ops.loss_finalize_backward(gout, stats, cw, divisor, scalars, flags)
    dev = [None if x is None else x.cuda() for x in (stats, cw, divisor)]
    runs = [(ops.loss_finalize(*dev, scalars, flags), ops.loss_finalize_backward(gout.cuda(), *dev, scalars, flags))
            for _ in range(2)]
    tol = TOL[dtype]
    torch.testing.assert_close(runs[0][0].cpu(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(runs[0][1].cpu(), ref_grad, rtol=tol, atol=tol)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    torch.library.opcheck(ops.loss_finalize.default, (*dev, scalars, flags))


@pytest.mark.parametrize("kind", ["labels", "softmax", "sigmoid"])
def test_cuda_fused_finalize_equals_composition(monkeypatch, kind):
    from medfast.ops import _loss

    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 9, 10, 11, generator=g, dtype=torch.float64).cuda()
    vw = torch.rand(2, 9, 10, 11, generator=g, dtype=torch.float64).cuda()
    if kind == "labels":
        target = torch.randint(0, 4, (2, 9, 10, 11), generator=g).cuda()
    else:
        target = torch.rand(z.shape, generator=g, dtype=torch.float64).cuda()
    kw = dict(voxel_weight=vw, class_weight=[0.5, 1.0, 2.0, 1.5], batch_dice=True, include_background=False,
              lambda_dice=0.6, activation="sigmoid" if kind == "sigmoid" else "softmax")
    out = []
    for fused in (True, False):
        monkeypatch.setattr(_loss, "_FUSED_FINALIZE", fused)
        x = z.clone().requires_grad_()
        loss = mf.dice_ce_loss(x, target, **kw)
        loss.backward()
        out.append((loss.detach(), x.grad))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-10, atol=1e-14)
