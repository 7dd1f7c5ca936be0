"""A data set of the user's labelled images: class subfolders or a CSV of labels; PNG/JPEG (PIL or
matplotlib), NIfTI (nibabel) and DICOM (pydicom). Every read error raises :class:`medfast.data.DatasetError`
naming the file."""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medfast.data import DatasetError

__all__ = ["IMAGE_SUFFIXES", "ImageFolderDataset", "probe_channels", "read_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".nii", ".nii.gz", ".dcm")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


#: PIL modes read as one grey channel; every other mode is read as RGB (alpha dropped)
_GREY_MODES = ("1", "L", "LA", "La", "I", "F")


def _mode_channels(mode: str) -> int:
    """Channels :func:`read_image` gives an image of PIL mode ``mode``: 1 (grey) or 3 (colour)."""
    return 1 if mode in _GREY_MODES or mode.startswith("I;16") else 3


def _pil_array(im) -> np.ndarray:
    """The pixels of a loaded PIL image: uint8 / uint16 grey ``(H, W)``, uint8 RGB ``(H, W, 3)`` or float32."""
    mode = im.mode
    if mode.startswith("I;16"):  # 16-bit grey (any byte order) -> native uint16
        arr = np.asarray(im)
        return arr.astype(np.float32 if arr.dtype.kind == "i" else np.uint16)  # signed (I;16S): as stored
    if mode == "I":  # 32-bit integers: PIL's mode of 16-bit grey PNGs in older versions
        arr = np.asarray(im)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(f"32-bit integer image with values {arr.min()}..{arr.max()} outside the 16-bit "
                             "range [0, 65535]")
        return arr.astype(np.uint16)
    if mode == "F":  # 32-bit float: as stored
        return np.asarray(im, dtype=np.float32)
    if mode in ("1", "L", "LA", "La"):
        return np.asarray(im.convert("L"))
    if mode in ("P", "PA", "RGBA", "RGBa", "RGBX"):  # palette (with transparency) and alpha: via RGBA
        return np.asarray(im.convert("RGBA"))[..., :3]
    return np.asarray(im if mode == "RGB" else im.convert("RGB"))  # CMYK, YCbCr, LAB, HSV, ...


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_format(path: Path) -> tuple[int, int] | None:
    """A PNG's ``(bit depth, colour type)`` from its IHDR (bytes 24 and 25); None for other files."""
    with open(path, "rb") as fh:
        head = fh.read(26)
    if len(head) < 26 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def _upright(im):
    """``im`` turned as its EXIF orientation says (phones and dermatoscopes store photos sideways and set
    the tag): the image every viewer shows. Keeps the mode."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(im)


def _read_png_grey_alpha16(path: Path) -> np.ndarray:
    """The grey channel of a 16-bit grey + alpha PNG (colour type 4) as uint16 ``(H, W)``.

    PIL opens these as 8-bit RGBA (the low bytes lost). Their pixels are 4 bytes, as an 8-bit RGBA PNG's, so
    the PNG filters (which work on bytes, ``bpp`` = 4 for both) and the Adam7 passes are the same: the file
    is decoded as 8-bit RGBA with its IHDR changed, and grey = R * 256 + G (B, A: the alpha). Chunks whose
    layout depends on the colour type (sBIT, bKGD, ...) are left out; EXIF and text chunks are kept."""
    import struct
    import zlib

    from PIL import Image

    data, pos, chunks = path.read_bytes(), 8, []
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            body = body[:8] + bytes((8, 6)) + body[10:]
        elif kind not in (b"IDAT", b"IEND", b"eXIf", b"tEXt", b"zTXt", b"iTXt"):
            continue
        chunks.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body)))
        if kind == b"IEND":
            break
    with Image.open(io.BytesIO(_PNG_SIGNATURE + b"".join(chunks))) as im:
        im.load()
        rgba = np.asarray(_upright(im))
    return (rgba[..., 0].astype(np.uint16) << 8) | rgba[..., 1]


def _read_raster(path: Path) -> np.ndarray:
    try:
        from PIL import Image

        if _png_format(path) == (16, 4):  # 16-bit grey + alpha: PIL would give 8-bit RGBA
            arr = _read_png_grey_alpha16(path)
        else:
            with Image.open(path) as im:
                im.load()
                arr = _pil_array(_upright(im))
    except ImportError:
        import matplotlib.image as mpimg

        arr = mpimg.imread(path)
    arr = np.asarray(arr)
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(arr.dtype, 1.0)
    arr = arr.astype(np.float32) / scale
    if arr.ndim == 3 and arr.shape[2] == 4:  # RGBA (matplotlib): drop alpha
        arr = arr[..., :3]
    if arr.ndim == 3 and arr.shape[2] == 2:  # grey + alpha (matplotlib): drop alpha
        arr = arr[..., :1]
    return arr.transpose(2, 0, 1) if arr.ndim == 3 else arr[None]


def probe_channels(path: str | Path) -> int | None:
    """Channels :func:`read_image` will give for ``path``, from the file's header only (PNG colour type, PIL
    mode, DICOM samples per pixel and photometric interpretation; NIfTI: 1 unless RGB24); None when the
    header cannot be read (the full read then names the file)."""
    path = Path(path)
    suffix = _suffix(path)
    try:
        if suffix in (".nii", ".nii.gz"):
            from medfast.data.io import nifti_header

            return 3 if _nifti_rgb(nifti_header(path).get_data_dtype()) else 1
        if suffix == ".dcm":
            import pydicom

            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
            return 3 if _dicom_colour(ds) else 1
        png = _png_format(path) if suffix == ".png" else None
        if png is not None and png[1] in (0, 4):  # grey, grey + alpha: any depth (PIL: 16-bit LA is RGBA)
            return 1
        from PIL import Image

        with Image.open(path) as im:
            return _mode_channels(im.mode)
    except Exception:  # noqa: BLE001 - unreadable header: read_image raises the error naming the file
        return None


def _nifti_rgb(dtype: np.dtype) -> bool:
    """An RGB24 / RGBA32 NIfTI's voxel type: 8-bit R, G, B (and A) fields."""
    return dtype.names is not None and tuple(dtype.names[:3]) == ("R", "G", "B") and all(
        dtype.fields[c][0] == np.uint8 for c in dtype.names)


