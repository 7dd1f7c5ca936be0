"""The fused finishing op of the losses (torch.ops.medfast.loss_finalize, csrc/loss/finalize.h): the
Dice ratios, class weights, reductions and lambdas from the (B, C, 4) sums in one op, against the
Python composition it replaces (medfast.ops._loss._dice_terms / _ce_term / _reduce, forced by
_FUSED_FINALIZE = False) over the options; gradcheck and opcheck of the op; fewer aten ops per
Dice+CE forward+backward; NaN on a bad label with check_labels=False; the paths that keep the
composition (dice_loss reduction="none", class weights that require grad)."""

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import medfast as mf
from medfast.ops import _loss

OPS = torch.ops.medfast


def _python(monkeypatch):
    monkeypatch.setattr(_loss, "_FUSED_FINALIZE", False)


def _value_and_grad(fn, logits, target, **kw):
    z = logits.detach().clone().requires_grad_()
    loss = fn(z, target, **kw)
    (g,) = torch.autograd.grad(loss, z)
    return loss.detach(), g


def _both(monkeypatch, fn, logits, target, **kw):
    """(fused value, fused grad), (composition value, composition grad)."""
    fused = _value_and_grad(fn, logits, target, **kw)
    with monkeypatch.context() as m:
        _python(m)
        ref = _value_and_grad(fn, logits, target, **kw)
    return fused, ref


