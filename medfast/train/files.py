"""The training and validation file lists of a task's config: a ``data.dataset`` preset, ``data.train_images``
/ ``train_labels``, or a ``data.root`` folder (``images/`` + ``labels/``), and the validation split
(``data.val_images`` or ``data.val_fraction`` of the subjects). Shared by the segmentation and registration
tasks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FileLists", "gather_files", "prepare_preset"]


@dataclass
class FileLists:
    """Image and label paths for training and validation (label lists empty when there are none)."""

    images: list[str]
    labels: list[str]
    val_images: list[str]
    val_labels: list[str]


def prepare_preset(config: Any) -> None:
    """Fills the data lists of a built-in data set (``data.dataset``, :mod:`medfast.data.presets`); its prepared
    files are written under ``trainer.out_dir/data``. Lists already set in the config are kept."""
    d = config.data
    if d.dataset is None:
        return
    from medfast.data import presets

    builder = getattr(presets, d.dataset, None)
    if builder is None or d.dataset.startswith("_"):
        raise ValueError(f"unknown data.dataset {d.dataset!r}; available: {', '.join(presets.__all__)}")
    files = builder(Path(config.trainer.out_dir) / "data", **d.dataset_args)
    for key, value in files.items():
        if not getattr(d, key):
            setattr(d, key, value)


def gather_files(config: Any, *, task: str, need_labels: bool = False, min_subjects_to_split: int = 2) -> FileLists:
    """The file lists of ``config.data``.

    Parameters
    ----------
    config : Config
        The run's configuration (``data``, ``trainer.seed``, ``trainer.out_dir``).
    task : str
        The task's name, for the error messages.
    need_labels : bool
        Raise when the training images have no label maps.
    min_subjects_to_split : int
        ``data.val_fraction`` splits validation subjects off only when there are at least this many images
        (and no ``data.val_images``); the split is a permutation seeded by ``trainer.seed``.

    Raises
    ------
    DatasetError
        No training images; labels required but missing; image and label lists of different lengths.
    """
    from medfast.data import DatasetError, find_pairs

    d = config.data
    prepare_preset(config)
    images, labels = list(d.train_images), list(d.train_labels)
    if d.root is not None and not images:
        images, labels = find_pairs(d.root)
    if not images:
        raise DatasetError(f"no training data for the {task} task: set data.root, data.train_images "
                           f"(+ train_labels) or data.dataset")
    if need_labels and not labels:
        raise DatasetError(f"the {task} task needs label maps (data.train_labels or a labels/ folder)")
    if labels and len(labels) != len(images):
        raise DatasetError(f"{len(images)} training images but {len(labels)} label maps (data.train_labels "
                           f"must give one label map per image, or none)")
    val_images, val_labels = list(d.val_images), list(d.val_labels)
    if val_labels and len(val_labels) != len(val_images):
        raise DatasetError(f"{len(val_images)} validation images but {len(val_labels)} label maps")
    if not val_images and d.val_fraction > 0 and len(images) >= min_subjects_to_split:
        n_val = max(1, int(round(len(images) * d.val_fraction)))
        pick = set(np.random.default_rng(config.trainer.seed).permutation(len(images))[:n_val].tolist())
        val_images = [p for i, p in enumerate(images) if i in pick]
        val_labels = [p for i, p in enumerate(labels) if i in pick]
        images = [p for i, p in enumerate(images) if i not in pick]
        labels = [p for i, p in enumerate(labels) if i not in pick]
    return FileLists(images, labels, val_images, val_labels)
