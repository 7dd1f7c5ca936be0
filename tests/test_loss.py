"""Fused Dice / cross-entropy / Dice+CE (softmax, integer labels) against MONAI and PyTorch."""

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss as MonaiDiceCE
from monai.losses import DiceLoss as MonaiDice

import medfast as mf
from medfast.losses import DiceCELoss, DiceLoss


def _inputs(ndim=3, B=2, C=4, dtype=torch.float64):
    shape = (6, 7, 5) if ndim == 3 else (9, 8)
    logits = (torch.randn(B, C, *shape, dtype=dtype) * 2).requires_grad_()
    target = torch.randint(0, C, (B, 1, *shape))
    return logits, target


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_dice_ce_matches_monai(ndim, include_background, batch, weighted):
    logits, target = _inputs(ndim)
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64) if weighted else None
    kw = dict(include_background=include_background, batch=batch, weight=weight, lambda_dice=0.7, lambda_ce=1.3)
    ref = MonaiDiceCE(to_onehot_y=True, softmax=True, **kw)(logits, target)
    ours = DiceCELoss(**kw)(logits, target)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(_grad(ours, logits), _grad(ref, logits), atol=1e-6, rtol=0)


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dice_matches_monai(include_background, batch, reduction):
    logits, target = _inputs(3, C=3)
    kw = dict(include_background=include_background, batch=batch, reduction=reduction, smooth_nr=1e-3, smooth_dr=2e-3)
    ref = MonaiDice(to_onehot_y=True, softmax=True, **kw)(logits, target)
    ours = DiceLoss(**kw)(logits, target)
    ref = ref.reshape(ours.shape)  # MONAI keeps singleton spatial dims with reduction="none"
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(_grad(ours.sum(), logits), _grad(ref.sum(), logits), atol=1e-6, rtol=0)


def test_cross_entropy_matches_pytorch_with_ignore_index_and_class_weight():
    logits, target = _inputs(3, C=5)
    target = target[:, 0].clone()
    target[:, :2] = 255
    weight = torch.rand(5, dtype=torch.float64) + 0.5
    ref = F.cross_entropy(logits, target, weight=weight, ignore_index=255)
    ours = mf.cross_entropy(logits, target, class_weight=weight, ignore_index=255)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(_grad(ours, logits), _grad(ref, logits))
    ref = F.cross_entropy(logits, target, ignore_index=255, reduction="sum")
    torch.testing.assert_close(mf.cross_entropy(logits, target, ignore_index=255, reduction="sum"), ref)


def _reference(logits, target, voxel_weight, ignore_index, include_background, batch_dice, smooth):
    """Masked pure-PyTorch Dice+CE with voxel weights (materializes everything)."""
    C = logits.shape[1]
    keep = (target != ignore_index).to(logits.dtype)
    w = voxel_weight * keep
    labels = torch.where(target == ignore_index, torch.zeros_like(target), target)
    onehot = F.one_hot(labels, C).movedim(-1, 1).to(logits.dtype)
    p = logits.softmax(1)
    dims = tuple(range(2, logits.dim()))
    inter = (p * onehot * w[:, None]).sum(dims)
    pred = (p * w[:, None]).sum(dims)
    truth = (onehot * w[:, None]).sum(dims)
    if batch_dice:
        inter, pred, truth = inter.sum(0), pred.sum(0), truth.sum(0)
    dice = 1 - (2 * inter + smooth) / (pred + truth + smooth)
    if not include_background:
        dice = dice[..., 1:]
    nll = -(logits.log_softmax(1) * onehot).sum(1)
    return dice.mean() + (nll * w).sum() / w.sum()


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("batch_dice", [False, True])
def test_ignore_index_and_voxel_weight_against_masked_reference(include_background, batch_dice):
    logits, target = _inputs(3, C=4)
    target = target[:, 0].clone()
    target[0, 1:3] = -100
    vw = torch.rand(target.shape, dtype=torch.float64)
    kw = dict(include_background=include_background, batch_dice=batch_dice)
    ours = mf.dice_ce_loss(logits, target, voxel_weight=vw, ignore_index=-100, smooth=1e-4, **kw)
    ref = _reference(logits, target, vw, -100, smooth=1e-4, **kw)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(_grad(ours, logits), _grad(ref, logits))


def test_gradcheck_float64():
    logits, target = _inputs(3, B=1, C=3)
    vw = torch.rand(target[:, 0].shape, dtype=torch.float64)
    fn = lambda x: mf.dice_ce_loss(x, target, voxel_weight=vw, batch_dice=True, class_weight=[1.0, 2.0, 0.5])  # noqa
    assert torch.autograd.gradcheck(fn, (logits,))


