"""Differentiable B-mode ultrasound simulation from property volumes, CT (HU) or label maps.

Pipeline (one batched call; see docs/ultrasound.md): scanline sample positions in the probe frame ->
world (pose) -> voxel (inverse affine) -> ray march kernel (``medfast.ops._ussim.ray_march``:
trilinear sampling, reflection and attenuation losses as a log-domain cumulative sum, specular and
world-anchored scatter echoes) -> elevation sub-ray sum -> coherent IQ point-spread function (axial
Gaussian-envelope pulse, lateral depth-dependent Gaussian beam) -> TGC -> envelope -> log
compression -> scan conversion to a Cartesian image.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch._C import _functorch

from medfast._typing import ArrayLike
from medfast.ops._autograd import refuse_function_transforms
from medfast.ops._ussim import N_PROPS, PROP_NAMES, march_lines, noise_table, psf
from medfast.ops._validate import check_bool, plain, py_scalar
from medfast.ultrasound._speckle import scatter_gain
from medfast.ultrasound.probe import Probe
from medfast.ultrasound.tissue import HU_KNOTS, WATER, LabelTable, hu_to_properties

__all__ = ["SimulationResult", "simulate", "simulate_ct", "simulate_labels", "look_at"]

_NOISE_CACHE: OrderedDict[tuple[bool, int, str], torch.Tensor] = OrderedDict()  # least recently used first
_NOISE_LOCK = threading.Lock()
_NOISE_CACHE_SIZE = 16  # tables of 16384 x 4 values: a seed per call must not grow memory without bound
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))

_RETAIN = threading.local()  # the list retain_cached() collects into, per thread


@contextlib.contextmanager
def retain_cached():
    """Collects every cached constant (noise tables, probe tables, device copies) that the body uses, in a
    list the caller keeps. A CUDA graph captured in the body reads those tensors at every replay, while the
    caches evict them (16 noise tables, 64 device copies): freed, their memory would hold other data."""
    previous = getattr(_RETAIN, "kept", None)
    kept: list = []
    _RETAIN.kept = kept
    try:
        yield kept
    finally:
        _RETAIN.kept = previous


def _retained(obj):
    kept = getattr(_RETAIN, "kept", None)
    if kept is not None:
        kept.append(obj)
    return obj


@contextlib.contextmanager
def _building_constants():
    """Outside ``torch.inference_mode`` and without autograd, where cached constants are built: a constant built in
    a first call under inference mode was an inference tensor, and every later differentiable call failed when
    autograd saved it for backward ("Inference tensors cannot be saved for backward") until the process restarted.
    Normal tensors serve calls in every grad mode (under inference mode too, without recording a graph)."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def _normal_tensors(build):
    """A cache's builder run under :func:`_building_constants`."""

    @functools.wraps(build)
    def call(*args, **kwargs):
        with _building_constants():
            return build(*args, **kwargs)

    return call


def _clear_caches() -> None:
    """Empties the simulator's caches of constants (noise tables, affines, probe tables, device copies); the next call
    rebuilds what it needs. For tests, and to free the memory they hold (a few MiB per probe and device)."""
    with _NOISE_LOCK:
        _NOISE_CACHE.clear()
    _AFFINES.clear()
    _DEVICE_COPIES.clear()
    for cache in (_probe_box, _cached, _gain_db, _grid_chunks):
        cache.cache_clear()


def _retaining(cached_fn):
    """An ``lru_cache`` function whose results :func:`retain_cached` collects."""

    @functools.wraps(cached_fn)
    def call(*args, **kwargs):
        return _retained(cached_fn(*args, **kwargs))

    call.cache_clear, call.cache_info = cached_fn.cache_clear, cached_fn.cache_info
    return call


@dataclass
class SimulationResult:
    """Output of :func:`simulate`.

    Attributes
    ----------
    bmode : Tensor or None
        ``(B, 1, H, W)`` scan-converted B-mode image in [0, 1] (0 = ``-dynamic_range_db`` or outside
        the scanned region, 1 = 0 dB after gain); None with ``scan_convert=False``.
    pixel_mm : float
        Pixel spacing of ``bmode`` (square pixels), mm.
    extent_mm : tuple of float
        ``(x_min, x_max, z_min, z_max)`` of the image in the probe frame (pixel centres), mm:
        pixel (row i, column j) is at x = x_min + j * pixel_mm, z = z_min + i * pixel_mm.
    lines_db : Tensor
        ``(B, L, S)`` log-compressed scanlines (dB, after gain, not clipped).
    envelope : Tensor or None
        ``(B, L, S)`` envelope (after TGC) when ``return_lines=True``.
    iq : Tensor or None
        ``(B, L, S)`` complex IQ scanlines (after TGC) when ``return_lines=True``.
    """

    bmode: torch.Tensor | None
    pixel_mm: float
    extent_mm: tuple[float, float, float, float]
    lines_db: torch.Tensor
    envelope: torch.Tensor | None = None
    iq: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _check_probe(probe: Probe | str) -> Probe:
    if isinstance(probe, str):
        return Probe.preset(probe)
    if not isinstance(probe, Probe):
        raise TypeError(f"probe must be a Probe or a preset name ({', '.join(Probe.presets())}), got {probe!r}")
    return probe


#: how far a pose's 3x3 part may be from a rotation (trackers print 4-6 decimals); read_poses applies it too
RIGID_TOL = 1e-3


