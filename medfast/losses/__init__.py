"""Segmentation losses as nn.Modules over the fused medfast ops (argument names as MONAI's).

``medfast.losses.DiceCELoss()`` replaces ``monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)``
with the same values and gradients, without materializing a one-hot target or the softmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from medfast.losses.registration import (
    BendingEnergyLoss,
    DiffusionLoss,
    GlobalMutualInformationLoss,
    GradientNormLoss,
    LocalNormalizedCrossCorrelationLoss,
    SSDLoss,
    _smooth,
    bending_energy,
    global_mutual_information,
    gradient_norm,
    label_dice_loss,
    ssd_loss,
)
from medfast.ops._lncc import lncc_loss, local_ncc
from medfast.ops._loss import cross_entropy, dice_ce_loss, dice_loss
from medfast.ops._validate import check_bool, check_choice, py_scalar


def _number(name: str, value: object) -> float:
    """A non-negative finite number (NumPy scalars and 0-d tensors too) as a float, else ValueError naming it
    (the registration losses' check of their smoothing terms)."""
    return float(_smooth(name, value))


class _SegmentationLoss(nn.Module):
    """The hyper-parameters shared by :class:`DiceLoss` and :class:`DiceCELoss`, kept as plain attributes (MONAI's
    names) that ``forward`` reads at each call: ``loss.include_background = False`` (or ``lambda_ce``,
    ``batch``, ``smooth_nr``, ``reduction``, ...) set after construction acts as if it had been passed.

    ``class_weight`` (the ``weight`` argument) is a buffer, as MONAI's: ``.to(device)`` moves it and the
    state_dict holds it. A tensor that requires grad stays the tensor given (an ``nn.Parameter`` becomes a
    parameter of the loss), and a sequence holding tensors stays as given (the op stacks them, keeping their
    gradients). State dicts saved before it became a buffer (module version 1, no ``class_weight`` entry) load
    with the weight the loss was constructed with.
    """

    # 2: class_weight is a buffer (version 1 stored the arguments in a dict, outside the state_dict)
    _version = 2

    def _init_common(self, include_background, smooth_nr, smooth_dr, batch, weight, ignore_index, reduction,
                     reductions, ddp_sync, sigmoid, check_labels) -> None:
        self.include_background = check_bool("include_background", include_background)
        self.smooth_nr = _number("smooth_nr", smooth_nr)
        self.smooth_dr = _number("smooth_dr", smooth_dr)
        self.batch = check_bool("batch", batch)
        self.ignore_index = ignore_index
        self.reduction = check_choice("reduction", reduction, reductions)
        self.ddp_sync = check_bool("ddp_sync", ddp_sync)
        self.sigmoid = check_bool("sigmoid", sigmoid)
        self.check_labels = check_bool("check_labels", check_labels)
        if isinstance(weight, torch.Tensor):
            if weight.requires_grad:  # learned weights: the tensor itself (a Parameter is registered as one)
                self.class_weight = weight
            else:
                self.register_buffer("class_weight", weight)
        elif weight is None:
            self.register_buffer("class_weight", None)
        elif isinstance(weight, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in weight):
            self.class_weight = weight  # 0-d tensors, some maybe requiring grad: stacked by the op
        else:
            try:  # float64: the op rounds it once to the loss dtype, as it did with the numbers given
                w = torch.as_tensor(weight, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"weight must be a number, a sequence of numbers or a tensor, got {weight!r}") from None
            self.register_buffer("class_weight", w)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        n = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + "class_weight"
        if (local_metadata.get("version") or 1) < 2 and key in missing_keys[n:]:
            missing_keys.remove(key)  # saved before class_weight was a buffer: keep the constructed one

    def _op_kwargs(self) -> dict:
        # the buffer straight from _buffers: nn.Module.__getattr__ costs ~1 us per call
        weight = self._buffers["class_weight"] if "class_weight" in self._buffers else self.class_weight
        return dict(include_background=self.include_background, batch_dice=self.batch,
                    smooth=(self.smooth_nr, self.smooth_dr), class_weight=weight,
                    ignore_index=self.ignore_index, reduction=self.reduction, ddp_sync=self.ddp_sync,
                    activation="sigmoid" if check_bool("sigmoid", self.sigmoid) else "softmax",
                    check_labels=self.check_labels)

    def extra_repr(self) -> str:
        names = ["include_background", "batch", "smooth_nr", "smooth_dr", "reduction"]
        names += [n for n in ("lambda_dice", "lambda_ce") if hasattr(self, n)]
        names += [n for n in ("sigmoid", "ignore_index") if (v := getattr(self, n)) is not None and v is not False]
        return ", ".join(f"{n}={getattr(self, n)!r}" for n in names)


class DiceLoss(_SegmentationLoss):
    """Soft Dice loss of softmax(logits) against integer labels (``(B, *S)`` or ``(B, 1, *S)``), or
    against ``(B, C, *S)`` float targets; ``sigmoid=True`` for multi-label channels.

    See :func:`medfast.ops.dice_loss`; ``batch`` is ``batch_dice``, ``weight`` is ``class_weight`` in the
    forms MONAI's ``DiceLoss`` takes: one value for every class, C values, or with
    ``include_background=False`` the C - 1 values of the foreground classes. (With a single Dice channel left,
    MONAI ignores the weight; medfast multiplies that channel's loss by it.)
    ``check_labels=False`` skips the label-range check's device sync (a bad label gives a NaN loss).

    The arguments are attributes of the same names (``weight``: the ``class_weight`` buffer), read at each
    call, so they can be changed after construction as MONAI's (``loss.include_background = False``).

    Parameters
    ----------
    include_background : bool
        As ``dice_loss``'s ``include_background``.
    smooth_nr, smooth_dr : float
        ``dice_loss``'s ``smooth=(smooth_nr, smooth_dr)``: added to the numerator and the denominator.
    batch : bool
        ``dice_loss``'s ``batch_dice``: sum the batch before the ratio.
    weight : float, sequence of float or Tensor, optional
        ``dice_loss``'s ``class_weight``, in MONAI's forms (one value, C values, or C - 1 without the background).
    ignore_index : int, optional
        As ``dice_loss``'s ``ignore_index``: label value whose voxels are left out.
    reduction : {"mean", "sum", "none"}
        As ``dice_loss``'s ``reduction``.
    ddp_sync : bool
        As ``dice_loss``'s ``ddp_sync`` (with ``batch``).
    sigmoid : bool
        ``dice_loss``'s ``activation="sigmoid"``: independent (multi-label) channels; else softmax.
    check_labels : bool
        As ``dice_loss``'s ``check_labels``.

    Shapes
    ------
    ``forward(input, target, voxel_weight=None)`` takes ``(B, C, *S)`` logits and returns ``dice_loss``'s
    result: 0-d (the per-(batch, class) losses with ``"none"``), differentiable w.r.t. the logits.
    """

    def __init__(
        self,
        include_background: bool = True,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: float | Sequence[float] | np.ndarray | torch.Tensor | None = None,
        ignore_index: int | None = None,
        reduction: str = "mean",
        ddp_sync: bool = False,
        sigmoid: bool = False,
        check_labels: bool = True,
    ) -> None:
        super().__init__()
        self._init_common(include_background, smooth_nr, smooth_dr, batch, weight, ignore_index, reduction,
                          ("mean", "sum", "none"), ddp_sync, sigmoid, check_labels)

    def forward(self, input: torch.Tensor, target: torch.Tensor, voxel_weight: torch.Tensor | None = None):
        kwargs = self._op_kwargs()
        if kwargs["class_weight"] is not None and isinstance(input, torch.Tensor) and input.dim() > 1:
            kwargs["class_weight"] = _monai_dice_weight(kwargs["class_weight"], input.shape[1],
                                                        py_scalar(self.include_background))
        return dice_loss(input, target, voxel_weight=voxel_weight, **kwargs)


def _monai_dice_weight(weight, classes: int, include_background: object):
    """MONAI DiceLoss's weight forms as the C class weights of dice_loss (a tensor stays differentiable)."""
    if isinstance(weight, torch.Tensor):
        w = weight
    elif isinstance(weight, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in weight):
        dev = next(v.device for v in weight if isinstance(v, torch.Tensor))  # as the op stacks them: keeps
        w = torch.stack([torch.as_tensor(v, device=dev).reshape(()) for v in weight])  # their gradients
    else:
        w = torch.as_tensor(weight, dtype=torch.float64)
    if w.dim() == 0 or w.numel() == 1:
        return w.reshape(1).expand(classes)
    if w.dim() == 1 and w.numel() == classes - 1 and include_background is False:
        return torch.cat([w.new_ones(1), w])  # channel 0 is left out of the Dice sum: its weight is unused
    if w.dim() != 1 or w.numel() != classes:
        extra = f" (or {classes - 1} without the background)" if include_background is False else ""
        raise ValueError(f"weight must be one value or C = {classes} values{extra}, got shape {tuple(w.shape)}")
    return weight


class DiceCELoss(_SegmentationLoss):
    """Dice + cross-entropy of softmax(logits) against integer labels, fused.

    See :func:`medfast.ops.dice_ce_loss`; ``batch`` is ``batch_dice``, ``weight`` is
    ``class_weight`` (used by both terms, as in MONAI). ``check_labels=False`` skips the
    label-range check's device sync (a bad label then gives a NaN loss instead of a ValueError).

    The arguments are attributes of the same names (``weight``: the ``class_weight`` buffer), read at each
    call: ``loss.lambda_ce = 0.0`` during training anneals the cross-entropy away, as with MONAI's.

    Parameters
    ----------
    include_background : bool
        As ``dice_ce_loss``'s ``include_background``.
    smooth_nr, smooth_dr : float
        ``dice_ce_loss``'s ``smooth=(smooth_nr, smooth_dr)``: added to the numerator and the denominator.
    batch : bool
        ``dice_ce_loss``'s ``batch_dice``: sum the batch before the ratio.
    weight : sequence of float or Tensor, optional
        ``dice_ce_loss``'s ``class_weight`` (C values; used by both terms, as in MONAI).
    lambda_dice, lambda_ce : float
        As ``dice_ce_loss``'s: the weights of the Dice and the cross-entropy terms.
    ignore_index : int, optional
        As ``dice_ce_loss``'s ``ignore_index``: label value whose voxels are left out.
    reduction : {"mean", "sum"}
        As ``dice_ce_loss``'s ``reduction``.
    ddp_sync : bool
        As ``dice_ce_loss``'s ``ddp_sync`` (with ``batch``).
    sigmoid : bool
        ``dice_ce_loss``'s ``activation="sigmoid"``: independent (multi-label) channels; else softmax.
    check_labels : bool
        As ``dice_ce_loss``'s ``check_labels``.

    Shapes
    ------
    ``forward(input, target, voxel_weight=None)`` takes ``(B, C, *S)`` logits and returns ``dice_ce_loss``'s
    0-d loss, differentiable w.r.t. the logits.
    """

    def __init__(
        self,
        include_background: bool = True,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        ignore_index: int | None = None,
        reduction: str = "mean",
        ddp_sync: bool = False,
        sigmoid: bool = False,
        check_labels: bool = True,
    ) -> None:
        super().__init__()
        self._init_common(include_background, smooth_nr, smooth_dr, batch, weight, ignore_index, reduction,
                          ("mean", "sum"), ddp_sync, sigmoid, check_labels)
        self.lambda_dice = _number("lambda_dice", lambda_dice)
        self.lambda_ce = _number("lambda_ce", lambda_ce)

    def forward(self, input: torch.Tensor, target: torch.Tensor, voxel_weight: torch.Tensor | None = None):
        return dice_ce_loss(input, target, voxel_weight=voxel_weight, lambda_dice=self.lambda_dice,
                            lambda_ce=self.lambda_ce, **self._op_kwargs())


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
