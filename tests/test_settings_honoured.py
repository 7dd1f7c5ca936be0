"""Settings that were silently ignored or misapplied (a report-only hunt's findings): deep supervision compares each
coarse output with the label voxels it sits on; settings a run would not read, or that another setting makes a
no-op, are refused before anything is computed, naming them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("nibabel")

from medfast.cli import main  # noqa: E402
from medfast.data import DatasetError  # noqa: E402
from medfast.data.synthetic import make_blobs  # noqa: E402
from medfast.nets import UNet  # noqa: E402
from medfast.tasks.segmentation import SegmentationTask, predict_files  # noqa: E402
from medfast.tasks.synthesis.task import parse_synthesis_args  # noqa: E402
from medfast.train import ConfigError, config_to_dict, load_config  # noqa: E402
from medfast.train.config import check_config  # noqa: E402
from medfast.train.files import gather_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blobs")
    make_blobs(folder, n=2, shape=(12, 12, 12), classes=2)
    return folder


def _files(blobs, kind):
    return sorted(str(p) for p in (Path(blobs) / kind).iterdir())


# -- 1. deep supervision -------------------------------------------------------------------------------------------


def _ds_task(patch, channels):
    return SegmentationTask(load_config([], [f"model.channels={channels}", "model.deep_supervision=true",
                                             f"augment.patch_size={patch}", "model.out_channels=2"]))


def test_deep_supervision_compares_each_level_with_the_label_voxels_it_sits_on():
    # a 28-voxel patch: the U-Net pads to 32, and its level-3 voxel i sits on input voxel 8 i (0, 8, 16, 24); the
    # old code took every ceil(28 / 4) = 7th label voxel (0, 7, 14, 21)
    t = _ds_task([28, 28, 28], [2, 4, 4, 4])
    label = torch.zeros(1, 28, 28, 28, dtype=torch.long)
    idx = torch.arange(0, 28, 8)
    label[:, idx[:, None, None], idx[None, :, None], idx[None, None, :]] = 1
    coarse = torch.full((1, 2, 4, 4, 4), -20.0)
    coarse[:, 1] = 20.0  # class 1 on every level-3 voxel: right where they sit
    outs = [torch.zeros(1, 2, 28, 28, 28), torch.zeros(1, 2, 14, 14, 14), torch.zeros(1, 2, 7, 7, 7), coarse]
    t.config.loss.deep_supervision_weights = [0.0, 0.0, 0.0, 1.0]
    assert float(t._loss(outs, label)) < 1e-6
    assert float(t._loss(outs, label)) == pytest.approx(float(t.loss_fn(coarse, label[:, ::8, ::8, ::8])), abs=1e-7)


def test_deep_supervision_on_an_anisotropic_patch_uses_the_unets_own_outputs():
    # (20, 32, 32): the coarsest output, level 3, is (3, 4, 4); the old step ceil(20 / 3) = 7 of the first axis, for
    # every axis, gave (3, 5, 5) and a ValueError at the first step
    t = _ds_task([20, 32, 32], [2, 2, 2, 2, 2])
    net = UNet(3, 1, 2, [2, 2, 2, 2, 2], 1, "none", deep_supervision=True).train()
    outs = net(torch.randn(1, 1, 20, 32, 32))
    assert [tuple(o.shape[2:]) for o in outs] == [(20, 32, 32), (10, 16, 16), (5, 8, 8), (3, 4, 4)]
    label = torch.randint(0, 2, (1, 20, 32, 32))
    weights = [0.5**j for j in range(4)]
    want = sum(w * t.loss_fn(o.float(), label[:, :: 2**j, :: 2**j, :: 2**j]) for j, (w, o) in
               enumerate(zip(weights, outs))) / sum(weights)
    torch.testing.assert_close(t._loss(outs, label), want)
    with pytest.raises(ValueError, match=r"deep supervision output 1 of shape \(9, 16, 16\) does not match"):
        t._loss([outs[0], torch.zeros(1, 2, 9, 16, 16)], label)


# -- 2. validation images without labels ---------------------------------------------------------------------------


def test_validation_images_without_labels_are_refused_before_training(blobs):
    images, labels = _files(blobs, "images"), _files(blobs, "labels")
    c = load_config([], [f"data.train_images={images[:1]}", f"data.train_labels={labels[:1]}",
                         f"data.val_images={images[1:]}"])
    with pytest.raises(DatasetError, match="data.val_images gives 1 image.*data.val_labels"):
        gather_files(c, task="segmentation", need_labels=True)
    assert gather_files(c, task="registration").val_images == images[1:]  # (its labels are optional)
    c.data.val_labels = labels[1:]
    assert gather_files(c, task="segmentation", need_labels=True).val_labels == labels[1:]


# -- 3. synthesis task_args of the other mode ----------------------------------------------------------------------


def _synthesis(*extra):
    return parse_synthesis_args(load_config([], ["task=synthesis", "model.spatial_dims=2", "model.norm=batch",
                                                 *extra]))


@pytest.mark.parametrize("mode, key, value", [
    ("image", "travel_mm", "[0, 0, 99]"), ("image", "sweep_frames", "2"), ("image", "start_jitter_mm", "50"),
    ("image", "coord_frequencies", "9"), ("pose", "shift_mm", "[50, 50, 50]"), ("pose", "tilt_deg", "45"),
    ("pose", "twist_deg", "90")])
def test_synthesis_settings_of_the_other_mode_are_refused(mode, key, value):
    other = "pose" if mode == "image" else "image"
    with pytest.raises(ConfigError, match=rf"task_args.{key} applies to task_args.mode='{other}' only; "
                                          rf"task_args.mode='{mode}' does not read it"):
        _synthesis(f"task_args.mode={mode}", f"task_args.{key}={value}")


@pytest.mark.parametrize("key, value", [("gan_loss", "bce"), ("disc_channels", "8"), ("disc_layers", "2"),
                                        ("disc_norm", "none")])
def test_synthesis_discriminator_settings_without_the_adversarial_loss_are_refused(key, value):
    with pytest.raises(ConfigError, match=rf"task_args.lambda_adv=0 .*task_args.{key} would be ignored"):
        _synthesis("task_args.lambda_adv=0", f"task_args.{key}={value}")
    _synthesis("task_args.lambda_adv=0.5", f"task_args.{key}={value}")  # read with an adversarial loss


def test_synthesis_defaults_restated_and_the_shipped_configs_are_accepted():
    _synthesis("task_args.mode=pose", "task_args.shift_mm=[10, 5, 10]", "task_args.tilt_deg=10")
    _synthesis("task_args.lambda_adv=0", "task_args.gan_loss=lsgan", "task_args.coord_frequencies=4")
    for path in sorted((ROOT / "configs").glob("synth*.yaml")):
        parse_synthesis_args(load_config([path]))


# -- 4. validation deformations without deformations ---------------------------------------------------------------


@pytest.mark.parametrize("task", ["segmentation", "registration"])
def test_validation_deformations_need_a_geometric_augmentation(blobs, task):
    base = [f"data.root={blobs}", "data.val_deformations=2"]
    with pytest.raises(ConfigError, match="data.val_deformations=2 .*augment.enabled is false.*undeformed"):
        gather_files(load_config([], [*base, "augment.enabled=false"]), task=task)
    still = ["augment.rotation=0", "augment.scale=0", "augment.deform_magnitude=0"]  # shear, translation, flip: 0
    with pytest.raises(ConfigError, match="data.val_deformations=2 .*every geometric range of augment is 0"):
        gather_files(load_config([], [*base, *still]), task=task)
    with pytest.raises(ConfigError, match="every geometric range of augment is 0"):  # deform_grid 0: no deformation
        gather_files(load_config([], [*base, "augment.rotation=0", "augment.scale=0", "augment.deform_grid=0"]),
                     task=task)
    gather_files(load_config([], [*base, *still, "augment.translation=2"]), task=task)  # (a shift moves voxels)
    gather_files(load_config([], [*base, *still, "augment.flip=[0]"]), task=task)


# -- 5. batch Dice of one sample -----------------------------------------------------------------------------------


def test_batch_dice_of_one_sample_on_one_process_is_refused(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="loss.batch_dice .*trainer.batch_size=1 on one process"):
        SegmentationTask(load_config([], ["loss.batch_dice=true", "trainer.batch_size=1"]))
    SegmentationTask(load_config([], ["loss.batch_dice=true", "trainer.batch_size=2"]))
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun the sums are all-reduced over the ranks: not a no-op
    SegmentationTask(load_config([], ["loss.batch_dice=true", "trainer.batch_size=1"]))
    text = (ROOT / "docs" / "training.md").read_text()
    assert "not over the `trainer.accumulate` micro-batches" in text and "Dice over the global batch" not in text


# -- 6. medfast register flags of a stage that does not run --------------------------------------------------------


def test_register_refuses_deformable_flags_without_a_deformable_stage(blobs, tmp_path, capsys):
    (f, m), (fl, ml) = _files(blobs, "images"), _files(blobs, "labels")
    base = ["register", f, m, "--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu"]
    for extra, named in ((["--deform-levels=", "--velocity"], "--velocity"),
                         (["--deform-iters", "0", "--bending-weight", "50"], "--bending-weight"),
                         (["--deform-levels=", "--affine-levels=", "--dice-weight", "1", "--fixed-labels", fl,
                           "--moving-labels", ml], "--dice-weight")):
        assert main(base + extra) == 1
        err = capsys.readouterr().err
        assert f"{named} would be ignored: no deformable stage runs" in err, err
        assert not (tmp_path / "out").exists()
    # the label Dice drives the affine stage too: accepted with one
    assert main(base + ["--deform-levels=", "--affine-levels=2", "--affine-iters=2", "--dice-weight", "1",
                        "--fixed-labels", fl, "--moving-labels", ml]) == 0
    capsys.readouterr()


# -- 7. medfast predict --set --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    c = load_config([], ["model.channels=[2, 4]", "augment.patch_size=[8, 8, 8]", "data.normalize=none"])
    net = UNet(3, 1, 2, [2, 4])
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save({"model": net.state_dict(), "config": config_to_dict(c), "task": "segmentation"}, path)
    return path


@pytest.mark.parametrize("override, key", [
    ("trainer.max_steps=-3", "trainer.max_steps"), ("optim.lr=-1", "optim.lr"),
    ("loss.lambda_dice=-2", "loss.lambda_dice"), ("augment.rotation=-5", "augment.rotation"),
    ("inference.hd_percentile=500", "inference.hd_percentile"),
    ("inference={overlap: 0.25, hd_percentile: 500}", "inference.hd_percentile"),
    ("model.channels=[2, 8]", "model.channels")])
def test_predict_refuses_settings_it_does_not_read(blobs, tmp_path, checkpoint, override, key):
    with pytest.raises(ConfigError, match=rf"overrides \(--set\) {key}: medfast predict does not read it"):
        predict_files(checkpoint, _files(blobs, "images")[:1], tmp_path / "p", device="cpu", overrides=[override],
                      progress=False)
    assert not (tmp_path / "p").exists()


def test_predict_set_checks_the_settings_it_reads(blobs, tmp_path, checkpoint, capsys):
    image = _files(blobs, "images")[:1]
    for override, message in (("inference.overlap=1.5", "inference.overlap must lie in"),
                              ("inference.sw_batch_size=0", "inference.sw_batch_size must be >= 1"),
                              ("inference.roi_size=[8, 8]", "inference.roi_size must have 3 positive entries"),
                              ("data.normalize=foo", "data.normalize must be one of"),
                              ("data.clip_percentiles=[50, 10]", "data.clip_percentiles must be two")):
        with pytest.raises(ConfigError, match=message):
            predict_files(checkpoint, image, tmp_path / "p", device="cpu", overrides=[override], progress=False)
    written = predict_files(checkpoint, image, tmp_path / "p", device="cpu", progress=False,
                            overrides=["inference={overlap: 0.25, blend: constant}", "data.spacing=[2, 2, 2]"])
    assert [p.name for p in written] == ["case_000_seg.nii.gz"]
    assert main(["predict", *image, "--model", str(checkpoint), "--out", str(tmp_path / "q"), "--device", "cpu",
                 "--set", "trainer.max_steps=-3"]) == 1
    assert "trainer.max_steps: medfast predict does not read it" in capsys.readouterr().err


# -- 8. shared settings another one makes a no-op ------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["data.cache_dir=/tmp/x"], "data.cache_dir is the folder of data.cache: disk, but data.cache is 'memory'"),
    (["data.cache=none", "data.cache_dir=/tmp/x"], "data.cache is 'none'"),
    (["data.test_label_map={1: 2}"], "data.test_label_map relabels .* data.test_images is empty"),
    (["trainer.val_at_start=true", "trainer.val_every=0"], "trainer.val_at_start: true .*trainer.val_every: 0"),
])
def test_settings_another_one_makes_a_no_op_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_config(load_config([], overrides))


def test_those_settings_are_accepted_where_they_apply(blobs):
    check_config(load_config([], ["data.cache=disk", "data.cache_dir=/tmp/x"]))
    check_config(load_config([], ["trainer.val_at_start=true", "trainer.val_every=5"]))
    check_config(load_config([], ["data.test_label_map={1: 0}", "data.test_images=[a.nii.gz]"]))
    # a built-in data set fills data.test_images later: the segmentation task checks the map against its lists
    check_config(load_config([], ["data.test_label_map={1: 0}", "data.dataset=mni152_tissue"]))
    task = SegmentationTask(load_config([], [f"data.root={blobs}", "data.test_label_map={1: 0}"]))
    with pytest.raises(ConfigError, match="data.test_label_map relabels .* there is no test set"):
        task._check_test_files()


# -- 9. the hd95_mean column's percentile --------------------------------------------------------------------------


def test_docs_say_hd95_columns_hold_the_hd_percentile():
    text = " ".join((ROOT / "docs" / "segmentation.md").read_text().split())
    assert "`inference.hd_percentile` (default 95) and keep their names whatever it is" in text
    assert "`hd95_mean`" in text


def test_shared_hints_do_not_send_a_task_to_a_setting_it_refuses():
    # data.cache_dir without the disk cache said "set data.cache: disk" to classification / synthesis, which then
    # refused data.cache ("does not use"); test_label_map said "give data.test_images" to tasks without a test set
    from medfast.train.config import check_config

    for task in ("classification", "synthesis"):
        check_config(load_config([], [f"task={task}", "data.cache_dir=/tmp/x"]))  # left to the task's own check
        check_config(load_config([], [f"task={task}", "data.test_label_map={1: 2}"]))
    with pytest.raises(ConfigError, match="set data.cache: disk"):
        check_config(load_config([], ["task=segmentation", "data.cache_dir=/tmp/x"]))
