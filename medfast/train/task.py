"""What the generic trainer needs from a task (segmentation, registration, ...), and the task registry.

A task wires a model, a loss, metrics and data together. The :class:`~medfast.train.Trainer` only calls
the methods below, so a new task (e.g. registration) plugs in by subclassing :class:`Task` in
``medfast/tasks/<name>.py`` and decorating it with ``@register_task("<name>")``; ``config.task`` then
selects it (:func:`get_task` imports ``medfast.tasks.<name>`` on first use).

Batches are dicts of tensors and lists made by :func:`medfast.data.collate`; every batch carries
``"files"`` (one string per sample, named in error messages) and ``"seed"`` (one int per sample: the seed
of its random augmentation, fixed by the run seed, the epoch and the sample's position in the epoch, so
that augmentation does not depend on the number of processes nor on resuming).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medfast.train.config import Config, ConfigError

__all__ = ["Task", "get_task", "register_task", "task_names"]

_TASKS: dict[str, type[Task]] = {}


class Task:
    """Base class of a task; subclasses override the methods that raise ``NotImplementedError``."""

    name = "task"

    def __init__(self, config: Config) -> None:
        self.config = config

    # -- building ---------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The network, on the CPU (the trainer moves it and wraps it for DDP)."""
        raise NotImplementedError

    def build_datasets(self) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None]:
        """``(train, validation or None)`` datasets; items are dicts (see :func:`medfast.data.collate`)."""
        raise NotImplementedError

    # -- steps ------------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> tuple[
        torch.Tensor, dict[str, float]
    ]:
        """Moves the batch to ``device``, augments it there, and returns ``(loss, metrics)``.

        ``loss`` is a scalar tensor to back-propagate (mean over the batch); ``metrics`` are floats shown in
        the progress bar and logs. Runs under the trainer's autocast context.
        """
        raise NotImplementedError

    @torch.no_grad()
    def validation_step(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> list[
        dict[str, float]
    ]:
        """Metrics of each sample of a validation batch (the trainer averages them, NaN-aware)."""
        raise NotImplementedError

    # -- optional hooks ---------------------------------------------------------------------------
    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """The batch of dataset ``items``: the training and validation loaders' ``collate_fn``, so it runs in the
        loader workers when ``data.num_workers`` > 0. :func:`medfast.data.collate` by default; a task may add what
        its steps would otherwise compute from the batch in the training process (on its critical path)."""
        from medfast.data import collate

        return collate(items)

    def optimizer_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]] | None:
        """Parameters stepped by separate optimizers, e.g. a GAN's discriminator and generator (optional).

        ``None`` (the default): one optimizer over all of ``model``'s parameters, and
        :meth:`training_step` is called as ``training_step(model, batch, device)``.

        A mapping ``{phase: parameters}`` (disjoint, non-empty groups, in stepping order): the trainer
        builds one optimizer and one learning-rate schedule per phase (each from ``config.optim``), and
        every optimizer step runs the phases in order on the same micro-batches: for each phase, its
        optimizer's gradients are zeroed, ``training_step(model, batch, device, phase=name)`` is called and
        back-propagated for every micro-batch, the phase's gradients are clipped and its optimizer steps.
        The logged ``loss`` is the last phase's; each phase's loss is also logged as ``loss_<phase>``.
        Checkpoints hold every optimizer and schedule (``"optimizers"``, ``"schedulers"``). Under DDP the
        model is wrapped with ``find_unused_parameters=True`` (a phase may leave other groups unused), so a
        phase's forward should be ONE call of ``model`` (the wrapper) that returns everything its loss needs.
        """
        return None

    def save_samples(self, model: nn.Module, batch: dict[str, Any], device: torch.device, path: Path) -> None:
        """Writes a PNG of sample predictions (optional)."""

    def finish(self, model: nn.Module, device: torch.device, out_dir: Path) -> dict[str, Any]:
        """Runs after training on rank 0 (e.g. test-set evaluation); returns results for ``results.json``."""
        return {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: makes a :class:`Task` subclass selectable as ``config.task = name``."""

    def deco(cls: type[Task]) -> type[Task]:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"register_task({name!r}) must decorate a Task subclass, got {cls!r}")
        cls.name = name
        _TASKS[name] = cls
        return cls

    return deco


def get_task(name: str) -> type[Task]:
    """The task class registered as ``name`` (importing ``medfast.tasks.<name>`` if needed); an unknown name
    raises :class:`~medfast.train.ConfigError` listing the tasks."""
    if not isinstance(name, str):
        raise ConfigError(f"task must be a string, got {type(name).__name__}")
    if name not in _TASKS and name.isidentifier():
        try:
            importlib.import_module(f"medfast.tasks.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"medfast.tasks.{name}":
                raise
    if name not in _TASKS:
        raise ConfigError(f"unknown task {name!r}; available: {', '.join(task_names()) or 'none'}")
    return _TASKS[name]


def task_names() -> list[str]:
    """Names of the tasks shipped in ``medfast.tasks`` plus any registered at run time (modules of
    ``medfast.tasks`` that register no task, such as ``evaluation``, are not tasks)."""
    import pkgutil

    import medfast.tasks

    for m in pkgutil.iter_modules(medfast.tasks.__path__):
        if m.name.startswith("_") or m.name in _TASKS:
            continue
        try:
            importlib.import_module(f"medfast.tasks.{m.name}")
        except ImportError:  # a task whose optional dependency is missing is not offered
            continue
    return sorted(_TASKS)
