"""Segmentation metrics: hard Dice, Hausdorff distance and average surface distance.

Plain PyTorch (runs on the tensor's device, CPU or CUDA) plus :func:`medfast.distance_transform`. The
results equal MONAI's ``DiceMetric`` / ``compute_hausdorff_distance`` / ``compute_average_surface_distance``
(``distance_metric="euclidean"``); the differences are listed in each function's Notes.

Surfaces ("edges") are defined as in MONAI's ``get_mask_edges`` (without sub-voxel spacing): the voxels of
a mask removed by one binary erosion with the cross-shaped (face-connected) structuring element, voxels
outside the image counting as background, so foreground voxels on the image border are surface voxels.
The distance from a surface voxel of one mask to the other mask's surface is the exact Euclidean distance
to the nearest surface voxel of the other mask, in units of ``spacing``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from medfast._typing import SpacingLike
from medfast.ops._distance import _check_spacing, seed_distances, surface_edges
from medfast.ops._loss import _vmapped
from medfast.ops._validate import check_int, check_tensor, py_scalar

__all__ = ["dice", "hausdorff_distance", "surface_distance"]

# one number, one per axis, or one sequence per batch element ((B, ndim) array / tensor too)
SpacingArg = SpacingLike | Sequence[float | Sequence[float]] | None


# ----------------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------------


def _check_pair(pred: object, target: object, pred_name: str, target_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    pred = check_tensor(pred_name, pred)
    target = check_tensor(target_name, target)
    if pred.device != target.device:
        raise ValueError(
            f"{pred_name} and {target_name} must be on the same device, got {pred.device} and {target.device}"
        )
    for name, t in ((pred_name, pred), (target_name, target)):
        if _vmapped(t):
            # (vmap failed inside with ".item() ... data-dependent": the labels are read on the host, and the
            # distances' point sets have data-dependent sizes)
            raise NotImplementedError(
                f"{name} is under a torch.func transform (vmap, grad, ...): medfast.metrics read the labels on the "
                "host and do not support them; call the metric on the whole batch (axis 0 is its batch axis)")
    if pred.device.type == "meta":  # (the label checks raised "Tensor.item() cannot be called on meta tensors")
        raise ValueError(f"{pred_name} is a meta tensor: a meta tensor has no values (the labels are checked on the "
                         "host)")
    if pred.shape != target.shape:
        raise ValueError(
            f"{pred_name} and {target_name} must have the same shape, got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )
    if pred.numel() == 0:
        raise ValueError(f"{pred_name} is empty: shape {tuple(pred.shape)}")
    return _indexable(pred), _indexable(target)


_WIDE_UNSIGNED = tuple(getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n))


def _indexable(t: torch.Tensor) -> torch.Tensor:
    # uint16 label maps (ITK-SNAP's, via nibabel) and uint32 / uint64: PyTorch has no min / max / compare /
    # bincount kernels for them; int64 holds every label (a uint64 above 2^63 turns negative: out of range)
    return t.long() if t.dtype in _WIDE_UNSIGNED else t


def _check_labels(name: str, labels: torch.Tensor, num_classes: int, ignore_index: int | None) -> None:
    """Label map: integer (or bool) dtype, values in [0, num_classes) or == ignore_index."""
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(
            f"{name} must be an integer label map (class index per voxel), got dtype {labels.dtype}; "
            f"take the argmax over the class axis of probabilities/logits, or round and convert with .long()"
        )
    if labels.numel() == 0:
        return
    if labels.dtype != torch.bool:
        lo, hi = (int(v) for v in torch.aminmax(labels))  # one pass; the masks below only on failure
        if lo >= 0 and hi < num_classes:
            return
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:  # compared in int64: uint8 255 == -1 in its own dtype (wrapped)
        bad &= labels.long() != ignore_index
    if bool(bad.any()):
        values = labels[bad]
        extra = f" or ignore_index={ignore_index}" if ignore_index is not None else ""
        raise ValueError(
            f"{name} has labels outside [0, num_classes={num_classes}){extra}: found values in "
            f"[{int(values.min())}, {int(values.max())}]"
        )


def _check_binary(name: str, mask: torch.Tensor) -> torch.Tensor:
    """One-hot channel mask: bool, integer or floating holding only 0 and 1; returns it as bool."""
    if mask.is_complex():
        raise TypeError(f"{name} must be a real (bool, integer or floating) tensor, got {mask.dtype}")
    if mask.dtype == torch.bool:
        return mask
    binary = mask != 0
    if not torch.equal(binary.to(mask.dtype), mask):  # 3 passes, at any foreground fraction
        raise ValueError(
            f"{name} must be binary (one-hot, values 0 and 1 only); threshold probabilities or pass label maps "
            f"with num_classes=..."
        )
    return binary


def _batch_spacing(spacing: SpacingArg, batch: int, ndim: int) -> list[list[float]] | list[float]:
    """Shared spacing (list of ndim floats) or per-batch spacing (list of batch lists), as MONAI accepts."""
    if isinstance(spacing, (np.ndarray, torch.Tensor)) and spacing.ndim == 2:  # (B, ndim): per batch element
        spacing = spacing.tolist()
    if (
        spacing is not None
        and not isinstance(spacing, (int, float, torch.Tensor))
        and isinstance(spacing, Sequence)
        and len(spacing) > 0
        and all(isinstance(s, (Sequence, torch.Tensor, np.ndarray)) and not isinstance(s, str) for s in spacing)
    ):
        if len(spacing) != batch:
            raise ValueError(
                f"spacing given per batch element (a sequence of sequences) must have {batch} entries (the batch "
                f"size), got {len(spacing)}"
            )
        return [_check_spacing(list(s), ndim) for s in spacing]
    return _check_spacing(spacing, ndim)


def _dense_views(
    pred: torch.Tensor, target: torch.Tensor, lead: int
) -> tuple[torch.Tensor, torch.Tensor, list[int] | None]:
    """pred and target with their spatial axes (those from ``lead`` on) permuted so that both are C-contiguous
    views, and that permutation of the spatial axes, where one permutation does it for both (NIfTI volumes
    read by nibabel are Fortran-ordered: their reversed axes are contiguous); else the inputs and None.
    Surfaces and distances are the same on permuted axes with the spacing permuted alike, and a count of
    voxel pairs does not depend on the order, so the metrics need no copy (and no strided pass)."""
    if pred.is_contiguous() and target.is_contiguous():
        return pred, target, None
    order = sorted(range(lead, pred.dim()), key=lambda a: -pred.stride(a))  # stable: size-1 axes keep order
    dims = [*range(lead), *order]
    p, t = pred.permute(dims), target.permute(dims)
    if p.is_contiguous() and t.is_contiguous():
        return p, t, [a - lead for a in order]
    return pred, target, None


def _permuted_spacing(spacing: SpacingArg, perm: list[int] | None, batch: int, ndim: int) -> SpacingArg:
    """The spacing of axes permuted by _dense_views (validated, shared or per batch element)."""
    if perm is None:
        return spacing
    sp = _batch_spacing(spacing, batch, ndim)
    if sp and isinstance(sp[0], list):
        return [[s[a] for a in perm] for s in sp]  # type: ignore[index]
    return [sp[a] for a in perm]  # type: ignore[index]


def _check_percentile(percentile: object) -> float | None:
    if percentile is None:
        return None
    if isinstance(percentile, torch.Tensor) and percentile.numel() == 1:
        percentile = percentile.item()
    percentile = py_scalar(percentile)
    if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real):
        raise TypeError(f"percentile must be a number in [0, 100] or None, got {type(percentile).__name__}")
    if not (0 <= percentile <= 100):
        raise ValueError(f"percentile must be in [0, 100] or None, got {percentile}")
    return float(percentile)


# Masks (and their surfaces) of at most this many bytes at a time: label maps with a hundred classes would
# otherwise need a hundred volumes of bool masks (and as many of surfaces) at once.
_CHUNK_BYTES = 1 << 29


class _MaskSource(NamedTuple):
    """Validated inputs of the surface metrics: ``get(c0, c1)`` gives the (B, c1 - c0, *S) bool masks of
    channels c0 .. c1 - 1 (views of one-hot inputs; built from label maps on demand); ``perm`` is the
    permutation of the spatial axes of the masks (_dense_views; None: as given)."""

    batch: int
    channels: int  # C': the classes measured
    first: int  # the class index of channel 0
    ndim: int  # spatial axes
    voxels: int  # of one image
    perm: list[int] | None
    get: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def _masks(
    pred: object,
    target: object,
    include_background: bool,
    num_classes: int | None,
) -> _MaskSource:
    """Validates pred / target (one-hot masks, or label maps with ``num_classes``) for the surface metrics."""
    include_background = py_scalar(include_background)
    if not isinstance(include_background, bool):
        raise TypeError(f"include_background must be a bool, got {type(include_background).__name__}")
    pred, target = _check_pair(pred, target, "pred", "target")
    first = 0 if include_background else 1
    if num_classes is None:
        if pred.dim() not in (4, 5):
            raise ValueError(
                f"pred must be one-hot with shape (B, C, H, W) or (B, C, D, H, W), got {tuple(pred.shape)} "
                f"({pred.dim()} dims); for label maps (B, *spatial) pass num_classes"
            )
        if pred.shape[1] == 1:  # a binary mask: its one channel is the foreground, as MONAI reads it
            first = 0
        # only the channels that count are read (MONAI ignores a dropped background channel too)
        p, t, perm = _dense_views(pred[:, first:], target[:, first:], 2)
        p, t = _check_binary("pred", p), _check_binary("target", t)
        return _MaskSource(p.shape[0], p.shape[1], first, p.dim() - 2, p[0, 0].numel(), perm,
                           lambda c0, c1: (p[:, c0:c1], t[:, c0:c1]))
    num_classes = check_int("num_classes", num_classes, 1 + first)
    if num_classes > _MAX_CLASSES:  # one pass per class: 2**62 ran for ever
        raise ValueError(f"num_classes must be at most {_MAX_CLASSES}, got {num_classes}; label ids as large as an "
                         f"atlas's are scored over the ids present (as medfast evaluate does: map them to 0 .. K-1)")
    if pred.dim() in (4, 5) and pred.shape[1] == 1:
        # MONAI's label layout (B, 1, *S) (argmax(dim=1, keepdim=True)): the size-1 axis is a channel, not a
        # depth-1 spatial axis (read so, every foreground voxel of a 2D map is surface: HD / ASSD wrong)
        pred, target = pred[:, 0], target[:, 0]
    if pred.dim() not in (3, 4):
        raise ValueError(
            f"with num_classes, pred must be a label map of shape (B, H, W) or (B, D, H, W), got "
            f"{tuple(pred.shape)} ({pred.dim()} dims)"
        )
    pred, target, perm = _dense_views(pred, target, 1)
    _check_labels("pred", pred, num_classes, None)
    _check_labels("target", target, num_classes, None)
    shape = (1, -1, *([1] * (pred.dim() - 1)))

    def masks(c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
        classes = torch.arange(first + c0, first + c1, device=pred.device).view(shape)
        return pred.unsqueeze(1) == classes, target.unsqueeze(1) == classes

    return _MaskSource(pred.shape[0], num_classes - first, first, pred.dim() - 1, pred[0].numel(), perm, masks)


def _chunked(
    fn: str,
    source: _MaskSource,
    spacing: SpacingArg,
    per_chunk: Callable[[torch.Tensor, torch.Tensor, SpacingArg], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """per_chunk(p, t, spacing) -> ((B, c) result, (B * c,) pred / target surface counts) over chunks of the
    channels of ``source`` of at most _CHUNK_BYTES of masks, with the spacing permuted as the masks' axes;
    warns (as ``fn``) about the empty (batch, class) pairs and returns the (B, C') result."""
    spacing = _permuted_spacing(spacing, source.perm, source.batch, source.ndim)
    step = max(1, _CHUNK_BYTES // max(1, source.batch * source.voxels))
    results, counts_p, counts_t = [], [], []
    for c0 in range(0, source.channels, step):
        p, t = source.get(c0, min(c0 + step, source.channels))
        result, n_p, n_t = per_chunk(p, t, spacing)
        results.append(result)
        counts_p.append(n_p.view(source.batch, -1))
        counts_t.append(n_t.view(source.batch, -1))
    n_p, n_t = torch.cat(counts_p, 1).flatten(), torch.cat(counts_t, 1).flatten()
    _warn_empty(fn, n_p, n_t, source.channels, source.first, stacklevel=4)
    return torch.cat(results, 1)


# ----------------------------------------------------------------------------------------------------------
# surfaces and distances
# ----------------------------------------------------------------------------------------------------------


def _crop_box(union: torch.Tensor, margin: int) -> list[slice] | None:
    """Bounding box (one slice per axis, grown by ``margin`` and clipped to the image) of the nonzero voxels
    of a (*S) bool tensor; None if it has none. The first and last hit of every axis come back to the host in one
    read (on a GPU one sync; a nonzero and two reads per axis made it 9 in 3D)."""
    u8 = union.view(torch.uint8)  # amax over uint8 is several times faster than any() over bool
    rows = []
    for axis in range(union.dim()):
        proj = u8.amax(dim=[d for d in range(union.dim()) if d != axis])
        # argmax gives the first maximal index: the first hit, and from the end the last
        rows.append(torch.stack([proj.amax().long(), proj.argmax(), proj.numel() - 1 - proj.flip(0).argmax()]))
    stats = torch.stack(rows).tolist()
    if not stats[0][0]:
        return None
    return [slice(max(first - margin, 0), min(last + 1 + margin, union.shape[axis]))
            for axis, (_, first, last) in enumerate(stats)]


def _surface_distances(
    pred: torch.Tensor, target: torch.Tensor, spacing: SpacingArg, both: bool
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor, torch.Tensor]:
    """Surface distances of the (B, C, *S) bool masks, flattened to N = B*C elements.

    Returns ((d_pt, seg_pt), (d_tp, seg_tp) or None, n_pred_edges, n_target_edges): the distances from the
    pred surface to the target surface (and back) with the element index of each distance, sorted by element,
    for the elements where both surfaces are non-empty; and the number of surface voxels of each element.
    """
    batch, channels = pred.shape[:2]
    spatial = pred.shape[2:]
    spacings = _batch_spacing(spacing, batch, len(spatial))
    pred, target = pred.reshape(-1, *spatial), target.reshape(-1, *spatial)
    if pred.device.type == "cuda":
        # the CUDA seed distances transform the whole volume: crop it to the foreground (+1 voxel, so that
        # the surfaces are unchanged). Not on the CPU: surface_edges skips empty rows and seed_distances
        # crops each element to its own surfaces there, so the box would cost a pass more than it saves.
        union = pred | target
        box = _crop_box(union[0] if union.shape[0] == 1 else union.flatten(1).any(0).view(spatial), 1)
        if box is not None:
            pred, target = pred[(slice(None), *box)], target[(slice(None), *box)]
    edges_p, n_p = surface_edges(pred)
    edges_t, n_t = surface_edges(target)
    ok = torch.nonzero((n_p > 0) & (n_t > 0)).flatten()
    if isinstance(spacings[0], list):  # per batch element: one group per batch element
        groups = [(ok[ok // channels == b], spacings[b]) for b in range(batch)]
    else:
        groups = [(ok, spacings)]
    d_pt, s_pt, d_tp, s_tp = [], [], [], []
    for idx, sp in groups:
        if idx.numel() == 0:
            continue
        if idx.numel() == edges_p.shape[0]:  # every element: no gather
            ep, et = edges_p, edges_t
        else:
            ep, et = edges_p[idx], edges_t[idx]
        d_pt.append(seed_distances(et, ep, sp))
        s_pt.append(torch.repeat_interleave(idx, n_p[idx]))
        if both:
            d_tp.append(seed_distances(ep, et, sp))
            s_tp.append(torch.repeat_interleave(idx, n_t[idx]))

    def cat(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=pred.device)

    forward = (cat(d_pt, torch.float32), cat(s_pt, torch.long))
    backward = (cat(d_tp, torch.float32), cat(s_tp, torch.long)) if both else None
    return forward, backward, n_p, n_t


def _segment_max(values: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.full((n,), float("nan"), dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, seg, values, reduce="amax", include_self=False)


def _segment_quantile(
    values: torch.Tensor, seg: torch.Tensor, n: int, q: float, *, contiguous: bool = False
) -> torch.Tensor:
    """Per-segment ``torch.quantile(values[seg == i], q)`` (linear interpolation); nan for empty segments.
    ``contiguous``: the caller guarantees ``seg`` is non-decreasing (as _surface_distances returns it)."""
    if contiguous and values.device.type == "cpu" and n <= 16:
        return _few_segment_quantile(values, seg, n, q)
    if values.dtype == torch.float32 and values.numel() and bool(values.min() >= 0):
        # Non-negative floats order as their bit patterns: one sort of (segment, bits) int64 keys
        # (2x faster than the two stable argsorts below).
        bits = (values + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 becomes +0.0
        key = (seg << 32) | bits
        ordered = (torch.sort(key).values & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    else:
        order = torch.argsort(values, stable=True)
        order = order[torch.argsort(seg[order], stable=True)]
        ordered = values[order]
    counts = torch.bincount(seg, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    # same arithmetic as torch.quantile: rank = q * (k - 1) in the values' dtype, lerp between neighbours
    ranks = torch.tensor(q, dtype=values.dtype, device=values.device) * (counts - 1).clamp_min(0).to(values.dtype)
    below = ranks.long()
    above = ranks.ceil().long()
    last = max(values.numel() - 1, 0)
    lo = ordered[(starts + below).clamp(0, last)] if values.numel() else ranks
    hi = ordered[(starts + above).clamp(0, last)] if values.numel() else ranks
    out = torch.lerp(lo, hi, ranks - below.to(values.dtype))
    return torch.where(counts > 0, out, torch.full_like(out, float("nan")))


def _few_segment_quantile(values: torch.Tensor, seg: torch.Tensor, n: int, q: float) -> torch.Tensor:
    """_segment_quantile for a few contiguous segments on the CPU: the two order statistics of each segment by
    kthvalue (selection, linear time) instead of a sort: 10x faster on surface-sized segments."""
    counts = torch.bincount(seg, minlength=n).tolist()
    out = torch.full((n,), float("nan"), dtype=values.dtype)
    start = 0
    for i, k in enumerate(counts):
        if k:
            part = values[start : start + k]
            # same arithmetic as torch.quantile: rank = q * (k - 1) in the values' dtype, lerp between neighbours
            rank = torch.tensor(q, dtype=values.dtype) * (k - 1)
            below, above = int(rank), int(torch.ceil(rank))
            lo = torch.kthvalue(part, below + 1).values
            hi = lo
            if above != below:  # the next order statistic: lo again if lo repeats, else the next value up
                larger = part[part > lo]
                if k - larger.numel() < above + 1:
                    hi = larger.min()
            out[i] = torch.lerp(lo, hi, rank - below)
        start += k
    return out


_MAX_CLASSES = 2**20  # num_classes of a label map: a class is a pass over the volume and an output column


def _warn_empty(fn: str, n_p: torch.Tensor, n_t: torch.Tensor, channels: int, first: int, stacklevel: int) -> None:
    # the counts in one read (on a GPU one sync, not two nonzero)
    empty = (torch.stack([n_p, n_t]) == 0).tolist()
    empty_p = [i for i, e in enumerate(empty[0]) if e]
    empty_t = [i for i, e in enumerate(empty[1]) if e]
    if not empty_p and not empty_t:
        return

    def pairs(idx: list[int]) -> str:  # the first 10 (a warning naming a million pairs was hundreds of KB)
        named = ", ".join(f"(batch {i // channels}, class {i % channels + first})" for i in idx[:10])
        return named if len(idx) <= 10 else f"{named} and {len(idx) - 10} more"

    parts = []
    if empty_t:
        parts.append(f"target is all 0 for {pairs(empty_t)}")
    if empty_p:
        parts.append(f"pred is all 0 for {pairs(empty_p)}")
    warnings.warn(
        f"{fn}: {'; '.join(parts)}: the result is inf or nan there", UserWarning, stacklevel=stacklevel
    )


def _fill_empty(
    result: torch.Tensor, n_p: torch.Tensor, n_t: torch.Tensor, one_empty: float = math.inf
) -> torch.Tensor:
    empty_p, empty_t = n_p == 0, n_t == 0
    result = torch.where(empty_p ^ empty_t, torch.full_like(result, one_empty), result)
    return torch.where(empty_p & empty_t, torch.full_like(result, math.nan), result)


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------


_TABLE_LIMIT = 1 << 24  # entries of the pair table past which (and past 4x the voxels) three bincounts are used


def _confusion_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None):
    """Per batch element and class: target voxels, pred voxels and voxels where both are the class, as
    three ``(B, num_classes)`` int64 tensors, from one ``bincount`` of (target, pred) pairs. A
    ``num_classes``-th row / column collects target voxels equal to ``ignore_index`` (left out of every
    count) and pred voxels outside ``[0, num_classes)`` (in no class)."""
    batch, k = target.shape[0], num_classes + 1
    # int32 indices while every pair index and the one out-of-range label allowed (ignore_index) fit: half
    # the memory of int64 copies (a whole-body CT: GBs)
    narrow = batch * k * k < 2**31 and (ignore_index is None or -(2**31) <= ignore_index < 2**31)
    index = torch.int32 if narrow else torch.int64
    t = target.reshape(batch, -1).to(index)
    p = pred.reshape(batch, -1).to(index)
    if ignore_index is not None:
        t = t.masked_fill(t == ignore_index, num_classes)
        if not 0 <= ignore_index < num_classes:  # validated labels: outside the range only ignore_index
            p = p.masked_fill(p == ignore_index, num_classes)
    if batch * k * k > max(_TABLE_LIMIT, 4 * t.numel()):
        # many classes: a (k x k) table per batch element would outgrow the data (a million classes: 8 TB);
        # three bincounts of k entries instead (a masked copy of the voxels, but memory linear in k)
        base = torch.arange(batch, device=t.device, dtype=index).view(-1, 1) * k
        tb, pb = t + base, p + base
        labelled = t < num_classes
        n_t = torch.bincount(tb.flatten(), minlength=batch * k).view(batch, k)[:, :num_classes]
        n_p = torch.bincount(pb[labelled], minlength=batch * k).view(batch, k)[:, :num_classes]
        n_tp = torch.bincount(tb[labelled & (t == p)], minlength=batch * k).view(batch, k)[:, :num_classes]
        return n_t, n_p, n_tp
    pairs = (t * k).add_(p)  # one allocation of the pair index (plus t's and p's if they were narrower)
    if batch > 1:
        pairs += torch.arange(batch, device=t.device, dtype=index).view(-1, 1) * (k * k)
    table = torch.bincount(pairs.flatten(), minlength=batch * k * k).view(batch, k, k)[:, :num_classes]
    n_t = table.sum(2)
    n_p = table.sum(1)[:, :num_classes]
    n_tp = torch.diagonal(table, dim1=1, dim2=2)
    return n_t, n_p, n_tp


def hausdorff_distance(
    pred: torch.Tensor,
    target: torch.Tensor,
    percentile: float | None = 95,
    spacing: SpacingArg = None,
    *,
    include_background: bool = False,
    directed: bool = False,
    num_classes: int | None = None,
) -> torch.Tensor:
    """(Percentile) Hausdorff distance between the surfaces of predicted and target segmentations.

    Equals MONAI's ``compute_hausdorff_distance(pred, target, include_background, "euclidean", percentile,
    directed, spacing)``, computed with vectorized torch ops on the inputs' device (CPU or CUDA) and a distance
    transform evaluated at the surface voxels only, instead of a loop over (batch, class) pairs with scipy.

    For each batch element and class, the surface voxels of a mask are those removed by one erosion with the
    face-connected cross (foreground voxels on the image border included). ``d(pred -> target)`` is the
    Euclidean distance (in units of ``spacing``) from each pred surface voxel to the nearest target surface
    voxel; the result is ``q(d(pred -> target))`` if ``directed`` else
    ``max(q(d(pred -> target)), q(d(target -> pred)))`` where ``q`` is the ``percentile``-th percentile
    (``torch.quantile``, linear interpolation) or the maximum when ``percentile`` is None.

    Parameters
    ----------
    pred, target : Tensor
        Without ``num_classes``: one-hot masks ``(B, C, H, W)`` or ``(B, C, D, H, W)`` (channel 0 is the
        background), bool or any real dtype holding only 0 and 1. With ``num_classes``: integer label maps
        ``(B, H, W)`` or ``(B, D, H, W)`` with values in ``[0, num_classes)``, or MONAI's ``(B, 1, H, W)`` /
        ``(B, 1, D, H, W)`` (a size-1 axis 1 is that channel: ``(B, 1, H, W)`` is 2D). Same shape and device.
    percentile : float or None
        In [0, 100]. Default 95 (HD95; MONAI's default is None). None: the maximum (classic Hausdorff).
    spacing : float, sequence of float, or sequence of sequences, optional
        Voxel size per spatial axis (axis 0 first), one float for all axes, or one such entry per batch
        element (a sequence of B sequences). Default 1: distances in voxels.
    include_background : bool
        Whether channel (class) 0 is included. Default False, as in MONAI.
    directed : bool
        Only ``pred -> target`` distances. Default False (symmetric).
    num_classes : int, optional
        Read ``pred`` and ``target`` as label maps with this many classes (background 0 included).

    Returns
    -------
    Tensor
        ``(B, C')`` float32 on the inputs' device, ``C' = C`` (or ``num_classes``) with the background, one
        less without it. Where exactly one of pred / target is empty for that class: ``inf`` with
        ``percentile=None``, ``nan`` with a percentile (as MONAI, whose ``torch.quantile`` of infinite
        distances is nan); ``nan`` where both are empty. A ``UserWarning`` names the empty (batch, class)
        pairs (MONAI warns per pair too).

    Notes
    -----
    Deliberate differences from MONAI: only the Euclidean metric; ``percentile=0`` gives the 0th percentile
    (the minimum) where MONAI treats 0 like None (the maximum); masks must be strictly binary (MONAI reads
    any value other than 1 as background); MONAI's ``ignore_index`` is not supported. As MONAI's, a one-hot
    input of a single channel (a binary mask) is scored whatever ``include_background`` says. Not
    differentiable.

    Raises
    ------
    TypeError
        A non-tensor or complex input; float label maps with ``num_classes``; a non-numeric ``percentile``.
    ValueError
        Shape or device mismatch; wrong rank; non-binary one-hot masks; labels outside ``[0, num_classes)``;
        ``percentile`` outside [0, 100]; bad ``spacing``.
    """
    q = _check_percentile(percentile)
    directed = py_scalar(directed)
    if not isinstance(directed, bool):
        raise TypeError(f"directed must be a bool, got {type(directed).__name__}")

    def per_chunk(p: torch.Tensor, t: torch.Tensor, sp: SpacingArg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = p.shape[0] * p.shape[1]
        forward, backward, n_p, n_t = _surface_distances(p, t, sp, both=not directed)

        def reduce(d: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return _segment_max(d, s, n) if q is None else _segment_quantile(d, s, n, q / 100, contiguous=True)

        result = reduce(*forward)
        if backward is not None:
            result = torch.maximum(result, reduce(*backward))
        # MONAI: inf distances; their max is inf, but torch.quantile of infs is nan
        return _fill_empty(result, n_p, n_t, math.inf if q is None else math.nan).view(p.shape[:2]), n_p, n_t

    source = _masks(pred, target, include_background, num_classes)
    return _chunked("hausdorff_distance", source, spacing, per_chunk)


def surface_distance(
    pred: torch.Tensor,
    target: torch.Tensor,
    spacing: SpacingArg = None,
    *,
    include_background: bool = False,
    symmetric: bool = False,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Average surface distance between predicted and target segmentations.

    Equals MONAI's ``compute_average_surface_distance(pred, target, include_background, symmetric,
    "euclidean", spacing)``: the mean of ``d(pred -> target)`` over the pred surface voxels, or with
    ``symmetric`` the mean over the union of ``d(pred -> target)`` and ``d(target -> pred)`` (i.e.
    ``(sum_pt + sum_tp) / (n_pred_surface + n_target_surface)``, the average symmetric surface distance).
    Surfaces and distances are defined as in :func:`hausdorff_distance`.

    Parameters
    ----------
    pred, target : Tensor
        One-hot ``(B, C, *spatial)`` masks, or label maps ``(B, *spatial)`` with ``num_classes``; 2 or 3
        spatial dims. See :func:`hausdorff_distance`.
    spacing : float, sequence of float, or sequence of sequences, optional
        Voxel size (see :func:`hausdorff_distance`). Default 1.
    include_background : bool
        Whether class 0 is included. Default False, as in MONAI.
    symmetric : bool
        Average symmetric surface distance. Default False (pred -> target only), as in MONAI.
    num_classes : int, optional
        Read the inputs as label maps with this many classes.

    Returns
    -------
    Tensor
        ``(B, C')`` float32 on the inputs' device, in units of ``spacing``; ``inf`` where exactly one mask is
        empty, ``nan`` where both are (with a ``UserWarning``), as in MONAI. Not differentiable (an evaluation
        metric of label maps).

    Notes
    -----
    The mean is accumulated in float64 (MONAI: float32). Other differences: see :func:`hausdorff_distance`.

    Raises
    ------
    TypeError, ValueError
        As :func:`hausdorff_distance`.
    """
    symmetric = py_scalar(symmetric)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")

    def per_chunk(p: torch.Tensor, t: torch.Tensor, sp: SpacingArg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        forward, backward, n_p, n_t = _surface_distances(p, t, sp, both=symmetric)
        total = torch.zeros(p.shape[0] * p.shape[1], dtype=torch.float64, device=p.device)
        total.index_add_(0, forward[1], forward[0].double())
        count = n_p.double()
        if backward is not None:
            total.index_add_(0, backward[1], backward[0].double())
            count = count + n_t.double()
        result = (total / count.clamp_min(1)).float()
        return _fill_empty(result, n_p, n_t).view(p.shape[:2]), n_p, n_t

    source = _masks(pred, target, include_background, num_classes)
    return _chunked("surface_distance", source, spacing, per_chunk)


def dice(
    pred_labels: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int | None = None,
    *,
    include_background: bool = True,
    ignore_empty: bool = True,
) -> torch.Tensor:
    """Hard Dice per batch element and class, from integer label maps.

    ``dice[b, c] = 2 |P_c & T_c| / (|P_c| + |T_c|)`` with ``P_c = (pred_labels[b] == c)`` and
    ``T_c = (target[b] == c)``, counted over the voxels where ``target != ignore_index``. Equals MONAI's
    ``DiceMetric(include_background, reduction="none", ignore_empty, num_classes, ignore_index)`` applied to
    the label maps with a channel axis, ``(pred_labels[:, None], target[:, None])``.

    Parameters
    ----------
    pred_labels, target : Tensor
        Integer (or bool) label maps ``(B, *spatial)``, any number of spatial dims, same shape and device.
        Values in ``[0, num_classes)``; ``ignore_index`` is also allowed in both.
    num_classes : int
        Number of classes, background (0) included (at most 2**20).
    ignore_index : int, optional
        Voxels where ``target == ignore_index`` are left out of every class (pred voxels there too). A
        ``pred_labels`` voxel equal to ``ignore_index`` (outside ``[0, num_classes)``) belongs to no class.
        If ``ignore_index`` is itself a class, that class has an empty target: see ``ignore_empty``.
    include_background : bool
        Whether class 0 is included (default True, as in MONAI's DiceMetric).
    ignore_empty : bool
        How a class absent from ``target`` (after ``ignore_index``) is scored: True (default, as MONAI):
        ``nan``, so that nan-aware means skip it; False: 1.0 if the class is also absent from the prediction,
        else 0.0.

    Returns
    -------
    Tensor
        ``(B, C')`` float32 on the inputs' device, ``C' = num_classes`` or ``num_classes - 1`` without the
        background. Hard (label-map) Dice: not differentiable; train with :func:`medfast.dice_loss`.

    Raises
    ------
    TypeError
        A non-tensor; a floating or complex label map; non-int ``num_classes`` / ``ignore_index``.
    ValueError
        Shape or device mismatch; fewer than 2 dims; labels outside ``[0, num_classes)`` other than
        ``ignore_index``; ``num_classes < 2`` without the background, or above 2**20.
    """
    include_background = py_scalar(include_background)
    if not isinstance(include_background, bool):
        raise TypeError(f"include_background must be a bool, got {type(include_background).__name__}")
    ignore_empty = py_scalar(ignore_empty)
    if not isinstance(ignore_empty, bool):
        raise TypeError(f"ignore_empty must be a bool, got {type(ignore_empty).__name__}")
    first = 0 if include_background else 1
    num_classes = check_int("num_classes", num_classes, 1 + first)
    if num_classes > _MAX_CLASSES:  # three counts and an output column per class: 2**63 overflowed unnamed
        raise ValueError(f"num_classes must be at most {_MAX_CLASSES}, got {num_classes}; label ids as large as an "
                         f"atlas's are scored over the ids present (as medfast evaluate does: map them to 0 .. K-1)")
    ignore_index = py_scalar(ignore_index)
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise TypeError(f"ignore_index must be an int or None, got {type(ignore_index).__name__}")
    pred_labels, target = _check_pair(pred_labels, target, "pred_labels", "target")
    if pred_labels.dim() < 2:
        raise ValueError(
            f"pred_labels must have shape (B, *spatial) (batch first, no channel axis), got "
            f"{tuple(pred_labels.shape)}"
        )
    pred_labels, target, _ = _dense_views(pred_labels, target, 1)  # counts do not depend on the voxel order
    _check_labels("pred_labels", pred_labels, num_classes, ignore_index)
    _check_labels("target", target, num_classes, ignore_index)

    n_t, n_p, n_tp = (x[:, first:] for x in _confusion_counts(pred_labels, target, num_classes, ignore_index))
    score = (2 * n_tp).double() / (n_t + n_p).double().clamp_min(1)
    if ignore_empty:
        empty = torch.full_like(score, math.nan)
    else:
        empty = (n_p == 0).double()
    return torch.where(n_t > 0, score, empty).float()
