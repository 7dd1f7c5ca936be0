"""The folder data set of labelled images: class subfolders, CSV labels, PNG/NIfTI/DICOM, bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfast.data import DatasetError, collate
from medfast.tasks.classification import ImageFolderDataset, read_image


def _png(path, arr):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _nifti(path, arr):
    nib = pytest.importorskip("nibabel")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr.astype(np.float32), np.eye(4)), str(path))
    return path


def _dicom(path, arr, slope=2.0, intercept=-100.0):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = arr.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True) if _has_enforce(pydicom) else ds.save_as(str(path))
    return path


def _has_enforce(pydicom) -> bool:
    return int(pydicom.__version__.split(".")[0]) >= 3


def test_read_formats(tmp_path):
    pytest.importorskip("PIL")
    a = (np.arange(20 * 12).reshape(20, 12) % 256).astype(np.uint8)
    img = read_image(_png(tmp_path / "a.png", a))
    assert img.shape == (1, 20, 12) and img.dtype == np.float32
    assert np.allclose(img[0], a / 255.0)
    rgb = read_image(_png(tmp_path / "rgb.png", np.stack([a, a, a], -1)))
    assert rgb.shape == (3, 20, 12)
    n2 = read_image(_nifti(tmp_path / "s.nii.gz", np.ones((8, 6, 1)) * 3))
    assert n2.shape == (1, 8, 6) and np.all(n2 == 3)
    n3 = read_image(_nifti(tmp_path / "v.nii", np.random.rand(5, 6, 7)), spatial_dims=3)
    assert n3.shape == (1, 5, 6, 7)
    d = read_image(_dicom(tmp_path / "x.dcm", np.full((6, 4), 150)))
    assert d.shape == (1, 6, 4) and np.allclose(d, 2.0 * 150 - 100)


def test_bad_files_name_the_file(tmp_path):
    pytest.importorskip("PIL")
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(DatasetError, match="corrupt.png"):
        read_image(bad)
    with pytest.raises(DatasetError, match="missing.png: file not found"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="notes.txt: unknown image type"):
        read_image(tmp_path / "notes.txt")
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(_nifti(tmp_path / "ok.nii.gz", np.ones((4, 4, 4))).read_bytes()[:40])
    with pytest.raises(DatasetError, match="trunc.nii.gz"):
        read_image(trunc, spatial_dims=3)
    with pytest.raises(DatasetError, match=r"ok.nii.gz: image of shape .* is not 2D"):
        read_image(tmp_path / "ok.nii.gz")
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"garbage" * 10)
    with pytest.raises(DatasetError, match="fake.dcm"):
        read_image(fake)
    nan = _nifti(tmp_path / "nan.nii", np.full((3, 3), np.nan))
    with pytest.raises(DatasetError, match="nan.nii: .*NaN"):
        read_image(nan)


def test_rgb_nifti_reads_as_the_png_and_complex_is_refused(tmp_path):
    """An RGB24 NIfTI is 3 channels in [0, 1], as the same pixels in an 8-bit RGB PNG (PIL) read (numpy's
    DTypePromotionError before); a colour folder mixing PNG and RGB NIfTI has one channel count. Complex voxels
    are refused naming the file (their imaginary part was silently dropped)."""
    nib = pytest.importorskip("nibabel")
    pytest.importorskip("PIL")
    rgb = np.random.default_rng(0).integers(0, 256, (10, 7, 3), dtype=np.uint8)
    png = read_image(_png(tmp_path / "c" / "a.png", rgb))
    vox = np.zeros((10, 7), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    for k, c in enumerate("RGB"):
        vox[c] = rgb[..., k]
    nib.save(nib.Nifti1Image(vox, np.eye(4)), str(tmp_path / "c" / "b.nii.gz"))
    assert nib.load(str(tmp_path / "c" / "b.nii.gz")).header["datatype"] == 128  # NIfTI RGB24
    got = read_image(tmp_path / "c" / "b.nii.gz")
    assert got.shape == (3, 10, 7) and got.dtype == np.float32
    np.testing.assert_array_equal(got, png)
    np.testing.assert_array_equal(got, np.moveaxis(rgb, -1, 0) / np.float32(255))
    _png(tmp_path / "g" / "c.png", rgb)
    assert ImageFolderDataset(tmp_path).num_channels == 3
    assert ImageFolderDataset(tmp_path, channels=1)[1]["image"].shape == (1, 10, 7)
    z = (np.ones((8, 8, 1)) * (3 + 4j)).astype(np.complex64)
    nib.save(nib.Nifti1Image(z, np.eye(4)), str(tmp_path / "cx.nii.gz"))
    with pytest.raises(DatasetError, match=r"cx.nii.gz: holds complex voxels \(complex64\)"):
        read_image(tmp_path / "cx.nii.gz")


def test_class_subfolders(tmp_path):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(0)
    for cls, n in (("high", 2), ("low", 3), ("medium", 1)):
        for i in range(n):
            _png(tmp_path / cls / f"{i}.png", rng.integers(0, 255, (10 + i, 8), dtype=np.uint8))
    (tmp_path / "low" / "readme.txt").write_text("ignored")
    ds = ImageFolderDataset(tmp_path, size=(12, 12))
    assert ds.classes == ["high", "low", "medium"] and len(ds) == 6
    ds = ImageFolderDataset(tmp_path, classes=["low", "medium", "high"], size=(12, 12), normalize="minmax")
    assert [int(ds[i]["label"]) for i in range(6)] == [2, 2, 0, 0, 0, 1]
    item = ds[0]
    assert item["image"].shape == (1, 12, 12) and item["files"].endswith("high/0.png")
    assert float(item["image"].min()) == 0.0 and float(item["image"].max()) == pytest.approx(1.0)
    batch = collate([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 1, 12, 12) and batch["label"].tolist() == [2, 2, 0, 0]
    assert ImageFolderDataset(tmp_path, channels=3)[0]["image"].shape == (3, 10, 8)
    with pytest.raises(DatasetError, match="'high' is not one of the classes"):
        ImageFolderDataset(tmp_path, classes=["low", "medium"])
    with pytest.raises(DatasetError, match="image folder not found"):
        ImageFolderDataset(tmp_path / "nope")
    # a corrupt file in a class folder: the error names it when read
    (tmp_path / "medium" / "broken.png").write_bytes(b"\x89PNG broken")
    ds = ImageFolderDataset(tmp_path, classes=["low", "medium", "high"])
    i = [str(f) for f in ds.files].index(str(tmp_path / "medium" / "broken.png"))
    with pytest.raises(DatasetError, match="broken.png"):
        ds[i]


def test_csv_labels(tmp_path):
    pytest.importorskip("PIL")
    _png(tmp_path / "img" / "a.png", np.zeros((6, 6), np.uint8))
    _nifti(tmp_path / "img" / "b.nii.gz", np.ones((6, 6)))
    _dicom(tmp_path / "img" / "c.dcm", np.full((6, 6), 7), slope=1.0, intercept=0.0)
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\nimg/a.png,pT2\nimg/b.nii.gz,pT4\nimg/c.dcm,pT3a\n")
    ds = ImageFolderDataset(tmp_path, csv_file=csv, classes=["pT2", "pT3a", "pT3b", "pT4"])
    assert [int(ds[i]["label"]) for i in range(3)] == [0, 3, 1]
    assert torch.all(ds[2]["image"] == 7)
    # relative to the CSV's folder by default; custom column names
    csv2 = tmp_path / "img" / "lab.csv"
    csv2.write_text("path,grade\na.png,0\nb.nii.gz,1\n")
    ds2 = ImageFolderDataset(None, csv_file=csv2, file_column="path", label_column="grade")
    assert ds2.classes == ["0", "1"] and len(ds2) == 2
    csv.write_text("file,label\nimg/a.png,pT2\nimg/gone.png,pT3a\n")
    with pytest.raises(DatasetError, match=r"gone.png: file not found \(listed in .*labels.csv, line 3\)"):
        ImageFolderDataset(tmp_path, csv_file=csv)
    # a file type the reader does not know: refused when the list is read, not at its first load
    (tmp_path / "img" / "d.tif").write_bytes(b"II*\x00")
    csv.write_text("file,label\nimg/a.png,pT2\nimg/d.tif,pT3a\n")
    with pytest.raises(DatasetError, match=r"d.tif: unknown image type '.tif' \(listed in .*labels.csv, line 3"):
        ImageFolderDataset(tmp_path, csv_file=csv)
    csv.write_text("name,label\nimg/a.png,pT2\n")
    with pytest.raises(DatasetError, match="no column 'file'"):
        ImageFolderDataset(tmp_path, csv_file=csv)
    csv.write_text("file,label\nimg/a.png,\n")
    with pytest.raises(DatasetError, match="line 2: empty"):
        ImageFolderDataset(tmp_path, csv_file=csv)
    with pytest.raises(DatasetError, match="label CSV not found"):
        ImageFolderDataset(tmp_path, csv_file=tmp_path / "none.csv")


def test_cli_train_classification_end_to_end(tmp_path, capsys):
    """``medfast train`` with ``task: classification`` on a folder of PNGs (ordinal encoding)."""
    pytest.importorskip("PIL")
    import json

    from medfast.cli import main

    rng = np.random.default_rng(0)
    for c, name in enumerate(["small", "medium", "large"]):
        for i in range(8):
            a = rng.integers(0, 60, (12, 12)).astype(np.uint8)
            s = 2 + 3 * c
            o = rng.integers(0, 12 - s + 1, 2)
            a[o[0]:o[0] + s, o[1]:o[1] + s] = 255
            _png(tmp_path / "img" / name / f"{i}.png", a)
    cfg = tmp_path / "cls.yaml"
    cfg.write_text(f"""
