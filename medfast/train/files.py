"""The training and validation file lists of a task's config: a ``data.dataset`` preset, ``data.train_images``
/ ``train_labels``, or a ``data.root`` folder (``images/`` + ``labels/``), and the validation split
(``data.val_images`` or ``data.val_fraction`` of the subjects). Shared by the segmentation and registration
tasks. The split resolved is left on the config (:func:`record_split`) for the trainer, whose checkpoints record
its subjects by file name and size (:func:`split_identities`), checked on resume (:func:`split_changes`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FileLists", "OutputError", "check_dataset_args", "check_out_dir", "check_root_and_dataset",
           "check_split_record", "gather_files", "prepare_preset", "record_split", "split_changes", "split_identities",
           "take_split"]


class OutputError(ValueError):
    """An output folder that cannot be used (it, or a folder above it, is an existing file)."""


def check_out_dir(path: str | Path, what: str = "--out") -> Path:
    """Checks that ``path`` can be (or is) a folder before anything is computed: raises :class:`OutputError`
    naming ``what`` (the flag or setting) when it, or the nearest existing folder above it, is a file."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if p == path and not p.is_dir():
                raise OutputError(f"{what} {path} exists and is not a folder; give another output folder")
            if not p.is_dir():
                raise OutputError(f"{what} {path} cannot be created ({p} is a file); give another output folder")
            break
    return path


@dataclass
class FileLists:
    """Image and label paths for training and validation (label lists empty when there are none); an image
    entry is a path, or the list of a case's channel files (see :func:`medfast.data.find_pairs`)."""

    images: list[str | list[str]]
    labels: list[str]
    val_images: list[str | list[str]]
    val_labels: list[str]


def _preset_builder(name: Any):
    """The builder of the built-in data set ``name`` (raises :class:`~medfast.train.ConfigError` listing them)."""
    from medfast.data import presets
    from medfast.train.config import ConfigError

    names = [n for n in presets.__all__ if callable(getattr(presets, n, None))]
    if name not in names:
        raise ConfigError(f"unknown data.dataset {name!r}; available: {', '.join(names)}")
    return getattr(presets, name)


def check_dataset_args(config: Any, task: str) -> None:
    """``data.dataset`` names a built-in data set and ``data.dataset_args`` are its builder's arguments (none
    without ``data.dataset``); raises :class:`~medfast.train.ConfigError` naming the keys. Reads no data."""
    import inspect

    from medfast.train.config import ConfigError

    d = config.data
    check_root_and_dataset(config)
    if d.dataset is None:
        if d.dataset_args:
            raise ConfigError(f"data.dataset_args {sorted(d.dataset_args)}: the {task} task reads them only for a "
                              f"built-in data set (data.dataset), which is not set")
        return
    params = inspect.signature(_preset_builder(d.dataset)).parameters
    valid = [p for p in list(params)[1:] if params[p].kind not in (params[p].VAR_POSITIONAL, params[p].VAR_KEYWORD)]
    unknown = sorted(set(d.dataset_args) - set(valid))
    if unknown:
        raise ConfigError(f"data.dataset_args: unknown key(s) {unknown} for data.dataset={d.dataset!r}; valid: "
                          f"{', '.join(valid) or 'none'}")


def check_root_and_dataset(config: Any) -> None:
    """Raises :class:`~medfast.train.ConfigError` when ``data.root`` and ``data.dataset`` are both set. A demo
    preset config with ``--set data.root=DIR`` was refused only after the preset had been built into
    ``trainer.out_dir/data`` (seconds to minutes), with a message that did not name ``data.dataset``."""
    from medfast.train.config import ConfigError

    d = config.data
    if d.root is not None and d.dataset is not None:
        raise ConfigError(f"data.root and data.dataset ({d.dataset!r}) both give the training data: --set "
                          f"data.dataset=null to use data.root, or remove data.root")


def prepare_preset(config: Any) -> None:
    """Fills the data lists of a built-in data set (``data.dataset``, :mod:`medfast.data.presets`); its prepared
    files are written under ``trainer.out_dir/data``. Lists already set in the config are kept."""
    d = config.data
    if d.dataset is None:
        return
    builder = _preset_builder(d.dataset)
    files = builder(Path(config.trainer.out_dir) / "data", **d.dataset_args)
    for key, value in files.items():
        if not getattr(d, key):
            setattr(d, key, value)


#: the augment ranges that move voxels (the validation deformations draw only these; see RandomAugment)
_GEOMETRIC = ("rotation", "scale", "shear", "translation", "flip")


