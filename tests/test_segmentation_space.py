"""Segmentation outputs in their input's space: headers kept by ``medfast predict`` (qform and sform), the layout of
2D probability maps, 2D scoring of ``(X, Y, 1)`` label maps (``medfast evaluate`` and the test set after training),
and test-set pairs checked before training."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")

import medfast.tasks.segmentation as seg  # noqa: E402
from medfast.cli import main  # noqa: E402
from medfast.data import DatasetError, load_nifti, save_nifti  # noqa: E402
from medfast.nets import UNet  # noqa: E402
from medfast.tasks.evaluation import evaluate_pair  # noqa: E402
from medfast.train import Trainer, config_from_dict, config_to_dict  # noqa: E402


def _oracle(model, image, config):
    """A perfect "network" for a binary task: class 1 where the (unnormalized) intensity is above 0.5."""
    p1 = torch.sigmoid(40 * (image[:, :1].float() - 0.5))
    return torch.cat([1 - p1, p1], 1)


def _config(nd, **data):
    patch = [8] * nd
    return config_from_dict({
        "task": "segmentation",
        "data": {"normalize": "none", "val_fraction": 0, "cache": "none", **data},
        "model": {"spatial_dims": nd, "in_channels": 1, "out_channels": 2, "channels": [2, 4]},
        "augment": {"patch_size": patch},
        "inference": {"roi_size": patch},
        "trainer": {"max_steps": 1, "batch_size": 1, "val_every": 0, "checkpoint_every": 0, "device": "cpu",
                    "progress": False, "tensorboard": False, "plots": False, "threads": 1},
    })


def _checkpoint(tmp_path, nd):
    """A checkpoint as medfast train writes it (an untrained UNet; predictions come from the patched oracle)."""
    config = _config(nd)
    m = config.model
    net = UNet(nd, m.in_channels, m.out_channels, m.channels, m.convs_per_level, m.norm, m.deep_supervision)
    path = tmp_path / f"model{nd}d.pt"
    torch.save({"model": net.state_dict(), "config": config_to_dict(config), "task": "segmentation"}, path)
    return path


def _rotation_z(degrees):
    t = np.deg2rad(degrees)
    r = np.eye(4)
    r[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return r


def _image_with_transforms(path, data, qform, qcode, sform, scode):
    img = nib.Nifti1Image(data, None)
    img.set_qform(qform, code=qcode)
    img.set_sform(sform, code=scode)
    nib.save(img, str(path))
    return path


Q = np.array([[-1.0, 0, 0, 9], [0, -1.5, 0, 7.5], [0, 0, 2.5, -25], [0, 0, 0, 1]])  # scanner space
HEADER_CASES = {
    "qform_scanner_sform_mni": (Q, 1, _rotation_z(30) @ Q, 4),
    "no_transform_codes": (None, 0, None, 0),
    "qform_only": (Q, 1, None, 0),
}


def _coded(path):
    h = nib.load(str(path)).header
    return h.get_qform(coded=True), h.get_sform(coded=True)


def _assert_same_transforms(out, ref):
    (qa, qca), (sa, sca) = _coded(out)
    (qb, qcb), (sb, scb) = _coded(ref)
    assert (int(qca), int(sca)) == (int(qcb), int(scb))
    for a, b in ((qa, qb), (sa, sb)):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(a, b, atol=1e-5)


# -- 1. qform / sform kept --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_save_nifti_keeps_the_input_transforms(tmp_path, case):
    q, qc, s, sc = HEADER_CASES[case]
    src = _image_with_transforms(tmp_path / "in.nii.gz", np.zeros((6, 5, 4), np.float32), q, qc, s, sc)
    vol = load_nifti(src)
    out = save_nifti(np.ones((6, 5, 4)), vol.affine, tmp_path / "out.nii.gz", vol.header, np.uint8)
    _assert_same_transforms(out, src)
    assert np.allclose(nib.load(str(out)).affine, vol.affine)


def test_save_nifti_sets_both_transforms_for_another_affine(tmp_path):
    q, qc, s, sc = HEADER_CASES["qform_scanner_sform_mni"]
    src = _image_with_transforms(tmp_path / "in.nii.gz", np.zeros((6, 5, 4), np.float32), q, qc, s, sc)
    vol = load_nifti(src)
    new = np.diag([2.0, 2.0, 2.0, 1.0])
    new[:3, 3] = [1, 2, 3]
    out = save_nifti(np.ones((3, 3, 2)), new, tmp_path / "out.nii.gz", vol.header, np.uint8)
    (qa, qca), (sa, sca) = _coded(out)
    assert (int(qca), int(sca)) == (1, 4)  # the header's codes
    np.testing.assert_allclose(qa, new, atol=1e-5)
    np.testing.assert_allclose(sa, new, atol=1e-5)
    # a header without transform codes: both set, code 2 (aligned), so every reader places it the same
    src0 = _image_with_transforms(tmp_path / "in0.nii.gz", np.zeros((6, 5, 4), np.float32), None, 0, None, 0)
    vol0 = load_nifti(src0)
    out0 = save_nifti(np.ones((3, 3, 2)), new, tmp_path / "out0.nii.gz", vol0.header, np.uint8)
    (qa, qca), (sa, sca) = _coded(out0)
    assert (int(qca), int(sca)) == (2, 2)
    np.testing.assert_allclose(qa, new, atol=1e-5)
    np.testing.assert_allclose(sa, new, atol=1e-5)


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_cli_predict_keeps_the_input_transforms(tmp_path, monkeypatch, case):
    monkeypatch.setattr(seg, "predict_volume", _oracle)
    ckpt = _checkpoint(tmp_path, 3)
    q, qc, s, sc = HEADER_CASES[case]
    d = np.zeros((12, 10, 9), np.float32)
    d[2:7, 3:6, 1:5] = 1
    src = _image_with_transforms(tmp_path / "scan.nii.gz", d, q, qc, s, sc)
    assert main(["predict", str(src), "--model", str(ckpt), "--out", str(tmp_path / "pred"), "--device", "cpu",
                 "--probabilities"]) == 0
    for name in ("scan_seg.nii.gz", "scan_prob.nii.gz"):
        _assert_same_transforms(tmp_path / "pred" / name, src)
    out = nib.load(str(tmp_path / "pred" / "scan_seg.nii.gz"))
    assert out.shape == d.shape and np.array_equal(np.asarray(out.dataobj), d > 0.5)


def _nifti_fields(path):
    """Header fields as ITK's NIfTI reader reports them (SimpleITK, when installed), else as nibabel reads them."""
    try:
        import SimpleITK as sitk
    except ImportError:  # pragma: no cover - depends on the environment
        h = nib.load(str(path)).header
        return {"cal_min": float(h["cal_min"]), "cal_max": float(h["cal_max"]), "intent_code": int(h["intent_code"]),
                "intent_name": h["intent_name"].item().decode()}
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    return {"cal_min": float(r.GetMetaData("cal_min")), "cal_max": float(r.GetMetaData("cal_max")),
            "intent_code": int(r.GetMetaData("intent_code")), "intent_name": r.GetMetaData("intent_name")}


