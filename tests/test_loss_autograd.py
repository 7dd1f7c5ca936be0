"""The fused losses beyond first derivatives w.r.t. the logits: second derivatives (create_graph),
soft targets that require grad, torch.compile with bad labels, single-channel include_background,
and the argument checks that a truthy string or a NaN would otherwise slip through."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss as MonaiDiceCE
from monai.losses import DiceLoss as MonaiDice

import medfast as mf
from medfast.losses import DiceCELoss, DiceLoss
from medfast.metrics import hausdorff_distance


def _hvp(loss_fn, x, v):
    (g,) = torch.autograd.grad(loss_fn(x), x, create_graph=True)
    (h,) = torch.autograd.grad((g * v).sum(), x)
    return g.detach(), h


@pytest.mark.parametrize("target_kind", ["labels", "soft"])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("include_background", [True, False])
def test_hessian_vector_product_matches_monai(target_kind, batch, include_background):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn_like(x)
    if target_kind == "labels":
        t = torch.randint(0, 3, (2, 1, 4, 5, 3))
        ref = MonaiDiceCE(to_onehot_y=True, softmax=True, batch=batch, include_background=include_background)
    else:
        t = torch.softmax(torch.randn_like(x), 1).detach()
        ref = MonaiDiceCE(softmax=True, batch=batch, include_background=include_background)
    ours = DiceCELoss(batch=batch, include_background=include_background)
    g0, h0 = _hvp(lambda z: ref(z, t), x, v)
    g1, h1 = _hvp(lambda z: ours(z, t), x, v)
    torch.testing.assert_close(g1, g0, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(h1, h0, atol=1e-12, rtol=1e-9)
    assert h0.abs().max() > 1e-3  # a second derivative that is there to be wrong


_VOXEL_WEIGHT = torch.rand(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("fn", [
    lambda z, t: mf.dice_ce_loss(z, t, class_weight=[1.0, 2.0, 0.5], batch_dice=True, include_background=False),
    lambda z, t: mf.dice_loss(z, t, reduction="none"),
    lambda z, t: mf.cross_entropy(z, t, ignore_index=1, reduction="sum"),
    lambda z, t: mf.dice_ce_loss(z, t, voxel_weight=_VOXEL_WEIGHT, lambda_ce=0.3),
])
def test_gradgradcheck_labels(fn):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 3, (2, 3, 4))
    assert torch.autograd.gradgradcheck(lambda z: fn(z, t), (x,))


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_soft_target_requiring_grad_is_differentiated(activation):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    raw = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    t = (torch.softmax(raw, 1) if activation == "softmax" else torch.sigmoid(raw)).requires_grad_()
    fn = lambda z, y: mf.dice_ce_loss(z, y, activation=activation)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, t))
    assert torch.autograd.gradgradcheck(fn, (x, t))
    # against MONAI (Dice) and PyTorch (cross-entropy with probability targets)
    if activation == "softmax":
        b = raw.clone().requires_grad_()
        (g_ref,) = torch.autograd.grad(MonaiDice(softmax=True)(x, b.softmax(1)), b)
        (g,) = torch.autograd.grad(DiceLoss()(x, b.softmax(1)), b)
        torch.testing.assert_close(g, g_ref)
        (g_ref,) = torch.autograd.grad(F.cross_entropy(x, b.softmax(1)), b)
        (g,) = torch.autograd.grad(mf.cross_entropy(x, b.softmax(1)), b)
        torch.testing.assert_close(g, g_ref)
    # the logits' gradient is unchanged by the target's
    (gx,) = torch.autograd.grad(fn(x, t), x)
    (gx0,) = torch.autograd.grad(fn(x, t.detach()), x)
    torch.testing.assert_close(gx, gx0)


def test_class_weight_as_a_sequence_of_tensors_keeps_their_gradients():
    # torch.as_tensor copied the values of a list of 0-d tensors into a new leaf: their .grad stayed None
    z = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    lab = torch.randint(0, 3, (1, 4, 4))
    ws = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (1.0, 2.0, 0.5)]
    stacked = torch.stack([w.detach() for w in ws]).requires_grad_()
    mf.dice_ce_loss(z, lab, class_weight=ws).backward()
    mf.dice_ce_loss(z, lab, class_weight=stacked).backward()
    torch.testing.assert_close(torch.stack([w.grad for w in ws]), stacked.grad)
    assert stacked.grad.abs().sum() > 0
    mixed = mf.cross_entropy(z, lab, class_weight=[1.0, torch.tensor(2.0), 0.5])  # floats and tensors
    torch.testing.assert_close(mixed, mf.cross_entropy(z, lab, class_weight=[1.0, 2.0, 0.5]))


def test_compiled_loss_gives_nan_on_bad_labels():
    x = torch.randn(1, 3, 4, 5)
    y = torch.randint(0, 3, (1, 1, 4, 5))
    compiled = torch.compile(lambda a, b: mf.dice_ce_loss(a, b), backend="inductor")
    torch.testing.assert_close(compiled(x, y), mf.dice_ce_loss(x, y))
    bad = y.clone()
    bad[0, 0, 0, 0] = 9
    assert torch.isnan(compiled(x, bad))  # eager raises; compiled may not: NaN, never a finite value


@pytest.mark.parametrize("cls", [DiceLoss, DiceCELoss])
def test_single_sigmoid_channel_ignores_include_background_false(cls):
    torch.manual_seed(3)
    x = torch.randn(2, 1, 5, 6, dtype=torch.float64)
    t = (torch.rand(2, 1, 5, 6) > 0.5).double()
    with pytest.warns(UserWarning, match="single channel prediction"):
        ours = cls(sigmoid=True, include_background=False)(x, t)
    monai_cls = MonaiDice if cls is DiceLoss else MonaiDiceCE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = monai_cls(sigmoid=True, include_background=False)(x, t)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(include_background="False"), TypeError, "include_background must be a bool"),
    (dict(batch_dice=None), TypeError, "batch_dice must be a bool"),
    (dict(ddp_sync="yes"), TypeError, "ddp_sync must be a bool"),
    (dict(lambda_dice=float("nan")), ValueError, "lambda_dice must be a non-negative finite"),
    (dict(lambda_ce=float("inf")), ValueError, "lambda_ce must be a non-negative finite"),
    (dict(class_weight=[1.0, float("nan"), 1.0]), ValueError, "class_weight must be non-negative and finite"),
    (dict(class_weight="abc"), TypeError, "class_weight must be a sequence"),
    (dict(smooth=(1.0, 2.0, 3.0)), ValueError, "smooth must be"),
    (dict(smooth=float("nan")), ValueError, "smooth must be"),
])
def test_bad_arguments_name_themselves(kwargs, error, match):
    x = torch.randn(1, 3, 4, 5)
    y = torch.randint(0, 3, (1, 4, 5))
    with pytest.raises(error, match=match):
        mf.dice_ce_loss(x, y, **kwargs)


def test_float_target_of_the_wrong_shape_says_what_is_expected():
    x = torch.randn(1, 3, 4, 5)
    with pytest.raises(TypeError, match=r"floating soft target of the logits' shape \(1, 3, 4, 5\)"):
        mf.dice_ce_loss(x, torch.rand(1, 4, 4, 5))


@pytest.mark.parametrize("spacing", ["12", b"12"])
def test_string_spacing_is_refused(spacing):
    m = torch.zeros(1, 2, 6, 6, dtype=torch.bool)
    m[0, 1, 2:4, 2:4] = True
    m[0, 0] = ~m[0, 1]
    with pytest.raises(TypeError, match="spacing must be"):
        mf.distance_transform(m[:, 1], spacing=spacing)
    with pytest.raises(TypeError, match="spacing must be"):
        hausdorff_distance(m, m, spacing=spacing)


def test_meta_tensors_trace_shapes():
    # the label check reads values: skipped on meta tensors (shape-only tracing), as under torch.compile
    x = torch.randn(2, 3, 4, 5, device="meta", requires_grad=True)
    y = torch.randint(0, 3, (2, 4, 5)).to("meta")
    loss = mf.dice_ce_loss(x, y)
    assert loss.shape == () and loss.device.type == "meta"
    loss.backward()
    assert x.grad.shape == x.shape
