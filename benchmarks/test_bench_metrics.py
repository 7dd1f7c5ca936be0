"""The metrics suite (``bench_metrics.py``) under pytest-benchmark: ``pytest benchmarks/test_bench_metrics.py
--benchmark-only``.

The script's cases and calls (``bench_metrics.make_cases``): Hausdorff-95 of medfast.metrics against
``monai.metrics.compute_hausdorff_distance`` on the blob pair, a near-identical pair and two disjoint balls
(one-hot (1, 2, S, S, S) masks, spacing (1.5, 1.0, 0.8)) and on an 8-class pair (one-hot (1, 9, S, S, S)),
and hard Dice against ``monai.metrics.DiceMetric``; one group per case. Volume edge ``MEDFAST_BENCH_SIZE``
(default 64), device ``MEDFAST_BENCH_DEVICE``, timed rounds ``MEDFAST_BENCH_ROUNDS`` (default 3); see
``pytest_common.py``. Needs scipy (the inputs).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
import pytest_common as pc

pytest.importorskip("scipy")
import bench_metrics  # noqa: E402  (imports scipy)
import torch  # noqa: E402

SIZE = pc.size(64)
CASES = ("hausdorff95", "hausdorff95 near-identical", "hausdorff95 disjoint balls", "hausdorff95 8 classes", "dice")
IMPLS = ("medfast", "monai")


@functools.lru_cache(maxsize=1)
def _cases(size: int, device: str) -> dict:
    return bench_metrics.make_cases(size, torch.device(device))[0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c.replace(" ", "_") for c in CASES])
def test_metrics(benchmark: Any, case: str, impl: str) -> None:
    pc.skip_unless_device()
    if impl == "monai":
        pc.skip_unless_installed("monai")
    fn = _cases(SIZE, pc.DEVICE)[case][impl]
    with warnings.catch_warnings():  # as the script: MONAI's warnings are not the benchmark's
        warnings.simplefilter("ignore")
        pc.bench(benchmark, fn, f"metrics {case} {SIZE}^3 {pc.DEVICE}", impl, size=SIZE, case=case)
