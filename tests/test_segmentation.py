"""Segmentation: sliding-window inference against MONAI and exactness for a pointwise predictor; predict
writes label maps in the input's space; `medfast train` / `medfast predict` run end to end on tiny data."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from medfast.cli import main
from medfast.data.synthetic import make_blobs
from medfast.train import importance_map, sliding_window_inference
from medfast.train.sliding_window import window_starts


def _pointwise(x):
    return torch.cat([x * 2 + 1, x.square()], dim=1)


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize("shape, roi", [((20, 17, 11), (8, 8, 8)), ((30, 25), (16, 12)), ((6, 9, 5), (8, 8, 8))])
def test_pointwise_predictor_is_reproduced_exactly(mode, shape, roi):
    x = torch.randn(2, 1, *shape)
    out = sliding_window_inference(x, roi, _pointwise, overlap=0.4, mode=mode, sw_batch_size=3)
    torch.testing.assert_close(out, _pointwise(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_matches_monai(mode):
    monai_inf = pytest.importorskip("monai.inferers")
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 3, 3, padding=1).eval()
    x = torch.randn(1, 1, 21, 18, 13)
    ours = sliding_window_inference(x, (10, 8, 8), conv, overlap=0.5, mode=mode, sw_batch_size=4)
    ref = monai_inf.sliding_window_inference(x, (10, 8, 8), 4, conv, overlap=0.5, mode=mode)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_window_placement_and_weights():
    assert window_starts(10, 4, 0.5) == [0, 2, 4, 6]
    assert window_starts(11, 4, 0.5) == [0, 2, 4, 6, 7]
    assert window_starts(3, 4, 0.5) == [0]
    w = importance_map((9, 7), "gaussian")
    assert w.max() == w[4, 3] and w.max() <= 1 and w.min() >= 1e-3
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(torch.zeros(1, 1, 4, 4), (2, 2), _pointwise, overlap=1.0)
    with pytest.raises(ValueError, match="roi_size must be whole"):
        sliding_window_inference(torch.zeros(1, 1, 4, 4), (2.5, 2), _pointwise)
    for roi in ((float("nan"), 2), (float("inf"), 2)):  # (int(nan) / int(inf) raised unnamed errors)
        with pytest.raises(ValueError, match="roi_size must be whole"):
            sliding_window_inference(torch.zeros(1, 1, 4, 4), roi, _pointwise)
    for bad in (-0.125, 0.0, float("nan"), float("inf"), (0.125, -1.0)):  # (negative: a constant blend, silently)
        with pytest.raises(ValueError, match="sigma_scale must be > 0 and finite"):
            sliding_window_inference(torch.zeros(1, 1, 4, 4), (2, 2), _pointwise, mode="gaussian", sigma_scale=bad)
        with pytest.raises(ValueError, match="sigma_scale must be > 0 and finite"):
            importance_map((4, 4), "gaussian", bad)
    with pytest.raises(ValueError, match="roi_size must be a number or 2"):
        sliding_window_inference(torch.zeros(1, 1, 4, 4), (2, 2, 2), _pointwise)
    with pytest.raises(ValueError, match="empty batch"):
        sliding_window_inference(torch.zeros(0, 1, 4, 4), (2, 2), _pointwise)
    with pytest.raises(ValueError, match=r"predictor returned an output of shape \(1, 1, 2\)"):
        sliding_window_inference(torch.zeros(1, 1, 4, 4), (2, 2), lambda x: x[:, :, 0], sw_batch_size=1)
    with pytest.raises(TypeError, match="predictor must return a tensor"):
        sliding_window_inference(torch.zeros(1, 1, 4, 4), (2, 2), lambda x: x.numpy())


def _sw_pair(x, roi, predictor, **kw):
    """medfast's and MONAI's sliding-window outputs for the same call."""
    monai_inf = pytest.importorskip("monai.inferers")
    sw = kw.pop("sw_batch_size", 3)
    kw.setdefault("overlap", 0.5)  # (MONAI's default is 0.25)
    return (sliding_window_inference(x, roi, predictor, sw_batch_size=sw, **kw),
            monai_inf.sliding_window_inference(x, roi, sw, predictor, **kw))


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_matches_monai_for_what_monai_accepts(mode):
    """int and non-positive roi sizes, per-axis overlap / sigma_scale, downsampled and dict outputs: MONAI's
    results (each of these raised an unrelated TypeError / RuntimeError before)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 2, 3, padding=1).eval()
    x = torch.randn(2, 1, 20, 18, 12)
    with torch.no_grad():
        for roi, kw in [(8, {}), ((8, -1, 6), {}), ((8, 8, 8), {"overlap": (0.5, 0.25, 0.0)}),
                        ((10, 8, 6), {"sigma_scale": (0.125, 0.25, 0.5)})]:
            ours, ref = _sw_pair(x, roi, conv, mode=mode, **kw)
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
        down = torch.nn.Conv3d(1, 2, 3, padding=1, stride=2).eval()  # output = roi / 2
        ours, ref = _sw_pair(x, (8, 8, 8), down, mode=mode)
        assert ours.shape == ref.shape == (2, 2, 10, 9, 6)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
        ours, ref = _sw_pair(x, (8, 8, 8), lambda p: {"seg": conv(p), "aux": p * 2}, mode=mode)
        assert set(ours) == {"seg", "aux"}
        for k in ours:
            torch.testing.assert_close(ours[k], ref[k], atol=1e-5, rtol=1e-4)


