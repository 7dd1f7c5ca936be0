"""The warp demo behind ``medfast demo``: real data in, NIfTI + PNG + timings out.

Warps the MNI152 2009a T1 template (it ships inside the nilearn wheel, so nothing is downloaded)
by a random smooth diffeomorphic deformation, saves the results with the template's affine and
header, draws a figure, and times :func:`medfast.warp` against the ``F.grid_sample`` route.
"""

from __future__ import annotations

import importlib
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medfast._extension import build_info
from medfast._jsonsafe import dumps as json_dumps
from medfast.ops import integrate, warp
from medfast.ops._reference import grid_sample_warp

DEFAULT_OUT = "out/demo"
DEFAULT_MAGNITUDE = 6.0
DEFAULT_REPEATS = 3
MNI_T1_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"

# The two outputs are the same trilinear interpolation; only float32 rounding of the sampling
# position differs (grid_sample goes through a normalized grid), which stays far below this.
AGREEMENT_TOL = 1e-4


class DemoError(RuntimeError):
    """A problem with the demo's setup or inputs (reported without a traceback by the CLI)."""


def _require(module: str, pip_name: str | None = None) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"the medfast demo needs {module}: `pip install {pip_name or module}` "
            f"(or `pip install 'medfast[demo]'` for all demo dependencies)"
        ) from exc


