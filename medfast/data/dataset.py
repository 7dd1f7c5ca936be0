"""NIfTI datasets from file lists or an ``images/`` + ``labels/`` folder, with preprocessing and caching."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medfast._atomic import replacing
from medfast._typing import PathLike
from medfast.data.io import (
    DatasetError,
    ImageEntry,
    entry_files,
    entry_text,
    image_header,
    is_vector_layout,
    load_image,
    load_nifti,
    nifti_header,
    same_grid,
    single_slice_as_2d,
    single_slice_axis,
)
from medfast.data.preprocess import (
    crop_or_pad,
    normalize_intensity,
    reorient_to_ras,
    resample_to_spacing,
    spatial_affine,
)
from medfast.ops._validate import check_bool, py_scalar

__all__ = ["NiftiDataset", "case_name", "check_label_map", "collate", "find_pairs", "group_channel_files", "relabel"]

#: Version of what preprocessing makes of a subject, part of the disk cache's key: raised when a change gives other
#: arrays for the same files and settings (2: the z-score's masked-image rule by the negatives' magnitude, 2026-11-29),
#: so that a cache written before is not served after it.
PREPROCESS_VERSION = 2

_SUFFIXES = (".nii.gz", ".nii")
#: nnU-Net's channel suffix: ``images/case_0000.nii.gz`` is channel 0 of case ``case`` (label ``case.nii.gz``)
CHANNEL_SUFFIX = "_0000"
#: ``<case>_<4 digits>``: nnU-Net's channel ``k`` of case ``<case>``
_CHANNEL_RE = re.compile(r"(.+)_(\d{4})")


#: what a case name drops: also the ``.img`` / ``.hdr`` of a NIfTI / Analyze pair, so that ``medfast predict scan.img``
#: writes ``scan_seg.nii.gz``, which ``medfast evaluate`` pairs with ``scan.nii.gz``
_STEM_SUFFIXES = (*_SUFFIXES, ".img.gz", ".hdr.gz", ".img", ".hdr")


def _stem(path: Path) -> str:
    name = Path(path).name
    for suf in _STEM_SUFFIXES:
        # the suffix in any case (nibabel reads SCAN.NII.GZ, as some PACS exports write it); the stem as it is
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def _is_nifti_name(name: str) -> bool:
    """Whether a file name ends in ``.nii`` / ``.nii.gz``, in any case (``SCAN.NII.GZ`` too)."""
    return name.lower().endswith(_SUFFIXES)


def case_name(path: ImageEntry) -> str:
    """The case an image file (or image entry, see :func:`find_pairs`: a list of channel files is named by its
    first) belongs to, as :func:`find_pairs` pairs it with its label map: the file name without ``.nii[.gz]``
    (or the ``.img`` / ``.hdr`` of a pair) and without nnU-Net's channel suffix ``_0000``
    (``case_007_0000.nii.gz`` -> ``case_007``)."""
    stem = _stem(Path(entry_files(path)[0]))
    return stem[: -len(CHANNEL_SUFFIX)] if stem.endswith(CHANNEL_SUFFIX) and len(stem) > len(CHANNEL_SUFFIX) else stem


def group_channel_files(files: Sequence[str | Path]) -> list[str | list[str]]:
    """Image entries from image files: the files of one folder named as nnU-Net names the channels of a case,
    ``<case>_0000``, ``<case>_0001``, ... (``.nii[.gz]``), become one entry, the list of its files in channel
    order; every other file stays a plain string (also a case's lone ``<case>_0000`` file). Entries keep the
    order of their first file.

    Raises
    ------
    DatasetError
        Naming the case: channel numbers with a gap (``_0000``, ``_0002``), a channel given twice (``.nii`` and
        ``.nii.gz``), or a case with another number of channel files than the others.
    """
    paths = [Path(p) for p in files]
    groups: dict[tuple[Path, str], dict[int, Path]] = {}
    for p in paths:
        m = _CHANNEL_RE.fullmatch(_stem(p)) if _is_nifti_name(p.name) else None
        if m:
            channels = groups.setdefault((p.parent, m.group(1)), {})
            k = int(m.group(2))
            if k in channels:
                raise DatasetError(f"case {m.group(1)!r}: {channels[k]} and {p} are both channel {m.group(2)}")
            channels[k] = p
    # a group is a case's channels only with a channel 0000 (a "scan_2019" alone is no channel file)
    groups = {key: ch for key, ch in groups.items() if 0 in ch}
    for (_, case), channels in groups.items():
        missing = sorted(set(range(max(channels) + 1)) - set(channels))
        if missing:
            raise DatasetError(f"case {case!r} has channel files {', '.join(f'_{k:04d}' for k in sorted(channels))} "
                               f"but not {', '.join(f'_{k:04d}' for k in missing)} (nnU-Net numbers the channels "
                               f"of a case _0000, _0001, ... without gaps): {channels[0].parent}")
    # the odd one out is the case whose count differs from the most common one (the first case's on a tie)
    counts = Counter(len(ch) for ch in groups.values())
    usual = counts.most_common(1)[0][0] if counts else 0
    for (_, case), channels in groups.items():
        if len(channels) != usual:
            other = next(c for (_, c), ch in groups.items() if len(ch) == usual)
            raise DatasetError(f"case {case!r} has {len(channels)} channel file(s) (_0000 .. "
                               f"_{len(channels) - 1:04d}) but case {other!r} has {usual}: every case needs the "
                               f"same channels ({channels[0].parent})")
    out: list[str | list[str]] = []
    done: set[tuple[Path, str]] = set()
    for p in paths:
        m = _CHANNEL_RE.fullmatch(_stem(p)) if _is_nifti_name(p.name) else None
        key = (p.parent, m.group(1)) if m else None
        if key not in groups:
            out.append(str(p))
        elif key not in done:
            done.add(key)
            channels = groups[key]
            out.append(str(channels[0]) if len(channels) == 1 else [str(channels[k]) for k in sorted(channels)])
    return out


def find_pairs(root: str | Path, images: str = "images", labels: str = "labels", *,
               in_channels: int | None = None) -> tuple[list[str | list[str]], list[str]]:
    """Image/label lists from ``root/images/*.nii[.gz]`` and ``root/labels/`` files of the same name.

    nnU-Net's layout works as it is: its ``imagesTr/`` + ``labelsTr/`` folders when there is no ``images/``; an
    image named ``case_0000.nii.gz`` may have its label as ``case.nii.gz``; and a case stored one file per channel
    (``case_0000.nii.gz``, ``case_0001.nii.gz``, ...) is one image entry, the list of its channel files in channel
    order (see :func:`group_channel_files`), which :class:`NiftiDataset` stacks into channels; other images are
    plain strings.

    ``in_channels`` (the network's ``model.in_channels``; None: unknown) decides the grouping as ``medfast
    predict`` does: channel files are grouped only for ``in_channels > 1`` (and then each case must have
    ``in_channels`` of them); with ``in_channels=1`` every file is its own case (``scan_0000``, ``scan_0001``:
    two cases, labelled ``scan_0000.nii.gz`` / ``scan.nii.gz`` and ``scan_0001.nii.gz``). With None they are
    grouped.

    Raises
    ------
    DatasetError
        A missing folder, no images, an image without a label, channel files with a gap or a case with another
        number of channel files than the others (named); the folder, when the channel files and ``in_channels``
        disagree.
    TypeError, ValueError
        ``in_channels`` not an integer >= 1.
    """
    if in_channels is not None and (isinstance(in_channels, bool) or not isinstance(in_channels, (int, np.integer))):
        raise TypeError(f"in_channels must be an int or None, got {in_channels!r}")
    if in_channels is not None and in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    root = Path(root)
    if (images, labels) == ("images", "labels") and not (root / images).is_dir() and (root / "imagesTr").is_dir():
        images, labels = "imagesTr", "labelsTr"  # an nnU-Net dataset folder (Dataset001_X/imagesTr, labelsTr)
    img_dir, lab_dir = root / images, root / labels
    if not img_dir.is_dir():
        nnunet = " or imagesTr/ + labelsTr/, nnU-Net's" if images == "images" else ""
        raise DatasetError(f"image folder not found: {img_dir} (expected {root}/{images}/*.nii.gz{nnunet})")
    # not dot files: macOS archives hold an AppleDouble "._case.nii.gz" beside each file, which is no NIfTI
    files = sorted(p for p in img_dir.iterdir() if _is_nifti_name(p.name) and not p.name.startswith("."))
    if not files:
        raise DatasetError(f"no NIfTI files (*.nii, *.nii.gz) in {img_dir}")
    # grouped as predict groups them: a one-channel network reads scan_0000, scan_0001 as two cases
    group = in_channels is None or in_channels > 1
    entries = group_channel_files(files) if group else [str(p) for p in files]

    def check_channels() -> None:
        """(after the labels: channel files labelled one by one are named as one-channel cases first)"""
        case = next((e for e in entries if isinstance(e, list)), None)
        if in_channels is not None and case is not None and len(case) != in_channels:
            # (every case has as many channel files: group_channel_files checks it)
            raise DatasetError(f"{img_dir}: the cases are stored as {len(case)} channel files each (case "
                               f"{case_name(case)!r}: _0000 .. _{len(case) - 1:04d}) but the model takes "
                               f"in_channels={in_channels} (model.in_channels): set model.in_channels={len(case)}")

    if not lab_dir.is_dir():
        check_channels()
        return entries, []

    # a label's suffix in any case too (CASE.NII.GZ), once none of the usual spelling is there
    lab_files = sorted(p for p in lab_dir.iterdir() if _is_nifti_name(p.name) and not p.name.startswith("."))

    def label_of(name: str) -> Path | None:
        found = next((lab_dir / (name + suf) for suf in _SUFFIXES if (lab_dir / (name + suf)).is_file()), None)
        return found or next((p for p in lab_files if _stem(p) == name and p.is_file()), None)

    out_i, out_l = [], []
    for entry in entries:
        stem = _stem(Path(entry_files(entry)[0]))
        # a list of channel files is its case; a single file is its stem, or its case without _0000
        names = [case_name(entry)] if isinstance(entry, list) else list(dict.fromkeys([stem, case_name(entry)]))
        found = next(filter(None, map(label_of, names)), None)
        if found is None:
            channel = _CHANNEL_RE.fullmatch(stem)
            if in_channels is not None and isinstance(entry, list) and all(
                    label_of(_stem(Path(f))) is not None for f in entry):
                # each channel file has its own label: one-channel cases, grouped by a multi-channel model
                raise DatasetError(f"{img_dir}: {entry_text(entry)} are labelled one by one ("
                                   f"{label_of(_stem(Path(entry[0])))}, ...): one-channel cases, but the model takes "
                                   f"in_channels={in_channels} (model.in_channels) and groups them into case "
                                   f"{case_name(entry)!r} (nnU-Net's channel files): set model.in_channels=1, or "
                                   f"label the case as {lab_dir / (case_name(entry) + '.nii.gz')}")
            if not group and channel and label_of(channel.group(1)) is not None and any(
                    _stem(p) == channel.group(1) + CHANNEL_SUFFIX for p in files):
                # a case's channel 1, 2, ... read as its own case by a one-channel model
                mine = [p.name for p in files
                        if (m := _CHANNEL_RE.fullmatch(_stem(p))) and m.group(1) == channel.group(1)]
                raise DatasetError(f"{img_dir}: case {channel.group(1)!r} is stored as {len(mine)} channel files "
                                   f"({', '.join(mine)}; label {label_of(channel.group(1))}) but the model takes "
                                   f"in_channels=1 (model.in_channels), which reads each file as its own case "
                                   f"({entry} has no label): set model.in_channels={len(mine)}")
            if channel and label_of(channel.group(1)) is not None:
                raise DatasetError(f"{entry}: case {channel.group(1)!r} has channel files (nnU-Net's _0000, _0001, "
                                   f"...) but no {channel.group(1) + CHANNEL_SUFFIX} file: channels are numbered "
                                   "from _0000")
            raise DatasetError(f"no label for image {entry_text(entry)} in {lab_dir} (expected "
                               f"{lab_dir / (names[0] + '.nii.gz')})")
        out_i.append(entry)
        out_l.append(str(found))
    check_channels()
    return out_i, out_l


def check_label_map(label_map: Mapping[Any, Any], name: str = "label_map") -> dict[int, int]:
    """``label_map`` ``{old label: new label}`` as a dict of ints; raises :class:`TypeError` for a key or value
    that is not an integer (an ``int``, a NumPy integer or a string of one; bools and floats refused) and
    :class:`ValueError` for a negative one, naming the key (labels are never negative; a negative key would
    index the lookup table of :func:`relabel` from its end, relabelling the largest label value instead).
    ``name`` is the argument's name in the messages."""
    if not isinstance(label_map, Mapping):
        raise TypeError(f"{name} must be a mapping {{old label: new label}}, got {label_map!r}")

    def as_int(x: Any, what: str) -> int:
        if isinstance(x, str):
            try:
                x = int(x)
            except ValueError:
                pass
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
            raise TypeError(f"{name}: {what} must be an integer label value, got {x!r}")
        if x < 0:
            raise ValueError(f"{name}: {what} is negative; label values are integers >= 0")
        return int(x)

    return {as_int(k, f"key {k!r}"): as_int(v, f"the value of key {k!r}") for k, v in label_map.items()}


def relabel(labels: np.ndarray, label_map: Mapping[int, int]) -> np.ndarray:
    """``labels`` (non-negative ints) with each value ``k`` of ``label_map`` replaced by ``label_map[k]``
    (unlisted values unchanged); ``label_map`` as :func:`check_label_map` gives it (non-negative keys)."""
    if not label_map:
        return labels
    # a binary search over the map's keys, not a lookup table as long as the largest label value: an atlas's
    # structure id (Allen CCF: 614454277) made that table 5 GB
    keys = np.array(sorted(label_map), dtype=np.int64)
    values = np.array([label_map[k] for k in keys.tolist()], dtype=np.int64)
    labels = np.asarray(labels)
    pos = np.minimum(np.searchsorted(keys, labels), len(keys) - 1)
    return np.where(keys[pos] == labels, values[pos], labels).astype(np.int64, copy=False)


#: what the disk cache stores of an item: its arrays; ``files`` and ``index`` belong to the dataset that reads it
_CACHED = ("image", "affine", "label")
#: the ``.img`` / ``.hdr`` pair (NIfTI-1 / Analyze), compressed as nibabel compresses them
_PAIR_TYPES = (("image", ".img"), ("header", ".hdr"))
_PAIR_RE = re.compile(r".*\.(img|hdr)(\.gz|\.bz2|\.zst)?", re.IGNORECASE)


def _with_companion(path: str) -> list[str]:
    """``path`` and, for one file of a ``.hdr`` / ``.img`` pair, the other one (when it exists), named as nibabel
    names it (``scan.img`` -> ``scan.hdr``, ``SCAN.IMG.GZ`` -> ``SCAN.HDR.GZ``)."""
    if not _PAIR_RE.fullmatch(Path(path).name):
        return [path]
    from nibabel.filename_parser import TypesFilenamesError, types_filenames

    try:
        names = types_filenames(path, _PAIR_TYPES, trailing_suffixes=(".gz", ".bz2", ".zst"))
    except TypesFilenamesError:
        return [path]
    return [path] + [f for f in names.values() if f != path and Path(f).is_file()]


def _digest(arrays: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes (of a 1 mm brain: ~50 ms)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        t = arrays[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _numbers(name: str, value: Any, count: int, what: str, ok: Callable[[int | float], bool]) -> list | None:
    """``value`` (a sequence of ``count`` real numbers each passing ``ok``; None passes) as a list of Python
    numbers (NumPy scalars and tensor elements converted); :class:`TypeError` / :class:`ValueError` naming
    ``name`` otherwise."""
    if value is None:
        return None
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        out = [py_scalar(v) for v in value]
    except TypeError:  # a single number, a string, a 0-d array
        raise TypeError(f"{name} must be a sequence of {count} {what}, got {value!r}") from None
    if len(out) != count or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and ok(v) for v in out):
        raise ValueError(f"{name} must be {count} {what}, got {out}")
    return out


class NiftiDataset(Dataset):
    """Subjects read from NIfTI files, preprocessed once and cached.

    Parameters
    ----------
    images : sequence of paths (str or os.PathLike) or of lists of paths
        Image files (3D, or 4D with channels on the last axis; 2D files for ``spatial_dims=2``); an entry may be
        a list (or tuple) of single-channel files on one grid (same shape and affine), nnU-Net's
        ``case_0000.nii.gz``, ``case_0001.nii.gz``, ..., stacked as channels in the list's order (as
        :func:`find_pairs` gives them), so that it reads as the 4D file ``(X, Y, Z, C)`` would.
    labels : sequence of paths, optional
        Label maps (integer values), one per image, on the same grid (same shape and affine).
    spatial_dims : {2, 3}
        3D volumes, or 2D images (a trailing singleton axis of a 3D file is dropped; a single coronal or
        sagittal slice stored ``(X, 1, Z)`` / ``(1, Y, Z)`` is read as the 2D image ``(X, Z)`` / ``(Y, Z)``, as
        :func:`medfast.data.io.single_slice_as_2d` reads it).
    reorient : bool
        Flip/permute the voxel axes to the closest positive orientation first (exact, images and labels alike;
        :func:`medfast.data.preprocess.reorient_to_ras`), so that networks see every subject in the same
        orientation whatever the file's storage order: RAS in 3D; in 2D the in-plane frame of
        :func:`medfast.data.spatial_affine` (R, A for an axial slice), so a slice stored flipped or transposed
        gives the same array.
    spacing : sequence of float, optional
        Resample to this voxel size (mm) with :func:`medfast.resample` (labels: nearest); ``spatial_dims``
        positive finite numbers (else :class:`ValueError`, at construction).
    shape : sequence of int, optional
        Centred crop/pad to this spatial shape after resampling; ``spatial_dims`` ints >= 1.
    normalize : {"zscore", "minmax", "none"}
        Per-channel intensity normalization (see :func:`medfast.data.normalize_intensity`).
    clip_percentiles : (float, float), optional
        Clip intensities to these percentiles first (``0 <= lo < hi <= 100``).
    label_map : mapping of int to int, optional
        Relabel on load (unlisted values map to themselves); keys and values are integers >= 0 (else
        :class:`TypeError` / :class:`ValueError` naming the key).
    cache : {"memory", "disk", "none"}
        Keep preprocessed subjects in memory, in ``cache_dir`` as ``.pt`` files keyed by file names, sizes,
        modification times (of every channel file, and of both files of a ``.hdr`` / ``.img`` pair) and
        preprocessing, or nowhere. A cache file holds the arrays with a SHA-256 digest; one that does not load,
        holds something else or fails its digest is rebuilt. The memory cache belongs to the
        process that reads the subject: each data-loader worker fills its own, which lasts as long as the worker
        (the trainer keeps its workers for the whole run: with ``W`` workers a subject is read and preprocessed at
        most ``W`` times, and up to ``W`` copies of the data set are held; ``disk`` keeps one copy, on disk).
    check : bool
        Check at construction that every file exists and is readable, that each label has its image's
        shape and affine, that the channel files of an image share their first file's shape and affine, and
        that the images have ``spatial_dims`` axes and ``in_channels`` channels (only the headers are read).
    in_channels : int, optional
        The number of channels every image must have (e.g. the network's ``model.in_channels``).
    num_classes : int, optional
        Label values must lie in ``0 .. num_classes - 1`` (after ``label_map``): checked by ``check`` (which
        then reads the label maps' voxels, not only their headers) and when a subject is loaded.
    compact_labels : bool
        Labels as uint8 where their values fit (else int32, else int64): an eighth of the memory in the cache,
        and of what a data-loader worker sends the training process (a 1 mm brain's label map: 9 MB, not 69).
        medfast's losses and metrics take them as they are (the segmentation task uses this).

    Notes
    -----
    Each item is a dict: ``image`` ``(C, *S)`` float32, ``label`` ``(*S)`` int64 (uint8 / int32 with
    ``compact_labels``; absent without labels),
    ``affine`` ``(ndim + 1, ndim + 1)`` float64 of the preprocessed grid, ``files`` (the image path; the channel
    files joined by `` + `` for a list),
    ``index``; a sampler may pass ``(index, seed)`` to add ``seed``.

    Raises
    ------
    DatasetError
        Missing, corrupt or mismatched files (image and label of different shape or affine, an image with the
        wrong number of axes or channels, a label >= ``num_classes``), naming them.
    """

    def __init__(self, images: Sequence[PathLike | Sequence[PathLike]], labels: Sequence[PathLike] | None = None, *,
                 spatial_dims: int = 3,
                 spacing: Sequence[float] | None = None, shape: Sequence[int] | None = None,
                 normalize: str = "zscore", clip_percentiles: Sequence[float] | None = None,
                 label_map: Mapping[int, int] | None = None, cache: str = "memory",
                 cache_dir: str | Path | None = None, check: bool = True, reorient: bool = True,
                 in_channels: int | None = None, num_classes: int | None = None,
                 compact_labels: bool = False) -> None:
        for name, files in (("images", images), ("labels", labels)):
            if isinstance(files, (str, bytes, os.PathLike)):  # would be read character by character
                raise TypeError(f"{name} must be a list of files (one per subject), got the single path {files!r}; "
                                f"pass [{str(files)!r}] for one subject")
        # before any file is read; a negative key would silently relabel the largest label value
        self.label_map = check_label_map(label_map) if label_map is not None else {}
        # single files stay strings; a case's channel files become a list (YAML / JSON friendly)
        self.images: list[str | list[str]] = [str(p) if isinstance(p, (str, os.PathLike)) else entry_files(p)
                                              for p in images]
        self.labels = [str(p) for p in labels] if labels else []
        if not self.images:
            raise DatasetError("no image files given")
        if self.labels and len(self.labels) != len(self.images):
            raise DatasetError(f"{len(self.images)} images but {len(self.labels)} label files")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if cache not in ("memory", "disk", "none"):
            raise ValueError(f"cache must be one of memory, disk, none; got {cache!r}")
        if cache == "disk" and cache_dir is None:
            raise ValueError("cache='disk' needs cache_dir")
        self.spatial_dims = spatial_dims
        self.compact_labels = check_bool("compact_labels", compact_labels)
        self.reorient = bool(reorient)  # 2D too (medfast.data.preprocess.REORIENT_DIMS)
        # checked here, not when the first subject loads (a bad count or value failed there, or only in a worker);
        # NumPy / tensor numbers as Python ones, so that the disk cache's key (JSON) takes them too
        per_axis = f"(one per spatial axis: spatial_dims={spatial_dims})"
        self.spacing = _numbers("spacing", spacing, spatial_dims, f"positive finite voxel sizes in mm {per_axis}",
                                lambda v: math.isfinite(v) and v > 0)
        self.shape = _numbers("shape", shape, spatial_dims, f"positive ints (voxels) {per_axis}",
                              lambda v: isinstance(v, int) and v >= 1)
        self.normalize = normalize
        self.clip_percentiles = _numbers("clip_percentiles", clip_percentiles, 2, "percentiles (lo, hi)",
                                         lambda v: math.isfinite(v))
        if self.clip_percentiles is not None and not 0 <= self.clip_percentiles[0] < self.clip_percentiles[1] <= 100:
            raise ValueError(f"clip_percentiles must satisfy 0 <= lo < hi <= 100, got {self.clip_percentiles}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.cache = cache
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._memory: dict[int, dict[str, Any]] = {}
        normalize_intensity(torch.zeros(1, 2, 2), normalize)  # validates the method name early
        if check:
            self.check()

    def __len__(self) -> int:
        return len(self.images)

    def check(self) -> None:
        """Reads every header (and, with ``num_classes``, every label map); raises :class:`DatasetError` for the
        first bad file or image/label pair."""
        for i, entry in enumerate(self.images):
            img = image_header(entry)
            img_path = img.path
            self._check_image_shape(img_path, tuple(img.shape))
            if not self.labels:
                continue
            lab = nifti_header(self.labels[i])
            s_img, s_lab = self._spatial(img.shape), self._spatial(lab.shape)
            if s_img != s_lab:
                raise DatasetError(
                    f"label {self.labels[i]} has shape {lab.shape} but its image {img_path} has shape {img.shape}"
                )
            # in voxels of the image's grid (a tolerance in mm let a label shifted by whole small voxels pass)
            try:
                on_grid = same_grid(lab.affine, img.affine, img.shape[:3])
            except np.linalg.LinAlgError:
                raise DatasetError(f"{img_path}: the voxel-to-world affine (sform / qform) is singular (zero voxel "
                                   f"size or parallel voxel axes): the header's voxel sizes or orientation are "
                                   f"broken") from None
            if not on_grid:
                raise DatasetError(
                    f"label {self.labels[i]} and image {img_path} have different affines (not on the same grid):"
                    f"\n{np.array2string(lab.affine, precision=3)}\nvs\n{np.array2string(img.affine, precision=3)}"
                )
            if self.num_classes is not None:
                self._check_label_values(self._relabel(load_nifti(self.labels[i], label=True).data), self.labels[i])

    def _spatial(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The spatial part of a NIfTI shape: its first 3 axes, for 2D data without a trailing singleton (a 2D
        image may be stored (X, Y), (X, Y, 1) or, with channels, (X, Y, 1, C))."""
        spatial = tuple(shape[:3])
        if self.spatial_dims == 2 and len(spatial) == 3 and spatial[2] == 1:
            spatial = spatial[:2]
        return spatial

    def _check_image_shape(self, path: str, shape: tuple[int, ...]) -> None:
        """An image's NIfTI shape: ``spatial_dims`` spatial axes (2D: a trailing singleton third axis allowed, or
        a single coronal / sagittal slice ``(X, 1, Z)`` / ``(1, Y, Z)``) and, on the 4th axis, ``in_channels``
        channels."""
        nd = self.spatial_dims
        spatial = shape[:3]
        if nd == 3 and len(spatial) != 3:
            raise DatasetError(f"{path}: spatial_dims=3 (model.spatial_dims) needs 3D volumes, got a {len(shape)}D "
                               f"image of shape {shape}")
        if nd == 2 and len(spatial) == 3 and spatial[2] != 1 and single_slice_axis(spatial) is None:
            raise DatasetError(f"{path}: spatial_dims=2 (model.spatial_dims) needs 2D images, got a 3D volume of "
                               f"shape {shape}")
        if is_vector_layout(shape):  # load_nifti reads its C channels
            shape = (*shape[:3], shape[4])
        if len(shape) > 4:
            raise DatasetError(f"{path}: expected a 2D, 3D or 4D NIfTI (channels on the 4th axis, or the vector "
                               f"layout (X, Y, Z, 1, C)), got shape {shape}")
        channels = shape[3] if len(shape) > 3 else 1
        if self.in_channels is not None and channels != self.in_channels:
            raise DatasetError(f"{path} has {channels} channel(s) (shape {shape}) but {self.in_channels} are "
                               f"expected (model.in_channels)")

    def _relabel(self, arr: np.ndarray) -> np.ndarray:
        return relabel(arr, self.label_map)

    def _check_label_values(self, arr: np.ndarray, path: str) -> None:
        if self.num_classes is None or not arr.size:
            return
        top = int(arr.max())
        if top >= self.num_classes:
            bad = sorted(int(v) for v in np.unique(arr[arr >= self.num_classes]))
            raise DatasetError(f"label map {path} holds label value(s) {bad[:10]} but there are "
                               f"{self.num_classes} classes, labels 0..{self.num_classes - 1} (model.out_channels"
                               f"={self.num_classes}): relabel the file or raise model.out_channels")

    def _key(self, i: int) -> str:
        parts = []
        for p in entry_files(self.images[i]) + ([self.labels[i]] if self.labels else []):
            for f in _with_companion(p):  # a .hdr / .img pair: a header edit changes only the .hdr
                st = Path(f).stat()
                parts.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
        spec = [parts, self.spatial_dims, self.reorient, self.spacing, self.shape, self.normalize,
                self.clip_percentiles, sorted(self.label_map.items())] + (["compact"] if self.compact_labels else [])
        spec.append(f"preprocess-{PREPROCESS_VERSION}")
        return hashlib.sha1(json.dumps(spec).encode()).hexdigest()[:16]

    def _slice_axis(self, spatial: tuple[int, ...]) -> int | None:
        """For 2D data, the flat axis of a single slice stored as a volume (:func:`single_slice_axis`), else None."""
        return single_slice_axis(spatial) if self.spatial_dims == 2 else None

    def _to_dims(self, arr: np.ndarray, path: str, channels: bool) -> np.ndarray:
        spatial = arr.shape[1:] if channels else arr.shape
        if self.spatial_dims == 2 and len(spatial) == 3:
            # (X, Y, 1) as before; a coronal / sagittal slice (X, 1, Z) / (1, Y, Z) as the 2D image it is (as
            # medfast evaluate and register read it: single_slice_as_2d; load() permutes the affine alike)
            axis = 2 if spatial[2] == 1 else self._slice_axis(tuple(spatial))
            if axis is None:
                raise DatasetError(f"{path}: spatial_dims=2 needs 2D images, got spatial shape {spatial}")
            arr = arr.squeeze(axis + 1 if channels else axis)
        if self.spatial_dims == 3 and len(spatial) != 3:
            raise DatasetError(f"{path}: spatial_dims=3 needs 3D volumes, got spatial shape {spatial}")
        return arr

    def load(self, i: int) -> dict[str, Any]:
        """Reads and preprocesses subject ``i`` (no caching)."""
        vol = load_image(self.images[i])
        nd = self.spatial_dims
        # a coronal / sagittal slice's affine with its columns in the order of its 2D axes (the flat one last)
        file_affine = vol.affine
        if self._slice_axis(vol.data.shape[1:]) in (0, 1):
            file_affine = single_slice_as_2d(vol.data[0], vol.affine)[1]
        data = self._to_dims(vol.data, vol.path, True)
        if self.in_channels is not None and data.shape[0] != self.in_channels:
            raise DatasetError(f"{vol.path} has {data.shape[0]} channel(s) but {self.in_channels} are expected "
                               f"(model.in_channels)")
        affine = file_affine
        if self.reorient:
            data, affine = reorient_to_ras(data, file_affine, channels=True)
        image = torch.from_numpy(data)
        affine = spatial_affine(affine, nd)
        label = None
        if self.labels:
            lab = load_nifti(self.labels[i], label=True)
            arr = self._to_dims(lab.data, lab.path, False)
            if self.reorient:  # the image's flips/permutations: the label is on its grid (checked)
                arr, _ = reorient_to_ras(arr, file_affine, channels=False)
            if tuple(arr.shape) != tuple(image.shape[1:]):
                raise DatasetError(f"label {lab.path} has shape {arr.shape} but its image {vol.path} has spatial "
                                   f"shape {tuple(image.shape[1:])}")
            arr = self._relabel(arr)
            self._check_label_values(arr, lab.path)
            label = torch.from_numpy(np.ascontiguousarray(arr)).to(_label_dtype(arr, self.compact_labels))
        if self.spacing is not None:
            new_image, new_aff = resample_to_spacing(image, affine, self.spacing)
            if label is not None:
                label, _ = resample_to_spacing(label, affine, self.spacing, mode="nearest")
            image, affine = new_image, new_aff
        image = normalize_intensity(image, self.normalize, self.clip_percentiles)
        if self.shape is not None:
            if len(self.shape) != nd:
                raise ValueError(f"shape must have {nd} entries, got {self.shape}")
            image, new_aff = crop_or_pad(image, affine, self.shape)
            if label is not None:
                label, _ = crop_or_pad(label, affine, self.shape)
            affine = new_aff
        item: dict[str, Any] = {"image": image.contiguous(), "affine": torch.from_numpy(np.asarray(affine)),
                                "files": entry_text(self.images[i]), "index": i}
        if label is not None:
            item["label"] = label.contiguous()
        return item

    def _get(self, i: int) -> dict[str, Any]:
        if self.cache == "memory":
            if i not in self._memory:
                self._memory[i] = self.load(i)
            return self._memory[i]
        if self.cache == "disk":
            key = self._key(i)
            path = self.cache_dir / f"{key}.pt"
            if path.is_file():
                try:
                    stored = self._cached_arrays(torch.load(path, weights_only=True), key)
                except Exception:  # noqa: BLE001 - a broken cache file is rebuilt
                    stored = None
                if stored is not None:
                    # this dataset's index and file names, not those of the dataset that wrote the file (the same
                    # files in another order, or named by a relative path)
                    item = {"image": stored["image"], "affine": stored["affine"],
                            "files": entry_text(self.images[i]), "index": i}
                    if "label" in stored:
                        item["label"] = stored["label"]
                    return item
            item = self.load(i)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            arrays = {k: v for k, v in item.items() if k in _CACHED}
            # a unique temporary name (uuid, not the global NumPy stream the trainer seeded), removed when the
            # write fails (a full disk left it behind): two jobs sharing the cache never rename one another's file
            with replacing(path) as tmp:
                torch.save({"key": key, "digest": _digest(arrays), "arrays": arrays}, tmp)
            return item
        return self.load(i)

    def _cached_arrays(self, stored: Any, key: str) -> dict[str, torch.Tensor] | None:
        """The arrays of a disk-cache file's content, or None unless it is what :meth:`_get` writes for ``key``
        with its digest intact: flipped bytes inside a tensor load without an error, and a file of another dict,
        of a tensor or of an older medfast would be served as it is (or crash)."""
        if not isinstance(stored, dict) or set(stored) != {"key", "digest", "arrays"} or stored["key"] != key:
            return None
        arrays = stored["arrays"]
        want = {"image", "affine", "label"} if self.labels else {"image", "affine"}
        if (not isinstance(arrays, dict) or set(arrays) != want
                or not all(isinstance(v, torch.Tensor) for v in arrays.values())):
            return None
        return arrays if stored["digest"] == _digest(arrays) else None

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i, seed = (key if isinstance(key, tuple) else (key, None))
        item = dict(self._get(int(i)))
        if seed is not None:
            item["seed"] = int(seed)
        return item


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks a list of dataset items into a batch, zero-padding volumes of different shapes at the end of
    each axis (labels padded with 0); non-tensor entries become lists. A padded batch also holds
    ``"spatial_shape"``: each item's own image shape (spatial axes), for :class:`RandomAugment`'s ``shapes``."""
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)) or not items:
        raise ValueError(f"items must be a non-empty list of dataset items (dicts), got {items!r}")
    if not all(isinstance(it, Mapping) for it in items):
        raise TypeError(f"items must be dataset items (dicts), got {[type(it).__name__ for it in items]}")
    out: dict[str, Any] = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if isinstance(vals[0], torch.Tensor):
            if key in ("image", "label") and len({tuple(v.shape) for v in vals}) > 1:
                nd = vals[0].dim() - (1 if key == "image" else 0)
                target = [max(v.shape[-nd + d] for v in vals) for d in range(nd)]
                if key == "image":
                    out["spatial_shape"] = [tuple(v.shape[-nd:]) for v in vals]
                padded = []
                for v in vals:
                    pad = []
                    for d in reversed(range(nd)):
                        pad += [0, target[d] - v.shape[-nd + d]]
                    padded.append(torch.nn.functional.pad(v, pad))
                vals = padded
            out[key] = _stack(vals)
        else:
            out[key] = vals
    return out


def _label_dtype(arr: np.ndarray, compact: bool) -> torch.dtype:
    """int64, or with ``compact`` the smallest of uint8 / int32 / int64 that holds every value of ``arr``."""
    if not compact or arr.size == 0:
        return torch.int64
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi <= 255:
        return torch.uint8
    return torch.int32 if -2**31 <= lo and hi < 2**31 else torch.int64


def _stack(vals: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack; in a DataLoader worker into shared memory directly (as torch's default_collate), so that
    sending the batch to the training process does not copy it once more: a batch of two 1 mm brains with their
    labels is 200 MB."""
    if torch.utils.data.get_worker_info() is None or vals[0].device.type != "cpu":
        return torch.stack(vals)
    # the dtype torch.stack gives: compact label maps of one batch may differ (uint8 and int32), and a uint8
    # buffer would wrap a 300 to 44
    dtype = functools.reduce(torch.promote_types, (v.dtype for v in vals))
    storage = torch.UntypedStorage._new_shared(sum(v.numel() for v in vals) * dtype.itemsize)
    out = torch.empty(0, dtype=dtype).set_(storage).resize_(len(vals), *vals[0].shape)
    return torch.stack(vals, out=out)
