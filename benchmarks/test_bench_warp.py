"""The warp cases under pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

One test per (implementation, configuration); pytest-benchmark groups medfast with its peers by
configuration. Volume edge ``MEDFAST_BENCH_SIZE`` (default 64), device ``MEDFAST_BENCH_DEVICE``
(default cpu), timed rounds ``MEDFAST_BENCH_ROUNDS`` (default 3). Peak memory and the ratio table
come from ``benchmarks/run_warp.py``, which isolates each case in its own process.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import warp_cases as wc

SIZE = int(os.environ.get("MEDFAST_BENCH_SIZE", "64"))
DEVICE = os.environ.get("MEDFAST_BENCH_DEVICE", "cpu")
ROUNDS = int(os.environ.get("MEDFAST_BENCH_ROUNDS", "3"))


def _params() -> list[Any]:
    """medfast once per configuration, then every peer case of the registry."""
    seen, params = set(), []
    for case in wc.cases(SIZE, DEVICE):
        if case.config not in seen:
            seen.add(case.config)
            params.append(pytest.param("medfast", case, id=f"{case.config}-medfast"))
        params.append(pytest.param(case.peer, case, id=f"{case.config}-{case.peer}"))
    return params


@pytest.mark.parametrize(("impl", "case"), _params())
def test_warp(benchmark: Any, impl: str, case: wc.Case) -> None:
    if case.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    wc.set_threads()
    inputs = wc.make_inputs(case)
    try:
        step = wc.make_step(impl, case, inputs)
    except wc.NotRun as e:
        pytest.skip(f"{e.status}: {e}")
    if case.device == "cuda":
        inner = step

        def step() -> Any:
            out = inner()
            torch.cuda.synchronize()
            return out

    benchmark.group = case.config
    benchmark.extra_info.update(impl=impl, **case.to_dict())
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
