"""The label-sums kernels' own handling of labels and layouts: labels read in their own integer dtype
(uint8, int32, int64; the arithmetic compiled for int64 once) with the ignore index and the range check
inside the sums kernel (no int64 copy, no extra passes), the cross-entropy terms skipped when no loss reads
them, and channels-last logits read (and their gradient written) in place. Against F.cross_entropy, MONAI,
the masked reference of test_loss.py and the contiguous / int64 results."""

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss as MonaiDiceCE
from monai.losses import DiceLoss as MonaiDice

import medfast as mf
from medfast.ops._loss import _stats_reference
from tests.test_loss import _reference

ops = torch.ops.medfast
LABEL_DTYPES = [torch.uint8, torch.int32, torch.int64, torch.int16]  # int16: through an int64 copy


def _case(dtype=torch.float64, C=4, B=2, spatial=(6, 7, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(B, C, *spatial, generator=g, dtype=torch.float64)).to(dtype)
    target = torch.randint(0, C, (B, *spatial), generator=g)
    return logits, target, g


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


def _with_ignored(target, value, g, every=5):
    t = target.clone()
    t.view(-1)[torch.randperm(t.numel(), generator=g)[: t.numel() // every]] = value
    return t


# ---- 1. labels in their own dtype, ignore index and range check in the kernel ----

@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
@pytest.mark.parametrize("ignore_index", [None, 255, 0, 2])
def test_cross_entropy_matches_pytorch_for_each_label_dtype(label_dtype, ignore_index):
    # 255: outside [0, C) (and the largest uint8); 0 and 2: a class left out; None: every voxel counts
    logits, target, g = _case(C=4)
    if ignore_index is not None:
        target = _with_ignored(target, ignore_index, g)
    z = logits.clone().requires_grad_()
    cw = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    kw = {} if ignore_index is None else {"ignore_index": ignore_index}
    ours = mf.cross_entropy(z, target.to(label_dtype), class_weight=cw, **kw)
    ref = F.cross_entropy(z, target, weight=cw, **kw)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(_grad(ours, z), _grad(ref, z))


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
@pytest.mark.parametrize("ignore_index", [None, 255, 1])
@pytest.mark.parametrize("batch_dice", [False, True])
def test_dice_ce_with_each_label_dtype_matches_the_masked_reference(label_dtype, ignore_index, batch_dice):
    logits, target, g = _case(C=4, seed=1)
    if ignore_index is not None:
        target = _with_ignored(target, ignore_index, g)
    vw = torch.rand(target.shape, generator=g, dtype=torch.float64)
    z = logits.clone().requires_grad_()
    ours = mf.dice_ce_loss(z, target.to(label_dtype), voxel_weight=vw, ignore_index=ignore_index,
                           batch_dice=batch_dice, smooth=1e-4)
    ref = _reference(z, target, vw, -12345 if ignore_index is None else ignore_index, True, batch_dice, 1e-4)
    torch.testing.assert_close(ours, ref)
    g_ours = _grad(ours, z)
    torch.testing.assert_close(g_ours, _grad(ref, z))
    # the same sums and gradient, bitwise, as from int64 labels: the loops are compiled for int64 labels only
    # (each label map read in its own type a block at a time), so FMA contractions fall in the same places
    z64 = logits.clone().requires_grad_()
    ref64 = mf.dice_ce_loss(z64, target, voxel_weight=vw, ignore_index=ignore_index, batch_dice=batch_dice,
                            smooth=1e-4)
    assert torch.equal(ours, ref64)
    assert torch.equal(g_ours, _grad(ref64, z64))


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32, torch.int64])
def test_dice_ce_without_ignore_matches_monai_for_each_label_dtype(label_dtype):
    logits, target, _ = _case(torch.float64, C=3, seed=2)
    z = logits.clone().requires_grad_()
    ours = mf.dice_ce_loss(z, target[:, None].to(label_dtype))
    ref = MonaiDiceCE(to_onehot_y=True, softmax=True)(z, target[:, None])
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(_grad(ours, z), _grad(ref, z))


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
def test_out_of_range_labels_raise_or_give_nan_for_each_label_dtype(label_dtype):
    logits, target, _ = _case(torch.float32, C=4)
    bad_values = [4, 200] if label_dtype == torch.uint8 else [4, 1000, -1, -7]
    for fn in (mf.dice_ce_loss, mf.dice_loss, mf.cross_entropy):
        for bad_value in bad_values:
            bad = target.clone()
            bad[1, 2, 3, 4] = bad_value
            bad = bad.to(label_dtype)
            with pytest.raises(ValueError, match=f"target holds label {bad_value}, outside \\[0, 3\\] for C = 4"):
                fn(logits, bad)
            assert torch.isnan(fn(logits, bad, check_labels=False))
            # the ignore index is never a bad label; another bad one still is, and is named
            with pytest.raises(ValueError, match=f"label {bad_value}, outside .* \\(ignore_index = 3\\)"):
                fn(logits, bad, ignore_index=3)
            assert torch.isfinite(fn(logits, bad, ignore_index=bad_value))
    # both kinds at once: the negative one is named (as the min / max check did)
    if label_dtype != torch.uint8:
        both = target.clone()
        both[0, 0, 0, 0], both[1, 1, 1, 1] = 9, -3
        with pytest.raises(ValueError, match="target holds label -3, outside"):
            mf.dice_ce_loss(logits, both.to(label_dtype))


def test_ignore_index_unrepresentable_in_the_label_dtype_never_matches():
    # -100 as uint8 would be 156: a uint8 label 156 is out of range, not ignored
    logits, target, _ = _case(torch.float64, C=4)
    t8 = target.to(torch.uint8)
    torch.testing.assert_close(mf.cross_entropy(logits, t8, ignore_index=-100), F.cross_entropy(logits, target))
    t8[0, 0, 0, 0] = 156
    with pytest.raises(ValueError, match="target holds label 156, outside"):
        mf.cross_entropy(logits, t8, ignore_index=-100)


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32, torch.int64])
def test_softmax_stats_reports_out_of_range_labels_and_leaves_ignored_out(label_dtype):
    logits, target, g = _case(torch.float64, C=5)
    y = target.clone()
    y[0, 0, 0, 0], y[1, 0, 0, 1] = 7, 250  # out of range: left out, reported (the largest)
    y[0, 1] = 255  # ignored
    if label_dtype != torch.uint8:
        y[1, 3, 2, 1] = -4
    stats, bad = ops.softmax_stats(logits, y.to(label_dtype), None, 255)
    assert bad.dtype == torch.int64 and bad.tolist() == [0 if label_dtype == torch.uint8 else -4, 250]
    ref = _stats_reference(logits, torch.where((y == 255) | (y >= 5), -1, y), None, "labels")
    torch.testing.assert_close(stats, ref, rtol=1e-10, atol=1e-10)
    # no ignore index: 255 is out of range too (and the largest)
    assert ops.softmax_stats(logits, y.to(label_dtype), None)[1].tolist()[1] == 255
    # good labels: nothing reported
    assert ops.softmax_stats(logits, target.to(label_dtype), None, 255)[1].tolist() == [0, 0]
    # the backward leaves the ignored voxels out the same way
    gs = torch.randn(stats.shape, generator=g, dtype=torch.float64)
    gz = ops.softmax_stats_backward(gs, logits, y.to(label_dtype), None, 255)
    z = logits.clone().requires_grad_()
    ref_stats = _stats_reference(z, torch.where((y == 255) | (y >= 5) | (y < 0), -1, y), None, "labels")
    torch.testing.assert_close(gz, _grad((ref_stats * gs).sum(), z), rtol=1e-10, atol=1e-10)
    assert (gz[0, :, 1] == 0).all()


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32, torch.int64])
def test_opcheck_label_dtypes_ignore_index_and_ce(label_dtype):
    logits, target, g = _case(torch.float32, C=3, B=2, spatial=(4, 5, 3))
    y = _with_ignored(target, 255, g).to(label_dtype)
    w = torch.rand(y.shape, generator=g)
    for args in ((logits, y, None, 255, True), (logits, y, w, None, False), (logits, y, None, 1, False)):
        torch.library.opcheck(ops.softmax_stats.default, args)
    gs = torch.randn(2, 3, 4, generator=g)
    torch.library.opcheck(ops.softmax_stats_backward.default, (gs, logits, y, w, 255))


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32])
def test_gradcheck_ignore_index_narrow_labels(label_dtype):
    logits, target, g = _case(torch.float64, C=3, B=1, spatial=(3, 4, 2))
    y = _with_ignored(target, 255, g, every=3).to(label_dtype)
    vw = torch.rand(y.shape, generator=g, dtype=torch.float64)
    fn = lambda x: mf.dice_ce_loss(x, y, voxel_weight=vw, ignore_index=255, class_weight=[1.0, 2.0, 0.5])  # noqa
    assert torch.autograd.gradcheck(fn, (logits.clone().requires_grad_(),))


