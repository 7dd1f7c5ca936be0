"""Trainer: exact resume after an interruption, atomic checkpoints, NaN stop naming step and files, logs
and plots, and a short end-to-end training on tiny synthetic data that lowers the loss."""

import json

import pytest
import torch
from torch import nn

from medfast.data.synthetic import make_blobs
from medfast.train import (
    NonFiniteLossError,
    Task,
    Trainer,
    load_checkpoint,
    load_config,
    save_checkpoint,
    save_config,
)


def _config(tmp_path, data_dir, out="run", **extra):
    overrides = [
        f"data.root={data_dir}", f"trainer.out_dir={tmp_path / out}", "trainer.batch_size=2",
        "trainer.max_steps=6", "trainer.val_every=0", "trainer.checkpoint_every=2", "trainer.progress=false",
        "trainer.tensorboard=false", "trainer.plots=false", "model.channels=[4, 8]", "model.out_channels=3",
        "augment.patch_size=[12, 12, 12]", "augment.deform_grid=3", "optim.lr=0.01", "trainer.threads=1",
    ]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config([], overrides)


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blobs")
    make_blobs(folder, n=3, shape=(16, 16, 16), classes=3)
    return folder


def _losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def test_resume_reproduces_the_uninterrupted_losses(tmp_path, blobs):
    full = _config(tmp_path, blobs, "full", **{"trainer.accumulate": 2})
    Trainer(full).fit()
    steps, ref = _losses(tmp_path / "full")
    assert steps == list(range(1, 7))

    part = _config(tmp_path, blobs, "part", **{"trainer.accumulate": 2})
    Trainer(part).fit(stop_after=3)  # "killed" after step 3 (a checkpoint at 3 as on any stop)
    ck = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert ck["step"] == 3 and {"model", "optimizer", "scheduler", "scaler", "rng", "epoch"} <= set(ck)
    # simulate log lines written after the checkpoint by the killed process: resume must cut them
    with open(tmp_path / "part" / "train_log.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
    resumed = _config(tmp_path, blobs, "part", **{"trainer.accumulate": 2, "trainer.resume": "auto"})
    Trainer(resumed).fit()
    steps2, got = _losses(tmp_path / "part")
    assert steps2 == steps
    assert got == ref  # bitwise: same data order, augmentation seeds, optimizer and schedule state
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_outputs_logs_plots_and_loss_decreases(tmp_path, blobs):
    cfg = _config(tmp_path, blobs, "e2e", **{"trainer.max_steps": 30, "trainer.val_every": 15,
                                             "trainer.plots": "true", "trainer.checkpoint_every": 10,
                                             "data.val_deformations": 1, "optim.lr": 0.02,
                                             "trainer.keep_checkpoints": 1})
    results = Trainer(cfg).fit()
    out = tmp_path / "e2e"
    for name in ("config.yaml", "train_log.csv", "train_log.jsonl", "val_log.csv", "curves.png", "results.json",
                 "checkpoints/last.pt", "checkpoints/step_0000030.pt", "samples_step0000030.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*.pt")) == ["step_0000030.pt"]
    assert not list((out / "checkpoints").glob("*.tmp"))
    _, losses = _losses(out)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, (first, last)
    assert 0 <= results["validation"]["dice_mean"] <= 1
    assert json.loads((out / "results.json").read_text())["step"] == 30
    assert load_config([out / "config.yaml"]).trainer.max_steps == 30