def _read_nifti(path: Path) -> np.ndarray:
    from medfast.data.io import load_checked, unsupported_voxels

    img = load_checked(path)  # before .dataobj allocates what a lying header claims
    dtype = img.get_data_dtype()
    if _nifti_rgb(dtype):  # colour: 3 channels in [0, 1], as an 8-bit RGB PNG reads (alpha dropped)
        rgb = np.asanyarray(img.dataobj)
        return np.stack([rgb[c] for c in "RGB"]).astype(np.float32) / 255.0
    problem = unsupported_voxels(dtype)  # complex: get_fdata would silently keep the real part
    if problem:
        raise DatasetError(f"{path}: {problem}")
    return np.asarray(img.get_fdata(dtype=np.float32))[None]


def _dicom_colour(ds) -> bool:
    """A DICOM of colour pixels: RGB / YBR samples, or palette indices (PALETTE COLOR)."""
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    return int(ds.get("SamplesPerPixel", 1) or 1) > 1 or photometric == "PALETTE COLOR"


def _pixel_value_source(ds, frame: int):
    """The dataset holding ``frame``'s rescale: an enhanced (multi-frame) CT/MR/PET keeps it in the frame's
    functional group (PerFrameFunctionalGroupsSequence) or in the shared one, not at the top level."""
    for name, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(name)
        if groups and index < len(groups):
            item = groups[index].get("PixelValueTransformationSequence")
            if item:
                return item[0]
    return ds


class _OldModule(ImportError):
    """An installed optional module older than the reader needs (its message says which version is needed)."""


