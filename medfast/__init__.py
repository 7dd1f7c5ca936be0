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

__version__ = "0.1.0"

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
