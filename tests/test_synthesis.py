"""Synthesis: PatchGAN / generator shapes, PSNR and SSIM against scikit-image, the patch sliced-Wasserstein
distance, simulated training pairs, a short GAN training that lowers the L1 loss, exact resume with two
optimizers, generation from a checkpoint, and clear configuration errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medfast.nets import ConditionalGAN, PatchDiscriminator, UNetGenerator
from medfast.tasks.synthesis import (
    SynthesisTask,
    generate,
    load_source,
    psnr,
    random_pose,
    save_grid,
    sliced_wasserstein,
    ssim,
    sweep_pose,
)
from medfast.tasks.synthesis.generate import read_poses
from medfast.train import ConfigError, Trainer, load_checkpoint, load_config

# ----------------------------------------------------------------------------------------------------------
# networks
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_layers,size,out", [(1, 32, 14), (2, 32, 6), (3, 64, 6), (3, 72, 7)])
def test_patch_discriminator_output_shape(n_layers, size, out):
    d = PatchDiscriminator(4, channels=8, n_layers=n_layers)
    y = d(torch.randn(2, 4, size, size + 8))
    assert y.shape[:2] == (2, 1) and y.shape[2] == out


def test_patch_discriminator_receptive_field_is_the_pix2pix_patch():
    # n_layers=3: each logit sees 70 x 70 input pixels (pix2pix); checked by the support of a gradient
    d = PatchDiscriminator(1, channels=4, n_layers=3, norm="none")
    x = torch.randn(1, 1, 128, 128, requires_grad=True)
    y = d(x)
    y[0, 0, y.shape[2] // 2, y.shape[3] // 2].backward()
    rows = torch.nonzero(x.grad[0, 0].abs().sum(1)).flatten()
    assert int(rows.max() - rows.min() + 1) == 70


def test_patch_discriminator_3d_and_bad_inputs():
    d = PatchDiscriminator(2, channels=4, n_layers=2, spatial_dims=3)
    assert d(torch.randn(1, 2, 24, 24, 24)).shape == (1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="x must be"):
        d(torch.randn(1, 3, 24, 24, 24))
    with pytest.raises(ValueError, match="at least 12 pixels"):
        d(torch.randn(1, 2, 8, 24, 24))
    with pytest.raises(ValueError, match="n_layers"):
        PatchDiscriminator(2, n_layers=0)
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(2, norm="layer")


def test_generator_range_noise_and_gan_phases():
    g = UNetGenerator(3, 1, channels=(4, 8), noise_channels=2)
    cond = torch.randn(2, 3, 20, 28)
    noise = torch.randn(2, 2, 20, 28)
    y = g(cond, noise).detach()
    assert y.shape == (2, 1, 20, 28) and float(y.min()) >= 0 and float(y.max()) <= 1
    torch.testing.assert_close(g(cond, noise), y)
    assert not torch.equal(g(cond, noise + 1), y)  # the noise is an input
    with pytest.raises(ValueError, match="noise must have shape"):
        g(cond, torch.randn(2, 1, 20, 28))
    with pytest.raises(ValueError, match="cond must be"):
        g(torch.randn(2, 2, 20, 28))
    gan = ConditionalGAN(g, PatchDiscriminator(4, channels=4, n_layers=1))
    real = torch.rand(2, 1, 20, 28)
    d_real, d_fake = gan(cond, real, noise, mode="discriminator")
    (d_real.mean() - d_fake.mean()).backward()
    assert all(p.grad is None for p in gan.generator.parameters())  # the D phase leaves G alone
    assert all(p.grad is not None for p in gan.discriminator.parameters())
    gan.zero_grad(set_to_none=True)
    fake, logits = gan(cond, None, noise, mode="generator")
    logits.mean().backward()
    assert all(p.grad is not None for p in gan.generator.parameters())
    with pytest.raises(ValueError, match="mode must be"):
        gan(cond, mode="train")


# ----------------------------------------------------------------------------------------------------------
# metrics (scikit-image is the independent reference; requirements-dev.txt installs it)
# ----------------------------------------------------------------------------------------------------------


def _images(seed=0, n=3, shape=(48, 56)):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, shape[0]), torch.linspace(0, 1, shape[1]), indexing="ij")
    base = 0.5 + 0.3 * torch.sin(8 * xx) * torch.cos(5 * yy)
    x = (base + 0.1 * torch.rand(n, 1, *shape, generator=g)).clamp(0, 1)
    y = (x + 0.08 * torch.randn(n, 1, *shape, generator=g)).clamp(0, 1)
    return x.double(), y.double()


def test_psnr_and_ssim_match_scikit_image():
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image (requirements-dev.txt) is the reference")
    x, y = _images()
    got_p, got_s = psnr(x, y), ssim(x, y)
    for i in range(x.shape[0]):
        a, b = x[i, 0].numpy(), y[i, 0].numpy()
        ref_p = metrics.peak_signal_noise_ratio(a, b, data_range=1.0)
        ref_s = metrics.structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False)
        assert abs(float(got_p[i]) - ref_p) < 1e-9
        assert abs(float(got_s[i]) - ref_s) < 1e-9
    # another data range, float32 input, two channels (mean over channels as scikit-image's channel_axis)
    x2, y2 = (x[:2] * 255).float(), (y[:2] * 255).float()
    xc = torch.cat([x2, y2.flip(-1)], 1)
    yc = torch.cat([y2, x2], 1)
    ref = metrics.structural_similarity(xc[0].double().numpy(), yc[0].double().numpy(), data_range=255.0,
                                        gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                        channel_axis=0)
    assert abs(float(ssim(xc, yc, data_range=255.0)[0]) - ref) < 1e-6
    assert float(ssim(x, x).min()) == pytest.approx(1.0) and torch.isinf(psnr(x, x)).all()


def test_metric_inputs_are_checked():
    x, y = _images()
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, y[:, :, :40])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ssim(x[0], y[0])
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, y, data_range=0)
    with pytest.raises(ValueError, match="smaller than the 11x11"):
        ssim(x[..., :8, :8], y[..., :8, :8])
    with pytest.raises(TypeError, match="floating point"):
        psnr(x.long(), y.long())


def test_sliced_wasserstein_zero_for_identical_sets_and_grows_with_shifts():
    x, _ = _images(n=6)
    assert float(sliced_wasserstein(x, x.clone())) == 0.0
    small = float(sliced_wasserstein(x, (x + 0.05).clamp(0, 1)))
    large = float(sliced_wasserstein(x, (x + 0.2).clamp(0, 1)))
    assert 0 < small < large
    # a change of texture with the same mean: blur
    blurred = torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
    assert float(sliced_wasserstein(x, blurred)) > small
    # sets of other sizes and counts compare too; other random draws of the same distribution stay close
    x_other, _ = _images(seed=5, n=4, shape=(40, 64))
    same_dist = float(sliced_wasserstein(x, x_other))
    assert same_dist < large
    with pytest.raises(ValueError, match="same channels"):
        sliced_wasserstein(x, x.expand(-1, 2, -1, -1))
    with pytest.raises(ValueError, match="patch_size"):
        sliced_wasserstein(x, x[..., :5, :5])



@pytest.mark.parametrize("size", [16, 20, 24, 32])
def test_sliced_wasserstein_sees_brightness_on_small_frames(size):
    """The pyramid ends with its low-pass residual (levels are dropped, not the residual, where the frames
    are too small for them): a brightness offset, invisible to the band-pass levels, always counts."""
    x = torch.rand(4, 1, size, size, generator=torch.Generator().manual_seed(size), dtype=torch.float64)
    assert float(sliced_wasserstein(x, x + 0.3)) > 0.1
    assert float(sliced_wasserstein(torch.zeros(2, 1, size, size), torch.ones(2, 1, size, size))) > 0.1
    # different frame sizes in the two sets: the same number of levels for both
    assert float(sliced_wasserstein(x, torch.nn.functional.interpolate(x, scale_factor=2) + 0.3)) > 0.1
    assert float(sliced_wasserstein(x, x.clone())) == 0.0


def test_synthesis_metric_arguments():
    x = torch.rand(1, 1, 16, 16)
    for f in (psnr, ssim):
        with pytest.raises(ValueError, match="data_range must be a positive, finite number"):
            f(x, x, data_range=float("inf"))
    for seed in (1.5, True, "1"):
        with pytest.raises(ValueError, match="seed must be an int"):
            sliced_wasserstein(x, x, seed=seed)
    assert float(sliced_wasserstein(x, x, seed=np.int64(3))) == 0.0

def test_save_grid_writes_a_png(tmp_path):
    x, y = _images()
    path = save_grid(tmp_path / "g.png", [("a", x), ("b", y)], title="t", ranges=[None, (0, 1)])
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="row 'a'"):
        save_grid(tmp_path / "h.png", [("a", x[0])])


# ----------------------------------------------------------------------------------------------------------
# data and the task, on a phantom CT the test writes
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """A 56^3 1 mm CT phantom (HU): soft tissue with a bone ball and a fluid ball."""
    import nibabel as nib

    n = 56
    i, j, k = np.meshgrid(*[np.arange(n)] * 3, indexing="ij")  # identity affine: world (x, y, z) = (i, j, k)
    ct = np.full((n, n, n), 40.0, np.float32)
    ct[(i - 20) ** 2 + (j - 24) ** 2 + (k - 28) ** 2 < 64] = 1000.0  # in the plane z = 28 of the probe
    ct[(i - 36) ** 2 + (j - 30) ** 2 + (k - 28) ** 2 < 49] = 0.0
    path = tmp_path_factory.mktemp("phantom") / "phantom_ct.nii.gz"
    nib.save(nib.Nifti1Image(ct, np.eye(4)), str(path))
    return path


def _config(tmp_path, phantom, out="run", **extra):
    overrides = [
        "task=synthesis", f"trainer.out_dir={tmp_path / out}", "trainer.batch_size=4", "trainer.max_steps=6",
        "trainer.val_every=0", "trainer.checkpoint_every=3", "trainer.progress=false", "trainer.tensorboard=false",
        "trainer.plots=false", "trainer.threads=1", "trainer.device=cpu", "model.spatial_dims=2",
        "model.channels=[8, 16]", "optim.lr=0.002", "optim.betas=[0.5, 0.999]", "optim.scheduler=constant",
        f"task_args.source={phantom}", "task_args.probe=L11-5v", "task_args.n_lines=32", "task_args.n_samples=128",
        "task_args.depth_mm=32", "task_args.image_rows=32", "task_args.disc_channels=8", "task_args.disc_layers=2",
        "task_args.position=[28, -1, 28]", "task_args.shift_mm=[6, 4, 4]", "task_args.val_sets=1",
        "task_args.val_frames=4", "task_args.swd_patches=256", "task_args.samples_per_epoch=16",
    ]
    # a setting the run would ignore is refused: the image-mode pose range in pose mode, the discriminator's without
    # the adversarial loss
    if extra.get("task_args.mode") == "pose":
        overrides.remove("task_args.shift_mm=[6, 4, 4]")
    if extra.get("task_args.lambda_adv") == 0:
        overrides = [o for o in overrides if not o.startswith("task_args.disc_")]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config([], overrides)


def test_source_frames_geometry(tmp_path, phantom):
    task = SynthesisTask(_config(tmp_path, phantom))
    src = task.source
    poses = task.poses([1, 2, 3])
    fr = src.frames(poses)
    H, W = src.height, src.width
    assert fr.anatomy.shape == (3, 2, H, W) and fr.bmode.shape == (3, 1, H, W) and fr.coords.shape == (3, 3, H, W)
    assert H == 32 and float(fr.bmode.max()) > 0.3 and float(fr.bmode.min()) >= 0
    # the coordinates are the image-plane points: pixel (row i, col j) is at x0 + j px, z0 + i px in the probe frame
    x0, _, z0, _ = src.probe.image_extent_mm()
    pose = poses[0]
    want = pose[:3, :3] @ torch.tensor([x0 + 5 * src.pixel_mm, 0.0, z0 + 7 * src.pixel_mm], dtype=torch.float64)
    want = (want + pose[:3, 3] - src.centre) / src.coord_scale_mm
    torch.testing.assert_close(fr.coords[0, :, 7, 5].double(), want, atol=1e-5, rtol=0)
    # the bone ball (1000 HU) lies in the anatomy of the reference pose
    ref = src.frames(src.reference_pose[None])
    assert float(ref.anatomy[:, 0].max()) == pytest.approx(1.0, abs=0.05)
    # poses are reproducible from seeds and vary between seeds
    torch.testing.assert_close(task.poses([1]), task.poses([1]))
    assert not torch.equal(task.poses([1]), task.poses([2]))
    sweep = sweep_pose(src.reference_pose, 4, travel_mm=(0, 0, 20), frames=9)
    assert sweep.shape == (9, 4, 4) and 15 < float((sweep[-1, :3, 3] - sweep[0, :3, 3]).norm()) < 25
    r = random_pose(src.reference_pose, 3, shift_mm=(0, 0, 0), tilt_deg=0, twist_deg=0)
    torch.testing.assert_close(r, src.reference_pose)


def _val_l1(task, model):
    return task.evaluate(model, 10**12, torch.device("cpu"))[0]["l1"]


def test_short_training_lowers_the_l1_loss(tmp_path, phantom):
    cfg = _config(tmp_path, phantom, "short", **{"trainer.max_steps": 25, "optim.lr": 0.004})
    trainer = Trainer(cfg)
    task = trainer.task
    torch.manual_seed(0)
    before = _val_l1(task, task.build_model().eval())  # an untrained generator (same init as the trainer's)
    results = trainer.fit()
    after = _val_l1(task, trainer.model.eval())
    rows = [json.loads(line) for line in (tmp_path / "short" / "train_log.jsonl").read_text().splitlines()]
    assert {"loss_discriminator", "loss_generator", "l1", "g_adv", "d_real", "d_fake"} <= set(rows[0])
    first = np.mean([r["l1"] for r in rows[:3]])
    last = np.mean([r["l1"] for r in rows[-3:]])
    assert last < 0.7 * first, (first, last)
    assert after < 0.7 * before, (before, after)
    assert results["synthesis"]["final"]["l1"] == pytest.approx(after, rel=1e-5)
    assert (tmp_path / "short" / "synthesis_metrics.json").is_file()


POSE = {"task_args.mode": "pose", "model.norm": "batch", "task_args.noise_channels": 1,
        "task_args.coord_frequencies": 2}


def test_resume_continues_identically_with_both_optimizers(tmp_path, phantom):
    Trainer(_config(tmp_path, phantom, "full", **POSE)).fit()
    Trainer(_config(tmp_path, phantom, "part", **POSE)).fit(stop_after=3)
    ck = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert ck["step"] == 3 and set(ck["optimizers"]) == {"discriminator", "generator"}
    assert set(ck["schedulers"]) == {"discriminator", "generator"} and "optimizer" not in ck
    Trainer(_config(tmp_path, phantom, "part", **POSE, **{"trainer.resume": "auto"})).fit()

    def losses(name):
        rows = (tmp_path / name / "train_log.jsonl").read_text().splitlines()
        return [(r["step"], r["loss_discriminator"], r["loss_generator"]) for r in map(json.loads, rows)]

    assert losses("part") == losses("full")  # bitwise
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
    for ph in ("discriminator", "generator"):
        sa, sb = a["optimizers"][ph]["state"], b["optimizers"][ph]["state"]
        for i in sa:
            torch.testing.assert_close(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"], rtol=0, atol=0)
    # a checkpoint with one optimizer cannot resume a GAN (and says why)
    one = dict(b)
    one.pop("optimizers")
    one["optimizer"] = b["optimizers"]["generator"]
    bad = tmp_path / "one.pt"
    torch.save(one, bad)
    with pytest.raises(ValueError, match="needs optimizers"):
        Trainer(_config(tmp_path, phantom, "part2", **POSE, **{"trainer.resume": str(bad)})).fit()

    # generation from the checkpoint: files and metrics
    out = tmp_path / "gen"
    s = generate(tmp_path / "full" / "checkpoints" / "last.pt", out, frames=3, device="cpu")
    assert s["frames"] == 3 and s["mode"] == "pose" and np.isfinite(s["psnr"])
    for name in ("generated/frame_002.png", "simulated/frame_000.png", "generated.nii.gz", "grid.png",
                 "generate.json"):
        assert (out / name).is_file(), name
    poses_file = tmp_path / "poses.json"
    poses_file.write_text(json.dumps({"poses": s["poses"][:2]}))
    assert generate(tmp_path / "full" / "checkpoints" / "last.pt", tmp_path / "gen2", poses=read_poses(poses_file),
                    device="cpu")["frames"] == 2
    from medfast.cli import main

    assert main(["synthesize", str(tmp_path / "full" / "checkpoints" / "last.pt"), "--out", str(tmp_path / "gen3"),
                 "--frames", "2", "--device", "cpu"]) == 0
    assert (tmp_path / "gen3" / "grid.png").is_file()
    assert main(["predict", str(poses_file), "--model", str(tmp_path / "full" / "checkpoints" / "last.pt"),
                 "--out", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "pred" / "generate.json").read_text())["frames"] == 2
    # a rerun into the same folder with fewer frames leaves none of the earlier run's frames
    generate(tmp_path / "full" / "checkpoints" / "last.pt", out, poses=read_poses(poses_file), device="cpu")
    assert sorted(p.name for p in (out / "generated").iterdir()) == ["frame_000.png", "frame_001.png"]
    assert sorted(p.name for p in (out / "simulated").iterdir()) == ["frame_000.png", "frame_001.png"]
    # two inputs of one name would share a folder: refused before anything is written
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "sweep.json").write_text(poses_file.read_text())
    assert main(["predict", str(tmp_path / "a" / "sweep.json"), str(tmp_path / "b" / "sweep.json"), "--model",
                 str(tmp_path / "full" / "checkpoints" / "last.pt"), "--out", str(tmp_path / "pred2"),
                 "--device", "cpu"]) != 0
    assert not (tmp_path / "pred2").exists() or not any((tmp_path / "pred2").rglob("*.png"))


def test_l1_only_training_uses_one_optimizer(tmp_path, phantom):
    Trainer(_config(tmp_path, phantom, "l1", **{"task_args.lambda_adv": 0, "trainer.max_steps": 2})).fit()
    ck = load_checkpoint(tmp_path / "l1" / "checkpoints" / "last.pt")
    assert set(ck["optimizers"]) == {"generator"}


def test_config_errors_are_clear(tmp_path, phantom):
    with pytest.raises(ConfigError, match="unknown config key 'task_args.modes'"):
        SynthesisTask(_config(tmp_path, phantom, **{"task_args.modes": "pose"}))
    with pytest.raises(ConfigError, match="task_args.mode must be 'image' or 'pose'"):
        SynthesisTask(_config(tmp_path, phantom, **{"task_args.mode": "video"}))
    for key, value in (("model.kwargs", "{noise_channels: 4}"), ("data.dataset_args", "{anything: 1}"),
                       ("data.shape", "[64, 64]"), ("model.out_channels", 7)):  # silently ignored before
        with pytest.raises(ConfigError, match=f"does not use {key}"):
            SynthesisTask(_config(tmp_path, phantom, **{key: value}))
    with pytest.raises(ConfigError, match="task_args.lambda_l1 must be a number"):
        SynthesisTask(_config(tmp_path, phantom, **{"task_args.lambda_l1": "lots"}))
    with pytest.raises(ConfigError, match="task_args.position must have 3 values"):
        SynthesisTask(_config(tmp_path, phantom, **{"task_args.position": "[1, 2]"}))
    with pytest.raises(ConfigError, match="val_frames"):
        SynthesisTask(_config(tmp_path, phantom, **{"task_args.mode": "pose", "task_args.val_frames": 64}))
    with pytest.raises(ConfigError, match="instance norm removes"):
        SynthesisTask(_config(tmp_path, phantom, **{"task_args.mode": "pose"})).build_model()
    with pytest.raises(ConfigError, match="model.spatial_dims must be 2"):
        SynthesisTask(_config(tmp_path, phantom, **{"model.spatial_dims": 3})).build_model()
    with pytest.raises(ConfigError, match="task_args.probe"):
        _ = SynthesisTask(_config(tmp_path, phantom, **{"task_args.probe": "X9"})).source
    with pytest.raises(FileNotFoundError, match="neither a built-in"):
        _ = SynthesisTask(_config(tmp_path, phantom, **{"task_args.source": str(tmp_path / "nope.nii.gz")})).source
    with pytest.raises(ValueError, match=r"poses\.json: the JSON list must be \(4, 4\) or \(B, 4, 4\)"):
        bad = tmp_path / "poses.json"
        bad.write_text("[[1, 2], [3, 4]]")
        read_poses(bad)
    with pytest.raises(ValueError, match="not 'synthesis'"):
        ck = tmp_path / "seg.pt"
        torch.save({"model": {}, "task": "segmentation", "config": {}}, ck)
        generate(ck, tmp_path / "x")


@pytest.mark.parametrize("key,value,hint", [
    ("loss.lambda_dice", 5, "lambda_l1"), ("loss.include_background", "false", "lambda_l1"),
    ("augment.flip", "[0, 1]", "not augmented"), ("augment.rotation", 45, "not augmented"),
    ("inference.overlap", 0.9, "whole frames"),
])
def test_unread_loss_augment_inference_settings_are_refused(tmp_path, phantom, key, value, hint):
    with pytest.raises(ConfigError, match=f"does not use {key}: remove it .*{hint}"):
        SynthesisTask(_config(tmp_path, phantom, **{key: value}))


def test_default_sections_and_augment_disabled_are_accepted(tmp_path, phantom):
    SynthesisTask(load_config([], ["task=synthesis", "model.spatial_dims=2"]))  # the defaults trigger nothing
    SynthesisTask(_config(tmp_path, phantom, **{"augment.enabled": "false"}))  # states what the task does
    with pytest.raises(ConfigError, match="does not use loss.lambda_ce, augment.rotation: remove them"):
        SynthesisTask(_config(tmp_path, phantom, **{"loss.lambda_ce": 2, "augment.rotation": 5}))


@pytest.mark.parametrize("key,value", [
    ("lambda_l1", ".nan"), ("lambda_adv", ".inf"), ("tilt_deg", ".nan"), ("twist_deg", "-.inf"),
    ("start_jitter_mm", ".nan"), ("depth_mm", ".nan"), ("shift_mm", "[.nan, 1, 1]"),
    ("position", "[28, .inf, 28]"), ("direction", "[0, 0, .nan]"), ("lateral", "[.nan, 0, 0]"),
    ("travel_mm", "[0, 0, .inf]"),
])
def test_non_finite_task_args_are_refused_naming_the_key(tmp_path, phantom, key, value):
    # NaN passes `< 0` checks; before, these failed in the first step naming the batch or "the pose"
    with pytest.raises(ConfigError, match=f"task_args.{key} must be finite, got"):
        SynthesisTask(_config(tmp_path, phantom, **{f"task_args.{key}": value}))


def test_frames_too_small_for_the_patchgan_are_a_config_error(tmp_path, phantom):
    small = {"task_args.image_rows": 16, "task_args.disc_layers": 3}  # 16 x 18 px frames, the PatchGAN needs 24
    with pytest.raises(ConfigError, match=r"16 x 18 pixels \(rows: task_args.image_rows=16.*task_args.disc_layers=3 "
                                          r"needs at least 24 pixels"):
        Trainer(_config(tmp_path, phantom, "small", **small)).fit()
    task = SynthesisTask(_config(tmp_path, phantom, **{**small, "task_args.disc_layers": 2}))
    task.build_datasets()  # 12 px are enough for 2 layers
    task = SynthesisTask(_config(tmp_path, phantom, **{**small, "task_args.lambda_adv": 0}))
    task.build_datasets()  # L1 only: the discriminator never runs
    # min_size is the smallest input the layers take: one pixel less leaves no logit
    for n in (1, 2, 3):
        d = PatchDiscriminator(2, channels=4, n_layers=n, norm="none")
        side = PatchDiscriminator.min_size(n)
        assert d.net(torch.randn(1, 2, side, side)).shape[2:] == (1, 1)
        with pytest.raises(RuntimeError):
            d.net(torch.randn(1, 2, side - 1, side - 1))


def test_accumulated_micro_batches_are_simulated_once_per_step(tmp_path, phantom, monkeypatch):
    """Both phases of a step share each micro-batch's simulation (trainer.accumulate = 2: the discriminator phase
    runs micro-batches 0, 1, then the generator phase 0, 1); the weights equal those of simulating every time."""
    extra = {"trainer.batch_size": 2, "trainer.accumulate": 2, "trainer.max_steps": 2, "trainer.checkpoint_every": 0}
    calls = []
    pairs = SynthesisTask.pairs

    def counted(self, poses, seeds, device):
        calls.append(tuple(seeds))
        return pairs(self, poses, seeds, device)

    monkeypatch.setattr(SynthesisTask, "pairs", counted)
    cached = Trainer(_config(tmp_path, phantom, "cached", **extra))
    cached.fit()
    # 2 steps x 2 micro-batches, then finish: one validation set and the SWD floor's poses
    assert len(calls) == 2 * 2 + 2 and len(set(calls)) == len(calls), calls
    monkeypatch.setattr(SynthesisTask, "_batch", lambda self, batch, device: self.pairs(
        self.poses([int(s) for s in batch["seed"]]), [int(s) for s in batch["seed"]], device))
    fresh = Trainer(_config(tmp_path, phantom, "fresh", **extra))
    fresh.fit()
    for k, v in fresh.model.state_dict().items():
        torch.testing.assert_close(cached.model.state_dict()[k], v, rtol=0, atol=0)


def test_predict_takes_a_folder_of_poses_files(tmp_path, phantom):
    from medfast.cli import main

    Trainer(_config(tmp_path, phantom, "pose", **POSE, **{"trainer.max_steps": 1})).fit()
    ckpt = tmp_path / "pose" / "checkpoints" / "last.pt"
    task = SynthesisTask(_config(tmp_path, phantom, **POSE))
    poses = task.validation_poses(10**13)
    folder = tmp_path / "poses"
    folder.mkdir()
    (folder / "b.json").write_text(json.dumps({"poses": poses[:2].tolist()}))
    np.save(folder / "a.npy", poses[1:4].numpy())
    np.save(folder / "a.1mm.npy", poses[1:2].numpy())  # its folder is a.1mm: the suffix goes, not all after a dot
    (folder / "notes.txt").write_text("not poses")
    assert main(["predict", str(folder), "--model", str(ckpt), "--out", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    frames = {d: json.loads((tmp_path / "pred" / d / "generate.json").read_text())["frames"]
              for d in ("a", "a.1mm", "b")}
    assert frames == {"a": 3, "a.1mm": 1, "b": 2}
    # a folder without poses files, and a bad file among good ones: an error, nothing written
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), "--model", str(ckpt), "--out", str(tmp_path / "p2"),
                 "--device", "cpu"]) != 0
    (folder / "c.json").write_text("[[1, 2], [3, 4]]")
    assert main(["predict", str(folder), "--model", str(ckpt), "--out", str(tmp_path / "p3"), "--device", "cpu"]) != 0
    assert not (tmp_path / "p3").exists() or not any((tmp_path / "p3").rglob("*.png"))


def test_poses_folder_scan_skips_dot_files_and_takes_any_case(tmp_path):
    # a folder copied from macOS holds ._sweep.json (AppleDouble, not JSON) beside sweep.json: predict failed on it
    from medfast.tasks.synthesis.generate import poses_files, read_poses

    (tmp_path / "sweep.json").write_text(json.dumps({"poses": [np.eye(4).tolist()]}))
    (tmp_path / "._sweep.json").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    np.save(tmp_path / "SWEEP2.NPY", np.eye(4)[None])  # (np.save appends .npy: SWEEP2.NPY.npy)
    (tmp_path / "UPPER.JSON").write_text(json.dumps({"poses": [np.eye(4).tolist()]}))
    files = poses_files([tmp_path])
    assert [f.name for f in files] == ["SWEEP2.NPY.npy", "UPPER.JSON", "sweep.json"]
    assert all(read_poses(f).shape == (1, 4, 4) for f in files)


# ----------------------------------------------------------------------------------------------------------
# packaged real volumes (DATA.md)
# ----------------------------------------------------------------------------------------------------------

CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
COLIN = Path("/usr/share/mricron/templates/aal.nii.gz")


@pytest.mark.skipif(not CRANIUM.is_file(), reason="needs the InVesalius head CT: apt-get install invesalius-examples")
def test_cranium_source_gives_skull_and_brain_frames():
    from medfast.ultrasound import Probe

    src = load_source("cranium", probe=Probe.preset("C5-2v", n_lines=48, n_samples=192), image_rows=48)
    fr = src.frames(src.reference_pose[None])
    assert fr.bmode.shape == (1, 1, 48, src.width) and fr.anatomy.shape == (1, 2, 48, src.width)
    assert float(fr.anatomy[:, 0].max()) > 0.8  # bone (> 800 HU) in the plane: the skull base
    assert 0.05 < float(fr.bmode.mean()) < 0.9


@pytest.mark.skipif(not COLIN.is_file(), reason="needs Colin27 + AAL: apt-get install mricron-data")
def test_colin27_tissue_source():
    from medfast.tasks.synthesis.data import colin27_tissue
    from medfast.ultrasound import Probe

    lab, affine = colin27_tissue()
    counts = np.bincount(lab.ravel(), minlength=4)
    assert lab.shape == (181, 217, 181) and counts.size == 4 and (counts[1:] > 50_000).all()
    assert counts[3] > counts[1]  # more white matter than CSF
    src = load_source("colin27", probe=Probe.preset("L11-5v", n_lines=32, n_samples=128), image_rows=32)
    fr = src.frames(src.reference_pose[None])
    assert fr.anatomy.shape[1] == 4 and torch.allclose(fr.anatomy.sum(1), torch.ones(1))
    assert float(fr.anatomy[:, 2:].sum()) > 0  # brain tissue under the probe


# ----------------------------------------------------------------------------------------------------------
# DDP: the two-optimizer loop under two gloo processes
# ----------------------------------------------------------------------------------------------------------


def _ddp_worker(rank, port, phantom, out_dir, out):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    cfg = _config(Path(out_dir), Path(phantom), "ddp", **{"trainer.batch_size": 2, "trainer.max_steps": 3,
                                                           "trainer.checkpoint_every": 0})
    trainer = Trainer(cfg)
    assert trainer.world == 2
    trainer.fit()
    out[rank] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_two_process_ddp_gan_equals_one_process_with_the_combined_batch(tmp_path, phantom):
    import socket

    import torch.multiprocessing as mp

    single = Trainer(_config(tmp_path, phantom, "single", **{"trainer.max_steps": 3, "trainer.checkpoint_every": 0}))
    single.fit()
    ref = single.model.state_dict()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(port, str(phantom), str(tmp_path), out), nprocs=2, join=True)
    init = SynthesisTask(_config(tmp_path, phantom))
    torch.manual_seed(0)
    moved = 0.0
    for k, v in init.build_model().state_dict().items():
        if v.is_floating_point():
            moved = max(moved, float((v - ref[k]).abs().max()))
    assert moved > 1e-3  # training moved both networks' weights: the comparison below is not trivial
    for rank in range(2):
        for k, v in ref.items():
            torch.testing.assert_close(out[rank][k], v, rtol=1e-4, atol=2e-5)


def test_mni152_tissue_source():
    pytest.importorskip("nilearn", reason="the MNI152 maps ship in the nilearn wheel: pip install nilearn")
    from medfast.ultrasound import Probe

    src = load_source("mni152", probe=Probe.preset("L11-5v", n_lines=32, n_samples=128), image_rows=32)
    assert src.kind == "labels" and src.anatomy_channels == 4
    fr = src.frames(src.reference_pose[None])
    assert float(fr.anatomy[:, 2:].sum()) > 0 and float(fr.bmode.max()) > 0.2
