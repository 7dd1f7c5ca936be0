"""Operators built on the warp kernels: world-space resampling, DDF composition and integration."""

from __future__ import annotations

import numpy as np
import torch

from medfast._typing import Int, MatrixLike, ShapeLike
from medfast.ops._autograd import refuse_function_transforms
from medfast.ops._validate import (
    autocast_image,
    autocast_on,
    check_choice,
    check_field,
    check_image,
    check_shape,
    position_dtype,
    py_scalar,
)
from medfast.ops._warp import affine_warp, warp


def _as_affine(name: str, value, ndim: int, device, host: bool = False) -> torch.Tensor | np.ndarray:
    """The validated affine in float64 on ``device``; with ``host``, a float64 NumPy array where the value is a
    plain CPU tensor (or array) that needs no autograd, else still a tensor."""
    if isinstance(value, np.ndarray):
        try:  # a copy in native byte order (nibabel's affines of a big-endian header are big-endian)
            value = torch.from_numpy(np.array(value, dtype=value.dtype.newbyteorder("=")))
        except TypeError:
            raise TypeError(f"{name} must be a real numeric array, got dtype {value.dtype}") from None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}")
    if value.dim() not in (2, 3) or tuple(value.shape[-2:]) != (ndim + 1, ndim + 1):
        raise ValueError(
            f"{name} must be a ({ndim + 1}, {ndim + 1}) voxel-to-world affine (or a batch of them) for a "
            f"{ndim}-d image, got {tuple(value.shape)}"
        )
    if value.is_complex():
        raise TypeError(f"{name} must be real, got {value.dtype}")  # (a cast would drop the imaginary part)
    if not torch.is_floating_point(value):
        value = value.double()
    if value.device != device and value.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (no values) but image is on {device}")
    if host and _plain_cpu(value):
        array = (value if value.dtype in (torch.float32, torch.float64) else value.double()).numpy()
        array = array.astype(np.float64, copy=False)
        if not np.isfinite(array).all():
            raise ValueError(f"{name} must be finite, got {array.tolist()}")
        return array
    # no check (and no sync) on a GPU, nor while torch.compile traces (a data-dependent branch), nor on a
    # torch.func.vmap batched affine (no values on the host: PyTorch's data-dependent control flow error)
    if (value.device.type == "cpu" and not torch.compiler.is_compiling() and not _wrapped(value)
            and not bool(torch.isfinite(value).all())):
        raise ValueError(f"{name} must be finite, got {value.tolist()}")
    return value.to(device=device, dtype=torch.float64)


