"""DDP: two gloo processes on the CPU, each with half of every batch, end with the same parameters as one
process trained on the combined batches (the sampler gives both the same subjects and augmentation seeds)."""

import os
import socket

import torch
import torch.multiprocessing as mp

from medfast.data.synthetic import make_blobs
from medfast.train import Trainer, load_config

WORLD = 2


def _config(data_dir, out_dir, batch):
    return load_config([], [
        f"data.root={data_dir}", f"trainer.out_dir={out_dir}", f"trainer.batch_size={batch}",
        "trainer.max_steps=3", "trainer.val_every=0", "trainer.checkpoint_every=0", "trainer.progress=false",
        "trainer.tensorboard=false", "trainer.plots=false", "model.channels=[4, 8]", "model.out_channels=3",
        "augment.patch_size=[12, 12, 12]", "augment.deform_grid=3", "optim.lr=0.01", "trainer.threads=1",
        "data.cache=none",
    ])


def _worker(rank, port, data_dir, out_dir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    trainer = Trainer(_config(data_dir, out_dir, 2))
    assert trainer.world == WORLD and trainer.rank == rank
    trainer.fit()
    out[rank] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_equals_one_process_with_the_combined_batch(tmp_path):
    data = tmp_path / "data"
    make_blobs(data, n=4, shape=(16, 16, 16), classes=3)
    single = Trainer(_config(data, tmp_path / "single", 4))
    single.fit()
    ref = single.model.state_dict()
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), str(data), str(tmp_path / "ddp"), out), nprocs=WORLD, join=True)
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
