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
from torch._C import _functions


def create_graph() -> bool:
    """True inside a backward pass run with ``create_graph=True`` (autograd then enables grad mode);
    False in a plain backward and while torch.compile traces one."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def once_differentiable(op: str, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``grads`` as they are, or under ``create_graph=True`` as outputs of a node that raises a
    ``RuntimeError`` naming ``op`` when differentiated again (as torch's ``@once_differentiable``)."""
    if not create_graph() or all(g is None for g in grads):
        return grads
    message = (f"{op}: second derivatives are not implemented; the gradients it returned under "
               "create_graph=True cannot be differentiated again")
    present = [g for g in grads if g is not None]
    leaves = []
    for g in present:
        g = g.detach()
        g.requires_grad_(True)
        leaves.append(g)
    wrapped = _functions.DelayedError(message, len(leaves))(*leaves)
    wrapped = iter(wrapped if isinstance(wrapped, tuple) else (wrapped,))
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
