"""How the commands end when stopped or when the system refuses a write: one line and the shell's exit status
(130 after Ctrl-C, 143 after SIGTERM, 1 for an operating-system error), never a traceback; `~` in path settings."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medfast.cli import main


def test_os_errors_of_any_command_are_one_line(tmp_path, capsys, monkeypatch):
    from medfast import demo

    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Read-only file system", str(tmp_path / "ro" / "out"))

    monkeypatch.setattr(demo, "run_warp_demo", unwritable)  # (the demo's own mkdir on a read-only file system)
    assert main(["demo", "--out", str(tmp_path / "ro" / "out")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"medfast demo: error: {tmp_path / 'ro' / 'out'}: Read-only file system"


def test_ctrl_c_of_any_command_is_one_line(tmp_path, capsys, monkeypatch):
    from medfast import demo

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_warp_demo", interrupted)
    try:
        status = main(["demo", "--out", str(tmp_path / "out")])
    except KeyboardInterrupt:  # (not into pytest: it would stop the whole session)
        pytest.fail("Ctrl-C escaped medfast.cli.main: a traceback and exit status -2")
    assert status == 130
    assert capsys.readouterr().err.strip() == "medfast demo: interrupted"


def test_a_full_disk_while_saving_a_checkpoint_names_the_file(tmp_path, monkeypatch):
    from medfast.train import save_checkpoint

    def full(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="cannot write the checkpoint") as info:
        save_checkpoint({"a": 1}, tmp_path / "last.pt")
    assert info.value.filename == str(tmp_path / "last.pt") and info.value.errno == 28
    assert list(tmp_path.iterdir()) == []


def _train_config(tmp_path: Path) -> Path:
    from medfast.data.synthetic import make_blobs

    make_blobs(tmp_path / "blobs", n=3, shape=(16, 16, 16), classes=2)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""data: {{root: {tmp_path / 'blobs'}}}
model: {{channels: [4, 8], out_channels: 2}}
augment: {{patch_size: [12, 12, 12]}}
trainer: {{max_steps: 100000, batch_size: 1, val_every: 0, checkpoint_every: 5, progress: false,
          tensorboard: false, plots: false, device: cpu, threads: 1}}
""")
    return cfg


def test_sigterm_stops_train_like_ctrl_c(tmp_path):
    # SLURM / Kubernetes / timeout send SIGTERM: the run died silently (exit -15), its lock left behind
    cfg = _train_config(tmp_path)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "medfast", "train", str(cfg), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("step_*.pt")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "interrupted at step" in err and "--resume" in err
    assert not (out / "train.lock").exists()


def test_sigterm_to_the_process_group_with_loader_workers(tmp_path):
    # `timeout`, SLURM's scancel and Kubernetes signal the whole process group: the data-loader workers died first
    # and torch's SIGCHLD handler turned the run's clean stop into a RuntimeError traceback (on an H200)
    cfg = _train_config(tmp_path)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "medfast", "train", str(cfg), "--out", str(out), "--set",
                             "data.num_workers=2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("step_*.pt")) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "interrupted at step" in err, err
    assert not (out / "train.lock").exists()


