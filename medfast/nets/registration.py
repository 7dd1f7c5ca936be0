"""Registration networks: LocalNet (dense displacement) and GlobalNet (affine), DeepReg-style.

Both take the moving and fixed images concatenated on the channel axis, ``(B, 2 C, *S)``, 2D or 3D.

* :class:`LocalNet` -- a U-shaped encoder-decoder (DeepReg's LocalNet: conv blocks with instance
  norm and leaky ReLU, max-pool down, transposed-conv up plus additive trilinear upsampling, skip
  connections added). The DDF is the mean of 1-channel-per-axis heads at the ``extract_levels``,
  upsampled to full resolution by their pooling factor (then cropped); the heads are zero-initialised, so an
  untrained net is the identity.
* :class:`GlobalNet` -- the LocalNet encoder, then a linear layer to the ``ndim x (ndim + 1)``
  affine parameters, initialised to the identity. It returns the affine in voxel coordinates
  (output -> input, as :func:`medfast.affine_warp` takes it) and the equivalent DDF.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medfast.nets._layers import CL3, Conv3d, ConvTranspose3d, InstanceNorm3d
from medfast.ops._validate import check_bool, check_int, position_dtype, py_scalar

# LocalNet.upsampling_version values
_LEGACY, _ALIGNED = 1, 2


def _channels_last(x: torch.Tensor, ndim: int, choice: bool | None) -> bool:
    """Whether the network runs channels-last: by default 3D on the CPU (oneDNN), where it is faster."""
    if choice is not None:
        return bool(choice) and ndim == 3
    return ndim == 3 and x.device.type == "cpu"


def _check_args(depth: object, min_depth: int, channels_last: object, in_channels: object,
                num_channel_initial: object) -> tuple[int, bool | None, int, int]:
    # sizes checked here, not by the first convolution's error at forward (which does not name the argument)
    depth = check_int("depth", depth, min_depth)
    in_channels = check_int("in_channels", in_channels, 1)
    num_channel_initial = check_int("num_channel_initial", num_channel_initial, 1)
    return (depth, None if channels_last is None else check_bool("channels_last", channels_last), in_channels,
            num_channel_initial)


def _check_levels(extract_levels: object, depth: int) -> list[int]:
    """Sorted distinct levels in [0, depth]: ints only (operator.index), so 1.9 is not silently level 1, nor
    True level 1, nor "012" the levels 0, 1, 2. ``None``: every level, ``range(depth + 1)``."""
    if extract_levels is None:
        return list(range(depth + 1))
    bad = TypeError(f"extract_levels must be a sequence of ints, got {extract_levels!r}")
    if isinstance(extract_levels, (str, bytes)):
        raise bad
    levels = []
    try:
        for lv in extract_levels:  # type: ignore[union-attr]
            lv = py_scalar(lv)
            if isinstance(lv, bool):
                raise bad
            levels.append(operator.index(lv))
    except TypeError:
        raise bad from None
    levels = sorted(set(levels))
    if not levels or levels[0] < 0 or levels[-1] > depth:
        raise ValueError(f"extract_levels must lie in [0, depth = {depth}], got {tuple(extract_levels)}")
    return levels


def _conv(ndim: int):
    return Conv3d if ndim == 3 else nn.Conv2d


def _norm(ndim: int):
    return InstanceNorm3d if ndim == 3 else nn.InstanceNorm2d


class _Block(nn.Sequential):
    """Two (conv 3, instance norm, leaky ReLU) layers."""

    def __init__(self, ndim: int, cin: int, cout: int) -> None:
        conv, norm = _conv(ndim), _norm(ndim)
        super().__init__(conv(cin, cout, 3, padding=1), norm(cout, affine=True), nn.LeakyReLU(0.2),
                         conv(cout, cout, 3, padding=1), norm(cout, affine=True), nn.LeakyReLU(0.2))


class _Encoder(nn.Module):
    """Levels 0..depth: a conv block at each, max-pool between them. Returns every level's output."""

    def __init__(self, ndim: int, in_channels: int, channels: int, depth: int) -> None:
        super().__init__()
        self.ndim = ndim
        chans = [channels * 2**i for i in range(depth + 1)]
        self.blocks = nn.ModuleList(
            [_Block(ndim, in_channels if i == 0 else chans[i - 1], chans[i]) for i in range(depth + 1)])
        self.channels = chans

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        pool = F.max_pool3d if self.ndim == 3 else F.max_pool2d
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else pool(x, 2, ceil_mode=True))
            out.append(x)
        return out


