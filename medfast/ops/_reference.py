"""Pure-PyTorch references for the compiled ops: what a user would otherwise write.

``grid_sample_warp`` is "the grid_sample route": turn a voxel displacement into the normalized
sampling grid that ``torch.nn.functional.grid_sample`` wants, then sample. Tests compare against
it, benchmarks time it, and it documents the conventions medfast removes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ddf_to_grid(ddf: torch.Tensor) -> torch.Tensor:
    """(B, ndim, *S) voxel displacement -> (B, *S, ndim) grid in [-1, 1], align_corners=True,
    last dim in grid_sample's (x, y[, z]) order = reversed spatial axes."""
    ndim = ddf.dim() - 2
    size = ddf.shape[2:]
    axes = [torch.arange(n, dtype=ddf.dtype, device=ddf.device) for n in size]
    ident = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (ndim, *S)
    pos = ident.unsqueeze(0) + ddf
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in size], dtype=ddf.dtype, device=ddf.device)
    pos = pos * scale.view(1, ndim, *([1] * ndim)) - 1.0
    return pos.movedim(1, -1).flip(-1)


def grid_sample_warp(
    image: torch.Tensor, ddf: torch.Tensor, mode: str = "linear", padding: str = "zeros"
) -> torch.Tensor:
    """medfast.warp through ``F.grid_sample(align_corners=True)``: linear/nearest; zeros/border/reflection.

    Note: grid_sample's nearest rounds half to even, medfast's (like scipy's) half up.
    """
    gs_mode = {"linear": "bilinear", "nearest": "nearest", "cubic": "bicubic"}[mode]
    if image.shape[0] != ddf.shape[0]:
        image = image.expand(ddf.shape[0], *image.shape[1:])
    return F.grid_sample(image, ddf_to_grid(ddf), mode=gs_mode, padding_mode=padding, align_corners=True)
