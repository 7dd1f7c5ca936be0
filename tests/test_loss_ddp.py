"""Batch Dice under torch.distributed (2 gloo processes on the CPU): with ddp_sync the loss equals
the one-process loss on the whole batch, and the gradients after DDP-style averaging equal its
gradients."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import medfast as mf

WORLD = 2


def _inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 6, 5, 4, generator=g, dtype=torch.float64)
    target = torch.randint(0, 3, (4, 6, 5, 4), generator=g)
    return logits, target


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        logits, target = _inputs()
        part = slice(rank * 2, rank * 2 + 2)
        local = logits[part].clone().requires_grad_()
        loss = mf.dice_loss(local, target[part], batch_dice=True, ddp_sync=True)
        loss.backward()
        grad = local.grad / WORLD  # what DDP's averaging does to the parameters' gradients
        out[rank] = (loss.detach(), grad)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_batch_dice_ddp_sync_equals_one_process():
    logits, target = _inputs()
    full = logits.clone().requires_grad_()
    ref = mf.dice_loss(full, target, batch_dice=True)
    ref.backward()
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        loss, grad = out[rank]
        torch.testing.assert_close(loss, ref.detach())
        torch.testing.assert_close(grad, full.grad[rank * 2 : rank * 2 + 2])
    # Without the sync each rank's loss is its own half's: different from the full batch.
    unsynced = mf.dice_loss(logits[:2], target[:2], batch_dice=True)
    assert not torch.allclose(unsynced, ref.detach())
