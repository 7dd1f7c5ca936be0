"""Class-activation maps (Grad-CAM, Selvaraju et al. 2017) of the classifiers in :mod:`medfast.nets`, and
PNG overlays of them.

Every classifier there is ``head(global_pool(features(x)))``; Grad-CAM weights the channels of
``features(x)`` by the spatial mean of the gradient of the class score, sums them and keeps the positive
part. For a linear head on global average pooling this is the original CAM (Zhou et al. 2016),
``relu(sum_k w_ck F_k)``, up to a positive factor.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medfast.tasks._figures import new_figure, save_figure

__all__ = ["class_activation_map", "class_score", "save_cam_png"]


def class_score(logits: torch.Tensor, target: torch.Tensor, encoding: str) -> torch.Tensor:
    """Per-sample score ``(N,)`` whose gradient Grad-CAM follows.

    ``nominal``: the logit of class ``target``; ``binary``: the logit for class 1 and its negative for
    class 0; ``ordinal`` (CORAL): the sum of the ``K-1`` logits of ``P(y > k)`` for a target above the
    lowest class (evidence for a higher class), its negative for class 0.
    """
    if encoding not in ("nominal", "binary", "ordinal"):
        raise ValueError(f"encoding must be 'nominal', 'binary' or 'ordinal', got {encoding!r}")
    target = torch.as_tensor(target).reshape(-1)
    if target.is_floating_point() and not bool((target == target.round()).all()):
        raise ValueError(f"target must hold class indices, got {target.tolist()}")
    target = target.long()
    k = {"nominal": logits.shape[1], "binary": 2, "ordinal": logits.shape[1] + 1}[encoding]
    bad = target[(target < 0) | (target >= k)]
    if bad.numel():
        raise ValueError(f"target {bad.tolist()} outside the valid classes [0, {k - 1}] ({encoding} encoding, "
                         f"{k} classes)")
    if encoding == "nominal":
        return logits.gather(1, target[:, None])[:, 0]
    sign = torch.where(target > 0, 1.0, -1.0).to(logits.dtype)
    if encoding == "binary":
        return sign * logits.reshape(logits.shape[0], -1)[:, 0]
    return sign * logits.sum(1)  # ordinal


def _resample(cam: torch.Tensor, origin: Sequence[float], stride: Sequence[float],
              size: Sequence[int]) -> torch.Tensor:
    """Linear interpolation of ``cam`` ``(N, *grid)`` at every input pixel ``p``: feature coordinate
    ``(p - origin) / stride`` per axis, clamped to the grid (the border cells extend to the image edges)."""
    dims = cam.dim() - 1
    if len(origin) != dims or len(stride) != dims:
        raise ValueError(f"feature_grid() gave origin {tuple(origin)} and stride {tuple(stride)} for {dims} "
                         "spatial dims")
    for axis, (o, st, n_out) in enumerate(zip(origin, stride, size, strict=True)):
        n = cam.shape[axis + 1]
        u = ((torch.arange(n_out, dtype=torch.float64) - float(o)) / float(st)).clamp(0, n - 1)
        i0 = u.floor().long().clamp(max=max(n - 2, 0))
        w = (u - i0).to(cam.dtype)
        # (n_out, n) weights: 1-w on cell i0, w on i0+1 (one cell: the constant)
        m = torch.zeros(n_out, n, dtype=cam.dtype)
        m[torch.arange(n_out), i0] = 1 - w if n > 1 else 1.0
        if n > 1:
            m[torch.arange(n_out), i0 + 1] = w
        cam = (cam.movedim(axis + 1, -1) @ m.T.to(cam.device)).movedim(-1, axis + 1)
    return cam


def class_activation_map(model: nn.Module, image: torch.Tensor, target: torch.Tensor | Sequence[int] | None = None,
                         encoding: str = "nominal") -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of ``model`` for ``image``, upsampled to the image size.

    Parameters
    ----------
    model : nn.Module
        A classifier with ``features``, ``pool`` and ``head`` (``SonoNet``, ``ResNetClassifier``,
        ``DenseNetClassifier``); it is run in its current train/eval mode (use ``eval()``).
    image : Tensor
        ``(N, C, *spatial)`` (2 or 3 spatial dims), float; run in the dtype of the model's parameters. The model
        may be frozen (``requires_grad_(False)``), and the call may be made under ``torch.no_grad()`` or
        ``torch.inference_mode()``: the gradients Grad-CAM needs are computed anyway (the parameters' are not).
    target : Tensor or sequence of int, optional
        Class of each image whose evidence is mapped ``(N,)``, each in ``[0, C-1]`` (else ValueError);
        default: the predicted class.
    encoding : {"nominal", "binary", "ordinal"}
        The model's label encoding (how to read its outputs).

    Returns
    -------
    cam : Tensor
        ``(N, *spatial)`` float32 maps in ``[0, 1]`` (each divided by its maximum; all zero when no
        location supports the class), bi/trilinearly resampled to the input size where the model's
        ``feature_grid()`` says its cells sit (cell ``j`` on input pixel ``origin + stride * j``, so
        stride-2 convs and poolings both put the map on the object). A model without ``feature_grid``
        is upsampled with ``F.interpolate(align_corners=False)``, right for 2x2-pooling networks only.
    target : Tensor
        ``(N,)`` int64 the classes that were mapped.
    """
    for name in ("features", "pool", "head"):
        if not hasattr(model, name):
            raise TypeError(f"model must have a '{name}' member (SonoNet, ResNetClassifier, DenseNetClassifier); "
                            f"got {type(model).__name__}")
    if not isinstance(image, torch.Tensor) or image.dim() not in (4, 5):
        raise ValueError(f"image must be a (N, C, *spatial) tensor with 2 or 3 spatial dims, got "
                         f"{getattr(image, 'shape', type(image).__name__)}")
    params = [p for p in model.parameters() if p.is_floating_point()]
    if any(p.is_inference() for m in (model.pool, model.head) if isinstance(m, nn.Module) for p in m.parameters()):
        raise RuntimeError("class_activation_map needs autograd through the model's pool and head, but their "
                           "parameters were created under torch.inference_mode() (inference tensors); build or load "
                           "the model outside inference mode (torch.no_grad() is fine)")
    dtype = params[0].dtype if params else image.dtype if image.is_floating_point() else torch.float32
    # Grad-CAM needs autograd from the features on, whatever the caller's mode: a frozen model
    # (requires_grad_(False)), torch.no_grad() or torch.inference_mode() (left locally: tensors made here are
    # ordinary ones). The features run without a graph and become a leaf that requires grad: only the gradient
    # of the score w.r.t. them is needed, never the parameters'.
    with torch.inference_mode(False), torch.enable_grad():
        x = image.to(dtype)
        if x.is_inference():
            x = x.clone()  # an inference tensor cannot enter autograd-recording ops
        with torch.no_grad():
            feats = model.features(x)
        if feats.is_inference():
            feats = feats.clone()
        feats = feats.detach().requires_grad_(True)
        logits = model.head(model.pool(feats).flatten(1))
        if target is None:
            from medfast.tasks.classification.encoding import make_encoder

            if encoding == "nominal":
                target = logits.argmax(1)
            else:
                k = 2 if encoding == "binary" else logits.shape[1] + 1
                target = make_encoder(encoding, k).decode(logits.detach(), logits=True)
        target = torch.as_tensor(target, device=logits.device).reshape(-1).long()
        if target.shape[0] != image.shape[0]:
            raise ValueError(f"target has {target.shape[0]} entries for {image.shape[0]} images")
        score = class_score(logits, target, encoding)
        (grad,) = torch.autograd.grad(score.sum(), feats)
    dims = tuple(range(2, feats.dim()))
    weights = grad.mean(dims, keepdim=True)
    cam = F.relu((weights * feats.detach()).sum(1, keepdim=True))
    grid = getattr(model, "feature_grid", None)
    if callable(grid):
        origin, stride = grid()
        cam = _resample(cam[:, 0], origin, stride, image.shape[2:])
    else:  # a network that does not say where its cells sit: the cells are taken as 2x2-pooling-like blocks
        mode = "bilinear" if image.dim() == 4 else "trilinear"
        cam = F.interpolate(cam, size=image.shape[2:], mode=mode, align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12)
    cam = cam / peak.view(-1, *([1] * (cam.dim() - 1)))
    return cam.float().detach(), target.detach()


