"""The classification task for the generic trainer: ``config.task = "classification"`` trains a
:class:`~medfast.nets.SonoNet`, :class:`~medfast.nets.ResNetClassifier` or
:class:`~medfast.nets.DenseNetClassifier` on an :class:`ImageFolderDataset` or on simulated ultrasound
(``data.dataset: simulated_ultrasound``, :mod:`medfast.tasks.classification.simulated`, rendered on the
training device).

Configuration (see ``configs/classification_example.yaml``):

* ``data.root``: folder of class subfolders (or the base of the CSV's paths); ``data.normalize``:
  ``zscore | minmax | none`` per image; ``data.shape``: the size images are resized to; ``data.val_fraction``
  (a seeded random split) and ``data.dataset_args``: ``csv_file``, ``classes`` (class order, required for
  ordinal labels), ``channels`` (1 or 3, default ``model.in_channels``: every image is converted to it),
  ``val_root`` / ``val_csv_file`` (a separate validation set), ``resize_version`` (how ``data.shape`` resizes,
  recorded by training: 2, antialiased / area-averaged shrinking; a checkpoint without it was trained on plain
  bilinear/trilinear resizing, 1, and keeps it at predict and resume).
* ``data.dataset: simulated_ultrasound``: ``data.dataset_args`` are the arguments of
  :class:`~medfast.tasks.classification.simulated.SimulatedUltrasound` (volumes, val_volumes, planes, probes,
  ...) plus ``samples_per_epoch`` and ``val_samples`` (per validation subset); ``data.shape`` is the image
  size. Validation reports the held-out poses and the held-out volumes separately.
* ``model.name``: ``sononet``, ``resnet`` or ``densenet``; ``model.spatial_dims``, ``model.in_channels``,
  ``model.out_channels`` = the number of classes, ``model.channels[0]`` = the width (doubled per stage; a longer
  list must be that doubling); ``model.kwargs``:
  ``encoding`` (``nominal | binary | ordinal``), ``blocks`` / ``convs_per_block``, ``dropout``, ``stem_stride``,
  and for DenseNet ``growth_rate``, ``bn_size``, ``compression``, ``norm``.

After training, :meth:`ClassificationTask.finish` writes ``classification_report.json``,
``confusion_matrix*.png`` and ``cam.png`` (Grad-CAM overlays of validation images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from medfast._atomic import replacing
from medfast._figures import figures_enabled
from medfast._jsonsafe import dumps as json_dumps
from medfast.data import DatasetError
from medfast.data import collate as _collate
from medfast.tasks.classification.data import (
    IMAGE_SUFFIXES,
    RESIZE_VERSION,
    ImageFolderDataset,
    _suffix,
    check_resize_version,
)
from medfast.tasks.classification.encoding import make_encoder
from medfast.tasks.classification.losses import ClassificationLoss
from medfast.tasks.classification.metrics import classification_report, confusion_matrix, save_confusion_png
from medfast.train.config import Config, ConfigError, check_choice_setting, check_spatial_config
from medfast.train.files import record_split
from medfast.train.task import Task, register_task

__all__ = ["ClassificationTask", "build_classifier", "check_config", "predict_files"]

SIMULATED = "simulated_ultrasound"
#: ``data.dataset_args`` of a folder / CSV data set (no ``data.dataset``)
FOLDER_ARGS = ("csv_file", "classes", "channels", "file_column", "label_column", "val_root", "val_csv_file",
               "resize_version")
ENCODINGS = ("nominal", "binary", "ordinal")
#: the model.kwargs taken from other keys (model.*), not allowed in model.kwargs
_FIXED = {"self", "spatial_dims", "in_channels", "num_classes", "encoding", "width"}
#: ``data.dataset_args`` key that records how ``data.shape`` resized the images a checkpoint was trained on (any data
#: set: a simulated run's checkpoint resizes the files ``medfast predict`` is given); absent: 1, the plain resize
#: that checkpoints written before the record were trained with
RESIZE_KEY = "resize_version"


def _without_resize_key(args) -> dict:
    """``data.dataset_args`` without :data:`RESIZE_KEY`, for the simulator (whose arguments they otherwise are)."""
    return {k: v for k, v in args.items() if k != RESIZE_KEY}


def _saved_resize_version(config_dict: Any) -> int:
    """The resize version a checkpoint's config (a dict) records; 1 (plain resize) where it has none. A bad value
    (an edited file) is a ValueError / TypeError naming the key."""
    args = ((config_dict or {}).get("data") or {}).get("dataset_args") or {}
    return check_resize_version(args.get(RESIZE_KEY, 1), f"the checkpoint's data.dataset_args.{RESIZE_KEY}")


def _network_class(name: str):
    from medfast.nets import DenseNetClassifier, ResNetClassifier, SonoNet

    return {"sononet": SonoNet, "resnet": ResNetClassifier, "densenet": DenseNetClassifier}.get(name)


#: the settings of the shared sections the task reads (the trainer reads data.num_workers); any other one set
#: to a non-default value would be silently ignored, so it is refused (:func:`_refuse_unused_settings`)
_READ = {"data": {"dataset", "root", "val_fraction", "shape", "normalize", "num_workers", "dataset_args"},
         "model": {"name", "spatial_dims", "in_channels", "out_channels", "channels", "kwargs"},
         "loss": set(), "augment": set(), "inference": set()}
#: non-default values that state what the task does anyway (it caches nothing, reorients nothing, augments
#: nothing): accepted, so that e.g. ``data.cache: none`` in configs/classification_example.yaml stays valid
_HARMLESS = {"data.cache": "none", "data.reorient": False, "augment.enabled": False}
_HINTS = {"data": "the images come from data.root or data.dataset_args.csv_file, the validation set from "
                  "data.val_fraction or data.dataset_args.val_root / val_csv_file",
          "model": "the network is model.name, model.channels[0] and model.kwargs (DenseNet's normalization is "
                   "model.kwargs.norm)",
          "loss": "the loss follows model.kwargs.encoding",
          "augment": "the task does not augment",
          "inference": "whole images are classified"}


def _refuse_unused_settings(config: Config) -> None:
    """A shared setting the classification task would ignore is an error naming it (not a silent no-op), as in
    the synthesis task."""
    from medfast.train.config import unused_settings

    d = config.data
    read = {k: set(v) for k, v in _READ.items()}
    if d.dataset == SIMULATED:  # frames are rendered: no folder, validation is the held-out poses / volumes
        read["data"] -= {"root", "val_fraction"}
    unused = unused_settings(config, read, _HARMLESS)
    args = d.dataset_args
    if d.dataset is None and d.val_fraction > 0 and (args.get("val_root") or args.get("val_csv_file")):
        unused.append("data.val_fraction (set it to 0: the validation set is data.dataset_args.val_root / "
                      "val_csv_file)")
    if unused:
        hints = "; ".join(_HINTS[s] for s in _HINTS if any(u.startswith(f"{s}.") for u in unused))
        raise ConfigError(f"the classification task does not use {', '.join(unused)}: remove "
                          f"{'it' if len(unused) == 1 else 'them'} ({hints})")


def _check_width(channels: Any) -> None:
    """``model.channels``: the classification networks take one width, ``channels[0]``, and double it per stage,
    so a list is accepted only as such a doubling (the default ``[16, 32, 64, 128]``); any other list would be
    silently read as its first entry."""
    if not channels:
        return
    widths = list(channels)
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in widths):
        raise ConfigError(f"model.channels must be positive ints, got {widths}")
    if any(c != widths[0] * 2**i for i, c in enumerate(widths)):
        raise ConfigError(f"model.channels={widths}: the classification networks take one width, model.channels[0], "
                          f"and double it per stage (the number of stages is model.kwargs.blocks / convs_per_block); "
                          f"give [{widths[0]}] or a doubling list such as "
                          f"{[widths[0] * 2**i for i in range(len(widths))]}")


def check_config(config: Config, *, refuse_unused: bool = True) -> None:
    """Checks the classification settings (``model.*``, ``data.dataset_args``, ``task_args``) before any data is
    read; raises :class:`ConfigError` naming the key and the allowed values. With ``refuse_unused``, a shared
    setting the task would ignore (``model.norm``, ``augment.*``, ``loss.*``, ``data.test_images``, ...) is an
    error too (off for the config of a trained checkpoint, where it had no effect)."""
    import inspect

    m, d = config.model, config.data
    name = m.name.lower() if isinstance(m.name, str) else m.name
    cls = _network_class(name)
    if cls is None:
        raise ConfigError(f"model.name={m.name!r}: the classification task builds 'sononet', 'resnet' or 'densenet'")
    check_spatial_config(config)
    if name == "sononet" and m.spatial_dims != 2:
        raise ConfigError(f"model.name='sononet' is 2D; got model.spatial_dims={m.spatial_dims}")
    if m.out_channels < 2:
        raise ConfigError(f"model.out_channels must be >= 2 (the number of classes), got {m.out_channels}")
    if refuse_unused:  # (a trained checkpoint's config: its network was built from channels[0] whatever the list)
        _check_width(m.channels)
    kw = dict(m.kwargs)
    encoding = kw.pop("encoding", "nominal")
    if encoding not in ENCODINGS:
        raise ConfigError(f"model.kwargs.encoding must be one of {', '.join(ENCODINGS)}; got {encoding!r}")
    if encoding == "binary" and m.out_channels != 2:
        raise ConfigError(f"model.kwargs.encoding='binary' has 2 classes but model.out_channels={m.out_channels}: "
                          "set model.out_channels=2, or use encoding 'nominal' (or 'ordinal') for more classes")
    valid = sorted(set(inspect.signature(cls.__init__).parameters) - _FIXED)
    unknown = sorted(set(kw) - set(valid))
    if unknown:
        raise ConfigError(f"unknown model.kwargs for model.name={name!r}: {unknown}; valid: encoding, "
                          f"{', '.join(valid)}")
    if RESIZE_KEY in d.dataset_args:
        try:
            check_resize_version(d.dataset_args[RESIZE_KEY], f"data.dataset_args.{RESIZE_KEY}")
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
    if d.dataset == SIMULATED:
        from medfast.tasks.classification.simulated import SimulatedUltrasound

        SimulatedUltrasound.check_args(_without_resize_key(d.dataset_args))
        if m.spatial_dims != 2 or m.in_channels != 1:
            raise ConfigError(f"data.dataset={SIMULATED!r} renders 2D single-channel images: set "
                              f"model.spatial_dims=2 and model.in_channels=1 (got {m.spatial_dims}, {m.in_channels})")
    elif d.dataset is None:
        unknown = sorted(set(d.dataset_args) - set(FOLDER_ARGS))
        if unknown:
            raise ConfigError(f"data.dataset_args: unknown key(s) {unknown} for a folder / CSV data set; valid: "
                              f"{', '.join(FOLDER_ARGS)}")
        _check_folder_args(config, encoding)
    if config.task_args:
        raise ConfigError(f"unknown task_args for the classification task: {sorted(config.task_args)} (it takes "
                          f"none; the settings are model.kwargs and data.dataset_args)")
    if refuse_unused:
        _refuse_unused_settings(config)


def _check_folder_args(config: Config, encoding: str) -> None:
    """``data.dataset_args`` of a folder / CSV data set: ``classes`` (a list of distinct names, required for
    ordinal labels, whose order the sorted names would not give) and ``channels`` (1 or 3, equal to
    ``model.in_channels``)."""
    m, args = config.model, config.data.dataset_args
    classes = args.get("classes")
    if classes is not None:
        if isinstance(classes, str) or not isinstance(classes, (list, tuple)):
            raise ConfigError(f"data.dataset_args.classes must be a list of class names, got {classes!r}")
        names = [str(c) for c in classes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"data.dataset_args.classes lists {dup} more than once: {names}")
        if len(names) != m.out_channels:
            raise ConfigError(f"data.dataset_args.classes has {len(names)} classes {names} but "
                              f"model.out_channels={m.out_channels}")
    elif encoding == "ordinal":
        raise ConfigError("model.kwargs.encoding='ordinal' needs data.dataset_args.classes: the class names in "
                          "their order, lowest first (e.g. [low, medium, high]); the default, the sorted names, "
                          "is alphabetical, not the order of the labels")
    channels = args.get("channels")
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise ConfigError(f"data.dataset_args.channels must be 1 (grey) or 3 (colour), got {channels!r}")
    if channels is not None and channels != m.in_channels:
        raise ConfigError(f"data.dataset_args.channels={channels} but model.in_channels={m.in_channels}: the images "
                          "are converted to data.dataset_args.channels, which the network must take")
    if channels is None and m.in_channels not in (1, 3):
        raise ConfigError(f"model.in_channels={m.in_channels}: images are read with 1 (grey) or 3 (colour) "
                          "channels; set model.in_channels to 1 or 3")


def _image_channels(config: Config) -> int:
    """The channel count images are converted to: ``data.dataset_args.channels``, default ``model.in_channels``
    (so a folder mixing grey and colour images gives batches of the network's input channels)."""
    channels = config.data.dataset_args.get("channels")
    return int(channels) if channels is not None else int(config.model.in_channels)


def build_classifier(config: Config) -> nn.Module:
    """The network described by ``config.model`` (``sononet``, ``resnet`` or ``densenet``)."""
    from medfast.nets import DenseNetClassifier, ResNetClassifier, SonoNet

    m = config.model
    kw = dict(m.kwargs)
    encoding = kw.pop("encoding", "nominal")
    width = int(m.channels[0]) if m.channels else 16
    name = m.name.lower()
    if name == "sononet":
        if m.spatial_dims != 2:
            raise ConfigError(f"model.name='sononet' is 2D; got model.spatial_dims={m.spatial_dims}")
        return SonoNet(m.in_channels, m.out_channels, encoding, width=width, **kw)
    if name == "resnet":
        return ResNetClassifier(m.spatial_dims, m.in_channels, m.out_channels, encoding, width=width, **kw)
    if name == "densenet":
        return DenseNetClassifier(m.spatial_dims, m.in_channels, m.out_channels, encoding, width=width, **kw)
    raise ConfigError(f"model.name={m.name!r}: the classification task builds 'sononet', 'resnet' or 'densenet'")


def min_input_size(model: nn.Module, spatial_dims: int, in_channels: int) -> int | None:
    """The smallest edge ``s`` such that ``model`` takes a ``(1, in_channels, s, ..., s)`` input (its poolings
    need at least one pixel left), found by forwarding zeros in eval mode (no state or RNG changes); None if it
    is not found up to 1024 (2D) / 64 (3D). The poolings act per axis, so it is the minimum of every axis."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()

    def fits(s: int) -> bool:
        try:
            model(torch.zeros((1, in_channels) + (s,) * spatial_dims, device=device))
        except (RuntimeError, ValueError):  # "Output size is too small", norm layers over one value
            return False
        return True

    try:
        with torch.no_grad():
            hi, limit = 1, 1024 if spatial_dims == 2 else 64
            while not fits(hi):
                if hi >= limit:
                    return None
                hi *= 2
            lo = hi // 2  # does not fit (or 0)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if fits(mid) else (mid, hi)
            return hi
    finally:
        model.train(was_training)


def _check_training_input(config: Config, shape) -> None:
    """With ``trainer.batch_size`` 1, a ``data.shape`` input must pass the network in TRAINING mode too:
    :func:`min_input_size` probes in eval mode, where batch normalization uses its running statistics, so a
    network whose last stage is one pixel passed it and failed at the first step (batch norm needs more than one
    value per channel in training). Probed on a meta-device build of the network: no memory, compute, model state
    or RNG used. Raises :class:`ConfigError` naming ``data.shape`` and ``trainer.batch_size`` (as the segmentation
    task's ``check_network_input``)."""
    if config.trainer.batch_size != 1:  # two samples give two values per channel however small the maps
        return
    with torch.device("meta"):
        probe = build_classifier(config).train()
    try:
        with torch.no_grad():
            probe(torch.zeros((1, int(config.model.in_channels), *(int(s) for s in shape)), device="meta"))
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"data.shape={list(shape)} with trainer.batch_size=1: this network (model.name="
                          f"{config.model.name!r}, model.kwargs {dict(config.model.kwargs)}) fails at the first "
                          f"training step ({e}): its last stage is one pixel there, and batch normalization in "
                          "training needs more than one value per channel; raise data.shape, set trainer.batch_size "
                          ">= 2, or use fewer blocks / stem_stride 1") from None


def _size_text(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _check_stackable(shapes, files) -> None:
    """The images of one batch (spatial ``shapes``) must have one size: :func:`medfast.data.collate` would zero-pad
    them (bottom/right), so what the network sees would depend on the batch. Raises :class:`DatasetError` naming
    an odd file."""
    shapes = [tuple(int(v) for v in s) for s in shapes]
    for shape, f in zip(shapes, files, strict=True):
        if shape != shapes[0]:
            raise DatasetError(f"{f}: image of size {_size_text(shape)} but {files[0]} in the same batch is "
                               f"{_size_text(shapes[0])}: images of different sizes do not stack; set data.shape "
                               "(e.g. [128, 128]) to resize every image")


def collate(items):
    """:func:`medfast.data.collate` for classification items: refuses images of different sizes (see
    :func:`_check_stackable`) instead of zero-padding them."""
    if items and "image" in items[0]:
        _check_stackable([it["image"].shape[1:] for it in items], [it.get("files", "?") for it in items])
    return _collate(items)


class _WithSize(Dataset):
    """Adds ``"size"`` (the image's spatial size, int64) to every item: the trainer batches items with
    :func:`medfast.data.collate`, which zero-pads images of different sizes; the training and validation steps
    refuse such a batch from these sizes (only without ``data.shape``, when sizes can differ)."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __getattr__(self, name: str):  # files, classes, labels, ... of the folder data set
        if name == "base":  # not set yet (e.g. while unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.base, name)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        item = self.base[key]
        item["size"] = torch.tensor(item["image"].shape[1:], dtype=torch.long)
        return item


class _Subset(Dataset):
    """``base[indices[i]]``; passes ``(index, seed)`` keys through."""

    def __init__(self, base: Dataset, indices: list[int]) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self.base[(self.indices[key[0]], key[1])]
        return self.base[self.indices[key]]


@register_task("classification")
class ClassificationTask(Task):
    """Image classification with a nominal, binary or ordinal (CORAL) label encoding."""

    def __init__(self, config: Config, *, refuse_unused: bool = True) -> None:
        super().__init__(config)
        check_config(config, refuse_unused=refuse_unused)
        self.encoding = config.model.kwargs.get("encoding", "nominal")
        self.num_classes = config.model.out_channels
        self.loss_fn = ClassificationLoss(self.encoding)
        self.encoder = make_encoder(self.encoding, self.num_classes)
        self.val_ds = None
        self.source = None  # SimulatedUltrasound when data.dataset = simulated_ultrasound
        self._val_images: dict[str, torch.Tensor] = {}
        self.min_size: int | None = None  # the network's smallest input edge (set by build_model)
        self._folders: list[ImageFolderDataset] = []  # the folder data sets built (check_resume sets their resize)
        self._resize_given: int | None = None  # data.dataset_args.resize_version as the run's config gave it

    def build_model(self) -> nn.Module:
        c = self.config
        model = build_classifier(c)
        self.min_size = min_input_size(model, c.model.spatial_dims, c.model.in_channels)
        shape = c.data.shape or ((64, 64) if c.data.dataset == SIMULATED else None)  # the simulator's default
        if shape is not None and self.min_size is not None and min(shape) < self.min_size:
            raise ConfigError(f"data.shape={list(shape)} is smaller than the smallest input of this network "
                              f"(model.name={c.model.name!r}, model.kwargs {dict(c.model.kwargs)}): "
                              f"{self.min_size} pixels per axis, which its poolings need; raise data.shape or "
                              "use fewer blocks / stem_stride 1")
        if shape is not None:
            _check_training_input(c, shape)
        return model

    def check_resume(self, state: dict[str, Any], path: Path) -> None:
        """Called by the trainer when it resumes ``state`` (after :meth:`build_datasets`): the class list must be
        the checkpoint's, or the network's outputs would be read as other classes. The images are resized as the
        checkpoint's were (:data:`RESIZE_KEY`)."""
        from medfast.train.trainer import CheckpointError

        try:
            saved_resize = _saved_resize_version(state.get("config"))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        if self._resize_given is not None and self._resize_given != saved_resize:
            raise CheckpointError(f"{path} was trained on images resized with data.dataset_args.{RESIZE_KEY}="
                                  f"{saved_resize} but this run sets {self._resize_given}: resuming would change "
                                  f"the network's inputs mid-run; remove the setting, or train a new run (without "
                                  "--resume)")
        # a checkpoint written before the record (plain resize) keeps its inputs; the record is carried on
        self.config.data.dataset_args[RESIZE_KEY] = saved_resize
        for folder in self._folders:
            folder.resize_version = saved_resize

        saved = (((state.get("config") or {}).get("data") or {}).get("dataset_args") or {}).get("classes")
        now = self.config.data.dataset_args.get("classes")
        if saved is not None and now is not None and [str(c) for c in saved] != [str(c) for c in now]:
            raise CheckpointError(f"{path} was trained with the classes {list(saved)} (in this order) but this "
                                  f"run's classes are {list(now)}: resuming would relabel the network's outputs; "
                                  f"set data.dataset_args.classes={list(saved)} (and keep the class folders' "
                                  "names), or train a new run (without --resume)")

    def _folder(self, root, csv_file) -> ImageFolderDataset:
        d, args = self.config.data, self.config.data.dataset_args
        try:
            folder = ImageFolderDataset(root, csv_file=csv_file, classes=args.get("classes"),
                                        spatial_dims=self.config.model.spatial_dims, size=d.shape,
                                        channels=_image_channels(self.config), normalize=d.normalize,
                                        file_column=args.get("file_column", "file"),
                                        label_column=args.get("label_column", "label"),
                                        resize_version=args.get(RESIZE_KEY, RESIZE_VERSION))
            self._folders.append(folder)
            return folder
        except DatasetError:
            raise
        except ValueError as exc:  # an argument of the data set: a configuration error
            raise ConfigError(f"data / data.dataset_args: {exc}") from exc

    def _build_simulated(self):
        from torch.utils.data import ConcatDataset

        from medfast.tasks.classification.simulated import SimulatedUltrasound

        c, d = self.config, self.config.data
        args = d.dataset_args
        if c.model.spatial_dims != 2 or c.model.in_channels != 1:
            raise ConfigError(f"data.dataset={SIMULATED!r} renders 2D single-channel images: set model.spatial_dims=2 "
                             f"and model.in_channels=1 (got {c.model.spatial_dims}, {c.model.in_channels})")
        sizes = {key: args.get(key, default) for key, default in (("samples_per_epoch", 1024), ("val_samples", 64))}
        for key, n in sizes.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"data.dataset_args.{key} must be an int >= 1, got {n!r}")
        try:
            self.source = SimulatedUltrasound.from_args(_without_resize_key(args), d.shape, d.normalize,
                                                        c.trainer.seed)
        except (DatasetError, ConfigError):
            raise
        except ValueError as exc:  # a bad argument of the simulator: a configuration error
            raise ConfigError(f"data.dataset_args: {exc}") from exc
        planes = self.source.planes
        if len(planes) != self.num_classes:
            raise DatasetError(f"data.dataset_args.planes has {len(planes)} classes {planes} but "
                               f"model.out_channels={self.num_classes}")
        given = args.get("classes")
        if given is not None and list(given) != list(planes):  # (it was overwritten silently)
            raise ConfigError(f"data.dataset_args.classes = {list(given)} but the simulated classes are the planes "
                              f"{list(planes)} (data.dataset_args.planes): leave classes unset (a checkpoint "
                              f"records them)")
        self.encoder = make_encoder(self.encoding, self.num_classes, planes)
        args["classes"] = list(planes)
        try:  # (outside the wrapper, a pose_bins of 1.0 or too few samples left a raw traceback)
            train = self.source.train_dataset(sizes["samples_per_epoch"])
            vals = self.source.validation_datasets(sizes["val_samples"])
        except ValueError as exc:
            raise ConfigError(f"data.dataset_args: {exc}") from exc
        self.val_ds = ConcatDataset(vals)
        return train, self.val_ds

    def build_datasets(self):
        c, d = self.config, self.config.data
        args = d.dataset_args
        # recorded in the checkpoint's config (as the classes are), so that predict and resume resize as training
        # did; a resume of a checkpoint without the record switches back to the plain resize (check_resume)
        self._folders = []
        given = args.get(RESIZE_KEY)  # (checked by check_config)
        self._resize_given = None if given is None else int(given)
        args[RESIZE_KEY] = RESIZE_VERSION if self._resize_given is None else self._resize_given
        if d.dataset == SIMULATED:
            return self._build_simulated()
        if d.dataset is not None:
            raise DatasetError(f"data.dataset={d.dataset!r}: the classification task knows {SIMULATED!r}, or no "
                               "dataset with data.root / data.dataset_args.csv_file (your images)")
        if d.root is None and not args.get("csv_file"):
            raise DatasetError("no training data: set data.root (class subfolders) or data.dataset_args.csv_file")
        folder = self._folder(d.root, args.get("csv_file"))
        if len(folder.classes) != self.num_classes:
            raise DatasetError(f"{args.get('csv_file') or d.root}: {len(folder.classes)} classes {folder.classes} "
                               f"but model.out_channels={self.num_classes}")
        self.encoder = make_encoder(self.encoding, self.num_classes, folder.classes)
        args["classes"] = list(folder.classes)  # saved with the checkpoint's config, for predict_files
        # without data.shape image sizes can differ: the items carry theirs, checked per batch (_check_batch)
        full = folder if d.shape is not None else _WithSize(folder)
        train, val = full, None
        train_files, val_files = list(folder.files), []  # the split the trainer records in its checkpoints
        if args.get("val_root") or args.get("val_csv_file"):
            # the validation CSV's relative paths start where the training CSV's do (data.root), or at val_root
            val = self._folder(args.get("val_root") or d.root, args.get("val_csv_file"))
            val_files = list(val.files)
            val = val if d.shape is not None else _WithSize(val)
        elif d.val_fraction > 0 and len(full) > 1:
            order = np.random.default_rng(c.trainer.seed).permutation(len(full))
            n_val = max(1, int(round(len(full) * d.val_fraction)))
            if n_val >= len(full):
                raise ConfigError(f"data.val_fraction={d.val_fraction} puts all {len(full)} images of "
                                  f"{args.get('csv_file') or d.root} in the validation set and none in training: "
                                  "lower data.val_fraction, or add images")
            val_idx, train_idx = sorted(order[:n_val].tolist()), sorted(order[n_val:].tolist())
            val, train = _Subset(full, val_idx), _Subset(full, train_idx)
            train_files, val_files = [folder.files[i] for i in train_idx], [folder.files[i] for i in val_idx]
        record_split(c, train_files, val_files)
        self.val_ds = val
        return train, val

    def _targets(self, label: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(label.reshape(-1)).to(label.device)

    def _predict(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(classes (N,), probabilities (N, C)) of network outputs."""
        logits = logits.float()
        if self.encoding == "nominal":
            return logits.argmax(1), logits.softmax(1)
        return self.encoder.decode(logits, logits=True), self.encoder.probabilities(logits)

    def collate(self, items):
        """The trainer's batches (:func:`medfast.data.collate`), and for simulated frames their render inputs (the
        poses: a march through the brain masks on the host, about 1 ms a batch of 64), so that with
        ``data.num_workers`` > 0 the loader workers compute them instead of the training process."""
        batch = super().collate(items)
        if self.source is not None and "image" not in batch:
            batch["render_inputs"] = self.source.render_inputs(batch)
        return batch

    def images(self, batch, device) -> torch.Tensor:
        """The batch's images on ``device``: read from the batch, or rendered there by the simulator."""
        if "image" in batch:
            return batch["image"].to(device, non_blocking=True).float()
        if self.source is None:
            raise DatasetError("the batch has no 'image' and no simulator is configured (data.dataset)")
        return self.source.render(batch, device)

    def _cached_images(self, batch, device) -> torch.Tensor:
        """Validation images, rendered once (fixed descriptors) and kept on the CPU."""
        if "image" in batch:
            return batch["image"].to(device).float()
        keys = list(batch["files"])
        if not all(k in self._val_images for k in keys):
            imgs = self.images(batch, device).cpu()
            self._val_images.update(zip(keys, imgs, strict=True))
        return torch.stack([self._val_images[k] for k in keys]).to(device)

    def _check_batch(self, batch, image: torch.Tensor) -> None:
        """Refuses a batch that :func:`medfast.data.collate` zero-padded (images of different sizes, see
        :class:`_WithSize`) and images smaller than the network takes (a raw pooling error otherwise)."""
        files = list(batch.get("files") or ["?"] * image.shape[0])
        if "size" in batch:
            _check_stackable(batch["size"].tolist(), files)
        if self.min_size is not None and min(image.shape[2:]) < self.min_size:
            raise DatasetError(f"{files[0]}: image of size {_size_text(image.shape[2:])} is smaller than the "
                               f"network's smallest input, {self.min_size} pixels per axis; set data.shape to "
                               "resize the images, or use a network with fewer poolings")

    def training_step(self, model, batch, device):
        image = self.images(batch, device)
        self._check_batch(batch, image)
        label = batch["label"].to(device, non_blocking=True)
        logits = model(image)
        loss = self.loss_fn(logits, self._targets(label))
        pred, _ = self._predict(logits.detach())
        return loss, {"acc": float((pred == label.reshape(-1)).float().mean())}

    @torch.no_grad()
    def validation_step(self, model, batch, device):
        image = self._cached_images(batch, device)
        self._check_batch(batch, image)
        label = batch["label"].to(device).reshape(-1)
        logits = model(image)
        pred, _ = self._predict(logits)
        rows = []
        subsets = batch.get("subset")
        for i in range(label.shape[0]):
            ok = float(pred[i] == label[i])
            row = {"accuracy": ok, "loss": float(self.loss_fn(logits[i:i + 1], self._targets(label[i:i + 1])))}
            if subsets is not None:
                row[f"accuracy_{subsets[i]}"] = ok
            # per-class recall: NaN for the other classes, so the trainer's NaN-aware mean gives the recall
            for k, name in enumerate(self.encoder.class_names):
                row[f"recall_{name}"] = ok if int(label[i]) == k else float("nan")
            rows.append(row)
        return rows

    def finish(self, model, device, out_dir: Path) -> dict[str, Any]:
        """Full validation-set report (balanced accuracy, F1, AUC, per class; per subset for simulated data:
        ``held_out_poses`` and ``held_out_volumes``), ``confusion_matrix[_<subset>].png`` and ``cam.png``
        (Grad-CAM overlays of up to 16 validation images, 2D only; the PNGs are skipped with a note when matplotlib
        is not installed)."""
        if self.val_ds is None or len(self.val_ds) == 0:
            return {}
        plots = self.config.trainer.plots and figures_enabled("medfast train")  # matplotlib is optional
        was_training = model.training
        model.eval()
        preds, probs, labels, subsets = [], [], [], []
        # only the images cam.png draws are kept (copies, not views of their batch): memory does not grow with
        # the validation set
        cams = plots and self.config.model.spatial_dims == 2
        shown: list[tuple[torch.Tensor, int, str]] = []
        counts: dict[tuple[str, int], int] = {}
        # without data.shape a folder's images may differ in size and do not stack: one image a batch, as the
        # trainer's validation reads them (rendered frames have one size: data.shape or the simulator's default)
        one_by_one = self.source is None and self.config.data.shape is None
        batch_size = 1 if one_by_one else max(1, self.config.trainer.batch_size)
        loader = torch.utils.data.DataLoader(self.val_ds, batch_size=batch_size, collate_fn=collate)
        with torch.no_grad():
            for batch in loader:
                image = self._cached_images(batch, device)
                self._check_batch(batch, image)
                pred, prob = self._predict(model(image))
                preds.append(pred.cpu())
                probs.append(prob.cpu())
                labels.append(batch["label"].reshape(-1))
                subsets += list(batch.get("subset") or ["validation"] * len(pred))
                for i, (y, sub) in enumerate(zip(batch["label"].reshape(-1).tolist(),
                                                 batch.get("subset") or [""] * len(pred), strict=True)):
                    if not cams or len(shown) >= self.CAM_IMAGES:
                        break
                    if counts.get((str(sub), y), 0) < self.CAM_PER_CLASS:
                        counts[(str(sub), y)] = counts.get((str(sub), y), 0) + 1
                        shown.append((image[i].detach().cpu().clone(), y, str(sub)))
        pred, prob, label = torch.cat(preds), torch.cat(probs), torch.cat(labels)
        k = self.num_classes
        names = self.encoder.class_names

        def _report(sel: np.ndarray, suffix: str, title: str) -> dict[str, Any]:
            rep = classification_report(pred[sel], label[sel], k, prob[sel])
            cm = confusion_matrix(pred[sel], label[sel], k)
            if plots:
                save_confusion_png(cm, Path(out_dir) / f"confusion_matrix{suffix}.png", names,
                                   title=f"{title} ({int(sel.sum())} images)")
            rep = {key: (None if np.isnan(v) else v) for key, v in rep.items()}
            rep["confusion_matrix"] = cm.tolist()
            rep["n"] = int(sel.sum())
            return rep

        report = _report(np.ones(len(label), dtype=bool), "", "validation")
        report["classes"] = list(names)
        sub = np.array(subsets)
        distinct = [s for s in dict.fromkeys(subsets) if s != "validation"]
        for name in distinct:
            report[name] = _report(sub == name, f"_{name}", name.replace("_", " "))
        if plots and shown:
            self._save_cams(model, shown, device, Path(out_dir) / "cam.png")
        model.train(was_training)
        (Path(out_dir) / "classification_report.json").write_text(json_dumps(report, indent=1))
        return {"classification": report}

    #: cam.png: up to CAM_PER_CLASS validation images of each class from each subset, CAM_IMAGES at most
    CAM_PER_CLASS, CAM_IMAGES = 2, 16

    def _save_cams(self, model, shown, device, path: Path, per_class: int = CAM_PER_CLASS) -> Path:
        """Grad-CAM overlays: up to ``per_class`` images of each class from each subset (16 at most)."""
        from medfast.tasks.classification.cam import class_activation_map, save_cam_png

        picked, count = [], {}
        for x, y, sub in shown:
            key = (sub, y)
            if count.get(key, 0) < per_class and len(picked) < self.CAM_IMAGES:
                count[key] = count.get(key, 0) + 1
                picked.append((x, y, sub))
        picked.sort(key=lambda t: (t[2], t[1]))
        if len({tuple(p[0].shape) for p in picked}) == 1:
            images = torch.stack([p[0] for p in picked]).to(device)
            cams, pred = class_activation_map(model, images, encoding=self.encoding)
            images, cams = images.cpu(), cams.cpu()
        else:  # images of different sizes (no data.shape): mapped one by one, drawn on a common canvas
            maps = [class_activation_map(model, x[None].to(device), encoding=self.encoding) for x, _, _ in picked]
            pred = torch.cat([q.cpu() for _, q in maps])
            images, cams = _pad_for_grid([x for x, _, _ in picked], [c[0].cpu() for c, _ in maps])
        names = self.encoder.class_names
        titles = [f"{sub.replace('held_out_', '')}: {names[y]}\npred {names[int(q)]}".lstrip(": ")
                  for (_, y, sub), q in zip(picked, pred.tolist(), strict=True)]
        return save_cam_png(images, cams, path, titles)


def _pad_for_grid(images: list[torch.Tensor], cams: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """2D ``images`` ``(C, H_i, W_i)`` and their ``cams`` ``(H_i, W_i)`` of different sizes as one
    ``(N, C, H, W)`` / ``(N, H, W)`` pair for :func:`save_cam_png`: each padded at the bottom/right to the largest
    size, the image with its own per-channel minimum (black once drawn min-max scaled, its contrast unchanged),
    the map with NaN (not drawn: no overlay outside the image)."""
    h, w = max(x.shape[-2] for x in images), max(x.shape[-1] for x in images)
    out_images, out_cams = [], []
    for x, cam in zip(images, cams, strict=True):
        canvas = x.amin((-2, -1), keepdim=True).expand(x.shape[0], h, w).clone()
        canvas[:, :x.shape[-2], :x.shape[-1]] = x
        grid = torch.full((h, w), float("nan"), dtype=cam.dtype)
        grid[:cam.shape[-2], :cam.shape[-1]] = cam
        out_images.append(canvas)
        out_cams.append(grid)
    return torch.stack(out_images), torch.stack(out_cams)


def _input_files(inputs) -> list[Path]:
    """The images to classify: each input file, and a folder's image files (the suffixes :func:`read_image`
    reads; not its subfolders, as the segmentation predict; hidden files skipped, as in the data set),
    sorted. Raises :class:`DatasetError` for a folder without images."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.is_file() and not p.name.startswith(".") and _suffix(p) in IMAGE_SUFFIXES)
            if not found:
                raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the input folder {path}")
            files += found
        else:
            files.append(path)
    return files


#: the settings ``medfast predict`` reads from a classification checkpoint's config besides the network: the only
#: ones ``--set`` may change (the image size, the intensity normalization and the channels images are read with)
PREDICT_SETTINGS = ("data.shape", "data.normalize", "data.dataset_args.channels")


def _check_predict_overrides(overrides) -> None:
    """``overrides`` (``--set``) may set only :data:`PREDICT_SETTINGS`: any other key (``trainer.max_steps=-3``,
    ``optim.lr=...``, ``model.channels=...``) was accepted and ignored (or broke the checkpoint's network);
    raises :class:`ConfigError` naming the keys."""
    from medfast.train.config import override_keys

    keys = override_keys(overrides)
    unread = list(dict.fromkeys(k for k in keys if k not in PREDICT_SETTINGS))
    if unread:
        raise ConfigError(f"overrides (--set) {', '.join(unread)}: medfast predict does not read "
                          f"{'it' if len(unread) == 1 else 'them'} for a classification checkpoint (the network, "
                          f"its classes and the training settings are the checkpoint's); it reads "
                          f"{', '.join(PREDICT_SETTINGS)}")


def predict_files(checkpoint: str | Path, inputs, out_dir: str | Path, *, device: str = "auto",
                  overrides=(), save_probabilities: bool = True, progress: bool = False,
                  save_cam: bool = True) -> list[Path]:
    """Classifies image files (PNG/JPEG/NIfTI/DICOM; a folder: its image files, sorted, not its subfolders)
    with a checkpoint of the classification task and writes ``predictions.csv``: one row per input with
    ``file``, the predicted ``class`` and ``index``, and (with ``save_probabilities``) ``p_<class>`` columns.
    Images are read, resized, converted to the model's channels and normalized as in training; every input is
    read and classified before anything is written (a bad file, or a folder without images, raises
    :class:`DatasetError` naming it and leaves no partial output). With ``save_cam`` (2D models),
    ``cam/<index>_<name>.png`` shows each image with the Grad-CAM of its predicted class
    (:func:`~medfast.tasks.classification.cam.class_activation_map`); without matplotlib they are skipped with a
    one-line note.

    Returns
    -------
    list of Path
        ``[out_dir / "predictions.csv"]`` followed by the CAM PNGs.
    """
    import csv

    from medfast.train.config import config_from_dict, load_config
    from medfast.train.trainer import load_checkpoint, load_model_state, resolve_device

    inputs = _input_files(inputs)  # before the checkpoint is loaded: an empty folder fails fast
    state = load_checkpoint(checkpoint)
    config = config_from_dict(state["config"])
    if overrides:
        import yaml

        _check_predict_overrides(overrides)
        config = load_config([], overrides, base=yaml.safe_load(yaml.safe_dump(state["config"])))
    # the item transform below is set up without ImageFolderDataset's checks: an unknown value (a typo in --set)
    # would be read as no normalization; refused as medfast train refuses it
    check_choice_setting("data.normalize", config.data.normalize)
    task = ClassificationTask(config, refuse_unused=False)  # a setting training ignored is ignored here too
    names = config.data.dataset_args.get("classes") or [str(k) for k in range(task.num_classes)]
    task.encoder = make_encoder(task.encoding, task.num_classes, names)
    dev = resolve_device(device, "--device")
    with torch.random.fork_rng(devices=[]):  # the initialisation (replaced by the weights) leaves the caller's RNG
        model = task.build_model()  # checks data.shape against the network's smallest input (task.min_size)
    load_model_state(model, state, checkpoint, config)
    model.to(dev).eval()
    # the training data set's item transform, applied to files outside it
    folder = ImageFolderDataset.__new__(ImageFolderDataset)
    folder.spatial_dims, folder.size = config.model.spatial_dims, config.data.shape
    folder.channels, folder.normalize = _image_channels(config), config.data.normalize
    # absent: a checkpoint trained on the plain resize (check_config above checked a recorded value)
    folder.resize_version = int(config.data.dataset_args.get(RESIZE_KEY, 1))
    folder.files, folder.labels = [Path(f) for f in inputs], [0] * len(inputs)
    in_channels = int(config.model.in_channels)
    if folder.channels not in (1, 3):
        raise ConfigError(f"model.in_channels={in_channels}: images are read with 1 (grey) or 3 (colour) channels")

    def image(i: int) -> torch.Tensor:
        x = folder[i]["image"]
        if x.shape[0] != in_channels:  # clear error naming the file, not a raw convolution error
            raise DatasetError(f"{folder.files[i]}: {x.shape[0]} channel(s) but the model takes "
                               f"model.in_channels={in_channels}")
        if task.min_size is not None and min(x.shape[1:]) < task.min_size:  # not a raw pooling error
            raise DatasetError(f"{folder.files[i]}: image of size {_size_text(x.shape[1:])} is smaller than the "
                               f"network's smallest input, {task.min_size} pixels per axis")
        return x[None].to(dev)

    def classify(i: int, x: torch.Tensor):
        try:
            return task._predict(model(x))
        except RuntimeError as exc:  # a network whose smallest input was not found: still name the file
            if "too small" not in str(exc):
                raise
            raise DatasetError(f"{folder.files[i]}: image of size {_size_text(x.shape[2:])} is too small for the "
                               f"network ({exc})") from None

    # every input is read and classified before anything is written: a bad file leaves no partial output
    rows, preds = [], []
    for i, f in enumerate(folder.files):
        x = image(i)  # read_image: a missing or corrupt file raises DatasetError naming it
        with torch.no_grad():
            pred, prob = classify(i, x)
        row = {"file": str(f), "class": names[int(pred[0])], "index": int(pred[0])}
        if save_probabilities:
            row.update({f"p_{n}": round(float(p), 6) for n, p in zip(names, prob[0].tolist(), strict=True)})
        rows.append(row)
        preds.append(pred)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "predictions.csv"
    # UTF-8 whatever the locale (class names, paths), through a temporary file: a failure leaves no partial CSV
    with replacing(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["file", "class", "index"])
        writer.writeheader()
        writer.writerows(rows)
    for old in (out_dir / "cam").glob("*.png"):  # an earlier call's maps would sit beside (or pass for) these
        old.unlink()
    cam_paths = []
    if save_cam and config.model.spatial_dims == 2 and figures_enabled("medfast predict"):
        from medfast.tasks.classification.cam import class_activation_map, save_cam_png

        for i, (f, row, pred) in enumerate(zip(folder.files, rows, preds, strict=True)):
            x = image(i)  # read again (validated above), not all kept in memory
            cam, _ = class_activation_map(model, x, pred, encoding=task.encoding)
            stem = Path(f).name.split(".")[0]
            cam_paths.append(save_cam_png(x.cpu(), cam.cpu(), out_dir / "cam" / f"{i:04d}_{stem}.png",
                                          [f"{stem}: {row['class']}"], columns=1))
    return [path, *cam_paths]
