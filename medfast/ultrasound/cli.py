"""``medfast simulate``: B-mode frames along a freehand sweep over a CT (NIfTI or InVesalius .inv3), or along
tracked probe poses read from a file (``--poses``, see :func:`medfast.ultrasound.read_poses`).

Writes ``frames/frame_###.png``, ``frames.nii.gz`` (the stack: pixel spacing in mm and the probe-frame lateral and
depth of the first pixel in the header),
``figure.png`` (CT resampled in the image plane beside the simulated frame, several poses) and
``simulate.json`` (probe, poses, timings) to the output folder.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medfast._jsonsafe import dumps as json_dumps

DEFAULT_OUT = "medfast-simulate"
CRANIUM_START = (122.5, 38.0, 60.0)  # world mm: under the vertex of the packaged head CT, inside the skull


class SimulateError(RuntimeError):
    """An expected problem (missing data, bad sweep) reported without a traceback."""


# The optional modules the results need (frames/*.png: pillow; frames.nii.gz and NIfTI volumes: nibabel; the progress
# bar: tqdm), imported before any work: without nibabel or pillow the whole sweep was simulated (and the PNG frames
# written) before the missing module was named. (matplotlib is optional: figure.png is skipped without it.)
NEEDED_MODULES = ("nibabel", "PIL", "tqdm")


# The flags that shape the generated sweep: --poses replaces them all (frames in file order).
SWEEP_FLAGS = ("--start", "--centre", "--direction", "--lateral", "--travel", "--tilt", "--frames")
POSE_FLAGS = ("--pose-units", "--calibration", "--pose-transform", "--invert-poses")


class _SweepFlag(argparse.Action):
    """Stores the value; refuses it after --poses (argparse's mutually exclusive groups cannot say "--poses
    excludes each of these" without excluding them from one another)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, "poses", None) is not None:
            raise argparse.ArgumentError(self, "not allowed with argument --poses (the poses file sets the frames)")
        namespace.sweep_flags_given = [*getattr(namespace, "sweep_flags_given", []), option_string]
        setattr(namespace, self.dest, values)


class _PosesFlag(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, "sweep_flags_given", [])
        if given:
            raise argparse.ArgumentError(self, f"not allowed with argument{'s' if len(given) > 1 else ''} "
                                               f"{', '.join(dict.fromkeys(given))} (the poses file sets the frames)")
        setattr(namespace, self.dest, values)


def _vec3(text: str) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}") from None
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
    if not all(math.isfinite(v) for v in vals):  # argparse names the flag; later a NaN fails far from it
        raise argparse.ArgumentTypeError(f"expected three finite numbers, got {text!r}")
    return vals  # type: ignore[return-value]


def _pick_device(name: str) -> torch.device:
    from medfast._device import resolve_device

    return resolve_device(name, "--device", SimulateError)


def skin_entry(ct: np.ndarray, affine: np.ndarray, centre_world: np.ndarray, direction: np.ndarray,
               threshold: float = -300.0) -> np.ndarray:
    """First point along ``direction`` (from outside the volume through ``centre_world``) where the
    CT exceeds ``threshold`` HU, in world mm (nearest-voxel march, 0.5 mm steps)."""
    inv = np.linalg.inv(affine)
    d = direction / np.linalg.norm(direction)
    extent = np.linalg.norm(affine[:3, :3] @ np.array(ct.shape, dtype=float))
    for t in np.arange(-extent, extent, 0.5):
        p = centre_world + t * d
        ijk = np.rint(inv[:3, :3] @ p + inv[:3, 3]).astype(int)
        if np.all(ijk >= 0) and np.all(ijk < ct.shape) and ct[tuple(ijk)] > threshold:
            return p
    raise SimulateError("the sweep line never meets tissue (no voxel above -300 HU); give --start explicitly")


