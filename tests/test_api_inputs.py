"""Public helpers' argument checks: bool flags that a truthy string switched on, NumPy scalars and 0-d tensors
for scalar arguments (docs/api/interop.md), resample_to_spacing's layout rule, and wrong inputs named in a
TypeError / ValueError instead of an internal AttributeError / IndexError / RuntimeError / ZeroDivisionError."""

import numpy as np
import pytest
import torch

import medfast.data as D
import medfast.nets as N
import medfast.ultrasound as U
from medfast.tasks.classification import coral_loss
from medfast.tasks.synthesis import random_pose, sliced_wasserstein
from medfast.train import EpochSampler, importance_map, load_config, sliding_window_inference


# ---- bool flags -----------------------------------------------------------------------------------------------
def _sim_inputs():
    pose = U.look_at((7.0, 7.0, 1.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0))[None]
    props = U.hu_to_properties(torch.full((1, 1, 8, 8, 8), 40.0))
    probe = U.Probe("linear", 5.0, 0.7, 32, 0.3, depth_mm=10, n_lines=8, n_samples=64)
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    return props, affine, pose, probe


@pytest.mark.parametrize("flag", ["speckle", "return_lines", "scan_convert"])
@pytest.mark.parametrize("value", ["False", "no", None, 1])
def test_simulate_flags_must_be_bools(flag, value):
    props, affine, pose, probe = _sim_inputs()
    with pytest.raises(TypeError, match=f"{flag} must be a bool"):
        U.simulate(props, affine, pose, probe, sub_rays=1, **{flag: value})


def test_simulate_numpy_and_tensor_scalars_as_python_numbers():
    props, affine, pose, probe = _sim_inputs()
    ref = U.simulate(props, affine, pose, probe, seed=3, sub_rays=2, gain_db=5.0, tgc_db_cm_mhz=0.25,
                     dynamic_range_db=50.0, speckle=False, return_lines=True)
    for kw in (dict(seed=np.int64(3), sub_rays=np.int32(2), gain_db=np.float32(5.0), tgc_db_cm_mhz=np.float64(0.25),
                    dynamic_range_db=np.float32(50.0), speckle=np.False_, return_lines=np.True_),
               dict(seed=torch.tensor(3), sub_rays=torch.tensor(2), gain_db=torch.tensor(5.0),
                    tgc_db_cm_mhz=torch.tensor(0.25), dynamic_range_db=torch.tensor(50.0),
                    speckle=torch.tensor(False), return_lines=torch.tensor(True))):
        out = U.simulate(props, affine, pose, probe, **kw)
        assert torch.equal(out.bmode, ref.bmode) and torch.equal(out.envelope, ref.envelope)


@pytest.mark.parametrize("value", ["no", None, 0])
def test_net_flags_must_be_bools(value):
    with pytest.raises(TypeError, match="deep_supervision must be a bool"):
        N.UNet(spatial_dims=2, channels=(4, 8), deep_supervision=value)
    for cls, kw in ((N.LocalNet, dict(extract_levels=(0, 1))), (N.GlobalNet, {})):
        with pytest.raises(TypeError, match="channels_last must be a bool"):
            cls(spatial_dims=3, num_channel_initial=2, depth=1, channels_last=value if value is not None else "x", **kw)
    from medfast.nets.classification import DenseNetClassifier

    with pytest.raises(TypeError, match="stem_pool must be a bool"):
        DenseNetClassifier(spatial_dims=2, stem_pool=value if value is not None else "x")
    from medfast.nets.gan import ConditionalGAN

    with pytest.raises(TypeError, match="conditional_discriminator must be a bool"):
        ConditionalGAN(torch.nn.Identity(), torch.nn.Identity(), conditional_discriminator="False")


def test_net_flags_take_numpy_bools():
    u = N.UNet(spatial_dims=2, channels=(4, 8), deep_supervision=np.True_).train()
    assert u.deep_supervision is True and isinstance(u(torch.rand(1, 1, 16, 16)), list)
    net = N.LocalNet(spatial_dims=3, num_channel_initial=2, depth=1, extract_levels=(0, 1), channels_last=np.False_)
    assert net.channels_last is False
    assert N.GlobalNet(spatial_dims=3, num_channel_initial=2, depth=1).channels_last is None