def _case(kind, ndim, dtype=torch.float64, B=2, C=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    spatial = (5, 6, 4) if ndim == 3 else (7, 9)
    logits = 2.0 * torch.randn(B, C, *spatial, generator=g, dtype=dtype)
    if kind == "labels":
        target = torch.randint(0, C, (B, *spatial), generator=g)
        target.view(-1)[::7] = 255  # ignored where ignore_index=255
    elif kind == "soft":
        target = torch.softmax(torch.randn(B, C, *spatial, generator=g, dtype=dtype), 1)
    else:  # multi-label, some soft
        target = (torch.rand(B, C, *spatial, generator=g, dtype=dtype) > 0.6).to(dtype)
        target.view(-1)[::5] = 0.3
    vw = torch.rand(B, *spatial, generator=g, dtype=dtype)
    return logits, target, vw


def _target_kw(kind, voxel_weight, vw):
    kw = {}
    if kind == "labels":
        kw["ignore_index"] = 255
    if kind == "sigmoid":
        kw["activation"] = "sigmoid"
    if voxel_weight:
        kw["voxel_weight"] = vw
    return kw


CLASS_WEIGHTS = {"none": None, "list": [0.5, 1.0, 2.0, 1.5], "tensor": torch.tensor([1.5, 0.25, 1.0, 3.0])}


def _assert_same(fused, ref, rtol=1e-12):
    (fv, fg), (rv, rg) = fused, ref
    torch.testing.assert_close(fv, rv, rtol=rtol, atol=0)
    torch.testing.assert_close(fg, rg, rtol=rtol, atol=rtol * rg.abs().max().item())


GRID = list(itertools.product([True, False], [False, True], [1e-5, (1e-3, 2.0)], list(CLASS_WEIGHTS),
                              ["mean", "sum"]))


@pytest.mark.parametrize("kind", ["labels", "soft", "sigmoid"])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("voxel_weight", [False, True])
@pytest.mark.parametrize("lambdas", [(1.0, 1.0), (0.7, 1.3), (0.0, 1.0), (1.0, 0.0)])
def test_dice_ce_fused_equals_composition(monkeypatch, kind, ndim, voxel_weight, lambdas):
    logits, target, vw = _case(kind, ndim, seed=ndim)
    base = _target_kw(kind, voxel_weight, vw)
    for include_background, batch_dice, smooth, cw, reduction in GRID:
        kw = dict(base, include_background=include_background, batch_dice=batch_dice, smooth=smooth,
                  class_weight=CLASS_WEIGHTS[cw], reduction=reduction, lambda_dice=lambdas[0], lambda_ce=lambdas[1])
        _assert_same(*_both(monkeypatch, mf.dice_ce_loss, logits, target, **kw))


@pytest.mark.parametrize("kind", ["labels", "soft", "sigmoid"])
@pytest.mark.parametrize("voxel_weight", [False, True])
def test_dice_and_cross_entropy_fused_equal_composition(monkeypatch, kind, voxel_weight):
    logits, target, vw = _case(kind, 3, seed=5)
    base = _target_kw(kind, voxel_weight, vw)
    for include_background, batch_dice, smooth, cw, reduction in GRID:
        kw = dict(base, include_background=include_background, batch_dice=batch_dice, smooth=smooth,
                  class_weight=CLASS_WEIGHTS[cw], reduction=reduction)
        _assert_same(*_both(monkeypatch, mf.dice_loss, logits, target, **kw))
    for cw, reduction in itertools.product(CLASS_WEIGHTS, ["mean", "sum"]):
        kw = dict(base, class_weight=CLASS_WEIGHTS[cw], reduction=reduction)
        _assert_same(*_both(monkeypatch, mf.cross_entropy, logits, target, **kw))


@pytest.mark.parametrize("kind", ["labels", "soft", "sigmoid"])
def test_float32_fused_equals_composition(monkeypatch, kind):
    # float32 sums: the op computes in float32, as the composition does (the order of the sums differs)
    logits, target, vw = _case(kind, 3, dtype=torch.float32, B=3, C=4, seed=9)
    for batch_dice, cw in itertools.product([False, True], ["none", "tensor"]):
        kw = dict(_target_kw(kind, True, vw), batch_dice=batch_dice, class_weight=CLASS_WEIGHTS[cw],
                  include_background=not batch_dice, lambda_dice=0.6)
        fused, ref = _both(monkeypatch, mf.dice_ce_loss, logits, target, **kw)
        assert fused[0].dtype == torch.float32
        _assert_same(fused, ref, rtol=2e-6)


def test_one_channel_sigmoid_without_background(monkeypatch):
    # the public losses ignore include_background=False for one channel (with a warning, as MONAI)
    logits, target, _ = _case("sigmoid", 3, C=1, seed=2)
    for reduction in ("mean", "sum"):
        kw = dict(activation="sigmoid", include_background=False, reduction=reduction)
        with pytest.warns(UserWarning, match="single channel prediction"):
            (fv, _), (rv, _) = _both(monkeypatch, mf.dice_loss, logits, target, **kw)
        torch.testing.assert_close(fv, rv)
        kw["include_background"] = True
        torch.testing.assert_close(fv, mf.dice_loss(logits, target, **kw))
    # the op itself with no Dice term left: the mean over none is NaN, the sum 0, as the composition
    stats = _stats(B=2, C=1)
    for mean in (True, False):
        flags = _flags(ce=False, include_background=False, mean=mean)
        scalars = [1.0, 1e-5, 1e-5, 1.0, 1.0]
        fused = torch.ops.medfast.loss_finalize(stats, None, None, scalars, flags)
        torch.testing.assert_close(fused, _loss._finalize_reference(stats, None, None, scalars, flags), equal_nan=True)
        assert torch.isnan(fused) == mean


def _stats(B=2, C=4, dtype=torch.float64, seed=0):
    """Sums as the kernels produce them: I <= P, I <= G, E >= 0."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(B, C, generator=g, dtype=dtype) * 50 + 1
    t = torch.rand(B, C, generator=g, dtype=dtype) * 50 + 1
    i = torch.minimum(p, t) * torch.rand(B, C, generator=g, dtype=dtype)
    e = torch.rand(B, C, generator=g, dtype=dtype) * 80
    return torch.stack([i, p, t, e], -1)


def _flags(dice=True, ce=True, include_background=True, batch_dice=False, mean=True, truth=False):
    return ((_loss._DICE if dice else 0) | (_loss._CE if ce else 0) | (_loss._BACKGROUND if include_background else 0)
            | (_loss._BATCH_DICE if batch_dice else 0) | (_loss._MEAN if mean else 0)
            | (_loss._TRUTH_DIVISOR if truth else 0))


# (class weight?, divisor tensor?, scalars (divisor_scale, nr, dr, lambda_dice, lambda_ce), flags)
OP_CASES = [
    (False, False, [1.0, 1e-5, 1e-5, 1.0, 1.0], _flags(truth=True)),
    (True, False, [1.0, 1e-3, 0.5, 0.7, 1.3], _flags(truth=True, batch_dice=True, include_background=False)),
    (True, True, [3.0, 1e-5, 1e-5, 1.0, 2.0], _flags(mean=True)),
    (False, False, [480.0, 0.0, 1.0, 1.0, 1.0], _flags(dice=False)),
    (True, False, [1.0, 1.0, 1.0, 1.0, 1.0], _flags(ce=False, batch_dice=True, mean=False)),
    (True, True, [1.0, 1e-5, 1e-5, 0.0, 1.0], _flags(mean=False, include_background=False)),
]


def _op_args(case, B=2, C=4, dtype=torch.float64):
    with_cw, with_div, scalars, flags = case
    stats = _stats(B, C, dtype)
    cw = torch.linspace(0.5, 2.0, C, dtype=dtype) if with_cw else None
    div = torch.tensor(37.5, dtype=dtype) if with_div else None
    return stats, cw, div, scalars, flags


@pytest.mark.parametrize("case", range(len(OP_CASES)))
def test_loss_finalize_gradcheck_and_opcheck(case):
    stats, cw, div, scalars, flags = _op_args(OP_CASES[case])
    x = stats.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda s: OPS.loss_finalize(s, cw, div, scalars, flags), (x,))
    torch.library.opcheck(OPS.loss_finalize.default, (x, cw, div, scalars, flags))
    grad = torch.tensor(0.75, dtype=stats.dtype)
    torch.library.opcheck(OPS.loss_finalize_backward.default, (grad, stats, cw, div, scalars, flags))
    f32 = [t if t is None else t.float() for t in (stats, cw, div)]
    torch.library.opcheck(OPS.loss_finalize.default, (*f32, scalars, flags))
    # with the sums op's label-range report (check_labels=False): good, the same op; bad, NaN
    good, bad = torch.zeros(2, dtype=torch.int64), torch.tensor([0, 9])
    assert torch.equal(OPS.loss_finalize(x, cw, div, scalars, flags, good),
                       OPS.loss_finalize(x, cw, div, scalars, flags))
    assert torch.autograd.gradcheck(lambda s: OPS.loss_finalize(s, cw, div, scalars, flags, good), (x,))
    # (opcheck with the good report: its comparisons of a NaN output fail)
    torch.library.opcheck(OPS.loss_finalize.default, (x, cw, div, scalars, flags, good))
    torch.library.opcheck(OPS.loss_finalize_backward.default, (grad, stats, cw, div, scalars, flags, good))
    assert torch.isnan(OPS.loss_finalize(x, cw, div, scalars, flags, bad))
    assert torch.isnan(OPS.loss_finalize_backward(grad, stats, cw, div, scalars, flags, bad)).all()
    with pytest.raises(ValueError, match="bad_labels must be the sums op's"):
        OPS.loss_finalize(x, cw, div, scalars, flags, good.int())


def test_loss_finalize_absent_term_is_not_computed():
    # a NaN / inf in the sums of a term that is not asked for never reaches the loss or the gradient
    stats = _stats().requires_grad_()
    poisoned = stats.detach().clone()
    poisoned[..., 3] = float("nan")  # E: only the CE term reads it
    dice = OPS.loss_finalize(poisoned, None, None, [1.0, 1e-5, 1e-5, 1.0, 1.0], _flags(ce=False))
    assert torch.isfinite(dice)
    poisoned = stats.detach().clone()
    poisoned[..., 1] = float("inf")  # P: only the Dice term reads it
    poisoned[..., 0] = float("nan")
    x = poisoned.requires_grad_()
    ce = OPS.loss_finalize(x, None, None, [1.0, 1e-5, 1e-5, 1.0, 1.0], _flags(dice=False, truth=True))
    ce.backward()
    assert torch.isfinite(ce) and torch.isfinite(x.grad).all()
    # with both terms, lambda 0 does not hide a NaN (0 * NaN), as in the composition
    both = OPS.loss_finalize(poisoned, None, None, [1.0, 1e-5, 1e-5, 0.0, 1.0], _flags(truth=True))
    assert torch.isnan(both)


def test_loss_finalize_bad_arguments():
    stats = _stats()
    with pytest.raises(ValueError, match="stats must be"):
        OPS.loss_finalize(stats[..., :3], None, None, [1.0] * 5, 0)
    with pytest.raises(ValueError, match="class_weight must have C = 4"):
        OPS.loss_finalize(stats, torch.ones(3, dtype=stats.dtype), None, [1.0] * 5, 0)
    with pytest.raises(ValueError, match="scalars must be"):
        OPS.loss_finalize(stats, None, None, [1.0] * 4, 0)
    with pytest.raises(ValueError, match="bad flags"):
        OPS.loss_finalize(stats, None, None, [1.0] * 5, 64)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _count_dice_ce(**kw):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 4, 4, 4, generator=g).requires_grad_()
    target = torch.randint(0, 4, (2, 4, 4, 4), generator=g)
    with _CountOps() as c:
        mf.dice_ce_loss(logits, target, **kw).backward()
    return c.n


def test_fewer_aten_ops_per_dice_ce_forward_backward(monkeypatch):
    # measured: 40 aten ops with the Python composition (main before the fused op), 8 fused; with class
    # weights and batch Dice 61 -> 12 (58 -> 9 since the class weights are checked in Python). Bounds: the
    # old count minus 40 %, which the composition fails. (Since the label range check moved into the sums
    # kernel, one op fewer on either path: 39 composed, 7 fused.)
    fused = _count_dice_ce()
    heavy = _count_dice_ce(class_weight=[1.0, 2.0, 0.5, 1.0], batch_dice=True, include_background=False)
    with monkeypatch.context() as m:
        _python(m)
        old = _count_dice_ce()
        old_heavy = _count_dice_ce(class_weight=[1.0, 2.0, 0.5, 1.0], batch_dice=True, include_background=False)
    assert old >= 39 and old_heavy >= 54
    assert fused <= 0.6 * 40 and heavy <= 0.6 * 61
    assert fused <= 10 and heavy <= 14
    # without the host check the fused op reads the sums op's label-range report itself: no op more (the NaN
    # injection on the sums took 5: any, where, to, add and its backward; 12 in all)
    assert _count_dice_ce(check_labels=False) == fused


@pytest.mark.parametrize("fn", [mf.dice_ce_loss, mf.dice_loss, mf.cross_entropy])
def test_bad_label_without_check_gives_nan_through_the_fused_op(fn):
    logits, target, _ = _case("labels", 3, seed=4)
    target = target.clamp_max(3)
    bad = target.clone()
    bad[1, 2, 3, 1] = 7
    z = logits.clone().requires_grad_()
    loss = fn(z, bad, check_labels=False)
    assert torch.isnan(loss)
    assert type(loss.grad_fn).__name__ == "_LossFinalizeBackward"  # the fused op's NaN, not the composition's
    loss.backward()
    assert torch.isnan(z.grad).all()  # never a finite gradient from a bad label either
    # good labels: the same loss and gradient as with the check, bitwise
    values = []
    for check in (True, False):
        z = logits.clone().requires_grad_()
        loss = fn(z, target, check_labels=check)
        loss.backward()
        values.append((loss.detach(), z.grad))
    assert torch.isfinite(values[1][0])
    assert torch.equal(values[0][0], values[1][0]) and torch.equal(values[0][1], values[1][1])


@pytest.mark.parametrize("fn", [mf.dice_ce_loss, mf.dice_loss, mf.cross_entropy])
def test_bad_label_without_check_gives_nan_through_the_composition(monkeypatch, fn):
    # where the fused finishing op does not apply (here forced), the sums themselves become NaN
    logits, target, _ = _case("labels", 3, seed=4)
    bad = target.clamp_max(3).clone()
    bad[0, 1, 1, 1] = -2
    with monkeypatch.context() as m:
        _python(m)
        z = logits.clone().requires_grad_()
        loss = fn(z, bad, check_labels=False)
        loss.backward()
    assert torch.isnan(loss) and torch.isnan(z.grad).any()  # (the bad voxel itself has weight 0 there)


def test_fused_op_is_used_and_composition_kept_where_it_must(monkeypatch):
    logits, target, _ = _case("labels", 3, seed=6)
    target = target.clamp_max(3)
    calls = []
    real = _loss._ops.loss_finalize

    class Spy:
        def __call__(self, *args):
            calls.append(args[-1])
            return real(*args)

    monkeypatch.setattr(_loss._ops, "loss_finalize", Spy(), raising=False)
    mf.dice_ce_loss(logits, target)
    mf.dice_loss(logits, target, reduction="sum")
    mf.cross_entropy(logits, target)
    assert len(calls) == 3
    # reduction "none": per-(batch, class) terms, the composition
    assert mf.dice_loss(logits, target, reduction="none").shape == (2, 4)
    # class weights that require grad: the composition, which differentiates them
    cw = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64, requires_grad=True)
    z = logits.clone().requires_grad_()
    loss = mf.dice_ce_loss(z, target, class_weight=cw)
    assert len(calls) == 3
    gz, gcw = torch.autograd.grad(loss, (z, cw))
    assert torch.isfinite(gcw).all() and gcw.abs().sum() > 0
    ref = mf.dice_ce_loss(logits.clone().requires_grad_(), target, class_weight=cw.detach())
    assert len(calls) == 4
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-12, atol=0)


def test_bad_smooth_raises_before_any_kernel(monkeypatch):
    logits, target, _ = _case("labels", 3, seed=6)
    monkeypatch.setattr(_loss._ops, "softmax_stats", None, raising=False)  # any kernel call would fail
    with pytest.raises(ValueError, match="smooth must be"):
        mf.dice_ce_loss(logits, target.clamp_max(3), smooth=-1.0)
    with pytest.raises(ValueError, match="smooth must be"):
        mf.dice_loss(logits, target.clamp_max(3), smooth=(1.0, -2.0))


@pytest.mark.parametrize("kind", ["labels", "soft", "sigmoid"])
def test_compile_fused_dice_ce(kind):
    logits, target, vw = _case(kind, 3, dtype=torch.float32, seed=8)
    # class weights as a list: checked in Python, a constant of the graph (a tensor's values are checked on the
    # host, which fullgraph refuses)
    kw = dict(_target_kw(kind, True, vw), batch_dice=True, include_background=False, lambda_ce=0.5,
              class_weight=CLASS_WEIGHTS["list"])
    if kind == "labels":
        target = target.clamp_max(3)
        kw.pop("ignore_index")
    fn = torch.compile(lambda x: mf.dice_ce_loss(x, target, **kw), backend="inductor", fullgraph=True)
    z1, z2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    a, b = fn(z1), mf.dice_ce_loss(z2, target, **kw)
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    torch.testing.assert_close(z1.grad, z2.grad)
