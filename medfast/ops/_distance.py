"""Distance transforms: distance_transform (exact Euclidean distance transform of a binary mask).

Kernels: ``csrc/distance/``. This module validates arguments, registers the fake (meta) kernel of
``torch.ops.medfast.distance_transform`` and documents the API. The op is not differentiable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from medfast._extension import _C  # noqa: F401  (registers torch.ops.medfast)
from medfast._typing import SpacingLike
from medfast.ops._validate import check_op_devices, check_tensor, py_scalar

_ops = torch.ops.medfast

DISTANCE_DTYPES = (torch.float32, torch.float64)


@torch.library.register_fake("medfast::distance_transform")
def _distance_transform_fake(mask, spacing, dtype):
    return mask.new_empty(mask.shape, dtype=dtype)


@torch.library.register_fake("medfast::seed_distances")
def _seed_distances_fake(seeds, query, spacing):
    check_op_devices("medfast::seed_distances", seeds=seeds, query=query)
    count = torch.library.get_ctx().new_dynamic_size()
    return seeds.new_empty((count,), dtype=torch.float32)


def seed_distances(seeds: torch.Tensor, query: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Distances (float32, (Q,), in mm) from every query voxel to the nearest seed voxel of its batch element.

    ``seeds`` and ``query`` are (B, *spatial) bool masks of 2 or 3 spatial dims; the result lists the query
    voxels in C order (as ``query`` indexing would), ``inf`` where an element has no seed. It equals
    ``distance_transform(~seeds, spacing)[query]`` without forming the full transform: a binary pass along one
    axis, then, on the CPU in 3D, each query searched outwards in its plane of the two other axes (bounded by
    the previous query's distance plus their separation, so surfaces near each other cost little), with the
    envelope pass as the fallback for planes where that search would cost more; each element's planes are
    cropped to its seeds' rows and columns and its queries' planes, so far-apart surfaces, or one small class
    among many, cost about their own boxes. On CUDA and in 2D, the envelope pass and the last pass evaluated
    at the queries only. Internal to the surface metrics.
    """
    values, scale = _float32_range([float(s) for s in spacing])
    out = _ops.seed_distances(seeds, query, values)
    return out if scale == 1.0 else out * scale


def _float32_range(values: list[float]) -> tuple[list[float], float]:
    """Spacings whose squared distances stay in float32's normal range, and the factor that restores the
    distances: the kernels square them (a 1e19 spacing overflowed to inf, a 1e-25 one underflowed to 0)."""
    top = max(values)
    if 1e-12 <= min(values) and top <= 1e12:
        return values, 1.0
    return [s / top for s in values], top


@torch.library.register_fake("medfast::surface_edges")
def _surface_edges_fake(mask):
    # contiguous whatever the mask's strides: the kernel returns a contiguous tensor (a transposed mask,
    # a Fortran-ordered NIfTI, gave a stride mismatch under inductor)
    return (torch.empty_like(mask, memory_format=torch.contiguous_format),
            mask.new_empty((mask.shape[0],), dtype=torch.long))


