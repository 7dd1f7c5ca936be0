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
    # settings the task never reads are refused, naming each (they used to train byte-identical weights)
    ({"model": {"norm": "batch", "deep_supervision": True}}, ValueError,
     "does not use model.norm, model.deep_supervision: remove them"),
    ({"model": {"out_channels": 7, "convs_per_level": 3}}, ValueError,
     "does not use model.out_channels, model.convs_per_level"),
    ({"loss": {"lambda_dice": 9.0}}, ValueError, "does not use loss.lambda_dice: remove it .* task_args.lncc_weight"),
    ({"inference": {"roi_size": [8, 8]}}, ValueError, "does not use inference.roi_size"),
    ({"data": {"test_images": ["t.nii.gz"]}}, ValueError, "does not use data.test_images"),
    # the task maps intensities to [0, 1] itself, as --model does: another normalization would differ there
    ({"data": {"normalize": "minmax"}}, ValueError, "does not use data.normalize: remove it .* 0.5-99.5 percentiles"),
    ({"data": {"clip_percentiles": [1, 99]}}, ValueError, "does not use data.clip_percentiles"),
    # LocalNet doubles model.channels[0] per level: another list would silently train other widths
    ({"model": {"channels": [8, 16, 16]}}, ValueError, r"must be that doubling, e.g. \[8, 16, 32\]"),
    ({"model": {"channels": [8, 1000, 2000]}}, ValueError, "must be that doubling"),
    # pairing = pairs never reads an atlas: refused, even a missing file
    ({"task_args": {"pairing": "pairs", "fixed_image": "/nonexistent/a.nii.gz"}}, ValueError,
     "task_args.fixed_image .an atlas. would be ignored"),
    ({"task_args": {"pairing": "pairs", "fixed_label": "/nonexistent/l.nii.gz"}}, ValueError,
     "task_args.fixed_label .an atlas. would be ignored"),
    # too small for the depth: a ConfigError naming data.shape and model.channels, not a torch error at step 1
    ({"data": {"shape": [4, 4]}}, ValueError, r"data.shape = \[4, 4\] is too small for model.channels = \[8, 16, 32\]"),
])
def test_bad_configs_give_clear_errors(tmp_path, blobs, change, error, match):
    _, images, labels = blobs
    cfg = _cfg(tmp_path, images, labels, steps=1)
    for section, values in change.items():
        cfg.setdefault(section, {}).update(values)
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


def test_resume_refuses_a_checkpoint_trained_on_z_scored_inputs(tmp_path, blobs):
    # before 2026-11-29 the default data.normalize (zscore) was applied before the task's [0, 1] mapping: a resume
    # of such a run would change its inputs mid-run (its checkpoints have no preprocess_version)
    from medfast.train.trainer import CheckpointError

    _, images, labels = blobs
    cfg = _cfg(tmp_path, images, labels, out="z", steps=2)
    del cfg["data"]["normalize"]  # the default
    cfg["trainer"]["checkpoint_every"] = 1
    Trainer(config_from_dict(cfg)).fit(stop_after=1)
    last = tmp_path / "z" / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    assert state["preprocess_version"] == 2
    cfg["trainer"]["resume"] = str(last)
    old = dict(state)
    del old["preprocess_version"]
    torch.save(old, last)
    with pytest.raises(CheckpointError, match="trained with data.normalize=zscore applied before"):
        Trainer(config_from_dict(cfg)).fit()
    old["config"]["data"]["normalize"] = "none"  # an old run without the z-score: the same inputs, resumable
    torch.save(old, last)
    cfg["data"]["normalize"] = "none"
    assert Trainer(config_from_dict(cfg)).fit()["step"] == 2


def test_out_channels_equal_to_the_spatial_dims_is_accepted(tmp_path, blobs):
    from medfast.tasks.registration import RegistrationTask

    _, images, labels = blobs
    cfg = _cfg(tmp_path, images, labels)
    cfg["model"]["out_channels"] = 2  # the displacement's channels: states what the task does
    RegistrationTask(config_from_dict(cfg))


@pytest.mark.parametrize("shape, channels", [((4, 4), [4, 8, 16]), ((4, 8), [4, 8, 16]), ((2, 2), [4, 8]),
                                             ((3, 9), [4, 8, 16, 32]), ((8, 8), [4, 8, 16, 32]),
                                             ((8, 16), [4, 8, 16, 32])])
