"""Simulated freehand ultrasound for classification: labelled B-mode frames rendered on the fly, on the
training device, from real brain volumes at randomized probe poses around a few "standard planes".

How a sample is made (see ``docs/classification.md``):

1. The data set item is only a *descriptor* drawn from the sample's seed: the volume, the standard plane
   (the class), six pose perturbations, the probe preset, the tissue variant and the gain / dynamic range.
2. :meth:`SimulatedUltrasound.render` turns a batch of descriptors into images on the device: the probe pose
   (the plane's target point in the brain, perturbed, and the probe moved back along the beam onto the
   brain surface plus a gel gap), one simulation per (volume, probe) group (the tissue variants picked by
   the volume index), per-sample log compression and scan conversion to ``image_shape``; on a GPU the
   whole batch is one CUDA graph replay (:meth:`SimulatedUltrasound.render`).

Each image depends on its descriptor only (not on the rest of the batch), so DDP with ``R`` processes sees
exactly the images one process sees on the combined batch.

Volumes (``volumes`` / ``val_volumes``): ``mni152`` (nilearn wheel), ``colin27`` (Debian ``mricron-data``),
``itk_kmeans`` (Debian ``insighttoolkit5-examples``), ``phantom:<seed>`` (a synthetic ellipsoidal brain
made here, for tests), or ``{"name": ..., "path": T1.nii.gz, "mask": optional mask.nii.gz}``. T1 intensities
are divided by the 99th percentile inside the brain mask and mapped to acoustic properties by
:data:`T1_KNOTS` (jittered per tissue variant); outside the mask is water (coupling gel).

Held-out poses: every pose perturbation ``u`` in ``[-1, 1]`` is drawn from one of ``pose_bins`` equal bins;
training uses the even bins, the held-out-pose set the odd ones, so no validation pose parameter lies in a
range seen in training (so ``pose_bins >= 2``). Held-out volumes: ``val_volumes`` are never rendered for
training, and none may be a training volume (same name or file).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medfast.data import DatasetError
from medfast.data.presets import ITK_DATA, MRICRON, _mni_files
from medfast.ultrasound.simulate import retain_cached
from medfast.ultrasound.sweep import _rotation as _torch_rotation

__all__ = ["PLANES", "T1_KNOTS", "SimulatedPlaneDataset", "SimulatedUltrasound", "load_brain_volume"]


#: Standard planes: ``(target, beam direction, lateral direction)`` in RAS. The target is a point of the
#: brain given as a fraction of the brain's half extent from its centre along R, A, S; the probe sits on the
#: brain surface where the beam line through the target enters, looking along ``direction`` with its array
#: along ``lateral``.
PLANES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, float, float]]] = {
    # through a temporal window (probe on the right side, beam to the left, array front-back): axial images
    "axial_high": ((0.0, 0.0, 0.30), (-1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),    # lateral ventricles level
    "axial_low": ((0.0, 0.0, -0.30), (-1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),    # temporal lobes / cerebellum
    # from the vertex (beam downwards)
    "coronal": ((0.0, 0.05, 0.0), (0.0, 0.0, -1.0), (1.0, 0.0, 0.0)),       # array left-right
    "sagittal": ((0.08, 0.05, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),     # array front-back, paramedian
}

#: T1 intensity (divided by the 99th percentile in the brain) -> (impedance MRayl, attenuation dB/cm/MHz,
#: scatterer density, scatter amplitude mean, spread), the knots format of
#: :func:`medfast.ultrasound.hu_to_properties`. 0: water (gel outside the brain, CSF); ~0.7: grey matter;
#: ~0.95: white matter (scatter about 10 dB brighter). Brain ~1.56-1.60 MRayl, 0.5-0.65 dB/cm/MHz (Duck 1990).
T1_KNOTS: tuple[tuple[float, ...], ...] = (
    (0.00, 1.480, 0.002, 0.00, 0.000, 0.0000),
    (0.35, 1.515, 0.100, 0.20, 0.003, 0.0010),
    (0.65, 1.560, 0.500, 1.00, 0.008, 0.0020),
    (0.80, 1.575, 0.550, 1.00, 0.012, 0.0030),
    (0.92, 1.600, 0.650, 1.00, 0.025, 0.0060),
    (4.00, 1.600, 0.650, 1.00, 0.025, 0.0060),
)

_INSTALL = {
    "mni152": "pip install nilearn",
    "colin27": "apt-get install mricron-data",
    "itk_kmeans": "apt-get install insighttoolkit5-examples",
}


@dataclass
class BrainVolume:
    """A brain volume ready for the simulator.

    Attributes
    ----------
    name : str
    intensity : Tensor
        ``(D, H, W)`` float32 T1 divided by its 99th percentile inside the mask, 0 outside.
    mask : ndarray
        ``(D, H, W)`` bool brain mask.
    affine : ndarray
        ``(4, 4)`` voxel-to-world (mm); voxel axes along R, A, S.
    centre, half_extent : ndarray
        ``(3,)`` world (RAS, mm) centre of the mask's bounding box and its half size.
    """

    name: str
    intensity: torch.Tensor
    mask: np.ndarray
    affine: np.ndarray
    centre: np.ndarray
    half_extent: np.ndarray


def _nifti_ras(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    from medfast.data.io import load_checked, unsupported_voxels

    img = load_checked(path)  # before as_closest_canonical reads .dataobj (what a lying header claims)
    try:
        img = nib.as_closest_canonical(img)
        problem = unsupported_voxels(img.get_data_dtype())  # complex: the cast below would keep the real part
        data = None if problem else np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
        raise DatasetError(f"{path}: cannot read the volume ({type(exc).__name__}: {exc})") from exc
    if problem:
        raise DatasetError(f"{path}: {problem}")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DatasetError(f"{path}: expected a 3D volume, got shape {data.shape}")
    if not np.isfinite(data).all():  # (a NaN background, as SPM writes, stayed NaN through the mask: NaN frames)
        raise DatasetError(f"{path}: the volume holds NaN or inf voxels (as the other readers, medfast does not "
                           f"guess what they stand for: replace them, e.g. with 0, first)")
    return data, np.asarray(img.affine, dtype=np.float64)


def _phantom(seed: int, size: int = 72, voxel: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A synthetic 'brain': an ellipsoid of grey matter around a white-matter core, two CSF ventricles
    above the centre and a bright 'cerebellum' at the back, with random sizes (seeded)."""
    rng = np.random.default_rng(seed)
    g = (np.arange(size) - (size - 1) / 2) * voxel
    x, y, z = np.meshgrid(g, g, g, indexing="ij")  # R, A, S (mm)
    r = np.array([62.0, 75.0, 55.0]) * rng.uniform(0.9, 1.1, 3)
    brain = (x / r[0]) ** 2 + (y / r[1]) ** 2 + (z / r[2]) ** 2 <= 1
    core = (x / (0.7 * r[0])) ** 2 + (y / (0.75 * r[1])) ** 2 + ((z - 0.1 * r[2]) / (0.6 * r[2])) ** 2 <= 1
    t1 = np.where(brain, 0.6, 0.0) + np.where(core, 0.3, 0.0)
    for side in (-1, 1):  # ventricles
        v = ((x - side * 0.15 * r[0]) / (0.08 * r[0])) ** 2 + (y / (0.35 * r[1])) ** 2 \
            + ((z - 0.25 * r[2]) / (0.15 * r[2])) ** 2 <= 1
        t1[v] = 0.1
    cb = (x / (0.5 * r[0])) ** 2 + ((y + 0.7 * r[1]) / (0.25 * r[1])) ** 2 \
        + ((z + 0.55 * r[2]) / (0.3 * r[2])) ** 2 <= 1
    t1[cb & brain] = 1.0
    t1 = (t1 + rng.normal(0, 0.03, t1.shape)) * brain
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = g[0]
    return t1.astype(np.float32), brain, affine


