"""User errors of `medfast train / predict / evaluate / register` are one-line messages naming the argument,
config key or file (never a traceback), and the command-line values are taken as given."""

import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from medfast.cli import main
from medfast.train import CheckpointError, ConfigError, Trainer, load_config
from tests.conftest import train_tiny_segmentation


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny blobs data, its config, and a 2-step checkpoint."""
    base = tmp_path_factory.mktemp("cli_errors")
    _, cfg, checkpoint = train_tiny_segmentation(base, 2)
    return base, cfg, checkpoint


def _err(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _save(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))


# --- B2: --out / --resume / --device are used verbatim ---------------------------------------------------
@pytest.mark.parametrize("out", ["runs/a #1", "0777", "yes", "2024-01-01", "null"])
def test_out_is_taken_verbatim(setup, capsys, out):
    _, cfg, _ = setup
    assert main(["train", str(cfg), "--out", out, "--print-config"]) == 0
    text = capsys.readouterr().out
    import yaml

    assert yaml.safe_load(text)["trainer"]["out_dir"] == out
    config = load_config([cfg], values={"trainer.out_dir": out, "trainer.resume": out, "trainer.device": "0"})
    assert config.trainer.out_dir == out and config.trainer.resume == out and config.trainer.device == "0"


def test_configs_after_an_option_are_merged_in_order(setup, capsys, tmp_path):
    """``medfast train a.yaml --set k=v b.yaml`` was refused ("unrecognized arguments: b.yaml"): argparse ends a
    positional list at the first option. The files after it are configs too, merged after a.yaml, and the --set
    overrides still apply last; an unknown option is still refused."""
    import yaml

    _, cfg, _ = setup
    second = tmp_path / "b.yaml"
    second.write_text("trainer:\n  max_steps: 7\n  log_every: 3\n")
    assert main(["train", str(cfg), "--set", "trainer.log_every=5", str(second), "--print-config"]) == 0
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert trainer["max_steps"] == 7 and trainer["log_every"] == 5
    with pytest.raises(SystemExit):
        main(["train", str(cfg), "--set", "trainer.log_every=5", str(second), "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


# --- B3: a binary file given as config ------------------------------------------------------------------
def test_binary_config_file_is_a_clear_error(setup, capsys):
    base, _, _ = setup
    bad = base / "data" / "images" / "case_000.nii.gz"  # gzip: not UTF-8
    assert main(["train", str(bad), "--print-config"]) == 1
    err = _err(capsys)
    assert str(bad) in err and "UTF-8" in err


# --- B1: bad config values are ConfigErrors naming the key, before any data is read --------------------
@pytest.mark.parametrize("override, match", [
    ("optim.name=adamx", "optim.name must be one of adamw, adam, sgd"),
    ("optim.scheduler=step", "optim.scheduler must be one of cosine, constant, poly"),
    ("trainer.amp=fp8", "trainer.amp must be one of"),
    ("model.name=resnet", "model.name='resnet'"),
    ("model.spatial_dims=4", "model.spatial_dims must be 2 or 3"),
    ("data.normalize=foo", "data.normalize must be one of zscore, minmax, none"),
    ("task=segmentaton", "unknown task 'segmentaton'"),
    ("trainer.max_steps=0", "trainer.max_steps must be >= 1"),
    ("augment.patch_size=[24,24]", "augment.patch_size must have 3"),
    ("data.spacing=[1,1]", "data.spacing must have 3"),
    ("data.shape=[20,20]", "data.shape must have 3"),
    ("data.cache=disk", "data.cache_dir"),
    ("model.out_channels=1", "model.out_channels must be >= 2"),
    ("model.kwargs.foo=1", "unknown model.kwargs"),
    ("data.dataset_args.fooo=1", "data.dataset_args"),
    ("task_args.foo=1", "unknown task_args for the segmentation task"),
    ("model.norm=layer", "model.norm must be one of"),
    # (a bug hunt: tracebacks from torch / NumPy / the first training step, not naming the setting)
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("optim.momentum=-1", "optim.momentum must lie in"),
    ("trainer.seed=-1", "trainer.seed must lie in"),
    ("trainer.seed=99999999999999999999", "trainer.seed must lie in"),
    ("augment.integrate_steps=100", "augment.integrate_steps must lie in"),
    ("optim.min_lr_ratio=-2", "optim.min_lr_ratio must lie in"),
])
def test_bad_config_values_are_messages(setup, capsys, tmp_path, override, match):
    _, cfg, _ = setup
    assert main(["train", str(cfg), "--out", str(tmp_path / "x"), "--set", override]) == 1
    err = _err(capsys)
    assert match in err, err
    assert not (tmp_path / "x").exists()  # failed before anything was written
    with pytest.raises(ConfigError, match=match.split("'")[0]):
        Trainer(load_config([cfg], [override, f"trainer.out_dir={tmp_path / 'y'}"]))


@pytest.mark.parametrize("kind, match", [
    # (a dead-option hunt: weights without deep supervision were ignored, a short list dropped a head, all zeros
    # stopped training with a NaN loss blamed on the learning rate, a negative weight ascended)
    ("no_ds", "needs model.deep_supervision: true"),
    ("short", "one weight per output"),
    ("zeros", "non-negative finite numbers, not all 0"),
    ("negative", "non-negative finite numbers, not all 0"),
])
def test_deep_supervision_weights_are_checked(setup, tmp_path, kind, match):
    _, cfg, _ = setup
    outputs = len(load_config([cfg], [f"trainer.out_dir={tmp_path / 'y'}"]).model.channels) - 1
    weights = {"no_ds": [1.0] * outputs, "short": [1.0] * (outputs - 1), "zeros": [0.0] * outputs,
               "negative": [-0.5] + [1.0] * (outputs - 1)}[kind]
    ds = [] if kind == "no_ds" else ["model.deep_supervision=true"]
    with pytest.raises(ConfigError, match=match):
        Trainer(load_config([cfg], [*ds, f"loss.deep_supervision_weights={weights}", f"trainer.out_dir={tmp_path}"]))
    ok = [1.0] + [0.5] * (outputs - 1)
    Trainer(load_config([cfg], ["model.deep_supervision=true", f"loss.deep_supervision_weights={ok}",
                                f"trainer.out_dir={tmp_path / 'z'}"]))


def test_predict_ignores_a_checkpoints_deep_supervision_weights(setup, tmp_path):
    # the weights are a training setting: predict on a checkpoint whose config recorded them without deep
    # supervision (accepted by training until 2026-11-29) must still run
    base, _, ckpt = setup
    state = torch.load(ckpt, weights_only=True)
    state["config"]["loss"]["deep_supervision_weights"] = [1.0, 0.5]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    img = sorted((base / "data" / "images").iterdir())[0]
    assert main(["predict", str(img), "--model", str(old), "--out", str(tmp_path / "p"), "--device", "cpu"]) == 0


def test_unknown_task_lists_only_tasks(setup, capsys, tmp_path):
    _, cfg, _ = setup
    assert main(["train", str(cfg), "--out", str(tmp_path / "x"), "--set", "task=evaluation"]) == 1
    err = _err(capsys)
    assert "unknown task 'evaluation'" in err and "segmentation" in err
    assert "evaluation," not in err.split("available:")[1]


@pytest.mark.parametrize("device, match", [("foo", "is not a device"), ("cuda:99", "CUDA GPU")])
def test_bad_device(setup, capsys, tmp_path, device, match):
    _, cfg, _ = setup
    assert main(["train", str(cfg), "--out", str(tmp_path / "x"), "--device", device]) == 1
    assert match in _err(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu(setup, capsys, tmp_path):
    _, cfg, _ = setup
    assert main(["train", str(cfg), "--out", str(tmp_path / "x"), "--device", "cuda"]) == 1
    assert "trainer.device='cuda' but no CUDA GPU is visible" in _err(capsys)


@pytest.mark.parametrize("dataset_args, match", [
    ("{csv_fle: x.csv}", "unknown key(s) ['csv_fle'] for a folder"),
    ("{volumez: 3}", "unknown key(s) ['volumez'] for dataset 'simulated_ultrasound'"),
])
def test_classification_config_typos(setup, capsys, tmp_path, dataset_args, match):
    base, _, _ = setup
    cfg = tmp_path / "cls.yaml"
    dataset = "dataset: simulated_ultrasound, " if "volumez" in dataset_args else ""
    cfg.write_text(f"task: classification\ndata: {{{dataset}root: {base}, dataset_args: {dataset_args}}}\n"
                   f"model: {{name: resnet, spatial_dims: 2, out_channels: 2}}\n")
    assert main(["train", str(cfg), "--out", str(tmp_path / "x")]) == 1
    assert match in _err(capsys)
    cfg.write_text(f"task: classification\ndata: {{root: {base}}}\nmodel: {{name: resnet, spatial_dims: 2}}\n"
                   f"task_args: {{foo: 1}}\n")
    assert main(["train", str(cfg), "--out", str(tmp_path / "x")]) == 1
    assert "unknown task_args for the classification task" in _err(capsys)


# --- B1 / B13: resuming from a file that is not a checkpoint, or of another model or optimizer ---------
def test_resume_from_a_bad_or_foreign_checkpoint(setup, capsys, tmp_path):
    _, cfg, ckpt = setup
    assert main(["train", str(cfg), "--out", str(tmp_path / "a"), "--resume", str(cfg)]) == 1
    err = _err(capsys)
    assert "cannot read checkpoint" in err and str(cfg) in err
    assert main(["train", str(cfg), "--out", str(tmp_path / "b"), "--resume", str(ckpt),
                 "--set", "model.channels=[4, 8]"]) == 1
    err = _err(capsys)
    assert str(ckpt) in err and "model.channels ([2, 4] in the checkpoint, [4, 8] now)" in err
    assert main(["train", str(cfg), "--out", str(tmp_path / "c"), "--resume", str(ckpt),
                 "--set", "optim.name=sgd", "--set", "trainer.max_steps=3"]) == 1
    err = _err(capsys)
    assert str(ckpt) in err and "optim.name='adamw'" in err and "optim.name='sgd'" in err
    with pytest.raises(CheckpointError, match="optim.name"):
        Trainer(load_config([cfg], [f"trainer.out_dir={tmp_path / 'd'}", f"trainer.resume={ckpt}",
                                    "optim.name=adam", "trainer.max_steps=3"])).fit()


def test_resume_without_a_checkpoint_says_so(setup, capsys, tmp_path):
    _, cfg, _ = setup
    assert main(["train", str(cfg), "--out", str(tmp_path / "new"), "--resume", "--set", "trainer.max_steps=1"]) == 0
    assert "no checkpoint to resume" in capsys.readouterr().out
    assert (tmp_path / "new" / "checkpoints" / "last.pt").is_file()


# --- B11: a new run into a folder holding another run's checkpoints; pruning ---------------------------
def test_new_run_into_a_used_folder_is_refused(setup, capsys, tmp_path):
    base, cfg, _ = setup
    out = tmp_path / "run"
    shutil.copytree(base / "run", out)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert main(["train", str(cfg), "--out", str(out), "--set", "trainer.checkpoint_every=1"]) == 1
    err = _err(capsys)
    assert "already holds checkpoints" in err and "--resume" in err and "--out" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    # resuming it is fine
    assert main(["train", str(cfg), "--out", str(out), "--resume", "--set", "trainer.max_steps=3"]) == 0
    # so is a resume from another folder into a new one, but not into a used one
    assert main(["train", str(cfg), "--out", str(tmp_path / "fresh"), "--resume",
                 str(out / "checkpoints" / "last.pt"), "--set", "trainer.max_steps=4"]) == 0
    assert main(["train", str(cfg), "--out", str(out), "--resume",
                 str(tmp_path / "fresh" / "checkpoints" / "last.pt"), "--set", "trainer.max_steps=5"]) == 1
    assert "already holds checkpoints" in _err(capsys)


def test_pruning_keeps_the_current_runs_checkpoints(setup, tmp_path):
    _, cfg, _ = setup
    out = tmp_path / "p"
    common = [f"trainer.out_dir={out}", "trainer.val_every=0"]
    Trainer(load_config([cfg], common + ["trainer.max_steps=8", "trainer.checkpoint_every=2",
                                         "trainer.keep_checkpoints=4"])).fit()
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.glob("step_*.pt")) == [f"step_000000{i}.pt" for i in (2, 4, 6, 8)]
    # go back to step 2 and take another branch: its own latest two checkpoints are kept (not the old 6 and 8)
    Trainer(load_config([cfg], common + ["trainer.max_steps=4", "trainer.checkpoint_every=1",
                                         "trainer.keep_checkpoints=2",
                                         f"trainer.resume={ck / 'step_0000002.pt'}"])).fit()
    names = sorted(p.name for p in ck.glob("step_*.pt"))
    assert {"step_0000003.pt", "step_0000004.pt"} <= set(names) and "step_0000002.pt" not in names


def test_optimizer_errors_name_optim(setup, capsys, tmp_path, monkeypatch):
    """A value torch's optimizer refuses (should check_config ever let one through) is an error naming optim, not
    a traceback; other errors keep theirs."""
    import medfast.train.trainer as trainer_module

    _, cfg, _ = setup
    monkeypatch.setattr(trainer_module, "check_config", lambda config: None)
    args = ["train", str(cfg), "--out", str(tmp_path / "x"), "--set", "optim.name=sgd", "--set",
            "optim.momentum=-1"]
    assert main(args) == 1
    err = _err(capsys)
    assert "optim: the optimizer cannot be built" in err and "momentum" in err, err

    def broken(*args, **kwargs):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(trainer_module, "build_scheduler", broken)
    with pytest.raises(RuntimeError, match="an internal bug"):
        main(["train", str(cfg), "--out", str(tmp_path / "y")])


def test_checkpoint_folder_hint_names_the_file_that_is_there(setup, capsys, tmp_path):
    base, cfg, _ = setup
    img = base / "data" / "images" / "case_000.nii.gz"
    run, ckdir = base / "run", base / "run" / "checkpoints"
    for folder, hint in ((ckdir, ckdir / "last.pt"), (run, ckdir / "last.pt"),
                         (tmp_path, tmp_path / "checkpoints" / "last.pt")):
        assert main(["predict", str(img), "--model", str(folder), "--out", str(tmp_path / "p")]) == 1
        assert f"is a folder; give a file such as {hint}\n" in _err(capsys)
        assert main(["train", str(cfg), "--out", str(tmp_path / "r"), "--resume", str(folder)]) == 1
        assert f"is a folder; give a file such as {hint}\n" in _err(capsys)


def test_ctrl_c_is_one_line_and_leaves_whole_checkpoints(setup, capsys, tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) during training or while a checkpoint is written: exit status 130, one line
    naming the step and the checkpoint to resume (no traceback), the previous checkpoint intact, no temporary
    file; --resume continues."""
    import medfast.train.trainer as trainer_module
    from medfast.tasks.segmentation import SegmentationTask
    from medfast.train import load_checkpoint

    _, cfg, _ = setup
    out = tmp_path / "run"
    common = ["train", str(cfg), "--out", str(out), "--set", "trainer.checkpoint_every=2"]
    step = SegmentationTask.training_step
    calls = []

    def interrupted_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # in step 4 (3 done; the last checkpoint at step 2)
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    def run(args):
        try:
            return main(args)
        except KeyboardInterrupt:  # (not out of the test: pytest would stop the whole session)
            pytest.fail("KeyboardInterrupt escaped medfast train")

    monkeypatch.setattr(SegmentationTask, "training_step", interrupted_step)
    assert run([*common, "--set", "trainer.max_steps=6"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    last = out / "checkpoints" / "last.pt"
    assert err == f"medfast train: interrupted at step 3 of 6; the last checkpoint is {last} (step 2): continue with " \
                  f"--resume\n"
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 2
    monkeypatch.setattr(SegmentationTask, "training_step", step)

    # interrupted inside torch.save of the step-4 checkpoint, half of it written
    save = torch.save

    def interrupted_save(obj, f, *args, **kwargs):
        if obj["step"] == 4:
            f.write(b"half a checkpoint")
            raise KeyboardInterrupt
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(trainer_module.torch, "save", interrupted_save)
    assert run([*common, "--resume", "--set", "trainer.max_steps=6"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted at step 4 of 6" in err and "(step 2)" in err, err
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt", "step_0000002.pt"]
    monkeypatch.setattr(trainer_module.torch, "save", save)
    assert main([*common, "--resume", "--set", "trainer.max_steps=6"]) == 0
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 6


# --- B12: --out is an existing file ---------------------------------------------------------------------
def test_out_that_is_a_file(setup, capsys, tmp_path):
    base, cfg, ckpt = setup
    afile = tmp_path / "afile"
    afile.write_text("x")
    img = base / "data" / "images" / "case_000.nii.gz"
    lab = base / "data" / "labels" / "case_000.nii.gz"
    assert main(["train", str(cfg), "--out", str(afile)]) == 1
    assert "exists and is not a folder" in _err(capsys)
    assert main(["predict", str(img), "--model", str(ckpt), "--out", str(afile), "--device", "cpu"]) == 1
    assert "--out" in (err := _err(capsys)) and "exists and is not a folder" in err
    assert main(["predict", str(img), "--model", str(ckpt), "--out", str(afile / "sub"), "--device", "cpu"]) == 1
    assert "is a file" in _err(capsys)
    with pytest.raises(SystemExit, match="exists and is not a folder"):
        main(["evaluate", str(lab), str(lab), "--out", str(afile)])


# --- B6 / B7: predict output names ----------------------------------------------------------------------
def test_predict_refuses_colliding_output_names(setup, capsys, tmp_path):
    base, _, ckpt = setup
    img = base / "data" / "images" / "case_000.nii.gz"
    for d in ("dup1", "dup2"):
        (tmp_path / d).mkdir()
        shutil.copy(img, tmp_path / d / "scan.nii.gz")
    a, b = tmp_path / "dup1" / "scan.nii.gz", tmp_path / "dup2" / "scan.nii.gz"
    assert main(["predict", str(a), str(b), "--model", str(ckpt), "--out", str(tmp_path / "p"),
                 "--device", "cpu"]) == 1
    err = _err(capsys)
    assert str(a) in err and str(b) in err and "scan_seg.nii.gz" in err
    assert not (tmp_path / "p").exists()


def test_nnunet_named_images_predict_then_evaluate(setup, capsys, tmp_path):
    base, _, ckpt = setup
    ds = tmp_path / "ds"
    for i in range(2):
        (ds / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(base / "data" / "images" / f"case_00{i}.nii.gz", ds / "images" / f"case_00{i}_0000.nii.gz")
        shutil.copytree(base / "data" / "labels", ds / "labels", dirs_exist_ok=True)
    images = sorted(str(p) for p in (ds / "images").iterdir())
    assert main(["predict", *images, "--model", str(ckpt), "--out", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["case_000_seg.nii.gz", "case_001_seg.nii.gz"]
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "pred"), str(ds / "labels")]) == 0
    assert "2 case(s)" in capsys.readouterr().out
    # older predictions named after the image (case_000_0000_seg) pair too
    from medfast.tasks.evaluation import find_evaluation_pairs

    old = tmp_path / "old"
    old.mkdir()
    for i in range(2):
        shutil.copy(tmp_path / "pred" / f"case_00{i}_seg.nii.gz", old / f"case_00{i}_0000_seg.nii.gz")
    assert [p.name for p, _ in find_evaluation_pairs(old, ds / "labels")] == [
        "case_000_0000_seg.nii.gz", "case_001_0000_seg.nii.gz"]
    # an image and its nnU-Net-named copy would both be case_000_seg: refused
    assert main(["predict", images[0], str(base / "data" / "images" / "case_000.nii.gz"), "--model", str(ckpt),
                 "--out", str(tmp_path / "pred2"), "--device", "cpu"]) == 1
    assert "case_000_seg.nii.gz" in _err(capsys)


# --- B4 / B5: label values and channels are checked against the model, naming the file ------------------
def _copy_data(base, dest):
    shutil.copytree(base / "data", dest)
    return dest


def test_label_values_beyond_out_channels_name_the_file(setup, capsys, tmp_path):
    base, cfg, _ = setup
    data = _copy_data(base, tmp_path / "d")
    lab = data / "labels" / "case_001.nii.gz"
    src = nib.load(str(lab))
    arr = np.asarray(src.dataobj).copy()
    arr[arr == 2] = 7
    _save(lab, arr.astype(np.uint8), src.affine)
    assert main(["train", str(cfg), "--out", str(tmp_path / "x"), "--set", f"data.root={data}",
                 "--set", "trainer.max_steps=1"]) == 1
    err = _err(capsys)
    assert str(lab) in err and "[7]" in err and "model.out_channels=3" in err
    # validation data too (data.val_images), before any training step
    assert main(["train", str(cfg), "--out", str(tmp_path / "y"), "--set", "data.root=null",
                 "--set", f"data.train_images=[{data / 'images' / 'case_000.nii.gz'}]",
                 "--set", f"data.train_labels=[{data / 'labels' / 'case_000.nii.gz'}]",
                 "--set", f"data.val_images=[{data / 'images' / 'case_001.nii.gz'}]",
                 "--set", f"data.val_labels=[{lab}]", "--set", "trainer.val_every=1",
                 "--set", "trainer.val_at_start=true"]) == 1
    assert str(lab) in _err(capsys)


def test_channels_and_dimensions_are_checked_against_the_model(setup, capsys, tmp_path):
    base, cfg, ckpt = setup
    data = _copy_data(base, tmp_path / "d")
    img = data / "images" / "case_001.nii.gz"
    src = nib.load(str(img))
    x = np.asarray(src.dataobj)
    _save(img, np.stack([x, x], -1), src.affine)
    assert main(["train", str(cfg), "--out", str(tmp_path / "x"), "--set", f"data.root={data}"]) == 1
    err = _err(capsys)
    assert str(img) in err and "2 channel(s)" in err and "model.in_channels" in err
    assert main(["predict", str(img), "--model", str(ckpt), "--out", str(tmp_path / "p"), "--device", "cpu"]) == 1
    err = _err(capsys)
    assert str(img) in err and "2 channel(s)" in err and "model.in_channels=1" in err
    flat = tmp_path / "flat.nii.gz"
    _save(flat, x[:, :, 0], src.affine)
    assert main(["predict", str(flat), "--model", str(ckpt), "--out", str(tmp_path / "p"), "--device", "cpu"]) == 1
    err = _err(capsys)
    assert str(flat) in err and "3D images" in err and "2D" in err


# --- B8 / B9 / minor: medfast register --------------------------------------------------------------------
@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    d = tmp_path_factory.mktemp("reg")
    rng = np.random.default_rng(0)
    lab = np.zeros((16, 16, 16), np.uint8)
    lab[4:12, 4:12, 4:12] = 1
    img = (lab * 10 + rng.normal(0, 1, lab.shape)).astype(np.float32)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    shifted = aff.copy()
    shifted[0, 3] = 6.0
    _save(d / "fixed.nii.gz", img, aff)
    _save(d / "moving.nii.gz", img, aff)
    _save(d / "fixed_lab.nii.gz", lab, aff)
    _save(d / "moving_lab.nii.gz", lab, aff)
    _save(d / "fixed_lab_shifted.nii.gz", lab, shifted)
    _save(d / "moving_lab_float.nii.gz", lab.astype(np.float32) + 0.4, aff)
    _save(d / "moving2d.nii.gz", img[:, :, 8], aff)
    return d


def _register(reg, *extra):
    return ["register", str(reg / "fixed.nii.gz"), str(reg / "moving.nii.gz"), "--no-progress", "--device", "cpu",
            "--out", str(reg / "out"), *extra]


def test_register_checks_label_maps(reg, capsys):
    no_opt = ["--affine-levels", "", "--deform-levels", ""]
    assert main(_register(reg, "--fixed-labels", str(reg / "fixed_lab.nii.gz"), "--moving-labels",
                          str(reg / "moving_lab.nii.gz"), *no_opt)) == 0
    capsys.readouterr()
    assert main(_register(reg, "--fixed-labels", str(reg / "fixed_lab_shifted.nii.gz"), "--moving-labels",
                          str(reg / "moving_lab.nii.gz"), *no_opt)) == 1
    err = _err(capsys)
    assert "fixed_lab_shifted.nii.gz" in err and "different affines" in err
    assert main(_register(reg, "--fixed-labels", str(reg / "fixed_lab.nii.gz"), "--moving-labels",
                          str(reg / "moving_lab_float.nii.gz"), *no_opt)) == 1
    err = _err(capsys)
    assert "moving_lab_float.nii.gz" in err and "non-integer" in err


@pytest.mark.parametrize("extra, match", [
    # (a dead-option hunt: the demo ran, exit 0, with a nonexistent --model and images it never read)
    (["--demo", "--model", "/nonexistent/model.pt"], "--model would be ignored"),
    (["--demo"], "FIXED / MOVING would be ignored"),
    (["--demo", "--fixed-labels", "f.nii.gz", "--moving-labels", "m.nii.gz"], "--fixed-labels / --moving-labels"),
    (["--resolution", "8"], "--resolution and --seed set up the --demo pair"),
    (["--seed", "3"], "--resolution and --seed set up the --demo pair"),
])
def test_register_refuses_what_its_mode_ignores(reg, capsys, tmp_path, extra, match):
    out = tmp_path / "o"
    assert main([*_register(reg), "--out", str(out), *extra]) == 1  # (_register gives FIXED and MOVING)
    err = _err(capsys)
    assert match in err, err
    assert not out.exists()


def test_register_levels_and_dimensions(reg, capsys):
    assert main(_register(reg, "--deform-levels", "64", "--affine-levels", "")) == 1
    err = _err(capsys)
    assert "--deform-levels" in err and "[64]" in err and "16" in err
    with pytest.raises(SystemExit) as exc:
        main(_register(reg, "--affine-levels", "abc"))
    assert exc.value.code == 2
    err = _err(capsys)
    assert "argument --affine-levels" in err and "abc" in err
    afile = reg / "afile"
    afile.write_text("x")
    assert main(["register", str(reg / "fixed.nii.gz"), str(reg / "moving.nii.gz"), "--out", str(afile)]) == 1
    assert "exists and is not a folder" in _err(capsys)
    args = ["register", str(reg / "fixed.nii.gz"), str(reg / "moving2d.nii.gz"), "--no-progress", "--device",
            "cpu", "--out", str(reg / "out")]
    assert main(args) == 1
    err = _err(capsys)
    assert "moving2d.nii.gz" in err and "2D" in err and "3D" in err


def test_register_model_whose_weights_do_not_fit_names_the_file(tmp_path):
    from medfast.nets import LocalNet
    from medfast.tasks.registration import RegistrationError, load_model_info, save_model

    kwargs = dict(spatial_dims=3, in_channels=2, num_channel_initial=4, depth=2, extract_levels=(0, 1, 2))
    path = tmp_path / "model.pt"
    save_model(path, LocalNet(**kwargs), kwargs, (16, 16, 16))
    ckpt = torch.load(path, weights_only=False)
    ckpt["net_kwargs"]["num_channel_initial"] = 8  # an edited or mixed-up checkpoint
    torch.save(ckpt, path)
    with pytest.raises(RegistrationError, match=f"the weights in {path} do not fit its LocalNet"):
        load_model_info(path)


@pytest.mark.parametrize("argv", [["predict", "x.nii.gz", "--model", "m.pt"], ["register", "f.nii.gz", "m.nii.gz"],
                                  ["evaluate", "p", "r"]])
def test_one_process_commands_refuse_torchrun(capsys, monkeypatch, argv):
    """Under torchrun every rank predicted / registered every input and printed and wrote every output twice."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(argv) == 2
    err = _err(capsys)
    assert f"medfast {argv[0]}: error: runs in one process, not under torchrun (WORLD_SIZE=2)" in err
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["info"]) == 0


class _BadFile(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        from medfast.data import DatasetError

        raise DatasetError("case_7.nii.gz: the file ends before its voxel data:\nheader says 32^3")


def test_an_error_in_a_loader_worker_is_its_own_message(capsys):
    """With data.num_workers >= 1 a data error reached the user as 'Caught DatasetError in DataLoader worker process
    0. Original Traceback (most recent call last): ...', the worker's whole traceback."""
    from medfast.cli import command_error
    from medfast.data import DatasetError

    with pytest.raises(DatasetError) as info:
        next(iter(torch.utils.data.DataLoader(_BadFile(), num_workers=1)))
    assert "Original Traceback" in str(info.value)
    assert command_error("train", info.value) == 1
    err = _err(capsys)
    assert err == "medfast train: error: case_7.nii.gz: the file ends before its voxel data:\nheader says 32^3\n"
    command_error("train", DatasetError("plain message"))
    assert _err(capsys) == "medfast train: error: plain message\n"


def test_predict_leaves_the_callers_random_state_alone(setup, tmp_path):
    """Inference built the network with a random initialisation (then replaced by the checkpoint's weights) from
    the global RNG: seeded user code that ran a prediction in between was no longer reproducible."""
    from medfast.tasks.segmentation import predict_files

    base, _, checkpoint = setup
    image = str(sorted((base / "data" / "images").iterdir())[0])
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    predict_files(checkpoint, [image], tmp_path / "pred", device="cpu", progress=False)
    assert torch.equal(torch.rand(3), expected)
