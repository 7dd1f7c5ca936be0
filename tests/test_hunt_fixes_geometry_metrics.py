"""Findings of the 2026-11-29 hunts fixed outside the fix helpers' files: a narrow-dtype label map against an
ignore_index that wraps in its dtype (metrics.dice), and medfast register's label-grid check and its
mixed-case fixed file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfast.metrics import dice


@pytest.mark.parametrize("dtype, stray, ignore", [(torch.uint8, 255, -1), (torch.uint8, 255, 511),
                                                  (torch.int8, -1, 255)])
def test_dice_out_of_range_label_named_when_ignore_index_wraps_in_its_dtype(dtype, stray, ignore):
    g = torch.Generator().manual_seed(0)
    p = torch.randint(0, 3, (2, 6, 7), generator=g)
    t = torch.randint(0, 3, (2, 6, 7), generator=g).to(dtype)
    t[0, 0, 0] = stray  # uint8 255 compared with -1 in uint8 was "ignored" and reached the counts
    with pytest.raises(ValueError, match="target has labels outside"):
        dice(p.to(dtype), t, 3, ignore_index=ignore)


def test_dice_ignore_index_in_range_of_a_narrow_dtype_still_ignored():
    g = torch.Generator().manual_seed(1)
    p = torch.randint(0, 3, (2, 6, 7), generator=g)
    t = torch.randint(0, 3, (2, 6, 7), generator=g)
    t8 = t.to(torch.uint8)
    t8[0, 0, 0] = 255
    t64 = t8.long()
    assert torch.equal(dice(p.to(torch.uint8), t8, 3, ignore_index=255), dice(p, t64, 3, ignore_index=255))


def _save(path, data, affine):
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti1Image(data, affine), str(path))


def test_register_label_map_shifted_by_whole_small_voxels_is_refused(tmp_path):
    from medfast.tasks.registration import RegistrationError, _load_label_map

    affine = np.diag([0.0005, 0.0005, 0.0005, 1.0])
    shifted = affine.copy()
    shifted[0, 3] = 2 * 0.0005  # two whole voxels: 1e-3 mm, within the old mm tolerance
    lab = np.zeros((8, 8, 8), np.uint8)
    _save(tmp_path / "lab.nii.gz", lab, shifted)
    with pytest.raises(RegistrationError, match="not on the same voxel grid"):
        _load_label_map(str(tmp_path / "lab.nii.gz"), "img.nii.gz", (8, 8, 8), affine)
    _save(tmp_path / "ok.nii.gz", lab, affine)
    assert _load_label_map(str(tmp_path / "ok.nii.gz"), "img.nii.gz", (8, 8, 8), affine).shape == (8, 8, 8)


def test_register_writes_its_outputs_for_a_mixed_case_fixed_file(tmp_path):
    from medfast.cli import main

    rng = np.random.default_rng(0)
    x = np.zeros((16, 14, 12), np.float32)
    x[4:12, 3:10, 3:9] = 100
    x += rng.normal(0, 1, x.shape).astype(np.float32)
    A = np.diag([1.5, 1.2, 2.0, 1.0])
    _save(tmp_path / "tmp_fixed.nii.gz", x, A)
    (tmp_path / "tmp_fixed.nii.gz").rename(tmp_path / "fixed.Nii.gz")
    _save(tmp_path / "moving.nii.gz", np.roll(x, 1, 0), A)
    rc = main(["register", str(tmp_path / "fixed.Nii.gz"), str(tmp_path / "moving.nii.gz"), "--out",
               str(tmp_path / "out"), "--affine-levels", "1", "--affine-iters", "2", "--deform-levels", "1",
               "--deform-iters", "2", "--kernel-size", "3", "--device", "cpu", "--no-progress"])
    assert rc == 0  # was 1: the outputs re-opened the fixed header as fixed.nii.gz
    assert any(p.name.endswith(".nii.gz") for p in (tmp_path / "out").iterdir())
