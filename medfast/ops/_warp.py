"""Resampling and warping operators: warp, affine_warp, spline_coefficients.

Kernels: ``csrc/warp/``. This module validates arguments, registers autograd and fake (meta)
kernels for ``torch.ops.medfast.warp_forward`` / ``spline_prefilter``, and documents the API.
"""

from __future__ import annotations

import torch

from medfast._extension import _C  # noqa: F401  (registers torch.ops.medfast)
from medfast._typing import ShapeLike
from medfast.ops._autograd import once_differentiable, refuse_function_transforms
from medfast.ops._validate import (
    MODES,
    PADDINGS,
    autocast_image,
    autocast_position,
    check_batch,
    check_bool,
    check_choice,
    check_device,
    check_field,
    check_image,
    check_op_devices,
    check_shape,
    check_tensor,
    plain,
    position_dtype,
)

_ops = torch.ops.medfast


# ---------------------------------------------------------------------------------------------
# Fake kernels and autograd of the compiled ops
# ---------------------------------------------------------------------------------------------


def _out_batch(image, theta, ddf):
    batch = image.shape[0]
    for t in (theta, ddf):
        if t is not None and t.shape[0] != 1:
            batch = t.shape[0]
    return batch


@torch.library.register_fake("medfast::warp_forward")
def _warp_forward_fake(image, theta, ddf, shape, mode, padding):
    check_op_devices("medfast::warp_forward", image=image, theta=theta, ddf=ddf)
    return image.new_empty((_out_batch(image, theta, ddf), image.shape[1], *shape))


@torch.library.register_fake("medfast::warp_backward")
def _warp_backward_fake(grad, image, theta, ddf, shape, mode, padding, image_grad, position_grad):
    check_op_devices("medfast::warp_backward", grad=grad, image=image, theta=theta, ddf=ddf)
    pos = position_dtype(image.dtype)
    ndim = image.dim() - 2
    grad_image = image.new_empty(image.shape) if image_grad else image.new_empty((0,), dtype=pos)
    batch = _out_batch(image, theta, ddf)
    grad_pos = image.new_empty((batch, ndim, *shape), dtype=pos) if position_grad else image.new_empty((0,), dtype=pos)
    return grad_image, grad_pos


@torch.library.register_fake("medfast::spline_prefilter")
def _spline_prefilter_fake(image, padding, transpose):
    return image.new_empty(image.shape)


def _theta_grad(grad_pos: torch.Tensor) -> torch.Tensor:
    """d loss / d theta from d loss / d position, without materializing a coordinate grid:
    sum_x g[b, i, x] * x_j is the dot product of the marginal of g along axis j with arange."""
    ndim = grad_pos.dim() - 2
    spatial = list(range(2, 2 + ndim))
    cols = []
    for j in range(ndim):
        marginal = grad_pos.sum(dim=[d for d in spatial if d != 2 + j])  # (B, ndim, S_j)
        ramp = torch.arange(grad_pos.shape[2 + j], dtype=grad_pos.dtype, device=grad_pos.device)
        cols.append((marginal * ramp).sum(-1))  # (not a matmul: autocast would run it in bfloat16 in a backward)
    cols.append(grad_pos.sum(dim=spatial))
    return torch.stack(cols, dim=-1)


