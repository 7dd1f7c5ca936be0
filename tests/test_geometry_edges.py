"""Geometry edge cases of segmentation data and outputs: HD95 on sheared grids (test set, validation), same-grid
checks in voxels of the reference grid, coronal / sagittal single slices for 2D segmentation, relative singular
affine tests (tiny voxels), the probability map's 4th axis, and the augmentation's range messages."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")

import medfast.tasks.segmentation as seg  # noqa: E402
from medfast.data import DatasetError, NiftiDataset, io  # noqa: E402
from medfast.data.augment import AugmentConfig, check_augment_config  # noqa: E402
from medfast.data.io import image_header, load_image, load_nifti, single_slice_as_2d  # noqa: E402
from medfast.nets import UNet  # noqa: E402
from medfast.tasks.evaluation import evaluate_pair  # noqa: E402
from medfast.train import Trainer, config_to_dict  # noqa: E402
from tests.test_segmentation_space import _config, _oracle  # noqa: E402  (one oracle and config)


def _net(config):
    m = config.model
    return UNet(m.spatial_dims, m.in_channels, m.out_channels, m.channels, m.convs_per_level, m.norm,
                m.deep_supervision)


def _save_checkpoint(config, path):
    torch.save({"model": _net(config).state_dict(), "config": config_to_dict(config), "task": "segmentation"}, path)
    return path


def _save(path, data, affine, time_units=False):
    img = nib.Nifti1Image(data, affine)
    if time_units:
        img.header.set_xyzt_units("mm", "sec")
    else:
        img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return str(path)


# -- 1. HD95 on a sheared grid (gantry tilt) -------------------------------------------------------------------
SHEARED = np.array([[0.8, 0, 0, 0], [0, 0.8, 1.2, 0], [0, 0, 2.5, 0], [0, 0, 0, 1.0]])  # y shifts with z
UPRIGHT = np.diag([0.8, 0.8, 2.5, 1.0])


def _ellipsoids():
    g = np.indices((24, 24, 12)).astype(float)
    img = ((((g[0] - 12) / 7) ** 2 + ((g[1] - 10) / 6) ** 2 + ((g[2] - 6) / 3.5) ** 2) < 1).astype(np.float32)
    ref = ((((g[0] - 11) / 6) ** 2 + ((g[1] - 12) / 7) ** 2 + ((g[2] - 5.5) / 3) ** 2) < 1).astype(np.uint8)
    return img, ref


def _finish(tmp_path, affine):
    img, ref = _ellipsoids()
    test_img, test_lab = _save(tmp_path / "ti.nii.gz", img, affine), _save(tmp_path / "tl.nii.gz", ref, affine)
    config = _config(3, test_images=[test_img], test_labels=[test_lab])
    config.trainer.out_dir = str(tmp_path / "run")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    _save_checkpoint(config, tmp_path / "run" / "checkpoints" / "last.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = seg.SegmentationTask(config).finish(_net(config), torch.device("cpu"), tmp_path / "run")
    sheared = [w for w in caught if "not at right angles" in str(w.message)]
    return res, sheared, test_lab


def test_finish_gives_nan_hd95_and_a_warning_on_a_sheared_grid(tmp_path, monkeypatch):
    """The test set after training on a CT with gantry tilt: HD95 from per-axis voxel sizes was finite and wrong
    (2.884 mm against 2.532 mm in world space); now NaN (null in test_results.json) with one warning naming the
    label, as medfast evaluate scores it. Dice is still scored."""
    monkeypatch.setattr(seg, "predict_volume", _oracle)
    res, sheared, test_lab = _finish(tmp_path, SHEARED)
    [case] = res["test"]
    assert math.isnan(case["hd95_mm"][0])
    assert len(sheared) == 1 and test_lab in str(sheared[0].message)
    saved = json.loads((tmp_path / "run" / "test_results.json").read_text())
    assert saved["test"][0]["hd95_mm"] == [None]
    with warnings.catch_warnings():  # (evaluate warns as well)
        warnings.simplefilter("ignore")
        rows = evaluate_pair(case["prediction"], test_lab)
    assert case["dice"][0] == pytest.approx(rows[0]["dice"], abs=1e-6) and 0.5 < case["dice"][0] < 0.9


def test_finish_hd95_unchanged_on_an_upright_grid(tmp_path, monkeypatch):
    monkeypatch.setattr(seg, "predict_volume", _oracle)
    res, sheared, test_lab = _finish(tmp_path, UPRIGHT)
    [case] = res["test"]
    assert not sheared
    rows = evaluate_pair(case["prediction"], test_lab)
    assert math.isfinite(case["hd95_mm"][0]) and case["hd95_mm"][0] == pytest.approx(rows[0]["hd"], abs=1e-5)


@pytest.mark.parametrize("nd", [3, 2])
def test_validation_step_skips_hd_on_a_sheared_grid(monkeypatch, nd):
    """Validation's hd95_mean is NaN (left out of the trainer's mean) where the batch's affine has voxel axes not
    at right angles, finite on an upright grid; Dice is scored either way."""
    monkeypatch.setattr(seg, "predict_volume", _oracle)
    img, ref = _ellipsoids()
    if nd == 2:
        img, ref = img[..., 6], ref[..., 6]
        sheared, upright = np.array([[0.8, 0.5, 0], [0, 0.8, 0], [0, 0, 1.0]]), np.diag([0.8, 0.8, 1.0])
    else:
        sheared, upright = SHEARED, UPRIGHT
    task = seg.SegmentationTask(_config(nd))
    rows = {}
    for name, affine in (("sheared", sheared), ("upright", upright)):
        batch = {"image": torch.from_numpy(img)[None, None], "label": torch.from_numpy(ref)[None],
                 "affine": torch.from_numpy(affine)[None]}
        [rows[name]] = task.validation_step(None, batch, torch.device("cpu"))
    assert math.isnan(rows["sheared"]["hd95_mean"])
    assert math.isfinite(rows["upright"]["hd95_mean"]) and rows["upright"]["hd95_mean"] > 0
    assert rows["sheared"]["dice_1"] == rows["upright"]["dice_1"] > 0.5


# -- 2. same-grid checks in voxels of the reference grid ---------------------------------------------------------
SHIFTED = [(0.0005, 0.0, 2), (0.05, 800.0, 1)]  # voxel (mm), origin (mm), shift (whole voxels)


def _shifted_pair(tmp_path, vox, origin, shift):
    a = np.diag([vox, vox, vox, 1.0])
    a[:3, 3] = origin
    b = a.copy()
    b[0, 3] += shift * vox
    img = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    lab = np.zeros((16, 16, 16), np.uint8)
    lab[4:12, 4:12, 4:12] = 1
    return _save(tmp_path / "img.nii.gz", img, a), _save(tmp_path / "lab.nii.gz", lab, b), a, b


@pytest.mark.parametrize("vox, origin, shift", SHIFTED)
def test_dataset_refuses_a_label_shifted_by_whole_small_voxels(tmp_path, vox, origin, shift):
    """A tolerance of 1e-3 mm let a label 2 voxels off (0.5 um voxels) or 1 voxel off (0.05 mm voxels 800 mm from
    the origin) pass as on the image's grid; the test is now in the image's voxels."""
    img, lab, _, _ = _shifted_pair(tmp_path, vox, origin, shift)
    with pytest.raises(DatasetError, match="different affines") as info:
        NiftiDataset([img], [lab], spatial_dims=3, cache="none", num_classes=2)
    assert lab in str(info.value) and img in str(info.value)


@pytest.mark.parametrize("vox, origin, shift", SHIFTED)
def test_channel_files_shifted_by_whole_small_voxels_are_refused(tmp_path, vox, origin, shift):
    first, second, _, _ = _shifted_pair(tmp_path, vox, origin, shift)
    nib.save(nib.Nifti1Image(np.asarray(nib.load(second).dataobj).astype(np.float32), nib.load(second).affine),
             second)  # (an image channel, on the shifted grid)
    for read in (image_header, load_image):
        with pytest.raises(DatasetError, match="different affines") as info:
            read([first, second])
        assert f"channel file {second}" in str(info.value)
    with pytest.raises(DatasetError, match="different affines"):
        NiftiDataset([[first, second]], spatial_dims=3, cache="none")


def test_float32_rounding_differences_are_still_the_same_grid(tmp_path):
    """Affines equal up to float32 rounding (a sform written from another float64 computation, a qform's
    quaternion) are the same grid: an oblique 512 x 512 x 300 grid of 0.7 mm voxels 120 mm from the origin."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    a = np.eye(4)
    a[:3, :3] = q @ np.diag([0.7, 0.7, 1.2])
    a[:3, 3] = [-120.0, 95.0, -310.0]
    b = a.astype(np.float32).astype(np.float64)
    b[:3] *= 1 + rng.uniform(-1, 1, size=(3, 4)) * np.finfo(np.float32).eps
    assert io.same_grid(b, a, (512, 512, 300)) and io.same_grid(a, b, (512, 512, 300))
    # the files themselves (a sform rounded to float32 on each side)
    img = _save(tmp_path / "img.nii.gz", np.zeros((8, 8, 6), np.float32), a)
    lab = _save(tmp_path / "lab.nii.gz", np.zeros((8, 8, 6), np.uint8), b)
    NiftiDataset([img], [lab], spatial_dims=3, cache="none")
    chan = _save(tmp_path / "chan.nii.gz", np.zeros((8, 8, 6), np.float32), b)
    assert load_image([img, chan]).data.shape == (2, 8, 8, 6)
    # one voxel off along the slowest axis, or a 0.09 % spacing difference (voxel 511 half a voxel off), is not
    c = a.copy()
    c[:3, 3] += a[:3, 2]
    d = a @ np.diag([1.0009, 1, 1, 1])
    assert not io.same_grid(c, a, (512, 512, 300)) and not io.same_grid(d, a, (512, 512, 300))


