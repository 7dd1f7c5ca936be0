"""The generic training loop: DDP under torchrun, AMP, gradient accumulation, atomic checkpoints and exact
resume, progress bars, CSV/JSONL/TensorBoard logs, PNG curves, and a stop on a non-finite loss."""

from __future__ import annotations

import contextlib
import copy
import csv
import errno
import json
import math
import os
import random
import re
import socket
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from medfast._atomic import replacing
from medfast._device import resolve_device as _resolve_device
from medfast._figures import figures_enabled, new_figure, save_figure
from medfast._jsonsafe import dumps as json_dumps
from medfast._jsonsafe import json_ready
from medfast._signals import signals_deferred
from medfast.data.dataset import PREPROCESS_VERSION
from medfast.data.preprocess import REORIENT_DIMS
from medfast.train import distributed as D
from medfast.train.config import (
    Config,
    ConfigError,
    OptimConfig,
    check_choice_setting,
    check_config,
    config_from_dict,
    config_to_dict,
    save_config,
)
from medfast.train.files import (
    OutputError,
    check_out_dir,
    check_split_record,
    split_changes,
    split_identities,
    take_split,
)
from medfast.train.task import Task, get_task

__all__ = ["CheckpointError", "NonFiniteLossError", "Trainer", "load_checkpoint", "save_checkpoint", "train"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the batch's files."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not fit the run that loads it (another task, model or optimizer);
    the message names the file."""


# ------------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------------


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace`` (:func:`medfast._atomic.replacing`):
    a reader (or a resume after a crash) never sees a half-written checkpoint. Ctrl-C or SIGTERM during the write
    take effect once the checkpoint is in place."""
    with signals_deferred():
        return _save_checkpoint(state, path)


def _save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            try:
                torch.save(state, f)
            except RuntimeError as exc:  # a full disk surfaces as torch's "enforce fail ... unexpected pos"
                raise OSError(errno.ENOSPC if "unexpected pos" in str(exc) else errno.EIO,
                              f"cannot write the checkpoint ({exc})", str(path)) from exc
            f.flush()
            os.fsync(f.fileno())  # the data on disk before the rename makes it the checkpoint
    with contextlib.suppress(OSError):  # the rename itself (not possible on every file system)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


#: The temporary files of :func:`save_checkpoint`: ``replacing``'s ``.{pid}.{hex}.tmp.last.pt``, and the
#: ``.last.pt.{pid}.tmp`` of earlier versions (a run resumed by a newer medfast).
_PARTIAL_CHECKPOINTS = (".*.tmp.*.pt", ".*.pt.*.tmp")


def _remove_partial_checkpoints(ckdir: Path) -> None:
    """The temporary files of saves that a killed process never finished (each as large as a checkpoint)."""
    for pattern in _PARTIAL_CHECKPOINTS if ckdir.is_dir() else ():
        for tmp in ckdir.glob(pattern):
            with contextlib.suppress(OSError):
                tmp.unlink()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Reads a checkpoint written by the trainer (raises ``FileNotFoundError`` or :class:`CheckpointError`, a
    ``ValueError``, naming it)."""
    path = Path(path)
    if path.is_dir():
        # the checkpoints folder itself holds last.pt; a run's out_dir holds it under checkpoints/
        hint = path / "last.pt" if (path / "last.pt").is_file() else path / "checkpoints" / "last.pt"
        raise CheckpointError(f"checkpoint {path} is a folder; give a file such as {hint}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    _check_checkpoint_format(path)
    try:  # weights_only: tensors and plain values only; a pickled object (code run on load) is refused
        state = _load_weights_only(path, map_location)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"cannot read checkpoint {path} (not a checkpoint written by medfast train?): "
                              f"{load_failure(exc)}") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a medfast checkpoint (no 'model' entry)")
    if "config" in state and not isinstance(state["config"], dict):
        raise CheckpointError(f"{path}: its 'config' entry is a {type(state['config']).__name__}, not the mapping "
                              "medfast train writes (an edited or foreign checkpoint?)")
    bad = _bad_weight(state["model"])
    if bad is not None:  # NaN weights predicted all background without a word; a resume blamed the learning rate
        raise CheckpointError(f"{path} holds {bad[1]} weights ({bad[0]}): not a usable model")
    return state


def _check_checkpoint_format(path: Path) -> None:
    """Raises :class:`CheckpointError` when ``path`` is neither torch.save's zip archive (what medfast train writes)
    nor its legacy pickle format. torch.load reads any other file as a legacy pickle and fails with whatever the
    bytes happen to mean: a YAML config gave "IndexError: pop from empty list", a NIfTI image "holds pickled
    Python objects"."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:  # (unreadable: torch.load's attempt reports it, as before)
        return
    # (zip: the local file header "PK\x03\x04"; legacy torch.save: a pickle, which starts with the PROTO opcode)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return
    what = "an empty file" if not head else "not a file written by torch.save"
    raise CheckpointError(f"cannot read checkpoint {path}: it is not a medfast checkpoint ({what}; medfast train "
                          f"writes them as RUN/checkpoints/last.pt and step_XXXXXXX.pt)")


def _bad_weight(tree: Any, prefix: str = "") -> tuple[str, str] | None:
    """The first ``(name, what)`` of a floating tensor in ``tree`` (nested state dicts) that is complex or holds
    a NaN / infinite value; None when every one is finite and real."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            found = _bad_weight(value, f"{prefix}{key}.")
            if found is not None:
                return found
    elif isinstance(tree, torch.Tensor):
        if tree.is_complex():
            return prefix[:-1], "complex"
        if tree.is_floating_point() and not bool(torch.isfinite(tree).all()):
            return prefix[:-1], "non-finite"
    return None


def load_failure(exc: BaseException) -> str:
    """One line for a failed ``torch.load(weights_only=True)``. torch's own first line for a file holding pickled
    objects advises retrying with ``weights_only=False``, which runs whatever code the file holds: not advice to
    repeat for a file of unknown origin."""
    text = str(exc)
    if "Weights only load failed" in text:
        return ("it holds pickled Python objects, refused: loading them could run code (medfast checkpoints hold "
                "tensors and plain values only)")
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def _numpy_rng_globals() -> list[Any]:
    """The NumPy types of ``np.random.get_state()`` as pickled: an ndarray of uint32."""
    # ndarray's own pickle reconstructor: numpy._core.multiarray._reconstruct in NumPy 2, numpy.core's in 1.x
    # (there numpy._core is a shim whose .multiarray is not an attribute until imported)
    return [np.ndarray.__reduce__(np.zeros(1))[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _load_weights_only(path: Path, map_location: Any) -> Any:
    """``torch.load(weights_only=True)``; for a checkpoint written before NumPy's RNG state was stored as a tensor
    (2026-11-28), the same with exactly the NumPy types of that state allowed (still no code runs on load)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as first:  # noqa: BLE001 - retried once with the old checkpoints' NumPy types
        try:
            with torch.serialization.safe_globals(_numpy_rng_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception:  # noqa: BLE001 - not that case: the first error is the real cause (the caller names the file)
            raise first from None


def _stored_step(path: Path) -> int | None:
    """The ``step`` stored in the checkpoint ``path``, None if it cannot be read. Memory-mapped where possible
    (the tensors are then not read)."""
    for mmap in (True, False):  # (mmap needs torch.save's zip format)
        try:
            with torch.serialization.safe_globals(_numpy_rng_globals()):  # (the old checkpoints' NumPy RNG state)
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            return int(state["step"])
        except Exception:  # noqa: BLE001 - an unreadable or foreign file: not a checkpoint to continue
            continue
    return None


# ------------------------------------------------------------------------------------------------------
# the out_dir lock: one run at a time in a folder
# ------------------------------------------------------------------------------------------------------

LOCK_NAME = "train.lock"

#: this process's locked ``train.lock`` descriptor, None when it holds none. DataLoader workers are forked with a
#: copy of it, and a copy keeps the ``flock`` as long as any process holds one: after a kill -9 the run's workers
#: (which notice the dead parent only seconds later) kept the folder locked against an immediate --resume. The
#: workers close their copy (:func:`_close_lock_copy`, their ``worker_init_fn``).
_LOCK_FD: int | None = None

#: how long :func:`_lock_out_dir` waits for a lock whose recorded holder is dead on this host (a process forked
#: from it that did not close its copy, e.g. a worker of another loader, still holds it until it notices)
_DEAD_HOLDER_WAIT_S = 10.0


def _holder_is_dead(holder: str) -> bool:
    """True when ``holder`` (the lock file's ``pid N on HOST, ...``) names a process of this host that no longer
    exists; False when it is alive, on another host, or cannot be told."""
    m = re.match(r"pid (\d+) on (\S+?),", holder)
    if m is None or m.group(2) != socket.gethostname():
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # (PermissionError: alive, another user's)
        return False
    return False


def _close_lock_copy() -> None:
    """Closes a forked child's copy of this process's lock descriptor (only the copy: the lock stays the
    parent's, which still holds its own descriptor; no ``flock(LOCK_UN)``, which would release it for both)."""
    global _LOCK_FD
    if _LOCK_FD is not None:
        with contextlib.suppress(OSError):
            os.close(_LOCK_FD)
        _LOCK_FD = None


def _lock_out_dir(out_dir: Path) -> tuple[int, Path, list[Path]] | str:
    """Creates ``out_dir`` and takes an exclusive ``flock`` on ``out_dir/train.lock``, which names the holder
    (pid, host, start time). Returns ``(fd, lock file, folders created)`` for :func:`_unlock_out_dir`, or the
    message naming the holder when another process holds it. The kernel drops the lock when the holder dies
    (kill -9, a crash), so the file a dead run leaves blocks nothing (its DataLoader workers close their copies
    of the descriptor; a lock whose recorded holder is dead on this host is waited for up to
    ``_DEAD_HOLDER_WAIT_S`` seconds before it is refused). Without ``fcntl`` (Windows) no lock is taken (fd -1)."""
    global _LOCK_FD
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create trainer.out_dir (--out) {out_dir}: {exc.strerror or exc}") from None
    path = out_dir / LOCK_NAME
    try:
        import fcntl
    except ImportError:
        return -1, path, created
    deadline = None  # set when the holder is found dead: its lock is waited for until then
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot write in trainer.out_dir (--out) {out_dir}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.read(fd, 500).decode(errors="replace").strip()
            os.close(fd)
            if _holder_is_dead(holder):  # a killed run's leftover children still hold it: they end soon
                deadline = deadline or time.monotonic() + _DEAD_HOLDER_WAIT_S
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
            return (f"trainer.out_dir (--out) {out_dir} is in use by another medfast train ({holder or 'unknown'}; "
                    f"lock file {path}): two runs in one folder would mix their logs and checkpoints. Wait for it to "
                    f"end (then --resume continues it), or train into another folder (--out)")
        try:  # the holder unlinks the file when it ends: the file locked must still be the one at the path
            st, now = os.fstat(fd), os.stat(path)
            if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
             .encode())
    _LOCK_FD = fd
    return fd, path, created


def _unlock_out_dir(lock: tuple[int, Path, list[Path]]) -> None:
    """Removes the lock file (still holding the lock, so no other process locks the removed file) and releases
    it; the folders :func:`_lock_out_dir` created are removed again if the run wrote nothing in them."""
    global _LOCK_FD
    fd, path, created = lock
    with contextlib.suppress(OSError):
        path.unlink()
    if fd >= 0:
        if _LOCK_FD == fd:
            _LOCK_FD = None
        os.close(fd)
    for folder in created:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            break


def _config_differences(saved: Any, now: dict[str, Any], section: str, free: bool = False) -> list[str]:
    """``"section.key (A in the checkpoint, B now)"`` for the keys of ``section`` that differ; ``free``: a free
    mapping (``task_args``), whose keys set on one side only differ too (``not set`` on the other)."""
    old = saved.get(section) if isinstance(saved, dict) else None
    new = now.get(section) if isinstance(now, dict) else None
    if not isinstance(old, dict) or not isinstance(new, dict):
        return []
    unset = object()
    keys = sorted(set(old) | set(new), key=str) if free else [k for k in sorted(old) if k in new]

    def show(v: Any) -> str:
        return "not set" if v is unset else repr(v)

    return [f"{section}.{k} ({show(old.get(k, unset))} in the checkpoint, {show(new.get(k, unset))} now)"
            for k in keys if old.get(k, unset) != new.get(k, unset)]


#: the settings that draw the split of data.val_fraction (a permutation seeded by trainer.seed:
#: medfast.train.files.gather_files, the classification task's folders), as paths into the config
DRAW_SETTINGS = (("trainer", "seed"), ("data", "val_fraction"))
#: the settings that give the validation set as files
LIST_SETTINGS = (("data", "val_images"), ("data", "val_labels"), ("data", "dataset_args", "val_root"),
                 ("data", "dataset_args", "val_csv_file"))
#: the settings that decide which subjects are validation subjects; a resume with others would validate on
#: subjects the checkpoint trained on. A checkpoint that records its split's subjects (``state["split"]``) has
#: only the DRAW_SETTINGS compared: its subjects are compared with the split resolved now (Trainer._check_split),
#: so that a moved or respelled but identical validation set resumes
SPLIT_SETTINGS = DRAW_SETTINGS + LIST_SETTINGS


def _split_differences(saved: Any, now: dict[str, Any], keys: tuple = SPLIT_SETTINGS) -> list[str]:
    """``"data.val_fraction (A in the checkpoint, B now)"`` for the settings ``keys`` (default
    :data:`SPLIT_SETTINGS`) that differ between the checkpoint's config ``saved`` and ``now``. A setting whose
    section the checkpoint lacks is not compared (an older config layout); the validation lists that a built-in
    data set (``data.dataset``) fills under the run's own folder are not either (a resume into another ``--out``
    lists other paths for the same files)."""
    if not isinstance(saved, dict):
        return []
    unset = object()

    def show(v: Any) -> str:
        return "not set" if v is unset else repr(v)

    out = []
    for path in keys:
        if path[-1] in ("val_images", "val_labels") and now.get("data", {}).get("dataset") is not None:
            continue
        old, new = saved, now
        for k in path[:-1]:
            old = old.get(k) if isinstance(old, dict) else None
            new = new.get(k) if isinstance(new, dict) else None
        if not isinstance(old, dict) or not isinstance(new, dict):
            continue
        a, b = old.get(path[-1], unset), new.get(path[-1], unset)
        if a != b:
            out.append(f"{'.'.join(path)} ({show(a)} in the checkpoint, {show(b)} now)")
    return out


def _listed(names: list[str], most: int = 4) -> str:
    """The first ``most`` of ``names``, then how many more."""
    more = len(names) - most
    return ", ".join(names[:most]) + (f" and {more} more" if more > 0 else "")


def _load_error_line(exc: BaseException) -> str:
    """The first informative line of a ``load_state_dict`` error (its first missing, unexpected or size-mismatched
    tensor), not the header ``Error(s) in loading state_dict for X:`` that names none."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    body = [line for line in lines if not line.startswith("Error(s) in loading state_dict")]
    line = (body or lines or [repr(exc)])[0]
    head, sep, names = line.partition(": ")
    if sep and head.endswith("key(s) in state_dict"):  # 'Missing key(s) in state_dict: "a", "b", ...': the first
        first, _, rest = names.partition(", ")
        line = f"{head}: {first.rstrip('. ')}" + (f" and {rest.count(',') + 1} more" if rest else "")
    return line[:300]


def load_model_state(model: nn.Module, state: dict[str, Any], path: str | Path, config: Config | None = None) -> None:
    """``model.load_state_dict(state["model"])``, raising :class:`CheckpointError` naming the file (and the
    first tensor that does not fit, and the ``model.*`` and ``task_args`` settings that differ from ``config``)
    when the weights do not fit the network."""
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
        diff = []
        if config:  # the settings that shape the network: the model section and a task's own task_args
            now = config_to_dict(config)
            diff = (_config_differences(state.get("config"), now, "model")
                    + _config_differences(state.get("config"), now, "task_args", free=True))
        # the first tensor that does not fit always (a differing task_args key may shape no tensor: a loss weight)
        why = f": {_load_error_line(exc)}" + (f"; settings that differ: {', '.join(diff)}" if diff else "")
        raise CheckpointError(f"the weights in {path} do not fit the network of this run's config (another "
                              f"architecture){why}") from None


def check_weights_fit(build: Callable[[], nn.Module], state: dict[str, Any], path: str | Path,
                      config: Config | None = None) -> bool:
    """:func:`load_model_state` against the network ``build()`` makes on the meta device: the checkpoint's weights
    checked against the network's shapes before the real network is built (an edited config, channels
    [4096, 8192], built and initialised ~11 GB of parameters before the mismatch was found). Raises
    :class:`CheckpointError` as :func:`load_model_state` does; returns False (nothing checked) when the network
    cannot be built on the meta device, whose real build then reports its own error, True otherwise."""
    try:
        with torch.device("meta"):
            probe = build()
    except Exception:  # noqa: BLE001 - e.g. a build that computes with its tensors: the real build decides
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (copying into meta parameters is a no-op: only shapes)
        load_model_state(probe, state, path, config)
    return True


def _rng_state() -> dict[str, Any]:
    # NumPy's state as a tensor and plain values: a pickled ndarray would need torch.load(weights_only=False)
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------------
# optimizer / schedule / precision
# ------------------------------------------------------------------------------------------------------


def _unused_optim_setting(cfg, key: str, why: str) -> None:
    """ConfigError when ``optim.<key>`` differs from its default although ``why`` it is not used (it was ignored
    without a word, as a set-but-unused setting of the other sections is refused)."""
    default = getattr(OptimConfig(), key)
    if list(getattr(cfg, key)) != list(default) if isinstance(default, list) else getattr(cfg, key) != default:
        raise ConfigError(f"optim.{key}={getattr(cfg, key)!r} is not used: {why}; remove it from the config, or "
                          f"give its default, --set optim.{key}={default!r}")


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    name = check_choice_setting("optim.name", cfg.name)
    if name in ("adam", "adamw"):
        _unused_optim_setting(cfg, "momentum", f"optim.name={name!r} takes optim.betas (momentum is SGD's)")
    else:
        _unused_optim_setting(cfg, "betas", f"optim.name={name!r} takes optim.momentum (betas are Adam's)")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)


def build_scheduler(optimizer, cfg, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    name = check_choice_setting("optim.scheduler", cfg.scheduler)
    if name == "constant":
        _unused_optim_setting(cfg, "min_lr_ratio", "optim.scheduler='constant' has no floor to decay to")
    warm = max(0, cfg.warmup_steps)
    floor = cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, max_steps - warm))
        if name == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        if name == "poly":
            return floor + (1 - floor) * (1 - t) ** 0.9
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resolve_device(name: str, what: str = "trainer.device") -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK`` modulo the visible GPUs) where medfast's CUDA kernels are
    usable, else the CPU (:func:`medfast._device.resolve_device`). A bad name, a GPU that is not there, or under
    torchrun a ``cuda:N`` that is not this process's GPU raises :class:`ConfigError` naming ``what``."""
    device = _resolve_device(name, what, ConfigError)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and device.type == "cuda" and name != "auto" and device.index != D.local_cuda_index():
        # every rank would take GPU N (NCCL: "Duplicate GPU detected" inside DDP; gloo: one GPU shared silently)
        raise ConfigError(f"{what}={name!r} names one GPU for all {world} processes of this torchrun; use cuda or "
                          f"auto (each process takes GPU LOCAL_RANK % {torch.cuda.device_count()})")
    return device


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: full precision). Mixed precision is used on CUDA only."""
    name = check_choice_setting("trainer.amp", name)
    if device.type != "cuda" or name in ("none", "off", "fp32"):
        return None
    if name == "fp16":
        return torch.float16
    # auto: bfloat16 where the run's GPU computes it natively (compute capability 8.0+), else float16 with loss
    # scaling (torch.cuda.is_bf16_supported() counts emulation, True on a V100 / T4, and asks the current GPU)
    if name == "bf16" or torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return torch.float16


# ------------------------------------------------------------------------------------------------------
# logging
# ------------------------------------------------------------------------------------------------------


class _Log:
    """Rows appended to ``<name>.jsonl`` and ``<name>.csv``; on resume, rows after the checkpoint are cut. A
    NaN metric (e.g. the recall of a class absent from the validation set) is stored as None: ``null`` in the
    JSONL (bare ``NaN`` is not JSON), an empty cell in the CSV."""

    def __init__(self, out_dir: Path, name: str) -> None:
        self.jsonl = out_dir / f"{name}.jsonl"
        self.csv = out_dir / f"{name}.csv"
        self.rows: list[dict[str, Any]] = []
        self._keys: list[str] = []  # the CSV's columns: a row with another key rewrites it, once

    def restore(self, upto_step: int | None) -> None:
        rows = []
        if self.jsonl.is_file():
            for line in self.jsonl.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    rows.append(json.loads(line))
        self.rows = [r for r in rows if upto_step is not None and r.get("step", 0) <= upto_step]
        self._rewrite()

    def _rewrite(self) -> None:
        self.jsonl.write_text("".join(json_dumps(r) + "\n" for r in self.rows))
        self._write_csv()

    def _write_csv(self) -> None:
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        with open(self.csv, "w", newline="", encoding="utf-8") as f:  # metric names hold class names
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)
        self._keys = keys

    def append(self, row: dict[str, Any]) -> None:
        row = json_ready(row)  # NaN as None, also in the rows kept for the CSV and the curves
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json_dumps(row) + "\n")
        # compared with the CSV's columns, not the first row: a run resumed from a log without a newer column
        # (data_seconds) rewrote the whole CSV at every step
        if set(row) - set(self._keys):  # (also the first row: no columns yet)
            self._write_csv()
        else:
            with open(self.csv, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, fieldnames=self._keys, extrasaction="ignore").writerow(row)


def metric_order(key: str) -> list[Any]:
    """Sort key of metric names in class order: the digit runs compared as numbers (``dice_2`` before
    ``dice_10``; a plain sort put ``dice_1, dice_10, dice_100, ...`` first with 11 or more classes)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", key)]