def _pydicom():
    """pydicom, 3.0 or newer: the DICOM reader uses ``pydicom.pixels`` (new in 3.0) and relies on 3.0's conversion
    of YBR pixel data to RGB in ``pixel_array``; pydicom 2.x raises :class:`_OldModule` naming the version found."""
    import pydicom

    found = str(getattr(pydicom, "__version__", "unknown"))
    major = re.match(r"\d+", found)
    if major is None or int(major.group()) < 3:
        raise _OldModule(f'pydicom >= 3 (found {found}): pip install -U "pydicom>=3"', name="pydicom")
    return pydicom


def _modality(values: np.ndarray, source) -> np.ndarray:
    """The modality transform (stored values to e.g. HU) of ``source`` (a dataset or functional group item):
    its Modality LUT Sequence, else rescale slope/intercept (missing or 0 slope: 1, missing intercept: 0)."""
    from pydicom.pixels import apply_modality_lut

    if source.get("ModalityLUTSequence"):
        return apply_modality_lut(values, source).astype(np.float32)
    # float32 (not pydicom's float64): half the memory of a large volume, the precision medfast reads in
    slope, intercept = float(source.get("RescaleSlope", 1) or 1), float(source.get("RescaleIntercept", 0) or 0)
    return values.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _read_dicom(path: Path, spatial_dims: int = 2) -> np.ndarray:
    pydicom = _pydicom()
    from pydicom.pixels import apply_color_lut

    ds = pydicom.dcmread(str(path))
    arr = ds.pixel_array  # YBR is converted to RGB
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if _dicom_colour(ds):
        if photometric == "PALETTE COLOR":  # indices -> RGB (alpha dropped) of the palette's bits per entry
            arr = apply_color_lut(arr, ds)[..., :3]
            # the descriptor's 8 or 16: 8-bit entries are often stored in 16-bit words (uint16 values <= 255)
            descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
            top = float(2 ** int(descriptor[2]) - 1) if descriptor else float(np.iinfo(arr.dtype).max)
        else:  # RGB (and YBR, converted): [0, 1] as an RGB PNG, whatever the bits stored
            top = float(2 ** int(ds.get("BitsStored", 8) or 8) - 1)
        if arr.ndim == 4 and spatial_dims == 2:
            raise DatasetError(f"{path}: a multi-frame colour DICOM ({arr.shape[0]} frames of {arr.shape[1]}x"
                               f"{arr.shape[2]}, 3 channels) is no 2D image: read it with spatial_dims=3 (frames "
                               "as the 3rd axis) or store the frames as separate files")
        return np.moveaxis(arr.astype(np.float32) / np.float32(top), -1, 0)
    stack = arr.reshape(-1, *arr.shape[-2:])  # (frames, H, W): an enhanced file rescales frame by frame
    sources = [_pixel_value_source(ds, f) for f in range(len(stack))]
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    # the stored range, for MONOCHROME1 (low = white): x -> lo + hi - x in rescaled units, so that a
    # MONOCHROME1 file reads as its MONOCHROME2 twin
    stored = (np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1]) if int(ds.get("PixelRepresentation", 0) or 0)
              else np.array([0, 2 ** bits - 1]))
    if all(source is sources[0] for source in sources):  # shared group or top level: one transform
        out = _finish(stack, sources[0], stored, photometric)
    else:
        out = np.stack([_finish(frame, source, stored, photometric) for frame, source in zip(stack, sources)])
    return out.astype(np.float32).reshape(1, *arr.shape)


def _finish(values: np.ndarray, source, stored: np.ndarray, photometric: str) -> np.ndarray:
    """Grey DICOM values in rescaled units, MONOCHROME1 turned to MONOCHROME2 polarity."""
    out = _modality(values, source)
    if photometric == "MONOCHROME1":
        limits = _modality(stored, source)
        out = limits.min() + limits.max() - out
    return out