def test_min_shape_check_matches_the_network(tmp_path, blobs, shape, channels):
    # reference: whether a LocalNet (and GlobalNet) training step at data.shape fails in torch
    from medfast.tasks.registration import RegistrationTask

    _, images, labels = blobs
    cfg = _cfg(tmp_path, images, labels)
    cfg["data"]["shape"], cfg["model"]["channels"] = list(shape), channels
    net = RegistrationNet(2, 2, 2, len(channels) - 1, global_net=True).train()
    try:
        net(torch.rand(1, 2, *shape))[1].sum().backward()
        fails = False
    except ValueError as exc:
        assert "more than 1 spatial element" in str(exc)
        fails = True
    if fails:
        with pytest.raises(ValueError, match="is too small for model.channels"):
            RegistrationTask(config_from_dict(cfg))
    else:
        RegistrationTask(config_from_dict(cfg))


def test_global_net_composes_the_affine_and_the_local_displacement():
    # the LocalNet's u acts on the affinely warped moving image: the total warp must be the two-stage warp
    import math

    import medfast as mf
    from medfast.nets.registration import affine_ddf

    torch.manual_seed(0)
    shape = (16, 18, 14)
    net = RegistrationNet(3, 2, 2, 1, global_net=True).eval()
    a = math.radians(30)
    rot = torch.tensor([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1.0]])
    with torch.no_grad():
        net.globalnet.head.bias.copy_(torch.cat([rot, torch.tensor([[0.1], [-0.05], [0.0]])], 1).reshape(-1))
        for head in net.local.heads.values():  # u = (3, -1, 0.5) voxels, plus a smooth spatial part
            head.bias.copy_(torch.tensor([3.0, -1.0, 0.5]))
            head.weight.normal_(0, 0.05)
    g = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    moving = torch.exp(-((g - torch.tensor([7.0, 9, 6]).view(3, 1, 1, 1)) ** 2).sum(0) / 30)[None, None]
    fixed = torch.exp(-((g - torch.tensor([8.0, 8, 7]).view(3, 1, 1, 1)) ** 2).sum(0) / 10)[None, None]
    with torch.no_grad():
        theta, ddf = net(torch.cat([moving, fixed], 1))
        affine_moving = mf.affine_warp(moving, theta)
        u = net.local(torch.cat([affine_moving, fixed], 1))
        # reference 1: theta [x + u(x); 1] - x, by plain matrix algebra
        ref = affine_ddf(theta.double(), shape) + torch.einsum("ij,bj...->bi...", theta[0, :, :3].double(),
                                                               u.double())
        torch.testing.assert_close(ddf.double(), ref, atol=1e-4, rtol=0)
        assert float((u - u.mean()).abs().max()) > 0.1  # a spatially varying u, not only a shift
        # reference 2: the two-stage warp (affine, then u on the affinely warped image), in the interior
        two_stage = mf.warp(affine_moving, u)
        total = mf.warp(moving, ddf)
    inner = (..., slice(4, -4), slice(4, -4), slice(4, -4))
    # (linear interpolation twice vs once: 0.014; adding u unrotated, as before the fix: 0.25)
    assert float((total - two_stage)[inner].abs().max()) < 0.03, float((total - two_stage)[inner].abs().max())


def _nifti(path, data, affine):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))
    return str(path)


