"""Registration task: instance optimization (affine, then deformable), trained-model inference,
the ``medfast register`` command and the Colin27 -> MNI152 demo.

Conventions. A transform is the map from fixed voxel ``x`` to the moving position ``theta @ [x; 1] + u(x)``
expressed in the FIXED grid's voxel coordinates (the moving image as its header places it on the fixed grid):
an affine ``theta`` ``(1, n, n + 1)`` and a displacement ``u`` ``(1, n, *S)`` in fixed voxels. The total
displacement field written out is ``ddf(x) = theta @ [x; 1] + u(x) - x``. The moving image is not resampled
onto the fixed grid first (that cut it to the fixed field of view and interpolated it twice): given both
images' voxel-to-mm affines, the header map ``P = A_m^-1 A_f`` is folded into the sampling, so the optimization
and the warped image read the native moving array once, at moving voxel ``P @ [theta @ [x; 1] + u(x); 1]``,
in one :func:`medfast.affine_warp` call (as ITK / ANTs sample the moving image in its own grid).

The affine is optimized in centred coordinates ``y = (x - c) / h`` (``c`` the image centre, ``h``
its half size, in full-resolution voxels), so one set of parameters serves every resolution level.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import numbers
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import medfast as mf
from medfast._atomic import replacing
from medfast._jsonsafe import dumps as json_dumps
from medfast.data.io import DatasetError, check_label_values, nifti_header, same_grid
from medfast.data.preprocess import REORIENT_DIMS, reorient_dims_of
from medfast.losses.registration import bending_energy, label_dice_loss
from medfast.nets.registration import GlobalNet, LocalNet, _check_levels, affine_ddf
from medfast.ops._transforms import _MAX_STEPS
from medfast.ops._validate import position_dtype, py_scalar
from medfast.train.config import ConfigError, _build, check_network_input, check_spatial_config
from medfast.train.task import Task, register_task

COLIN27_PATH = Path("/usr/share/mricron/templates/ch2bet.nii.gz")
MNI_T1_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


__all__ = [
    "ModelInfo",
    "PairDataset",
    "RegistrationConfig",
    "RegistrationError",
    "RegistrationNet",
    "RegistrationResult",
    "RegistrationTask",
    "RegistrationTaskArgs",
    "configure_register_parser",
    "dice_per_label",
    "grid_affines",
    "kmeans_tissues",
    "level_resample",
    "level_theta",
    "load_ddf",
    "load_model",
    "load_model_info",
    "load_nifti",
    "load_trainer_checkpoint",
    "mni_t1_path",
    "network_grid",
    "normalize_intensity",
    "random_affine",
    "register_pair",
    "register_with_model",
    "run_register",
    "run_registration_demo",
    "save_model",
    "save_overlay",
    "to_fixed_grid",
    "write_outputs",
]


class RegistrationError(RuntimeError):
    """A user-facing problem (missing file, mismatched inputs): reported without a traceback."""


# ---------------------------------------------------------------------------------------------
# Configuration and result
# ---------------------------------------------------------------------------------------------


@dataclass
class RegistrationConfig:
    """Instance-optimization settings.

    Attributes
    ----------
    affine_levels, deform_levels : tuple of int
        Down-sampling factors of the affine and deformable stages, coarse to fine (empty: skip).
    affine_iters, deform_iters : int
        Adam iterations per level.
    affine_lr : float
        Initial learning rate of the centred affine parameters (1 = half the image size for a translation);
        Adam, decayed along a half cosine to 1 % within each level. The best-loss parameters of the last level
        are kept, and the identity (no affine) is kept instead when they score a worse full-resolution LNCC
        than it (``metrics["affine_kept"]``).
    deform_lr : float
        Learning rate of the displacement in full-resolution voxels (level ``f`` optimizes its field, in its own
        voxels, at ``deform_lr / f``).
    kernel_size : int
        LNCC window (voxels of each level).
    bending_weight : float
        Weight of the bending energy of the displacement (per level, in the level's voxels).
    dice_weight : float
        Weight of the label Dice term (weak supervision; used only when both label maps are given).
    velocity : bool
        Optimize a stationary velocity field integrated by scaling and squaring. Diffeomorphic only in the
        continuum: the discrete result can still fold at a low ``bending_weight`` (0.1), as can a plain
        displacement; ``metrics["folding_percent"]`` reports it for every deformable run.
    integration_steps : int
        Squarings of :func:`medfast.integrate` (0 to 64).
    """

    # full resolution included: stopping at level 2 left the affine 2x less accurate (0.5-1.2 mm against 0.02-0.5 mm
    # TRE on known affines of the 4 mm MNI152)
    affine_levels: tuple[int, ...] = (4, 2, 1)
    affine_iters: int = 80
    affine_lr: float = 0.01
    deform_levels: tuple[int, ...] = (4, 2, 1)
    deform_iters: int = 60
    deform_lr: float = 0.2
    kernel_size: int = 7
    bending_weight: float = 1.0
    dice_weight: float = 0.0
    velocity: bool = False
    integration_steps: int = 7

    def __post_init__(self) -> None:
        def integer(name: str, value: object) -> int:
            value = py_scalar(value)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an int, got {value!r}")
            return int(value)

        for name in ("affine_levels", "deform_levels"):
            levels = tuple(integer(name, v) for v in getattr(self, name))
            if any(v < 1 for v in levels):
                raise ValueError(f"{name} must be positive down-sampling factors, got {levels}")
            setattr(self, name, levels)
        for name in ("affine_iters", "deform_iters", "integration_steps", "kernel_size"):
            setattr(self, name, integer(name, getattr(self, name)))
        for name in ("affine_iters", "deform_iters", "integration_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.integration_steps > _MAX_STEPS:  # medfast.integrate's limit: fail now, not after the affine stage
            raise ValueError(f"integration_steps must be in 0..{_MAX_STEPS}, got {self.integration_steps!r}")
        # NaN fails every comparison: `not 0 <= w < inf` refuses it (`w < 0` let a NaN weight through, and
        # `w > 0` then dropped the term as if it were 0)
        for name in ("affine_lr", "deform_lr"):
            value = py_scalar(getattr(self, name))
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("bending_weight", "dice_weight"):
            value = py_scalar(getattr(self, name))
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {self.kernel_size!r}")


@dataclass
class RegistrationResult:
    """Output of :func:`register_pair`.

    Attributes
    ----------
    theta : Tensor
        ``(1, n, n + 1)`` affine, fixed voxel -> moving position in fixed-grid voxel coordinates (the moving
        image as its header places it on the fixed grid; with :func:`register_pair`'s ``fixed_affine`` /
        ``moving_affine`` the moving array voxel is ``A_m^-1 A_f @ [theta @ [x; 1]; 1]``).
    ddf : Tensor
        ``(1, n, *S)`` total displacement (affine included), voxels of the fixed grid, same frame as ``theta``:
        moving position ``x + ddf(x)``.
    warped : Tensor
        ``(1, C, *S)`` moving image warped onto the fixed image.
    warped_labels : Tensor or None
        ``(*S)`` int64 moving labels warped (nearest).
    metrics : dict
        Dice (mean over the fixed image's foreground labels) and LNCC before / after affine / after
        deformable, stage times in seconds, loss history, ``overlap_before`` (the fraction of the fixed
        foreground that the header alignment places inside the moving image), ``affine_kept`` and, after a
        deformable stage, ``folding_percent`` (voxels of the fixed grid where the Jacobian determinant of
        ``x + ddf(x)``, central differences, is <= 0, in percent).
    """

    theta: torch.Tensor
    ddf: torch.Tensor
    warped: torch.Tensor
    warped_labels: torch.Tensor | None
    metrics: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _as_image(x: Any, name: str, spatial_dims: int | None = None) -> torch.Tensor:
    """``(*S)``, ``(C, *S)`` or ``(1, C, *S)`` array -> ``(1, C, *S)`` finite float32 tensor. Without
    ``spatial_dims`` a 2-d array is a 2D image and 3 to 5 dims are the 3D forms (a 4-d array is
    ``(C, D, H, W)``); 2D images with channels need ``spatial_dims=2``."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or ndarray, got {type(x).__name__}")
    x = x.float()  # registration runs in float32 (the affine parameters too)
    nd = spatial_dims if spatial_dims is not None else (2 if x.dim() == 2 else 3)
    if nd not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    extra = x.dim() - nd
    if extra == 0:
        x = x[None, None]
    elif extra == 1:
        x = x[None]
    if x.dim() != nd + 2 or x.shape[0] != 1:
        raise ValueError(f"{name} must have shape (*S), (C, *S) or (1, C, *S) with {nd} spatial dims, "
                         f"got {tuple(x.shape)}")
    if nd == 3 and 1 in x.shape[2:]:
        raise ValueError(f"{name} has a spatial axis of size 1 ({tuple(x.shape[2:])} as a 3D image); a 2D image "
                         "with channels, (C, H, W) or (1, C, H, W), needs spatial_dims=2")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values (replace them first, e.g. np.nan_to_num, as "
                         "medfast register does when it reads a NIfTI file)")
    return x


def _as_labels(x: Any, name: str, shape: Sequence[int]) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or ndarray, got {type(x).__name__}")
    x = x.reshape(x.shape[-len(shape):]) if x.dim() > len(shape) and all(s == 1 for s in x.shape[:-len(shape)]) else x
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have the image's spatial shape {tuple(shape)}, got {tuple(x.shape)}")
    if x.is_floating_point():
        if not torch.equal(x, x.round()):
            raise ValueError(f"{name} must hold integer labels")
    return x.round().long() if x.is_floating_point() else x.long()


def normalize_intensity(x: torch.Tensor, lo_pct: float = 0.5, hi_pct: float = 99.5, *,
                        spatial_dims: int | None = None) -> torch.Tensor:
    """Maps ``[lo, hi]`` to [0, 1] (clamped), **each channel separately**: ``lo`` the ``lo_pct`` percentile of
    the channel's voxels (the background level of a masked image), ``hi`` the ``hi_pct`` percentile of its
    voxels above ``lo``.

    ``x`` is ``(*S)``, ``(C, *S)`` or ``(B, C, *S)``: every index of the axes before the ``spatial_dims``
    trailing spatial axes (each channel of each image) gets its own ``lo`` / ``hi``, so the modalities of a
    multi-channel image (T1 in the thousands, FLAIR in the tens) each span [0, 1] and each drives LNCC.
    ``spatial_dims`` defaults as in :func:`register_pair`: 2 for a 2-d array, else 3 (a 3-d array is one 3D
    image, a 4-d one ``(C, D, H, W)``); 2D images with channels need ``spatial_dims=2``. A single-channel image
    gives exactly what one percentile pair over all its voxels gives.
    """

    def pct(v: torch.Tensor, q: float) -> torch.Tensor:
        if v.numel() > 2_000_000:  # torch.quantile's size limit; a fixed subsample is plenty
            idx = torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[:2_000_000]
            v = v[idx.to(v.device)]
        return torch.quantile(v.float(), q / 100)

    def one(c: torch.Tensor) -> torch.Tensor:
        flat = c.flatten()
        lo = pct(flat, lo_pct)
        above = flat[flat > lo]
        hi = pct(above, hi_pct) if above.numel() else lo + 1
        scale = float(hi - lo) if hi > lo else 1.0
        return ((c - lo) / scale).clamp(0, 1)

    nd = spatial_dims if spatial_dims is not None else (2 if x.dim() == 2 else 3)
    if nd not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if x.dim() <= nd or math.prod(x.shape[:x.dim() - nd]) <= 1:  # one channel: one percentile pair, all voxels
        return one(x)
    flat = x.reshape(-1, *x.shape[x.dim() - nd:])
    return torch.stack([one(c) for c in flat]).reshape(x.shape)


def _down(x: torch.Tensor, f: int | Sequence[int]) -> torch.Tensor:
    """Average-pools by ``f`` (one factor, or one per spatial axis), ceil mode."""
    if all(v == 1 for v in (f if isinstance(f, Sequence) else [f])):
        return x
    pool = F.avg_pool3d if x.dim() == 5 else F.avg_pool2d
    return pool(x, f, ceil_mode=True, count_include_pad=False)


# header overlap (fraction of the fixed foreground inside the moving image) below which register_pair refuses the
# pair (ITK: "All samples map outside moving image buffer"), and below which it warns
_MIN_OVERLAP = 0.02
_WARN_OVERLAP = 0.5
# the affine learning rate decays along a half cosine to this fraction of affine_lr within each level
_AFFINE_LR_END = 0.01


class _NoOverlapError(RegistrationError):
    """The header alignment places (almost) none of the fixed image inside the moving image."""


class _OverlapWarning(UserWarning):
    """The header alignment places less than half the fixed foreground inside the moving image."""


def _level_box(f: int | Sequence[int], n: int) -> np.ndarray:
    """``(n + 1, n + 1)`` map from level voxel ``i`` to full-resolution voxel ``x = f i + (f - 1) / 2``."""
    fv = np.broadcast_to(np.asarray(f, dtype=np.float64), (n,))
    d = np.eye(n + 1)
    d[:n, :n] = np.diag(fv)
    d[:n, n] = (fv - 1) / 2
    return d


def _grid_map(fixed_affine: Any, moving_affine: Any, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(A_m^-1 A_f, ratio)``: the map fixed voxel -> moving array voxel, and per moving axis the fixed image's
    finest voxel size over the moving voxel size; None for images on one grid."""
    if fixed_affine is None and moving_affine is None:
        return None
    if fixed_affine is None or moving_affine is None:
        raise ValueError("give both fixed_affine and moving_affine (voxel-to-mm), or neither")
    mats = []
    for name, a in (("fixed_affine", fixed_affine), ("moving_affine", moving_affine)):
        a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
        if a.shape != (n + 1, n + 1) or not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:n, :n])) < 1e-12:
            raise ValueError(f"{name} must be a finite invertible ({n + 1}, {n + 1}) voxel-to-mm affine, got "
                             f"{a.tolist()}")
        mats.append(a)
    size = [np.sqrt((a[:n, :n] ** 2).sum(axis=0)) for a in mats]
    return np.linalg.solve(mats[1], mats[0]), size[0].min() / size[1]


def _moving_factors(f: int, grid: tuple[np.ndarray, np.ndarray] | None, mshape: Sequence[int]) -> tuple[int, ...]:
    """Pooling factors of the moving image's axes at level ``f``: its voxels about as large as the level's (the
    fixed image's finest voxel times ``f``), at most the axis; ``f`` on every axis for images on one grid."""
    if grid is None:
        return (f,) * len(mshape)
    return tuple(int(min(m, max(1, round(f * r)))) for m, r in zip(mshape, grid[1]))


def _sample_moving(moving: torch.Tensor, theta: torch.Tensor, u: torch.Tensor | None, q: torch.Tensor | None,
                   shape: Sequence[int], mode: str = "linear") -> torch.Tensor:
    """``moving`` sampled on a fixed(-level) grid of ``shape`` at ``q @ [theta @ [x; 1] + u(x); 1]``: ``theta``
    and ``u`` in fixed-grid voxels, ``q`` ``(n, n + 1)`` (float64) the map from there to ``moving``'s voxels
    (None: the identity, images on one grid). One :func:`medfast.affine_warp` call."""
    if q is not None:
        n = q.shape[0]
        theta = (q[:, :n] @ theta.double()).to(theta.dtype)
        theta = torch.cat([theta[..., :n], theta[..., n:] + q[:, n:].to(theta.dtype)], -1)
        if u is not None:
            u = torch.einsum("ij,bj...->bi...", q[:, :n].to(u.dtype), u)
    if u is not None:
        return mf.affine_warp(moving, theta, ddf=u, mode=mode)
    return mf.affine_warp(moving, theta, shape=tuple(shape), mode=mode)


def _header_overlap(fixed: torch.Tensor, mshape: Sequence[int], q: torch.Tensor | None, method: str) -> float:
    """The fraction of the fixed foreground (voxels of the normalized ``fixed`` above 0 in any channel; all of it
    when blank) that the header map ``q`` (as in :func:`_sample_moving`) places inside a moving array of spatial
    shape ``mshape``. Raises :class:`_NoOverlapError` under ``_MIN_OVERLAP`` (none means nothing to register: the
    warped image would be all zero) and warns (:class:`_OverlapWarning`) under ``_WARN_OVERLAP`` that ``method``
    may not find the alignment; for :func:`register_pair` and :func:`register_with_model`."""
    shape = tuple(fixed.shape[2:])
    n = len(shape)
    with torch.no_grad():
        fg = (fixed > 0).any(1, keepdim=True).float()
        if not bool(fg.any()):
            fg = torch.ones_like(fg)
        identity = torch.eye(n, n + 1, device=fixed.device)[None]
        cover = _sample_moving(torch.ones(1, 1, *mshape, device=fixed.device), level_theta(identity, shape, 1), None,
                               q, shape)
        overlap = float((cover * fg).sum() / fg.sum())
    if overlap < _MIN_OVERLAP:
        raise _NoOverlapError(f"the images do not overlap: by their affines (headers) only {100 * overlap:.2g} % of "
                              f"the fixed image's foreground lies inside the moving image, so there is nothing to "
                              f"register (ITK: 'All samples map outside moving image buffer'); check the headers "
                              f"(origin, orientation), or align the images first")
    if overlap < _WARN_OVERLAP:
        import warnings

        warnings.warn(f"only {100 * overlap:.0f} % of the fixed image's foreground lies inside the moving image by "
                      f"their affines (headers): {method} may not find the alignment", _OverlapWarning,
                      stacklevel=3)  # the caller of register_pair / register_with_model
    return overlap


def _folding_percent(ddf: torch.Tensor) -> float:
    """Percent of the voxels where the Jacobian determinant of ``x + ddf(x)`` (central differences, one-sided at
    the border, as ``np.gradient``) is <= 0; ``ddf`` ``(1, n, *S)`` in voxels."""
    n = ddf.shape[1]
    u = ddf[0].detach()
    size = u.shape[1]
    step = max(1, 2 ** 20 // max(1, math.prod(u.shape[2:])))  # slabs of ~1M voxels: the float64 Jacobians are 9x
    folded = 0
    for a in range(0, size, step):
        b = min(a + step, size)
        lo, hi = max(a - 1, 0), min(b + 1, size)  # one neighbour slice each side: the same central differences
        slab = u[:, lo:hi].double()
        if slab.shape[1] < 2:  # (an axis of one voxel cannot occur: register_pair refuses it)
            continue
        jac = torch.stack([torch.stack(torch.gradient(slab[i], dim=list(range(n))), 0) for i in range(n)], 0)
        jac = jac[:, :, a - lo:a - lo + b - a] + torch.eye(n, dtype=jac.dtype, device=jac.device).reshape(
            n, n, *([1] * n))
        det = torch.linalg.det(jac.movedim(0, -1).movedim(0, -1))
        folded += int((~(det > 0)).sum())  # a NaN / inf field (a diverged run) counts as folded, not regular
    return 100.0 * folded / math.prod(u.shape[1:])


def _centre_scale(shape: Sequence[int], dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.tensor([(s - 1) / 2 for s in shape], dtype=dtype, device=device)
    h = torch.tensor([max(s - 1, 1) / 2 for s in shape], dtype=dtype, device=device)
    return c, h


def _factor(name: str, f: object) -> int:
    """A down-sampling factor: an int >= 1 (0 divided by zero, NaN gave a NaN theta without a word)."""
    if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 1:
        raise ValueError(f"{name} must be a down-sampling factor, an int >= 1, got {f!r}")
    return int(f)


def level_theta(params: torch.Tensor, shape: Sequence[int], f: int) -> torch.Tensor:
    """Voxel affine at down-sampling level ``f`` from centred parameters ``(1, n, n + 1)``.

    Full-resolution voxel ``x`` maps to ``x_in = h (A (x - c) / h + t) + c``; level voxel ``i`` sits at
    ``x = f i + (f - 1) / 2``.
    """
    _factor("f", f)
    if not isinstance(params, torch.Tensor) or params.dim() < 2 or params.shape[-2:] != (len(shape), len(shape) + 1):
        raise ValueError(f"params must be a (1, n, n + 1) tensor for the {len(shape)}D shape {tuple(shape)}, got "
                         f"{getattr(params, 'shape', type(params).__name__)}")
    n = len(shape)
    params = params.to(position_dtype(params.dtype))
    c, h = _centre_scale(shape, params.dtype, params.device)
    A, t = params[..., :n], params[..., n]
    Av = h[:, None] * A / h[None, :]
    # A c as a sum, not a matmul: autocast (register_pair's backward runs under the caller's) would compute
    # the matmul in bfloat16, 0.2 voxels off on a 112-voxel axis
    tv = h * t + c - (Av * c).sum(-1)
    o = (f - 1) / 2
    t_level = ((Av.sum(-1) * o) + tv - o) / f
    return torch.cat([Av, t_level[..., None]], -1)


def level_resample(v: torch.Tensor, f_from: int, f_to: int, shape: Sequence[int]) -> torch.Tensor:
    """A displacement (or velocity) field of level ``f_from`` resampled onto level ``f_to``'s grid.

    ``v`` ``(1, n, *S_from)`` is in voxels of level ``f_from``; the result ``(1, n, *shape)`` is in voxels of
    level ``f_to`` (``shape``: that level's grid, ``f_to = 1``: full resolution). Both grids follow
    :func:`level_theta`'s geometry (level ``f`` voxel ``i`` at full-resolution ``x = f i + (f - 1) / 2``), so
    level ``f_to`` voxel ``j`` reads level ``f_from`` at ``(f_to j + (f_to - 1) / 2 - (f_from - 1) / 2) / f_from``,
    linearly, the nearest edge value beyond the coarse grid. Where the two grids span the same extent
    (``S_from f_from = S_to f_to``: image sizes that are multiples of the factors) that is exactly
    ``F.interpolate(align_corners=False)``, which is used then; otherwise (ceil-mode levels) that
    interpolation would stretch the field by ``S_from f_from / (S_to f_to)``.
    """
    _factor("f_from", f_from)
    _factor("f_to", f_to)
    if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() != len(shape) + 2:
        raise ValueError(f"v must be a floating (1, n, *S) field for the {len(shape)}D shape {tuple(shape)}, got "
                         f"{getattr(v, 'dtype', type(v).__name__)} {tuple(getattr(v, 'shape', ()))}")
    n = v.dim() - 2
    if all(a * f_from == b * f_to for a, b in zip(v.shape[2:], shape)):
        mode = "trilinear" if n == 3 else "bilinear"
        return F.interpolate(v, size=tuple(shape), mode=mode, align_corners=False) * (f_from / f_to)
    dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    theta = torch.zeros(1, n, n + 1, dtype=dtype, device=v.device)
    theta[0, :, :n] = torch.eye(n, dtype=dtype, device=v.device) * (f_to / f_from)
    theta[0, :, n] = ((f_to - 1) / 2 - (f_from - 1) / 2) / f_from
    return mf.affine_warp(v.contiguous(), theta, shape=tuple(shape), padding="border") * (f_from / f_to)


def _onehot(labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    return torch.stack([(labels == k).float() for k in classes])[None]


def dice_per_label(a: torch.Tensor, b: torch.Tensor, classes: Sequence[int]) -> dict[int, float]:
    """Hard Dice of two integer label maps for each class (NaN when absent from both)."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex():
            raise TypeError(f"{name} must be an integer label map tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    out = {}
    for k in classes:
        x, y = a == k, b == k
        den = int(x.sum()) + int(y.sum())
        out[int(k)] = 2 * int((x & y).sum()) / den if den else float("nan")
    return out


def _mean(d: dict[int, float]) -> float:
    vals = [v for v in d.values() if not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def _progress(total: int, enabled: bool, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency of the CLI; the library works without it
        tqdm = None
    if tqdm is None or not enabled:
        class _Null:
            def update(self, n=1): ...
            def set_postfix(self, **kw): ...
            def close(self): ...
        return _Null()
    return tqdm(total=total, desc=desc, unit="it", leave=False, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Instance optimization
# ---------------------------------------------------------------------------------------------


def register_pair(
    fixed: Any,
    moving: Any,
    fixed_labels: Any = None,
    moving_labels: Any = None,
    config: RegistrationConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    spatial_dims: int | None = None,
    fixed_affine: Any = None,
    moving_affine: Any = None,
) -> RegistrationResult:
    """Registers ``moving`` to ``fixed`` by instance optimization.

    Affine stage: 12 (3D) or 6 (2D) centred affine parameters, multi-resolution, LNCC, Adam with the learning
    rate decayed along a half cosine within each level; the best-loss parameters of the last level are kept,
    and the identity instead when they score a worse full-resolution LNCC (``metrics["affine_kept"]`` False).
    Deformable stage: a displacement (or stationary velocity) field on each level's grid, initialised from the
    coarser level, LNCC + ``bending_weight`` x bending energy (+ ``dice_weight`` x label Dice when both label
    maps are given), sampled with :func:`medfast.affine_warp` (affine and displacement in one pass).

    Parameters
    ----------
    fixed, moving : Tensor or ndarray
        ``(*S)``, ``(C, *S)`` or ``(1, C, *S)`` finite images, 2D or 3D, with the same channels; on the same
        grid, or on any two grids placed by ``fixed_affine`` / ``moving_affine``. Intensities are normalized to
        [0, 1] internally, each channel on its own (robust percentiles, :func:`normalize_intensity`), and LNCC
        is averaged over the channels. A 2-d array is a 2D image, 3 to 5 dims are 3D (a 4-d array is
        ``(C, D, H, W)``) unless ``spatial_dims`` says otherwise.
    fixed_labels, moving_labels : Tensor or ndarray, optional
        Integer label maps (0 = background) on their image's grid. With both, Dice is reported for every
        foreground label of the fixed map; ``config.dice_weight > 0`` also uses them in the loss.
    config : RegistrationConfig, optional
    device : str or torch.device
    progress : bool
        Show a tqdm progress bar.
    spatial_dims : {2, 3}, optional
        The images' spatial dims when the array rank leaves it open (2D images with channels).
    fixed_affine, moving_affine : array, optional
        ``(n + 1, n + 1)`` voxel-to-mm affines of the two images in one frame (:func:`grid_affines` for NIfTI
        files). With them the moving image keeps its own grid (any shape and voxel size): it is sampled at
        ``A_m^-1 A_f @ [theta @ [x; 1] + u(x); 1]``, once, so none of it is lost beyond the fixed field of view
        and nothing is interpolated twice; ``theta`` / ``ddf`` of the result stay in fixed-grid voxels. A
        :class:`RegistrationError` is raised when less than 2 % of the fixed foreground lies inside the moving
        image by these affines (a warning below 50 %); ``metrics["overlap_before"]`` holds the fraction.

    Returns
    -------
    RegistrationResult
    """
    cfg = config or RegistrationConfig()
    device = torch.device(device)
    fixed = _as_image(fixed, "fixed", spatial_dims).to(device)
    moving = _as_image(moving, "moving", spatial_dims).to(device)
    shape = tuple(fixed.shape[2:])
    n = len(shape)
    grid = _grid_map(fixed_affine, moving_affine, n)
    if grid is None and fixed.shape[2:] != moving.shape[2:]:
        raise ValueError(f"fixed and moving must share a grid (resample first, or give fixed_affine and "
                         f"moving_affine); got spatial shapes {tuple(fixed.shape[2:])} and {tuple(moving.shape[2:])}")
    if moving.dim() != fixed.dim():
        raise ValueError(f"fixed and moving must both be 2D or both 3D, got shapes {tuple(fixed.shape[2:])} and "
                         f"{tuple(moving.shape[2:])}")
    if fixed.shape[1] != moving.shape[1]:
        raise ValueError(f"fixed and moving must have the same channels, got {fixed.shape[1]} and {moving.shape[1]}")
    mshape = tuple(moving.shape[2:])
    for name, levels in (("affine_levels", cfg.affine_levels), ("deform_levels", cfg.deform_levels)):
        too_big = [f for f in levels if f > min(shape)]
        if too_big:
            raise ValueError(f"{name} (--{name.replace('_', '-')}): down-sampling factor(s) {too_big} exceed the "
                             f"image's smallest size {min(shape)} (spatial shape {shape}); use factors <= {min(shape)}")
    if (fixed_labels is None) != (moving_labels is None):
        raise ValueError("give both fixed_labels and moving_labels, or neither")
    labels = fixed_labels is not None
    if labels:
        fixed_labels = _as_labels(fixed_labels, "fixed_labels", shape).to(device)
        moving_labels = _as_labels(moving_labels, "moving_labels", mshape).to(device)
        codes, values = _label_codes(moving_labels)
        classes = [int(k) for k in torch.unique(fixed_labels).tolist() if k != 0]
        if not classes:
            raise ValueError("fixed_labels has no foreground label (all 0)")
    fixed = normalize_intensity(fixed, spatial_dims=n)  # each channel (modality) mapped to [0, 1] on its own
    moving = normalize_intensity(moving, spatial_dims=n)
    use_dice = labels and cfg.dice_weight > 0
    if use_dice:
        fixed_oh, moving_oh = _onehot(fixed_labels, classes), _onehot(moving_labels, classes)
    k = cfg.kernel_size
    history: dict[str, list[float]] = {"affine": [], "deformable": []}
    metrics: dict[str, Any] = {"config": asdict(cfg), "shape": list(shape)}

    def level_map(f: int, kf: Sequence[int]) -> torch.Tensor | None:
        """Fixed-grid voxel at level ``f`` -> voxel of the moving image pooled by ``kf`` (None: identity)."""
        if grid is None:
            return None
        q = np.linalg.solve(_level_box(kf, n), grid[0] @ _level_box(f, n))
        return torch.as_tensor(q[:n], dtype=torch.float64, device=device)

    q_full = level_map(1, (1,) * n)  # the native moving array, read once for the metrics and the result

    identity = torch.eye(n, n + 1, device=device)[None]
    metrics["overlap_before"] = _header_overlap(fixed, mshape, q_full, "a local optimization")

    def evaluate(stage: str, theta_full: torch.Tensor, u_full: torch.Tensor | None) -> torch.Tensor | None:
        with torch.no_grad():
            warped = _sample_moving(moving, theta_full, u_full, q_full, shape)
            metrics[f"lncc_{stage}"] = float(mf.lncc_loss(warped, fixed, kernel_size=k))
            if not labels:
                return None
            wl = _label_values(_sample_moving(codes[None, None], theta_full, u_full, q_full, shape,
                                              mode="nearest")[0, 0], values)
            per = dice_per_label(wl, fixed_labels, classes)
            metrics[f"dice_{stage}"] = _mean(per)
            metrics[f"dice_{stage}_per_label"] = per
            return wl

    evaluate("before", level_theta(identity, shape, 1), None)
    total = len(cfg.affine_levels) * cfg.affine_iters + len(cfg.deform_levels) * cfg.deform_iters
    bar = _progress(total, progress, "register")

    # ---- affine stage ----
    t0 = time.perf_counter()
    params = identity.clone().requires_grad_(True)
    best_loss, best = math.inf, identity.clone()
    for li, f in enumerate(cfg.affine_levels):
        kf = _moving_factors(f, grid, mshape)
        fx, mv, q = _down(fixed, f), _down(moving, kf), level_map(f, kf)
        lshape = fx.shape[2:]
        if use_dice:
            foh, moh = _down(fixed_oh, f), _down(moving_oh, kf)
        opt = torch.optim.Adam([params], lr=cfg.affine_lr)
        for it in range(cfg.affine_iters):
            # a constant step keeps Adam (whose steps are ~lr whatever the gradient) jittering around the
            # optimum, even away from it when it starts there: decay along a half cosine to 1 %
            decay = 0.5 * (1 + math.cos(math.pi * it / max(cfg.affine_iters - 1, 1)))
            for group in opt.param_groups:
                group["lr"] = cfg.affine_lr * (_AFFINE_LR_END + (1 - _AFFINE_LR_END) * decay)
            opt.zero_grad(set_to_none=True)
            theta = level_theta(params, shape, f)
            loss = mf.lncc_loss(_sample_moving(mv, theta, None, q, lshape), fx, kernel_size=k)
            if use_dice:
                loss = loss + cfg.dice_weight * label_dice_loss(_sample_moving(moh, theta, None, q, lshape), foh)
            loss.backward()
            value = float(loss.detach())
            if li == len(cfg.affine_levels) - 1 and value < best_loss:  # the loss of the parameters before the step
                best_loss, best = value, params.detach().clone()
            opt.step()
            history["affine"].append(value)
            bar.update()
            bar.set_postfix(stage=f"affine/{f}", loss=f"{value:.4f}")
    params = best if best_loss < math.inf else params.detach()
    theta_full = level_theta(params, shape, 1)
    evaluate("affine", theta_full, None)
    # the levels' optimum need not be the full-resolution one: never return an affine worse than none at all
    metrics["affine_kept"] = not metrics["lncc_affine"] > metrics["lncc_before"]
    if not metrics["affine_kept"]:
        params = identity.clone()
        theta_full = level_theta(params, shape, 1)
        evaluate("affine", theta_full, None)
    metrics["time_affine_s"] = time.perf_counter() - t0

    # ---- deformable stage ----
    t0 = time.perf_counter()
    field_ = None  # displacement or velocity at the previous level, and its factor
    prev_f = None

    def to_disp(v: torch.Tensor) -> torch.Tensor:
        return mf.integrate(v, cfg.integration_steps) if cfg.velocity else v

    for f in cfg.deform_levels:
        kf = _moving_factors(f, grid, mshape)
        fx, mv, q = _down(fixed, f), _down(moving, kf), level_map(f, kf)
        lshape = tuple(fx.shape[2:])
        if use_dice:
            foh, moh = _down(fixed_oh, f), _down(moving_oh, kf)
        if field_ is None:
            init = torch.zeros(1, n, *lshape, device=device)
        else:
            init = level_resample(field_, prev_f, f, lshape)
        v = init.clone().requires_grad_(True)
        theta = level_theta(params, shape, f)
        opt = torch.optim.Adam([v], lr=cfg.deform_lr / f)  # the field is in voxels of the level
        for _ in range(cfg.deform_iters):
            opt.zero_grad(set_to_none=True)
            u = to_disp(v)
            loss = mf.lncc_loss(_sample_moving(mv, theta, u, q, lshape), fx, kernel_size=k)
            if cfg.bending_weight > 0 and min(lshape) > 2:
                loss = loss + cfg.bending_weight * bending_energy(u)
            if use_dice:
                loss = loss + cfg.dice_weight * label_dice_loss(_sample_moving(moh, theta, u, q, lshape), foh)
            loss.backward()
            opt.step()
            history["deformable"].append(float(loss.detach()))
            bar.update()
            bar.set_postfix(stage=f"deform/{f}", loss=f"{float(loss.detach()):.4f}")
        field_, prev_f = v.detach(), f
    bar.close()
    if field_ is None:
        u_full = torch.zeros(1, n, *shape, device=device)
    else:
        u_full = to_disp(level_resample(field_, prev_f, 1, shape)).detach()
    metrics["time_deformable_s"] = time.perf_counter() - t0
    warped_labels = evaluate("after", theta_full, u_full)
    ddf = (affine_ddf(theta_full, shape) + u_full).detach()
    if cfg.deform_levels:
        metrics["folding_percent"] = _folding_percent(ddf)
    with torch.no_grad():
        warped = _sample_moving(moving, theta_full, u_full, q_full, shape)
    metrics["history"] = history
    return RegistrationResult(theta_full.detach(), ddf, warped, warped_labels, metrics)


# ---------------------------------------------------------------------------------------------
# Trained models
# ---------------------------------------------------------------------------------------------

_NETS = {"LocalNet": LocalNet, "GlobalNet": GlobalNet}


@dataclass
class ModelInfo:
    """What a trained registration network expects of its input.

    Attributes
    ----------
    input_shape : list of int
        Spatial shape the network was trained at.
    spacing : list of float or None
        Voxel size (mm) of the training grid (``data.spacing``); None: the images' own voxel size with
        ``native_spacing``, else unknown (the image's field of view is then resized to ``input_shape``).
    reorient : bool
        The training images were reoriented to the closest positive orientation (``data.reorient``; RAS in 3D,
        the in-plane frame in 2D, see :func:`medfast.data.preprocess.reorient_to_ras`).
    in_channels : int or None
        Channels of ONE image (fixed or moving; the network sees both concatenated, twice as many):
        ``model.in_channels`` of a ``medfast train`` checkpoint, half the network's ``in_channels`` for a
        :func:`save_model` checkpoint; None: unknown (not checked).
    reorient_dims : tuple of int
        The spatial dims ``reorient`` applies to: ``(2, 3)`` (this version), ``(3,)`` for a checkpoint written
        before 2D images were reoriented (no ``"reorient_dims"`` key): its 2D network saw storage order.
    native_spacing : bool
        Trained without ``data.spacing``: every image kept its own voxel size and was cropped / zero-padded
        centrally to ``input_shape`` (:func:`medfast.data.preprocess.crop_or_pad`), so the network is fed the
        fixed image that way (:func:`network_grid`). False with ``spacing`` None: unknown (a :func:`save_model`
        file without the record, e.g. a ``registration_model.pt`` written before it existed).
    """

    input_shape: list[int]
    spacing: list[float] | None = None
    reorient: bool = True
    in_channels: int | None = None
    reorient_dims: tuple[int, ...] = REORIENT_DIMS
    native_spacing: bool = False


def save_model(path: str | Path, net: torch.nn.Module, net_kwargs: dict, input_shape: Sequence[int],
               spacing: Sequence[float] | None = None, reorient: bool = True,
               reorient_dims: Sequence[int] = REORIENT_DIMS, native_spacing: bool = False) -> None:
    """Writes a registration network checkpoint that ``medfast register --model`` reads.

    The file holds ``{"net": class name, "net_kwargs": ..., "input_shape": ..., "spacing": ...,
    "native_spacing": ..., "reorient": ..., "reorient_dims": ..., "state_dict": ...}``; ``input_shape`` is the
    spatial shape the network was trained at, ``spacing`` its voxel size in mm (None: unknown, or with
    ``native_spacing`` each image's own voxel size, centrally cropped / padded to ``input_shape``), ``reorient``
    whether the training images were reoriented (RAS in 3D, the in-plane frame in 2D) and ``reorient_dims`` the
    spatial dims that applies to (see :class:`ModelInfo`; a file without it means ``(3,)``).
    """
    name = type(net).__name__
    if name not in _NETS:
        raise ValueError(f"net must be one of {sorted(_NETS)}, got {name}")
    if spacing is not None:
        spacing = [float(v) for v in spacing]
        if len(spacing) != len(input_shape) or any(not v > 0 for v in spacing):
            raise ValueError(f"spacing must be {len(input_shape)} positive numbers (mm), got {spacing}")
        if native_spacing:
            raise ValueError("give spacing (one training voxel size) or native_spacing (each image's own), not both")
    path = Path(path)
    with replacing(path) as tmp:
        torch.save({"net": name, "net_kwargs": _plain_values(dict(net_kwargs)),
                    "input_shape": [int(s) for s in input_shape], "spacing": spacing,
                    "native_spacing": bool(native_spacing), "reorient": bool(reorient),
                    "reorient_dims": [int(d) for d in reorient_dims], "state_dict": net.state_dict()}, tmp)


def _plain_values(value: Any) -> Any:
    """NumPy scalars (and 0-d tensors) inside dicts / lists / tuples as Python numbers: a checkpoint must load with
    torch.load(weights_only=True), which refuses pickled NumPy objects."""
    from medfast.ops._validate import py_scalar

    if isinstance(value, dict):
        return {k: _plain_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain_values(v) for v in value)
    return py_scalar(value)


def load_model_info(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelInfo]:
    """Reads a checkpoint written by :func:`save_model` (or one with the same keys under ``"model"``), or a
    ``medfast train`` checkpoint of the registration task (``RUN/checkpoints/last.pt``: the network is
    rebuilt from its config; shape, spacing and orientation are its ``data.shape``, ``data.spacing`` (none:
    ``native_spacing``) and ``data.reorient``); returns the network in eval mode and its :class:`ModelInfo`."""
    path = Path(path)
    if not path.is_file():
        raise RegistrationError(f"no such model checkpoint: {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)  # no pickled objects: no code on load
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        from medfast.train.trainer import load_failure

        raise RegistrationError(f"cannot read {path} as a checkpoint: {load_failure(exc)}") from exc
    if isinstance(ckpt, dict) and str(ckpt.get("format", "")).startswith("medfast-checkpoint"):
        if ckpt.get("task") != "registration":
            raise RegistrationError(f"{path} is a medfast train checkpoint of the {ckpt.get('task')!r} task, not "
                                    f"of the 'registration' task")
        try:
            return _load_trainer_checkpoint(ckpt, device)
        except RuntimeError as exc:  # weights of another network than the checkpoint's config builds
            from medfast.train.trainer import _load_error_line

            raise RegistrationError(f"the weights in {path} do not fit its network: {_load_error_line(exc)}") from None
    if isinstance(ckpt, dict) and "net" not in ckpt and isinstance(ckpt.get("model"), dict):
        ckpt = ckpt["model"]
    if not isinstance(ckpt, dict) or ckpt.get("net") not in _NETS or "state_dict" not in ckpt:
        raise RegistrationError(f"{path} is not a medfast registration checkpoint (keys net, net_kwargs, "
                                f"input_shape, state_dict; see medfast.tasks.registration.save_model)")
    from medfast.train.trainer import _load_error_line

    kwargs = dict(ckpt.get("net_kwargs", {}))
    if (ckpt["net"] == "LocalNet" and "extract_levels" not in kwargs and isinstance(ckpt["state_dict"], dict)
            and "upsampling_version" not in ckpt["state_dict"]):
        # saved before LocalNet's default levels followed its depth: they were (0, 1, 2, 3) at any depth
        kwargs["extract_levels"] = (0, 1, 2, 3)
    try:
        net = _NETS[ckpt["net"]](**kwargs).to(device)
        net.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, ValueError) as exc:  # edited or mixed-up checkpoints: name the file
        raise RegistrationError(f"the weights in {path} do not fit its {ckpt['net']} "
                                f"({ckpt.get('net_kwargs', {})}): {_load_error_line(exc)}") from None
    pair_channels = ckpt.get("net_kwargs", {}).get("in_channels", 2)  # LocalNet/GlobalNet/RegistrationNet default 2
    try:  # an edited or foreign file: a missing key or a bad value named with the file, not a bare KeyError
        shape = [int(v) for v in ckpt["input_shape"]]
        spacing = None if ckpt.get("spacing") is None else [float(v) for v in ckpt["spacing"]]
        if not shape or min(shape) < 1 or (spacing is not None and not all(0 < v < math.inf for v in spacing)):
            raise ValueError(f"input_shape {shape} / spacing {spacing}: positive sizes and finite voxel sizes")
        info = ModelInfo(shape, spacing, bool(ckpt.get("reorient", True)),
                         int(pair_channels) // 2 if int(pair_channels) % 2 == 0 else None,
                         reorient_dims_of(ckpt),  # none stored: written before 2D images were reoriented
                         # none stored: unknown (the field of view is resized), as before the record existed
                         ckpt.get("spacing") is None and bool(ckpt.get("native_spacing", False)))
    except (KeyError, TypeError, ValueError) as exc:
        raise RegistrationError(f"{path}: not a usable registration checkpoint ({type(exc).__name__}: {exc})") from None
    return net.eval(), info


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, list[int]]:
    """As :func:`load_model_info`, returning the network and its input shape only."""
    net, info = load_model_info(path, device)
    return net, info.input_shape


def network_grid(fixed_affine: np.ndarray, fixed_shape: Sequence[int], info: ModelInfo) -> np.ndarray:
    """The ``(n + 1, n + 1)`` voxel-to-world affine of the grid a network sees for a fixed image.

    The grid has the network's ``input_shape`` and its training ``spacing`` (the fixed image's field of view
    resampled as :func:`medfast.data.preprocess.resample_to_spacing` did in training; with
    ``info.native_spacing``: the fixed image's own voxels), centrally cropped / zero-padded to ``input_shape``
    exactly as :func:`medfast.data.preprocess.crop_or_pad` did in training (whole-voxel offsets); with neither
    recorded, the fixed image's field of view is spread over ``input_shape``. Its axes are the fixed image's
    voxel axes permuted/flipped to the closest positive orientation (with ``info.reorient``, for the dims in
    ``info.reorient_dims``; as in training, see :func:`medfast.data.preprocess.reorient_to_ras`: RAS in 3D, the
    in-plane frame in 2D), and its centre is the centre of the fixed image's field of view (to within those
    whole-voxel offsets). So an image stored LPS, RAS, flipped, transposed or with another voxel size gives the
    network the same input. Pass the fixed file's 4x4 affine for a 2D image: the orientation of a coronal or
    sagittal slice is decided from it.
    """
    return _network_grid_box(fixed_affine, fixed_shape, info)[0]


def _network_grid_box(fixed_affine: np.ndarray, fixed_shape: Sequence[int], info: ModelInfo
                      ) -> tuple[np.ndarray, list[tuple[int, int]] | None]:
    """:func:`network_grid` and, when training cropped / padded (``spacing`` or ``native_spacing``), the
    ``[start, stop)`` per network axis of the voxels that held image data (the rest was crop_or_pad's zeros)."""
    n = len(fixed_shape)
    if len(info.input_shape) != n:
        raise RegistrationError(f"the model takes {len(info.input_shape)}D images, the fixed image is {n}D")
    from medfast.data.preprocess import spatial_affine

    a = spatial_affine(fixed_affine, n)
    lin = a[:n, :n]
    if info.reorient and n in info.reorient_dims:
        from nibabel import orientations as ornt_mod

        from medfast.data.preprocess import closest_orientation

        ornt = closest_orientation(fixed_affine, n)
        lin = (a @ ornt_mod.inv_ornt_aff(ornt, tuple(fixed_shape)))[:n, :n]
    vox = np.sqrt((lin ** 2).sum(axis=0))
    if np.any(vox <= 0):
        raise RegistrationError(f"the fixed image's affine is singular: {np.asarray(fixed_affine).tolist()}")
    in_shape = np.asarray(info.input_shape, dtype=np.float64)
    if info.spacing is not None or info.native_spacing:
        # as in training: the (reoriented) image, resampled to data.spacing (resample_to_spacing's grid: same
        # field of view, round(S * old / new) voxels, corner kept) or at its own voxel size, then a centred
        # crop / pad with crop_or_pad's whole-voxel offsets
        ro = a if not (info.reorient and n in info.reorient_dims) else a @ ornt_mod.inv_ornt_aff(ornt,
                                                                                                 tuple(fixed_shape))
        sizes = np.rint(np.abs(np.linalg.solve(lin, a[:n, :n] @ np.asarray(fixed_shape, dtype=np.float64))))
        g = np.eye(n + 1)
        g[:n, :n], g[:n, n] = ro[:n, :n], ro[:n, n]
        if info.spacing is not None:
            new = np.asarray(info.spacing, dtype=np.float64)
            if not np.allclose(vox, new, rtol=1e-4):  # (resample_to_spacing keeps such an image as it is)
                scale = new / vox
                g[:n, :n] = ro[:n, :n] * scale[None, :]
                g[:n, n] = ro[:n, :n] @ (0.5 * scale - 0.5) + ro[:n, n]
                sizes = np.maximum(1, np.round(sizes * vox / new))
        shift = np.array([(s - t) // 2 if s >= t else -((t - s) // 2) for s, t in zip(sizes, in_shape)])
        g[:n, n] = g[:n, :n] @ shift + g[:n, n]
        box = [(int(max(0, -d)), int(min(t, s - d))) for d, s, t in zip(shift, sizes, in_shape)]
        return g, box
    # neither recorded: the fixed image's field of view spread over the input shape, centred
    extent = np.abs(np.linalg.solve(lin, a[:n, :n] @ np.asarray(fixed_shape, dtype=np.float64))) * vox
    spacing = extent / in_shape
    g = np.eye(n + 1)
    g[:n, :n] = lin / vox[None, :] * spacing[None, :]
    centre = a[:n, :n] @ ((np.asarray(fixed_shape, dtype=np.float64) - 1) / 2) + a[:n, n]
    g[:n, n] = centre - g[:n, :n] @ ((in_shape - 1) / 2)
    return g, None


def _label_codes(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, values)``: each voxel's label as 1 + its index among the sorted distinct labels ``values``, float32
    (exact: float32 holds integers up to 2^24 only, and atlas ids such as the Allen CCF's pass it), for a nearest
    warp whose zero padding (0: no label) :func:`_label_values` maps back to label 0."""
    values, index = torch.unique(labels, return_inverse=True)
    return (index + 1).float(), values


def _label_values(codes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The labels of warped :func:`_label_codes` (0 where the warp sampled outside the moving image), int64."""
    k = codes.round().long()
    return torch.where(k > 0, values.long()[(k - 1).clamp(min=0)], 0)


def register_with_model(fixed: Any, moving: Any, net: torch.nn.Module, input_shape: Sequence[int] | ModelInfo,
                        fixed_labels: Any = None, moving_labels: Any = None,
                        device: str | torch.device = "cpu", fixed_affine: np.ndarray | None = None, *,
                        moving_affine: np.ndarray | None = None) -> RegistrationResult:
    """One forward pass of a trained LocalNet / RegistrationNet (DDF) or GlobalNet (affine).

    Both images are resampled (:func:`medfast.resample`, linear) from the fixed grid onto the network's
    grid (:func:`network_grid`: the training orientation, spacing and shape, centred on the fixed
    image), mapped to [0, 1] there as in training, and the predicted transform is brought back onto the
    fixed grid. Its affine part ``T`` (a GlobalNet's, or a RegistrationNet's with ``global_net``; network voxels)
    is mapped exactly, over the whole fixed grid: ``theta = A_f^-1 G T G^-1 A_f`` (``A_f``, ``G`` the fixed and
    network voxel-to-world affines); the local residual ``r`` (LocalNet) is resampled onto the fixed grid (the
    border value beyond the network's field of view) and turned from network into fixed voxels, so
    ``ddf(p) = theta [p; 1] - p + L_f^-1 L_G r(G^-1 A_f p)`` (``L``: linear parts).

    With ``moving_affine`` the moving image (and labels) keep their own grid, as in :func:`register_pair`: the
    network is fed the moving image resampled onto the fixed grid by the header map (as
    :func:`to_fixed_grid` does), while the outputs sample the native moving array once, at
    ``A_m^-1 A_f [p + ddf(p); 1]`` (normalized on its own voxels; labels nearest), so nothing beyond the fixed
    field of view is lost and nothing is interpolated twice. A :class:`RegistrationError` is raised when less
    than 2 % of the fixed foreground lies inside the moving image by the affines (a warning below 50 %).

    Parameters
    ----------
    fixed, moving : Tensor or ndarray
        ``(*S)``, ``(C, *S)`` or ``(1, C, *S)`` images with the same channels (the channels of one image the
        network was trained on, ``model.in_channels``; each channel is mapped to [0, 1] on its own); on the same
        (fixed) grid, or ``moving`` on its own grid placed by ``moving_affine``.
    net : nn.Module
    input_shape : sequence of int or ModelInfo
        The network's :class:`ModelInfo` (or just its input shape: unknown spacing, reorientation in 2D and 3D,
        as a network trained by this version saw its images; pass ``ModelInfo(shape, reorient_dims=(3,))`` for a 2D
        network trained on storage order); with
        ``ModelInfo.in_channels`` the images' channel count is checked against it.
    fixed_labels, moving_labels : Tensor or ndarray, optional
        Integer label maps on their image's grid: Dice before / after.
    device : str or torch.device
    fixed_affine : ndarray, optional
        ``(4, 4)`` (or ``(n + 1, n + 1)``) voxel-to-world affine of the fixed grid; default the identity
        (1 mm voxels, stored RAS). 2D: the file's 4x4 orients a coronal or sagittal slice whatever its storage
        order (an in-plane ``(3, 3)`` one is used as is, see :func:`network_grid`).
    moving_affine : ndarray, optional
        The moving image's voxel-to-world affine in the form of ``fixed_affine`` (which it needs); the two are
        brought into one frame by :func:`grid_affines`.

    Returns
    -------
    RegistrationResult
        ``theta`` ``(1, n, n + 1)`` the affine part in fixed voxels (the identity for a LocalNet), ``ddf``
        ``(1, n, *S)`` the total displacement in fixed voxels, ``warped`` the intensity-normalized moving image
        warped; ``metrics`` LNCC (and Dice) before / after, ``overlap_before`` (1 on one grid) and, for a network
        with a displacement output (not a GlobalNet), ``folding_percent`` as in :class:`RegistrationResult`.
    """
    device = torch.device(device)
    info = input_shape if isinstance(input_shape, ModelInfo) else ModelInfo([int(v) for v in input_shape])
    nd = len(info.input_shape)  # the network's spatial dims settle the array forms
    for name, x in (("fixed", fixed), ("moving", moving)):  # before _as_image, whose message assumes nd
        shape_x = tuple(getattr(x, "shape", (0,) * nd))  # (not an array: _as_image's type error)
        flat = nd == 3 and len(shape_x) >= 3 and 1 in shape_x[-3:]  # a 2D image with channels read as 3D
        if not nd <= len(shape_x) <= nd + 2 or flat:
            raise ValueError(f"the model takes {nd}D images ((*S), (C, *S) or (1, C, *S) with {nd} spatial dims), "
                             f"{name} has shape {shape_x}")
    fixed_t = _as_image(fixed, "fixed", nd).to(device)
    moving_t = _as_image(moving, "moving", nd).to(device)
    shape, mshape = tuple(fixed_t.shape[2:]), tuple(moving_t.shape[2:])
    if moving_affine is None and mshape != shape:
        raise ValueError(f"fixed and moving must share a grid (resample first, or give fixed_affine and "
                         f"moving_affine); got spatial shapes {shape} and {mshape}")
    if moving_affine is not None and fixed_affine is None:
        raise ValueError("moving_affine needs fixed_affine (both voxel-to-mm), or give neither (images on one grid)")
    if fixed_t.shape[1] != moving_t.shape[1]:
        raise ValueError(f"fixed and moving must have the same channels, got {fixed_t.shape[1]} and "
                         f"{moving_t.shape[1]}")
    if info.in_channels is not None and fixed_t.shape[1] != info.in_channels:
        raise ValueError(f"the network expects {info.in_channels}-channel images (model.in_channels="
                         f"{info.in_channels}), the images have {fixed_t.shape[1]} channel(s)")
    n = len(shape)
    from medfast.data.preprocess import spatial_affine

    a_f = spatial_affine(np.eye(n + 1) if fixed_affine is None else fixed_affine, n)
    q = None  # fixed voxel -> moving array voxel (None: one grid)
    net_moving = moving_t  # what the network is fed: the moving image on the fixed grid
    if moving_affine is not None:
        try:
            a_m = grid_affines(moving_affine, fixed_affine, n)[0]
        except ValueError as exc:
            raise ValueError(f"moving_affine: {exc}") from None
        q = torch.as_tensor(_grid_map(a_f, a_m, n)[0][:n], dtype=torch.float64, device=device)
        # the network input exactly as before (to_fixed_grid: float64 from the array as given, linear, zeros)
        raw = moving if isinstance(moving, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(moving))
        raw = raw.to(device=device, dtype=torch.float64).reshape(moving_t.shape)
        net_moving = mf.resample(raw, torch.as_tensor(a_m), torch.as_tensor(a_f), list(shape), mode="linear").float()
    labels = fixed_labels is not None and moving_labels is not None
    if labels:
        fl = _as_labels(fixed_labels, "fixed_labels", shape).to(device)
        ml = _as_labels(moving_labels, "moving_labels", mshape).to(device)
        classes = [int(k) for k in torch.unique(fl).tolist() if k != 0]
        codes, values = _label_codes(ml)
    fixed_n = normalize_intensity(fixed_t, spatial_dims=n)
    # the optimization's header check, before the network runs: without overlap the warped image is all zero
    overlap = _header_overlap(fixed_n, mshape, q, "the network")
    grid, box = _network_grid_box(a_f if fixed_affine is None else fixed_affine, shape, info)  # 2D: plane's 4x4
    in_shape = [int(v) for v in info.input_shape]
    t0 = time.perf_counter()
    with torch.no_grad():
        both = torch.cat([net_moving, fixed_t], 1).double()
        # as training fed it: resample_to_spacing's border padding inside the resampled grid, crop_or_pad's
        # zeros beyond it (the mapping to [0, 1] below sees the same voxels)
        x = mf.resample(both, torch.as_tensor(a_f), torch.as_tensor(grid), in_shape, mode="linear",
                        padding="zeros" if box is None else "border").float()
        if box is not None:
            keep = torch.zeros_like(x, dtype=torch.bool)
            keep[(..., *(slice(lo, hi) for lo, hi in box))] = True
            x = x.where(keep, torch.zeros((), dtype=x.dtype, device=x.device))
        c = moving_t.shape[1]
        x = torch.cat([normalize_intensity(x[:, :c], spatial_dims=n), normalize_intensity(x[:, c:], spatial_dims=n)],
                      1)
        out = net(x)
        # (theta, total displacement) of a GlobalNet / RegistrationNet, or a LocalNet's displacement
        theta_net = torch.eye(n, n + 1, dtype=torch.float64)[None]
        if isinstance(out, tuple):
            theta_net = out[0].detach().double().cpu()
            residual = out[1].double() - affine_ddf(theta_net.to(device), in_shape)
        else:
            residual = out.double()
        # The affine part is mapped analytically onto the whole fixed grid (network voxels -> world -> fixed voxels:
        # A_f^-1 G T G^-1 A_f), so it holds beyond the network's field of view; only the local residual is
        # resampled (border padding outside the network grid). A GlobalNet has no residual.
        t_net = np.eye(n + 1)
        t_net[:n] = theta_net[0].numpy()
        theta_f = np.linalg.solve(a_f, grid @ t_net @ np.linalg.solve(grid, a_f))[:n]
        ddf = affine_ddf(torch.as_tensor(theta_f, device=device)[None], shape)
        theta = torch.as_tensor(theta_f, dtype=torch.float32, device=device)[None]
        u = None  # the residual in fixed voxels, after theta (as register_pair's u)
        if not isinstance(net, GlobalNet):
            # residual displacements: network voxels -> world -> fixed voxels (linear parts only)
            m = torch.as_tensor(np.linalg.solve(a_f[:n, :n], grid[:n, :n]), dtype=torch.float64, device=device)
            r_f = mf.resample(residual, torch.as_tensor(grid), torch.as_tensor(a_f), list(shape), mode="linear",
                              padding="border")
            u = torch.einsum("ij,bj...->bi...", m, r_f)
            ddf = ddf + u
            u = u.float().contiguous()
        ddf = ddf.float().contiguous()
        # the outputs as register_pair makes them: the moving array (native with moving_affine) normalized on its
        # own voxels and sampled once at q [theta x + u(x); 1]
        moving_n = normalize_intensity(moving_t, spatial_dims=n)
        warped = _sample_moving(moving_n, theta, u, q, shape)
        identity = torch.eye(n, n + 1, device=device)[None]
        before = moving_n if q is None else _sample_moving(moving_n, identity, None, q, shape)
    metrics: dict[str, Any] = {"time_model_s": time.perf_counter() - t0, "shape": list(shape),
                               "network_grid": grid.tolist(), "network_input_shape": in_shape,
                               "overlap_before": overlap}
    metrics["lncc_before"] = float(mf.lncc_loss(before, fixed_n, kernel_size=7))
    metrics["lncc_after"] = float(mf.lncc_loss(warped, fixed_n, kernel_size=7))
    if not isinstance(net, GlobalNet):  # a displacement output can fold, as a deformable stage can
        metrics["folding_percent"] = _folding_percent(ddf)
    warped_labels = None
    if labels:
        def nearest(th: torch.Tensor, uu: torch.Tensor | None) -> torch.Tensor:
            return _label_values(_sample_moving(codes[None, None], th, uu, q, shape, mode="nearest")[0, 0], values)

        warped_labels = nearest(theta, u)
        for stage, lab in (("before", ml if q is None else nearest(identity, None)), ("after", warped_labels)):
            per = dice_per_label(lab, fl, classes)
            metrics[f"dice_{stage}"], metrics[f"dice_{stage}_per_label"] = _mean(per), per
    return RegistrationResult(theta, ddf, warped, warped_labels, metrics)


# ---------------------------------------------------------------------------------------------
# NIfTI I/O, figures
# ---------------------------------------------------------------------------------------------


def _nib():
    try:
        import nibabel
    except ImportError as exc:  # pragma: no cover - nibabel is a dependency
        raise RegistrationError("medfast register needs nibabel: `pip install nibabel`") from exc
    return nibabel


_F32_RANGE = (float(np.finfo(np.float32).min), float(np.finfo(np.float32).max))


def load_nifti(path: str | Path, *, channels: bool = False, label: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(array, affine)`` of a 2D/3D NIfTI with real voxels and an invertible, finite affine (else
    :class:`RegistrationError` naming the file). Trailing singleton dimensions beyond the third are dropped and
    a single slice, ``(X, Y, 1)`` (or ``(1, Y, Z)`` / ``(X, 1, Z)``), is the 2D image it is: its in-plane axes
    first, the affine's columns permuted alike (as ``medfast evaluate`` reads it). The array is in native byte
    order; NaN voxels read as 0 and +-inf as the largest finite values of the file's float type (of float32 for
    a wider one: registration runs in float32), as ``np.nan_to_num`` does.

    With ``channels`` the array is ``(C, *S)``: a 4D NIfTI ``(X, Y, Z, C)`` (as ``medfast train`` reads
    multi-channel images; also the NIfTI vector layout ``(X, Y, Z, 1, C)``) gives its ``C`` channels, a 2D image
    with channels is stored ``(X, Y, 1, C)``, and a 2D/3D image is one channel. With ``label`` the values are
    kept as they are (no NaN / inf mapping), for the label map's own checks."""
    _nib()  # RegistrationError with the install hint when nibabel is missing
    path = Path(path)
    if not path.is_file():
        raise RegistrationError(f"no such image: {path}")
    from medfast.data.io import is_vector_layout, load_checked, single_slice_as_2d, unsupported_voxels, voxel_measure

    img = load_checked(path, RegistrationError)  # before .dataobj allocates what a lying header claims
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise RegistrationError(f"cannot read {path} as NIfTI: {exc}") from exc

    problem = unsupported_voxels(data.dtype)
    if problem:
        raise RegistrationError(f"{path} {problem}")
    if data.dtype.kind not in "biuf":
        raise RegistrationError(f"{path} has voxel data type {data.dtype}, not a number")
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    shape = data.shape
    if channels and is_vector_layout(data.shape):
        data = data[:, :, :, 0]
    if channels and data.ndim == 4:
        stack = np.moveaxis(data, -1, 0)  # (C, X, Y, Z): channels on the last axis, as medfast train reads them
    elif data.ndim in (2, 3):
        stack = data[None]
    else:
        raise RegistrationError(f"{path} must be a 2D or 3D image"
                                + (" (or one with channels on a 4th axis, (X, Y, Z, C))" if channels else "")
                                + f", got shape {shape}")
    # one slice: registered as a 2D image, not a flat volume
    affine = np.array(img.affine, dtype=np.float64)
    planes = [single_slice_as_2d(c, affine) for c in stack]
    affine = planes[0][1]
    data = planes[0][0][None] if len(planes) == 1 else np.stack([p[0] for p in planes])
    if 1 in data.shape[1:]:
        raise RegistrationError(f"{path} has shape {shape}: more than one axis of size 1 is neither a 2D nor a 3D "
                                f"image")
    # a zero / singular / NaN affine would only fail when the outputs are written, after the whole optimization;
    # a 2D image (a single slice too) is placed by its two in-plane columns (the flat axis's may be degenerate)
    size, scale = voxel_measure(affine, data.shape[1:]) if np.all(np.isfinite(affine)) else (0.0, 1.0)
    if not size > 1e-6 * scale:
        raise RegistrationError(f"{path} has a singular or non-finite affine (the voxel-to-world matrix of its "
                                f"sform / qform): {affine.round(4).tolist()}")
    data = np.asarray(data if channels else data[0])
    if not data.dtype.isnative:  # big-endian files: torch takes native byte order only
        data = data.astype(data.dtype.newbyteorder("="))
    if label:
        return data, affine
    data = np.nan_to_num(data)  # NaN -> 0, +-inf -> the dtype's finite extremes
    if data.dtype.kind == "f" and data.dtype.itemsize > 4:  # registration runs in float32: its extremes, not inf
        data = np.clip(data, *_F32_RANGE)
    return data, affine


def _plane_angle(affine_a: np.ndarray, affine_b: np.ndarray) -> float:
    """Angle (degrees, 0 to 90) between the planes of two 2D images' 4x4 affines (voxel axes 0 and 1)."""
    na, nb = (np.cross(a[:3, 0], a[:3, 1]) for a in (np.asarray(affine_a, float), np.asarray(affine_b, float)))
    c = abs(float(na @ nb)) / max(float(np.linalg.norm(na) * np.linalg.norm(nb)), 1e-300)
    return float(np.degrees(np.arccos(min(c, 1.0))))


def grid_affines(affine: np.ndarray, fixed_affine: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``(n + 1, n + 1)`` voxel-to-mm affines of an image and of the fixed grid in one frame.

    3D: world space. 2D: the fixed image's in-plane frame of :func:`medfast.data.preprocess.spatial_affine`
    (world x, y for an axial plane; a coronal, sagittal or oblique plane laid flat by the smallest rotation,
    so pixel sizes and distances are the true in-plane ones); the image's pixels are projected onto that
    plane, so a parallel plane at another depth maps as well.
    """
    from medfast.data.preprocess import spatial_affine

    n = py_scalar(n)
    if isinstance(n, bool) or not isinstance(n, int) or n not in (2, 3):  # (2**63 overflowed in spatial_affine)
        raise ValueError(f"n must be 2 or 3 (the fixed grid's spatial axes), got {n!r}")
    a_f = spatial_affine(fixed_affine, n)
    affine, fixed_affine = np.asarray(affine, dtype=np.float64), np.asarray(fixed_affine, dtype=np.float64)
    if n != 2 or affine.shape != (4, 4) or fixed_affine.shape != (4, 4):
        return spatial_affine(affine, n), a_f
    # the fixed plane's world -> in-plane map P (2, 3): a_f[:2, :2] = P @ F[:3, :2], and P kills the normal
    proj = a_f[:2, :2] @ np.linalg.pinv(fixed_affine[:3, :2])
    a = np.eye(3)
    a[:2] = proj @ affine[:3, [0, 1, 3]]
    return a, a_f


def to_fixed_grid(data: np.ndarray, affine: np.ndarray, fixed_affine: np.ndarray, fixed_shape: Sequence[int],
                  labels: bool = False, channels: bool = False) -> torch.Tensor:
    """Resamples an image (or label map, nearest) onto the fixed grid through the NIfTI affines (2D images in
    the fixed plane's frame, see :func:`grid_affines`). ``data`` is ``(*S)``, or with ``channels`` ``(C, *S)``
    (each channel resampled alike; the result ``(C, *fixed_shape)``)."""
    n = len(fixed_shape)
    x = torch.as_tensor(np.ascontiguousarray(data), dtype=torch.float64)
    x = x[None] if channels else x[None, None]
    a, a_f = grid_affines(affine, fixed_affine, n)
    out = mf.resample(x, torch.as_tensor(a), torch.as_tensor(a_f), list(fixed_shape),
                      mode="nearest" if labels else "linear")
    out = out[0] if channels else out[0, 0]
    return out.round().long() if labels else out.float()


def save_overlay(path: str | Path, fixed: torch.Tensor, panels: dict[str, torch.Tensor],
                 title: str | None = None) -> None:
    """PNG: for each panel, fixed (green) over the moving image (magenta), on the three central
    slices (3D) or the image (2D). Aligned structures look grey; misalignment shows colour."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures are left alone

    from medfast._figures import save_figure

    f = fixed.detach().cpu().float().squeeze()
    views = ([lambda v: v[v.shape[0] // 2], lambda v: v[:, v.shape[1] // 2], lambda v: v[:, :, v.shape[2] // 2]]
             if f.dim() == 3 else [lambda v: v])
    fig = Figure(figsize=(3.2 * len(panels), 3.2 * len(views)))
    axes = fig.subplots(len(views), len(panels), squeeze=False)
    for j, (name, img) in enumerate(panels.items()):
        m = img.detach().cpu().float().squeeze()
        for i, view in enumerate(views):
            a, b = view(f).clamp(0, 1), view(m).clamp(0, 1)
            rgb = torch.stack([b, a, b], -1).numpy()
            ax = axes[i, j]
            ax.imshow(np.rot90(rgb), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


# ITK (SimpleITK, ANTs, Slicer) reads a NIfTI's world frame as LPS: RAS with x and y negated
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _ddf_matrix(affine: np.ndarray, n: int, world: bool) -> np.ndarray:
    """``(c, n)`` matrix taking a displacement in (fixed) voxels to the components stored in ddf.nii.gz, for the
    affine of the grid as :func:`load_nifti` returns it (a single slice's in-plane columns first).

    3D, or ``world`` (a 2D slice stored ``(X, 1, Z)`` / ``(1, Y, Z)``: ITK reads it as a 3D image): the world
    displacement in mm, LPS (``c`` 3). Else (a 2D image stored ``(X, Y)`` / ``(X, Y, 1)``: ITK reads its field as
    2D): the in-plane frame of :func:`medfast.data.preprocess.spatial_affine` with both components negated, LPS x,
    y for an axial image (``c`` 2)."""
    from medfast.data.preprocess import spatial_affine

    affine = np.asarray(affine, dtype=np.float64)
    if n == 3 or world:
        return _RAS_TO_LPS @ affine[:3, :n]
    return -spatial_affine(affine, 2)[:2, :2]


def load_ddf(path: str | Path) -> tuple[torch.Tensor, np.ndarray]:
    """Reads a ``ddf.nii.gz`` of ``medfast register`` back as ``(ddf, affine)``: ``ddf`` ``(1, n, *S)`` float32, the
    displacement in voxels of the fixed grid as :func:`load_nifti` reads the fixed image (a single slice as its
    2D image), so ``medfast.warp(moving_on_fixed_grid, ddf)`` applies the transform to the moving image resampled
    by :func:`to_fixed_grid` (two interpolations; ``medfast register`` samples the native moving array once, at
    ``A_m^-1`` of the world point ``A_f (x + ddf)``); ``affine`` the fixed grid's affine as :func:`load_nifti`
    returns it. Inverse of the conversion :func:`write_outputs` describes (LPS mm -> voxels)."""
    from medfast.data.io import load_checked, single_slice_as_2d, single_slice_axis

    _nib()
    path = Path(path)
    if not path.is_file():
        raise RegistrationError(f"no such displacement field: {path}")
    img = load_checked(path, RegistrationError)  # before .dataobj allocates what a lying header claims
    data = np.asarray(img.dataobj, dtype=np.float64)
    if data.ndim != 5 or data.shape[3] != 1 or data.shape[4] not in (2, 3):
        raise RegistrationError(f"{path} has shape {data.shape}, not a NIfTI displacement field (X, Y, Z, 1, 3) or "
                                f"(X, Y, 1, 1, 2) as medfast register writes it")
    vec = data[:, :, :, 0]  # (X, Y, Z, c)
    axis = single_slice_axis(vec.shape[:3])
    affine = np.array(img.affine, dtype=np.float64)
    if vec.shape[-1] == 2:  # a 2D field: (X, Y, 1, 1, 2)
        if vec.shape[2] != 1:
            raise RegistrationError(f"{path}: a 2-component field must be (X, Y, 1, 1, 2), got {data.shape}")
        vec, n, world = vec[:, :, 0], 2, False
    elif axis is None:
        n, world = 3, False
    else:  # a single slice stored with its flat axis in place: world vectors in the plane
        vec, n, world = np.take(vec, 0, axis=axis), 2, True
        affine = single_slice_as_2d(np.zeros(data.shape[:3]), affine)[1]
    k = _ddf_matrix(affine, n, world)
    vox = vec @ np.linalg.pinv(k).T  # (*S, n); exact for the in-plane vectors written
    return torch.as_tensor(np.moveaxis(vox, -1, 0)[None], dtype=torch.float32).contiguous(), affine


def _world_affine(theta: torch.Tensor, affine: np.ndarray, n: int) -> np.ndarray:
    """The affine part ``theta`` (fixed voxels) as a 4x4 RAS world (mm) matrix: fixed point -> moving point. A 2D
    image's plane keeps its normal component (the map acts within the plane)."""
    a = np.array(affine, dtype=np.float64)
    t = np.eye(4)
    th = theta[0].detach().cpu().double().numpy()
    t[:n, :n], t[:n, 3] = th[:, :n], th[:, n]
    if n == 2:  # the flat axis's column (possibly degenerate) as the unit normal: invertible, the normal fixed
        normal = np.cross(a[:3, 0], a[:3, 1])
        a[:3, 2] = normal / np.linalg.norm(normal)
    return a @ t @ np.linalg.inv(a)


def _itk_affine(theta: torch.Tensor, affine: np.ndarray, n: int, world: bool) -> str:
    """ITK transform file text (AffineTransform_double_D_D, centre 0) of the affine part, in the frame of
    ddf.nii.gz (see :func:`_ddf_matrix`): fixed physical point -> moving physical point, as ITK resamples."""
    from medfast.data.preprocess import spatial_affine

    if n == 3 or world:
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        m, d = flip @ _world_affine(theta, affine, n) @ flip, 3
    else:
        a2 = spatial_affine(affine, 2)
        t = np.eye(3)
        t[:2] = theta[0].detach().cpu().double().numpy()
        flip = np.diag([-1.0, -1.0, 1.0])
        m, d = flip @ a2 @ t @ np.linalg.inv(a2) @ flip, 2
    params = " ".join(f"{v:.17g}" for v in [*m[:d, :d].ravel(), *m[:d, d]])
    return (f"#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_{d}_{d}\n"
            f"Parameters: {params}\nFixedParameters: {' '.join(['0'] * d)}\n")


def write_outputs(out: str | Path, result: RegistrationResult, fixed_affine: np.ndarray,
                  fixed_norm: torch.Tensor, moving_norm: torch.Tensor, affine_only: torch.Tensor | None = None,
                  extra: dict | None = None, fixed_slice_axis: int | None = None,
                  fixed_header: Any = None) -> dict[str, str]:
    """Writes warped.nii.gz, ddf.nii.gz, warped_labels.nii.gz, affine.txt, affine.tfm, metrics.json and
    overlay.png into ``out``; returns the paths written.

    ``fixed_affine`` is the fixed grid's affine as :func:`load_nifti` returns it; ``fixed_slice_axis`` the flat
    axis of a fixed single slice as stored (:func:`medfast.data.io.single_slice_axis` of the file's shape): the
    images are written in the fixed file's own layout and affine, that axis put back (``(X, 1, Z)`` stays
    ``(X, 1, Z)``). ``fixed_header``, the fixed file's NIfTI header, is copied into every image written (as
    :func:`medfast.data.io.save_nifti` copies it: its qform and sform, matrices and codes, kept), so that readers
    preferring the qform (ITK / SimpleITK / Slicer / ANTs) also place the outputs on the fixed image, where its
    qform and sform differ or where it has neither (pixdim only); without it, a fresh header (sform only).

    ``ddf.nii.gz`` (float32, NIfTI vector intent, intent name ``displacement_mm``) is the pull displacement in mm
    on the fixed grid, with ITK's convention for displacement-field NIfTIs, so ITK / SimpleITK / ANTs / Slicer
    apply it as it is (``sitk.DisplacementFieldTransform``): the components are in **LPS** (world x and y
    negated relative to nibabel's RAS), and the moving point is ``fixed point + ddf``. Layouts:

    - 3D ``(X, Y, Z, 1, 3)``: world LPS. With nibabel (RAS): ``ddf_ras = ddf * [-1, -1, 1]``, then
      ``moving_ras = affine @ [i, j, k, 1] + ddf_ras``.
    - 2D stored ``(X, Y)`` or ``(X, Y, 1)`` (ITK reads the field as 2D): ``(X, Y, 1, 1, 2)`` in the in-plane frame
      of :func:`medfast.data.preprocess.spatial_affine` with both components negated: for an axial image
      exactly LPS x, y (ITK's 2D physical frame); a tilted plane laid flat by the smallest rotation. RAS:
      ``ddf * [-1, -1]``.
    - a slice stored ``(X, 1, Z)`` / ``(1, Y, Z)`` (coronal, sagittal; ITK reads it as 3D): ``(X, 1, Z, 1, 3)`` /
      ``(1, Y, Z, 1, 3)``, world LPS vectors within the fixed plane (the moving slice is projected onto it).

    :func:`load_ddf` reads it back in fixed voxels. ``affine.txt`` is the affine part of the transform (the
    affine stage, or a GlobalNet's prediction; the identity for a LocalNet), a 4x4 matrix in RAS world mm
    (nibabel's frame) mapping a fixed point to the moving point, ``[moving; 1] = M @ [fixed; 1]`` (a 2D image's
    map acts within its plane); ``affine.tfm`` the same as an ITK ``AffineTransform_double_D_D`` text file (fixed
    -> moving physical point, as ITK resamples), in the frame of ddf.nii.gz (LPS; D = the field's components).

    ``warped.nii.gz`` holds every channel of a multi-channel result, on the last axis (``(X, Y, Z, C)``; 2D
    ``(X, Y, 1, C)`` or the slice's layout, e.g. ``(X, 1, Z, C)``), as multi-channel images are read;
    ``overlay.png`` shows channel 0.
    """
    from medfast.data.io import save_nifti, single_slice_as_stored

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = result.ddf.shape[1]
    axis = fixed_slice_axis if n == 2 else None
    world = axis in (0, 1)  # a slice ITK reads as a 3D image: 3-component world vectors
    file_affine = single_slice_as_stored(np.zeros((1, 1)), fixed_affine, axis)[1]
    paths = {}
    warped = np.moveaxis(result.warped[0].detach().cpu().numpy().astype(np.float32), 0, -1)  # (*S, C)
    if n == 2 and (axis is not None or warped.shape[-1] > 1):  # a 2D image with channels: (X, Y, 1, C)
        warped = np.expand_dims(warped, 2 if axis is None else axis)
    if warped.shape[-1] == 1:
        warped = warped[..., 0]

    def save(data: np.ndarray, name: str, intent: tuple | None = None) -> None:
        save_nifti(data, file_affine, out / name, fixed_header, data.dtype, intent)

    save(warped, "warped.nii.gz")
    paths["warped"] = str(out / "warped.nii.gz")
    k = torch.as_tensor(_ddf_matrix(fixed_affine, n, world), dtype=torch.float32)
    ddf = torch.einsum("ij,j...->...i", k, result.ddf[0].detach().cpu().float()).numpy()  # (*S, c)
    # NIfTI vectors live on the 5th axis: (X, Y, Z, 1, c), a 2D field as (X, Y, 1, 1, 2)
    ddf = ddf[..., None, :] if n == 3 else single_slice_as_stored(ddf, fixed_affine, 2 if axis is None else axis)[0]
    save(ddf if ddf.ndim == 5 else ddf[..., None, :], "ddf.nii.gz", ("vector", (), "displacement_mm"))
    paths["ddf"] = str(out / "ddf.nii.gz")
    np.savetxt(out / "affine.txt", _world_affine(result.theta, fixed_affine, n), fmt="%.10g",
               header="medfast register affine part: RAS world mm, [moving; 1] = M @ [fixed; 1]")
    (out / "affine.tfm").write_text(_itk_affine(result.theta, fixed_affine, n, world))
    paths["affine"], paths["affine_itk"] = str(out / "affine.txt"), str(out / "affine.tfm")
    if result.warped_labels is not None:
        lab = result.warped_labels.detach().cpu().numpy()
        # int32 as before where it holds them (uint32 ids of 3e9 wrapped negative), else int64
        lab = lab.astype(np.int32 if lab.size == 0 or (lab.min() >= -2**31 and lab.max() < 2**31) else np.int64)
        lab = single_slice_as_stored(lab, fixed_affine, axis)[0]
        save(lab, "warped_labels.nii.gz", ("label", (), ""))
        paths["warped_labels"] = str(out / "warped_labels.nii.gz")
    else:  # an earlier run's, into the same folder: it belongs to another transform
        (out / "warped_labels.nii.gz").unlink(missing_ok=True)
    metrics = dict(result.metrics)
    if extra:
        metrics.update(extra)
    (out / "metrics.json").write_text(json_dumps(metrics, indent=2))  # a Dice of an absent label: null, not NaN
    paths["metrics"] = str(out / "metrics.json")
    def first(t: torch.Tensor) -> torch.Tensor:  # the overlay shows channel 0 of a multi-channel image
        return t[:, :1] if t.dim() == n + 2 else t

    panels = {"before": first(moving_norm)}
    if affine_only is not None:
        panels["after affine"] = first(affine_only)
    panels["after deformable" if affine_only is not None else "after"] = first(result.warped)
    title = None
    if "dice_before" in metrics:
        title = " / ".join(f"{k.replace('dice_', 'Dice ')} {metrics[k]:.3f}"
                           for k in ("dice_before", "dice_affine", "dice_after") if k in metrics)
    from medfast._figures import figures_enabled

    if figures_enabled("medfast register"):  # matplotlib is optional: the transform and images are the results
        save_overlay(out / "overlay.png", first(fixed_norm), panels, title)
        paths["overlay"] = str(out / "overlay.png")
    else:  # an earlier run's overlay would pass for this run's
        (out / "overlay.png").unlink(missing_ok=True)
    return paths


# ---------------------------------------------------------------------------------------------
# Command line (``medfast register``)
# ---------------------------------------------------------------------------------------------


def configure_register_parser(p: argparse.ArgumentParser) -> None:
    """Declares the arguments of ``medfast register`` (used by :mod:`medfast.cli`)."""
    d = RegistrationConfig()
    p.add_argument("fixed", nargs="?", help="fixed image (NIfTI; several channels/modalities: one 4D NIfTI "
                                            "(X, Y, Z, C), each channel normalized on its own)")
    p.add_argument("moving", nargs="?", help="moving image (NIfTI, the fixed image's channels), placed by the "
                                             "headers and sampled in its own grid (no part beyond the fixed field of "
                                             "view lost); an error when the headers put it outside the fixed image")
    p.add_argument("--fixed-labels", help="label map of the fixed image (NIfTI, 0 = background)")
    p.add_argument("--moving-labels", help="label map of the moving image")
    p.add_argument("--out", default="medfast-register",
                   help="output folder: warped.nii.gz (the fixed file's layout and affine), ddf.nii.gz "
                        "(displacement in mm, ITK's convention: LPS components, moving point = fixed point + ddf; "
                        "3D (X, Y, Z, 1, 3); a 2D image (X, Y, 1, 1, 2) in-plane, LPS x, y for an axial one; a "
                        "slice stored (X, 1, Z) or (1, Y, Z) 3 world components; nibabel/RAS users: multiply 3 "
                        "components by [-1, -1, 1], 2D in-plane ones by [-1, -1]), affine.txt (4x4 RAS mm, fixed "
                        "point -> moving point), affine.tfm (the same for ITK), metrics.json, overlay.png "
                        "(default: %(default)s)")
    p.add_argument("--model", help="trained LocalNet/GlobalNet checkpoint: one forward pass instead of optimization")
    p.add_argument("--demo", action="store_true",
                   help="Colin27 (ch2bet) -> MNI152 T1 with a random affine; tissue-overlap report")
    p.add_argument("--resolution", type=float, default=None, help="demo voxel size in mm, 0.5 to 20 (default: 3)")
    p.add_argument("--seed", type=int, default=None, help="demo random affine seed (default: 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: %(default)s)")
    p.add_argument("--affine-levels", type=_levels, default=",".join(map(str, d.affine_levels)),
                   help="down-sampling factors of the affine stage, '' to skip (default: %(default)s)")
    p.add_argument("--deform-levels", type=_levels, default=",".join(map(str, d.deform_levels)),
                   help="down-sampling factors of the deformable stage, '' to skip (default: %(default)s)")
    p.add_argument("--affine-iters", type=int, default=d.affine_iters)
    p.add_argument("--deform-iters", type=int, default=d.deform_iters)
    p.add_argument("--kernel-size", type=int, default=d.kernel_size, help="LNCC window (voxels)")
    p.add_argument("--bending-weight", type=float, default=d.bending_weight)
    p.add_argument("--dice-weight", type=float, default=d.dice_weight,
                   help="weight of the label Dice term (weakly supervised; needs both label maps)")
    p.add_argument("--velocity", action="store_true",
                   help="optimize a stationary velocity field (scaling and squaring: diffeomorphic in the continuum, "
                        "but it can still fold at a low --bending-weight; metrics.json reports folding_percent)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _levels(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"4,2,1"`` -> ``(4, 2, 1)`` (``""``: none); the argparse type of ``--affine-levels``/``--deform-levels``,
    so that a bad value is reported with the flag's name."""
    if not isinstance(text, str):
        return tuple(int(v) for v in text)
    try:
        levels = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers (e.g. 4,2,1) or '', got "
                                         f"{text!r}") from None
    if any(v < 1 for v in levels):
        raise argparse.ArgumentTypeError(f"down-sampling factors must be >= 1, got {text!r}")
    return levels


def _device(name: str) -> torch.device:
    from medfast._device import resolve_device

    return resolve_device(name, "--device", RegistrationError)


def _load_label_map(path: str, image_path: str, shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """A label map on its image's voxel grid (same shape and affine, as the training data loader checks), with
    non-negative integer values; raises :class:`RegistrationError` naming the files."""
    data, laff = load_nifti(path, label=True)
    if tuple(data.shape) != tuple(shape):
        raise RegistrationError(f"label map {path} has shape {tuple(data.shape)} but its image {image_path} has "
                                f"shape {tuple(shape)}")
    # the grid test in voxels (as the data sets and evaluate): a tolerance in mm passed a label map shifted by whole
    # voxels on a grid of small voxels or far from the origin
    if not same_grid(laff, affine, shape):
        raise RegistrationError(
            f"label map {path} and its image {image_path} have different affines (not on the same voxel grid):\n"
            f"{np.array2string(laff, precision=3)}\nvs\n{np.array2string(affine, precision=3)}")
    if data.dtype.kind not in "fiub":
        raise RegistrationError(f"label map {path} has data type {data.dtype}, not integer labels")
    # (NaN read as background and inf / 1e20 cast to label -2^63 had halved the reported Dice, without a word)
    check_label_values(data, f"label map {path}", RegistrationError)
    if data.size and data.min() < 0:
        raise RegistrationError(f"label map {path} holds negative values (min {data.min()})")
    return data.astype(np.int64)


def _make_out_dir(out: str | Path) -> Path:
    """Creates ``--out`` before the optimization, so that an unusable folder fails at once, in one line."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RegistrationError(f"--out {out} cannot be created: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RegistrationError(f"--out {out} is not writable; give another output folder")
    return path


def _optimization_flags(cfg: RegistrationConfig) -> list[str]:
    """The instance-optimization flags of ``medfast register`` set to a non-default value in ``cfg``."""
    d = RegistrationConfig()
    return [f"--{f.name.replace('_', '-')}" for f in fields(RegistrationConfig)
            if f.name != "integration_steps" and getattr(cfg, f.name) != getattr(d, f.name)]


def run_register(args: argparse.Namespace) -> int:
    """Runs ``medfast register`` from parsed arguments; returns the exit status."""
    from medfast.train.files import check_out_dir

    fresh = False  # --out created by this run: removed again if the run fails before writing into it
    try:
        check_out_dir(args.out, "--out")
        cfg = RegistrationConfig(
            affine_levels=_levels(args.affine_levels), deform_levels=_levels(args.deform_levels),
            affine_iters=args.affine_iters, deform_iters=args.deform_iters, kernel_size=args.kernel_size,
            bending_weight=args.bending_weight, dice_weight=args.dice_weight, velocity=args.velocity)
        if args.model and _optimization_flags(cfg):  # one forward pass: these would be silently ignored
            flags = _optimization_flags(cfg)
            raise RegistrationError(f"--model runs the trained network (one forward pass, no optimization): "
                                    f"{', '.join(flags)} would be ignored; remove {'it' if len(flags) == 1 else 'them'}"
                                    f" (or drop --model to optimize)")
        # a stage's settings where it does not run (no levels, or 0 iterations) were silently ignored; the label Dice
        # drives the affine stage too, so --dice-weight only where neither stage runs
        deform = bool(cfg.deform_levels) and cfg.deform_iters > 0
        affine = bool(cfg.affine_levels) and cfg.affine_iters > 0
        unused = [f for f in _optimization_flags(cfg) if (f in ("--velocity", "--bending-weight") and not deform)
                  or (f == "--dice-weight" and not (deform or affine))]
        if unused and not args.model:  # (--model refuses every optimization flag above)
            runs = "no deformable stage runs" + ("" if affine else " (nor an affine stage)")
            raise RegistrationError(f"{', '.join(unused)} would be ignored: {runs} with --deform-levels "
                                    f"{','.join(map(str, cfg.deform_levels)) or repr('')} --deform-iters "
                                    f"{cfg.deform_iters}; remove {'it' if len(unused) == 1 else 'them'}, or give the "
                                    f"deformable stage levels and iterations")
        # what the other mode would silently ignore is an error (the demo ran with a nonexistent --model)
        if args.demo:
            ignored = [name for name, given in (("FIXED / MOVING", args.fixed or args.moving), ("--model", args.model),
                                                ("--fixed-labels / --moving-labels",
                                                 args.fixed_labels is not None or args.moving_labels is not None))
                       if given]
            if ignored:
                raise RegistrationError(f"--demo registers the packaged Colin27 -> MNI152 pair: {', '.join(ignored)} "
                                        f"would be ignored; remove {'it' if len(ignored) == 1 else 'them'} (or drop "
                                        f"--demo)")
        elif args.resolution is not None or args.seed is not None:
            raise RegistrationError("--resolution and --seed set up the --demo pair: give --demo, or remove them")
        if args.resolution is not None and not 0.5 <= args.resolution <= 20:
            # (0 or inf overflowed, 0.05 asked for 555 GB, NaN and negatives failed naming other things)
            raise RegistrationError(f"--resolution must be a voxel size in mm between 0.5 and 20 (the demo images "
                                    f"have 1 mm voxels), got {args.resolution}")
        device = _device(args.device)
        if args.demo:
            _make_out_dir(args.out)
            summary = run_registration_demo(args.out, resolution=3.0 if args.resolution is None else args.resolution,
                                            seed=0 if args.seed is None else args.seed, config=cfg, device=device,
                                            progress=not args.no_progress)
            print(json_dumps(summary, indent=2))
            return 0
        if not args.fixed or not args.moving:
            raise RegistrationError("give FIXED and MOVING images (or --demo)")
        if (args.fixed_labels is None) != (args.moving_labels is None):
            raise RegistrationError("give both --fixed-labels and --moving-labels, or neither")
        if args.dice_weight > 0 and args.fixed_labels is None:  # else the Dice term would be silently skipped
            raise RegistrationError("--dice-weight needs --fixed-labels and --moving-labels")
        # (C, *S): a multi-channel image is one NIfTI with the channels on its last axis, (X, Y, Z, C)
        fdata, faff = load_nifti(args.fixed, channels=True)
        mdata, maff = load_nifti(args.moving, channels=True)
        n = fdata.ndim - 1
        if fdata.ndim != mdata.ndim:
            raise RegistrationError(f"the fixed image {args.fixed} is {n}D (shape {fdata.shape[1:]}) but the "
                                    f"moving image {args.moving} is {mdata.ndim - 1}D (shape {mdata.shape[1:]}): both "
                                    f"must be 2D or both 3D")
        if fdata.shape[0] != mdata.shape[0]:
            raise RegistrationError(f"the fixed image {args.fixed} has {fdata.shape[0]} channel(s) but the moving "
                                    f"image {args.moving} has {mdata.shape[0]}: both need the same channels "
                                    f"(modalities), in the same order")
        if n == 2 and _plane_angle(faff, maff) > 30:  # projecting one plane onto the other: nonsense
            raise RegistrationError(f"the 2D images {args.fixed} and {args.moving} lie in planes "
                                    f"{_plane_angle(faff, maff):.0f} degrees apart (e.g. coronal and axial): the "
                                    f"header alignment cannot map one onto the other")
        net = info = None
        if args.model:  # a network takes the dims and channel count it was trained on: check them before any work
            net, info = load_model_info(args.model, device)
            if len(info.input_shape) != n:
                raise RegistrationError(f"the model {args.model} takes {len(info.input_shape)}D images, FIXED "
                                        f"{args.fixed} is {n}D (shape {tuple(fdata.shape[1:])})")
            if info.in_channels is not None and fdata.shape[0] != info.in_channels:
                raise RegistrationError(
                    f"checkpoint {args.model} expects {info.in_channels}-channel images (model.in_channels="
                    f"{info.in_channels}); FIXED {args.fixed} has {fdata.shape[0]} (give a multi-channel image as "
                    f"one NIfTI with the channels on its last axis, (X, Y, Z, C), in the training order)")
        shape = fdata.shape[1:]
        fixed = torch.as_tensor(fdata, dtype=torch.float32)[None]  # (1, C, *S)
        a_m, a_f = grid_affines(maff, faff, n)
        fl = ml = None
        if args.fixed_labels:
            fl = torch.as_tensor(_load_label_map(args.fixed_labels, args.fixed, shape, faff))
            ml = _load_label_map(args.moving_labels, args.moving, mdata.shape[1:], maff)
        fresh = not Path(args.out).exists()
        _make_out_dir(args.out)
        # both paths sample the native moving array through the header map (nothing cut to the fixed field of
        # view, one interpolation); the network is still fed the moving image resampled onto the fixed grid
        native = torch.as_tensor(mdata, dtype=torch.float32)[None]
        import warnings

        try:
            with warnings.catch_warnings():  # said below in one line, naming the files
                warnings.simplefilter("ignore", _OverlapWarning)
                if net is not None:  # (float64: the network input resampled from it as to_fixed_grid did)
                    moving64 = torch.as_tensor(mdata, dtype=torch.float64)[None]
                    result = register_with_model(fixed, moving64, net, info, fl, ml, device=device,
                                                 fixed_affine=faff, moving_affine=maff)
                else:
                    result = register_pair(fixed, native, fl, ml, cfg, device=device, progress=not args.no_progress,
                                           spatial_dims=n, fixed_affine=a_f, moving_affine=a_m)
        except _NoOverlapError as exc:
            raise RegistrationError(f"FIXED {args.fixed} and MOVING {args.moving}: {exc}") from None
        if result.metrics["overlap_before"] < _WARN_OVERLAP:
            method = "a local optimization" if net is None else "the network"
            print(f"medfast register: warning: only {100 * result.metrics['overlap_before']:.0f} % of FIXED "
                  f"{args.fixed}'s foreground lies inside MOVING {args.moving} by their headers: {method} may not "
                  f"find the alignment (check the result)", file=sys.stderr)
        q = torch.as_tensor(_grid_map(a_f, a_m, n)[0][:n], dtype=torch.float64, device=device)
        with torch.no_grad():
            mnorm = normalize_intensity(native.to(device), spatial_dims=n)
            affine_only = None if net is not None else _sample_moving(mnorm, result.theta, None, q, shape)
            before = _sample_moving(mnorm, level_theta(torch.eye(n, n + 1, device=device)[None], shape, 1), None,
                                    q, shape)
        try:
            from medfast.data.io import single_slice_axis

            fimg = nifti_header(args.fixed, RegistrationError)  # (a mixed-case suffix as load_nifti reads it)
            paths = write_outputs(args.out, result, faff, normalize_intensity(fixed, spatial_dims=n), before,
                                  affine_only,
                                  extra={"fixed": str(args.fixed), "moving": str(args.moving),
                                         **({"model": str(args.model)} if net is not None else {})},
                                  fixed_slice_axis=single_slice_axis(fimg.shape), fixed_header=fimg.header)
        except OSError as exc:  # full disk, folder removed or made read-only meanwhile
            raise RegistrationError(f"--out {args.out}: cannot write the outputs: {exc}") from None
    except (RegistrationError, ValueError, TypeError) as exc:
        if fresh:  # no empty output folder left behind by a failed run
            with contextlib.suppress(OSError):
                Path(args.out).rmdir()  # only if still empty
        print(f"medfast register: error: {exc}", file=sys.stderr)
        return 1
    keys = ("dice_before", "dice_affine", "dice_after", "lncc_before", "lncc_affine", "lncc_after", "folding_percent")
    summary = {k: result.metrics[k] for k in keys if k in result.metrics}
    print(json_dumps({"outputs": paths, **summary}, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------
# Demo: Colin27 -> MNI152
# ---------------------------------------------------------------------------------------------


def mni_t1_path() -> Path:
    """Path of the MNI152 2009a T1 template inside the installed nilearn wheel (RegistrationError without it)."""
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise RegistrationError("the registration demo needs the MNI152 T1 inside the nilearn wheel: "
                                "`pip install nilearn`")
    path = Path(spec.origin).parent / "datasets" / "data" / MNI_T1_FILE
    if not path.is_file():
        raise RegistrationError(f"the installed nilearn does not contain {MNI_T1_FILE}")
    return path


def kmeans_tissues(image: torch.Tensor, mask: torch.Tensor, k: int = 3, iters: int = 50) -> torch.Tensor:
    """Intensity k-means inside ``mask``: labels 1..k ordered by mean intensity (T1: CSF, GM, WM), 0 outside."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or isinstance(iters, bool) or not isinstance(
            iters, int) or iters < 0:
        raise ValueError(f"k must be an int >= 1 and iters an int >= 0, got {k!r}, {iters!r}")
    if not isinstance(image, torch.Tensor) or not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool \
            or mask.shape != image.shape:
        raise ValueError(f"image must be a tensor and mask a bool tensor of its shape, got "
                         f"{getattr(image, 'shape', type(image).__name__)} and "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    v = image[mask].double()
    if v.numel() == 0 or not torch.isfinite(v).all():
        raise ValueError("the image must hold finite values inside a non-empty mask")
    centres = torch.quantile(v, torch.linspace(0.1, 0.9, k, dtype=torch.float64, device=v.device))
    for _ in range(iters):
        assign = (v[:, None] - centres[None]).abs().argmin(1)
        new = torch.stack([v[assign == j].mean() if (assign == j).any() else centres[j] for j in range(k)])
        if torch.allclose(new, centres):
            break
        centres = new
    order = torch.argsort(centres)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(k, device=v.device)
    out = torch.zeros(image.shape, dtype=torch.long, device=image.device)
    out[mask] = rank[(v[:, None] - centres[None]).abs().argmin(1)] + 1
    return out


def random_affine(n: int, seed: int, rotation_deg: float = 10.0, translation_mm: float = 10.0,
                  scaling: float = 0.08) -> np.ndarray:
    """A random world-space affine (about the origin) as a (n + 1, n + 1) matrix."""
    if n not in (2, 3) or isinstance(n, bool):
        raise ValueError(f"n must be 2 or 3, got {n!r}")
    for name, value, top in (("rotation_deg", rotation_deg, math.inf), ("translation_mm", translation_mm, math.inf),
                             ("scaling", scaling, 1.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < top:
            raise ValueError(f"{name} must be a finite number >= 0{' below 1' if top == 1.0 else ''}, got {value!r}")
    g = np.random.default_rng(seed)
    angles = np.deg2rad(g.uniform(-rotation_deg, rotation_deg, 3 if n == 3 else 1))
    R = np.eye(n)
    for i, (a, b) in enumerate([(1, 2), (0, 2), (0, 1)] if n == 3 else [(0, 1)]):
        r = np.eye(n)
        r[a, a] = r[b, b] = np.cos(angles[i])
        r[a, b], r[b, a] = -np.sin(angles[i]), np.sin(angles[i])
        R = R @ r
    S = np.diag(1 + g.uniform(-scaling, scaling, n))
    M = np.eye(n + 1)
    M[:n, :n] = R @ S
    M[:n, n] = g.uniform(-translation_mm, translation_mm, n)
    return M


def run_registration_demo(out: str | Path = "medfast-register-demo", resolution: float = 3.0, seed: int = 0,
                          config: RegistrationConfig | None = None, device: str | torch.device = "cpu",
                          progress: bool = True) -> dict:
    """Registers Colin27 (``ch2bet``, mricron-data) to the MNI152 2009a T1 (nilearn) at ``resolution`` mm,
    after moving Colin27 by a random affine (rotation up to 10 deg, translation up to 10 mm, scaling up
    to 8 %).

    Evaluation: 3-class tissue maps (CSF / GM / WM) from intensity k-means inside each brain mask, by the
    SAME procedure on both images (no GM/WM maps exist for Colin27; the MNI maps are not used so that
    both label maps carry the same bias). The labels are not used by the optimization. Dice (mean over
    the 3 classes) is reported before, after the affine stage and after the deformable stage.
    """
    nib = _nib()
    if not COLIN27_PATH.is_file():
        raise RegistrationError(f"the registration demo needs Colin27 at {COLIN27_PATH}: "
                                f"`apt-get install mricron-data`")
    mni = nib.load(mni_t1_path())
    colin = nib.load(COLIN27_PATH)
    # the demo grid: MNI's field of view at `resolution` mm
    mshape = np.array(mni.shape[:3])
    scale = resolution / np.abs(np.diag(mni.affine)[:3])
    shape = tuple(int(s) for s in np.ceil(mshape / scale))
    grid = mni.affine.copy()
    grid[:3, :3] = mni.affine[:3, :3] @ np.diag(scale)
    grid[:3, 3] = mni.affine[:3, 3] + mni.affine[:3, :3] @ ((scale - 1) / 2)
    t0 = time.perf_counter()

    def smooth_to_grid(img, affine) -> torch.Tensor:
        data = torch.as_tensor(np.asarray(img.dataobj, dtype=np.float32))[None, None]
        f = max(1, int(round(resolution / float(np.abs(np.diag(affine)[:3]).mean()))))
        # average f^3 blocks first (anti-aliasing), then resample through the block grid's affine
        coarse = _down(data, f)
        aff = affine.copy()
        aff[:3, :3] = affine[:3, :3] * f
        aff[:3, 3] = affine[:3, 3] + affine[:3, :3] @ np.full(3, (f - 1) / 2)
        return mf.resample(coarse.double(), torch.as_tensor(aff), torch.as_tensor(grid), list(shape))[0, 0].float()

    fixed = smooth_to_grid(mni, mni.affine)
    M = random_affine(3, seed)
    # the moving image is Colin27 seen through M: moving(x) = colin(M^-1 world(x)); as a header change
    moved_affine = M @ colin.affine
    moving = smooth_to_grid(colin, moved_affine)
    fixed_mask = fixed > 0.05 * float(fixed.max())
    moving_mask = moving > 0.05 * float(moving.max())
    fixed_labels = kmeans_tissues(fixed, fixed_mask)
    moving_labels = kmeans_tissues(moving, moving_mask)
    prep_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = register_pair(fixed, moving, fixed_labels, moving_labels, config or RegistrationConfig(),
                           device=device, progress=progress)
    total_s = time.perf_counter() - t0
    with torch.no_grad():
        mv = normalize_intensity(_as_image(moving, "moving")).to(device)
        affine_only = mf.affine_warp(mv, result.theta.to(device))
    summary = {
        "fixed": str(mni_t1_path()), "moving": str(COLIN27_PATH), "resolution_mm": resolution,
        "grid": list(shape), "random_affine": M.tolist(), "seed": seed,
        "labels": "3-class intensity k-means (CSF, GM, WM) inside each brain mask, same procedure on both",
        "dice_before": result.metrics["dice_before"], "dice_affine": result.metrics["dice_affine"],
        "dice_after": result.metrics["dice_after"],
        "dice_per_label": {s: result.metrics[f"dice_{s}_per_label"] for s in ("before", "affine", "after")},
        "lncc_before": result.metrics["lncc_before"], "lncc_affine": result.metrics["lncc_affine"],
        "lncc_after": result.metrics["lncc_after"], "time_prepare_s": prep_s,
        "time_affine_s": result.metrics["time_affine_s"], "time_deformable_s": result.metrics["time_deformable_s"],
        "time_total_s": total_s, "device": str(device), "torch_threads": torch.get_num_threads(),
    }
    write_outputs(out, result, grid, normalize_intensity(_as_image(fixed, "fixed")), mv, affine_only,
                  extra={"demo": summary})
    (Path(out) / "demo.json").write_text(json_dumps(summary, indent=2))
    return summary


# ---------------------------------------------------------------------------------------------
# Training a network with the generic trainer (``config.task = "registration"``)
# ---------------------------------------------------------------------------------------------


class RegistrationNet(torch.nn.Module):
    """A LocalNet (optionally after a GlobalNet affine) returning the total displacement.

    Parameters
    ----------
    spatial_dims : int
        2 or 3.
    in_channels : int
        Channels of the concatenated (moving, fixed) input, ``2 * C``.
    num_channel_initial, depth : int
        LocalNet (and GlobalNet) width and number of down-sampling levels.
    extract_levels : sequence of int, optional
        LocalNet decoder levels averaged into the output (default all).
    velocity : bool
        The LocalNet outputs a stationary velocity field, integrated by scaling and squaring
        (:func:`medfast.integrate`, ``integration_steps`` squarings).
    integration_steps : int
        Squarings of the velocity field with ``velocity`` (0 to 64, as :func:`medfast.integrate`; unused without
        ``velocity``).
    global_net : bool
        Predict an affine first (GlobalNet); the LocalNet then sees the affinely warped moving image.

    Shapes
    ------
    ``forward(x)``: ``(B, in_channels, *S)`` (moving channels first) -> ``(theta, ddf)``: ``theta``
    ``(B, n, n + 1)`` the affine part (the identity without ``global_net``) and ``ddf`` ``(B, n, *S)`` the
    total displacement in voxels (``warped = medfast.warp(moving, ddf)``), so :func:`register_with_model`
    uses it like a LocalNet. With ``global_net`` the LocalNet's displacement ``u`` acts on the affinely warped
    moving image, so the two compose: ``ddf(x) = theta [x + u(x); 1] - x = theta [x; 1] - x + A u(x)`` (``A``
    the linear part of ``theta``), the warp of ``medfast.warp(medfast.affine_warp(moving, theta), u)``.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 2, num_channel_initial: int = 16, depth: int = 3,
                 extract_levels: Sequence[int] | None = None, velocity: bool = False, integration_steps: int = 7,
                 global_net: bool = False) -> None:
        super().__init__()
        if in_channels < 2 or in_channels % 2:
            raise ValueError(f"in_channels must be 2 * image channels (moving + fixed), got {in_channels}")
        for name, flag in (("velocity", velocity), ("global_net", global_net)):
            if not isinstance(flag, (bool, np.bool_)):  # bool("false") is True
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        if isinstance(integration_steps, bool) or not isinstance(integration_steps, (int, np.integer)) \
                or not 0 <= integration_steps <= _MAX_STEPS:
            raise ValueError(f"integration_steps must be an int in 0..{_MAX_STEPS}, got {integration_steps!r}")
        self.ndim, self.velocity, self.steps = spatial_dims, bool(velocity), int(integration_steps)
        # (None: LocalNet's default, every level; passed as given so that LocalNet checks what the user wrote)
        self.local = LocalNet(spatial_dims, in_channels, num_channel_initial, depth, extract_levels)
        self.globalnet = GlobalNet(spatial_dims, in_channels, num_channel_initial, depth) if global_net else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, c = self.ndim, x.shape[1] // 2
        shape = x.shape[2:]
        # the transform in float32 (half / bfloat16 activations under autocast widened), float64 for a float64 net
        dt = torch.promote_types(x.dtype, torch.float32)
        if self.globalnet is not None:
            theta, _ = self.globalnet(x)
            moving = mf.affine_warp(x[:, :c].to(dt).contiguous(), theta.to(dt))
            x = torch.cat([moving.to(x.dtype), x[:, c:]], 1)
        else:
            theta = torch.eye(n, n + 1, device=x.device, dtype=dt).expand(x.shape[0], n, n + 1)
        u = self.local(x).to(dt)
        if self.velocity:
            u = mf.integrate(u.contiguous(), self.steps)
        if self.globalnet is None:
            return theta, u
        # u moves points of the affinely warped image, so the total map is x -> theta [x + u(x); 1]: the
        # displacement theta [x; 1] - x + A u(x) (A = theta's linear part, voxels; elementwise: no autocast)
        a = theta[:, :, :n].to(dt).reshape(theta.shape[0], n, n, *[1] * n)
        return theta.to(dt), affine_ddf(theta.to(dt), shape) + (a * u[:, None]).sum(2)


_NETS["RegistrationNet"] = RegistrationNet


def _net_kwargs(config: Any, *, trained: bool = False) -> dict[str, Any]:
    """``RegistrationNet`` arguments from a trainer :class:`~medfast.train.Config`. ``trained``: the config of a
    checkpoint, where a one-entry ``model.channels`` (refused for training since it gives no depth) stands for
    the depth-1 network it was trained as."""
    m, ta = config.model, _task_args(config)
    if m.name.lower() not in ("localnet", "registrationnet"):
        raise ConfigError(f"the registration task trains model.name = 'localnet', got {m.name!r}")
    kw = dict(m.kwargs)
    unknown = set(kw) - {"extract_levels"}
    if unknown:
        raise ConfigError(f"unknown model.kwargs for localnet: {sorted(unknown)} (valid: extract_levels)")
    chans = list(m.channels)
    if not chans:
        raise ConfigError("model.channels must list at least one width (the first is LocalNet's, its length - 1 "
                         "the depth)")
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in chans):
        raise ConfigError(f"model.channels must be positive ints, got {chans}")
    if len(chans) < 2 and not trained:
        # its length - 1 is the depth: [8] would be depth 0, which LocalNet refuses (it was silently depth 1)
        raise ConfigError(f"model.channels = {chans} gives depth {len(chans) - 1}: LocalNet's depth is "
                          f"len(model.channels) - 1 and must be >= 1; give at least two widths, e.g. "
                          f"{[chans[0], 2 * chans[0]]} (depth 1) or {[chans[0] * 2**i for i in range(4)]} (depth 3)")
    if any(c != chans[0] * 2**i for i, c in enumerate(chans)):
        # LocalNet doubles its width per level: any other list would silently train other widths
        raise ConfigError(f"model.channels = {chans}: LocalNet takes the first width and doubles it per level (the "
                          f"list's length - 1 is the depth), so the list must be that doubling, e.g. "
                          f"{[chans[0] * 2**i for i in range(len(chans))]}")
    depth = max(1, len(chans) - 1)  # (1 only for a trained checkpoint's one-entry list, see above)
    levels = kw.get("extract_levels")
    if levels is not None:
        try:  # now, naming the setting, not as LocalNet's TypeError when the model is built
            _check_levels(levels, depth)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.kwargs.{e}") from None
    return {"spatial_dims": m.spatial_dims, "in_channels": 2 * m.in_channels, "num_channel_initial": int(chans[0]),
            "depth": depth, "extract_levels": levels,
            "velocity": ta["velocity"], "integration_steps": ta["integration_steps"], "global_net": ta["global_net"]}


def _load_trainer_checkpoint(state: dict, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelInfo]:
    from medfast.train.config import config_from_dict

    config = config_from_dict(state["config"])
    if config.data.shape is None:
        raise RegistrationError("the checkpoint's config has no data.shape (the network's input shape)")
    with torch.random.fork_rng(devices=[]):  # the initialisation (replaced by the weights) leaves the caller's RNG
        net = RegistrationNet(**_net_kwargs(config, trained=True)).to(device)
    net.load_state_dict(state["model"])
    d = config.data
    # without data.spacing the run kept each image's voxel size (cropped / padded to data.shape): native_spacing
    return net.eval(), ModelInfo(list(d.shape), None if d.spacing is None else list(d.spacing), bool(d.reorient),
                                 int(config.model.in_channels), reorient_dims_of(state), d.spacing is None)


def load_trainer_checkpoint(state: dict, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, list[int]]:
    """The network of a ``medfast train`` checkpoint of the registration task and its input shape."""
    net, info = _load_trainer_checkpoint(state, device)
    return net, info.input_shape


@dataclass
class RegistrationTaskArgs:
    """``task_args`` of the registration task (see ``docs/registration.md``); types are checked, not coerced.

    ``pairing`` defaults to ``"atlas"`` with a ``fixed_image``, else ``"pairs"``; ``augment_fixed`` to
    ``pairing == "pairs"``.
    """

    pairing: str | None = None
    fixed_image: str | None = None
    fixed_label: str | None = None
    kernel_size: int = 7
    lncc_weight: float = 1.0
    bending_weight: float = 1.0
    dice_weight: float = 0.0
    velocity: bool = False
    integration_steps: int = 7
    global_net: bool = False
    augment_fixed: bool | None = None
    val_pairs: int = 8
    identity_fraction: float = 0.0


_TASK_ARGS = {f.name for f in fields(RegistrationTaskArgs)}


def _task_args(config: Any) -> dict[str, Any]:
    """``config.task_args`` checked (:class:`ConfigError` naming ``task_args.<key>``), defaults filled in."""
    ta = dict(config.task_args or {})
    unknown = set(ta) - _TASK_ARGS
    if unknown:
        raise ConfigError(f"unknown task_args for the registration task: {sorted(unknown)}; valid: "
                         f"{', '.join(sorted(_TASK_ARGS))}")
    a = _build(RegistrationTaskArgs, ta, "task_args")  # wrong types (velocity: "false", kernel_size: 7.9) raise
    pairing = a.pairing if a.pairing is not None else ("atlas" if a.fixed_image else "pairs")
    if pairing not in ("atlas", "pairs"):
        raise ConfigError(f"task_args.pairing must be 'atlas' or 'pairs', got {pairing!r}")
    if pairing == "atlas" and not a.fixed_image:
        raise ConfigError("task_args.pairing = 'atlas' needs task_args.fixed_image (the fixed atlas image)")
    given = [k for k in ("fixed_image", "fixed_label") if getattr(a, k)]
    if a.pairing == "pairs" and given:  # the atlas would be silently ignored (not even read)
        raise ConfigError(f"task_args.pairing = 'pairs' pairs the training subjects with each other: "
                          f"{', '.join('task_args.' + k for k in given)} (an atlas) would be ignored; remove "
                          f"{'it' if len(given) == 1 else 'them'}, or set task_args.pairing: atlas")
    if a.fixed_label and not a.fixed_image:
        raise ConfigError("task_args.fixed_label is given but task_args.fixed_image (the atlas) is missing")
    out = asdict(a)
    out["pairing"] = pairing
    out["augment_fixed"] = a.augment_fixed if a.augment_fixed is not None else pairing == "pairs"
    if not 0 <= out["identity_fraction"] <= 1:
        raise ConfigError(f"task_args.identity_fraction must lie in [0, 1], got {out['identity_fraction']}")
    if out["kernel_size"] < 1 or out["kernel_size"] % 2 == 0:
        raise ConfigError(f"task_args.kernel_size must be a positive odd int, got {out['kernel_size']}")
    if not 0 <= out["integration_steps"] <= _MAX_STEPS:  # medfast.integrate's range: fail now, not at step 1
        raise ConfigError(f"task_args.integration_steps must be in 0..{_MAX_STEPS}, got {out['integration_steps']}")
    if out["val_pairs"] < 1:
        raise ConfigError(f"task_args.val_pairs must be >= 1, got {out['val_pairs']}")
    for k in ("lncc_weight", "bending_weight", "dice_weight"):
        if not 0 <= out[k] < math.inf:  # NaN fails too
            raise ConfigError(f"task_args.{k} must be a finite number >= 0, got {out[k]}")
    return out


class PairDataset(torch.utils.data.Dataset):
    """Registration pairs drawn from preprocessed subjects.

    Parameters
    ----------
    subjects : NiftiDataset
        The (moving) subjects, all of the same spatial shape.
    atlas : dict, optional
        A preprocessed fixed item (``image``, optional ``label``): every subject is registered to it.
        Without it, pairs are the ordered pairs of distinct subjects (one subject: itself, the
        augmentation then makes the pair differ).
    limit : int, optional
        Validation size: the first ``limit`` pairs or, with ``seed_offset`` (held-out deformations), ``limit``
        items cycling over the pairs, each deformed by its own seed.
    seed_offset : int, optional
        Give every item a fixed seed ``seed_offset + index`` (validation deformations).

    Notes
    -----
    Each item holds ``moving``, ``fixed`` ``(C, *S)`` float32 (intensities mapped to [0, 1], each channel on
    its own, as :func:`register_with_model` does), ``moving_label``/``fixed_label`` ``(*S)`` when both exist,
    ``files`` (``"moving -> fixed"``), ``seed`` when the sampler gives one.
    """

    def __init__(self, subjects: Any, atlas: dict | None = None, limit: int | None = None,
                 seed_offset: int | None = None) -> None:
        self.subjects, self.atlas = subjects, atlas
        n = len(subjects)
        if atlas is not None:
            self.pairs = [(i, -1) for i in range(n)]
        elif n == 1:
            self.pairs = [(0, 0)]
        else:
            self.pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
        if limit is not None and seed_offset is not None:
            # held-out deformations: `limit` items, cycling over the pairs, each with its own deformation seed (the
            # first `limit` pairs gave one validation item for one subject, whatever val_deformations said)
            self.pairs = [self.pairs[k % len(self.pairs)] for k in range(limit)]
        elif limit is not None:
            self.pairs = self.pairs[:limit]
        self.seed_offset = seed_offset
        self._norm: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def _subject(self, i: int) -> dict:
        if i not in self._norm:
            item = self.subjects[i] if i >= 0 else self.atlas
            image = item["image"].float()  # (C, *S): each channel mapped to [0, 1] on its own
            out = {"image": normalize_intensity(image, spatial_dims=image.dim() - 1), "files": item["files"]}
            if "label" in item:
                out["label"] = item["label"]
            self._norm[i] = out
        return self._norm[i]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        k, seed = (key if isinstance(key, tuple) else (key, None))
        i, j = self.pairs[int(k)]
        mov, fix = self._subject(i), self._subject(j)
        if mov["image"].shape != fix["image"].shape:
            raise DatasetError(f"moving {mov['files']} has shape {tuple(mov['image'].shape)} but fixed "
                               f"{fix['files']} has {tuple(fix['image'].shape)}; set data.shape")
        item = {"moving": mov["image"], "fixed": fix["image"], "files": f"{mov['files']} -> {fix['files']}"}
        if "label" in mov and "label" in fix:
            item["moving_label"], item["fixed_label"] = mov["label"], fix["label"]
        if self.seed_offset is not None:
            seed = self.seed_offset + int(k)
        if seed is not None:
            item["seed"] = int(seed)
        return item


def _label_max(dataset: Any) -> int:
    """The largest label value in a :class:`~medfast.data.NiftiDataset`'s label maps (0 without labels), as its
    items hold them (after its ``label_map``). Reads the label files only (no image, no preprocessing; a few
    threads, as decompression releases the GIL): resampling and cropping never add a value, so this bounds
    every item's labels."""
    from concurrent.futures import ThreadPoolExecutor

    from medfast.data.io import load_nifti as read_volume

    def top(path: str) -> int:
        arr = dataset._relabel(read_volume(path, label=True).data)
        return int(arr.max()) if arr.size else 0

    paths = list(getattr(dataset, "labels", []) or [])
    if not paths:
        return 0
    with ThreadPoolExecutor(max_workers=min(4, len(paths), os.cpu_count() or 1)) as pool:
        return max(pool.map(top, paths))


def _one_hot_fg(label: torch.Tensor, classes: int, files: Any = None, role: str = "label") -> torch.Tensor:
    """One-hot foreground channels ``(B, K - 1, *S)`` float of an integer label batch ``(B, *S)``. A value
    outside ``0 .. classes - 1`` raises :class:`DatasetError` naming it (and the batch's files): it is never
    merged into another class."""
    label = label.long()
    lo, hi = (int(v) for v in torch.aminmax(label)) if label.numel() else (0, 0)
    if lo < 0 or hi >= classes:
        bad = [int(v) for v in torch.unique(label[(label < 0) | (label >= classes)]).tolist()][:10]
        where = ""
        if files is not None:
            names = [files] if isinstance(files, str) else list(files)
            rows = [str(names[b]) for b in range(min(len(names), label.shape[0]))
                    if bool(((label[b] < 0) | (label[b] >= classes)).any())]
            where = f" in the pair(s) {'; '.join(rows)}" if rows else f" in the batch {names}"
        raise DatasetError(f"{role} holds label value(s) {bad}{where}, but the label Dice has {classes} classes "
                           f"(labels 0..{classes - 1}, from the largest label of the training, validation and "
                           f"atlas label maps)")
    return F.one_hot(label, classes).movedim(-1, 1)[:, 1:].float()


def _warp_labels(label: torch.Tensor, ddf: torch.Tensor, classes: int,
                 files: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot foreground channels ``(B, K - 1, *S)`` of ``label`` and their linear warp by ``ddf``; a label
    value outside ``0 .. classes - 1`` raises :class:`DatasetError` (see :func:`_one_hot_fg`)."""
    oh = _one_hot_fg(label, classes, files, "the moving label map")
    return oh, mf.warp(oh.contiguous(), ddf.float(), mode="linear")


#: the settings of the shared sections the task reads (the trainer reads data.num_workers; augment.patch_size is
#: refused with its own message); any other one set to a non-default value would be silently ignored, so it is
#: refused (:func:`_refuse_unused_settings`)
_READ = {"data": {"dataset", "root", "train_images", "train_labels", "val_images", "val_labels", "val_fraction",
                  "reorient", "spacing", "shape", "cache", "cache_dir", "num_workers", "val_deformations",
                  "dataset_args"},
         "model": {"name", "spatial_dims", "in_channels", "channels", "kwargs"},
         "loss": set(), "inference": set()}
_HINTS = {"data": "the test set (data.test_*) is scored by the segmentation task only; score a registration "
                  "model with medfast register --model FIXED MOVING --fixed-labels / --moving-labels. The task maps "
                  "each image channel's 0.5-99.5 percentiles to [0, 1] itself, in training as medfast register "
                  "--model does at inference: data.normalize (other than none) and data.clip_percentiles would "
                  "give the network other inputs in training than at inference",
          "model": "the network is LocalNet with model.channels (a doubling list: its first width, its length - 1 "
                   "the depth) and model.kwargs.extract_levels, instance norm and 2 convolutions per block; "
                   "task_args.velocity / global_net change its output",
          "loss": "the loss is set by task_args.lncc_weight / bending_weight / dice_weight and kernel_size",
          "inference": "medfast register --model runs one forward pass on the network's training grid"}


def _refuse_unused_settings(config: Any) -> None:
    """A data, model, loss or inference setting the registration task would ignore is an error naming it (not a
    silent no-op), as in the classification and synthesis tasks."""
    from medfast.train.config import unused_settings

    # the displacement has one channel per spatial axis: model.out_channels = spatial_dims states just that
    # data.normalize: none states what the task does (its own mapping to [0, 1], :func:`normalize_intensity`)
    unused = unused_settings(config, _READ, {"model.out_channels": config.model.spatial_dims,
                                             "data.normalize": "none"})
    if unused:
        hints = "; ".join(_HINTS[s] for s in _HINTS if any(u.startswith(f"{s}.") for u in unused))
        raise ConfigError(f"the registration task does not use {', '.join(unused)}: remove "
                          f"{'it' if len(unused) == 1 else 'them'} ({hints})")


@register_task("registration")
class RegistrationTask(Task):
    """Trains a :class:`RegistrationNet` (LocalNet, optionally GlobalNet first; DDF or velocity field).

    Loss: ``lncc_weight * LNCC(warped, fixed) + bending_weight * bending energy(ddf)`` (unsupervised),
    ``+ dice_weight * (1 - soft Dice of the warped moving labels)`` when both label maps exist (weak
    supervision; the one-hot encoding has ``num_classes`` = 1 + the largest label of all training,
    validation and atlas label maps, and a larger label raises :class:`DatasetError`). Settings live in
    ``task_args`` (see ``docs/registration.md``). The trained network
    is written as ``registration_model.pt`` (:func:`save_model`) and ``medfast register --model`` also
    reads the trainer's ``checkpoints/*.pt`` directly.
    """

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        from medfast.data import RandomAugment

        self.args = _task_args(config)
        if "integration_steps" in (config.task_args or {}) and not self.args["velocity"]:
            # (checked here, not in _task_args: a checkpoint trained with it still loads for register --model)
            raise ConfigError("task_args.integration_steps integrates a velocity field, which the network predicts "
                              "only with task_args.velocity: true; remove it, or set task_args.velocity: true")
        _refuse_unused_settings(config)
        self.net_kwargs = _net_kwargs(config)
        if config.augment.patch_size is not None:
            raise ConfigError("the registration task trains on whole images: leave augment.patch_size unset "
                             "(set data.shape instead)")
        if config.data.shape is None:
            raise ConfigError("the registration task needs data.shape (every image is cropped/padded to it; it "
                             "is the network's input shape)")
        check_spatial_config(config)
        # each LocalNet (and GlobalNet) level halves data.shape: its instance norms need > 1 voxel at the deepest
        check_network_input(config, "data.shape", config.data.shape, self.net_kwargs["depth"])
        from medfast.train.files import check_dataset_args

        check_dataset_args(config, "registration")
        self.augment = RandomAugment(config.augment)
        self.val_augment = RandomAugment(config.augment, geometric_only=True)
        self.num_classes = 2  # set by build_datasets when task_args.dice_weight > 0 (the label Dice)

    def build_model(self) -> torch.nn.Module:
        return RegistrationNet(**self.net_kwargs)

    def check_resume(self, state: dict, path: Path) -> None:
        from medfast.tasks.segmentation import check_reorient_resume
        from medfast.train.trainer import CheckpointError

        check_reorient_resume(self.config, state, path)
        # a checkpoint from before the preprocessing version 2 (2026-11-29) with data.normalize other than none was
        # trained on z-scored images before the task's [0, 1] mapping, which the task no longer applies
        normalize = state.get("config", {}).get("data", {}).get("normalize", "zscore")
        if state.get("preprocess_version", 1) < 2 and normalize != "none":
            raise CheckpointError(f"{path} was trained with data.normalize={normalize} applied before the task's own "
                                  f"mapping to [0, 1] (medfast before 2026-11-29), which the registration task no "
                                  f"longer applies (medfast register --model never did): resuming would change the "
                                  f"network's inputs mid-run; train a new run")

    def _subjects(self, images, labels):
        from medfast.tasks.segmentation import _dataset

        # no data.normalize / clip_percentiles (the default z-score included): PairDataset maps each image to
        # [0, 1] itself, as register_with_model does at inference. A z-score first left a masked image's zero
        # background below the brain, and the mapping then made it mid-grey in training, black at inference.
        data = dataclasses.replace(self.config.data, normalize="none", clip_percentiles=None)
        return _dataset(dataclasses.replace(self.config, data=data), images, labels)

    def build_datasets(self):
        from medfast.data import DatasetError
        from medfast.train.files import gather_files

        c, a = self.config, self.args
        d = c.data
        # a validation split needs at least 2 subjects left for training pairs
        f = gather_files(c, task="registration", min_subjects_to_split=3)
        images, labels, val_images, val_labels = f.images, f.labels, f.val_images, f.val_labels
        atlas = None
        if a["pairing"] == "atlas":
            fixed = Path(a["fixed_image"])
            if not fixed.is_file():
                raise DatasetError(f"fixed image not found: {fixed} (task_args.fixed_image)")
            fl = [a["fixed_label"]] if a["fixed_label"] else []
            atlas = self._subjects([str(fixed)], fl)[0]
        if atlas is None:
            # without an atlas a lone subject is paired with itself, made different only by the geometric
            # augmentation: with none, its pairs are identical images (trained / scored on the identity)
            from medfast.train.config import ConfigError
            from medfast.train.files import no_geometric_augmentation

            why = no_geometric_augmentation(c.augment)
            for name, files in (("training", images), ("validation", val_images)):
                if why is not None and len(files) == 1:
                    raise ConfigError(f"one {name} subject ({files[0]}) and no atlas (task_args.fixed_image): its "
                                      f"pairs are the subject with a random deformation of itself, but {why}: every "
                                      f"pair would be two identical images; enable augment's geometric ranges, add "
                                      f"subjects, or register to an atlas")
        has_labels = bool(labels) and (atlas is None or "label" in atlas)
        if a["dice_weight"] > 0 and not has_labels:
            missing = "data.train_labels" if not labels else "task_args.fixed_label"
            raise DatasetError(f"task_args.dice_weight > 0 (weak supervision) needs label maps of the moving "
                               f"and the fixed images; {missing} is missing")
        subjects = self._subjects(images, labels)
        val_subjects = self._subjects(val_images, val_labels) if val_images else None
        if a["dice_weight"] > 0:
            # the label Dice one-hot encodes labels 0 .. num_classes - 1: take the largest label of EVERY label
            # map that can enter a pair (training, validation, atlas), not just the first subject's
            top = [_label_max(subjects), _label_max(val_subjects) if val_subjects is not None else 0]
            if atlas is not None and "label" in atlas and atlas["label"].numel():
                top.append(int(atlas["label"].max()))
            self.num_classes = max(2, max(top) + 1)
        train = PairDataset(subjects, atlas)
        val = None
        if val_images:
            # one validation subject without an atlas: score it against held-out deformations of itself
            single = atlas is None and len(val_images) == 1
            val = PairDataset(val_subjects, atlas, limit=1 if single else a["val_pairs"],
                              seed_offset=10**12 if single else None)
            self._val_deform = single
        elif d.val_deformations > 0:
            val = PairDataset(subjects, atlas, limit=d.val_deformations, seed_offset=10**12)
            self._val_deform = True
        return train, val

    # -- steps ----------------------------------------------------------------------------
    def _pair(self, batch, device, augment):
        moving = batch["moving"].to(device).float()
        fixed = batch["fixed"].to(device).float()
        ml, fl = batch.get("moving_label"), batch.get("fixed_label")
        ml = ml.to(device) if ml is not None else None
        fl = fl.to(device) if fl is not None else None
        if augment is not None:
            seeds = batch.get("seed") or list(range(moving.shape[0]))
            with torch.autocast(device.type, enabled=False):
                moving0, ml0 = moving, ml
                moving, ml = augment(moving, ml, seeds)
                frac = self.args["identity_fraction"] if augment is self.augment else 0.0
                if frac > 0:  # identity pairs: the sample's moving image left undeformed (seeded draw)
                    same = [float(torch.rand((), generator=torch.Generator().manual_seed(int(s) + 3_333_333))) < frac
                            for s in seeds]
                    if any(same):
                        pick = torch.tensor(same, device=device)
                        moving = torch.where(pick.view(-1, *[1] * (moving.dim() - 1)), moving0, moving)
                        if ml is not None:
                            ml = torch.where(pick.view(-1, *[1] * (ml.dim() - 1)), ml0, ml)
                if self.args["augment_fixed"]:
                    fixed, fl = augment(fixed, fl, [s + 7_777_777 for s in seeds])
        return moving, fixed, ml, fl

    def _forward(self, model, moving, fixed):
        _, ddf = model(torch.cat([moving, fixed], 1))
        with torch.autocast(moving.device.type, enabled=False):
            ddf = ddf.float()
            warped = mf.warp(moving.contiguous(), ddf.contiguous())
        return ddf, warped

    def training_step(self, model, batch, device):
        a = self.args
        moving, fixed, ml, fl = self._pair(batch, device, self.augment)
        ddf, warped = self._forward(model, moving, fixed)
        with torch.autocast(device.type, enabled=False):
            sim = mf.lncc_loss(warped, fixed, kernel_size=a["kernel_size"])
            bend = bending_energy(ddf)
            loss = a["lncc_weight"] * sim + a["bending_weight"] * bend
            metrics = {"lncc": float(sim.detach()), "bending": float(bend.detach())}
            if a["dice_weight"] > 0 and ml is not None and fl is not None:
                k = self.num_classes
                files = batch.get("files")
                _, warped_oh = _warp_labels(ml, ddf, k, files)
                fixed_oh = _one_hot_fg(fl, k, files, "the fixed label map")
                dl = label_dice_loss(warped_oh, fixed_oh)
                loss = loss + a["dice_weight"] * dl
                metrics["dice_loss"] = float(dl.detach())
        return loss, metrics

    @torch.no_grad()
    def validation_step(self, model, batch, device):
        aug = self.val_augment if getattr(self, "_val_deform", False) else None
        moving, fixed, ml, fl = self._pair(batch, device, aug)
        ddf, warped = self._forward(model, moving, fixed)
        k = self.args["kernel_size"]
        rows = []
        for b in range(moving.shape[0]):
            row = {"lncc_before": float(mf.lncc_loss(moving[b:b + 1], fixed[b:b + 1], kernel_size=k)),
                   "lncc_after": float(mf.lncc_loss(warped[b:b + 1], fixed[b:b + 1], kernel_size=k))}
            if ml is not None and fl is not None:
                classes = [int(v) for v in torch.unique(fl[b]).tolist() if v != 0]
                codes, values = _label_codes(ml[b])  # (exact ids past 2^24, as register_pair's)
                wl = _label_values(mf.warp(codes[None, None], ddf[b:b + 1], mode="nearest")[0, 0], values)
                row["dice_before"] = _mean(dice_per_label(ml[b], fl[b], classes))
                row["dice_after"] = _mean(dice_per_label(wl, fl[b], classes))
            rows.append(row)
        return rows

    def save_samples(self, model, batch, device, path: Path) -> None:
        aug = self.val_augment if getattr(self, "_val_deform", False) else None
        moving, fixed, _, _ = self._pair(batch, device, aug)
        with torch.no_grad():
            _, warped = self._forward(model, moving[:1], fixed[:1])
        try:
            save_overlay(path, fixed[0, 0], {"before": moving[0, 0], "after": warped[0, 0]},
                         str(batch["files"][0])[-80:])
        except ImportError:
            return

    def finish(self, model, device, out_dir: Path) -> dict[str, Any]:
        """Writes ``registration_model.pt`` (:func:`save_model` format) beside the checkpoints."""
        path = Path(out_dir) / "registration_model.pt"
        d = self.config.data
        save_model(path, model, self.net_kwargs, list(d.shape), d.spacing, d.reorient, REORIENT_DIMS,
                   native_spacing=d.spacing is None)
        print(f"medfast train: registration model written to {path} (use: medfast register FIXED MOVING "
              f"--model {path})", flush=True)
        return {"registration_model": str(path)}
