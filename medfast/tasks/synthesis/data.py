"""Training pairs for synthesis, made on the fly by the ultrasound simulator from real volumes.

A :class:`SynthesisSource` holds one volume (the InVesalius head CT in HU, or a brain tissue label map of
Colin27 or MNI152), its acoustic property maps, a probe and a reference probe pose; :meth:`~SynthesisSource.frames`
turns ``(B, 4, 4)`` probe poses into the three things a synthesis model needs, all on the pixels of the
scan-converted image plane:

* the **anatomy** in the plane: for a CT two channels, ``clamp(HU, -1000, 2000) / 1000`` (air, tissue, bone)
  and a soft-tissue window ``clamp((HU - 40) / 80, -1, 1)`` (brain, fluid); for a label map the one-hot
  tissue classes. The input of image-to-image synthesis;
* the **world coordinates** of every pixel (mm, centred on the source's reference point and divided by
  its ``coord_scale_mm``): the spatial condition of pose-conditioned synthesis (Hu et al. 2017);
* the simulated **B-mode frame** in ``[0, 1]``: the target.

Poses come from seeds (:func:`random_pose` for scattered views, :func:`sweep_pose` for a frame of a freehand
sweep), so a sample is reproducible from its seed alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medfast.data.presets import MRICRON
from medfast.ops._validate import check_tensor
from medfast.ultrasound import LabelTable, Probe, freehand_sweep, hu_to_properties, look_at, simulate

__all__ = ["SOURCES", "TISSUE_TABLE", "SynthesisSource", "colin27_tissue", "load_source", "random_pose",
           "sweep_pose"]

MRICRON_HINT = "install it with `apt-get install mricron-data` (scripts/data.sh does)"

#: Acoustic properties (Z MRayl, alpha dB/cm/MHz, scatterer density, amplitude mean, spread) of the 4 tissue
#: classes of the brain label maps: 0 outside the brain (saline, as in intraoperative imaging), 1 CSF
#: (water-like, anechoic), 2 grey matter, 3 white matter (more echogenic than grey matter, as in brain
#: ultrasound). Literature-range values in the spirit of ``medfast.ultrasound.HU_KNOTS``.
TISSUE_TABLE = {
    0: (1.48, 0.0022, 0.0, 0.0, 0.0),
    1: (1.51, 0.01, 0.05, 0.002, 0.0005),
    2: (1.60, 0.60, 1.0, 0.012, 0.003),
    3: (1.66, 0.90, 1.0, 0.022, 0.006),
}
TISSUE_NAMES = ("outside", "CSF", "grey matter", "white matter")

#: Built-in sources: kind, reference probe position (world mm, None: on the brain surface above the centre),
#: beam direction, lateral direction, default sweep travel (mm).
SOURCES = {
    "cranium": dict(kind="ct", position=(122.5, 38.0, 60.0), direction=(0.0, 1.0, 0.0), lateral=(1.0, 0.0, 0.0),
                    travel=(0.0, 0.0, 30.0)),
    "colin27": dict(kind="labels", position=None, direction=(0.0, 0.0, -1.0), lateral=(1.0, 0.0, 0.0),
                    travel=(0.0, 30.0, 0.0)),
    "mni152": dict(kind="labels", position=None, direction=(0.0, 0.0, -1.0), lateral=(1.0, 0.0, 0.0),
                   travel=(0.0, 30.0, 0.0)),
}


def _kmeans_1d(values: np.ndarray, k: int = 3, iters: int = 30) -> np.ndarray:
    """Sorted centres of a 1D k-means (Lloyd) started at the 10/50/90-style percentiles."""
    centres = np.percentile(values, np.linspace(10, 90, k))
    for _ in range(iters):
        assign = np.abs(values[:, None] - centres[None]).argmin(1)
        centres = np.array([values[assign == c].mean() if (assign == c).any() else centres[c] for c in range(k)])
    return np.sort(centres)


#: AAL labels of the deep grey nuclei (caudate, putamen, pallidum, thalamus; left and right).
AAL_DEEP_GREY = tuple(range(71, 79))


def colin27_tissue(root: str | Path = MRICRON) -> tuple[np.ndarray, np.ndarray]:
    """Colin27 tissue classes (0 outside, 1 CSF, 2 grey, 3 white matter) on its 1 mm grid, and the affine.

    The brain (``ch2bet.nii.gz`` > 0) is split into CSF, grey and white matter by a 3-class k-means of its T1
    intensities (boundaries halfway between the class means); the deep grey nuclei of the manually drawn
    AAL atlas (``aal.nii.gz`` labels 71-78: caudate, putamen, pallidum, thalamus), which are T1-bright, are
    set to grey matter. An approximation of the tissue classes, not a segmentation.
    """
    import nibabel as nib

    root = Path(root)
    files = {k: root / f"{k}.nii.gz" for k in ("ch2bet", "aal")}
    for f in files.values():
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found; {MRICRON_HINT}")
    t1_img = nib.load(str(files["ch2bet"]))
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    aal = np.asarray(nib.load(str(files["aal"])).dataobj)
    if aal.shape != t1.shape:
        raise ValueError(f"{files['aal']} {aal.shape} and {files['ch2bet']} {t1.shape} are not on one grid")
    brain = t1 > 0
    c = _kmeans_1d(t1[brain][::7].astype(np.float64))
    lab = np.zeros(t1.shape, np.uint8)
    lab[brain] = 1 + (t1[brain] > (c[0] + c[1]) / 2) + (t1[brain] > (c[1] + c[2]) / 2)
    lab[brain & np.isin(aal, AAL_DEEP_GREY) & (lab == 3)] = 2
    return lab, np.asarray(t1_img.affine, dtype=np.float64)


def _mni152_tissue() -> tuple[np.ndarray, np.ndarray]:
    from medfast.data.presets import _mni_tissue

    _, lab, affine = _mni_tissue()
    return lab, np.asarray(affine, dtype=np.float64)


def _surface_point(mask: np.ndarray, affine: np.ndarray, direction: Sequence[float]) -> np.ndarray:
    """World point 2 mm before the first voxel of ``mask`` met along ``direction`` through the mask's centre."""
    ijk = np.argwhere(mask)
    if len(ijk) == 0:
        raise ValueError("the label map is empty (no voxel > 0)")
    centre = affine[:3, :3] @ ijk.mean(0) + affine[:3, 3]
    d = np.asarray(direction, float)
    d = d / np.linalg.norm(d)
    inv = np.linalg.inv(affine)
    extent = float(np.linalg.norm(affine[:3, :3] @ np.array(mask.shape, float)))
    for t in np.arange(-extent, extent, 0.5):
        p = centre + t * d
        v = np.rint(inv[:3, :3] @ p + inv[:3, 3]).astype(int)
        if np.all(v >= 0) and np.all(v < mask.shape) and mask[tuple(v)]:
            return p - 2.0 * d
    raise ValueError("no surface point found along the beam direction")


