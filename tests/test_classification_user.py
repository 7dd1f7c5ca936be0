"""The classification task as a user meets it (a bug hunt): settings it would ignore are refused, validation
CAMs keep only the drawn images, images of different sizes or too small for the network are named, a resume
with another class list is refused, val_csv_file paths start at data.root, hidden files are skipped, ordinal
probabilities agree with the decoded class, outputs are UTF-8 and complete; and the synthesis task's relative
source, single-frame grid and pose-file checks."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from medfast.data import DatasetError
from medfast.train import ConfigError, Trainer, load_config
from medfast.train.trainer import CheckpointError

Image = pytest.importorskip("PIL.Image")
REPO = Path(__file__).resolve().parents[1]


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)
    return path


def _folder(root, classes=("a", "b"), n=4, size=12, sizes=None):
    """``n`` noisy PNGs per class (sizes cycling through ``sizes``, default all ``size``)."""
    rng = np.random.default_rng(0)
    for c in classes:
        for i in range(n):
            s = (sizes or [size])[i % len(sizes or [size])]
            _png(root / c / f"{i}.png", rng.integers(0, 255, (s, s)))
    return root


def _config(root, out=None, *overrides):
    """A tiny SonoNet (width 4, blocks [1, 1, 1]: inputs of at least 4 x 4) on ``root``, 2 steps on the CPU."""
    base = [f"data.root={root}", "data.normalize=minmax", "data.val_fraction=0.25", "task=classification",
            "model.name=sononet", "model.spatial_dims=2", "model.out_channels=2", "model.channels=[4]",
            "model.kwargs={convs_per_block: [1, 1, 1]}", "trainer.batch_size=4", "trainer.max_steps=2",
            "trainer.val_every=2", "trainer.checkpoint_every=2", "trainer.progress=false",
            "trainer.tensorboard=false", "trainer.plots=false", "trainer.threads=1", "trainer.device=cpu",
            f"trainer.out_dir={out or root.parent / 'run'}"]
    return load_config([], [*base, *overrides])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step run on 12 x 12 PNGs of the classes 'normal' and 'Ödem' (no data.shape)."""
    tmp = tmp_path_factory.mktemp("cls_user")
    root = _folder(tmp / "img", ("normal", "Ödem"))
    Trainer(_config(root, tmp / "run")).fit()
    return tmp


def _task(config):
    from medfast.tasks.classification import ClassificationTask

    return ClassificationTask(config)


# ---- 1. settings the task would ignore ---------------------------------------------------------------------
@pytest.mark.parametrize("override,key", [
    ("model.norm=group", "model.norm"), ("model.deep_supervision=true", "model.deep_supervision"),
    ("model.convs_per_level=3", "model.convs_per_level"), ("augment.rotation=20", "augment.rotation"),
    ("augment.flip=[0]", "augment.flip"), ("data.test_images=[x.png]", "data.test_images"),
    ("data.train_images=[x.png]", "data.train_images"), ("data.val_images=[x.png]", "data.val_images"),
    ("data.spacing=[1, 1]", "data.spacing"), ("data.clip_percentiles=[1, 99]", "data.clip_percentiles"),
    ("data.cache=disk", "data.cache"), ("data.val_deformations=2", "data.val_deformations"),
    ("loss.lambda_dice=0.5", "loss.lambda_dice"), ("loss.batch_dice=true", "loss.batch_dice"),
    ("inference.overlap=0.25", "inference.overlap"), ("inference.roi_size=[8, 8]", "inference.roi_size"),
    ("data.dataset_args={val_root: /v}", r"data.val_fraction \(set it to 0"),
])
def test_settings_the_task_ignores_are_refused(tmp_path, override, key):
    extra = ["data.cache_dir=/c"] if override == "data.cache=disk" else []  # else refused by the shared checks
    with pytest.raises(ConfigError, match=rf"classification task does not use .*{key}"):
        _task(_config(tmp_path / "img", None, override, *extra))


def test_settings_the_task_reads_or_that_say_what_it_does_are_accepted(tmp_path, capsys):
    from medfast.cli import main

    # no cache, no reorientation, no augmentation: what the task does anyway
    _task(_config(tmp_path / "img", None, "data.cache=none", "data.reorient=false", "augment.enabled=false",
                  "data.num_workers=1", "data.shape=[16, 16]"))
    _task(_config(tmp_path / "img", None, "data.val_fraction=0", "data.dataset_args={val_root: /v}"))
    for path in sorted((REPO / "configs").glob("cls*.yaml")) + [REPO / "configs" / "classification_example.yaml"]:
        _task(load_config(path))
    sim = load_config(REPO / "configs" / "cls_demo_cpu.yaml", ["data.root=/x"])  # rendered: no folder
    with pytest.raises(ConfigError, match="does not use data.root"):
        _task(sim)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"task: classification\ndata: {{root: {tmp_path}}}\nmodel: {{name: resnet, spatial_dims: 2, "
                   f"norm: batch}}\ntrainer: {{out_dir: {tmp_path / 'run'}}}\n")
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "does not use model.norm" in err and "model.kwargs.norm" in err and "Traceback" not in err


