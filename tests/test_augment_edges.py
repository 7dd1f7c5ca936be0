"""RandomAugment's edges: exact label values past float32's integers, per-sample extents in a padded batch,
and the checks of its configuration and arguments (the direct API, not only the trainer's config check)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medfast.data import AugmentConfig, RandomAugment, random_crop_theta


@pytest.mark.parametrize("enabled", [False, True])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_labels_past_2_to_the_24_stay_exact(enabled, dtype):
    """float32 holds integers up to 2^24 only: a label of 16777217 came back 16777216, even from a plain crop.
    Mouse-atlas structure ids pass 2^24; the ignore value -1 must survive too."""
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 1, -1, 2**24 + 1, 614454277, 2**31 - 1], dtype=torch.int64)
    label = ids[torch.randint(0, ids.numel(), (2, 10, 11, 12), generator=g)].to(dtype)
    image = label.double()[:, None].float()  # (values only; the image is not compared)
    aug = RandomAugment(AugmentConfig(enabled=enabled, rotation=20, deform_magnitude=1.0, deform_grid=3))
    _, out = aug(image, label, [3, 4], patch_size=None if not enabled else [8, 8, 8])
    assert out.dtype == dtype
    assert set(out.unique().tolist()) <= set(ids.tolist())
    if not enabled:  # the whole volume, no transform: the labels themselves (16777217 came back 16777216)
        assert (out == label).all()
    else:  # the same sampling with float64 positions (exact integers): the same labels
        _, again = aug(image.double(), label, [3, 4], patch_size=[8, 8, 8])
        assert (again == out).float().mean() > 0.99


def test_labels_match_the_float64_warp():
    """The two-channel label warp equals the nearest warp in float64 (exact integers), transform for transform."""
    g = torch.Generator().manual_seed(1)
    label = torch.randint(-1, 2**30, (2, 9, 10, 11), generator=g)
    cfg = AugmentConfig(rotation=30, scale=0.2, shear=0.1, deform_magnitude=2.0, deform_grid=3, flip=[0, 2])
    _, a = RandomAugment(cfg)(torch.zeros(2, 1, 9, 10, 11), label, [5, 6])
    _, b = RandomAugment(cfg)(torch.zeros(2, 1, 9, 10, 11, dtype=torch.float64), label, [5, 6])
    mismatch = (a != b).float().mean().item()
    assert mismatch < 0.01  # (float32 vs float64 positions: a tie of the nearest voxel may round either way)


def test_a_padded_batch_crops_each_sample_within_its_own_extent():
    """collate pads volumes at the end of each axis: with ``shapes`` each sample's patch is drawn as if it were
    alone in its batch (before, a 16^3 subject batched with a 40^3 one had patches holding none of its voxels)."""
    g = torch.Generator().manual_seed(2)
    small, large = torch.rand(1, 1, 16, 16, 16, generator=g), torch.rand(1, 1, 40, 40, 40, generator=g)
    ls, ll = (small[:, 0] * 3).long(), (large[:, 0] * 3).long()
    batch = torch.cat([F.pad(small, (0, 24, 0, 24, 0, 24)), large])
    labels = torch.cat([F.pad(ls, (0, 24, 0, 24, 0, 24)), ll])
    aug = RandomAugment(AugmentConfig(rotation=15, deform_magnitude=1.0, deform_grid=3, noise_std=0.0, gamma=0.0,
                                      intensity_scale=0.0, intensity_shift=0.0))
    out, lab = aug(batch, labels, [7, 8], [24, 24, 24], shapes=[(16, 16, 16), (40, 40, 40)])
    for i, (img, lb) in enumerate(((small, ls), (large, ll))):
        alone, alone_lab = aug(img, lb, [7 + i], [24, 24, 24])
        torch.testing.assert_close(out[i:i + 1], alone, atol=1e-5, rtol=0)
        assert (lab[i:i + 1] == alone_lab).all()
    with pytest.raises(ValueError, match="shapes must give each of the 2 samples' spatial shape, at most"):
        aug(batch, labels, [7, 8], [24, 24, 24], shapes=[(16, 16, 16), (41, 40, 40)])
    with pytest.raises(ValueError, match="shapes must give each"):
        aug(batch, labels, [7, 8], [24, 24, 24], shapes=[(16, 16, 16)])


@pytest.mark.parametrize("change, match", [
    ({"rotation": math.nan}, "augment.rotation must be >= 0 and finite"),
    ({"translation": math.inf}, "augment.translation must be >= 0 and finite"),
    ({"scale": 1.5}, r"augment.scale must lie in \[0, 1\)"),
    ({"intensity_scale": -0.1}, r"augment.intensity_scale must lie in \[0, 1\)"),
    ({"deform_grid": 1}, "augment.deform_grid must be 0"),
    ({"deform_grid": 3.0}, "augment.deform_grid must be an int"),
    ({"integrate_steps": 65}, r"augment.integrate_steps must lie in \[0, 64\]"),
    ({"patch_size": [0, 8, 8]}, "augment.patch_size must be a sequence of positive ints"),
    ({"patch_size": [8.5, 8, 8]}, "augment.patch_size must be a sequence of positive ints"),
])
def test_random_augment_checks_its_config(change, match):
    """A NaN rotation gave all-NaN patches, a scale of 1.5 a reflected sampling, deform_grid 1 no deformation:
    the checks of the trainer's config now run for the direct API too."""
    with pytest.raises(ValueError, match=match):
        RandomAugment(AugmentConfig(**change))