def plane_slice(ct: torch.Tensor, affine: np.ndarray, pose: torch.Tensor, probe, pixel_mm: float) -> torch.Tensor:
    """CT resampled (trilinear) on the pixels of the scan-converted image plane: ``(B, H, W)``."""
    (H, W), px = probe.image_shape(pixel_mm)
    x0, _, z0, _ = probe.image_extent_mm()
    z = z0 + torch.arange(H, dtype=torch.float64) * px
    x = x0 + torch.arange(W, dtype=torch.float64) * px
    zz, xx = torch.meshgrid(z, x, indexing="ij")
    pts = torch.stack([xx, torch.zeros_like(xx), zz, torch.ones_like(xx)], -1).reshape(-1, 4)
    M = torch.linalg.inv(torch.as_tensor(affine, dtype=torch.float64)) @ pose.double().cpu()
    vox = (pts @ M.transpose(1, 2))[..., :3]  # (B, H*W, 3)
    size = torch.tensor(ct.shape[-3:], dtype=torch.float64)
    grid = (vox.flip(-1) / (size.flip(0) - 1) * 2 - 1).reshape(pose.shape[0], 1, H, W, 3)
    vol = ct.detach().cpu().float().reshape(1, 1, *ct.shape[-3:]).expand(pose.shape[0], -1, -1, -1, -1)
    out = torch.nn.functional.grid_sample(vol, grid.float(), align_corners=True, padding_mode="border")
    return out[:, 0, 0]


def _file_poses(args: argparse.Namespace) -> torch.Tensor:
    """The poses of --poses, one line naming the file and the line / frame on a bad one."""
    import warnings

    from medfast.ultrasound import read_poses

    try:
        with warnings.catch_warnings(record=True) as caught:  # skipped PLUS frames: one plain line, not a warning
            warnings.simplefilter("always")
            poses = read_poses(args.poses, units=args.pose_units or "mm", calibration=args.calibration,
                               invert=bool(args.invert_poses), transform=args.pose_transform)
    except (ValueError, FileNotFoundError) as exc:
        flag = "--calibration" if args.calibration and str(args.calibration) in str(exc).split(":")[0] else "--poses"
        raise SimulateError(f"{flag}: {exc}") from None
    for w in caught:
        print(f"medfast simulate: {w.message}", file=sys.stderr)
    return poses


def run_simulate(args: argparse.Namespace) -> dict:
    for name in NEEDED_MODULES:  # a ModuleNotFoundError naming it: main reports the extra, exit status 2
        importlib.import_module(name)
    from medfast.ultrasound import Probe, hu_to_properties, simulate
    from medfast.ultrasound.io import INSTALL_HINT, INVESALIUS_CRANIUM, read_volume
    from medfast.ultrasound.simulate import check_meets_volume, sweep_checked

    _check_numbers(args)
    from medfast.train.files import OutputError, check_out_dir

    try:  # before the work: `--out a_file` would fail only when the frames are written
        out = check_out_dir(args.out, "--out")
    except OutputError as exc:
        raise SimulateError(str(exc)) from None
    path = Path(args.volume) if args.volume else INVESALIUS_CRANIUM
    if not path.is_file():
        hint = f"; {INSTALL_HINT}" if path == INVESALIUS_CRANIUM else ""
        raise SimulateError(f"volume {path} not found{hint}")
    try:
        vol, affine = read_volume(path)
    except Exception as exc:  # nibabel's ImageFileError, a 2D / 4D volume, a damaged file: name the file
        msg = str(exc).removeprefix(f"{path}: ")  # the readers' own messages start with it: name it once
        # (from exc: a reader that is not installed, e.g. nibabel, is named with its extra by main)
        raise SimulateError(f"cannot read the volume {path}: {msg}") from exc
    device = _pick_device(args.device)
    try:
        probe = Probe.preset(args.probe, n_lines=args.lines, n_samples=args.samples,
                             **({"depth_mm": args.depth} if args.depth is not None else {}))
    except ValueError as exc:
        raise SimulateError(str(exc)) from None

    if getattr(args, "poses", None) is not None:
        poses = _file_poses(args)
        args.frames = len(poses)
        where = f"read from --poses {args.poses}"
    else:
        poses = _sweep(args, vol, affine)
        where = "set by --start / --centre, --direction and --travel"

    # the whole sweep, once; each --batch chunk is simulated inside sweep_checked(): simulate() alone would refuse a
    # chunk all of whose poses miss the volume (the probe in the air before it touches the patient)
    try:
        check_meets_volume(poses.double().numpy(), np.linalg.inv(affine), vol.shape, probe)
    except ValueError as exc:
        raise SimulateError(f"{exc} ({where})") from None
    vol_shape = list(vol.shape)
    # no copy of a float32 volume (a scaled NIfTI), and none of a float64 one kept beside its float32 copy
    ct = torch.from_numpy(np.asarray(vol, dtype=np.float32))[None, None].to(device)
    del vol
    frames = []
    t0 = time.perf_counter()
    from tqdm import tqdm

    with torch.no_grad(), sweep_checked():
        props = hu_to_properties(ct)  # once, not per batch (simulate_ct would convert the whole CT each call)
        for i in tqdm(range(0, args.frames, args.batch), desc="simulating", unit="batch", file=sys.stderr):
            res = simulate(props, affine, poses[i:i + args.batch].float().to(device), probe, seed=args.seed,
                           gain_db=args.gain, dynamic_range_db=args.dynamic_range, pixel_mm=args.pixel)
            frames.append(res.bmode.cpu())
        del props
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    bmode = torch.cat(frames)[:, 0].numpy()  # (N, H, W)

    px = res.pixel_mm
    summary = {
        "volume": str(path),
        "volume_shape": vol_shape,
        "probe": args.probe,
        "n_lines": probe.n_lines,
        "n_samples": probe.n_samples,
        "depth_mm": probe.depth_mm,
        "frames": args.frames,
        "image_shape": list(bmode.shape[1:]),
        "pixel_mm": px,
        "device": str(device),
        "seconds": elapsed,
        "frames_per_second": args.frames / elapsed,
        "poses": poses.tolist(),
    }
    if getattr(args, "poses", None) is not None:
        summary.update(poses_file=str(args.poses), pose_units=args.pose_units or "mm",
                       calibration=None if args.calibration is None else str(args.calibration),
                       invert_poses=bool(args.invert_poses), pose_transform=args.pose_transform)
    try:
        _write_frames(out, bmode, px, res.extent_mm)
        _figure(ct, affine, poses, probe, bmode, px, out / "figure.png", n=min(4, args.frames))
        (out / "simulate.json").write_text(json_dumps(summary, indent=1))
    except OSError as exc:  # a full disk, no permission, a file where a folder goes: one line naming --out
        raise SimulateError(f"cannot write the results to --out {out}: {exc}") from None
    return summary


