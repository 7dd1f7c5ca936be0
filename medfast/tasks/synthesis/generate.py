"""Frames from a trained synthesis checkpoint: ``medfast synthesize CHECKPOINT`` and :func:`generate`.

For each probe pose (a held-out sweep in pose mode, held-out random poses in image mode, or poses read from
a file) the generator makes a frame from the pose's condition (image-plane world coordinates, or the
anatomy of the checkpoint's volume in the plane); the simulator makes the reference frame. Written:
``generated/frame_###.png``, ``simulated/frame_###.png``, ``generated.nii.gz`` and ``simulated.nii.gz``
(stacks with the header of ``medfast simulate``'s ``frames.nii.gz``: pixel spacing in mm and the probe-frame
lateral and depth of the first pixel), ``grid.png`` (with matplotlib; an earlier run's is removed without it) and
``generate.json`` (metrics, poses).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medfast._jsonsafe import dumps as json_dumps

if TYPE_CHECKING:  # (imported inside the functions at run time: the task module is heavy)
    from medfast.tasks.synthesis.task import SynthesisTask

__all__ = ["PoseRangeWarning", "add_parser", "check_pose_range", "generate", "generate_frames", "load_generator",
           "poses_files", "predict_files", "read_poses"]


def load_generator(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[SynthesisTask, torch.nn.Module]:
    """``(task, model)`` of a synthesis checkpoint written by ``medfast train`` (model in eval mode)."""
    from medfast.tasks.synthesis.task import SynthesisTask
    from medfast.train.config import config_from_dict
    from medfast.train.trainer import load_checkpoint, load_model_state, resolve_device

    state = load_checkpoint(checkpoint)
    if state.get("task") != "synthesis":
        raise ValueError(f"{checkpoint} is a checkpoint of task {state.get('task')!r}, not 'synthesis'")
    config = config_from_dict(state["config"])
    task = SynthesisTask(config, refuse_unused=False)  # a setting training ignored is ignored here too
    with torch.random.fork_rng(devices=[]):  # the initialisation (replaced by the weights) leaves the caller's RNG
        model = task.build_model()
    load_model_state(model, state, checkpoint, config)
    dev = resolve_device(str(device), "--device")
    return task, model.to(dev).eval()


def read_poses(path: str | Path) -> torch.Tensor:
    """``(N, 4, 4)`` float64 poses (mm) from a file: :func:`medfast.ultrasound.read_poses`, the reader of ``medfast
    simulate --poses`` (``.npy`` / ``.npz``, JSON as ``simulate.json`` and ``generate.json`` record them, CSV / TXT,
    PLUS / IGSIO ``.mha``); each must be a finite rigid transform (a ValueError names the file and the pose
    otherwise), another suffix is refused as an unsupported pose file format."""
    from medfast.ultrasound.poses import read_poses as read_pose_file  # (lazy: the CLI builds its parser fast)

    return read_pose_file(path)


@torch.no_grad()
def generate_frames(task: SynthesisTask, model: torch.nn.Module, poses: torch.Tensor,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generated and simulated frames at ``poses`` with a loaded generator (see :func:`load_generator`).

    Parameters
    ----------
    task : SynthesisTask
    model : ConditionalGAN
    poses : Tensor
        ``(N, 4, 4)`` probe-to-world poses (mm) in the world of the task's volume.
    seed : int
        Seed of the generator's noise (pose mode).

    Returns
    -------
    (condition, generated, simulated) : tuple of Tensor
        ``(N, C, H, W)`` condition (anatomy or coordinates), ``(N, 1, H, W)`` generated and simulated frames in
        ``[0, 1]``, on the model's device.
    """
    if not isinstance(poses, torch.Tensor) or poses.dim() != 3 or poses.shape[1:] != (4, 4):
        raise ValueError(f"poses must be a (N, 4, 4) tensor, got {getattr(poses, 'shape', poses)}")
    dev = next(model.parameters()).device
    cond, real, noise = task.pairs(poses, [int(seed) * 1000 + k for k in range(poses.shape[0])], dev)
    fake = getattr(model, "module", model)(cond, None, noise, mode="generate").float()
    return cond, fake, real


#: how far (in condition coordinates: fractions of the fan's full height) a pose's image plane may reach beyond the
#: training sweeps' range before :func:`check_pose_range` warns: 5 % (the sampled range is a hair narrower than
#: the training distribution's, and a plane a few pixels beyond it is hardly new)
POSE_RANGE_MARGIN = 0.05


