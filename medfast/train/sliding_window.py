"""Sliding-window inference: run a network on overlapping patches of a volume larger than its training
patch and blend the patch outputs (Gaussian or constant weights)."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import overload

import torch

from medfast.data.io import byte_size
from medfast.ops._validate import check_shape, py_scalar

__all__ = ["importance_map", "sliding_window_inference", "window_memory_problem", "window_starts"]


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start indices of windows of length ``roi`` covering ``[0, size)`` with step ``roi * (1 - overlap)``
    (at least 1); the last window ends at ``size`` (MONAI's placement)."""
    if roi >= size:
        return [0]
    step = max(1, int(roi * (1 - overlap)))
    n = -(-(size - roi) // step) + 1
    return sorted({min(i * step, size - roi) for i in range(n)})


def _memory_of(device: torch.device) -> tuple[int, str] | None:
    """``(bytes, what)``: the memory a process can have on ``device`` at most (a CUDA device's total memory; on
    the CPU the machine's physical memory, or the address-space limit (RLIMIT_AS) when lower); None where
    unknown."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        index = device.index if device.index is not None else torch.cuda.current_device()
        return int(torch.cuda.get_device_properties(index).total_memory), f"that {device} has"
    if device.type != "cpu":
        return None
    try:
        total, what = int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE")), "this machine has"
    except (AttributeError, OSError, ValueError):
        return None
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY and soft < total:
            total, what = int(soft), "of this process' address-space limit (RLIMIT_AS)"
    except (ImportError, OSError, ValueError):
        pass
    return total, what


def _weight_bytes(roi: Sequence[int], mode: str) -> int:
    """The bytes of one window's float32 blending weights (the Gaussian's clamp is a second copy)."""
    return (2 if mode == "gaussian" else 1) * math.prod(int(r) for r in roi) * 4


def window_memory_problem(size: Sequence[int] | None, roi: Sequence[int], *, batch: int = 1, channels: int = 1,
                          out_channels: int = 1, sw_batch_size: int = 4, overlap: float | Sequence[float] = 0.5,
                          mode: str = "gaussian", itemsize: int = 4, device: torch.device | str = "cpu",
                          out_device: torch.device | str | None = None) -> str | None:
    """None when the buffers of :func:`sliding_window_inference` (windows of ``roi`` over a ``(batch, channels,
    *size)`` input, ``out_channels`` outputs; ``size`` None: any input, as small as one voxel per axis, which is
    padded to the window) fit in the memory of their devices; else why not, one line. Only
    what is allocated whatever the predictor does is counted (the input zero-padded to at least ``roi``, the
    window weights, one batch of windows and of their outputs, the blended sums and their weights), and the
    bound is the device's whole memory: a refused call could never have run (a window of 4096^3 voxels asked
    for 275 GB for its weights alone before the first window)."""
    device = torch.device(device)
    out_device = torch.device(out_device) if out_device is not None else device
    padded = [max(int(s), int(r)) for s, r in zip(size if size is not None else [1] * len(roi), roi)]
    overlaps = _per_axis("overlap", overlap, len(padded))
    windows = math.prod(len(window_starts(p, int(r), o)) for p, r, o in zip(padded, roi, overlaps))
    n = min(sw_batch_size, batch * windows)
    vol, win = math.prod(padded), math.prod(int(r) for r in roi)
    # on the input's device: the padded input and a batch of windows, the weights (and the Gaussian's clamped
    # copy), the batch's float32 outputs
    need = {device: (batch * channels * vol + n * channels * win) * itemsize
            + _weight_bytes(roi, mode) + n * out_channels * win * 4}
    need[out_device] = need.get(out_device, 0) + batch * (out_channels + 1) * vol * 4  # the float32 sums
    for dev, nbytes in need.items():
        have = _memory_of(dev)
        if have is not None and nbytes > have[0]:
            over = "any" if size is None else f"a {batch} x {channels} x {list(size)}"
            return (f"sliding windows of {list(roi)} voxels over {over} input need at least {byte_size(nbytes)} of "
                    f"{dev} memory (the input padded to {padded}, the window weights, {n} window(s) and their "
                    f"outputs, the blended sums), more than the {byte_size(have[0])} {have[1]}")
    return None


def importance_map(roi_size: Sequence[int], mode: str = "gaussian", sigma_scale: float | Sequence[float] = 0.125,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Blending weights of one window, ``(*roi_size)`` float32: all ones (``"constant"``) or a separable
    Gaussian centred on the window (``exp(-x^2 / (2 sigma^2))`` per axis, ``x`` from the window centre,
    ``sigma = sigma_scale * roi``, ``sigma_scale`` one number or one per axis), clamped below at
    ``max(min, 1e-3)`` so that window borders keep some weight (MONAI's ``compute_importance_map`` convention;
    the overall scale cancels in the blend)."""
    if mode not in ("gaussian", "constant"):
        raise ValueError(f"blend mode must be 'gaussian' or 'constant', got {mode!r}")
    try:
        nd = len(roi_size)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"roi_size must be a sequence of ints (one per axis), got {roi_size!r}") from None
    if nd == 0:
        raise ValueError("roi_size must have at least one axis, got ()")
    roi_size = check_shape("roi_size", roi_size, nd)
    have = _memory_of(torch.device(device))
    nbytes = _weight_bytes(roi_size, mode)
    if have is not None and nbytes > have[0]:
        raise ValueError(f"roi_size {tuple(roi_size)}: its weights need {byte_size(nbytes)} of {torch.device(device)} "
                         f"memory, more than the {byte_size(have[0])} {have[1]}")
    if mode == "constant":
        return torch.ones(roi_size, device=device, dtype=torch.float32)  # (not the default dtype)
    scales = _per_axis("sigma_scale", sigma_scale, nd)
    if not all(0 < x < math.inf for x in scales):
        raise ValueError(f"sigma_scale must be > 0 and finite, got {sigma_scale!r}")
    out = torch.ones((), device=device, dtype=torch.float32)
    for r, scale in zip(roi_size, scales):
        x = torch.arange(r, device=device, dtype=torch.float32) - (r - 1) / 2
        sigma = max(scale * r, 1e-6)
        out = out[..., None] * torch.exp(-0.5 * (x / sigma) ** 2)
    return out.clamp_min(max(out.min().item(), 1e-3))


