"""Output files are complete or absent (medfast._atomic.replacing): a write that fails halfway, as under a kill or
a full disk, leaves the previous file and no temporary one; and a rerun leaves no output of an earlier run."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medfast.data import save_nifti


def _failing_save(real):
    def save(img, filename):  # half a file, then the disk is full
        real(img, filename)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise OSError(28, "No space left on device")
    return save


def test_a_failed_nifti_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = save_nifti(np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.eye(4), tmp_path / "x.nii.gz")
    monkeypatch.setattr(nib, "save", _failing_save(nib.save))
    with pytest.raises(OSError, match="No space left"):
        save_nifti(np.zeros((2, 3, 4), np.float32), np.eye(4), path)
    with pytest.raises(OSError):
        save_nifti(np.zeros((2, 3, 4), np.float32), np.eye(4), tmp_path / "new.nii.gz")
    monkeypatch.undo()
    assert np.array_equal(np.asarray(nib.load(path).dataobj), np.arange(24).reshape(2, 3, 4))  # was truncated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.nii.gz"]  # no temporary file, no partial new one


def test_a_failed_disk_cache_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    from medfast.data import NiftiDataset

    save_nifti(np.random.rand(6, 6, 6).astype(np.float32), np.eye(4), tmp_path / "a.nii.gz")
    ds = NiftiDataset([str(tmp_path / "a.nii.gz")], cache="disk", cache_dir=str(tmp_path / "cache"))
    real = torch.save

    def full(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        ds[0]
    monkeypatch.undo()
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary file was left (and one more per failed run)
    ds[0]
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_register_rerun_without_labels_removes_the_earlier_warped_labels(tmp_path):
    from medfast.cli import main

    rng = np.random.default_rng(0)
    g = np.stack(np.meshgrid(*[np.arange(16)] * 3, indexing="ij"), -1).astype(float)
    for name, c in (("f", (7, 8, 8)), ("m", (8, 7, 8))):
        blob = np.exp(-(((g - c) / 4) ** 2).sum(-1)) * 100 + rng.normal(0, 1, g.shape[:3])
        save_nifti(blob.astype(np.float32), np.eye(4), tmp_path / f"{name}.nii.gz")
        save_nifti((blob > 50).astype(np.int16), np.eye(4), tmp_path / f"{name}_lab.nii.gz")
    common = [str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "--out", str(tmp_path / "out"),
              "--affine-levels", "2", "--affine-iters", "3", "--deform-levels", "2", "--deform-iters", "3",
              "--kernel-size", "3", "--no-progress"]
    assert main(["register", *common, "--fixed-labels", str(tmp_path / "f_lab.nii.gz"),
                 "--moving-labels", str(tmp_path / "m_lab.nii.gz")]) == 0
    assert (tmp_path / "out" / "warped_labels.nii.gz").is_file()
    assert main(["register", *common]) == 0
    assert not (tmp_path / "out" / "warped_labels.nii.gz").exists()


def test_a_figure_stopped_while_drawn_leaves_the_previous_png(tmp_path, monkeypatch):
    # a SIGTERM during a training run's samples PNG left a truncated file under its final name
    from matplotlib.figure import Figure
    from PIL import Image

    from medfast._figures import new_figure, save_figure

    fig = new_figure(figsize=(2, 2))
    fig.subplots().plot([0, 1])
    path = save_figure(fig, tmp_path / "samples.png", dpi=50)
    real = Figure.savefig

    def stopped(self, fname, *args, **kwargs):
        real(self, fname, *args, **kwargs)
        with open(fname, "r+b") as f:
            f.truncate(40)
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", stopped)
    with pytest.raises(KeyboardInterrupt):
        save_figure(fig, path, dpi=50)
    monkeypatch.undo()
    assert Image.open(path).size == (100, 100) and [p.name for p in tmp_path.iterdir()] == ["samples.png"]


# Each writer on medfast._atomic.replacing: a write that stops halfway (the disk full, Ctrl-C) leaves the previous
# file and nothing else in the folder. The old hand-written temporaries of save_config, registration.save_model and
# presets._save stayed behind (config.yaml.tmp, net.pt.tmp, .tmp<pid>-x.nii.gz: one more per failed run).


def _write_half(target, exc):
    """What a write stopped halfway does: part of the data in ``target`` (a path or a binary file), then ``exc``."""
    if hasattr(target, "write"):
        target.write(b"half a file")
    else:
        Path(target).write_bytes(b"half a file")
    raise exc


def test_a_failed_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from medfast.train.trainer import load_checkpoint, save_checkpoint

    path = save_checkpoint({"model": {"w": torch.ones(2)}}, tmp_path / "last.pt")
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: _write_half(f, KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_partial_checkpoints_of_killed_saves_are_removed(tmp_path):
    from medfast._atomic import replacing
    from medfast.train.trainer import _remove_partial_checkpoints

    for name in ("last.pt", "step_0000002.pt", "notes.tmp"):
        (tmp_path / name).write_bytes(b"kept")
    killed = replacing(tmp_path / "last.pt")  # entered, never left: a process killed during torch.save
    killed.__enter__().write_bytes(b"half a checkpoint")
    (tmp_path / ".step_0000002.pt.123.tmp").write_bytes(b"half")  # the temporary name of earlier versions
    assert len(list(tmp_path.iterdir())) == 5
    _remove_partial_checkpoints(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.tmp", "step_0000002.pt"]


def test_a_failed_config_save_keeps_the_previous_config(tmp_path, monkeypatch):
    from medfast.train.config import load_config, save_config

    path = save_config(load_config([], ["trainer.max_steps=7"]), tmp_path / "config.yaml")
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: _write_half(self, OSError(28, "No space left")))
    with pytest.raises(OSError, match="No space left"):
        save_config(load_config([], ["trainer.max_steps=9"]), path)
    monkeypatch.undo()
    assert load_config([path]).trainer.max_steps == 7
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_a_failed_registration_model_save_keeps_the_previous_file(tmp_path, monkeypatch):
    from medfast.nets import LocalNet
    from medfast.tasks.registration import load_model_info, save_model

    kw = dict(spatial_dims=2, num_channel_initial=2, depth=1, extract_levels=(0, 1))
    path = tmp_path / "net.pt"
    save_model(path, LocalNet(**kw), kw, (32, 32))
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: _write_half(f, OSError(28, "No space left")))
    with pytest.raises(OSError, match="No space left"):
        save_model(path, LocalNet(**kw), kw, (16, 16))
    monkeypatch.undo()
    assert list(load_model_info(path)[1].input_shape) == [32, 32]
    assert [p.name for p in tmp_path.iterdir()] == ["net.pt"]


def test_a_failed_preset_save_leaves_no_file(tmp_path, monkeypatch):
    from medfast.data.presets import _save

    path = tmp_path / "img.nii.gz"
    _save(nib.Nifti1Image(np.ones((2, 3, 4), np.float32), np.eye(4)), path)
    monkeypatch.setattr(nib, "save", lambda img, f, *a, **k: _write_half(f, KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        _save(nib.Nifti1Image(np.zeros((2, 3, 4), np.float32), np.eye(4)), path)
    monkeypatch.undo()
    assert np.array_equal(np.asarray(nib.load(path).dataobj), np.ones((2, 3, 4)))
    assert [p.name for p in tmp_path.iterdir()] == ["img.nii.gz"]


@pytest.mark.parametrize("name", ["out.hdr", "out.img", "OUT.HDR", "out.img.gz"])
def test_save_nifti_refuses_a_hdr_img_pair(tmp_path, name):
    """nibabel wrote both files of the pair under the temporary name and only the named one was renamed: a broken
    pair and a hidden .tmp file left behind."""
    with pytest.raises(ValueError, match=r"path: .* names an Analyze-style .hdr / .img pair; .*\.nii or \.nii\.gz"):
        save_nifti(np.zeros((2, 3, 4), np.float32), np.eye(4), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_save_nifti_takes_int64_bool_and_half_data(tmp_path):
    """int64 labels (torch.argmax's) raised nibabel's 'pass an explicit header or dtype', bool masks and float16 /
    bfloat16 'data dtype not supported'."""
    labels = torch.tensor([[[0, 1], [2, 2**40]]], dtype=torch.int64)
    cases = [(labels, np.int64, labels.numpy()), (labels.numpy() > 0, np.uint8, (labels.numpy() > 0).astype(np.uint8)),
             (np.full((1, 2, 2), 0.5, np.float16), np.float32, np.full((1, 2, 2), 0.5)),
             (torch.full((1, 2, 2), 0.25, dtype=torch.bfloat16), np.float32, np.full((1, 2, 2), 0.25))]
    for i, (data, dtype, expected) in enumerate(cases):
        path = save_nifti(data, np.eye(4), tmp_path / f"{i}.nii.gz")
        img = nib.load(str(path))
        assert img.get_data_dtype() == dtype and np.array_equal(np.asarray(img.dataobj), expected), i