def test_opcheck_and_compile():
    logits, target = _inputs(3, C=3, dtype=torch.float32)
    labels = target[:, 0].long()
    torch.library.opcheck(torch.ops.medfast.softmax_stats.default, (logits, labels, None))
    torch.library.opcheck(torch.ops.medfast.softmax_stats.default, (logits, labels, torch.rand(labels.shape)))
    fn = torch.compile(lambda x: mf.dice_ce_loss(x, labels), backend="inductor", fullgraph=True)
    torch.testing.assert_close(fn(logits), mf.dice_ce_loss(logits, labels))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits(dtype):
    logits, target = _inputs(3, C=4, dtype=torch.float32)
    ref = mf.dice_ce_loss(logits.detach().to(dtype).float(), target)
    ours = mf.dice_ce_loss(logits.detach().to(dtype), target)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    x = logits.detach().to(dtype).requires_grad_()
    mf.dice_ce_loss(x, target).backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


def test_large_logits_do_not_overflow():
    logits, target = _inputs(3, C=3, dtype=torch.float32)
    big = logits.detach() * 1e4
    loss = mf.dice_ce_loss(big, target)
    ref = MonaiDiceCE(to_onehot_y=True, softmax=True)(big, target)
    assert torch.isfinite(loss) and torch.isclose(loss, ref, rtol=1e-4)


def test_bad_inputs():
    logits, target = _inputs(3, C=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="target must have shape"):
        mf.dice_ce_loss(logits, target[:, :, :-1])
    with pytest.raises(ValueError, match="softmax needs at least 2 classes"):
        mf.dice_ce_loss(logits[:, :1], target)
    with pytest.raises(TypeError, match="target must hold integer class labels"):
        mf.dice_ce_loss(logits, target.float())
    with pytest.raises(ValueError, match="target holds label 4, outside"):
        mf.dice_ce_loss(logits, torch.full_like(target, 4))
    with pytest.raises(ValueError, match="target holds label -1, outside"):
        mf.dice_ce_loss(logits, torch.full_like(target, -1))
    with pytest.raises(ValueError, match="class_weight must have C = 4 entries"):
        mf.dice_ce_loss(logits, target, class_weight=[1.0, 2.0])
    with pytest.raises(ValueError, match="target is on meta but logits is on cpu"):
        mf.dice_ce_loss(logits, target.to("meta"))
    with pytest.raises(ValueError, match="reduction must be one of"):
        mf.dice_ce_loss(logits, target, reduction="none")
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        mf.dice_ce_loss(logits.detach().numpy(), target)
    with pytest.raises(ValueError, match="voxel_weight must have shape"):
        mf.dice_ce_loss(logits, target, voxel_weight=torch.ones(2, 3))
    with pytest.raises(ValueError, match="lambda_ce must be a non-negative"):
        mf.dice_ce_loss(logits, target, lambda_ce=-1.0)
    # The ignore index may lie outside [0, C).
    half = target.clone()
    half[:, :, :3] = 255
    assert torch.isfinite(mf.dice_ce_loss(logits, half, ignore_index=255))


@pytest.mark.parametrize("fn", [mf.dice_ce_loss, mf.dice_loss, mf.cross_entropy])
def test_check_labels_false_gives_nan_on_bad_labels_and_the_same_loss_otherwise(fn):
    # check_labels=False: no host check (no device sync), but a bad label never gives a finite loss
    logits, target = _inputs(3, C=4, dtype=torch.float64)
    logits.requires_grad_()
    good = fn(logits, target, check_labels=False)
    assert torch.equal(good, fn(logits, target))
    for bad_value in (4, -1, 1000):
        bad = target.clone()
        bad[0, 0, 1, 2] = bad_value
        with pytest.raises(ValueError, match=f"target holds label {bad_value}, outside"):
            fn(logits, bad)
        assert torch.isnan(fn(logits, bad, check_labels=False))
    # the ignore index is not a bad label, even outside [0, C); -1 is bad unless it is the ignore index
    ign = target.clone()
    ign[:, :, :2] = 255
    assert torch.equal(fn(logits, ign, ignore_index=255, check_labels=False), fn(logits, ign, ignore_index=255))
    ign[0, 0, 3, 0] = -1
    assert torch.isnan(fn(logits, ign, ignore_index=255, check_labels=False))
    with pytest.raises(ValueError, match="label -1, outside"):
        fn(logits, ign, ignore_index=255)
    with pytest.raises(TypeError, match="check_labels must be a bool"):
        fn(logits, target, check_labels=1)