def mni_template_path() -> Path:
    """Path of the MNI152 2009a symmetric T1 template inside the installed nilearn package.

    Returns
    -------
    Path
        ``<nilearn>/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz`` (197x233x189,
        1 mm). Found through the installed package, never downloaded.

    Raises
    ------
    ModuleNotFoundError
        nilearn is not installed (``pip install nilearn``); its ``name`` is ``"nilearn"``, so that
        ``medfast demo`` reports it as every command reports a missing optional module.
    DemoError
        This nilearn version does not ship the file.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        # name="nilearn": the command line's missing-module line and exit status 2 (a plain ImportError was exit 1)
        raise ModuleNotFoundError(
            "the medfast demo uses the MNI152 T1 template that ships inside the nilearn wheel: "
            "`pip install nilearn` (or pass image_path= / --image with your own NIfTI)",
            name="nilearn",
        )
    path = Path(spec.origin).parent / "datasets" / "data" / MNI_T1_FILE
    if not path.is_file():
        raise DemoError(
            f"the installed nilearn ({Path(spec.origin).parent}) does not contain {MNI_T1_FILE}; "
            f"install a recent nilearn or pass image_path= / --image"
        )
    return path


def load_volume(path: str | Path) -> tuple[torch.Tensor, Any, tuple[float, float]]:
    """Loads a 3D NIfTI as a ``(1, 1, D, H, W)`` float32 tensor with intensities in [0, 1].

    Parameters
    ----------
    path : str or Path
        Any NIfTI readable by nibabel, of real voxels (RGB and complex ones raise :class:`DemoError` naming
        the file); a trailing singleton 4th dimension is dropped.

    Returns
    -------
    image : Tensor
        ``(1, 1, D, H, W)`` float32 on CPU, in the array's own axis order (no reorientation), so
        the file's affine still maps its voxel indices to mm.
    nifti : nibabel image
        The loaded image (its affine and header are reused for the outputs).
    intensity_range : (float, float)
        ``(min, max)`` of the original intensities, to write outputs in the original units.
    """
    _require("nibabel")
    path = Path(path)
    if not path.is_file():
        raise DemoError(f"no such image: {path}")
    from medfast.data.io import nifti_header

    nifti = nifti_header(path, DemoError)  # (a mixed-case suffix too: nib.load would look for another name)
    from medfast.data.io import unsupported_voxels

    problem = unsupported_voxels(nifti.get_data_dtype())  # RGB: numpy's error; complex: the real part, silently
    if problem:
        raise DemoError(f"{path} {problem}")
    shape = nifti.shape
    if len(shape) == 4 and shape[3] == 1:
        nifti = nifti.slicer[..., 0]
    elif len(shape) != 3:
        raise DemoError(f"{path} must be a 3D volume, got shape {shape}")
    data = np.nan_to_num(nifti.get_fdata(dtype=np.float32))
    lo, hi = float(data.min()), float(data.max())
    scale = hi - lo if hi > lo else 1.0
    image = torch.from_numpy(np.ascontiguousarray((data - lo) / scale, dtype=np.float32))
    return image[None, None], nifti, (lo, hi)


def _max_norm(field: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(field, dim=1).max())


def random_deformation(
    shape: tuple[int, int, int],
    magnitude: float = DEFAULT_MAGNITUDE,
    *,
    seed: int = 0,
    control: int = 6,
    steps: int = 7,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """A random smooth diffeomorphic displacement field.

    A random stationary velocity field on a ``control**3`` grid is upsampled trilinearly to
    ``shape``, scaled, and integrated by scaling and squaring (:func:`medfast.integrate`).

    Parameters
    ----------
    shape : (int, int, int)
        Spatial shape ``(D, H, W)`` of the field.
    magnitude : float
        Target largest displacement length, in voxels (matched to about 1%).
    seed : int
        Seed of the velocity (drawn on CPU, so the field is the same on every device).
    control : int
        Control points per axis: fewer gives smoother, larger-scale deformations.
    steps : int
        Scaling-and-squaring steps.
    device : str or torch.device
        Where to build the field.

    Returns
    -------
    Tensor
        ``(1, 3, D, H, W)`` float32 displacement in voxels; channel ``i`` moves along axis ``i``.
    """
    if not magnitude > 0:
        raise ValueError(f"magnitude must be > 0, got {magnitude}")
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, control, control, control, generator=gen)
    velocity = F.interpolate(coarse.to(device), size=tuple(shape), mode="trilinear", align_corners=True)
    velocity = velocity * (magnitude / _max_norm(velocity))
    ddf = integrate(velocity, steps)
    # Integration is nonlinear in the velocity, so rescale and integrate again until the largest
    # displacement is within 1% of the target (one correction for gentle fields like the default).
    for _ in range(4):
        ratio = magnitude / _max_norm(ddf)
        if abs(ratio - 1.0) < 0.01:
            break
        velocity = velocity * ratio
        ddf = integrate(velocity, steps)
    return ddf


def _to_mm(ddf: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
    """(B, 3, *S) voxel displacement -> the same displacement in world mm (linear part of the affine)."""
    linear = torch.as_tensor(np.asarray(affine)[:3, :3], dtype=ddf.dtype, device=ddf.device)
    return torch.einsum("ki,bi...->bk...", linear, ddf)


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """Determinant of the Jacobian of ``x -> x + ddf(x)`` (central differences).

    Parameters
    ----------
    ddf : Tensor
        ``(B, 3, D, H, W)`` displacement in voxels.

    Returns
    -------
    Tensor
        ``(B, D, H, W)``; values <= 0 mark folding. The affine to mm cancels out, so voxel units are
        fine.
    """
    g = [torch.gradient(ddf[:, i], dim=(1, 2, 3)) for i in range(3)]
    j = [[g[r][c] + 1.0 if r == c else g[r][c] for c in range(3)] for r in range(3)]
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up: allocator, thread pool, CUDA context and lazy initialization
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak CUDA memory allocated by ``fn`` beyond what was already allocated, in MiB."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def benchmark_warp(image: torch.Tensor, ddf: torch.Tensor, repeats: int, seed: int = 0) -> dict:
    """Times linear ``medfast.warp`` against the grid_sample route and checks they agree.

    Parameters
    ----------
    image : Tensor
        ``(1, C, D, H, W)`` float32.
    ddf : Tensor
        ``(1, 3, D, H, W)`` float32 displacement in voxels, on the image's device.
    repeats : int
        Timed runs per measurement (after one warm-up); the median is reported.
    seed : int
        Seed of the random upstream gradient used for the backward pass.

    Returns
    -------
    dict
        Median seconds of ``forward`` (no grad) and ``forward_backward`` (image and ddf requiring
        grad) for both routes with speed-ups, max abs differences of the outputs and gradients,
        and peak memory in MiB on CUDA (``None`` on CPU).
    """
    device = image.device
    routes: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "medfast": lambda im, d: warp(im, d, mode="linear", padding="zeros"),
        "grid_sample": lambda im, d: grid_sample_warp(im, d, "linear", "zeros"),
    }
    image_g = image.detach().clone().requires_grad_(True)
    ddf_g = ddf.detach().clone().requires_grad_(True)
    # A random upstream gradient: ones would make the image gradient a plain sum of weights.
    grad_out = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed)).to(device)

    def forward(route):
        with torch.no_grad():
            return route(image, ddf)

    def forward_backward(route):
        return torch.autograd.grad(route(image_g, ddf_g), (image_g, ddf_g), grad_out)

    out = {name: forward(route) for name, route in routes.items()}
    grads = {name: forward_backward(route) for name, route in routes.items()}
    ddf_ref = grads["grid_sample"][1]
    ddf_diff = grads["medfast"][1] - ddf_ref
    result: dict[str, Any] = {
        "repeats": repeats,
        "max_abs_diff": float((out["medfast"] - out["grid_sample"]).abs().max()),
        "grad_image_max_abs_diff": float((grads["medfast"][0] - grads["grid_sample"][0]).abs().max()),
        # The ddf gradient of linear interpolation jumps where a sample lands on an integer
        # coordinate; there, float32 rounding of the two routes picks different sides for a handful
        # of voxels, so the max is O(jump) while the relative L2 difference stays tiny.
        "grad_ddf_max_abs_diff": float(ddf_diff.abs().max()),
        "grad_ddf_rel_l2_diff": float(ddf_diff.norm() / ddf_ref.norm().clamp_min(1e-30)),
    }
    del out, grads
    for kind, fn in (("forward", forward), ("forward_backward", forward_backward)):
        seconds = {name: _median_seconds(partial(fn, r), repeats, device) for name, r in routes.items()}
        result[kind] = {
            "medfast_s": seconds["medfast"],
            "grid_sample_s": seconds["grid_sample"],
            "speedup": seconds["grid_sample"] / seconds["medfast"],
        }
    result["peak_memory_mib"] = None
    if device.type == "cuda":
        result["peak_memory_mib"] = {
            kind: {name: _peak_mib(partial(fn, route), device) for name, route in routes.items()}
            for kind, fn in (("forward", forward), ("forward_backward", forward_backward))
        }
    return result


def format_timings(bench: dict) -> str:
    """The timing table printed by the demo."""
    lines = [f"{'':<18}{'medfast':>12}{'grid_sample':>14}{'speed-up':>10}"]
    for kind, label in (("forward", "forward"), ("forward_backward", "forward+backward")):
        t = bench[kind]
        ms = (t["medfast_s"] * 1e3, t["grid_sample_s"] * 1e3)
        lines.append(f"{label:<18}{ms[0]:>9.1f} ms{ms[1]:>11.1f} ms{t['speedup']:>9.2f}x")
    if bench["peak_memory_mib"]:
        for kind, label in (("forward", "peak mem fwd"), ("forward_backward", "peak mem fwd+bwd")):
            m = bench["peak_memory_mib"][kind]
            lines.append(f"{label:<18}{m['medfast']:>8.0f} MiB{m['grid_sample']:>10.0f} MiB")
    lines.append(
        f"max |medfast - grid_sample| = {bench['max_abs_diff']:.2e} (output), "
        f"{bench['grad_image_max_abs_diff']:.2e} (image grad), "
        f"{bench['grad_ddf_rel_l2_diff']:.2e} (ddf grad, relative L2)"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def _like(nifti: Any, data: np.ndarray, description: str) -> Any:
    """A float32 NIfTI with the affine and header of ``nifti`` (dims and dtype updated)."""
    nib = _require("nibabel")
    header = nifti.header.copy() if isinstance(nifti.header, nib.Nifti1Header) else None
    out = nib.Nifti1Image(np.asarray(data, dtype=np.float32), nifti.affine, header)
    out.header.set_data_dtype(np.float32)
    # The source may be integer-coded with a scale factor; these values are stored unscaled.
    out.header.set_slope_inter(None, None)
    out.header["descrip"] = description[:79].encode()
    return out


def _save_ddf(nifti: Any, ddf: np.ndarray, path: Path) -> None:
    """Saves a ``(3, D, H, W)`` voxel displacement as a 5D ``(D, H, W, 1, 3)`` NIfTI vector image."""
    data = np.moveaxis(ddf, 0, -1)[:, :, :, None, :]
    img = _like(nifti, data, "medfast ddf (i,j,k,1,3): voxels, component c along array axis c")
    # intent "vector", not "displacement vector": ITK reads the latter as an LPS displacement in mm, and these are
    # voxels along the array axes (medfast register's ddf.nii.gz is the ITK-convention one)
    img.header.set_intent("vector", name="ddf_voxels")
    img.header["cal_min"] = img.header["cal_max"] = 0.0  # the input's display window is not one for voxel shifts
    img.to_filename(path)


def _orient(nifti_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """nibabel orientation to the closest RAS array order, and the voxel sizes in that order."""
    nib = _require("nibabel")
    ornt = nib.orientations.io_orientation(nifti_affine)
    zooms = np.empty(3)
    zooms[ornt[:, 0].astype(int)] = nib.affines.voxel_sizes(nifti_affine)
    return ornt, zooms


def plot_warp_demo(
    original: np.ndarray,
    warped: np.ndarray,
    ddf: np.ndarray,
    affine: np.ndarray,
    path: str | Path,
    title: str = "",
) -> None:
    """Draws original, warped, difference and displacement on three orthogonal mid slices.

    Parameters
    ----------
    original, warped : ndarray
        ``(D, H, W)`` intensities in [0, 1] on the grid of ``affine``.
    ddf : ndarray
        ``(3, D, H, W)`` displacement in voxels (component ``i`` along array axis ``i``).
    affine : ndarray
        ``(4, 4)`` voxel-to-mm affine; slices are shown in the closest RAS orientation, in mm.
    path : str or Path
        PNG to write (Agg, no display needed).
    title : str
        Figure title.
    """
    _require("matplotlib")
    nib = _require("nibabel")
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    from medfast._figures import save_figure

    # World (mm) displacement, so arrows and the colorbar are in mm whatever the voxel size.
    disp_mm = np.einsum("ki,i...->k...", affine[:3, :3], ddf)
    ornt, zooms = _orient(affine)
    canon = lambda a: nib.orientations.apply_orientation(a, ornt)  # noqa: E731
    orig_c, warp_c = canon(original), canon(warped)
    disp_c = np.stack([canon(c) for c in disp_mm])  # world x, y, z ~ canonical axes 0, 1, 2
    diff_c = warp_c - orig_c
    mag_c = np.linalg.norm(disp_c, axis=0)
    centre = [n // 2 for n in orig_c.shape]

    # (name, slicing axis, in-plane axes (horizontal, vertical)) in RAS array order.
    views = (("axial", 2, (0, 1)), ("coronal", 1, (0, 2)), ("sagittal", 0, (1, 2)))
    diff_lim = float(np.percentile(np.abs(diff_c), 99.9)) or 1e-6
    mag_max = float(mag_c.max()) or 1e-6
    step = max(max(orig_c.shape) // 18, 2)
    arrow_gain = 1.5 * step * float(zooms.max()) / mag_max  # longest arrow ~ 1.5 arrow spacings

    fig = Figure(figsize=(15, 11), layout="constrained")
    axes = fig.subplots(3, 4)
    images = {}
    for row, (name, axis, (h, v)) in enumerate(views):

        def cut(vol, axis=axis):
            # h < v in every view: transposing puts rows along the vertical axis v, as imshow wants.
            return np.take(vol, centre[axis], axis=axis).T

        extent = (0, orig_c.shape[h] * zooms[h], 0, orig_c.shape[v] * zooms[v])
        panels = (
            ("original", cut(orig_c), {"cmap": "gray", "vmin": 0, "vmax": 1}),
            ("warped (linear)", cut(warp_c), {"cmap": "gray", "vmin": 0, "vmax": 1}),
            ("warped - original", cut(diff_c), {"cmap": "RdBu_r", "vmin": -diff_lim, "vmax": diff_lim}),
            ("|displacement|", cut(mag_c), {"cmap": "magma", "vmin": 0, "vmax": mag_max}),
        )
        for col, (label, data, style) in enumerate(panels):
            ax = axes[row, col]
            images[col] = ax.imshow(data, origin="lower", extent=extent, interpolation="nearest", **style)
            ax.set_title(f"{label}, {name} {centre[axis]}", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
        # In-plane displacement arrows on the magnitude panel.
        uh, uv = cut(disp_c[h])[::step, ::step], cut(disp_c[v])[::step, ::step]
        yy, xx = np.mgrid[0 : cut(mag_c).shape[0] : step, 0 : cut(mag_c).shape[1] : step]
        axes[row, 3].quiver(
            (xx + 0.5) * zooms[h],
            (yy + 0.5) * zooms[v],
            uh * arrow_gain,
            uv * arrow_gain,
            color="cyan",
            angles="xy",
            scale_units="xy",
            scale=1.0,
            width=0.004,
        )
    fig.colorbar(images[2], ax=axes[:, 2], shrink=0.6, label="intensity difference")
    fig.colorbar(images[3], ax=axes[:, 3], shrink=0.6, label="displacement magnitude (mm)")
    fig.suptitle(f"{title}\narrows: in-plane displacement, x{arrow_gain:.1f} length; slices in RAS orientation (mm)")
    save_figure(fig, path, dpi=90)


# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------


def _resolve_device(device: str) -> torch.device:
    from medfast._device import resolve_device

    return resolve_device(device, "device", DemoError)


def run_warp_demo(
    out_dir: str | Path = DEFAULT_OUT,
    device: str = "auto",
    seed: int = 0,
    magnitude: float = DEFAULT_MAGNITUDE,
    repeats: int = DEFAULT_REPEATS,
    image_path: str | Path | None = None,
    verbose: bool = True,
) -> dict:
    """Warps a T1 volume by a random diffeomorphism, saves the results and times medfast.warp.

    Parameters
    ----------
    out_dir : str or Path
        Folder for ``warped_linear.nii.gz``, ``warped_cubic.nii.gz``, ``ddf_voxels.nii.gz`` (5D
        ``(D, H, W, 1, 3)`` displacement in voxels), ``warp_demo.png`` and ``demo.json``; created
        if needed.
    device : {"auto", "cpu", "cuda"}
        ``"auto"`` uses CUDA when a GPU is visible and medfast has CUDA kernels.
    seed : int
        Seed of the random deformation.
    magnitude : float
        Largest displacement length, in voxels.
    repeats : int
        Timed runs per measurement (median reported).
    image_path : str or Path, optional
        A 3D NIfTI to warp instead of the MNI152 2009a T1 template shipped with nilearn.
    verbose : bool
        Print progress and the timing table.

    Returns
    -------
    dict
        What ``demo.json`` holds: input, shapes, device, deformation statistics, timings and
        speed-ups (``timing``), agreement with grid_sample, output paths and build info.

    Raises
    ------
    ImportError
        Before any work or output: nibabel or matplotlib is not installed, or (without ``image_path``) nilearn
        (a ``ModuleNotFoundError`` naming it is the exception or its ``__cause__``).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    say = print if verbose else (lambda *a, **k: None)
    # Every optional module the outputs need, before any work: without matplotlib the demo deformed, timed and
    # wrote the NIfTIs, then failed at the figure.
    _require("nibabel")
    _require("matplotlib")
    template = None
    if image_path is None:
        try:
            template = mni_template_path()
        except ModuleNotFoundError:
            if verbose:  # the command line's missing-module line names the extra only: the way around it too
                print("medfast demo: note: without nilearn, --image NIFTI warps your own 3D NIfTI",
                      file=sys.stderr, flush=True)
            raise
    start = time.perf_counter()
    dev = _resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    source = Path(image_path) if image_path is not None else template
    say(f"[1/5] loading {source.name}")
    image, nifti, (lo, hi) = load_volume(source)
    shape = tuple(image.shape[2:])
    zooms = [float(z) for z in _require("nibabel").affines.voxel_sizes(nifti.affine)]
    say(f"      shape {shape}, voxel size {tuple(round(z, 3) for z in zooms)} mm, device {dev}")
    image = image.to(dev)

    say(f"[2/5] deforming: random velocity on a 6^3 grid, integrated (7 squarings), max {magnitude:g} voxels")
    ddf = random_deformation(shape, magnitude, seed=seed, device=dev)
    det = jacobian_determinant(ddf)
    deformation = {
        "seed": seed,
        "control_grid": 6,
        "integration_steps": 7,
        "magnitude_requested_vox": magnitude,
        "max_displacement_vox": _max_norm(ddf),
        "max_displacement_mm": _max_norm(_to_mm(ddf, nifti.affine)),
        "jacobian_det_min": float(det.min()),
        "jacobian_det_max": float(det.max()),
        "folded_fraction": float((det <= 0).float().mean()),
    }
    del det
    if deformation["folded_fraction"] > 0:
        say(
            f"      note: {deformation['folded_fraction']:.2%} of voxels fold (det <= 0): the magnitude is "
            f"large for a {shape} volume on a 6^3 control grid"
        )
    say(
        f"      max displacement {deformation['max_displacement_vox']:.2f} voxels "
        f"({deformation['max_displacement_mm']:.2f} mm), Jacobian determinant in "
        f"[{deformation['jacobian_det_min']:.3f}, {deformation['jacobian_det_max']:.3f}]"
    )

    say("[3/5] warping with medfast.warp (linear, cubic)")
    warped = {mode: warp(image, ddf, mode=mode, padding="zeros") for mode in ("linear", "cubic")}

    say(f"[4/5] timing medfast.warp vs the grid_sample route (median of {repeats})")
    bench = benchmark_warp(image, ddf, repeats, seed=seed)
    bench["agree"] = bench["max_abs_diff"] < AGREEMENT_TOL
    say(format_timings(bench))
    if not bench["agree"]:
        say(f"      WARNING: outputs differ by more than {AGREEMENT_TOL:g}")

    say(f"[5/5] writing NIfTI, PNG and JSON to {out}")
    paths = {
        "warped_linear": out / "warped_linear.nii.gz",
        "warped_cubic": out / "warped_cubic.nii.gz",
        "ddf": out / "ddf_voxels.nii.gz",
        "figure": out / "warp_demo.png",
        "json": out / "demo.json",
    }
    scale = hi - lo if hi > lo else 1.0
    original_np = image[0, 0].cpu().numpy()
    for mode, volume in warped.items():
        # Back to the input's intensity units, so the output overlays the input in any viewer.
        data = volume[0, 0].cpu().numpy() * scale + lo
        img = _like(nifti, data, f"medfast demo: {source.name} warped ({mode})")
        img.to_filename(paths[f"warped_{mode}"])
    ddf_np = ddf[0].cpu().numpy()
    _save_ddf(nifti, ddf_np, paths["ddf"])
    plot_warp_demo(
        original_np,
        warped["linear"][0, 0].cpu().numpy(),
        ddf_np,
        nifti.affine,
        paths["figure"],
        title=f"medfast.warp: {source.name}, random diffeomorphism (seed {seed}, "
        f"max {deformation['max_displacement_mm']:.1f} mm)",
    )

    result = {
        "input": str(source),
        "shape": list(shape),
        "voxel_size_mm": zooms,
        "affine": np.asarray(nifti.affine).tolist(),
        "device": str(dev),
        "deformation": deformation,
        "timing": bench,
        "max_abs_diff_vs_grid_sample": bench["max_abs_diff"],
        "outputs": {name: str(p) for name, p in paths.items()},
        "ddf_layout": "(D, H, W, 1, 3) float32 voxels; component c moves along array axis c",
        "build_info": build_info(),
        "elapsed_s": time.perf_counter() - start,
    }
    paths["json"].write_text(json_dumps(result, indent=2) + "\n")
    say(f"      done in {result['elapsed_s']:.1f} s: " + ", ".join(p.name for p in paths.values()))
    return result