def test_one_grid_check_for_evaluate_and_the_data_sets():
    import medfast.data.dataset as dataset
    import medfast.tasks.evaluation as evaluation

    assert evaluation.same_grid is io.same_grid and dataset.same_grid is io.same_grid


def test_single_slice_with_a_degenerate_flat_axis_is_on_its_grid(tmp_path):
    """A single slice (X, Y, 1) whose flat axis's column is zero (load_nifti reads it: the slice is placed by its
    two in-plane axes) is on its own grid, for the data set and for medfast evaluate, and off a shifted one."""
    a = np.diag([0.9, 1.1, 0.0, 1.0])

    def save(name, data, affine):
        img = nib.Nifti1Image(data, np.eye(4))
        img.set_sform(affine, code=2)
        nib.save(img, str(tmp_path / name))
        return str(tmp_path / name)

    lab = np.zeros((6, 5, 1), np.uint8)
    lab[2:4, 1:3] = 1
    img_path, lab_path = save("img.nii.gz", np.ones((6, 5, 1), np.float32), a), save("lab.nii.gz", lab, a)
    assert NiftiDataset([img_path], [lab_path], spatial_dims=2, cache="none")[0]["image"].shape == (1, 6, 5)
    assert evaluate_pair(lab_path, lab_path)[0]["dice"] == 1.0
    b = a.copy()
    b[1, 3] += 1.1
    with pytest.raises(DatasetError, match="different affines"):
        NiftiDataset([img_path], [save("lab_off.nii.gz", lab, b)], spatial_dims=2, cache="none")