def surface_edges(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Surface voxels of a (B, *spatial) bool mask of 2 or 3 spatial dims, and their number per element.

    A set voxel is a surface voxel unless its 2 x ndim face neighbours are all set, with background
    outside the image: ``mask & ~scipy.ndimage.binary_erosion(mask)`` per element (the cross structuring
    element), as MONAI's ``get_mask_edges``. Returns (bool (B, *spatial), int64 (B,)). Internal to the
    surface metrics.
    """
    # contiguous here (the kernel would copy it anyway): inductor lays the traced mask out its own way
    # and then asserted the op's input strides (a transposed label map failed under torch.compile)
    return _ops.surface_edges(mask.contiguous())


def _check_spacing(spacing: object, ndim: int) -> list[float]:
    if spacing is None:
        return [1.0] * ndim
    spacing = py_scalar(spacing)
    if isinstance(spacing, (bool, str, bytes)):  # a string would iterate as digits: "12" -> (1, 2)
        raise TypeError(f"spacing must be a positive float or a sequence of {ndim} positive floats, got {spacing!r}")
    if isinstance(spacing, (int, float)):
        values = [float(spacing)] * ndim
    else:
        try:
            values = [float(s) for s in spacing]  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise TypeError(
                f"spacing must be a positive float or a sequence of {ndim} positive floats, got {spacing!r}"
            ) from None
        if len(values) != ndim:
            raise ValueError(
                f"spacing must have {ndim} entries (one per spatial axis) for a {ndim}-d mask, got {len(values)}"
            )
    if any(not math.isfinite(s) or s <= 0 for s in values):
        raise ValueError(f"spacing must be positive and finite, got {tuple(values)}")
    # float32 distances (the kernels square them; results are scaled back by the largest spacing): beyond
    # these bounds they overflowed to inf / NaN or underflowed to 0
    if max(values) > 1e30 or min(values) < 1e-30 or max(values) / min(values) > 1e15:
        raise ValueError(f"spacing must lie in [1e-30, 1e30] with at most a 1e15 ratio between axes, got "
                         f"{tuple(values)}")
    return values


def distance_transform(
    mask: torch.Tensor,
    spacing: SpacingLike | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Exact Euclidean distance transform of a binary mask.

    For every voxel, the distance to the nearest background (zero) voxel, in the units of
    ``spacing``; 0 on background voxels. Per batch element this equals
    ``scipy.ndimage.distance_transform_edt(mask[b], sampling=spacing)`` up to float rounding.

    Parameters
    ----------
    mask : Tensor
        ``(B, H, W)`` or ``(B, D, H, W)``: a batch of 2D or 3D masks. There is no channel axis and
        the batch axis is required (use ``mask[None]`` for a single image; a 3D ``(D, H, W)``
        volume passed without it would be read as a batch of D 2D slices). A ``(B, 1, H, W)``
        tensor is read as 3D masks of depth 1, which gives the same distances as the ``(B, H, W)``
        masks except on a mask without background (see below). Any real dtype (bool, integer,
        floating): nonzero (NaN included) is foreground, zero is background. Any memory layout.
    spacing : float or sequence of float, optional
        Voxel size along each spatial axis (axis 0 first: D in 3D, H in 2D), e.g. in mm; one float
        applies to every axis. Default 1 (distances in voxels). Positive and finite.
    dtype : torch.dtype, optional
        ``torch.float32`` or ``torch.float64``: the dtype of the output and of the computation.
        Default: float64 for a float64 mask, else float32. With float32 the distances agree with
        scipy's (float64) to about 1e-6 relative.

    Returns
    -------
    Tensor
        Distances, the shape of ``mask``, dtype ``dtype``, on the mask's device, contiguous.
        A batch element without any background voxel gets, as in scipy, the distance to a virtual
        background voxel just before the first voxel of axis 0, at index ``(-1, 0, ..., 0)``:
        ``sqrt(((i0 + 1) * s0)^2 + sum_a>0 (ia * sa)^2)``. The output is always finite; test
        ``(mask != 0).all()`` per element if that case matters to you.

    Notes
    -----
    Not differentiable: the output never requires grad (a mask that requires grad is read detached).
    Algorithm: one exact 1D pass per axis over squared distances (the lower envelope of parabolas
    of Felzenszwalb & Huttenlocher), O(number of voxels) per axis; deterministic on CPU and CUDA.

    Raises
    ------
    TypeError
        ``mask`` is not a tensor or is complex; ``spacing`` is not a number or a sequence;
        ``dtype`` is not float32/float64.
    ValueError
        ``mask`` is not 3-d or 4-d or is empty; ``spacing`` has the wrong length or an entry that
        is not positive and finite.
    """
    mask = check_tensor("mask", mask)
    if mask.is_complex():
        raise TypeError(f"mask must be a real (bool, integer or floating) tensor, got {mask.dtype}")
    if mask.dim() not in (3, 4):
        raise ValueError(
            f"mask must have shape (B, H, W) or (B, D, H, W) (batch first, no channel axis), got "
            f"{tuple(mask.shape)} ({mask.dim()} dims)"
        )
    if mask.numel() == 0:
        raise ValueError(f"mask is empty: shape {tuple(mask.shape)}")
    ndim = mask.dim() - 1
    values = _check_spacing(spacing, ndim)
    if dtype is None:
        dtype = torch.float64 if mask.dtype == torch.float64 else torch.float32
    elif dtype not in DISTANCE_DTYPES:
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    scale = 1.0
    if dtype == torch.float32:
        values, scale = _float32_range(values)
    out = _ops.distance_transform(mask.detach(), values, dtype)
    return out if scale == 1.0 else out.mul_(scale)
