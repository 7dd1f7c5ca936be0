"""DDP: two gloo processes on the CPU, each with half of every batch, end with the same parameters as one
process trained on the combined batches (the sampler gives both the same subjects and augmentation seeds)."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medfast.data.synthetic import make_blobs
from medfast.tasks.segmentation import SegmentationTask
from medfast.train import Trainer, load_config

WORLD = 2


def _config(data_dir, out_dir, batch, *extra):
    return load_config([], [
        f"data.root={data_dir}", f"trainer.out_dir={out_dir}", f"trainer.batch_size={batch}",
        "trainer.max_steps=3", "trainer.val_every=0", "trainer.checkpoint_every=0", "trainer.progress=false",
        "trainer.tensorboard=false", "trainer.plots=false", "model.channels=[4, 8]", "model.out_channels=3",
        "augment.patch_size=[12, 12, 12]", "augment.deform_grid=3", "optim.lr=0.01", "trainer.threads=1",
        "data.cache=none", *extra,
    ])


class _MetricTask(SegmentationTask):
    """Logs a metric of its batch (the mean absolute intensity): under DDP it must cover the global batch."""

    def training_step(self, model, batch, device):
        loss, metrics = super().training_step(model, batch, device)
        return loss, {**metrics, "image_mean": float(batch["image"].abs().mean())}


class _RngTask(SegmentationTask):
    """A loss that draws from the global RNG, as dropout does: an exact resume must restore every rank's RNG."""

    def training_step(self, model, batch, device):
        loss, metrics = super().training_step(model, batch, device)
        return loss * (1 + 0.5 * torch.rand(())), metrics


class _NanOnRank1(SegmentationTask):
    def training_step(self, model, batch, device):
        loss, metrics = super().training_step(model, batch, device)
        return (loss * torch.nan if dist.get_rank() == 1 else loss), metrics


def _error_worker(rank, port, data_dir, out_dirs, out, extra=(), task=None):
    """Runs a trainer that must fail; stores each rank's error message."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    config = _config(data_dir, out_dirs[rank], 2, *extra)
    try:
        Trainer(config, task=None if task is None else task(config)).fit()
        out[rank] = "no error"
    except Exception as exc:  # noqa: BLE001 - the test reads the message
        out[rank] = f"{type(exc).__name__}: {exc}"


def _worker(rank, port, data_dir, out_dir, out, extra=(), task=None, stop_after=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    config = _config(data_dir, out_dir, 2, *extra)
    trainer = Trainer(config, task=None if task is None else task(config))
    assert trainer.world == WORLD and trainer.rank == rank
    trainer.fit(stop_after=stop_after)
    out[rank] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _refit_worker(rank, port, data_dir, out_dir, out):
    """A fit stopped and continued by a second fit of the same trainer, then a second trainer (fine-tuning) in the
    same process: the first fit destroyed the group (ValueError at the second; a new trainer's new group could
    deadlock in its first collective)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), TORCH_GLOO_TIMEOUT="60")
    config = _config(data_dir, out_dir, 2, "trainer.dist_timeout_min=1")
    trainer = Trainer(config)
    trainer.fit(stop_after=1)
    trainer.config.trainer.resume = "auto"
    trainer.fit()
    second = Trainer(_config(data_dir, f"{out_dir}_tune", 2, "trainer.dist_timeout_min=1"))
    second.fit()
    out[rank] = (trainer.step, second.step, dist.is_initialized())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("batch_dice", [False, True])