#: Per-class curves of one panel drawn thin and unlabelled past this many (the means stay labelled): 117 labelled
#: lines made a legend taller than the figure.
_LABELLED_CURVES = 10


def plot_curves(train_rows: list[dict], val_rows: list[dict], path: Path) -> Path | None:
    """PNG of the training loss (raw and smoothed) and of the validation metrics against the step; metrics
    sharing a prefix (``dice_1``, ``dice_mean``, ...) share a panel."""
    if not figures_enabled("medfast train"):  # (a one-line note, once) matplotlib is optional
        return None
    metrics = sorted({k for r in val_rows for k in r if k not in ("step", "epoch", "time")}, key=metric_order)
    groups: dict[str, list[str]] = {}
    for key in metrics:
        groups.setdefault(key.split("_")[0], []).append(key)
    names = list(groups)[:4]
    n = 1 + len(names)
    fig = new_figure(figsize=(4.4 * n, 3.4))
    axes = fig.subplots(1, n, squeeze=False)
    ax = axes[0, 0]
    steps = [r["step"] for r in train_rows]
    loss = np.array([r["loss"] for r in train_rows], dtype=float)
    if len(loss):
        ax.plot(steps, loss, alpha=0.35, lw=0.8, label="loss")
        k = max(1, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=1.6, label=f"mean of {k}")
        ax.set_yscale("log" if np.all(loss > 0) and loss.max() / max(loss.min(), 1e-12) > 20 else "linear")
    ax.set_xlabel("step")
    ax.set_title("training loss")
    ax.legend(fontsize=8)
    for ax, name in zip(axes[0, 1:], names):
        many = len(groups[name]) > _LABELLED_CURVES
        for key in groups[name]:
            pts = [(r["step"], r[key]) for r in val_rows if r.get(key) is not None]
            if not pts:
                continue
            if key.endswith("mean"):
                ax.plot(*zip(*pts), "o-", label=key, lw=2.2, zorder=3)
            elif many:  # one thin grey line per class, no legend entry
                ax.plot(*zip(*pts), "-", color="0.6", lw=0.6, alpha=0.6)
            else:
                ax.plot(*zip(*pts), "o-", label=key, lw=1.0)
        ax.set_xlabel("step")
        ax.set_title(f"validation {name}" + (f" ({len(groups[name])} curves; grey: per class)" if many else ""))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return path


