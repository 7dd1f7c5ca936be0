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
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary file
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


# --- text fields keep the text as written (YAML 1.1 read 0777 as 511, 12:30 as 750, 2024_01 as 202401) -----------
@pytest.mark.parametrize("text", ["0777", "1.10", "2024_01", "12:30", "0x10", "1e3", "yes", "off", "2024-01-01",
                                  "runs/a #1"])
def test_set_text_field_keeps_the_text(text):
    cfg = load_config([], [f"trainer.out_dir={text}", f"data.cache_dir={text}", f"trainer.resume={text}"])
    assert cfg.trainer.out_dir == text and cfg.data.cache_dir == text and cfg.trainer.resume == text


def test_yaml_text_fields_keep_the_text_and_typed_fields_their_type(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "trainer: {out_dir: 0777, resume: ~, max_steps: 0x10, deterministic: yes, amp: Off}\n"
        "data: {cache_dir: 2024_11, dataset: 1.10, train_images: [12:30, [0777, 2024-01-01], x.nii], "
        "test_label_map: {1: 0x2}, spacing: [1, 2.5, 1e-1], dataset_args: {a: 0777}}\n"
        "optim: {lr: 1e-3, grad_clip: .inf}\nmodel: {deep_supervision: on, kwargs: {dropout: 0.5}}\n"
        "task_args: {when: 12:30}\n")
    cfg = load_config([tmp_path / "a.yaml"])
    assert cfg.trainer.out_dir == "0777" and cfg.trainer.resume is None and cfg.data.cache_dir == "2024_11"
    assert cfg.data.dataset == "1.10" and cfg.data.train_images == ["12:30", ["0777", "2024-01-01"], "x.nii"]
    assert cfg.trainer.amp == "Off"  # (lower-cased by the code that reads it)
    # typed fields as YAML 1.1 reads them (as before)
    assert cfg.trainer.max_steps == 16 and cfg.trainer.deterministic is True and cfg.model.deep_supervision is True
    assert cfg.data.test_label_map == {1: 2} and cfg.data.spacing == [1.0, 2.5, 0.1]
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.data.dataset_args == {"a": 511} and cfg.task_args == {"when": 750}  # free mappings: YAML's values
    assert cfg.model.kwargs == {"dropout": 0.5}
    # quoted strings and null as before; the resolved config round-trips
    cfg = load_config([tmp_path / "a.yaml"], ["trainer.out_dir='a b'", 'data.cache_dir="0777"', "trainer.resume=null",
                                              "data.train_images=[0777, 1.10]", "trainer.max_steps=0x10"])
    assert cfg.trainer.out_dir == "a b" and cfg.data.cache_dir == "0777" and cfg.trainer.resume is None
    assert cfg.data.train_images == ["0777", "1.10"] and cfg.trainer.max_steps == 16
    path = save_config(cfg, tmp_path / "saved.yaml")
    assert config_to_dict(load_config([path])) == config_to_dict(cfg)


def test_amp_off_is_the_choice_off(tmp_path):
    from medfast.train.config import check_config, config_from_dict

    (tmp_path / "off.yaml").write_text("trainer:\n  amp: off\n")
    for cfg in (load_config([tmp_path / "off.yaml"]), load_config([], ["trainer.amp=off"]),
                config_from_dict({"trainer": {"amp": False}})):
        assert cfg.trainer.amp == "off"
        check_config(cfg)
    with pytest.raises(ConfigError, match="trainer.amp must be one of"):
        check_config(load_config([], ["trainer.amp=no"]))
    with pytest.raises(ConfigError, match="must be a string"):  # only where "off" is one of the choices
        config_from_dict({"optim": {"name": False}})


