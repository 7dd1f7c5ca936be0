"""CUDA timing and memory helpers shared by the benchmark scripts (imported with the script's folder
on sys.path, as warp_cases is)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch


def cuda_event_times(fn: Callable[[], Any], repeats: int, warmup: int = 0) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of fn() between CUDA events on torch's current stream,
    after ``warmup`` untimed calls (fn's GPU work must be ordered with that stream)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def median(times: list[float]) -> float:
    return statistics.median(times)  # (the mean of the two middle values for an even count)


def cuda_median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 0) -> float:
    """Median of :func:`cuda_event_times`."""
    return median(cuda_event_times(fn, repeats, warmup))


def cuda_peak_mib(fn: Callable[[], Any]) -> float:
    """Peak CUDA allocation of one call of fn() above what was allocated before it, MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - base) / 2**20
