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