def test_loss_modules_pass_check_labels():
    logits, target = _inputs(3, C=4, dtype=torch.float32)
    bad = target.clone()
    bad[0, 0, 0, 0] = 9
    for cls in (DiceLoss, DiceCELoss):
        assert torch.isnan(cls(check_labels=False)(logits, bad))
        with pytest.raises(ValueError, match="label 9"):
            cls()(logits, bad)


def test_all_voxels_ignored_gives_documented_result():
    logits, target = _inputs(3, C=3, dtype=torch.float32)
    target = torch.full_like(target, 7)
    dice = mf.dice_loss(logits, target, ignore_index=7)
    assert torch.isfinite(dice)  # smooth / smooth: Dice loss 0 for every class
    assert torch.isnan(mf.cross_entropy(logits, target, ignore_index=7))  # 0 / 0, as F.cross_entropy


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("batch", [False, True])
def test_sigmoid_dice_matches_monai(include_background, batch):
    logits, _ = _inputs(3, C=3)
    target = (torch.rand(logits.shape, dtype=torch.float64) > 0.6).to(torch.float64)
    kw = dict(include_background=include_background, batch=batch)
    ref = MonaiDice(sigmoid=True, **kw)(logits, target)
    ours = DiceLoss(sigmoid=True, **kw)(logits, target)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(_grad(ours, logits), _grad(ref, logits), atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch", [False, True])
def test_sigmoid_dice_ce_one_channel_matches_monai(batch):
    logits, _ = _inputs(3, C=1)
    target = (torch.rand(logits.shape, dtype=torch.float64) > 0.5).to(torch.float64)
    ref = MonaiDiceCE(sigmoid=True, batch=batch)(logits, target)
    ours = DiceCELoss(sigmoid=True, batch=batch)(logits, target)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(_grad(ours, logits), _grad(ref, logits), atol=1e-6, rtol=0)


def test_multilabel_bce_matches_pytorch():
    logits, _ = _inputs(2, C=4)
    target = torch.rand(logits.shape, dtype=torch.float64)  # soft multi-label
    vw = torch.rand(logits[:, 0].shape, dtype=torch.float64)
    ours = mf.cross_entropy(logits, target, activation="sigmoid", voxel_weight=vw)
    ref = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * vw[:, None]).sum() / (vw.sum() * 4)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(_grad(ours, logits), _grad(ref, logits))


@pytest.mark.parametrize("include_background", [True, False])
def test_soft_targets_softmax_match_monai(include_background):
    logits, _ = _inputs(3, C=4)
    target = torch.rand(logits.shape, dtype=torch.float64).softmax(1)  # probabilities per voxel
    ref = MonaiDiceCE(softmax=True, include_background=include_background)(logits, target)
    ours = mf.dice_ce_loss(logits, target, include_background=include_background)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(_grad(ours, logits), _grad(ref, logits), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float32_soft_target_of_half_logits_is_not_rounded(dtype, activation, layout):
    # half logits are computed in float32: a float32 soft target (a teacher's probabilities, autocast's usual
    # pair) is read as it is, as PyTorch's losses read it (it was rounded to the logits' dtype first)
    g = torch.Generator().manual_seed(0)
    z = (2 * torch.randn(2, 3, 8, 7, 6, generator=g)).to(dtype)
    t = torch.randn(2, 3, 8, 7, 6, generator=g).softmax(1) if activation == "softmax" else \
        torch.rand(2, 3, 8, 7, 6, generator=g)
    if layout == "channels_last":
        z, t = z.contiguous(memory_format=torch.channels_last_3d), t.contiguous(memory_format=torch.channels_last_3d)
    zf = z.float().requires_grad_()
    tf = t.clone().requires_grad_()
    if activation == "softmax":
        ce_ref = F.cross_entropy(zf, tf)
        dice_ref = MonaiDice(softmax=True)(zf, tf)
    else:
        ce_ref = F.binary_cross_entropy_with_logits(zf, tf)
        dice_ref = MonaiDice(sigmoid=True)(zf, tf)
    for fn, ref in ((mf.cross_entropy, ce_ref), (mf.dice_loss, dice_ref)):
        ref_gz, ref_gt = torch.autograd.grad(ref, (zf, tf))
        for autocast in (False, True):
            zl, tl = z.detach().requires_grad_(), t.clone().requires_grad_()
            with torch.autocast("cpu", dtype=dtype, enabled=autocast):
                ours = fn(zl, tl, activation=activation)
            assert ours.dtype == torch.float32
            torch.testing.assert_close(ours, ref.detach(), rtol=2e-6, atol=0)
            gz, gt = torch.autograd.grad(ours, (zl, tl))
            assert gz.dtype == dtype and gt.dtype == torch.float32  # each in its input's dtype
            torch.testing.assert_close(gt, ref_gt, rtol=1e-5, atol=1e-9)
            # the logits' gradient: PyTorch's float32 gradient rounded to the logits' dtype (an ulp apart at most)
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(gz.float(), ref_gz.to(dtype).float(), rtol=eps, atol=eps * 1e-3)
            # a target that does not require grad takes the fused backward: the same gradient
            zl2 = z.detach().requires_grad_()
            (gz2,) = torch.autograd.grad(fn(zl2, t, activation=activation), zl2)
            torch.testing.assert_close(gz2.float(), ref_gz.to(dtype).float(), rtol=eps, atol=eps * 1e-3)


def test_gradcheck_soft_and_sigmoid():
    logits, _ = _inputs(2, B=1, C=3)
    target = torch.rand(logits.shape, dtype=torch.float64)
    vw = torch.rand(logits[:, 0].shape, dtype=torch.float64)
    for activation in ("softmax", "sigmoid"):
        fn = lambda x, a=activation: mf.dice_ce_loss(x, target, voxel_weight=vw, activation=a)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (logits,))
    torch.library.opcheck(torch.ops.medfast.soft_stats.default, (logits, target, vw, True))