def _sweep(args: argparse.Namespace, vol: np.ndarray, affine: np.ndarray) -> torch.Tensor:
    """The generated freehand sweep of --start / --centre / --direction / --lateral / --travel / --tilt / --frames."""
    from medfast.ultrasound import freehand_sweep, look_at

    if args.start is not None and args.centre is not None:  # (--centre only places the start on the skin)
        raise SimulateError("give --start or --centre, not both: --centre places the first frame on the skin along "
                            "--direction, half the travel before it; --start places it directly")
    if args.centre is not None:
        centre = np.asarray(args.centre, dtype=float)
    else:
        centre = affine[:3, :3] @ ((np.array(vol.shape) - 1) / 2) + affine[:3, 3]
    direction = np.asarray(args.direction, dtype=float)
    if args.start is None and args.centre is None and args.volume is None:
        # Packaged head CT: an intraoperative view (probe on the brain surface after a craniotomy,
        # the commonest use of ultrasound inside the skull), sweeping front to back over the ventricles.
        args.start = CRANIUM_START
    if args.start is not None:
        start = np.asarray(args.start, dtype=float)
    else:
        # On the skin, half a voxel inside it: a probe in air (even 1 mm of it) reflects everything and images
        # nothing (the ray sees air up to the first tissue voxel, trilinear between the two)
        d = direction / np.linalg.norm(direction)
        half_voxel = 0.5 / np.linalg.norm(np.linalg.solve(affine[:3, :3], d))
        start = skin_entry(vol, affine, centre, direction) + half_voxel * d
        start = start - 0.5 * np.asarray(args.travel, dtype=float)
    pose0 = look_at(start, direction, args.lateral)
    return freehand_sweep(pose0, args.travel, args.frames, tilt_deg=args.tilt, rock_deg=args.tilt,
                          twist_deg=args.tilt * 0.75, seed=args.seed)