def test_a_home_folder_in_path_settings_is_expanded(tmp_path, monkeypatch):
    from medfast.train import load_config

    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config([], ["data.root=~/data", "data.train_images=[~/a.nii.gz, [~/b0.nii.gz, ~/b1.nii.gz]]"],
                         values={"trainer.out_dir": "~/run", "trainer.resume": "~/run/checkpoints/last.pt"})
    assert config.data.root == str(tmp_path / "data") and config.trainer.out_dir == str(tmp_path / "run")
    assert config.data.train_images == [str(tmp_path / "a.nii.gz"), [str(tmp_path / "b0.nii.gz"),
                                                                     str(tmp_path / "b1.nii.gz")]]
    assert config.trainer.resume == os.path.join(str(tmp_path), "run", "checkpoints", "last.pt")
    assert np.all([not str(p).startswith("~") for p in (config.data.root, config.trainer.out_dir)])


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_during_a_checkpoint_write_takes_effect_after_it(tmp_path, monkeypatch, sig):
    """SIGTERM raised inside torch.save's writes surfaced as "cannot write the checkpoint (... unexpected pos ...)"
    and `medfast train` exited 1 as on a full disk (seen in CI: the group's SIGTERM landed in the write of last.pt).
    The signal now stops the run after the checkpoint is in place."""
    import medfast.train.trainer as T
    from medfast.train.commands import Terminated, _stop_on_sigterm

    real_save = torch.save

    def save(obj, f):
        signal.raise_signal(getattr(signal, sig))  # arrives in the middle of the write
        real_save(obj, f)

    # (Python's own Ctrl-C handler: a process started in the background, as CI's pytest, inherits SIGINT ignored)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous = _stop_on_sigterm()
    monkeypatch.setattr(torch, "save", save)
    try:
        with pytest.raises(Terminated if sig == "SIGTERM" else KeyboardInterrupt):
            T.save_checkpoint({"a": torch.arange(1000)}, tmp_path / "last.pt")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are back
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(tmp_path / "last.pt")["a"], torch.arange(1000))


_RACE = """
import signal
from medfast.train.commands import Terminated, _stop_on_sigterm
signal.signal(signal.SIGCHLD, lambda s, f: None)  # as torch's DataLoader installs one
_stop_on_sigterm()
both = {signal.SIGCHLD, signal.SIGTERM}
signal.pthread_sigmask(signal.SIG_BLOCK, both)
signal.raise_signal(signal.SIGCHLD)  # a loader worker died ...
signal.raise_signal(signal.SIGTERM)  # ... and the group's SIGTERM came, both while in one C call
try:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, both)  # handlers run in signal order: SIGTERM's first
    for _ in range(3):
        pass
    print("no stop")
except Terminated:
    print("stopped")
"""


@pytest.mark.skipif(not hasattr(signal, "SIGCHLD"), reason="POSIX signals")
def test_a_pending_sigchld_after_the_stop_is_dropped_silently():
    """The SIGTERM handler set SIGCHLD to SIG_DFL to drop a worker's death; with that SIGCHLD already pending CPython
    printed 'OSError: Signal 17 ignored due to race condition' with a traceback after the one-line stop."""
    run = subprocess.run([sys.executable, "-c", _RACE], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "stopped", (run.stdout, run.stderr)
    assert "race condition" not in run.stderr and "Traceback" not in run.stderr, run.stderr


@pytest.mark.parametrize("failing", [True, False])
def test_a_stop_during_the_cleanup_lets_it_finish(tmp_path, monkeypatch, failing):
    """torchrun SIGTERMs every rank once one failed: arriving in Trainer.fit's cleanup it cut the cleanup short
    (train.lock left behind, TensorBoard not closed) and rank 0 reported "interrupted" instead of the failure. The
    cleanup now finishes; the stop is dropped when an error is on its way out, delivered after it otherwise."""
    from medfast.data.synthetic import make_blobs
    from medfast.train import Trainer, load_config
    from medfast.train.commands import Terminated, _stop_on_sigterm
    from tests.conftest import TINY_SEGMENTATION_CONFIG

    make_blobs(tmp_path / "data", n=2, shape=(12, 12, 12), classes=3)
    cfg = tmp_path / "seg.yaml"
    cfg.write_text(TINY_SEGMENTATION_CONFIG.format(root=tmp_path / "data", steps=1))
    trainer = Trainer(load_config([cfg], values={"trainer.out_dir": str(tmp_path / "run")}))
    closed = []

    def fit(stop_after=None):
        trainer._take_lock()
        if failing:
            raise RuntimeError("Connection closed by peer")
        return {}

    def close_loaders():
        signal.raise_signal(signal.SIGTERM)  # torchrun's stop, in the middle of the cleanup
        closed.append(True)

    monkeypatch.setattr(trainer, "_fit", fit)
    monkeypatch.setattr(trainer, "_close_loaders", close_loaders)
    previous = _stop_on_sigterm()
    try:
        with pytest.raises(RuntimeError if failing else Terminated):
            trainer.fit()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert closed and trainer._lock is None and not (tmp_path / "run" / "train.lock").exists()