def test_atomic_checkpoint_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}}, path)
    with pytest.raises(Exception):  # noqa: B017 - any pickling error
        save_checkpoint({"model": {"w": torch.zeros(2)}, "bad": lambda: 0}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_checkpoint(tmp_path / "nothere.pt")


class _NaNTask(Task):
    """A linear model whose loss becomes NaN at the third step."""

    def build_model(self):
        return nn.Linear(3, 1)

    def build_datasets(self):
        items = [{"x": torch.full((3,), float(i)), "files": f"subject_{i}.nii.gz"} for i in range(4)]

        class DS(torch.utils.data.Dataset):
            def __len__(self):
                return 4

            def __getitem__(self, key):
                i, seed = key
                return {**items[i], "seed": seed}

        return DS(), None

    def __init__(self, config):
        super().__init__(config)
        self.calls = 0

    def training_step(self, model, batch, device):
        self.calls += 1
        loss = model(batch["x"].to(device)).pow(2).mean()
        if self.calls == 3:
            loss = loss * float("nan")
        return loss, {}


def test_nan_loss_stops_with_step_and_files(tmp_path):
    cfg = load_config([], [f"trainer.out_dir={tmp_path / 'nan'}", "trainer.progress=false", "trainer.max_steps=5",
                           "trainer.tensorboard=false", "trainer.val_every=0", "trainer.batch_size=2"])
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*subject_\d\.nii\.gz, subject_\d\.nii\.gz"):
        Trainer(cfg, _NaNTask(cfg)).fit()


def test_bad_trainer_settings(tmp_path):
    cfg = load_config([], [f"trainer.out_dir={tmp_path}", "trainer.amp=fp8"])
    with pytest.raises(ValueError, match="trainer.amp"):
        Trainer(cfg, _NaNTask(cfg))
    cfg = load_config([], [f"trainer.out_dir={tmp_path}", "trainer.max_steps=0"])
    with pytest.raises(ValueError, match="max_steps"):
        Trainer(cfg, _NaNTask(cfg))
    with pytest.raises(ValueError, match="unknown task"):
        Trainer(load_config([], ["task=nosuchtask"]))


def test_sigkilled_run_resumes_with_the_same_losses(tmp_path, blobs):
    """A real kill -9 of `medfast train` between checkpoints, then `--resume`: same losses as uninterrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    extra = {"trainer.max_steps": 20, "trainer.checkpoint_every": 1, "model.channels": "[2, 4]",
             "augment.patch_size": "[8, 8, 8]"}
    Trainer(_config(tmp_path, blobs, "ref", **extra)).fit()
    _, ref = _losses(tmp_path / "ref")
    out = tmp_path / "killed"
    cfg = _config(tmp_path, blobs, "killed", **extra)
    save_config(cfg, tmp_path / "killed.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "medfast", "train", str(tmp_path / "killed.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    ck = out / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ck.is_file():
            try:
                if load_checkpoint(ck)["step"] >= 3:
                    break
            except (ValueError, FileNotFoundError):
                pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    killed_at = load_checkpoint(ck)["step"]
    assert 3 <= killed_at < 20
    cfg.trainer.resume = "auto"
    Trainer(cfg).fit()
    steps, got = _losses(out)
    assert steps == list(range(1, 21)) and got == ref


def test_gradient_accumulation_equals_the_larger_batch(tmp_path, blobs):
    """batch 1 x accumulate 2 takes the same subjects/augmentations as batch 2: same parameters.
    Plain SGD: Adam divides by the gradient's running RMS, so parameters with near-zero gradients would
    turn reduction-order rounding into lr-sized differences."""
    sgd = {"optim.name": "sgd", "trainer.max_steps": 3}
    a = Trainer(_config(tmp_path, blobs, "acc", **{"trainer.batch_size": 1, "trainer.accumulate": 2, **sgd}))
    a.fit()
    b = Trainer(_config(tmp_path, blobs, "big", **{"trainer.batch_size": 2, **sgd}))
    b.fit()
    for k, v in b.model.state_dict().items():
        torch.testing.assert_close(a.model.state_dict()[k], v, rtol=1e-4, atol=2e-5)


def test_deep_supervision_and_2d_training(tmp_path):
    data = tmp_path / "d2"
    make_blobs(data, n=2, shape=(24, 20), classes=3)
    cfg = load_config([], [
        f"data.root={data}", f"trainer.out_dir={tmp_path / 'r2'}", "trainer.max_steps=4", "trainer.val_every=4",
        "trainer.progress=false", "trainer.tensorboard=false", "model.spatial_dims=2", "model.channels=[4, 8, 16]",
        "model.out_channels=3", "model.deep_supervision=true", "augment.patch_size=[16, 16]", "augment.deform_grid=3",
        "data.val_deformations=1", "trainer.threads=1",
    ])
    res = Trainer(cfg).fit()
    assert res["finished"] and 0 <= res["validation"]["dice_mean"] <= 1
    assert (tmp_path / "r2" / "samples_step0000004.png").is_file()


def _lrs(out_dir):
    rows = [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]
    return [r["lr"] for r in rows]


def test_resume_with_more_steps_follows_the_new_schedule(tmp_path, blobs):
    # the optimizer's saved lr is the old schedule's at its last step; the resumed steps must take the
    # new schedule's (the lr is a function of the step), from the first resumed step on
    Trainer(_config(tmp_path, blobs, "short", **{"trainer.max_steps": 4})).fit()
    Trainer(_config(tmp_path, blobs, "short", **{"trainer.max_steps": 6, "trainer.resume": "auto"})).fit()
    Trainer(_config(tmp_path, blobs, "long")).fit()  # max_steps 6 from the start
    assert _lrs(tmp_path / "short")[4:] == pytest.approx(_lrs(tmp_path / "long")[4:])


def _recorded_fit(cfg, stop_after=None):
    """Trains ``cfg``; returns the trainer and the sample seeds of its micro-batches in order (each names one
    position of one epoch's permutation: the data the run took)."""
    trainer = Trainer(cfg)
    seeds: list[int] = []
    step = trainer.task.training_step

    def recording(model, batch, device, **kwargs):
        seeds.extend(int(s) for s in batch["seed"])
        return step(model, batch, device, **kwargs)

    trainer.task.training_step = recording
    trainer.fit(stop_after=stop_after)
    return trainer, seeds


def test_resume_with_another_accumulate_or_batch_size_continues_the_data(tmp_path, capsys):
    # (a bug hunt: the data restarted at step * the new accumulate, skipping 3 epochs of 3 subjects here; the
    # checkpoint's micro_batches was never read)
    data = tmp_path / "five"
    make_blobs(data, n=5, shape=(12, 12, 12), classes=3)
    common = {"trainer.batch_size": 1, "model.channels": "[2, 4]", "augment.patch_size": "[8, 8, 8]",
              "trainer.checkpoint_every": 1}
    _, ref = _recorded_fit(_config(tmp_path, data, "ref", **common, **{"trainer.max_steps": 10}))
    # (epochs of 5 samples at batch 1; of 4 at batch 1 x accumulate 2 or at batch 2: each a prefix of the same
    # per-epoch permutation)
    _, first = _recorded_fit(_config(tmp_path, data, "run", **common), stop_after=3)
    assert first == ref[:3]
    resumed = {"trainer.resume": "auto", "trainer.max_steps": 4}
    trainer, second = _recorded_fit(_config(tmp_path, data, "run", **common, **resumed, **{"trainer.accumulate": 2}))
    # epoch 0 position 3, then epoch 1 position 0 (position 4 is past the 4-sample epoch of accumulate 2)
    assert second == [ref[3], ref[5]]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["micro_batches"] == 5  # 4 + 1 (epoch 1)
    assert "epoch 0, sample 3 of the epoch" in capsys.readouterr().out
    resumed = {"trainer.resume": "auto", "trainer.max_steps": 5, "trainer.batch_size": 2}
    _, third = _recorded_fit(_config(tmp_path, data, "run", **{**common, **resumed}))
    # epoch 1 position 1 is inside a batch of 2: it starts at position 2, skipping one sample, and says so
    assert third == [ref[7], ref[8]]
    assert "epoch 1, sample 2 of the epoch, skipping 1 sample(s)" in capsys.readouterr().out
    steps, _ = _losses(tmp_path / "run")
    assert steps == [1, 2, 3, 4, 5]
