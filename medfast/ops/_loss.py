"""Fused segmentation losses: Dice, cross-entropy and Dice+CE over softmax probabilities.

Kernels: ``csrc/loss/`` (CPU and CUDA launchers over the arithmetic of loss.h). One pass over the
logits produces per-(batch, class) sums (intersection, prediction, ground truth, cross-entropy); the
backward pass reads the logits once more. No one-hot, softmax or log-softmax tensor of the logits' size
is formed: the only large allocation is the gradient autograd needs.

The O(B x C) arithmetic from the sums to the loss (Dice ratios, class weights, reductions, lambdas) is
one more fused op, ``loss_finalize`` (finalize.h; one kernel and one for its backward on a GPU, instead
of ~15 small PyTorch ops and ~20 in their backward, each a kernel launch: the host time, not the
kernels, bounded small and medium losses). The PyTorch composition (``_dice_terms``, ``_ce_term``,
``_reduce``) stays for what the op does not cover: ``dice_loss(reduction="none")``, class weights
that require grad (the op does not differentiate them), and ``batch_dice`` with ``ddp_sync`` under
an initialized process group (the all-reduce sits between the sums and the ratio).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch._C import _functorch

from medfast._extension import _C  # noqa: F401  (registers torch.ops.medfast)
from medfast.ops._autograd import create_graph, reference_vjp, refuse_function_transforms
from medfast.ops._validate import (
    check_backend,
    check_bool,
    check_choice,
    check_op_devices,
    check_tensor,
    non_negative_finite,
    py_scalar,
)

_ops = torch.ops.medfast
_LOGIT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _grad_format(logits: torch.Tensor) -> torch.memory_format:
    """The layout of softmax_stats_backward's and soft_stats_backward's gradient (csrc/loss/loss_launch.h
    logits_layout): the logits' own for channels-last logits (read in place), else contiguous."""
    if logits.dim() in (4, 5) and not logits.is_contiguous():
        fmt = torch.channels_last if logits.dim() == 4 else torch.channels_last_3d
        if logits.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


@torch.library.register_fake("medfast::softmax_stats")
def _softmax_stats_fake(logits, labels, voxel_weight, ignore_index=None, ce=True):
    check_op_devices("medfast::softmax_stats", logits=logits, labels=labels, voxel_weight=voxel_weight)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    stats = logits.new_empty((logits.shape[0], logits.shape[1], 4), dtype=dtype)
    return stats, logits.new_empty((2,), dtype=torch.int64)


@torch.library.register_fake("medfast::softmax_stats_backward")
def _softmax_stats_backward_fake(grad, logits, labels, voxel_weight, ignore_index=None):
    check_op_devices("medfast::softmax_stats_backward", grad=grad, logits=logits, labels=labels,
                     voxel_weight=voxel_weight)
    return torch.empty_like(logits, memory_format=_grad_format(logits))


@torch.library.register_fake("medfast::soft_stats")
def _soft_stats_fake(logits, target, voxel_weight, sigmoid, ce=True):
    check_op_devices("medfast::soft_stats", logits=logits, target=target, voxel_weight=voxel_weight)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.new_empty((logits.shape[0], logits.shape[1], 4), dtype=dtype)


@torch.library.register_fake("medfast::soft_stats_backward")
def _soft_stats_backward_fake(grad, logits, target, voxel_weight, sigmoid):
    check_op_devices("medfast::soft_stats_backward", grad=grad, logits=logits, target=target,
                     voxel_weight=voxel_weight)
    return torch.empty_like(logits, memory_format=_grad_format(logits))


def _soft_setup(ctx, inputs, output):
    logits, target, voxel_weight, sigmoid, _ce = inputs
    ctx.save_for_backward(logits, target, voxel_weight)
    ctx.sigmoid = sigmoid


def _soft_backward(ctx, grad):
    logits, target, voxel_weight = ctx.saved_tensors
    need_logits, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if need_target or create_graph():
        # A target that requires grad (e.g. another network's softmax), or second derivatives: through
        # the PyTorch reference of the same sums (softmax-sized temporaries, in these cases only).
        kind = "sigmoid" if ctx.sigmoid else "softmax"
        gz, gt = reference_vjp(lambda z, t: _stats_reference(z, t, voxel_weight, kind), (logits, target),
                               (need_logits, need_target), grad)
        return gz, gt, None, None, None
    grad_logits = _ops.soft_stats_backward(grad.contiguous(), logits, target, voxel_weight, ctx.sigmoid)
    return grad_logits, None, None, None, None


torch.library.register_autograd("medfast::soft_stats", _soft_backward, setup_context=_soft_setup)


def _stats_setup(ctx, inputs, output):
    logits, labels, voxel_weight, ctx.ignore_index, _ce = inputs
    ctx.save_for_backward(logits, labels, voxel_weight)


def _stats_backward(ctx, grad, _grad_range):
    logits, labels, voxel_weight = ctx.saved_tensors
    if create_graph():  # second derivatives: through the PyTorch reference of the same sums
        y = _reference_labels(labels, ctx.ignore_index)
        (gz,) = reference_vjp(lambda z: _stats_reference(z, y, voxel_weight, "labels"), (logits,), (True,), grad)
        return gz, None, None, None, None
    gz = _ops.softmax_stats_backward(grad.contiguous(), logits, labels, voxel_weight, ctx.ignore_index)
    return gz, None, None, None, None


torch.library.register_autograd("medfast::softmax_stats", _stats_backward, setup_context=_stats_setup)