def test_cli_predict_resets_the_display_window_and_intent(tmp_path, monkeypatch):
    """The input's display window (a CT's cal_min / cal_max, as scanners write it) and intent described its values,
    not a label map's or a probability's: reset (0 = a viewer's automatic range); _seg gets intent label (1002)."""
    monkeypatch.setattr(seg, "predict_volume", _oracle)
    ckpt = _checkpoint(tmp_path, 3)
    d = np.zeros((12, 10, 9), np.float32)
    d[2:7, 3:6, 1:5] = 1
    img = nib.Nifti1Image(d, Q)
    img.header["cal_min"], img.header["cal_max"] = -1000.0, 3000.0
    img.header.set_intent("estimate", name="T1 estimate")
    nib.save(img, str(tmp_path / "ct.nii.gz"))
    assert _nifti_fields(tmp_path / "ct.nii.gz")["cal_max"] == 3000
    assert main(["predict", str(tmp_path / "ct.nii.gz"), "--model", str(ckpt), "--out", str(tmp_path / "pred"),
                 "--device", "cpu", "--probabilities"]) == 0
    for name, code in (("ct_seg.nii.gz", 1002), ("ct_prob.nii.gz", 0)):
        assert _nifti_fields(tmp_path / "pred" / name) == {"cal_min": 0, "cal_max": 0, "intent_code": code,
                                                           "intent_name": ""}, name
        _assert_same_transforms(tmp_path / "pred" / name, tmp_path / "ct.nii.gz")