def _reduce_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sums a gradient over a broadcast batch dimension."""
    if like.shape[0] == 1 and grad.shape[0] != 1:
        grad = grad.sum(0, keepdim=True)
    return grad


def _warp_setup(ctx, inputs, output):
    image, theta, ddf, shape, mode, padding = inputs
    ctx.save_for_backward(image, theta, ddf)
    ctx.args = (list(shape), mode, padding)


def _warp_backward(ctx, grad):
    image, theta, ddf = ctx.saved_tensors
    need_image = ctx.needs_input_grad[0]
    need_theta = theta is not None and ctx.needs_input_grad[1]
    need_ddf = ddf is not None and ctx.needs_input_grad[2]
    grad_image, grad_pos = _ops.warp_backward(
        grad.contiguous(), image, theta, ddf, *ctx.args, need_image, need_theta or need_ddf
    )
    g_theta = _reduce_to(_theta_grad(grad_pos), theta) if need_theta else None
    g_ddf = _reduce_to(grad_pos, ddf) if need_ddf else None
    grads = once_differentiable("medfast.warp", (grad_image if need_image else None, g_theta, g_ddf),
                                (image, theta, ddf, grad))
    return (*grads, None, None, None)


torch.library.register_autograd("medfast::warp_forward", _warp_backward, setup_context=_warp_setup)


def _prefilter_setup(ctx, inputs, output):
    ctx.padding, ctx.transpose = inputs[1], inputs[2]


def _prefilter_backward(ctx, grad):
    # The prefilter is linear: its adjoint is the solve with the transposed system.
    return _ops.spline_prefilter(grad.contiguous(), ctx.padding, not ctx.transpose), None, None


torch.library.register_autograd("medfast::spline_prefilter", _prefilter_backward, setup_context=_prefilter_setup)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def spline_coefficients(image: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """Cubic B-spline coefficients of an image (the prefilter of ``mode="cubic"``).

    Interpolating the returned coefficients with cubic B-splines reproduces ``image`` exactly at
    the voxel centres. The boundary condition must be the one later used to warp: pass the result
    to :func:`warp` / :func:`affine_warp` with ``mode="cubic", prefiltered=True`` and the same
    ``padding`` to warp one image many times without recomputing the prefilter.

    Parameters
    ----------
    image : Tensor
        ``(B, C, H, W)`` or ``(B, C, D, H, W)``, float32/float64/float16/bfloat16.
    padding : {"zeros", "border", "reflection"}
        How the image extends beyond its edges (see :func:`warp`).

    Returns
    -------
    Tensor
        Same shape and dtype as ``image`` (computed in float32, or float64 for float64 input).
        Differentiable (the gradient is the transposed filter). The coefficients of a
        float16/bfloat16 image are rounded to its dtype, so warping them no longer reproduces the
        image exactly; pass ``image.float()`` for float32 coefficients (``mode="cubic"`` without
        ``prefiltered`` does so for a half image, and rounds only its output).
        Deterministic as :func:`warp`: on CPU bitwise reproducible for a given thread count, on
        CUDA under ``torch.use_deterministic_algorithms(True)``.
    """
    check_image(image)
    check_choice("padding", padding, PADDINGS)
    refuse_function_transforms("medfast.spline_coefficients", image)
    return _ops.spline_prefilter(image, padding, False)


def _sample(image, theta, ddf, shape, mode, padding, prefiltered):
    refuse_function_transforms("medfast warp", image, theta, ddf)
    image, theta, ddf = plain(image), plain(theta), plain(ddf)  # the output is on the field's / shape's grid
    check_choice("mode", mode, MODES)
    check_choice("padding", padding, PADDINGS)
    prefiltered = check_bool("prefiltered", prefiltered)
    if mode == "cubic" and not prefiltered:
        if image.dtype in (torch.float16, torch.bfloat16):
            # float32 coefficients, the output rounded once: coefficients rounded to the half dtype would move
            # the interpolant off the image's own values (1 ulp at a quarter of the voxels of an identity warp)
            coefficients = _ops.spline_prefilter(image.float(), padding, False)
            return _ops.warp_forward(coefficients, theta, ddf, shape, mode, padding).to(image.dtype)
        image = _ops.spline_prefilter(image, padding, False)
    return _ops.warp_forward(image, theta, ddf, shape, mode, padding)


def warp(
    image: torch.Tensor,
    ddf: torch.Tensor,
    *,
    mode: str = "linear",
    padding: str = "zeros",
    prefiltered: bool = False,
) -> torch.Tensor:
    """Warps an image by a dense displacement field given in voxel units.

    ``out[b, c, x] = image[b, c](x + ddf[b, :, x])``: output voxel ``x`` (an integer index on the
    grid of ``ddf``) reads the image at the voxel coordinate ``x + ddf[b, :, x]``. No normalized
    grid is involved; axis order follows the tensor (axis 0 is D in 3D, H in 2D).

    Parameters
    ----------
    image : Tensor
        ``(B, C, *S_in)`` or ``(1, C, *S_in)`` (broadcast over the batch of ``ddf`` without copies;
        its gradient is then summed over the batch), 2 or 3 spatial dims. float32 or float64; on
        CUDA also float16/bfloat16 (float32 accumulation).
    ddf : Tensor
        ``(B, ndim, *S_out)`` displacement in voxels; channel ``i`` moves along spatial axis ``i``.
        float32 (float64 with a float64 image). ``S_out`` may differ from ``S_in``.
    mode : {"linear", "nearest", "cubic"}
        ``"cubic"`` is the interpolating cubic B-spline (prefiltered, as scipy's ``order=3``).
        ``"nearest"`` rounds half up (scipy ``order=0``) and has no gradient w.r.t. ``ddf``.
    padding : {"zeros", "border", "reflection"}
        Values beyond the image, exactly as ``scipy.ndimage.map_coordinates`` modes
        ``"grid-constant"`` (0), ``"nearest"`` and ``"mirror"``.
    prefiltered : bool
        With ``mode="cubic"``: ``image`` already holds :func:`spline_coefficients` (same padding).

    Returns
    -------
    Tensor
        ``(B, C, *S_out)``, dtype of ``image``. Differentiable w.r.t. ``image`` (all modes) and
        ``ddf`` (linear, cubic), once: differentiating the gradients again (``create_graph=True``)
        raises ``RuntimeError``. A NaN displacement gives NaN in every channel of that voxel (and
        NaN gradient w.r.t. its displacement); it never reads out of bounds. With ``"zeros"``
        padding (nearest, linear) a sample with no tap inside the image is 0 with a zero gradient,
        whatever the image holds (NaN / inf included), as scipy's ``grid-constant``; a sample
        straddling the edge reads its edge voxels. A tap whose interpolation weight is exactly 0 (at
        an exact grid position, or outside under ``"zeros"``) contributes nothing, so an inf voxel
        gives inf (not 0 x inf = NaN) where it is read and leaves its neighbours' values finite.

    Notes
    -----
    Deterministic: under ``torch.use_deterministic_algorithms(True)`` forward and backward are
    bitwise reproducible on CPU and CUDA (the CPU path always is, for a fixed thread count).

    Under ``torch.autocast`` (for the image's device) the op runs as ``F.grid_sample`` does, in
    float32: a float16/bfloat16 image is read as float32, and a lower-precision ``ddf`` (a
    network's output) is upcast to float32 (float64 with a float64 image); the output is float32
    (float64). Outside autocast the dtypes must match as stated above.
    """
    image = autocast_image(image)
    ddf = autocast_position(ddf, image)
    ndim = check_image(image)
    check_field(ddf, "ddf", image, ndim)
    check_batch(image, ddf=ddf)
    # ints, not the shape's entries: under torch.jit.trace those are tensors (an internal assert of the tracer)
    shape = ddf.shape[2:] if torch.compiler.is_compiling() else [int(s) for s in ddf.shape[2:]]
    return _sample(image, None, ddf, list(shape), mode, padding, prefiltered)


def affine_warp(
    image: torch.Tensor,
    theta: torch.Tensor,
    *,
    shape: ShapeLike | None = None,
    ddf: torch.Tensor | None = None,
    mode: str = "linear",
    padding: str = "zeros",
    prefiltered: bool = False,
) -> torch.Tensor:
    """Resamples an image through an affine map of voxel coordinates, plus an optional DDF.

    ``out[b, c, x] = image[b, c](theta[b] @ [x; 1] + ddf[b, :, x])``, computed in one kernel: no
    sampling grid is materialized.

    Parameters
    ----------
    image : Tensor
        ``(B or 1, C, *S_in)``, as in :func:`warp`.
    theta : Tensor
        ``(B or 1, ndim, ndim + 1)``: maps OUTPUT voxel coordinates to INPUT voxel coordinates
        (the last column is the translation, in voxels). float32 (float64 with a float64 image).
    shape : sequence of int, optional
        Output spatial shape ``S_out``; defaults to ``ddf``'s spatial shape, else the image's.
    ddf : Tensor, optional
        ``(B or 1, ndim, *S_out)`` displacement in input voxels, added after the affine.
    mode, padding, prefiltered
        As in :func:`warp`.

    Returns
    -------
    Tensor
        ``(B, C, *S_out)``. Differentiable w.r.t. ``image``, ``theta`` and ``ddf``. Under
        ``torch.autocast``: float32 (float64), ``theta`` and ``ddf`` upcast, as in :func:`warp`.
        Deterministic as :func:`warp`: on CPU bitwise reproducible for a given thread count, on
        CUDA under ``torch.use_deterministic_algorithms(True)``.
    """
    image = autocast_image(image)
    theta, ddf = autocast_position(theta, image), autocast_position(ddf, image)
    ndim = check_image(image)
    theta = check_tensor("theta", theta)
    expected = position_dtype(image.dtype)
    if theta.dtype != expected:
        raise TypeError(f"theta must have dtype {expected} for an image of dtype {image.dtype}, got {theta.dtype}")
    if theta.dim() != 3 or tuple(theta.shape[1:]) != (ndim, ndim + 1):
        raise ValueError(f"theta must have shape (B, {ndim}, {ndim + 1}), got {tuple(theta.shape)}")
    check_device("theta", theta, image)
    if ddf is not None:
        check_field(ddf, "ddf", image, ndim)
        if shape is not None and list(shape) != list(ddf.shape[2:]):
            raise ValueError(f"shape {tuple(shape)} does not match the ddf's spatial shape {tuple(ddf.shape[2:])}")
        shape = ddf.shape[2:]
    out_shape = check_shape("shape", image.shape[2:] if shape is None else shape, ndim)
    check_batch(image, theta=theta, ddf=ddf)
    return _sample(image, theta, ddf, out_shape, mode, padding, prefiltered)