def no_geometric_augmentation(a: Any) -> str | None:
    """Why the geometric part of the augmentation config ``a`` draws no deformation (augmentation off, or every
    geometric range 0 and no random deformation), or None when it draws one."""
    if not a.enabled:
        return "augment.enabled is false"
    if not any(getattr(a, k) for k in _GEOMETRIC) and not (a.deform_magnitude > 0 and a.deform_grid >= 2):
        return (f"every geometric range of augment is 0 ({', '.join(f'augment.{k}' for k in _GEOMETRIC)}, and "
                f"no deformation: augment.deform_magnitude={a.deform_magnitude}, deform_grid={a.deform_grid})")
    return None


def _check_val_deformations(config: Any) -> None:
    """``data.val_deformations`` deforms the training subjects with the geometric part of ``augment``: raises
    :class:`~medfast.train.ConfigError` naming both settings when that part draws no deformation (augmentation
    off, or every geometric range 0), where validation would score undeformed copies of the training subjects."""
    from medfast.train.config import ConfigError

    n = config.data.val_deformations
    why = no_geometric_augmentation(config.augment)
    if why is None:
        return
    raise ConfigError(f"data.val_deformations={n} validates on random deformations of the training subjects, but "
                      f"{why}: no deformation is drawn, so validation would score undeformed copies of the training "
                      f"subjects; enable augment's geometric ranges, or give a validation set (data.val_images / "
                      f"val_fraction) instead")


def gather_files(config: Any, *, task: str, need_labels: bool = False, min_subjects_to_split: int = 2,
                 in_channels: int | None = None) -> FileLists:
    """The file lists of ``config.data``.

    Parameters
    ----------
    config : Config
        The run's configuration (``data``, ``trainer.seed``, ``trainer.out_dir``).
    task : str
        The task's name, for the error messages.
    need_labels : bool
        Raise when the training images, or the ``data.val_images``, have no label maps.
    min_subjects_to_split : int
        ``data.val_fraction`` splits validation subjects off only when there are at least this many images
        (and no ``data.val_images``); the split is a permutation seeded by ``trainer.seed``.
    in_channels : int, optional
        The network's input channels, which decide how :func:`medfast.data.find_pairs` groups ``data.root``'s
        nnU-Net channel files (only for ``in_channels > 1``, as predict does); None groups them always.

    Raises
    ------
    DatasetError
        No training images; labels required but missing (for the validation images too); image and label
        lists of different lengths.
    ConfigError
        ``data.val_fraction`` would leave no training image; settings that another one overrides (they were
        silently dropped): ``data.root`` with training lists or ``data.dataset``, ``data.val_fraction`` with
        ``data.val_images``, ``data.val_deformations`` with ``data.val_images`` or ``data.val_fraction`` (also
        when the set is too small to split), or with an ``augment`` that draws no deformation (it would validate
        on undeformed copies of the training subjects).
    """
    import warnings

    from medfast.data import DatasetError, find_pairs
    from medfast.train.config import ConfigError

    d = config.data
    check_root_and_dataset(config)  # before the preset is built (files written under trainer.out_dir/data)
    prepare_preset(config)
    if d.root is not None and (list(d.train_images) or list(d.train_labels)):
        raise ConfigError("data.root is not read when data.train_images / train_labels are given (or data.dataset "
                          "fills them): set one of them")
    images, labels = list(d.train_images), list(d.train_labels)
    if d.root is not None:  # (beside training lists it is refused above)
        images, labels = find_pairs(d.root, in_channels=in_channels)
    if not images:
        raise DatasetError(f"no training data for the {task} task: set data.root, data.train_images "
                           f"(+ train_labels) or data.dataset")
    if need_labels and not labels:
        where = ""
        if d.root is not None:  # the folder find_pairs looked in
            from pathlib import Path

            tr = not (Path(d.root) / "images").is_dir() and (Path(d.root) / "imagesTr").is_dir()
            where = f": {Path(d.root) / ('labelsTr' if tr else 'labels')} is missing"
        raise DatasetError(f"the {task} task needs label maps (data.train_labels or a labels/ folder, labelsTr/ "
                           f"beside imagesTr/){where}")
    if labels and len(labels) != len(images):
        raise DatasetError(f"{len(images)} training images but {len(labels)} label maps (data.train_labels "
                           f"must give one label map per image, or none)")
    val_images, val_labels = list(d.val_images), list(d.val_labels)
    if val_labels and len(val_labels) != len(val_images):
        raise DatasetError(f"{len(val_images)} validation images but {len(val_labels)} label maps")
    if need_labels and val_images and not val_labels:
        # the task scores its validation against label maps: without them the first validation failed (KeyError
        # 'label') after trainer.val_every steps of training
        raise DatasetError(f"the {task} task scores its validation images against label maps: data.val_images "
                           f"gives {len(val_images)} image(s) but data.val_labels none; give data.val_labels (one "
                           f"label map per validation image)")
    if val_images and d.val_fraction > 0:
        raise ConfigError("data.val_fraction splits validation images off the training images, but data.val_images "
                          "gives them: set one of them")
    split = not val_images and d.val_fraction > 0 and len(images) >= min_subjects_to_split
    # data.val_fraction too: a set too small to split dropped it without a word (val_deformations validated instead)
    if d.val_deformations > 0 and (val_images or d.val_fraction > 0):
        raise ConfigError(f"data.val_deformations validates on deformations of the training subjects when there is no "
                          f"validation set of images; here data.{'val_images' if val_images else 'val_fraction'} gives "
                          f"one: set one of them")
    if d.val_deformations > 0:
        _check_val_deformations(config)
    if not val_images and d.val_fraction > 0 and not split:  # (beside val_deformations it is refused above)
        warnings.warn(f"data.val_fraction={d.val_fraction}: {len(images)} training image(s), too few to split off "
                      f"validation images (the {task} task needs {min_subjects_to_split}); no validation set "
                      f"(data.val_deformations validates on deformations of the subjects instead)", stacklevel=2)
    if split:
        n_val = max(1, int(round(len(images) * d.val_fraction)))
        if n_val >= len(images):
            raise ConfigError(f"data.val_fraction={d.val_fraction} puts all {len(images)} training images in the "
                              f"validation set and none in training: lower data.val_fraction, or add images")
        pick = set(np.random.default_rng(config.trainer.seed).permutation(len(images))[:n_val].tolist())
        val_images = [p for i, p in enumerate(images) if i in pick]
        val_labels = [p for i, p in enumerate(labels) if i in pick]
        images = [p for i, p in enumerate(images) if i not in pick]
        labels = [p for i, p in enumerate(labels) if i not in pick]
    record_split(config, images, val_images)  # (checked on resume: a split drawn over another folder's subjects)
    return FileLists(images, labels, val_images, val_labels)


