"""Classification networks: a SonoNet-style 2D CNN and small ResNet- and DenseNet-style backbones (2D/3D),
each with a head for the label encoding: ``nominal`` (``C`` logits), ``binary`` (1 logit) or ``ordinal`` (CORAL,
``K-1`` logits sharing one weight vector, Cao et al. 2020)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from medfast.ops._validate import check_bool, check_int, py_scalar

__all__ = ["ClassificationHead", "CoralHead", "DenseNetClassifier", "ResNetClassifier", "SonoNet"]


def _conv(dims: int):
    return nn.Conv2d if dims == 2 else nn.Conv3d


def _bn(dims: int):
    return nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d


def _counts(name: str, value: object) -> list[int]:
    """A non-empty sequence of ints >= 1 (blocks / layers / convs per stage): a 0 or negative entry was built as
    one block (ResNet) or none (SonoNet) without a word."""
    try:
        if isinstance(value, (str, bytes, Mapping)):
            raise TypeError
        out = [py_scalar(n) for n in value]  # type: ignore[union-attr]
        if any(isinstance(n, bool) or not isinstance(n, int) for n in out):
            raise TypeError
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, got {value!r}") from None
    if not out or min(out) < 1:
        raise ValueError(f"{name} must be a non-empty sequence of ints >= 1, got {value!r}")
    return out


def _dropout(name: str, value: object) -> float:
    """A probability in [0, 1): a negative or NaN one was silently no dropout (1 would zero every feature)."""
    value = py_scalar(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1), got {value!r}")
    if not 0 <= value < 1:  # (NaN fails too)
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


class CoralHead(nn.Module):
    """CORAL output layer: ``logits[:, k] = w . x + b_k`` (one weight vector, ``K-1`` biases), so the
    ``P(y > k)`` are rank-consistent (non-increasing in ``k``) whenever the biases are.

    Parameters
    ----------
    in_features : int
    num_classes : int
        ``K``; the head has ``K-1`` outputs.

    Notes
    -----
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

    Notes
    -----
    ``forward``: ``(N, in_features) -> (N, C | 1 | K-1)``.
    """

    def __init__(self, in_features: int, num_classes: int, encoding: str = "nominal", dropout: float = 0.0) -> None:
        super().__init__()
        in_features, num_classes = check_int("in_features", in_features, 1), check_int("num_classes", num_classes, 1)
        dropout = _dropout("dropout", dropout)
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


_POINTWISE = (nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm, nn.ReLU,
              nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.Identity)


def _window_grid(m: nn.Module, dims: int) -> tuple[list[float], list[float]]:
    """Per axis ``(offset, step)`` of a conv / pooling window: output cell ``j`` is centred on input position
    ``offset + step * j`` (``j * stride - padding + dilation * (kernel - 1) / 2``)."""
    def per_axis(v):
        return [v] * dims if isinstance(v, int) else list(v)

    k, s = per_axis(m.kernel_size), per_axis(m.stride if m.stride is not None else m.kernel_size)
    d = per_axis(getattr(m, "dilation", 1))
    pad = m.padding
    if pad == "valid":
        pad = 0
    if pad == "same":  # PyTorch puts the odd padding element on the far side
        p = [dd * (kk - 1) // 2 for kk, dd in zip(k, d, strict=True)]
    else:
        p = per_axis(pad)
    return ([dd * (kk - 1) / 2 - pp for kk, dd, pp in zip(k, d, p, strict=True)], [float(v) for v in s])


def _feature_grid(modules: Sequence[nn.Module], dims: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(origin, stride)`` per spatial axis of the output grid of ``modules`` applied in order: cell ``j`` is
    centred on input position ``origin + stride * j``. Read from the layers' own kernel / stride / padding /
    dilation, so every option of the networks here is covered; an unknown layer is a TypeError (a new layer
    must say how it moves the grid)."""
    origin, stride = [0.0] * dims, [1.0] * dims

    def walk(m: nn.Module) -> None:
        nonlocal origin, stride
        if isinstance(m, nn.Sequential):
            for c in m:
                walk(c)
        elif isinstance(m, (nn.modules.conv._ConvNd, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool2d, nn.AvgPool3d)) \
                and not getattr(m, "transposed", False):
            off, step = _window_grid(m, dims)
            origin = [o + st * f for o, st, f in zip(origin, stride, off, strict=True)]
            stride = [st * f for st, f in zip(stride, step, strict=True)]
        elif hasattr(m, "grid_branches"):  # a block summing / concatenating branches (the blocks below)
            grids = [_feature_grid(b, dims) for b in m.grid_branches()]
            if any(g != grids[0] for g in grids):  # the sum / concatenation needs aligned grids
                raise TypeError(f"the branches of {type(m).__name__} have different grids {grids}")
            off, step = grids[0]
            origin = [o + st * f for o, st, f in zip(origin, stride, off, strict=True)]
            stride = [st * f for st, f in zip(stride, step, strict=True)]
        elif not isinstance(m, _POINTWISE):
            raise TypeError(f"feature grid: no rule for layer {type(m).__name__}")

    for m in modules:
        walk(m)
    return tuple(origin), tuple(stride)


