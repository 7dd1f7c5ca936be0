"""The synthesis task for the generic trainer: ``config.task = "synthesis"`` trains a conditional GAN
(:class:`~medfast.nets.UNetGenerator` + :class:`~medfast.nets.PatchDiscriminator`, L1 + adversarial loss) on
pairs simulated on the fly (:mod:`medfast.tasks.synthesis.data`).

Two modes (``task_args.mode``):

* ``image`` (image-to-image, pix2pix style): anatomy in the image plane (CT slice, or one-hot tissue
  classes of a label map) -> the simulated B-mode frame, at random probe poses around a reference pose.
* ``pose`` (pose-conditioned, the spatially-conditioned GAN of Hu et al. 2017): the world coordinates of every
  pixel of the image plane (3 channels, with Fourier features, optionally plus noise) -> the frame, trained on
  simulated freehand sweeps over one volume; validated on held-out sweeps.

Every optimizer step runs two phases (:meth:`SynthesisTask.optimizer_groups`): the discriminator (LSGAN or
BCE loss on real and generated frames), then the generator (``lambda_l1 * L1 + lambda_adv * adversarial``).
Validation: PSNR, SSIM, L1 and a patch sliced-Wasserstein distance (SWD) between generated and simulated
frames. Settings: :class:`SynthesisArgs` (``task_args`` in the YAML) and ``model.channels`` /
``model.norm`` / ``model.convs_per_level`` for the generator's U-Net.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from medfast._figures import figures_enabled
from medfast._jsonsafe import dumps as json_dumps
from medfast.tasks.synthesis.data import SOURCES, SynthesisSource, load_source, random_pose, sweep_pose
from medfast.tasks.synthesis.metrics import psnr, save_grid, sliced_wasserstein, ssim
from medfast.train.config import Config, ConfigError, _build, unused_settings
from medfast.train.task import Task, register_task
from medfast.ultrasound.simulate import sweep_checked

__all__ = ["SynthesisArgs", "SynthesisTask", "build_gan", "parse_synthesis_args"]

VAL_SEED = 10**12  # validation seeds start here; training seeds (EpochSampler) stay below 2**62 but differ


@dataclass
class SynthesisArgs:
    """``task_args`` of the synthesis task (unknown keys and wrong types raise :class:`ConfigError`).

    Attributes
    ----------
    mode : {"image", "pose"}
        Image-to-image (anatomy -> frame) or pose-conditioned (pixel world coordinates + noise -> frame).
    source : str
        ``cranium`` (head CT), ``colin27`` or ``mni152`` (brain tissue label maps), or a CT file (HU).
    probe, n_lines, n_samples, depth_mm, image_rows, sub_rays
        Simulator settings: probe preset, scanlines, samples per line, imaging depth (default the
        preset's), rows of the scan-converted frames, elevation sub-rays.
    position, direction, lateral : list of 3 floats, optional
        Reference probe pose (world mm); default per source.
    speckle_seed : int
        Seed of the world-anchored scatterer field (fixed for a run).
    shift_mm, tilt_deg, twist_deg
        Image mode: poses drawn uniformly within these shifts (probe axes) and angles of the reference.
    travel_mm, sweep_frames, start_jitter_mm
        Pose mode: freehand sweeps of ``sweep_frames`` poses moving by ``travel_mm`` (default per source),
        starting within ``start_jitter_mm`` of the reference minus half the travel.
    noise_channels : int, optional
        Noise channels of the generator input (default 0; Hu et al. 2017 feed noise; see docs/synthesis.md for
        what it did in short CPU runs).
    coord_frequencies : int
        Pose mode: also give the generator ``sin`` and ``cos`` of ``2^k pi c`` for each coordinate ``c`` and
        ``k < coord_frequencies`` (Fourier features, Tancik et al. 2020: they let a network represent fine
        detail as a function of position; in the pose demo they raise the validation PSNR from 14.1 to 22.9 dB
        after 600 steps); 0: the 3 coordinates only.
    disc_channels, disc_layers, disc_norm
        PatchGAN discriminator width, strided layers (patch size) and normalization.
    gan_loss : {"lsgan", "bce"}
        Adversarial loss: least squares (Mao et al. 2017) or binary cross-entropy on the patch logits.
    lambda_l1, lambda_adv : float
        Generator loss weights (pix2pix: 100 and 1); ``lambda_adv = 0`` trains the generator with L1 only.
    samples_per_epoch : int
        Length of the (virtual) training set: every sample is a new pose drawn from its seed.
    val_sets, val_frames : int
        Validation: ``val_sets`` sets of ``val_frames`` frames (held-out poses or held-out sweeps).
    swd_patches : int
        Patches per level of the sliced-Wasserstein distance.
    """

    mode: str = "image"
    source: str = "cranium"
    probe: str = "C5-2v"
    n_lines: int = 96
    n_samples: int = 256
    depth_mm: float | None = None
    image_rows: int = 64
    sub_rays: int = 2
    position: list[float] | None = None
    direction: list[float] | None = None
    lateral: list[float] | None = None
    speckle_seed: int = 0
    shift_mm: list[float] = field(default_factory=lambda: [10.0, 5.0, 10.0])
    tilt_deg: float = 10.0
    twist_deg: float = 20.0
    travel_mm: list[float] | None = None
    sweep_frames: int = 32
    start_jitter_mm: float = 3.0
    noise_channels: int | None = None
    coord_frequencies: int = 4
    disc_channels: int = 32
    disc_layers: int = 3
    disc_norm: str = "instance"
    gan_loss: str = "lsgan"
    lambda_l1: float = 100.0
    lambda_adv: float = 1.0
    samples_per_epoch: int = 256
    val_sets: int = 2
    val_frames: int = 16
    swd_patches: int = 2048


def parse_synthesis_args(config: Config, *, refuse_unused: bool = True) -> SynthesisArgs:
    """``config.task_args`` as :class:`SynthesisArgs`, checked (raises :class:`ConfigError` naming the key).
    ``refuse_unused=False`` (a trained checkpoint's config): settings the run ignores are not refused, as training
    ignored them (a checkpoint trained before such a check was added must still generate)."""
    a = _build(SynthesisArgs, config.task_args or {}, "task_args")
    if refuse_unused:
        _refuse_unused_settings(config)
    for f in fields(SynthesisArgs):  # NaN passes every comparison below and would fail in the first step
        v = getattr(a, f.name)
        if any(isinstance(x, float) and not math.isfinite(x) for x in (v if isinstance(v, list) else [v])):
            raise ConfigError(f"task_args.{f.name} must be finite, got {v}")
    if not a.source.strip():  # (an empty path reached load_source as a ValueError traceback)
        raise ConfigError(f"task_args.source must be {', '.join(SOURCES)} or a CT file path, got {a.source!r}")
    if a.source not in SOURCES:
        # a file: absolute, so that the saved config (checkpoint, config.yaml) names the training volume
        # whatever the working directory of a later synthesize / predict
        a.source = os.path.abspath(os.path.expanduser(a.source))
        config.task_args["source"] = a.source
    if a.mode not in ("image", "pose"):
        raise ConfigError(f"task_args.mode must be 'image' or 'pose', got {a.mode!r}")
    if a.gan_loss not in ("lsgan", "bce"):
        raise ConfigError(f"task_args.gan_loss must be 'lsgan' or 'bce', got {a.gan_loss!r}")
    if a.disc_norm not in ("instance", "batch", "none"):
        raise ConfigError(f"task_args.disc_norm must be 'instance', 'batch' or 'none', got {a.disc_norm!r}")
    if refuse_unused:
        _refuse_unused_args(a)
    for name in ("position", "direction", "lateral", "shift_mm", "travel_mm"):
        v = getattr(a, name)
        if v is not None and len(v) != 3:
            raise ConfigError(f"task_args.{name} must have 3 values (x, y, z), got {v}")
    # checked here, before any run folder is written: the simulator refused the seed only in the first step
    if not 0 <= a.speckle_seed < 2**63:
        raise ConfigError(f"task_args.speckle_seed must be in 0 .. 2**63 - 1, got {a.speckle_seed}")
    # the reference pose's axes, as look_at checks them (with the source's default for the one not given)
    spec = SOURCES.get(a.source, {"direction": (0.0, 1.0, 0.0), "lateral": (1.0, 0.0, 0.0)})
    beam = np.asarray(a.direction if a.direction is not None else spec["direction"], dtype=np.float64)
    side = np.asarray(a.lateral if a.lateral is not None else spec["lateral"], dtype=np.float64)
    if np.linalg.norm(beam) < 1e-12:
        raise ConfigError(f"task_args.direction (the beam) must not be zero, got {a.direction}")
    beam = beam / np.linalg.norm(beam)
    if np.linalg.norm(side - (side @ beam) * beam) < 1e-9:
        raise ConfigError(f"task_args.lateral {side.tolist()} must not be zero or parallel to task_args.direction "
                          f"{beam.tolist()} (the beam)")
    for name in ("n_lines", "n_samples", "sub_rays", "sweep_frames", "disc_channels", "disc_layers",
                 "samples_per_epoch", "val_sets", "val_frames", "swd_patches"):
        if getattr(a, name) < 1:
            raise ConfigError(f"task_args.{name} must be >= 1, got {getattr(a, name)}")
    # drawn as range * U(-1, 1): a negative range acted as the positive one, and an angle past 180 degrees
    # wrapped around (a 400-degree tilt draws every orientation, not the stated range). Not for a trained
    # checkpoint's config (refuse_unused=False): one trained with such a range still generates, as it did
    for name in ("shift_mm", "tilt_deg", "twist_deg", "start_jitter_mm") if refuse_unused else ():
        v = getattr(a, name)
        if any(x < 0 for x in (v if isinstance(v, list) else [v])):
            raise ConfigError(f"task_args.{name} must be >= 0 (a range drawn on both sides), got {v}")
    for name in ("tilt_deg", "twist_deg") if refuse_unused else ():
        if getattr(a, name) > 180:
            raise ConfigError(f"task_args.{name} must be at most 180 (degrees, on both sides), got {getattr(a, name)}")
    if a.image_rows < 16:
        raise ConfigError(f"task_args.image_rows must be >= 16, got {a.image_rows}")
    if not 0 <= a.coord_frequencies <= 12:
        raise ConfigError(f"task_args.coord_frequencies must be in 0..12, got {a.coord_frequencies}")
    if a.noise_channels is not None and a.noise_channels < 0:
        raise ConfigError(f"task_args.noise_channels must be >= 0, got {a.noise_channels}")
    if a.lambda_l1 < 0 or a.lambda_adv < 0 or a.lambda_l1 + a.lambda_adv == 0:
        raise ConfigError(f"task_args.lambda_l1 and lambda_adv must be >= 0 and not both 0, got {a.lambda_l1}, "
                          f"{a.lambda_adv}")
    if a.mode == "pose" and a.val_frames > a.sweep_frames:
        raise ConfigError(f"task_args.val_frames ({a.val_frames}) must be <= sweep_frames ({a.sweep_frames}) in "
                          f"pose mode (a validation set is one held-out sweep)")
    return a


#: the settings of the shared sections the task reads (the trainer reads data.num_workers); any other one set to a
#: non-default value would be silently ignored, so it is refused (:func:`_refuse_unused_settings`)
_READ = {"data": {"num_workers"}, "model": {"name", "spatial_dims", "channels", "convs_per_level", "norm"},
         "loss": set(), "augment": set(), "inference": set()}
#: non-default values that state what the task does anyway: accepted
_HARMLESS = {"augment.enabled": False}
_HINTS = {"data": "its frames come from task_args.source",
          "model": "its networks from model.channels / convs_per_level / norm and task_args.disc_*, the channels "
                   "from task_args.mode",
          "loss": "its loss is task_args.lambda_l1 * L1 + lambda_adv * the adversarial loss (task_args.gan_loss)",
          "augment": "its frames are not augmented: the poses vary (task_args.shift_mm / tilt_deg / twist_deg, or "
                     "the sweeps' travel_mm / start_jitter_mm)",
          "inference": "whole frames are generated"}


def _refuse_unused_settings(config: Config) -> None:
    """A data, model, loss, augment or inference setting the task would ignore is an error naming it (not a
    silent no-op)."""
    unused = unused_settings(config, _READ, _HARMLESS)
    if unused:
        hints = "; ".join(_HINTS[s] for s in _HINTS if any(u.startswith(f"{s}.") for u in unused))
        raise ConfigError(f"the synthesis task does not use {', '.join(unused)}: remove "
                          f"{'it' if len(unused) == 1 else 'them'} ({hints})")


#: task_args that only one mode reads (the other would silently ignore them)
_MODE_ONLY = {"image": ("shift_mm", "tilt_deg", "twist_deg"),
              "pose": ("travel_mm", "sweep_frames", "start_jitter_mm", "coord_frequencies")}
#: task_args of the discriminator and its loss, which lambda_adv = 0 (L1 only) never runs
_ADVERSARIAL = ("gan_loss", "disc_channels", "disc_layers", "disc_norm")


def _refuse_unused_args(a: SynthesisArgs) -> None:
    """A ``task_args`` setting the chosen mode (or ``lambda_adv = 0``) never reads, given at another value than its
    default, is an error naming it and why, as the shared sections' unused settings are (it was silently
    ignored)."""
    default = SynthesisArgs()

    def changed(names: tuple[str, ...]) -> list[str]:
        return [f"task_args.{k}" for k in names if getattr(a, k) != getattr(default, k)]

    other = "pose" if a.mode == "image" else "image"
    unused = changed(_MODE_ONLY[other])
    if unused:
        raise ConfigError(f"{', '.join(unused)} {'applies' if len(unused) == 1 else 'apply'} to task_args.mode="
                          f"{other!r} only; task_args.mode={a.mode!r} does not read "
                          f"{'it' if len(unused) == 1 else 'them'}: remove {'it' if len(unused) == 1 else 'them'} "
                          f"(or set task_args.mode: {other})")
    unused = changed(_ADVERSARIAL) if a.lambda_adv == 0 else []
    if unused:
        raise ConfigError(f"task_args.lambda_adv=0 trains the generator with L1 only (the discriminator never runs): "
                          f"{', '.join(unused)} would be ignored; remove {'it' if len(unused) == 1 else 'them'} (or "
                          f"set task_args.lambda_adv > 0)")


def _noise_channels(a: SynthesisArgs) -> int:
    return a.noise_channels if a.noise_channels is not None else 0


def build_gan(config: Config, cond_channels: int, args: SynthesisArgs | None = None) -> nn.Module:
    """The :class:`~medfast.nets.ConditionalGAN` described by ``config.model`` (generator U-Net) and
    ``config.task_args`` (discriminator, noise; ``args``: already parsed), for conditions of ``cond_channels``
    channels."""
    from medfast.nets import ConditionalGAN, PatchDiscriminator, UNetGenerator

    a, m = args if args is not None else parse_synthesis_args(config), config.model
    if m.spatial_dims != 2:
        raise ConfigError(f"the synthesis task makes 2D frames: model.spatial_dims must be 2, got {m.spatial_dims}")
    if m.name.lower() != "unet":
        raise ConfigError(f"model.name={m.name!r}: the synthesis generator is a 'unet'")
    if a.mode == "pose" and m.norm in ("instance", "group"):
        raise ConfigError(f"task_args.mode='pose' needs model.norm 'batch' or 'none', got {m.norm!r}: {m.norm} "
                          "norm removes each frame's constant part of the coordinate map (the plane's offset), i.e. "
                          "the pose")
    gen = UNetGenerator(cond_channels, 1, m.channels, 2, m.convs_per_level, m.norm, _noise_channels(a))
    disc = PatchDiscriminator(cond_channels + 1, a.disc_channels, a.disc_layers, 2, a.disc_norm)
    # pose mode keeps the range of the training planes' coordinates with the weights (generate warns beyond it)
    return ConditionalGAN(gen, disc, range_channels=3 if a.mode == "pose" else 0)


class _Seeds(Dataset):
    """``n`` virtual samples: items carry only their seed (the pose is drawn from it in the training step)."""

    def __init__(self, n: int, name: str, base_seed: int | None = None) -> None:
        self.n, self.name, self.base_seed = n, name, base_seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        if self.base_seed is not None:  # fixed validation seeds
            seed = self.base_seed + int(i)
        return {"seed": int(seed if seed is not None else i), "files": f"{self.name} #{int(i)}"}


@register_task("synthesis")
class SynthesisTask(Task):
    """Conditional GAN synthesis of simulated ultrasound frames (see the module docstring)."""

    def __init__(self, config: Config, *, refuse_unused: bool = True) -> None:
        super().__init__(config)
        self.args = parse_synthesis_args(config, refuse_unused=refuse_unused)
        self._source: SynthesisSource | None = None
        # the simulated pairs of the last trainer.accumulate micro-batches (see _batch)
        self._cache: OrderedDict[Any, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._range_recorded = False  # pose mode: the model's cond_range widened to the training sweeps' (once)

    # -- data -------------------------------------------------------------------------------------
    @property
    def source(self) -> SynthesisSource:
        """The volume, probe and reference pose (loaded on first use)."""
        if self._source is None:
            from medfast.ultrasound import Probe

            a = self.args
            overrides: dict[str, Any] = {"n_lines": a.n_lines, "n_samples": a.n_samples}
            if a.depth_mm is not None:
                overrides["depth_mm"] = a.depth_mm
            try:
                probe = Probe.preset(a.probe, **overrides)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"task_args.probe / n_lines / n_samples / depth_mm: {exc}") from None
            try:
                self._source = load_source(a.source, probe=probe, image_rows=a.image_rows,
                                           speckle_seed=a.speckle_seed, position=a.position, direction=a.direction,
                                           lateral=a.lateral)
            except ValueError as exc:  # (a one-slice volume, no tissue surface to place the probe on, ...)
                raise ConfigError(f"task_args.source / position / direction / lateral ({a.source}): {exc}") from None
            self._source.sub_rays = a.sub_rays
        return self._source

    @property
    def cond_channels(self) -> int:
        """Channels of the generator's condition: anatomy channels (image mode) or 3 coordinates (pose)."""
        if self.args.mode == "pose":
            return 3 * (1 + 2 * self.args.coord_frequencies)
        kind = SOURCES.get(self.args.source, {"kind": "ct"})["kind"]
        return 2 if kind == "ct" else 4

    def travel(self) -> list[float]:
        return self.args.travel_mm or list(SOURCES.get(self.args.source, {}).get("travel", (0.0, 0.0, 30.0)))

    def poses(self, seeds: list[int]) -> torch.Tensor:
        """``(B, 4, 4)`` poses of training samples: one random pose (image mode) or one random frame of a
        random freehand sweep (pose mode) per seed."""
        a, ref = self.args, self.source.reference_pose
        if a.mode == "image":
            return torch.stack([random_pose(ref, s, shift_mm=a.shift_mm, tilt_deg=a.tilt_deg, twist_deg=a.twist_deg)
                                for s in seeds])
        out = []
        for s in seeds:
            frame = int(np.random.default_rng(int(s) % 2**63).integers(a.sweep_frames))
            out.append(sweep_pose(ref, s, travel_mm=self.travel(), frames=a.sweep_frames,
                                  start_jitter_mm=a.start_jitter_mm, frame=frame))
        return torch.stack(out)

    def validation_poses(self, seed: int) -> torch.Tensor:
        """``(val_frames, 4, 4)`` poses of one validation set: held-out random poses (image mode) or a
        held-out sweep, evenly subsampled to ``val_frames`` frames (pose mode)."""
        a = self.args
        if a.mode == "image":
            return self.poses([seed * 1000 + k for k in range(a.val_frames)])
        sweep = sweep_pose(self.source.reference_pose, seed, travel_mm=self.travel(), frames=a.sweep_frames,
                           start_jitter_mm=a.start_jitter_mm)
        idx = np.linspace(0, a.sweep_frames - 1, a.val_frames).round().astype(int)
        return sweep[idx]

    def training_coord_range(self, sweeps: int = 64) -> torch.Tensor:
        """Pose mode: ``(2, 3)`` float64, the lowest and highest value of each coordinate (as the condition's first 3
        channels hold them) over the image planes of every frame of ``sweeps`` training sweeps (seeds 0 ..
        sweeps - 1): the range the generator is trained on (the jitter and wobble are bounded, so more sweeps
        widen it by a small fraction only)."""
        a = self.args
        poses = torch.cat([sweep_pose(self.source.reference_pose, s, travel_mm=self.travel(), frames=a.sweep_frames,
                                      start_jitter_mm=a.start_jitter_mm) for s in range(sweeps)])
        r = self.source.coord_range(poses)
        return torch.stack([r[:, 0].amin(0), r[:, 1].amax(0)])

    def pairs(self, poses: torch.Tensor, seeds: list[int], device: torch.device):
        """``(condition, reference frame, noise or None)`` for ``poses``, noise seeded per sample."""
        fr = self.source.frames(poses, device)
        cond = fr.coords if self.args.mode == "pose" else fr.anatomy
        if self.args.mode == "pose" and self.args.coord_frequencies:
            scaled = [fr.coords * (math.pi * 2**k) for k in range(self.args.coord_frequencies)]
            cond = torch.cat([fr.coords] + [f(v) for v in scaled for f in (torch.sin, torch.cos)], 1)
        k = _noise_channels(self.args)
        noise = None
        if k:
            noise = torch.stack([torch.randn((k, *cond.shape[2:]), generator=torch.Generator().manual_seed(
                int(s) % 2**63 + 7)) for s in seeds]).to(device)
        return cond, fr.bmode, noise

    def _batch(self, batch: dict[str, Any], device: torch.device):
        seeds = [int(s) for s in batch["seed"]]
        key = (tuple(seeds), str(device))
        # the two phases of a step share the simulation: the trainer runs the discriminator phase over the step's
        # micro-batches 0..accumulate-1, then the generator phase over the same ones, so the cache keeps that many
        if key not in self._cache:
            # a batch whose poses all miss the volume gives blank frames, not simulate's error: check_pose_range
            # refused a range that misses it mostly, and an error here would recur at this step on every resume
            with sweep_checked():
                self._cache[key] = self.pairs(self.poses(seeds), seeds, device)
            while len(self._cache) > max(1, self.config.trainer.accumulate):
                self._cache.popitem(last=False)
        return self._cache[key]

    def build_model(self) -> nn.Module:
        return build_gan(self.config, self.cond_channels, self.args)

    def check_frame_size(self) -> None:
        """Raises :class:`ConfigError` naming the settings when the frames are smaller than the PatchGAN
        discriminator takes (it is not run when ``lambda_adv = 0``)."""
        from medfast.nets import PatchDiscriminator

        a, src = self.args, self.source
        need = PatchDiscriminator.min_size(a.disc_layers)
        if a.lambda_adv > 0 and min(src.height, src.width) < need:
            raise ConfigError(
                f"the frames are {src.height} x {src.width} pixels (rows: task_args.image_rows={a.image_rows}; "
                f"columns: the width of the task_args.probe {a.probe!r} image in pixels of {src.pixel_mm:.3g} mm, "
                f"the fan's full height (task_args.depth_mm, plus the arc's sagitta for a convex probe) / "
                f"(image_rows - 1)) but a PatchGAN with task_args.disc_layers="
                f"{a.disc_layers} needs at least {need} pixels per side: raise image_rows or lower disc_layers")

    def check_pose_range(self, n: int = 256) -> None:
        """Raises :class:`ConfigError` naming the pose settings when none, or more than half, of ``n`` training
        poses (fixed seeds) miss the volume: their frames would be blank (training simulates inside
        ``sweep_checked()``, so such poses do not stop a run)."""
        from medfast.ultrasound.simulate import _meets_volume

        a, src = self.args, self.source
        poses = self.poses(list(range(n)))
        inv = np.linalg.inv(src.affine)
        miss = int((~_meets_volume(poses.numpy(), inv, src.vol.shape[-3:], src.probe)).sum())
        if 2 * miss <= n:
            return
        keys = ("task_args.shift_mm / tilt_deg / twist_deg" if a.mode == "image" else
                "task_args.travel_mm / start_jitter_mm")
        corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * (
            np.array(src.vol.shape[-3:]) - 1)
        span = corners @ src.affine[:3, :3].T + src.affine[:3, 3]
        where = (f"the volume {src.name} spans world {np.round(span.min(0), 1).tolist()} to "
                 f"{np.round(span.max(0), 1).tolist()} mm; the reference probe position is "
                 f"{np.round(src.reference_pose[:3, 3].numpy(), 1).tolist()} mm")
        what = (f"none of {n} training poses drawn from the configured range meets the volume ({where}): every "
                f"frame would be blank" if miss == n else
                f"{miss} of {n} training poses drawn from the configured range miss the volume ({where}): more than "
                f"half the frames would be blank")
        raise ConfigError(f"{what}; check the reference pose (task_args.position / direction / lateral) and the range "
                          f"around it ({keys})")

    def build_datasets(self):
        a = self.args
        _ = self.source  # load (and check) the volume now, not in the first step
        self.check_frame_size()
        self.check_pose_range()
        train = _Seeds(a.samples_per_epoch, f"{a.source} {a.mode} sample")
        val = _Seeds(a.val_sets, f"{a.source} validation set", base_seed=VAL_SEED)
        return train, val

    # -- steps ------------------------------------------------------------------------------------
    def optimizer_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Discriminator first, then generator (the generator alone when ``lambda_adv = 0``)."""
        net = getattr(model, "module", model)
        groups = {"discriminator": list(net.discriminator.parameters())} if self.args.lambda_adv > 0 else {}
        groups["generator"] = list(net.generator.parameters())
        return groups

    def _gan_loss(self, logits: torch.Tensor, real: bool) -> torch.Tensor:
        logits = logits.float()
        target = torch.ones_like(logits) if real else torch.zeros_like(logits)
        if self.args.gan_loss == "lsgan":
            return F.mse_loss(logits, target)
        return F.binary_cross_entropy_with_logits(logits, target)

    def training_step(self, model, batch, device, phase: str = "generator"):
        cond, real, noise = self._batch(batch, device)
        net = getattr(model, "module", model)
        if not self._range_recorded and getattr(net, "range_channels", 0):
            # once per run (a resumed checkpoint's range is widened, never narrowed): saved with the weights
            net.extend_range(*self.training_coord_range())
            self._range_recorded = True
        if phase == "discriminator":
            d_real, d_fake = model(cond, real, noise, mode="discriminator")
            loss = 0.5 * (self._gan_loss(d_real, True) + self._gan_loss(d_fake, False))
            return loss, {"d_real": float(d_real.detach().float().mean()),
                          "d_fake": float(d_fake.detach().float().mean())}
        if phase != "generator":
            raise ValueError(f"phase must be 'discriminator' or 'generator', got {phase!r}")
        a = self.args
        if a.lambda_adv > 0:
            fake, d_fake = model(cond, None, noise, mode="generator")
            adv = self._gan_loss(d_fake, True)
        else:
            fake = model(cond, None, noise, mode="generate")
            adv = torch.zeros((), device=fake.device)
        l1 = (fake.float() - real.float()).abs().mean()
        loss = a.lambda_l1 * l1 + a.lambda_adv * adv
        return loss, {"l1": float(l1.detach()), "g_adv": float(adv.detach())}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, seed: int, device: torch.device) -> tuple[dict[str, float], tuple]:
        """Metrics of one validation set (``seed``) and its ``(condition, generated, reference)`` frames."""
        poses = self.validation_poses(seed)
        seeds = [seed * 1000 + k for k in range(poses.shape[0])]
        with sweep_checked():  # (as in training: a held-out set off the volume must not stop the run)
            cond, real, noise = self.pairs(poses, seeds, device)
        net = getattr(model, "module", model)
        fake = net(cond, None, noise, mode="generate").float()
        metrics = {
            "psnr": float(psnr(fake, real).clamp(max=100).mean()),
            "ssim": float(ssim(fake, real).mean()),
            "swd": float(sliced_wasserstein(fake, real, n_patches=self.args.swd_patches, seed=seed % 2**31)),
            "l1": float((fake - real).abs().mean()),
        }
        return metrics, (cond, fake, real)

    @torch.no_grad()
    def validation_step(self, model, batch, device):
        return [self.evaluate(model, int(s), device)[0] for s in batch["seed"]]

    def _grid_rows(self, cond: torch.Tensor, fake: torch.Tensor, real: torch.Tensor):
        if self.args.mode == "pose":  # the coordinate that varies most between the frames
            # population std: defined (0) for a single frame, where the sample std warns and gives NaN
            axis = int(cond[:, :3].float().mean(dim=(2, 3)).std(0, correction=0).argmax())
            first = (f"pose: world {'xyz'[axis]}", cond[:, axis:axis + 1])
            rng = (float(cond[:, axis].min()), float(cond[:, axis].max()))
        elif cond.shape[1] == 2:
            first = ("CT slice (brain window)", cond[:, 1:2])
            rng = (-1.0, 1.0)
        else:
            first = ("tissue classes", cond.argmax(1, keepdim=True).float())
            rng = (0.0, float(cond.shape[1] - 1))
        return [first, ("generated", fake), ("simulated", real)], [rng, (0.0, 1.0), (0.0, 1.0)]

    def save_samples(self, model, batch, device, path: Path) -> None:
        if not figures_enabled("medfast train"):  # (a one-line note, once) matplotlib is optional
            return
        _, (cond, fake, real) = self.evaluate(model, int(batch["seed"][0]), device)
        rows, ranges = self._grid_rows(cond, fake, real)
        save_grid(path, rows, ranges=ranges, max_columns=6)

    def finish(self, model, device, out_dir: Path) -> dict[str, Any]:
        """Final validation metrics, the SWD floor (simulated vs other simulated frames), the first and last
        validation rows of the run, and ``synthesis_grid.png``; written to ``synthesis_metrics.json``."""
        out_dir = Path(out_dir)
        a = self.args
        rows, first_sets = [], None
        for i in range(a.val_sets):
            metrics, frames = self.evaluate(model, VAL_SEED + i, device)
            rows.append(metrics)
            first_sets = first_sets or frames
        final = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        # the floor of the SWD: reference frames against simulated frames of other held-out poses
        other = self.validation_poses(VAL_SEED + a.val_sets + 17)
        with sweep_checked():
            _, real_other, _ = self.pairs(other, [0] * other.shape[0], device)
        floor = float(sliced_wasserstein(real_other.float(), first_sets[2].float(), n_patches=a.swd_patches,
                                         seed=VAL_SEED % 2**31))
        history = []
        log = out_dir / "val_log.jsonl"
        if log.is_file():
            history = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        result = {"mode": a.mode, "source": a.source, "final": final, "swd_between_simulated_sets": floor,
                  "first_validation": history[0] if history else None,
                  "last_validation": history[-1] if history else None,
                  "frame_shape": list(first_sets[2].shape[-2:]), "pixel_mm": self.source.pixel_mm}
        if self.config.trainer.plots and figures_enabled("medfast train"):
            rows_, ranges = self._grid_rows(*first_sets)
            save_grid(out_dir / "synthesis_grid.png", rows_, ranges=ranges, max_columns=8,
                      title=f"{a.source}, {a.mode} mode: PSNR {final['psnr']:.2f} dB, SSIM {final['ssim']:.3f}, "
                            f"SWD {final['swd']:.3f} (between simulated sets {floor:.3f})")
        (out_dir / "synthesis_metrics.json").write_text(json_dumps(result, indent=1))  # NaN as null
        return {"synthesis": result}