def test_gradients_flow_as_in_monai():
    """Outside no_grad the result is differentiable (it was silently detached): the same gradients w.r.t. the
    predictor's parameters and the input as MONAI's."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 2, 3, padding=1)
    x = torch.randn(1, 1, 20, 17, requires_grad=True)
    ours, ref = _sw_pair(x, (8, 8), conv, mode="gaussian")
    assert ours.requires_grad
    g_ours = torch.autograd.grad(ours.square().sum(), [conv.weight, x])
    g_ref = torch.autograd.grad(ref.square().sum(), [conv.weight, x])
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _train_args(tmp_path, data, out, steps=25):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""
task: segmentation
data: {{root: {data}, spacing: [2.0, 2.0, 2.0], val_deformations: 1}}
model: {{channels: [4, 8], out_channels: 3}}
augment: {{patch_size: [8, 8, 8], deform_grid: 3}}
optim: {{lr: 0.02}}
trainer: {{batch_size: 2, val_every: 25, checkpoint_every: 25, progress: false, tensorboard: false,
          threads: 1}}
""")
    return ["train", str(cfg), "--set", f"trainer.max_steps={steps}", "--out", str(out)]


def test_cli_train_and_predict_end_to_end(tmp_path, capsys):
    data = tmp_path / "data"
    make_blobs(data, n=3, shape=(20, 18, 16), classes=3, spacing=(1.0, 1.0, 1.5))
    out = tmp_path / "run"
    assert main(_train_args(tmp_path, data, out)) == 0
    text = capsys.readouterr().out
    assert "25 steps" in text and "validation dice_mean" in text
    results = json.loads((out / "results.json").read_text())
    assert results["finished"] and 0 <= results["validation"]["dice_mean"] <= 1
    # predict on an input with an oblique affine: the output is on the input's grid, with its header
    src = nib.load(str(data / "images" / "case_000.nii.gz"))
    affine = src.affine.copy()
    affine[:3, :3] = affine[:3, :3] @ np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])
    img = nib.Nifti1Image(np.asarray(src.dataobj), affine, header=src.header)
    img.header["descrip"] = b"medfast test input"
    nib.save(img, str(tmp_path / "input.nii.gz"))
    assert main(["predict", str(tmp_path / "input.nii.gz"), "--model", str(out / "checkpoints" / "last.pt"),
                 "--out", str(tmp_path / "pred"), "--device", "cpu", "--probabilities"]) == 0
    seg = nib.load(str(tmp_path / "pred" / "input_seg.nii.gz"))
    assert seg.shape == src.shape and np.allclose(seg.affine, affine)
    assert seg.header["descrip"].tobytes().rstrip(b"\0") == b"medfast test input"
    labels = np.asarray(seg.dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}
    prob = nib.load(str(tmp_path / "pred" / "input_prob.nii.gz"))
    assert prob.shape == (*src.shape, 3)
    np.testing.assert_allclose(np.asarray(prob.dataobj).sum(-1), 1, atol=1e-4)
    # the same scan stored in another axis order (x flipped, y/z swapped): the same segmentation, voxel for voxel
    data_ras = np.asarray(src.dataobj)
    flipped = np.flip(data_ras, 0).transpose(0, 2, 1).copy()
    aff2 = src.affine @ np.array([[-1, 0, 0, data_ras.shape[0] - 1], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(flipped, aff2), str(tmp_path / "flipped.nii.gz"))
    nib.save(src, str(tmp_path / "orig.nii.gz"))
    assert main(["predict", str(tmp_path / "orig.nii.gz"), str(tmp_path / "flipped.nii.gz"), "--model",
                 str(out / "checkpoints" / "last.pt"), "--out", str(tmp_path / "pred2"), "--device", "cpu"]) == 0
    seg_o = np.asarray(nib.load(str(tmp_path / "pred2" / "orig_seg.nii.gz")).dataobj)
    seg_f = np.asarray(nib.load(str(tmp_path / "pred2" / "flipped_seg.nii.gz")).dataobj)
    assert np.array_equal(np.flip(seg_f.transpose(0, 2, 1), 0), seg_o)
    # resume from the last checkpoint to a longer run
    assert main(_train_args(tmp_path, data, out, steps=26) + ["--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_nnunet_channel_files_train_predict_evaluate(tmp_path, capsys):
    """A 2-channel data set stored as nnU-Net stores it (images/case_0000, case_0001 + labels/case): trained from
    data.root, its test set given as channel lists, predicted from the files or their folder into one
    <case>_seg.nii.gz with the _0000 file's grid and header, the same as from the equivalent 4D files, and scored
    by medfast evaluate."""
    from tests.conftest import TINY_SEGMENTATION_CONFIG

    blobs = tmp_path / "blobs"
    make_blobs(blobs, n=2, shape=(12, 12, 12), classes=3)
    ds, four_d = tmp_path / "ds", tmp_path / "four_d"
    for d in (ds / "images", ds / "labels", four_d):
        d.mkdir(parents=True)
    affine = np.array([[0, -1.5, 0, 10.0], [1.2, 0, 0, -4.0], [0, 0, 1.0, 3.0], [0, 0, 0, 1]])
    for i in range(2):
        x = np.asarray(nib.load(str(blobs / "images" / f"case_00{i}.nii.gz")).dataobj).astype(np.float32)
        channels = [x, (x - 1) ** 2]  # the second channel tells the classes apart differently
        for k, c in enumerate(channels):
            img = nib.Nifti1Image(c, affine)
            img.header["descrip"] = f"channel {k}".encode()
            img.set_sform(affine, code=1 + k)
            nib.save(img, str(ds / "images" / f"case_00{i}_000{k}.nii.gz"))
        nib.save(nib.Nifti1Image(np.stack(channels, -1), affine), str(four_d / f"case_00{i}.nii.gz"))
        lab = np.asarray(nib.load(str(blobs / "labels" / f"case_00{i}.nii.gz")).dataobj)
        nib.save(nib.Nifti1Image(lab, affine), str(ds / "labels" / f"case_00{i}.nii.gz"))
    chan = [[str(ds / "images" / f"case_00{i}_000{k}.nii.gz") for k in range(2)] for i in range(2)]
    cfg, extra = tmp_path / "seg.yaml", tmp_path / "test_set.yaml"
    cfg.write_text(TINY_SEGMENTATION_CONFIG.format(root=ds, steps=2))
    extra.write_text(json.dumps({"model": {"in_channels": 2}, "data": {
        "test_images": [chan[1]], "test_labels": [str(ds / "labels" / "case_001.nii.gz")]}}))
    run = tmp_path / "run"
    assert main(["train", str(cfg), str(extra), "--out", str(run)]) == 0
    tested = json.loads((run / "test_results.json").read_text())["test"]
    assert [t["image"] for t in tested] == [chan[1]] and tested[0]["prediction"].endswith("case_001_seg.nii.gz")
    ckpt = str(run / "checkpoints" / "last.pt")
    # the channel files in any order, one by one; their folder; the 4D files
    assert main(["predict", chan[1][1], chan[0][0], chan[1][0], chan[0][1], "--model", ckpt, "--out",
                 str(tmp_path / "pred"), "--device", "cpu", "--probabilities"]) == 0
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [
        "case_000_prob.nii.gz", "case_000_seg.nii.gz", "case_001_prob.nii.gz", "case_001_seg.nii.gz"]
    assert main(["predict", str(ds / "images"), "--model", ckpt, "--out", str(tmp_path / "pred_dir"),
                 "--device", "cpu"]) == 0
    assert main(["predict", str(four_d), "--model", ckpt, "--out", str(tmp_path / "pred_4d"), "--device", "cpu",
                 "--probabilities"]) == 0
    for i in range(2):
        seg = nib.load(str(tmp_path / "pred" / f"case_00{i}_seg.nii.gz"))
        assert seg.shape == (12, 12, 12) and np.allclose(seg.affine, affine)
        assert seg.header["descrip"].tobytes().rstrip(b"\0") == b"channel 0" and int(seg.header["sform_code"]) == 1
        labels = np.asarray(seg.dataobj)
        # the probabilities (not only their argmax) are those of the 4D file holding the same channels
        prob = np.asarray(nib.load(str(tmp_path / "pred" / f"case_00{i}_prob.nii.gz")).dataobj)
        assert prob.shape == (12, 12, 12, 3) and prob.std() > 0
        np.testing.assert_array_equal(prob, np.asarray(nib.load(str(tmp_path / "pred_4d" /
                                                                   f"case_00{i}_prob.nii.gz")).dataobj))
        for other in ("pred_dir", "pred_4d"):
            assert np.array_equal(np.asarray(nib.load(str(tmp_path / other / f"case_00{i}_seg.nii.gz")).dataobj),
                                  labels)
    # finish() segmented the test case as predict does
    assert np.array_equal(np.asarray(nib.load(tested[0]["prediction"]).dataobj),
                          np.asarray(nib.load(str(tmp_path / "pred" / "case_001_seg.nii.gz")).dataobj))
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "pred"), str(ds / "labels")]) == 0
    assert "2 case(s)" in capsys.readouterr().out
    # errors name the case / file: a missing channel, a gap, channel files on another grid
    assert main(["predict", chan[0][0], "--model", ckpt, "--out", str(tmp_path / "e1"), "--device", "cpu"]) == 1
    assert "case_000_0000.nii.gz has 1 channel(s) but the model takes model.in_channels=2" in capsys.readouterr().err
    gap = tmp_path / "gap"
    gap.mkdir()
    shutil.copy(chan[0][0], gap / "case_000_0000.nii.gz")
    shutil.copy(chan[0][1], gap / "case_000_0002.nii.gz")
    assert main(["predict", str(gap), "--model", ckpt, "--out", str(tmp_path / "e2"), "--device", "cpu"]) == 1
    assert "case 'case_000' has channel files _0000, _0002 but not _0001" in capsys.readouterr().err
    nib.save(nib.Nifti1Image(np.zeros((12, 12, 11), np.float32), affine), str(gap / "case_000_0001.nii.gz"))
    (gap / "case_000_0002.nii.gz").unlink()
    assert main(["predict", str(gap), "--model", ckpt, "--out", str(tmp_path / "e3"), "--device", "cpu"]) == 1
    assert f"channel file {gap / 'case_000_0001.nii.gz'} has spatial shape (12, 12, 11)" in capsys.readouterr().err
    assert not (tmp_path / "e2").exists() and not (tmp_path / "e3").exists()  # checked before any output