# -- 3. coronal / sagittal single slices for 2D segmentation ---------------------------------------------------
VOLUME_AFFINE = np.array([[-0.9, 0, 0, 50], [0, 1.1, 0, -20], [0, 0, 1.3, 10], [0, 0, 0, 1.0]])


def _slice(tmp_path, axis, name="img"):
    """A coronal (axis 1: (X, 1, Z)) or sagittal (axis 0: (1, Y, Z)) slice of a volume, with its label, as
    nibabel's slicer stores it; and the same slice as a plain 2D file (X, Z) / (Y, Z) with its permuted affine."""
    shape = [20, 16, 18]
    g = np.indices(shape).astype(float)
    vol = (((g[0] - 10) / 6) ** 2 + ((g[1] - 8) / 5) ** 2 + ((g[2] - 9) / 5) ** 2 < 1).astype(np.float32)
    cut = [slice(None)] * 3
    cut[axis] = slice(8, 9)
    img = nib.Nifti1Image(vol, VOLUME_AFFINE).slicer[tuple(cut)]
    data, affine = np.asarray(img.dataobj), img.affine
    paths = {"img": _save(tmp_path / f"{name}.nii.gz", data, affine),
             "lab": _save(tmp_path / f"{name}_lab.nii.gz", (data > 0.5).astype(np.uint8), affine)}
    affine = nib.load(paths["img"]).affine  # (as stored: float32)
    flat, flat_aff = single_slice_as_2d(data, affine)
    paths["img2d"] = _save(tmp_path / f"{name}2d.nii.gz", np.ascontiguousarray(flat), flat_aff)
    paths["lab2d"] = _save(tmp_path / f"{name}2d_lab.nii.gz", (flat > 0.5).astype(np.uint8), flat_aff)
    return paths, data, affine