# ---- Lean eager autograd ----
# torch.library's autograd wrapper of a custom op is Python (argument defaults refilled from the schema, a
# redispatch, a generated Function): about 12 us of host time per differentiated call on this CPU, and a
# Dice+CE call makes two. For a small loss that is most of its time, and on a GPU the host time, not the
# kernels, bounds Dice+CE at few classes. Plain eager calls therefore run each op through an
# autograd.Function of its own with the same setup and backward functions as the registered autograd
# (so the same gradients, second derivatives included), the op itself below autograd. torch.compile,
# torch.jit.trace, functorch transforms (vmap) and tensor subclasses keep the registered op, which is what
# those record and dispatch (and what opcheck tests).
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _lean(*tensors: torch.Tensor | None) -> bool:
    """Whether a call with these tensor inputs takes the lean eager path."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _functorch.peek_interpreter_stack() is not None:
        return False
    return all(t is None or type(t) in _PLAIN_TENSORS for t in tensors)


def _vmapped(t: torch.Tensor) -> bool:
    """A functorch-wrapped tensor (under torch.func.vmap, a batched one: no values to read on the host, and
    requires_grad False whatever the tensor vmapped over says). False while torch.compile traces (dynamo cannot
    trace the query: a graph break)."""
    return not torch.compiler.is_compiling() and _functorch.is_functorch_wrapped_tensor(t)


def _lean_function(name: str, op: str, setup, backward) -> type[torch.autograd.Function]:
    """An autograd.Function that runs ``torch.ops.medfast.<op>`` (looked up at each call) below autograd with the
    registered autograd's ``setup`` and ``backward`` (what torch.library generates, less its Python argument
    handling); outputs past the first (the sums op's label-range report) are not differentiable."""

    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            out = getattr(_ops, op)(*args)
        setup(ctx, args, out)
        if isinstance(out, tuple):
            ctx.mark_non_differentiable(*out[1:])
        return out

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                   "backward": staticmethod(backward)})


