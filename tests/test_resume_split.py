"""A resume checks the train/validation split by its subjects (file name and size, recorded in the checkpoint), not
by the settings' path strings; a resume with other settings keeps the earlier config.yaml; the refusal of a new run
into a used folder names the whole folder."""

import shutil

import numpy as np
import pytest
import torch
import yaml

from medfast.data.synthetic import make_blobs
from medfast.train import CheckpointError, ConfigError, Trainer, load_config


def _seg(data, out, *overrides):
    """The tiny segmentation run of tests/conftest.py's TINY_SEGMENTATION_CONFIG on ``data`` (a data.root, unless
    ``overrides`` give lists), 4 steps at most."""
    base = [f"data.root={data}", "model.channels=[2, 4]", "model.out_channels=3", "augment.patch_size=[8, 8, 8]",
            "augment.deform_grid=3", "inference.roi_size=[8, 8, 8]", "trainer.max_steps=4", "trainer.batch_size=1",
            "trainer.val_every=0", "trainer.checkpoint_every=4", "trainer.progress=false", "trainer.tensorboard=false",
            "trainer.plots=false", "trainer.threads=1", "trainer.device=cpu", f"trainer.out_dir={out}"]
    return load_config([], [*base, *overrides])


def _add_case(data, src, dst):
    for sub in ("images", "labels"):
        shutil.copy(data / sub / f"case_{src:03d}.nii.gz", data / sub / f"case_{dst:03d}.nii.gz")


def test_identities_tell_same_named_files_apart_and_survive_a_move(tmp_path):
    """Subjects are named by their path under their list's folder, with the parent folder where the run holds
    another file as large of that name (a lone ``case_2/image.nii`` where every case's file is an equally large
    ``image.nii``): a moved folder gives the same record, and a same-sized file of another case does not pass for
    the checkpoint's."""
    from medfast.train.files import split_changes, split_identities

    for root in ("a", "b"):
        for case in range(3):
            (tmp_path / root / f"case_{case}").mkdir(parents=True)
            (tmp_path / root / f"case_{case}" / "image.nii").write_bytes(b"x" * 100)  # all the same size
    files = {root: [str(tmp_path / root / f"case_{i}" / "image.nii") for i in range(3)] for root in ("a", "b")}
    saved = split_identities(files["a"][:2], files["a"][2:])
    assert saved == {"train": [["case_0/image.nii", 100], ["case_1/image.nii", 100]],
                     "val": [["case_2/image.nii", 100]]}
    assert not any(split_changes(saved, split_identities(files["b"][:2], files["b"][2:])).values())  # moved
    swapped = split_changes(saved, split_identities(files["b"][1:], files["b"][:1]))
    assert swapped == {"to_val": ["case_0/image.nii"], "new_val": [], "to_train": ["case_2/image.nii"], "gone": []}


def test_resume_refuses_a_data_root_split_drawn_anew(tmp_path):
    """data.root + data.val_fraction: a subject added to the folder before --resume drew the split anew, silently
    (a subject trained on became a validation subject). The checkpoint records the split; the resume names the
    subjects that moved; a moved copy of the folder resumes, and a checkpoint without the record as before."""
    data = tmp_path / "data"
    make_blobs(data, n=4, shape=(12, 12, 12), classes=3)
    cfg = ("data.val_fraction=0.34", "trainer.seed=2")  # validation: case_003; with case_004 added: 002 and 004
    Trainer(_seg(data, tmp_path / "run", *cfg)).fit(stop_after=1)
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=True)
    assert [name for name, _ in state["split"]["val"]] == ["case_003.nii.gz"]
    assert all(size > 0 for _, size in state["split"]["train"] + state["split"]["val"])

    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    Trainer(_seg(moved, tmp_path / "run", *cfg, "trainer.resume=auto")).fit(stop_after=2)  # same subjects
    before = (tmp_path / "run" / "config.yaml").read_text()

    _add_case(moved, 3, 4)
    with pytest.raises(CheckpointError, match=r"case_002\.nii\.gz \(trained on in the checkpoint, validation now\)") \
            as info:
        Trainer(_seg(moved, tmp_path / "run", *cfg, "trainer.resume=auto")).fit()
    msg = str(info.value)
    assert "case_003.nii.gz (validation in the checkpoint, training now)" in msg
    assert "5 subjects now, 4 when the checkpoint was trained" in msg and "Restore data.root" in msg
    assert "train a new run" in msg
    assert (tmp_path / "run" / "config.yaml").read_text() == before  # a refused resume leaves the run's record

    del state["split"]  # a checkpoint written before the record: resumes as before (the settings are the same)
    torch.save(state, ckpt)
    Trainer(_seg(moved, tmp_path / "run", *cfg, "trainer.resume=auto")).fit(stop_after=2)