def test_compiled_loss_with_narrow_labels_and_ignore_index():
    logits, target, g = _case(torch.float32, C=4)
    y = _with_ignored(target, 255, g).to(torch.uint8)
    f = torch.compile(lambda z, t: mf.dice_ce_loss(z, t, ignore_index=255), backend="eager", fullgraph=True)
    torch.testing.assert_close(f(logits, y), mf.dice_ce_loss(logits, y, ignore_index=255))
    y[0, 0, 0, 0] = 9
    assert torch.isnan(f(logits, y))  # the NaN form under torch.compile


# ---- 2. no cross-entropy terms where no loss reads them ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ce_false_leaves_e_zero_and_the_other_sums_bitwise_equal(dtype):
    logits, target, g = _case(dtype, C=4)
    w = torch.rand(target.shape, generator=g, dtype=dtype)
    full, _ = ops.softmax_stats(logits, target, w, 1, True)
    lean, _ = ops.softmax_stats(logits, target, w, 1, False)
    # (class 1 is the ignore index: its E is 0 either way)
    assert torch.equal(lean[..., :3], full[..., :3]) and (lean[..., 3] == 0).all() and (full[:, [0, 2, 3], 3] > 0).all()
    for sigmoid in (False, True):
        soft = torch.rand(logits.shape, generator=g, dtype=dtype)
        full = ops.soft_stats(logits, soft, w, sigmoid, True)
        lean = ops.soft_stats(logits, soft, w, sigmoid, False)
        assert torch.equal(lean[..., :3], full[..., :3]) and (lean[..., 3] == 0).all() and (full[..., 3] > 0).all()
    torch.library.opcheck(ops.soft_stats.default, (logits, soft, w, True, False))