def test_set_mapping_merges_like_a_file(tmp_path):
    base = _write(tmp_path / "base.yaml", {"trainer": {"out_dir": "mine", "batch_size": 4, "max_steps": 3},
                                           "task_args": {"a": 1}})
    second = _write(tmp_path / "second.yaml", {"trainer": {"max_steps": 9}, "task_args": {"b": 2}})
    by_file = load_config([base, second])
    by_set = load_config([base], ["trainer={max_steps: 9}", "task_args={b: 2}"])
    assert config_to_dict(by_set) == config_to_dict(by_file)
    assert by_set.trainer.out_dir == "mine" and by_set.trainer.batch_size == 4 and by_set.trainer.max_steps == 9
    assert by_set.task_args == {"a": 1, "b": 2}
    assert load_config([base], ["trainer={out_dir: 0777}"]).trainer.out_dir == "0777"
    with pytest.raises(ConfigError, match="trainer.batch_size must be an int"):
        load_config([base], ["trainer={batch_size: x}"])


def test_duplicate_keys_are_errors_naming_key_file_and_line(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("trainer:\n  max_steps: 3\n  out_dir: mine\ntrainer:\n  batch_size: 4\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: duplicate key 'trainer' at line 4 \(first at line 1\)"):
        load_config([dup])
    dup.write_text("optim:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'lr' at line 3 \(first at line 2\)"):
        load_config([dup])
    with pytest.raises(ConfigError, match="duplicate key 'max_steps'"):
        load_config([], ["trainer={max_steps: 1, max_steps: 2}"])
    # a merge key (<<) overridden by an explicit key is not a duplicate
    ok = tmp_path / "ok.yaml"
    ok.write_text("trainer:\n  <<: {max_steps: 3, batch_size: 4}\n  max_steps: 5\n")
    cfg = load_config([ok])
    assert cfg.trainer.max_steps == 5 and cfg.trainer.batch_size == 4


@pytest.mark.parametrize("override, match", [
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("optim.weight_decay=.nan", "optim.weight_decay must be >= 0"),
    ("optim.momentum=-1", r"optim.momentum must lie in \[0, 1\)"),
    ("optim.momentum=1.5", r"optim.momentum must lie in \[0, 1\)"),
    ("optim.lr=.inf", "optim.lr must be > 0 and finite"),
    ("optim.lr=0", "optim.lr must be > 0"),
    ("optim.min_lr_ratio=-2", r"optim.min_lr_ratio must lie in \[0, 1\]"),
    ("optim.min_lr_ratio=1.5", r"optim.min_lr_ratio must lie in \[0, 1\]"),
    ("optim.min_lr_ratio=.nan", r"optim.min_lr_ratio must lie in \[0, 1\]"),
    ("optim.warmup_steps=-5", "optim.warmup_steps must be >= 0"),
    ("optim.grad_clip=.nan", "optim.grad_clip must be >= 0 and finite"),
    ("optim.grad_clip=.inf", "optim.grad_clip must be >= 0 and finite"),
    ("optim.grad_clip=-1", "optim.grad_clip must be >= 0 and finite"),
    ("trainer.seed=-1", r"trainer.seed must lie in \[0, 2\*\*32\)"),
    (f"trainer.seed={2**32}", r"trainer.seed must lie in \[0, 2\*\*32\)"),
    (f"trainer.seed={2**70}", r"trainer.seed must lie in \[0, 2\*\*32\)"),
    ("augment.integrate_steps=100", r"augment.integrate_steps must lie in \[0, 64\]"),
    ("augment.integrate_steps=-1", r"augment.integrate_steps must lie in \[0, 64\]"),
    ("augment.deform_grid=1", "augment.deform_grid must be 0"),
    ("augment.deform_grid=-3", "augment.deform_grid must be 0"),
    ("augment.rotation=-10", "augment.rotation must be >= 0 and finite"),
    ("augment.deform_magnitude=.inf", "augment.deform_magnitude must be >= 0 and finite"),
    ("augment.noise_std=.nan", "augment.noise_std must be >= 0 and finite"),
    ("augment.gamma=-0.2", "augment.gamma must be >= 0"),
    ("augment.bias_field=-1", "augment.bias_field must be >= 0"),
    ("augment.shear=-1", "augment.shear must be >= 0"),
    ("augment.translation=-1", "augment.translation must be >= 0"),
    ("augment.intensity_shift=-1", "augment.intensity_shift must be >= 0"),
    ("augment.scale=1", r"augment.scale must lie in \[0, 1\)"),
    ("augment.intensity_scale=-0.1", r"augment.intensity_scale must lie in \[0, 1\)"),
])
def test_out_of_range_settings_are_config_errors(override, match):
    # (a bug hunt: these crashed with a traceback not naming the setting, some only at the first step, or trained
    # silently: min_lr_ratio=-2 made the learning rate negative)
    from medfast.train.config import check_config

    with pytest.raises(ConfigError, match=match):
        check_config(load_config([], [override]))


def test_range_limits_themselves_are_accepted():
    from medfast.train.config import check_config

    check_config(load_config([], [f"trainer.seed={2**32 - 1}", "augment.deform_grid=0", "augment.integrate_steps=64",
                                  "optim.min_lr_ratio=1", "optim.grad_clip=0", "optim.momentum=0",
                                  "optim.weight_decay=0", "optim.warmup_steps=0", "augment.scale=0.99"]))
    check_config(load_config([], ["optim.min_lr_ratio=0", "augment.integrate_steps=0", "augment.deform_grid=2"]))
    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        check_config(load_config([path]))  # the shipped configs


@pytest.mark.parametrize("key, shape, channels", [
    ("augment.patch_size", [8, 8, 8], [2, 2, 2, 2]), ("augment.patch_size", [8, 8, 8], [2, 2, 2]),
    ("augment.patch_size", [8, 8, 16], [2, 2, 2, 2]), ("augment.patch_size", [4, 6, 4], [2, 2, 2, 2]),
    ("data.shape", [4, 4, 4], [2, 2, 2]), ("data.shape", [5, 4, 4], [2, 2, 2]),
    ("inference.roi_size", [2, 2, 2], [2, 2]), ("inference.roi_size", [3, 2, 2], [2, 2]),
])
def test_unet_input_too_small_for_its_depth_is_a_config_error(key, shape, channels):
    # reference: whether the U-Net (instance norm) fails on that input in torch
    import torch

    from medfast.nets import UNet
    from medfast.train.config import check_spatial_config, config_from_dict

    net = UNet(3, 1, 2, channels)
    try:
        net(torch.rand(1, 1, *shape))  # training mode: what step 1 (and validation: instance stats) runs
        fails = False
    except ValueError as exc:
        assert "more than 1 spatial element" in str(exc)
        fails = True
    section, name = key.split(".")
    cfg = config_from_dict({"task": "segmentation", "model": {"channels": channels}, section: {name: shape}})
    if fails:
        with pytest.raises(ConfigError, match=rf"{key} = \[.*\] is too small for model.channels = \[2, "):
            check_spatial_config(cfg)
    else:
        check_spatial_config(cfg)
    cfg.model.norm = "group"  # no instance statistics: any size runs
    check_spatial_config(cfg)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_batch_norm_unet_on_one_sample_too_small_for_its_depth_is_a_config_error(batch_size):
    # reference: whether a batch-norm U-Net fails on that training batch in torch (eval mode never does)
    import torch

    from medfast.nets import UNet
    from medfast.train.config import check_spatial_config, config_from_dict

    channels, patch = [2, 4, 8, 16, 32], [16, 16, 16]
    net = UNet(3, 1, 2, channels, norm="batch")
    try:
        net(torch.rand(batch_size, 1, *patch))
        fails = False
    except ValueError as exc:
        assert "more than 1 value per channel" in str(exc)
        fails = True
    assert fails == (batch_size == 1)
    cfg = config_from_dict({"task": "segmentation", "model": {"channels": channels, "norm": "batch"},
                            "augment": {"patch_size": patch}, "inference": {"roi_size": patch},
                            "trainer": {"batch_size": batch_size}})
    if fails:
        with pytest.raises(ConfigError, match=r"augment.patch_size = .* batch normalization of one sample"):
            check_spatial_config(cfg)
    else:
        check_spatial_config(cfg)


def test_a_billion_laughs_config_is_refused_quickly(tmp_path):
    # nine levels of nine aliases: 9^9 values once copied (config_to_dict took minutes and gigabytes, then OOM)
    import time

    lines = ["task: segmentation", "task_args:", '  l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for k in range(1, 9):
        lines.append(f"  l{k}: &l{k} [" + ",".join([f"*l{k - 1}"] * 9) + "]")
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"laughs.yaml: the configuration expands to more than 1,000,000 values"):
        load_config([path])
    assert time.perf_counter() - start < 30  # (refused after a million values, not after 387 million)
    ok = tmp_path / "anchors.yaml"  # ordinary anchors still work
    ok.write_text("trainer: &t {max_steps: 3}\nmodel: {channels: &c [4, 8]}\n")
    assert load_config([ok]).model.channels == [4, 8]


def test_a_checkpoint_holding_pickled_objects_is_refused_without_bad_advice(tmp_path):
    # torch's first line advised retrying with weights_only=False, which runs the file's code
    import torch

    from medfast.train import CheckpointError, load_checkpoint

    class Payload:
        def __reduce__(self):
            return (print, ("never printed",))

    torch.save({"model": {}, "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="holds pickled Python objects, refused") as info:
        load_checkpoint(tmp_path / "evil.pt")
    assert "weights_only=False" not in str(info.value)


@pytest.mark.parametrize("edit", ["nan", "complex", "config"])
def test_an_edited_checkpoint_is_refused_by_name(tmp_path, edit):
    # NaN weights predicted all background (exit 0); a string config gave AttributeError tracebacks
    import torch

    from medfast.train import CheckpointError, load_checkpoint, save_checkpoint

    state = {"model": {"net": {"conv.weight": torch.ones(2, 2), "bn.num_batches_tracked": torch.tensor(3)}},
             "config": {"task": "segmentation"}}
    if edit == "nan":
        state["model"]["net"]["conv.weight"][1, 0] = float("nan")
    elif edit == "complex":
        state["model"]["net"]["conv.weight"] = torch.ones(2, 2, dtype=torch.complex64)
    else:
        state["config"] = "segmentation"
    save_checkpoint(state, tmp_path / "x.pt")
    match = {"nan": r"holds non-finite weights \(net.conv.weight\)", "complex": r"holds complex weights",
             "config": r"its 'config' entry is a str"}[edit]
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path / "x.pt")


def test_deterministic_true_false_or_warn():
    # "warn": torch.use_deterministic_algorithms(True, warn_only=True) (on CUDA some nets' backward ops have no
    # deterministic kernel, so true raises there at the first backward); anything else is named
    import torch

    from medfast.train.config import ConfigError, check_config, config_from_dict
    from medfast.train.trainer import Trainer

    assert config_from_dict({"trainer": {"deterministic": "warn"}}).trainer.deterministic == "warn"
    from medfast.train.config import load_config

    for raw, value in (("true", True), ("yes", True), ("false", False), ("warn", "warn")):  # --set and YAML alike
        assert load_config([], [f"trainer.deterministic={raw}"]).trainer.deterministic == value
    check_config(config_from_dict({"trainer": {"deterministic": "warn"}}))
    with pytest.raises(ConfigError, match="trainer.deterministic must be true, false or warn; got 'always'"):
        check_config(config_from_dict({"trainer": {"deterministic": "always"}}))
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        for value, expected in ((True, (True, False)), ("warn", (True, True)), (False, (False, False))):
            stub = type("Stub", (), {})()
            stub.config, stub.rank = config_from_dict({"trainer": {"deterministic": value}}), 0
            Trainer._seed(stub)
            assert (torch.are_deterministic_algorithms_enabled(),
                    torch.is_deterministic_algorithms_warn_only_enabled()) == expected
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