def test_random_augment_checks_its_arguments():
    aug = RandomAugment(AugmentConfig())
    x, y = torch.rand(1, 1, 12, 12, 12), torch.zeros(1, 12, 12, 12, dtype=torch.long)
    for patch in ([0, 8, 8], [8.5, 8, 8], "888"):
        with pytest.raises(ValueError, match="patch_size must be a sequence of positive ints"):
            aug(x, y, [0], patch)
    with pytest.raises(ValueError, match="seeds must be ints"):
        aug(x, y, [1.7])
    with pytest.raises(ValueError, match="in_shape and out_shape must have one entry per spatial axis"):
        random_crop_theta([20, 20, 20], [8, 8], torch.Generator())


def test_segmentation_training_crops_each_subject_of_a_padded_batch_within_it():
    """collate records each image's own shape when it pads a batch, and the segmentation training step passes it
    on: a 16^3 subject batched with a 40^3 one keeps all its voxels in a 24^3 patch, as when alone (before:
    42 of 300 patches held none of them)."""
    from medfast.data import collate
    from medfast.tasks.segmentation import SegmentationTask
    from medfast.train import load_config

    big = {"image": torch.ones(1, 40, 40, 40), "label": torch.ones(40, 40, 40, dtype=torch.uint8), "seed": 0}
    small = {"image": torch.ones(1, 16, 16, 16), "label": torch.ones(16, 16, 16, dtype=torch.uint8), "seed": 1}
    assert "spatial_shape" not in collate([big, big])
    assert collate([big, small])["spatial_shape"] == [(40, 40, 40), (16, 16, 16)]
    config = load_config([], ["model.out_channels=2", "model.channels=[4, 8]", "inference.roi_size=null",
                              "augment.patch_size=[24, 24, 24]", "augment.enabled=false", "data.root=unused"])
    task = SegmentationTask(config)
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return torch.zeros(x.shape[0], 2, *x.shape[2:])

    for seed in range(20):
        big["seed"], small["seed"] = 2 * seed, 2 * seed + 1
        task.training_step(Probe(), collate([big, small]), torch.device("cpu"))
        assert float(seen[-1][1].sum()) == 16**3  # the whole small subject, centred in its patch


def test_labels_within_float32_integers_keep_one_channel(monkeypatch):
    """FreeSurfer's or an atlas's ids (< 2^24) in int32 / int64 need no second channel (2.8x the label warp's
    time for nothing); ids past 2^24 take two."""
    import medfast.ops

    calls = []
    real = medfast.ops.affine_warp

    def spy(image, *args, **kwargs):
        calls.append(image.shape[1])
        return real(image, *args, **kwargs)

    monkeypatch.setattr(medfast.ops, "affine_warp", spy)
    aug = RandomAugment(AugmentConfig(enabled=False))
    for value, channels in ((2035, 1), (-2**24, 1), (2**24 + 1, 2), (-2**24 - 1, 2)):
        calls.clear()
        label = torch.zeros(1, 6, 6, 6, dtype=torch.int32)
        label[0, 2, 2, 2] = value
        _, out = aug(torch.zeros(1, 1, 6, 6, 6), label, [0])
        assert calls[-1] == channels and (out == label).all()