def test_predict_accepts_a_checkpoint_holding_an_ignored_setting(run, tmp_path):
    from medfast.tasks.classification.task import predict_files

    state = torch.load(run / "run" / "checkpoints" / "last.pt", weights_only=False)
    state["config"]["augment"]["rotation"] = 20.0  # ignored by the training that wrote it
    torch.save(state, tmp_path / "old.pt")
    out = predict_files(tmp_path / "old.pt", [run / "img" / "normal" / "0.png"], tmp_path / "p", device="cpu")
    assert out[0].is_file()


# ---- 2. finish keeps only the images cam.png draws ---------------------------------------------------------
def test_finish_keeps_only_the_drawn_validation_images(tmp_path, monkeypatch):
    import medfast.tasks.classification.task as T

    root = _folder(tmp_path / "img", n=12, size=8)
    task = _task(_config(root, None, "data.val_fraction=0.9", "trainer.plots=true", "trainer.batch_size=8"))
    _, val = task.build_datasets()
    model = task.build_model()
    kept = []
    monkeypatch.setattr(T, "save_confusion_png", lambda *a, **k: None)
    monkeypatch.setattr(task, "_save_cams", lambda model, shown, device, path: kept.extend(shown))
    report = task.finish(model, torch.device("cpu"), tmp_path)
    assert len(val) == 22 and report["classification"]["n"] == 22
    assert len(kept) == 4 and sorted(y for _, y, _ in kept) == [0, 0, 1, 1]  # 2 per class, not all 22
    for x, _, _ in kept:  # copies: not views holding their whole batch
        assert x.untyped_storage().nbytes() == x.numel() * x.element_size()
    kept.clear()
    task.config.trainer.plots = False
    task.finish(model, torch.device("cpu"), tmp_path)
    assert kept == [] and (tmp_path / "classification_report.json").is_file()


# ---- 3. images of different sizes without data.shape -------------------------------------------------------
def test_images_of_different_sizes_are_refused_not_padded(tmp_path):
    from medfast.tasks.classification import ImageFolderDataset
    from medfast.tasks.classification.task import collate

    root = _folder(tmp_path / "img", sizes=[12, 10])
    ds = ImageFolderDataset(root)
    with pytest.raises(DatasetError, match=r"a/1.png: image of size 10x10 but .*a/0.png .* is 12x12.*data.shape"):
        collate([ds[0], ds[1]])
    assert collate([ds[0], ds[2]])["image"].shape == (2, 1, 12, 12)
    cfg = _config(root, None, "data.val_fraction=0", "trainer.batch_size=8")  # every batch holds both sizes
    with pytest.raises(DatasetError, match=r"image of size 1\dx1\d but .* is 1\dx1\d.*set data.shape"):
        Trainer(cfg).fit()
    Trainer(_config(root, tmp_path / "run2", "data.shape=[12, 12]", "trainer.max_steps=1")).fit()  # resized


# ---- 4. resume with another class list ----------------------------------------------------------------------
def test_resume_with_another_class_order_is_refused(tmp_path):
    root = _folder(tmp_path / "img")
    Trainer(_config(root, None, "trainer.max_steps=1", "trainer.checkpoint_every=1")).fit()
    config_yaml = (tmp_path / "run" / "config.yaml").read_text()
    again = _config(root, None, "trainer.resume=auto", "data.dataset_args={classes: [b, a]}")
    with pytest.raises(CheckpointError, match=r"last.pt was trained with the classes \['a', 'b'\] .* this run's "
                                              r"classes are \['b', 'a'\]"):
        Trainer(again).fit()
    assert (tmp_path / "run" / "config.yaml").read_text() == config_yaml  # the refused resume changed nothing
    res = Trainer(_config(root, None, "trainer.resume=auto", "data.dataset_args={classes: [a, b]}")).fit()
    assert res["step"] == 2


