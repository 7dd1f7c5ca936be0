"""Segmentation task: UNet + Dice/CE loss (:class:`medfast.losses.DiceCELoss`), Dice and HD95 validation
with sliding-window inference, on-device augmentation, and prediction to NIfTI in the input's space."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from medfast._figures import figures_enabled, new_figure, save_figure
from medfast._jsonsafe import dumps as json_dumps
from medfast.data import DatasetError, NiftiDataset, RandomAugment, load_nifti, save_nifti
from medfast.data.dataset import _is_nifti_name, case_name, check_label_map, group_channel_files, relabel
from medfast.data.io import (
    ImageEntry,
    entry_files,
    entry_text,
    image_header,
    load_image,
    single_slice_as_2d,
    single_slice_as_stored,
    single_slice_axis,
    voxel_spacing,
)
from medfast.data.preprocess import (
    REORIENT_DIMS,
    normalize_intensity,
    reorient_dims_of,
    reorient_to_ras,
    resample_to_spacing,
    spatial_affine,
)
from medfast.ops._validate import non_negative_finite, py_scalar
from medfast.train.config import Config, ConfigError, check_spatial_config, config_from_dict
from medfast.train.files import check_dataset_args, gather_files
from medfast.train.sliding_window import sliding_window_inference, window_memory_problem
from medfast.train.task import Task, register_task

__all__ = ["DeformedDataset", "SegmentationTask", "build_unet", "check_config", "check_reorient_resume",
           "check_window", "predict_files", "predict_volume"]

NORMS = ("instance", "batch", "group", "none")


def _check_model(config: Config) -> None:
    """``config.model`` describes a :class:`medfast.nets.UNet` (raises :class:`ConfigError` naming the key)."""
    m = config.model
    if not isinstance(m.name, str) or m.name.lower() != "unet":
        raise ConfigError(f"model.name={m.name!r}: the segmentation task builds 'unet' (the only allowed value)")
    check_spatial_config(config)
    if m.out_channels < 2:
        raise ConfigError(f"model.out_channels must be >= 2 for segmentation (the number of classes, background "
                          f"included), got {m.out_channels}")
    if len(m.channels) < 2 or any(c < 1 for c in m.channels):
        raise ConfigError(f"model.channels must list >= 2 positive feature counts (one per level), got {m.channels}")
    if m.convs_per_level < 1:
        raise ConfigError(f"model.convs_per_level must be >= 1, got {m.convs_per_level}")
    if m.norm not in NORMS:
        raise ConfigError(f"model.norm must be one of {', '.join(NORMS)}; got {m.norm!r}")
    if m.kwargs:
        raise ConfigError(f"unknown model.kwargs for the unet: {sorted(m.kwargs)}; the unet takes none (its settings "
                          f"are model.channels, convs_per_level, norm, deep_supervision)")


def _check_deep_supervision_weights(config: Config) -> None:
    """loss.deep_supervision_weights: one finite, non-negative weight per output, not all 0, with deep supervision
    on (they were zipped with the outputs: a short list dropped heads, all zeros gave a NaN loss, a negative
    weight ascended, and without deep supervision they were ignored). A training setting: checked by check_config
    (the task), not by build_unet, which predict / evaluate call on the configs of older checkpoints."""
    w = config.loss.deep_supervision_weights
    if w is None:
        return
    outputs = len(config.model.channels) - 1
    if not config.model.deep_supervision:
        raise ConfigError("loss.deep_supervision_weights needs model.deep_supervision: true (the network has one "
                          "output without it: the weights would be ignored)")
    if not isinstance(w, (list, tuple)) or len(w) != outputs:
        raise ConfigError(f"loss.deep_supervision_weights must list one weight per output of the network: {outputs} "
                          f"(len(model.channels) - 1, full resolution first), got {w!r}")
    values = [py_scalar(v) for v in w]
    if not all(non_negative_finite(v) for v in values) or sum(values) <= 0:
        raise ConfigError(f"loss.deep_supervision_weights must be non-negative finite numbers, not all 0, got {w!r}")


def check_config(config: Config) -> None:
    """Checks the segmentation settings (model, spatial sizes, ``task_args``) before any data is read; raises
    :class:`ConfigError` naming the key."""
    _check_model(config)
    _check_deep_supervision_weights(config)  # (training only: predict builds the network without it)
    check_dataset_args(config, "segmentation")
    if config.loss.batch_dice and config.trainer.batch_size == 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        # the batch Dice sums over one micro-batch (all ranks' under torchrun, never over trainer.accumulate's
        # micro-batches): of one sample on one process it is that sample's Dice, loss.batch_dice: false's
        raise ConfigError("loss.batch_dice sums the Dice over each micro-batch (trainer.batch_size samples per "
                          "process, not over the trainer.accumulate micro-batches of a step): with "
                          "trainer.batch_size=1 on one process it equals the per-sample Dice and would do nothing; "
                          "raise trainer.batch_size, or remove loss.batch_dice")
    if config.task_args:
        raise ConfigError(f"unknown task_args for the segmentation task: {sorted(config.task_args)} (it takes none)")
    n = config.model.out_channels
    try:  # a negative key would relabel the largest label value (it indexes the lookup table from its end)
        check_label_map(config.data.test_label_map, "data.test_label_map")
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    bad = {k: v for k, v in config.data.test_label_map.items() if not 0 <= v < n}
    if bad:
        raise ConfigError(f"data.test_label_map maps to labels outside 0..{n - 1} (model.out_channels={n}): {bad}")


def build_unet(config: Config) -> nn.Module:
    """The :class:`medfast.nets.UNet` described by ``config.model`` (raises :class:`ConfigError` for bad settings)."""
    from medfast.nets import UNet

    _check_model(config)
    m = config.model
    return UNet(m.spatial_dims, m.in_channels, m.out_channels, m.channels, m.convs_per_level, m.norm,
                m.deep_supervision)


class DeformedDataset(Dataset):
    """``copies`` fixed random deformations (affine + smooth, no intensity change) of each subject of
    ``base``: held-out validation samples of a one-subject data set. Seeds ``10**12 + i`` never occur in
    training (whose seeds come from :class:`medfast.train.EpochSampler`). Computed on the CPU, cached."""

    def __init__(self, base: Dataset, copies: int, augment: RandomAugment) -> None:
        self.base, self.copies, self.augment = base, copies, augment
        self._cache: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.base) * self.copies

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i not in self._cache:
            item = dict(self.base[i % len(self.base)])
            image, label = self.augment(item["image"][None], item["label"][None], [10**12 + i])
            item.update(image=image[0], label=label[0], files=f"{item['files']} (deformation {i})")
            self._cache[i] = item
        return self._cache[i]


def _dataset(config: Config, images: Sequence[str], labels: Sequence[str], label_map=None,
             num_classes: int | None = None) -> NiftiDataset:
    d = config.data
    return NiftiDataset(images, labels, spatial_dims=config.model.spatial_dims, spacing=d.spacing, shape=d.shape,
                        normalize=d.normalize, clip_percentiles=d.clip_percentiles, label_map=label_map,
                        cache=d.cache, cache_dir=d.cache_dir, reorient=d.reorient,
                        in_channels=config.model.in_channels, num_classes=num_classes, compact_labels=True)


def check_reorient_resume(config: Config, state: dict[str, Any], path: Path) -> None:
    """A run resumed from a checkpoint must see its images as the checkpoint's network did: one written before 2D
    images were reoriented (no ``"reorient_dims"``) trained a 2D network on storage order, which
    ``data.reorient`` would now change mid-run. Raises :class:`~medfast.train.CheckpointError` for that case."""
    from medfast.train.trainer import CheckpointError

    nd = config.model.spatial_dims
    if config.data.reorient and nd not in reorient_dims_of(state) and nd in REORIENT_DIMS:
        raise CheckpointError(f"{path} was trained on {nd}D images in storage order (written before {nd}D images "
                              f"were reoriented; its checkpoint has no 'reorient_dims') but this run has "
                              f"data.reorient=true, which now reorients {nd}D images: resuming would change what "
                              f"the network sees; resume with data.reorient=false, or train a new run")


def _roi(config: Config) -> list[int] | None:
    return config.inference.roi_size or config.augment.patch_size


def check_window(config: Config, size: Sequence[int] | None = None, batch: int = 1,
                 device: torch.device | str = "cpu", source: str = "") -> None:
    """Raises :class:`ConfigError` naming ``inference.roi_size`` (or ``augment.patch_size``, the window when it is
    unset) and ``source`` (e.g. the checkpoint whose config it is) when the sliding windows over an image of
    spatial shape ``size``, which is padded to the window where smaller, need buffers that could not fit in the
    memory of ``device`` (:func:`~medfast.train.sliding_window.window_memory_problem`). Without ``size``: for any
    image, before any image is read. (A window inside the image is not the cause: there the image's own buffers
    are, which :func:`sliding_window_inference` refuses itself.)"""
    roi = _roi(config)
    if roi is None or (size is not None and all(r <= s for r, s in zip(roi, size))):
        return
    inf, m = config.inference, config.model
    problem = window_memory_problem(size, roi, batch=batch, channels=m.in_channels, out_channels=m.out_channels,
                                    sw_batch_size=inf.sw_batch_size, overlap=inf.overlap, mode=inf.blend,
                                    device=device)
    if problem is not None:
        key, fix = ("inference.roi_size", f"give a smaller one (the training patch: augment.patch_size="
                    f"{config.augment.patch_size})") if inf.roi_size else (
            "augment.patch_size (the window: inference.roi_size is unset)", "set a smaller inference.roi_size")
        raise ConfigError(f"{key}={list(roi)}{source}: {problem}; {fix}")


@torch.no_grad()
def predict_volume(model: nn.Module, image: torch.Tensor, config: Config) -> torch.Tensor:
    """Class probabilities of a preprocessed ``(B, C, *S)`` image: sliding windows of ``inference.roi_size``
    (default the training patch; the whole volume when neither is set), blended; ``(B, K, *S)`` float32.
    A window whose buffers could not fit in memory raises :class:`ConfigError` (see :func:`check_window`)."""
    inf = config.inference
    roi = _roi(config)
    check_window(config, image.shape[2:], image.shape[0], image.device)

    def run(x: torch.Tensor) -> torch.Tensor:
        y = model(x)
        return torch.softmax((y[0] if isinstance(y, (list, tuple)) else y).float(), dim=1)

    if roi is None:
        return run(image)
    return sliding_window_inference(image, roi, run, overlap=inf.overlap, mode=inf.blend,
                                    sw_batch_size=inf.sw_batch_size)


def _load_for_inference(entry: ImageEntry, config: Config, reorient_dims: Sequence[int] = REORIENT_DIMS
                        ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, Any, list[int]]:
    """``(image (1, C, *S') preprocessed, its affine, the original affine, header, original shape)`` of a file or
    a case's list of channel files (the first file's affine and header). A 2D model reads a single coronal or
    sagittal slice stored ``(X, 1, Z)`` / ``(1, Y, Z)`` as the 2D image it is: its original shape is the 2D one
    and its original affine has the columns in the order of the 2D axes (:func:`single_slice_as_2d`;
    :func:`single_slice_as_stored` with the header's :func:`single_slice_axis` gives the file's back).
    ``data.reorient`` applies to the spatial dims ``reorient_dims`` (the checkpoint's: a model trained before 2D
    reorientation saw 2D images in storage order, see :func:`medfast.data.preprocess.reorient_dims_of`)."""
    vol = load_image(entry)
    path = vol.path
    nd = config.model.spatial_dims
    data = vol.data
    file_affine = vol.affine
    if nd == 2 and data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    elif nd == 2 and data.ndim == 4 and single_slice_axis(data.shape[1:]) in (0, 1):
        # a coronal / sagittal slice, as the data set reads it for training (the flat axis's column last)
        file_affine = single_slice_as_2d(data[0], vol.affine)[1]
        data = np.ascontiguousarray(data.squeeze(single_slice_axis(data.shape[1:]) + 1))
    if data.ndim != nd + 1:
        shape = vol.header.get_data_shape()
        raise DatasetError(f"{path}: the model segments {nd}D images (model.spatial_dims={nd}) but this file is "
                           f"{data.ndim - 1}D (shape {tuple(shape)})")
    if data.shape[0] != config.model.in_channels:
        raise DatasetError(f"{path} has {data.shape[0]} channel(s) but the model takes "
                           f"model.in_channels={config.model.in_channels}")
    orig_aff = spatial_affine(file_affine, nd)
    orig_shape = list(data.shape[1:])
    aff = orig_aff
    if config.data.reorient and nd in reorient_dims:
        data, aff = reorient_to_ras(data, file_affine, channels=True)
        aff = spatial_affine(aff, nd)
    image = torch.from_numpy(data)
    if config.data.spacing is not None:
        image, aff = resample_to_spacing(image, aff, config.data.spacing)
    image = normalize_intensity(image, config.data.normalize, config.data.clip_percentiles)
    return image[None], aff, file_affine, vol.header, orig_shape


def _back_to_input(prob: torch.Tensor, aff: np.ndarray, orig_aff: np.ndarray, shape: list[int]) -> torch.Tensor:
    """Probabilities on the preprocessed grid -> the input grid (linear, via medfast.resample)."""
    from medfast.ops import resample

    if list(prob.shape[2:]) == shape and np.allclose(aff, orig_aff):
        return prob
    return resample(prob.contiguous(), aff, orig_aff, shape, mode="linear", padding="border")


def _input_entries(inputs: Sequence[ImageEntry], group: bool = True) -> list[str | list[str]]:
    """The cases to segment: each input file, a folder's NIfTI files, or (a list) one case's channel files;
    with ``group``, the files of a case stored one file per channel (nnU-Net's ``case_0000``, ``case_0001``,
    ...) given one by one or in a folder become one case (:func:`medfast.data.dataset.group_channel_files`).
    Raises :class:`DatasetError` for a missing input or an empty folder."""
    files: list[str] = []
    entries: list[str | list[str]] = []

    def flush() -> None:
        entries.extend(group_channel_files(files) if group else files)
        files.clear()

    for item in inputs:
        if not isinstance(item, (str, os.PathLike)):  # a case's channel files, as the data lists give them
            flush()
            entries.append(entry_files(item))
            continue
        path = Path(item)
        if path.is_dir():
            # not dot files (macOS AppleDouble "._case.nii.gz" companions are no NIfTI)
            found = sorted(str(p) for p in path.iterdir()
                           if _is_nifti_name(p.name) and not p.name.startswith(".") and p.is_file())
            if not found:
                raise DatasetError(f"no NIfTI files (*.nii, *.nii.gz) in the input folder {path}")
            files.extend(found)
        else:
            files.append(str(item))
    flush()
    return entries


_PREDICT_ADVICE = "rename one, or predict them into separate --out folders"


def _output_names(inputs: Sequence[ImageEntry], advice: str = _PREDICT_ADVICE) -> list[str]:
    """The case name of each input entry (see :func:`predict_files`); raises :class:`DatasetError` naming the
    inputs whose outputs would collide (ending with ``advice``), and missing inputs, before anything is
    computed."""
    seen: dict[str, str] = {}
    names = []
    for entry in inputs:
        for path in entry_files(entry):
            if not Path(path).is_file():
                raise DatasetError(f"input image not found: {path}")
        name = case_name(entry)
        if name in seen:
            raise DatasetError(f"inputs {seen[name]} and {entry_text(entry)} would both be written as "
                               f"{name}_seg.nii.gz (the output is named by the case name); {advice}")
        seen[name] = entry_text(entry)
        names.append(name)
    return names


def _refuse_overwriting_inputs(inputs: Sequence[ImageEntry], names: Sequence[str], out_dir: Path) -> None:
    """Raises :class:`DatasetError` naming ``out_dir`` (``--out``) when an output of ``predict_files``
    (``<name>_seg.nii.gz``, or ``<name>_prob.nii.gz``, written with probabilities and removed without) is one of
    the input files. With ``--out`` the input folder, ``case0``'s output overwrote an input named
    ``case0_seg.nii.gz``, which was then segmented as that output."""
    def identity(path: Path) -> tuple[int, int]:  # the same file under another path, link or letter case too
        st = path.stat()
        return st.st_dev, st.st_ino

    given = {identity(Path(f)): f for entry in inputs for f in entry_files(entry)}
    for entry, name in zip(inputs, names):
        for target in (out_dir / f"{name}_seg.nii.gz", out_dir / f"{name}_prob.nii.gz"):
            if target.is_file() and identity(target) in given:
                raise DatasetError(f"out_dir (--out) {out_dir}: {target.name}, the output of {entry_text(entry)}, "
                                   f"would overwrite the input {given[identity(target)]}; write the predictions "
                                   f"to another --out folder")


#: the settings ``medfast predict`` reads from a segmentation checkpoint's config (preprocessing and sliding window):
#: the only ones ``--set`` may change
PREDICT_SETTINGS = ("data.reorient", "data.spacing", "data.normalize", "data.clip_percentiles", "inference.roi_size",
                    "inference.overlap", "inference.blend", "inference.sw_batch_size")


def _check_predict_overrides(overrides: Sequence[str], config: Config) -> None:
    """``overrides`` (``--set``) may set only :data:`PREDICT_SETTINGS` (any other one was accepted and ignored:
    ``trainer.max_steps=-3``, ``optim.lr=-1``, ``inference.hd_percentile=500``), and their values pass the checks
    training runs on them; raises :class:`ConfigError` naming the keys."""
    from medfast.train.config import DataConfig, InferenceConfig, check_spatial_config, override_keys
    from medfast.train.config import check_config as check_shared

    keys = override_keys(overrides)  # (inference={overlap: 0.25} sets inference.overlap)
    unread = list(dict.fromkeys(k for k in keys if k not in PREDICT_SETTINGS))
    if unread:
        hd = ("; inference.hd_percentile is validation's: score predictions with medfast evaluate --percentile"
              if "inference.hd_percentile" in unread else "")
        raise ConfigError(f"overrides (--set) {', '.join(unread)}: medfast predict does not read "
                          f"{'it' if len(unread) == 1 else 'them'} (the network and the training settings are the "
                          f"checkpoint's{hd}); it reads {', '.join(PREDICT_SETTINGS)}")
    # the training checks of these keys on them alone: the checkpoint's other settings were checked when it was
    # trained (an older one may predate a check added since, which must not stop its predictions)
    d, inf = config.data, config.inference
    probe = config_from_dict({"task": "segmentation"})
    probe.model = config.model  # (the window against the network's depth, model.spatial_dims)
    probe.data = DataConfig(reorient=d.reorient, spacing=d.spacing, normalize=d.normalize,
                            clip_percentiles=d.clip_percentiles)
    probe.inference = InferenceConfig(roi_size=inf.roi_size, overlap=inf.overlap, blend=inf.blend,
                                      sw_batch_size=inf.sw_batch_size)
    check_shared(probe)
    check_spatial_config(probe)


def predict_files(checkpoint: str | Path, inputs: Sequence[ImageEntry], out_dir: str | Path, *,
                  device: str = "auto", overrides: Sequence[str] = (), save_probabilities: bool = False,
                  progress: bool = True, group_channels: bool = True) -> list[Path]:
    """Segments NIfTI files with a trained checkpoint and writes ``<name>_seg.nii.gz`` label maps with each
    input's affine and header (and ``<name>_prob.nii.gz`` class probabilities with ``save_probabilities``, classes
    on the 4th axis: ``(X, Y, Z, K)``, ``(X, Y, 1, K)`` for 2D inputs). ``<name>`` is the case name as the data
    loader pairs it with its label: the file name without ``.nii[.gz]`` (or ``.img`` / ``.hdr``) and without the
    nnU-Net channel suffix ``_0000`` (``case_007_0000.nii.gz`` -> ``case_007_seg.nii.gz``, so that
    ``medfast evaluate`` pairs it with ``labels/case_007.nii.gz``). Inputs whose outputs would have the same
    name raise :class:`DatasetError` naming them, before anything is written, as does an output that would
    overwrite one of the inputs (``out_dir`` the input folder holding ``case_seg.nii.gz`` beside ``case.nii.gz``).

    An input may be a folder (its ``.nii[.gz]`` files, the suffix in any case), or a list of one case's
    single-channel files. With ``group_channels`` and a model that takes several channels (``model.in_channels``
    > 1), the files of a case stored one file per channel, as nnU-Net stores them
    (``case_007_0000.nii.gz``, ``case_007_0001.nii.gz``, ...: given one by one or in a folder), are one case,
    its channels stacked in channel order, segmented into one ``case_007_seg.nii.gz`` with the affine and
    header of its ``_0000`` file; the channel files must share one grid (shape and affine), be numbered
    without gaps, and every such case have the same number of them (else :class:`DatasetError` names the case
    or file; a case with another number of channels than ``model.in_channels`` too). Without it, or for a
    one-channel model, each input file is one case (``scan_0000``, ``scan_0001``: two cases). Without
    ``save_probabilities``, an earlier run's ``<name>_prob.nii.gz`` beside a new ``<name>_seg.nii.gz`` is
    removed (it would no longer match).

    The input is preprocessed as in training (with ``data.reorient`` its axes flipped/permuted to the closest RAS
    orientation, 2D images to their in-plane frame's, see :class:`~medfast.data.NiftiDataset`; a checkpoint
    without ``"reorient_dims"``, written before 2D images were reoriented, keeps 2D images in storage order;
    resampled to ``data.spacing``, normalized),
    segmented with sliding windows, and the class probabilities are resampled back onto the input's grid
    (with :func:`medfast.resample`) before the argmax, so the output has exactly the input's shape and
    voxel-to-world affine, and the input's qform and sform (matrices and codes) are kept.

    ``overrides`` (``--set key=value``) may change only the settings predict reads, :data:`PREDICT_SETTINGS`
    (preprocessing and sliding window), checked as training checks them; any other key raises
    :class:`ConfigError` naming it.
    """
    from medfast.train.config import load_config
    from medfast.train.files import check_out_dir
    from medfast.train.trainer import check_weights_fit, load_checkpoint, load_model_state, resolve_device

    out_dir = check_out_dir(out_dir, "out_dir (--out)")
    state = load_checkpoint(checkpoint)
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise DatasetError(f"{checkpoint} has no config: not a checkpoint written by medfast train")
    task = state.get("task") or saved.get("task", "segmentation")
    if task != "segmentation":
        raise DatasetError(f"{checkpoint} is a checkpoint of the {task!r} task, not of segmentation")
    config = config_from_dict(saved)
    if overrides:
        import yaml

        config = load_config([], overrides, base=yaml.safe_load(yaml.safe_dump(saved)))
        _check_predict_overrides(overrides, config)
    # channel files are grouped only for a model that takes several channels: to a one-channel model,
    # scan_0000, scan_0001, ... are single-channel images (as in a data.train_images list), one case each
    inputs = _input_entries(inputs, group_channels and config.model.in_channels > 1)
    names = _output_names(inputs)
    _refuse_overwriting_inputs(inputs, names, out_dir)  # before anything is written (or an old _prob removed)
    for entry in inputs:
        if not isinstance(entry, str):
            image_header(entry)  # a case's channel files on one grid: checked (headers only) before any output
    dev = resolve_device(device, "--device")
    source = f" (in the config of {checkpoint}{' with the overrides' if overrides else ''})"
    # a window too large for any image (inference.roi_size [4096] * 3: 275 GB of weights) refused before the network
    # is built and the images are read
    check_window(config, device=dev, source=source)
    # the weights checked against the config's network on the meta device first: an edited config (channels
    # [4096, 8192]) built and initialised ~11 GB of parameters before the mismatch was found
    check_weights_fit(lambda: build_unet(config), state, checkpoint, config)
    with torch.random.fork_rng(devices=[]):  # the initialisation (replaced by the weights) leaves the caller's RNG
        model = build_unet(config)
    load_model_state(model, state, checkpoint, config)
    model.to(dev).eval()
    reorient_dims = reorient_dims_of(state)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    items = list(zip(inputs, names))
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="predict", disable=None)
    for path, name in items:
        image, aff, orig_affine, header, shape = _load_for_inference(path, config, reorient_dims)
        check_window(config, image.shape[2:], image.shape[0], dev, source)  # (this image's, naming the checkpoint)
        prob = predict_volume(model, image.to(dev), config)
        prob = _back_to_input(prob, aff, spatial_affine(orig_affine, config.model.spatial_dims), shape)
        labels = prob.argmax(1)[0].cpu().numpy()
        k = prob.shape[1]
        dtype = np.uint8 if k <= 255 else np.int16
        # a 2D prediction stored as the input: (X, Y, 1), or a coronal / sagittal slice's (X, 1, Z) / (1, Y, Z),
        # with the file's affine (its columns back in the file's order)
        stored = tuple(header.get_data_shape())
        axis = None
        if config.model.spatial_dims == 2:
            axis = single_slice_axis(stored)
            if axis not in (0, 1):
                axis = 2 if len(stored) >= 3 else None
        labels, file_affine = single_slice_as_stored(labels, orig_affine, axis)
        written.append(save_nifti(labels, file_affine, out_dir / f"{name}_seg.nii.gz", header, dtype,
                                  intent="label"))
        if save_probabilities:
            # classes on the 4th (non-spatial) axis: (X, Y, Z, K), and (X, Y, 1, K) for 2D inputs (a coronal /
            # sagittal slice: (X, 1, Z, K) / (1, Y, Z, K))
            p = np.moveaxis(prob[0].cpu().numpy(), 0, -1).astype(np.float32)
            if config.model.spatial_dims == 2:
                p = single_slice_as_stored(p, orig_affine, 2 if axis is None else axis)[0]
            written.append(save_nifti(p, file_affine, out_dir / f"{name}_prob.nii.gz", _class_axis_header(header),
                                      np.float32))
        else:
            # an earlier run's probabilities (another model, or another image of this name) no longer match
            (out_dir / f"{name}_prob.nii.gz").unlink(missing_ok=True)
    return written


def _class_axis_header(header: Any) -> Any:
    """A copy of ``header`` for a map whose 4th axis holds classes, not time: the 4th voxel size 1 and no time
    unit (an input's TR of 2.5 s and unit "sec" made viewers show the classes as a time series)."""
    out = header.copy()
    out["pixdim"][4] = 1.0
    if "xyzt_units" in out:  # (an Analyze header has none)
        out["xyzt_units"] = int(out["xyzt_units"]) & 7  # the spatial bits only (time: 8, 16, 24, 32, 40, 48)
    return out


@register_task("segmentation")
class SegmentationTask(Task):
    """Semantic segmentation of NIfTI volumes (or 2D images) into ``model.out_channels`` classes."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        check_config(config)
        from medfast.losses import DiceCELoss

        lc = config.loss
        # ddp_sync: under torchrun the batch Dice covers the micro-batch of all ranks (R x batch_size samples), as one
        # process with their batch would; never trainer.accumulate's micro-batches together (one loss each)
        self.loss_fn = DiceCELoss(include_background=lc.include_background, batch=lc.batch_dice,
                                  lambda_dice=lc.lambda_dice, lambda_ce=lc.lambda_ce, ddp_sync=lc.batch_dice)
        self.augment = RandomAugment(config.augment)
        self.num_classes = config.model.out_channels

    def build_model(self) -> nn.Module:
        return build_unet(self.config)

    def check_resume(self, state: dict[str, Any], path: Path) -> None:
        check_reorient_resume(self.config, state, path)

    def build_datasets(self):
        c = self.config
        d = c.data
        # data.root's channel files grouped as predict groups them: only for a model of several channels
        f = gather_files(c, task="segmentation", need_labels=True, min_subjects_to_split=2,
                         in_channels=c.model.in_channels)
        images, labels, val_images, val_labels = f.images, f.labels, f.val_images, f.val_labels
        # label values are checked against model.out_channels here, before training (naming the file)
        train = _dataset(c, images, labels, num_classes=c.model.out_channels)
        val = None
        if val_images:
            val = _dataset(c, val_images, val_labels, num_classes=c.model.out_channels)
        elif d.val_deformations > 0:
            val = DeformedDataset(train, d.val_deformations, RandomAugment(c.augment, geometric_only=True))
        self._check_test_files()
        return train, val

    def _check_test_files(self) -> None:
        """``data.test_images`` / ``data.test_labels`` (scored by :meth:`finish` after training) are checked as the
        training pairs are, before training: one label per image, readable files, each label on its image's grid
        (same shape and affine), images the model can segment, label values (after ``data.test_label_map``) below
        ``model.out_channels``, and no two test images whose predictions (``OUT/test/<case>_seg.nii.gz``) would
        have the same name. Raises :class:`DatasetError` naming the files."""
        c = self.config
        d = c.data
        if not d.test_images:
            if d.test_label_map:  # (after a data.dataset preset filled the lists: the shared checks ran before it)
                raise ConfigError("data.test_label_map relabels the test set's labels, but there is no test set "
                                  "(data.test_images, or one of data.dataset): it would be ignored; remove it")
            return
        if len(d.test_labels) != len(d.test_images):
            raise DatasetError(f"{len(d.test_images)} test images (data.test_images) but {len(d.test_labels)} test "
                               f"labels (data.test_labels): the test set is scored after training, one label per "
                               f"image")
        try:
            _dataset(c, d.test_images, d.test_labels, label_map=d.test_label_map, num_classes=c.model.out_channels)
            # finish() writes OUT/test/<case>_seg.nii.gz: colliding names would fail only after training
            _output_names(d.test_images, "rename or move one of them (the test predictions are all written to "
                                         "OUT/test/, named by the case)")
        except DatasetError as exc:
            raise DatasetError(f"test set (data.test_images / data.test_labels): {exc}") from None

    # -- steps ----------------------------------------------------------------------------------------
    def _loss(self, logits, label: torch.Tensor) -> torch.Tensor:
        if not isinstance(logits, (list, tuple)):
            return self.loss_fn(logits.float(), label)
        weights = self.config.loss.deep_supervision_weights or [0.5**i for i in range(len(logits))]
        total = 0.0
        for j, (w, out) in enumerate(zip(weights, logits)):
            target = label
            if out.shape[2:] != label.shape[1:]:
                # output j (full resolution first) is the UNet's level j: every level halves every axis (stride-2
                # convolutions; it pads to a multiple of 2^(levels-1) and crops ceil(S / 2^j)), so its voxel i sits
                # on input voxel 2^j * i along each axis. (ceil(S0 / out0) of the first axis for every axis compared
                # a 28-voxel patch's level 3 with label[::7], and failed on anisotropic patches; a nearest resize
                # took voxels up to 0.75 of a coarse voxel off.)
                step = 2**j
                target = label[(slice(None), *[slice(None, None, step)] * (label.dim() - 1))]
                if target.shape[1:] != out.shape[2:]:
                    raise ValueError(f"deep supervision output {j} of shape {tuple(out.shape[2:])} does not match "
                                     f"the label {tuple(label.shape[1:])} subsampled by {step} (2^{j}): "
                                     f"{tuple(target.shape[1:])}")
            total = total + w * self.loss_fn(out.float(), target)
        return total / sum(weights[: len(logits)])

    def training_step(self, model, batch, device):
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        seeds = batch.get("seed") or list(range(image.shape[0]))
        patch = self.config.augment.patch_size
        with torch.autocast(device.type, enabled=False):
            # a padded batch (subjects of different sizes): each patch drawn within its own subject, not the padding
            image, label = self.augment(image.float(), label, seeds, patch, shapes=batch.get("spatial_shape"))
        logits = model(image)
        loss = self._loss(logits, label)
        return loss, {}

    @torch.no_grad()
    def validation_step(self, model, batch, device):
        from medfast.metrics import hausdorff_distance
        from medfast.tasks.evaluation import case_dice, finite_mean, sheared_grid

        image = batch["image"].to(device)
        label = batch["label"].to(device)
        prob = predict_volume(model, image, self.config)
        pred = prob.argmax(1)
        k = self.num_classes
        # as medfast evaluate: 0 for a class in only one map (a false positive counts), NaN in neither
        d, n_pred, n_ref = case_dice(pred, label.reshape(pred.shape), k)
        nd = self.config.model.spatial_dims
        rows = []
        for b in range(image.shape[0]):
            spacing = voxel_spacing(batch["affine"][b].numpy()).tolist() if "affine" in batch else None
            row = {f"dice_{c + 1}": float(d[b, c]) for c in range(k - 1)}
            row["dice_mean"] = finite_mean(d[b].cpu().numpy())[0]  # NaN for a case with no class in either map
            if "affine" in batch and sheared_grid(batch["affine"][b].numpy(), nd):
                # a sheared grid (gantry tilt): distances from per-axis voxel sizes would be wrong there, so no HD,
                # as medfast evaluate scores it (the trainer's mean leaves the NaN out)
                row["hd95_mean"] = float("nan")
                rows.append(row)
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hd = hausdorff_distance(pred[b:b + 1], label[b:b + 1], self.config.inference.hd_percentile,
                                        spacing[:nd] if spacing else None, num_classes=k)[0]
            # a class in only one of prediction and reference counts as the image's diagonal in mm, as BraTS
            # scores it (a missed region must not improve the mean); a class in neither is left out.
            # (hausdorff_distance gives NaN, as MONAI, in both cases.)
            sizes = torch.tensor(pred.shape[1:], dtype=torch.float64)
            diagonal = float((sizes * torch.tensor(spacing[:nd] if spacing else [1.0] * nd)).norm())
            in_pred, in_ref = (n_pred[b] > 0).cpu(), (n_ref[b] > 0).cpu()
            scored = torch.where(in_pred & in_ref, hd.double().cpu(), diagonal)[in_pred | in_ref]
            row["hd95_mean"] = float(scored.mean()) if scored.numel() else float("nan")
            rows.append(row)
        return rows

    def save_samples(self, model, batch, device, path: Path) -> None:
        if not figures_enabled("medfast train"):  # (a one-line note, once) matplotlib is optional
            return
        image = batch["image"][:1].to(device)
        prob = predict_volume(model, image, self.config)
        pred = prob.argmax(1)[0].cpu()
        img = image[0, 0].float().cpu()
        lab = batch["label"][0]
        k = max(self.num_classes - 1, 1)
        if img.dim() == 3:
            views = [(f"axis {a}", lambda t, a=a: t.select(a, t.shape[a] // 2)) for a in range(3)]
        else:
            views = [("image", lambda t: t)]
        fig = new_figure(figsize=(9, 3 * len(views)))
        axes = fig.subplots(len(views), 3, squeeze=False)
        for row, (name, cut) in enumerate(views):
            for col, (title, lab_map) in enumerate([("image", None), ("label", lab), ("prediction", pred)]):
                ax = axes[row, col]
                ax.imshow(cut(img).T.numpy(), cmap="gray", origin="lower")
                if lab_map is not None:
                    m = cut(lab_map).T.float()
                    ax.imshow(np.ma.masked_where(m.numpy() == 0, m.numpy()), cmap="viridis", vmin=1, vmax=k,
                              alpha=0.5, origin="lower", interpolation="nearest")
                ax.set_title(f"{title} ({name})", fontsize=8)
                ax.axis("off")
        fig.suptitle(str(batch["files"][0])[-80:], fontsize=7)
        fig.tight_layout()
        save_figure(fig, path, dpi=100)

    def finish(self, model, device, out_dir: Path) -> dict[str, Any]:
        """Segments ``data.test_images`` (in their own space, as ``medfast predict`` does) and scores them
        against ``data.test_labels`` (relabelled by ``data.test_label_map``); on a sheared grid (voxel axes not at
        right angles) the HD95 is NaN, with a warning naming the label, as ``medfast evaluate`` scores it."""
        from medfast.metrics import hausdorff_distance
        from medfast.tasks.evaluation import _as_2d, _check_same_space, case_dice, finite_mean, scoring_spacing

        d = self.config.data
        if not d.test_images:
            return {}
        if len(d.test_labels) != len(d.test_images):
            raise DatasetError(f"{len(d.test_images)} test images but {len(d.test_labels)} test labels")
        ckpt = out_dir / "checkpoints" / "last.pt"
        # each entry is one case, as the data set read it (a list: one case's channel files)
        written = predict_files(ckpt, d.test_images, out_dir / "test", device=str(device), progress=False,
                                group_channels=False)
        segs = [p for p in written if p.name.endswith("_seg.nii.gz")]
        k = self.num_classes
        per_subject = []
        for img_path, lab_path, seg_path in zip(d.test_images, d.test_labels, segs):
            # a 2D map stored (X, Y, 1) is scored in 2D, as medfast evaluate does; the grids must be the same
            target = _as_2d(load_nifti(lab_path, label=True))
            pred_vol = _as_2d(load_nifti(seg_path, label=True))
            sheared = _check_same_space(pred_vol, target)
            if sheared:  # as medfast evaluate: distances from per-axis voxel sizes would be wrong there
                warnings.warn(f"{lab_path}: its voxel axes are not at right angles (a sheared grid, e.g. a CT with "
                              f"gantry tilt): Dice is scored, hd95_mm is NaN (resample the test image and label to "
                              f"a grid of right angles to score it)", stacklevel=2)
            pred = pred_vol.data
            t = target.data
            t = relabel(t, d.test_label_map)
            pt, tt = torch.from_numpy(pred)[None], torch.from_numpy(t)[None]
            dc = case_dice(pt, tt, k)[0][0]  # as medfast evaluate scores this prediction
            if sheared:
                hd = torch.full((k - 1,), math.nan)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    hd = hausdorff_distance(pt, tt, self.config.inference.hd_percentile, scoring_spacing(target),
                                            num_classes=k)[0]
            per_subject.append({"image": img_path, "label": lab_path, "prediction": str(seg_path),
                                "dice": [float(x) for x in dc], "dice_mean": finite_mean(dc.numpy())[0],
                                "hd95_mm": [float(x) for x in hd]})
        # a case with no foreground class in either map (NaN dice_mean) is left out of the mean, as validation
        # (the trainer's mean) and medfast evaluate's summary leave it out; test_dice_cases: the cases averaged
        mean, n = finite_mean([s["dice_mean"] for s in per_subject])
        res = {"test": per_subject, "test_dice_mean": mean, "test_dice_cases": n}
        # a class absent from both the prediction and the label has a NaN Dice: null (bare NaN is not JSON)
        (out_dir / "test_results.json").write_text(json_dumps(res, indent=2))

        def shown(image: ImageEntry) -> str:  # a case's channel files: shown by the case name
            return Path(image).name if isinstance(image, str) else case_name(image)

        print("medfast train: test Dice (foreground classes): " + "; ".join(
            f"{shown(s['image'])}: " + ", ".join(f"{x:.3f}" for x in s["dice"]) for s in per_subject), flush=True)
        return res
