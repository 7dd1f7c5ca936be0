"""Trainer: exact resume after an interruption, atomic checkpoints, NaN stop naming step and files, logs
and plots, and a short end-to-end training on tiny synthetic data that lowers the loss."""

import json
from pathlib import Path

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
from tests.conftest import default_dtype


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
    assert not list((out / "checkpoints").glob("*.tmp*"))  # replacing: .{pid}.{hex}.tmp.last.pt
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
    trainer = Trainer(cfg, _NaNTask(cfg))
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*subject_\d\.nii\.gz, subject_\d\.nii\.gz"):
        trainer.fit()
    # the check comes after the backward but before the optimizer step: the NaN never reached the weights
    assert trainer.step == 2 and all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_nan_loss_under_anomaly_detection_is_still_named(tmp_path):
    # the check runs after the backward, but anomaly mode raises inside the backward of a NaN: checked before it
    cfg = load_config([], [f"trainer.out_dir={tmp_path / 'nan'}", "trainer.progress=false", "trainer.max_steps=5",
                           "trainer.tensorboard=false", "trainer.val_every=0", "trainer.batch_size=2"])
    with torch.autograd.set_detect_anomaly(True), pytest.raises(NonFiniteLossError, match="step 3"):
        Trainer(cfg, _NaNTask(cfg)).fit()


def test_a_new_log_column_rewrites_the_csv_once(tmp_path, monkeypatch):
    # a run resumed from a log without a newer column (data_seconds) rewrote the whole CSV at every step
    from medfast.train.trainer import _Log

    old = [{"step": i, "loss": 1.0 / i, "seconds": 0.1} for i in range(1, 6)]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    log = _Log(tmp_path, "train_log")
    log.restore(5)
    writes = []
    write = _Log._write_csv
    monkeypatch.setattr(_Log, "_write_csv", lambda self: (writes.append(1), write(self)))
    for i in range(6, 10):
        log.append({"step": i, "loss": 0.5, "seconds": 0.1, "data_seconds": 0.01})
    assert len(writes) == 1
    lines = (tmp_path / "train_log.csv").read_text().splitlines()
    assert lines[0] == "step,loss,seconds,data_seconds" and len(lines) == 10 and lines[-1] == "9,0.5,0.1,0.01"


def test_nan_in_one_micro_batch_names_that_batch(tmp_path):
    cfg = load_config([], [f"trainer.out_dir={tmp_path / 'nan'}", "trainer.progress=false", "trainer.max_steps=5",
                           "trainer.tensorboard=false", "trainer.val_every=0", "trainer.batch_size=1",
                           "trainer.accumulate=2"])
    task = _NaNTask(cfg)  # the 3rd call: step 2's first micro-batch
    trainer = Trainer(cfg, task)
    bad = r"\(nan\) at step 2 .*batch files: subject_\d\.nii\.gz\. Lower"
    with pytest.raises(NonFiniteLossError, match=bad) as info:
        trainer.fit()
    assert task.calls == 4  # both micro-batches ran; the message names the first one's file (one file a batch)
    assert str(info.value).count(".nii.gz") == 1


class _StateTask(_NaNTask):
    """Records the process' torch threads and determinism at each training step."""

    def __init__(self, config):
        super().__init__(config)
        self.seen = []

    def training_step(self, model, batch, device):
        self.seen.append((torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()))
        return model(batch["x"].to(device)).pow(2).mean(), {}


def _torch_state():
    return (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())


def test_fit_sets_threads_and_determinism_for_itself_only(tmp_path):
    """trainer.threads and trainer.deterministic hold during fit; the caller's settings come back afterwards (also
    after an error), so that a later fit with deterministic: false is not deterministic."""
    def cfg(name, *extra):
        return load_config([], [f"trainer.out_dir={tmp_path / name}", "trainer.progress=false", "trainer.max_steps=2",
                                "trainer.tensorboard=false", "trainer.val_every=0", "trainer.batch_size=2", *extra])

    caller = _torch_state()
    try:
        torch.set_num_threads(2)
        torch.use_deterministic_algorithms(False)
        c = cfg("a", "trainer.threads=1", "trainer.deterministic=true")
        Trainer(c, task := _StateTask(c)).fit()
        assert task.seen == [(1, True)] * 2
        assert _torch_state() == (2, False, False)
        # a caller that is deterministic (warn only); a run that is not, with the caller's threads (threads: null)
        torch.use_deterministic_algorithms(True, warn_only=True)
        c = cfg("b", "trainer.deterministic=false")
        Trainer(c, task := _StateTask(c)).fit()
        assert task.seen == [(2, False)] * 2
        assert _torch_state() == (2, True, True)
        c = cfg("c", "trainer.threads=1", "trainer.deterministic=true", "trainer.max_steps=5")
        with pytest.raises(NonFiniteLossError):  # (at step 3)
            Trainer(c, _NaNTask(c)).fit()
        assert _torch_state() == (2, True, True)
    finally:
        torch.set_num_threads(caller[0])
        torch.use_deterministic_algorithms(caller[1], warn_only=caller[2])


