"""Synthesis edge cases: poses off the volume (a refused pose range, blank frames in training, predict's per-file
check), a one-slice source, reference pose and seed settings refused before a run folder is written, and the resume
error of a GAN whose task_args changed its shape."""

import json

import numpy as np
import pytest
import torch

from medfast.tasks.synthesis import SynthesisTask
from medfast.tasks.synthesis.data import SynthesisSource
from medfast.train import CheckpointError, ConfigError, Trainer
from medfast.train.trainer import load_model_state
from medfast.ultrasound.simulate import _meets_volume
from tests import test_synthesis as ts

_config = ts._config
phantom = ts.phantom  # the 56^3 CT phantom fixture (module scope)


def _written(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _misses(task, poses):
    src = task.source
    return ~_meets_volume(poses.numpy(), np.linalg.inv(src.affine), src.vol.shape[-3:], src.probe)


def test_training_and_validation_poses_off_the_volume_give_blank_frames_not_an_error(tmp_path, phantom):
    # a range that reaches past the volume (12 % of its poses miss it): a batch whose poses all miss it raised in
    # the middle of the run, and a resume drew the same batch and raised again
    task = SynthesisTask(_config(tmp_path, phantom, **{"task_args.shift_mm": "[40, 10, 40]"}))
    task.build_datasets()  # the range passes the check: most poses meet the volume
    seeds = list(range(200))
    miss = _misses(task, task.poses(seeds))
    assert 0 < miss.sum() < 50
    seed = seeds[int(np.flatnonzero(miss)[0])]
    cond, real, _ = task._batch({"seed": [seed]}, torch.device("cpu"))
    assert float(real.max()) == 0 and float(cond[:, 0].max()) == -1  # blank frame, air
    model = task.build_model()
    loss, _ = task.training_step(model, {"seed": [seed]}, torch.device("cpu"))
    assert torch.isfinite(loss)
    task.validation_poses = lambda s: task.poses([seed] * 2)  # a held-out set off the volume
    metrics, _ = task.evaluate(model, 10**12, torch.device("cpu"))
    assert np.isfinite(metrics["l1"])


@pytest.mark.parametrize("extra,match", [
    ({"task_args.position": "[1000, 0, 0]"},
     r"none of 256 training poses drawn from the configured range meets the volume \(the volume phantom_ct.nii.gz "
     r"spans world \[0.0, 0.0, 0.0\] to \[55.0, 55.0, 55.0\] mm.*task_args.position / direction / lateral.*"
     r"task_args.shift_mm / tilt_deg / twist_deg"),
    ({"task_args.shift_mm": "[200, 4, 4]"}, r"\b(1[3-9]\d|2[0-4]\d) of 256 training poses .* miss the volume .*more "
                                            r"than half the frames would be blank.*task_args.shift_mm"),
    ({"task_args.mode": "pose", "model.norm": "batch", "task_args.travel_mm": "[0, 0, 400]"},
     r"of 256 training poses .* miss the volume .*task_args.travel_mm / start_jitter_mm"),
])
def test_a_pose_range_that_misses_the_volume_is_refused_before_anything_is_written(tmp_path, phantom, extra, match):
    with pytest.raises(ConfigError, match=match):
        Trainer(_config(tmp_path, phantom, "off", **extra)).fit()
    assert _written(tmp_path / "off") == []


def test_a_source_with_one_slice_is_refused(tmp_path, phantom):
    # one slice along an axis: frames() divided by size - 1 = 0, the anatomy was all air, the target showed tissue
    import nibabel as nib

    from medfast.ultrasound import Probe

    ct = np.full((56, 56, 1), 40.0, np.float32)
    path = tmp_path / "one_slice.nii.gz"
    nib.save(nib.Nifti1Image(ct, np.diag([1.0, 1, 30, 1])), str(path))
    task = SynthesisTask(_config(tmp_path, phantom, **{"task_args.source": path, "task_args.position": "[28, -1, 0]"}))
    with pytest.raises(ConfigError, match=r"task_args.source .*one_slice.nii.gz\): volume must have at least 2 "
                                          r"voxels along each axis, got shape \(56, 56, 1\)"):
        _ = task.source
    with pytest.raises(ValueError, match="at least 2 voxels"):
        SynthesisSource(ct, np.eye(4), "ct", Probe.preset("L11-5v"), torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize("key,value,match", [
    ("speckle_seed", 2**63, r"task_args.speckle_seed must be in 0 .. 2\*\*63 - 1, got 9223372036854775808"),
    ("speckle_seed", -1, r"task_args.speckle_seed must be in 0 .. 2\*\*63 - 1, got -1"),
    ("direction", "[0, 0, 0]", r"task_args.direction \(the beam\) must not be zero"),
    ("lateral", "[0, 2, 0]", r"task_args.lateral \[0.0, 2.0, 0.0\] must not be zero or parallel to "
                             r"task_args.direction \[0.0, 1.0, 0.0\]"),  # a file's default beam: +y
    ("source", "''", r"task_args.source must be cranium, colin27, mni152 or a CT file path, got ''"),
])
def test_bad_reference_pose_seed_and_source_are_refused_before_anything_is_written(tmp_path, phantom, key, value,
                                                                                  match):
    # the seed failed in the first step (after config.yaml and the logs were written), the others as tracebacks
    with pytest.raises(ConfigError, match=match):
        Trainer(_config(tmp_path, phantom, "bad", **{f"task_args.{key}": value})).fit()
    assert _written(tmp_path / "bad") == []


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, phantom):
    """A 1-step image-mode run stopped with its checkpoint (of 2 steps)."""
    tmp = tmp_path_factory.mktemp("tiny")
    extra = {"trainer.max_steps": 2, "trainer.checkpoint_every": 1}
    Trainer(_config(tmp, phantom, "run", **extra)).fit(stop_after=1)
    return tmp, extra, tmp / "run" / "checkpoints" / "last.pt"


def test_resume_with_task_args_that_change_the_gan_names_them(tiny_run, phantom):
    # the message ended with load_state_dict's header "Error(s) in loading state_dict for ConditionalGAN:"
    tmp, extra, checkpoint = tiny_run
    with pytest.raises(CheckpointError, match=r"do not fit the network .*task_args.disc_layers \(2 in the "
                                              r"checkpoint, 1 now\)"):
        Trainer(_config(tmp, phantom, "run", **extra, **{"trainer.resume": "auto",
                                                         "task_args.disc_layers": 1})).fit()
    with pytest.raises(CheckpointError, match=r"task_args.noise_channels \(not set in the checkpoint, 1 now\)"):
        Trainer(_config(tmp, phantom, "run", **extra, **{"trainer.resume": "auto",
                                                         "task_args.noise_channels": 1})).fit()


def test_a_checkpoint_holding_a_setting_its_mode_ignores_still_generates(tiny_run, tmp_path):
    # a run trained before the other mode's settings were refused (2026-11-29) may hold them: generation refused
    # the checkpoint ("remove it", impossible in a .pt); training ignored them, so does generation
    from medfast.tasks.synthesis.generate import load_generator

    _, _, checkpoint = tiny_run
    state = torch.load(checkpoint, weights_only=False)
    assert state["config"]["task_args"].get("mode", "image") == "image"
    state["config"]["task_args"]["travel_mm"] = [0.0, 0.0, 30.0]  # pose mode's
    torch.save(state, tmp_path / "old.pt")
    task, model = load_generator(tmp_path / "old.pt")
    assert task.args.mode == "image" and not model.training


def test_a_differing_loss_weight_does_not_hide_the_tensor_that_does_not_fit(monkeypatch):
    """A task_args key that shapes no tensor (a loss weight changed for fine-tuning) was named as the cause and
    the real mismatch was left out: the first tensor that does not fit is always given."""
    import medfast.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "config_to_dict", lambda c: {"model": {}, "task_args": {"dice_weight": 1.0}})
    state = {"model": torch.nn.Sequential(torch.nn.Linear(2, 3)).state_dict(),
             "config": {"model": {}, "task_args": {"dice_weight": 0.0}}}
    with pytest.raises(CheckpointError, match=r"size mismatch for 0.weight.*; settings that differ: "
                                              r"task_args.dice_weight \(0.0 in the checkpoint, 1.0 now\)"):
        load_model_state(torch.nn.Sequential(torch.nn.Linear(2, 4)), state, "x.pt", object())