# -- 2. 2D probabilities: classes on the 4th axis ---------------------------------------------------------------
@pytest.mark.parametrize("shape", [(16, 12, 1), (16, 12)])
def test_predict_probabilities_2d_layout(tmp_path, monkeypatch, shape):
    monkeypatch.setattr(seg, "predict_volume", _oracle)
    ckpt = _checkpoint(tmp_path, 2)
    img = np.zeros(shape, np.float32)
    img[2:8, 3:6] = 1
    nib.save(nib.Nifti1Image(img, np.diag([0.5, 0.8, 3.0, 1])), str(tmp_path / "b.nii.gz"))
    written = seg.predict_files(ckpt, [str(tmp_path / "b.nii.gz")], tmp_path / "out", device="cpu",
                                save_probabilities=True, progress=False)
    seg_img, prob_img = (nib.load(str(p)) for p in written)
    assert seg_img.shape == shape
    assert prob_img.shape == (16, 12, 1, 2)
    prob = np.asarray(prob_img.dataobj)
    np.testing.assert_allclose(prob.sum(-1), 1, atol=1e-5)
    assert np.array_equal(prob[:, :, 0].argmax(-1), np.asarray(seg_img.dataobj).reshape(16, 12))
    assert np.allclose(prob_img.affine, seg_img.affine)


def test_predict_probabilities_3d_layout(tmp_path, monkeypatch):
    monkeypatch.setattr(seg, "predict_volume", _oracle)
    ckpt = _checkpoint(tmp_path, 3)
    nib.save(nib.Nifti1Image(np.zeros((10, 9, 8), np.float32), np.eye(4)), str(tmp_path / "c.nii.gz"))
    written = seg.predict_files(ckpt, [str(tmp_path / "c.nii.gz")], tmp_path / "out", device="cpu",
                                save_probabilities=True, progress=False)
    assert [nib.load(str(p)).shape for p in written] == [(10, 9, 8), (10, 9, 8, 2)]


# -- 3. 2D label maps stored (X, Y, 1) are scored in 2D ---------------------------------------------------------
SPACING_2D = [0.5, 0.8]
AFFINE_2D = np.diag([0.5, 0.8, 3.0, 1.0])


def _ellipses():
    g = np.indices((60, 50)).astype(float)
    ref = ((((g[0] - 30) / 15) ** 2 + ((g[1] - 25) / 10) ** 2) < 1).astype(np.uint8)
    pred = ((((g[0] - 33) / 13) ** 2 + ((g[1] - 24) / 12) ** 2) < 1).astype(np.uint8)
    return pred, ref


def _monai_2d(pred, ref):
    monai = pytest.importorskip("monai.metrics")

    def onehot(x):
        return torch.nn.functional.one_hot(torch.from_numpy(x.astype(np.int64)), 2).movedim(-1, 0)[None].float()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = monai.compute_hausdorff_distance(onehot(pred), onehot(ref), percentile=95, spacing=SPACING_2D)
        asd = monai.compute_average_surface_distance(onehot(pred), onehot(ref), symmetric=True, spacing=SPACING_2D)
    return float(hd[0, 0]), float(asd[0, 0])


@pytest.mark.parametrize("layout", ["XY", "XY1", "XY1_vs_XY"])
def test_evaluate_2d_matches_monai(tmp_path, layout):
    pred, ref = _ellipses()
    hd, asd = _monai_2d(pred, ref)
    assert hd == pytest.approx(2.5) and asd == pytest.approx(1.3451, abs=1e-3)  # the 3D reading gives 1.6, 0.22
    p = pred if layout == "XY" else pred[..., None]
    r = ref[..., None] if layout == "XY1" else ref
    nib.save(nib.Nifti1Image(p, AFFINE_2D), str(tmp_path / "p.nii.gz"))
    nib.save(nib.Nifti1Image(r, AFFINE_2D), str(tmp_path / "r.nii.gz"))
    [row] = evaluate_pair(tmp_path / "p.nii.gz", tmp_path / "r.nii.gz")
    assert row["hd"] == pytest.approx(hd, abs=1e-4) and row["asd"] == pytest.approx(asd, abs=1e-4)
    out = tmp_path / "o"
    assert main(["evaluate", str(tmp_path / "p.nii.gz"), str(tmp_path / "r.nii.gz"), "--out", str(out)]) == 0
    [csv_row] = list(csv.DictReader(open(out / "metrics.csv")))
    assert float(csv_row["hd"]) == pytest.approx(hd, abs=1e-4)
    assert float(csv_row["asd"]) == pytest.approx(asd, abs=1e-4)