def _call(function: type[torch.autograd.Function], op, *args):
    """``op(*args)``: on the lean path (:func:`_lean`) through ``function`` when a gradient is needed, else the op
    alone below autograd (no wrapper at all); elsewhere the registered op."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not _lean(*tensors):
        return op(*args)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return function.apply(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


_SoftmaxStats = _lean_function("_SoftmaxStats", "softmax_stats", _stats_setup, _stats_backward)
_SoftStats = _lean_function("_SoftStats", "soft_stats", _soft_setup, _soft_backward)


def _check_logits(logits: object, activation: str = "softmax") -> torch.Tensor:
    logits = check_tensor("logits", logits)
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"logits must be float32, float64, float16 or bfloat16, got {logits.dtype}")
    if logits.dim() not in (4, 5):
        raise ValueError(f"logits must have shape (B, C, H, W) or (B, C, D, H, W), got {tuple(logits.shape)}")
    if logits.numel() == 0:
        raise ValueError(f"logits is empty: shape {tuple(logits.shape)}")
    if activation == "softmax" and logits.shape[1] < 2:
        raise ValueError(
            f"softmax needs at least 2 classes; logits has shape {tuple(logits.shape)} (use activation='sigmoid')"
        )
    return logits


def _labels(target: object, logits: torch.Tensor, ignore_index: int | None,
            check_labels: bool = True) -> tuple[torch.Tensor, int | None, bool]:
    """(B, *S) integer labels as given (no copy: the kernels read uint8, int32 and int64 labels as they
    are and leave the ignore index out themselves), validated in shape; the ignore index; and whether the
    range check raises on the host (else the NaN form, see :func:`_check_range`)."""
    target = check_tensor("target", target)
    if torch.is_floating_point(target) or target.dtype == torch.bool or target.is_complex():
        raise TypeError(
            f"target must hold integer class labels, (B, *spatial) or (B, 1, *spatial), or be a floating soft "
            f"target of the logits' shape {tuple(logits.shape)}; got {target.dtype} of shape {tuple(target.shape)}"
        )
    spatial = tuple(logits.shape[2:])
    if target.dim() == logits.dim() and target.shape[1] == 1:
        target = target[:, 0]
    if tuple(target.shape) != (logits.shape[0], *spatial):
        raise ValueError(
            f"target must have shape (B, *spatial) or (B, 1, *spatial) = {(logits.shape[0], *spatial)}, "
            f"got {tuple(target.shape)}"
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits is on {logits.device}")
    ignore_index = py_scalar(ignore_index)
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}")
    if ignore_index is not None and not -2**63 <= ignore_index < 2**63:  # (the op's int64: a schema error)
        raise ValueError(f"ignore_index must be a 64-bit int, got {ignore_index}")
    check_bool("check_labels", check_labels)
    # An out-of-range label must never pass silently (the kernels leave such voxels out: they never read
    # past C, and report them). check_labels: a clear error on the host; without it no wait at all, the
    # loss becomes NaN on the device instead. meta: no values; torch.jit.trace: a host check would run once
    # on the example and not be recorded; under torch.compile an exception cannot depend on the data: the
    # NaN form there, whatever check_labels says. (vmap: see _check_range, which sees the report itself.)
    host_check = (check_labels and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
                  and target.device.type != "meta")
    return target, ignore_index, host_check


def _reference_labels(labels: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    """int64 labels with the ignore index mapped to -1: what :func:`_stats_reference` reads (its calls
    only: the kernels take the labels as they are)."""
    y = labels.long()
    return y if ignore_index is None else y.masked_fill(y == ignore_index, -1)


def _label_range_reference(labels: torch.Tensor, ignore_index: int | None, C: int) -> torch.Tensor:
    """softmax_stats' second output with PyTorch ops (for the calls the kernels do not take): (2,) int64,
    the most negative label and the largest label >= C (0: none), the ignore index left out."""
    y = labels.long()
    if ignore_index is not None:
        y = y.masked_fill(y == ignore_index, 0)
    lo, hi = torch.aminmax(y)
    return torch.stack((lo.clamp(max=0), torch.where(hi >= C, hi, 0)))


def _check_range(bad_labels: torch.Tensor, C: int, ignore_index: int | None,
                 host_check: bool) -> torch.Tensor | None:
    """The label range check from the sums kernel's report ``bad_labels`` (its second output): with
    ``host_check``, ValueError naming the label (on a GPU this waits for the sums kernel, already queued:
    no pass over the labels of its own), and None. Else ``bad_labels`` itself, for the loss to become NaN on
    the device when a label is bad (inside loss_finalize, or by :func:`_nan_if_bad` for the composition).
    Under torch.func.vmap the report is batched whenever any of the logits, labels or voxel weights is (a
    shared, unbatched label map included): it has no values to read on the host, so the NaN form, per element."""
    if not host_check or _vmapped(bad_labels):
        return bad_labels
    lo, hi = bad_labels.tolist()
    if lo < 0 or hi > 0:
        ignored_note = "" if ignore_index is None else f" (ignore_index = {ignore_index})"
        raise ValueError(f"target holds label {lo if lo < 0 else hi}, outside [0, {C - 1}] "
                         f"for C = {C} classes{ignored_note}")
    return None


def _nan_if_bad(stats: torch.Tensor, bad_labels: torch.Tensor | None) -> torch.Tensor:
    """The sums, NaN throughout when ``bad_labels`` (an unchecked label-range report) holds a bad label."""
    if bad_labels is None:
        return stats
    return stats + torch.where(bad_labels.any(), float("nan"), 0.0).to(stats.dtype)


def _voxel_weight(voxel_weight: object, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
    if voxel_weight is None:
        return None
    voxel_weight = check_tensor("voxel_weight", voxel_weight)
    if not torch.is_floating_point(voxel_weight):
        raise TypeError(f"voxel_weight must be a floating tensor, got {voxel_weight.dtype}")
    if voxel_weight.dim() == logits.dim() and voxel_weight.shape[1] == 1:
        voxel_weight = voxel_weight[:, 0]
    if voxel_weight.shape != labels.shape:
        raise ValueError(f"voxel_weight must have shape {tuple(labels.shape)}, got {tuple(voxel_weight.shape)}")
    if voxel_weight.device != logits.device:
        raise ValueError(f"voxel_weight is on {voxel_weight.device} but logits is on {logits.device}")
    return voxel_weight.detach()


def _class_weight(class_weight: object, logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    if class_weight is None:
        return None
    if isinstance(class_weight, (list, tuple)) and not any(isinstance(v, torch.Tensor) for v in class_weight):
        values = [py_scalar(v) for v in class_weight]  # (NumPy scalars as the Python numbers they hold)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            # Python numbers: checked as such, before any tensor exists. Under torch.compile / torch.export the
            # list is a constant and so is its tensor; the tensor route's .tolist() below would read a traced
            # tensor back (data-dependent: a graph break, and export refused it).
            if len(values) != logits.shape[1]:
                raise ValueError(f"class_weight must have C = {logits.shape[1]} entries, got {len(values)}")
            top = torch.finfo(dtype).max  # (a finite float64 past it would become inf in the loss's dtype)
            if not all(non_negative_finite(v) and v <= top for v in values):
                raise ValueError(f"class_weight must be non-negative and finite, got {list(class_weight)}")
            # (float64 first: Python floats are float64, as_tensor would round them to float32 before the cast
            # to a float64 loss)
            return torch.as_tensor(values, dtype=torch.float64).to(dtype).to(logits.device, non_blocking=True)
    try:
        if isinstance(class_weight, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in class_weight):
            # a sequence of 0-d tensors is stacked: as_tensor would copy their values into a new leaf and
            # drop the gradients of those that require grad
            dev = next(v.device for v in class_weight if isinstance(v, torch.Tensor))
            w = torch.stack([torch.as_tensor(v, device=dev).reshape(()) for v in class_weight])
        elif isinstance(class_weight, (list, tuple)):  # (not plain numbers: nested, bools; float64 as above)
            w = torch.as_tensor(class_weight, dtype=torch.float64).flatten()
        else:
            w = torch.as_tensor(class_weight).flatten()  # stays where it is given
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"class_weight must be a sequence of C floats or a tensor, got {class_weight!r}") from None
    if w.is_complex():  # (casting would drop the imaginary part)
        raise TypeError(f"class_weight must be real, got {class_weight!r}")
    w = w.to(dtype)
    if w.numel() != logits.shape[1]:
        raise ValueError(f"class_weight must have C = {logits.shape[1]} entries, got {w.numel()}")
    # Under torch.func.vmap a batched class_weight has no values to read on the host (.tolist() raised a raw
    # "doesn't have storage"): its values go unchecked there; an unbatched one is checked as in eager.
    if not _vmapped(w):
        values = w.tolist()  # checked in Python: no tensor ops (host time); a CUDA tensor waits here, as it did
        # (a tensor's values are data: under torch.compile this reads them back, a graph break)
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(f"class_weight must be non-negative and finite, got {values}")
    return w.to(logits.device, non_blocking=True)


def _smooth(smooth: object) -> tuple[float, float]:
    pair = (smooth, smooth) if not isinstance(smooth, Sequence) else tuple(smooth)
    pair = tuple(py_scalar(v) for v in pair)
    if len(pair) != 2 or not all(non_negative_finite(v) for v in pair):
        raise ValueError(f"smooth must be a non-negative float or a pair (numerator, denominator), got {smooth!r}")
    return float(pair[0]), float(pair[1])


def _check_flags(include_background: object, batch_dice: object, ddp_sync: object) -> None:
    for name, value in (("include_background", include_background), ("batch_dice", batch_dice),
                        ("ddp_sync", ddp_sync)):
        check_bool(name, value)


def _single_channel_background(include_background: bool, logits: torch.Tensor) -> bool:
    """As MONAI: one (sigmoid) channel has no background to leave out; include_background=False is
    ignored there, with a warning (leaving the only channel out would average nothing: a NaN loss)."""
    if not include_background and logits.shape[1] == 1:
        warnings.warn("single channel prediction, include_background=False ignored (as MONAI's Dice losses)",
                      stacklevel=3)
        return True
    return include_background


def _soft_target(target: object, logits: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    """(B, C, *S) per-channel targets in [0, 1], in the logits' dtype or else the compute type (float32, float64
    for float64 logits; csrc/loss/loss_launch.h target_dtype): the float32 target of float16/bfloat16 logits
    (autocast's usual pair) is read as it is, not rounded to the logits' 8 or 11 bits."""
    target = check_tensor("target", target)
    if tuple(target.shape) != tuple(logits.shape):
        raise ValueError(
            f"soft / multi-label target must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits is on {logits.device}")
    if ignore_index is not None:
        raise ValueError("ignore_index needs a label map (B, *spatial) or (B, 1, *spatial); with soft, one-hot or "
                         "multi-label targets use voxel_weight")
    if target.dtype == logits.dtype:
        return target
    # differentiated when it requires grad (see _soft_backward): the gradient comes back in the target's dtype
    return target.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)


def _max_cuda_classes(shared_bytes: int, itemsize: int) -> int:
    """Most classes the CUDA sum kernel takes: each of a block's (at least) 32 threads keeps 5 C + 2
    values in shared memory (csrc/loss/loss_kernels.cuh plan_threads, loss_cuda.cu plan())."""
    return (shared_bytes // (32 * itemsize) - 2) // 5


def _cuda_kernel_fits(logits: torch.Tensor) -> bool:
    """False (with a warning) when a CUDA call is past the fused kernels' limits: more classes than the
    GPU's shared memory holds, or a batch past the CUDA grid. Such calls take :func:`_stats_reference`."""
    if logits.device.type != "cuda":
        return True
    props = torch.cuda.get_device_properties(logits.device)
    shared = max(48 * 1024, int(getattr(props, "shared_memory_per_block_optin", 0)))
    itemsize = 8 if logits.dtype == torch.float64 else 4
    most = _max_cuda_classes(shared, itemsize)
    if logits.shape[0] <= 65535 and logits.shape[1] <= most:
        return True
    warnings.warn(
        f"medfast losses: logits of shape {tuple(logits.shape)} are past the fused CUDA kernels' limits (at "
        f"most {most} classes with {shared // 1024} KiB of shared memory per block, batch <= 65535); computing "
        "the sums with PyTorch ops instead (same values, but softmax-sized temporaries)",
        stacklevel=4,
    )
    return False


def _stats_reference(logits: torch.Tensor, target: torch.Tensor, voxel_weight: torch.Tensor | None,
                     kind: str) -> torch.Tensor:
    """The (B, C, 4) sums I, P, G, E of the fused kernels (loss.h) with PyTorch ops (autograd gives the
    backward): ``kind`` "labels" (target (B, *S) int64, -1 = ignored), "softmax" or "sigmoid" (target
    (B, C, *S) soft). Same definitions, far more memory: for calls the kernels do not take."""
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(dt).flatten(2)  # (B, C, N)
    B, C, N = z.shape
    w = None if voxel_weight is None else voxel_weight.to(dt).reshape(B, 1, N)
    if kind == "labels":
        y = target.reshape(B, 1, N)
        keep = ((y >= 0) & (y < C)).to(dt)
        wk = keep if w is None else w * keep
        logp = torch.log_softmax(z, 1)
        p = logp.exp()
        woh = torch.zeros_like(z).scatter_(1, y.clamp(0, C - 1), 1.0) * wk  # weighted one-hot, kept voxels
        stats = [(p * woh).sum(2), (p * wk).sum(2), woh.sum(2), -(logp * woh).sum(2)]
    else:
        t = target.to(dt).flatten(2)
        if kind == "sigmoid":
            p = torch.sigmoid(z)
            nll = torch.nn.functional.binary_cross_entropy_with_logits(z, t, reduction="none")
        else:
            logp = torch.log_softmax(z, 1)
            p = logp.exp()
            nll = -t * logp
        wt = t if w is None else w * t
        stats = [(p * wt).sum(2), (p if w is None else p * w).sum(2), wt.sum(2), (nll if w is None else nll * w).sum(2)]
    return torch.stack(stats, -1)


def _stats(logits, target, voxel_weight, ignore_index, class_weight, activation="softmax", check_labels=True,
           ce=True):
    """The (B, C, 4) sums I, P, G, E, the class weights, the divisor of the cross-entropy's mean as
    ``(voxels, scale, truth)``: ``scale`` (times the 0-dim tensor ``voxels`` if not None), or with
    ``truth`` the weighted label count ``sum cw G``; and the unchecked label-range report: with integer
    labels and no host check (``check_labels=False``, or under torch.compile...) the sums op's (2,) report,
    which makes the loss NaN when a label is out of range (loss_finalize reads it; the Python composition
    takes :func:`_nan_if_bad`), else None. ``ce=False``: E is not needed (no cross-entropy term), the kernels
    leave it 0."""
    check_choice("activation", activation, ("softmax", "sigmoid"))
    logits = _check_logits(logits, activation)
    check_backend("logits", logits)
    target = check_tensor("target", target)
    refuse_function_transforms("medfast segmentation loss", logits, target, voxel_weight, class_weight)
    # soft targets: floating ones of the logits' shape, and integer one-hot ones of C > 1 channels (F.one_hot's,
    # which MONAI takes; integer labels are (B, *S) or (B, 1, *S))
    soft = activation == "sigmoid" or (target.shape == logits.shape and (
        torch.is_floating_point(target) or (logits.shape[1] > 1 and target.dtype != torch.bool
                                            and not target.is_complex())))
    fused = _cuda_kernel_fits(logits)
    bad = None
    if soft:
        if (not torch.is_floating_point(target) and activation == "softmax" and not torch.compiler.is_compiling()
                and not torch.jit.is_tracing() and target.device.type != "meta"
                and not _functorch.is_batchedtensor(target)):
            lo, hi = torch.aminmax(target)  # an integer (B, C, *S) target must be one-hot, not per-channel labels
            if lo < 0 or hi > 1:
                raise ValueError(f"target: an integer target of the logits' shape {tuple(logits.shape)} is read as "
                                 f"one-hot and must hold 0 / 1, got values in [{int(lo)}, {int(hi)}]; labels go in "
                                 f"as (B, *spatial) or (B, 1, *spatial)")
        t = _soft_target(target, logits, ignore_index)
        weight = _voxel_weight(voxel_weight, t[:, 0], logits)
        if fused:
            stats = _call(_SoftStats, _ops.soft_stats, logits, t, weight, activation == "sigmoid", ce)
        else:
            stats = _stats_reference(logits, t, weight, activation)
    else:
        labels, ignore_index, host_check = _labels(target, logits, ignore_index, check_labels)
        weight = _voxel_weight(voxel_weight, labels, logits)
        if fused:  # never reads past C: safe before the range check, which reads its report
            stats, bad_labels = _call(_SoftmaxStats, _ops.softmax_stats, logits, labels, weight, ignore_index, ce)
        else:
            stats = _stats_reference(logits, _reference_labels(labels, ignore_index), weight, "labels")
            bad_labels = _label_range_reference(labels, ignore_index, logits.shape[1])
        bad = _check_range(bad_labels, logits.shape[1], ignore_index, host_check)
    cw = _class_weight(class_weight, logits, stats.dtype)
    if soft:  # mean over voxels (softmax) or over voxels x channels (sigmoid), as PyTorch's losses
        channels = logits.shape[1] if activation == "sigmoid" else 1
        if weight is not None:
            return stats, cw, (weight.sum().to(stats.dtype), channels, False), bad
        if torch.compiler.is_compiling():  # the voxel count as a tensor: float() would fix a symbolic size
            return stats, cw, (stats.new_full((), logits[:, 0].numel()), channels, False), bad
        return stats, cw, (None, logits[:, 0].numel() * channels, False), bad
    # weighted mean over the labelled voxels, as F.cross_entropy with weight / ignore_index
    return stats, cw, (None, 1, True), bad


def _parts(stats, cw, divisor):
    """The Python composition's inputs from _stats: the sums I, P, G, E ((B, C) each) and the divisor of
    the cross-entropy's mean (a number or a 0-dim tensor)."""
    # (I, P, G, E) by one unbind: one autograd node whose backward stacks the four gradients
    # (per-statistic selects would each allocate and fill a (B, C, 4) zero gradient)
    parts = stats.unbind(-1)
    voxels, scale, truth = divisor
    if truth:
        return parts, (parts[2] if cw is None else parts[2] * cw).sum()
    return parts, (scale if voxels is None else voxels * scale)


# The finishing arithmetic (Dice ratios, class weights, reductions, lambdas) is one fused op,
# loss_finalize (csrc/loss/finalize.h), where it applies; False forces the Python composition
# (_dice_terms, _ce_term, _reduce) everywhere: the tests' reference.
_FUSED_FINALIZE = True


@torch.library.register_fake("medfast::loss_finalize")
def _loss_finalize_fake(stats, class_weight, divisor, scalars, flags, bad_labels=None):
    check_op_devices("medfast::loss_finalize", stats=stats, class_weight=class_weight, divisor=divisor,
                     bad_labels=bad_labels)
    return stats.new_empty(())


@torch.library.register_fake("medfast::loss_finalize_backward")
def _loss_finalize_backward_fake(grad, stats, class_weight, divisor, scalars, flags, bad_labels=None):
    check_op_devices("medfast::loss_finalize_backward", grad=grad, stats=stats, class_weight=class_weight,
                     divisor=divisor, bad_labels=bad_labels)
    return torch.empty_like(stats, memory_format=torch.contiguous_format)


def _finalize_setup(ctx, inputs, output):
    stats, class_weight, divisor, ctx.scalars, ctx.flags, bad_labels = inputs
    ctx.save_for_backward(stats, class_weight, divisor, bad_labels)


def _finalize_backward(ctx, grad):
    # Only w.r.t. stats: the class weights and the divisor are not differentiated (a class_weight that
    # requires grad takes the Python composition, see _finalize_applies; the divisor is detached).
    stats, class_weight, divisor, bad_labels = ctx.saved_tensors
    if create_graph():  # second derivatives: through the Python composition of the same arithmetic
        (gs,) = reference_vjp(
            lambda s: _finalize_reference(s, class_weight, divisor, ctx.scalars, ctx.flags, bad_labels),
            (stats,), (True,), grad)
        return gs, None, None, None, None, None
    grad_stats = _ops.loss_finalize_backward(grad, stats, class_weight, divisor, ctx.scalars, ctx.flags, bad_labels)
    return grad_stats, None, None, None, None, None


torch.library.register_autograd("medfast::loss_finalize", _finalize_backward, setup_context=_finalize_setup)


_LossFinalize = _lean_function("_LossFinalize", "loss_finalize", _finalize_setup, _finalize_backward)


def _finalize_applies(cw: torch.Tensor | None, batch_dice: bool = False, ddp_sync: bool = False) -> bool:
    """Whether the fused finishing op computes the loss: not when the class weights require grad (the
    op does not differentiate them), nor for a batch Dice all-reduced between the sums and the ratio.
    A vmapped class_weight takes the composition too: its batched tensor says requires_grad=False even when the
    tensor vmapped over requires grad, whose gradient the op would then silently drop."""
    if not _FUSED_FINALIZE or (cw is not None and (cw.requires_grad or _vmapped(cw))):
        return False
    return not (batch_dice and ddp_sync and torch.distributed.is_available() and torch.distributed.is_initialized())


# The bits of loss_finalize's flags (csrc/loss/finalize.h FinalizeFlag).
_DICE, _CE, _BACKGROUND, _BATCH_DICE, _MEAN, _TRUTH_DIVISOR = 1, 2, 4, 8, 16, 32


def _finalize(stats, cw, divisor, bad, *, dice, ce, include_background=True, batch_dice=False, smooth=(0.0, 0.0),
              reduction="mean", lambda_dice=1.0, lambda_ce=1.0):
    """The scalar loss from the sums by the fused op: lambda_dice x the reduced Dice terms (if ``dice``)
    plus lambda_ce x the cross-entropy term (if ``ce``); the same values as _dice_terms / _ce_term /
    _reduce; NaN when ``bad`` (an unchecked label-range report, see _stats) holds a bad label. (Scalars and
    flags are packed: the autograd wrapper's host time grows with the number of arguments.)"""
    voxels, scale, truth = divisor
    flags = ((_DICE if dice else 0) | (_CE if ce else 0) | (_BACKGROUND if include_background else 0)
             | (_BATCH_DICE if batch_dice else 0) | (_MEAN if reduction == "mean" else 0)
             | (_TRUTH_DIVISOR if truth else 0))
    scalars = [float(scale), smooth[0], smooth[1], float(lambda_dice), float(lambda_ce)]
    return _call(_LossFinalize, _ops.loss_finalize, stats, cw, voxels, scalars, flags, bad)


def _finalize_reference(stats, cw, voxels, scalars, flags, bad=None):
    """loss_finalize's value as the Python composition (_dice_terms, _ce_term, _reduce), from the op's
    packed arguments: the differentiable form its backward uses under create_graph=True."""
    stats = _nan_if_bad(stats, bad)
    scale, nr, dr, lambda_dice, lambda_ce = scalars
    reduction = "mean" if flags & _MEAN else "sum"
    parts = stats.unbind(-1)
    loss = stats.new_zeros(())
    if flags & _DICE:
        f = _dice_terms(parts, cw, bool(flags & _BACKGROUND), bool(flags & _BATCH_DICE), (nr, dr))
        loss = loss + lambda_dice * _reduce(f, reduction)
    if flags & _CE:
        if flags & _TRUTH_DIVISOR:
            divisor = (parts[2] if cw is None else parts[2] * cw).sum()
        else:
            divisor = scale if voxels is None else voxels * scale
        loss = loss + lambda_ce * _ce_term(parts, cw, divisor, reduction)
    return loss


def _dice_terms(parts, class_weight, include_background, batch_dice, smooth, ddp_sync=False):
    nr, dr = _smooth(smooth)
    inter, pred, truth = parts[:3]
    if batch_dice:
        sums = torch.stack(parts[:3], -1).sum(0)  # (C, 3)
        if ddp_sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            from torch.distributed.nn.functional import all_reduce

            # Differentiable all-reduce: every rank sees the sums of the whole global batch.
            sums = all_reduce(sums)
        inter, pred, truth = sums.unbind(-1)
    f = 1.0 - (2.0 * inter + nr) / (pred + truth + dr)
    if class_weight is not None:
        f = f * class_weight
    return f if include_background else f[..., 1:]


def _ce_term(parts, class_weight, divisor, reduction):
    nll = parts[3] if class_weight is None else parts[3] * class_weight
    total = nll.sum()
    return total / divisor if reduction == "mean" else total


def _reduce(f: torch.Tensor, reduction: str) -> torch.Tensor:
    return f.mean() if reduction == "mean" else (f.sum() if reduction == "sum" else f)


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    include_background: bool = True,
    batch_dice: bool = False,
    smooth: float | tuple[float, float] = 1e-5,
    class_weight: Sequence[float] | torch.Tensor | None = None,
    voxel_weight: torch.Tensor | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
    ddp_sync: bool = False,
    activation: str = "softmax",
    check_labels: bool = True,
) -> torch.Tensor:
    """Soft Dice loss of softmax (or sigmoid) probabilities, fused (no one-hot, no softmax tensor).

    ``f[b, c] = 1 - (2 I + smooth_nr) / (P + G + smooth_dr)`` with ``I = sum p_c [y = c]``,
    ``P = sum p_c``, ``G = sum [y = c]`` over the voxels (weighted by ``voxel_weight``, without
    the ``ignore_index`` voxels), summed over the batch first when ``batch_dice``. Equal to MONAI
    ``DiceLoss(to_onehot_y=True, softmax=True, ...)`` with ``smooth_nr = smooth_dr = smooth``.

    Parameters
    ----------
    logits : Tensor
        ``(B, C, H, W)`` or ``(B, C, D, H, W)``, C >= 2; float32/float64, or float16/bfloat16
        (computed in float32; float64 logits in float64).
    target : Tensor
        Integer labels ``(B, *spatial)`` or ``(B, 1, *spatial)`` in ``[0, C)`` (or ``ignore_index``);
        or, with the logits' shape ``(B, C, *spatial)``, floating per-class targets in [0, 1] (soft
        targets for softmax; binary or soft multi-label targets for sigmoid), read in their own dtype
        when it is the logits' and else in the compute type (a float32 target of float16/bfloat16
        logits is not rounded to their precision). A soft target that requires grad is
        differentiated too (that backward runs as PyTorch ops: softmax-sized temporaries).
    include_background : bool
        Keep class 0 in the Dice average. Ignored, with a warning, for a single (sigmoid) channel,
        as in MONAI.
    batch_dice : bool
        Sum the batch before the ratio (one Dice per class).
    smooth : float or (float, float)
        Added to the numerator and the denominator (or ``(numerator, denominator)``).
    class_weight : sequence of C floats or (C,) Tensor, optional
        Multiplies each class's Dice loss (as MONAI's ``weight``) before the reduction. A tensor that
        requires grad is differentiated too (the finishing arithmetic then runs as PyTorch ops rather
        than the fused op: a little more host time).
    voxel_weight : Tensor, optional
        ``(B, *spatial)`` weights of each voxel in the sums (not differentiated).
    ignore_index : int, optional
        Label value whose voxels are left out of every sum.
    reduction : {"mean", "sum", "none"}
        Over the ``(B, C')`` (or ``(C',)`` with ``batch_dice``) Dice losses.
    ddp_sync : bool
        With ``batch_dice`` and ``torch.distributed`` initialized: all-reduce the per-class sums so
        that every rank computes the loss of the whole global batch (the all-reduce is
        differentiable; after DDP averages the gradients over the ranks they equal the gradients
        of one process on the whole batch).
    activation : {"softmax", "sigmoid"}
        ``"sigmoid"``: independent channels (multi-label), as MONAI's ``sigmoid=True``.
    check_labels : bool
        Integer labels: check on the host that every label is in ``[0, C)`` (or ``ignore_index``)
        and raise ``ValueError`` naming the bad label (the sums kernel reports out-of-range labels as it
        reads them: no pass of its own; on a GPU one wait per call, for the sums kernel).
        ``False`` skips the wait, for training loops on a GPU whose labels are known good: an
        out-of-range label then makes the loss NaN (never a wrong finite value, never a device-side
        assert), which the trainer's NaN check reports with the batch's files. Under
        ``torch.compile`` the check cannot raise (an exception may not depend on the data), nor under
        ``torch.func.vmap`` when any of logits, labels, voxel_weight is vmapped: a bad label makes the
        loss NaN there (under vmap, that element's) whatever ``check_labels`` says. A vmapped
        ``class_weight``'s values are not checked.

    Returns
    -------
    Tensor
        Scalar, or the per-(batch, class) losses with ``reduction="none"``. Differentiable w.r.t.
        ``logits`` (and a soft target that requires grad), twice too: under ``create_graph=True``
        the backward runs through the PyTorch reference of the same sums, so Hessian-vector
        products and gradient penalties are exact.
        Deterministic: on CPU bitwise reproducible run to run for a given thread count; the CUDA kernels
        add their per-block sums in a fixed order (no float atomics).
    """
    check_choice("reduction", reduction, ("mean", "sum", "none"))
    _check_flags(include_background, batch_dice, ddp_sync)
    smooth = _smooth(smooth)
    stats, cw, divisor, bad = _stats(logits, target, voxel_weight, ignore_index, class_weight, activation,
                                     check_labels, ce=False)
    include_background = _single_channel_background(include_background, logits)
    if reduction != "none" and _finalize_applies(cw, batch_dice, ddp_sync):
        return _finalize(stats, cw, divisor, bad, dice=True, ce=False, include_background=include_background,
                         batch_dice=batch_dice, smooth=smooth, reduction=reduction)
    parts, _ = _parts(_nan_if_bad(stats, bad), cw, divisor)
    return _reduce(_dice_terms(parts, cw, include_background, batch_dice, smooth, ddp_sync), reduction)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    class_weight: Sequence[float] | torch.Tensor | None = None,
    voxel_weight: torch.Tensor | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
    activation: str = "softmax",
    check_labels: bool = True,
) -> torch.Tensor:
    """Cross-entropy of softmax(logits) (or binary cross-entropy with sigmoids), from the fused sums.

    ``reduction="mean"`` is ``sum w_x cw_y (-log p_y) / sum w_x cw_y`` over the voxels that are not
    ``ignore_index``: ``torch.nn.functional.cross_entropy`` with ``weight=class_weight`` and
    ``ignore_index``, extended by per-voxel weights. With soft targets it is ``F.cross_entropy``
    with probability targets (mean over voxels); with ``activation="sigmoid"``
    ``F.binary_cross_entropy_with_logits`` (mean over voxels and channels; ``class_weight``
    multiplies each channel's term).

    Parameters
    ----------
    logits, target : Tensor
        As in :func:`dice_loss` (integer labels, or soft / multi-label float targets of the logits' shape).
    class_weight : sequence of C floats or (C,) Tensor, optional
        Weight of each class's (with sigmoids: each channel's) term, as ``F.cross_entropy``'s ``weight``.
    voxel_weight : Tensor, optional
        ``(B, *spatial)`` weight of each voxel's term (not differentiated; see the mean above).
    ignore_index : int, optional
        Label value whose voxels are left out (of the sum and of the mean's divisor).
    reduction : {"mean", "sum"}
        Weighted mean or sum over the voxels (no ``"none"``: the op computes sums).
    activation : {"softmax", "sigmoid"}
        ``"sigmoid"``: binary cross-entropy of independent channels.
    check_labels : bool
        As in :func:`dice_loss`: check the integer labels on the host (``False``: a bad label gives a NaN loss).

    Returns
    -------
    Tensor
        0-d loss in the logits' dtype (float32 for float16/bfloat16 logits). Differentiable w.r.t.
        ``logits``, and a soft target or ``class_weight`` tensor that requires grad (not ``voxel_weight``).
        Deterministic: on CPU bitwise reproducible run to run for a given thread count; the CUDA kernels
        add their per-block sums in a fixed order (no float atomics).
    """
    check_choice("reduction", reduction, ("mean", "sum"))
    stats, cw, divisor, bad = _stats(logits, target, voxel_weight, ignore_index, class_weight, activation,
                                     check_labels)
    if _finalize_applies(cw):
        return _finalize(stats, cw, divisor, bad, dice=False, ce=True, reduction=reduction)
    parts, divisor = _parts(_nan_if_bad(stats, bad), cw, divisor)
    return _ce_term(parts, cw, divisor, reduction)