# ---- NumPy scalars and 0-d tensors ----------------------------------------------------------------------------
def test_sliding_window_takes_numpy_scalars():
    x = torch.rand(1, 1, 10, 10)
    ref = sliding_window_inference(x, (4, 4), lambda t: t * 2, sw_batch_size=4, overlap=0.5, sigma_scale=0.125)
    for sw, ov, sig, roi in ((np.int64(4), np.float32(0.5), np.float32(0.125), (np.int64(4), 4)),
                             (torch.tensor(4), torch.tensor(0.5), torch.tensor(0.125), np.int64(4))):
        out = sliding_window_inference(x, roi, lambda t: t * 2, sw_batch_size=sw, overlap=ov, sigma_scale=sig)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(importance_map((4, 4), sigma_scale=np.float32(0.125)), importance_map((4, 4)),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="sw_batch_size must be an int >= 1"):
        sliding_window_inference(x, (4, 4), lambda t: t, sw_batch_size=np.float64(4.0))


def test_sliced_wasserstein_takes_numpy_ints():
    a, b = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.rand(2, 1, 16, 16)
    ref = sliced_wasserstein(a, b, levels=1, n_patches=64, n_projections=8, seed=1)
    got = sliced_wasserstein(a, b, levels=np.int64(1), n_patches=torch.tensor(64), n_projections=np.int32(8),
                             seed=np.int64(1))
    assert got == ref


def test_load_config_values_take_numpy_scalars():
    cfg = load_config([], values={"trainer.max_steps": np.int64(5), "optim.lr": np.float32(0.5),
                                  "trainer.seed": torch.tensor(3), "data.reorient": np.False_})
    assert cfg.trainer.max_steps == 5 and type(cfg.trainer.max_steps) is int
    assert cfg.optim.lr == 0.5 and type(cfg.optim.lr) is float
    assert cfg.trainer.seed == 3 and cfg.data.reorient is False


def test_freehand_sweep_takes_tensor_scalars():
    pose = U.look_at((0.0, 0.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0))
    ref = U.freehand_sweep(pose, (0.0, 10.0, 0.0), 3, tilt_deg=4.0, seed=2)
    for n, tilt, seed in ((torch.tensor(3), torch.tensor(4.0), torch.tensor(2)),
                          (np.int64(3), np.float32(4.0), np.uint8(2))):
        torch.testing.assert_close(U.freehand_sweep(pose, (0.0, 10.0, 0.0), n, tilt_deg=tilt, seed=seed), ref,
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="tilt_deg must be a finite number"):
        U.freehand_sweep(pose, (0.0, 10.0, 0.0), 3, tilt_deg=True)


# ---- resample_to_spacing: the layout follows the rank ---------------------------------------------------------
def test_resample_to_spacing_layout_from_rank():
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 3, (8, 8, 8), generator=g)
    # a (*S) label map, float or integer, nearest: the same values, no channel axis added
    out_f, a_f = D.resample_to_spacing(lab.float(), aff, (2.0, 2.0, 2.0), mode="nearest")
    out_i, a_i = D.resample_to_spacing(lab, aff, (2.0, 2.0, 2.0))  # integer: nearest by default
    assert out_f.shape == out_i.shape == (4, 4, 4) and a_f.shape == (4, 4) and np.array_equal(a_f, a_i)
    assert out_f.dtype == torch.float32 and out_i.dtype == torch.int64
    assert torch.equal(out_f.long(), out_i)
    # reference: nearest neighbour at the new voxel centres (old voxel 2 i + 0.5 -> ties resolved the same way)
    out_c, _ = D.resample_to_spacing(lab[None], aff, (2.0, 2.0, 2.0), mode="nearest")
    assert torch.equal(out_c[0], out_i)  # (1, *S) gives the same values with the channel axis
    # an int16 CT image (C, *S), linear: as the float image, rounded
    ct = torch.randint(-1000, 1000, (1, 8, 8, 8), dtype=torch.int16, generator=g)
    out, _ = D.resample_to_spacing(ct, aff, (2.0, 2.0, 2.0), mode="linear")
    ref, _ = D.resample_to_spacing(ct.float(), aff, (2.0, 2.0, 2.0))
    assert out.shape == (1, 4, 4, 4) and out.dtype == torch.int16
    assert torch.equal(out, ref.round().to(torch.int16))
    # 2D: (*S) and (C, *S) with two spacing values
    img2 = torch.rand(2, 8, 6, generator=g)
    out2, a2 = D.resample_to_spacing(img2, np.eye(4), (2.0, 2.0))
    assert out2.shape == (2, 4, 3) and a2.shape == (3, 3)
    assert D.resample_to_spacing(img2[0], np.eye(4), (2.0, 2.0))[0].shape == (4, 3)


