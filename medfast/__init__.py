"""medfast: fast, differentiable C++/CUDA operators for medical-image deep learning."""

from medfast._extension import build_info
from medfast.ops import (
    affine_warp,
    compose,
    cross_entropy,
    dice_ce_loss,
    dice_loss,
    distance_transform,
    integrate,
    lncc_loss,
    local_ncc,
    resample,
    spline_coefficients,
    warp,
)


def _distribution_version() -> str:
    """The installed distribution's version: a CPU-only release wheel carries a local label (``0.1.0+cpu``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medfast")
    except PackageNotFoundError:  # a source tree on PYTHONPATH, never installed
        return "0.1.0"


__version__ = _distribution_version()

__all__ = [
    "__version__",
    "affine_warp",
    "build_info",
    "compose",
    "cross_entropy",
    "dice_ce_loss",
    "dice_loss",
    "distance_transform",
    "integrate",
    "lncc_loss",
    "local_ncc",
    "resample",
    "spline_coefficients",
    "warp",
]
