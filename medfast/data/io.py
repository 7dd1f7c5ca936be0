"""NIfTI reading and writing (nibabel), with errors that name the file."""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medfast._atomic import replacing

if TYPE_CHECKING:
    import torch

    from medfast._typing import MatrixLike

__all__ = ["DatasetError", "ImageEntry", "Volume", "entry_files", "entry_text", "image_header", "load_image",
           "load_nifti", "nifti_header", "save_nifti", "voxel_spacing"]

#: One image (one case) of a data set: a file (3D / 2D, or 4D with channels on the last axis), or a list of
#: single-channel files of the same grid, channel ``k`` in entry ``k`` (nnU-Net's ``case_0000.nii.gz``,
#: ``case_0001.nii.gz``, ...; a tuple works too). A list, not a tuple, so that it round-trips through YAML / JSON.
ImageEntry = str | os.PathLike | Sequence[str | os.PathLike]


class DatasetError(ValueError):
    """A missing, unreadable, corrupt or mismatched data file; the message names the file."""


@dataclass
class Volume:
    """An image or label volume as read from disk.

    Attributes
    ----------
    data : ndarray
        ``(C, *S)`` float32 for images (a 4D NIfTI's last axis becomes the channel axis), ``(*S)`` for labels.
    affine : ndarray
        ``(4, 4)`` float64 voxel-to-world (mm) affine of the spatial axes (NIfTI convention).
    header : nibabel header
        The file's header (for writing outputs in the same space).
    path : str
        Where it was read from.
    """

    data: np.ndarray
    affine: np.ndarray
    header: Any
    path: str


def _nib():
    try:
        import nibabel
    except ImportError as exc:  # pragma: no cover - nibabel is a test/io dependency
        raise ImportError("reading NIfTI needs nibabel: pip install nibabel") from exc
    return nibabel


def nifti_header(path: str | Path, error: type[Exception] = DatasetError):
    """Loads only the header of ``path`` (cheap); raises ``error`` (:class:`DatasetError`) naming the file."""
    nib = _nib()
    path = Path(path)
    if not path.is_file():
        raise error(f"file not found: {path}")
    try:
        img = _load_mixed_case(nib, path)
        if img is None:
            img = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad files
        raise error(f"cannot read {path} as NIfTI: {exc}") from None
    # the spatial bits of xyzt_units only (nibabel's get_xyzt_units raises KeyError on a non-standard time code)
    code = int(img.header["xyzt_units"]) & 7 if "xyzt_units" in img.header else 0
    unit = {1: "meter", 3: "micron"}.get(code, "mm")
    if unit != "mm":
        # nibabel's affine is in the file's unit: read as mm, a micron file's 1.5 um voxels were 1.5 mm (and ITK
        # read medfast's outputs 1000x off); no silent rescaling either, the outputs copy the header
        scale = {"micron": "1e-3", "meter": "1e3"}.get(unit, "?")
        raise error(f"{path}: its spatial unit is {unit!r} (the header's xyzt_units), medfast reads world "
                    f"coordinates in mm; rewrite it in mm (nibabel: scale the affine by {scale}, then "
                    f"header.set_xyzt_units('mm'))")
    return img


def _load_mixed_case(nib: Any, path: Path) -> Any:
    """``path`` read as the single-file NIfTI it is when its ``.nii`` suffix is in mixed case (``scan.Nii``,
    ``scan.Nii.Gz``), else None: nibabel keeps only an all-upper or all-lower suffix and otherwise looks for
    ``scan.nii`` instead. NIfTI-1 or NIfTI-2 by the header size its first 4 bytes give, as nibabel tells them."""
    name = path.name
    for ext in (".nii.gz", ".nii.bz2", ".nii.zst", ".nii"):
        if name.lower().endswith(ext):
            nii = name[len(name) - len(ext):][:4]
            break
    else:
        return None
    if nii in (".nii", ".NII"):
        return None
    with nib.openers.ImageOpener(str(path)) as f:
        head = f.read(4)
    sizes = struct.unpack("<i", head) + struct.unpack(">i", head) if len(head) == 4 else ()
    cls = nib.Nifti1Image if 348 in sizes else nib.Nifti2Image if 540 in sizes else None
    if cls is None:
        raise ValueError(f'Cannot work out file type of "{path}"')  # as nibabel words it
    return cls.from_file_map({"image": nib.FileHolder(str(path)), "header": nib.FileHolder(str(path))})


