"""Registration task of the generic trainer: a short training on tiny synthetic 2D blobs lowers the loss,
``medfast train`` writes a checkpoint that ``medfast register --model`` uses, the weakly supervised
(label Dice) + velocity + GlobalNet path runs, and bad configurations give clear errors."""

import json

import numpy as np
import pytest
import torch
import yaml

from medfast import cli
from medfast.data import DatasetError
from medfast.data.synthetic import make_blobs
from medfast.tasks.registration import RegistrationNet, load_model
from medfast.train import Trainer, config_from_dict


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("regblobs")
    images, labels = make_blobs(folder, n=4, shape=(32, 32), classes=3, seed=1)
    return folder, images, labels


def _cfg(tmp_path, images, labels=(), out="run", steps=30, **task_args):
    return {
        "task": "registration",
        "data": {"train_images": list(images), "train_labels": list(labels), "shape": [32, 32],
                 "normalize": "none", "val_deformations": 2},
        "augment": {"rotation": 5.0, "scale": 0.05, "deform_magnitude": 1.5, "deform_grid": 4, "gamma": 0.0,
                    "intensity_scale": 0.0, "intensity_shift": 0.0, "noise_std": 0.0},
        "model": {"name": "localnet", "spatial_dims": 2, "in_channels": 1, "channels": [8, 16, 32]},
        "optim": {"lr": 0.003, "scheduler": "constant", "grad_clip": None},
        "trainer": {"out_dir": str(tmp_path / out), "max_steps": steps, "batch_size": 2, "val_every": steps,
                    "checkpoint_every": steps, "progress": False, "tensorboard": False, "plots": False,
                    "device": "cpu", "threads": 1},
        "task_args": {"kernel_size": 9, "bending_weight": 0.1, **task_args},
    }