class PoseRangeWarning(UserWarning):
    """Pose mode: poses whose image planes reach outside the training sweeps' range (extrapolations)."""


def check_pose_range(task: SynthesisTask, model: torch.nn.Module, poses: torch.Tensor,
                     name: str = "the poses") -> float:
    """Pose mode: warns (:class:`PoseRangeWarning`, one line naming how far and along which world axis) when the
    image planes of ``poses`` reach outside the range of coordinates the generator was trained on by more than
    :data:`POSE_RANGE_MARGIN`: such frames are extrapolations. No check in image mode or for a checkpoint saved
    without the range (older ones). Returns the largest excess in mm (0 within the range or without a check)."""
    net = getattr(model, "module", model)
    known = net.known_range() if hasattr(net, "known_range") else None
    if task.args.mode != "pose" or known is None:
        return 0.0
    lo, hi = known.double()
    r = task.source.coord_range(poses)  # (N, 2, 3)
    excess = torch.maximum(lo - r[:, 0], r[:, 1] - hi).clamp_min(0)  # (N, 3) beyond the range, per axis
    outside = (excess > POSE_RANGE_MARGIN).any(1)
    if not bool(outside.any()):
        return 0.0
    scale, centre = task.source.coord_scale_mm, task.source.centre
    i, axis = divmod(int(excess.argmax()), 3)
    far = float(excess[i, axis]) * scale
    lo_mm, hi_mm = (float(v[axis]) * scale + float(centre[axis]) for v in (lo, hi))
    import warnings

    warnings.warn(f"{name}: {int(outside.sum())} of {len(poses)} poses reach outside the training sweeps' range, by "
                  f"up to {far:.1f} mm along world {'xyz'[axis]} (pose {i}; trained on {lo_mm:.1f} .. {hi_mm:.1f} mm): "
                  f"their frames are extrapolations of the generator", PoseRangeWarning, stacklevel=4)
    return far


def _png(frame: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.clip(frame * 255 + 0.5, 0, 255).astype(np.uint8)).save(path)


@torch.no_grad()
def generate(checkpoint: str | Path, out_dir: str | Path, *, frames: int = 16, seed: int = 0,
             poses: torch.Tensor | None = None, device: str = "auto") -> dict[str, Any]:
    """Generates frames with a synthesis checkpoint and writes them with their simulated references.

    Parameters
    ----------
    checkpoint : str or Path
        ``RUN/checkpoints/last.pt`` of a ``synthesis`` run.
    out_dir : str or Path
        Output folder.
    frames : int
        Frames to make when ``poses`` is not given: a sweep of ``frames`` poses (pose mode) or ``frames``
        random poses (image mode), drawn from ``seed`` (seeds >= 10**13 never occur in training).
    seed : int
        Seed of the poses drawn without ``poses`` and of the generator's noise (offset by 10**13: never a
        training seed).
    poses : Tensor, optional
        ``(N, 4, 4)`` probe-to-world poses (mm) in the world of the checkpoint's volume. Pose mode: poses whose
        image planes reach beyond the training sweeps' range warn (:func:`check_pose_range`).
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (``"auto"``: the GPU where medfast's CUDA kernels are
        usable, else the CPU).

    Returns
    -------
    dict
        What ``generate.json`` holds: mean PSNR/SSIM/L1, SWD, frame shape, pixel size, files, poses.
    """
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be an int >= 1, got {frames!r}")
    task, model = load_generator(checkpoint, device)
    return _generate(task, model, checkpoint, out_dir, frames=frames, seed=seed, poses=poses)


