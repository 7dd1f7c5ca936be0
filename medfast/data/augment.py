"""On-device augmentation with medfast ops: one :func:`medfast.affine_warp` call per batch applies a random
affine, a smooth random deformation (a velocity field integrated with :func:`medfast.integrate`) and the
patch crop together, to the image (linear) and identically to its labels (nearest); then random intensity
changes (gamma, scale/shift, bias field, noise) to the image only.

Randomness comes from one integer seed per sample (see :class:`medfast.train.distributed.EpochSampler`):
the same seed gives the same augmentation on any rank count or resume point, whatever
``torch.get_default_dtype()`` (every draw has an explicit dtype: float32, or float64 for the geometry, the image
keeps its dtype), and on any device up to the noise values (drawn by the device's own generator, whose stream
differs between CPU and CUDA).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from medfast.ops._validate import py_scalar

__all__ = ["AugmentConfig", "RandomAugment", "random_crop_theta"]


@dataclass
class AugmentConfig:
    """On-device augmentation (medfast ops): random affine + smooth deformation + intensity changes."""

    enabled: bool = True
    patch_size: list[int] | None = None
    rotation: float = 10.0
    scale: float = 0.1
    shear: float = 0.0
    translation: float = 0.0
    flip: list[int] = field(default_factory=list)
    deform_magnitude: float = 2.0
    deform_grid: int = 5
    integrate_steps: int = 5
    gamma: float = 0.2
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    noise_std: float = 0.02
    bias_field: float = 0.0


#: what the fields that are no +- range mean, for the error messages (see RandomAugment)
_MEANING = {
    "deform_magnitude": "a standard deviation, not a bound: of each axis component of the random velocity at the "
                        "control points, in patch voxels",
    "noise_std": "the largest noise standard deviation: each sample's is drawn in [0, that]",
    "bias_field": "the standard deviation of the log bias field",
}


def check_augment_config(a: AugmentConfig, error: type[ValueError] = ValueError) -> None:
    """Raises ``error`` (ValueError; the trainer's ConfigError) naming the first bad field of ``a``: the ranges
    must be finite and non-negative (a NaN rotation gave all-NaN patches), the scale factors ``1 +- s`` positive,
    the counts ints."""
    for key in ("rotation", "shear", "translation", "deform_magnitude", "gamma", "intensity_shift", "noise_std",
                "bias_field"):
        v = py_scalar(getattr(a, key))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
            raise error(f"augment.{key} must be >= 0 and finite ({_MEANING.get(key, 'a range: +- that much')}), "
                        f"got {v!r}")
    for key in ("scale", "intensity_scale"):  # factors 1 +- scale: 1 or more would allow zero or negative ones
        v = py_scalar(getattr(a, key))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise error(f"augment.{key} must lie in [0, 1) (factors 1 +- {key}), got {v!r}")
    for key in ("deform_grid", "integrate_steps"):
        v = py_scalar(getattr(a, key))
        if isinstance(v, bool) or not isinstance(v, int):
            raise error(f"augment.{key} must be an int, got {v!r}")
    if a.deform_grid != 0 and a.deform_grid < 2:
        raise error(f"augment.deform_grid must be 0 (no deformation) or >= 2 control points per axis, "
                    f"got {a.deform_grid}")
    if not 0 <= a.integrate_steps <= 64:  # medfast.integrate's limit (scaling and squaring: 2**steps)
        raise error(f"augment.integrate_steps must lie in [0, 64], got {a.integrate_steps}")
    if a.patch_size is not None:
        _positive_ints("augment.patch_size", a.patch_size, error)


def _positive_ints(name: str, value: object, error: type[ValueError] = ValueError) -> list[int]:
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 1:
        value = value.tolist()  # (a float array stays floats: refused below)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise error(f"{name} must be a sequence of positive ints, got {value!r}")
    out = [py_scalar(v) for v in value]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in out):
        raise error(f"{name} must be a sequence of positive ints, got {list(value)}")
    return out


def _rotation(angles: torch.Tensor, ndim: int) -> torch.Tensor:
    if ndim == 2:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    out = torch.eye(3, dtype=torch.float64)
    for axis, a in enumerate(angles.tolist()):
        i, j = [k for k in range(3) if k != axis]
        r = torch.eye(3, dtype=torch.float64)
        r[i, i], r[i, j], r[j, i], r[j, j] = math.cos(a), -math.sin(a), math.sin(a), math.cos(a)
        out = r @ out
    return out


def random_crop_theta(in_shape: Sequence[int], out_shape: Sequence[int], g: torch.Generator,
                      matrix: torch.Tensor | None = None, translation: float = 0.0) -> torch.Tensor:
    """``(ndim, ndim + 1)`` float64 map from output (patch) voxel coordinates to input voxel coordinates:
    ``x_in = centre + matrix @ (x_out - (P - 1) / 2)``, the centre drawn uniformly where the patch fits
    (whole-voxel crop offsets; along axes shorter than the patch, zero-padded as crop_or_pad pads), plus a uniform
    shift of up to ``translation`` voxels."""
    if len(in_shape) != len(out_shape):
        raise ValueError(f"in_shape and out_shape must have one entry per spatial axis each, got {list(in_shape)} "
                         f"and {list(out_shape)}")
    nd = len(out_shape)
    centre = torch.empty(nd, dtype=torch.float64)
    for i, (s, p) in enumerate(zip(in_shape, out_shape)):
        # a patch longer than the volume: crop_or_pad's whole-voxel offset, not (s - p) / 2, whose half voxel (odd
        # p - s) made a disabled augment interpolate the image between voxels while the label snapped to one
        start = int(torch.randint(0, s - p + 1, (), generator=g)) if s > p else -((p - s) // 2)
        centre[i] = start + (p - 1) / 2
    if translation:
        centre += (torch.rand(nd, generator=g, dtype=torch.float64) * 2 - 1) * translation
    m = torch.eye(nd, dtype=torch.float64) if matrix is None else matrix
    c_out = torch.tensor([(p - 1) / 2 for p in out_shape], dtype=torch.float64)
    return torch.cat([m, (centre - m @ c_out)[:, None]], dim=1)


def _warp_labels(label: torch.Tensor, theta: torch.Tensor, out_shape: Sequence[int], ddf: torch.Tensor | None,
                 pos: torch.dtype) -> torch.Tensor:
    """Nearest warp of ``(B, *S)`` labels with the image's positions, values exact: float32 holds integers up to
    2^24 only (mouse-atlas structure ids pass it), so int32 / int64 labels beyond it travel as two channels, the
    high bits and the low 16 bits (exact up to 2^40, whatever the positions' dtype), recombined after."""
    from medfast.ops import affine_warp

    wide = label.dtype in (torch.int32, torch.int64) and pos == torch.float32
    if wide:  # one read per batch: FreeSurfer's or an atlas's ids (< 2^24) keep the one-channel warp (2.8x faster)
        lo, hi = torch.aminmax(label)
        wide = bool(lo < -2**24) or bool(hi > 2**24)
    x = label.long() if wide else label
    x = torch.stack((x >> 16, x & 0xFFFF), 1) if wide else x[:, None]
    out = affine_warp(x.to(pos).contiguous(), theta, shape=list(out_shape), ddf=ddf, mode="nearest",
                      padding="zeros").round().long()
    out = out[:, 0] * 65536 + out[:, 1] if wide else out[:, 0]
    return out.to(label.dtype)


class RandomAugment:
    """Random patch + affine + smooth deformation + intensity changes, on the tensors' device.

    Parameters
    ----------
    config : AugmentConfig
        Ranges: ``rotation`` (degrees, each axis, uniform in +-), ``scale`` (relative, +-), ``shear``
        (+-), ``translation`` (voxels), ``flip`` (axes flipped with probability 1/2), ``deform_magnitude``
        (output-patch voxels: the standard deviation of EACH axis component, not of the vector's length, of a
        random velocity field: independent normal values at a grid of ``deform_grid`` control points per axis
        spanning the patch corner to corner, interpolated linearly between them, so smaller there: half at the
        centre of a 2D cell. The displacement is the field's flow at time 1, integrated by ``integrate_steps``
        squarings (0: the velocity itself), and a little smaller: per axis at the control points about 0.95 x
        ``deform_magnitude`` for 0.5 voxels and 0.83 x for 2 in 2D, 0.93 x and 0.79 x in 3D, control points 8
        voxels apart. A std, not a bound: about a third of the velocity's components exceed it (of the
        displacement's, 29 % at 0.5 voxels, 21 % at 2). The deformation is applied before the affine, so the
        whole transform is diffeomorphic with ``integrate_steps >= 1`` and a magnitude well below the control
        points' spacing (a few voxels of the patch's outer layer can fold, where the field is clamped); in the
        input image the displacement turns and scales with the affine), ``deform_grid`` (control points per
        axis), ``integrate_steps``, ``gamma`` (log-gamma range),
        ``intensity_scale``/``intensity_shift`` (+-), ``noise_std`` (max std), ``bias_field`` (std of the log
        bias field). ``enabled=False`` keeps only the random patch crop. The affine acts on voxel indices: with
        anisotropic voxels a rotation is not a rigid rotation in mm. Checked here (ValueError naming the field).
    geometric_only : bool
        Skip the intensity changes (e.g. to build validation deformations).
    """

    def __init__(self, config: AugmentConfig, geometric_only: bool = False) -> None:
        check_augment_config(config)
        self.cfg = config
        self.geometric_only = geometric_only

    def _sample_geometry(self, g: torch.Generator, nd: int) -> torch.Tensor:
        cfg = self.cfg
        if not cfg.enabled:
            return torch.eye(nd, dtype=torch.float64)

        def u(n: int) -> torch.Tensor:
            return torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1

        angles = u(1 if nd == 2 else 3) * math.radians(cfg.rotation)
        scales = 1 + u(nd) * cfg.scale
        shear = torch.eye(nd, dtype=torch.float64)
        if cfg.shear:
            off = u(nd * nd).view(nd, nd) * cfg.shear
            shear = shear + off * (1 - torch.eye(nd, dtype=torch.float64))
        flips = torch.ones(nd, dtype=torch.float64)
        draws = torch.rand(nd, generator=g, dtype=torch.float32)
        for axis in cfg.flip:
            axis = py_scalar(axis)
            if isinstance(axis, bool) or not isinstance(axis, int) or not 0 <= axis < nd:
                raise ValueError(f"augment.flip must list spatial axes in [0, {nd}) of a {nd}-d image, got "
                                 f"{list(cfg.flip)}")
            if draws[axis] < 0.5:
                flips[axis] = -1
        return _rotation(angles, nd) @ torch.diag(scales * flips) @ shear

    def __call__(self, image: torch.Tensor, label: torch.Tensor | None, seeds: Sequence[int],
                 patch_size: Sequence[int] | None = None, shapes: Sequence[Sequence[int]] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augments a batch.

        Parameters
        ----------
        image : Tensor
            ``(B, C, *S)`` float32 on the training device.
        label : Tensor, optional
            ``(B, *S)`` integer labels on the same device.
        seeds : sequence of int
            One seed per sample.
        patch_size : sequence of int, optional
            Output spatial shape (random crop); default ``S`` (``config.patch_size`` is not read here: the
            training task passes it, its validation deformations keep whole volumes).
        shapes : sequence of sequences of int, optional
            Each sample's own spatial shape in a batch of volumes zero-padded at the end of each axis to ``S``
            (:func:`medfast.data.collate`'s ``"spatial_shape"``): its patch is drawn within it, as if it were alone
            in its batch (else over the padding too: a small subject's patches could hold none of its voxels).

        Returns
        -------
        (Tensor, Tensor or None)
            ``(B, C, *P)`` image and ``(B, *P)`` labels (same dtype as given; an integer image comes back
            float32).
        """
        from medfast.ops import affine_warp, integrate

        cfg = self.cfg
        if not isinstance(image, torch.Tensor) or image.dim() not in (4, 5):
            raise ValueError(f"image must be a (B, C, *S) tensor with 2 or 3 spatial axes, got "
                             f"{getattr(image, 'shape', type(image).__name__)}")
        nd = image.dim() - 2
        batch = image.shape[0]
        if label is not None and (label.dim() != nd + 1 or label.shape[0] != batch
                                  or tuple(label.shape[1:]) != tuple(image.shape[2:])):
            raise ValueError(f"label must be (B, *S) = {(batch, *image.shape[2:])} on the image's grid, got "
                             f"{tuple(label.shape)}")
        if len(seeds) != batch:
            raise ValueError(f"seeds must have one entry per sample ({batch}), got {len(seeds)}")
        seeds = [py_scalar(v) for v in seeds]
        if any(isinstance(v, bool) or not isinstance(v, int) for v in seeds):
            raise ValueError(f"seeds must be ints, got {list(seeds)}")
        in_shape = list(image.shape[2:])
        out_shape = _positive_ints("patch_size", patch_size) if patch_size is not None else in_shape
        if len(out_shape) != nd:
            raise ValueError(f"patch_size must have {nd} entries, got {list(out_shape)}")
        if shapes is None:
            shapes = [in_shape] * batch
        elif len(shapes) != batch or any(
                len(_positive_ints("shapes", sh)) != nd or any(a > b for a, b in zip(sh, in_shape)) for sh in shapes):
            raise ValueError(f"shapes must give each of the {batch} samples' spatial shape, at most {in_shape}, "
                             f"got {[list(sh) for sh in shapes]}")
        gens = [torch.Generator().manual_seed(v) for v in seeds]
        thetas, vels = [], []
        deform = cfg.enabled and cfg.deform_magnitude > 0 and cfg.deform_grid >= 2
        for g, shape in zip(gens, shapes):
            # (the padding is at the end of each axis: the sample's voxel indices are the padded tensor's)
            thetas.append(random_crop_theta([int(v) for v in shape], out_shape, g, self._sample_geometry(g, nd),
                                            cfg.translation if cfg.enabled else 0.0))
            if deform:
                vels.append(torch.randn(nd, *([cfg.deform_grid] * nd), generator=g, dtype=torch.float32)
                            * cfg.deform_magnitude)
        dev = image.device
        img_in = image if image.dtype in (torch.float32, torch.float64) else image.float()
        pos = torch.float64 if img_in.dtype == torch.float64 else torch.float32  # warp's position dtype
        theta = torch.stack(thetas).to(device=dev, dtype=pos)
        ddf = None
        if deform:
            v = torch.stack(vels).to(dev)
            v = F.interpolate(v, size=out_shape, mode="trilinear" if nd == 3 else "bilinear", align_corners=True)
            # x_in = A (x + u(x)) + t: the deformation x + u (the flow of the velocity field) before the affine, so
            # the composition is a diffeomorphism. (As affine_warp's ddf, u itself was added after the affine,
            # x_in = A x + t + u(x): under a flip or a large rotation that folded, 0.8 % of voxels with a flip.)
            u = integrate(v.to(pos).contiguous(), cfg.integrate_steps)
            ddf = torch.einsum("bij,bj...->bi...", theta[:, :, :nd], u).contiguous()
        out = affine_warp(img_in.contiguous(), theta, shape=out_shape, ddf=ddf, mode="linear", padding="zeros")
        lab = None
        if label is not None:
            lab = _warp_labels(label, theta, out_shape, ddf, pos)
        if cfg.enabled and not self.geometric_only:
            out = self._intensity(out, gens)
        if image.is_floating_point():  # a half / bfloat16 image was warped in float32
            out = out.to(image.dtype)
        return out, lab

    def _intensity(self, x: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        cfg = self.cfg
        nd = x.dim() - 2
        outs = []
        for b, g in enumerate(gens):
            xb = x[b]
            c = xb.shape[0]

            def u(n: int, gen: torch.Generator = g) -> torch.Tensor:
                return torch.rand(n, generator=gen, dtype=torch.float32) * 2 - 1

            gamma, scale, shift = u(c) * cfg.gamma, 1 + u(c) * cfg.intensity_scale, u(c) * cfg.intensity_shift
            noise_std = torch.rand(1, generator=g, dtype=torch.float32) * cfg.noise_std
            noise_seed = int(torch.randint(0, 2**62, (1,), generator=g))
            bias = (torch.randn(1, 1, *([4] * nd), generator=g, dtype=torch.float32) * cfg.bias_field
                    if cfg.bias_field else None)
            dev, dtype = xb.device, xb.dtype
            shape = [c] + [1] * nd
            if cfg.gamma:
                lo = xb.flatten(1).min(1).values.view(shape)
                hi = xb.flatten(1).max(1).values.view(shape)
                span = (hi - lo).clamp_min(1e-6)
                xb = ((xb - lo) / span).clamp_min(0).pow(gamma.exp().to(dev, dtype).view(shape)) * span + lo
            xb = xb * scale.to(dev, dtype).view(shape) + shift.to(dev, dtype).view(shape)
            if bias is not None:
                field = F.interpolate(bias.to(dev), size=list(xb.shape[1:]),
                                      mode="trilinear" if nd == 3 else "bilinear", align_corners=True)[0]
                xb = xb * field.exp().to(dtype)
            if cfg.noise_std:
                gd = torch.Generator(device=dev).manual_seed(noise_seed)
                # drawn in float32 whatever the image's dtype (float64 draws another stream), as the other draws
                noise = torch.randn(xb.shape, generator=gd, device=dev, dtype=torch.float32).to(xb.dtype)
                xb = xb + noise * noise_std.item()
            outs.append(xb)
        return torch.stack(outs)