def test_two_process_ddp_equals_one_process_with_the_combined_batch(tmp_path, batch_dice):
    data = tmp_path / "data"
    make_blobs(data, n=4, shape=(16, 16, 16), classes=3)
    extra = (f"loss.batch_dice={str(batch_dice).lower()}",)  # batch Dice over the global batch (ddp_sync)
    config = _config(data, tmp_path / "single", 4, *extra)
    single = Trainer(config, task=_MetricTask(config))
    single.fit()
    ref = single.model.state_dict()
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), str(data), str(tmp_path / "ddp"), out, extra, _MetricTask), nprocs=WORLD,
             join=True)
    # the logged metrics are means over the global batch, as one process's (rank 0's half before)
    rows = [[json.loads(line) for line in (tmp_path / d / "train_log.jsonl").read_text().splitlines()]
            for d in ("single", "ddp")]
    for a, b in zip(*rows, strict=True):
        assert b["image_mean"] == pytest.approx(a["image_mean"], rel=1e-6)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    initial = Trainer(_config(data, tmp_path / "init", 4))
    moved = 0.0
    for rank in range(WORLD):
        for k, v in ref.items():
            torch.testing.assert_close(out[rank][k], v, rtol=1e-4, atol=2e-5)
    # and training did move the parameters (the comparison is not trivially true)
    initial._setup()
    for k, v in initial.model.state_dict().items():
        if v.is_floating_point():
            moved = max(moved, (v - ref[k]).abs().max().item())
    assert moved > 1e-3
    # rank 0 alone wrote the logs
    assert (tmp_path / "ddp" / "train_log.jsonl").read_text().count("\n") == 3


class _ShardTask(SegmentationTask):
    """Validation rows also say which rank computed them (the sharding must use every rank)."""

    def validation_step(self, model, batch, device):
        rank = dist.get_rank() if dist.is_initialized() else 0
        return [{**row, f"on_rank{rank}": 1.0} for row in super().validation_step(model, batch, device)]


def test_two_process_validation_is_sharded_and_equals_one_process(tmp_path):
    data = tmp_path / "data"
    make_blobs(data, n=7, shape=(16, 16, 16), classes=3)
    extra = ("data.val_fraction=0.43", "trainer.val_every=2", "trainer.max_steps=2")  # 3 validation subjects
    config = _config(data, tmp_path / "single", 4, *extra)
    Trainer(config, task=_ShardTask(config)).fit()
    mp.spawn(_worker, args=(_free_port(), str(data), str(tmp_path / "ddp"), mp.Manager().dict(), extra,
                            _ShardTask), nprocs=WORLD, join=True)
    single, ddp = [[json.loads(line) for line in (tmp_path / d / "val_log.jsonl").read_text().splitlines()]
                   for d in ("single", "ddp")]
    assert len(single) == len(ddp) == 1
    assert ddp[0].pop("on_rank0") == ddp[0].pop("on_rank1") == 1.0  # both ranks validated subjects
    assert single[0].pop("on_rank0") == 1.0
    dice = [k for k in single[0] if k.startswith("dice")]
    assert dice and ddp[0].keys() == single[0].keys()
    for k, v in single[0].items():  # the same subjects, gathered in order: the same means
        assert ddp[0][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_two_process_resume_is_exact_with_per_rank_random_draws(tmp_path):
    data = tmp_path / "data"
    make_blobs(data, n=4, shape=(16, 16, 16), classes=3)
    extra = ("trainer.max_steps=4", "trainer.checkpoint_every=2")
    full, part = mp.Manager().dict(), mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), str(data), str(tmp_path / "full"), full, extra, _RngTask), nprocs=WORLD,
             join=True)
    mp.spawn(_worker, args=(_free_port(), str(data), str(tmp_path / "part"), part, extra, _RngTask, 2),
             nprocs=WORLD, join=True)
    ck = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)
    assert len(ck["rng_per_rank"]) == WORLD
    assert not torch.equal(ck["rng_per_rank"][0]["torch"], ck["rng_per_rank"][1]["torch"])
    for name in (".123.0123456789ab.tmp.last.pt", ".last.pt.123.tmp"):  # killed saves (now, of earlier versions)
        (tmp_path / "part" / "checkpoints" / name).write_bytes(b"half a checkpoint")
    mp.spawn(_worker, args=(_free_port(), str(data), str(tmp_path / "part"), part,
                            (*extra, "trainer.resume=auto"), _RngTask), nprocs=WORLD, join=True)
    for k, v in full[0].items():  # rank 1 reseeded off rank 0's state before: another loss scale, other weights
        torch.testing.assert_close(part[0][k], v, rtol=0, atol=0)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "train_log.jsonl").read_text().splitlines()]
              for d in ("full", "part")]
    assert losses[0] == losses[1]
    assert not list((tmp_path / "part" / "checkpoints").glob(".*tmp*"))  # the partial saves were removed


