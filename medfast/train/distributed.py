"""torchrun / torch.distributed helpers: process-group setup, rank queries, the subject sampler."""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from medfast._device import local_cuda_index  # noqa: F401 - D.local_cuda_index, this process's GPU
from medfast.ops._validate import py_scalar

__all__ = ["EpochSampler", "barrier", "init_distributed", "is_main", "rank", "world_size"]


def world_size() -> int:
    """Number of processes (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0: the process that logs, plots and writes checkpoints."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (``torch.distributed.barrier``); a no-op in a single process."""
    if world_size() > 1:
        dist.barrier()


BACKEND_ENV = "MEDFAST_DIST_BACKEND"


def backend_for(device_type: str) -> str:
    """The process-group backend: ``MEDFAST_DIST_BACKEND`` (``nccl`` or ``gloo``) if set, else NCCL on CUDA
    and gloo on the CPU. gloo on CUDA lets several processes share one GPU (a multi-process test on a
    one-GPU machine); NCCL needs a GPU per process and says so here instead of failing inside NCCL."""
    choice = os.environ.get(BACKEND_ENV, "").strip().lower()
    if choice and choice not in ("nccl", "gloo"):
        raise ValueError(f"{BACKEND_ENV} must be 'nccl' or 'gloo', got {choice!r}")
    backend = choice or ("nccl" if device_type == "cuda" else "gloo")
    if backend == "nccl" and device_type != "cuda":
        raise ValueError(f"{BACKEND_ENV}=nccl needs CUDA devices; this run is on {device_type}")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if backend == "nccl" and local > torch.cuda.device_count():
        raise ValueError(f"NCCL needs one GPU per process: {local} processes on this node, "
                         f"{torch.cuda.device_count()} GPU(s) visible; run fewer processes "
                         f"(torchrun --nproc_per_node) or set {BACKEND_ENV}=gloo to share GPUs")
    return backend


def init_distributed(device_type: str, timeout_min: float | None = None) -> bool:
    """Joins the process group described by torchrun's environment (``WORLD_SIZE`` > 1).

    gloo on the CPU, NCCL on CUDA (or ``MEDFAST_DIST_BACKEND``, see :func:`backend_for`). ``timeout_min``:
    how long a collective waits (the other ranks wait in a barrier while rank 0 evaluates the test set;
    NCCL's default is 10 minutes). Returns True when this call created the group. The group then lasts as long as
    the process (destroyed at exit): a trainer that destroyed it after its fit left a second fit without one
    (ValueError under torchrun), and a second trainer that created it anew could deadlock in its first collective.
    """
    if not dist.is_available() or dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = backend_for(device_type)
    if device_type == "cuda":
        torch.cuda.set_device(local_cuda_index())
    timeout = None if timeout_min is None else timedelta(minutes=timeout_min)
    dist.init_process_group(backend, timeout=timeout)
    atexit.register(_destroy_at_exit)
    return True


def _destroy_at_exit() -> None:
    if dist.is_initialized():
        with contextlib.suppress(Exception):  # (the interpreter is going: a failed rank must still exit)
            dist.destroy_process_group()


def _int(name: str, value: object) -> int:
    value = py_scalar(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return value


class EpochSampler(Sampler):
    """Distributed sampler over subjects yielding ``(index, seed)`` pairs, with full batches only.

    Each epoch takes a permutation of the ``n`` subjects (seeded by ``seed + epoch``), repeated (new
    permutations) until it holds a whole number of optimizer steps (``batch_size * num_replicas *
    accumulate`` samples), at least one, or cut to that; rank ``r`` takes positions ``r, r + R, r + 2R, ...``.
    So one process with batch ``R * b`` sees, step by step, the same subjects as ``R`` processes with batch
    ``b``, or as one process with batch ``b`` accumulating ``R`` micro-batches. Each sample's seed depends
    only on ``(seed, epoch, position)``, never on the rank count. ``start`` skips that many of this rank's
    samples (to resume mid-epoch). ``span`` epochs from ``epoch`` on are iterated as one stream (each epoch holds
    whole batches, so the batches are the same): a loader's workers then prefetch across epoch boundaries, which
    matters when an epoch is a batch or two (one subject, or a few).
    """

    def __init__(self, n: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, accumulate: int = 1) -> None:
        n, batch_size, num_replicas, rank, seed, accumulate = (
            _int(name, value) for name, value in (("n", n), ("batch_size", batch_size), ("num_replicas", num_replicas),
                                                  ("rank", rank), ("seed", seed), ("accumulate", accumulate)))
        if n < 1:
            raise ValueError("the dataset is empty: no subjects to sample")
        for name, value in (("batch_size", batch_size), ("num_replicas", num_replicas), ("accumulate", accumulate)):
            if value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas = {num_replicas}), got {rank}")
        self.n, self.batch_size, self.num_replicas, self.rank = n, batch_size, num_replicas, rank
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self.start = 0
        self.span = 1
        global_batch = batch_size * num_replicas * accumulate  # samples per optimizer step
        # Full batches only: drop the tail when there are enough subjects, repeat them when there are few.
        self.total = (n // global_batch) * global_batch if n >= global_batch else global_batch

    def set_epoch(self, epoch: int, start: int = 0, span: int = 1) -> None:
        epoch, start, span = _int("epoch", epoch), _int("start", start), _int("span", span)
        if span < 1 or start < 0 or epoch < 0:
            raise ValueError(f"epoch and start must be ints >= 0 and span an int >= 1, got {epoch}, {start}, {span}")
        self.epoch, self.start, self.span = epoch, start, span

    def batches_per_epoch(self) -> int:
        return self.total // (self.batch_size * self.num_replicas)

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order: list[int] = []
        while len(order) < self.total:
            order += torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
        return order[: self.total]

    def _epoch_samples(self, epoch: int) -> list[tuple[int, int]]:
        order = self._order(epoch)
        base = (self.seed * 1_000_003 + epoch) * 1_000_033
        return [(order[p], (base + p) % 2**62) for p in range(self.rank, self.total, self.num_replicas)]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        first = self._epoch_samples(self.epoch)[self.start:]
        return itertools.chain(first, *(self._epoch_samples(self.epoch + k) for k in range(1, self.span)))

    def __len__(self) -> int:
        return self.span * (self.total // self.num_replicas) - self.start
