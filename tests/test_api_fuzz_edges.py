"""Edges a fuzz of the public API found (one bad argument at a time on tiny valid calls): a metric that ran for
ever, a warning without a size limit, silent garbage from the ray marcher, the op schema's error text for a 64-bit
overflow."""

from __future__ import annotations

import warnings

import pytest
import torch

import medfast as mf
import medfast.metrics as mm
import medfast.ultrasound as us


def test_hausdorff_refuses_an_absurd_num_classes():
    """num_classes=2**62 on a 4^3 map: one pass per class, it never returned."""
    lab = torch.randint(0, 2, (1, 4, 4, 4))
    for fn in (mm.hausdorff_distance, mm.surface_distance):
        with pytest.raises(ValueError, match="num_classes must be at most"):
            fn(lab, lab, num_classes=2**62)


def test_the_empty_class_warning_names_ten_pairs_and_counts_the_rest():
    lab = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    lab[:, 1:3, 1:3, 1:3] = 1
    with pytest.warns(UserWarning) as record:
        mm.hausdorff_distance(lab, lab, num_classes=40)
    text = str(record[0].message)
    assert "and 66 more" in text and len(text) < 2000  # (2 x 38 empty pairs in each map)


def test_ray_march_refuses_negative_or_nan_attenuation_and_a_seed_past_64_bits():
    ct = torch.rand(1, 4, 4, 4) * 2000 - 1000
    props = us.hu_to_properties(ct).movedim(1, -1).contiguous()
    coords = torch.rand(1, 2, 3, 3) * 3
    table = us.noise_table(0, rows=16)
    grid = [1.0, 0, 0, 0, 0, 1.0, 0, 0, 0, 0, 1.0, 0]
    background = (1.48, 0.0022, 0.0, 0.0, 0.0)
    assert torch.isfinite(us.ray_march(props, coords, table, grid, 0.5, background)).all()
    for att in (-1.0, float("nan"), float("inf")):  # -1 gave echoes of 1.9e11, NaN every sample NaN
        with pytest.raises(ValueError, match="att must be a finite number >= 0"):
            us.ray_march(props, coords, table, grid, att, background)
    with pytest.raises(ValueError, match="seed must be a 64-bit int"):
        us.ray_march(props, coords, table, grid, 0.5, background, seed=2**63)


def test_ignore_index_past_64_bits_is_named():
    """The op schema's 'Expected a value of type Optional[int]' named no argument."""
    logits, labels = torch.randn(1, 2, 4, 4, 4), torch.randint(0, 2, (1, 4, 4, 4))
    for fn in (mf.dice_loss, mf.cross_entropy, mf.dice_ce_loss):
        with pytest.raises(ValueError, match="ignore_index must be a 64-bit int"):
            fn(logits, labels, ignore_index=2**63)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.isfinite(mf.dice_loss(logits, labels, ignore_index=2**62))


def test_registration_helpers_check_their_arguments():
    """A zero factor divided by zero (level_resample) or gave a NaN theta (level_theta); kmeans_tissues raised
    IndexError for k=0, a float mask or another shape; random_affine raised IndexError / OverflowError."""
    from medfast.tasks.registration import dice_per_label, kmeans_tissues, level_resample, level_theta, random_affine

    params = torch.zeros(1, 3, 4)
    params[0, :, :3] = torch.eye(3)
    assert torch.isfinite(level_theta(params, (8, 8, 8), 2)).all()
    for f in (0, -1, float("nan"), 1.5, True):
        with pytest.raises(ValueError, match="f must be a down-sampling factor"):
            level_theta(params, (8, 8, 8), f)
        with pytest.raises(ValueError, match="f_from must be a down-sampling factor"):
            level_resample(torch.zeros(1, 3, 4, 4, 4), f, 1, (8, 8, 8))
    with pytest.raises(ValueError, match="v must be a floating"):
        level_resample(torch.zeros(1, 3, 4, 4, 4, dtype=torch.long), 2, 1, (8, 8, 8))
    image = torch.rand(6, 6, 6)
    mask = image > 0.2
    assert set(kmeans_tissues(image, mask).unique().tolist()) <= {0, 1, 2, 3}
    for kwargs, args in (({"k": 0}, (image, mask)), ({}, (image, mask.float())), ({}, (image, mask[:5])),
                         ({}, (torch.full_like(image, float("nan")), mask))):
        with pytest.raises(ValueError):
            kmeans_tissues(*args, **kwargs)
    for kwargs in ({"n": 0}, {"n": 3, "rotation_deg": float("nan")}, {"n": 3, "scaling": 1.5}):
        with pytest.raises(ValueError):
            random_affine(seed=0, **kwargs)
    with pytest.raises(TypeError, match="a must be an integer label map"):
        dice_per_label(None, torch.zeros(3, dtype=torch.long), [1])
    with pytest.raises(ValueError, match="one shape"):
        dice_per_label(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), [1])


def test_voxel_spacing_and_class_counts_check_their_arguments():
    from medfast.data.io import voxel_spacing
    from medfast.tasks.evaluation import class_counts

    for bad in (None, [1, 2], [[1.0]]):
        with pytest.raises(ValueError, match="affine must be a square"):
            voxel_spacing(bad)
    labels = torch.randint(0, 2, (1, 4, 4))
    assert class_counts(labels, 2).sum() == 16
    with pytest.raises(TypeError, match="labels must be an integer"):
        class_counts(labels.half() + 0.7, 2)  # (fractions were truncated)
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        class_counts(labels, True)
