"""The shared file-list gathering of the segmentation and registration tasks (medfast.train.files)."""

import pytest

from medfast.data import DatasetError
from medfast.train import Config
from medfast.train.config import ConfigError
from medfast.train.files import gather_files


def _config(tmp_path, **data):
    c = Config()
    c.trainer.out_dir = str(tmp_path / "run")
    c.trainer.seed = 3
    for k, v in data.items():
        setattr(c.data, k, v)
    return c


def _touch(tmp_path, names):
    out = []
    for n in names:
        p = tmp_path / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
        out.append(str(p))
    return out


def test_lists_and_seeded_validation_split(tmp_path):
    images = [f"img{i}.nii.gz" for i in range(8)]
    labels = [f"lab{i}.nii.gz" for i in range(8)]
    c = _config(tmp_path, train_images=images, train_labels=labels, val_fraction=0.25)
    f = gather_files(c, task="segmentation", need_labels=True)
    assert len(f.val_images) == 2 and len(f.images) == 6
    assert sorted(f.images + f.val_images) == sorted(images)
    # labels follow their images through the split
    assert [p.replace("img", "lab") for p in f.images] == f.labels
    assert [p.replace("img", "lab") for p in f.val_images] == f.val_labels
    assert gather_files(c, task="segmentation") == f  # same seed, same split
    c.trainer.seed = 4
    assert gather_files(c, task="segmentation").val_images != f.val_images  # another seed, another split
    # too few subjects: no split, and a warning saying so (it was silent)
    with pytest.warns(UserWarning, match=r"data.val_fraction=0.5: 2 training image\(s\), too few to split"):
        f3 = gather_files(_config(tmp_path, train_images=images[:2], val_fraction=0.5), task="registration",
                          min_subjects_to_split=3)
    assert f3.images == images[:2] and f3.val_images == []
    # explicit validation lists with the fraction, deformations with either, a folder with lists: one of them was
    # silently dropped; now refused naming both
    for extra, match in (({"val_images": ["v.nii.gz"], "val_fraction": 0.5}, "data.val_fraction splits"),
                         ({"val_images": ["v.nii.gz"], "val_deformations": 2}, "here data.val_images gives one"),
                         ({"val_fraction": 0.25, "val_deformations": 2}, "here data.val_fraction gives one"),
                         ({"root": str(tmp_path)}, "data.root is not read when data.train_images"),
                         ({"root": str(tmp_path), "train_images": [], "train_labels": ["l.nii.gz"]},
                          "data.root is not read when data.train_images / train_labels")):
        with pytest.raises(ConfigError, match=match):
            gather_files(_config(tmp_path, **{"train_images": images, **extra}), task="registration")
    # too few images to split: refused too (val_fraction was dropped without a word; tests/test_cli_mistakes_hunt.py)
    with pytest.raises(ConfigError, match="here data.val_fraction gives one"):
        gather_files(_config(tmp_path, train_images=images[:2], val_fraction=0.5, val_deformations=2),
                     task="registration", min_subjects_to_split=3)


def test_root_folder_layout(tmp_path):
    imgs = _touch(tmp_path / "data", ["images/a.nii.gz", "images/b.nii.gz"])
    labs = _touch(tmp_path / "data", ["labels/a.nii.gz", "labels/b.nii.gz"])
    f = gather_files(_config(tmp_path, root=str(tmp_path / "data"), val_fraction=0.0), task="segmentation",
                     need_labels=True)
    assert sorted(f.images) == sorted(imgs) and sorted(f.labels) == sorted(labs)


def test_errors_name_the_setting(tmp_path):
    with pytest.raises(DatasetError, match="no training data for the registration task"):
        gather_files(_config(tmp_path), task="registration")
    with pytest.raises(DatasetError, match="segmentation task needs label maps"):
        gather_files(_config(tmp_path, train_images=["a.nii.gz"]), task="segmentation", need_labels=True)
    with pytest.raises(DatasetError, match="2 training images but 1 label maps"):
        gather_files(_config(tmp_path, train_images=["a", "b"], train_labels=["la"]), task="registration")
    with pytest.raises(DatasetError, match="1 validation images but 2 label maps"):
        gather_files(_config(tmp_path, train_images=["a"], val_images=["v"], val_labels=["x", "y"]),
                     task="registration")
    with pytest.raises(ValueError, match="unknown data.dataset"):
        gather_files(_config(tmp_path, dataset="nope"), task="segmentation")


