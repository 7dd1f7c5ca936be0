"""Classification fixes from a bug hunt: a run on images of different sizes (no data.shape) gets through its
final report and cam.png; ``medfast predict --set data.normalize=<typo>`` is refused; data.shape resizing
antialiases (2D) / area-averages (3D) where it shrinks, and leaves upsampling as it was."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medfast.train import ConfigError, Trainer, load_config

Image = pytest.importorskip("PIL.Image")


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)
    return path


def _folder(root, sizes, classes=("a", "b")):
    """One noisy PNG per entry of ``sizes`` in every class folder."""
    rng = np.random.default_rng(0)
    for c in classes:
        for i, s in enumerate(sizes):
            _png(root / c / f"{i}.png", rng.integers(0, 255, (s, s)))
    return root


def _config(out, *overrides):
    """A tiny SonoNet (width 4, blocks [1, 1, 1]) trained 2 steps on the CPU."""
    base = ["data.normalize=minmax", "task=classification", "model.name=sononet", "model.spatial_dims=2",
            "model.out_channels=2", "model.channels=[4]", "model.kwargs={convs_per_block: [1, 1, 1]}",
            "trainer.batch_size=4", "trainer.max_steps=2", "trainer.val_every=2", "trainer.checkpoint_every=2",
            "trainer.progress=false", "trainer.tensorboard=false", "trainer.threads=1", "trainer.device=cpu",
            f"trainer.out_dir={out}"]
    return load_config([], [*base, *overrides])


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """Training images all 16x16 (batch 4 stacks), a validation folder of 16, 20, 18 and 22 pixel images, no
    data.shape, plots on: the run of the hunt's repro."""
    tmp = tmp_path_factory.mktemp("cls_hunt2d")
    train = _folder(tmp / "train", [16] * 4)
    val = _folder(tmp / "val", [16, 20, 18, 22])
    Trainer(_config(tmp / "run", f"data.root={train}", "data.val_fraction=0", "trainer.plots=true",
                    f"data.dataset_args={{val_root: {val}}}")).fit()
    return tmp


# ---- 1. the final report of a run on images of different sizes ---------------------------------------------
def test_run_on_validation_images_of_different_sizes_writes_its_report(mixed_run):
    pytest.importorskip("matplotlib")
    run = mixed_run / "run"
    report = json.loads((run / "classification_report.json").read_text())
    assert report["n"] == 8 and np.array(report["confusion_matrix"]).sum() == 8
    assert json.loads((run / "results.json").read_text())["classification"]["n"] == 8
    assert (run / "cam.png").read_bytes()[:4] == b"\x89PNG"


def _task_and_model(tmp_path, root):
    from medfast.tasks.classification import ClassificationTask

    task = ClassificationTask(_config(tmp_path / "run", f"data.root={root}", "data.val_fraction=0.5"))
    task.build_datasets()
    model = task.build_model().eval()
    return task, model


def test_cams_of_different_sizes_are_mapped_one_by_one(tmp_path, monkeypatch):
    from medfast.tasks.classification.cam import class_activation_map

    task, model = _task_and_model(tmp_path, _folder(tmp_path / "img", [12]))
    drawn = {}
    monkeypatch.setattr("medfast.tasks.classification.cam.save_cam_png",
                        lambda images, cams, path, titles: drawn.update(images=images, cams=cams, titles=titles))
    torch.manual_seed(0)
    shown = [(torch.rand(1, 12, 14), 0, ""), (torch.rand(1, 9, 16), 1, "")]
    task._save_cams(model, shown, torch.device("cpu"), tmp_path / "cam.png")
    images, cams = drawn["images"], drawn["cams"]
    assert images.shape == (2, 1, 12, 16) and cams.shape == (2, 12, 16)  # the largest height and width
    for i, (x, _, _) in enumerate(shown):
        h, w = x.shape[1:]
        cam, pred = class_activation_map(model, x[None], encoding="nominal")
        assert torch.equal(images[i, :, :h, :w], x) and torch.equal(cams[i, :h, :w], cam[0])
        assert drawn["titles"][i].endswith(f"pred {task.encoder.class_names[int(pred)]}")
        pad = torch.ones(12, 16, dtype=torch.bool)
        pad[:h, :w] = False
        assert bool((images[i, 0][pad] == x.min()).all()) and bool(cams[i][pad].isnan().all())
    # images of one size: one batch, as before (the same maps, bitwise)
    same = [(torch.rand(1, 12, 12), 0, ""), (torch.rand(1, 12, 12), 1, "")]
    task._save_cams(model, same, torch.device("cpu"), tmp_path / "cam.png")
    cams, _ = class_activation_map(model, torch.stack([x for x, _, _ in same]), encoding="nominal")
    assert torch.equal(drawn["cams"], cams) and not drawn["cams"].isnan().any()


def test_padded_cams_draw(tmp_path):
    pytest.importorskip("matplotlib")
    from medfast.tasks.classification.cam import save_cam_png
    from medfast.tasks.classification.task import _pad_for_grid

    images, cams = _pad_for_grid([torch.rand(1, 8, 10), torch.rand(1, 12, 6)], [torch.rand(8, 10), torch.rand(12, 6)])
    assert save_cam_png(images, cams, tmp_path / "cam.png", ["a", "b"]).read_bytes()[:4] == b"\x89PNG"