def test_dice_losses_without_ce_still_match_monai():
    logits, target, g = _case(torch.float64, C=3, seed=5)
    z = logits.clone().requires_grad_()
    multi = (torch.rand(logits.shape, generator=g) < 0.4).double()
    ours = mf.dice_loss(z, multi, activation="sigmoid")
    ref = MonaiDice(sigmoid=True)(z, multi)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(_grad(ours, z), _grad(ref, z))
    ours = mf.dice_ce_loss(z, target[:, None], lambda_ce=0.0)
    ref = MonaiDiceCE(to_onehot_y=True, softmax=True, lambda_ce=0.0)(z, target[:, None])
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(_grad(ours, z), _grad(ref, z))
    assert torch.autograd.gradcheck(lambda x: mf.dice_loss(x, multi, activation="sigmoid"), (z,))
    assert torch.autograd.gradcheck(lambda x: mf.dice_ce_loss(x, target, lambda_ce=0.0, ignore_index=1), (z,))


# ---- 3. channels-last logits read in place, gradient in their layout ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("C", [2, 5, 16])
def test_channels_last_logits_give_the_contiguous_results_in_their_layout(dtype, ndim, C):
    spatial = (9, 11, 7) if ndim == 3 else (37, 29)  # blocks that do not divide the voxels
    logits, target, g = _case(dtype, C=C, spatial=spatial)
    fmt = torch.channels_last_3d if ndim == 3 else torch.channels_last
    target = _with_ignored(target, 255, g)
    vw = torch.rand(target.shape, generator=g, dtype=torch.float64)
    zc = logits.clone().requires_grad_()
    zl = logits.contiguous(memory_format=fmt).requires_grad_()
    assert not zl.is_contiguous()
    kw = dict(ignore_index=255, voxel_weight=vw)
    a, b = mf.dice_ce_loss(zc, target, **kw), mf.dice_ce_loss(zl, target, **kw)
    assert torch.equal(a, b)  # the same arithmetic on the same values
    ga, gb = _grad(a, zc), _grad(b, zl)
    assert gb.is_contiguous(memory_format=fmt) and not gb.is_contiguous()
    assert torch.equal(ga, gb)


