"""The classification suite (``bench_classification.py``) under pytest-benchmark: ``pytest
benchmarks/test_bench_classification.py --benchmark-only``.

The script's case (``bench_classification.make_case``) with the model and simulator of
``configs/cls_demo_cpu.yaml``: rendering one training batch of simulated ultrasound on the device against one
training step of the model on a batch (forward, loss, backward, optimizer update), in one group. Batch: the
config's (16); ``MEDFAST_BENCH_SIZE`` does not apply (the frame size is the config's). Two untimed warm-up
rounds as the script; device ``MEDFAST_BENCH_DEVICE``, timed rounds ``MEDFAST_BENCH_ROUNDS`` (default 3); see
``pytest_common.py``. Uses the packaged brains when installed, else phantom brains.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import bench_classification as bc
import pytest
import pytest_common as pc
import torch

CONFIG = bc.ROOT / "configs" / "cls_demo_cpu.yaml"
WARMUP = 2  # the script's


@functools.lru_cache(maxsize=1)
def _case(device: str) -> dict:
    return bc.make_case(str(CONFIG), torch.device(device), n_batches=WARMUP + pc.ROUNDS + 1)


@pytest.mark.parametrize("what", ("render", "step"))
def test_classification(benchmark: Any, what: str) -> None:
    pc.skip_unless_device()
    if not CONFIG.is_file():
        pytest.skip(f"{CONFIG} not found (an installed copy of the benchmarks has no configs/)")
    case = _case(pc.DEVICE)
    group = f"classification {Path(CONFIG).stem} B={case['batch']} render vs step {pc.DEVICE}"
    pc.bench(benchmark, case[what], group, what, warmup_rounds=WARMUP, batch=case["batch"],
             volumes=case["volumes"], model=case["cfg"].model.name)