def _check_pose(pose: object, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """The pose on ``device`` in ``dtype``, and the float64 host copy its checks read."""
    if not isinstance(pose, torch.Tensor):
        raise TypeError(f"pose must be a torch.Tensor of shape (B, 4, 4), got {type(pose).__name__}")
    if pose.dim() == 2:
        pose = pose[None]
    if pose.dim() != 3 or pose.shape[1:] != (4, 4) or pose.shape[0] < 1:
        raise ValueError(f"pose must be (B, 4, 4) probe-to-world transforms (mm), got shape {tuple(pose.shape)}")
    if not pose.is_floating_point():
        raise TypeError(f"pose must be floating point, got {pose.dtype}")
    if pose.dtype in (torch.float16, torch.bfloat16):
        # float16 rounds a 100 mm translation to 1/16 mm and a rotation to ~5e-4 (0.05 mm at 100 mm depth);
        # bfloat16 poses were refused as not rigid, which hid the cause
        raise TypeError(f"pose must be float32 or float64, got {pose.dtype} (too coarse for a probe pose in mm: "
                        "convert it with pose.float() or pose.double() before it is rounded)")
    if pose.device.type == "meta":  # (the host copy below raised "Cannot copy out of meta tensor")
        raise ValueError("pose is a meta tensor: a meta tensor has no values (the pose is checked on the host; pass "
                         "it on the CPU, also with meta props)")
    if pose.device != device and pose.device.type != "cpu":
        raise ValueError(f"pose is on {pose.device} but the volume is on {device} (CPU poses are accepted too)")
    # These checks read the pose on the host. A pose on the GPU costs a device sync here; a CPU pose
    # (e.g. from a tracker) is checked for free (NumPy: a few microseconds, where torch ops on a
    # (B, 4, 4) tensor cost tens) and copied without waiting for the GPU's queued work.
    host = pose.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(host).all():
        raise ValueError("pose contains NaN or inf")
    if np.abs(host[:, 3] - (0.0, 0.0, 0.0, 1.0)).max() > 1e-4:
        raise ValueError("pose must be affine: its last row must be (0, 0, 0, 1)")
    # Rigid: a scale would image another depth than the probe's, a shear or a mirror another geometry.
    rot = host[:, :3, :3]
    if np.abs(rot.transpose(0, 2, 1) @ rot - np.eye(3)).max() > RIGID_TOL or (np.linalg.det(rot) < 0).any():
        raise ValueError("pose must be rigid: its 3x3 part must be a rotation (orthonormal columns, determinant +1)")
    return plain(pose).to(device=device, dtype=dtype, non_blocking=True), host


@functools.lru_cache(maxsize=64)
def _probe_box(probe: Probe) -> np.ndarray:
    """``(8, 4)`` corners (probe frame, mm, homogeneous) of a box holding every sample of every sub-ray: the
    lines' first and last samples' extent in x and z (a fan's lines are segments, each inside the box of its
    ends), the element height in y."""
    origin, direction = probe.line_geometry(dtype=torch.float64)
    r = probe.depths(dtype=torch.float64)
    ends = torch.cat([origin + direction * r[0], origin + direction * r[-1]]).numpy()
    lo, hi = ends.min(0), ends.max(0)
    lo[1], hi[1] = -probe.elevation_mm / 2, probe.elevation_mm / 2
    corners = np.array([[(lo, hi)[i][0], (lo, hi)[j][1], (lo, hi)[k][2], 1.0]
                        for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    corners.flags.writeable = False  # cached
    return corners


def _meets_volume(host_pose: np.ndarray, inv_affine: np.ndarray, shape: Sequence[int], probe: Probe) -> np.ndarray:
    """``(B,)`` False where no sample of pose b can read a voxel: the probe box (:func:`_probe_box`) in voxel space
    does not meet the volume's box ``[-1, D] x [-1, H] x [-1, W]`` (trilinear reads reach a voxel from one index
    away). Poses whose box centre lies in the volume's box meet it; only the others take the separating-axis test
    (:func:`_boxes_meet`; a sweep's poses mostly skip it: the test of 64 poses took ~0.5 ms of host time per
    simulate call)."""
    corners_p = _probe_box(probe)
    to_voxel = inv_affine[:3] @ host_pose  # (B, 3, 4)
    centre = to_voxel @ corners_p.mean(0)  # (B, 3)
    meets = ((centre >= -1.0) & (centre <= np.asarray(shape[:3], dtype=np.float64))).all(1)
    rest = np.flatnonzero(~meets)
    if rest.size:
        meets[rest] = _boxes_meet(to_voxel[rest], corners_p, shape)
    return meets


def _boxes_meet(to_voxel: np.ndarray, corners_p: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``(R,)`` whether the probe box (``corners_p``, :func:`_probe_box`) mapped by each ``(R, 3, 4)`` probe-to-voxel
    matrix meets the volume's box ``[-1, D] x [-1, H] x [-1, W]``: separating-axis test of the two parallelepipeds
    (the axes: both sets of face normals and the cross products of their edges), exact for the probe box, so a
    pose flagged cannot image the volume (one partly outside is not flagged)."""
    corners = to_voxel @ corners_p.T  # (R, 3, 8) voxel
    edges = (corners[:, :, [4, 2, 1]] - corners[:, :, :1]).transpose(0, 2, 1)  # (R, 3, 3): the x, y, z edges
    unit = np.broadcast_to(np.eye(3), edges.shape)
    axes = np.concatenate([unit, np.cross(edges[:, [1, 2, 0]], edges[:, [2, 0, 1]]),
                           np.cross(edges[:, :, None], unit[:, None]).reshape(-1, 9, 3)], 1)  # (R, 15, 3)
    box = np.array([[(-1.0, float(shape[0]))[i], (-1.0, float(shape[1]))[j], (-1.0, float(shape[2]))[k]]
                    for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    a = axes @ corners  # (R, 15, 8) projections of the probe box
    v = axes @ box.T
    tol = 1e-9 * (1.0 + np.abs(a).max(-1) + np.abs(v).max(-1))
    return ~((a.min(-1) > v.max(-1) + tol) | (v.min(-1) > a.max(-1) + tol)).any(1)


@contextlib.contextmanager
def sweep_checked():
    """Inside it, :func:`simulate` skips its "no pose meets the volume" check: for a caller (``medfast simulate``)
    that checked the whole sweep with :func:`check_meets_volume` and then simulates it in batches, one of which may
    lie wholly off the volume (its frames are then what any pose off the volume gives). Per thread."""
    previous = getattr(_SWEEP_CHECKED, "on", False)
    _SWEEP_CHECKED.on = True
    try:
        yield
    finally:
        _SWEEP_CHECKED.on = previous


_SWEEP_CHECKED = threading.local()


def check_meets_volume(host_pose: np.ndarray, inv_affine: np.ndarray, shape: Sequence[int], probe: Probe) -> None:
    """Raises ValueError when no pose of ``host_pose`` ``(B, 4, 4)`` (world mm, float64) can image any voxel of a
    volume of ``shape`` (D, H, W) with the voxel-to-world inverse ``inv_affine``: blank frames, most often a pose
    in other units or another world frame than the affine's."""
    if _meets_volume(host_pose, inv_affine, shape, probe).any():
        return
    where = ", ".join(f"({p[0, 3]:.4g}, {p[1, 3]:.4g}, {p[2, 3]:.4g})" for p in host_pose[:3])
    more = f" and {len(host_pose) - 3} more" if len(host_pose) > 3 else ""
    world = np.linalg.inv(inv_affine)
    ijk = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    span = ijk @ world[:3, :3].T + world[:3, 3]
    raise ValueError(
        f"pose: no scanline of the {len(host_pose)} pose(s) meets the volume (array centres at {where}{more} mm; "
        f"the volume spans world {np.round(span.min(0), 1).tolist()} to {np.round(span.max(0), 1).tolist()} mm): "
        "the frames would be blank; check the pose's units (mm) and frame (the affine's world)")


_AFFINES: dict[bytes, tuple[torch.Tensor, torch.Tensor, tuple[float, float, float]]] = {}


def _affine_info(affine: object) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float, float]]:
    """(affine, its inverse, voxel size in mm along each voxel axis), float64 on the CPU; validated once per distinct
    matrix (a training loop passes the same few affines thousands of times)."""
    if isinstance(affine, torch.Tensor) and affine.device.type == "meta":  # ("Cannot copy out of meta tensor")
        raise ValueError("affine is a meta tensor: a meta tensor has no values (the affine is read on the host)")
    key = None
    if isinstance(affine, torch.Tensor) and affine.numel() == 16 and not affine.requires_grad:
        key = affine.detach().to("cpu", torch.float64).numpy().tobytes()
    elif isinstance(affine, np.ndarray) and affine.size == 16:
        key = np.ascontiguousarray(affine, dtype=np.float64).tobytes()
    cached = _AFFINES.get(key) if key is not None else None  # one read: another thread may clear the dict
    if cached is not None:
        return cached
    with _building_constants():
        # a copy: as_tensor keeps a float64 CPU affine itself, and a caller reusing that tensor in place for another
        # matrix changed this cache entry's affine (not its key nor its inverse)
        a = _check_affine(affine).clone()
        inv = torch.linalg.inv(a)
    # The voxel size along each voxel axis (the column norms) sets that axis' interface sharpening
    # (_scanlines' sharp): one value for all axes left either the thick axis of an anisotropic volume
    # (thick-slice CT) with a weak echo (the mean) or its fine axes with steps of a tenth of a sample,
    # whose echoes snapped to the sample grid with a zero pose gradient (the largest).
    info = (a, inv, tuple(float(v) for v in torch.linalg.norm(a[:3, :3], dim=0)))
    if key is not None:
        if len(_AFFINES) >= 64:
            _AFFINES.clear()
        _AFFINES[key] = info
    return info


def _check_affine(affine: object) -> torch.Tensor:
    if affine is None:
        raise ValueError(
            "affine is required: the volume's (4, 4) voxel-to-world matrix in mm (NIfTI convention; "
            "nibabel: img.affine)"
        )
    if isinstance(affine, torch.Tensor) and affine.requires_grad:
        raise ValueError("affine is read on the host and not differentiated: to optimize a transform T of the volume "
                         "(world = T @ affine @ voxel), pass inv(T) @ pose as the pose instead (differentiable)")
    try:
        a = torch.as_tensor(affine, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"affine must be a (4, 4) array or tensor of numbers, got {type(affine).__name__} "
                        f"{affine!r}") from None
    if a.shape == (1, 4, 4):
        a = a[0]
    if a.shape != (4, 4):
        raise ValueError(f"affine must be a (4, 4) voxel-to-world matrix, got shape {tuple(a.shape)}")
    if not bool(torch.isfinite(a).all()):
        raise ValueError("affine contains NaN or inf")
    det = float(torch.linalg.det(a[:3, :3]))
    if abs(det) < 1e-9:
        raise ValueError(f"affine is not invertible (det of its 3x3 part = {det:g})")
    if float((a[3] - torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=a.dtype)).abs().max()) > 1e-6:
        raise ValueError(f"affine must be affine: its last row must be (0, 0, 0, 1), got {a[3].tolist()}")
    return a


def _check_props(props: object) -> torch.Tensor:
    if not isinstance(props, torch.Tensor):
        raise TypeError(f"props must be a torch.Tensor, got {type(props).__name__}")
    if props.dim() != 5 or props.shape[1] != N_PROPS:
        raise ValueError(f"props must be (B, {N_PROPS}, D, H, W) property maps, got {tuple(props.shape)}")
    if props.numel() == 0:
        raise ValueError(f"props is empty: {tuple(props.shape)}")
    if props.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"props must be float32 or float64, got {props.dtype}")
    return plain(props)  # a MetaTensor's affine is the volume's, not the frames'