def test_resample_to_spacing_errors_name_the_rule():
    with pytest.raises(ValueError, match=r"\(\*S\) \(a label map\) or \(C, \*S\) with one spatial axis per spacing"):
        D.resample_to_spacing(torch.rand(1, 1, 8, 8, 8), np.eye(4), (2.0, 2.0, 2.0))
    with pytest.raises(ValueError, match="spacing"):
        D.resample_to_spacing(torch.rand(1, 8, 8, 8), np.eye(4), 2.0)
    with pytest.raises(ValueError, match="mode"):
        D.resample_to_spacing(torch.rand(1, 8, 8, 8), np.eye(4), (2.0, 2.0, 2.0), mode="bilinear")
    with pytest.raises(TypeError, match="image must be a torch.Tensor"):
        D.resample_to_spacing(np.random.rand(1, 6, 6, 6), np.eye(4), (2.0, 2.0, 2.0))


def test_resample_to_spacing_keeps_large_integer_labels():
    lab = torch.full((4, 4, 4), 2**24 + 1, dtype=torch.int64)  # not a float32 number
    out, _ = D.resample_to_spacing(lab, np.eye(4), (2.0, 2.0, 2.0))
    assert bool((out == 2**24 + 1).all())


# ---- wrong inputs named -------------------------------------------------------------------------------------
def test_preprocess_helpers_name_their_arguments():
    for fn, args in ((D.normalize_intensity, ()), (D.crop_or_pad, (np.eye(4), (4, 4, 4)))):
        with pytest.raises(TypeError, match="image must be a torch.Tensor"):
            fn(np.random.rand(1, 6, 6, 6), *args)
    with pytest.raises(ValueError, match=r"image must be a \(C, \*S\) tensor"):
        D.normalize_intensity(torch.tensor(1.0))
    with pytest.raises(ValueError, match="image must have at least the 3 spatial axes"):
        D.crop_or_pad(torch.rand(6, 6), np.eye(4), (4, 4, 4))


def test_nifti_dataset_refuses_a_single_path_and_a_list_label_map(tmp_path):
    from pathlib import Path

    with pytest.raises(TypeError, match="images must be a list of files"):
        D.NiftiDataset(str(tmp_path / "img.nii.gz"))
    with pytest.raises(TypeError, match="images must be a list of files"):
        D.NiftiDataset(Path(tmp_path / "img.nii.gz"))
    with pytest.raises(TypeError, match="labels must be a list of files"):
        D.NiftiDataset([str(tmp_path / "img.nii.gz")], str(tmp_path / "lab.nii.gz"))
    with pytest.raises(TypeError, match="label_map must be a mapping"):
        D.NiftiDataset([str(tmp_path / "img.nii.gz")], label_map=[0, 1])


def test_collate_refuses_an_empty_batch():
    with pytest.raises(ValueError, match="non-empty list"):
        D.collate([])
    with pytest.raises(TypeError, match="dataset items"):
        D.collate([torch.zeros(2)])
    batch = D.collate([{"image": torch.zeros(1, 2, 2), "index": 0}, {"image": torch.ones(1, 2, 2), "index": 1}])
    assert batch["image"].shape == (2, 1, 2, 2) and batch["index"] == [0, 1]


def test_ultrasound_helpers_name_their_arguments():
    with pytest.raises(ValueError, match="lateral must be 3 finite values"):
        U.look_at((0.0, 0.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0))
    with pytest.raises(ValueError, match="lateral must be 3 finite values"):
        U.look_at((0.0, 0.0, 0.0), (0.0, 0.0, 1.0), "abc")
    with pytest.raises(TypeError, match="values must be a mapping .* or a \\(n_labels, 5\\) tensor, got ndarray"):
        U.LabelTable(np.random.rand(3, 5))
    with pytest.raises(TypeError, match="got list"):
        U.LabelTable([[1.5, 0.5, 1.0, 0.02, 0.005]])


def test_coral_loss_names_its_arguments():
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        coral_loss([[0.1, 0.2]], torch.ones(1, 2))
    with pytest.raises(TypeError, match="levels must be a torch.Tensor"):
        coral_loss(torch.zeros(1, 2), [[1.0, 0.0]])
    with pytest.raises(ValueError, match=r"importance must have shape \(K-1,\) = \(2,\)"):
        coral_loss(torch.randn(2, 2), torch.ones(2, 2), importance=torch.ones(3))
    with pytest.raises(ValueError, match=r"logits must have shape \(N, K-1\)"):
        coral_loss(torch.randn(2), torch.ones(2))
    # the formula (eq. 4) against torch's BCE with logits, with importance weights
    logits, levels, w = torch.randn(3, 2, dtype=torch.float64), torch.tensor([[1.0, 0], [1, 1], [0, 0]]), \
        torch.tensor([1.0, 2.0])
    # (float64 logits give a float64 loss: no longer rounded to float32)
    ref = (torch.nn.functional.binary_cross_entropy_with_logits(logits, levels.double(), reduction="none")
           * w.double()).sum(1)
    torch.testing.assert_close(coral_loss(logits, levels, importance=w, reduction="none"), ref)