def test_channels_last_matches_monai_gradcheck_and_opcheck():
    logits, target, g = _case(torch.float64, C=4, B=2, spatial=(4, 3, 5))
    z = logits.contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    ours = mf.dice_ce_loss(z, target[:, None])
    ref = MonaiDiceCE(to_onehot_y=True, softmax=True)(z, target[:, None])
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(_grad(ours, z), _grad(ref, z))
    assert torch.autograd.gradcheck(lambda x: mf.dice_ce_loss(x, target, ignore_index=2), (z,))
    zf = z.detach().float()
    y8 = target.to(torch.uint8)
    torch.library.opcheck(ops.softmax_stats.default, (zf, y8, None, 2, True))
    torch.library.opcheck(ops.softmax_stats_backward.default, (torch.randn(2, 4, 4, generator=g), zf, y8, None, 2))
    # a layout that is neither (a channel slice): copied first, as before; results as the contiguous copy
    wide = torch.randn(2, 6, 4, 3, 5, generator=g, dtype=torch.float64)[:, 1:5]
    gz = ops.softmax_stats_backward(torch.ones(2, 4, 4, dtype=torch.float64), wide, target, None, None)
    assert gz.is_contiguous()
    assert torch.equal(gz, ops.softmax_stats_backward(torch.ones(2, 4, 4, dtype=torch.float64), wide.contiguous(),
                                                      target, None, None))


def test_reference_path_reads_labels_as_the_kernels(monkeypatch):
    # the PyTorch-ops sums (CUDA calls past the kernels' limits) map the ignore index and check the range
    # themselves: the same loss, gradient and errors as the kernels, for narrow labels too
    from medfast.ops import _loss

    logits, target, g = _case(torch.float64, C=4, seed=7)
    y = _with_ignored(target, 255, g).to(torch.uint8)
    za, zb = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    fused = mf.dice_ce_loss(za, y, ignore_index=255)
    bad = y.clone()
    bad[0, 0, 0, 0] = 9
    monkeypatch.setattr(_loss, "_cuda_kernel_fits", lambda z: False)
    ref = mf.dice_ce_loss(zb, y, ignore_index=255)
    torch.testing.assert_close(ref, fused)
    torch.testing.assert_close(_grad(ref, zb), _grad(fused, za))
    with pytest.raises(ValueError, match=r"target holds label 9, outside \[0, 3\] for C = 4 classes \(ignore_index"):
        mf.dice_ce_loss(logits, bad, ignore_index=255)
    assert torch.isnan(mf.dice_ce_loss(logits, bad, ignore_index=255, check_labels=False))


@pytest.mark.parametrize("ndim", [2, 3])
def test_an_integer_one_hot_target_is_a_one_hot_target(ndim):
    """F.one_hot's int64 (B, C, *S) target, which MONAI's losses take: it was refused as a label map of the wrong
    shape. It gives the float one-hot's value and gradient (and the label map's)."""
    g = torch.Generator().manual_seed(ndim)
    shape = (2, 4, 5, 6, 7)[: 2 + ndim]
    x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (shape[0], *shape[2:]), generator=g)
    onehot = F.one_hot(y, 4).movedim(-1, 1)
    for loss in (mf.losses.DiceCELoss(), mf.losses.DiceLoss()):
        a = loss(x, onehot)
        b = loss(x, onehot.double())
        c = loss(x, y[:, None])
        ga, = torch.autograd.grad(a, x)
        gb, = torch.autograd.grad(b, x)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(ga, gb)
    monai = MonaiDiceCE(softmax=True)(x, onehot)
    torch.testing.assert_close(mf.losses.DiceCELoss()(x, onehot), monai, rtol=1e-6, atol=0)


def test_an_integer_target_of_the_logits_shape_must_be_one_hot():
    """An integer (B, C, *S) target is read as one-hot: per-channel label values (0..2 in every channel) gave a
    loss instead of an error."""
    x = torch.randn(2, 3, 4, 5)
    bad = torch.randint(0, 3, (2, 3, 4, 5))
    bad[0, 0, 0, 0] = 2
    with pytest.raises(ValueError, match=r"target: an integer target of the logits' shape .* must hold 0 / 1"):
        mf.losses.DiceCELoss()(x, bad)
    with pytest.raises(ValueError, match="ignore_index needs a label map"):
        mf.losses.DiceCELoss(ignore_index=0)(x, F.one_hot(bad[:, 0] % 3, 3).movedim(-1, 1))