# ---- 6. binary encoding with another class count ------------------------------------------------------------
def test_binary_encoding_needs_two_classes(tmp_path):
    with pytest.raises(ConfigError, match=r"model.kwargs.encoding='binary' has 2 classes but model.out_channels=3"):
        _task(_config(tmp_path, None, "model.out_channels=3", "model.kwargs={encoding: binary}"))


# ---- 7. data.val_fraction near 1 ----------------------------------------------------------------------------
def test_val_fraction_must_leave_a_training_image(tmp_path):
    from medfast.train import Config
    from medfast.train.files import gather_files

    task = _task(_config(_folder(tmp_path / "img", n=2), None, "data.val_fraction=0.9"))
    with pytest.raises(ConfigError, match=r"data.val_fraction=0.9 puts all 4 images .* none in training"):
        task.build_datasets()
    c = Config()
    c.data.train_images, c.data.val_fraction = ["a.nii.gz", "b.nii.gz"], 0.8
    with pytest.raises(ConfigError, match=r"data.val_fraction=0.8 puts all 2 training images"):
        gather_files(c, task="segmentation")
    c.data.val_fraction = 0.5
    assert len(gather_files(c, task="segmentation").images) == 1


# ---- 8. images too small for the network ---------------------------------------------------------------------
def test_images_too_small_for_the_network(run, tmp_path, capsys):
    from medfast.cli import main
    from medfast.nets import SonoNet
    from medfast.tasks.classification.task import min_input_size

    net = SonoNet(1, 2, width=4, convs_per_block=(1, 1, 1)).train()
    assert min_input_size(net, 2, 1) == 4 and net.training  # mode restored
    net.eval()(torch.zeros(1, 1, 4, 4))
    with pytest.raises(RuntimeError):
        net(torch.zeros(1, 1, 3, 3))
    with pytest.raises(ConfigError, match=r"data.shape=\[3, 3\] is smaller than .* 4 pixels per axis"):
        _task(_config(tmp_path, None, "data.shape=[3, 3]")).build_model()
    tiny = _png(tmp_path / "tiny.png", np.full((3, 3), 9))
    assert main(["predict", str(run / "img" / "normal" / "0.png"), str(tiny), "--model",
                 str(run / "run" / "checkpoints" / "last.pt"), "--out", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert "tiny.png: image of size 3x3 is smaller than the network's smallest input, 4 pixels" in err
    assert "Traceback" not in err and not (tmp_path / "p" / "predictions.csv").exists()
    root = _folder(tmp_path / "img", size=3)  # training without data.shape
    with pytest.raises(DatasetError, match=r"\d.png: image of size 3x3 is smaller .* set data.shape"):
        Trainer(_config(root, None, "data.val_fraction=0")).fit()


# ---- 9. hidden files in class folders -----------------------------------------------------------------------
def test_hidden_files_are_not_images(tmp_path):
    from medfast.tasks.classification import ImageFolderDataset

    root = _folder(tmp_path / "img", n=1)
    (root / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\0" * 64)
    (root / "b" / ".hidden.png").write_bytes(b"junk")
    ds = ImageFolderDataset(root)
    assert [f.name for f in ds.files] == ["0.png", "0.png"] and all(ds[i]["image"].shape for i in range(2))


# ---- 10. ordinal probabilities with out-of-order biases ------------------------------------------------------
def test_ordinal_decoded_class_has_positive_probability():
    from medfast.tasks.classification import make_encoder

    enc = make_encoder("ordinal", 3)
    flipped = torch.tensor([[-0.5, 1.0]])  # P(y > 1) > P(y > 0): biases out of order
    p = enc.probabilities(flipped)
    s = float(torch.sigmoid(torch.tensor(-0.5)))  # P(y > 0), and P(y > 1) capped at it
    assert enc.decode(flipped, logits=True).tolist() == [0]
    torch.testing.assert_close(p, torch.tensor([[1 - s, 0.0, s]]), rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 4, generator=g) * 3  # 5 classes, mostly unordered
    enc = make_encoder("ordinal", 5)
    d, p = enc.decode(logits, logits=True), enc.probabilities(logits)
    assert bool((p.gather(1, d[:, None]) > 0).all()) and bool((p >= 0).all())
    torch.testing.assert_close(p.sum(1), torch.ones(500))
    ordered = logits.sort(1, descending=True).values  # ordered: the CORAL formula, the count of logits > 0
    s = ordered.sigmoid()
    want = torch.cat([1 - s[:, :1], s[:, :-1] - s[:, 1:], s[:, -1:]], 1)
    torch.testing.assert_close(enc.probabilities(ordered), want)
    assert torch.equal(enc.decode(ordered, logits=True), (ordered > 0).sum(1))


# ---- 11. val_csv_file paths start at data.root ----------------------------------------------------------------
def test_val_csv_paths_start_at_data_root(tmp_path):
    root = _folder(tmp_path / "img", n=3)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.csv").write_text("file,label\na/0.png,a\na/1.png,a\nb/0.png,b\nb/1.png,b\n")
    (lists / "val.csv").write_text("file,label\na/2.png,a\nb/2.png,b\n")
    task = _task(_config(root, None, "data.val_fraction=0", f"data.dataset_args={{csv_file: {lists / 'train.csv'}, "
                                                             f"val_csv_file: {lists / 'val.csv'}}}"))
    train, val = task.build_datasets()
    assert len(train) == 4 and [str(f) for f in val.files] == [str(root / "a" / "2.png"), str(root / "b" / "2.png")]
    other = _folder(tmp_path / "other", n=3)  # val_root, when given, is the validation CSV's base
    task = _task(_config(root, None, "data.val_fraction=0", f"data.dataset_args={{val_root: {other}, "
                                                             f"val_csv_file: {lists / 'val.csv'}}}"))
    assert task.build_datasets()[1].files[0] == other / "a" / "2.png"


# ---- 12. UTF-8 outputs whatever the locale, no partial predictions.csv -------------------------------------------
def test_outputs_are_utf8_under_an_ascii_locale(run, tmp_path):
    img = tmp_path / "x.png"  # an ASCII path: the C locale decodes argv / paths as ASCII
    img.write_bytes((run / "img" / "normal" / "0.png").read_bytes())
    script = (f"from medfast.tasks.classification.task import predict_files\n"
              f"from medfast.train.trainer import _Log\n"
              f"predict_files({str(run / 'run' / 'checkpoints' / 'last.pt')!r}, [{str(img)!r}], "
              f"{str(tmp_path / 'p')!r}, device='cpu', save_cam=False)\n"
              f"from pathlib import Path\n"
              f"log = _Log(Path({str(tmp_path)!r}), 'val_log')\n"
              f"log.append({{'step': 1, 'recall_\\u00d6dem': 1.0}})\n"
              f"log.append({{'step': 2, 'recall_\\u00d6dem': 0.5}})\n")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "p_Ödem" in (tmp_path / "p" / "predictions.csv").read_text(encoding="utf-8")
    assert (tmp_path / "val_log.csv").read_text(encoding="utf-8").splitlines() == ["step,recall_Ödem", "1,1.0",
                                                                                   "2,0.5"]


def test_a_failed_predictions_csv_leaves_nothing(run, tmp_path, monkeypatch):
    from medfast.tasks.classification.task import predict_files

    def fail(self, rows):
        raise OSError("disk full")

    monkeypatch.setattr(csv.DictWriter, "writerows", fail)
    with pytest.raises(OSError, match="disk full"):
        predict_files(run / "run" / "checkpoints" / "last.pt", [run / "img" / "normal" / "0.png"], tmp_path / "p",
                      device="cpu")
    assert list((tmp_path / "p").iterdir()) == []


# ---- 13. an earlier predict's CAMs -------------------------------------------------------------------------------
def test_predict_removes_an_earlier_calls_cams(run, tmp_path):
    from medfast.tasks.classification.task import predict_files

    ckpt, imgs = run / "run" / "checkpoints" / "last.pt", sorted((run / "img" / "normal").glob("*.png"))
    predict_files(ckpt, imgs[:3], tmp_path, device="cpu")
    written = predict_files(ckpt, imgs[3:], tmp_path, device="cpu")
    assert sorted((tmp_path / "cam").iterdir()) == written[1:] and len(written) == 2


# ---- 5 and 14. synthesis: relative source, one frame, pose files ----------------------------------------------
def _synthesis(*overrides):
    from medfast.tasks.synthesis import SynthesisTask

    return SynthesisTask(load_config([], ["task=synthesis", "model.spatial_dims=2", *overrides]))


def test_relative_synthesis_source_is_saved_absolute(tmp_path, monkeypatch):
    from medfast.train import config_to_dict

    monkeypatch.chdir(tmp_path)
    task = _synthesis("task_args.source=ct.nii.gz")
    assert task.args.source == str(tmp_path / "ct.nii.gz")
    assert config_to_dict(task.config)["task_args"]["source"] == str(tmp_path / "ct.nii.gz")  # what is saved
    assert _synthesis("task_args.source=cranium").config.task_args["source"] == "cranium"  # a built-in


def test_single_frame_grid_does_not_warn():
    task = _synthesis("task_args.mode=pose", "model.norm=batch", "task_args.coord_frequencies=0")
    cond, frame = torch.rand(1, 3, 8, 8), torch.rand(1, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows, _ = task._grid_rows(cond, frame, frame)
    assert rows[0][1].shape == (1, 1, 8, 8)


def test_pose_files_name_the_bad_pose(tmp_path):
    from medfast.tasks.synthesis.generate import read_poses

    ok = np.eye(4)
    ok[:3, 3] = (1, 2, 3)
    nan, scaled, shear = ok.copy(), ok.copy(), ok.copy()
    nan[0, 3] = np.nan
    scaled[:3, :3] *= 2
    shear[3] = (0, 0, 1, 1)
    # (the reader of medfast.ultrasound.read_poses, which medfast simulate --poses uses too)
    for name, bad, match in (("nan", nan, "holds NaN or inf"), ("scaled", scaled, "it is scaled by 2"),
                             ("row", shear, "its last row is")):
        np.save(tmp_path / f"{name}.npy", np.stack([ok, bad]))
        with pytest.raises(ValueError, match=rf"{name}.npy pose 1: not a rigid transform: {match}"):
            read_poses(tmp_path / f"{name}.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 4, 4)))
    with pytest.raises(ValueError, match="empty.npy: the array holds no poses"):
        read_poses(tmp_path / "empty.npy")
    (tmp_path / "ok.json").write_text(f'{{"poses": [{ok.tolist()}]}}')
    torch.testing.assert_close(read_poses(tmp_path / "ok.json"), torch.from_numpy(ok[None]))


# ---- 13. numeric class labels sort by value ---------------------------------------------------------------------
def test_numeric_class_labels_sort_by_value(tmp_path):
    """Labels that are all numbers get class indices in numeric order (as np.unique / sklearn's LabelEncoder give
    them), from a CSV and from class subfolders alike; text labels keep the text order; ``classes`` wins."""
    from medfast.tasks.classification.data import ImageFolderDataset

    labels = ["10", "2", "1", "-0.5", "1e1", "2"]  # "1e1" (= 10) ties with "10": the text breaks the tie
    for i in range(len(labels)):
        _png(tmp_path / "csv" / f"{i}.png", np.zeros((4, 4)))
    (tmp_path / "csv" / "labels.csv").write_text("file,label\n" + "".join(
        f"{i}.png,{lab}\n" for i, lab in enumerate(labels)))
    ds = ImageFolderDataset(tmp_path / "csv", csv_file=tmp_path / "csv" / "labels.csv")
    assert ds.classes == ["-0.5", "1", "2", "10", "1e1"]
    assert [ds.classes[k] for k in ds.labels] == labels  # every image keeps its own label
    # the indices np.unique gives the numbers (sklearn's LabelEncoder too): the same order
    assert np.unique([float(v) for v in labels]).tolist() == list(dict.fromkeys(float(c) for c in ds.classes))

    folders = _folder(tmp_path / "folders", [str(k) for k in range(1, 13)], n=1, size=4)
    assert ImageFolderDataset(folders).classes == [str(k) for k in range(1, 13)]  # not 1, 10, 11, 12, 2, ...
    text = _folder(tmp_path / "text", ["a10", "a2", "10", "b"], n=1, size=4)  # not all numbers: text order
    assert ImageFolderDataset(text).classes == ["10", "a10", "a2", "b"]
    assert ImageFolderDataset(folders, classes=["12", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11"]
                              ).classes[:3] == ["12", "1", "2"]


def test_numeric_class_order_is_the_checkpoints_and_predicts(tmp_path):
    """Training records the numeric class order in the checkpoint and predict names the classes in it."""
    from medfast.tasks.classification.task import predict_files

    root = _folder(tmp_path / "img", ("10", "9"), n=3)
    Trainer(_config(root, tmp_path / "run")).fit()
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    assert torch.load(ckpt, weights_only=False)["config"]["data"]["dataset_args"]["classes"] == ["9", "10"]
    predict_files(ckpt, [root / "9" / "0.png", root / "10" / "0.png"], tmp_path / "p", device="cpu",
                  save_cam=False)
    with open(tmp_path / "p" / "predictions.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[3:] == ["p_9", "p_10"]
    for row in rows:  # the class named is the index's, and the most probable one
        assert row["class"] == ["9", "10"][int(row["index"])]
        assert float(row[f"p_{row['class']}"]) == max(float(row["p_9"]), float(row["p_10"]))