def test_resume_of_explicit_validation_lists_compares_files_not_paths(tmp_path, monkeypatch):
    """data.val_images / val_labels: the same files spelled relative instead of absolute, or the folder moved, were
    refused ("the split would be drawn anew": nothing is drawn for a list). Matched by file name and size now; a
    truly different validation set is still refused, with a message for lists."""
    data = tmp_path / "data"
    make_blobs(data, n=4, shape=(12, 12, 12), classes=3)
    monkeypatch.chdir(tmp_path)

    def lists(root, train=(0, 1), val=(2,)):
        out = []
        for key, cases in (("train", train), ("val", val)):
            for sub, what in (("images", "images"), ("labels", "labels")):
                out.append(f"data.{key}_{what}=[{', '.join(f'{root}/{sub}/case_{i:03d}.nii.gz' for i in cases)}]")
        return ["data.root=null", *out]

    Trainer(_seg(data, tmp_path / "run", *lists(data))).fit(stop_after=1)
    Trainer(_seg(data, tmp_path / "run", *lists("data"), "trainer.resume=auto")).fit(stop_after=2)  # respelled
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    Trainer(_seg(moved, tmp_path / "run", *lists(moved), "trainer.resume=auto")).fit(stop_after=3)  # moved
    with pytest.raises(CheckpointError, match=r"case_003\.nii\.gz \(validation now, not a subject of the checkpoint\)"
                       r".*the validation set \(data\.val_images / val_labels\) holds other subjects") as info:
        Trainer(_seg(moved, tmp_path / "run", *lists(moved, val=(3,)), "trainer.resume=auto")).fit()
    assert "drawn anew" not in str(info.value)
    with pytest.raises(CheckpointError, match=r"case_001\.nii\.gz \(trained on in the checkpoint, validation now\)"):
        Trainer(_seg(moved, tmp_path / "run", *lists(moved, train=(0, 2), val=(1,)), "trainer.resume=auto")).fit()
    # another file under the checkpoint's name (another size): another subject
    img = moved / "images" / "case_002.nii.gz"
    img.write_bytes(img.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match=r"case_002\.nii\.gz \(validation in the checkpoint, not found now\)"):
        Trainer(_seg(moved, tmp_path / "run", *lists(moved), "trainer.resume=auto")).fit()

    # a checkpoint written before the record: the lists are compared as written, with a message for lists
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=True)
    del state["split"]
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError, match=r"another validation set: data\.val_images .*predates the record"):
        Trainer(_seg(data, tmp_path / "run", *lists("data"), "trainer.resume=auto")).fit()


def _png(path, seed):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 12)).astype(np.uint8)).save(path)


def _cls(root, out, *overrides):
    base = [f"data.root={root}", "data.normalize=minmax", "data.val_fraction=0.25", "task=classification",
            "model.name=sononet", "model.spatial_dims=2", "model.out_channels=2", "model.channels=[4]",
            "model.kwargs={convs_per_block: [1, 1, 1]}", "trainer.batch_size=4", "trainer.max_steps=4",
            "trainer.val_every=0", "trainer.checkpoint_every=4", "trainer.progress=false", "trainer.tensorboard=false",
            "trainer.plots=false", "trainer.threads=1", "trainer.device=cpu", f"trainer.out_dir={out}"]
    return load_config([], [*base, *overrides])