def save_cam_png(images: torch.Tensor, cams: torch.Tensor, path: str | Path, titles: Sequence[str] | None = None,
                 columns: int = 4, alpha: float = 0.45) -> Path:
    """Writes a grid of 2D images with their class-activation maps overlaid (``jet``, transparency
    ``alpha``) as a PNG.

    Parameters
    ----------
    images : Tensor
        ``(N, C, H, W)`` or ``(N, H, W)`` (the first channel is shown, min-max scaled).
    cams : Tensor
        ``(N, H, W)`` maps in ``[0, 1]``.
    path : str or Path
        Output PNG (its folder is created).
    titles : sequence of str, optional
        One caption per image (e.g. ``"true coronal / pred coronal"``); ValueError if the count differs.
    columns : int
        Images per row of the grid (at most N).
    alpha : float
        Opacity of the overlaid maps (0: image only, 1: map only).

    Returns
    -------
    Path
        ``path``.
    """
    imgs = images.detach().float().cpu()
    if imgs.dim() == 4:
        imgs = imgs[:, 0]
    maps = cams.detach().float().cpu()
    if imgs.dim() != 3 or maps.shape != imgs.shape:
        raise ValueError(f"images {tuple(images.shape)} and cams {tuple(cams.shape)} must be 2D and match")
    n = imgs.shape[0]
    if titles is not None:
        if isinstance(titles, str):
            titles = [titles]
        titles = list(titles)
        if len(titles) != n:
            raise ValueError(f"titles has {len(titles)} entries for {n} images")
    cols = max(1, min(columns, n))
    rows = (n + cols - 1) // cols
    fig = new_figure(figsize=(2.3 * cols, 2.5 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        ax = axes.ravel()[i]
        im = imgs[i].numpy()
        lo, hi = float(im.min()), float(im.max())
        ax.imshow((im - lo) / max(hi - lo, 1e-8), cmap="gray", vmin=0, vmax=1)
        ax.imshow(np.clip(maps[i].numpy(), 0, 1), cmap="jet", alpha=alpha, vmin=0, vmax=1)
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)