def _per_axis(name: str, value: object, nd: int) -> list[float]:
    """A number or one per spatial axis, as a list of ``nd`` floats (NumPy scalars and 0-d tensors too)."""
    value = py_scalar(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] * nd
    try:
        values = [float(v) for v in value]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number or {nd} numbers (one per spatial axis), got {value!r}") from None
    if len(values) != nd:
        raise ValueError(f"{name} must be a number or {nd} numbers (one per spatial axis), got {value!r}")
    return values


def _window_output(y: object, n: int, roi: list[int], key: str) -> torch.Tensor:
    """A predictor output checked: a ``(n, K, *spatial)`` tensor (``key`` names it in errors)."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"predictor must return a tensor, a list / tuple (its first element is used) or a dict of "
                        f"tensors; {key} is {type(y).__name__}")
    if y.dim() != len(roi) + 2 or y.shape[0] != n:
        raise ValueError(f"predictor returned {key} of shape {tuple(y.shape)} for {n} windows of shape "
                         f"{tuple(roi)}: expected ({n}, K, *spatial) with {len(roi)} spatial axes")
    return y


# The result's type follows the predictor's: a tensor (or a list / tuple of them, deep supervision) gives a tensor,
# a mapping of tensors a dict. (An nn.Module's __call__ is typed as returning Any: the first overload.)
@overload
def sliding_window_inference(inputs: torch.Tensor, roi_size: Sequence[int] | int,
                             predictor: Callable[[torch.Tensor], torch.Tensor | Sequence[torch.Tensor]], *,
                             overlap: float | Sequence[float] = 0.5, mode: str = "gaussian", sw_batch_size: int = 4,
                             sigma_scale: float | Sequence[float] = 0.125,
                             out_device: torch.device | str | None = None) -> torch.Tensor: ...
@overload
def sliding_window_inference(inputs: torch.Tensor, roi_size: Sequence[int] | int,
                             predictor: Callable[[torch.Tensor], Mapping[str, torch.Tensor]], *,
                             overlap: float | Sequence[float] = 0.5, mode: str = "gaussian", sw_batch_size: int = 4,
                             sigma_scale: float | Sequence[float] = 0.125,
                             out_device: torch.device | str | None = None) -> dict[str, torch.Tensor]: ...
@overload
def sliding_window_inference(inputs: torch.Tensor, roi_size: Sequence[int] | int,
                             predictor: Callable[[torch.Tensor], object], *,
                             overlap: float | Sequence[float] = 0.5, mode: str = "gaussian", sw_batch_size: int = 4,
                             sigma_scale: float | Sequence[float] = 0.125,
                             out_device: torch.device | str | None = None
                             ) -> torch.Tensor | dict[str, torch.Tensor]: ...
def sliding_window_inference(inputs: torch.Tensor, roi_size: Sequence[int] | int,
                             predictor: Callable[[torch.Tensor], object], *,
                             overlap: float | Sequence[float] = 0.5, mode: str = "gaussian", sw_batch_size: int = 4,
                             sigma_scale: float | Sequence[float] = 0.125,
                             out_device: torch.device | str | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
    """Applies ``predictor`` to overlapping windows of ``inputs`` and blends the outputs (MONAI's
    ``sliding_window_inference``, same placement, weights and results).

    Parameters
    ----------
    inputs : Tensor
        ``(B, C, *S)`` (2 or 3 spatial dims) on the predictor's device.
    roi_size : int or sequence of int
        Window size (an int: on every axis); a non-positive size takes the input's size on that axis (MONAI's
        convention). Axes where ``S`` is smaller are zero-padded (symmetrically) and cropped back.
    predictor : callable
        ``(N, C, *roi) -> (N, K, *roi')`` (e.g. an ``nn.Module`` in eval mode). ``roi'`` may differ from ``roi``
        by a zoom (e.g. a network whose output is downsampled by 2): the output then has the input's size times
        that zoom, as in MONAI. A list/tuple output (deep supervision) uses its first element; a dict output
        gives a dict of blended outputs.
    overlap : float or sequence of float
        Fraction of overlap between neighbouring windows, in [0, 1) (one per axis, or one for all).
    mode : {"gaussian", "constant"}
        Blending weights (see :func:`importance_map`).
    sw_batch_size : int
        Windows per predictor call.
    sigma_scale : float or sequence of float
        Standard deviation of the ``"gaussian"`` weights as a fraction of the window size (MONAI's
        default, 0.125; one per axis, or one for all).
    out_device : device, optional
        Where the blended output is accumulated (default: the input's device); ``"cpu"`` saves GPU memory
        on large volumes.

    Returns
    -------
    Tensor or dict of Tensor
        ``(B, K, *S)`` float32 (``S`` times the predictor's zoom): the weighted average of the window outputs at
        every voxel. Differentiable as MONAI's (gradients reach the predictor's parameters and ``inputs``); call
        it under ``torch.no_grad()`` for inference (``medfast predict`` does).

    Raises
    ------
    ValueError
        For bad arguments, and naming ``roi_size`` before anything is allocated when the buffers could not fit
        in the memory of their devices (see :func:`window_memory_problem`; an input smaller than the window is
        padded to it, as in MONAI, so ``roi_size`` [4096] * 3 asked for terabytes).
    """
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a tensor (B, C, *spatial), got {type(inputs).__name__}")
    nd = inputs.dim() - 2
    if nd not in (2, 3):
        raise ValueError(f"inputs must be (B, C, *S) with 2 or 3 spatial dims, got shape {tuple(inputs.shape)}")
    if inputs.shape[0] == 0:
        raise ValueError(f"inputs has an empty batch: shape {tuple(inputs.shape)}")
    roi_f = _per_axis("roi_size", roi_size, nd)
    if any(not math.isfinite(r) or r != int(r) for r in roi_f):  # (int(nan) raised unnamed)
        raise ValueError(f"roi_size must be whole numbers, got {roi_size!r}")
    size = list(inputs.shape[2:])
    roi = [int(r) if r > 0 else s for r, s in zip(roi_f, size)]  # non-positive: the whole axis (MONAI)
    overlaps = _per_axis("overlap", overlap, nd)
    if not all(0 <= o < 1 for o in overlaps):
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    sigmas = _per_axis("sigma_scale", sigma_scale, nd)
    # (a sign typo clamped sigma to 1e-6: every weight 1e-3, a constant blend; NaN made every voxel NaN)
    if mode == "gaussian" and not all(0 < x < math.inf for x in sigmas):
        raise ValueError(f"sigma_scale must be > 0 and finite, got {sigma_scale!r}")
    sw_batch_size = py_scalar(sw_batch_size)
    if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be an int >= 1, got {sw_batch_size!r}")
    problem = window_memory_problem(size, roi, batch=inputs.shape[0], channels=inputs.shape[1],
                                    sw_batch_size=sw_batch_size, overlap=overlaps, mode=mode,
                                    itemsize=inputs.element_size(), device=inputs.device, out_device=out_device)
    if problem is not None:  # before the padded copy and the weights are allocated
        raise ValueError(f"roi_size {tuple(roi)}: {problem}")
    pad = [max(0, r - s) for r, s in zip(roi, size)]
    if any(pad):
        flat = []
        for p in reversed(pad):
            flat += [p // 2, p - p // 2]
        inputs = torch.nn.functional.pad(inputs, flat)
    padded = list(inputs.shape[2:])
    out_device = torch.device(out_device) if out_device is not None else inputs.device
    weight = importance_map(roi, mode, sigmas, inputs.device)
    starts = list(itertools.product(*[window_starts(s, r, o) for s, r, o in zip(padded, roi, overlaps)]))
    batch = inputs.shape[0]
    # per output (one, or one per dict key): the blended sums, the weight sums, the zoom and the window weights
    outs: dict[str, list] = {}
    jobs = [(b, st) for b in range(batch) for st in starts]
    for i in range(0, len(jobs), sw_batch_size):
        chunk = jobs[i:i + sw_batch_size]
        slices = [tuple(slice(s, s + r) for s, r in zip(st, roi)) for _, st in chunk]
        x = torch.stack([inputs[(b, slice(None), *sl)] for (b, _), sl in zip(chunk, slices)])
        y = predictor(x)
        if isinstance(y, (list, tuple)):
            if not y:
                raise ValueError("predictor returned an empty list / tuple")
            y = y[0]
        keyed = dict(y) if isinstance(y, dict) else {"": y}
        for key, yk in keyed.items():
            yk = _window_output(yk, len(chunk), roi, f"output {key!r}" if key else "an output")
            if key not in outs:
                zoom = [o / r for o, r in zip(yk.shape[2:], roi)]
                shape = [int(p * z) for p, z in zip(padded, zoom)]
                w = weight if list(yk.shape[2:]) == roi else torch.nn.functional.interpolate(
                    weight[None, None], list(yk.shape[2:]), mode="nearest-exact")[0, 0]
                f32 = {"device": out_device, "dtype": torch.float32}  # the float32 sums, whatever the default dtype
                outs[key] = [torch.zeros(batch, yk.shape[1], *shape, **f32), torch.zeros(batch, 1, *shape, **f32), zoom,
                             w, tuple(yk.shape[2:])]
            out, norm, zoom, w, win = outs[key]
            if tuple(yk.shape[2:]) != win:
                raise ValueError(f"predictor returned {f'output {key!r}' if key else 'an output'} of spatial shape "
                                 f"{tuple(yk.shape[2:])} for one window and {win} for another")
            yk = (yk.float() * w).to(out_device)
            wo = w.to(out_device)
            for k, ((b, _), sl) in enumerate(zip(chunk, slices)):
                osl = tuple(slice(int(s.start * z), int(s.start * z) + n) for s, z, n in zip(sl, zoom, win))
                out[(b, slice(None), *osl)] += yk[k]
                norm[(b, slice(None), *osl)] += wo
    result = {}
    for key, (out, norm, zoom, _, _) in outs.items():
        out = out / norm
        if any(pad):
            out = out[(..., *[slice(int(round(p // 2 * z)), int(round((p // 2 + s) * z)))
                              for p, s, z in zip(pad, size, zoom)])]
        result[key] = out
    return result[""] if "" in result else result