def load_brain_volume(spec: str | Mapping[str, Any], voxel_mm: float | None = 2.0) -> BrainVolume:
    """Loads a brain volume (see the module docstring for ``spec``) in RAS, resampled to ``voxel_mm``
    isotropic voxels (None: as stored).

    Raises
    ------
    DatasetError
        Unknown name, missing file (with how to install it), unreadable or empty volume; names the file.
    """
    if isinstance(spec, Mapping):
        if "path" not in spec:
            raise DatasetError(f"volume {dict(spec)}: a volume mapping needs a 'path' (T1 NIfTI) and optionally "
                               "'mask' and 'name'")
        path = Path(spec["path"])
        name = str(spec.get("name", path.name.split(".")[0]))
        if not path.is_file():
            raise DatasetError(f"{path}: volume file not found")
        t1, affine = _nifti_ras(path)
        mask = None
        if spec.get("mask"):
            mpath = Path(spec["mask"])
            if not mpath.is_file():
                raise DatasetError(f"{mpath}: mask file not found")
            m, _ = _nifti_ras(mpath)
            if m.shape != t1.shape:
                raise DatasetError(f"{mpath}: mask shape {m.shape} differs from the volume's {t1.shape}")
            mask = m > 0
    elif isinstance(spec, str) and spec.startswith("phantom"):
        try:
            seed = int(spec.split(":", 1)[1]) if ":" in spec else 0
        except ValueError:
            raise DatasetError(f"volume {spec!r}: expected 'phantom:<integer seed>'") from None
        name = spec
        t1, mask, affine = _phantom(seed)
    elif isinstance(spec, str) and spec in _INSTALL:
        name = spec
        if spec == "mni152":
            path, mpath = _mni_files("volume 'mni152'")["t1"], None
        elif spec == "colin27":
            path, mpath = MRICRON / "ch2bet.nii.gz", None
        else:
            path, mpath = ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz", ITK_DATA / "KmeansTest_T1RawSkullStrip.nii.gz"
        for p in (path, mpath):
            if p is not None and not p.is_file():
                raise DatasetError(f"{p}: file of volume {spec!r} not found; install it with `{_INSTALL[spec]}` "
                                   "(scripts/data.sh does)")
        t1, affine = _nifti_ras(path)
        mask = _nifti_ras(mpath)[0] > 0 if mpath is not None else None
    else:
        raise DatasetError(f"unknown volume {spec!r}; built-in volumes: {', '.join(_INSTALL)}, phantom:<seed>; "
                           "or a mapping {name, path, mask}")
    if mask is None:
        mask = t1 > 0
    if mask.sum() < 27:
        raise DatasetError(f"volume {name!r}: the brain mask is empty (no voxel > 0)")
    vol = torch.from_numpy(np.ascontiguousarray(t1 * mask, dtype=np.float32))
    m = torch.from_numpy(mask.astype(np.float32))
    if voxel_mm is not None:
        zooms = np.linalg.norm(affine[:3, :3], axis=0)
        size = [max(2, int(round((n - 1) * z / voxel_mm)) + 1) for n, z in zip(vol.shape, zooms, strict=True)]
        vol = F.interpolate(vol[None, None], size=size, mode="trilinear", align_corners=True)[0, 0]
        m = F.interpolate(m[None, None], size=size, mode="trilinear", align_corners=True)[0, 0]
        scale = np.array([(n - 1) / max(1, s - 1) for n, s in zip(t1.shape, size, strict=True)] + [1.0])
        affine = affine @ np.diag(scale)
    mask = (m > 0.5).numpy()
    vol = vol * torch.from_numpy(mask)
    p99 = float(np.percentile(vol.numpy()[mask], 99))
    if not p99 > 0:
        raise DatasetError(f"volume {name!r}: no positive intensity inside the brain mask")
    vol = (vol / p99).float().contiguous()
    world = _mask_extremes(mask) @ affine[:3, :3].T + affine[:3, 3]
    lo, hi = world.min(0), world.max(0)
    return BrainVolume(name, vol, mask, affine, (lo + hi) / 2, (hi - lo) / 2)