# -- the resolved split, recorded in checkpoints --------------------------------------------------------------

#: the attribute of a config object on which :func:`gather_files` (and the classification task) leave the training
#: and validation entries they resolved, for the trainer (not a setting: ``config_to_dict`` and config.yaml skip it)
_SPLIT_ATTR = "_medfast_split"


def record_split(config: Any, train: list, val: list) -> None:
    """Leaves the training and validation entries (paths, or lists of a case's channel files) that a task resolved
    on ``config``; the trainer takes them (:func:`take_split`) and stores their identities in its checkpoints."""
    config.__dict__[_SPLIT_ATTR] = (list(train), list(val))


def take_split(config: Any) -> tuple[list, list] | None:
    """The ``(train, val)`` entries :func:`record_split` left on ``config`` (removed from it), or None."""
    return config.__dict__.pop(_SPLIT_ATTR, None)


def _identities(lists: list[list]) -> list[list[list]]:
    """``[name, size]`` of each subject of each list: its (first) file's path relative to the deepest folder that
    holds the list's files (a moved or respelled folder gives the same names; so does one list's folder moved
    apart from the other's), with its parent folder where the run has another file of that name and size
    (``case_2/image.nii`` for a lone validation file where every case's file is an equally large ``image.nii``),
    and its files' total size in bytes (-1 when one cannot be read)."""
    import os

    files = [[[str(f) for f in e] if isinstance(e, (list, tuple)) else [str(e)] for e in entries] for entries in lists]
    parts, sizes, depth, cap = [], [], [], []
    for entries in files:
        paths = [Path(os.path.abspath(os.path.expanduser(fs[0]))) for fs in entries]
        try:
            common = Path(os.path.commonpath([p.parent for p in paths])) if paths else None
        except ValueError:  # (paths on different drives)
            common = None
        for p, fs in zip(paths, entries, strict=True):
            parts.append(p.parts)
            depth.append(len(p.relative_to(common).parts) if common is not None else 1)
            # never above the list's folder (which may move apart from the other list's), but the parent folder
            # of a file of a one-file list
            cap.append(max(depth[-1], min(2, len(p.parts))))
            try:
                sizes.append(sum(os.stat(os.path.expanduser(f)).st_size for f in fs))
            except OSError:
                sizes.append(-1)
    groups: dict[tuple[str, int], list[int]] = {}  # the files that only a longer name can tell apart
    for i, (pp, n) in enumerate(zip(parts, sizes, strict=True)):
        groups.setdefault((pp[-1], n), []).append(i)
    for group in (g for g in groups.values() if len(g) > 1):
        while True:  # a name that is the end of another one's (of a file as large) takes one more folder
            grow = {i for i in group for j in group if i != j and depth[i] <= depth[j]
                    and parts[i][-depth[i]:] == parts[j][-depth[i]:] and depth[i] < cap[i]}
            if not grow:
                break
            for i in grow:
                depth[i] += 1
    out, i = [], 0
    for entries in files:
        out.append([["/".join(parts[j][-depth[j]:]), sizes[j]] for j in range(i, i + len(entries))])
        i += len(entries)
    return out