def test_cli_errors_are_messages(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 1
    assert "config file not found" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text(f"data: {{root: {tmp_path / 'nodata'}}}\n")
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r")]) == 1
    assert "image folder not found" in capsys.readouterr().err
    assert main(["predict", "x.nii.gz", "--model", str(tmp_path / "none.pt")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "c.yaml"), "--print-config", "--set", "trainer.max_steps=3"]) == 0
    assert "max_steps: 3" in capsys.readouterr().out


def test_validation_hd95_mean_penalizes_a_missed_class():
    # the mean HD95 left out classes with an infinite distance: missing a whole region scored better (0.5 mm)
    # than predicting it with one stray blob; a class in only one map now counts as the image diagonal
    from medfast.tasks.segmentation import SegmentationTask
    from medfast.train import load_config

    config = load_config([], ["model.out_channels=4", "model.channels=[4, 8]", "inference.roi_size=null",
                              "augment.patch_size=null", "data.root=unused"])
    task = SegmentationTask(config)
    label = torch.zeros(1, 32, 32, 32, dtype=torch.long)
    label[0, 8:24, 8:24, 8:24] = 2
    label[0, 12:20, 12:20, 12:20] = 1
    label[0, 14:18, 14:18, 14:18] = 3

    class Oracle(torch.nn.Module):
        def __init__(self, miss3, stray):
            super().__init__()
            self.miss3, self.stray = miss3, stray

        def forward(self, x):
            lab = label.clone()
            if self.miss3:
                lab[lab == 3] = 1
            if self.stray:
                lab[0, 28:30, 28:30, 28:30] = 3
            return torch.nn.functional.one_hot(lab, 4).movedim(-1, 1).float() * 20

    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))[None]
    batch = {"image": torch.zeros(1, 1, 32, 32, 32), "label": label, "affine": affine}
    rows = [task.validation_step(Oracle(*case), batch, torch.device("cpu"))[0]
            for case in ((False, False), (False, True), (True, False))]
    assert rows[0]["hd95_mean"] == 0.0
    assert 0 < rows[1]["hd95_mean"] < rows[2]["hd95_mean"]
    diagonal = float(np.linalg.norm([64.0, 64.0, 64.0]))  # 32 voxels of 2 mm per axis
    assert rows[2]["hd95_mean"] == pytest.approx((0.0 + 2.0 * 0 + diagonal) / 3, abs=2.0)