def _mask_extremes(mask: np.ndarray) -> np.ndarray:
    """``(n, 3)`` voxel indices whose world bounding box is that of every voxel of ``mask``: the first and last
    mask voxel of each line along the last axis (a linear map is extreme at a line's ends). The world box of the
    voxel-index box (``affine @ idx.min(0)``, ``affine @ idx.max(0)``) is that only for an axis-aligned affine; an
    oblique one (which ``as_closest_canonical`` keeps) moved the plane targets by tens of percent."""
    rows = mask.any(2)
    i, j = np.nonzero(rows)
    first = mask.argmax(2)[i, j]
    last = mask.shape[2] - 1 - mask[:, :, ::-1].argmax(2)[i, j]
    return np.concatenate([np.stack([i, j, first], 1), np.stack([i, j, last], 1)]).astype(np.float64)


def _finite(name: str, value: Any, low: float | None = None, strict: bool = False) -> float:
    """``value`` as a finite float ``>= low`` (``> low`` if ``strict``); ValueError naming ``name`` otherwise."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or (low is not None and (v <= low if strict else v < low)):
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return v


def _range(name: str, value: Any, low: float | None = None, strict: bool = False) -> tuple[float, float]:
    """``value`` as a ``(lo, hi)`` range of finite floats, ``lo <= hi``, both ``>= low`` (``> low``)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence | np.ndarray) or len(value) != 2:
        raise ValueError(f"{name} must be a range [low, high] of 2 numbers, got {value!r}")
    lo, hi = (_finite(name, v, low, strict) for v in value)
    if lo > hi:
        raise ValueError(f"{name} must be [low, high] with low <= high, got {list(value)}")
    return lo, hi


def _int(name: str, value: Any, low: int) -> int:
    """``value`` as an integer ``>= low`` (an integral float such as YAML's ``4.0`` too; not a fraction, which
    ``int()`` truncated, nor a string, None or NaN); ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer | float | np.floating) \
            or not math.isfinite(value) or int(value) != value or int(value) < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _names(name: str, value: Any) -> list:
    """A list argument given as a string (``planes: coronal``) is an error, not a list of characters."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence | np.ndarray):
        raise ValueError(f"{name} must be a list, got {value!r}")
    return list(value)


def _samples_in_box(start: np.ndarray, direction: np.ndarray, t: np.ndarray, shape: np.ndarray) -> int:
    """How many leading samples ``t`` (ascending) any of the lines ``start + t direction`` ((b, 3) each, voxel
    units) needs: past the returned count every line lies outside ``[-1, shape]`` on some axis, so each sample
    there rounds outside the volume ``shape``. The box is half a voxel wider than rounding needs."""
    with np.errstate(divide="ignore", invalid="ignore"):
        a = (-1.0 - start) / direction
        b = (shape - start) / direction
    flat = direction == 0  # parallel to a face: inside for every t, or for none
    inside_flat = (start >= -1.0) & (start <= shape)
    lo = np.where(flat, np.where(inside_flat, -np.inf, np.inf), np.minimum(a, b)).max(axis=1)
    hi = np.where(flat, np.where(inside_flat, np.inf, -np.inf), np.maximum(a, b)).min(axis=1)
    hi = hi[lo <= hi]
    return int(np.searchsorted(t, hi.max(), side="right")) if hi.size else 0


def _rotation(axis: int, angle: np.ndarray) -> np.ndarray:
    return _torch_rotation(axis, torch.from_numpy(np.asarray(angle, dtype=np.float64))).numpy()


def _bin_uniform(rng: np.random.Generator, n: int, bins: int, split: str) -> np.ndarray:
    """``n`` values in [-1, 1] drawn from the even (``train``), odd (``held_out``) or all (``all``) of
    ``bins`` equal bins."""
    if split == "all" or bins <= 1:
        return rng.uniform(-1, 1, n)
    allowed = np.arange(0 if split == "train" else 1, bins, 2)
    b = rng.choice(allowed, n)
    return (b + rng.uniform(0, 1, n)) / bins * 2 - 1