@dataclass
class Frames:
    """What :meth:`SynthesisSource.frames` returns; every image is ``(B, C, H, W)`` on the pixel grid of the
    scan-converted frame (``pixel_mm`` square pixels)."""

    anatomy: torch.Tensor
    coords: torch.Tensor
    bmode: torch.Tensor
    pixel_mm: float


class SynthesisSource:
    """One volume, its acoustic properties, a probe and a reference pose: turns poses into training frames.

    Parameters
    ----------
    volume : ndarray
        ``(D, H, W)`` CT in HU (``kind="ct"``) or integer tissue classes 0..3 (``kind="labels"``).
    affine : ndarray
        ``(4, 4)`` voxel-to-world (mm).
    kind : {"ct", "labels"}
    probe : Probe
    reference_pose : Tensor
        ``(4, 4)`` probe-to-world pose around which poses are drawn.
    image_rows : int
        Rows of the scan-converted frames (the pixel size is the fan's full height over ``image_rows - 1``: the
        depth for a linear probe, the depth plus the arc's sagitta for a convex one).
    speckle_seed : int
        Seed of the simulator's world-anchored scatterer field (fixed: the same place gives the same speckle).
    name : str
        Shown in file names and messages.
    sub_rays : int
        Rays per scanline across the element height (the simulator's ``sub_rays``: the elevation beam width).
    """

    def __init__(self, volume: np.ndarray, affine: np.ndarray, kind: str, probe: Probe,
                 reference_pose: torch.Tensor, image_rows: int = 64, speckle_seed: int = 0,
                 name: str = "volume", sub_rays: int = 2) -> None:
        if kind not in ("ct", "labels"):
            raise ValueError(f"kind must be 'ct' or 'labels', got {kind!r}")
        if not isinstance(image_rows, int) or image_rows < 16:
            raise ValueError(f"image_rows must be an int >= 16, got {image_rows!r}")
        volume = np.asarray(volume)
        if volume.ndim != 3:
            raise ValueError(f"volume must be 3D (D, H, W), got shape {volume.shape}")
        if min(volume.shape) < 2:  # frames() maps voxel i to i / (size - 1): one slice divides by zero (all air)
            raise ValueError(f"volume must have at least 2 voxels along each axis, got shape {volume.shape}")
        self.kind, self.probe, self.name = kind, probe, name
        self.affine = np.asarray(affine, dtype=np.float64)
        self.reference_pose = reference_pose.detach().double().cpu()
        self.speckle_seed, self.sub_rays = int(speckle_seed), int(sub_rays)
        x0, x1, z0, z1 = probe.image_extent_mm()
        self.pixel_mm = (z1 - z0) / (image_rows - 1 + 1e-6)  # exactly image_rows rows
        (self.height, self.width), _ = probe.image_shape(self.pixel_mm)
        self.vol = torch.from_numpy(np.ascontiguousarray(volume)).float()[None, None]
        if kind == "ct":
            self.props = hu_to_properties(self.vol)
            self.n_classes = 0
        else:
            if self.vol.min() < 0 or self.vol.max() > max(TISSUE_TABLE):
                raise ValueError(f"tissue labels must lie in 0..{max(TISSUE_TABLE)}")
            self.props = LabelTable(TISSUE_TABLE).properties(self.vol.long())
            self.n_classes = len(TISSUE_TABLE)
        self.props = self.props.contiguous(memory_format=torch.channels_last_3d)
        self._on: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.centre = self.reference_pose[:3, 3].clone()
        self.coord_scale_mm = float(z1 - z0)  # the fan's full height (a convex probe: depth + the arc's sagitta)

    @property
    def anatomy_channels(self) -> int:
        """Channels of :attr:`Frames.anatomy`: 2 (CT) or the number of tissue classes."""
        return 2 if self.kind == "ct" else self.n_classes

    def _device_data(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._on:
            self._on = {key: (self.vol.to(device), self.props.to(device))}
        return self._on[key]

    def plane_points(self, poses: torch.Tensor, corners: bool = False) -> torch.Tensor:
        """``(B, H, W, 3)`` world positions (mm, float64) of the pixel centres of each pose's image plane;
        ``corners=True``: of its 4 corner pixels only, ``(B, 2, 2, 3)`` (they bound every coordinate: the
        positions are affine in the pixel position)."""
        x0, _, z0, _ = self.probe.image_extent_mm()
        rows = torch.tensor([0, self.height - 1]) if corners else torch.arange(self.height)
        cols = torch.tensor([0, self.width - 1]) if corners else torch.arange(self.width)
        z = z0 + rows.double() * self.pixel_mm
        x = x0 + cols.double() * self.pixel_mm
        zz, xx = torch.meshgrid(z, x, indexing="ij")
        pts = torch.stack([xx, torch.zeros_like(xx), zz, torch.ones_like(xx)], -1)  # probe frame
        return torch.einsum("bij,hwj->bhwi", poses.double().cpu(), pts)[..., :3]

    def to_coords(self, world: torch.Tensor) -> torch.Tensor:
        """World positions (mm, ``(..., 3)``) as the coordinates of :attr:`Frames.coords`: centred on the reference
        position, divided by :attr:`coord_scale_mm`."""
        return (world - self.centre) / self.coord_scale_mm

    def coord_range(self, poses: torch.Tensor) -> torch.Tensor:
        """``(B, 2, 3)`` float64: per pose, the lowest and highest value of each of the 3 coordinates of
        :attr:`Frames.coords` over its image plane."""
        c = self.to_coords(self.plane_points(poses, corners=True)).flatten(1, 2)  # (B, 4, 3)
        return torch.stack([c.amin(1), c.amax(1)], 1)

    def frames(self, poses: torch.Tensor, device: torch.device | str = "cpu") -> Frames:
        """Anatomy, coordinates and simulated B-mode of the image planes of ``poses`` ``(B, 4, 4)``."""
        device = torch.device(device)
        if not isinstance(poses, torch.Tensor) or poses.dim() != 3 or poses.shape[1:] != (4, 4):
            raise ValueError(f"poses must be a (B, 4, 4) tensor, got {getattr(poses, 'shape', poses)}")
        vol, props = self._device_data(device)
        world = self.plane_points(poses)  # (B, H, W, 3)
        inv = torch.linalg.inv(torch.as_tensor(self.affine))
        vox = world @ inv[:3, :3].T + inv[:3, 3]  # (i, j, k) voxel indices
        size = torch.tensor(vol.shape[-3:], dtype=torch.float64)
        grid = (vox.flip(-1) / (size.flip(0) - 1) * 2 - 1)[:, None].float().to(device)  # (B, 1, H, W, 3)
        B = poses.shape[0]
        if self.kind == "ct":  # outside the volume: air
            ct = F.grid_sample((vol + 1000.0).expand(B, -1, -1, -1, -1), grid, mode="bilinear",
                               padding_mode="zeros", align_corners=True)[:, :, 0] - 1000.0
            anatomy = torch.cat([ct.clamp(-1000.0, 2000.0) / 1000.0, ((ct - 40.0) / 80.0).clamp(-1.0, 1.0)], 1)
        else:
            lab = F.grid_sample(vol.expand(B, -1, -1, -1, -1), grid, mode="nearest", padding_mode="zeros",
                                align_corners=True)[:, 0, 0].long()
            anatomy = F.one_hot(lab, self.n_classes).permute(0, 3, 1, 2).float()
        coords = self.to_coords(world).permute(0, 3, 1, 2).float().to(device)
        with torch.no_grad():
            res = simulate(props, self.affine, poses.to(device=device, dtype=props.dtype), self.probe,
                           seed=self.speckle_seed, pixel_mm=self.pixel_mm, sub_rays=self.sub_rays)
        return Frames(anatomy=anatomy, coords=coords, bmode=res.bmode, pixel_mm=self.pixel_mm)


def load_source(name: str, *, probe: Probe, image_rows: int = 64, speckle_seed: int = 0,
                position: Sequence[float] | None = None, direction: Sequence[float] | None = None,
                lateral: Sequence[float] | None = None) -> SynthesisSource:
    """A :class:`SynthesisSource` from a built-in volume or a file.

    Parameters
    ----------
    name : str
        ``"cranium"`` (the InVesalius head CT, ``apt-get install invesalius-examples``), ``"colin27"``
        (Colin27 tissue classes from ``ch2bet`` + AAL, ``apt-get install mricron-data``), ``"mni152"``
        (MNI152 tissue classes from its GM/WM maps, ``pip install nilearn``), or a path to a CT volume in
        HU (``.nii``/``.nii.gz``/``.inv3``).
    probe : Probe
        The simulated probe (:meth:`medfast.ultrasound.Probe.preset`).
    image_rows : int
        Rows of the scan-converted frames, as :class:`SynthesisSource`'s.
    speckle_seed : int
        Seed of the world-anchored scatterer field, as :class:`SynthesisSource`'s.
    position, direction, lateral : sequence of 3 floats, optional
        Reference probe pose (world mm; see :func:`medfast.ultrasound.look_at`); defaults per source (for a
        label map or a file: on the tissue surface above the centre, beam along ``direction``).
    """
    from medfast.ultrasound.io import INSTALL_HINT, INVESALIUS_CRANIUM, read_volume

    if not isinstance(name, str) or not name:
        raise ValueError(f"source must be a built-in name ({', '.join(SOURCES)}) or a CT file path, got {name!r}")
    spec = SOURCES.get(name, dict(kind="ct", position=None, direction=(0.0, 1.0, 0.0), lateral=(1.0, 0.0, 0.0)))
    if name == "cranium":
        if not INVESALIUS_CRANIUM.is_file():
            raise FileNotFoundError(f"{INVESALIUS_CRANIUM} not found; {INSTALL_HINT}")
        vol, affine = read_volume(INVESALIUS_CRANIUM)
    elif name == "colin27":
        vol, affine = colin27_tissue()
    elif name == "mni152":
        vol, affine = _mni152_tissue()
    else:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"source {name!r} is neither a built-in ({', '.join(SOURCES)}) nor a file")
        vol, affine = read_volume(path)
    direction = tuple(direction) if direction is not None else spec["direction"]
    lateral = tuple(lateral) if lateral is not None else spec["lateral"]
    if position is None:
        position = spec["position"]
    if position is None:
        mask = vol > 0 if spec["kind"] == "labels" else vol > -300
        position = _surface_point(mask, affine, direction)
    pose = look_at(position, direction, lateral)
    return SynthesisSource(vol, affine, spec["kind"], probe, pose, image_rows=image_rows,
                           speckle_seed=speckle_seed, name=Path(name).name)


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrix of intrinsic x-y-z angles (radians), float64."""
    out = torch.eye(3, dtype=torch.float64)
    for axis in range(3):
        c, s = math.cos(float(angles[axis])), math.sin(float(angles[axis]))
        i, j = [(1, 2), (2, 0), (0, 1)][axis]
        r = torch.eye(3, dtype=torch.float64)
        r[i, i] = r[j, j] = c
        r[i, j], r[j, i] = -s, s
        out = out @ r
    return out


def _check_reference(reference: object) -> torch.Tensor:
    reference = check_tensor("reference", reference)
    if tuple(reference.shape) != (4, 4):
        raise ValueError(f"reference must be a (4, 4) probe-to-world pose, got shape {tuple(reference.shape)}")
    return reference


def random_pose(reference: torch.Tensor, seed: int, *, shift_mm: Sequence[float] = (10.0, 5.0, 10.0),
                tilt_deg: float = 10.0, twist_deg: float = 20.0) -> torch.Tensor:
    """A random ``(4, 4)`` pose near ``reference``: the probe moved by up to ``shift_mm`` along its own
    lateral, elevation and beam axes (mm, uniform), tilted and rocked by up to ``tilt_deg`` and twisted
    about the beam by up to ``twist_deg`` (uniform); seeded."""
    reference = _check_reference(reference)
    g = torch.Generator().manual_seed(int(seed) % 2**63)
    u = torch.rand(6, generator=g, dtype=torch.float64) * 2 - 1
    shift = torch.as_tensor(shift_mm, dtype=torch.float64) * u[:3]
    ang = torch.deg2rad(torch.tensor([tilt_deg, tilt_deg, twist_deg], dtype=torch.float64)) * u[3:]
    ref = reference.double()
    out = ref.clone()
    out[:3, :3] = ref[:3, :3] @ _rotation(ang)
    out[:3, 3] = ref[:3, 3] + ref[:3, :3] @ shift
    return out


def sweep_pose(reference: torch.Tensor, seed: int, *, travel_mm: Sequence[float], frames: int = 32,
               start_jitter_mm: float = 3.0, frame: int | None = None) -> torch.Tensor:
    """Poses of a freehand sweep (:func:`medfast.ultrasound.freehand_sweep`) that starts within
    ``start_jitter_mm`` of ``reference`` (minus half the travel) and moves by ``travel_mm`` (world mm):
    ``(frames, 4, 4)``, or only frame ``frame`` ``(4, 4)``; the sweep's start, wobble and angles are seeded."""
    reference = _check_reference(reference)
    g = torch.Generator().manual_seed(int(seed) % 2**63)
    ref = reference.double().clone()
    travel = torch.as_tensor(travel_mm, dtype=torch.float64)
    ref[:3, 3] = ref[:3, 3] - travel / 2 + start_jitter_mm * (torch.rand(3, generator=g, dtype=torch.float64) * 2 - 1)
    poses = freehand_sweep(ref, travel.tolist(), frames, seed=int(torch.randint(0, 2**31, (1,), generator=g)))
    return poses if frame is None else poses[frame]
