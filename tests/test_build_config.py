"""CMake configuration of the extension: CUDA settings that cannot work are refused at configure time, naming
the setting, instead of failing later inside CMake's CUDA setup or at import.

The CUDA compiler is a stand-in script that only answers ``--version`` (CMake's check_language is skipped
when CMAKE_CUDA_COMPILER is given), so these run on machines without a CUDA toolkit; each configure stops
before CUDA is enabled."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CMAKE = shutil.which("cmake", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))

pytestmark = [
    pytest.mark.skipif(CMAKE is None, reason="needs cmake"),
    pytest.mark.skipif(torch.version.cuda is None, reason="the CUDA settings are read only against a CUDA torch"),
]


def _fake_nvcc(folder: Path, release: str) -> Path:
    nvcc = folder / f"nvcc_{release}"
    nvcc.write_text(f'#!/bin/sh\necho "Cuda compilation tools, release {release}, V{release}.1"\n')
    nvcc.chmod(0o755)
    return nvcc


def _configure(build: Path, nvcc: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in ("MEDFAST_CUDA", "MEDFAST_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST", "CUDACXX")}
    cmd = [CMAKE, "-S", str(ROOT), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}",
           f"-DCMAKE_CUDA_COMPILER={nvcc}"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**base, **env}, timeout=600)
    r.log = " ".join((r.stdout + r.stderr).split())  # CMake wraps its messages
    return r


def test_unusable_cuda_settings_are_refused_by_name(tmp_path):
    torch_major = torch.version.cuda.split(".")[0]
    other = _fake_nvcc(tmp_path, f"{int(torch_major) - 1}.4")
    same = _fake_nvcc(tmp_path, f"{torch_major}.0")
    build = tmp_path / "build"  # one cache for all: the compiler checks run once

    # A toolkit of another CUDA major release than torch's: refused when CUDA is forced ...
    r = _configure(build, other, MEDFAST_CUDA="1")
    assert r.returncode != 0
    assert f"is CUDA {int(torch_major) - 1}.4 but torch" in r.log and f"CUDA {torch.version.cuda}" in r.log

    # A typo in an architecture list names its variable; an empty MEDFAST_CUDA_ARCHS counts as unset
    # (as in torch.utils.cpp_extension), so TORCH_CUDA_ARCH_LIST is the one read here.
    r = _configure(build, same, MEDFAST_CUDA="1", MEDFAST_CUDA_ARCHS="", TORCH_CUDA_ARCH_LIST="8.0;Hopper")
    assert r.returncode != 0
    assert "TORCH_CUDA_ARCH_LIST='8.0;Hopper': 'Hopper' is not a compute capability" in r.log

    r = _configure(build, same, MEDFAST_CUDA="1", MEDFAST_CUDA_ARCHS="9.0")
    assert r.returncode != 0
    assert "MEDFAST_CUDA_ARCHS='9.0': '9.0' is not a CUDA architecture" in r.log


def test_mismatched_toolkit_falls_back_to_a_cpu_build_when_cuda_is_not_forced(tmp_path):
    other = _fake_nvcc(tmp_path, f"{int(torch.version.cuda.split('.')[0]) - 1}.4")
    r = _configure(tmp_path / "build", other)
    assert r.returncode == 0, r.log[-2000:]
    assert "building CPU-only kernels: the CUDA compiler" in r.log
    assert "CUDA kernels OFF" in r.log
