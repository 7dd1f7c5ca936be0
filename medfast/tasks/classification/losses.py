"""Classification losses: cross-entropy (nominal), binary cross-entropy (binary) and the CORAL ordinal loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medfast.ops._validate import check_tensor

__all__ = ["ClassificationLoss", "coral_loss"]


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 logits in float32 (a stable loss); float32 and float64 as given (float64: gradcheck)."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def coral_loss(logits: torch.Tensor, levels: torch.Tensor, importance: torch.Tensor | None = None,
               reduction: str = "mean") -> torch.Tensor:
    """CORAL ordinal loss (Cao, Mirjalili & Raschka 2020, eq. 4).

    ``L = -sum_k w_k [t_k log s(l_k) + (1 - t_k) log(1 - s(l_k))]`` per sample, with ``s`` the sigmoid,
    computed stably as ``t log s(l) + (1 - t)(log s(l) - l)``.

    Parameters
    ----------
    logits : Tensor ``(N, K-1)``
        Logits of ``P(y > k)`` (e.g. from :class:`medfast.nets.classification.CoralHead`).
    levels : Tensor ``(N, K-1)``
        Cumulative targets ``[y > k]`` (:meth:`OrdinalEncoder.encode`).
    importance : Tensor ``(K-1,)``, optional
        Weights ``w_k`` of the binary tasks (default 1).
    reduction : {"mean", "sum", "none"}
        Over the batch; ``"none"`` gives ``(N,)``.

    Returns
    -------
    Tensor
        Scalar, or ``(N,)`` for ``reduction="none"``; float32 for float16/bfloat16 logits, else their dtype.
    """
    logits, levels = check_tensor("logits", logits), check_tensor("levels", levels)
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating tensor, got {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (N, K-1), got {tuple(logits.shape)}")
    if logits.shape != levels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and levels {tuple(levels.shape)} differ in shape")
    if levels.is_complex():  # (the cast to the logits' dtype dropped the imaginary part)
        raise TypeError(f"levels must be real (0 / 1 targets), got {levels.dtype}")
    if importance is not None:
        importance = check_tensor("importance", importance)
        if importance.is_complex():
            raise TypeError(f"importance must be real weights, got {importance.dtype}")
        if importance.shape != (logits.shape[1],):
            raise ValueError(f"importance must have shape (K-1,) = ({logits.shape[1]},) for logits "
                             f"{tuple(logits.shape)}, got {tuple(importance.shape)}")
    logits = _upcast(logits)
    levels = levels.to(logits.dtype)
    logsig = F.logsigmoid(logits)
    term = logsig * levels + (logsig - logits) * (1 - levels)
    if importance is not None:
        term = term * importance.to(term)
    per = -term.sum(1)
    if reduction == "mean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    if reduction == "none":
        return per
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


class ClassificationLoss(nn.Module):
    """The loss of an encoding: cross-entropy (``nominal``), BCE with logits (``binary``), CORAL (``ordinal``).

    Parameters
    ----------
    encoding : {"nominal", "binary", "ordinal"}
    class_weights : Tensor ``(C,)``, optional
        Nominal only: per-class weights of the cross-entropy.
    label_smoothing : float
        Nominal only.

    Notes
    -----
    ``forward(logits, targets)`` takes the network output (``(N, C)``, ``(N, 1)`` or ``(N, K-1)``) and the
    encoder's targets (indices ``(N,)`` or one-hot ``(N, C)``, ``(N, 1)``, ``(N, K-1)``); returns a scalar,
    float32 for float16/bfloat16 logits, else in the logits' dtype (float64 stays float64).
    """

    def __init__(self, encoding: str = "nominal", class_weights: torch.Tensor | None = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        if encoding not in ("nominal", "binary", "ordinal"):
            raise ValueError(f"encoding must be 'nominal', 'binary' or 'ordinal', got {encoding!r}")
        self.encoding = encoding
        self.label_smoothing = label_smoothing
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = _upcast(logits)
        if self.encoding == "nominal":
            # the weights in the logits' dtype whatever the buffer's (a module .double()'d, float32 logits)
            weight = None if self.class_weights is None else self.class_weights.to(logits.dtype)
            if targets.is_floating_point():  # one-hot / soft targets: F.cross_entropy wants the logits' dtype
                targets = targets.to(logits.dtype)
            return F.cross_entropy(logits, targets, weight=weight, label_smoothing=self.label_smoothing)
        if self.encoding == "binary":
            return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype).reshape(logits.shape))
        return coral_loss(logits, targets)