def test_evaluate_still_rejects_other_grids(tmp_path):
    pred, ref = _ellipses()
    nib.save(nib.Nifti1Image(pred[..., None], AFFINE_2D), str(tmp_path / "p.nii.gz"))
    nib.save(nib.Nifti1Image(np.stack([ref, ref], -1), AFFINE_2D), str(tmp_path / "r.nii.gz"))
    with pytest.raises(DatasetError, match="shape"):
        evaluate_pair(tmp_path / "p.nii.gz", tmp_path / "r.nii.gz")
    nib.save(nib.Nifti1Image(ref[..., None], np.diag([0.5, -0.8, 3.0, 1.0])), str(tmp_path / "r.nii.gz"))
    with pytest.raises(DatasetError, match="different affines"):
        evaluate_pair(tmp_path / "p.nii.gz", tmp_path / "r.nii.gz")


# -- 4. the test set after training -----------------------------------------------------------------------------
def _train_data(tmp_path, shape):
    img = np.zeros(shape, np.float32)
    img[2:7, 3:7] = 1
    lab = (img > 0.5).astype(np.uint8)
    for sub in ("images", "labels"):
        (tmp_path / "data" / sub).mkdir(parents=True, exist_ok=True)
    for i in range(2):
        nib.save(nib.Nifti1Image(img, AFFINE_2D), str(tmp_path / "data" / "images" / f"c{i}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, AFFINE_2D), str(tmp_path / "data" / "labels" / f"c{i}.nii.gz"))
    return img, lab


def _no_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a training step ran before the test files were checked")

    monkeypatch.setattr(seg.SegmentationTask, "training_step", fail)


def test_test_label_on_another_grid_fails_before_training(tmp_path, monkeypatch, capsys):
    img = np.zeros((12, 12, 10), np.float32)
    img[2:7, 3:6, 2:8] = 1
    lab = (img > 0.5).astype(np.uint8)
    for sub in ("images", "labels"):
        (tmp_path / "data" / sub).mkdir(parents=True)
    for i in range(2):
        nib.save(nib.Nifti1Image(img, np.eye(4)), str(tmp_path / "data" / "images" / f"c{i}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / "data" / "labels" / f"c{i}.nii.gz"))
    # the same label on the same world grid, stored in LPS order: another affine
    flip = np.diag([-1.0, -1, 1, 1])
    flip[:3, 3] = [11, 11, 0]
    lps = tmp_path / "test_lab_lps.nii.gz"
    nib.save(nib.Nifti1Image(lab[::-1, ::-1].copy(), flip), str(lps))
    small = tmp_path / "test_lab_small.nii.gz"
    nib.save(nib.Nifti1Image(lab[:9], np.eye(4)), str(small))
    _no_training(monkeypatch)
    test_img = str(tmp_path / "data" / "images" / "c0.nii.gz")
    for bad, what in ((lps, "different affines"), (small, "shape")):
        config = _config(3, root=str(tmp_path / "data"), test_images=[test_img], test_labels=[str(bad)])
        config.trainer.out_dir = str(tmp_path / f"run_{bad.stem}")
        with pytest.raises(DatasetError, match=what) as info:
            Trainer(config).fit()
        assert str(bad) in str(info.value) and test_img in str(info.value)
        assert not (tmp_path / f"run_{bad.stem}" / "checkpoints").exists()
    # the CLI reports it as a message
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(config_to_dict(config)))
    assert main(["train", str(cfg), "--out", str(tmp_path / "run_cli")]) == 1
    err = capsys.readouterr().err
    assert "test set" in err and str(small) in err


def test_test_images_without_labels_fail_before_training(tmp_path, monkeypatch):
    _train_data(tmp_path, (16, 12, 1))
    _no_training(monkeypatch)
    config = _config(2, root=str(tmp_path / "data"), test_images=[str(tmp_path / "data" / "images" / "c0.nii.gz")])
    config.trainer.out_dir = str(tmp_path / "run")
    with pytest.raises(DatasetError, match="test labels"):
        Trainer(config).fit()


@pytest.mark.parametrize("label_shape", [(16, 12, 1), (16, 12)])
def test_finish_scores_2d_test_set_in_2d(tmp_path, monkeypatch, label_shape):
    """A 2D run whose test image is stored (X, Y, 1): the test label (stored (X, Y, 1) or (X, Y)) is scored in 2D,
    with the in-plane spacing, as medfast evaluate and MONAI do."""
    monkeypatch.setattr(seg, "predict_volume", _oracle)
    _train_data(tmp_path, (16, 12, 1))
    g = np.indices((16, 12))
    image = ((((g[0] - 8) / 5) ** 2 + ((g[1] - 6) / 4) ** 2) < 1).astype(np.float32)
    ref = ((((g[0] - 7) / 4) ** 2 + ((g[1] - 6) / 5) ** 2) < 1).astype(np.uint8)
    nib.save(nib.Nifti1Image(image[..., None], AFFINE_2D), str(tmp_path / "test_img.nii.gz"))
    nib.save(nib.Nifti1Image(ref.reshape(label_shape), AFFINE_2D), str(tmp_path / "test_lab.nii.gz"))
    config = _config(2, root=str(tmp_path / "data"), test_images=[str(tmp_path / "test_img.nii.gz")],
                     test_labels=[str(tmp_path / "test_lab.nii.gz")])
    config.trainer.out_dir = str(tmp_path / "run")
    Trainer(config).fit()
    from medfast.train.trainer import load_checkpoint

    # the checkpoint records that 2D images were reoriented (predict_files reorients them for it)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["reorient_dims"] == [2, 3]
    [res] = json.loads((tmp_path / "run" / "test_results.json").read_text())["test"]
    hd, _ = _monai_2d(image.astype(np.uint8), ref)
    inter = (image.astype(bool) & ref.astype(bool)).sum()
    assert res["dice"][0] == pytest.approx(2 * inter / (image.sum() + ref.sum()), abs=1e-5)
    assert res["hd95_mm"][0] == pytest.approx(hd, abs=1e-4)


def test_colliding_test_case_names_fail_before_training(tmp_path, monkeypatch):
    # a/scan.nii.gz and b/scan.nii.gz both predict to OUT/test/scan_seg.nii.gz: refused only after the whole run
    # had trained (no results), with advice about --out, which train's test set cannot use
    _train_data(tmp_path, (12, 12, 10))
    images, labels = [], []
    for sub, i in (("a", 0), ("b", 1)):
        (tmp_path / "dup" / sub).mkdir(parents=True)
        for kind, dest in (("images", images), ("labels", labels)):
            path = tmp_path / "dup" / sub / ("scan.nii.gz" if kind == "images" else "lab.nii.gz")
            path.write_bytes((tmp_path / "data" / kind / f"c{i}.nii.gz").read_bytes())
            dest.append(str(path))
    _no_training(monkeypatch)
    config = _config(3, root=str(tmp_path / "data"), test_images=images, test_labels=labels)
    config.trainer.out_dir = str(tmp_path / "run")
    with pytest.raises(DatasetError, match="would both be written as scan_seg.nii.gz") as info:
        Trainer(config).fit()
    message = str(info.value)
    assert images[0] in message and images[1] in message and "rename or move" in message
    assert "--out" not in message and "test set" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_negative_test_label_map_key_is_a_config_error(tmp_path):
    # lut[-1] = 0 relabelled the largest label value of every test label map; only the values were checked
    from medfast.train import ConfigError

    for bad, named in (({-1: 0}, "key -1 is negative"), ({1: 5}, "outside 0..1")):
        config = _config(3, root=str(tmp_path), test_label_map=bad)
        with pytest.raises(ConfigError, match=f"data.test_label_map.*{named}"):
            seg.check_config(config)


def test_test_dice_scores_as_evaluate_and_averages_the_cases_with_a_class(tmp_path, monkeypatch):
    """The test set after training scores a class only the prediction holds Dice 0, as medfast evaluate (it was
    NaN, left out of the case's mean); a case with no foreground in either map (Dice NaN) is left out of
    test_dice_mean (it made it NaN, with a "Mean of empty slice" warning), and test_dice_cases counts the rest."""
    monkeypatch.setattr(seg, "predict_volume", _oracle)
    _train_data(tmp_path, (12, 12, 10))
    blob = np.zeros((12, 12, 10), np.float32)
    blob[3:8, 2:9, 2:7] = 1
    lab = blob.astype(np.uint8)
    cases = {"fp": (blob, np.zeros_like(lab)), "empty": (np.zeros_like(blob), np.zeros_like(lab)),
             "good": (blob, lab)}
    (tmp_path / "test_labels").mkdir()
    for name, (image, label) in cases.items():
        nib.save(nib.Nifti1Image(image, AFFINE_2D), str(tmp_path / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(label, AFFINE_2D), str(tmp_path / "test_labels" / f"{name}.nii.gz"))
    config = _config(3, root=str(tmp_path / "data"), test_images=[str(tmp_path / f"{n}.nii.gz") for n in cases],
                     test_labels=[str(tmp_path / "test_labels" / f"{n}.nii.gz") for n in cases])
    config.trainer.out_dir = str(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        Trainer(config).fit()
    res = json.loads((tmp_path / "run" / "test_results.json").read_text())
    assert [s["dice"] for s in res["test"]] == [[0.0], [None], [1.0]]
    assert [s["dice_mean"] for s in res["test"]] == [0.0, None, 1.0]
    assert res["test_dice_mean"] == 0.5 and res["test_dice_cases"] == 2
    # the same numbers as medfast evaluate of the written predictions
    for s in res["test"]:
        [row] = evaluate_pair(s["prediction"], s["label"], num_classes=2)
        assert row["dice"] == pytest.approx(s["dice"][0] if s["dice"][0] is not None else np.nan, nan_ok=True)


# -- 4. 2D reorientation: the same slice in any storage order gives the same segmentation in world space ---------
_VIEWS_2D = {"as_is": lambda a: a, "xflip": lambda a: a[::-1], "yflip": lambda a: a[:, ::-1],
             "transpose": lambda a: np.swapaxes(a, 0, 1), "xyflip": lambda a: a[::-1, ::-1]}  # each its own inverse


def _view_affine(name, shape, affine=AFFINE_2D):
    """The 4x4 affine of ``_VIEWS_2D[name]`` of a slice of shape ``shape``: every pixel keeps its world place."""
    a = np.array(affine, dtype=np.float64)
    if name == "transpose":
        a[:, [0, 1]] = a[:, [1, 0]]
    for ax in {"xflip": (0,), "yflip": (1,), "xyflip": (0, 1)}.get(name, ()):
        a[:, 3] += a[:, ax] * (shape[ax] - 1)
        a[:, ax] = -a[:, ax]
    return a


def _decisive_checkpoint(tmp_path, name, marker):
    """An untrained, deterministic 2D UNet whose class margins are far from ties, as medfast train writes it;
    with ``marker`` the "reorient_dims" of this version, without it an older checkpoint's keys."""
    config = _config(2)
    m = config.model
    torch.manual_seed(0)
    net = UNet(2, m.in_channels, m.out_channels, m.channels, m.convs_per_level, m.norm, m.deep_supervision)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    state = {"model": net.state_dict(), "config": config_to_dict(config), "task": "segmentation"}
    if marker:
        state["reorient_dims"] = [2, 3]
    torch.save(state, tmp_path / name)
    return tmp_path / name, net, config


def _slice_2d():
    g = np.indices((18, 13)).astype(np.float32)
    return (np.sin(g[0] / 2.3) * np.cos(g[1] / 1.7) + 0.05 * g[0]).astype(np.float32)  # no symmetry


def test_predict_2d_same_world_segmentation_whatever_the_storage_order(tmp_path):
    """medfast predict on one 2D slice stored as is, flipped along x, y, both, or transposed: the network sees
    the same array, so the probabilities and labels on the same world pixels are the same (2D images used to
    enter in storage order: another prediction for each)."""
    ckpt, _, _ = _decisive_checkpoint(tmp_path, "new.pt", marker=True)
    img = _slice_2d()
    probs, segs = {}, {}
    for name, view in _VIEWS_2D.items():
        src = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(view(img))[..., None], _view_affine(name, img.shape)), str(src))
        seg_p, prob_p = seg.predict_files(ckpt, [str(src)], tmp_path / f"out_{name}", device="cpu",
                                          save_probabilities=True, progress=False)
        out = nib.load(str(seg_p))
        assert out.shape == view(img).shape + (1,) and np.allclose(out.affine, _view_affine(name, img.shape))
        segs[name] = view(np.asarray(out.dataobj)[:, :, 0])  # back onto the as-is pixels
        prob = np.asarray(nib.load(str(prob_p)).dataobj)[:, :, 0]
        probs[name] = np.stack([view(prob[..., c]) for c in range(prob.shape[-1])])
    ref = probs["as_is"]
    assert 0.1 < segs["as_is"].mean() < 0.9  # both classes predicted
    decisive = np.abs(ref[1] - ref[0]) > 1e-3
    for name in _VIEWS_2D:
        np.testing.assert_allclose(probs[name], ref, atol=1e-5, err_msg=name)
        assert np.array_equal(segs[name][decisive], segs["as_is"][decisive]), name


def test_predict_2d_old_checkpoint_keeps_storage_order(tmp_path):
    """A segmentation checkpoint written before 2D reorientation (no "reorient_dims") saw 2D images in storage
    order: predict_files keeps feeding them so (the network on the stored array), while a checkpoint of this
    version reorients them; 3D images stay reoriented for both."""
    old, net, config = _decisive_checkpoint(tmp_path, "old.pt", marker=False)
    new, _, _ = _decisive_checkpoint(tmp_path, "new.pt", marker=True)
    img = _slice_2d()
    stored = np.ascontiguousarray(_VIEWS_2D["xflip"](img))
    src = tmp_path / "xflip.nii.gz"
    nib.save(nib.Nifti1Image(stored[..., None], _view_affine("xflip", img.shape)), str(src))
    _, p_old = seg.predict_files(old, [str(src)], tmp_path / "o_old", device="cpu", save_probabilities=True,
                                 progress=False)
    _, p_new = seg.predict_files(new, [str(src)], tmp_path / "o_new", device="cpu", save_probabilities=True,
                                 progress=False)
    p_old = np.asarray(nib.load(str(p_old)).dataobj)[:, :, 0]
    p_new = np.asarray(nib.load(str(p_new)).dataobj)[:, :, 0]
    with torch.no_grad():  # as before: the network on the stored array
        direct = seg.predict_volume(net.eval(), torch.from_numpy(stored)[None, None], config)[0]
    np.testing.assert_allclose(p_old, np.moveaxis(direct.numpy(), 0, -1), atol=1e-6)
    assert np.abs(p_new - p_old).max() > 0.05
    # the preprocessing seen by each: storage order for the old checkpoint in 2D, RAS in 3D for both
    image, _, _, _, _ = seg._load_for_inference(str(src), config, (3,))
    assert torch.equal(image[0, 0], torch.from_numpy(stored))
    image, _, _, _, _ = seg._load_for_inference(str(src), config)
    assert torch.equal(image[0, 0], torch.from_numpy(img))


def test_resume_of_a_2d_run_from_before_2d_reorientation_is_refused(tmp_path):
    """Resuming a 2D run whose checkpoint predates 2D reorientation with data.reorient=true would change what the
    network sees mid-run: refused, naming the fix; with data.reorient=false, with the marker, or in 3D it goes on."""
    from medfast.train import CheckpointError

    old = {"model": {}}
    with pytest.raises(CheckpointError, match="data.reorient=false"):
        seg.check_reorient_resume(_config(2), old, tmp_path / "last.pt")
    seg.check_reorient_resume(_config(2, reorient=False), old, tmp_path / "last.pt")
    seg.check_reorient_resume(_config(2), {**old, "reorient_dims": [2, 3]}, tmp_path / "last.pt")
    seg.check_reorient_resume(_config(3), old, tmp_path / "last.pt")


# -- 5. predict's inputs and outputs: upper-case suffixes, numbered single-channel files, stale probabilities -----
def _save_as(path, data):
    """A NIfTI (identity affine, gzipped for a .gz name) under ``path``'s name, whatever the case of its suffix."""
    tmp = path.parent / ("_tmp.nii.gz" if path.name.lower().endswith(".gz") else "_tmp.nii")
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4)), str(tmp))
    tmp.replace(path)
    return path