def test_finish_reads_one_image_at_a_time_without_data_shape(tmp_path, monkeypatch):
    """Validation of the trainer uses batch 1; so does the final evaluation when sizes may differ."""
    import medfast.tasks.classification.task as T

    root = _folder(tmp_path / "img", [12, 14, 12, 16])
    task, model = _task_and_model(tmp_path, root)
    sizes = []
    check = T.ClassificationTask._check_batch
    monkeypatch.setattr(task, "_check_batch", lambda batch, image: (sizes.append(image.shape[0]),
                                                                    check(task, batch, image)))
    report = task.finish(model, torch.device("cpu"), tmp_path)
    assert report["classification"]["n"] == 4 and sizes == [1, 1, 1, 1]


# ---- 2. medfast predict: data.normalize is checked ----------------------------------------------------------
def test_predict_refuses_an_unknown_normalize(mixed_run, tmp_path, capsys):
    from medfast.cli import main
    from medfast.tasks.classification.task import predict_files

    ckpt = mixed_run / "run" / "checkpoints" / "last.pt"
    image = mixed_run / "val" / "a" / "1.png"
    with pytest.raises(ConfigError, match=r"data.normalize must be one of zscore, minmax, none; got 'min-max'"):
        predict_files(ckpt, [image], tmp_path / "p", device="cpu", overrides=["data.normalize=min-max"])
    assert not (tmp_path / "p").exists()  # before any work
    assert main(["predict", str(image), "--model", str(ckpt), "--out", str(tmp_path / "q"), "--no-cam",
                 "--set", "data.normalize=zscor"]) == 1
    assert "data.normalize must be one of zscore, minmax, none; got 'zscor'" in capsys.readouterr().err
    for value in ("none", "zscore"):  # the valid values still work
        out = predict_files(ckpt, [image], tmp_path / value, device="cpu", save_cam=False,
                            overrides=[f"data.normalize={value}"])
        assert out[0].is_file()


# ---- 3. resizing with data.shape -----------------------------------------------------------------------------
def test_downsampling_keeps_a_small_bright_dot(tmp_path):
    from medfast.tasks.classification import ImageFolderDataset

    x = np.zeros((256, 256), np.uint8)
    x[104:107, 104:107] = 255
    _png(tmp_path / "dot" / "0.png", x)
    _png(tmp_path / "none" / "0.png", np.zeros_like(x))
    img = ImageFolderDataset(tmp_path, size=(32, 32))[0]["image"]
    t = torch.from_numpy(x / 255.0).float()[None, None]
    ref = F.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)[0]
    assert torch.equal(img, ref)
    assert float(img.max()) > 0.05 and float(img.sum()) == pytest.approx(9 / 64, rel=0.01)  # plain bilinear: 0


def test_2d_upsampling_is_unchanged_and_mixed_axes_antialias_the_shrinking_one(tmp_path):
    from medfast.tasks.classification import ImageFolderDataset

    rng = np.random.default_rng(1)
    x = rng.integers(0, 255, (10, 40)).astype(np.uint8)
    _png(tmp_path / "a" / "0.png", x)
    _png(tmp_path / "b" / "0.png", x)
    t = torch.from_numpy(x / 255.0).float()[None, None]
    up = ImageFolderDataset(tmp_path, size=(20, 60))[0]["image"]
    assert torch.equal(up, F.interpolate(t, size=(20, 60), mode="bilinear", align_corners=False)[0])
    mixed = ImageFolderDataset(tmp_path, size=(20, 8))[0]["image"]  # grows along H, shrinks 5x along W
    ref = F.interpolate(t, size=(20, 8), mode="bilinear", align_corners=False, antialias=True)[0]
    assert torch.equal(mixed, ref)


def test_3d_shrinking_is_area_averaged_and_upsampling_unchanged(tmp_path):
    nib = pytest.importorskip("nibabel")
    from medfast.tasks.classification import ImageFolderDataset

    vol = np.zeros((32, 32, 32), np.float32)
    vol[10:12, 20:22, 5:7] = 1.0  # a 2x2x2 dot
    for c in ("dot", "none"):
        (tmp_path / c).mkdir()
        nib.save(nib.Nifti1Image(vol if c == "dot" else np.zeros_like(vol), np.eye(4)), str(tmp_path / c / "0.nii"))
    t = torch.from_numpy(vol)[None, None]

    def item(size):
        return ImageFolderDataset(tmp_path, spatial_dims=3, size=size)[0]["image"]

    small = item((4, 4, 4))
    assert torch.equal(small, F.interpolate(t, size=(4, 4, 4), mode="area")[0])
    assert float(small.sum()) == pytest.approx(8 / 512)  # the dot's mass kept (trilinear alone: 0)
    up = item((40, 36, 48))
    assert torch.equal(up, F.interpolate(t, size=(40, 36, 48), mode="trilinear", align_corners=False)[0])
    mixed = item((8, 48, 32))  # shrinks D, grows H, keeps W: area on D, then trilinear on H
    ref = F.interpolate(F.interpolate(t, size=(8, 32, 32), mode="area"), size=(8, 48, 32), mode="trilinear",
                        align_corners=False)[0]
    assert torch.equal(mixed, ref) and math.isclose(float(mixed.sum()) * 32 / 48, 8 / 4, rel_tol=0.05)
