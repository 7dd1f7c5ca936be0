"""Config: YAML files merged in order, typed --set overrides, errors naming the key and file, round trip."""

from pathlib import Path

import pytest
import yaml

from medfast.train import Config, ConfigError, config_to_dict, load_config, save_config
from medfast.train.config import merge_dicts, parse_override


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.task == "segmentation" and cfg.trainer.max_steps == 100 and cfg.model.channels == [16, 32, 64, 128]


def test_files_merge_in_order_and_overrides_win(tmp_path):
    a = _write(tmp_path / "a.yaml", {"trainer": {"max_steps": 5, "batch_size": 3, "out_dir": "A"},
                                     "model": {"channels": [4, 8, 16]}, "optim": {"lr": 0.1}})
    b = _write(tmp_path / "b.yaml", {"trainer": {"max_steps": 7}, "model": {"channels": [2, 4]}})
    cfg = load_config([a, b], ["optim.lr=3e-4", "trainer.amp=bf16", "augment.patch_size=[8, 8, 8]",
                               "data.spacing=null", "model.deep_supervision=true", "optim.grad_clip=null"])
    assert cfg.trainer.max_steps == 7  # b wins
    assert cfg.trainer.batch_size == 3 and cfg.trainer.out_dir == "A"  # kept from a (nested merge)
    assert cfg.model.channels == [2, 4]  # lists are replaced, not merged
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.trainer.amp == "bf16" and cfg.augment.patch_size == [8, 8, 8]
    assert cfg.data.spacing is None and cfg.model.deep_supervision is True and cfg.optim.grad_clip is None
    # merge order reversed -> a wins
    assert load_config([b, a]).trainer.max_steps == 5


def test_override_types_follow_the_dataclass():
    cfg = load_config([], ["trainer.max_steps=12", "optim.lr=1", "data.test_label_map={4: 1, 5: 2}",
                           "task_args.mode=velocity", "model.kwargs.foo=[1, 2]"])
    assert cfg.trainer.max_steps == 12 and isinstance(cfg.trainer.max_steps, int)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.test_label_map == {4: 1, 5: 2}
    assert cfg.task_args == {"mode": "velocity"} and cfg.model.kwargs == {"foo": [1, 2]}


@pytest.mark.parametrize(
    "override, match",
    [
        ("trainer.max_stepz=3", "max_stepz"),
        ("trainer.max_steps=abc", "trainer.max_steps must be an int"),
        ("model.deep_supervision=maybe", "true or false"),
        ("augment.patch_size=8", "must be a list"),
        ("nokey", "key.path=value"),
        ("bogus.x=1", "bogus"),
    ],
)
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config([], [override])


def test_unknown_key_names_the_file(tmp_path):
    good = _write(tmp_path / "good.yaml", {"trainer": {"max_steps": 2}})
    bad = _write(tmp_path / "bad.yaml", {"trainer": {"learning_rate": 2}})
    with pytest.raises(ConfigError, match=r"bad\.yaml.*trainer\.learning_rate"):
        load_config([good, bad])
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "missing.yaml"])
    (tmp_path / "broken.yaml").write_text("trainer: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([tmp_path / "broken.yaml"])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config([tmp_path / "list.yaml"])


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config([], ["trainer.max_steps=9", "augment.flip=[0, 2]", "data.spacing=[2.0, 2, 2.5]"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    again = load_config([path])
    assert config_to_dict(again) == config_to_dict(cfg)


def test_merge_and_parse_helpers():
    assert merge_dicts({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}, "d": 4}) == {"a": {"b": 1, "c": 3}, "d": 4}
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=x=y") == (["a"], "x=y")


@pytest.mark.parametrize("override, match", [
    ("inference.sw_batch_size=0", "inference.sw_batch_size must be >= 1"),
    ("inference.hd_percentile=150", r"inference.hd_percentile must lie in \[0, 100\]"),
    ("loss.lambda_dice=-1", "loss.lambda_dice must be >= 0"),
    ("loss.lambda_ce=.inf", "loss.lambda_ce must be >= 0 and finite"),
    ("trainer.dist_timeout_min=0", "trainer.dist_timeout_min must be > 0"),
])
def test_settings_read_at_validation_are_checked_before_training(override, match):
    # (a bug hunt: they passed, and the run died after val_every steps with a traceback)
    from medfast.train.config import check_config

    with pytest.raises(ConfigError, match=match):
        check_config(load_config([], [override]))


def test_classification_config_errors_before_any_data(tmp_path, capsys):
    from medfast.cli import main

    cfg = str(Path(__file__).resolve().parents[1] / "configs" / "cls_demo_cpu.yaml")
    for i, (override, match) in enumerate([
            ("data.dataset_args.samples_per_epoch=0", "data.dataset_args.samples_per_epoch must be an int >= 1"),
            ("data.dataset_args.val_samples=2.5", "data.dataset_args.val_samples must be an int >= 1"),
            ("model.kwargs.blocks=[]", "model: the network cannot be built")]):
        assert main(["train", cfg, "--out", str(tmp_path / f"r{i}"), "--set", override]) == 1
        assert match in capsys.readouterr().err
