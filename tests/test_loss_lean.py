"""The losses' lean eager autograd path (medfast.ops._loss._lean: each fused op through an autograd.Function
of its own instead of torch.library's Python wrapper, for host time). Against the registered ops' autograd
(forced by patching _lean to False): the same values and gradients bitwise, second derivatives included,
over the label / soft / sigmoid forms, weights and options; which path a call takes (plain eager tensors
only; grad mode off: no graph at all); the host time saved is in benchmarks (not timed here)."""

import pytest
import torch

import medfast as mf
from medfast.ops import _loss


def _registered(monkeypatch):
    monkeypatch.setattr(_loss, "_lean", lambda *tensors: False)


def _case(kind, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, C, spatial = 2, 4, (5, 6, 4)
    logits = 2.0 * torch.randn(B, C, *spatial, generator=g, dtype=dtype)
    if kind == "labels":
        target = torch.randint(0, C, (B, *spatial), generator=g)
        target.view(-1)[::7] = 255
        kw = {"ignore_index": 255}
    elif kind == "soft":
        target = torch.softmax(torch.randn(B, C, *spatial, generator=g, dtype=dtype), 1)
        kw = {}
    else:
        target = (torch.rand(B, C, *spatial, generator=g, dtype=dtype) > 0.6).to(dtype)
        kw = {"activation": "sigmoid"}
    vw = torch.rand(B, *spatial, generator=g, dtype=dtype)
    return logits, target, vw, kw


def _value_grads(fn, logits, target, target_grad=False, **kw):
    z = logits.detach().clone().requires_grad_()
    t = target.detach().clone().requires_grad_() if target_grad else target
    loss = fn(z, t, **kw)
    wrt = (z, t) if target_grad else (z,)
    return loss.detach(), torch.autograd.grad(loss, wrt), type(loss.grad_fn).__name__


FNS = {"dice_ce_loss": mf.dice_ce_loss, "dice_loss": mf.dice_loss, "cross_entropy": mf.cross_entropy}


@pytest.mark.parametrize("name", list(FNS))
@pytest.mark.parametrize("kind", ["labels", "soft", "sigmoid"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lean_path_equals_registered_autograd(monkeypatch, name, kind, weighted, dtype):
    logits, target, vw, kw = _case(kind, dtype)
    if weighted:
        kw.update(voxel_weight=vw, class_weight=[0.5, 1.0, 2.0, 1.5])
    if name != "cross_entropy":
        kw.update(batch_dice=weighted)
    lean = _value_grads(FNS[name], logits, target, **kw)
    with monkeypatch.context() as m:
        _registered(m)
        ref = _value_grads(FNS[name], logits, target, **kw)
    assert lean[2] == "_LossFinalizeBackward" and ref[2].startswith("GeneratedBackwardFor_medfast_loss_finalize")
    assert torch.equal(lean[0], ref[0])  # the same kernels: bitwise
    for a, b in zip(lean[1], ref[1]):
        assert torch.equal(a, b)


def test_lean_path_soft_target_gradient_and_reduction_none(monkeypatch):
    """A soft target that requires grad (the PyTorch reference in the backward) and dice_loss
    reduction="none" (the Python composition after the sums op) on both paths."""
    logits, target, _, _ = _case("soft")
    lean = _value_grads(mf.dice_ce_loss, logits, target, target_grad=True)
    z = logits.clone().requires_grad_()
    per = mf.dice_loss(z, target, reduction="none")
    (g_none,) = torch.autograd.grad(per.sum(), z)
    with monkeypatch.context() as m:
        _registered(m)
        ref = _value_grads(mf.dice_ce_loss, logits, target, target_grad=True)
        z = logits.clone().requires_grad_()
        per_ref = mf.dice_loss(z, target, reduction="none")
        (g_none_ref,) = torch.autograd.grad(per_ref.sum(), z)
    assert torch.equal(lean[0], ref[0])
    for a, b in zip(lean[1], ref[1]):
        assert torch.equal(a, b)
    assert torch.equal(per, per_ref) and torch.equal(g_none, g_none_ref)


@pytest.mark.parametrize("kind", ["labels", "soft"])
def test_lean_path_second_derivatives(monkeypatch, kind):
    """A gradient penalty (d/dz |dL/dz|^2) through the lean Functions equals the registered ops' one, and
    gradgradcheck holds on the lean path."""
    logits, target, vw, kw = _case(kind)

    def penalty_grad():
        z = logits.clone().requires_grad_()
        (g,) = torch.autograd.grad(mf.dice_ce_loss(z, target, voxel_weight=vw, **kw), z, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), z)
        return gg

    lean = penalty_grad()
    with monkeypatch.context() as m:
        _registered(m)
        ref = penalty_grad()
    assert lean.abs().max() > 0
    torch.testing.assert_close(lean, ref, rtol=1e-12, atol=1e-14)
    z = logits[:1, :, :3, :2, :2].clone().requires_grad_()
    t = target[:1, :3, :2, :2] if kind == "labels" else target[:1, :, :3, :2, :2]
    assert torch.autograd.gradgradcheck(lambda x: mf.dice_ce_loss(x, t, **kw), (z,))


def test_which_path_a_call_takes():
    logits, target, _, _ = _case("labels")
    target = target.clamp_max(3)
    assert _loss._lean(logits, target, None)

    class Sub(torch.Tensor):
        pass

    assert not _loss._lean(logits.as_subclass(Sub), target, None)  # subclasses keep the registered op
    assert _loss._lean(torch.nn.Parameter(logits), target, None)
    # grad mode off or nothing requires grad: the op alone, no graph
    with torch.no_grad():
        assert mf.dice_ce_loss(logits.clone().requires_grad_(), target).grad_fn is None
    assert mf.dice_ce_loss(logits, target).grad_fn is None
    # vmap (a functorch transform) takes the registered op: same values per sample as a loop
    z = logits.float()
    batched = torch.vmap(lambda x, y: mf.dice_ce_loss(x[None], y[None], check_labels=False))(z, target)
    looped = torch.stack([mf.dice_ce_loss(z[i:i + 1], target[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(batched, looped)