def test_bad_trainer_settings(tmp_path):
    cfg = load_config([], [f"trainer.out_dir={tmp_path}", "trainer.amp=fp8"])
    with pytest.raises(ValueError, match="trainer.amp"):
        Trainer(cfg, _NaNTask(cfg))
    cfg = load_config([], [f"trainer.out_dir={tmp_path}", "trainer.max_steps=0"])
    with pytest.raises(ValueError, match="max_steps"):
        Trainer(cfg, _NaNTask(cfg))
    with pytest.raises(ValueError, match="unknown task"):
        Trainer(load_config([], ["task=nosuchtask"]))


def _kill_after_checkpoint(proc, ck, step, deadline):
    """SIGKILL the training subprocess once its checkpoint ``ck`` holds ``step`` or later (or at ``deadline``);
    the step it was killed at."""
    import signal
    import time

    while time.time() < deadline and proc.poll() is None:
        try:
            if ck.is_file() and load_checkpoint(ck)["step"] >= step:
                break
        except (ValueError, FileNotFoundError):  # (a checkpoint being replaced)
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    return load_checkpoint(ck)["step"]


def test_sigkilled_run_resumes_with_the_same_losses(tmp_path, blobs):
    """A real kill -9 of `medfast train` between checkpoints, then `--resume`: same losses as uninterrupted."""
    import os
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
    killed_at = _kill_after_checkpoint(proc, ck, 3, deadline)
    assert 3 <= killed_at < 20
    cfg.trainer.resume = "auto"
    Trainer(cfg).fit()
    steps, got = _losses(out)
    assert steps == list(range(1, 21)) and got == ref


def test_log_every_keeps_the_first_and_last_steps(tmp_path, blobs):
    # results' first_loss (the CLI's "loss X -> Y") was the loss of step log_every, not of step 1
    every = Trainer(_config(tmp_path, blobs, "e1", **{"trainer.max_steps": 4})).fit()
    sparse = Trainer(_config(tmp_path, blobs, "e3", **{"trainer.max_steps": 4, "trainer.log_every": 3})).fit()
    assert _losses(tmp_path / "e3")[0] == [1, 3, 4]
    assert sparse["first_loss"] == every["first_loss"] and sparse["last_loss"] == every["last_loss"]


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


# ------------------------------------------------------------------------------------------------------
# the artefacts of a run (a bug hunt: config.yaml of a preset, TensorBoard after a resume, a kill between the
# two checkpoint files, a resumed finished run, two runs in one folder, NaN in JSON, seconds after validation)
# ------------------------------------------------------------------------------------------------------