def _check_input(x: torch.Tensor, ndim: int, in_channels: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim + 2 or x.shape[1] != in_channels:
        raise ValueError(f"input must have shape (B, {in_channels}, *spatial) with {ndim} spatial dims "
                         f"(moving and fixed concatenated), got {tuple(x.shape)}")


class LocalNet(nn.Module):
    """Dense displacement field network.

    Parameters
    ----------
    spatial_dims : int
        2 or 3.
    in_channels : int
        Channels of the concatenated (moving, fixed) input, usually 2.
    num_channel_initial : int
        Feature channels at full resolution (doubled at each level).
    depth : int
        Number of down-sampling levels (max-pooling, ``ceil_mode``: any input size works).
    extract_levels : sequence of int or None
        Decoder levels (0 = full resolution) whose heads are averaged into the DDF (ints in ``[0, depth]``).
        ``None`` (default): every level, ``range(depth + 1)`` (``(0, 1, 2, 3)`` at the default depth).
    channels_last : bool or None
        Run the 3D network channels-last (``torch.channels_last_3d``). ``None`` (default): on the CPU
        only. There, float32 3D convolutions go through oneDNN forward and backward in either layout
        (``medfast.nets._layers``); a batch-1 training step at 64^3 with 8 initial channels took
        290 ms channels-last, 410 ms NCDHW and 920 ms with the stock ``torch.nn`` layers (2 threads).
        Same parameters and results (to float32 rounding) either way.

    Shapes
    ------
    ``forward(x)``: ``(B, in_channels, *S)`` -> DDF ``(B, spatial_dims, *S)`` in voxels (or a
    velocity field, to be integrated with :func:`medfast.integrate`). Level ``l``'s cell ``j`` (per axis)
    pools the input voxels ``[2^l j, 2^l j + 2^l - 1]`` (the last cell fewer when ``S`` is not a multiple of
    ``2^l``); coarse features and fields are upsampled by the pooling factor and cropped, so each cell's
    value lands back on those voxels whatever ``S``. The buffer ``upsampling_version`` (2) records that in the state
    dict: one without it (saved before) loads as 1 and keeps the resize to ``S`` it was trained with.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 2, num_channel_initial: int = 16, depth: int = 3,
                 extract_levels: Sequence[int] | None = None, channels_last: bool | None = None) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        depth, channels_last, in_channels, num_channel_initial = _check_args(
            depth, 1, channels_last, in_channels, num_channel_initial)
        levels = _check_levels(extract_levels, depth)
        self.ndim, self.in_channels, self.levels = spatial_dims, in_channels, levels
        self.channels_last = channels_last
        self.encoder = _Encoder(spatial_dims, in_channels, num_channel_initial, depth)
        ch = self.encoder.channels
        up = ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
        self.ups = nn.ModuleList([up(ch[i + 1], ch[i], 2, stride=2) for i in range(depth)])
        self.decoders = nn.ModuleList([_Block(spatial_dims, ch[i], ch[i]) for i in range(depth)])
        conv = _conv(spatial_dims)
        self.heads = nn.ModuleDict({str(lv): conv(ch[lv], spatial_dims, 3, padding=1) for lv in levels})
        for head in self.heads.values():
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        # Saved with the weights so that a checkpoint keeps computing what it was trained with: 2 = upsampling
        # by the pooling factor (aligned), 1 = the resize to the target size used before. A state dict without
        # it was written before the alignment fix and loads as 1 (see _load_from_state_dict). The forward reads
        # the Python copy, not the tensor (no device sync, no graph break under torch.compile).
        self.register_buffer("upsampling_version", torch.tensor(_ALIGNED, dtype=torch.int64))
        self._legacy_upsampling = False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "upsampling_version"
        if key not in state_dict and not any(k.startswith(prefix) for k in state_dict):
            # none of this net's weights (a partial load with strict=False): nothing to infer the version from
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
            return
        version = _LEGACY  # no key beside this net's weights: a checkpoint from before the alignment fix
        if key in state_dict:
            saved = state_dict[key]
            ok = (isinstance(saved, torch.Tensor) and saved.dim() == 0 and not saved.is_floating_point()
                  and saved.dtype != torch.bool and saved.device.type != "meta")
            if not ok or int(saved) not in (_LEGACY, _ALIGNED):
                error_msgs.append(f"{key} must be a 0-d int tensor, {_LEGACY} (resize, as before the alignment "
                                  f"fix) or {_ALIGNED} (aligned upsampling), got {saved!r}")
                return
            version = int(saved)
        n_missing = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key not in state_dict:
            # supplied here, so that strict loading of an old checkpoint passes
            missing_keys[n_missing:] = [k for k in missing_keys[n_missing:] if k != key]
        if self.upsampling_version.is_meta:  # (a meta module loaded with assign=True: a real buffer, not a
            # meta one that reports the load as complete and cannot be copied off the meta device)
            self._buffers["upsampling_version"] = torch.tensor(version)
        else:
            with torch.no_grad():
                self.upsampling_version.fill_(version)
        self._legacy_upsampling = version == _LEGACY

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.ndim, self.in_channels)
        legacy = self._legacy_upsampling
        size = x.shape[2:]
        mode = "trilinear" if self.ndim == 3 else "bilinear"
        fmt = CL3 if _channels_last(x, self.ndim, self.channels_last) else torch.contiguous_format
        x = x.contiguous(memory_format=fmt)
        feats = self.encoder(x)
        h = feats[-1]
        outs = []
        if len(feats) - 1 in self.levels:
            outs.append(self.heads[str(len(feats) - 1)](h))
        for i in reversed(range(len(self.decoders))):
            skip = feats[i]
            up = self.ups[i](h)
            up = up[tuple([slice(None), slice(None)] + [slice(0, s) for s in skip.shape[2:]])]
            # additive upsampling (DeepReg): resize the coarse features and sum channel pairs; the resize
            # is linear per channel, so the pairs are summed first (half the channels to resize)
            add = h.reshape(h.shape[0], skip.shape[1], -1, *h.shape[2:]).sum(2)
            add = _upsample(add, 2, skip.shape[2:], mode, legacy)
            h = self.decoders[i]((up + add + skip).contiguous(memory_format=fmt))
            if i in self.levels:
                outs.append(self.heads[str(i)](h))
        # outs are ordered deepest level first: outs[k] is at level levels[-1 - k]
        ddf = torch.stack([_upsample(o, 2 ** lv, size, mode, legacy) if lv else o
                           for lv, o in zip(reversed(self.levels), outs, strict=True)]).mean(0)
        return ddf.contiguous()


def _upsample(x: torch.Tensor, factor: int, size: Sequence[int], mode: str, legacy: bool = False) -> torch.Tensor:
    """``x`` upsampled by the pooling ``factor`` (``align_corners=False``), cropped to ``size``: undoes the
    ceil-mode pooling, coarse cell ``j`` centred on fine voxel ``factor * j + (factor - 1) / 2``. (A resize to
    ``size`` stretched the grid whenever ``size`` is not ``factor`` times the coarse size: 3.6 voxels off at
    44 voxels, depth 3.) Where it is, the two give the same values: the scale is ``1 / factor`` either way.
    ``legacy``: that resize to ``size``, for networks loaded from checkpoints written before the fix."""
    if legacy:
        return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False) \
            if tuple(x.shape[2:]) != tuple(size) else x
    x = F.interpolate(x, scale_factor=factor, mode=mode, align_corners=False)
    if tuple(x.shape[2:]) != tuple(size):
        x = x[(slice(None), slice(None), *[slice(0, s) for s in size])]
    return x


class GlobalNet(nn.Module):
    """Affine registration network.

    Parameters
    ----------
    spatial_dims, in_channels, num_channel_initial, depth, channels_last
        As :class:`LocalNet` (encoder only).

    Shapes
    ------
    ``forward(x)``: ``(B, in_channels, *S)`` -> ``(theta, ddf)``: ``theta (B, ndim, ndim + 1)`` maps
    output (fixed) voxel coordinates to input (moving) voxel coordinates, and ``ddf (B, ndim, *S)``
    is ``theta @ [x; 1] - x`` in voxels. The affine is predicted in coordinates centred on the image
    and scaled by its half size, so the identity init and the learning rates are resolution-free.
    ``theta`` and ``ddf`` are float32 (float64 for a float64 network) under autocast too: the layers run
    in its low precision, the voxel affine and its displacement in float32 from the head's output.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 2, num_channel_initial: int = 16,
                 depth: int = 3, channels_last: bool | None = None) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        depth, channels_last, in_channels, num_channel_initial = _check_args(  # depth 0: one conv block, no pooling
            depth, 0, channels_last, in_channels, num_channel_initial)
        self.ndim, self.in_channels, self.channels_last = spatial_dims, in_channels, channels_last
        self.encoder = _Encoder(spatial_dims, in_channels, num_channel_initial, depth)
        n = spatial_dims * (spatial_dims + 1)
        self.head = nn.Linear(self.encoder.channels[-1], n)
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():
            self.head.bias.copy_(torch.eye(spatial_dims, spatial_dims + 1).reshape(-1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_input(x, self.ndim, self.in_channels)
        if _channels_last(x, self.ndim, self.channels_last):
            x = x.contiguous(memory_format=CL3)
        feat = self.encoder(x)[-1].flatten(2).mean(-1)
        centred = self.head(feat).reshape(-1, self.ndim, self.ndim + 1)
        theta = centred_to_voxel(centred, x.shape[2:])
        return theta, affine_ddf(theta, x.shape[2:])


def centred_to_voxel(centred: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Converts ``(B, n, n + 1)`` affines acting on centred, half-size-scaled coordinates
    ``y = (x - c) / h`` into affines acting on voxel coordinates ``x``: float32 (float64 for float64
    ``centred``; a network's float16/bfloat16 output is upcast first)."""
    n = len(shape)
    centred = centred.to(position_dtype(centred.dtype))
    c = torch.tensor([(s - 1) / 2 for s in shape], dtype=centred.dtype, device=centred.device)
    h = torch.tensor([max(s - 1, 1) / 2 for s in shape], dtype=centred.dtype, device=centred.device)
    A, t = centred[..., :n], centred[..., n]
    # x_in = h * (A (x - c) / h + t) + c  (A c as a sum, not a matmul: autocast would run it in bfloat16)
    Av = h[:, None] * A / h[None, :]
    tv = h * t + c - (Av * c).sum(-1)
    return torch.cat([Av, tv[..., None]], -1)


def affine_ddf(theta: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``theta @ [x; 1] - x`` on the voxel grid of ``shape``: ``(B, ndim, *shape)`` displacement, float32
    (float64 for a float64 ``theta``; a float16/bfloat16 one is upcast first)."""
    theta = theta.to(position_dtype(theta.dtype))
    n, b = len(shape), theta.shape[0]
    lin = theta[..., :n] - torch.eye(n, dtype=theta.dtype, device=theta.device)  # (B, n, n)
    # (theta - I) [x; 1] as a sum of separable terms, one per axis: one full-size pass, and no matmul, which
    # autocast (forward, or a backward run under it) would compute in float16/bfloat16 (|x| 2^-8 voxels off)
    out = theta[..., n].reshape(b, n, *[1] * n)
    for j, s in enumerate(shape):
        axis = torch.arange(s, dtype=theta.dtype, device=theta.device)
        view = [s if k == j else 1 for k in range(n)]
        out = out + (lin[..., j, None] * axis).reshape(b, n, *view)
    return out