def load_checked(path: str | Path, error: type[Exception] = DatasetError):
    """:func:`nifti_header`, refused with ``error`` naming the file when the header claims more voxel data than
    the file holds (:func:`claimed_size_problem`): for readers that go on to ``img.dataobj``, which would
    allocate the whole claim before the short read fails."""
    img = nifti_header(path, error)
    problem = claimed_size_problem(img)
    if problem:
        raise error(f"cannot read the voxel data of {path}: {problem}")
    return img


def voxel_spacing(affine: MatrixLike) -> np.ndarray:
    """Voxel size (mm) along each spatial axis: the norms of the affine's first 3 columns."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.ndim != 2 or affine.shape[0] != affine.shape[1] or affine.shape[0] < 2:
        raise ValueError(f"affine must be a square (n + 1, n + 1) matrix, got shape {affine.shape}")
    n = affine.shape[0] - 1
    return np.sqrt((affine[:n, :n] ** 2).sum(axis=0))


def voxel_measure(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[float, float]:
    """``(measure, scale)`` of a voxel-to-world affine for an image of ``shape``: the voxel's volume (mm^3) of a
    3D grid, or the pixel's area (mm^2) of a 2D image or a single slice (exactly one of the three axes of size
    1, whichever: that axis's column may be degenerate, the slice is placed by the other two); ``scale`` is the
    product of the column lengths used, for a relative test (``measure`` near 0: singular)."""
    cols = np.asarray(affine, dtype=np.float64)[:3, :3]
    shape = tuple(shape)
    if len(shape) == 2:
        axes = [0, 1]
    elif len(shape) >= 3 and shape[:3].count(1) == 1:
        axes = [a for a in range(3) if shape[a] != 1]
    else:
        return abs(float(np.linalg.det(cols))), float(np.prod(np.linalg.norm(cols, axis=0)))
    a, b = cols[:, axes[0]], cols[:, axes[1]]
    return float(np.linalg.norm(np.cross(a, b))), float(np.linalg.norm(a) * np.linalg.norm(b))


def grid_offset(affine: MatrixLike, ref_affine: MatrixLike, shape: Sequence[int]) -> float:
    """How far the voxel grid of ``affine`` lies from the reference grid of ``ref_affine`` (spatial ``shape``;
    missing axes count as size 1), in voxels of the reference: the largest coordinate difference, over the
    reference's corner voxels, between the voxel and where the same voxel index of the other grid falls on the
    reference grid (``inv(ref_affine) @ affine``). A tolerance in mm instead would let a label shifted by whole
    voxels pass on a grid of small voxels or far from the origin.

    A flat axis (size 1) of a single slice is placed by the other axes: where the reference's affine is singular
    for that axis's column only, the column is replaced by the in-plane normal (its value never reaches the
    corners, all at index 0 there). Raises ``numpy.linalg.LinAlgError`` for a reference affine singular in its
    other axes."""
    a = np.asarray(affine, dtype=np.float64)
    ref = np.array(ref_affine, dtype=np.float64)
    if a.shape != ref.shape or a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 2:
        raise ValueError(f"affine and ref_affine must be square matrices of one shape, got {a.shape} and {ref.shape}")
    n = len(ref) - 1
    sizes = [int(shape[i]) if i < len(shape) else 1 for i in range(n)]
    flat = [i for i in range(n) if sizes[i] <= 1]
    lin = ref[:n, :n]
    if flat and len(flat) < n and not abs(np.linalg.det(lin)) > 1e-6 * np.prod(np.linalg.norm(lin, axis=0)):
        # the flat axes' columns: an orthonormal completion of the others (scaled to their mean length)
        kept = [i for i in range(n) if i not in flat]
        u, _, _ = np.linalg.svd(lin[:, kept])
        length = float(np.mean(np.linalg.norm(lin[:, kept], axis=0)))
        for j, i in enumerate(flat):
            ref[:n, i] = u[:, len(kept) + j] * length
    offset = np.linalg.inv(ref) @ a
    corners = np.array(np.meshgrid(*[[0.0, max(s - 1.0, 0.0)] for s in sizes], indexing="ij")).reshape(n, -1)
    corners = np.vstack([corners, np.ones((1, corners.shape[1]))])
    return float(np.abs((offset - np.eye(n + 1)) @ corners).max())


def same_grid(affine: MatrixLike, ref_affine: MatrixLike, shape: Sequence[int], tol: float = 1e-3) -> bool:
    """Whether the grids of ``affine`` and ``ref_affine`` (spatial ``shape``) are the same voxel grid: every
    corner voxel within ``tol`` voxel of the reference's (:func:`grid_offset`; entrywise in mm, a 0.09 % spacing
    difference would pass and put voxel 511 half a voxel away). False for non-finite affines; raises
    ``numpy.linalg.LinAlgError`` for a singular reference (see :func:`grid_offset`)."""
    return bool(grid_offset(affine, ref_affine, shape) <= tol)  # (NaN: False)


# deflate cannot compress better than about 1032:1 (a 258-byte match per 2 bits at best): a gzip file of n bytes
# holds at most ~1032 n bytes, whatever its members say
_MAX_DEFLATE_RATIO = 1100


def _gzip_holds(path: str, need: int) -> bool:
    """Whether the gzip file ``path`` decompresses to at least ``need`` bytes; cheap for a file that clearly
    cannot (a header that lies about its size), streams the data otherwise (nothing kept)."""
    size = os.path.getsize(path)
    if need > size * _MAX_DEFLATE_RATIO + (1 << 20):
        return False
    if need >= 1 << 32:  # the trailer's size is mod 2^32: no lower bound there
        return True
    with open(path, "rb") as f:
        f.seek(max(size - 4, 0))
        tail = f.read(4)
    if len(tail) == 4 and struct.unpack("<I", tail)[0] >= need:
        return True
    # the trailer's ISIZE is the last member's size only: a multi-member file (bgzip, concatenated gzips) can
    # hold more than it says, so count the decompressed bytes (the read that follows costs the same anyway)
    got = 0
    try:
        with gzip.open(path, "rb") as f:
            while got < need:
                chunk = f.read(min(1 << 24, need - got))
                if not chunk:
                    break
                got += len(chunk)
    except (OSError, EOFError, ValueError):  # corrupt: the reader's own error names the problem
        return True
    return got >= need


def claimed_size_problem(img: Any) -> str | None:
    """Why the voxel data its header claims cannot be in ``img``'s file, or None: checked before anything is
    allocated, since a 70-byte file claiming 1024^3 voxels would otherwise cost gigabytes before the read fails.
    Files that are neither plain nor gzip-compressed are not checked."""
    proxy = getattr(img, "dataobj", None)
    try:
        shape, dtype, offset = tuple(proxy.shape), np.dtype(proxy.dtype), int(proxy.offset)
        path = str(img.file_map["image"].filename)
    except Exception:  # noqa: BLE001 - not a file-backed array proxy (an in-memory image, another format)
        return None
    need = offset + math.prod(int(n) for n in shape) * dtype.itemsize
    claim = f"the header claims {byte_size(need - offset)} of voxel data ({'x'.join(map(str, shape))} {dtype})"
    suffix = path.lower()  # nibabel opens SCAN.NII.GZ (as some PACS exports name it) as gzip, whatever the case
    try:
        if suffix.endswith(".gz"):
            if not _gzip_holds(path, need):
                return f"{claim}, more than the compressed file can hold (corrupt or truncated file?)"
        elif not suffix.endswith((".bz2", ".zst")) and os.path.getsize(path) < need:
            return f"{claim} from byte {offset}, but the file has {os.path.getsize(path)} bytes (truncated file?)"
    except OSError:
        return None
    return None


def byte_size(nbytes: int) -> str:
    """A byte count as an error message names it: bytes below 10 MB, else GB, or TB from 1 TB."""
    if nbytes < 1e7:
        return f"{nbytes} bytes"
    return f"{nbytes / 1e12:.3g} TB" if nbytes >= 1e12 else f"{nbytes / 1e9:.3g} GB"


def read_failure(exc: BaseException, nbytes: int | None = None) -> str:
    """An exception as an error message can name it: ``MemoryError: the image needs N GB`` (``str(MemoryError())``
    is empty), the type name beside any other message (or alone where it has none)."""
    if isinstance(exc, MemoryError):
        return f"MemoryError: the image needs {byte_size(nbytes)}" if nbytes else "MemoryError: out of memory"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def unsupported_voxels(dtype: np.dtype) -> str | None:
    """Why voxels of ``dtype`` cannot be read as one scalar per voxel, or None: an RGB (structured) file cannot be
    cast to numbers, and a complex one would silently lose its imaginary part. The loaders prefix the file."""
    if dtype.kind == "V":
        return f"holds RGB / structured voxels ({dtype}); convert it to a scalar (grey) volume first"
    if dtype.kind == "c":
        return f"holds complex voxels ({dtype}); save the magnitude or the real part first"
    return None


def single_slice_as_2d(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A single slice stored ``(X, Y, 1)``, ``(1, Y, Z)`` or ``(X, 1, Z)`` as the 2D image it is, with the affine's
    columns in the order of the remaining axes (the flat axis's column last, so the first two spacings are the
    in-plane ones); any other array (and its affine) unchanged."""
    shape = data.shape
    if data.ndim != 3 or shape.count(1) != 1:
        return data, affine
    order = [a for a in range(3) if a != shape.index(1)] + [shape.index(1)]
    affine = np.array(affine, dtype=np.float64, copy=True)
    affine[:3, :3] = affine[:3, order]
    return np.transpose(data, order)[..., 0], affine