def _check_volume_index(index: object, batch: int, volumes: int, device: torch.device) -> torch.Tensor | None:
    """The ``volume_index`` of simulate(), checked on the host, as int64 on ``device`` (or None)."""
    if index is None:
        return None
    if isinstance(index, torch.Tensor):
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise TypeError(f"volume_index must hold integers, got {index.dtype}")
        if index.device.type == "meta":  # (the host copy raised "Cannot copy out of meta tensor")
            raise ValueError("volume_index is a meta tensor: a meta tensor has no values (it is checked on the host)")
        host = index.detach().to("cpu", torch.int64)
    else:
        arr = np.asarray(index)
        if arr.size == 0:
            arr = arr.astype(np.int64)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"volume_index must be a sequence of ints or an integer tensor, got {arr.dtype} values")
        host = torch.from_numpy(arr.astype(np.int64))
    if host.shape != (batch,):
        raise ValueError(f"volume_index must have shape ({batch},) (one volume per pose), got {tuple(host.shape)}")
    lo, hi = (int(v) for v in (host.numpy().min(), host.numpy().max())) if batch else (0, 0)
    if lo < 0 or hi >= volumes:
        raise ValueError(f"volume_index values must lie in [0, {volumes}) (props has {volumes} volumes), "
                         f"got [{lo}, {hi}]")
    return host.to(device, non_blocking=True) if device.type != "cpu" else host


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil is optional (cli extra): ask the OS as psutil would
        pass
    try:  # Linux: MemAvailable (free + reclaimable page cache), what psutil reports as available
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:  # other POSIX systems: the free physical pages (not counting the reclaimable cache)
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return 8 << 30  # (Windows without psutil) an assumption, not a measurement