def read_image(path: str | Path, spatial_dims: int = 2) -> np.ndarray:
    """Reads an image as float32 ``(channels, *spatial)``.

    PNG/JPEG give ``(1 or 3, H, W)`` in ``[0, 1]`` (8-bit / 255, 16-bit / 65535; grey modes ``1``, ``L``,
    ``LA``, ``I;16``, ``I`` and 16-bit grey + alpha PNGs give one channel, alpha dropped; palette, RGBA and CMYK
    images are converted to RGB; 16-bit RGB(A) PNGs are read at 8 bits, PIL's precision; 32-bit float images
    as stored), turned upright as their EXIF orientation says. NIfTI gives ``(1, *shape)`` in its own units, but
    an RGB24 / RGBA32 NIfTI ``(3, *shape)`` in ``[0, 1]`` as an 8-bit RGB PNG (alpha dropped); complex NIfTI
    voxels are refused. DICOM:

    * grey (MONOCHROME1/2): ``(1, H, W)``, multi-frame ``(1, frames, H, W)``, in the units of the modality
      transform (Modality LUT Sequence, or rescale slope/intercept: top level, or an enhanced file's shared or
      per-frame functional groups, frame by frame); MONOCHROME1 (low = white) is mapped to MONOCHROME2
      polarity, ``x -> lo + hi - x`` with ``lo``, ``hi`` the transformed limits of the stored range, so that
      it reads as its MONOCHROME2 twin;
    * colour (RGB, YBR converted to RGB, PALETTE COLOR looked up in its palette): ``(3, H, W)`` in ``[0, 1]``
      like an RGB PNG (RGB / YBR divided by ``2**BitsStored - 1``, palettes by ``2**bits - 1`` with their
      descriptor's 8 or 16 bits per entry); multi-frame colour ``(3, frames, H, W)`` with ``spatial_dims=3``
      (with 2: an error saying so).

    Singleton spatial axes beyond ``spatial_dims`` are dropped (e.g. an ``(H, W, 1)`` NIfTI is a 2D image).

    Raises
    ------
    DatasetError
        Missing file, unknown suffix, unreadable/corrupt data, complex voxels, wrong dimensionality or non-finite
        values; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    suffix = _suffix(path)
    readers = {".png": _read_raster, ".jpg": _read_raster, ".jpeg": _read_raster, ".nii": _read_nifti,
               ".nii.gz": _read_nifti, ".dcm": lambda p: _read_dicom(p, spatial_dims)}
    if suffix not in readers:
        raise DatasetError(f"{path}: unknown image type {suffix!r} (expected one of {', '.join(IMAGE_SUFFIXES)})")
    try:
        arr = readers[suffix](path)
    except ImportError as exc:  # a missing reader (named), or one too old (its message says which version)
        raise DatasetError(f"{path}: reading {suffix} files needs {exc if isinstance(exc, _OldModule) else exc.name}"
                           ) from exc
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
        raise DatasetError(f"{path}: cannot read {suffix} image ({type(exc).__name__}: {exc})") from exc
    while arr.ndim - 1 > spatial_dims and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim - 1 != spatial_dims:
        raise DatasetError(f"{path}: image of shape {arr.shape[1:]} is not {spatial_dims}D")
    if arr.size == 0 or not np.isfinite(arr).all():
        raise DatasetError(f"{path}: empty image or NaN/inf values")
    return np.ascontiguousarray(arr, dtype=np.float32)


#: how ``data.shape`` resizes images (recorded in a checkpoint's ``data.dataset_args.resize_version``): 2, shrinking
#: antialiases (2D) / area-averages (3D); 1, plain bi/trilinear, as before 2026-11-29 (checkpoints without the record
#: were trained on it and keep it at predict and resume)
RESIZE_VERSION = 2
RESIZE_VERSIONS = (1, 2)


def check_resize_version(value: object, name: str = "resize_version") -> int:
    """``value`` as one of :data:`RESIZE_VERSIONS`; TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, 1 (plain bilinear/trilinear) or 2 (antialiased / area-averaged "
                        f"shrinking), got {value!r}")
    if int(value) not in RESIZE_VERSIONS:
        raise ValueError(f"{name} must be 1 (plain bilinear/trilinear) or 2 (antialiased / area-averaged "
                         f"shrinking), got {value!r}")
    return int(value)