def single_slice_axis(shape: tuple[int, ...]) -> int | None:
    """The flat axis of a single slice stored as a volume, ``(X, Y, 1)`` -> 2, ``(1, Y, Z)`` -> 0, ``(X, 1, Z)`` -> 1
    (channels or vector components may follow on further axes): the axis :func:`single_slice_as_2d` moves last.
    None for any other shape (a 2D array, a volume)."""
    shape = tuple(shape)
    if len(shape) < 3 or shape[:3].count(1) != 1:
        return None
    return shape[:3].index(1)


def single_slice_as_stored(data: np.ndarray, affine: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`single_slice_as_2d`: a 2D image ``(X', Y', ...)`` (channels may follow) and its
    permuted affine back in the stored layout of a slice whose flat axis was ``axis`` (the axis of size 1
    inserted there, the affine's columns in the file's order). ``axis`` None: both unchanged."""
    if axis is None:
        return data, affine
    order = [a for a in range(3) if a != axis] + [axis]
    out = np.array(affine, dtype=np.float64, copy=True)
    out[:3, order] = np.asarray(affine, dtype=np.float64)[:3, :3]
    return np.expand_dims(data, axis), out


def is_vector_layout(shape: tuple[int, ...]) -> bool:
    """NIfTI's vector layout ``(X, Y, Z, 1, C)`` (how ITK writes a multi-channel image): read as ``C`` channels."""
    return len(shape) == 5 and shape[3] == 1


def check_label_values(values: np.ndarray, what: str, error: type[Exception]) -> None:
    """Raises ``error("<what> holds ...")`` unless ``values`` can be cast to int64 labels exactly: finite integer
    floats below 2^53 (beyond it a float is no exact integer, and past int64's range the cast wraps: inf and 1e300
    became -2^63), uint64 within int64. Negative values are the caller's check (after the cast)."""
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)):
            raise error(f"{what} holds NaN or inf values")
        if not np.all(values == np.round(values)):
            raise error(f"{what} holds non-integer values (is it an image?)")
        big = float(np.abs(values).max()) if values.size else 0.0
        if big >= 2.0**53:
            raise error(f"{what} holds the value {big:g}, too large for a label (is it an image?)")
    elif values.dtype == np.uint64 and values.size and int(values.max()) > np.iinfo(np.int64).max:
        raise error(f"{what} holds the value {int(values.max())}, too large for a label")


