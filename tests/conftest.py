import pytest
import torch

SCIPY_MODE = {"zeros": "grid-constant", "border": "nearest", "reflection": "mirror"}
SCIPY_ORDER = {"nearest": 0, "linear": 1, "cubic": 3}
MODES = ("nearest", "linear", "cubic")
PADDINGS = ("zeros", "border", "reflection")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def identity_grid(shape, dtype=torch.float64):
    """(ndim, *shape) voxel coordinates."""
    return torch.stack(torch.meshgrid(*[torch.arange(n, dtype=dtype) for n in shape], indexing="ij"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
