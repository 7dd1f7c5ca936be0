"""The loss suite (``bench_loss.py``) under pytest-benchmark: ``pytest benchmarks/test_bench_loss.py --benchmark-only``.

Dice+CE forward + backward on the script's inputs and calls (``bench_loss.make_step``): medfast's fused
``DiceCELoss`` against MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` and the plain PyTorch softmax +
one-hot route, C = 4 and 16 classes, one group per (classes, dtype). Volume edge ``MEDFAST_BENCH_SIZE``
(default 64); batch and logits dtypes are the script's defaults for ``MEDFAST_BENCH_DEVICE`` (B = 1 float32 on
the CPU, B = 2 float32 and bfloat16 on CUDA); ``MEDFAST_BENCH_ROUNDS`` timed rounds (default 3). Peak memory
and the target column come from ``bench_loss.py`` (``medfast bench --only loss``). See ``pytest_common.py``.
"""

from __future__ import annotations

from typing import Any

import bench_loss
import pytest
import pytest_common as pc

SIZE = pc.size(64)
CLASSES = (4, 16)
DEFAULTS = bench_loss.parse_args(["--device", pc.DEVICE])  # the script's batch and dtypes on this device


def _params() -> list[Any]:
    return [pytest.param(impl, classes, dtype, id=f"C{classes}-{dtype}-{impl}")
            for dtype in DEFAULTS.dtypes for classes in CLASSES for impl in bench_loss.IMPLS]


@pytest.mark.parametrize(("impl", "classes", "dtype"), _params())
def test_loss(benchmark: Any, impl: str, classes: int, dtype: str) -> None:
    pc.skip_unless_device()
    pc.skip_unless_installed(*([bench_loss.REQUIRES[impl]] if impl in bench_loss.REQUIRES else []))
    step, _ = bench_loss.make_step(impl, SIZE, classes, DEFAULTS.batch, dtype, pc.DEVICE)
    group = f"loss Dice+CE fwd+bwd B={DEFAULTS.batch} {SIZE}^3 C={classes} {dtype} {pc.DEVICE}"
    pc.bench(benchmark, step, group, impl, size=SIZE, classes=classes, batch=DEFAULTS.batch, dtype=dtype)