def test_a_nan_on_one_rank_is_named_on_every_rank(tmp_path):
    data = tmp_path / "data"
    make_blobs(data, n=4, shape=(16, 16, 16), classes=3)
    out = mp.Manager().dict()
    mp.spawn(_error_worker, args=(_free_port(), str(data), [str(tmp_path / "r")] * WORLD, out, (), _NanOnRank1),
             nprocs=WORLD, join=True)
    for rank in range(WORLD):  # rank 0 named its own files and a finite value before
        assert out[rank].startswith("NonFiniteLossError: non-finite loss at step 1 (epoch 0) on rank 1 (nan)")
        assert "on rank 0" not in out[rank]


def test_ranks_resuming_from_different_checkpoints_stop(tmp_path):
    data = tmp_path / "data"
    make_blobs(data, n=4, shape=(16, 16, 16), classes=3)
    Trainer(_config(data, tmp_path / "run0", 4)).fit(stop_after=2)  # only rank 0's folder has a checkpoint
    out = mp.Manager().dict()
    dirs = [str(tmp_path / f"run{r}") for r in range(WORLD)]  # as on nodes without a shared file system
    mp.spawn(_error_worker, args=(_free_port(), str(data), dirs, out, ("trainer.resume=auto",)), nprocs=WORLD,
             join=True)
    for rank in range(WORLD):  # (rank 1 started from step 0 silently, and the job hung)
        assert out[rank].startswith("CheckpointError: the ranks resumed from different steps (rank 0: step 2")
        assert "rank 1: step 0 from no checkpoint" in out[rank]


def test_backend_choice_and_gpu_sharing(monkeypatch):
    # MEDFAST_DIST_BACKEND picks the process-group backend; more processes than GPUs share them (gloo),
    # and NCCL with more processes than GPUs is refused with a message naming the fix.
    import pytest

    from medfast.train import distributed as D
    from medfast.train.trainer import resolve_device

    monkeypatch.delenv(D.BACKEND_ENV, raising=False)
    assert D.backend_for("cpu") == "gloo"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    import medfast._extension as ext

    monkeypatch.setattr(ext, "cuda_kernels_built", lambda: True)  # (a CPU-only build: auto would be the CPU)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert D.backend_for("cuda") == "nccl"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="NCCL needs one GPU per process.*MEDFAST_DIST_BACKEND=gloo"):
        D.backend_for("cuda")
    monkeypatch.setenv(D.BACKEND_ENV, "gloo")
    assert D.backend_for("cuda") == "gloo"
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert D.local_cuda_index() == 0 and resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda", 3)
    monkeypatch.setenv(D.BACKEND_ENV, "mpi")
    with pytest.raises(ValueError, match="MEDFAST_DIST_BACKEND must be 'nccl' or 'gloo'"):
        D.backend_for("cuda")
    monkeypatch.setenv(D.BACKEND_ENV, "nccl")
    with pytest.raises(ValueError, match="needs CUDA devices"):
        D.backend_for("cpu")


def test_a_run_in_a_folder_another_run_holds_is_refused_on_every_rank(tmp_path):
    # rank 0 alone takes the out_dir lock; the other ranks must stop with it, not wait in a collective
    from medfast.train.trainer import _lock_out_dir, _unlock_out_dir

    data = tmp_path / "data"
    make_blobs(data, n=4, shape=(16, 16, 16), classes=3)
    held = _lock_out_dir(tmp_path / "run")
    out = mp.Manager().dict()
    try:
        mp.spawn(_error_worker, args=(_free_port(), str(data), [str(tmp_path / "run")] * WORLD, out), nprocs=WORLD,
                 join=True)
    finally:
        _unlock_out_dir(held)
    for rank in range(WORLD):
        assert out[rank].startswith(f"ConfigError: trainer.out_dir (--out) {tmp_path / 'run'} is in use by another "
                                    f"medfast train (pid {os.getpid()} on ")


def test_two_fits_and_two_trainers_in_one_process_group(tmp_path):
    data = tmp_path / "data"
    make_blobs(data, n=4, shape=(16, 16, 16), classes=3)
    out = mp.Manager().dict()
    mp.spawn(_refit_worker, args=(_free_port(), str(data), str(tmp_path / "run"), out), nprocs=WORLD, join=True)
    steps = _config(data, tmp_path / "x", 2).trainer.max_steps
    assert dict(out) == {rank: (steps, steps, True) for rank in range(WORLD)}
