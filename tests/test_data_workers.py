"""data.num_workers > 0: the trainer's loaders keep their workers for the whole fit, so data.cache=memory (the default)
keeps each subject in the worker that read it: read and preprocessed at most once per worker process, not once per
epoch. The batches, losses, validation metrics and global RNG stream are those of num_workers=0, a resume is exact,
and no worker outlives Trainer.fit (also when it fails)."""

import json
import os
from collections import Counter

import pytest
import torch

from medfast.data import dataset as D
from medfast.data.synthetic import make_blobs
from medfast.tasks.segmentation import SegmentationTask
from medfast.train import Trainer, load_checkpoint, load_config

# the load counter is patched in this process: only forked workers inherit it
pytestmark = pytest.mark.skipif(torch.multiprocessing.get_start_method() != "fork",
                                reason="counts loads through a patch that only forked workers inherit")


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blobs")
    make_blobs(folder, n=5, shape=(16, 16, 16), classes=3)  # data.val_fraction=0.2: 4 training, 1 validation
    return folder


def _config(tmp_path, data_dir, out, workers, **extra):
    overrides = [
        f"data.root={data_dir}", f"trainer.out_dir={tmp_path / out}", "trainer.batch_size=1",
        "trainer.max_steps=12", "trainer.val_every=4", "trainer.checkpoint_every=0", "trainer.progress=false",
        "trainer.tensorboard=false", "trainer.plots=false", "model.channels=[4, 8]", "model.out_channels=3",
        "augment.patch_size=[12, 12, 12]", "augment.deform_grid=3", "trainer.threads=1", "data.val_fraction=0.2",
        f"data.num_workers={workers}", "data.cache=memory",
    ]
    return load_config([], overrides + [f"{k}={v}" for k, v in extra.items()])


@pytest.fixture
def loads(tmp_path, monkeypatch):
    """``NiftiDataset.load`` logged as ``(pid, subject file)`` (in the workers too); the list of them so far."""
    log = tmp_path / "loads.txt"
    load = D.NiftiDataset.load

    def counted(self, i):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {D.entry_text(self.images[i])}\n")
        return load(self, i)

    monkeypatch.setattr(D.NiftiDataset, "load", counted)
    return lambda: [tuple(line.split(" ", 1)) for line in log.read_text().splitlines()] if log.is_file() else []


def _run(cfg):
    trainer = Trainer(cfg)
    trainer.fit()
    out = cfg.trainer.out_dir
    rows = [json.loads(line) for line in open(f"{out}/train_log.jsonl")]
    vals = [json.loads(line) for line in open(f"{out}/val_log.jsonl")]
    return [r["loss"] for r in rows], vals, load_checkpoint(f"{out}/checkpoints/last.pt"), trainer


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_memory_cache_survives_the_epochs_and_training_equals_no_workers(tmp_path, blobs, loads):
    ref_losses, ref_vals, ref_ck, _ = _run(_config(tmp_path, blobs, "w0", 0))
    ref_loads = loads()
    assert len(ref_loads) == 5 and len(set(ref_loads)) == 5  # one process: every subject once

    losses, vals, ck, trainer = _run(_config(tmp_path, blobs, "w2", 2))
    got = loads()[len(ref_loads):]
    [val_file] = trainer.val_ds.images
    per_process = Counter(got)
    assert max(per_process.values()) == 1, per_process  # nothing read twice in one process
    # 12 steps = 3 epochs of the 4 training subjects and 3 validations of the fifth: fresh workers every epoch and
    # every validation read 3 x 4 + 3 = 15 times in 9 processes; kept workers at most 2 x 4 + 1 (2 + 1 processes)
    train = [(p, f) for p, f in got if f != val_file]
    assert len(train) <= 2 * 4 and len({p for p, _ in train}) <= 2, got
    assert [f for _, f in got].count(val_file) == 1
    assert os.getpid() not in {int(p) for p, _ in got}  # the workers read, not this process
    assert not any(_alive(int(p)) for p, _ in got)  # and fit ended them
    # the same batches and seeds: bitwise the losses, metrics and weights of num_workers=0
    assert losses == ref_losses and len(losses) == 12
    assert [{k: v for k, v in r.items() if k != "time"} for r in vals] == \
        [{k: v for k, v in r.items() if k != "time"} for r in ref_vals] and len(vals) == 3
    for k, v in ref_ck["model"].items():
        assert torch.equal(ck["model"][k], v), k
    # the global torch RNG after 3 validations as with a new loader each time (one draw each)
    assert torch.equal(ck["rng"]["torch"], ref_ck["rng"]["torch"])


def test_resume_with_workers_is_exact(tmp_path, blobs):
    ref_losses, _, ref_ck, _ = _run(_config(tmp_path, blobs, "full", 0))
    part = _config(tmp_path, blobs, "part", 2)
    Trainer(part).fit(stop_after=6)  # mid-epoch (4 batches per epoch): the kept workers are left mid-epoch
    part.trainer.resume = "auto"
    losses, _, ck, _ = _run(part)
    assert losses == ref_losses
    for k, v in ref_ck["model"].items():
        assert torch.equal(ck["model"][k], v), k


def test_a_failing_fit_ends_its_workers(tmp_path, blobs, loads, monkeypatch):
    step = SegmentationTask.training_step
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # in the second epoch, after a validation
            raise RuntimeError("boom")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(SegmentationTask, "training_step", failing)
    trainer = Trainer(_config(tmp_path, blobs, "fail", 2))
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit()
    pids = {int(p) for p, _ in loads()}
    assert pids and not any(map(_alive, pids))
    assert trainer._train_loader is None and trainer._val_loader is None
