"""Segmentation losses as nn.Modules over the fused medfast ops (argument names as MONAI's).

``medfast.losses.DiceCELoss()`` replaces ``monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)``
with the same values and gradients, without materializing a one-hot target or the softmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medfast.losses.registration import (
    BendingEnergyLoss,
    DiffusionLoss,
    GlobalMutualInformationLoss,
    GradientNormLoss,
    LocalNormalizedCrossCorrelationLoss,
    SSDLoss,
    bending_energy,
    global_mutual_information,
    gradient_norm,
    label_dice_loss,
    ssd_loss,
)
from medfast.ops._lncc import lncc_loss, local_ncc
from medfast.ops._loss import cross_entropy, dice_ce_loss, dice_loss
from medfast.ops._validate import py_scalar


class DiceLoss(nn.Module):
    """Soft Dice loss of softmax(logits) against integer labels (``(B, *S)`` or ``(B, 1, *S)``), or
    against ``(B, C, *S)`` float targets; ``sigmoid=True`` for multi-label channels.

    See :func:`medfast.ops.dice_loss`; ``batch`` is ``batch_dice``, ``weight`` is ``class_weight`` in the
    forms MONAI's ``DiceLoss`` takes: one value for every class, C values, or with
    ``include_background=False`` the C - 1 values of the foreground classes. (With a single Dice channel left,
    MONAI ignores the weight; medfast multiplies that channel's loss by it.)
    ``check_labels=False`` skips the label-range check's device sync (a bad label gives a NaN loss).
    """

    def __init__(
        self,
        include_background: bool = True,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: Sequence[float] | torch.Tensor | None = None,
        ignore_index: int | None = None,
        reduction: str = "mean",
        ddp_sync: bool = False,
        sigmoid: bool = False,
        check_labels: bool = True,
    ) -> None:
        super().__init__()
        include_background = py_scalar(include_background)  # np.False_ too: the C - 1 weight form tests it
        self.kwargs = dict(include_background=include_background, batch_dice=batch, smooth=(smooth_nr, smooth_dr),
                           class_weight=weight, ignore_index=ignore_index, reduction=reduction, ddp_sync=ddp_sync,
                           activation="sigmoid" if sigmoid else "softmax", check_labels=check_labels)

    def forward(self, input: torch.Tensor, target: torch.Tensor, voxel_weight: torch.Tensor | None = None):
        kwargs = self.kwargs
        if kwargs["class_weight"] is not None and isinstance(input, torch.Tensor) and input.dim() > 1:
            kwargs = {**kwargs, "class_weight": _monai_dice_weight(kwargs["class_weight"], input.shape[1],
                                                                   kwargs["include_background"])}
        return dice_loss(input, target, voxel_weight=voxel_weight, **kwargs)


def _monai_dice_weight(weight, classes: int, include_background: object):
    """MONAI DiceLoss's weight forms as the C class weights of dice_loss (a tensor stays differentiable)."""
    w = weight if isinstance(weight, torch.Tensor) else torch.as_tensor(weight, dtype=torch.float64)
    if w.dim() == 0 or w.numel() == 1:
        return w.reshape(1).expand(classes)
    if w.dim() == 1 and w.numel() == classes - 1 and include_background is False:
        return torch.cat([w.new_ones(1), w])  # channel 0 is left out of the Dice sum: its weight is unused
    if w.dim() != 1 or w.numel() != classes:
        extra = f" (or {classes - 1} without the background)" if include_background is False else ""
        raise ValueError(f"weight must be one value or C = {classes} values{extra}, got shape {tuple(w.shape)}")
    return weight


class DiceCELoss(nn.Module):
    """Dice + cross-entropy of softmax(logits) against integer labels, fused.

    See :func:`medfast.ops.dice_ce_loss`; ``batch`` is ``batch_dice``, ``weight`` is
    ``class_weight`` (used by both terms, as in MONAI). ``check_labels=False`` skips the
    label-range check's device sync (a bad label then gives a NaN loss instead of a ValueError).
    """

    def __init__(
        self,
        include_background: bool = True,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: Sequence[float] | torch.Tensor | None = None,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        ignore_index: int | None = None,
        reduction: str = "mean",
        ddp_sync: bool = False,
        sigmoid: bool = False,
        check_labels: bool = True,
    ) -> None:
        super().__init__()
        self.kwargs = dict(include_background=include_background, batch_dice=batch, smooth=(smooth_nr, smooth_dr),
                           class_weight=weight, lambda_dice=lambda_dice, lambda_ce=lambda_ce,
                           ignore_index=ignore_index, reduction=reduction, ddp_sync=ddp_sync,
                           activation="sigmoid" if sigmoid else "softmax", check_labels=check_labels)

    def forward(self, input: torch.Tensor, target: torch.Tensor, voxel_weight: torch.Tensor | None = None):
        return dice_ce_loss(input, target, voxel_weight=voxel_weight, **self.kwargs)


__all__ = [
    "BendingEnergyLoss",
    "DiceCELoss",
    "DiceLoss",
    "DiffusionLoss",
    "GlobalMutualInformationLoss",
    "GradientNormLoss",
    "LocalNormalizedCrossCorrelationLoss",
    "SSDLoss",
    "bending_energy",
    "cross_entropy",
    "dice_ce_loss",
    "dice_loss",
    "global_mutual_information",
    "gradient_norm",
    "label_dice_loss",
    "lncc_loss",
    "local_ncc",
    "ssd_loss",
]
