import contextlib
from pathlib import Path

import pytest
import torch

SCIPY_MODE = {"zeros": "grid-constant", "border": "nearest", "reflection": "mirror"}
SCIPY_ORDER = {"nearest": 0, "linear": 1, "cubic": 3}
MODES = ("nearest", "linear", "cubic")
PADDINGS = ("zeros", "border", "reflection")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def simd_and_generic(fn):
    """fn() with the CPU's AVX2 paths, then with the baseline code (medfast._C._set_cpu_simd); skips the
    test on a CPU without AVX2, where both would be the baseline."""
    import medfast as mf
    from medfast._extension import _C

    if mf.build_info()["cpu_simd"] != "avx2":
        pytest.skip("CPU without AVX2")
    try:
        fast = fn()
        _C._set_cpu_simd(False)
        slow = fn()
    finally:
        _C._set_cpu_simd(True)
    return fast, slow


def identity_grid(shape, dtype=torch.float64):
    """(ndim, *shape) voxel coordinates."""
    return torch.stack(torch.meshgrid(*[torch.arange(n, dtype=dtype) for n in shape], indexing="ij"))


@contextlib.contextmanager
def default_dtype(dtype):
    """torch's default dtype set to ``dtype`` for the block, restored after it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


TINY_SEGMENTATION_CONFIG = """
task: segmentation
data: {{root: {root}}}
model: {{channels: [2, 4], out_channels: 3}}
augment: {{patch_size: [8, 8, 8], deform_grid: 3}}
inference: {{roi_size: [8, 8, 8]}}
trainer: {{max_steps: {steps}, batch_size: 1, val_every: 0, checkpoint_every: {steps}, progress: false,
          tensorboard: false, plots: false, threads: 1, device: cpu}}
"""


def train_tiny_segmentation(base, steps):
    """Tiny blobs data in ``base / "data"``, its config ``base / "seg.yaml"``, trained ``steps`` steps by
    ``medfast train`` into ``base / "run"``; returns (data folder, config, checkpoint)."""
    from medfast.cli import main
    from medfast.data.synthetic import make_blobs

    make_blobs(base / "data", n=2, shape=(12, 12, 12), classes=3)
    cfg = base / "seg.yaml"
    cfg.write_text(TINY_SEGMENTATION_CONFIG.format(root=base / "data", steps=steps))
    assert main(["train", str(cfg), "--out", str(base / "run")]) == 0
    return base / "data", cfg, base / "run" / "checkpoints" / "last.pt"


#: tests that read the committed benchmark results (benchmarks/results/), which the sdist leaves out (several MB of
#: logs): skipped in an unpacked sdist, run in a checkout
needs_committed_results = pytest.mark.skipif(
    not (Path(__file__).resolve().parent.parent / "benchmarks" / "results").is_dir(),
    reason="the committed benchmark results (benchmarks/results/) are not in the sdist")
