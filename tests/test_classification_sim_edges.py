"""Edge cases of the simulated standard-plane source: the world bounding box of an oblique volume, argument
checks (in the constructor and through ``medfast train``), and data set lengths against planes x volumes."""

from __future__ import annotations

import numpy as np
import pytest

from medfast.tasks.classification import SimulatedUltrasound, load_brain_volume
from medfast.train.config import ConfigError
from tests.test_classification_sim import write_config

NAN = float("nan")
SMALL = dict(volumes=["phantom:1", "phantom:2"], val_volumes=["phantom:3"], n_lines=32, n_samples=64,
             sub_rays=1, image_shape=(32, 32), voxel_mm=3.0, variants=2)


# ---- 1. the brain's bounding box is the world box of the mask, also for an oblique affine -------------------


def _rotation(ax: float, az: float) -> np.ndarray:
    cx, sx, cz, sz = np.cos(ax), np.sin(ax), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ rx


@pytest.mark.parametrize("tilt_deg", [0.0, 20.0, -20.0])
def test_bounding_box_is_the_world_box_of_the_mask(tmp_path, tilt_deg):
    """centre / half_extent were ``affine @ idx.min(0)`` and ``affine @ idx.max(0)``: the world image of the
    voxel-index box, which for a tilted acquisition (as_closest_canonical keeps the tilt) is not the world box
    of the mask, and the plane targets moved with it (axial_high at +0.05 or +0.46 of the half height, not
    +0.30, for a tilt of 20 degrees). Here against every mask voxel taken to world by numpy."""
    nib = pytest.importorskip("nibabel")
    g = np.arange(40) - 19.5
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    # an asymmetric blob: an ellipsoid with a lobe, so no corner of the index box is a mask voxel
    blob = ((x / 16) ** 2 + (y / 12) ** 2 + (z / 9) ** 2 <= 1) | (((x - 8) / 5) ** 2 + ((y + 9) / 7) ** 2
                                                                + ((z - 6) / 6) ** 2 <= 1)
    t1 = np.where(blob, 0.5 + 0.01 * (x + 20), 0.0).astype(np.float32)
    affine = np.eye(4)
    affine[:3, :3] = _rotation(np.radians(tilt_deg), np.radians(0.5 * tilt_deg)) @ np.diag([2.0, 2.5, 3.0])
    affine[:3, 3] = [-40.0, -50.0, -30.0]
    nib.save(nib.Nifti1Image(t1, affine), tmp_path / "t1.nii.gz")
    affine = nib.load(tmp_path / "t1.nii.gz").affine  # (as stored: float32)
    world = np.argwhere(blob) @ affine[:3, :3].T + affine[:3, 3]  # from the input, not from the loader's output
    lo, hi = world.min(0), world.max(0)
    v = load_brain_volume({"name": "tilted", "path": str(tmp_path / "t1.nii.gz")}, voxel_mm=None)
    np.testing.assert_allclose(v.centre, (lo + hi) / 2, atol=1e-9)
    np.testing.assert_allclose(v.half_extent, (hi - lo) / 2, atol=1e-9)
    # resampled to 2 mm: the box of the resampled mask (the one the loader returns)
    v = load_brain_volume({"name": "tilted", "path": str(tmp_path / "t1.nii.gz")}, voxel_mm=2.0)
    world = np.argwhere(v.mask) @ v.affine[:3, :3].T + v.affine[:3, 3]
    np.testing.assert_allclose(v.centre, (world.min(0) + world.max(0)) / 2, atol=1e-9)
    np.testing.assert_allclose(v.half_extent, (world.max(0) - world.min(0)) / 2, atol=1e-9)


# ---- 2. arguments: a ValueError naming the argument, not a TypeError or a silent truncation ---------------


@pytest.mark.parametrize("key,value", [
    ("variants", None), ("variants", NAN), ("variants", "2"), ("pose_bins", None), ("pose_bins", NAN),
    ("pose_bins", "4"), ("pose_bins", 2.5), ("n_lines", None), ("n_lines", 32.5), ("n_lines", 1),
    ("n_samples", None), ("n_samples", 64.5), ("depth_mm", None), ("depth_mm", "deep"), ("depth_mm", NAN),
    ("depth_mm", 0.0), ("seed", 1.7), ("seed", -1), ("seed", "x"), ("seed", None),
    ("image_shape", (40.9, 40)), ("image_shape", "88"), ("image_shape", None), ("image_shape", (32,)),
    ("image_shape", (32, "32")), ("image_shape", (32, 4)), ("image_shape", (32, NAN)),
])
def test_bad_arguments_raise_a_value_error_naming_them(key, value):
    with pytest.raises(ValueError, match=key):
        SimulatedUltrasound(**{**SMALL, "val_volumes": [], key: value})


def test_integral_floats_are_accepted_as_integers():
    # (YAML reads 4.0 as a float; a whole number is still fine)
    sim = SimulatedUltrasound(**{**SMALL, "val_volumes": [], "volumes": ["phantom:1"], "n_lines": 32.0,
                                 "n_samples": np.int64(64), "image_shape": (32.0, 24), "pose_bins": 4.0,
                                 "variants": 2.0, "seed": 3.0})
    assert sim.probes[0].n_lines == 32 and sim.probes[0].n_samples == 64 and sim.image_shape == (32, 24)
    assert (sim.pose_bins, sim.variants, sim.seed) == (4, 2, 3)
    assert all(type(v) is int for v in (*sim.image_shape, sim.pose_bins, sim.variants, sim.seed))


