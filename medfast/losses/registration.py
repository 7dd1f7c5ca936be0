"""Registration losses: image similarity (LNCC, SSD, mutual information), DDF regularizers
(bending energy, gradient norm) and a label Dice for weak supervision.

Argument names follow MONAI. Image losses take ``(pred, target)`` = (warped moving, fixed) images
``(B, C, *spatial)``; regularizers take a dense displacement field ``(B, ndim, *spatial)`` (voxel
units). All return values to MINIMIZE (similarities are negated, as in MONAI).

Definitions and their references:

* :class:`LocalNormalizedCrossCorrelationLoss` -- the fused ``medfast.lncc_loss`` op, equal to MONAI's
  ``LocalNormalizedCrossCorrelationLoss(kernel_type="rectangular")``.
* :class:`GlobalMutualInformationLoss` -- Gaussian Parzen-window joint histogram (DeepReg's
  definition, equal to MONAI's ``GlobalMutualInformationLoss(kernel_type="gaussian")``); intensities
  are expected in [0, 1] (clamped).
* :class:`BendingEnergyLoss` -- ``stencil="compact"`` (default): second derivatives by the compact
  3-point stencils, equal to current MONAI's (1.6) ``BendingEnergyLoss``; ``stencil="deepreg"``:
  nested central first differences (span 5 voxels, DeepReg's ``compute_bending_energy`` and older
  MONAI releases).
* :class:`GradientNormLoss` -- squared (``"l2"``, MONAI's ``DiffusionLoss``, DeepReg's
  ``gradient-l2``) or absolute (``"l1"``, DeepReg's ``gradient-l1``) central first differences.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from medfast._typing import Int, ShapeLike
from medfast.ops._lncc import REDUCTIONS, _kernel_size, lncc_loss
from medfast.ops._validate import (
    autocast_image,
    autocast_on,
    check_bool,
    check_choice,
    check_tensor,
    non_negative_finite,
    py_scalar,
)

__all__ = [
    "bending_energy",
    "gradient_norm",
    "ssd_loss",
    "global_mutual_information",
    "label_dice_loss",
    "LocalNormalizedCrossCorrelationLoss",
    "SSDLoss",
    "GlobalMutualInformationLoss",
    "BendingEnergyLoss",
    "GradientNormLoss",
    "DiffusionLoss",
    "lncc_loss",
]


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    return x


def _check_pair(pred: object, target: object, min_dim: int = 3,
                layout: str = "(B, C, *spatial)") -> tuple[torch.Tensor, torch.Tensor]:
    pred = check_tensor("pred", pred)
    target = check_tensor("target", target)
    if not (pred.is_floating_point() and target.is_floating_point()):
        raise TypeError(f"pred and target must be floating tensors, got {pred.dtype} and {target.dtype}")
    if pred.shape != target.shape:
        raise ValueError(f"target must have pred's shape {tuple(pred.shape)}, got {tuple(target.shape)}")
    if pred.dim() < min_dim:
        raise ValueError(f"pred must have shape {layout}, got {tuple(pred.shape)}")
    if pred.numel() == 0:  # (a mean over nothing: NaN, or a reshape error; the fused ops refuse it too)
        raise ValueError(f"pred is empty: shape {tuple(pred.shape)}")
    return pred, target


def _check_ddf(ddf: object) -> torch.Tensor:
    ddf = check_tensor("ddf", ddf)
    if not ddf.is_floating_point():
        raise TypeError(f"ddf must be a floating tensor, got {ddf.dtype}")
    if ddf.dim() not in (3, 4, 5) or ddf.shape[1] != ddf.dim() - 2:
        raise ValueError(f"ddf must have shape (B, ndim, *spatial) with ndim = number of spatial dims, "
                         f"got {tuple(ddf.shape)}")
    if ddf.shape[0] == 0:
        raise ValueError(f"ddf is empty: shape {tuple(ddf.shape)}")
    if any(s <= 2 for s in ddf.shape[2:]):
        raise ValueError(f"every spatial size of ddf must be > 2, got {tuple(ddf.shape[2:])}")
    # a network's float16/bfloat16 output under autocast: finite differences and their sum in float32, as the
    # image losses (0.2% error on a smooth 24^3 field in bfloat16)
    return autocast_image(ddf)


def _shifted(x: torch.Tensor, offsets: dict[int, int], margin: int) -> torch.Tensor:
    """x cropped by `margin` on both sides of every spatial axis, shifted by offsets[axis] voxels."""
    index = [slice(None), slice(None)]
    for d in range(2, x.dim()):
        o = offsets.get(d, 0)
        stop = x.shape[d] - margin + o
        index.append(slice(margin + o, stop))
    return x[tuple(index)]


def _central(x: torch.Tensor, d: int) -> torch.Tensor:
    """(x[i + 1] - x[i - 1]) / 2 along spatial axis d, cropped by one voxel on every spatial axis."""
    return (_shifted(x, {d: 1}, 1) - _shifted(x, {d: -1}, 1)) / 2.0


def _normalizer(ddf: torch.Tensor, *axes: int) -> torch.Tensor:
    """Per-channel factor prod(size[a] for a in axes) / size[channel axis] (MONAI's ``normalize``)."""
    sizes = torch.tensor(ddf.shape[2:], device=ddf.device, dtype=ddf.dtype)
    num = 1.0
    for a in axes:
        num *= ddf.shape[a]
    return (num / sizes).reshape((1, -1) + (1,) * (ddf.dim() - 2))


def bending_energy(ddf: torch.Tensor, normalize: bool = False, reduction: str = "mean",
                   stencil: str = "compact") -> torch.Tensor:
    """Bending energy of a displacement field: sum over axis pairs of squared second derivatives.

    ``sum_i (d2u/dx_i^2)^2 + 2 sum_{i<j} (d2u/dx_i dx_j)^2`` per voxel and channel, on the interior.

    Parameters
    ----------
    ddf : Tensor
        ``(B, ndim, *spatial)`` displacement (voxels), every spatial size > 2 (> 4 for "deepreg").
        float16/bfloat16 under ``torch.autocast``: computed in float32.
    normalize : bool
        Scale derivatives by the field size (MONAI's ``normalize``): roughly resolution-invariant.
    reduction : {"mean", "sum", "none"}
        ``"none"`` gives the ``(B, ndim, *interior)`` energy map.
    stencil : {"compact", "deepreg"}
        Compact 3-point stencils (current MONAI) or nested central differences (DeepReg).

    Returns
    -------
    Tensor
        0-d energy, or with ``"none"`` the ``(B, ndim, *interior)`` map (each spatial size minus 2, minus 4
        for "deepreg"), in the field's dtype. Differentiable w.r.t. ``ddf`` (plain PyTorch autograd).
    """
    ddf = _check_ddf(ddf)
    normalize = check_bool("normalize", normalize)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("stencil", stencil, ("compact", "deepreg"))
    dims = range(2, ddf.dim())
    if stencil == "deepreg" and any(s <= 4 for s in ddf.shape[2:]):
        raise ValueError(f"stencil='deepreg' needs every spatial size > 4, got {tuple(ddf.shape[2:])}")
    first = {d: _central(ddf, d) for d in dims} if stencil == "deepreg" else None
    energy = None
    for i in dims:
        for j in dims:
            if j < i:
                continue
            if stencil == "compact":
                if i == j:
                    d2 = _shifted(ddf, {i: 1}, 1) - 2 * _shifted(ddf, {}, 1) + _shifted(ddf, {i: -1}, 1)
                else:
                    d2 = (_shifted(ddf, {i: 1, j: 1}, 1) - _shifted(ddf, {i: 1, j: -1}, 1)
                          - _shifted(ddf, {i: -1, j: 1}, 1) + _shifted(ddf, {i: -1, j: -1}, 1)) / 4.0
            else:
                d2 = _central(first[i], j)
            if normalize:
                d2 = d2 * _normalizer(ddf, i, j)
            term = d2 * d2 if i == j else 2 * d2 * d2
            energy = term if energy is None else energy + term
    return _reduce(energy, reduction)


def gradient_norm(ddf: torch.Tensor, norm: str = "l2", normalize: bool = False, reduction: str = "mean"
                  ) -> torch.Tensor:
    """Gradient regularizer: ``sum_i |du/dx_i|^2`` ("l2", diffusion) or ``sum_i |du/dx_i|`` ("l1").

    Central first differences on the interior (every spatial axis cropped by one voxel).

    Parameters
    ----------
    ddf : Tensor
        ``(B, ndim, *spatial)`` displacement (voxels), every spatial size > 2. float16/bfloat16 under
        ``torch.autocast``: computed in float32.
    norm : {"l2", "l1"}
    normalize : bool
        Scale derivatives by the field size (MONAI's ``normalize``).
    reduction : {"mean", "sum", "none"}

    Returns
    -------
    Tensor
        0-d regularizer, or with ``"none"`` the ``(B, ndim, *interior)`` map (each spatial size minus 2), in
        the field's dtype. Differentiable w.r.t. ``ddf`` (plain PyTorch autograd).
    """
    ddf = _check_ddf(ddf)
    normalize = check_bool("normalize", normalize)
    check_choice("norm", norm, ("l2", "l1"))
    check_choice("reduction", reduction, REDUCTIONS)
    out = None
    for d in range(2, ddf.dim()):
        g = _central(ddf, d)
        if normalize:
            g = g * _normalizer(ddf, d)
        term = g * g if norm == "l2" else g.abs()
        out = term if out is None else out + term
    return _reduce(out, reduction)


def ssd_loss(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Sum (mean) of squared differences ``(pred - target)^2`` over batch, channels and voxels.

    Parameters
    ----------
    pred, target : Tensor
        Floating images of equal shape ``(B, C, *spatial)``.
    reduction : {"mean", "sum", "none"}
        Mean or sum over batch, channels and voxels, or the ``(B, C, *spatial)`` map of squared differences.

    Returns
    -------
    Tensor
        0-d loss (the map with ``"none"``) in the inputs' promoted dtype, in squared intensity units.
        Differentiable w.r.t. both images.
    """
    pred, target = _check_pair(pred, target)
    check_choice("reduction", reduction, REDUCTIONS)
    return _reduce((pred - target) ** 2, reduction)


def global_mutual_information(pred: torch.Tensor, target: torch.Tensor, num_bins: int = 23,
                              sigma_ratio: float = 0.5, smooth_nr: float = 1e-7, smooth_dr: float = 1e-7,
                              reduction: str = "mean") -> torch.Tensor:
    """Minus the mutual information of two images, Gaussian Parzen-window histograms.

    Each voxel's intensity (clamped to [0, 1]) votes into ``num_bins`` bins centred on
    ``linspace(0, 1, num_bins)`` with Gaussian weights of sigma ``sigma_ratio x bin width``,
    normalized per voxel; the joint histogram is the mean outer product of the two weight vectors.

    Parameters
    ----------
    pred, target : Tensor
        Images of equal shape ``(B, N1, ..., Nk)`` with k >= 1 (e.g. ``(B, C, *spatial)``), intensities in
        [0, 1]: the values of each batch element are one sample set. Any floating dtypes, mixed too (float16
        under autocast with a float32 target): computed in their promoted dtype, at least float32.
    num_bins, sigma_ratio, smooth_nr, smooth_dr
        As MONAI's ``GlobalMutualInformationLoss``.
    reduction : {"mean", "sum", "none"}
        Over the batch (``"none"``: ``(B,)``).

    Returns
    -------
    Tensor
        0-d loss (``(B,)`` with ``"none"``), in nats, in the computation dtype above. Differentiable w.r.t.
        both images (zero gradient where an intensity is clamped to [0, 1]).
    """
    pred, target = _check_pair(pred, target, min_dim=2, layout="(B, N1, ..., Nk) with k >= 1")
    check_choice("reduction", reduction, REDUCTIONS)
    num_bins, sigma_ratio = _check_bins(num_bins, sigma_ratio)
    smooth_nr, smooth_dr = _smooth("smooth_nr", smooth_nr), _smooth("smooth_dr", smooth_dr)
    # one dtype for both histograms (the einsum refuses mixed dtypes); half-precision sums of many small
    # Parzen weights lose digits, so at least float32
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    pred, target = pred.to(dtype), target.to(dtype)
    centers = torch.linspace(0.0, 1.0, num_bins, device=pred.device, dtype=dtype)
    sigma = sigma_ratio / (num_bins - 1)
    inv2s2 = 1.0 / (2.0 * sigma * sigma)

    def parzen(x: torch.Tensor) -> torch.Tensor:  # (B, N, bins), rows summing to one
        x = x.clamp(0, 1).reshape(x.shape[0], -1, 1)
        w = torch.exp(-inv2s2 * (x - centers) ** 2)
        return w / w.sum(dim=-1, keepdim=True)

    wa, wb = parzen(pred), parzen(target)
    n = wa.shape[1]
    if autocast_on(wa):  # autocast would run the einsum's bmm in float16/bfloat16 (1e-4 relative error)
        with torch.autocast(wa.device.type, enabled=False):
            pab = torch.einsum("bni,bnj->bij", wa, wb) / n
    else:
        pab = torch.einsum("bni,bnj->bij", wa, wb) / n
    pa, pb = wa.mean(dim=1), wb.mean(dim=1)
    papb = pa[:, :, None] * pb[:, None, :]
    mi = (pab * torch.log((pab + smooth_nr) / (papb + smooth_dr) + smooth_dr)).sum(dim=(1, 2))
    return _reduce(mi, reduction).neg()


def _smooth(name: str, value: object) -> float:
    """A non-negative finite smoothing term (a negative or NaN one gave a NaN loss, a string a TypeError from
    tensor arithmetic)."""
    value = py_scalar(value)
    if isinstance(value, bool) or not non_negative_finite(value):  # (symbolic floats under torch.compile too)
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return value


def _check_bins(num_bins: object, sigma_ratio: object) -> tuple[int, float]:
    num_bins, sigma_ratio = py_scalar(num_bins), py_scalar(sigma_ratio)
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
        raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}")
    if isinstance(sigma_ratio, bool) or not isinstance(sigma_ratio, (int, float)) or not 0 < sigma_ratio < math.inf:
        raise ValueError(f"sigma_ratio must be a finite number > 0, got {sigma_ratio!r}")
    return num_bins, sigma_ratio


def label_dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice of warped label maps (weak supervision).

    Parameters
    ----------
    pred, target : Tensor
        ``(B, K, *spatial)`` soft (one-hot, linearly warped) label maps of K foreground classes.
    smooth : float
        Added to the numerator and the denominator of each Dice ratio (an empty class scores 1).

    Returns
    -------
    Tensor
        0-d loss in [0, 1] in the inputs' dtype, the mean over batch and classes. Differentiable w.r.t. both
        label maps.
    """
    pred, target = _check_pair(pred, target)
    smooth = _smooth("smooth", smooth)
    dims = tuple(range(2, pred.dim()))
    inter = (pred * target).sum(dims)
    denom = pred.sum(dims) + target.sum(dims)
    return 1.0 - ((2 * inter + smooth) / (denom + smooth)).mean()


class LocalNormalizedCrossCorrelationLoss(nn.Module):
    """Module form of :func:`medfast.lncc_loss` (rectangular window; MONAI's argument names and defaults).

    The default window is MONAI's, ``kernel_size=3``, not the functional :func:`medfast.lncc_loss`'s 9: pass
    ``kernel_size=9`` for the same loss as ``lncc_loss(pred, target)``.

    Parameters
    ----------
    spatial_dims : {2, 3}
        Spatial dims of the images ``forward`` takes (checked at each call; not an argument of ``lncc_loss``).
    kernel_size : int or sequence of int
        Window size in voxels per spatial dim (odd), as ``lncc_loss``'s ``kernel_size``. Default 3 (MONAI's).
    kernel_type : {"rectangular"}
        Only the box window is fused (MONAI's ``"triangular"`` and ``"gaussian"`` are not implemented).
    reduction : {"mean", "sum", "none"}
        As ``lncc_loss``'s ``reduction``.
    smooth_nr, smooth_dr : float
        As ``lncc_loss``'s ``smooth_nr`` and ``smooth_dr`` (``smooth_dr`` must be > 0).

    Shapes
    ------
    ``forward(pred, target)`` takes two ``(B, C, *spatial)`` images with ``spatial_dims`` spatial dims and
    returns ``lncc_loss``'s result: 0-d (the map with ``"none"``), differentiable w.r.t. both images.
    """

    def __init__(self, spatial_dims: int = 3, kernel_size: Int | ShapeLike = 3, kernel_type: str = "rectangular",
                 reduction: str = "mean", smooth_nr: float = 0.0, smooth_dr: float = 1e-5) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        check_choice("kernel_type", kernel_type, ("rectangular",))
        check_choice("reduction", reduction, REDUCTIONS)
        _kernel_size(kernel_size, spatial_dims)  # a bad window fails here, as MONAI's, not at the first forward
        smooth_nr, smooth_dr = _smooth("smooth_nr", smooth_nr), _smooth("smooth_dr", smooth_dr)
        if smooth_dr == 0:
            raise ValueError("smooth_dr must be > 0 (it bounds the local variances away from zero)")
        self.spatial_dims, self.kernel_size, self.reduction = spatial_dims, kernel_size, reduction
        self.smooth_nr, self.smooth_dr = smooth_nr, smooth_dr

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if isinstance(pred, torch.Tensor) and pred.dim() - 2 != self.spatial_dims:
            raise ValueError(f"pred must have {self.spatial_dims} spatial dims, got shape {tuple(pred.shape)}")
        return lncc_loss(pred, target, self.kernel_size, self.smooth_nr, self.smooth_dr, self.reduction)


class SSDLoss(nn.Module):
    """Module form of :func:`ssd_loss`.

    Parameters
    ----------
    reduction : {"mean", "sum", "none"}
        As ``ssd_loss``'s ``reduction``.

    Shapes
    ------
    ``forward(pred, target)`` takes two ``(B, C, *spatial)`` images and returns ``ssd_loss``'s result: 0-d
    (the ``(B, C, *spatial)`` map with ``"none"``), differentiable w.r.t. both.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ssd_loss(pred, target, self.reduction)


def _check_kernel(kernel_type: object) -> str:
    if kernel_type != "gaussian":
        raise ValueError(f"kernel_type must be 'gaussian' (the only Parzen window medfast implements; MONAI's "
                         f"'b-spline' is not), got {kernel_type!r}")
    return kernel_type


class GlobalMutualInformationLoss(nn.Module):
    """Module form of :func:`global_mutual_information` (Gaussian Parzen windows). Arguments in MONAI's order;
    ``kernel_type`` must be ``"gaussian"`` (MONAI's ``"b-spline"`` windows are not implemented).

    The arguments are attributes of the same names, read at each call: ``loss.num_bins = 32`` (or
    ``sigma_ratio``, ``smooth_nr``, ``smooth_dr``, ``reduction``) after construction acts as if it had been
    passed. (MONAI computes its bin centres from ``num_bins`` and ``sigma_ratio`` once, in ``__init__``.)

    Parameters
    ----------
    kernel_type : {"gaussian"}
        The Parzen window (MONAI's name; only ``"gaussian"``).
    num_bins, sigma_ratio, reduction, smooth_nr, smooth_dr
        As :func:`global_mutual_information`'s arguments of the same names.

    Shapes
    ------
    ``forward(pred, target)`` takes two images of equal shape ``(B, ...)``, intensities in [0, 1], and returns
    ``global_mutual_information``'s result: 0-d (``(B,)`` with ``"none"``), at least float32, differentiable
    w.r.t. both.
    """

    def __init__(self, kernel_type: str = "gaussian", num_bins: int = 23, sigma_ratio: float = 0.5,
                 reduction: str = "mean", smooth_nr: float = 1e-7, smooth_dr: float = 1e-7) -> None:
        super().__init__()
        self.kernel_type = _check_kernel(kernel_type)
        self.num_bins, self.sigma_ratio = _check_bins(num_bins, sigma_ratio)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.smooth_nr, self.smooth_dr = _smooth("smooth_nr", smooth_nr), _smooth("smooth_dr", smooth_dr)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_kernel(self.kernel_type)
        return global_mutual_information(pred, target, num_bins=self.num_bins, sigma_ratio=self.sigma_ratio,
                                         smooth_nr=self.smooth_nr, smooth_dr=self.smooth_dr,
                                         reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"num_bins={self.num_bins!r}, sigma_ratio={self.sigma_ratio!r}, reduction={self.reduction!r}, "
                f"smooth_nr={self.smooth_nr!r}, smooth_dr={self.smooth_dr!r}")


class BendingEnergyLoss(nn.Module):
    """Module form of :func:`bending_energy`.

    Parameters
    ----------
    normalize : bool
        As ``bending_energy``'s ``normalize`` (MONAI's name too): scale the derivatives by the field size.
    reduction : {"mean", "sum", "none"}
        As ``bending_energy``'s ``reduction``.
    stencil : {"compact", "deepreg"}
        As ``bending_energy``'s ``stencil`` (not a MONAI argument; ``"compact"`` is current MONAI's).

    Shapes
    ------
    ``forward(ddf)`` takes a ``(B, ndim, *spatial)`` displacement (voxels) and returns ``bending_energy``'s
    result: 0-d (the ``(B, ndim, *interior)`` map with ``"none"``) in the field's dtype, differentiable.
    """

    def __init__(self, normalize: bool = False, reduction: str = "mean", stencil: str = "compact") -> None:
        super().__init__()
        self.normalize = check_bool("normalize", normalize)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.stencil = check_choice("stencil", stencil, ("compact", "deepreg"))

    def forward(self, ddf: torch.Tensor) -> torch.Tensor:
        return bending_energy(ddf, self.normalize, self.reduction, self.stencil)


class GradientNormLoss(nn.Module):
    """Module form of :func:`gradient_norm`; ``GradientNormLoss("l2")`` is MONAI's ``DiffusionLoss``.

    Parameters
    ----------
    norm : {"l2", "l1"}
        As ``gradient_norm``'s ``norm``: squared or absolute central differences.
    normalize : bool
        As ``gradient_norm``'s ``normalize``: scale the derivatives by the field size.
    reduction : {"mean", "sum", "none"}
        As ``gradient_norm``'s ``reduction``.

    Shapes
    ------
    ``forward(ddf)`` takes a ``(B, ndim, *spatial)`` displacement (voxels) and returns ``gradient_norm``'s
    result: 0-d (the ``(B, ndim, *interior)`` map with ``"none"``) in the field's dtype, differentiable.
    """

    def __init__(self, norm: str = "l2", normalize: bool = False, reduction: str = "mean") -> None:
        super().__init__()
        self.norm = check_choice("norm", norm, ("l2", "l1"))
        self.normalize = check_bool("normalize", normalize)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def forward(self, ddf: torch.Tensor) -> torch.Tensor:
        return gradient_norm(ddf, self.norm, self.normalize, self.reduction)


class DiffusionLoss(GradientNormLoss):
    """MONAI's ``DiffusionLoss(normalize=False, reduction="mean")``, argument for argument: the squared
    gradient norm of a displacement field, ``GradientNormLoss("l2", normalize, reduction)``.

    Parameters
    ----------
    normalize : bool
        As ``gradient_norm``'s ``normalize``.
    reduction : {"mean", "sum", "none"}
        As ``gradient_norm``'s ``reduction``.

    Shapes
    ------
    ``forward(ddf)``: as :class:`GradientNormLoss` (a ``(B, ndim, *spatial)`` displacement in, a 0-d
    differentiable loss out).
    """

    def __init__(self, normalize: bool = False, reduction: str = "mean") -> None:
        super().__init__("l2", normalize, reduction)
