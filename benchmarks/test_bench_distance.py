"""The distance suite (``bench_distance.py``) under pytest-benchmark: ``pytest benchmarks/test_bench_distance.py
--benchmark-only``.

``medfast.distance_transform`` on the script's bool mask (1 % background, spacing (1.5, 1.0, 0.8)) against the
script's peers (``bench_distance.edt_cases``): on the CPU scipy's and MONAI's ``distance_transform_edt``; on
CUDA CuPy's (skipped without CuPy), MONAI's (needs cuCIM) and scipy on the CPU for reference; one group. Volume
edge ``MEDFAST_BENCH_SIZE`` (default 64), device ``MEDFAST_BENCH_DEVICE``, timed rounds ``MEDFAST_BENCH_ROUNDS``
(default 3); see ``pytest_common.py``. Needs scipy.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import pytest_common as pc

pytest.importorskip("scipy")
import bench_distance  # noqa: E402  (imports scipy)

SIZE = pc.size(64)
BACKGROUND = 0.01  # the script's default
IMPLS = ("medfast", "cupy", "monai", "scipy (CPU)") if pc.DEVICE == "cuda" else ("medfast", "scipy", "monai")


@functools.lru_cache(maxsize=1)
def _cases(size: int, device: str) -> dict:
    return bench_distance.edt_cases(bench_distance.make_mask(size, BACKGROUND), device)


@pytest.mark.parametrize("impl", IMPLS, ids=[i.replace(" (CPU)", "-cpu") for i in IMPLS])
def test_distance(benchmark: Any, impl: str) -> None:
    pc.skip_unless_device()
    setup = _cases(SIZE, pc.DEVICE)[impl]
    if isinstance(setup, str):
        pytest.skip(setup)
    group = f"distance EDT {SIZE}^3 {BACKGROUND:g} background {pc.DEVICE}"
    pc.bench(benchmark, setup(), group, impl, size=SIZE, background=BACKGROUND)