def _check_memory(batch: int, probe: Probe, sub_rays: int, dtype: torch.dtype, device: torch.device,
                  max_bytes: int | None, scan_pixel_mm: float | None | bool = False) -> None:
    """Raises ValueError when a call would need more memory than allowed; ``scan_pixel_mm``: the
    pixel of the scan conversion (None: the default), False without one."""
    item = torch.finfo(dtype).bits // 8
    rays = batch * probe.n_lines * sub_rays * probe.n_samples
    # coords (3) + march output (3) + IQ pipeline (~8 planes) per sample.
    need = rays * (3 + 3) * item + batch * probe.n_lines * probe.n_samples * 8 * item
    if scan_pixel_mm is not False:  # the scan-converted images (and the grid_sample grid)
        (H, W), _ = probe.image_shape(scan_pixel_mm)
        need += batch * H * W * 3 * item
    if max_bytes is None and need < 256 << 20:
        return  # small enough for any device: skip reading its free memory (a syscall or driver call)
    limit = max_bytes if max_bytes is not None else int(0.8 * _available_bytes(device))
    if need > limit:
        image = ""
        if scan_pixel_mm is not False:
            (H, W), px = probe.image_shape(scan_pixel_mm)
            image = f", and {H} x {W} image pixels of {px:.3g} mm per frame"
        raise ValueError(
            f"the simulation needs about {need / 2**30:.2f} GiB (batch {batch} x {probe.n_lines} lines x "
            f"{sub_rays} sub-rays x {probe.n_samples} samples{image}) but only {limit / 2**30:.2f} GiB are allowed "
            f"on {device}; lower the batch size, n_lines, n_samples, sub_rays or the pixel density"
        )


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def look_at(position: ArrayLike, direction: ArrayLike, lateral: ArrayLike,
            dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A (4, 4) probe-to-world pose: array centre at ``position`` (mm), beam (+z) along ``direction``,
    lateral axis (+x) along ``lateral`` (made orthogonal to the beam), elevation +y = z x x."""
    try:
        p = torch.as_tensor(position, dtype=dtype)
        z = torch.as_tensor(direction, dtype=dtype)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"position and direction must be 3 finite values each, got {position!r} and "
                         f"{direction!r}") from None
    if p.shape != (3,) or z.shape != (3,) or not bool(torch.isfinite(p).all() & torch.isfinite(z).all()):
        raise ValueError(f"position and direction must be 3 finite values each, got {position!r} and {direction!r}")
    if float(z.norm()) < 1e-12:
        raise ValueError(f"direction must not be zero, got {direction!r}")
    z = z / z.norm()
    try:
        x = torch.as_tensor(lateral, dtype=dtype)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"lateral must be 3 finite values, got {lateral!r}") from None
    if x.shape != (3,) or not bool(torch.isfinite(x).all()):
        raise ValueError(f"lateral must be 3 finite values, got {lateral!r}")
    x = x - (x @ z) * z
    if float(x.norm()) < 1e-9:
        raise ValueError("lateral must not be parallel to direction")
    x = x / x.norm()
    y = torch.linalg.cross(z, x)
    out = torch.eye(4, dtype=dtype)
    out[:3, 0], out[:3, 1], out[:3, 2], out[:3, 3] = x, y, z, p
    return out


def elevation_offsets(probe: Probe, sub_rays: int) -> torch.Tensor:
    """``(E,)`` elevation offsets (mm) of the sub-rays: evenly spread over the middle (E-1)/E of the
    element height (a single ray at y = 0 for E = 1)."""
    if sub_rays == 1:
        return torch.zeros(1, dtype=torch.float64)
    half = probe.elevation_mm / 2 * (sub_rays - 1) / sub_rays
    return torch.linspace(-half, half, sub_rays, dtype=torch.float64)


def slice_sub_rays(probe: Probe, scatter_cell_mm: float | None = None) -> int:
    """The ``sub_rays`` of ``simulate(..., sub_rays="slice")``: the fewest rays (odd: one on the axis) whose
    spacing across the element height, ``elevation_mm / E``, is at most 2/3 of a scatter cell (default half a
    wavelength). The scatter field is correlated over ~0.63 cell, so the sum over the rays then integrates it
    across the elevation beam: the speckle decorrelates over the slice thickness, as a real slice's does. (At
    one cell the speckle power fell 1.8 dB below the scatter power on a probe aligned with the scatter grid,
    all rays at one phase of their cells; at 2/3 cell it stays within 0.25 dB.)"""
    cell = probe.wavelength_mm / 2 if scatter_cell_mm is None else float(scatter_cell_mm)
    e = max(1, math.ceil(1.5 * probe.elevation_mm / cell - 1e-9))
    return e + 1 - e % 2


def probe_points(probe: Probe, sub_rays: int, device=None) -> torch.Tensor:
    """``(L, E, S, 3)`` probe-frame positions (mm, float64) of every sample of every sub-ray."""
    origin, direction = probe.line_geometry(dtype=torch.float64)
    r = probe.depths(dtype=torch.float64)
    y = elevation_offsets(probe, sub_rays)
    pts = origin[:, None, None, :] + direction[:, None, None, :] * r[None, None, :, None]
    pts = pts.expand(-1, sub_rays, -1, -1).clone()
    pts[..., 1] += y[None, :, None]
    return pts.to(device)


def _noise(seed: int, device: torch.device, speckle: bool) -> torch.Tensor:
    """The cached noise table of ``seed`` (or the deterministic one without speckle) on ``device``: float32, as
    the march kernel reads it, whatever torch's default dtype."""
    key = (bool(speckle), int(seed) if speckle else 0, str(device))  # (seed -1 with speckle is a seed too)
    with _NOISE_LOCK:  # simulate() may run in several threads: lookup, insert and eviction as one step
        table = _NOISE_CACHE.get(key)
        if table is not None:
            _NOISE_CACHE.move_to_end(key)
            return _retained(table)
    with _building_constants():
        if speckle:
            table = noise_table(seed)
        else:  # deterministic scatterers: unit real value, no amplitude spread
            table = torch.zeros(1, 4, dtype=torch.float32)
            table[0, 0] = 1.0
        table = table.to(device)
    with _NOISE_LOCK:
        table = _NOISE_CACHE.setdefault(key, table)  # another thread may have made it meanwhile
        _NOISE_CACHE.move_to_end(key)
        while len(_NOISE_CACHE) > _NOISE_CACHE_SIZE:
            _NOISE_CACHE.popitem(last=False)
    return _retained(table)


# ---------------------------------------------------------------------------------------------
# Point-spread function
# ---------------------------------------------------------------------------------------------


@_retaining
@functools.lru_cache(maxsize=32)
@_normal_tensors
def _cached(kind: str, probe: Probe, sub_rays: int, device: str, dtype: torch.dtype, extra):
    """Per-probe constant tensors, computed once per (probe, sub_rays, device, dtype, extra); ``extra``:
    the pixel spacing of "grid", the scatter cell of "elevation3", the interface ramp (samples) of "psf_*"."""
    dev = torch.device(device)
    if kind == "rays":  # (L, E, 3) sub-ray origins, (L, 3) sample steps (probe frame, mm)
        origin, direction = probe.line_geometry(dtype=torch.float64)
        start = origin[:, None, :].expand(-1, sub_rays, -1).clone()
        start[..., 1] += elevation_offsets(probe, sub_rays)[None, :]
        return start.to(device=dev, dtype=dtype), (direction * probe.dz_mm).to(device=dev, dtype=dtype)
    if kind == "elevation3":  # (E, S, 3) elevation weights of the (specular, scatter re, im) channels
        w_spec, w_scat = _elevation_weights(probe, sub_rays, dtype, dev, scatter_cell_mm=extra)
        return (torch.stack([w_spec, w_scat, w_scat], -1).contiguous(),
                torch.stack([w_spec, w_spec, w_spec], -1).contiguous())
    if kind == "axial":
        return _axial_kernel(probe, dtype, dev)
    if kind == "lateral":
        return _lateral_weights(probe, dtype, dev)
    if kind in ("psf_speckle", "psf_plain"):  # extra: the interface ramp in samples (None: the default 2)
        return _psf_weights(probe, kind == "psf_speckle", dtype, dev, 2.0 if extra is None else extra)
    if kind == "grid":
        # Pixels outside the scanned (line, sample) range are moved far outside [-1, 1]: grid_sample's zero
        # padding blended those within one line (or sample) spacing of the fan's edges with the edge line, so
        # the image had partial values up to a line spacing outside the fan. The tolerance keeps the pixels
        # on the edges (float32 rounding of +-1).
        grid, px = probe.scan_grid(extra, device=dev, dtype=dtype)
        return grid.masked_fill((grid.abs() > 1 + 1e-6).any(-1, keepdim=True), 2.0), px
    raise KeyError(kind)


@_retaining
@functools.lru_cache(maxsize=64)
@_normal_tensors
def _gain_db(probe: Probe, device: str, dtype: torch.dtype, tgc_db_cm_mhz: float, gain_db: float) -> torch.Tensor:
    """``(S,)`` dB added to each sample: the time-gain compensation 2 tgc fc z plus the gain."""
    z_cm = probe.depths(dtype=torch.float64) / 10.0
    return (2.0 * tgc_db_cm_mhz * probe.fc_mhz * z_cm + gain_db).to(device=device, dtype=dtype)


def _axial_kernel(probe: Probe, dtype, device) -> torch.Tensor:
    sigma = probe.axial_fwhm_mm() * _FWHM_TO_SIGMA / probe.dz_mm  # samples
    half = max(1, int(math.ceil(3.5 * sigma)))
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    return torch.exp(-0.5 * (t / sigma) ** 2).to(device=device, dtype=dtype)  # peak 1