def test_soft_target_bad_inputs():
    logits, target = _inputs(3, C=3, dtype=torch.float32)
    with pytest.raises(ValueError, match="activation must be one of"):
        mf.dice_loss(logits, target, activation="relu")
    with pytest.raises(ValueError, match="soft / multi-label target must have the logits' shape"):
        mf.dice_loss(logits, target.float(), activation="sigmoid")
    with pytest.raises(ValueError, match="ignore_index needs a label map"):
        mf.dice_loss(logits, torch.rand(logits.shape), ignore_index=0)


def test_cuda_class_limit_matches_the_kernel_plan():
    # plan() in csrc/loss/loss_cuda.cu: 32 threads x (5 C + 2) sums must fit in the block's shared memory.
    from medfast.ops._loss import _max_cuda_classes

    for shared, itemsize in ((48 * 1024, 4), (227 * 1024, 4), (227 * 1024, 8), (99 * 1024, 8)):
        most = _max_cuda_classes(shared, itemsize)
        assert 32 * (5 * most + 2) * itemsize <= shared < 32 * (5 * (most + 1) + 2) * itemsize
    assert _max_cuda_classes(227 * 1024, 4) == 362  # an H100 / H200: 600 float32 classes take the reference path


@pytest.mark.parametrize("kind", ["labels", "softmax", "sigmoid"])
@pytest.mark.parametrize("weighted", [False, True])
def test_reference_sums_match_the_fused_kernels(kind, weighted):
    # The PyTorch-ops path that CUDA calls past the kernels' limits take (more classes than the GPU's
    # shared memory holds): same sums and gradients as the fused op, here on the CPU.
    from medfast.ops._loss import _ops, _stats_reference

    gen = torch.Generator().manual_seed(3)
    z = torch.randn(2, 7, 5, 6, 4, generator=gen, dtype=torch.float64)
    w = torch.rand(2, 5, 6, 4, generator=gen, dtype=torch.float64) if weighted else None
    if kind == "labels":
        target = torch.randint(0, 7, (2, 5, 6, 4), generator=gen)
        target[0, 0] = -1  # ignored voxels
        fused = lambda x: _ops.softmax_stats(x, target, w)[0]  # noqa: E731
    else:
        target = torch.rand(2, 7, 5, 6, 4, generator=gen, dtype=torch.float64)
        if kind == "softmax":
            target = target / target.sum(1, keepdim=True)
        fused = lambda x: _ops.soft_stats(x, target, w, kind == "sigmoid")  # noqa: E731
    g = torch.randn(2, 7, 4, generator=gen, dtype=torch.float64)
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    a, b = fused(za), _stats_reference(zb, target, w, kind)
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    (a * g).sum().backward()
    (b * g).sum().backward()
    torch.testing.assert_close(zb.grad, za.grad, rtol=1e-10, atol=1e-10)