def load_nifti(path: str | Path, *, label: bool = False) -> Volume:
    """Reads a NIfTI image (float32, channels first) or label map (int64, integer-valued check).

    Raises
    ------
    DatasetError
        Missing file, unreadable or corrupt data, RGB or complex voxels, more than 4 dimensions (but for the
        vector layout ``(X, Y, Z, 1, C)``, read as ``C`` channels), NaN/inf voxels,
        a singular or non-finite affine, or (``label``) non-integer or negative label values — the message names
        the file.
    """
    img = load_checked(path)
    try:
        data = np.asanyarray(img.dataobj)
    except MemoryError as exc:
        raise DatasetError(f"cannot read the voxel data of {path}: {read_failure(exc, _voxel_bytes(img))}") from None
    except Exception as exc:  # noqa: BLE001
        raise DatasetError(f"cannot read the voxel data of {path} (corrupt or truncated file?): "
                           f"{read_failure(exc)}") from None
    problem = unsupported_voxels(data.dtype)
    if problem:
        raise DatasetError(f"{path}: {problem}")
    if is_vector_layout(data.shape):
        data = data[:, :, :, 0, :]
    if data.ndim < 2 or data.ndim > 4:
        raise DatasetError(f"{path}: expected a 2D, 3D or 4D NIfTI (channels on the 4th axis, or the vector "
                           f"layout (X, Y, Z, 1, C)), got shape {data.shape}")
    affine = np.asarray(img.affine, dtype=np.float64)
    # reorientation and resampling invert it: a broken header would fail there without naming the file
    if not np.isfinite(affine).all():
        raise DatasetError(f"{path}: the voxel-to-world affine (sform / qform) holds NaN or inf values")
    size, scale = voxel_measure(affine, data.shape)
    if not size > 1e-6 * scale:  # relative (as register's reader): 0.1 um voxels are valid, 1e-12 mm^3 each
        raise DatasetError(f"{path}: the voxel-to-world affine (sform / qform) is singular (zero voxel size or "
                           "parallel voxel axes): the header's voxel sizes or orientation are broken")
    if label:
        if data.ndim == 4:
            if data.shape[3] != 1:
                raise DatasetError(f"{path}: a label map must have one channel, got shape {data.shape}")
            data = data[..., 0]
        values = np.asarray(data)
        check_label_values(values, f"{path}: label map", DatasetError)
        try:
            values = values.astype(np.int64)
        except MemoryError as exc:
            raise DatasetError(f"{path}: {read_failure(exc, values.size * 8)}") from None
        if values.size and values.min() < 0:
            raise DatasetError(f"{path}: label map holds negative values (min {values.min()})")
        return Volume(values, affine, img.header, str(path))
    try:
        values = np.asarray(data, dtype=np.float32)
        values = values[None] if values.ndim < 4 else np.moveaxis(values, -1, 0)
        if not np.all(np.isfinite(values)):
            raise DatasetError(f"{path}: image holds NaN or inf voxels")
        values = np.ascontiguousarray(values)
    except MemoryError as exc:
        raise DatasetError(f"{path}: {read_failure(exc, data.size * 4)}") from None
    return Volume(values, affine, img.header, str(path))