def _resize(x: torch.Tensor, size: tuple[int, ...], version: int = RESIZE_VERSION) -> torch.Tensor:
    """``x`` ``(C, *spatial)`` resized to ``size``: bi/trilinear (``align_corners=False``) where it grows; where it
    shrinks, plain bi/trilinear samples only the pixels next to each output one and drops the detail between
    them (a 3x3 dot vanishes in an 8x reduction), so 2D is antialiased (``antialias=True``, PIL's triangle
    filter) and 3D is first area-averaged on the shrinking axes. ``version`` 1: plain bi/trilinear everywhere,
    the inputs of checkpoints trained before (see :data:`RESIZE_VERSION`)."""
    if version == 1:
        mode = "bilinear" if len(size) == 2 else "trilinear"
        return F.interpolate(x[None], size=tuple(size), mode=mode, align_corners=False)[0]
    if len(size) == 2:
        shrinks = any(n < s for n, s in zip(size, x.shape[1:], strict=True))
        return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=shrinks)[0]
    reduced = tuple(min(n, s) for n, s in zip(size, x.shape[1:], strict=True))
    if reduced != tuple(x.shape[1:]):  # area on the shrinking axes (the others keep their size: unchanged)
        x = F.interpolate(x[None], size=reduced, mode="area")[0]
    if reduced != size:  # trilinear on the growing axes (the others are at their size: unchanged)
        x = F.interpolate(x[None], size=size, mode="trilinear", align_corners=False)[0]
    return x


#: a label read as a number: an optionally signed decimal, with an optional exponent ("3", "-1", "0.5", "1e-3")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _sorted_class_names(labels: Sequence[str]) -> list[str]:
    """The distinct ``labels`` in class-index order: by value when every label is a number (``2`` before
    ``10``, as ``np.unique`` / sklearn's ``LabelEncoder`` order numeric labels; equal values such as ``1``
    and ``1.0`` by their text), else by their text."""
    names = set(labels)
    if names and all(_NUMBER.fullmatch(n) for n in names):
        return sorted(names, key=lambda n: (float(n), n))
    return sorted(names)


