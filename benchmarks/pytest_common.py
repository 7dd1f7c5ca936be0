"""What the pytest-benchmark tests of the suites (``benchmarks/test_bench_*.py``) share.

Environment (the same as ``test_bench_warp.py``):

* ``MEDFAST_BENCH_SIZE``: the volume edge of every suite; unset, each suite uses its own small default (see
  the docstring of its test module), so that ``pytest benchmarks --benchmark-only`` takes minutes on a CPU.
* ``MEDFAST_BENCH_DEVICE``: ``cpu`` (default) or ``cuda`` (tests skip without a GPU or without medfast's CUDA
  kernels; each timed call ends with ``torch.cuda.synchronize()``).
* ``MEDFAST_BENCH_ROUNDS``: timed rounds per test (default 3), after one untimed warm-up round.

Checked when this module is imported (``conftest.py`` imports it when pytest starts): another value is a
``pytest.UsageError`` naming the variable.

Each test is one (implementation, configuration); its pytest-benchmark group is the configuration, so medfast
and its peers sit together in the table. A peer that is not installed is skipped, not failed.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

DEVICES = ("cpu", "cuda")


def _positive_int(name: str) -> int | None:
    """The positive integer in environment variable ``name``, None when unset."""
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise pytest.UsageError(f"{name}={value!r}: expected a positive integer")
    return number


def _device() -> str:
    value = os.environ.get("MEDFAST_BENCH_DEVICE", "cpu")
    if value not in DEVICES:
        # another value ran the CPU path labelled with it ("gpu") or ended in a SystemExit of a script's parser
        raise pytest.UsageError(f"MEDFAST_BENCH_DEVICE={value!r}: expected one of {', '.join(DEVICES)}")
    return value


DEVICE = _device()
ROUNDS = _positive_int("MEDFAST_BENCH_ROUNDS") or 3
SIZE = _positive_int("MEDFAST_BENCH_SIZE")  # None: each suite's default


def size(default: int) -> int:
    """``MEDFAST_BENCH_SIZE`` when set, else the suite's ``default``."""
    return SIZE if SIZE is not None else default


def skip_unless_installed(*modules: str) -> None:
    """Skips the test when one of ``modules`` (the peer's packages) is not importable."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")


def skip_unless_device(device: str = DEVICE) -> None:
    """Skips a CUDA test without a GPU or with a medfast built without CUDA kernels."""
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        import medfast

        if not medfast.build_info().get("cuda_kernels"):
            pytest.skip("medfast was built without CUDA kernels")


def bench(benchmark: Any, step: Callable[[], Any], group: str, impl: str, device: str = DEVICE,
          warmup_rounds: int = 1, **extra: Any) -> Any:
    """Times step() (synchronized on CUDA) in ``group``: ``ROUNDS`` rounds of one call after ``warmup_rounds``."""
    if device == "cuda":
        inner = step

        def step() -> Any:
            out = inner()
            torch.cuda.synchronize()
            return out

    benchmark.group = group
    benchmark.extra_info.update(impl=impl, device=device, **extra)
    return benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=warmup_rounds, iterations=1)