def test_predict_upper_case_suffixes_read_and_named_by_their_stem(tmp_path, monkeypatch):
    # (a hunt: SCAN.NII.GZ was refused as truncated, a folder of such files had "no NIfTI files", and Mixed.Nii was
    # written as Mixed.Nii_seg.nii.gz, which medfast evaluate cannot pair with Mixed.Nii)
    monkeypatch.setattr(seg, "predict_volume", _oracle)
    ckpt = _checkpoint(tmp_path, 3)
    src = tmp_path / "in"
    src.mkdir()
    img = (np.random.default_rng(0).random((9, 9, 9)) > 0.5).astype(np.float32)
    for name in ("UPPER.NII.GZ", "Mixed.Nii"):
        _save_as(src / name, img)
    assert main(["predict", str(src), "--model", str(ckpt), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Mixed_seg.nii.gz", "UPPER_seg.nii.gz"]
    for name in ("UPPER", "Mixed"):
        assert np.array_equal(np.asarray(nib.load(str(tmp_path / "out" / f"{name}_seg.nii.gz")).dataobj), img)
    refs = tmp_path / "refs"  # medfast evaluate pairs each output with its reference by the case name
    refs.mkdir()
    for name in ("UPPER", "Mixed"):
        nib.save(nib.Nifti1Image(img.astype(np.uint8), np.eye(4)), str(refs / f"{name}.nii.gz"))
    assert main(["evaluate", str(tmp_path / "out"), str(refs), "--out", str(tmp_path / "scores")]) == 0
    assert evaluate_pair(tmp_path / "out" / "Mixed_seg.nii.gz", src / "Mixed.Nii")[0]["case"] == "Mixed"


def test_predict_numbered_single_channel_files_by_the_models_in_channels(tmp_path, monkeypatch, capsys):
    # (a hunt: scan_0000, scan_0001, scan_0002 were grouped into one 3-channel case before the checkpoint was read,
    # so a one-channel model could segment none of them); a model of several channels still groups them
    monkeypatch.setattr(seg, "predict_volume", _oracle)
    src = tmp_path / "in"
    src.mkdir()
    for k in range(3):
        nib.save(nib.Nifti1Image(np.full((9, 9, 9), k % 2, np.float32), np.eye(4)), str(src / f"scan_{k:04d}.nii.gz"))
    ckpt = _checkpoint(tmp_path, 3)
    files = [str(p) for p in sorted(src.iterdir())]
    for inputs, out in ((files, "files"), ([str(src)], "folder")):
        assert main(["predict", *inputs, "--model", str(ckpt), "--out", str(tmp_path / out), "--device", "cpu"]) == 0
        assert sorted(p.name for p in (tmp_path / out).iterdir()) == [
            "scan_0001_seg.nii.gz", "scan_0002_seg.nii.gz", "scan_seg.nii.gz"]
        assert np.asarray(nib.load(str(tmp_path / out / "scan_0001_seg.nii.gz")).dataobj).min() == 1
    two = _config(3)
    two.model.in_channels = 2
    m = two.model
    net = UNet(3, 2, m.out_channels, m.channels, m.convs_per_level, m.norm, m.deep_supervision)
    torch.save({"model": net.state_dict(), "config": config_to_dict(two), "task": "segmentation"}, tmp_path / "two.pt")
    capsys.readouterr()
    assert main(["predict", str(src), "--model", str(tmp_path / "two.pt"), "--out", str(tmp_path / "e"),
                 "--device", "cpu"]) == 1
    assert "scan_0002.nii.gz has 3 channel(s) but the model takes model.in_channels=2" in capsys.readouterr().err


def test_predict_without_probabilities_removes_an_earlier_runs(tmp_path, monkeypatch):
    # (a hunt: a_prob.nii.gz of an earlier --probabilities run stayed beside the new a_seg.nii.gz, from another model)
    monkeypatch.setattr(seg, "predict_volume", _oracle)
    ckpt = _checkpoint(tmp_path, 3)
    nib.save(nib.Nifti1Image(np.zeros((9, 9, 9), np.float32), np.eye(4)), str(tmp_path / "a.nii.gz"))
    args = ["predict", str(tmp_path / "a.nii.gz"), "--model", str(ckpt), "--out", str(tmp_path / "out"),
            "--device", "cpu"]
    assert main([*args, "--probabilities"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_prob.nii.gz", "a_seg.nii.gz"]
    assert main(args) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_seg.nii.gz"]