@pytest.mark.parametrize("override,match", [
    ("data.dataset_args.variants=null", "variants must be an integer >= 1, got None"),
    ("data.dataset_args.variants=.nan", "variants must be an integer >= 1, got nan"),
    ("data.dataset_args.pose_bins=null", "pose_bins must be an integer >= 1, got None"),
    ("data.dataset_args.pose_bins=1.0", r"pose_bins=1.0: the held_out_poses validation set needs pose_bins >= 2"),
    ("data.dataset_args.depth_mm=null", "depth_mm must be a number, got None"),
    ("data.dataset_args.n_lines=null", "n_lines must be an integer >= 2, got None"),
    ("data.dataset_args.n_lines=32.5", "n_lines must be an integer >= 2, got 32.5"),
    ("data.dataset_args.samples_per_epoch=6", "samples_per_epoch: 6 is less than planes x volumes of the train "
                                              "set = 4 x 2 = 8"),
    ("data.dataset_args.val_samples=6", r"samples \(val_samples in a config\): 6 is less than planes x volumes of "
                                        "the held_out_poses set = 4 x 2 = 8"),
])
def test_bad_dataset_args_are_config_errors_in_medfast_train(tmp_path, override, match):
    """These were raw TypeErrors / ValueErrors (a traceback in ``medfast train``) or silent truncations;
    ``pose_bins: 1.0`` passed the config check (an int check) and failed in the data set, outside the
    ValueError -> ConfigError wrapper."""
    from medfast.tasks.classification import ClassificationTask
    from medfast.train import load_config

    with pytest.raises(ConfigError, match=rf"data.dataset_args(: |\.){match}"):
        # (the task's constructor runs the config check, build_datasets the simulator's)
        ClassificationTask(load_config(write_config(tmp_path / "a.yaml", tmp_path / "o"), [override])).build_datasets()


def test_bad_dataset_args_in_medfast_train_name_the_key_without_a_traceback(tmp_path, capsys):
    from medfast.cli import main

    cfg = write_config(tmp_path / "a.yaml", tmp_path / "o")
    capsys.readouterr()
    assert main(["train", str(cfg), "--set", "data.dataset_args.depth_mm=null"]) == 1
    err = capsys.readouterr().err
    assert "data.dataset_args: depth_mm must be a number, got None" in err and "Traceback" not in err


# ---- 3. lengths: every (volume, plane) pair drawn, exactly balanced for a multiple of planes x volumes -------


def test_lengths_below_planes_times_volumes_are_refused():
    """The index fixes the volume ((i // C) % V) and the plane (i % C): with fewer than C x V items some
    training volume was never rendered, in any epoch."""
    sim = SimulatedUltrasound(**{**SMALL, "volumes": ["phantom:1", "phantom:2", "phantom:4"]})
    with pytest.raises(ValueError, match=r"samples_per_epoch: 8 is less than planes x volumes of the train set = "
                                         r"4 x 3 = 12, so some \(volume, plane\) pair would never be drawn"):
        sim.train_dataset(8)
    with pytest.raises(ValueError, match=r"samples \(val_samples in a config\): 11 is less than planes x volumes "
                                         "of the held_out_poses set = 4 x 3 = 12"):
        sim.validation_datasets(11)
    poses, volumes = sim.validation_datasets(12)  # the held-out volume set needs 4 x 1
    assert len(poses) == len(volumes) == 12
    for n in (12, 36):  # a multiple of C x V: every (volume, plane) pair n / (C V) times
        ds = sim.train_dataset(n)
        pairs = [(int(ds[i]["volume"]), int(ds[i]["label"])) for i in range(n)]
        assert sorted(set(pairs)) == [(v, c) for v in range(3) for c in range(4)]
        assert all(pairs.count(p) == n // 12 for p in set(pairs))
    ds = sim.train_dataset(14)  # otherwise the first n % (C V) pairs once more (as documented)
    pairs = [(int(ds[i]["volume"]), int(ds[i]["label"])) for i in range(14)]
    assert pairs.count((0, 0)) == pairs.count((0, 1)) == 2 and pairs.count((0, 2)) == 1


def test_the_renderer_leaves_pixels_outside_the_fan_black():
    """The renderer's scan conversion used the raw scan grid: grid_sample's zero padding bled one line spacing out
    of the fan (209 pixels up to 0.999 on a 64-line C5-2v), which simulate's frames no longer show."""
    import torch
    import torch.nn.functional as F

    sim = SimulatedUltrasound(**{**SMALL, "probes": ["C5-2v"], "n_lines": 64, "image_shape": (96, 96)})
    grid = sim._grid(0, torch.device("cpu"))
    raw, _ = sim.probes[0].scan_grid(device="cpu", dtype=torch.float32)
    raw = F.interpolate(raw.permute(0, 3, 1, 2), size=(96, 96), mode="bilinear", align_corners=True)
    outside = (raw.permute(0, 2, 3, 1)[0].abs() > 1 + 1e-6).any(-1)
    scan = torch.ones(1, 1, sim.probes[0].n_samples, sim.probes[0].n_lines)
    image = F.grid_sample(scan, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
    assert outside.any() and float(image[outside].max()) == 0.0
    assert torch.equal(grid[0][~outside], raw.permute(0, 2, 3, 1)[0][~outside])  # the fan itself unchanged
