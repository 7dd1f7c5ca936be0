"""The device a command runs on, from its ``--device`` / ``trainer.device`` setting: one rule for every command."""

from __future__ import annotations

import os

import torch

__all__ = ["cuda_kernels_usable", "resolve_device"]


def cuda_kernels_usable() -> bool:
    """A GPU is visible and medfast was built with its CUDA kernels (every medfast op a task runs needs them)."""
    if not torch.cuda.is_available():
        return False
    from medfast import _extension

    return _extension.cuda_kernels_built()


def local_cuda_index() -> int:
    """This process's GPU: ``LOCAL_RANK`` modulo the visible GPUs (torchrun sets ``LOCAL_RANK``)."""
    return int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())


def resolve_device(name: str, what: str, error: type[Exception]) -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK`` modulo the visible GPUs) where the CUDA kernels are usable,
    else the CPU; ``cpu``, ``cuda`` (this process's GPU) or ``cuda:N``. A bad name, a GPU that is not there, or a
    build without CUDA kernels raises ``error`` naming ``what`` (the setting or flag)."""
    if name == "auto":
        return torch.device("cuda", local_cuda_index()) if cuda_kernels_usable() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise error(f"{what}={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise error(f"{what}={name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise error(f"{what}={name!r} but no CUDA GPU is visible (use cpu or auto)")
        if not cuda_kernels_usable():
            raise error(f"{what}={name!r} but medfast was built without CUDA kernels (see `medfast info`; rebuild "
                        f"with a CUDA toolkit, or use cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise error(f"{what}={name!r} but only {torch.cuda.device_count()} CUDA GPU(s) are visible")
        if device.index is None:
            device = torch.device("cuda", local_cuda_index())
    return device
