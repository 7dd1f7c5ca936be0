"""Volume readers for the simulator: NIfTI (nibabel) and InVesalius projects (``.inv3``); the writer of frame
stacks (:func:`write_frame_stack`, for ``medfast simulate`` and ``medfast synthesize`` alike).

An ``.inv3`` file (InVesalius 3) is a gzip-compressed tar holding ``main.plist`` (metadata: shape,
dtype, voxel spacing) and ``matrix.dat`` (the raw volume, C order, little-endian).
"""

from __future__ import annotations

import plistlib
import tarfile
from pathlib import Path

import numpy as np

INVESALIUS_CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
INSTALL_HINT = "install it with `apt-get install invesalius-examples` (scripts/data.sh does)"


def read_inv3(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads the CT of an InVesalius project.

    Parameters
    ----------
    path : str or Path
        The ``.inv3`` file.

    Returns
    -------
    volume : ndarray
        ``(D, H, W)`` int16 CT numbers (HU): slices, rows, columns.
    affine : ndarray
        ``(4, 4)`` voxel-to-world matrix (mm): world x along columns, y along rows, z along slices,
        with the spacing of the file, origin at voxel (0, 0, 0).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            if "main.plist" not in members:
                raise ValueError(f"{path} is not an InVesalius project (no main.plist)")
            meta = plistlib.loads(tar.extractfile(members["main.plist"]).read())
            mat = meta["matrix"]
            shape = tuple(int(s) for s in mat["shape"])
            dtype = np.dtype(mat["dtype"]).newbyteorder("<")
            if mat["filename"] not in members:
                raise ValueError(f"{path}: the project lists {mat['filename']!r} but the file holds no such member")
            raw = tar.extractfile(members[mat["filename"]]).read()
            spacing = [float(v) for v in meta["spacing"]]
    except (tarfile.TarError, EOFError, OSError, plistlib.InvalidFileException) as exc:
        raise ValueError(f"{path} is not a readable InVesalius project (.inv3: a gzip-compressed tar): "
                         f"{type(exc).__name__}: {exc}") from None
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: main.plist lacks the entry {exc} (matrix shape / dtype / filename, "
                         "spacing)") from None
    if len(shape) != 3 or len(spacing) != 3:
        raise ValueError(f"{path}: expected a 3D volume and 3 spacings, got shape {shape} and spacing {spacing}")
    if not all(np.isfinite(v) and v > 0 for v in spacing):
        raise ValueError(f"{path}: voxel spacing must be positive, got {spacing}")
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: matrix has {len(raw)} bytes, expected {expected} for {shape} {dtype}")
    _check_dtype(path, dtype)
    data = np.frombuffer(raw, dtype=dtype).reshape(shape)
    # CT numbers as int16 (InVesalius' own type); another type must fit it exactly, not wrap around
    if data.dtype != np.int16:
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise ValueError(f"{path}: the volume holds NaN or inf values")
        lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
        if lo < -32768 or hi > 32767:
            raise ValueError(f"{path}: values in [{lo:g}, {hi:g}] do not fit the int16 CT numbers (HU) expected")
    volume = data.astype(np.int16)
    sx, sy, sz = spacing
    affine = np.array([[0, 0, sx, 0], [0, sy, 0, 0], [sz, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    return volume, affine


def _check_dtype(path: Path, dtype: np.dtype) -> None:
    """CT numbers are real scalars (see :func:`medfast.data.io.unsupported_voxels`)."""
    from medfast.data.io import unsupported_voxels

    problem = unsupported_voxels(dtype)
    if problem:
        raise ValueError(f"{path}: the volume {problem}")


def read_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads a 3D NIfTI (``.nii``/``.nii.gz``, via nibabel) or an InVesalius ``.inv3``: (volume, affine).

    The volume keeps the file's voxel type, but for a scaled NIfTI (``scl_slope`` / ``scl_inter``), read as float32.

    Raises ``ValueError`` naming the file for a volume that is not 3D, RGB or complex, holds NaN / inf, or
    whose voxel-to-world affine is singular or not finite."""
    path = Path(path)
    if path.suffix == ".inv3":
        return read_inv3(path)
    from medfast.data.io import claimed_size_problem, nifti_header, read_failure

    img = nifti_header(path, ValueError)  # (a mixed-case suffix, CT.Nii.gz, too: nib.load looks for CT.nii.gz)
    _check_dtype(path, img.get_data_dtype())
    problem = claimed_size_problem(img)  # before allocating what a lying header claims
    if problem:
        raise ValueError(f"{path}: {problem}")
    proxy = img.dataobj
    scaled = getattr(proxy, "slope", 1.0) != 1.0 or getattr(proxy, "inter", 0.0) != 0.0
    try:
        if scaled:
            # scaled (scl_slope / scl_inter, e.g. int16 CT numbers): nibabel scales into float64 by default, 8 bytes
            # a voxel that the simulator converts to float32 anyway (both copies alive: 12 bytes a voxel)
            data = np.asarray(proxy, dtype=np.float32)
        else:
            data = np.asarray(proxy)
    except Exception as exc:  # noqa: BLE001 - str(MemoryError()) is empty: name the type (and the size)
        need = int(np.prod(img.shape, dtype=np.float64) * (4 if scaled else img.get_data_dtype().itemsize))
        raise ValueError(f"{path}: cannot read the voxel data: {read_failure(exc, need)}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {data.shape}")
    # NaN voxels would give NaN frames, and a bad affine fails later without naming the file
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise ValueError(f"{path}: the volume holds NaN or inf values")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise ValueError(f"{path}: the voxel-to-world affine (sform / qform) holds NaN or inf values")
    # relative to the column lengths (as medfast.data.io and register read it): an absolute bound on the voxel's
    # volume (mm^3) refused valid 0.1 um voxels
    lin = affine[:3, :3]
    if not abs(float(np.linalg.det(lin))) > 1e-6 * float(np.prod(np.linalg.norm(lin, axis=0))):
        raise ValueError(f"{path}: the voxel-to-world affine (sform / qform) is singular (zero voxel size or "
                         "parallel voxel axes): the header's voxel sizes or orientation are broken")
    return data, affine


def write_frame_stack(path: str | Path, frames: np.ndarray, pixel_mm: float, origin_mm: tuple[float, float]) -> None:
    """Writes ``(N, H, W)`` scan-converted frames as a NIfTI stack in the probe frame.

    Voxel ``(j, i, n)`` is pixel (row ``i``, column ``j``) of frame ``n``, at x = ``origin_mm[0] + j * pixel_mm``
    (lateral), y = ``origin_mm[1] + i * pixel_mm`` (depth), z = ``n`` (the frame index), spatial units mm: the
    probe-frame geometry of ``SimulationResult.extent_mm`` (``origin_mm`` is its ``(x_min, z_min)``, the
    first pixel's lateral and depth position, i.e. ``probe.image_extent_mm()[0::2]``). Stored as float32.
    ``medfast simulate`` (``frames.nii.gz``) and ``medfast synthesize`` (``generated.nii.gz``,
    ``simulated.nii.gz``) both write with it, so that stacks of the same poses, probe and pixel share a header.
    """
    import nibabel as nib

    frames = np.asarray(frames)
    if frames.ndim != 3:
        raise ValueError(f"frames must be (N, H, W), got shape {frames.shape}")
    affine = np.diag([float(pixel_mm), float(pixel_mm), 1.0, 1.0])
    affine[:2, 3] = float(origin_mm[0]), float(origin_mm[1])
    img = nib.Nifti1Image(np.ascontiguousarray(frames.transpose(2, 1, 0)).astype(np.float32), affine)
    img.header.set_xyzt_units("mm")  # else viewers and tools read the spacing as unitless
    nib.save(img, str(path))