def _generate(task: SynthesisTask, model: torch.nn.Module, checkpoint: str | Path, out_dir: str | Path, *,
              frames: int, seed: int, poses: torch.Tensor | None, name: str = "the poses") -> dict[str, Any]:
    """:func:`generate` with the checkpoint's task and model loaded (:func:`load_generator`); ``name`` is the poses'
    name in a warning (:func:`check_pose_range`)."""
    from medfast._figures import figures_enabled
    from medfast.tasks.synthesis.metrics import psnr, save_grid, sliced_wasserstein, ssim
    from medfast.ultrasound.io import write_frame_stack

    base = 10**13 + int(seed)
    if poses is None:
        if task.args.mode == "pose":
            task.args.val_frames = frames
            task.args.sweep_frames = max(frames, task.args.sweep_frames)
            poses = task.validation_poses(base)
        else:
            poses = task.poses([base * 1000 + k for k in range(frames)])
    check_pose_range(task, model, poses, name)
    cond, fake, real = generate_frames(task, model, poses, seed=base)
    out = Path(out_dir)
    for sub in ("generated", "simulated"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for old in (out / sub).glob("frame_*.png"):  # an earlier run's frames would sit beside these
            old.unlink()
    px = task.source.pixel_mm
    x0, _, z0, _ = task.source.probe.image_extent_mm()  # the frames' first pixel (SynthesisSource.plane_points)
    g, r = fake[:, 0].cpu().numpy(), real[:, 0].cpu().numpy()
    for i in range(len(g)):
        _png(g[i], out / "generated" / f"frame_{i:03d}.png")
        _png(r[i], out / "simulated" / f"frame_{i:03d}.png")
    for name, arr in (("generated", g), ("simulated", r)):  # the header medfast simulate's frames.nii.gz has
        write_frame_stack(out / f"{name}.nii.gz", arr, px, (x0, z0))
    if figures_enabled("medfast synthesize"):  # matplotlib is optional: the frames are the results
        rows, ranges = task._grid_rows(cond, fake, real)
        save_grid(out / "grid.png", rows, ranges=ranges, max_columns=8)
    else:  # an earlier run's grid would pass for this run's
        (out / "grid.png").unlink(missing_ok=True)
    summary = {
        "checkpoint": str(checkpoint), "mode": task.args.mode, "source": task.args.source,
        "frames": len(g), "frame_shape": list(g.shape[1:]), "pixel_mm": px,
        "psnr": float(psnr(fake, real).clamp(max=100).mean()),
        "ssim": float(ssim(fake, real).mean()),
        "l1": float((fake - real).abs().mean()),
        "swd": float(sliced_wasserstein(fake, real, n_patches=task.args.swd_patches)) if len(g) > 1 else None,
        "poses": poses.tolist(),
    }
    (out / "generate.json").write_text(json_dumps(summary, indent=1))  # NaN as null
    return summary


#: the poses files a folder given to ``medfast predict`` contributes (a file named on its own may be in any format
#: :func:`read_poses` reads; a folder's ``.txt`` / ``.csv`` files are as likely notes or tables as poses)
POSES_SUFFIXES = (".json", ".npy")


def _poses_stem(path: Path) -> str:
    """A poses file's output folder name: its name less its pose-file suffix (``.json``, ``.npy``, ``.csv``, ...;
    not from the first dot)."""
    from medfast.ultrasound.poses import SUFFIXES

    return path.stem if any(path.suffix.lower() in suffixes for suffixes in SUFFIXES.values()) else path.name


def poses_files(inputs) -> list[Path]:
    """``inputs`` with every folder replaced by its poses files (``*.json``, ``*.npy`` in any case, not dot files;
    sorted by name), as ``medfast predict`` takes a folder of images for the other tasks. Raises
    FileNotFoundError for a missing input or a folder without poses files."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            # (dot files skipped, as every folder scan of the package: macOS's ._name.json companions are no JSON)
            found = sorted(p for p in path.iterdir()
                           if p.suffix.lower() in POSES_SUFFIXES and not p.name.startswith(".") and p.is_file())
            if not found:
                raise FileNotFoundError(f"no poses files ({', '.join('*' + s for s in POSES_SUFFIXES)}) in the "
                                        f"input folder {path}")
            files.extend(found)
        elif not path.is_file():
            raise FileNotFoundError(f"poses file not found: {path}")
        else:
            files.append(path)
    return files


def predict_files(checkpoint: str | Path, inputs, out_dir: str | Path, *, device: str = "auto", overrides=(),
                  save_probabilities: bool = False, progress: bool = False) -> list[Path]:
    """``medfast predict`` with a synthesis checkpoint: each input is a poses file (see :func:`read_poses`) or a
    folder of them (its ``*.json`` and ``*.npy`` files, see :func:`poses_files`); frames are generated at each
    file's poses into ``out_dir`` (one file in all) or ``out_dir/<file stem>`` (several), as :func:`generate`
    writes them. Every file is read and checked (rigid poses, at least one meeting the checkpoint's volume; an error
    names the file) before anything is written. ``overrides`` and
    ``save_probabilities`` do not apply (either raises: they would be ignored).

    Returns
    -------
    list of Path
        The ``generate.json`` written per poses file.
    """
    if overrides:
        raise ValueError("--set does not apply to synthesis checkpoints")
    if save_probabilities:
        raise ValueError("--probabilities does not apply to synthesis checkpoints (they generate frames, no class "
                         "probabilities)")
    inputs = poses_files(inputs)
    out_dir = Path(out_dir)
    # the name less its poses suffix only: sweep.1mm.npy and sweep.2mm.npy are two folders
    targets = [out_dir if len(inputs) == 1 else out_dir / _poses_stem(f) for f in inputs]
    seen: dict[Path, Path] = {}
    for f, target in zip(inputs, targets):  # before anything is written: one folder would take both
        if target in seen:
            raise ValueError(f"{seen[target]} and {f} would both write {target}: give inputs with different names")
        seen[target] = f
    poses = [read_poses(f) for f in inputs]  # a bad file is reported before any frame is written
    from medfast.ultrasound.simulate import check_meets_volume

    task, model = load_generator(checkpoint, device)  # once for all files
    src = task.source
    inv = np.linalg.inv(src.affine)
    for f, p in zip(inputs, poses):  # the simulator's own check, per file, before any frame is written
        try:
            check_meets_volume(p.double().numpy(), inv, src.vol.shape[-3:], src.probe)
        except ValueError as exc:
            raise ValueError(f"{f}: {exc}") from None
    written = []
    for f, p, target in zip(inputs, poses, targets):
        _generate(task, model, checkpoint, target, frames=len(p), seed=0, poses=p, name=str(f))
        written.append(target / "generate.json")
    return written


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``medfast synthesize`` subcommand to the CLI's subparsers."""
    p = sub.add_parser(
        "synthesize",
        help="generate ultrasound frames with a trained synthesis checkpoint",
        description=("Generates frames with a checkpoint of the synthesis task (medfast train synth.yaml) at probe "
                     "poses (a held-out sweep or held-out random poses of the checkpoint's volume, or --poses) and "
                     "writes PNG frames, NIfTI stacks, a grid of generated vs simulated frames and generate.json."),
    )
    p.add_argument("checkpoint", help="checkpoint of a synthesis run (e.g. RUN/checkpoints/last.pt)")
    p.add_argument("--out", default="medfast-synthesize", help="output folder (default: %(default)s)")
    p.add_argument("--frames", type=int, default=None,
                   help="frames to generate (default: 16; not with --poses: one frame per pose)")
    p.add_argument("--seed", type=int, default=0, help="seed of the poses (default: %(default)s)")
    p.add_argument("--poses", default=None, metavar="FILE",
                   help="probe-to-world poses (mm), read as medfast simulate --poses reads them: .npy/.npz, JSON "
                        "(a list of 4x4, or simulate.json / generate.json), CSV/TXT, or a PLUS/IGSIO sequence "
                        "(.mha/.mhd/.seq.mha)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import warnings

    try:
        with warnings.catch_warnings(record=True) as caught:  # skipped PLUS frames: one plain line, as simulate
            warnings.simplefilter("always")
            poses = read_poses(args.poses) if args.poses else None
        for w in caught:
            print(f"medfast synthesize: {w.message}", file=sys.stderr)
        if poses is not None and args.frames is not None:  # (it was silently ignored)
            raise ValueError("--frames does not apply with --poses: one frame is generated per pose")
        frames = 16 if args.frames is None else args.frames
        with warnings.catch_warnings(record=True) as caught:  # poses beyond the training range: one plain line
            warnings.simplefilter("always", PoseRangeWarning)
            s = generate(args.checkpoint, args.out, frames=frames, seed=args.seed, poses=poses, device=args.device)
        for w in caught:
            if issubclass(w.category, PoseRangeWarning):
                print(f"medfast synthesize: warning: {w.message}", file=sys.stderr)
            else:  # (any other warning as it would have shown)
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        from medfast.cli import command_error

        return command_error("synthesize", exc)  # a missing optional module: its extra, exit status 2
    print(f"medfast synthesize: {s['frames']} frames {s['frame_shape'][0]}x{s['frame_shape'][1]} ({s['mode']} mode): "
          f"PSNR {s['psnr']:.2f} dB, SSIM {s['ssim']:.3f} against the simulator -> {args.out}")
    return 0