@pytest.mark.parametrize("axis", [1, 0])
@pytest.mark.parametrize("reorient", [True, False])
def test_dataset_reads_a_coronal_or_sagittal_slice_as_2d(tmp_path, axis, reorient):
    """(X, 1, Z) / (1, Y, Z) was refused as "a 3D volume" for spatial_dims=2; it now reads as the same slice
    stored as a 2D file (image, label and affine alike)."""
    paths, _, _ = _slice(tmp_path, axis)
    kw = {"spatial_dims": 2, "cache": "none", "normalize": "none", "reorient": reorient, "num_classes": 2}
    item = NiftiDataset([paths["img"]], [paths["lab"]], **kw)[0]
    flat = NiftiDataset([paths["img2d"]], [paths["lab2d"]], **kw)[0]
    assert item["image"].shape[0] == 1 and item["image"].dim() == 3
    for key in ("image", "label", "affine"):
        assert torch.equal(item[key], flat[key]), key
    assert item["label"].sum() > 10


def test_a_3d_volume_is_still_refused_for_2d(tmp_path):
    path = _save(tmp_path / "vol.nii.gz", np.zeros((6, 5, 4), np.float32), np.eye(4))
    with pytest.raises(DatasetError, match="needs 2D images, got a 3D volume"):
        NiftiDataset([path], spatial_dims=2, cache="none")


def test_train_one_step_on_coronal_slices(tmp_path):
    paths, _, _ = _slice(tmp_path, 1)
    config = _config(2, train_images=[paths["img"]], train_labels=[paths["lab"]], test_images=[paths["img"]],
                     test_labels=[paths["lab"]])
    config.trainer.out_dir = str(tmp_path / "run")
    Trainer(config).fit()
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    seg_out = nib.load(str(tmp_path / "run" / "test" / "img_seg.nii.gz"))
    assert seg_out.shape == (20, 1, 18)
    [case] = json.loads((tmp_path / "run" / "test_results.json").read_text())["test"]
    assert len(case["dice"]) == 1


@pytest.mark.parametrize("axis, stored", [(1, (20, 1, 18)), (0, (1, 16, 18))])
def test_predict_a_coronal_or_sagittal_slice_in_its_stored_layout(tmp_path, monkeypatch, axis, stored):
    """predict on (X, 1, Z) / (1, Y, Z): the label map and the probabilities keep the input's layout and affine, and
    the segmentation is that of the same slice stored as a 2D file."""
    monkeypatch.setattr(seg, "predict_volume", _oracle)
    ckpt = _save_checkpoint(_config(2), tmp_path / "m2.pt")
    paths, data, affine = _slice(tmp_path, axis)
    out = seg.predict_files(ckpt, [paths["img"]], tmp_path / "out", device="cpu", progress=False,
                            save_probabilities=True)
    seg_img, prob_img = (nib.load(str(p)) for p in out)
    assert seg_img.shape == stored and prob_img.shape == (*stored, 2)
    np.testing.assert_array_equal(seg_img.affine, affine)
    np.testing.assert_array_equal(prob_img.affine, affine)
    labels = np.asarray(seg_img.dataobj)
    np.testing.assert_array_equal(labels, data > 0.5)
    np.testing.assert_array_equal(np.asarray(prob_img.dataobj).argmax(-1), labels)
    (flat,) = seg.predict_files(ckpt, [paths["img2d"]], tmp_path / "out2d", device="cpu", progress=False)
    np.testing.assert_array_equal(single_slice_as_2d(labels, affine)[0], np.asarray(nib.load(str(flat)).dataobj))


def test_predict_axial_2d_layouts_unchanged(tmp_path, monkeypatch):
    monkeypatch.setattr(seg, "predict_volume", _oracle)
    ckpt = _save_checkpoint(_config(2), tmp_path / "m2.pt")
    a = np.diag([0.5, 0.8, 3.0, 1.0])
    for shape in ((12, 10, 1), (12, 10), (1, 10, 1)):
        x = np.zeros(shape, np.float32)
        x[0:8, 2:7] = 1
        src = _save(tmp_path / f"in{len(shape)}{shape[0]}.nii.gz", x, a)
        seg_out, prob_out = (nib.load(str(p)) for p in seg.predict_files(
            ckpt, [src], tmp_path / "out", device="cpu", progress=False, save_probabilities=True))
        assert seg_out.shape == shape and prob_out.shape == (*shape[:2], 1, 2)
        np.testing.assert_array_equal(seg_out.affine, nib.load(src).affine)
        np.testing.assert_array_equal(prob_out.affine, nib.load(src).affine)