task: classification
data: {{root: {tmp_path / 'img'}, normalize: minmax, val_fraction: 0.25, cache: none,
        dataset_args: {{classes: [small, medium, large]}}}}
model: {{name: resnet, spatial_dims: 2, out_channels: 3, channels: [4], kwargs: {{encoding: ordinal, blocks: [1, 1]}}}}
optim: {{lr: 0.01}}
trainer: {{batch_size: 6, val_every: 10, checkpoint_every: 10, progress: false, tensorboard: false, threads: 1}}
""")
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--set", "trainer.max_steps=10", "--out", str(out)]) == 0
    assert "10 steps" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results["validation"]) >= {"accuracy", "loss", "recall_small", "recall_medium", "recall_large"}
    rep = results["classification"]
    assert results["finished"] and rep["classes"] == ["small", "medium", "large"]
    assert 0 <= rep["balanced_accuracy"] <= 1 and np.array(rep["confusion_matrix"]).sum() == 6
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    # medfast predict: the checkpoint's task picks the classification predictor; CSV with class + probabilities
    imgs = [str(tmp_path / "img" / "large" / "0.png"), str(tmp_path / "img" / "small" / "1.png")]
    assert main(["predict", *imgs, "--model", str(out / "checkpoints" / "last.pt"), "--out",
                 str(tmp_path / "pred"), "--probabilities"]) == 0
    import csv

    rows = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv")))
    assert [r["file"] for r in rows] == imgs
    assert all(r["class"] in ("small", "medium", "large") for r in rows)
    for r in rows:
        p = [float(r[f"p_{n}"]) for n in ("small", "medium", "large")]
        assert sum(p) == pytest.approx(1, abs=1e-4)
        # ordinal (CORAL): the class is the number of cumulative P(y > k) = p[k+1:].sum() above 0.5 (the median of
        # the predicted distribution), not the argmax of the p_ columns ([0.45, 0.1, 0.45] is 'medium')
        above = [sum(p[k + 1:]) for k in range(2)]
        k = int(r["index"])
        assert r["class"] == ["small", "medium", "large"][k]
        assert all(c > 0.5 - 1e-5 for c in above[:k]) and all(c <= 0.5 + 1e-5 for c in above[k:])
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "nope.png"), "--model", str(out / "checkpoints" / "last.pt")]) == 1
    assert "nope.png: file not found" in capsys.readouterr().err
    (tmp_path / "img" / "large" / "7.png").write_bytes(b"corrupt")
    assert main(["train", str(cfg), "--set", "trainer.max_steps=2", "--out", str(tmp_path / "run2")]) == 1
    assert "7.png" in capsys.readouterr().err


def test_task_registry_and_config_errors(tmp_path):
    from medfast.tasks.classification import ClassificationTask, build_classifier
    from medfast.train.config import config_from_dict
    from medfast.train.task import get_task, task_names

    assert get_task("classification") is ClassificationTask and "classification" in task_names()
    cfg = config_from_dict({"task": "classification", "model": {"name": "sononet", "spatial_dims": 3}})
    with pytest.raises(ValueError, match="sononet' is 2D"):
        build_classifier(cfg)
    cfg = config_from_dict({"task": "classification", "model": {"name": "unet", "spatial_dims": 2}})
    with pytest.raises(ValueError, match="'sononet', 'resnet' or 'densenet'"):
        build_classifier(cfg)
    cfg = config_from_dict({"task": "classification", "model": {"name": "resnet", "spatial_dims": 2,
                                                                "out_channels": 4, "channels": [4]}})
    assert build_classifier(cfg).eval()(torch.zeros(1, 1, 8, 8)).shape == (1, 4)
    with pytest.raises(DatasetError, match="no training data"):
        ClassificationTask(cfg).build_datasets()
    for name in ("a", "b"):
        _png(tmp_path / name / "0.png", np.zeros((4, 4), np.uint8))
    cfg.data.root = str(tmp_path)
    with pytest.raises(DatasetError, match=r"2 classes \['a', 'b'\] but model.out_channels=4"):
        ClassificationTask(cfg).build_datasets()
