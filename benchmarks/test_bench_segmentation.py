"""The segmentation suite (``bench_segmentation.py``) under pytest-benchmark: ``pytest
benchmarks/test_bench_segmentation.py --benchmark-only``.

The script's cases (``bench_segmentation.make_step``) on the same medfast UNet (channels 16..128): one training
step (forward, Dice+CE, backward, AdamW step) and the loss alone (forward + backward), with medfast's
``DiceCELoss`` against MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)``; batch 2, 4 classes (the
script's defaults); one group per case. Volume edge ``MEDFAST_BENCH_SIZE`` (default 32; a multiple of 8),
device ``MEDFAST_BENCH_DEVICE``, timed rounds ``MEDFAST_BENCH_ROUNDS`` (default 3); see ``pytest_common.py``.
Unlike the script, the two implementations are not interleaved step by step.
"""

from __future__ import annotations

from typing import Any

import bench_segmentation as bs
import pytest
import pytest_common as pc

SIZE = pc.size(32)
CLASSES, BATCH = 4, 2  # the script's defaults


@pytest.mark.parametrize("impl", bs.IMPLS)
@pytest.mark.parametrize("what", ("step", "loss"))
def test_segmentation(benchmark: Any, what: str, impl: str) -> None:
    pc.skip_unless_device()
    if impl == "monai":
        pc.skip_unless_installed("monai")
    step = bs.make_step(impl, what, SIZE, CLASSES, BATCH, pc.DEVICE)
    title = "UNet training step" if what == "step" else "Dice+CE loss fwd+bwd"
    group = f"segmentation {title} B={BATCH} {SIZE}^3 C={CLASSES} {pc.DEVICE}"
    pc.bench(benchmark, step, group, impl, size=SIZE, classes=CLASSES, batch=BATCH, what=what)