def dice_ce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    include_background: bool = True,
    batch_dice: bool = False,
    smooth: float | tuple[float, float] = 1e-5,
    class_weight: Sequence[float] | torch.Tensor | None = None,
    voxel_weight: torch.Tensor | None = None,
    ignore_index: int | None = None,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
    reduction: str = "mean",
    ddp_sync: bool = False,
    activation: str = "softmax",
    check_labels: bool = True,
) -> torch.Tensor:
    """``lambda_dice * dice_loss + lambda_ce * cross_entropy`` from one fused pass over the logits.

    Equal to MONAI ``DiceCELoss(to_onehot_y=True, softmax=True, include_background=...,
    batch=batch_dice, smooth_nr=smooth, smooth_dr=smooth, weight=class_weight, lambda_dice=...,
    lambda_ce=...)``. The cross-entropy always uses every class (as MONAI's); ``include_background``
    only affects the Dice term. With ``activation="sigmoid"`` the second term is
    the binary cross-entropy of every channel: equal to MONAI ``DiceCELoss(sigmoid=True)`` for one
    channel; for several channels MONAI applies a softmax cross-entropy to the float target
    instead, which is not multi-label, so medfast deliberately differs there. With a
    ``class_weight`` and sigmoids medfast multiplies each channel's Dice and binary cross-entropy
    terms by its weight; MONAI instead passes ``weight`` to ``BCEWithLogitsLoss`` as ``pos_weight``
    (a weight of the positive voxels only) and ignores it in the Dice term of a single channel, so
    the two differ there.

    Cost: two fused ops forward (the sums over the logits, then the loss from the sums) and two
    backward, besides the label check (the finishing arithmetic runs as ~35 small PyTorch ops only
    with a ``class_weight`` that requires grad, or ``batch_dice`` with ``ddp_sync`` under an
    initialized process group).

    Parameters
    ----------
    logits, target : Tensor
        As in :func:`dice_loss`.
    include_background : bool
        Keep class 0 in the Dice term (the cross-entropy always uses every class).
    batch_dice : bool
        Sum the batch before the Dice ratio.
    smooth : float or (float, float)
        The Dice term's ``(numerator, denominator)`` smoothing, as in :func:`dice_loss`.
    class_weight : sequence of C floats or (C,) Tensor, optional
        Weight of each class in both terms.
    voxel_weight : Tensor, optional
        ``(B, *spatial)`` weight of each voxel in the sums of both terms (not differentiated).
    ignore_index : int, optional
        Label value whose voxels are left out of both terms.
    lambda_dice, lambda_ce : float
        Non-negative weights of the Dice and the cross-entropy terms (``lambda_ce=0`` skips the logarithms).
    reduction : {"mean", "sum"}
        Applied to each term (no ``"none"``).
    ddp_sync : bool
        With ``batch_dice``: all-reduce the Dice sums over the ranks (the cross-entropy stays per rank, as DDP's
        gradient averaging expects).
    activation : {"softmax", "sigmoid"}
        ``"sigmoid"``: independent channels; the second term is then the binary cross-entropy.
    check_labels : bool
        As in :func:`dice_loss`.

    Returns
    -------
    Tensor
        0-d loss in the logits' dtype (float32 for float16/bfloat16 logits), differentiable as
        :func:`dice_loss` and :func:`cross_entropy`.
        Deterministic: on CPU bitwise reproducible run to run for a given thread count; the CUDA kernels
        add their per-block sums in a fixed order (no float atomics).
    """
    check_choice("reduction", reduction, ("mean", "sum"))
    _check_flags(include_background, batch_dice, ddp_sync)
    lambda_dice, lambda_ce = py_scalar(lambda_dice), py_scalar(lambda_ce)
    for name, value in (("lambda_dice", lambda_dice), ("lambda_ce", lambda_ce)):
        if not non_negative_finite(value):
            raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    smooth = _smooth(smooth)
    # lambda_ce = 0: the kernels skip the cross-entropy's logarithms (E stays 0; 0 x E adds nothing either way)
    stats, cw, divisor, bad = _stats(logits, target, voxel_weight, ignore_index, class_weight, activation,
                                     check_labels, ce=lambda_ce != 0)
    include_background = _single_channel_background(include_background, logits)
    if _finalize_applies(cw, batch_dice, ddp_sync):
        return _finalize(stats, cw, divisor, bad, dice=True, ce=True, include_background=include_background,
                         batch_dice=batch_dice, smooth=smooth, reduction=reduction, lambda_dice=lambda_dice,
                         lambda_ce=lambda_ce)
    parts, divisor = _parts(_nan_if_bad(stats, bad), cw, divisor)
    dice = _reduce(_dice_terms(parts, cw, include_background, batch_dice, smooth, ddp_sync), reduction)
    return lambda_dice * dice + lambda_ce * _ce_term(parts, cw, divisor, reduction)
