"""Classification networks: a SonoNet-style 2D CNN and a small ResNet-style backbone (2D/3D), each with a
head for the label encoding: ``nominal`` (``C`` logits), ``binary`` (1 logit) or ``ordinal`` (CORAL,
``K-1`` logits sharing one weight vector, Cao et al. 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ClassificationHead", "CoralHead", "ResNetClassifier", "SonoNet"]


def _conv(dims: int):
    return nn.Conv2d if dims == 2 else nn.Conv3d


def _bn(dims: int):
    return nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d


class CoralHead(nn.Module):
    """CORAL output layer: ``logits[:, k] = w . x + b_k`` (one weight vector, ``K-1`` biases), so the
    ``P(y > k)`` are rank-consistent (non-increasing in ``k``) whenever the biases are.

    Parameters
    ----------
    in_features : int
    num_classes : int
        ``K``; the head has ``K-1`` outputs.

    ``forward``: ``(N, in_features) -> (N, K-1)``.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.fc = nn.Linear(in_features, 1, bias=False)
        # decreasing initial biases as in coral-pytorch: the initial thresholds are ordered
        self.bias = nn.Parameter(torch.arange(num_classes - 1, 0, -1).float() / (num_classes - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.bias


class ClassificationHead(nn.Module):
    """Dropout + the output layer of an encoding: ``Linear(in, C)``, ``Linear(in, 1)`` or :class:`CoralHead`.

    ``forward``: ``(N, in_features) -> (N, C | 1 | K-1)``.
    """

    def __init__(self, in_features: int, num_classes: int, encoding: str = "nominal", dropout: float = 0.0) -> None:
        super().__init__()
        if encoding == "nominal":
            out: nn.Module = nn.Linear(in_features, num_classes)
        elif encoding == "binary":
            if num_classes != 2:
                raise ValueError(f"the binary encoding has 2 classes, got {num_classes}")
            out = nn.Linear(in_features, 1)
        elif encoding == "ordinal":
            out = CoralHead(in_features, num_classes)
        else:
            raise ValueError(f"encoding must be 'nominal', 'binary' or 'ordinal', got {encoding!r}")
        self.encoding, self.num_classes = encoding, num_classes
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(x))


class SonoNet(nn.Module):
    """SonoNet-style 2D CNN (Baumgartner et al. 2017): VGG-like blocks of 3x3 conv-BN-ReLU with max pooling,
    an adaptation layer of 1x1 convs, global average pooling, then the head of the encoding.

    Parameters
    ----------
    in_channels : int
    num_classes : int
    encoding : {"nominal", "binary", "ordinal"}
    width : int
        Channels of the first block, doubled per block (capped at ``8 * width``). SonoNet-64 is ``width=64``.
    convs_per_block : sequence of int
        Number of 3x3 convs in each block (SonoNet: ``(2, 2, 3, 3, 3)``); one pooling between blocks.
    adaptation : int
        Channels of the 1x1 adaptation layer (default ``2 * width``).
    dropout : float

    ``forward``: ``(N, in_channels, H, W) -> (N, C | 1 | K-1)``; ``features`` gives the adaptation maps
    ``(N, adaptation, h, w)`` (used for class-activation maps).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, encoding: str = "nominal", width: int = 16,
                 convs_per_block: Sequence[int] = (2, 2, 3, 3), adaptation: int | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_channels
        for b, n in enumerate(convs_per_block):
            out = min(width * 2**b, 8 * width)
            if b > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(n):
                layers += [nn.Conv2d(ch, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                ch = out
        adaptation = adaptation or 2 * width
        layers += [nn.Conv2d(ch, adaptation, 1, bias=False), nn.BatchNorm2d(adaptation), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = ClassificationHead(adaptation, num_classes, encoding, dropout)
        self.num_features = adaptation

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Adaptation-layer maps ``(N, adaptation, h, w)``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


class _BasicBlock(nn.Module):
    def __init__(self, dims: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        conv, bn = _conv(dims), _bn(dims)
        self.c1, self.b1 = conv(cin, cout, 3, stride, 1, bias=False), bn(cout)
        self.c2, self.b2 = conv(cout, cout, 3, 1, 1, bias=False), bn(cout)
        self.skip = (nn.Sequential(conv(cin, cout, 1, stride, bias=False), bn(cout))
                     if stride != 1 or cin != cout else nn.Identity())
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.b1(self.c1(x)))
        return self.act(self.b2(self.c2(y)) + self.skip(x))


class ResNetClassifier(nn.Module):
    """Small ResNet-style backbone (basic blocks) for 2D or 3D images with the head of an encoding.

    Parameters
    ----------
    spatial_dims : {2, 3}
    in_channels : int
    num_classes : int
    encoding : {"nominal", "binary", "ordinal"}
    width : int
        Channels of the stem and first stage, doubled per stage.
    blocks : sequence of int
        Basic blocks per stage (ResNet-18 is ``(2, 2, 2, 2)``); every stage after the first halves the size.
    stem_stride : int
        Stride of the 3x3 stem conv (1 for small images, 2 to save memory on large ones).
    dropout : float

    ``forward``: ``(N, in_channels, *spatial) -> (N, C | 1 | K-1)``; ``features`` gives the last stage's
    maps ``(N, width * 2**(len(blocks)-1), *spatial')``.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, num_classes: int = 2, encoding: str = "nominal",
                 width: int = 16, blocks: Sequence[int] = (1, 1, 1, 1), stem_stride: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        conv, bn = _conv(spatial_dims), _bn(spatial_dims)
        self.stem = nn.Sequential(conv(in_channels, width, 3, stem_stride, 1, bias=False), bn(width),
                                  nn.ReLU(inplace=True))
        stages, ch = [], width
        for s, n in enumerate(blocks):
            out = width * 2**s
            stage = [_BasicBlock(spatial_dims, ch, out, 1 if s == 0 else 2)]
            stage += [_BasicBlock(spatial_dims, out, out, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            ch = out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.head = ClassificationHead(ch, num_classes, encoding, dropout)
        self.num_features = ch

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage feature maps."""
        return self.stages(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))