def _write_frames(out: Path, bmode: np.ndarray, px: float, extent_mm: tuple[float, float, float, float]) -> None:
    """``frames/frame_###.png`` (only this run's) and ``frames.nii.gz`` in ``out``: voxel (j, i, n) is pixel (row i,
    column j) of frame n, at x = lateral, y = depth (mm, the probe frame of ``SimulationResult.extent_mm``), z = n
    (:func:`medfast.ultrasound.io.write_frame_stack`, which ``medfast synthesize`` writes its stacks with)."""
    from PIL import Image

    from medfast.ultrasound.io import write_frame_stack

    (out / "frames").mkdir(parents=True, exist_ok=True)
    for old in (out / "frames").glob("frame_*.png"):  # an earlier run's extra frames would pass for this run's
        old.unlink()
    for i, f in enumerate(bmode):
        Image.fromarray(np.clip(f * 255 + 0.5, 0, 255).astype(np.uint8)).save(out / "frames" / f"frame_{i:03d}.png")
    write_frame_stack(out / "frames.nii.gz", bmode, px, (extent_mm[0], extent_mm[2]))


def _figure(ct, affine, poses, probe, bmode, px, path, n=4):
    from medfast._figures import figures_enabled, new_figure, save_figure

    if not figures_enabled("medfast simulate"):  # matplotlib is optional: the frames are the results
        path.unlink(missing_ok=True)  # an earlier run's figure would pass for this run's
        return
    idx = np.linspace(0, len(bmode) - 1, n).round().astype(int)
    sl = plane_slice(ct, affine, poses[idx], probe, px).numpy()
    H, W = bmode.shape[1:]
    x0, _, z0, _ = probe.image_extent_mm()
    ext = (x0, x0 + (W - 1) * px, z0 + (H - 1) * px, z0)
    fig = new_figure(figsize=(3.2 * n, 6.4))  # no pyplot: the caller's backend is left alone
    axes = fig.subplots(2, n, squeeze=False)
    for col, i in enumerate(idx):
        axes[0, col].imshow(sl[col], cmap="gray", vmin=-200, vmax=1200, extent=ext)
        axes[0, col].set_title(f"CT in image plane, frame {i}", fontsize=8)
        axes[1, col].imshow(bmode[i], cmap="gray", vmin=0, vmax=1, extent=ext)
        axes[1, col].set_title(f"simulated B-mode, frame {i}", fontsize=8)
        for r in range(2):
            axes[r, col].set_xlabel("lateral x (mm)", fontsize=7)
            axes[r, col].set_ylabel("depth z (mm)", fontsize=7)
            axes[r, col].tick_params(labelsize=6)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate ultrasound B-mode frames along a freehand sweep over a CT",
        description=(
            "Simulates B-mode ultrasound frames from a CT (NIfTI in HU, or an InVesalius .inv3; default: the "
            "packaged InVesalius head CT) along a smooth freehand sweep, or along tracked probe poses from a file "
            "(--poses), and writes PNG frames, a NIfTI stack, a CT-vs-ultrasound figure and simulate.json."
        ),
    )
    p.add_argument("volume", nargs="?", default=None, help="CT volume (.nii/.nii.gz in HU or .inv3)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    p.add_argument("--probe", default="C5-2v", help="probe preset: L11-5v, C5-2v, P4-2v (default: %(default)s)")
    p.add_argument("--lines", type=int, default=256, help="scanlines (default: %(default)s)")
    p.add_argument("--samples", type=int, default=1024, help="samples per line (default: %(default)s)")
    p.add_argument("--depth", type=float, default=None, help="imaging depth in mm (default: the preset's)")
    p.add_argument("--frames", type=int, default=16, action=_SweepFlag,
                   help="frames of the sweep (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="frames simulated per call (default: %(default)s)")
    p.add_argument("--start", type=_vec3, default=None, metavar="X,Y,Z", action=_SweepFlag,
                   help="world position (mm) of the first frame's array centre (default: on the skin, "
                        "half the travel before --centre; for the packaged head CT: inside the skull under the "
                        f"vertex, {CRANIUM_START})")
    p.add_argument("--centre", type=_vec3, default=None, metavar="X,Y,Z", action=_SweepFlag,
                   help="world point (mm) the middle frame's beam passes through; the probe is put on the skin "
                        "before it (default: the volume centre; not with --start)")
    p.add_argument("--direction", type=_vec3, default=(0.0, 1.0, 0.0), metavar="X,Y,Z", action=_SweepFlag,
                   help="beam direction in world (default: %(default)s)")
    p.add_argument("--lateral", type=_vec3, default=(1.0, 0.0, 0.0), metavar="X,Y,Z", action=_SweepFlag,
                   help="lateral (array) direction in world (default: %(default)s)")
    p.add_argument("--travel", type=_vec3, default=(0.0, 0.0, 30.0), metavar="DX,DY,DZ", action=_SweepFlag,
                   help="displacement of the probe over the sweep, mm (default: %(default)s)")
    p.add_argument("--tilt", type=float, default=4.0, action=_SweepFlag,
                   help="largest tilt/rock angle in degrees (default: 4)")
    g = p.add_argument_group(
        "tracked poses", "simulate along probe poses read from a file instead of the generated sweep (not with "
        f"{', '.join(SWEEP_FLAGS)}); see medfast.ultrasound.read_poses")
    g.add_argument("--poses", default=None, metavar="FILE", action=_PosesFlag,
                   help="probe-to-world poses, frames in file order: .npy/.npz (B, 4, 4), JSON (a list of 4x4, "
                        "or the poses simulate.json / generate.json record), CSV/TXT of 16 (or 12) numbers a row or "
                        "with x,y,z,qw,qx,qy,qz columns named in a header, or a PLUS/IGSIO sequence "
                        "(.mha/.mhd/.seq.mha, header only)")
    g.add_argument("--pose-units", choices=("mm", "cm", "m"), default=None,
                   help="units of the poses' translations (default: mm)")
    g.add_argument("--calibration", default=None, metavar="FILE",
                   help="rigid probe-to-sensor calibration (one 4x4 in mm, .npy/.txt/.csv), applied on the right: "
                        "pose = sensor_to_world @ calibration")
    g.add_argument("--pose-transform", default=None, metavar="NAME",
                   help="PLUS/IGSIO files: the transform to read, e.g. ProbeToTracker (default: ProbeToReference, "
                        "else ProbeToTracker, else the first *ToReference / *ToTracker)")
    g.add_argument("--invert-poses", action="store_true",
                   help="the file holds world-to-sensor transforms: invert each")
    p.add_argument("--gain", type=float, default=0.0, help="gain in dB (default: 0)")
    p.add_argument("--dynamic-range", type=float, default=60.0, help="dynamic range in dB (default: 60)")
    p.add_argument("--pixel", type=float, default=None, help="pixel size of the images in mm")
    p.add_argument("--seed", type=int, default=0, help="seed of the scatterers and of the sweep (default: 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.set_defaults(func=main)


def _check_numbers(args: argparse.Namespace) -> None:
    """The flags' ranges, before any work: a clear line instead of an error deep in the sweep."""
    for flag, value in (("--frames", args.frames), ("--batch", args.batch)):
        if value < 1:
            raise SimulateError(f"{flag} must be >= 1, got {value}")
    for flag, value, positive in (("--depth", args.depth, True), ("--pixel", args.pixel, True),
                                  ("--dynamic-range", args.dynamic_range, True), ("--gain", args.gain, False),
                                  ("--tilt", args.tilt, False)):
        if value is not None and not (math.isfinite(value) and (value > 0 or not positive)):
            raise SimulateError(f"{flag} must be a {'positive ' if positive else ''}finite number, got {value}")
    if getattr(args, "poses", None) is None:
        for flag in POSE_FLAGS:
            if getattr(args, flag[2:].replace("-", "_"), None) not in (None, False):
                raise SimulateError(f"{flag} needs --poses FILE")
    for flag, vec in (("--direction", args.direction), ("--lateral", args.lateral)):
        if not any(vec):
            raise SimulateError(f"{flag} must not be zero")


def main(args: argparse.Namespace) -> int:
    try:
        summary = run_simulate(args)
    except (ValueError, TypeError) as exc:  # the simulator's argument checks (e.g. --lateral along --direction)
        print(f"medfast simulate: error: {exc}", file=sys.stderr)
        return 1
    except (SimulateError, FileNotFoundError, ImportError) as exc:
        from medfast.cli import command_error

        return command_error("simulate", exc)  # a missing optional module: its extra, exit status 2
    print(
        f"medfast simulate: {summary['frames']} frames {summary['image_shape'][0]}x{summary['image_shape'][1]} "
        f"({summary['pixel_mm']:.3f} mm pixels) in {summary['seconds']:.2f} s on {summary['device']} "
        f"({summary['frames_per_second']:.1f} frames/s) -> {args.out}"
    )
    return 0