def test_patch_size_as_an_array_or_tensor():
    import numpy as np

    aug = RandomAugment(AugmentConfig())
    x = torch.rand(1, 1, 12, 12, 12)
    for patch in (np.array([8, 8, 8]), torch.tensor([8, 8, 8])):
        assert aug(x, None, [0], patch)[0].shape == (1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="patch_size must be a sequence of positive ints"):
        aug(x, None, [0], np.array([8.5, 8, 8]))


def test_deform_magnitude_is_the_per_axis_std_of_the_velocity_at_the_control_points(monkeypatch):
    """What RandomAugment's docstring says deform_magnitude is, measured on the displacement it hands the warp
    (2D, 33 x 33 patches, 5 x 5 control points 8 voxels apart, 256 seeded samples)."""
    import medfast.ops

    seen = []
    real = medfast.ops.affine_warp

    def spy(image, theta, *args, **kwargs):
        seen.append((theta, kwargs["ddf"]))
        return real(image, theta, *args, **kwargs)

    monkeypatch.setattr(medfast.ops, "affine_warp", spy)
    m, n = 2.0, 256

    def displacement(magnitude: float = m, **cfg):
        seen.clear()
        aug = RandomAugment(AugmentConfig(**{"rotation": 0.0, "scale": 0.0, "deform_magnitude": magnitude,
                                             "deform_grid": 5, **cfg}), geometric_only=True)
        aug(torch.zeros(n, 1, 33, 33), None, list(range(n)))
        return seen[0]

    _, v = displacement(integrate_steps=0)  # no integration: the displacement is the velocity
    at = v[:, :, ::8, ::8]  # the control points: the patch's corners and every 8th voxel between
    for axis in range(2):  # the std of EACH component (a std of the length would make each m / sqrt(2))
        assert at[:, axis].std() == pytest.approx(m, rel=0.03) and abs(float(at[:, axis].mean())) < 0.1
    assert at.norm(dim=1).pow(2).mean().sqrt() == pytest.approx(m * math.sqrt(2), rel=0.03)
    assert float((at.abs() > m).float().mean()) == pytest.approx(0.317, abs=0.02)  # a std, not a bound
    # linear between the control points: a midpoint is the mean of its neighbours, a 2D cell's centre has std m / 2
    torch.testing.assert_close(v[:, :, 4::8, ::8], (at[:, :, :-1] + at[:, :, 1:]) / 2)
    assert v[:, :, 4, 4].std() == pytest.approx(m / 2, rel=0.1)
    # integrated (the default 5 squarings), the flow is a little smaller than the velocity at the control points
    for magnitude, ratio in ((0.5, 0.95), (2.0, 0.83)):
        assert displacement(magnitude)[1][:, :, ::8, ::8].std() / magnitude == pytest.approx(ratio, abs=0.03)
    # in output-patch voxels: the warp gets it turned and scaled by the affine's matrix (the same draws)
    theta, turned = displacement(rotation=30.0, scale=0.2)
    torch.testing.assert_close(turned, torch.einsum("bij,bj...->bi...", theta[:, :, :2], displacement()[1]))


def test_noise_is_the_same_for_a_float64_image():
    """The noise was drawn in the image's dtype, and float64 draws another stream than float32: the same seeds
    gave a float64 image other noise (0.24 apart at noise_std 0.05). The other draws were already dtype-free."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 1, 12, 12, 12, generator=g)
    label = torch.randint(0, 3, (2, 12, 12, 12), generator=g)
    aug = RandomAugment(AugmentConfig(rotation=10, scale=0.1, deform_magnitude=1.0, gamma=0.2, noise_std=0.05))
    out32, _ = aug(image, label, [5, 6], patch_size=[8, 8, 8])
    out64, _ = aug(image.double(), label, [5, 6], patch_size=[8, 8, 8])
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, out32.double(), atol=1e-4, rtol=1e-4)
