"""Conditional GAN networks for image synthesis: a PatchGAN discriminator and a generator/discriminator
pair (:class:`ConditionalGAN`) whose ``forward`` does one training phase in one call (DDP-friendly)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from medfast.nets.unet import UNet
from medfast.ops._validate import check_bool

__all__ = ["ConditionalGAN", "PatchDiscriminator", "UNetGenerator"]


def _norm(kind: str, nd: int, channels: int) -> nn.Module:
    if kind == "instance":
        return (nn.InstanceNorm3d if nd == 3 else nn.InstanceNorm2d)(channels, affine=True)
    if kind == "batch":
        return (nn.BatchNorm3d if nd == 3 else nn.BatchNorm2d)(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of instance, batch, none; got {kind!r}")


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017, "Image-to-image translation with conditional adversarial
    networks"): a fully convolutional stack that outputs one real/fake logit per overlapping input patch.

    Layers: ``conv(4, stride 2) -> LeakyReLU(0.2)``, then ``n_layers - 1`` blocks ``conv(4, stride 2) -> norm
    -> LeakyReLU(0.2)`` doubling the width (capped at ``8 * channels``), one ``conv(4, stride 1) -> norm ->
    LeakyReLU``, and a final ``conv(4, stride 1)`` to one channel. With ``n_layers = 3`` each logit sees a
    70 x 70 pixel patch (the pix2pix default); ``n_layers = 2`` gives 34 x 34 and ``1`` gives 16 x 16.

    Parameters
    ----------
    in_channels : int
        Channels of the input: for a conditional GAN the condition and the image, concatenated.
    channels : int
        Width of the first layer (64 in pix2pix).
    n_layers : int
        Strided layers (>= 1); sets the patch size (see above).
    spatial_dims : {2, 3}
    norm : {"instance", "batch", "none"}

    Shapes
    ------
    ``(B, in_channels, *S)`` -> ``(B, 1, *S')`` logits, ``S' ~ S / 2 ** n_layers - 2`` (inputs must be at
    least ``2 ** n_layers * 3`` pixels per side).
    """

    def __init__(self, in_channels: int, channels: int = 64, n_layers: int = 3, spatial_dims: int = 2,
                 norm: str = "instance") -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        for name, value, low in (("in_channels", in_channels, 1), ("channels", channels, 1), ("n_layers", n_layers, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        _norm(norm, spatial_dims, 1)  # validates the name
        nd = spatial_dims
        conv = nn.Conv3d if nd == 3 else nn.Conv2d
        use_bias = norm == "none"
        layers: list[nn.Module] = [conv(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        cin = channels
        for i in range(1, n_layers + 1):
            cout = channels * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [conv(cin, cout, 4, stride=stride, padding=1, bias=use_bias), _norm(norm, nd, cout),
                       nn.LeakyReLU(0.2, True)]
            cin = cout
        layers.append(conv(cin, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.spatial_dims, self.in_channels, self.n_layers = nd, in_channels, n_layers
        for m in self.modules():  # pix2pix initialisation: N(0, 0.02)
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @staticmethod
    def min_size(n_layers: int) -> int:
        """The smallest input side (pixels) ``n_layers`` strided layers take: ``3 * 2 ** n_layers``."""
        return 3 * 2**n_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, *S) with {self.spatial_dims} spatial dims, got "
                             f"{tuple(x.shape)}")
        need = self.min_size(self.n_layers)
        if min(x.shape[2:]) < need:
            raise ValueError(f"x is {tuple(x.shape[2:])}; a PatchDiscriminator with n_layers={self.n_layers} "
                             f"needs at least {need} pixels per side")
        return self.net(x)


class UNetGenerator(nn.Module):
    """Image generator: a :class:`~medfast.nets.UNet` (``in_channels + noise_channels`` -> ``out_channels``)
    followed by a sigmoid, so that images lie in ``[0, 1]`` like simulated B-mode frames.

    ``noise_channels`` channels of standard normal noise are concatenated to the condition (the noise
    input of a conditional GAN); pass ``noise`` to fix it, else it is drawn from the global generator.

    Shapes
    ------
    ``(B, in_channels, *S)`` -> ``(B, out_channels, *S)`` in ``[0, 1]``.
    """

    def __init__(self, in_channels: int, out_channels: int = 1, channels: Sequence[int] = (16, 32, 64, 128),
                 spatial_dims: int = 2, convs_per_level: int = 2, norm: str = "instance",
                 noise_channels: int = 0) -> None:
        super().__init__()
        if not isinstance(noise_channels, int) or noise_channels < 0:
            raise ValueError(f"noise_channels must be an int >= 0, got {noise_channels!r}")
        self.in_channels, self.noise_channels = in_channels, noise_channels
        self.unet = UNet(spatial_dims, in_channels + noise_channels, out_channels, channels, convs_per_level, norm)

    def forward(self, cond: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if cond.dim() < 3 or cond.shape[1] != self.in_channels:
            raise ValueError(f"cond must be (B, {self.in_channels}, *S), got {tuple(cond.shape)}")
        if self.noise_channels:
            shape = (cond.shape[0], self.noise_channels, *cond.shape[2:])
            if noise is None:
                noise = torch.randn(shape, device=cond.device, dtype=cond.dtype)
            elif tuple(noise.shape) != shape:
                raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
            cond = torch.cat([cond, noise.to(cond)], 1)
        return torch.sigmoid(self.unet(cond))


@contextmanager
def _frozen_batch_norm(module: nn.Module):
    """Batch norm layers of ``module`` normalize with batch statistics as in train mode but leave their running
    statistics (and ``num_batches_tracked``) as they were: ``track_running_stats`` off for the block (the
    layers then pass no running buffers to ``F.batch_norm``)."""
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
              and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


class ConditionalGAN(nn.Module):
    """A generator ``G(cond[, noise]) -> image`` and a discriminator ``D(cat(cond, image)) -> logits``.

    ``forward`` runs one phase of a GAN training step in ONE call (so that DDP sees one forward per
    backward):

    * ``mode="generate"``: ``G(cond, noise)``.
    * ``mode="discriminator"``: ``(D(cond, real), D(cond, G(cond, noise)))`` with the generator run without
      gradients (its output detached).
    * ``mode="generator"``: ``(fake, D(cond, fake))`` with ``fake = G(cond, noise)`` differentiable.

    Parameters
    ----------
    generator : nn.Module
        Called as ``generator(cond, noise)``.
    discriminator : nn.Module
        Takes the condition and the image concatenated on the channels.
    conditional_discriminator : bool
        False: the discriminator sees the image only (then its ``in_channels`` is the image's).
    range_channels : int
        ``k > 0``: keep a buffer ``cond_range`` ``(2, k)``, the lowest and highest value of the first ``k``
        condition channels the generator was trained on (widened by :meth:`extend_range`; saved with the
        weights, so a checkpoint records it). ``+inf`` / ``-inf`` (:meth:`known_range` None) until set, and
        for a state dict saved without it (it loads, with the range unknown).

    Notes
    -----
    In ``mode="discriminator"`` the generator runs in train mode (batch statistics, as in the generator phase)
    but its batch-norm running statistics are left as they were: the generator phase of the same step
    updates them once (they were updated twice per step).

    Shapes: with a :class:`UNetGenerator` and a :class:`PatchDiscriminator`, ``cond`` ``(B, C_cond, *S)`` and
    ``real`` ``(B, C_img, *S)`` give ``(B, C_img, *S)`` images (``"generate"``), two ``(B, 1, *S')`` logit
    maps (``"discriminator"``), and the image with its ``(B, 1, *S')`` logits (``"generator"``).
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module, conditional_discriminator: bool = True,
                 range_channels: int = 0) -> None:
        super().__init__()
        self.generator, self.discriminator = generator, discriminator
        self.conditional_discriminator = check_bool("conditional_discriminator", conditional_discriminator)
        if not isinstance(range_channels, int) or isinstance(range_channels, bool) or range_channels < 0:
            raise ValueError(f"range_channels must be an int >= 0, got {range_channels!r}")
        self.range_channels = range_channels
        if range_channels:
            self.register_buffer("cond_range", self._unknown_range())

    def _unknown_range(self) -> torch.Tensor:
        k = self.range_channels
        return torch.stack([torch.full((k,), float("inf")), torch.full((k,), float("-inf"))])

    @torch.no_grad()
    def extend_range(self, low: torch.Tensor, high: torch.Tensor) -> None:
        """Widens ``cond_range`` to take in ``low`` and ``high`` (``(range_channels,)`` each)."""
        if not self.range_channels:
            raise ValueError("extend_range needs a ConditionalGAN built with range_channels > 0")
        r = self.cond_range
        r[0] = torch.minimum(r[0], low.to(r))
        r[1] = torch.maximum(r[1], high.to(r))

    def known_range(self) -> torch.Tensor | None:
        """``cond_range`` ``(2, range_channels)`` on the CPU, or None when it is unknown (never set)."""
        if not self.range_channels:
            return None
        r = self.cond_range.detach().cpu()
        return r if bool(torch.isfinite(r).all()) else None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "cond_range"
        saved = key in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.range_channels and not saved:  # saved before the range was kept: unknown, not a load error
            if key in missing_keys:
                missing_keys.remove(key)
            if self.cond_range.is_meta:  # (assign=True into a meta module: a real buffer, as the load reports)
                self._buffers["cond_range"] = self._unknown_range()
            else:
                with torch.no_grad():
                    self.cond_range.copy_(self._unknown_range())

    def discriminate(self, cond: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.discriminator(torch.cat([cond, image], 1) if self.conditional_discriminator else image)

    def forward(self, cond: torch.Tensor, real: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                mode: str = "generate"):
        if mode == "generate":
            return self.generator(cond, noise)
        if mode == "discriminator":
            if real is None:
                raise ValueError("mode='discriminator' needs the real images")
            with torch.no_grad(), _frozen_batch_norm(self.generator):
                fake = self.generator(cond, noise)
            return self.discriminate(cond, real), self.discriminate(cond, fake.detach())
        if mode == "generator":
            fake = self.generator(cond, noise)
            return fake, self.discriminate(cond, fake)
        raise ValueError(f"mode must be 'generate', 'discriminator' or 'generator', got {mode!r}")