def split_identities(train: list, val: list) -> dict[str, list[list]]:
    """``{"train": [[name, size], ...], "val": [...]}``: the subjects of a split (image paths, or lists of a
    case's channel files) as a checkpoint records them, by file name and size rather than path, so that a moved or
    respelled data folder is recognised as the same (see :func:`_identities`)."""
    t, v = _identities([list(train), list(val)])
    return {"train": t, "val": v}


def _same(a: list, b: list) -> bool:
    """Whether two ``[name, size]`` identities are one subject: the same size, and one name a trailing part of the
    other (a name is longer where its list spans more folders, or where the run holds another file as large of
    that name)."""
    if a[1] != b[1]:
        return False
    pa, pb = a[0].split("/"), b[0].split("/")
    k = min(len(pa), len(pb))
    return pa[-k:] == pb[-k:]


def _unmatched(left: list[list], right: list[list]) -> list[list]:
    """The identities of ``left`` with no partner in ``right`` (each partner taken once)."""
    pool: dict[tuple[str, int], list[list]] = {}
    for r in right:
        pool.setdefault((r[0].rsplit("/", 1)[-1], r[1]), []).append(r)
    out = []
    for a in left:
        candidates = pool.get((a[0].rsplit("/", 1)[-1], a[1]), [])
        hit = next((i for i, r in enumerate(candidates) if _same(a, r)), None)
        if hit is None:
            out.append(a)
        else:
            del candidates[hit]
    return out


def check_split_record(record: Any) -> dict[str, list[list]]:
    """``record`` (a checkpoint's ``"split"``) checked: a dict of ``train`` and ``val`` lists of ``[name, size]``;
    raises ValueError saying what is wrong (an edited or damaged checkpoint)."""
    if not isinstance(record, dict) or not {"train", "val"} <= set(record):
        raise ValueError(f"its split record must be a dict with 'train' and 'val', got {type(record).__name__}")
    for key in ("train", "val"):
        rows = record[key]
        if not isinstance(rows, (list, tuple)) or not all(
                isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str) and isinstance(r[1], int)
                for r in rows):
            raise ValueError(f"its split record's {key!r} must be a list of [name, size] pairs")
    return {key: [list(r) for r in record[key]] for key in ("train", "val")}


def split_changes(saved: dict[str, list[list]], now: dict[str, list[list]]) -> dict[str, list[str]]:
    """How the validation subjects of ``now`` differ from those of ``saved`` (both :func:`split_identities`
    records), as lists of names: ``to_val`` (trained on in ``saved``, validation now), ``new_val`` (validation now,
    not a subject of ``saved``), ``to_train`` (validation in ``saved``, training now) and ``gone`` (validation in
    ``saved``, not a subject now). All empty when the validation subjects are the same."""
    added, dropped = _unmatched(now["val"], saved["val"]), _unmatched(saved["val"], now["val"])
    added_new = _unmatched(added, saved["train"])
    dropped_gone = _unmatched(dropped, now["train"])
    new_ids, gone_ids = {id(a) for a in added_new}, {id(a) for a in dropped_gone}
    return {"to_val": [a[0] for a in added if id(a) not in new_ids], "new_val": [a[0] for a in added_new],
            "to_train": [a[0] for a in dropped if id(a) not in gone_ids], "gone": [a[0] for a in dropped_gone]}