def _wrapped(value: torch.Tensor) -> bool:
    """A functorch-wrapped tensor (under torch.func.vmap, a batched one): its values cannot be read on the host.
    False while torch.compile traces (dynamo cannot trace the query: a graph break; no host checks run there)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(value)


def _plain_cpu(value: torch.Tensor) -> bool:
    """A CPU tensor whose values NumPy may read without losing autograd, tracing or a function transform."""
    return (
        type(value) is torch.Tensor
        and value.device.type == "cpu"
        and not value.requires_grad
        and not _wrapped(value)
    )


_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def resample(
    image: torch.Tensor,
    affine_in: MatrixLike,
    affine_out: MatrixLike,
    shape_out: ShapeLike,
    *,
    mode: str = "linear",
    padding: str = "zeros",
) -> torch.Tensor:
    """Resamples an image from its voxel grid onto another grid, both placed in world space (mm).

    Output voxel ``x`` takes the image value at the world point ``affine_out @ [x; 1]``, i.e. at
    the input voxel coordinate ``inv(affine_in) @ affine_out @ [x; 1]`` (NIfTI convention: the
    affine maps array indices ``(i, j, k)`` of the spatial axes, in tensor order, to mm).

    Parameters
    ----------
    image : Tensor
        ``(B, C, *S_in)`` on the grid of ``affine_in`` (2 or 3 spatial dims).
    affine_in, affine_out : Tensor or ndarray
        ``(ndim + 1, ndim + 1)`` voxel-to-world affines (or ``(B, ndim + 1, ndim + 1)``), e.g.
        ``nibabel.load(path).affine``. Differentiable when given as tensors that require grad.
    shape_out : sequence of int
        Spatial shape of the output grid.
    mode, padding
        As in :func:`medfast.warp`.

    Returns
    -------
    Tensor
        ``(B, C, *shape_out)`` on the grid of ``affine_out``; float32 for a float16/bfloat16 image
        under ``torch.autocast``, as :func:`medfast.warp`.
        Deterministic as :func:`medfast.warp`: on CPU bitwise reproducible for a given thread count, on
        CUDA under ``torch.use_deterministic_algorithms(True)``.
    """
    # before the host reads of the affines (torch.func.grad / jacrev failed there with a raw storage error)
    refuse_function_transforms("medfast resample", image, *(a for a in (affine_in, affine_out)
                                                             if isinstance(a, torch.Tensor)))
    image = autocast_image(image)
    ndim = check_image(image)
    shape_out = check_shape("shape_out", shape_out, ndim)
    # Affines without autograd on a CPU image: validated and solved in NumPy float64 (a dozen tiny tensor ops
    # and three host syncs cost ~90 us a call, 3x the warp itself at 64^2).
    host = image.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
    a_in = _as_affine("affine_in", affine_in, ndim, image.device, host)
    a_out = _as_affine("affine_out", affine_out, ndim, image.device, host)
    if not (isinstance(a_in, np.ndarray) and isinstance(a_out, np.ndarray)):  # (one of them needs torch)
        a_in, a_out = (torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in (a_in, a_out))
    if a_in.ndim == 3 and a_out.ndim == 3 and a_in.shape[0] not in (1, a_out.shape[0]) and a_out.shape[0] != 1:
        raise ValueError(
            f"affine_in and affine_out batches must be equal or 1, got {a_in.shape[0]} and {a_out.shape[0]}"
        )
    for name, a in (("affine_in", a_in), ("affine_out", a_out)):  # (affine_warp would call them theta)
        if a.ndim == 3 and a.shape[0] not in (1, image.shape[0]) and image.shape[0] != 1:
            raise ValueError(f"{name} has a batch of {a.shape[0]} affines but image has a batch of {image.shape[0]}: "
                             f"batches must be equal or 1 (broadcast)")
    if isinstance(a_in, np.ndarray):
        if a_in.ndim != a_out.ndim:  # (as below)
            a_in, a_out = np.broadcast_arrays(a_in, a_out)
        try:
            theta = np.linalg.solve(a_in, a_out)[..., :ndim, :]
        except np.linalg.LinAlgError:
            raise ValueError(f"affine_in is singular (no voxel grid maps onto world space): {a_in.tolist()}") from None
        theta = torch.from_numpy(np.ascontiguousarray(theta, dtype=_NP_DTYPES[position_dtype(image.dtype)]))
        if theta.dim() == 2:
            theta = theta.unsqueeze(0)
        return affine_warp(image, theta, shape=shape_out, mode=mode, padding=padding)
    if a_in.dim() != a_out.dim():  # one (n+1, n+1) beside a batch: solve would read it as a batch of vectors
        a_in, a_out = torch.broadcast_tensors(a_in, a_out)
    theta, info = torch.linalg.solve_ex(a_in, a_out)
    # (not while torch.compile traces: a data-dependent check cannot be part of the graph; nor under vmap with a
    # batched affine, whose info is batched too)
    if not torch.compiler.is_compiling() and not _wrapped(info) and bool(info.ne(0).any()):
        raise ValueError(f"affine_in is singular (no voxel grid maps onto world space): {a_in.tolist()}")
    if _wrapped(a_in) or _wrapped(a_out):
        # vmap over an affine: the two checks above cannot read its values, so a non-finite or singular one makes
        # that element's output NaN instead (as a bad label makes a loss NaN); an inf in affine_in would
        # otherwise solve to a finite, wrong theta
        ok = torch.isfinite(a_in).all(-1).all(-1) & torch.isfinite(a_out).all(-1).all(-1) & info.eq(0)
        theta = torch.where(ok[..., None, None], theta, torch.nan)
    theta = theta[..., :ndim, :]
    if theta.dim() == 2:
        theta = theta.unsqueeze(0)
    return affine_warp(image, theta.to(position_dtype(image.dtype)), shape=shape_out, mode=mode, padding=padding)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"ddf_a and ddf_b must be on the same grid, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] not in (1, b.shape[0]) and b.shape[0] != 1:
        raise ValueError(f"ddf_a and ddf_b batches must be equal or 1, got {a.shape[0]} and {b.shape[0]}")
    if a.dtype != b.dtype:
        raise TypeError(f"ddf_a and ddf_b must have one dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"ddf_a is on {a.device} but ddf_b is on {b.device}; move them to one device")


def _autocast_fields(*fields):
    """Under autocast, displacements from a network's low-precision output upcast to one dtype, the widest of
    theirs and float32 (as warp upcasts a ddf); never downcast. Outside autocast, unchanged."""
    if not all(isinstance(f, torch.Tensor) and f.is_floating_point() for f in fields):
        return fields
    if all(f.dtype == fields[0].dtype for f in fields) and fields[0].dtype in (torch.float32, torch.float64):
        return fields  # nothing to upcast (no autocast query: integrate composes many times)
    if not autocast_on(fields[0]):
        return fields
    dtype = torch.float32
    for f in fields:
        dtype = torch.promote_types(dtype, f.dtype)
    return tuple(f.to(dtype) for f in fields)


def _check_ddf(name: str, ddf) -> int:
    if not isinstance(ddf, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ddf).__name__}")
    ndim = ddf.dim() - 2
    if ndim not in (2, 3):
        raise ValueError(f"{name} must have shape (B, ndim, *spatial) with ndim 2 or 3, got {tuple(ddf.shape)}")
    if ddf.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {ddf.dtype}")
    check_field(ddf, name, ddf, ndim)
    return ndim


def compose(ddf_a: torch.Tensor, ddf_b: torch.Tensor, *, padding: str = "border") -> torch.Tensor:
    """The displacement of "warp by ``ddf_a``, then by ``ddf_b``".

    ``warp(warp(img, ddf_a), ddf_b) == warp(img, compose(ddf_a, ddf_b))`` up to interpolation:
    ``compose(a, b)(x) = b(x) + a(x + b(x))``, with ``a`` sampled linearly.

    Parameters
    ----------
    ddf_a, ddf_b : Tensor
        ``(B, ndim, *S)`` displacements in voxels on the same grid (batch 1 broadcasts).
    padding : {"border", "zeros", "reflection"}
        How ``ddf_a`` extends beyond the grid (default: its border value).

    Returns
    -------
    Tensor
        ``(B, ndim, *S)``, differentiable w.r.t. both fields. Under ``torch.autocast``
        float16/bfloat16 fields are upcast (to float32, or float64 beside a float64 field).
        Deterministic as :func:`medfast.warp`: on CPU bitwise reproducible for a given thread count, on
        CUDA under ``torch.use_deterministic_algorithms(True)``.
    """
    ddf_a, ddf_b = _autocast_fields(ddf_a, ddf_b)
    _check_ddf("ddf_a", ddf_a)
    _check_ddf("ddf_b", ddf_b)
    _check_pair(ddf_a, ddf_b)
    check_choice("padding", padding, ("zeros", "border", "reflection"))
    return ddf_b + warp(ddf_a, ddf_b, mode="linear", padding=padding)


# 2**-64 of a velocity is below float64's resolution of any displacement that matters: more squarings only
# cost time (and 2.0**steps overflows past 1023).
_MAX_STEPS = 64


def integrate(velocity: torch.Tensor, steps: Int = 7, *, padding: str = "border") -> torch.Tensor:
    """Integrates a stationary velocity field by scaling and squaring.

    ``u = velocity / 2**steps``, then ``steps`` times ``u = compose(u, u)``: the displacement of the
    flow of ``velocity`` at time 1, a diffeomorphism for smooth enough fields.

    Parameters
    ----------
    velocity : Tensor
        ``(B, ndim, *S)`` in voxels per unit time, float32 or float64.
    steps : int
        Number of squarings (0 to 64; 0 returns ``velocity``).
    padding
        Passed to :func:`compose`.

    Returns
    -------
    Tensor
        ``(B, ndim, *S)`` displacement in voxels, differentiable w.r.t. ``velocity``. Under
        ``torch.autocast`` a float16/bfloat16 velocity is upcast to float32.
        Deterministic as :func:`medfast.warp`: on CPU bitwise reproducible for a given thread count, on
        CUDA under ``torch.use_deterministic_algorithms(True)``.
    """
    (velocity,) = _autocast_fields(velocity)
    _check_ddf("velocity", velocity)
    n = py_scalar(steps)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= _MAX_STEPS:
        raise ValueError(f"steps must be an int in [0, {_MAX_STEPS}], got {n!r}")
    u = velocity / (2.0**n)
    for _ in range(n):
        u = compose(u, u, padding=padding)
    return u