def _voxel_bytes(img: Any) -> int | None:
    """The bytes the voxel data of ``img`` takes in memory, as read (scaled data: float64), or None."""
    try:
        dtype = np.dtype(img.get_data_dtype())
        scaled = getattr(img.dataobj, "slope", 1.0) != 1.0 or getattr(img.dataobj, "inter", 0.0) != 0.0
        return math.prod(int(n) for n in img.shape) * (8 if scaled else dtype.itemsize)
    except Exception:  # noqa: BLE001
        return None


def entry_files(entry: ImageEntry) -> list[str]:
    """The files of an image entry (see :data:`ImageEntry`): ``[entry]`` for one file, else its channel files."""
    if isinstance(entry, (str, os.PathLike)):
        return [str(entry)]
    files = [str(p) for p in entry]
    if not files:
        raise DatasetError("an image entry is an empty list of channel files")
    return files


def entry_text(entry: ImageEntry) -> str:
    """An image entry as error messages (and the data sets' ``files``) name it: the path, or the channel files
    joined by `` + ``."""
    return " + ".join(entry_files(entry))


@dataclass
class ImageHeader:
    """What the headers of an image entry say (nothing but headers is read).

    Attributes
    ----------
    shape : tuple of int
        The NIfTI shape of the image; a list of channel files reads as one 4D file ``(X, Y, Z, C)`` (2D files:
        ``(X, Y, 1, C)``), ``C`` the number of files.
    affine : ndarray
        The (first) file's voxel-to-world affine.
    header : nibabel header
        The (first) file's header.
    path : str
        :func:`entry_text` of the entry.
    """

    shape: tuple[int, ...]
    affine: np.ndarray
    header: Any
    path: str


