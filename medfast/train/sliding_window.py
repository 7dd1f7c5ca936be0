"""Sliding-window inference: run a network on overlapping patches of a volume larger than its training
patch and blend the patch outputs (Gaussian or constant weights)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

__all__ = ["importance_map", "sliding_window_inference", "window_starts"]


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start indices of windows of length ``roi`` covering ``[0, size)`` with step ``roi * (1 - overlap)``
    (at least 1); the last window ends at ``size`` (MONAI's placement)."""
    if roi >= size:
        return [0]
    step = max(1, int(roi * (1 - overlap)))
    n = -(-(size - roi) // step) + 1
    return sorted({min(i * step, size - roi) for i in range(n)})


def importance_map(roi_size: Sequence[int], mode: str = "gaussian", sigma_scale: float = 0.125,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Blending weights of one window, ``(*roi_size)`` float32: all ones (``"constant"``) or a separable
    Gaussian centred on the window (``exp(-x^2 / (2 sigma^2))`` per axis, ``x`` from the window centre,
    ``sigma = sigma_scale * roi``), clamped below at ``max(min, 1e-3)`` so that window borders keep some
    weight (MONAI's ``compute_importance_map`` convention; the overall scale cancels in the blend)."""
    if mode == "constant":
        return torch.ones(list(roi_size), device=device)
    if mode != "gaussian":
        raise ValueError(f"blend mode must be 'gaussian' or 'constant', got {mode!r}")
    out = torch.ones((), device=device)
    for r in roi_size:
        x = torch.arange(r, device=device, dtype=torch.float32) - (r - 1) / 2
        sigma = max(sigma_scale * r, 1e-6)
        out = out[..., None] * torch.exp(-0.5 * (x / sigma) ** 2)
    return out.clamp_min(max(out.min().item(), 1e-3))


@torch.no_grad()
def sliding_window_inference(inputs: torch.Tensor, roi_size: Sequence[int],
                             predictor: Callable[[torch.Tensor], torch.Tensor], *, overlap: float = 0.5,
                             mode: str = "gaussian", sw_batch_size: int = 4, sigma_scale: float = 0.125,
                             out_device: torch.device | str | None = None) -> torch.Tensor:
    """Applies ``predictor`` to overlapping windows of ``inputs`` and blends the outputs.

    Parameters
    ----------
    inputs : Tensor
        ``(B, C, *S)`` (2 or 3 spatial dims) on the predictor's device.
    roi_size : sequence of int
        Window size; axes where ``S`` is smaller are zero-padded (symmetrically) and cropped back.
    predictor : callable
        ``(N, C, *roi) -> (N, K, *roi)`` (e.g. an ``nn.Module`` in eval mode); a list/tuple output (deep
        supervision) uses its first element.
    overlap : float
        Fraction of overlap between neighbouring windows, in [0, 1).
    mode : {"gaussian", "constant"}
        Blending weights (see :func:`importance_map`).
    sw_batch_size : int
        Windows per predictor call.
    sigma_scale : float
        Standard deviation of the ``"gaussian"`` weights as a fraction of the window size (MONAI's
        default, 0.125).
    out_device : device, optional
        Where the blended output is accumulated (default: the input's device); ``"cpu"`` saves GPU memory
        on large volumes.

    Returns
    -------
    Tensor
        ``(B, K, *S)`` float32: the weighted average of the window outputs at every voxel.
    """
    nd = inputs.dim() - 2
    roi = [int(r) for r in roi_size]
    if nd not in (2, 3) or len(roi) != nd:
        raise ValueError(f"inputs must be (B, C, *S) with 2 or 3 spatial dims and roi_size {nd} ints; got "
                         f"{tuple(inputs.shape)} and {roi}")
    if any(r < 1 for r in roi):
        raise ValueError(f"roi_size must be positive sizes, got {roi}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    size = list(inputs.shape[2:])
    pad = [max(0, r - s) for r, s in zip(roi, size)]
    if any(pad):
        flat = []
        for p in reversed(pad):
            flat += [p // 2, p - p // 2]
        inputs = torch.nn.functional.pad(inputs, flat)
    padded = list(inputs.shape[2:])
    out_device = torch.device(out_device) if out_device is not None else inputs.device
    weight = importance_map(roi, mode, sigma_scale, inputs.device)
    starts = list(itertools.product(*[window_starts(s, r, overlap) for s, r in zip(padded, roi)]))
    batch = inputs.shape[0]
    out = norm = None
    jobs = [(b, st) for b in range(batch) for st in starts]
    for i in range(0, len(jobs), sw_batch_size):
        chunk = jobs[i:i + sw_batch_size]
        slices = [tuple(slice(s, s + r) for s, r in zip(st, roi)) for _, st in chunk]
        x = torch.stack([inputs[(b, slice(None), *sl)] for (b, _), sl in zip(chunk, slices)])
        y = predictor(x)
        if isinstance(y, (list, tuple)):
            y = y[0]
        y = (y.float() * weight).to(out_device)
        if out is None:
            out = torch.zeros(batch, y.shape[1], *padded, device=out_device)
            norm = torch.zeros(batch, 1, *padded, device=out_device)
        w = weight.to(out_device)
        for k, ((b, _), sl) in enumerate(zip(chunk, slices)):
            out[(b, slice(None), *sl)] += y[k]
            norm[(b, slice(None), *sl)] += w
    out = out / norm
    if any(pad):
        out = out[(..., *[slice(p // 2, p // 2 + s) for p, s in zip(pad, size)])]
    return out
