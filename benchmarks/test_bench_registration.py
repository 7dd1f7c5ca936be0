"""The registration suite (``bench_registration.py``) under pytest-benchmark: ``pytest
benchmarks/test_bench_registration.py --benchmark-only``.

The script's cases: LNCC forward + backward (box window k = 9), ``medfast.lncc_loss`` against MONAI's
``LocalNormalizedCrossCorrelationLoss(kernel_type="rectangular")`` (``bench_registration.lncc_case``), and one
LocalNet training step (forward, backward, Adam step; 8 initial channels) of the medfast build (medfast's
network path, ``medfast.warp`` + fused LNCC + bending energy) against the MONAI build (the stock ``torch.nn``
network path + MONAI's blocks) and MONAI's blocks on medfast's network (``bench_registration.train_step``). Volume edge
``MEDFAST_BENCH_SIZE`` for both (default 64 for LNCC, 32 for the step; a multiple of 8 for the step), device
``MEDFAST_BENCH_DEVICE``, timed rounds ``MEDFAST_BENCH_ROUNDS`` (default 3); see ``pytest_common.py``.
"""

from __future__ import annotations

from typing import Any

import bench_registration as br
import pytest
import pytest_common as pc

LNCC_SIZE = pc.size(64)
STEP_SIZE = pc.size(32)
KERNEL = 9  # the script's --kernel
STEP_CHANNELS = 8  # the script's --step-channels
IMPLS = ("medfast", "monai")


@pytest.mark.parametrize("impl", IMPLS)
def test_lncc(benchmark: Any, impl: str) -> None:
    pc.skip_unless_device()
    if impl == "monai":
        pc.skip_unless_installed("monai")
    step, _ = br.lncc_case(impl, LNCC_SIZE, KERNEL, pc.DEVICE)
    group = f"registration LNCC fwd+bwd {LNCC_SIZE}^3 k={KERNEL} {pc.DEVICE}"
    pc.bench(benchmark, step, group, impl, size=LNCC_SIZE, kernel=KERNEL)


@pytest.mark.parametrize("impl", br.STEP_BUILDS)
def test_train_step(benchmark: Any, impl: str) -> None:
    pc.skip_unless_device()
    if impl != "medfast":
        pc.skip_unless_installed("monai")
    step = br.train_step(impl, STEP_SIZE, STEP_CHANNELS, pc.DEVICE)
    group = f"registration LocalNet step {STEP_SIZE}^3 (LNCC + bending + warp) {pc.DEVICE}"
    pc.bench(benchmark, step, group, impl, size=STEP_SIZE, channels=STEP_CHANNELS)
