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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
