"""A data set of the user's labelled images: class subfolders or a CSV of labels; PNG/JPEG (PIL or
matplotlib), NIfTI (nibabel) and DICOM (pydicom). Every read error raises :class:`medfast.data.DatasetError`
naming the file."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medfast.data import DatasetError

__all__ = ["IMAGE_SUFFIXES", "ImageFolderDataset", "read_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".nii", ".nii.gz", ".dcm")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def _read_raster(path: Path) -> np.ndarray:
    try:
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert("L") if im.mode in ("P", "1", "LA", "I;16") else im)
    except ImportError:
        import matplotlib.image as mpimg

        arr = mpimg.imread(path)
    arr = np.asarray(arr)
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(arr.dtype, 1.0)
    arr = arr.astype(np.float32) / scale
    if arr.ndim == 3 and arr.shape[2] == 4:  # RGBA: drop alpha
        arr = arr[..., :3]
    return arr.transpose(2, 0, 1) if arr.ndim == 3 else arr[None]


def _read_nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    data = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
    return data[None]


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(str(path))
    arr = ds.pixel_array.astype(np.float32)
    arr = arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
    if arr.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) > 1:  # colour (H, W, 3)
        return arr.transpose(2, 0, 1)
    return arr[None]


def read_image(path: str | Path, spatial_dims: int = 2) -> np.ndarray:
    """Reads an image as float32 ``(channels, *spatial)``.

    PNG/JPEG give ``(1 or 3, H, W)`` in ``[0, 1]``; NIfTI and DICOM give ``(1, *shape)`` in their own units
    (DICOM rescale slope/intercept applied). Singleton spatial axes beyond ``spatial_dims`` are dropped
    (e.g. an ``(H, W, 1)`` NIfTI is a 2D image).

    Raises
    ------
    DatasetError
        Missing file, unknown suffix, unreadable/corrupt data, wrong dimensionality or non-finite values;
        the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    suffix = _suffix(path)
    readers = {".png": _read_raster, ".jpg": _read_raster, ".jpeg": _read_raster, ".nii": _read_nifti,
               ".nii.gz": _read_nifti, ".dcm": _read_dicom}
    if suffix not in readers:
        raise DatasetError(f"{path}: unknown image type {suffix!r} (expected one of {', '.join(IMAGE_SUFFIXES)})")
    try:
        arr = readers[suffix](path)
    except ImportError as exc:
        raise DatasetError(f"{path}: reading {suffix} files needs {exc.name}") from exc
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
        raise DatasetError(f"{path}: cannot read {suffix} image ({type(exc).__name__}: {exc})") from exc
    while arr.ndim - 1 > spatial_dims and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim - 1 != spatial_dims:
        raise DatasetError(f"{path}: image of shape {arr.shape[1:]} is not {spatial_dims}D")
    if arr.size == 0 or not np.isfinite(arr).all():
        raise DatasetError(f"{path}: empty image or NaN/inf values")
    return np.ascontiguousarray(arr, dtype=np.float32)


class ImageFolderDataset(Dataset):
    """Labelled images from ``root/<class>/<image>`` subfolders, or from a CSV of ``file,label`` rows.

    Parameters
    ----------
    root : str or Path
        Folder of class subfolders; or the folder the CSV's relative paths start from.
    csv_file : str or Path, optional
        CSV with a header naming ``file_column`` and ``label_column``; relative paths are taken relative to
        ``root`` (default: the CSV's folder).
    classes : sequence of str, optional
        Class names in index order (for ordinal labels, the order ``low < ... < high``). Default: the sorted
        subfolder names, or the sorted distinct CSV labels. Labels outside it raise :class:`DatasetError`.
    spatial_dims : int
        2 or 3.
    size : sequence of int, optional
        Resizes every image to this spatial size (bilinear/trilinear), so that batches stack.
    channels : int, optional
        1 converts colour images to grey (channel mean); 3 repeats grey images. Default: as stored.
    normalize : {"none", "minmax", "zscore"}
        Per-image intensity normalization.

    Notes
    -----
    Items are dicts ``{"image": (C, *spatial) float32, "label": () int64, "files": str}``; a key
    ``(index, seed)`` (from :class:`medfast.train.EpochSampler`) adds ``"seed"``.
    """

    def __init__(self, root: str | Path, csv_file: str | Path | None = None, classes: Sequence[str] | None = None,
                 spatial_dims: int = 2, size: Sequence[int] | None = None, channels: int | None = None,
                 normalize: str = "none", file_column: str = "file", label_column: str = "label") -> None:
        if normalize not in ("none", "minmax", "zscore"):
            raise ValueError(f"normalize must be 'none', 'minmax' or 'zscore', got {normalize!r}")
        if size is not None and len(size) != spatial_dims:
            raise ValueError(f"size {tuple(size)} must have {spatial_dims} entries")
        self.spatial_dims, self.size, self.channels, self.normalize = spatial_dims, size, channels, normalize
        root = Path(root) if root is not None else None
        if csv_file is not None:
            files, labels = self._from_csv(Path(csv_file), root, file_column, label_column)
        else:
            files, labels = self._from_folders(root)
        names = list(classes) if classes is not None else sorted(set(labels))
        lookup = {n: i for i, n in enumerate(names)}
        for f, lab in zip(files, labels, strict=True):
            if lab not in lookup:
                raise DatasetError(f"{f}: label {lab!r} is not one of the classes {names}")
        if len(names) < 2:
            raise DatasetError(f"{csv_file or root}: found {len(names)} class(es) {names}; need at least 2")
        self.classes = names
        self.files = files
        self.labels = [lookup[lab] for lab in labels]

    @staticmethod
    def _from_folders(root: Path) -> tuple[list[Path], list[str]]:
        if root is None or not root.is_dir():
            raise DatasetError(f"{root}: image folder not found")
        files, labels = [], []
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for f in sorted(sub.iterdir()):
                if f.is_file() and _suffix(f) in IMAGE_SUFFIXES:
                    files.append(f)
                    labels.append(sub.name)
        if not files:
            raise DatasetError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in class subfolders")
        return files, labels

    @staticmethod
    def _from_csv(path: Path, root: Path | None, file_column: str, label_column: str) -> tuple[list[Path], list[str]]:
        if not path.is_file():
            raise DatasetError(f"{path}: label CSV not found")
        base = root if root is not None else path.parent
        files, labels = [], []
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
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
                files.append(f)
                labels.append(lab)
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
        elif self.channels is not None and x.shape[0] != self.channels:
            raise DatasetError(f"{f}: {x.shape[0]} channels, expected {self.channels}")
        if self.size is not None and tuple(x.shape[1:]) != tuple(self.size):
            mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
            x = F.interpolate(x[None], size=tuple(self.size), mode=mode, align_corners=False)[0]
        if self.normalize == "minmax":
            lo, hi = x.min(), x.max()
            x = (x - lo) / (hi - lo).clamp_min(1e-8)
        elif self.normalize == "zscore":
            x = (x - x.mean()) / x.std().clamp_min(1e-8)
        return {"image": x, "label": torch.tensor(self.labels[i], dtype=torch.long), "files": str(f)}