class _PooledClassifier(nn.Module):
    """features(x) -> global average pooling -> head; subclasses define ``features``, ``pool`` and ``head``, and
    ``_feature_layers`` (the layers of ``features`` in order, for :meth:`feature_grid`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))

    def feature_grid(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Where the cells of ``features(x)`` sit in the input: ``(origin, stride)`` per spatial axis, cell ``j``
        centred on input pixel ``origin + stride * j`` (derived from the layers' settings). Class-activation
        maps are resampled with it: a 2x2 pooling puts cell 0 at 0.5, a stride-2 3x3 conv of padding 1 at 0."""
        layers = self._feature_layers()
        # the dimensionality of the convs themselves (also right for a model pickled before spatial_dims existed)
        conv = next(m for layer in layers for m in layer.modules() if isinstance(m, nn.modules.conv._ConvNd))
        return _feature_grid(layers, len(conv.kernel_size))


class SonoNet(_PooledClassifier):
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
    adaptation : int or None
        Channels of the 1x1 adaptation layer (``None``, the default: ``2 * width``).
    dropout : float
        Dropout before the output layer, in [0, 1).

    Notes
    -----
    ``forward``: ``(N, in_channels, H, W) -> (N, C | 1 | K-1)``; ``features`` gives the adaptation maps
    ``(N, adaptation, h, w)`` (used for class-activation maps).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, encoding: str = "nominal", width: int = 16,
                 convs_per_block: Sequence[int] = (2, 2, 3, 3), adaptation: int | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        in_channels, width = check_int("in_channels", in_channels, 1), check_int("width", width, 1)
        convs_per_block = _counts("convs_per_block", convs_per_block)
        # (`adaptation or 2 * width` read 0 as the default)
        adaptation = 2 * width if adaptation is None else check_int("adaptation", adaptation, 1)
        layers: list[nn.Module] = []
        ch = in_channels
        for b, n in enumerate(convs_per_block):
            out = min(width * 2**b, 8 * width)
            if b > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(n):
                layers += [nn.Conv2d(ch, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                ch = out
        layers += [nn.Conv2d(ch, adaptation, 1, bias=False), nn.BatchNorm2d(adaptation), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = ClassificationHead(adaptation, num_classes, encoding, dropout)
        self.num_features, self.spatial_dims = adaptation, 2

    def _feature_layers(self) -> list[nn.Module]:
        return [self.body]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Adaptation-layer maps ``(N, adaptation, h, w)``."""
        return self.body(x)


class _BasicBlock(nn.Module):
    def __init__(self, dims: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        conv, bn = _conv(dims), _bn(dims)
        self.c1, self.b1 = conv(cin, cout, 3, stride, 1, bias=False), bn(cout)
        self.c2, self.b2 = conv(cout, cout, 3, 1, 1, bias=False), bn(cout)
        self.skip = (nn.Sequential(conv(cin, cout, 1, stride, bias=False), bn(cout))
                     if stride != 1 or cin != cout else nn.Identity())
        self.act = nn.ReLU(inplace=True)

    def grid_branches(self) -> list[list[nn.Module]]:
        return [[self.c1, self.c2], [self.skip]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.b1(self.c1(x)))
        return self.act(self.b2(self.c2(y)) + self.skip(x))


class ResNetClassifier(_PooledClassifier):
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
        Basic blocks per stage, each >= 1 (ResNet-18 is ``(2, 2, 2, 2)``); every stage after the first halves
        the size.
    stem_stride : int
        Stride of the 3x3 stem conv (1 for small images, 2 to save memory on large ones).
    dropout : float
        Dropout before the output layer, in [0, 1).

    Notes
    -----
    ``forward``: ``(N, in_channels, *spatial) -> (N, C | 1 | K-1)``; ``features`` gives the last stage's
    maps ``(N, width * 2**(len(blocks)-1), *spatial')``.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, num_classes: int = 2, encoding: str = "nominal",
                 width: int = 16, blocks: Sequence[int] = (1, 1, 1, 1), stem_stride: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        in_channels, width = check_int("in_channels", in_channels, 1), check_int("width", width, 1)
        stem_stride, blocks = check_int("stem_stride", stem_stride, 1), _counts("blocks", blocks)
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
        self.num_features, self.spatial_dims = ch, spatial_dims

    def _feature_layers(self) -> list[nn.Module]:
        return [self.stem, self.stages]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage feature maps."""
        return self.stages(self.stem(x))


def _norm(kind: str, dims: int, channels: int) -> nn.Module:
    if kind == "batch":
        return _bn(dims)(channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    raise ValueError(f"norm must be 'batch', 'instance' or 'group', got {kind!r}")


class _DenseLayer(nn.Module):
    """Bottleneck dense layer (DenseNet-BC): norm-ReLU-conv1x1 (``bn_size * growth`` channels), then
    norm-ReLU-conv3x3 (``growth`` channels); the output is concatenated to the input."""

    def __init__(self, dims: int, cin: int, growth: int, bn_size: int, norm: str, dropout: float) -> None:
        super().__init__()
        conv = _conv(dims)
        mid = bn_size * growth
        self.body = nn.Sequential(_norm(norm, dims, cin), nn.ReLU(inplace=True), conv(cin, mid, 1, bias=False),
                                  _norm(norm, dims, mid), nn.ReLU(inplace=True),
                                  conv(mid, growth, 3, padding=1, bias=False))
        self.drop = (nn.Dropout2d if dims == 2 else nn.Dropout3d)(dropout) if dropout > 0 else nn.Identity()

    def grid_branches(self) -> list[list[nn.Module]]:
        return [[self.body], []]  # the new features and the input they are concatenated to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.drop(self.body(x))], 1)


class DenseNetClassifier(_PooledClassifier):
    """DenseNet-style backbone (Huang et al. 2017, the BC variant: bottleneck layers and compressing
    transitions) for 2D or 3D images with the head of an encoding.

    Parameters
    ----------
    spatial_dims : {2, 3}
    in_channels : int
    num_classes : int
    encoding : {"nominal", "binary", "ordinal"}
    width : int
        Channels of the stem conv (DenseNet-121: 64).
    growth_rate : int
        Channels each dense layer adds (DenseNet-121: 32).
    blocks : sequence of int
        Dense layers per block (DenseNet-121: ``(6, 12, 24, 16)``); a transition (norm-ReLU-conv1x1 with
        ``compression``, then 2x average pooling) between blocks.
    bn_size : int
        Bottleneck width factor (``bn_size * growth_rate`` channels before the 3x3 conv).
    compression : float
        Fraction of the channels a transition keeps, in (0, 1].
    stem_stride : int
        Stride of the 3x3 stem conv (1 for small images; 2 halves the size first).
    stem_pool : bool
        A 3x3 max pooling of stride 2 after the stem conv (as in DenseNet-121): another halving.
    norm : {"batch", "instance", "group"}
        Normalization layers. ``group`` (``gcd(channels, 8)`` groups: 8 where the channel count is a multiple
        of 8, else 4, 2 or 1) and ``instance`` are per sample, so a DDP run on several
        processes computes exactly what one process computes on the combined batch.
    dropout : float
        Dropout before the output layer, in [0, 1).
    layer_dropout : float
        Channel dropout on each dense layer's new features, in [0, 1).

    Notes
    -----
    ``forward``: ``(N, in_channels, *spatial) -> (N, C | 1 | K-1)``; ``features`` gives the maps after the
    last block and its norm-ReLU, ``(N, num_features, *spatial / 2**(len(blocks)-1) / stem_stride)`` (and
    another ``/ 2`` with ``stem_pool``; the input of global pooling, used for class-activation maps).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, num_classes: int = 2, encoding: str = "nominal",
                 width: int = 16, growth_rate: int = 12, blocks: Sequence[int] = (4, 4, 4), bn_size: int = 4,
                 compression: float = 0.5, stem_stride: int = 1, stem_pool: bool = False, norm: str = "batch",
                 dropout: float = 0.0, layer_dropout: float = 0.0) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        in_channels, width = check_int("in_channels", in_channels, 1), check_int("width", width, 1)
        stem_stride, blocks = check_int("stem_stride", stem_stride, 1), _counts("blocks", blocks)
        layer_dropout = _dropout("layer_dropout", layer_dropout)
        if not 0 < compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        if growth_rate < 1 or width < 1 or bn_size < 1:
            raise ValueError(f"growth_rate, width and bn_size must be >= 1, got {growth_rate}, {width}, {bn_size}")
        _norm(norm, spatial_dims, 8)  # validates the name
        conv = _conv(spatial_dims)
        pool = nn.AvgPool2d if spatial_dims == 2 else nn.AvgPool3d
        layers: list[nn.Module] = [conv(in_channels, width, 3, stem_stride, 1, bias=False)]
        if check_bool("stem_pool", stem_pool):
            layers += [_norm(norm, spatial_dims, width), nn.ReLU(inplace=True),
                       (nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d)(3, 2, 1)]
        ch = width
        for b, n in enumerate(blocks):
            for _ in range(int(n)):
                layers.append(_DenseLayer(spatial_dims, ch, growth_rate, bn_size, norm, layer_dropout))
                ch += growth_rate
            if b < len(blocks) - 1:
                out = max(1, int(ch * compression))
                layers += [_norm(norm, spatial_dims, ch), nn.ReLU(inplace=True), conv(ch, out, 1, bias=False),
                           pool(2)]
                ch = out
        layers += [_norm(norm, spatial_dims, ch), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.head = ClassificationHead(ch, num_classes, encoding, dropout)
        self.num_features, self.spatial_dims = ch, spatial_dims

    def _feature_layers(self) -> list[nn.Module]:
        return [self.body]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Maps after the last dense block (normalized, ReLU): the input of global pooling."""
        return self.body(x)
