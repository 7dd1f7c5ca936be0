"""The ultrasound suite (``bench_ultrasound.py``) under pytest-benchmark: ``pytest
benchmarks/test_bench_ultrasound.py --benchmark-only``.

The script's cases (``bench_ultrasound.make_step``): ``medfast.ultrasound.simulate`` of 256-line x 1024-sample
C5-2v frames from a CT-like volume, forward and forward + backward, 1 and 3 sub-rays, batch 1 on the CPU and
64 on CUDA (the script's defaults); one group per (pass, sub-rays). The peer, in the forward 3-sub-ray group
(the one the script compares with): pymust ``simus``, one plane-wave transmit over 250 scatterers (the
script's smallest count; ``bench_ultrasound.pymust_case``; CPU, skipped when pymust is not installed); it
yields the RF of one transmit, without beamforming, where medfast's call yields ``batch`` B-mode frames.
Volume edge ``MEDFAST_BENCH_SIZE`` (default 64), device ``MEDFAST_BENCH_DEVICE``, timed rounds
``MEDFAST_BENCH_ROUNDS`` (default 3); see ``pytest_common.py``.
"""

from __future__ import annotations

from typing import Any

import bench_ultrasound as bu
import pytest
import pytest_common as pc

SIZE = pc.size(64)
BATCH = 64 if pc.DEVICE == "cuda" else 1  # the script's default
SCATTERERS = 250  # the script's smallest pymust count
PASSES = ("forward", "forward_backward")
SUB_RAYS = (1, 3)


def _group(pass_: str, sub_rays: int) -> str:
    return f"ultrasound {pass_} sub_rays={sub_rays} B={BATCH} {SIZE}^3 {pc.DEVICE}"


@pytest.mark.parametrize("sub_rays", SUB_RAYS)
@pytest.mark.parametrize("pass_", PASSES)
def test_simulate(benchmark: Any, pass_: str, sub_rays: int) -> None:
    pc.skip_unless_device()
    step = bu.make_step(pass_, pc.DEVICE, BATCH, sub_rays, SIZE)
    pc.bench(benchmark, step, _group(pass_, sub_rays), "medfast", size=SIZE, batch=BATCH, sub_rays=sub_rays,
             frames_per_call=BATCH)


def test_pymust_simus(benchmark: Any) -> None:
    pc.skip_unless_installed("pymust")
    run = bu.pymust_case(SCATTERERS)
    run(5)  # the script's warm-up (first-call overheads), instead of a full warm-up round
    pc.bench(benchmark, run, _group("forward", 3), "pymust", device="cpu", warmup_rounds=0,
             scatterers=SCATTERERS, transmits=1, frames_per_call=1)
