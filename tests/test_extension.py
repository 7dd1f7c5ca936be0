"""Loading the compiled extension: one clear error when it is missing or built for another torch."""

import shutil
import subprocess
import sys

import pytest
import torch

import medfast as mf


def _import_error(prelude: str) -> str:
    code = prelude + "\ntry:\n    import medfast\nexcept ImportError as e:\n    print('ERR', e)\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_missing_extension_says_how_to_rebuild():
    out = _import_error("import sys; sys.modules['medfast._C'] = None")
    assert out.startswith("ERR medfast's compiled extension could not be loaded")
    assert "pip install --no-build-isolation" in out


def test_other_torch_release_says_how_to_rebuild():
    out = _import_error("import torch; torch.__version__ = '1.0.0'")
    assert "medfast was built against torch" in out and "but torch 1.0.0 is installed" in out
    assert "pip install --no-build-isolation" in out


def test_a_build_that_does_not_load_names_the_torch_it_was_built_for():
    # a torch mismatch usually breaks loading _C itself (a missing CUDA library, an undefined symbol): the message
    # named only the installed torch and told a wheel user to rebuild "in the medfast source folder"
    out = _import_error(
        "import sys, importlib.machinery, importlib.metadata as md\n"
        "md.requires = lambda name: ['torch==2.99.*'] if name == 'medfast' else []\n"
        "class L:\n"
        "    def create_module(self, spec):\n"
        "        raise ImportError('libc10_cuda.so: cannot open shared object file: No such file or directory')\n"
        "    def exec_module(self, m): pass\n"
        "class F:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        return importlib.machinery.ModuleSpec(name, L()) if name == 'medfast._C' else None\n"
        "sys.meta_path.insert(0, F())")
    assert out.startswith("ERR medfast's compiled extension could not be loaded (libc10_cuda.so")
    assert f"built for torch 2.99, and torch {torch.__version__} is installed" in out
    assert "It is a CUDA build" in out and "From a wheel, install a medfast wheel built for torch" in out


@pytest.mark.parametrize("key", ["medfast", "torch", "torch_built_against", "cuda_kernels", "cuda_archs", "openmp",
                                 "cpu_simd", "cpu_threads", "gpu_visible"])
def test_build_info_keys(key):
    assert key in mf.build_info()


def test_cuda_variants_follow_the_environment(monkeypatch):
    monkeypatch.delenv("MEDFAST_USSIM_CUDA_MARCH", raising=False)
    monkeypatch.delenv("MEDFAST_USSIM_CUDA_SCATTER", raising=False)
    monkeypatch.delenv("MEDFAST_WARP_CUDA_SCATTER", raising=False)
    monkeypatch.delenv("MEDFAST_LOSS_CUDA_SUMS", raising=False)
    monkeypatch.delenv("MEDFAST_WARP_CUDA_FORWARD", raising=False)
    assert mf.build_info()["cuda_variants"] == {"ussim_march": "warp", "ussim_scatter": "merged",
                                                "warp_scatter": "auto", "warp_forward": "ilp1",
                                                "loss_sums": "warp"}
    monkeypatch.setenv("MEDFAST_USSIM_CUDA_MARCH", "thread")
    monkeypatch.setenv("MEDFAST_USSIM_CUDA_SCATTER", "plain")
    monkeypatch.setenv("MEDFAST_WARP_CUDA_SCATTER", "merged")
    monkeypatch.setenv("MEDFAST_LOSS_CUDA_SUMS", "thread")
    monkeypatch.setenv("MEDFAST_WARP_CUDA_FORWARD", "ilp4")
    assert mf.build_info()["cuda_variants"] == {"ussim_march": "thread", "ussim_scatter": "plain",
                                                "warp_scatter": "merged", "warp_forward": "ilp4",
                                                "loss_sums": "thread"}
    monkeypatch.setenv("MEDFAST_WARP_CUDA_FORWARD", "ilp8")  # not a variant: the default
    assert mf.build_info()["cuda_variants"]["warp_forward"] == "ilp1"
    monkeypatch.setenv("MEDFAST_WARP_CUDA_FORWARD", "one")
    assert mf.build_info()["cuda_variants"]["warp_forward"] == "one"
    monkeypatch.setenv("MEDFAST_WARP_CUDA_SCATTER", "plain")
    assert mf.build_info()["cuda_variants"]["warp_scatter"] == "plain"
    monkeypatch.setenv("MEDFAST_USSIM_CUDA_MARCH", "Thread")  # as the launchers read it: exact values only
    assert mf.build_info()["cuda_variants"]["ussim_march"] == "warp"
    monkeypatch.setenv("MEDFAST_USSIM_CUDA_SCATTER", "Plain")
    assert mf.build_info()["cuda_variants"]["ussim_scatter"] == "merged"
    monkeypatch.setenv("MEDFAST_USSIM_CUDA_SCATTER", "plain")
    assert mf.build_info()["cuda_variants"]["ussim_scatter"] == "plain"


def test_extension_has_no_cpp_runtime_of_its_own():
    # A libstdc++ linked into the extension (a g++ without a shared libstdc++, or -static-libstdc++)
    # beside the shared one torch uses crashed the process at the first number formatted into a
    # TORCH_CHECK message (an H200 build, 2026-11-27; reproduced with g++ 13 -static-libstdc++).
    # CMakeLists.txt links torch's shared libstdc++ and refuses such a build; this checks the result.
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    out = subprocess.run([nm, "-D", "--defined-only", mf._C.__file__], capture_output=True, text=True, check=True)
    defined = {line.split()[-1] for line in out.stdout.splitlines() if line.strip()}
    assert not defined & {"__cxa_throw", "__gxx_personality_v0", "__cxa_begin_catch", "_Unwind_RaiseException"}


def test_numbers_in_cpp_check_messages_reach_python():
    # the crash above happened while formatting an integer into the message (std::ostream)
    seeds = torch.rand(2, 5, 6, 7) < 0.1
    with pytest.raises(ValueError, match=r"query must have the seeds' shape \[2, 5, 6, 7\], got \[2, 3, 6, 7\]"):
        torch.ops.medfast.seed_distances(seeds, seeds[:, :3], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="spacing must have 2 entries, got 1"):
        torch.ops.medfast.distance_transform(torch.ones(1, 5, 5, dtype=torch.bool), [1.0], torch.float32)
