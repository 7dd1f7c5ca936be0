"""The public operator API of medfast (re-exported as ``medfast.*``).

This package is the only place that knows the compiled schemas (``torch.ops.medfast.*``).
"""

# _ussim: the fake kernels and autograd of the ussim_* ops (the simulator's kernels) are registered with the
# others; without it, a direct torch.ops.medfast.ussim_* call after `import medfast` alone failed under
# FakeTensorMode / torch.compile and its backward silently gave no gradient.
from medfast.ops import _ussim  # noqa: F401
from medfast.ops._distance import distance_transform
from medfast.ops._lncc import lncc_loss, local_ncc
from medfast.ops._loss import cross_entropy, dice_ce_loss, dice_loss
from medfast.ops._transforms import compose, integrate, resample
from medfast.ops._warp import affine_warp, spline_coefficients, warp

__all__ = [
    "affine_warp",
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