def test_root_channel_files_are_grouped_as_predict_groups_them(tmp_path):
    """data.root's nnU-Net channel files (_0000, _0001) are one case only for a model of several channels, as
    medfast predict groups them: a one-channel model trains on scan_0000, scan_0001 as two cases (they were
    grouped into a case 'scan' whose label was missing); a disagreement names the folder and model.in_channels."""
    from medfast.data import find_pairs

    single = tmp_path / "single"  # one-channel cases that happen to end in _0000 / _0001, labelled one by one
    imgs = _touch(single, ["images/scan_0000.nii.gz", "images/scan_0001.nii.gz", "images/x_0000.nii.gz"])
    labs = _touch(single, ["labels/scan_0000.nii.gz", "labels/scan_0001.nii.gz", "labels/x.nii.gz"])
    f = gather_files(_config(tmp_path, root=str(single), val_fraction=0.0), task="segmentation", need_labels=True,
                     in_channels=1)
    assert (f.images, f.labels) == (imgs, labs)
    (single / "images" / "x_0000.nii.gz").unlink()  # (grouped, a lone _0000 is a case of 1 channel file)
    with pytest.raises(DatasetError, match=rf"{single / 'images'}: .*scan_0000.nii.gz \+ .*scan_0001.nii.gz are "
                                           r"labelled one by one .* in_channels=2 \(model.in_channels\) and groups "
                                           r"them into case 'scan' .* set model.in_channels=1"):
        find_pairs(single, in_channels=2)

    nnunet = tmp_path / "nnunet"  # cases stored one file per channel, labelled per case
    imgs = _touch(nnunet, ["images/a_0000.nii.gz", "images/a_0001.nii.gz", "images/b_0000.nii.gz",
                           "images/b_0001.nii.gz"])
    labs = _touch(nnunet, ["labels/a.nii.gz", "labels/b.nii.gz"])
    f = gather_files(_config(tmp_path, root=str(nnunet), val_fraction=0.0), task="segmentation", need_labels=True,
                     in_channels=2)
    assert (f.images, f.labels) == ([imgs[:2], imgs[2:]], labs)
    assert find_pairs(nnunet) == (f.images, f.labels)  # in_channels unknown: grouped, as before
    with pytest.raises(DatasetError, match=rf"{nnunet / 'images'}: case 'a' is stored as 2 channel files "
                                           r"\(a_0000.nii.gz, a_0001.nii.gz; .* in_channels=1 \(model.in_channels\)"
                                           r".* set model.in_channels=2"):
        find_pairs(nnunet, in_channels=1)
    with pytest.raises(DatasetError, match=rf"{nnunet / 'images'}: the cases are stored as 2 channel files each "
                                           r"\(case 'a': _0000 .. _0001\) but the model takes in_channels=3 "
                                           r"\(model.in_channels\): set model.in_channels=2"):
        find_pairs(nnunet, in_channels=3)
    (nnunet / "labels" / "a.nii.gz").rename(nnunet / "labels.txt")  # without labels the count is checked too
    (nnunet / "labels" / "b.nii.gz").unlink()
    (nnunet / "labels").rmdir()
    with pytest.raises(DatasetError, match="stored as 2 channel files each"):
        find_pairs(nnunet, in_channels=3)
    with pytest.raises(ValueError, match="in_channels must be >= 1, got 0"):
        find_pairs(nnunet, in_channels=0)
    with pytest.raises(TypeError, match="in_channels must be an int or None, got '2'"):
        find_pairs(nnunet, in_channels="2")


def test_segmentation_trains_a_one_channel_model_on_files_named_like_channels(tmp_path):
    """The segmentation task reads data.root with its model's in_channels (the training side of the rule above)."""
    import nibabel as nib
    import numpy as np

    from medfast.tasks.segmentation import SegmentationTask
    from medfast.train import load_config

    for d in ("images", "labels"):
        (tmp_path / "data" / d).mkdir(parents=True)
    for name in ("scan_0000", "scan_0001"):
        for d, dtype in (("images", np.float32), ("labels", np.uint8)):
            nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), dtype), np.eye(4)), tmp_path / "data" / d / f"{name}.nii.gz")
    config = load_config([], ["task=segmentation", f"data.root={tmp_path / 'data'}", "data.val_fraction=0",
                              "model.in_channels=1", "model.out_channels=2", f"trainer.out_dir={tmp_path / 'run'}"])
    train, val = SegmentationTask(config).build_datasets()
    assert len(train) == 2 and val is None
    assert [train[i]["files"] for i in range(2)] == [str(tmp_path / "data" / "images" / f"scan_000{k}.nii.gz")
                                                     for k in range(2)]
