"""The classification task for the generic trainer: ``config.task = "classification"`` trains a
:class:`~medfast.nets.SonoNet` or :class:`~medfast.nets.ResNetClassifier` on an :class:`ImageFolderDataset`.

Configuration (see ``configs/classification_example.yaml``):

* ``data.root``: folder of class subfolders (or the base of the CSV's paths); ``data.normalize``:
  ``zscore | minmax | none`` per image; ``data.shape``: the size images are resized to; ``data.val_fraction``
  (a seeded random split) and ``data.dataset_args``: ``csv_file``, ``classes`` (class order, needed for
  ordinal labels), ``channels``, ``val_root`` / ``val_csv_file`` (a separate validation set).
* ``model.name``: ``sononet`` or ``resnet``; ``model.spatial_dims``, ``model.in_channels``,
  ``model.out_channels`` = the number of classes, ``model.channels[0]`` = the width; ``model.kwargs``:
  ``encoding`` (``nominal | binary | ordinal``), ``blocks`` / ``convs_per_block``, ``dropout``, ``stem_stride``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from medfast.data import DatasetError, collate
from medfast.tasks.classification.data import ImageFolderDataset
from medfast.tasks.classification.encoding import make_encoder
from medfast.tasks.classification.losses import ClassificationLoss
from medfast.tasks.classification.metrics import classification_report, confusion_matrix, save_confusion_png
from medfast.train.config import Config
from medfast.train.task import Task, register_task

__all__ = ["ClassificationTask", "build_classifier", "predict_files"]


def build_classifier(config: Config) -> nn.Module:
    """The network described by ``config.model`` (``sononet`` or ``resnet``)."""
    from medfast.nets import ResNetClassifier, SonoNet

    m = config.model
    kw = dict(m.kwargs)
    encoding = kw.pop("encoding", "nominal")
    width = int(m.channels[0]) if m.channels else 16
    name = m.name.lower()
    if name == "sononet":
        if m.spatial_dims != 2:
            raise ValueError(f"model.name='sononet' is 2D; got model.spatial_dims={m.spatial_dims}")
        return SonoNet(m.in_channels, m.out_channels, encoding, width=width, **kw)
    if name == "resnet":
        return ResNetClassifier(m.spatial_dims, m.in_channels, m.out_channels, encoding, width=width, **kw)
    raise ValueError(f"model.name={m.name!r}: the classification task builds 'sononet' or 'resnet'")


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

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.encoding = config.model.kwargs.get("encoding", "nominal")
        self.num_classes = config.model.out_channels
        self.loss_fn = ClassificationLoss(self.encoding)
        self.encoder = make_encoder(self.encoding, self.num_classes)
        self.val_ds = None

    def build_model(self) -> nn.Module:
        return build_classifier(self.config)

    def _folder(self, root, csv_file) -> ImageFolderDataset:
        d, args = self.config.data, self.config.data.dataset_args
        return ImageFolderDataset(root, csv_file=csv_file, classes=args.get("classes"),
                                  spatial_dims=self.config.model.spatial_dims, size=d.shape,
                                  channels=args.get("channels"), normalize=d.normalize,
                                  file_column=args.get("file_column", "file"),
                                  label_column=args.get("label_column", "label"))

    def build_datasets(self):
        c, d = self.config, self.config.data
        args = d.dataset_args
        if d.root is None and not args.get("csv_file"):
            raise DatasetError("no training data: set data.root (class subfolders) or data.dataset_args.csv_file")
        full = self._folder(d.root, args.get("csv_file"))
        if len(full.classes) != self.num_classes:
            raise DatasetError(f"{args.get('csv_file') or d.root}: {len(full.classes)} classes {full.classes} but "
                               f"model.out_channels={self.num_classes}")
        self.encoder = make_encoder(self.encoding, self.num_classes, full.classes)
        args["classes"] = list(full.classes)  # saved with the checkpoint's config, for predict_files
        train, val = full, None
        if args.get("val_root") or args.get("val_csv_file"):
            val = self._folder(args.get("val_root"), args.get("val_csv_file"))
        elif d.val_fraction > 0 and len(full) > 1:
            order = np.random.default_rng(c.trainer.seed).permutation(len(full))
            n_val = max(1, int(round(len(full) * d.val_fraction)))
            val, train = _Subset(full, sorted(order[:n_val].tolist())), _Subset(full, sorted(order[n_val:].tolist()))
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

    def training_step(self, model, batch, device):
        image = batch["image"].to(device, non_blocking=True).float()
        label = batch["label"].to(device, non_blocking=True)
        logits = model(image)
        loss = self.loss_fn(logits, self._targets(label))
        pred, _ = self._predict(logits.detach())
        return loss, {"acc": float((pred == label.reshape(-1)).float().mean())}

    @torch.no_grad()
    def validation_step(self, model, batch, device):
        image = batch["image"].to(device).float()
        label = batch["label"].to(device).reshape(-1)
        logits = model(image)
        pred, _ = self._predict(logits)
        rows = []
        for i in range(label.shape[0]):
            ok = float(pred[i] == label[i])
            row = {"accuracy": ok, "loss": float(self.loss_fn(logits[i:i + 1], self._targets(label[i:i + 1])))}
            # per-class recall: NaN for the other classes, so the trainer's NaN-aware mean gives the recall
            for k, name in enumerate(self.encoder.class_names):
                row[f"recall_{name}"] = ok if int(label[i]) == k else float("nan")
            rows.append(row)
        return rows

    def finish(self, model, device, out_dir: Path) -> dict[str, Any]:
        """Full validation-set report (balanced accuracy, F1, AUC, per class) and ``confusion_matrix.png``."""
        if self.val_ds is None or len(self.val_ds) == 0:
            return {}
        was_training = model.training
        model.eval()
        preds, probs, labels = [], [], []
        loader = torch.utils.data.DataLoader(self.val_ds, batch_size=max(1, self.config.trainer.batch_size),
                                             collate_fn=collate)
        with torch.no_grad():
            for batch in loader:
                pred, prob = self._predict(model(batch["image"].to(device).float()))
                preds.append(pred.cpu())
                probs.append(prob.cpu())
                labels.append(batch["label"].reshape(-1))
        model.train(was_training)
        pred, prob, label = torch.cat(preds), torch.cat(probs), torch.cat(labels)
        k = self.num_classes
        report = classification_report(pred, label, k, prob)
        cm = confusion_matrix(pred, label, k)
        if self.config.trainer.plots:
            save_confusion_png(cm, Path(out_dir) / "confusion_matrix.png", self.encoder.class_names,
                               title=f"validation ({len(label)} images)")
        report = {key: (None if np.isnan(v) else v) for key, v in report.items()}
        report["confusion_matrix"] = cm.tolist()
        report["classes"] = list(self.encoder.class_names)
        (Path(out_dir) / "classification_report.json").write_text(json.dumps(report, indent=1))
        return {"classification": report}


def predict_files(checkpoint: str | Path, inputs, out_dir: str | Path, *, device: str = "auto",
                  overrides=(), save_probabilities: bool = True, progress: bool = False) -> list[Path]:
    """Classifies image files (PNG/NIfTI/DICOM) with a checkpoint of the classification task and writes
    ``predictions.csv``: one row per input with ``file``, the predicted ``class`` and ``index``, and (with
    ``save_probabilities``) ``p_<class>`` columns. Images are read, resized and normalized as in training.

    Returns
    -------
    list of Path
        ``[out_dir / "predictions.csv"]``.
    """
    import csv

    from medfast.tasks.classification.data import read_image
    from medfast.train.config import config_from_dict, load_config
    from medfast.train.trainer import load_checkpoint, resolve_device

    state = load_checkpoint(checkpoint)
    config = config_from_dict(state["config"])
    if overrides:
        import yaml

        config = load_config([], overrides, base=yaml.safe_load(yaml.safe_dump(state["config"])))
    task = ClassificationTask(config)
    names = config.data.dataset_args.get("classes") or [str(k) for k in range(task.num_classes)]
    task.encoder = make_encoder(task.encoding, task.num_classes, names)
    dev = resolve_device(device)
    model = build_classifier(config)
    model.load_state_dict(state["model"])
    model.to(dev).eval()
    # the training data set's item transform, applied to files outside it
    folder = ImageFolderDataset.__new__(ImageFolderDataset)
    folder.spatial_dims, folder.size = config.model.spatial_dims, config.data.shape
    folder.channels, folder.normalize = config.data.dataset_args.get("channels"), config.data.normalize
    folder.files, folder.labels = [Path(f) for f in inputs], [0] * len(inputs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with torch.no_grad():
        for i, f in enumerate(folder.files):
            read_image(f, folder.spatial_dims)  # clear error naming the file before anything else
            x = folder[i]["image"][None].to(dev)
            pred, prob = task._predict(model(x))
            row = {"file": str(f), "class": names[int(pred[0])], "index": int(pred[0])}
            if save_probabilities:
                row.update({f"p_{n}": round(float(p), 6) for n, p in zip(names, prob[0].tolist(), strict=True)})
            rows.append(row)
    path = out_dir / "predictions.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["file", "class", "index"])
        writer.writeheader()
        writer.writerows(rows)
    return [path]
