"""Classification metrics on class indices and class scores (NumPy, CPU): confusion matrix, accuracy,
balanced accuracy, per-class precision/recall/F1, one-vs-rest ROC AUC, and a confusion-matrix PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, overload

import numpy as np
import torch

from medfast._typing import ArrayLike
from medfast.tasks._figures import new_figure, save_figure

__all__ = ["accuracy", "balanced_accuracy", "classification_report", "confusion_matrix", "precision_recall_f1",
           "roc_auc", "save_confusion_png"]


def _np(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.device.type == "meta":  # (.cpu() raised "Cannot copy out of meta tensor", naming no argument)
            raise ValueError(f"{name} is a meta tensor: a meta tensor has no values")
        x = x.detach().cpu()
        x = (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x).numpy()
    return np.asarray(x)


def _indices(name: str, x) -> np.ndarray:
    """``(N,)`` int64 class indices; floats must hold whole numbers (0.7 is not class 0)."""
    v = _np(x, name).ravel()
    if v.dtype.kind == "f":
        if not np.isfinite(v).all() or (v != np.round(v)).any():
            raise ValueError(f"{name} must hold class indices (whole numbers), got non-integer values")
    elif v.dtype.kind not in "iub":
        raise TypeError(f"{name} must hold class indices, got dtype {v.dtype}")
    return v.astype(np.int64)


def _sample_indices(name: str, x) -> np.ndarray:
    """:func:`_indices` of a ``(N,)`` array: one class per sample (a one-hot or score array would be flattened
    into wrong numbers)."""
    shape = _np(x, name).shape
    if len(shape) != 1:
        raise ValueError(f"{name} must be (N,) class indices, got shape {shape} (for one-hot or score arrays "
                         f"take argmax(1) first)")
    return _indices(name, x)


# a (C, C) int64 confusion matrix: 32 GiB at 2**16 classes; past 2**63 NumPy raised an OverflowError naming nothing
_MAX_CLASSES = 2**16


def _num_classes(num_classes) -> int:
    if isinstance(num_classes, torch.Tensor) and num_classes.numel() == 1 and num_classes.device.type != "meta":
        num_classes = num_classes.item()
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    return int(num_classes)


def _same_length(p: np.ndarray, t: np.ndarray) -> None:
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and target {t.shape} differ in shape (one entry per sample each)")


def confusion_matrix(pred: ArrayLike, target: ArrayLike, num_classes: int) -> np.ndarray:
    """Counts ``(C, C)`` int64: row = true class, column = predicted class.

    Parameters
    ----------
    pred, target : array-like ``(N,)``
        Class indices in ``[0, C)``.
    num_classes : int
        ``C`` (at most 2**16).
    """
    p, t = _sample_indices("pred", pred), _sample_indices("target", target)
    num_classes = _num_classes(num_classes)
    if num_classes > _MAX_CLASSES:
        raise ValueError(f"num_classes must be at most {_MAX_CLASSES} (the confusion matrix is (num_classes, "
                         f"num_classes)), got {num_classes}")
    _same_length(p, t)
    for name, v in (("pred", p), ("target", t)):
        if v.size and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"{name} indices must lie in [0, {num_classes - 1}]")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(pred: ArrayLike, target: ArrayLike) -> float:
    """Fraction of ``pred == target`` (``(N,)`` each)."""
    p, t = _sample_indices("pred", pred), _sample_indices("target", target)
    _same_length(p, t)  # (NumPy would broadcast one prediction against every target)
    return float((p == t).mean()) if t.size else float("nan")


def precision_recall_f1(pred: ArrayLike, target: ArrayLike, num_classes: int) -> dict[str, np.ndarray]:
    """Per-class ``precision``, ``recall``, ``f1`` and ``support``, each ``(C,)``.

    Undefined values (no prediction of a class for precision, no sample of it for recall) are NaN. F1 is
    ``2 TP / (2 TP + FP + FN)``: 0 for a class that occurs but is never predicted correctly (never predicted at
    all included: scikit-learn's value), NaN only for a class absent from both ``pred`` and ``target``.
    """
    cm = confusion_matrix(pred, target, num_classes).astype(np.float64)
    tp = np.diag(cm)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / cm.sum(0)
        recall = tp / cm.sum(1)
        f1 = 2 * tp / (2 * tp + fp + fn)  # (NaN where it was undefined, a macro F1 skipped never-predicted classes)
    return {"precision": precision, "recall": recall, "f1": f1, "support": cm.sum(1).astype(np.int64)}


def balanced_accuracy(pred: ArrayLike, target: ArrayLike, num_classes: int) -> float:
    """Mean recall over the classes present in ``target`` (chance level ``1 / C``)."""
    recall = precision_recall_f1(pred, target, num_classes)["recall"]
    return float(np.nanmean(recall)) if np.isfinite(recall).any() else float("nan")


def _binary_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties; NaN if one class is absent."""
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(score.size, dtype=np.float64)
    # average ranks (1-based) over runs of equal scores
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@overload
def roc_auc(scores: ArrayLike, target: ArrayLike, num_classes: int | None = None,
            average: Literal["macro"] = "macro") -> float: ...
@overload
def roc_auc(scores: ArrayLike, target: ArrayLike, num_classes: int | None = None, *,
            average: str | None) -> float | np.ndarray: ...
@overload
def roc_auc(scores: ArrayLike, target: ArrayLike, num_classes: int | None,
            average: str | None) -> float | np.ndarray: ...
def roc_auc(scores: ArrayLike, target: ArrayLike, num_classes: int | None = None,
            average: str | None = "macro") -> float | np.ndarray:
    """ROC AUC: binary, or one-vs-rest per class.

    Parameters
    ----------
    scores : array-like ``(N,)`` or ``(N, C)``
        Score of class 1 (binary), or per-class scores/probabilities (one-vs-rest).
    target : array-like ``(N,)``
        Class indices.
    num_classes : int, optional
        ``C`` (default: ``scores.shape[1]``, or 2 for 1-D scores).
    average : {"macro", None}
        ``"macro"``: mean of the per-class AUCs defined (NaN where a class is absent); ``None``: ``(C,)``.

    Returns
    -------
    float or ndarray ``(C,)``
        A float for binary scores or ``average="macro"``; the per-class AUCs ``(C,)`` with ``average=None``.
    """
    if average not in ("macro", None):
        raise ValueError(f"average must be 'macro' or None, got {average!r}")
    s, t = _np(scores, "scores").astype(np.float64), _sample_indices("target", target)
    if num_classes is not None:
        num_classes = _num_classes(num_classes)
    if s.ndim not in (1, 2) or s.shape[0] != t.size:
        raise ValueError(f"scores must be (N,) or (N, C) with N = {t.size} (the targets), got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    if s.ndim == 1 or (s.ndim == 2 and s.shape[1] == 1):
        if num_classes not in (None, 2):
            raise ValueError(f"scores of shape {s.shape} are binary (the score of class 1), but num_classes is "
                             f"{num_classes}; give (N, {num_classes}) per-class scores")
        if t.size and (t.min() < 0 or t.max() > 1):
            raise ValueError(f"binary scores need targets in {{0, 1}}, got [{t.min()}, {t.max()}]")
        return _binary_auc(s.ravel(), t == 1)
    c = s.shape[1] if num_classes is None else num_classes
    if c != s.shape[1]:
        raise ValueError(f"num_classes ({c}) must equal the score columns ({s.shape[1]})")
    if t.size and (t.min() < 0 or t.max() >= c):
        raise ValueError(f"target indices must lie in [0, {c - 1}], got [{t.min()}, {t.max()}]")
    per = np.array([_binary_auc(s[:, k], t == k) for k in range(c)])
    if average is None:
        return per
    return float(np.nanmean(per)) if np.isfinite(per).any() else float("nan")


def classification_report(pred: ArrayLike, target: ArrayLike, num_classes: int,
                          scores: ArrayLike | None = None) -> dict[str, float]:
    """Flat dict of the metrics above: ``accuracy``, ``balanced_accuracy``, macro ``f1``, ``auc`` (if
    ``scores`` ``(N, C)`` are given) and per-class ``precision_<k>``/``recall_<k>``/``f1_<k>``."""
    out = {"accuracy": accuracy(pred, target), "balanced_accuracy": balanced_accuracy(pred, target, num_classes)}
    prf = precision_recall_f1(pred, target, num_classes)
    out["f1"] = float(np.nanmean(prf["f1"])) if np.isfinite(prf["f1"]).any() else float("nan")
    if scores is not None:
        s = _np(scores, "scores")
        out["auc"] = roc_auc(s[:, 1] if s.ndim == 2 and s.shape[1] == 2 else s, target, num_classes)
    for k in range(num_classes):
        for key in ("precision", "recall", "f1"):
            out[f"{key}_{k}"] = float(prf[key][k])
    return out


def save_confusion_png(cm: np.ndarray, path: str | Path, class_names: Sequence[str] | None = None,
                       normalize: bool = True, title: str = "confusion matrix") -> Path:
    """Writes the confusion matrix ``(C, C)`` (rows true, columns predicted) as a PNG, with counts (and
    row-normalized fractions as colours if ``normalize``). Returns the path."""
    cm = np.asarray(cm)
    c = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    with np.errstate(invalid="ignore", divide="ignore"):
        shown = cm / cm.sum(1, keepdims=True) if normalize else cm.astype(np.float64)
    shown = np.nan_to_num(shown)
    size = 1.6 + 0.6 * c
    fig = new_figure(figsize=(size + 1.2, size))
    ax = fig.subplots()
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class" if normalize else "count")
    ax.set_xticks(range(c), names, rotation=45, ha="right")
    ax.set_yticks(range(c), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    hi = shown.max() if shown.size else 1
    for i in range(c):
        for j in range(c):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if shown[i, j] > 0.5 * hi else "black", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