# -- 4. singular affines: a relative test ---------------------------------------------------------------------
@pytest.mark.parametrize("vox", [1e-3, 1e-4, 1e-5])
def test_tiny_voxels_are_not_singular(tmp_path, vox):
    """0.1 um voxels (1e-12 mm^3) were refused as singular by an absolute bound; register's reader accepted them."""
    path = _save(tmp_path / "tiny.nii.gz", np.ones((8, 8, 8), np.float32), np.diag([vox, vox, vox, 1.0]))
    assert load_nifti(path).data.shape == (1, 8, 8, 8)
    flat = _save(tmp_path / "tiny2d.nii.gz", np.ones((8, 8, 1), np.float32), np.diag([vox, vox, vox, 1.0]))
    assert load_nifti(flat).data.shape == (1, 8, 8, 1)


@pytest.mark.parametrize("vox", [1e-3, 1e-4, 1e-5])
def test_tiny_voxels_are_not_singular_for_the_simulator(tmp_path, vox):
    from medfast.ultrasound.io import read_volume

    path = _save(tmp_path / "tiny.nii.gz", np.ones((8, 8, 8), np.float32), np.diag([vox, vox, vox, 1.0]))
    assert read_volume(path)[0].shape == (8, 8, 8)


def test_singular_affines_are_refused_relative_to_the_voxel_size(tmp_path):
    """A zero voxel size, and 1 mm voxel axes 1e-8 rad from parallel (which the absolute bound let through:
    register's reader refused it), are refused by both readers."""
    from medfast.ultrasound.io import read_volume

    for name, lin in (("parallel", [[1, 1, 0], [0, 1e-8, 0], [0, 0, 1]]), ("zero", [[1, 0, 0], [0, 1, 0], [0, 0, 0]])):
        a = np.eye(4)
        a[:3, :3] = lin
        img = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4))
        img.set_sform(a, code=2)
        img.header.set_xyzt_units("mm")
        path = str(tmp_path / f"{name}.nii.gz")
        nib.save(img, path)
        with pytest.raises(DatasetError, match="singular"):
            load_nifti(path)
        with pytest.raises(ValueError, match="singular"):
            read_volume(path)


# -- 5. the probability map's 4th axis holds classes, not time ------------------------------------------------------
@pytest.mark.parametrize("shape, nd", [((12, 10, 9, 1), 3), ((12, 10, 1), 2)])
def test_probability_map_has_no_time_axis(tmp_path, monkeypatch, shape, nd):
    """The input's TR (pixdim[4] = 2.5) and time unit (sec) made viewers show the classes as a time series."""
    monkeypatch.setattr(seg, "predict_volume", _oracle)
    ckpt = _save_checkpoint(_config(nd), tmp_path / "m.pt")
    x = np.zeros(shape, np.float32)
    x[3:8, 2:7] = 1
    img = nib.Nifti1Image(x, np.diag([0.9, 1.1, 3.0, 1.0]))
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = 2.5
    nib.save(img, str(tmp_path / "in.nii.gz"))
    seg_out, prob_out = seg.predict_files(ckpt, [str(tmp_path / "in.nii.gz")], tmp_path / "out", device="cpu",
                                          progress=False, save_probabilities=True)
    h = nib.load(str(prob_out)).header
    assert h["pixdim"][4] == 1.0 and h.get_xyzt_units() == ("mm", "unknown")
    np.testing.assert_allclose(h.get_zooms()[:3], [0.9, 1.1, 3.0])
    assert nib.load(str(seg_out)).header.get_xyzt_units()[0] == "mm"
    assert nib.load(str(tmp_path / "in.nii.gz")).header.get_xyzt_units() == ("mm", "sec")


# -- 6. the augmentation's range messages ------------------------------------------------------------------------
@pytest.mark.parametrize("key, meaning", [
    ("deform_magnitude", "a standard deviation, not a bound"),
    ("noise_std", "the largest noise standard deviation"),
    ("bias_field", "the standard deviation of the log bias field"),
    ("rotation", "a range: +- that much"),
    ("gamma", "a range: +- that much"),
])
def test_augment_range_messages_say_what_the_value_is(key, meaning):
    """deform_magnitude is a standard deviation (RandomAugment), not a +- range as the shared message said."""
    with pytest.raises(ValueError, match=f"augment.{key} must be >= 0 and finite") as info:
        check_augment_config(AugmentConfig(**{key: -1.0}))
    assert meaning in str(info.value)
    if key not in ("rotation", "gamma"):
        assert "+-" not in str(info.value)