def _validation_worker_init(worker_id: int) -> None:
    """The validation loader's workers: only the lock descriptor's copy closed (see ``_LOCK_FD``); their RNGs
    are left as they were (no reseeding: validation draws as before)."""
    _close_lock_copy()


def _mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r}, key=metric_order)
    out = {}
    for k in keys:
        vals = [float(r[k]) for r in rows if k in r and r[k] is not None and math.isfinite(float(r[k]))]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out


def _worker_init(worker_id: int) -> None:
    _close_lock_copy()  # (the training loader's workers: see _LOCK_FD)
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32 if info is not None else worker_id
    np.random.seed(seed)
    random.seed(seed)


# ------------------------------------------------------------------------------------------------------
# trainer
# ------------------------------------------------------------------------------------------------------


class Trainer:
    """Trains ``task``'s model as described by ``config`` (see :class:`medfast.train.Config`).

    Runs alone or under ``torchrun`` (DDP: gloo on CPU, NCCL on CUDA; each rank a slice of every global
    batch; rank 0 logs and writes checkpoints). One *step* is one optimizer update, i.e. ``accumulate``
    micro-batches of ``batch_size`` subjects per process. The data position, the learning rate and each
    sample's augmentation seed are functions of the step, so a run resumed from a checkpoint computes the
    same losses as an uninterrupted one.

    Outputs under ``trainer.out_dir``: ``config.yaml`` (the configuration as given: files merged, overrides
    applied; not the file lists a ``data.dataset`` preset fills in, so that training from it rebuilds the data
    set; a resume with other settings first keeps the earlier file as ``config_stepXXXXXXX.yaml``, named by the
    resumed step), ``train_log.{jsonl,csv}``, ``val_log.{jsonl,csv}``, ``checkpoints/step_XXXXXXX.pt`` and
    ``checkpoints/last.pt``, ``curves.png``, ``samples_stepXXXXXXX.png``, ``results.json``, and
    ``tensorboard/`` when TensorBoard is installed; ``train.lock`` while :meth:`fit` runs (one run at a time
    in a folder).
    """

    def __init__(self, config: Config, task: Task | None = None) -> None:
        self.config = config
        check_config(config)  # the shared settings, before the task (its own) and before any data is read
        self.task = task if task is not None else get_task(config.task)(config)
        # what OUT/config.yaml holds: the config before _setup, whose data sets fill the lists of a data.dataset
        # preset with files under this out_dir (a task's own resolution in its constructor is kept, e.g.
        # synthesis' absolute source path)
        self._given_config = copy.deepcopy(config)
        tc = config.trainer
        try:
            self.out_dir = check_out_dir(tc.out_dir, "trainer.out_dir (--out)")
        except OutputError as exc:
            raise ConfigError(str(exc)) from None
        self.device = resolve_device(tc.device)
        self.amp_dtype = resolve_amp(tc.amp, self.device)
        D.init_distributed(self.device.type, self.config.trainer.dist_timeout_min)  # (kept until the process exits)
        self.rank, self.world = D.rank(), D.world_size()
        self._run_checkpoints: dict[str, int] = {}  # step_*.pt of this run (and of the run it resumes): pruned
        self.step = 0
        # where the data stream started: (step, global micro-batch); the checkpoints' micro_batches follow from it
        self._data_start = (0, 0)
        self._saved_step: int | None = None  # the step of the newest checkpoint in out_dir/checkpoints, where known
        self._saved_path: Path | None = None  # that checkpoint
        self._resume_step: int | None = None  # the step stored in the checkpoint _resume_path chose
        self._lock: tuple[int, Path, list[Path]] | None = None  # rank 0's lock on out_dir (see _lock_out_dir)
        self._tb = None
        self._tb_purge = 0  # TensorBoard events from this step on are dropped (those of an interrupted run)
        self._stop_row = False  # whether the train log's row at self.step was logged only because the run stopped
        self._train_loader: torch.utils.data.DataLoader | None = None  # one per fit (see _loader)
        self._val_loader: torch.utils.data.DataLoader | None = None
        self._split: dict[str, list[list]] | None = None  # the subjects of the split (see _setup, _check_split)

    # -- setup ----------------------------------------------------------------------------------------
    def _seed(self) -> None:
        seed = self.config.trainer.seed + self.rank  # per-rank seed of the global generators
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        # explicitly both ways: a process that enabled it before (an earlier fit, the user) must not make a
        # ``deterministic: false`` run deterministic; fit() restores the caller's setting afterwards
        det = self.config.trainer.deterministic
        torch.use_deterministic_algorithms(bool(det), warn_only=det == "warn")

    def _setup(self) -> None:
        tc = self.config.trainer
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self._seed()
        try:
            model = self.task.build_model()
        except (ValueError, TypeError) as exc:  # a network argument the task passed on from model.*: name it
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"model: the network cannot be built from this config's model settings: {exc}") from exc
        model = model.to(self.device)
        self.model = model
        groups = self._optimizer_groups(model)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                           find_unused_parameters=None not in groups)
        else:
            self.ddp = model
        # one optimizer and schedule per phase; phase None = the single optimizer of most tasks
        try:
            self.optimizers = {ph: build_optimizer(params, self.config.optim) for ph, params in groups.items()}
            self.schedulers = {ph: build_scheduler(opt, self.config.optim, tc.max_steps)
                               for ph, opt in self.optimizers.items()}
        except ValueError as exc:  # torch's own checks of a value check_config let through: name the section
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"optim: the optimizer cannot be built from this config's optim settings "
                              f"(optim.name={self.config.optim.name!r}): {exc}") from exc
        self.phases = list(groups)
        self.optimizer, self.scheduler = self.optimizers[self.phases[0]], self.schedulers[self.phases[0]]
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        cfg = getattr(self.task, "config", self.config)  # (where gather_files / the task leave the split)
        take_split(cfg)  # (one a caller's own gather_files left: a task that resolves none records none)
        self.train_ds, self.val_ds = self.task.build_datasets()
        resolved = take_split(cfg)
        # the subjects by file name and size, stored in the checkpoints: a resume compares the split it resolves
        self._split = None if resolved is None else split_identities(*resolved)
        self.sampler = D.EpochSampler(len(self.train_ds), tc.batch_size, self.world, self.rank, tc.seed,
                                      accumulate=tc.accumulate)
        self.batches_per_epoch = self.sampler.batches_per_epoch()

    def _optimizer_groups(self, model: nn.Module) -> dict[str | None, list[nn.Parameter]]:
        """The task's parameter groups (see :meth:`Task.optimizer_groups`), checked; ``{None: all}`` by default."""
        groups = self.task.optimizer_groups(model)
        if groups is None:
            return {None: list(model.parameters())}
        if not isinstance(groups, dict) or not groups:
            raise ValueError(f"{type(self.task).__name__}.optimizer_groups must return None or a non-empty dict "
                             f"{{phase: parameters}}, got {groups!r}")
        out: dict[str | None, list[nn.Parameter]] = {}
        seen: set[int] = set()
        for name, params in groups.items():
            params = list(params)
            if not isinstance(name, str) or not name or not params:
                raise ValueError(f"optimizer group {name!r}: phases need a non-empty name and parameters")
            if seen & {id(q) for q in params}:
                raise ValueError(f"optimizer group {name!r} shares parameters with an earlier group")
            seen |= {id(q) for q in params}
            out[name] = params
        return out

    def _loader(self, epoch: int, start_batch: int, span: int = 1):
        """The training loader, its sampler set to ``span`` epochs from ``epoch``, batch ``start_batch``, on.

        One DataLoader serves the whole fit and, with ``data.num_workers > 0``, its workers persist across epochs:
        what a worker caches (``data.cache: memory``) is kept, so each subject is read and preprocessed at most once
        per worker process instead of once per epoch in every worker. The batches are those of ``num_workers=0``:
        the sampler (in this process) gives each epoch's order and every sample's augmentation seed, and the
        batches come back in order. The workers' global RNGs are seeded once per fit from ``trainer.seed`` and the
        rank (``_worker_init``); the data sets draw from per-sample seeds, not from them."""
        tc, dc = self.config.trainer, self.config.data
        self.sampler.set_epoch(epoch, start_batch * tc.batch_size, span)  # read when the loader is iterated
        if self._train_loader is None:
            g = torch.Generator().manual_seed(tc.seed * 7919 + self.rank * 104729)
            self._train_loader = torch.utils.data.DataLoader(
                self.train_ds, batch_size=tc.batch_size, sampler=self.sampler, collate_fn=self.task.collate,
                num_workers=dc.num_workers, worker_init_fn=_worker_init, generator=g,
                persistent_workers=dc.num_workers > 0, pin_memory=self.device.type == "cuda",
            )
        return self._train_loader

    def _validation_loader(self, ds: torch.utils.data.Dataset):
        """The validation loader, one per fit (persistent workers, as :meth:`_loader`'s). Like a new DataLoader
        without a generator, each validation draws one number from the global torch RNG (a new iterator's worker
        base seed; the persistent iterator draws it only once, so here it is drawn for it): the global RNG stream
        after a validation (dropout, noise in the training steps) is the same for every ``data.num_workers``."""
        workers = self.config.data.num_workers
        if self._val_loader is None:
            self._val_loader = torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=self.task.collate,
                                                           num_workers=workers, persistent_workers=workers > 0,
                                                           worker_init_fn=_validation_worker_init)
        elif workers > 0:
            torch.empty((), dtype=torch.int64).random_()
        return self._val_loader

    def _close_loaders(self) -> None:
        """Ends the persistent workers of this fit's loaders (also after an error or Ctrl-C, whose traceback may
        still hold the batch stream) and drops the loaders, so a later fit starts from its own data sets."""
        for loader in (self._train_loader, self._val_loader):
            iterator = getattr(loader, "_iterator", None)  # the persistent workers' iterator (torch's, private)
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        self._train_loader = self._val_loader = None

    # Batches per loader iteration at least: epochs are iterated in spans that hold this many, so that the
    # workers prefetch across epoch boundaries. With an epoch of one batch (one subject: the tissue demo) every
    # batch's loading otherwise starts only when the step asks for it.
    SPAN_BATCHES = 32

    def _micro_batches(self, start_micro: int):
        """Endless (epoch, batch) stream starting at global micro-batch ``start_micro``; the same batches in the same
        order whatever the span of epochs one loader iteration covers."""
        per_epoch = self.batches_per_epoch
        span = max(1, -(-self.SPAN_BATCHES // per_epoch))
        epoch, offset = divmod(start_micro, per_epoch)
        while True:
            for k, batch in enumerate(self._loader(epoch, offset, span)):
                yield epoch + (offset + k) // per_epoch, batch
            epoch, offset = epoch + span, 0

    # -- checkpoint -----------------------------------------------------------------------------------
    def _state(self, epoch: int) -> dict[str, Any]:
        return {
            "format": "medfast-checkpoint-1",
            "task": self.config.task,
            "config": config_to_dict(self.config),
            # the spatial dims data.reorient reorients: a checkpoint without the key predates 2D reorientation,
            # so inference keeps 2D images in storage order for it, as its network was trained
            "reorient_dims": list(REORIENT_DIMS),
            # what preprocessing made of the subjects (medfast.data.dataset.PREPROCESS_VERSION): a task can tell a
            # checkpoint trained on other inputs (a resume would change them mid-run)
            "preprocess_version": PREPROCESS_VERSION,
            "model": self.model.state_dict(),
            **self._optimizer_state(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "stop_row": self._stop_row,  # the train log's row at this step is a stop's (see _fit)
            "epoch": epoch,
            "micro_batches": self._micro_batches_done(),
            # the length of the training set whose epochs micro_batches counts: a resume with another length
            # (another data set, a task's samples_per_epoch) starts the next epoch instead of re-dividing the count
            "train_size": len(self.train_ds),
            "world_size": self.world,
            "rng": _rng_state(),
            # the training and validation subjects ([file name, size]): a resume refuses another validation set,
            # e.g. data.val_fraction's split drawn over a data.root that gained a subject (_check_split)
            **({"split": self._split} if self._split is not None else {}),
        }

    def _micro_batches_done(self) -> int:
        """The global micro-batches of this run's sampler taken so far: where a resume's data continues."""
        step0, micro0 = self._data_start
        return micro0 + (self.step - step0) * self.config.trainer.accumulate

    def _resume_micro_batch(self, state: dict[str, Any]) -> int:
        """The global micro-batch of this run's sampler at which the data continues after the checkpoint ``state``.

        The checkpoint's ``micro_batches`` counts micro-batches of its run (``batch_size`` x processes samples,
        epochs of that run's length). With the same ``trainer.batch_size``, ``trainer.accumulate`` and number of
        processes it is used as it is (the exact resume). With others, the run continues at the checkpoint's
        position in its epoch: every such run draws the same permutation of the subjects in an epoch (each run's
        epoch is a prefix of it, cut to whole steps), so no sample is skipped or repeated, except that a position
        inside this run's micro-batch is rounded up to the next (skipping fewer than ``batch_size`` x processes
        samples, said in a message), and one past this run's (shorter) epoch starts the next epoch.

        With a training set of another length than the checkpoint's (its ``train_size``: another data set, or
        a task setting such as ``samples_per_epoch``) the epochs' permutations differ, so the run continues at
        the start of the epoch after the checkpoint's, said in a message (a checkpoint without ``train_size``
        is taken to have this run's length).
        """
        tc = self.config.trainer
        if "micro_batches" not in state:  # written before micro_batches was stored: step * accumulate
            return self.step * tc.accumulate
        micro = int(state["micro_batches"])
        saved = (state.get("config") or {}).get("trainer") or {}
        old = (int(saved.get("batch_size", tc.batch_size)), int(saved.get("accumulate", tc.accumulate)),
               int(state.get("world_size", self.world)))
        new = (tc.batch_size, tc.accumulate, self.world)
        size, old_size = len(self.train_ds), int(state.get("train_size", len(self.train_ds)))
        if old_size != size:  # micro counts the old epochs: a position in them is none in this run's
            batch, accumulate, world = old
            old_epoch = D.EpochSampler(old_size, batch, world, accumulate=accumulate).batches_per_epoch()
            epoch = -(-micro // old_epoch)  # the next epoch's start (the checkpoint's position, at an epoch's end)
            if self.rank == 0:
                print(f"medfast train: the checkpoint was trained on {old_size} training sample(s) per epoch, this "
                      f"run has {size}: the data continues at the start of epoch {epoch}", flush=True)
            return epoch * self.batches_per_epoch
        if old == new:
            return micro
        batch, accumulate, world = old
        old_epoch = D.EpochSampler(len(self.train_ds), batch, world, accumulate=accumulate).batches_per_epoch()
        epoch, offset = divmod(micro, old_epoch)
        sample = offset * batch * world  # position in the epoch's permutation
        unit = tc.batch_size * self.world
        start = -(-sample // unit)
        skipped = start * unit - sample
        why = "to start on a whole batch"
        if start >= self.batches_per_epoch:  # past the end of this run's (shorter) epoch
            # (the rest of the old epoch that this run's epoch holds is skipped too: say so)
            epoch, start, skipped = epoch + 1, 0, max(0, self.batches_per_epoch * unit - sample)
            why = "at the end of the epoch, less than this run's batch"
        if self.rank == 0:
            note = f", skipping {skipped} sample(s) {why}" if skipped else ""
            print(f"medfast train: the checkpoint was trained with batch_size x accumulate x processes = "
                  f"{' x '.join(map(str, old))}, this run {' x '.join(map(str, new))}: the data continues at "
                  f"epoch {epoch}, sample {start * unit} of the epoch{note}", flush=True)
        return epoch * self.batches_per_epoch + start

    def _optimizer_state(self) -> dict[str, Any]:
        if self.phases == [None]:
            return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        return {"optimizers": {ph: opt.state_dict() for ph, opt in self.optimizers.items()},
                "schedulers": {ph: sch.state_dict() for ph, sch in self.schedulers.items()}}

    def _load_optimizer_state(self, state: dict[str, Any], path: Path) -> None:
        saved_name = ((state.get("config") or {}).get("optim") or {}).get("name")
        if isinstance(saved_name, str) and saved_name.lower() != self.config.optim.name.lower():
            raise CheckpointError(f"{path} was trained with optim.name={saved_name!r} but this run has "
                                  f"optim.name={self.config.optim.name!r}: its optimizer state cannot be resumed "
                                  f"with another optimizer; resume with optim.name={saved_name!r}, or train a new "
                                  f"run (without --resume)")
        if self.phases == [None]:
            if "optimizer" not in state:
                raise CheckpointError(f"{path} holds the optimizers of phases "
                                      f"{sorted(state.get('optimizers') or {})}; task {self.config.task!r} has one "
                                      f"optimizer")
            pairs = [(self.optimizer, state["optimizer"], self.scheduler, state.get("scheduler"))]
        else:
            saved = state.get("optimizers")
            if saved is None or set(saved) != set(self.phases):
                have = sorted(saved) if saved is not None else "one optimizer"
                raise CheckpointError(f"{path} holds {have}; task {self.config.task!r} needs optimizers "
                                      f"{self.phases}")
            scheds = state.get("schedulers") or {}
            pairs = [(self.optimizers[ph], saved[ph], self.schedulers[ph], scheds.get(ph)) for ph in self.phases]
        for optimizer, opt_state, scheduler, sched_state in pairs:
            # this run's hyper-parameters (optim.lr, weight_decay, betas, momentum: the ones its optimizer and
            # schedule were built with), which load_state_dict would replace by the saved run's: a changed optim.lr
            # was ignored on resume while config.yaml recorded it
            settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
            base_lrs = list(scheduler.base_lrs)
            try:
                optimizer.load_state_dict(opt_state)
                if sched_state is None:
                    raise KeyError("scheduler")
                scheduler.load_state_dict(sched_state)
                for group, setting in zip(optimizer.param_groups, settings):
                    group.update(setting)
                scheduler.base_lrs = base_lrs
                # The learning rate is a function of the step: this run's schedule (a resume may extend
                # trainer.max_steps), not the saved rate, which is the old schedule's at its last step.
                for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                    group["lr"] = base * factor(scheduler.last_epoch)
                scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
            except (KeyError, ValueError, TypeError, RuntimeError) as exc:
                raise CheckpointError(f"the optimizer state in {path} does not fit this run's optimizer "
                                      f"(optim.name={self.config.optim.name!r}, model parameters): "
                                      f"{type(exc).__name__}: {exc}") from None

    def _checkpoint(self, epoch: int) -> None:
        rngs = None
        if self.world > 1:  # every rank's RNG (dropout draws differ per rank): an exact resume restores each
            rngs = [None] * self.world
            dist.all_gather_object(rngs, _rng_state())
        if self.rank != 0:
            return
        ckdir = self.out_dir / "checkpoints"
        state = self._state(epoch)
        if rngs is not None:
            state["rng_per_rank"] = rngs
        path = save_checkpoint(state, ckdir / f"step_{self.step:07d}.pt")
        self._saved_step, self._saved_path = self.step, path  # (a kill before last.pt: --resume takes this one)
        self._saved_path = save_checkpoint(state, ckdir / "last.pt")
        self._run_checkpoints[path.name] = self.step
        keep = self.config.trainer.keep_checkpoints
        # only this run's step checkpoints (and those of the run it resumed, up to the resumed step) are pruned
        mine = sorted(self._run_checkpoints, key=self._run_checkpoints.__getitem__)
        for name in mine[: max(0, len(mine) - keep)] if keep > 0 else []:
            if name != path.name:
                (ckdir / name).unlink(missing_ok=True)
                del self._run_checkpoints[name]

    def _step_checkpoints(self) -> dict[str, int]:
        """``{file name: step}`` of the ``step_*.pt`` files in ``out_dir/checkpoints``."""
        ckdir = self.out_dir / "checkpoints"
        found = {}
        for p in ckdir.glob("step_*.pt") if ckdir.is_dir() else []:
            m = re.fullmatch(r"step_(\d+)\.pt", p.name)
            if m:
                found[p.name] = int(m.group(1))
        return found

    def _resume_path(self) -> Path | None:
        """The checkpoint to resume from: ``trainer.resume``, or None. ``auto``: the newest checkpoint of
        ``out_dir/checkpoints`` by its step, ``last.pt`` or a ``step_XXXXXXX.pt`` (each checkpoint is written as
        ``step_XXXXXXX.pt``, then ``last.pt``: a run killed between the two has a step file newer than
        ``last.pt``); none: :meth:`_fit` says so and the run starts from step 0. Sets ``_resume_step``."""
        spec = self.config.trainer.resume
        self._resume_step = None
        if not spec:
            return None
        if spec != "auto":
            path = Path(spec)
            self._resume_step = _stored_step(path) if path.is_file() else None
            return path
        last = self.out_dir / "checkpoints" / "last.pt"
        last_step = _stored_step(last) if last.is_file() else None
        newer = [(step, name) for name, step in self._step_checkpoints().items()
                 if last_step is None or step > last_step]
        if last.is_file() and last_step is not None:
            # a step file newer by its step but written before last.pt is not this run's latest: it is left from
            # a continuation that a --resume CHECKPOINT of an older step then abandoned
            mtime = last.stat().st_mtime
            newer = [(step, name) for step, name in newer if (last.parent / name).stat().st_mtime >= mtime]
        if not newer:
            self._resume_step = last_step
            return last if last.is_file() else None
        self._resume_step, name = max(newer)
        if self.rank == 0:
            why = (f"last.pt is at step {last_step}" if last_step is not None else
                   "there is no last.pt" if not last.is_file() else "last.pt cannot be read")
            print(f"medfast train: --resume: {name} (step {self._resume_step}) is the newest checkpoint ({why}: "
                  f"the run was stopped while writing its checkpoints)", flush=True)
        return last.parent / name

    def _check_out_dir(self, resume: Path | None) -> None:
        """A new run (no resume, or resuming another folder's checkpoint) must not write into a checkpoint folder
        that already holds another run's checkpoints: the two would mix, and pruning would delete the wrong ones."""
        ckdir = self.out_dir / "checkpoints"
        found = sorted(self._step_checkpoints()) + (["last.pt"] if (ckdir / "last.pt").is_file() else [])
        if not found:
            return
        if resume is not None and resume.resolve().parent == ckdir.resolve():
            return
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        what = (f"resuming {resume} (another folder) into it" if resume is not None else
                "starting a new run in it")
        # the whole folder, not checkpoints/ alone: the earlier run's logs, results, test predictions and sample
        # images would otherwise stay beside the new run's
        raise ConfigError(f"trainer.out_dir (--out) {self.out_dir} already holds checkpoints of an earlier run "
                          f"({shown}); {what} would mix the two runs. Continue that run with --resume "
                          f"(trainer.resume=auto), train into a new folder (--out), or delete the whole folder "
                          f"{self.out_dir} first (not only its checkpoints/: the earlier run's logs, results and "
                          f"images are in it too)")

    def _resume_state(self, path: Path | None) -> dict[str, Any] | None:
        """The checkpoint to resume read and checked before :meth:`_setup` builds the network: its task, its
        training entries, and its weights against the network built on the meta device (shapes only)."""
        if path is None:
            return None
        state = load_checkpoint(path, map_location="cpu")
        saved_task = state.get("task") or (state.get("config") or {}).get("task")
        if saved_task is not None and saved_task != self.config.task:
            raise CheckpointError(f"{path} is a checkpoint of the {saved_task!r} task; this run trains "
                                  f"{self.config.task!r}")
        missing = [k for k in ("scaler", "step", "rng") if k not in state]
        if missing:
            raise CheckpointError(f"{path} is not a training checkpoint of medfast train (no {', '.join(missing)}); "
                                  f"it cannot be resumed")
        # (every task, before its data is read: gather_files and the classification task draw the split). A
        # checkpoint that records its subjects has its validation set compared by them (_check_split): the lists'
        # paths may be moved or respelled
        now = config_to_dict(self.config)
        drawn = _split_differences(state.get("config"), now, DRAW_SETTINGS)
        listed = [] if state.get("split") is not None else _split_differences(state.get("config"), now, LIST_SETTINGS)
        if drawn:
            raise CheckpointError(f"{path} was trained with another train/validation split: "
                                  f"{', '.join(drawn + listed)}; the split would be drawn anew and validation would "
                                  f"score subjects the checkpoint trained on. Resume with the checkpoint's settings, "
                                  f"or train a new run (without --resume)")
        if listed:  # nothing is drawn: the list is another (or written otherwise; no record tells the files apart)
            raise CheckpointError(f"{path} was trained with another validation set: {', '.join(listed)}; validation "
                                  f"would score other subjects, maybe ones the checkpoint trained on. The checkpoint "
                                  f"predates the record of its subjects, so its validation files are compared as "
                                  f"written: give them as its config does, or train a new run (without --resume)")
        # an edited config (model.channels [4096, 8192]) built gigabytes of parameters before this was found
        check_weights_fit(self.task.build_model, state, path, self.config)
        return state

    def _resume(self, path: Path | None, state: dict[str, Any] | None) -> int | None:
        if state is None:  # (no checkpoint to resume: path is None too)
            return None
        self._check_split(state, path)
        check = getattr(self.task, "check_resume", None)  # optional: the task's own checks (e.g. the class list)
        if check is not None:
            check(state, path)
        load_model_state(self.model, state, path, self.config)
        self._load_optimizer_state(state, path)
        if isinstance(state["scaler"], dict) and not state["scaler"] and self.scaler.is_enabled():
            # a run trained without float16 loss scaling (amp none/bf16, or on the CPU) saved a disabled scaler's
            # empty state, which GradScaler refuses: a run resumed with amp=fp16 starts its scaler afresh
            if self.rank == 0:
                print(f"medfast train: {path} has no gradient-scaler state (trained without amp=fp16); the float16 "
                      f"loss scaling starts afresh (scale {self.scaler.get_scale():g})", flush=True)
        else:
            try:
                self.scaler.load_state_dict(state["scaler"])
            except (KeyError, ValueError, TypeError, RuntimeError) as exc:
                raise CheckpointError(f"cannot restore the gradient scaler from {path}: {exc}") from None
        self.step = int(state["step"])
        self._data_start = (self.step, self._resume_micro_batch(state))
        if path.resolve().parent == (self.out_dir / "checkpoints").resolve():
            self._saved_step, self._saved_path = self.step, path
            self._run_checkpoints = {k: v for k, v in self._step_checkpoints().items() if v <= self.step}
        per_rank = state.get("rng_per_rank")
        if isinstance(per_rank, list) and len(per_rank) == self.world:
            _set_rng_state(per_rank[self.rank])  # each rank where it was
        else:  # another world size (or an older checkpoint): rank 0's state, the other ranks moved off it
            if self.rank == 0 or state.get("world_size", 1) == self.world:
                _set_rng_state(state["rng"])
            if self.rank != 0:
                torch.manual_seed(self.config.trainer.seed + self.rank + self.step)
        if self.rank == 0:
            print(f"medfast train: resumed from {path} at step {self.step}", flush=True)
        return self.step

    def _check_split(self, state: dict[str, Any], path: Path) -> None:
        """The checkpoint's recorded subjects (``state["split"]``, see :meth:`_state`) against the split this run
        resolved: another validation set raises :class:`CheckpointError` naming the subjects that differ. Subjects
        are matched by file name and size, so a moved or respelled data folder resumes. Nothing is compared when
        either side has no record (an older checkpoint: its settings were compared by :meth:`_resume_state`; a
        task whose data are no files)."""
        if self._split is None or state.get("split") is None:
            return
        try:
            saved = check_split_record(state["split"])
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        changes = split_changes(saved, self._split)
        if not any(changes.values()):
            return
        names = ([f"{n} (trained on in the checkpoint, validation now)" for n in changes["to_val"]]
                 + [f"{n} (validation in the checkpoint, training now)" for n in changes["to_train"]]
                 + [f"{n} (validation now, not a subject of the checkpoint)" for n in changes["new_val"]]
                 + [f"{n} (validation in the checkpoint, not found now)" for n in changes["gone"]])
        d = self.config.data
        args = d.dataset_args if isinstance(d.dataset_args, dict) else {}
        given = ("data.val_images / val_labels" if list(d.val_images) else
                 "data.dataset_args.val_root / val_csv_file" if args.get("val_root") or args.get("val_csv_file")
                 else None)
        count = (f"{len(self._split['train']) + len(self._split['val'])} subjects now, "
                 f"{len(saved['train']) + len(saved['val'])} when the checkpoint was trained")
        if given is not None:
            how = (f"the validation set ({given}) holds other subjects than the checkpoint's. Give the checkpoint's "
                   f"validation files (moved or respelled files of the same set resume: subjects are matched by "
                   f"file name and size), or train a new run (without --resume)")
        elif d.val_fraction > 0:
            where = (f"data.root ({d.root})" if d.root is not None else
                     f"data.dataset ({d.dataset})" if d.dataset is not None else "the training files")
            how = (f"data.val_fraction={d.val_fraction} draws the split (seeded by trainer.seed) from the subjects "
                   f"{where} holds now ({count}). Restore {where} to the subjects the checkpoint was trained on (a "
                   f"moved folder is fine: subjects are matched by file name and size), or train a new run (without "
                   f"--resume)")
        else:
            how = ("this run has no validation set. Resume with the checkpoint's validation settings, or train a "
                   "new run (without --resume)")
        raise CheckpointError(f"{path} was trained with another train/validation split, and validation would score "
                              f"other subjects: {_listed(names)}; {how}")

    def interrupted_message(self) -> str:
        """What ``medfast train`` says when the run is interrupted (Ctrl-C): the step, and the checkpoint to
        resume from. (Checkpoints are replaced atomically, so an interrupted save leaves the previous one.)"""
        last = self.out_dir / "checkpoints" / "last.pt"
        done = f"interrupted at step {self.step} of {self.config.trainer.max_steps}"
        if self._saved_step is not None:
            return (f"{done}; the last checkpoint is {self._saved_path or last} (step {self._saved_step}): continue "
                    f"with --resume")
        if last.is_file():
            return f"{done}, before this run wrote a checkpoint; {last} is from an earlier run (--resume continues it)"
        return f"{done}, before the first checkpoint (trainer.checkpoint_every): nothing to resume"

    # -- logging --------------------------------------------------------------------------------------
    def _tensorboard(self):
        if self._tb is None and self.config.trainer.tensorboard and self.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tb = False
                print("medfast train: TensorBoard not installed (pip install tensorboard); skipping it", flush=True)
            else:
                # purge_step: an earlier (interrupted) run's events from that step on are dropped
                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self._tb_purge)
        return self._tb or None

    # -- steps ----------------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _check_finite(self, values: list[torch.Tensor], batches: list[tuple[int, dict[str, Any]]]) -> None:
        """Raises :class:`NonFiniteLossError` naming the step and the files of the batch whose loss is NaN or inf
        (of the step's micro-batch losses ``values``, on every rank; ``batches``: their (epoch, batch)). Called once
        per step, after the backward is queued and before the optimizer step: the one wait for the device comes
        when the GPU holds the whole step's work (a check before each backward left it idle while the host queued
        the backward), and a bad loss still never updates the weights."""
        value = torch.cat(values)
        bad = (~torch.isfinite(value)).float().sum().reshape(1)
        if self.world > 1:
            dist.all_reduce(bad)
        if bad.item() > 0:
            numbers = value.tolist()
            k = next((i for i, v in enumerate(numbers) if not math.isfinite(v)), 0)
            epoch, batch = batches[k]
            files = ", ".join(map(str, batch.get("files", []))) or "unknown"
            where = f"({numbers[k]}) at step {self.step + 1} (epoch {epoch}); batch files: {files}"
            if self.world > 1:  # every rank raises the same message, naming the rank(s) whose loss was bad
                seen = [None] * self.world
                dist.all_gather_object(seen, (numbers[k], files))
                where = f"at step {self.step + 1} (epoch {epoch}) " + "; ".join(
                    f"on rank {r} ({v}), batch files: {fs}" for r, (v, fs) in enumerate(seen) if not math.isfinite(v))
            raise NonFiniteLossError(
                f"non-finite loss {where}. Lower optim.lr, check the inputs (NaN voxels, empty labels) or "
                f"set trainer.amp=none."
            )

    def _global_metrics(self, rows: list[dict[str, float]]) -> dict[str, float]:
        """The step's task metrics over the global batch: the mean of every rank's finite values (each row is a
        micro-batch mean, the batches are equal, so this is the one-process value)."""
        if self.world == 1:
            return _mean_metrics(rows)
        sums: dict[str, tuple[float, int]] = {}
        for row in rows:
            for k, v in row.items():
                s, n = sums.get(k, (0.0, 0))
                ok = v is not None and math.isfinite(float(v))
                sums[k] = (s + float(v), n + 1) if ok else (s, n)
        parts = [None] * self.world
        dist.all_gather_object(parts, sums)
        total: dict[str, tuple[float, int]] = {}
        for part in parts:
            for k, (s, n) in part.items():
                a, b = total.get(k, (0.0, 0))
                total[k] = (a + s, b + n)
        return {k: total[k][0] / total[k][1] if total[k][1] else float("nan") for k in sorted(total, key=metric_order)}

    def _validate(self, epoch: int, val_log: _Log, pbar) -> dict[str, float]:
        """Validation metrics, the mean over the validation subjects. Under DDP each rank validates every
        ``world``-th subject and rank 0 gathers the rows in subject order, so the metrics equal one
        process's; rank 0 logs them and draws the samples PNG."""
        if self.val_ds is None or len(self.val_ds) == 0:
            return {}
        mine = list(range(self.rank, len(self.val_ds), self.world))
        ds = self.val_ds if self.world == 1 else torch.utils.data.Subset(self.val_ds, mine)
        self.model.eval()
        rows: list[tuple[int, list[dict[str, float]]]] = []  # (subject, its rows)
        loader = self._validation_loader(ds)
        first = None
        with torch.no_grad(), self._autocast():
            for index, batch in zip(mine, loader, strict=True):
                first = first if first is not None else batch
                rows.append((index, self.task.validation_step(self.model, batch, self.device)))
        self.model.train()
        if self.world > 1:
            parts: list[Any] = [None] * self.world
            dist.all_gather_object(parts, rows)
            rows = sorted((r for part in parts for r in part), key=lambda r: r[0])
        metrics: dict[str, float] = {}
        if self.rank == 0:
            metrics = _mean_metrics([row for _, subject in rows for row in subject])
            val_log.append({"step": self.step, "epoch": epoch, **metrics})
            tb = self._tensorboard()
            if tb is not None:
                for k, v in metrics.items():
                    tb.add_scalar(f"val/{k}", v, self.step)
            if self.config.trainer.plots and first is not None:
                self.model.eval()
                self.task.save_samples(self.model, first, self.device,
                                       self.out_dir / f"samples_step{self.step:07d}.png")
                self.model.train()
            if pbar is not None:
                pbar.write(f"step {self.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        D.barrier()
        return metrics

    # -- main loop ------------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        """Trains to ``trainer.max_steps`` (resuming first if ``trainer.resume`` is set).

        Parameters
        ----------
        stop_after : int, optional
            End this call after that step, writing a checkpoint as if the run had been killed there (the
            learning-rate schedule still spans ``max_steps``); a later ``fit`` with ``trainer.resume="auto"``
            continues it.

        Returns
        -------
        dict
            ``results.json``'s content: final step, losses, last validation metrics, task results, times (on
            rank 0; NaN metrics are floats here, ``null`` in the file). A resume of a run that already reached
            ``max_steps`` trains nothing, rewrites nothing and returns the run's saved ``results.json``.

        Raises
        ------
        ConfigError
            Among others, when another run trains in ``trainer.out_dir`` (it holds ``train.lock``).
        """
        # trainer.threads and trainer.deterministic are process-wide torch settings: they hold for this fit only,
        # and the caller's (a notebook, a later fit with another config) come back afterwards
        saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                 torch.is_deterministic_algorithms_warn_only_enabled())
        try:
            return self._fit(stop_after)
        finally:
            # The cleanup runs whole: a stop arriving in it (torchrun's SIGTERM to every rank once one failed)
            # had cut it short, leaving train.lock behind, and replaced the failure in flight by "interrupted". A
            # stop is delivered after it, or dropped when an error is already on its way out.
            with signals_deferred(deliver=sys.exc_info()[1] is None):
                torch.set_num_threads(saved[0])
                torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
                self._close_loaders()
                if self._tb:
                    self._tb.close()
                    self._tb = None
                if self._lock is not None:  # also on an error or Ctrl-C
                    _unlock_out_dir(self._lock)
                    self._lock = None

    def _agree(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a decision that only rank 0 takes or that all must take alike)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _take_lock(self) -> None:
        """Rank 0 locks out_dir for the whole fit (:func:`_lock_out_dir`); when another run holds it, every rank
        raises :class:`ConfigError` naming the holder."""
        refused = None
        if self.rank == 0:
            got = _lock_out_dir(self.out_dir)
            if isinstance(got, str):
                refused = got
            else:
                self._lock = got
        refused = self._agree(refused)
        if refused is not None:
            raise ConfigError(refused)

    def _finished_results(self, resume_path: Path | None) -> dict[str, Any] | None:
        """``results.json`` of a run that a resume finds already finished: its checkpoint is at or past
        ``trainer.max_steps`` and results.json was written at that step. Then there is nothing to do (as
        PyTorch Lightning's fit from a checkpoint at ``max_steps``), and the results, logs, checkpoints and
        TensorBoard events are left as they are. None otherwise (e.g. a run killed while its test set was
        evaluated, after the last checkpoint: the resume evaluates it again)."""
        step = self._resume_step
        results = None
        if self.rank == 0 and resume_path is not None and step is not None and step >= self.config.trainer.max_steps:
            with contextlib.suppress(OSError, ValueError):
                saved = json.loads((self.out_dir / "results.json").read_text())
                if isinstance(saved, dict) and saved.get("finished") and saved.get("step") == step:
                    results = saved
            if results is not None:
                print(f"medfast train: --resume: the run in {self.out_dir} already reached trainer.max_steps="
                      f"{self.config.trainer.max_steps} ({resume_path} is at step {step}); nothing to train, its "
                      f"results.json, logs and checkpoints are left as they are (raise trainer.max_steps, e.g. "
                      f"--set trainer.max_steps={2 * step}, to train on)", flush=True)
        finished = self._agree(results is not None)  # (rank 0 decides: every rank calls this)
        return (results or {}) if finished else None

    def _keep_earlier_config(self, given: Config) -> None:
        """Before a resume overwrites ``OUT/config.yaml`` with other settings (e.g. a raised trainer.max_steps,
        which changes the schedule of the steps already trained), the earlier file is kept as
        ``config_stepXXXXXXX.yaml`` (the resumed step), so that the steps up to it can still be reproduced. A file
        of that name already there is left: it holds the config of those steps (from an earlier resume at it)."""
        import yaml

        old = self.out_dir / "config.yaml"
        try:
            text = old.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return  # (none: e.g. a checkpoint of another folder resumed into a new one)
        try:
            same = yaml.safe_load(text) == yaml.safe_load(yaml.safe_dump(config_to_dict(given), sort_keys=False))
        except yaml.YAMLError:
            same = False
        keep = self.out_dir / f"config_step{self.step:07d}.yaml"
        if same or keep.exists():
            return
        with replacing(keep) as tmp:
            tmp.write_text(text, encoding="utf-8")
        print(f"medfast train: this resume's settings differ from {old}; the earlier file is kept as {keep.name} "
              f"(the config of the steps up to {self.step})", flush=True)

    def _setting_notes(self) -> list[str]:
        """Settings that run, but not as their values suggest: one line each at the start (not refused: a GPU
        config still runs on the CPU, and a demo config is shortened with --set trainer.max_steps=N)."""
        tc, o, notes = self.config.trainer, self.config.optim, []
        if self.amp_dtype is None and str(tc.amp).lower() in ("bf16", "fp16"):
            notes.append(f"trainer.amp={tc.amp} runs in float32 on {self.device.type} (mixed precision is used on "
                         "CUDA only)")
        if o.warmup_steps >= tc.max_steps:
            notes.append(f"optim.warmup_steps={o.warmup_steps} >= trainer.max_steps={tc.max_steps}: the learning "
                         f"rate stays below optim.lr ({o.lr}) for the whole run")
        return notes

    def _fit(self, stop_after: int | None) -> dict[str, Any]:
        tc = self.config.trainer
        t0 = time.perf_counter()
        self._take_lock()  # before looking at the checkpoints: another run may be writing them
        resume_path = self._resume_path()
        self._check_out_dir(resume_path)  # before reading any data
        finished = self._finished_results(resume_path)
        if finished is not None:
            return finished
        if resume_path is None and tc.resume == "auto" and self.rank == 0:
            print(f"medfast train: --resume: no checkpoint to resume in {self.out_dir / 'checkpoints'} (no last.pt "
                  f"or step_*.pt); starting a new run from step 0", flush=True)
        resume_state = self._resume_state(resume_path)  # (its weights checked before the network is built)
        self._setup()
        main = self.rank == 0
        resumed = self._resume(resume_path, resume_state)
        if main:  # after the resume's checks: a refused resume leaves the run's config.yaml as it was
            # without trainer.resume: the file trains the same run again (a recorded --resume made a rerun from it
            # continue this run's checkpoint, in a new folder, from its step)
            given = copy.deepcopy(self._given_config)
            given.trainer.resume = None
            if resumed is not None:
                self._keep_earlier_config(given)
            save_config(given, self.out_dir / "config.yaml")
        if self.world > 1:  # each rank read its own out_dir: without a shared file system they could differ
            steps = [None] * self.world
            dist.all_gather_object(steps, (self.step, None if resume_path is None else str(resume_path)))
            if len({s for s, _ in steps}) > 1:
                raise CheckpointError(
                    "the ranks resumed from different steps ("
                    + ", ".join(f"rank {r}: step {s} from {p or 'no checkpoint'}" for r, (s, p) in enumerate(steps))
                    + "): trainer.out_dir must be on a file system every node sees, with the same checkpoints")
        if main:
            _remove_partial_checkpoints(self.out_dir / "checkpoints")
        train_log, val_log = _Log(self.out_dir, "train_log"), _Log(self.out_dir, "val_log")
        if main:
            train_log.restore(self.step if resumed is not None else None)
            val_log.restore(self.step if resumed is not None else None)
            rows = train_log.rows
            # the row a stop (fit(stop_after=...)) logged at its last step: an uninterrupted run has none there. The
            # checkpoint says whether its step's row was one (judged by the settings it ran with: a finished run
            # extended with a larger max_steps keeps its last row); older checkpoints: by the settings now
            stop_row = (resume_state or {}).get("stop_row")
            if stop_row is None:
                stop_row = not (self.step % tc.log_every == 0 or self.step in (1, tc.max_steps))
            if rows and rows[-1].get("step") == self.step and stop_row:
                train_log.rows = rows[:-1]
                train_log._rewrite()
            # now, not at the first scalar (a step later): the events of the steps after the checkpoint, or of
            # an earlier run that wrote no checkpoint, are dropped, so each step is there once, as in the CSV
            self._tb_purge = self.step + 1 if resumed is not None else 0
            self._tensorboard()
            for note in self._setting_notes():
                print(f"medfast train: {note}", flush=True)
        D.barrier()
        end = tc.max_steps if stop_after is None else min(tc.max_steps, stop_after)
        pbar = None
        if main and tc.progress:
            from tqdm.auto import tqdm

            pbar = tqdm(total=tc.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                        disable=None)
        if resumed is None:
            self._data_start = (self.step, self.step * tc.accumulate)
        stream = self._micro_batches(self._data_start[1])
        # results.json's "validation": the last validation's metrics, those of the checkpoint's step (or before)
        # when the resumed part validates no more (e.g. the test set of a finished run evaluated again)
        metrics_val: dict[str, float] = {}
        if main and resumed is not None and val_log.rows:
            metrics_val = {k: v for k, v in val_log.rows[-1].items() if k not in ("step", "epoch")}
        epoch = 0
        if tc.val_at_start and tc.val_every and self.step == 0:  # the untrained model's metrics, as step 0
            metrics_val = self._validate(epoch, val_log, pbar)
        self.ddp.train()
        while self.step < end:
            step_t = time.perf_counter()  # the step's own time: not the validation, checkpoint and plots after one
            data_s = 0.0  # of it, the wait for the batches: a data-bound run shows it close to "seconds"
            batches: list[tuple[int, dict[str, Any]]] = []
            phase_losses: dict[str | None, torch.Tensor] = {}
            step_metrics: list[dict[str, float]] = []
            for phase in self.phases:  # one phase (None) for most tasks; e.g. discriminator, generator
                optimizer = self.optimizers[phase]
                optimizer.zero_grad(set_to_none=True)
                losses = []
                kwargs = {} if phase is None else {"phase": phase}
                for micro in range(tc.accumulate):
                    if len(batches) <= micro:
                        t_data = time.perf_counter()
                        batches.append(next(stream))
                        data_s += time.perf_counter() - t_data
                    epoch, batch = batches[micro]
                    sync = micro == tc.accumulate - 1 or self.world == 1
                    ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
                    with ctx:
                        with self._autocast():
                            loss, metrics = self.task.training_step(self.ddp, batch, self.device, **kwargs)
                        losses.append(loss.detach().float().reshape(1))
                        if torch.is_anomaly_enabled() or not loss.requires_grad:
                            # a backward that would raise on a NaN itself (anomaly mode) or at all (no graph):
                            # the friendly check first, on every rank alike
                            self._check_finite(losses[-1:], batches[micro:micro + 1])
                        self.scaler.scale(loss / tc.accumulate).backward()
                    step_metrics.append(metrics)
                self._check_finite(losses, batches)
                if self.config.optim.grad_clip:
                    self.scaler.unscale_(optimizer)
                    params = [q for g in optimizer.param_groups for q in g["params"]]
                    torch.nn.utils.clip_grad_norm_(params, self.config.optim.grad_clip)
                self.scaler.step(optimizer)
                phase_losses[phase] = torch.cat(losses).mean()
            self.scaler.update()
            lr = self.optimizer.param_groups[0]["lr"]
            for scheduler in self.schedulers.values():
                scheduler.step()
            self.step += 1
            loss_value = phase_losses[self.phases[-1]]
            if self.world > 1:
                stacked = torch.stack(list(phase_losses.values()))
                dist.all_reduce(stacked)
                phase_losses = dict(zip(phase_losses, stacked / self.world, strict=True))
                loss_value = phase_losses[self.phases[-1]]
            # the first step too: results' first_loss and the curves start there whatever log_every is
            logging = self.step % tc.log_every == 0 or self.step == end or self.step == 1
            # a row only because the run stops here (recorded in the checkpoint: a resume drops it)
            self._stop_row = logging and not (self.step % tc.log_every == 0 or self.step in (1, tc.max_steps))
            step_means = self._global_metrics(step_metrics) if logging else {}
            if main and logging:
                now = time.perf_counter()
                extra = {} if self.phases == [None] else {f"loss_{ph}": v.item() for ph, v in phase_losses.items()}
                row = {"step": self.step, "epoch": epoch, "loss": loss_value.item(), "lr": lr, **extra,
                       **step_means, "seconds": now - step_t, "data_seconds": data_s}
                train_log.append(row)
                tb = self._tensorboard()
                # not the row a stop logs at its last step: a resume drops it from the logs (above), and
                # TensorBoard keeps what precedes its purge step
                if tb is not None and not self._stop_row:
                    for k, v in row.items():
                        if k not in ("step", "epoch"):
                            tb.add_scalar(f"train/{k}", v, self.step)
                if pbar is not None:
                    pbar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k not in ("step", "epoch", "lr",
                                                                                       "seconds", "data_seconds")})
            if pbar is not None:
                pbar.update(1)
            if tc.val_every and (self.step % tc.val_every == 0 or self.step == tc.max_steps):
                metrics_val = self._validate(epoch, val_log, pbar) or metrics_val
            if (tc.checkpoint_every and self.step % tc.checkpoint_every == 0) or self.step == end:
                self._checkpoint(epoch)
            if main and tc.plots and tc.val_every and self.step % tc.val_every == 0:
                plot_curves(train_log.rows, val_log.rows, self.out_dir / "curves.png")
        if pbar is not None:
            pbar.close()
        results: dict[str, Any] = {}
        if main:
            results = {
                "step": self.step,
                "finished": self.step >= tc.max_steps,
                "world_size": self.world,
                "device": str(self.device),
                "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "none",
                "first_loss": train_log.rows[0]["loss"] if train_log.rows else None,
                "last_loss": train_log.rows[-1]["loss"] if train_log.rows else None,
                "validation": metrics_val,
                "seconds": time.perf_counter() - t0,
            }
            if tc.plots:
                plot_curves(train_log.rows, val_log.rows, self.out_dir / "curves.png")
            if self.step >= tc.max_steps:
                self.model.eval()
                results.update(self.task.finish(self.model, self.device, self.out_dir) or {})
            # NaN metrics (e.g. a class absent from the validation set) as null: bare NaN is not JSON
            (self.out_dir / "results.json").write_text(json_dumps(results, indent=2))
        D.barrier()
        return results


def train(config: Config | dict, stop_after: int | None = None) -> dict[str, Any]:
    """Builds the task named by ``config.task`` and trains it (see :class:`Trainer`)."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    return Trainer(config).fit(stop_after=stop_after)