@pytest.mark.parametrize("spacing, normalize", [(None, "none"), ([2.5, 1.75, 2.2], "none"), (None, None)])
def test_model_gets_its_training_input(tmp_path, spacing, normalize):
    # without data.spacing each image keeps its voxel size and is cropped / padded to data.shape: --model must feed
    # the fixed image the same way (it used to spread its field of view over data.shape, another scale). With
    # data.spacing the image is resampled (9 x 14 x 12 voxels here), then padded 1|2, cropped 1|1, kept: --model
    # must use the same whole-voxel offsets (it centred the grid to a fraction of a voxel) and the same
    # border / zero padding (the z-score of every voxel depends on them)
    import nibabel as nib

    from medfast.tasks.registration import (
        ModelInfo,
        RegistrationTask,
        load_model_info,
        network_grid,
        register_with_model,
    )

    rng = np.random.default_rng(0)
    affine = np.diag([-2.0, 1.5, 3.0, 1.0])  # x flipped (reoriented in training), anisotropic voxels
    affine[:3, 3] = [30.0, -10.0, 5.0]
    g = np.stack(np.meshgrid(*[np.arange(s) for s in (11, 16, 9)], indexing="ij"), -1).astype(float)
    images = []
    for i, c in enumerate([(5, 8, 4), (6, 7, 5)]):
        blob = np.exp(-(((g - c) / [3, 4, 2]) ** 2).sum(-1)) * 100 + rng.normal(0, 1, g.shape[:3])
        if normalize is None:  # a masked image: zero background (the default z-score's non-zero mode took it)
            blob = np.where(blob > 20, blob, 0.0)
        images.append(_nifti(tmp_path / f"s{i}.nii.gz", blob, affine))
    # normalize None: data.normalize left at its default (zscore), which training applied before the task's own
    # mapping to [0, 1] and --model did not (a masked image's background: 0.5 in training, 0 at inference)
    cfg = {"task": "registration",
           "data": {"train_images": images, "shape": [12, 12, 12],  # pad 1, crop 4, pad 3
                    **({} if normalize is None else {"normalize": normalize}),
                    **({} if spacing is None else {"spacing": spacing})},
           "augment": {"rotation": 3.0},
           "model": {"name": "localnet", "spatial_dims": 3, "in_channels": 1, "channels": [2, 4]},
           "trainer": {"out_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 1, "val_every": 0,
                       "checkpoint_every": 1, "progress": False, "tensorboard": False, "plots": False,
                       "device": "cpu", "threads": 1}}
    Trainer(config_from_dict(cfg)).fit()
    item = RegistrationTask(config_from_dict(cfg)).build_datasets()[0][0]  # moving s0, fixed s1, as trained on
    expected = torch.cat([item["moving"], item["fixed"]])[None]
    subject = RegistrationTask(config_from_dict(cfg))._subjects(images, [])[0]  # its crop/pad grid (reference)

    class Recorder(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.seen = net, None

        def forward(self, x):
            self.seen = x
            return self.net(x)

    for model in (tmp_path / "run" / "registration_model.pt", tmp_path / "run" / "checkpoints" / "last.pt"):
        net, info = load_model_info(model)
        assert info.native_spacing == (spacing is None) and info.spacing == spacing
        fixed, moving = (nib.load(p) for p in images[::-1])
        rec = Recorder(net)
        res = register_with_model(fixed.get_fdata(), moving.get_fdata(), rec, info, fixed_affine=fixed.affine)
        torch.testing.assert_close(rec.seen, expected, atol=1e-5, rtol=0)
        np.testing.assert_allclose(res.metrics["network_grid"], subject["affine"].numpy(), atol=1e-9)
    if spacing is not None:
        return
    # a registration_model.pt without the record (written before it existed) keeps the old reading
    state = torch.load(tmp_path / "run" / "registration_model.pt", weights_only=True)
    del state["native_spacing"]
    torch.save(state, tmp_path / "old.pt")
    info = load_model_info(tmp_path / "old.pt")[1]
    assert not info.native_spacing
    old = network_grid(affine, (11, 16, 9), info)
    np.testing.assert_allclose(np.abs(np.diag(old)[:3]), np.array([22, 24, 27]) / 12)  # field of view / shape
    assert not network_grid(affine, (11, 16, 9), ModelInfo([12, 12, 12])).tolist() == subject["affine"].tolist()


def test_register_with_model_refuses_optimization_flags_and_other_dims(tmp_path, blobs, capsys):
    from medfast.nets import LocalNet
    from medfast.tasks.registration import register_with_model, save_model

    _, images, _ = blobs
    kw = dict(spatial_dims=2, num_channel_initial=2, depth=1, extract_levels=(0, 1))
    save_model(tmp_path / "net2d.pt", LocalNet(**kw), kw, (32, 32))
    kw3 = dict(kw, spatial_dims=3)
    save_model(tmp_path / "net3d.pt", LocalNet(**kw3), kw3, (16, 16, 16))
    out = tmp_path / "out"
    # the instance-optimization options do not apply to a trained network: refused, naming each
    rc = cli.main(["register", images[1], images[0], "--model", str(tmp_path / "net2d.pt"), "--velocity",
                   "--kernel-size", "9", "--deform-iters", "3", "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and "--deform-iters, --kernel-size, --velocity would be ignored" in err, err
    assert not out.exists()
    # a 3D model given 2D images: said so before any output folder is made
    rc = cli.main(["register", images[1], images[0], "--model", str(tmp_path / "net3d.pt"), "--out", str(out),
                   "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and "takes 3D images, FIXED" in err and "is 2D" in err, err
    assert not out.exists()
    with pytest.raises(ValueError, match=r"the model takes 3D images .* fixed has shape \(32, 32\)"):
        register_with_model(np.zeros((32, 32)), np.zeros((32, 32)), LocalNet(**kw3), [16, 16, 16])
    with pytest.raises(ValueError, match=r"the model takes 2D images .* fixed has shape \(1, 1, 8, 8, 8\)"):
        register_with_model(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 8), LocalNet(**kw), [32, 32])
    # the default values are fine, and metrics.json names the model
    rc = cli.main(["register", images[1], images[0], "--model", str(tmp_path / "net2d.pt"), "--kernel-size", "7",
                   "--out", str(out), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["model"] == str(tmp_path / "net2d.pt")


@pytest.mark.parametrize("global_net", [False, True])
def test_registration_net_in_float64_returns_float64(global_net):
    # after .double() the theta / ddf came back float32 (the transform was always computed in float32), so
    # medfast.warp of a float64 image refused the ddf and float64 gradchecks were impossible
    import medfast as mf
    from medfast.tasks.registration import RegistrationNet

    torch.manual_seed(0)
    net = RegistrationNet(spatial_dims=3, in_channels=2, num_channel_initial=4, depth=2, global_net=global_net)
    with torch.no_grad():
        for p in net.parameters():  # away from the identity initialisation: a displacement to compare
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.rand(1, 2, 16, 16, 16)
    theta, ddf = net(x)
    theta64, ddf64 = net.double()(x.double())
    assert theta.dtype == ddf.dtype == torch.float32 and theta64.dtype == ddf64.dtype == torch.float64
    assert float(ddf.detach().abs().max()) > 0.01
    torch.testing.assert_close(ddf64.float(), ddf, atol=1e-4, rtol=1e-4)
    assert mf.warp(x[:, :1].double(), ddf64).dtype == torch.float64


def test_a_lone_subject_without_an_atlas_needs_a_geometric_augmentation(tmp_path, blobs):
    # a lone subject without an atlas is paired with a random deformation of itself: with augmentation off its
    # pairs were two identical images (the network trained / scored on the identity), silently
    from medfast.tasks.registration import RegistrationTask
    from medfast.train.config import ConfigError

    _, images, labels = blobs
    cfg = _cfg(tmp_path, images[:1], labels[:1])
    cfg["data"]["val_deformations"] = 0
    cfg["augment"]["enabled"] = False
    with pytest.raises(ConfigError, match="one training subject .* no atlas .*augment.enabled is false"):
        RegistrationTask(config_from_dict(cfg)).build_datasets()
    cfg = _cfg(tmp_path, images[1:], labels[1:])  # several training subjects: distinct pairs
    cfg["data"].update(val_deformations=0, val_images=[images[0]], val_labels=[labels[0]])
    cfg["augment"]["enabled"] = False
    with pytest.raises(ConfigError, match="one validation subject"):
        RegistrationTask(config_from_dict(cfg)).build_datasets()
    cfg["augment"]["enabled"] = True
    RegistrationTask(config_from_dict(cfg)).build_datasets()


def test_integration_steps_without_a_velocity_field_is_refused(tmp_path, blobs):
    """integration_steps 0, 7 and 64 trained bit-identical weights without task_args.velocity: a silent no-op."""
    from medfast.tasks.registration import RegistrationTask
    from medfast.train.config import ConfigError

    _, images, labels = blobs
    with pytest.raises(ConfigError, match="task_args.integration_steps integrates a velocity field"):
        RegistrationTask(config_from_dict(_cfg(tmp_path, images, labels, integration_steps=4)))
    RegistrationTask(config_from_dict(_cfg(tmp_path, images, labels, integration_steps=4, velocity=True)))
    RegistrationTask(config_from_dict(_cfg(tmp_path, images, labels)))  # the default is not a setting given


@pytest.mark.parametrize("value", ["0", "0.05", "-2", "nan", "inf", "25"])
def test_register_demo_resolution_is_checked_first(tmp_path, capsys, value):
    """0 / inf overflowed in a traceback, 0.05 asked for 555 GB, NaN and -2 failed naming other things."""
    out = tmp_path / "demo"
    assert cli.main(["register", "--demo", "--resolution", value, "--out", str(out), "--device", "cpu"]) != 0
    err = capsys.readouterr().err
    assert "--resolution must be a voxel size in mm between 0.5 and 20" in err and "Traceback" not in err
    assert not out.exists()


def test_val_deformations_gives_that_many_held_out_deformations():
    """data.val_deformations: N took the first N training pairs: one subject (the CPU demo) validated on 1
    deformation, not the 3 its config asks for. Now N items cycling over the pairs, each with its own seed."""
    from medfast.tasks.registration import PairDataset

    subject = {"image": torch.rand(1, 8, 8), "files": "s.nii.gz"}
    one = [subject]
    val = PairDataset(one, limit=3, seed_offset=10**12)
    assert len(val) == 3 and [val[k]["seed"] for k in range(3)] == [10**12, 10**12 + 1, 10**12 + 2]
    two = PairDataset([subject, {**subject, "files": "t.nii.gz"}], limit=5, seed_offset=7)
    assert len(two) == 5 and [two[k]["files"] for k in range(3)] == ["s.nii.gz -> t.nii.gz", "t.nii.gz -> s.nii.gz",
                                                                     "s.nii.gz -> t.nii.gz"]
    assert len(PairDataset([subject] * 4, limit=5)) == 5 and len(PairDataset([subject] * 3, limit=2)) == 2