class ImageFolderDataset(Dataset):
    """Labelled images from ``root/<class>/<image>`` subfolders, or from a CSV of ``file,label`` rows.

    Parameters
    ----------
    root : str or Path
        Folder of class subfolders; or the folder the CSV's relative paths start from.
    csv_file : str or Path, optional
        UTF-8 CSV (a byte-order mark is allowed) with a header naming ``file_column`` and ``label_column``;
        relative paths are taken relative to ``root`` (default: the CSV's folder).
    classes : sequence of str, optional
        Class names in index order (for ordinal labels, the order ``low < ... < high``), each once. Default:
        the sorted subfolder names, or the sorted distinct CSV labels: by value when all are numbers (``2``
        before ``10``), else by their text. Labels outside it raise
        :class:`DatasetError`; so does a class subfolder without images.
    spatial_dims : int
        2 or 3.
    size : sequence of int, optional
        Resizes every image to this spatial size (positive sizes), so that batches stack: bilinear/trilinear,
        antialiased (2D) or area-averaged (3D) along the axes it shrinks.
    resize_version : int
        2 (default): that resize; 1: plain bilinear/trilinear (``align_corners=False``), without antialiasing or
        area-averaging, as checkpoints trained before 2026-11-29 saw their images.
    channels : int, optional
        1 converts colour images to grey (channel mean); 3 repeats grey images. Default: as stored, which
        must be the same for all images (checked from the file headers at construction: a folder mixing grey
        and colour images raises :class:`DatasetError` naming the first odd file).
    normalize : {"none", "minmax", "zscore"}
        Per-image intensity normalization (``zscore``: over all channels, with the population std, as
        :func:`medfast.data.normalize_intensity` and MONAI's ``NormalizeIntensity``; a constant image gives 0).
    file_column, label_column : str
        The CSV header's names of the image-path and the label columns (default ``file`` and ``label``; unused
        without ``csv_file``).

    Notes
    -----
    Items are dicts ``{"image": (C, *spatial) float32, "label": () int64, "files": str}``; a key
    ``(index, seed)`` (from :class:`medfast.train.EpochSampler`) adds ``"seed"``.
    """

    def __init__(self, root: str | Path, csv_file: str | Path | None = None, classes: Sequence[str] | None = None,
                 spatial_dims: int = 2, size: Sequence[int] | None = None, channels: int | None = None,
                 normalize: str = "none", file_column: str = "file", label_column: str = "label",
                 resize_version: int = RESIZE_VERSION) -> None:
        self.resize_version = check_resize_version(resize_version)
        if normalize not in ("none", "minmax", "zscore"):
            raise ValueError(f"normalize must be 'none', 'minmax' or 'zscore', got {normalize!r}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if size is not None:
            if isinstance(size, (int, str)) or len(size) != spatial_dims:
                raise ValueError(f"size {size!r} must be a sequence of {spatial_dims} sizes")
            if any(isinstance(v, bool) or int(v) != v or int(v) < 1 for v in size):
                raise ValueError(f"size {tuple(size)} must hold positive integer sizes")
            size = tuple(int(v) for v in size)
        if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
            raise ValueError(f"channels must be 1 (grey) or 3 (colour), got {channels!r}")
        if classes is not None:
            if isinstance(classes, str):
                raise ValueError(f"classes must be a list of class names, got the string {classes!r}")
            dup = sorted(name for name, n in Counter(map(str, classes)).items() if n > 1)
            if dup:
                raise ValueError(f"classes lists {dup} more than once: {list(classes)}")
        self.spatial_dims, self.size, self.channels, self.normalize = spatial_dims, size, channels, normalize
        root = Path(root) if root is not None else None
        if csv_file is not None:
            files, labels = self._from_csv(Path(csv_file), root, file_column, label_column)
        else:
            files, labels = self._from_folders(root, None if classes is None else [str(c) for c in classes])
        names = [str(c) for c in classes] if classes is not None else _sorted_class_names(labels)
        lookup = {n: i for i, n in enumerate(names)}
        for f, lab in zip(files, labels, strict=True):
            if lab not in lookup:
                raise DatasetError(f"{f}: label {lab!r} is not one of the classes {names}")
        if len(names) < 2:
            raise DatasetError(f"{csv_file or root}: found {len(names)} class(es) {names}; need at least 2")
        self.classes = names
        self.files = files
        self.labels = [lookup[lab] for lab in labels]
        #: the channels of every item: ``channels``, or (None) the one count all files share (from their headers)
        self.num_channels = channels if channels is not None else self._common_channels(files)

    @staticmethod
    def _common_channels(files: Sequence[Path]) -> int | None:
        """The channel count all ``files`` have (header only); raises :class:`DatasetError` naming the first
        file that differs. None if no header could be read."""
        first = None
        for f in files:
            c = probe_channels(f)
            if c is None:
                continue
            if first is None:
                first = (f, c)
            elif c != first[1]:
                raise DatasetError(f"{f}: {c} channel(s) but {first[0]} has {first[1]}: images of mixed grey and "
                                   "colour do not stack; set channels=1 or 3 (data.dataset_args.channels) to "
                                   "convert them")
        return None if first is None else first[1]

    @staticmethod
    def _from_folders(root: Path, classes: list[str] | None = None) -> tuple[list[Path], list[str]]:
        if root is None or not root.is_dir():
            raise DatasetError(f"{root}: image folder not found")
        files, labels = [], []
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            # hidden files are no images: macOS writes "._name.png" (AppleDouble) beside copies on FAT/SMB drives
            found = [f for f in sorted(sub.iterdir())
                     if f.is_file() and not f.name.startswith(".") and _suffix(f) in IMAGE_SUFFIXES]
            if not found and (classes is None or sub.name in classes):
                raise DatasetError(f"{sub}: class folder without images ({', '.join(IMAGE_SUFFIXES)}); remove it "
                                   "or add images")
            files += found
            labels += [sub.name] * len(found)
        if not files:
            raise DatasetError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in class subfolders")
        return files, labels

    @staticmethod
    def _from_csv(path: Path, root: Path | None, file_column: str, label_column: str) -> tuple[list[Path], list[str]]:
        if not path.is_file():
            raise DatasetError(f"{path}: label CSV not found")
        base = root if root is not None else path.parent
        files, labels = [], []
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: Excel's byte-order mark
                text = fh.read()
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path}: label CSV is not UTF-8 text ({exc}); save it as UTF-8") from exc
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            header = reader.fieldnames or []
            for col in (file_column, label_column):
                if col not in header:
                    raise DatasetError(f"{path}: no column {col!r} in header {header}")
            for line, row in enumerate(reader, start=2):
                name, lab = (row.get(file_column) or "").strip(), (row.get(label_column) or "").strip()
                if not name or not lab:
                    raise DatasetError(f"{path}, line {line}: empty file name or label")
                f = Path(name) if Path(name).is_absolute() else base / name
                if not f.is_file():
                    raise DatasetError(f"{f}: file not found (listed in {path}, line {line})")
                if _suffix(f) not in IMAGE_SUFFIXES:  # now, not at its first load (possibly a validation)
                    raise DatasetError(f"{f}: unknown image type {_suffix(f)!r} (listed in {path}, line {line}; "
                                       f"expected one of {', '.join(IMAGE_SUFFIXES)})")
                files.append(f)
                labels.append(lab)
        except csv.Error as exc:
            raise DatasetError(f"{path}, line {reader.line_num}: malformed CSV ({exc})") from exc
        if not files:
            raise DatasetError(f"{path}: no rows")
        return files, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i, seed = key if isinstance(key, tuple) else (key, None)
        item = self._get(int(i))
        if seed is not None:
            item["seed"] = int(seed)
        return item

    def _get(self, i: int) -> dict[str, Any]:
        f = self.files[i]
        x = torch.from_numpy(read_image(f, self.spatial_dims))
        if self.channels == 1 and x.shape[0] != 1:
            x = x.mean(0, keepdim=True)
        elif self.channels is not None and x.shape[0] == 1 and self.channels != 1:
            x = x.expand(self.channels, *x.shape[1:]).contiguous()
        expected = self.channels if self.channels is not None else getattr(self, "num_channels", None)
        if expected is not None and x.shape[0] != expected:
            raise DatasetError(f"{f}: {x.shape[0]} channel(s), expected {expected} (the other images'); set "
                               "channels=1 or 3 to convert")
        if self.size is not None and tuple(x.shape[1:]) != tuple(self.size):
            x = _resize(x, tuple(self.size), self.resize_version)
        if self.normalize == "minmax":
            lo, hi = x.min(), x.max()
            x = (x - lo) / (hi - lo).clamp_min(1e-8)
        elif self.normalize == "zscore":
            x = _zscore(x)
        return {"image": x, "label": torch.tensor(self.labels[i], dtype=torch.long), "files": str(f)}


def _zscore(x: torch.Tensor) -> torch.Tensor:
    """``x`` (all channels together) to zero mean and unit population std (``correction=0``), as
    :func:`medfast.data.normalize_intensity` and MONAI's ``NormalizeIntensity``; a constant image (its std at float32
    rounding of its mean) gives 0, not that rounding noise divided by a tiny std (up to +-1)."""
    std, mean = torch.std_mean(x, correction=0) if x.numel() > 1 else (x.new_zeros(()), x.mean())
    if float(std) <= 1e-6 * float(mean.abs()):  # (a NaN image stays NaN, as before: not hidden as a zero one)
        return torch.zeros_like(x)
    return (x - mean) / std