def _one_channel_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The spatial shape (3 axes, a 2D file padded with 1) of a channel file, which must hold one channel."""
    channels = shape[4] if is_vector_layout(shape) else (shape[3] if len(shape) == 4 else 1)
    if len(shape) > 5 or (len(shape) == 5 and not is_vector_layout(shape)) or len(shape) < 2:
        raise DatasetError(f"{path}: expected a 2D or 3D NIfTI, got shape {shape}")
    if channels != 1:
        raise DatasetError(f"{path} holds {channels} channels (shape {shape}), but a file of a case stored one file "
                           f"per channel (nnU-Net's _0000, _0001, ...) must hold one")
    return (tuple(shape[:3]) + (1,) * 3)[:3]


def _check_same_grid(path: str, shape: tuple[int, ...], affine: np.ndarray, first: str,
                     first_shape: tuple[int, ...], first_affine: np.ndarray) -> None:
    if shape != first_shape:
        raise DatasetError(f"channel file {path} has spatial shape {shape} but the case's first channel file "
                           f"{first} has {first_shape}: the channels of a case must share the voxel grid")
    if not _on_grid(affine, first_affine, first_shape, first):
        raise DatasetError(f"channel file {path} and the case's first channel file {first} have different affines "
                           f"(not on the same grid):\n{np.array2string(affine, precision=3)}\nvs\n"
                           f"{np.array2string(first_affine, precision=3)}")


def _on_grid(affine: np.ndarray, ref_affine: np.ndarray, shape: Sequence[int], ref_path: str) -> bool:
    """:func:`same_grid`, with a singular reference affine raised as :class:`DatasetError` naming its file."""
    try:
        return same_grid(affine, ref_affine, shape)
    except np.linalg.LinAlgError:
        raise DatasetError(f"{ref_path}: the voxel-to-world affine (sform / qform) is singular (zero voxel size or "
                           "parallel voxel axes): the header's voxel sizes or orientation are broken") from None


def image_header(entry: ImageEntry) -> ImageHeader:
    """The headers of an image entry (see :data:`ImageEntry`); for a list of channel files, each must hold one
    channel on the first file's grid (same spatial shape and affine). Raises :class:`DatasetError` naming the
    file."""
    files = entry_files(entry)
    first = nifti_header(files[0])
    if isinstance(entry, (str, os.PathLike)):
        return ImageHeader(tuple(first.shape), np.asarray(first.affine, np.float64), first.header, files[0])
    shape0 = _one_channel_shape(files[0], tuple(first.shape))
    for path in files[1:]:
        img = nifti_header(path)
        _check_same_grid(path, _one_channel_shape(path, tuple(img.shape)), img.affine, files[0], shape0, first.affine)
    return ImageHeader((*shape0, len(files)), np.asarray(first.affine, np.float64), first.header, entry_text(entry))


def load_image(entry: ImageEntry) -> Volume:
    """Reads an image entry (see :data:`ImageEntry`) as :func:`load_nifti` reads one file: ``data`` ``(C, *S)``
    float32; a list of channel files is stacked in its order (channel ``k`` from file ``k``), with the first
    file's affine and header, and ``path`` naming every file (:func:`entry_text`).

    Raises
    ------
    DatasetError
        What :func:`load_nifti` raises, and for a list of channel files: a file with more than one channel, or
        of another spatial shape or affine than the first (named).
    """
    files = entry_files(entry)
    if isinstance(entry, (str, os.PathLike)):
        return load_nifti(files[0])
    vols = [load_nifti(p) for p in files]
    first = vols[0]
    shape0 = _one_channel_shape(files[0], (*first.data.shape[1:], first.data.shape[0]))
    for vol in vols[1:]:
        _check_same_grid(vol.path, _one_channel_shape(vol.path, (*vol.data.shape[1:], vol.data.shape[0])),
                         vol.affine, first.path, shape0, first.affine)
    # every file was read (1, *S) on the same grid: the channels are stacked in the entry's order, on 3 axes (a
    # 2D file's (X, Y) as (X, Y, 1)), as the data of one 4D file (X, Y, Z, C) / (X, Y, 1, C) would be read
    data = np.concatenate([v.data.reshape(1, *shape0) for v in vols], axis=0)
    return Volume(data, first.affine, first.header, entry_text(entry))


def save_nifti(data: np.ndarray | torch.Tensor, affine: MatrixLike, path: str | Path, header: Any = None,
               dtype: Any = None, intent: str | tuple | None = None) -> Path:
    """Writes ``data`` (spatial axes first) with ``affine`` and, when given, a copy of ``header``
    (its data type and scaling reset for ``dtype``; its display window ``cal_min`` / ``cal_max`` reset to 0, a
    viewer's automatic range, and its intent to none: they described the input's values, not these).
    ``intent``: the output's own NIfTI intent, a name (``"label"``) or ``(code, params, name)`` as
    ``nibabel``'s ``set_intent`` takes them.

    When ``affine`` is the header's own (best) affine -- an output written in its input's space, as
    ``medfast predict`` does -- the header's qform and sform, matrices and codes, are kept exactly as they are
    (readers that use the qform, such as ITK / SimpleITK, nnU-Net, Slicer, then place the output where they place
    the input, even where the input's qform and sform differ). Otherwise both are set to ``affine``, with the
    header's codes where it has them and 2 (aligned) where it has none.
    """
    nib = _nib()
    path = Path(path)
    if re.search(r"\.(hdr|img)(\.gz)?$", path.name, re.IGNORECASE):
        # (a pair: nibabel wrote both files under the temporary name and only the named one was renamed)
        raise ValueError(f"path: {path} names an Analyze-style .hdr / .img pair; save_nifti writes single-file "
                         f"NIfTI: give a .nii or .nii.gz name")
    path.parent.mkdir(parents=True, exist_ok=True)
    import torch

    if isinstance(data, torch.Tensor):
        data = data.detach().cpu()
        data = data.float() if data.dtype in (torch.float16, torch.bfloat16) else data
    data = np.asarray(data)
    if dtype is not None:
        data = data.astype(dtype)
    # NIfTI-1 has no bool or float16 type (nibabel's HeaderDataError): a mask as uint8, half floats as float32
    data = data.astype(np.uint8) if data.dtype == np.bool_ else data.astype(np.float32) if data.dtype == np.float16 \
        else data
    affine = np.asarray(affine, dtype=np.float64)
    hdr = nib.Nifti1Header.from_header(header) if header is not None else None  # a copy, as a NIfTI-1 header
    # the dtype given explicitly: without a header nibabel refuses int64 data (argmax labels) otherwise
    img = nib.Nifti1Image(data, affine, header=hdr, dtype=data.dtype)
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"] = img.header["cal_max"] = 0.0
    if intent is None:
        img.header.set_intent("none", (), "")
    elif isinstance(intent, tuple):
        img.header.set_intent(*intent)
    else:
        img.header.set_intent(intent, (), "")
    # nibabel keeps a given header's transforms when the affine matches its best affine (the same test as here);
    # otherwise it would set the sform (code 2) and a qform with code 0 (unknown), which ITK readers ignore
    if hdr is not None and not np.allclose(affine, hdr.get_best_affine()):
        img.set_sform(affine, code=int(hdr["sform_code"]) or 2)
        img.set_qform(affine, code=int(hdr["qform_code"]) or 2)
    with replacing(path) as tmp:  # complete or absent: a kill or a full disk left truncated .nii.gz files
        nib.save(img, str(tmp))
    return path