def _volume_identity(spec: Any) -> tuple[str | None, str | None]:
    """``(name, source)`` of a volume spec without reading it: the name :func:`load_brain_volume` gives it and
    the resolved T1 file (or ``phantom:<seed>``); None where it cannot be told (the loader reports that)."""
    import os

    if isinstance(spec, Mapping):
        if not spec.get("path"):
            return (str(spec["name"]) if "name" in spec else None), None
        path = Path(spec["path"])
        return str(spec.get("name", path.name.split(".")[0])), os.path.realpath(path)
    if not isinstance(spec, str):
        return None, None
    if spec.startswith("phantom"):
        try:
            return spec, f"phantom:{int(spec.split(':', 1)[1]) if ':' in spec else 0}"
        except ValueError:
            return spec, None
    files = {"colin27": MRICRON / "ch2bet.nii.gz", "itk_kmeans": ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz"}
    if spec == "mni152":
        try:
            files[spec] = _mni_files("volume 'mni152'")["t1"]
        except DatasetError:
            pass
    return spec, (os.path.realpath(files[spec]) if spec in files else None)


def _training_volume_reused(volumes: Sequence[Any], val_volumes: Sequence[Any]) -> str | None:
    """The error message when a held-out volume is also a training volume (same name or same file), else None:
    ``held_out_volumes`` would then report accuracy on training data."""
    train = [_volume_identity(v) for v in volumes]
    for v in val_volumes:
        name, source = _volume_identity(v)
        for tname, tsource in train:
            # the files when both are known (subject_1/T1.nii.gz and subject_2/T1.nii.gz share a name, not a
            # volume), else the names
            same = source == tsource if source is not None and tsource is not None else name == tname
            if not same or name is None:
                continue
            if name == tname:
                return f"val_volumes: {name!r} is also a training volume; held-out volumes must not be in volumes"
            return (f"val_volumes: {name!r} is the training volume {tname!r} (same source {source}); held-out "
                    "volumes must not be in volumes")
    return None


class SimulatedUltrasound:
    """Configuration, volumes and the on-device renderer of the simulated standard-plane data.

    Parameters
    ----------
    volumes : sequence
        Training volumes (names or mappings, see :func:`load_brain_volume`).
    val_volumes : sequence
        Held-out volumes (validation only); a training volume (same name or same file) is a ValueError.
    planes : sequence of str
        Class names, keys of :data:`PLANES` (or of ``custom_planes``).
    custom_planes : mapping, optional
        More planes: ``name: [[target R, A, S], [direction], [lateral]]``.
    probes : sequence of str
        Probe presets drawn uniformly per sample (``medfast.ultrasound.Probe.presets()``).
    depth_mm, n_lines, n_samples, sub_rays : float, int, int, int
        Imaging depth and the simulation's resolution (lines x samples, elevation sub-rays).
    image_shape : sequence of 2 int
        ``(H, W)`` of the rendered images (the scan-converted sector is resampled to it).
    voxel_mm : float
        Isotropic voxel size the volumes are resampled to.
    variants : int
        Tissue-parameter variants per volume (:data:`T1_KNOTS` jittered: impedance, attenuation x 0.7-1.3,
        scatter amplitudes x exp(N(0, 0.3))); each sample draws one.
    max_rotation_deg, max_shift_mm, max_lateral_mm : float
        Largest tilt/rock/twist about the plane's probe axes; largest shift along the plane normal
        (elevation) and along the array.
    gel_mm : sequence of 2 float
        Range of the gap between the probe and the brain surface.
    pose_bins : int
        Bins of each pose perturbation for the pose split (even: training, odd: held out); at least 2 for the
        ``held_out_poses`` set (with 1 it would be the training distribution).
    gain_db, dynamic_range_db : sequence of 2 float
        Ranges of the log-compression gain and dynamic range.
    tgc_db_cm_mhz : float
        Time-gain compensation (matches the brain's attenuation by default).
    normalize : {"none", "minmax", "zscore"}
        Per-image intensity normalization after rendering (B-mode is in [0, 1]).
    seed : int
        Seed of the tissue variants and of the validation descriptors.
    cuda_graphs : bool
        On a GPU, render each batch by replaying a CUDA graph (see :meth:`render`); False: one eager
        simulation per (volume, probe) group.
    """

    def __init__(self, volumes: Sequence[Any] = ("mni152", "colin27"), val_volumes: Sequence[Any] = ("itk_kmeans",),
                 planes: Sequence[str] = tuple(PLANES), custom_planes: Mapping[str, Any] | None = None,
                 probes: Sequence[str] = ("C5-2v", "P4-2v"), depth_mm: float = 90.0, n_lines: int = 64,
                 n_samples: int = 128, sub_rays: int = 2, image_shape: Sequence[int] = (64, 64),
                 voxel_mm: float = 2.0, variants: int = 3, max_rotation_deg: float = 12.0,
                 max_shift_mm: float = 8.0, max_lateral_mm: float = 8.0, gel_mm: Sequence[float] = (1.0, 5.0),
                 pose_bins: int = 4, gain_db: Sequence[float] = (-4.0, 4.0),
                 dynamic_range_db: Sequence[float] = (45.0, 60.0), tgc_db_cm_mhz: float = 0.6,
                 normalize: str = "none", seed: int = 0, cuda_graphs: bool = True) -> None:
        from medfast.ultrasound import Probe

        self.plane_table = dict(PLANES)
        if custom_planes is not None and not isinstance(custom_planes, Mapping):
            raise ValueError(f"custom_planes must be a mapping name: [[target], [direction], [lateral]], got "
                             f"{custom_planes!r}")
        for name, spec in (custom_planes or {}).items():
            try:
                arr = np.asarray(spec, dtype=np.float64)
            except (TypeError, ValueError):
                arr = np.zeros(0)
            if arr.shape != (3, 3) or not np.isfinite(arr).all():
                raise ValueError(f"custom_planes[{name!r}] must be [[target], [direction], [lateral]] (3 x 3 finite "
                                 f"numbers), got {spec!r}")
            d, lat = arr[1], arr[2]
            if not np.linalg.norm(d) > 1e-9:
                raise ValueError(f"custom_planes[{name!r}]: the beam direction {d.tolist()} is zero")
            z = d / np.linalg.norm(d)
            if not np.linalg.norm(lat - (lat @ z) * z) > 1e-6 * max(1.0, float(np.linalg.norm(lat))):
                raise ValueError(f"custom_planes[{name!r}]: the lateral direction {lat.tolist()} is zero or parallel "
                                 f"to the beam direction {d.tolist()}")
            self.plane_table[str(name)] = tuple(tuple(r) for r in arr)
        planes = [str(p) for p in _names("planes", planes)]
        volumes, probes = _names("volumes", volumes), _names("probes", probes)
        val_volumes = _names("val_volumes", val_volumes) if val_volumes is not None else []
        for p in planes:
            if p not in self.plane_table:
                raise ValueError(f"unknown plane {p!r} in planes; known: {', '.join(self.plane_table)}")
        if len(planes) < 2 or len(set(planes)) != len(planes):
            raise ValueError(f"planes must name at least 2 distinct planes, got {planes}")
        if not volumes:
            raise ValueError("volumes is empty: name at least one training volume")
        if normalize not in ("none", "minmax", "zscore"):
            raise ValueError(f"normalize must be 'none', 'minmax' or 'zscore', got {normalize!r}")
        # (a string "88" was read as (8, 8), (40.9, 40) as (40, 40))
        if isinstance(image_shape, (str, bytes)) or not isinstance(image_shape, Sequence | np.ndarray) \
                or len(image_shape) != 2:
            raise ValueError(f"image_shape must be 2 sizes >= 8, got {image_shape!r}")
        image_shape = tuple(_int(f"image_shape[{i}]", s, 8) for i, s in enumerate(image_shape))
        variants, pose_bins = _int("variants", variants, 1), _int("pose_bins", pose_bins, 1)
        # a raw int() / float() of these gave a TypeError naming no argument, and truncated fractions
        n_lines, n_samples = _int("n_lines", n_lines, 2), _int("n_samples", n_samples, 2)
        depth_mm = _finite("depth_mm", depth_mm, 0.0, strict=True)
        seed = _int("seed", seed, 0)  # NumPy's default_rng takes non-negative seeds
        reused = _training_volume_reused(volumes, val_volumes)
        if reused:
            raise ValueError(reused)
        sub_rays = _int("sub_rays", sub_rays, 1)
        if voxel_mm is not None:
            voxel_mm = _finite("voxel_mm", voxel_mm, 0.0, strict=True)
        max_rotation_deg = _finite("max_rotation_deg", max_rotation_deg, 0.0)
        max_shift_mm = _finite("max_shift_mm", max_shift_mm, 0.0)
        max_lateral_mm = _finite("max_lateral_mm", max_lateral_mm, 0.0)
        tgc_db_cm_mhz = _finite("tgc_db_cm_mhz", tgc_db_cm_mhz, 0.0)
        gel_mm = _range("gel_mm", gel_mm, 0.0)
        gain_db = _range("gain_db", gain_db)
        dynamic_range_db = _range("dynamic_range_db", dynamic_range_db, 0.0, strict=True)
        if not probes:
            raise ValueError("probes is empty: name at least one preset")
        self.planes = planes
        self.probes = [Probe.preset(str(p), depth_mm=float(depth_mm), n_lines=int(n_lines),
                                    n_samples=int(n_samples)) for p in probes]
        self.probe_names = [str(p) for p in probes]
        self.sub_rays, self.image_shape = int(sub_rays), tuple(int(s) for s in image_shape)
        self.variants, self.pose_bins, self.seed = int(variants), int(pose_bins), int(seed)
        self.max_rot = math.radians(float(max_rotation_deg))
        self.max_shift, self.max_lateral = float(max_shift_mm), float(max_lateral_mm)
        self.gel = tuple(float(v) for v in gel_mm)
        self.gain, self.dr = tuple(float(v) for v in gain_db), tuple(float(v) for v in dynamic_range_db)
        self.normalize, self.tgc = normalize, float(tgc_db_cm_mhz)
        self.train_volumes = [load_brain_volume(v, voxel_mm) for v in volumes]
        self.val_volumes = [load_brain_volume(v, voxel_mm) for v in (val_volumes or ())]
        self.volumes = self.train_volumes + self.val_volumes
        self._props: dict[tuple[int, int, str], torch.Tensor] = {}
        self._grids: dict[tuple[int, str], torch.Tensor] = {}
        self._masks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._frames: tuple[np.ndarray, np.ndarray] | None = None  # _plane_frames
        self.cuda_graphs, self.graph_replays = bool(cuda_graphs), 0
        # (device, batch size, groups) -> (graph, its input, its output); and how often each key came
        self._graphs: dict[tuple, tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self._seen: dict[tuple, int] = {}

    @classmethod
    def check_args(cls, args: Mapping[str, Any]) -> set[str]:
        """Raises :class:`~medfast.train.ConfigError` naming unknown ``data.dataset_args`` keys; returns the
        constructor's keys."""
        import inspect

        from medfast.train.config import ConfigError

        params = inspect.signature(cls.__init__).parameters
        known = set(params) - {"self", "image_shape", "normalize", "seed"}
        extra = {"samples_per_epoch", "val_samples", "classes"}
        unknown = sorted(set(args) - known - extra)
        if unknown:
            raise ConfigError(f"data.dataset_args: unknown key(s) {unknown} for dataset 'simulated_ultrasound'; "
                              f"valid: {', '.join(sorted(known | extra))}")
        # the task always validates on held_out_poses and held_out_volumes: neither may be training data
        vols, vals = (args.get(k, params[k].default) for k in ("volumes", "val_volumes"))
        if isinstance(vols, Sequence) and not isinstance(vols, str) and isinstance(vals, Sequence) \
                and not isinstance(vals, str):
            reused = _training_volume_reused(vols, vals)
            if reused:
                raise ConfigError(f"data.dataset_args.{reused}")
        bins = args.get("pose_bins", params["pose_bins"].default)
        # any number (YAML's 1.0 is a float, which passed here and failed later in the data set); a non-number
        # or a fraction is the constructor's error
        if isinstance(bins, int | float | np.integer | np.floating) and not isinstance(bins, bool) and bins < 2:
            raise ConfigError(f"data.dataset_args.pose_bins={bins}: the held_out_poses validation set needs "
                              "pose_bins >= 2 (training draws the even bins, held_out_poses the odd ones)")
        return known

    @classmethod
    def from_args(cls, args: Mapping[str, Any], image_shape: Sequence[int] | None, normalize: str,
                  seed: int) -> SimulatedUltrasound:
        """From ``data.dataset_args`` (keys as the constructor's; ``samples_per_epoch`` and ``val_samples``
        are read by the task) plus ``data.shape`` and ``data.normalize``."""
        known = cls.check_args(args)
        kw = {k: v for k, v in args.items() if k in known}
        return cls(**kw, image_shape=image_shape or (64, 64), normalize=normalize, seed=seed)

    # ---- data sets ------------------------------------------------------------------------------------
    def train_dataset(self, samples_per_epoch: int = 1024) -> SimulatedPlaneDataset:
        """Training descriptors: the training volumes, training pose bins. ``samples_per_epoch`` must be at
        least planes x training volumes (balanced exactly for a multiple of it, see
        :class:`SimulatedPlaneDataset`)."""
        return SimulatedPlaneDataset(self, list(range(len(self.train_volumes))), samples_per_epoch, "train", "train",
                                     length_name="samples_per_epoch")

    def validation_datasets(self, samples: int = 64) -> list[SimulatedPlaneDataset]:
        """``held_out_poses`` (training volumes, held-out pose bins) and, if there are ``val_volumes``,
        ``held_out_volumes`` (those volumes, all poses): fixed descriptors (seeded by the index), ``samples``
        each (at least planes x the set's volumes, see :class:`SimulatedPlaneDataset`)."""
        n_train = len(self.train_volumes)
        name = "samples (val_samples in a config)"
        out = [SimulatedPlaneDataset(self, list(range(n_train)), samples, "held_out", "held_out_poses",
                                     length_name=name)]
        if self.val_volumes:
            out.append(SimulatedPlaneDataset(self, list(range(n_train, len(self.volumes))), samples, "all",
                                             "held_out_volumes", length_name=name))
        return out

    # ---- rendering ------------------------------------------------------------------------------------
    def _knots(self, v: int, k: int) -> torch.Tensor:
        base = np.array(T1_KNOTS, dtype=np.float64)
        if k == 0:
            return torch.from_numpy(base)
        rng = np.random.default_rng([self.seed, v, k, 7])
        out = base.copy()
        out[1:, 1] += rng.normal(0, 0.01, len(base) - 1)  # impedance
        out[:, 2] *= rng.uniform(0.7, 1.3)  # attenuation
        amp = np.exp(rng.normal(0, 0.3, len(base)))
        out[:, 4] *= amp
        out[:, 5] *= amp
        return torch.from_numpy(out)

    def _volume_props(self, v: int, device: torch.device) -> torch.Tensor:
        """``(variants, 5, D, H, W)`` property maps of volume v's tissue variants (channels-last, as the
        simulator reads them), for one simulation call per volume and probe with a volume index."""
        key = (v, str(device))
        if key not in self._props:
            from medfast.ultrasound import hu_to_properties

            vol = self.volumes[v].intensity.to(device)[None, None]
            maps = [hu_to_properties(vol, self._knots(v, k).to(device=device, dtype=torch.float32))
                    for k in range(self.variants)]
            self._props[key] = torch.cat(maps).contiguous(memory_format=torch.channels_last_3d)
        return self._props[key]

    def _padded_mask(self, v: int) -> tuple[np.ndarray, np.ndarray]:
        """Volume v's brain mask with a one-voxel False border, and the unpadded shape."""
        if v not in self._masks:
            mask = self.volumes[v].mask
            self._masks[v] = (np.pad(mask, 1), np.array(mask.shape))
        return self._masks[v]

    def _grid(self, p: int, device: torch.device) -> torch.Tensor:
        key = (p, str(device))
        if key not in self._grids:
            grid, _ = self.probes[p].scan_grid(device=device, dtype=torch.float32)  # (1, Hs, Ws, 2)
            g = F.interpolate(grid.permute(0, 3, 1, 2), size=self.image_shape, mode="bilinear", align_corners=True)
            g = g.permute(0, 2, 3, 1)
            # pixels outside the fan sample nothing (grid_sample's zero padding bled one line spacing out), as simulate
            self._grids[key] = g.masked_fill((g.abs() > 1 + 1e-6).any(-1, keepdim=True), 2.0).contiguous()
        return self._grids[key]

    def _plane_frames(self) -> tuple[np.ndarray, np.ndarray]:
        """``(P, 3)`` target points and ``(P, 3, 3)`` probe axes (columns lateral, elevation, beam) of the planes,
        in the order of ``planes`` (computed once)."""
        if self._frames is None:
            targets, frames = [], []
            for name in self.planes:
                target, d, lat = (np.asarray(a, dtype=np.float64) for a in self.plane_table[name])
                z = d / np.linalg.norm(d)
                x = lat - (lat @ z) * z
                x = x / np.linalg.norm(x)
                targets.append(target)
                frames.append(np.stack([x, np.cross(z, x), z], 1))
            self._frames = np.stack(targets), np.stack(frames)
        return self._frames

    def poses(self, volume: Sequence[int], plane: Sequence[int], pose_u: torch.Tensor,
              gel_mm: Sequence[float]) -> torch.Tensor:
        """``(B, 4, 4)`` float64 probe-to-world poses of descriptors: the plane's target point and axes,
        rotated (tilt, rock, twist = ``u[:, :3] * max_rotation``) and shifted (``u[:, 3] * max_shift_mm``
        along the plane normal, ``u[:, 4] * max_lateral_mm`` along the array), then moved back along the
        beam to the brain surface (the last mask voxel on the line) plus ``gel_mm``."""
        u = np.asarray(pose_u, dtype=np.float64).reshape(-1, 6)
        vol = np.asarray(volume, dtype=np.int64).reshape(-1)
        plane = np.asarray(plane, dtype=np.int64).reshape(-1)
        B = u.shape[0]
        targets, frames = self._plane_frames()
        R = frames[plane] @ _rotation(0, u[:, 0] * self.max_rot) \
            @ _rotation(1, u[:, 1] * self.max_rot) @ _rotation(2, u[:, 2] * self.max_rot)  # (B, 3, 3)
        centre = np.stack([v.centre for v in self.volumes])[vol]
        half = np.stack([v.half_extent for v in self.volumes])[vol]
        p = centre + targets[plane] * half + R[:, :, 1] * (u[:, 3:4] * self.max_shift) \
            + R[:, :, 0] * (u[:, 4:5] * self.max_lateral)
        t_surf = np.zeros(B)
        for v in np.unique(vol):  # march back along -beam through the mask (0.5 voxel steps)
            sel = np.nonzero(vol == v)[0]
            bv = self.volumes[int(v)]
            step = 0.5 * float(np.linalg.norm(bv.affine[:3, 0]))
            t = np.arange(0.0, 2.5 * float(bv.half_extent.max()) + 10.0, step)
            inv = np.linalg.inv(bv.affine)
            start = p[sel] @ inv[:3, :3].T + inv[:3, 3]  # (b, 3) voxel position and direction of each line
            back = -R[sel, :, 2] @ inv[:3, :3].T
            padded, shape = self._padded_mask(int(v))
            # only the samples that can round into the volume on some line (the rest read the False padding):
            # the same last brain sample, far fewer reads
            t = t[:_samples_in_box(start, back, t, shape)]
            if not len(t):
                continue
            ijk = np.rint(start[:, None, :] + t[None, :, None] * back[:, None, :])  # (b, T, 3)
            # outside the volume reads the padding (False): indices clipped into the padded mask, read flat
            np.clip(ijk, -1, shape, out=ijk)
            pitch = np.array([padded.shape[1] * padded.shape[2], padded.shape[2], 1], dtype=np.int64)
            inside = padded.reshape(-1)[ijk.astype(np.int64) @ pitch + pitch.sum()]  # (b, T)
            last = len(t) - 1 - np.argmax(inside[:, ::-1], axis=1)  # the last brain sample on each line
            t_surf[sel] = np.where(inside.any(1), t[last], 0.0)
        out = np.tile(np.eye(4), (B, 1, 1))
        out[:, :3, :3] = R
        out[:, :3, 3] = p - R[:, :, 2] * (t_surf + np.asarray(gel_mm, dtype=np.float64).reshape(-1))[:, None]
        return torch.from_numpy(out)

    def render(self, batch: Mapping[str, Any], device: torch.device | str = "cpu") -> torch.Tensor:
        """Images ``(B, 1, H, W)`` float32 on ``device`` of a batch of descriptors (collated items of a
        :class:`SimulatedPlaneDataset`). Not differentiable (runs under ``no_grad``, outside autocast).

        On a GPU (``cuda_graphs``) the device work of a batch is one CUDA graph replay: rendering is
        launch-bound at these sizes (about 25 kernels per (volume, probe) group), and the graph, captured
        once per batch size and set of groups (when one comes a second time), leaves the host one input
        copy and one replay."""
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device is {device} but no GPU is visible; render on 'cpu'")
        groups, inputs = batch["render_inputs"] if "render_inputs" in batch else self.render_inputs(batch)
        groups = tuple(tuple(int(i) for i in g) for g in groups)  # (lists after some torch's pin_memory)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            out = None
            if device.type == "cuda" and self.cuda_graphs:
                with torch.cuda.device(device):  # a graph is captured and replayed on the current device
                    out = self._replay(groups, inputs, device)
            if out is None:
                out = self._render_eager(groups, inputs, device)
        if self.normalize == "minmax":
            lo = out.flatten(1).amin(1).view(-1, 1, 1, 1)
            hi = out.flatten(1).amax(1).view(-1, 1, 1, 1)
            out = (out - lo) / (hi - lo).clamp_min(1e-8)
        elif self.normalize == "zscore":
            # the population std (correction=0), as the user-image path (data.py) and the preprocessing do
            s, m = (t.view(-1, 1, 1, 1) for t in torch.std_mean(out.flatten(1), dim=1, correction=0))
            out = (out - m) / s.clamp_min(1e-8)
        return out

    def render_inputs(self, batch: Mapping[str, Any]) -> tuple[tuple[tuple[int, int], ...], torch.Tensor]:
        """The groups of one simulation each, (volume, probe) pairs in order, and the per-frame inputs
        ``(B, _INPUTS)`` float32 on the host (one tensor, so one copy to the device): pose (16), gain dB,
        dynamic range dB, tissue variant, group. A volume's tissue variants are one stack of property maps,
        each frame picking its variant by the volume index (same speckle seed). :meth:`render` takes them from
        ``batch["render_inputs"]`` where a loader worker computed them (the classification task's collate)."""
        vol = batch["volume"].reshape(-1).tolist()
        probe = batch["probe"].reshape(-1).tolist()
        extra = batch["render"].reshape(-1, 3).double()
        poses = self.poses(vol, batch["label"].reshape(-1).tolist(), batch["pose_u"], extra[:, 2].tolist())
        B = len(vol)
        groups = tuple(sorted(set(zip(vol, probe))))
        inputs = torch.empty(B, _INPUTS, dtype=torch.float32)
        inputs[:, :16] = poses.reshape(B, 16).float()
        inputs[:, 16:18] = extra[:, :2].float()
        inputs[:, 18] = batch["variant"].reshape(-1).float()
        inputs[:, 19] = torch.tensor([groups.index(g) for g in zip(vol, probe)], dtype=torch.float32)
        return groups, inputs

    def _images(self, v: int, p: int, inputs: torch.Tensor) -> torch.Tensor:
        """``(b, 1, H, W)`` images of the frames of ``inputs`` (``(b, _INPUTS)`` on the device) through volume v
        and probe p: the simulation's scanlines (without validation: the poses are ours), log-compressed
        with each frame's gain and dynamic range, resampled to ``image_shape``."""
        from medfast.ultrasound.simulate import _affine_info, _scanlines
        from medfast.ultrasound.tissue import WATER

        b, device, probe = inputs.shape[0], inputs.device, self.probes[p]
        lines_db = _scanlines(self._volume_props(v, device), inputs[:, :16].reshape(b, 4, 4),
                              _affine_info(self.volumes[v].affine), probe, seed=1000 * v + 17,
                              sub_rays=self.sub_rays, speckle=True, scatter_cell_mm=probe.wavelength_mm / 2,
                              interface_mm=None, tgc_db_cm_mhz=self.tgc, gain_db=0.0, background=list(WATER),
                              volume_index=inputs[:, 18].long(), return_gain=False)[0]
        gain, dr = inputs[:, 16:18, None, None].unbind(1)  # (b, 1, 1) each
        scan = ((lines_db + gain + dr) / dr).clamp(0.0, 1.0)  # (b, L, S)
        grid = self._grid(p, device).expand(b, -1, -1, -1)
        return F.grid_sample(scan.transpose(1, 2)[:, None], grid, mode="bilinear", padding_mode="zeros",
                             align_corners=True)

    def _render_eager(self, groups: tuple[tuple[int, int], ...], inputs: torch.Tensor,
                      device: torch.device) -> torch.Tensor:
        """One simulation per group, over that group's frames (``inputs`` on the host)."""
        dev_inputs = inputs.to(device, non_blocking=True)
        out = torch.empty(inputs.shape[0], 1, *self.image_shape, device=device)
        group = inputs[:, 19].long()
        for g, (v, p) in enumerate(groups):
            rows = torch.nonzero(group == g).flatten().to(device, non_blocking=True)
            out.index_copy_(0, rows, self._images(v, p, dev_inputs.index_select(0, rows)))
        return out

    def _render_all(self, groups: tuple[tuple[int, int], ...], inputs: torch.Tensor) -> torch.Tensor:
        """The fixed-shape form of :meth:`_render_eager` that a CUDA graph captures: EVERY frame through
        every group, then each frame's image taken from its own group (the other groups' images of it are
        dropped). Each image depends on its own inputs only, so the kept ones equal the eager ones; the
        extra GPU work is small at the classification sizes, next to the launches the graph saves."""
        b = inputs.shape[0]
        images = torch.stack([self._images(v, p, inputs) for v, p in groups])  # (G, B, 1, H, W)
        return images[inputs[:, 19].long(), torch.arange(b, device=inputs.device)]

    def _replay(self, groups: tuple[tuple[int, int], ...], inputs: torch.Tensor,
                device: torch.device) -> torch.Tensor | None:
        """The batch rendered by a CUDA graph of :meth:`_render_all`, or None: then the caller renders
        eagerly. A graph is captured the second time a batch size and set of groups comes (batches
        rendered once, such as the cached validation images, are not worth a capture), at most
        ``_MAX_GRAPHS`` of them; a capture that fails turns graphs off with a warning."""
        key = (str(device), inputs.shape[0], groups)
        entry = self._graphs.get(key)
        if entry is None:
            self._seen[key] = self._seen.get(key, 0) + 1
            if self._seen[key] < 2 or len(self._graphs) >= _MAX_GRAPHS:
                return None
            try:
                entry = self._capture(groups, inputs, device)
            except Exception as exc:  # noqa: BLE001 -- any capture failure: render eagerly from now on
                warnings.warn(f"simulated ultrasound: CUDA graph capture failed ({type(exc).__name__}: {exc}); "
                              "rendering without graphs", stacklevel=3)
                self.cuda_graphs = False
                return None
            self._graphs[key] = entry
        graph, static_in, static_out, _ = entry
        static_in.copy_(inputs, non_blocking=True)
        graph.replay()
        self.graph_replays += 1
        return static_out.clone()

    def _capture(self, groups, inputs, device):
        static_in = inputs.to(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: fills the per-probe / per-volume caches outside the capture
            for _ in range(2):
                self._render_all(groups, static_in)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a data loader's pin-memory thread) stay allowed meanwhile
        # the cached constants the graph reads (noise tables, probe tables) live as long as the graph
        with retain_cached() as kept, torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = self._render_all(groups, static_in)
        return graph, static_in, static_out, kept


_INPUTS = 20  # per-frame render inputs: pose (16), gain dB, dynamic range dB, tissue variant, group
_MAX_GRAPHS = 8  # captured (device, batch size, groups) renderings kept per SimulatedUltrasound


class SimulatedPlaneDataset(Dataset):
    """Descriptors of simulated standard-plane frames (rendered later by :meth:`SimulatedUltrasound.render`).

    Index ``i`` fixes the volume (``volume_ids[(i // C) % V]``) and the class (``i % C``) of ``C`` planes and
    ``V`` volumes, so every (volume, class) pair comes equally often when ``length`` is a multiple of ``C V``;
    otherwise the first ``length % (C V)`` pairs come once more, in every epoch. A ``length`` below ``C V``
    (a volume or class never drawn) is a ValueError. Everything else is drawn from the item's seed: the
    sampler's ``(index, seed)`` key in training, a fixed seed from ``(source.seed, subset, i)`` otherwise.

    Notes
    -----
    Items: ``label`` ``()`` int64 (the plane), ``volume``, ``probe``, ``variant`` ``()`` int64, ``pose_u``
    ``(6,)`` float64 (tilt, rock, twist, normal shift, lateral shift, unused) in ``[-1, 1]``, ``render``
    ``(3,)`` float64 (gain dB, dynamic range dB, gel mm), ``subset`` str, ``files`` str (a readable name),
    ``seed`` int.
    """

    def __init__(self, source: SimulatedUltrasound, volume_ids: Sequence[int], length: int, pose_split: str,
                 subset: str, *, length_name: str = "length") -> None:
        if int(length) < 1:
            raise ValueError(f"{length_name} must be >= 1, got {length}")
        pairs = len(source.planes) * len(volume_ids)
        if int(length) < pairs:  # the index fixes volume and class: some would never be drawn, in any epoch
            raise ValueError(f"{length_name}: {length} is less than planes x volumes of the {subset} set = "
                             f"{len(source.planes)} x {len(volume_ids)} = {pairs}, so some (volume, plane) pair "
                             f"would never be drawn; use at least {pairs} (a multiple of it balances them exactly)")
        if pose_split not in ("train", "held_out", "all"):
            raise ValueError(f"pose_split must be 'train', 'held_out' or 'all', got {pose_split!r}")
        if pose_split == "held_out" and source.pose_bins < 2:
            raise ValueError(f"pose_bins={source.pose_bins}: held-out poses need pose_bins >= 2 (training draws the "
                             "even bins, the held-out set the odd ones; with one bin both are the same distribution)")
        self.source, self.volume_ids, self.length = source, list(volume_ids), int(length)
        self.pose_split, self.subset = pose_split, subset

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i, seed = key if isinstance(key, tuple) else (key, None)
        i = int(i)
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} items")
        if seed is None:
            seed = int(np.random.default_rng([self.source.seed, sum(map(ord, self.subset)), i]).integers(2**62))
        s = self.source
        rng = np.random.default_rng(int(seed))
        C = len(s.planes)
        v = self.volume_ids[(i // C) % len(self.volume_ids)]
        c = i % C
        u = _bin_uniform(rng, 6, s.pose_bins, self.pose_split)
        render = [rng.uniform(*s.gain), rng.uniform(*s.dr), rng.uniform(*s.gel)]
        return {
            "label": torch.tensor(c, dtype=torch.long),
            "volume": torch.tensor(v, dtype=torch.long),
            "probe": torch.tensor(int(rng.integers(len(s.probes))), dtype=torch.long),
            "variant": torch.tensor(int(rng.integers(s.variants)), dtype=torch.long),
            "pose_u": torch.from_numpy(u),
            "render": torch.tensor(render, dtype=torch.float64),
            "subset": self.subset,
            "files": f"{s.volumes[v].name}/{s.planes[c]}/{self.subset}#{i}",
            "seed": int(seed),
        }