def test_classification_resume_checks_the_split_by_its_images(tmp_path):
    """The classification task draws its own split (data.val_fraction over data.root) and reads a separate
    validation folder (data.dataset_args.val_root): a moved val_root resumes, a root that gained images so that
    the split is drawn anew is refused, naming the images (class folder kept: every class has a 0.png)."""
    for root in ("img", "val"):
        for k, c in enumerate(("a", "b")):
            for i in range(4):
                _png(tmp_path / root / c / f"{i}.png", seed=100 * k + i + (50 if root == "val" else 0))
    val_root = ("data.val_fraction=0", f"data.dataset_args={{val_root: {tmp_path / 'val'}}}")
    Trainer(_cls(tmp_path / "img", tmp_path / "run", *val_root)).fit(stop_after=1)
    shutil.move(tmp_path / "val", tmp_path / "val_moved")
    moved = ("data.val_fraction=0", f"data.dataset_args={{val_root: {tmp_path / 'val_moved'}}}")
    Trainer(_cls(tmp_path / "img", tmp_path / "run", *moved, "trainer.resume=auto")).fit(stop_after=2)

    Trainer(_cls(tmp_path / "img", tmp_path / "split")).fit(stop_after=1)
    saved = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)["split"]
    assert len(saved["train"]) == 6 and len(saved["val"]) == 2 and all("/" in n for n, _ in saved["val"])
    for i in range(4, 8):
        _png(tmp_path / "img" / "a" / f"{i}.png", seed=i + 10)
    with pytest.raises(CheckpointError, match=r"(a|b)/\d\.png \((trained on|validation) in the checkpoint.*"
                                              r"12 subjects now, 8 when the checkpoint was trained"):
        Trainer(_cls(tmp_path / "img", tmp_path / "split", "trainer.resume=auto")).fit()


def test_resume_with_other_settings_keeps_the_earlier_config(tmp_path):
    """docs/training.md: OUT/config.yaml trains the run again. A resume with a raised trainer.max_steps (the
    documented way to train on) overwrote it, and the file no longer reproduced the steps already trained (their
    cosine schedule spans another max_steps). The earlier file is kept as config_step<N>.yaml (N: the resumed
    step); a resume with the same settings keeps none, a second resume at that step leaves the first one's."""
    data = tmp_path / "data"
    make_blobs(data, n=2, shape=(12, 12, 12), classes=3)
    out = tmp_path / "run"
    Trainer(_seg(data, out, "trainer.max_steps=2")).fit(stop_after=1)
    Trainer(_seg(data, out, "trainer.max_steps=2", "trainer.resume=auto")).fit()  # same settings
    assert not list(out.glob("config_step*.yaml"))
    first = (out / "config.yaml").read_text()
    Trainer(_seg(data, out, "trainer.max_steps=3", "trainer.resume=auto")).fit()
    assert (out / "config_step0000002.yaml").read_text() == first
    assert yaml.safe_load((out / "config.yaml").read_text())["trainer"]["max_steps"] == 3
    Trainer(_seg(data, out, "trainer.max_steps=4", f"trainer.resume={out / 'checkpoints' / 'step_0000002.pt'}")).fit()
    assert (out / "config_step0000002.yaml").read_text() == first  # the config of steps 1-2, not of the abandoned 3
    assert yaml.safe_load((out / "config.yaml").read_text())["trainer"]["max_steps"] == 4


def test_new_run_into_a_used_folder_names_the_whole_folder(tmp_path):
    """The refusal said "or delete OUT/checkpoints first": doing so left the earlier run's test/, results and
    images beside the new run's. It names the whole folder now."""
    data = tmp_path / "data"
    make_blobs(data, n=2, shape=(12, 12, 12), classes=3)
    Trainer(_seg(data, tmp_path / "run", "trainer.max_steps=1")).fit()
    with pytest.raises(ConfigError, match=r"delete the whole folder .*run first \(not only its checkpoints/") as info:
        Trainer(_seg(data, tmp_path / "run", "trainer.max_steps=1")).fit()
    assert "checkpoints first" not in str(info.value)
