"""Second derivatives of the fused ops.

The backward of a medfast op is itself a C++ op without a derivative of its own. Called under
``create_graph=True`` its result would be a constant to autograd, and anything differentiated through
it (a gradient penalty, a Hessian-vector product) would come out silently zero. Each backward
function therefore either computes that case through a differentiable PyTorch reference (the losses)
or returns its gradients through :func:`once_differentiable`, which raises a clear error if they are
differentiated again.
"""

from __future__ import annotations

import torch
from torch._C import _functorch


def create_graph() -> bool:
    """True inside a backward pass run with ``create_graph=True`` (autograd then enables grad mode);
    False in a plain backward and while torch.compile traces one."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


class _NoSecondDerivative(torch.autograd.Function):
    """Passes gradients through; its backward raises. Its inputs include the op's own inputs, so that
    differentiating the gradients w.r.t. them (``autograd.grad`` or ``.backward()``) reaches it."""

    # forward and setup_context apart (not forward(ctx, ...)): the form torch.func transforms accept
    @staticmethod
    def forward(op, n, *tensors):
        # copies, not views: the gradients a user gets may be modified in place (g.clamp_(), as PyTorch's
        # own); a view made inside a Function may not. Only under create_graph=True, a rare path.
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.op}: second derivatives are not implemented; the gradients it returned under "
                           "create_graph=True cannot be differentiated again")


def once_differentiable(op: str, grads, inputs) -> tuple[torch.Tensor | None, ...]:
    """``grads`` (a sequence, None entries allowed) as they are, or under ``create_graph=True`` as outputs of a
    node that raises a ``RuntimeError`` naming ``op`` when they are differentiated again, w.r.t. any of the
    tensors in ``inputs`` (the op's inputs and its incoming gradient) or through ``.backward()``."""
    grads = tuple(grads)
    if not create_graph():
        return grads
    present = [g for g in grads if g is not None]
    linked = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not present or not linked:
        return grads
    wrapped = iter(_NoSecondDerivative.apply(op, len(present), *present, *linked))
    return tuple(None if g is None else next(wrapped) for g in grads)


def reference_vjp(fn, inputs, needs, grad):
    """Gradients of ``fn(*inputs)`` against ``grad`` w.r.t. the inputs flagged in ``needs`` (None for
    the others), by PyTorch autograd through ``fn``. Under ``create_graph=True`` the result carries a
    graph (so second and higher derivatives are exact); otherwise plain tensors."""
    create = create_graph()
    with torch.enable_grad():
        xs = []
        for x, need in zip(inputs, needs):
            if need and not create:
                x = x.detach().requires_grad_(True)
            xs.append(x)
        wrt = [x for x, need in zip(xs, needs) if need]
        got = torch.autograd.grad(fn(*xs), wrt, grad, create_graph=create, allow_unused=True)
    got = iter(got)
    return tuple(next(got) if need else None for need in needs)


def refuse_function_transforms(op: str, *tensors: object) -> None:
    """Raises a clear error for inputs under forward-mode AD or a ``torch.func`` gradient transform.

    PyTorch custom operators differentiated through ``torch.library.register_autograd`` have no
    forward-mode derivative: ``torch.func.jvp`` / ``jacfwd`` and ``torch.autograd.forward_ad`` silently
    got a zero (or no) tangent. ``torch.func.grad`` / ``vjp`` / ``jacrev`` failed deep inside PyTorch
    (or on a host check). ``vmap`` works and is left alone. Outside any transform: two cheap checks."""
    if torch.compiler.is_compiling():  # traced graphs hold no transform wrappers (and dynamo cannot trace these)
        return
    forward_ad = torch.autograd.forward_ad._current_level >= 0
    if not forward_ad and _functorch.peek_interpreter_stack() is None:  # no transform active: the usual case
        return
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        if _functorch.is_gradtrackingtensor(t) or (forward_ad and torch.autograd.forward_ad.unpack_dual(t).tangent
                                                   is not None):
            raise NotImplementedError(
                f"{op}: torch.func transforms that differentiate (grad, vjp, jacrev, jvp, jacfwd) and forward-mode "
                "AD (torch.autograd.forward_ad) are not supported: PyTorch custom operators have no forward-mode "
                "derivative and no functorch rule. Use reverse mode (.backward() or torch.autograd.grad); "
                "torch.func.vmap works")
