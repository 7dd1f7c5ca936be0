"""One device rule for every command (medfast._device): ``auto`` takes the GPU only where medfast's CUDA kernels
are usable, ``cuda:N`` past the visible GPUs is refused by name, and under torchrun a ``cuda:N`` that is not the
process's own GPU is refused (every rank would take GPU N). Simulated here with a patched torch.cuda (no GPU)."""

from __future__ import annotations

import pytest
import torch

from medfast.tasks.registration import RegistrationError
from medfast.tasks.registration import _device as register_device
from medfast.train.config import ConfigError
from medfast.train.trainer import resolve_device
from medfast.ultrasound.cli import SimulateError
from medfast.ultrasound.cli import _pick_device as simulate_device


@pytest.fixture
def gpus(monkeypatch):
    """Pretends ``n`` GPUs are visible and medfast was built with (``kernels``) or without its CUDA kernels."""

    import medfast._extension as ext

    def set_(n: int, kernels: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(ext, "cuda_kernels_built", lambda: kernels)

    return set_


def test_auto_takes_the_gpu_only_with_the_cuda_kernels(gpus, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    gpus(2, kernels=True)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert register_device("auto") == torch.device("cuda", 0)
    assert simulate_device("auto") == torch.device("cuda", 0)
    gpus(2, kernels=False)  # a CPU-only build on a GPU machine: every task's ops would fail on the GPU
    for pick in (resolve_device, register_device, simulate_device):
        assert pick("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="trainer.device='cuda' but medfast was built without CUDA kernels"):
        resolve_device("cuda")
    with pytest.raises(SimulateError, match="--device='cuda' but medfast was built without CUDA kernels"):
        simulate_device("cuda")


def test_a_gpu_index_past_the_visible_ones_is_named(gpus):
    gpus(1)
    with pytest.raises(ConfigError, match=r"--device='cuda:3' but only 1 CUDA GPU\(s\) are visible"):
        resolve_device("cuda:3", "--device")
    with pytest.raises(RegistrationError, match=r"--device='cuda:3' but only 1 CUDA GPU\(s\) are visible"):
        register_device("cuda:3")
    from argparse import Namespace

    from medfast.tasks.evaluation import run_evaluate

    with pytest.raises(SystemExit, match=r"medfast evaluate: error: --device='cuda:3' but only 1 CUDA GPU\(s\)"):
        run_evaluate(Namespace(pred="p", ref="r", device="cuda:3", num_classes=None, percentile=95.0, out=None,
                               spacing=None, include_background=False))


def test_under_torchrun_a_fixed_gpu_index_must_be_the_process_own(gpus, monkeypatch):
    gpus(2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="trainer.device='cuda:0' names one GPU for all 2 processes"):
        resolve_device("cuda:0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # one process: any visible GPU
