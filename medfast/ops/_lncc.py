"""Local normalized cross-correlation (LNCC) with a box window: a fused C++/CUDA op.

Kernels: ``csrc/lncc/``. The five local sums a window needs (of t, p, t^2, p^2, t p) are box
filters computed separably by running sums (O(1) work per voxel and axis on the CPU, whatever the
window size), and the backward pass is the analytic adjoint: box sums of five per-voxel terms.
Autograd keeps the two inputs and the five complete local sums (5 values per voxel), so the
backward does not recompute them.

The value equals MONAI's ``LocalNormalizedCrossCorrelationLoss(kernel_type="rectangular")``
(zero padding at the image border, window volume ``prod(kernel_size)`` everywhere).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from medfast._extension import _C  # noqa: F401  (registers torch.ops.medfast)
from medfast._typing import Int, ShapeLike
from medfast.ops._autograd import once_differentiable, refuse_function_transforms
from medfast.ops._validate import check_choice, check_op_devices, check_tensor, non_negative_finite, py_scalar

_ops = torch.ops.medfast
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
REDUCTIONS = ("mean", "sum", "none")


@torch.library.register_fake("medfast::lncc")
def _lncc_fake(pred, target, kernel_size, smooth_nr, smooth_dr):
    check_op_devices("medfast::lncc", pred=pred, target=target)
    return (torch.empty_like(pred, memory_format=torch.contiguous_format),
            pred.new_empty((5, *pred.shape)))


@torch.library.register_fake("medfast::lncc_backward")
def _lncc_backward_fake(grad, pred, target, sums, kernel_size, smooth_nr, smooth_dr):
    check_op_devices("medfast::lncc_backward", grad=grad, pred=pred, target=target, sums=sums)
    return (torch.empty_like(pred, memory_format=torch.contiguous_format),
            torch.empty_like(target, memory_format=torch.contiguous_format))


def _lncc_setup(ctx, inputs, output):
    pred, target, kernel_size, smooth_nr, smooth_dr = inputs
    ctx.save_for_backward(pred, target, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.args = (list(kernel_size), float(smooth_nr), float(smooth_dr))


def _lncc_backward(ctx, grad, grad_sums):
    pred, target, sums = ctx.saved_tensors
    grad_pred, grad_target = _ops.lncc_backward(grad.contiguous(), pred, target, sums, *ctx.args)
    grads = once_differentiable("medfast.lncc_loss", (grad_pred if ctx.needs_input_grad[0] else None,
                                                      grad_target if ctx.needs_input_grad[1] else None),
                                (pred, target, grad))
    return (*grads, None, None, None)


torch.library.register_autograd("medfast::lncc", _lncc_backward, setup_context=_lncc_setup)


def _kernel_size(kernel_size: object, ndim: int) -> list[int]:
    kernel_size = py_scalar(kernel_size)
    if isinstance(kernel_size, (np.ndarray, torch.Tensor)) and kernel_size.ndim == 1:
        kernel_size = kernel_size.tolist()  # (float arrays stay floats: refused below)
    if isinstance(kernel_size, bool):
        raise TypeError(f"kernel_size must be an int or a sequence of {ndim} ints, got {kernel_size!r}")
    if isinstance(kernel_size, int):
        sizes = [kernel_size] * ndim
    else:
        # ints only: a string "33" or (3.7, 3.2) is not silently a (3, 3) window
        if isinstance(kernel_size, (str, bytes)) or not isinstance(kernel_size, Sequence) or not all(
                isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in kernel_size):
            raise TypeError(f"kernel_size must be an int or a sequence of {ndim} ints, got {kernel_size!r}")
        sizes = [int(k) for k in kernel_size]
    if len(sizes) != ndim:
        raise ValueError(f"kernel_size must have {ndim} entries for {ndim} spatial dims, got {tuple(sizes)}")
    if any(k <= 0 or k % 2 == 0 for k in sizes):
        raise ValueError(f"kernel_size must be positive odd sizes, got {tuple(sizes)}")
    return sizes


def local_ncc(
    pred: torch.Tensor,
    target: torch.Tensor,
    kernel_size: Int | ShapeLike = 9,
    smooth_nr: float = 0.0,
    smooth_dr: float = 1e-5,
) -> torch.Tensor:
    """Per-voxel squared local normalized cross-correlation of two images (box window).

    Parameters
    ----------
    pred, target : Tensor
        ``(B, C, H, W)`` or ``(B, C, D, H, W)`` images of the same shape, dtype and device
        (float32/float64; float16/bfloat16 are computed in float32).
    kernel_size : int or sequence of int
        Window size in voxels per spatial dim (odd). The window is zero-padded at the border and
        its volume ``prod(kernel_size)`` is used everywhere (MONAI's convention).
    smooth_nr, smooth_dr : float
        Added to the squared cross term; lower bound of each local variance.

    Returns
    -------
    Tensor
        ``(B, C, *spatial)`` map of ``cross^2 / (var_t var_p)`` in ``[0, 1]`` (for smooth_nr = 0), in
        float32 (float64 for float64 inputs). Differentiable with respect to both images. Where float32
        rounding in a near-constant window makes ``cross^2`` exceed ``var_t var_p`` (impossible in exact
        arithmetic; MONAI's float32 LNCC then returns values up to thousands), ``cross^2`` is clamped to
        that bound (ncc 1, no gradient through the cross term).

    Notes
    -----
    The local sums are kept in the inputs' precision between the box passes. In float32 an
    intensity offset far larger than the local variation (raw CT in HU, or values in [1000, 1001])
    cancels the local variances away: normalize the intensities first (e.g. to [0, 1], as MONAI's
    and DeepReg's registration pipelines do) or pass float64. (Centring the images would not help:
    the zero-padded border windows make the NCC depend on the offset.) MONAI's float32 LNCC loses
    more there.

    The box sums are running sums (a value is added when the window reaches it and subtracted when it
    leaves): one NaN or inf voxel makes the map NaN beyond the windows that hold it, along the rest of
    its lines (a convolution, as MONAI's, keeps it to those windows), and one voxel many orders of
    magnitude above the others costs precision in the windows after it. Mask or replace such voxels
    first.

    Deterministic: on CPU the map is bitwise the same run to run and at any thread count; the CUDA
    kernels use no atomics.
    """
    pred = check_tensor("pred", pred)
    target = check_tensor("target", target)
    refuse_function_transforms("medfast.local_ncc", pred, target)
    for name, x in (("pred", pred), ("target", target)):
        if x.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if pred.dim() not in (4, 5):
        raise ValueError(f"pred must have shape (B, C, H, W) or (B, C, D, H, W), got {tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(f"target must have pred's shape {tuple(pred.shape)}, got {tuple(target.shape)}")
    if target.device != pred.device:
        raise ValueError(f"target is on {target.device} but pred is on {pred.device}")
    if pred.numel() == 0:
        raise ValueError(f"pred is empty: shape {tuple(pred.shape)}")
    sizes = _kernel_size(kernel_size, pred.dim() - 2)
    smooth_nr, smooth_dr = py_scalar(smooth_nr), py_scalar(smooth_dr)
    for name, v in (("smooth_nr", smooth_nr), ("smooth_dr", smooth_dr)):
        if not non_negative_finite(v):  # (no math.isfinite: a symbolic float under torch.compile(dynamic=True))
            raise ValueError(f"{name} must be a non-negative finite number, got {v!r}")
    if smooth_dr == 0:
        raise ValueError("smooth_dr must be > 0 (it bounds the local variances away from zero)")
    dtype = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
    pred, target = pred.to(dtype), target.to(dtype)
    return _ops.lncc(pred, target, sizes, float(smooth_nr), float(smooth_dr))[0]


def lncc_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    kernel_size: Int | ShapeLike = 9,
    smooth_nr: float = 0.0,
    smooth_dr: float = 1e-5,
    reduction: str = "mean",
) -> torch.Tensor:
    """Local normalized cross-correlation loss: minus the reduced :func:`local_ncc` map.

    Equal to ``monai.losses.LocalNormalizedCrossCorrelationLoss(spatial_dims, kernel_size,
    kernel_type="rectangular", reduction, smooth_nr, smooth_dr)(pred, target)``; values lie in
    ``[-1, 0]``, -1 for perfectly (locally linearly) related images.

    Parameters
    ----------
    pred, target, kernel_size, smooth_nr, smooth_dr
        See :func:`local_ncc`.
    reduction : {"mean", "sum", "none"}
        Mean or sum over batch, channels and voxels, or the ``(B, C, *spatial)`` map.

    Returns
    -------
    Tensor
        0-d loss (``(B, C, *spatial)`` with ``reduction="none"``) in float32 (float64 for float64 inputs;
        float16/bfloat16 inputs give float32). Differentiable w.r.t. both images. Deterministic as
        :func:`local_ncc`, but for the mean or sum, whose order follows PyTorch's CPU threads.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    ncc = local_ncc(pred, target, kernel_size, smooth_nr, smooth_dr)
    if reduction == "mean":
        return ncc.mean().neg()
    if reduction == "sum":
        return ncc.sum().neg()
    return ncc.neg()
