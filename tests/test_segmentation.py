"""Segmentation: sliding-window inference against MONAI and exactness for a pointwise predictor; predict
writes label maps in the input's space; `medfast train` / `medfast predict` run end to end on tiny data."""

import json

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
    with pytest.raises(ValueError, match="roi_size must be positive"):  # (an unrelated torch error before)
        sliding_window_inference(torch.zeros(1, 1, 4, 4), (0, 2), _pointwise)


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
