"""DDP for the classification task: two gloo processes on the CPU, each rendering and training on half of
every batch of simulated ultrasound, end with the same parameters as one process trained on the combined
batches (the harness of tests/test_train_ddp.py; DenseNet with group norm, which is per sample)."""

import os

import torch
import torch.multiprocessing as mp

from medfast.train import Trainer, load_config
from tests.test_train_ddp import _free_port

WORLD = 2


def _config(out_dir, batch):
    return load_config([], [
        "task=classification", "data.dataset=simulated_ultrasound", "data.shape=[24, 24]", "data.normalize=none",
        "data.dataset_args={volumes: ['phantom:1', 'phantom:2'], val_volumes: [], n_lines: 24, n_samples: 48, "
        "sub_rays: 1, voxel_mm: 3.0, variants: 2, samples_per_epoch: 16}",
        "model.name=densenet", "model.spatial_dims=2", "model.out_channels=4", "model.channels=[4]",
        "model.kwargs={growth_rate: 4, blocks: [2, 2], bn_size: 2, norm: group}",
        f"trainer.out_dir={out_dir}", f"trainer.batch_size={batch}", "trainer.max_steps=3", "trainer.val_every=0",
        "trainer.checkpoint_every=0", "trainer.progress=false", "trainer.tensorboard=false", "trainer.plots=false",
        "optim.lr=0.01", "trainer.threads=1",
    ])


def _worker(rank, port, out_dir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    trainer = Trainer(_config(out_dir, 2))
    assert trainer.world == WORLD and trainer.rank == rank
    trainer.fit()
    out[rank] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_two_process_ddp_equals_one_process_with_the_combined_batch(tmp_path):
    single = Trainer(_config(tmp_path / "single", 4))
    single.fit()
    ref = single.model.state_dict()
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), str(tmp_path / "ddp"), out), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        for k, v in ref.items():
            torch.testing.assert_close(out[rank][k], v, rtol=1e-4, atol=2e-5)
    # training moved the parameters, so the comparison is not trivially true
    initial = Trainer(_config(tmp_path / "init", 4))
    initial._setup()
    moved = max((v - ref[k]).abs().max().item() for k, v in initial.model.state_dict().items()
                if v.is_floating_point())
    assert moved > 1e-3
    assert (tmp_path / "ddp" / "train_log.jsonl").read_text().count("\n") == 3