def test_weights_that_do_not_fit_name_the_first_tensor_without_a_config():
    old = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)).state_dict()
    with pytest.raises(CheckpointError, match=r"x.pt do not fit .*: size mismatch for 0.weight: copying a param"):
        load_model_state(torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(3, 1)), {"model": old}, "x.pt")
    with pytest.raises(CheckpointError, match=r'x.pt do not fit .*: Missing key\(s\) in state_dict: "2.weight" '
                                              r"and 1 more$"):
        load_model_state(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1), torch.nn.Linear(1, 1)),
                         {"model": old}, "x.pt")


def test_predict_checks_every_poses_file_against_the_volume_before_writing(tiny_run, tmp_path, capsys):
    # the good file's frames were written before the off-volume one failed, and the error named no file
    from medfast.cli import main
    from medfast.tasks.synthesis.generate import load_generator

    _, _, checkpoint = tiny_run
    task, _ = load_generator(checkpoint)
    poses = task.poses([1, 2])
    far = poses.clone()
    far[:, 0, 3] += 1000.0  # rigid, finite, 1 m to the side
    folder = tmp_path / "poses"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps({"poses": poses.tolist()}))
    np.save(folder / "b.npy", far.numpy())
    capsys.readouterr()
    assert main(["predict", str(folder), "--model", str(checkpoint), "--out", str(tmp_path / "pred"),
                 "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert f"{folder / 'b.npy'}: pose: no scanline of the 2 pose(s) meets the volume" in err, err
    assert _written(tmp_path / "pred") == []
    np.save(folder / "b.npy", poses[:1].numpy())  # both good: both written
    assert main(["predict", str(folder), "--model", str(checkpoint), "--out", str(tmp_path / "pred"),
                 "--device", "cpu"]) == 0
    assert {d: json.loads((tmp_path / "pred" / d / "generate.json").read_text())["frames"] for d in "ab"} == {
        "a": 2, "b": 1}
