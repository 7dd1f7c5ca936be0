"""Command-line mistakes found by a report-only hunt: each is refused at once, in one line naming the setting or
flag, instead of being found late, ignored, or reported through an unrelated exception."""

import shutil

import pytest
import torch

from medfast.cli import _positive_float, main
from medfast.train import CheckpointError, ConfigError, load_checkpoint, load_config
from medfast.train.config import config_from_dict
from medfast.train.files import gather_files
from tests.conftest import train_tiny_segmentation


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny blobs data, its config, and a 1-step segmentation checkpoint."""
    base = tmp_path_factory.mktemp("cli_mistakes")
    return train_tiny_segmentation(base, 1)


def _err(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# --- 1: a preset config plus the user's data.root -------------------------------------------------------------
def test_data_root_beside_a_preset_is_refused_before_the_preset_is_built(tmp_path, monkeypatch, capsys):
    from medfast.data import presets

    def never(out_dir, **kwargs):  # building the preset took ~10 s and wrote files to OUT/data before the refusal
        raise AssertionError("the preset was built")

    monkeypatch.setattr(presets, "mni152_tissue", never)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"task: segmentation\ndata: {{dataset: mni152_tissue, root: {tmp_path / 'mine'}}}\n")
    config = load_config([cfg], values={"trainer.out_dir": str(tmp_path / "run")})
    match = r"data.root and data.dataset \('mni152_tissue'\) both give the training data: --set data.dataset=null"
    with pytest.raises(ConfigError, match=match):
        gather_files(config, task="segmentation")
    out = tmp_path / "run2"
    assert main(["train", str(cfg), "--out", str(out)]) == 1
    assert "data.dataset ('mni152_tissue')" in _err(capsys)
    assert not out.exists()
    # the way out the message gives
    assert load_config([cfg], ["data.dataset=null"]).data.dataset is None


# --- 2: predict --out = the input folder ------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["_seg", "_prob"])
def test_predict_refuses_an_output_that_is_one_of_its_inputs(tiny, tmp_path, capsys, suffix):
    data, _, ckpt = tiny
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(data / "images" / "case_000.nii.gz", folder / "case_000.nii.gz")
    # a user's file named as case_000's output would be: overwritten (_seg), or removed as a stale _prob
    other = folder / f"case_000{suffix}.nii.gz"
    shutil.copy(data / "labels" / "case_001.nii.gz", other)
    before = other.read_bytes()
    assert main(["predict", str(folder), "--model", str(ckpt), "--out", str(folder), "--device", "cpu"]) == 1
    err = _err(capsys)
    assert "--out" in err and f"case_000{suffix}.nii.gz" in err and "would overwrite the input" in err
    assert other.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(["case_000.nii.gz", other.name])  # nothing written


def test_predict_into_the_input_folder_without_a_clash_still_works(tiny, tmp_path, capsys):
    data, _, ckpt = tiny
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(data / "images" / "case_000.nii.gz", folder / "case_000.nii.gz")
    assert main(["predict", str(folder), "--model", str(ckpt), "--out", str(folder), "--device", "cpu"]) == 0
    assert (folder / "case_000_seg.nii.gz").is_file()


# --- 3: data.val_fraction beside data.val_deformations on a set too small to split ---------------------------
def test_val_fraction_with_val_deformations_is_refused_also_when_too_few_images_to_split():
    config = config_from_dict({
        "task": "segmentation",
        "data": {"train_images": ["a.nii.gz"], "train_labels": ["a_lab.nii.gz"], "val_fraction": 0.5,
                 "val_deformations": 1},
        "augment": {"rotation": 10.0},
    })
    # one image, too few to split: val_fraction was dropped without a word and the deformations validated
    with pytest.raises(ConfigError, match="data.val_deformations .* data.val_fraction gives one: set one of them"):
        gather_files(config, task="segmentation", need_labels=True, min_subjects_to_split=2)


# --- 4: demo --magnitude inf ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400", "0", "abc"])
def test_demo_magnitude_must_be_a_finite_positive_number(value, capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", f"--magnitude={value}", "--out", "never_written"])
    assert info.value.code == 2
    assert f"argument --magnitude: must be a finite number > 0, got {value}" in capsys.readouterr().err
    assert _positive_float("2.5") == 2.5


# --- 5: cosmetic ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, match", [
    (["trainer.amp=no"], "trainer.amp must be one of"),
    (["optim.name=adam", "optim.momentum=0.5"], "optim.momentum=0.5 is not used"),
    (["task_args={foo: 1}"], "unknown task_args for the segmentation task"),
])
def test_print_config_checks_the_config_as_train_does(tiny, capsys, overrides, match):
    _, cfg, _ = tiny
    sets = [a for o in overrides for a in ("--set", o)]
    assert main(["train", str(cfg), "--print-config", *sets]) == 1
    captured = capsys.readouterr()
    assert match in captured.err and captured.out == ""
    assert main(["train", str(cfg), "--print-config"]) == 0  # (a config train accepts is printed)
    assert "max_steps: 1" in capsys.readouterr().out


def test_evaluate_errors_carry_the_error_prefix(tmp_path):
    with pytest.raises(SystemExit, match="^medfast evaluate: error: prediction not found"):
        main(["evaluate", str(tmp_path / "nope"), str(tmp_path)])
    with pytest.raises(SystemExit, match="^medfast evaluate: error: --percentile must be in"):
        main(["evaluate", str(tmp_path), str(tmp_path), "--percentile", "nan"])


def test_a_file_that_is_no_checkpoint_is_named_as_such(tiny, tmp_path, capsys):
    data, cfg, _ = tiny
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    image = data / "images" / "case_000.nii.gz"
    for path in (cfg, image, empty):  # a YAML config gave "IndexError: pop from empty list"
        assert main(["predict", str(image), "--model", str(path), "--out", str(tmp_path / "p")]) == 1
        err = _err(capsys)
        assert f"{path}: it is not a medfast checkpoint" in err and "Error:" not in err
    assert main(["train", str(cfg), "--out", str(tmp_path / "r"), "--resume", str(cfg)]) == 1
    assert "it is not a medfast checkpoint (not a file written by torch.save" in _err(capsys)
    # torch.save's legacy (non-zip) format is still read as before
    legacy = tmp_path / "legacy.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, legacy, _use_new_zipfile_serialization=False)
    assert load_checkpoint(legacy)["model"]["w"].shape == (2,)
    with pytest.raises(CheckpointError, match="an empty file"):
        load_checkpoint(empty)


def test_predict_no_cam_is_refused_for_a_segmentation_checkpoint(tiny, tmp_path, capsys):
    data, _, ckpt = tiny
    out = tmp_path / "p"
    assert main(["predict", str(data / "images" / "case_000.nii.gz"), "--model", str(ckpt), "--out", str(out),
                 "--no-cam"]) == 1
    assert "--no-cam applies to classification checkpoints" in _err(capsys)
    assert not out.exists()