def _lateral_weights(probe: Probe, dtype, device, max_half: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth-dependent lateral weights ``(S, 2K+1)``: plane-reflector normalised (sum 1) and
    scatter normalised (sum of squares 1). K is capped (a sector's apex has lines closer than the
    beam is wide) at 24 lines, or n_lines / 64 for denser scans, so that thousands of lines keep the
    beam's width (at 8192 lines a cap of 24 made it 0.23 mm instead of 0.36)."""
    if max_half is None:
        max_half = max(24, probe.n_lines // 64)
    z = probe.depths(dtype=torch.float64)
    sigma = probe.lateral_fwhm_mm(z) * _FWHM_TO_SIGMA / probe.line_spacing_mm(z)  # lines
    half = int(min(max_half, max(1, math.ceil(3 * float(sigma.max())))))
    k = torch.arange(-half, half + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (k[None, :] / sigma.clamp_min(0.3)[:, None]) ** 2)
    spec = w / w.sum(1, keepdim=True)
    scat = w / w.square().sum(1, keepdim=True).sqrt()
    return spec.to(device=device, dtype=dtype), scat.to(device=device, dtype=dtype)


def _elevation_weights(probe: Probe, sub_rays: int, dtype, device,
                       scatter_cell_mm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E, S)`` sub-ray weights: specular (sum 1) and scatter: unit energy times the per-depth gain
    that keeps the mean speckle intensity at the scatter power however densely the samples, lines and
    sub-rays are spaced (:func:`~medfast.ultrasound._speckle.scatter_gain`)."""
    z = probe.depths(dtype=torch.float64)
    y = elevation_offsets(probe, sub_rays)
    sigma = probe.elevation_fwhm_mm(z) * _FWHM_TO_SIGMA
    w = torch.exp(-0.5 * (y[:, None] / sigma[None, :]) ** 2)  # (E, S)
    spec = w / w.sum(0, keepdim=True)
    scat = w / w.square().sum(0, keepdim=True).sqrt()
    axial = _axial_kernel(probe, torch.float64, "cpu")
    _, lateral = _lateral_weights(probe, torch.float64, "cpu")
    scat = scat * scatter_gain(axial / axial.square().sum().sqrt(), lateral, scat.T, probe.dz_mm,
                               probe.line_spacing_mm(z), float(y[1] - y[0]) if sub_rays > 1 else 0.0,
                               scatter_cell_mm)
    return spec.to(device=device, dtype=dtype), scat.to(device=device, dtype=dtype)


def _plane_echo_peak(h: torch.Tensor, ramp_samples: float) -> float:
    """Envelope peak of a unit step whose reflection is spread over a ``ramp_samples``-wide impedance ramp (sample
    i reflects the part of the ramp between samples i and i + 1), under the axial taps ``h`` (peak 1), at the
    samples, averaged over the ramp's sub-sample offsets: below 1 (0.93-0.95 for the presets' default 2-sample
    ramp), since the echo's parts are a sample apart."""
    half, n = (h.numel() - 1) // 2, int(math.ceil(ramp_samples)) + 3
    i = torch.arange(-1, n - 1, dtype=torch.float64)
    peaks = []
    for offset in torch.arange(16, dtype=torch.float64) / 16:
        parts = ((i + 1 - offset) / ramp_samples).clamp(0, 1) - ((i - offset) / ramp_samples).clamp(0, 1)
        echo = F.conv1d(F.pad(parts, (half, half))[None, None], h.flip(0)[None, None])
        peaks.append(float(echo.max()))
    return sum(peaks) / len(peaks)


def _psf_weights(probe: Probe, speckle: bool, dtype, device,
                 ramp_samples: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial taps ``(3, K)`` and lateral taps ``(3, J, S)`` of the (specular, scatter re, scatter im)
    channels. Specular: peak 1 / :func:`_plane_echo_peak` for the interface ramp of ``ramp_samples``
    samples, so that a plane reflector keeps its amplitude ``R`` (with peak 1 the default 2-sample ramp
    split the echo over two samples: 5-7 % low at the presets' 1024 samples); scatter: unit energy (with the
    elevation weights' per-depth gain, the mean speckle intensity equals the scatter power), or with speckle
    off unit sum (axially and laterally), so a homogeneous medium images at ``sqrt(density) mean`` however
    densely it is sampled (peak 1 summed a uniform field over ~FWHM / dz samples: 4x brighter at 4x
    n_samples)."""
    h = _axial_kernel(probe, torch.float64, "cpu")
    hn = h / h.square().sum().sqrt() if speckle else h / h.sum()
    w_spec, w_scat = _lateral_weights(probe, torch.float64, "cpu")
    if not speckle:
        w_scat = w_spec
    hs = torch.stack([h / _plane_echo_peak(h, ramp_samples), hn, hn])
    wts = torch.stack([w_spec, w_scat, w_scat], 0).transpose(1, 2)  # (3, J, S)
    return hs.to(device=device, dtype=dtype).contiguous(), wts.to(device=device, dtype=dtype).contiguous()


def _apply_psf(x: torch.Tensor, probe: Probe, speckle: bool = True,
               ramp_samples: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (B, L, 3, S) = (specular, scatter re, scatter im) -> IQ (real, imaginary), each (B, L, S). The scatter
    channels are normalised to unit energy (random scatterers) or, with speckle off (a deterministic,
    coherent scatter field), to unit-sum axial taps (a homogeneous medium's level independent of the sampling;
    the specular channel keeps a plane echo at R). One fused kernel (``ussim_psf``)."""
    h, w = _cached("psf_speckle" if speckle else "psf_plain", probe, 1, str(x.device), x.dtype, ramp_samples)
    iq = psf(x, h, w)
    return iq[:, 0], iq[:, 1]


# ---------------------------------------------------------------------------------------------
# Scan conversion
# ---------------------------------------------------------------------------------------------


@_retaining
@functools.lru_cache(maxsize=32)
@_normal_tensors
def _grid_chunks(probe: Probe, chunks: int, device: str, dtype: torch.dtype, pixel_mm) -> torch.Tensor:
    """The scan grid's rows in ``chunks`` batch entries ``(chunks, ceil(H / chunks), W, 2)`` (padding
    rows outside the scanned region)."""
    grid, _ = _cached("grid", probe, 1, device, dtype, pixel_mm)
    H = grid.shape[1]
    rows = -(-H // chunks)
    pad = grid.new_full((1, chunks * rows - H, grid.shape[2], 2), 2.0)
    return torch.cat([grid, pad], 1).view(chunks, rows, grid.shape[2], 2)


def _scan_convert(scan: torch.Tensor, probe: Probe, pixel_mm) -> tuple[torch.Tensor, float]:
    """``(B, L, S)`` scanlines -> ``(B, 1, H, W)`` Cartesian image (bilinear, 0 outside the scanned region) and its
    pixel spacing. PyTorch's CPU ``grid_sample`` runs one thread per batch element; one frame on a
    multi-threaded CPU is split into row chunks instead, the batch entries of one ``grid_sample`` call
    over the same (expanded, not copied) scanlines: the same per-pixel arithmetic on every thread."""
    B, dev, dt = scan.shape[0], scan.device, scan.dtype
    grid, px = _cached("grid", probe, 1, str(dev), dt, pixel_mm)
    img = scan.transpose(1, 2)[:, None]  # (B, 1, S, L)
    chunks = torch.get_num_threads() if dev.type == "cpu" and B == 1 else 1
    if chunks > 1 and not (torch.is_grad_enabled() and scan.requires_grad):
        H, W = grid.shape[1], grid.shape[2]
        g = _grid_chunks(probe, chunks, str(dev), dt, pixel_mm)
        out = F.grid_sample(img.expand(chunks, -1, -1, -1), g, mode="bilinear", padding_mode="zeros",
                            align_corners=True)
        return out.view(1, 1, -1, W)[:, :, :H], px
    bmode = F.grid_sample(img, grid.expand(B, -1, -1, -1), mode="bilinear", padding_mode="zeros",
                          align_corners=True)
    return bmode, px


_DEVICE_COPIES: dict[tuple[bytes, str, torch.dtype], torch.Tensor] = {}
_AFFINE_ROW = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)  # a pose's last row, as _check_pose requires


def _device_copy(t: torch.Tensor, dev: torch.device, dt: torch.dtype) -> torch.Tensor:
    """A small CPU constant (an inverse affine) on ``dev`` in ``dt``, copied once: no host-to-device copy
    per call (nor during a CUDA graph capture, where a copy from pageable memory is not allowed)."""
    if dev.type == "cpu":
        return t.to(dt)
    key = (t.numpy().tobytes(), str(dev), dt)
    copy = _DEVICE_COPIES.get(key)  # one read, then a local: another thread may clear the dict meanwhile
    if copy is None:
        with _building_constants():
            copy = t.to(dtype=dt).to(device=dev)
        if len(_DEVICE_COPIES) >= 64:
            _DEVICE_COPIES.clear()
        _DEVICE_COPIES[key] = copy
    return _retained(copy)


def _scanlines(props: torch.Tensor, pose: torch.Tensor, affine_info, probe: Probe, *, seed: int, sub_rays: int,
               speckle: bool, scatter_cell_mm: float, interface_mm: float | None, tgc_db_cm_mhz: float,
               gain_db: float, background: list[float], volume_index: torch.Tensor | None, return_gain: bool):
    """The device part of :func:`simulate`, on validated inputs (``pose`` and ``volume_index`` on the
    volume's device, ``affine_info`` from ``_affine_info``): ``(lines_db, i_re, i_im, gain_lin)``. Once
    the per-probe constants are cached it runs no host sync and no host-to-device copy, so the
    classification renderer can capture it in a CUDA graph."""
    a, inv_a64, voxel_mm = affine_info
    dev, dt = props.device, props.dtype
    E = sub_rays

    # Probe frame -> voxel coordinates: M = affine^-1 @ pose; sample i of a sub-ray is at
    # start + i * step (voxel), computed in the kernel.
    start_p, step_p = _cached("rays", probe, E, str(dev), dt, None)
    inv_a = _device_copy(inv_a64, dev, dt)
    # the pose's last row is replaced by the constant (0, 0, 0, 1): read from the pose, it got a gradient (one that
    # depends on the affine's origin), and a step pose -= lr * pose.grad made the pose non-affine (refused next call)
    last = _device_copy(_AFFINE_ROW, dev, dt).expand(pose.shape[0], 1, 4)
    M = inv_a[None] @ torch.cat([pose[:, :3], last], 1)
    R3 = M[:, :3, :3]
    # (tiny broadcast products: cheaper than batched matmuls of 3x3 matrices)
    start = (R3[:, None, None] * start_p[None, :, :, None, :]).sum(-1) + M[:, None, None, :3, 3]
    step = (R3[:, None] * step_p[None, :, None, :]).sum(-1)

    G = (a[:3, :] / scatter_cell_mm).flatten().tolist()
    att = 2.0 * probe.fc_mhz * (probe.dz_mm / 10.0) * math.log(10.0) / 20.0
    props_cl = props.permute(0, 2, 3, 4, 1).contiguous()
    if interface_mm is None:
        interface_mm = 2.0 * probe.dz_mm
    sharp = [max(1.0, v / interface_mm) for v in voxel_mm]  # per voxel axis: ramps ~interface_mm wide
    w3 = _cached("elevation3", probe, E, str(dev), dt, float(scatter_cell_mm))[0 if speckle else 1]  # (E, S, 3)
    # Elevation-weighted sub-ray sum, (B, L, 3, S).
    lines = march_lines(props_cl, start, step, w3, _noise(seed, dev, speckle), G, att, background, seed, sharp,
                        volume_index)
    # (the ramp as the kernel makes it where voxels are coarser than interface_mm, the usual case; rounded for the
    # per-probe cache)
    i_re, i_im = _apply_psf(lines, probe, speckle, round(interface_mm / probe.dz_mm, 6))  # IQ, (B, L, S) each

    # Without autograd the same steps run in place (one buffer for the power / dB lines and one for
    # the clipped scan: no per-step temporaries); same operations in the same order, same values.
    in_place = not (torch.is_grad_enabled() and (i_re.requires_grad or i_im.requires_grad))
    power = i_re.square().add_(i_im.square())  # |IQ|^2 before TGC (not addcmul: its FMA rounds differently)
    # log compression with the TGC added in dB: 10 log10(|IQ|^2 g^2) = 10 log10 |IQ|^2 + 2 tgc fc z.
    lines_db = power.add_(1e-20).log10_().mul_(10.0) if in_place else 10.0 * torch.log10(power + 1e-20)
    if tgc_db_cm_mhz:
        # the per-sample TGC + gain vector is cached per (probe, device, dtype, tgc, gain): one add here
        added = _gain_db(probe, str(dev), dt, float(tgc_db_cm_mhz), float(gain_db))
        lines_db = lines_db.add_(added) if in_place else lines_db + added
        gain_lin = 10.0 ** ((added - gain_db) / 20.0) if return_gain else None
    else:
        lines_db = lines_db.add_(gain_db) if in_place else lines_db + gain_db
        gain_lin = None
    return lines_db, i_re, i_im, gain_lin


# ---------------------------------------------------------------------------------------------
# Simulation
# ---------------------------------------------------------------------------------------------


def simulate(
    props: torch.Tensor,
    affine,
    pose: torch.Tensor,
    probe: Probe | str,
    *,
    seed: int = 0,
    sub_rays: int | str = 3,
    speckle: bool = True,
    scatter_cell_mm: float | None = None,
    interface_mm: float | None = None,
    tgc_db_cm_mhz: float = 0.5,
    gain_db: float = 0.0,
    dynamic_range_db: float = 60.0,
    pixel_mm: float | None = None,
    background: Sequence[float] = WATER,
    return_lines: bool = False,
    max_bytes: int | None = None,
    volume_index=None,
    scan_convert: bool = True,
) -> SimulationResult:
    """Simulates B-mode frames from acoustic property maps along probe poses (differentiable).

    Parameters
    ----------
    props : Tensor
        ``(Bv, 5, D, H, W)`` property maps (see :mod:`medfast.ultrasound.tissue`): impedance (MRayl),
        attenuation (dB/cm/MHz), scatterer density, scatter amplitude mean and spread. ``Bv`` is 1
        (one volume for every pose) or B, or any number with ``volume_index``. float32 or float64.
        Differentiable. The kernel reads a
        channels-last volume: maps in ``torch.channels_last_3d`` memory format (as
        ``hu_to_properties`` and ``LabelTable`` return them) are used without a copy. Not checked for
        NaN (that would cost a pass over the volume per call): a NaN voxel makes the pixels whose
        rays read it NaN, as any PyTorch op would.
    affine : array-like
        ``(4, 4)`` voxel-to-world matrix of the volume in mm (NIfTI convention: world = affine @
        (i, j, k, 1) with i, j, k the indices along D, H, W).
    pose : Tensor
        ``(B, 4, 4)`` (or ``(4, 4)``) probe-to-world transforms in mm, float32 or float64 (float16 and
        bfloat16 are refused: too coarse); probe frame: origin at the array
        centre, +z axial into the tissue, +x lateral, +y elevation; rigid (a rotation and a translation:
        a scale or shear would image another geometry than the probe's). Differentiable in its top 3 rows (the
        last row is read as (0, 0, 0, 1) and gets a zero gradient, so a gradient step keeps it). On the volume's
        device or on the CPU: with a GPU volume, a CPU pose is validated on the host and copied
        without waiting for the GPU (a GPU pose costs two device syncs for its validation). A call where no
        pose can image the volume (every pose's scanlines, element height included, miss it: most often
        another unit or world frame than the affine's) raises ValueError; a pose partly or wholly outside
        beside others is legal. That check reads the host copy the validation already made; it is skipped
        under ``torch.compile``.
    probe : Probe or str
        Probe and imaging settings, or a preset name (``Probe.presets()``).
    seed : int
        Seed of the world-anchored scatterer field (same seed, same speckle at the same world place).
    sub_rays : int or "slice"
        Rays across the elevation slice per scanline (>= 1), at fixed offsets across the element
        height: a point reflector between two of them is missed; use more for point targets and
        thin structures across the slice (docs/ultrasound.md). Each ray reads the scatter field on
        one line, so with few rays the speckle decorrelates across the slice over about one scatter
        cell (0.1-0.3 mm), not over the slice thickness: poses 0.3 mm apart in elevation see
        independent speckle. ``"slice"``: rays at most 2/3 scatter cell apart across the element
        height (``ceil(1.5 elevation_mm / scatter_cell_mm)``, made odd: 95 for C5-2v, 75 for L11-5v), so
        the speckle decorrelates across the slice as the Gaussian elevation beam's (intensity
        correlation ``exp(-d^2 / (2 s^2))``, ``s`` = slice FWHM / 2.355, where the slice is no wider
        than the element height) for tracked-sweep / speckle-decorrelation work, at about ``E / 3`` times
        the march cost of the default (docs/ultrasound.md, Speed).
    speckle : bool
        False: scatterers of deterministic unit phase and amplitude (a speckle-free tissue map): a
        homogeneous medium has the envelope ``sqrt(density) * mean`` (before TGC and gain), whatever the
        sampling; specular echoes keep their amplitude ``R`` as with speckle.
    scatter_cell_mm : float, optional
        Cell size of the world scatter grid; default half the wavelength.
    interface_mm : float, optional
        Width over which the impedance changes between two voxels (default: 2 samples). Coarser
        volumes get their interfaces sharpened to this width along each voxel axis (see
        ``ray_march``'s ``sharp``), so bone and organ boundaries give full specular echoes; along an
        axis whose voxel size is <= this width the sharpening is off (plain trilinear interpolation).
    tgc_db_cm_mhz : float
        Time-gain compensation: gain 2 * tgc * fc * depth dB (0 turns it off).
    gain_db, dynamic_range_db : float
        Log compression: ``bmode = clip((20 log10(envelope) + gain_db + DR) / DR, 0, 1)``.
    pixel_mm : float, optional
        Pixel spacing of the scan-converted image (default: the image's axial extent divided into
        ``n_samples // 2`` rows, ``(z1 - z0) / (n_samples // 2)`` with ``x0, x1, z0, z1 =
        probe.image_extent_mm()``; for a convex probe ``z0 < 0`` (the fan's edges start behind the array
        centre), so the pixels are larger than depth / (n_samples / 2)).
    background : sequence of 5 floats
        Properties outside the volume (default water).
    return_lines : bool
        Also return the envelope and complex IQ scanlines.
    max_bytes : int, optional
        Memory allowance in bytes (> 0, finite; default 80 % of the free memory of the device).
    volume_index : sequence of int or Tensor, optional
        ``(B,)``: pose b images volume ``volume_index[b]`` of ``props``. The volumes share the grid
        ``affine`` (for example tissue-parameter variants of one anatomy, or the frames of a 4D
        volume), and any number of poses may image each, all in one call (one kernel launch instead of
        one per volume). Checked on the host: a GPU tensor is copied to the CPU first (a device sync),
        so pass a list or a CPU tensor. The speckle is that of ``seed`` in every volume, anchored in the
        world: over the frames of a moving 4D volume the tissue moves and its speckle does not (no
        speckle tracking or elastography: those need scatterers that move with the tissue).
    scan_convert : bool
        False: skip the scan conversion (``bmode`` is None) for callers that resample ``lines_db``
        themselves (the classification renderer does, to its own image grid).

    Returns
    -------
    SimulationResult
    """
    if not torch.compiler.is_compiling() and _functorch.peek_interpreter_stack() is not None:
        raise NotImplementedError(
            "medfast.ultrasound.simulate does not run under torch.func transforms (vmap, grad, jvp, ...; no "
            "forward-mode derivative either): it reads the poses on the host and caches probe tables; give it a batch "
            "of poses ((B, 4, 4), with volume_index for several volumes) and differentiate in reverse mode "
            "(.backward() or torch.autograd.grad)")
    refuse_function_transforms("medfast.ultrasound.simulate", props, pose)
    if torch.compiler.is_exporting():
        raise RuntimeError(
            "medfast.ultrasound.simulate cannot be traced by torch.export: it reads the pose and the affine on the "
            "host (rigidity checks, cached probe tables); export the network around it and call simulate eagerly "
            "(torch.compile without fullgraph works)")
    props = _check_props(props)
    probe = _check_probe(probe)
    a, inv_a64, voxel_mm = _affine_info(affine)
    pose, host_pose = _check_pose(pose, props.dtype, props.device)
    # skipped when compiled (host values are symbolic) and inside sweep_checked() (the caller checked all batches)
    if not torch.compiler.is_compiling() and not getattr(_SWEEP_CHECKED, "on", False):
        check_meets_volume(host_pose, inv_a64.numpy(), props.shape[2:], probe)
    speckle = check_bool("speckle", speckle)
    return_lines = check_bool("return_lines", return_lines)
    scan_convert = check_bool("scan_convert", scan_convert)
    # NumPy scalars and 0-d tensors as the Python numbers they hold (docs/api/interop.md)
    seed, max_bytes = py_scalar(seed), py_scalar(max_bytes)
    sub_rays = sub_rays if isinstance(sub_rays, str) else py_scalar(sub_rays)
    scatter_cell_mm, interface_mm, pixel_mm = py_scalar(scatter_cell_mm), py_scalar(interface_mm), py_scalar(pixel_mm)
    tgc_db_cm_mhz, gain_db, dynamic_range_db = py_scalar(tgc_db_cm_mhz), py_scalar(gain_db), py_scalar(dynamic_range_db)
    if sub_rays != "slice" and (not isinstance(sub_rays, numbers.Integral) or isinstance(sub_rays, bool)
                                or sub_rays < 1):
        raise ValueError(f"sub_rays must be an int >= 1 or 'slice', got {sub_rays!r}")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed must be an int (64-bit), got {seed!r}")
    seed = int(seed)
    # NaN never compared as too little (no limit at all), a negative or zero allowance refused every call unnamed
    if max_bytes is not None and not (isinstance(max_bytes, numbers.Real) and not isinstance(max_bytes, bool)
                                      and 0 < max_bytes < math.inf):
        raise ValueError(f"max_bytes must be a positive, finite number of bytes (or None), got {max_bytes!r}")
    if scatter_cell_mm is None:
        scatter_cell_mm = probe.wavelength_mm / 2
    for name, value, positive in (("dynamic_range_db", dynamic_range_db, True), ("interface_mm", interface_mm, True),
                                  ("scatter_cell_mm", scatter_cell_mm, True), ("gain_db", gain_db, False),
                                  ("tgc_db_cm_mhz", tgc_db_cm_mhz, False), ("pixel_mm", pixel_mm, True)):
        if value is None and name in ("interface_mm", "pixel_mm"):
            continue
        if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
                and (value > 0 or not positive)):
            raise ValueError(f"{name} must be a {'positive ' if positive else ''}finite number, got {value!r}")
    try:
        bg = [float(v) for v in background]
    except (TypeError, ValueError):
        raise ValueError(f"background must be {N_PROPS} numbers {PROP_NAMES}, got {background!r}") from None
    if sub_rays == "slice":
        sub_rays = slice_sub_rays(probe, scatter_cell_mm)
    sub_rays = int(sub_rays)
    if len(bg) != N_PROPS or not all(math.isfinite(v) for v in bg):
        raise ValueError(f"background must be {N_PROPS} finite numbers {PROP_NAMES}, got {background!r}")
    if not (bg[0] > 0 and bg[1] >= 0 and bg[2] >= 0):  # reflection coefficients need a positive impedance
        raise ValueError(f"background impedance must be > 0 and its attenuation and density >= 0 {PROP_NAMES}, "
                         f"got {background!r}")
    B = pose.shape[0]
    index = _check_volume_index(volume_index, B, props.shape[0], props.device)
    if index is None and props.shape[0] not in (1, B):
        raise ValueError(f"props batch ({props.shape[0]}) must be 1 or the number of poses ({B}), "
                         "or give a volume_index")
    _check_memory(B, probe, sub_rays, props.dtype, props.device, max_bytes, pixel_mm if scan_convert else False)
    # in the props' dtype whatever autocast says (a bf16 matmul of the pose moved echoes by 0.3 mm, 36 dB)
    with torch.autocast(props.device.type, enabled=False) if props.device.type in ("cpu", "cuda") else \
            contextlib.nullcontext():
        return _simulate(props, pose, (a, inv_a64, voxel_mm), probe, seed, sub_rays, speckle, scatter_cell_mm,
                         interface_mm, tgc_db_cm_mhz, gain_db, bg, index, return_lines, scan_convert,
                         dynamic_range_db, pixel_mm)


def _simulate(props, pose, affine_info, probe, seed, sub_rays, speckle, scatter_cell_mm, interface_mm, tgc_db_cm_mhz,
              gain_db, bg, index, return_lines, scan_convert, dynamic_range_db, pixel_mm) -> SimulationResult:
    lines_db, i_re, i_im, gain_lin = _scanlines(
        props, pose, affine_info, probe, seed=seed, sub_rays=sub_rays, speckle=speckle,
        scatter_cell_mm=scatter_cell_mm, interface_mm=interface_mm, tgc_db_cm_mhz=tgc_db_cm_mhz, gain_db=gain_db,
        background=bg, volume_index=index, return_gain=return_lines)
    dev, dt = props.device, props.dtype
    in_place = not (torch.is_grad_enabled() and lines_db.requires_grad)
    if scan_convert:
        if in_place:
            scan = torch.add(lines_db, dynamic_range_db).div_(dynamic_range_db).clamp_(0.0, 1.0)
        else:
            scan = ((lines_db + dynamic_range_db) / dynamic_range_db).clamp(0.0, 1.0)
        bmode, px = _scan_convert(scan, probe, pixel_mm)
    else:
        bmode, px = None, _cached("grid", probe, 1, str(dev), dt, pixel_mm)[1]
    x0, x1, z0, z1 = probe.image_extent_mm()
    (H, W), _ = probe.image_shape(pixel_mm)
    extent = (x0, x0 + (W - 1) * px, z0, z0 + (H - 1) * px)
    env = iq = None
    if return_lines:
        iq = torch.complex(i_re, i_im)
        if gain_lin is not None:
            iq = iq * gain_lin
        env = torch.sqrt(iq.real.square() + iq.imag.square() + 1e-30)
    return SimulationResult(bmode=bmode, pixel_mm=px, extent_mm=extent, lines_db=lines_db, envelope=env, iq=iq)


def simulate_ct(ct: torch.Tensor, affine, pose: torch.Tensor, probe: Probe | str, *, knots=HU_KNOTS,
                **kwargs) -> SimulationResult:
    """:func:`simulate` from a CT volume ``(B, 1, D, H, W)`` in Hounsfield units (differentiable in the
    CT and in ``knots``, see :func:`~medfast.ultrasound.tissue.hu_to_properties`)."""
    if isinstance(ct, torch.Tensor) and ct.dtype in (torch.float16, torch.bfloat16):
        raise TypeError(f"ct must be float32 or float64 (or integer HU), got {ct.dtype}")
    return simulate(hu_to_properties(ct, knots), affine, pose, probe, **kwargs)


def simulate_labels(labels: torch.Tensor, table: LabelTable, affine, pose: torch.Tensor, probe: Probe | str, *,
                    dtype: torch.dtype | None = None, **kwargs) -> SimulationResult:
    """:func:`simulate` from an integer label map ``(B, 1, D, H, W)`` (or a floating one holding whole numbers)
    and a per-label property table (differentiable in the table values).

    ``dtype`` (torch.float32 or torch.float64) is the precision of the property maps and so of the simulation;
    default None: the table's dtype (float32 for a float16 / bfloat16 table), as :func:`simulate_ct` follows its
    CT's. The label map becomes properties per voxel, which the march then interpolates (docs/ultrasound.md)."""
    if not isinstance(table, LabelTable):
        raise TypeError(f"table must be a LabelTable, got {type(table).__name__}")
    if dtype is None:
        # the table's precision (a float64 table ran in float32 before); a half table as before
        dtype = table.values.dtype if table.values.dtype in (torch.float32, torch.float64) else torch.float32
    elif dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32, torch.float64 or None (the table's), got {dtype!r}")
    return simulate(table.properties(labels, dtype=dtype), affine, pose, probe, **kwargs)
