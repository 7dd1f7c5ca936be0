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
    f4 = gather_files(_config(tmp_path, train_images=images[:2], val_fraction=0.5, val_deformations=2),
                      task="registration", min_subjects_to_split=3)  # no split: the deformations validate
    assert f4.val_images == []


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