def _rows(out_dir, name="train_log"):
    return [json.loads(line) for line in (out_dir / f"{name}.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss(tmp_path, blobs):
    # one subject, pairs mode: every pair is two random deformations of it (unsupervised; labels only scored)
    _, images, labels = blobs
    res = Trainer(config_from_dict(_cfg(tmp_path, images[:1], labels[:1], steps=150))).fit()
    rows = _rows(tmp_path / "run")
    first = np.mean([r["lncc"] for r in rows[:15]])
    last = np.mean([r["lncc"] for r in rows[-15:]])
    assert last < first - 0.1, (first, last)  # LNCC loss is -NCC: more negative is better aligned
    assert all("dice_loss" not in r for r in rows)
    val = res["validation"]  # 2 held-out deformations
    assert val["lncc_after"] < val["lncc_before"] - 0.1, val
    assert val["dice_after"] > val["dice_before"] + 0.03, val
    assert (tmp_path / "run" / "registration_model.pt").is_file()


def test_train_cli_then_register_with_the_checkpoint(tmp_path, blobs):
    _, images, labels = blobs
    cfg = _cfg(tmp_path, images, labels, steps=6)
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", str(path)]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    assert ckpt.is_file()
    net, shape = load_model(ckpt)
    assert isinstance(net, RegistrationNet) and shape == [32, 32]
    # both checkpoints record that 2D images were reoriented; one without the record predates that (storage order)
    from medfast.tasks.registration import load_model_info

    for model in (ckpt, tmp_path / "run" / "registration_model.pt"):
        assert load_model_info(model)[1].reorient_dims == (2, 3)
        state = torch.load(model, weights_only=False)
        del state["reorient_dims"]
        torch.save(state, tmp_path / "old.pt")
        assert load_model_info(tmp_path / "old.pt")[1].reorient_dims == (3,)
    for model in (ckpt, tmp_path / "run" / "registration_model.pt"):
        out = tmp_path / f"out_{model.stem}"
        rc = cli.main(["register", images[1], images[0], "--model", str(model), "--fixed-labels", labels[1],
                       "--moving-labels", labels[0], "--out", str(out), "--device", "cpu"])
        assert rc == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert {"dice_before", "dice_after", "lncc_before", "lncc_after"} <= set(metrics)
        assert (out / "warped.nii.gz").is_file() and (out / "ddf.nii.gz").is_file()


def test_weak_supervision_velocity_and_global_net(tmp_path, blobs):
    _, images, labels = blobs
    cfg = _cfg(tmp_path, images, labels, steps=4, dice_weight=1.0, velocity=True, integration_steps=4,
               global_net=True)
    cfg["trainer"]["plots"] = True
    res = Trainer(config_from_dict(cfg)).fit()
    rows = _rows(tmp_path / "run")
    assert all(np.isfinite(r["dice_loss"]) and 0 <= r["dice_loss"] <= 1 for r in rows)
    assert {"dice_before", "dice_after", "lncc_before", "lncc_after"} <= set(res["validation"])
    assert list((tmp_path / "run").glob("samples_step*.png"))
    net, _ = load_model(tmp_path / "run" / "checkpoints" / "last.pt")
    assert net.velocity and net.globalnet is not None
    theta, ddf = net(torch.zeros(1, 2, 32, 32))
    assert theta.shape == (1, 2, 3) and ddf.shape == (1, 2, 32, 32)


def test_val_fraction_split(tmp_path, blobs):
    _, images, labels = blobs
    cfg = _cfg(tmp_path, images, labels, steps=2)
    cfg["data"].update(val_fraction=0.25, val_deformations=0)
    trainer = Trainer(config_from_dict(cfg))
    res = trainer.fit()
    assert len(trainer.train_ds) == 3 * 2 and len(trainer.val_ds) == 1  # 3 subjects: 6 pairs; 1 held out
    assert res["validation"]["dice_before"] < 1  # the single validation subject against a deformation of itself


def test_atlas_pairing(tmp_path, blobs):
    _, images, labels = blobs
    cfg = _cfg(tmp_path, images[1:], labels[1:], steps=2, fixed_image=images[0], fixed_label=labels[0],
               dice_weight=0.5)
    res = Trainer(config_from_dict(cfg)).fit()
    assert "dice_after" in res["validation"]


@pytest.mark.parametrize("change, error, match", [
    ({"task_args": {"pairing": "atlas"}}, ValueError, "needs task_args.fixed_image"),
    ({"task_args": {"fixed_image": "/nonexistent/atlas.nii.gz"}}, DatasetError, "fixed image not found"),
    ({"task_args": {"fixed_label": "x.nii.gz"}}, ValueError, "fixed_image .the atlas. is missing"),
    ({"data": {"train_labels": ["a.nii.gz"]}}, DatasetError, "4 training images but 1 label maps"),
    ({"task_args": {"dice_weight": 1.0}, "data": {"train_labels": []}}, DatasetError, "weak supervision"),
    ({"data": {"shape": None}}, ValueError, "needs data.shape"),
    ({"task_args": {"bogus": 1}}, ValueError, "unknown task_args"),
    ({"model": {"name": "unet"}}, ValueError, "model.name = 'localnet'"),
    ({"task_args": {"identity_fraction": 1.5}}, ValueError, "identity_fraction must lie in"),
])
def test_bad_configs_give_clear_errors(tmp_path, blobs, change, error, match):
    _, images, labels = blobs
    cfg = _cfg(tmp_path, images, labels, steps=1)
    for section, values in change.items():
        cfg[section].update(values)
    with pytest.raises(error, match=match):
        Trainer(config_from_dict(cfg)).fit()


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_identity_fraction_leaves_seeded_moving_images_undeformed(tmp_path, blobs, fraction):
    from medfast.tasks.registration import RegistrationTask

    _, images, labels = blobs
    task = RegistrationTask(config_from_dict(_cfg(tmp_path, images[:1], labels[:1], augment_fixed=False,
                                                  identity_fraction=fraction)))
    train, _ = task.build_datasets()
    seeds = list(range(40, 48))
    items = [train[(0, s)] for s in seeds]
    batch = {"moving": torch.stack([i["moving"] for i in items]), "fixed": torch.stack([i["fixed"] for i in items]),
             "moving_label": torch.stack([i["moving_label"] for i in items]),
             "fixed_label": torch.stack([i["fixed_label"] for i in items]), "seed": seeds}
    moving, fixed, ml, fl = task._pair(batch, torch.device("cpu"), task.augment)
    same = [bool(torch.equal(moving[b], fixed[b]) and torch.equal(ml[b], fl[b])) for b in range(len(seeds))]
    if fraction == 0:
        assert not any(same)
    elif fraction == 1:
        assert all(same)
    else:
        assert 0 < sum(same) < len(seeds)
        again = task._pair(batch, torch.device("cpu"), task.augment)[0]
        assert torch.equal(again, moving)  # the draw is the sample's seed's
    # validation deformations are never identity pairs
    vmoving, vfixed, _, _ = task._pair(batch, torch.device("cpu"), task.val_augment)
    assert not any(torch.equal(vmoving[b], vfixed[b]) for b in range(len(seeds)))


def test_register_rejects_a_segmentation_checkpoint(tmp_path):
    path = tmp_path / "seg.pt"
    torch.save({"format": "medfast-checkpoint-1", "task": "segmentation", "model": {}, "config": {}}, path)
    with pytest.raises(Exception, match="segmentation"):
        load_model(path)


def test_resume_reproduces_the_losses(tmp_path, blobs):
    _, images, labels = blobs
    full = _cfg(tmp_path, images, labels, out="full", steps=6, dice_weight=0.5)
    Trainer(config_from_dict(full)).fit()
    part = _cfg(tmp_path, images, labels, out="part", steps=6, dice_weight=0.5)
    part["trainer"]["checkpoint_every"] = 3
    Trainer(config_from_dict(part)).fit(stop_after=3)
    part["trainer"]["resume"] = "auto"
    Trainer(config_from_dict(part)).fit()
    ref = [r["loss"] for r in _rows(tmp_path / "full")]
    got = [r["loss"] for r in _rows(tmp_path / "part")]
    assert len(got) == 6
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