def test_random_pose_names_its_reference():
    with pytest.raises(TypeError, match="reference must be a torch.Tensor"):
        random_pose(np.eye(4), 0)
    with pytest.raises(ValueError, match=r"reference must be a \(4, 4\) probe-to-world pose"):
        random_pose(torch.eye(3), 0)
    assert torch.equal(random_pose(torch.eye(4), 0, shift_mm=(0, 0, 0), tilt_deg=0, twist_deg=0),
                       torch.eye(4, dtype=torch.float64))


def test_importance_map_and_sampler_sizes():
    with pytest.raises(ValueError, match=r"roi_size must be 2 positive sizes, got \(0, 4\)"):
        importance_map((0, 4))
    with pytest.raises(ValueError, match=r"roi_size must be 2 positive sizes"):
        importance_map((0, 4), mode="constant")
    with pytest.raises(TypeError, match="roi_size must be a sequence"):
        importance_map(4)
    assert importance_map((np.int64(3), torch.tensor(2)), mode="constant").shape == (3, 2)
    for kwargs, match in ((dict(batch_size=0), "batch_size must be an int >= 1"),
                          (dict(batch_size=2, num_replicas=0), "num_replicas must be an int >= 1"),
                          (dict(batch_size=2, accumulate=0), "accumulate must be an int >= 1"),
                          (dict(batch_size=2, num_replicas=2, rank=2), r"rank must be in \[0, num_replicas = 2\)")):
        with pytest.raises(ValueError, match=match):
            EpochSampler(4, **kwargs)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        EpochSampler(4, 2.5)
    assert list(EpochSampler(4, np.int64(2), shuffle=False)) == list(EpochSampler(4, 2, shuffle=False))


def test_sampler_span_is_the_epochs_in_a_row():
    # the trainer iterates several epochs per loader pass (workers prefetch across epochs): the same samples
    s = EpochSampler(3, 2, seed=5)
    per_epoch = []
    for e in range(4):
        s.set_epoch(e)
        per_epoch += list(s)
    s.set_epoch(0, 1, span=4)
    assert list(s) == per_epoch[1:] and len(s) == len(per_epoch) - 1
    with pytest.raises(ValueError, match="span an int >= 1"):
        s.set_epoch(0, span=0)
    for bad in (2.0, "2", True):
        with pytest.raises(TypeError, match="span must be an int"):
            s.set_epoch(0, span=bad)
    with pytest.raises(TypeError, match="start must be an int"):
        s.set_epoch(0, 1.5)


def test_trainer_stream_labels_the_epochs_of_a_span():
    from types import SimpleNamespace

    from medfast.train.trainer import Trainer

    # 2 batches an epoch, spans of ceil(3 / 2) = 2 epochs, starting at micro-batch 3 (epoch 1, batch 1)
    calls = []

    def loader(epoch, offset, span):
        calls.append((epoch, offset, span))
        return range(span * 2 - offset)

    fake = SimpleNamespace(batches_per_epoch=2, SPAN_BATCHES=3, _loader=loader)
    stream = Trainer._micro_batches(fake, 3)
    assert [next(stream)[0] for _ in range(7)] == [1, 2, 2, 3, 3, 4, 4]
    assert calls == [(1, 1, 2), (3, 0, 2)]


def test_nets_name_bad_sizes():
    with pytest.raises(ValueError, match="depth must be an int >= 0"):
        N.GlobalNet(spatial_dims=2, depth=-1)
    with pytest.raises(TypeError, match="depth must be an int"):
        N.LocalNet(spatial_dims=2, depth="3")
    assert len(N.GlobalNet(spatial_dims=2, num_channel_initial=2, depth=0).encoder.blocks) == 1
    net = N.UNet(spatial_dims=2, channels=(4, 8)).eval()
    with pytest.raises(ValueError, match=r"x is empty: shape \(0, 1, 16, 16\)"):
        net(torch.rand(0, 1, 16, 16))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        net(np.zeros((1, 1, 16, 16), dtype=np.float32))