def test_validation_dice_scores_a_false_positive_class_as_evaluate_does(tmp_path):
    # a class only the prediction holds had Dice NaN (left out of dice_mean: 1.0) while medfast evaluate scored
    # the same prediction 0; a class in neither map stays NaN, and a case with no class at all has dice_mean NaN
    # (without NumPy's "Mean of empty slice" warning)
    import warnings

    from medfast.tasks.evaluation import evaluate_pair
    from medfast.tasks.segmentation import SegmentationTask
    from medfast.train import load_config

    config = load_config([], ["model.out_channels=4", "model.channels=[4, 8]", "inference.roi_size=null",
                              "augment.patch_size=null", "data.root=unused"])
    task = SegmentationTask(config)
    label = torch.zeros(1, 16, 16, 16, dtype=torch.long)
    label[0, 4:12, 4:12, 4:12] = 1
    pred = label.clone()
    pred[0, 0:3, 0:3, 0:3] = 2  # class 2: a false positive; class 3: in neither

    class Fixed(torch.nn.Module):  # a "network" whose argmax is `out`
        def __init__(self, out):
            super().__init__()
            self.out = out

        def forward(self, x):
            return torch.nn.functional.one_hot(self.out, 4).movedim(-1, 1).float() * 20

    batch = {"image": torch.zeros(1, 1, 16, 16, 16), "label": label, "affine": torch.eye(4, dtype=torch.float64)[None]}
    [row] = task.validation_step(Fixed(pred), batch, torch.device("cpu"))
    assert row["dice_1"] == 1.0 and row["dice_2"] == 0.0 and np.isnan(row["dice_3"])
    assert row["dice_mean"] == 0.5
    for name, x in (("pred", pred), ("ref", label)):
        nib.save(nib.Nifti1Image(x[0].numpy().astype(np.uint8), np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    rows = evaluate_pair(tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", num_classes=4)
    np.testing.assert_array_equal([r["dice"] for r in rows], [row[f"dice_{c}"] for c in (1, 2, 3)])
    empty = dict(batch, label=torch.zeros_like(label))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        [row] = task.validation_step(Fixed(torch.zeros_like(label)), empty, torch.device("cpu"))
    assert all(np.isnan(row[f"dice_{c}"]) for c in (1, 2, 3)) and np.isnan(row["dice_mean"])