_TINY = {"model.channels": "[2, 4]", "augment.patch_size": "[8, 8, 8]"}


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_config_yaml_of_a_preset_is_the_given_config(tmp_path, monkeypatch):
    # the preset's file lists (under the run's out_dir) were saved in config.yaml: training from it read the old
    # run's folder, ignored data.dataset_args and failed once that folder was moved
    from medfast.data import find_pairs, presets

    def tiny_blobs(folder, n=3):
        make_blobs(folder, n=n, shape=(12, 12, 12), classes=3)
        images, labels = find_pairs(folder)
        return {"train_images": images, "train_labels": labels}

    monkeypatch.setattr(presets, "__all__", [*presets.__all__, "tiny_blobs"])
    monkeypatch.setattr(presets, "tiny_blobs", tiny_blobs, raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = _config(tmp_path, "unused", "a", **_TINY, **{"data.root": "null", "data.dataset": "tiny_blobs",
                                                        "trainer.out_dir": "runs/a", "trainer.max_steps": 1})
    Trainer(cfg).fit()
    saved = load_config([tmp_path / "runs" / "a" / "config.yaml"])
    assert saved.data.dataset == "tiny_blobs" and saved.data.train_images == [] and saved.data.train_labels == []
    # the checkpoint's config is the resolved one (the files the network was trained on)
    assert load_checkpoint(tmp_path / "runs" / "a" / "checkpoints" / "last.pt")["config"]["data"]["train_images"]
    (tmp_path / "runs" / "a").rename(tmp_path / "runs" / "moved")
    again = load_config([tmp_path / "runs" / "moved" / "config.yaml"],
                        ["trainer.out_dir=runs/b", "data.dataset_args={n: 2}"])
    trainer = Trainer(again)
    trainer.fit()
    assert [Path(p).name for p in trainer.config.data.train_images] == ["case_000.nii.gz", "case_001.nii.gz"]
    assert all(Path(p).is_relative_to("runs/b") for p in trainer.config.data.train_images)


def _interrupt_at(trainer, call):
    """Raises KeyboardInterrupt in ``trainer``'s ``call``-th training step (one call per step here)."""
    step, calls = trainer.task.training_step, [0]

    def interrupted(model, batch, device, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return step(model, batch, device, **kwargs)

    trainer.task.training_step = interrupted
    return trainer


def test_tensorboard_has_each_step_once_after_a_resume_or_a_new_run(tmp_path, blobs):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def tb_steps(out):
        ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
        ea.Reload()
        return [e.step for e in ea.Scalars("train/loss")]

    extra = {**_TINY, "trainer.tensorboard": "true", "trainer.max_steps": 5, "trainer.checkpoint_every": 2}
    # killed in step 4 (step 3 logged, the last checkpoint at step 2): step 3 was there twice
    with pytest.raises(KeyboardInterrupt):
        _interrupt_at(Trainer(_config(tmp_path, blobs, "r", **extra)), 4).fit()
    Trainer(_config(tmp_path, blobs, "r", **extra, **{"trainer.resume": "auto"})).fit()
    assert tb_steps(tmp_path / "r") == [1, 2, 3, 4, 5] == _losses(tmp_path / "r")[0]
    # killed before its first checkpoint, then a new run in the folder: step 1 of the first run stayed
    extra["trainer.checkpoint_every"] = 10
    with pytest.raises(KeyboardInterrupt):
        _interrupt_at(Trainer(_config(tmp_path, blobs, "n", **extra)), 3).fit()
    assert not (tmp_path / "n" / "checkpoints").exists()
    Trainer(_config(tmp_path, blobs, "n", **extra)).fit()
    assert tb_steps(tmp_path / "n") == [1, 2, 3, 4, 5]


def test_resume_after_a_kill_between_the_step_file_and_last_pt(tmp_path, blobs, monkeypatch, capsys):
    # each checkpoint is written as step_XXXXXXX.pt, then last.pt; a kill between the two left a run that --resume
    # refused (no last.pt: "continue with --resume") or silently continued from the older last.pt
    import medfast.train.trainer as T

    extra = {**_TINY, "trainer.checkpoint_every": 2}
    Trainer(_config(tmp_path, blobs, "ref", **extra)).fit()
    real_save = T.save_checkpoint

    def killed_at(step):
        def save(state, path):
            if state["step"] == step and Path(path).name == "last.pt":
                raise KeyboardInterrupt
            return real_save(state, path)

        return save

    monkeypatch.setattr(T, "save_checkpoint", killed_at(2))  # at the first checkpoint: no last.pt
    with pytest.raises(KeyboardInterrupt):
        Trainer(_config(tmp_path, blobs, "run", **extra)).fit()
    ckdir = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["step_0000002.pt"]
    monkeypatch.setattr(T, "save_checkpoint", killed_at(6))  # at a later one: last.pt is at step 4
    capsys.readouterr()
    resumed = _config(tmp_path, blobs, "run", **extra, **{"trainer.resume": "auto"})
    with pytest.raises(KeyboardInterrupt):
        Trainer(resumed).fit()
    out = capsys.readouterr().out
    assert "step_0000002.pt (step 2) is the newest checkpoint (there is no last.pt" in out
    assert f"resumed from {ckdir / 'step_0000002.pt'} at step 2" in out
    assert load_checkpoint(ckdir / "last.pt")["step"] == 4 and (ckdir / "step_0000006.pt").is_file()
    assert not (tmp_path / "run" / "results.json").exists()
    monkeypatch.setattr(T, "save_checkpoint", real_save)
    Trainer(resumed).fit()  # ends the run: no step left, the results written
    out = capsys.readouterr().out
    assert "step_0000006.pt (step 6) is the newest checkpoint (last.pt is at step 4" in out
    assert f"resumed from {ckdir / 'step_0000006.pt'} at step 6" in out
    assert json.loads((tmp_path / "run" / "results.json").read_text())["finished"]
    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref")  # steps 1..6 once, the uninterrupted losses


def test_resume_of_a_finished_run_leaves_it_as_it_is(tmp_path, blobs, capsys):
    # a job script that always passes --resume, re-queued after the run ended: results.json lost its
    # "validation" ({}), its "seconds" were rewritten and the test set was evaluated again
    extra = {**_TINY, "trainer.max_steps": 2, "trainer.val_every": 2, "data.val_fraction": 0.34}
    Trainer(_config(tmp_path, blobs, "fin", **extra)).fit()
    out = tmp_path / "fin"
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    validation = _strict_json(files[out / "results.json"].decode())["validation"]
    assert "dice_mean" in validation
    capsys.readouterr()
    again = Trainer(_config(tmp_path, blobs, "fin", **extra, **{"trainer.resume": "auto"})).fit()
    assert "already reached trainer.max_steps=2" in capsys.readouterr().out
    assert again == _strict_json(files[out / "results.json"].decode())
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files  # nothing rewritten
    # a run killed after its last checkpoint, before results.json: the resume ends it, with the last validation
    (out / "results.json").unlink()
    ended = Trainer(_config(tmp_path, blobs, "fin", **extra, **{"trainer.resume": "auto"})).fit()
    assert ended["finished"] and ended["validation"] == validation


def test_a_second_run_in_the_same_folder_is_refused(tmp_path, blobs):
    import os

    from medfast.train import ConfigError
    from medfast.train.trainer import LOCK_NAME, _lock_out_dir, _unlock_out_dir

    out = tmp_path / "twin"
    held = _lock_out_dir(out)  # another run in the folder (flock: another open file, even in this process)
    try:
        with pytest.raises(ConfigError, match=rf"{out} is in use by another medfast train \(pid {os.getpid()} on"):
            Trainer(_config(tmp_path, blobs, "twin", **_TINY)).fit()
    finally:
        _unlock_out_dir(held)
    assert not out.exists()  # the folder it created is removed with the lock
    # released on an error (here Ctrl-C), and the file a killed run leaves (no lock held) blocks nothing
    with pytest.raises(KeyboardInterrupt):
        _interrupt_at(Trainer(_config(tmp_path, blobs, "twin", **_TINY)), 3).fit()
    assert not (out / LOCK_NAME).exists()
    (out / LOCK_NAME).write_text("pid 999999 on elsewhere, since yesterday\n")
    assert Trainer(_config(tmp_path, blobs, "twin", **_TINY, **{"trainer.resume": "auto"})).fit()["finished"]
    assert not (out / LOCK_NAME).exists()


class _NaNMetricTask(_NaNTask):
    """A validation metric and a result that are NaN (e.g. the recall of a class absent from the validation set)."""

    def training_step(self, model, batch, device):
        return model(batch["x"].to(device)).pow(2).mean(), {"train_metric": float("nan")}

    def build_datasets(self):
        train, _ = super().build_datasets()
        return train, [{"x": torch.zeros(3), "files": "v.nii.gz"}]

    def validation_step(self, model, batch, device):
        return [{"recall_absent": float("nan"), "accuracy": 0.5}]

    def finish(self, model, device, out_dir):
        return {"test": {"score": float("nan"), "values": [1.0, float("inf")]}}


def test_nan_metrics_are_written_as_null(tmp_path):
    cfg = load_config([], [f"trainer.out_dir={tmp_path / 'nan'}", "trainer.progress=false", "trainer.max_steps=2",
                           "trainer.tensorboard=false", "trainer.val_every=2", "trainer.batch_size=2",
                           "trainer.plots=false"])
    Trainer(cfg, _NaNMetricTask(cfg)).fit()
    out = tmp_path / "nan"
    results = _strict_json((out / "results.json").read_text())
    assert results["validation"] == {"accuracy": 0.5, "recall_absent": None}
    assert results["test"] == {"score": None, "values": [1.0, None]}
    val = [_strict_json(line) for line in (out / "val_log.jsonl").read_text().splitlines()]
    assert val == [{"step": 2, "epoch": 0, "accuracy": 0.5, "recall_absent": None}]
    train = [_strict_json(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["train_metric"] for r in train] == [None, None]
    assert (out / "val_log.csv").read_text().splitlines()[1] == "2,0,0.5,"  # an empty cell, as after a resume


def test_segmentation_test_results_write_nan_dice_as_null(tmp_path, blobs, monkeypatch):
    import medfast.metrics

    # a class absent from both the prediction and the label has a NaN Dice (forced here: the prediction of an
    # untrained network is not)
    monkeypatch.setattr(medfast.metrics, "dice", lambda *a, **k: torch.tensor([[float("nan"), 0.5]]))
    image, label = sorted((blobs / "images").iterdir())[0], sorted((blobs / "labels").iterdir())[0]
    cfg = _config(tmp_path, blobs, "seg", **_TINY, **{"trainer.max_steps": 1, "data.test_images": f"[{image}]",
                                                      "data.test_labels": f"[{label}]"})
    results = Trainer(cfg).fit()
    saved = _strict_json((tmp_path / "seg" / "test_results.json").read_text())
    assert saved["test"][0]["dice"] == [None, 0.5] and saved["test_dice_mean"] == 0.5
    assert _strict_json((tmp_path / "seg" / "results.json").read_text())["test"][0]["dice"] == [None, 0.5]
    assert results["test_dice_mean"] == 0.5


def test_seconds_is_the_time_of_the_step_itself(tmp_path, blobs):
    # the step after a validation counted the validation, the checkpoint and the plots too
    import time

    pause = 1.0
    trainer = Trainer(_config(tmp_path, blobs, "sec", **_TINY, **{"trainer.max_steps": 4, "trainer.val_every": 2,
                                                                  "data.val_fraction": 0.34}))
    validation_step = trainer.task.validation_step

    def slow(*args, **kwargs):
        time.sleep(pause)
        return validation_step(*args, **kwargs)

    trainer.task.validation_step = slow
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "sec" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["seconds"] < pause, rows  # step 3, after the validation of step 2


def test_data_seconds_is_the_wait_for_the_batches(tmp_path, blobs):
    # a slow data set shows in data_seconds (part of seconds), so a data-bound run can be told from a slow model
    import time

    pause = 0.3
    trainer = Trainer(_config(tmp_path, blobs, "data_s", **_TINY, **{"trainer.max_steps": 3}))
    build = trainer.task.build_datasets

    def slow_datasets():
        train, val = build()
        get = type(train).__getitem__

        class Slow(type(train)):
            def __getitem__(self, key):
                time.sleep(pause)
                return get(self, key)

        train.__class__ = Slow
        return train, val

    trainer.task.build_datasets = slow_datasets
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "data_s" / "train_log.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:
        batch = trainer.config.trainer.batch_size
        assert batch * pause <= r["data_seconds"] <= r["seconds"], r


def _emulate_cuda_amp(monkeypatch):
    """The trainer's CUDA mixed-precision path on the CPU: resolve_amp gives the dtype asked for, and the
    float16 GradScaler is a CPU one (the same logic as the CUDA scaler)."""
    import medfast.train.trainer as T

    class CPUScaler(torch.amp.GradScaler):
        def __init__(self, device="cuda", *args, **kwargs):
            super().__init__("cpu", *args, **kwargs)

    monkeypatch.setattr(T.torch.amp, "GradScaler", CPUScaler)
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    monkeypatch.setattr(T, "resolve_amp", lambda name, device: dtypes.get(name))


def test_a_run_without_loss_scaling_resumes_with_amp_fp16(tmp_path, blobs, monkeypatch, capsys):
    # a run trained without float16 loss scaling (CPU / amp none or bf16) saved the disabled scaler's {}; a resume
    # with amp=fp16 (e.g. on a GPU without bf16) was refused ("The source state dict is empty")
    extra = {**_TINY, "trainer.max_steps": 2}
    Trainer(_config(tmp_path, blobs, "mixed", **extra)).fit()
    assert load_checkpoint(tmp_path / "mixed" / "checkpoints" / "last.pt")["scaler"] == {}
    _emulate_cuda_amp(monkeypatch)
    capsys.readouterr()
    extra.update({"trainer.max_steps": 4, "trainer.amp": "fp16", "trainer.resume": "auto"})
    result = Trainer(_config(tmp_path, blobs, "mixed", **extra)).fit()
    assert result["step"] == 4 and result["amp"] == "float16"
    assert "no gradient-scaler state" in capsys.readouterr().out
    scaler = load_checkpoint(tmp_path / "mixed" / "checkpoints" / "last.pt")["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] >= 1  # the fresh scaler took the fp16 steps


def test_amp_auto_is_bf16_only_where_the_runs_gpu_has_it(monkeypatch):
    # torch.cuda.is_bf16_supported() counts emulation (True on a V100 / T4) and asks the current GPU, not the run's
    import medfast.train.trainer as T

    asked = []

    def capability(device=None):
        asked.append(device)
        return {0: (9, 0), 1: (7, 0), 2: (7, 5), 3: (8, 6)}[torch.device(device).index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    got = {i: T.resolve_amp("auto", torch.device("cuda", i)) for i in range(4)}
    assert got == {0: torch.bfloat16, 1: torch.float16, 2: torch.float16, 3: torch.bfloat16}
    assert asked == [torch.device("cuda", i) for i in range(4)]
    assert T.resolve_amp("bf16", torch.device("cuda", 1)) == torch.bfloat16  # asked for explicitly: as asked
    assert T.resolve_amp("fp16", torch.device("cuda", 0)) == torch.float16
    assert T.resolve_amp("auto", torch.device("cpu")) is None


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_sliding_window_does_not_depend_on_the_default_dtype(mode):
    """The blending weights and sums are float32 as documented: under torch.set_default_dtype(torch.float64) the
    output is the float32 default's, bitwise and in dtype (it was float64, its weights computed in float64)."""
    from medfast.train.sliding_window import importance_map, sliding_window_inference

    x = torch.rand(1, 2, 20, 18, generator=torch.Generator().manual_seed(0))
    conv = nn.Conv2d(2, 3, 3, padding=1)

    def run():
        return importance_map((8, 6), mode), sliding_window_inference(x, (8, 6), conv, mode=mode, overlap=0.4)

    with torch.no_grad():
        ref = run()
        with default_dtype(torch.float64):
            got = run()
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


def test_per_class_metrics_in_class_order_and_a_readable_curves_figure(tmp_path):
    # 117 classes (TotalSegmentator): string order put dice_1, dice_10, dice_100, ... before dice_2
    # in the logs and results, and curves.png drew a 117-entry legend taller than the figure
    import warnings

    pytest.importorskip("matplotlib")
    from medfast.train.trainer import _mean_metrics, metric_order, plot_curves

    rows = [{**{f"dice_{c}": 0.01 * c for c in range(1, 118)}, "dice_mean": 0.5, "hd95_mean": 3.0,
             "hd95_1": 1.0, "hd95_10": 2.0, "hd95_2": 4.0}]
    keys = list(_mean_metrics(rows))
    assert keys[:4] == ["dice_1", "dice_2", "dice_3", "dice_4"] and keys.index("dice_117") == 116
    assert keys[117:] == ["dice_mean", "hd95_1", "hd95_2", "hd95_10", "hd95_mean"]
    assert sorted(["a10b2", "a2b10", "a2b2", "a10"], key=metric_order) == ["a2b2", "a2b10", "a10", "a10b2"]
    metrics = _mean_metrics(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib: "Tight layout not applied" with the 117-entry legend
        path = plot_curves([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}],
                           [{"step": 1, **metrics}, {"step": 2, **metrics}], tmp_path / "curves.png")
    assert path is not None and path.stat().st_size > 0


def test_resume_applies_this_runs_optimizer_settings(tmp_path, blobs):
    """optim.lr / weight_decay / betas changed on resume: load_state_dict brought back the saved run's, so the new
    ones were ignored while config.yaml recorded them. The resumed steps follow this run's settings."""
    Trainer(_config(tmp_path, blobs, "a", **{"trainer.max_steps": 4})).fit(stop_after=2)
    changed = {"optim.lr": 0.5, "optim.weight_decay": 0.3, "optim.betas": "[0.5, 0.6]", "trainer.max_steps": 4}
    trainer = Trainer(_config(tmp_path, blobs, "a", **changed, **{"trainer.resume": "auto"}))
    trainer.fit()
    group = trainer.optimizer.param_groups[0]
    assert (group["initial_lr"], group["weight_decay"], group["betas"]) == (0.5, 0.3, (0.5, 0.6))
    Trainer(_config(tmp_path, blobs, "b", **changed)).fit()  # the new settings from the start
    assert _lrs(tmp_path / "a")[2:] == pytest.approx(_lrs(tmp_path / "b")[2:])
    assert _lrs(tmp_path / "a")[:2] != pytest.approx(_lrs(tmp_path / "b")[:2])


def test_a_stopped_and_resumed_run_logs_the_rows_of_an_uninterrupted_one(tmp_path, blobs):
    """log_every 4: the stop at step 3 logged a row there, which the resume kept (rows 1, 3, 4, 6 against 1, 4, 6)."""
    Trainer(_config(tmp_path, blobs, "full", **{"trainer.log_every": 4})).fit()
    Trainer(_config(tmp_path, blobs, "part", **{"trainer.log_every": 4})).fit(stop_after=3)
    assert _losses(tmp_path / "part")[0] == [1, 3]  # (the stop's own results name its last step)
    Trainer(_config(tmp_path, blobs, "part", **{"trainer.log_every": 4, "trainer.resume": "auto"})).fit()
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    csv_steps = [line.split(",")[0] for line in (tmp_path / "part" / "train_log.csv").read_text().splitlines()[1:]]
    assert csv_steps == ["1", "4", "6"]


def test_config_yaml_of_a_resumed_run_trains_it_anew(tmp_path, blobs):
    """OUT/config.yaml recorded trainer.resume: a rerun from it with --out NEW continued OUT's checkpoint from its
    step instead of training the run again."""
    from medfast.train import load_config as load

    Trainer(_config(tmp_path, blobs, "a", **{"trainer.max_steps": 4})).fit(stop_after=2)
    Trainer(_config(tmp_path, blobs, "a", **{"trainer.max_steps": 4, "trainer.resume": "auto"})).fit()
    saved = load([str(tmp_path / "a" / "config.yaml")], [f"trainer.out_dir={tmp_path / 'new'}"])
    assert saved.trainer.resume is None
    Trainer(saved).fit()
    assert _losses(tmp_path / "new")[0] == [1, 2, 3, 4]


@pytest.mark.parametrize("overrides, match", [
    ({"optim.name": "adamw", "optim.momentum": 0.5}, r"optim.momentum=0.5 is not used: optim.name='adamw' takes"),
    ({"optim.name": "adam", "optim.momentum": 0.0}, r"optim.momentum=0.0 is not used"),
    ({"optim.name": "sgd", "optim.betas": "[0.5, 0.5]"}, r"optim.betas=\[0.5, 0.5\] is not used: optim.name='sgd'"),
    ({"optim.scheduler": "constant", "optim.min_lr_ratio": 0.5}, "optim.min_lr_ratio=0.5 is not used"),
    # (a shipped config's own betas, under --set optim.name=sgd: the message says what --set can give)
    ({"optim.name": "sgd", "optim.betas": "[0.5, 0.999]"}, r"or give its default, --set optim.betas=\[0.9, 0.999\]"),
])
def test_optimizer_settings_the_optimizer_does_not_use_are_refused(tmp_path, blobs, overrides, match):
    """They were ignored without a word (adamw with momentum 0.5 ran as adamw), as a set-but-unused setting of the
    data, model, loss, augment and inference sections is refused."""
    from medfast.train import ConfigError

    with pytest.raises(ConfigError, match=match):
        Trainer(_config(tmp_path, blobs, "x", **overrides)).fit()


def test_a_resume_that_moves_to_the_next_epoch_names_the_samples_it_skips(tmp_path, capsys):
    """5 subjects, 3 trained at batch 1, resumed at batch 2 (epochs of 4): position 3 is inside this run's last
    batch of the epoch, so the data moves to the next epoch, skipping position 3 without a word (a DDP hunt)."""
    data = tmp_path / "five"
    make_blobs(data, n=5, shape=(12, 12, 12), classes=3)
    common = {"trainer.batch_size": 1, "model.channels": "[2, 4]", "augment.patch_size": "[8, 8, 8]",
              "trainer.checkpoint_every": 1}
    Trainer(_config(tmp_path, data, "run", **common)).fit(stop_after=3)
    capsys.readouterr()
    Trainer(_config(tmp_path, data, "run", **{**common, "trainer.batch_size": 2, "trainer.max_steps": 4,
                                               "trainer.resume": "auto"})).fit()
    out = capsys.readouterr().out
    assert "epoch 1, sample 0 of the epoch, skipping 1 sample(s) at the end of the epoch" in out, out


# resume safety (a bug hunt: a killed run's DataLoader workers kept its lock; a resume that changed the split or
# the epoch length was accepted silently)
def test_sigkilled_run_with_workers_resumes_at_once(tmp_path, blobs, monkeypatch):
    """kill -9 of `medfast train` with data.num_workers=2: its forked workers inherited the flock'd train.lock
    descriptor and held the lock until they noticed the dead parent (seconds), so an immediate --resume was
    refused ("in use by another medfast train (pid N)", N dead). The workers close their copy."""
    import os
    import subprocess
    import sys
    import time

    from medfast.train import trainer as trainer_module

    extra = {**_TINY, "trainer.max_steps": 200, "trainer.checkpoint_every": 1, "data.num_workers": 2}
    cfg = _config(tmp_path, blobs, "killed", **extra)
    save_config(cfg, tmp_path / "killed.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "medfast", "train", str(tmp_path / "killed.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    ck = tmp_path / "killed" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    killed_at = _kill_after_checkpoint(proc, ck, 1, deadline)
    # at once: without the wait for a dead holder's lock (the fallback), so the workers' copies are what is tested
    monkeypatch.setattr(trainer_module, "_DEAD_HOLDER_WAIT_S", 0.0, raising=False)
    cfg.trainer.resume, cfg.trainer.max_steps = "auto", killed_at + 1
    assert Trainer(cfg).fit()["step"] == killed_at + 1


def test_a_lock_whose_recorded_holder_is_dead_is_waited_for(tmp_path):
    """The fallback: a lock held although the pid it names is dead on this host (e.g. a child of the killed run
    still holds it) is waited for a few seconds; a live holder, or one on another host, is refused at once."""
    import fcntl
    import os
    import socket
    import subprocess
    import sys
    import threading
    import time

    from medfast.train.trainer import LOCK_NAME, _lock_out_dir, _unlock_out_dir

    out = tmp_path / "o"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def hold(holder):
        fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, f"{holder}\n".encode())
        return fd

    fd = hold(f"pid {dead.pid} on {socket.gethostname()}, since now")
    threading.Timer(0.5, os.close, (fd,)).start()  # (the leftover child ends)
    t0 = time.monotonic()
    got = _lock_out_dir(out)
    assert not isinstance(got, str), got
    assert 0.3 < time.monotonic() - t0 < 5
    _unlock_out_dir(got)
    live = f"pid {os.getpid()} on {socket.gethostname()}, since now"
    elsewhere = f"pid {dead.pid} on elsewhere, since now"
    for holder in (live, elsewhere):
        fd = hold(holder)
        try:
            t0 = time.monotonic()
            got = _lock_out_dir(out)
            assert isinstance(got, str) and holder in got and time.monotonic() - t0 < 1
        finally:
            os.close(fd)


def test_resume_that_redraws_the_validation_split_is_refused(tmp_path, blobs):
    """trainer.seed and data.val_fraction draw the train/validation split: a resume with others validated on
    subjects the checkpoint trained on (5 of 5 in the hunt's classification run). Refused, naming each setting."""
    from medfast.train import CheckpointError

    extra = {**_TINY, "trainer.max_steps": 2, "data.val_fraction": 0.34}
    Trainer(_config(tmp_path, blobs, "split", **extra)).fit(stop_after=1)
    before = (tmp_path / "split" / "config.yaml").read_text()
    resumed = {**extra, "trainer.resume": "auto"}
    with pytest.raises(CheckpointError, match=r"another train/validation split: trainer\.seed \(0 in the checkpoint, "
                                              r"5 now\)"):
        Trainer(_config(tmp_path, blobs, "split", **resumed, **{"trainer.seed": 5})).fit()
    with pytest.raises(CheckpointError, match=r"data\.val_fraction \(0\.34 in the checkpoint, 0\.5 now\)"):
        Trainer(_config(tmp_path, blobs, "split", **{**resumed, "data.val_fraction": 0.5})).fit()
    assert (tmp_path / "split" / "config.yaml").read_text() == before  # a refused resume leaves the run's record
    # augment settings may change: they apply from the next step
    assert Trainer(_config(tmp_path, blobs, "split", **resumed, **{"augment.rotation": 0.1})).fit()["finished"]
    # the other settings that decide a split: a separate validation set (the classification task's val_root /
    # val_csv_file); validation lists a built-in data set fills under the run's folder are not compared
    from medfast.train.trainer import _split_differences

    old = {"trainer": {"seed": 0}, "data": {"val_images": ["a.nii.gz"], "val_labels": [], "dataset": None,
                                            "dataset_args": {"val_root": "v"}}}
    now = {"trainer": {"seed": 0}, "data": {"val_images": ["b.nii.gz"], "val_labels": [], "dataset": None,
                                            "dataset_args": {"val_csv_file": "v.csv"}}}
    assert _split_differences(old, now) == [
        "data.val_images (['a.nii.gz'] in the checkpoint, ['b.nii.gz'] now)",
        "data.dataset_args.val_root ('v' in the checkpoint, not set now)",
        "data.dataset_args.val_csv_file (not set in the checkpoint, 'v.csv' now)"]
    now["data"].update(dataset="tiny_blobs", dataset_args={"val_root": "v"})
    assert _split_differences(old, now) == []


def test_resume_with_another_training_set_length_starts_the_next_epoch(tmp_path, capsys):
    """The checkpoint's micro_batches counts epochs of its training set: with another length (here 5 subjects,
    then 4) the count was re-divided silently (epoch 0 position 3 of another permutation). The run continues at
    the start of the next epoch, and says so; a checkpoint without train_size resumes as before."""
    five, four = tmp_path / "five", tmp_path / "four"
    make_blobs(five, n=5, shape=(12, 12, 12), classes=3)
    make_blobs(four, n=4, shape=(12, 12, 12), classes=3)
    common = {**_TINY, "trainer.batch_size": 1, "trainer.checkpoint_every": 1}
    _, ref = _recorded_fit(_config(tmp_path, four, "ref", **common, **{"trainer.max_steps": 5}))
    for name in ("new", "old"):
        _recorded_fit(_config(tmp_path, five, name, **common, **{"trainer.max_steps": 4}), stop_after=3)
    ck = tmp_path / "old" / "checkpoints" / "last.pt"
    state = load_checkpoint(ck)
    assert state["train_size"] == 5
    del state["train_size"]  # a checkpoint written before the length was stored
    save_checkpoint(state, ck)
    capsys.readouterr()
    resumed = {**common, "trainer.max_steps": 4, "trainer.resume": "auto"}
    _, got = _recorded_fit(_config(tmp_path, four, "new", **resumed))
    assert got == [ref[4]]  # epoch 1, position 0
    out = capsys.readouterr().out
    assert "trained on 5 training sample(s) per epoch, this run has 4: the data continues at the start of epoch 1" \
        in out
    _, got = _recorded_fit(_config(tmp_path, four, "old", **resumed))
    assert got == [ref[3]] and "per epoch" not in capsys.readouterr().out


def test_tensorboard_of_a_stopped_and_resumed_run_has_the_rows_of_the_logs(tmp_path, blobs):
    """The stop's row at step 3 (log_every 4) left the logs at the resume, but its TensorBoard scalars stayed
    (the resume purges from step 4 on): TensorBoard had steps 1, 3, 4, 6 against the CSV's 1, 4, 6."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = {**_TINY, "trainer.log_every": 4, "trainer.tensorboard": "true"}
    Trainer(_config(tmp_path, blobs, "part", **extra)).fit(stop_after=3)
    Trainer(_config(tmp_path, blobs, "part", **extra, **{"trainer.resume": "auto"})).fit()
    ea = EventAccumulator(str(tmp_path / "part" / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == _losses(tmp_path / "part")[0] == [1, 4, 6]


def test_settings_that_run_otherwise_than_they_read_get_a_note(tmp_path, blobs, capsys):
    """amp: bf16 on the CPU ran in float32 and a warmup longer than the run never reached optim.lr, silently."""
    extra = {**_TINY, "trainer.max_steps": 2, "trainer.amp": "bf16", "optim.warmup_steps": 5}
    Trainer(_config(tmp_path, blobs, "notes", **extra)).fit()
    out = capsys.readouterr().out
    assert "trainer.amp=bf16 runs in float32 on cpu" in out
    assert "optim.warmup_steps=5 >= trainer.max_steps=2: the learning rate stays below optim.lr" in out
    Trainer(_config(tmp_path, blobs, "quiet", **_TINY, **{"trainer.max_steps": 2})).fit()
    assert "medfast train: " not in capsys.readouterr().out.replace("medfast train: 2 steps", "")



def test_extending_a_finished_run_keeps_its_last_row_in_the_logs_and_tensorboard(tmp_path, blobs):
    """A finished 6-step run (log_every 4) resumed with max_steps 10: its step-6 row was a regular one (the last
    step then) but the resume judged it by the new max_steps and dropped it from the CSV, while TensorBoard kept it.
    The checkpoint now says whether its row was a stop's."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = {**_TINY, "trainer.log_every": 4, "trainer.tensorboard": "true"}
    Trainer(_config(tmp_path, blobs, "ext", **extra)).fit()
    assert _losses(tmp_path / "ext")[0] == [1, 4, 6]
    Trainer(_config(tmp_path, blobs, "ext", **extra, **{"trainer.resume": "auto", "trainer.max_steps": 10})).fit()
    ea = EventAccumulator(str(tmp_path / "ext" / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == _losses(tmp_path / "ext")[0] == [1, 4, 6, 8, 10]
