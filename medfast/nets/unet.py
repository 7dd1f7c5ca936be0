"""U-Net for 2D and 3D segmentation (nnU-Net style plain convolutional encoder/decoder)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from medfast.ops._validate import check_bool, check_tensor

__all__ = ["UNet"]


def _norm(kind: str, nd: int, channels: int) -> nn.Module:
    if kind == "instance":
        return (nn.InstanceNorm3d if nd == 3 else nn.InstanceNorm2d)(channels, affine=True, eps=1e-5)
    if kind == "batch":
        return (nn.BatchNorm3d if nd == 3 else nn.BatchNorm2d)(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)  # (min(8, c) groups failed for 12, 20, 40 channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of instance, batch, group, none; got {kind!r}")


class _ConvBlock(nn.Sequential):
    """``n`` times conv(3) -> norm -> LeakyReLU(0.01); the first conv may be strided (downsampling)."""

    def __init__(self, nd: int, cin: int, cout: int, n: int, norm: str, stride: int = 1) -> None:
        conv = nn.Conv3d if nd == 3 else nn.Conv2d
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [conv(cin if i == 0 else cout, cout, 3, stride=stride if i == 0 else 1, padding=1,
                            bias=norm == "none"),
                       _norm(norm, nd, cout), nn.LeakyReLU(0.01, inplace=True)]
        super().__init__(*layers)


class UNet(nn.Module):
    """U-Net: ``len(channels)`` resolution levels, strided-conv downsampling, transposed-conv upsampling,
    skip connections by concatenation.

    Parameters
    ----------
    spatial_dims : {2, 3}
    in_channels, out_channels : int
        Input channels and classes (logits out).
    channels : sequence of int
        Features per level, from full resolution down (depth = ``len(channels)``, >= 2). Each level halves
        the spatial size, so inputs should be divisible by ``2 ** (len(channels) - 1)`` (others are
        zero-padded internally and cropped back).
    convs_per_level : int
        Convolutions per block.
    norm : {"instance", "batch", "group", "none"}
        Normalization after each convolution (instance norm, affine, as nnU-Net).
    deep_supervision : bool
        In training mode, also return logits from the coarser decoder levels (a list, full resolution
        first, each at its level's resolution); in eval mode only the full-resolution logits.

    Shapes
    ------
    ``(B, in_channels, *S)`` -> ``(B, out_channels, *S)``.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2,
                 channels: Sequence[int] = (16, 32, 64, 128), convs_per_level: int = 2, norm: str = "instance",
                 deep_supervision: bool = False) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        channels = list(channels)
        if len(channels) < 2 or any(int(c) < 1 for c in channels):
            raise ValueError(f"channels must list >= 2 positive feature counts, got {channels}")
        if in_channels < 1 or out_channels < 1 or convs_per_level < 1:
            raise ValueError("in_channels, out_channels and convs_per_level must be >= 1")
        nd = spatial_dims
        self.spatial_dims, self.deep_supervision = nd, check_bool("deep_supervision", deep_supervision)
        self.levels = len(channels)
        conv = nn.Conv3d if nd == 3 else nn.Conv2d
        tconv = nn.ConvTranspose3d if nd == 3 else nn.ConvTranspose2d
        self.encoder = nn.ModuleList()
        cin = in_channels
        for i, c in enumerate(channels):
            self.encoder.append(_ConvBlock(nd, cin, c, convs_per_level, norm, stride=1 if i == 0 else 2))
            cin = c
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for i in range(len(channels) - 1, 0, -1):
            self.up.append(tconv(channels[i], channels[i - 1], 2, stride=2))
            self.decoder.append(_ConvBlock(nd, 2 * channels[i - 1], channels[i - 1], convs_per_level, norm))
            if deep_supervision or i == 1:  # one 1x1 head per decoder level with deep supervision
                self.heads.append(conv(channels[i - 1], out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        x = check_tensor("x", x)
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f"x must have shape (B, C, *S) with {self.spatial_dims} spatial dims, got "
                             f"{tuple(x.shape)}")
        in_channels = self.encoder[0][0].in_channels  # (the first conv's: also a UNet pickled whole)
        if x.shape[1] != in_channels:  # named here, not the first convolution's weight-shape error
            raise ValueError(f"x must have shape (B, in_channels = {in_channels}, *S), got {tuple(x.shape)}")
        if x.numel() == 0:  # (instance norm and the padding index past an empty batch or axis)
            raise ValueError(f"x is empty: shape {tuple(x.shape)}")
        size = list(x.shape[2:])
        k = 2 ** (self.levels - 1)
        pad = [(-s) % k for s in size]
        if any(pad):
            x = nn.functional.pad(x, [p for q in reversed(pad) for p in (0, q)])
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        outs = []
        for i, (up, dec) in enumerate(zip(self.up, self.decoder)):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
            if self.deep_supervision and self.training:
                outs.append(self.heads[i](x))
        if not (self.deep_supervision and self.training):
            out = self.heads[-1](x)
            return out[(..., *[slice(0, s) for s in size])] if any(pad) else out
        outs = outs[::-1]  # full resolution first
        if any(pad):
            outs = [o[(..., *[slice(0, -(-s // 2**j)) for s in size])] for j, o in enumerate(outs)]
        return outs
