"""`medfast simulate` and `medfast synthesize` chained: both write their NIfTI stacks with one header (the pixel
spacing in mm and the first pixel's probe-frame position, checked against the points the frames image), each
command replays the other's pose records (simulate.json, generate.json) and the shared pose formats with one
reader, and the vector flags take values that start with a minus sign."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medfast.cli import main
from medfast.tasks.synthesis import SynthesisTask
from medfast.train import Trainer, load_config
from medfast.ultrasound import Probe, simulate_ct

# a convex probe: its image starts off the array centre both laterally (x_min < 0) and in depth (z_min < 0)
PROBE = dict(probe="C5-2v", n_lines=32, n_samples=128, depth_mm=32)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """A 56^3 1 mm CT phantom (HU): soft tissue with a bone ball and a fluid ball (identity affine)."""
    n = 56
    i, j, k = np.meshgrid(*[np.arange(n)] * 3, indexing="ij")
    ct = np.full((n, n, n), 40.0, np.float32)
    ct[(i - 20) ** 2 + (j - 24) ** 2 + (k - 28) ** 2 < 64] = 1000.0
    ct[(i - 36) ** 2 + (j - 30) ** 2 + (k - 28) ** 2 < 49] = 0.0
    path = tmp_path_factory.mktemp("phantom") / "phantom_ct.nii.gz"
    nib.save(nib.Nifti1Image(ct, np.eye(4)), str(path))
    return path


def _config(out, phantom):
    overrides = [
        "task=synthesis", f"trainer.out_dir={out}", "trainer.batch_size=2", "trainer.max_steps=1",
        "trainer.val_every=0", "trainer.checkpoint_every=1", "trainer.progress=false", "trainer.tensorboard=false",
        "trainer.plots=false", "trainer.threads=1", "trainer.device=cpu", "model.spatial_dims=2",
        "model.channels=[8, 16]", "model.norm=batch", f"task_args.source={phantom}", "task_args.mode=pose",
        "task_args.noise_channels=1", "task_args.coord_frequencies=2", "task_args.image_rows=24",
        "task_args.disc_channels=8", "task_args.disc_layers=2", "task_args.position=[28, -1, 28]",
        "task_args.val_sets=1", "task_args.val_frames=3", "task_args.swd_patches=64", "task_args.samples_per_epoch=4",
        *(f"task_args.{k}={v}" for k, v in PROBE.items()),
    ]
    return load_config([], overrides)


@pytest.fixture(scope="module")
def run(tmp_path_factory, phantom):
    """A one-step synthesis checkpoint, its task and three held-out poses saved as .npy."""
    root = tmp_path_factory.mktemp("synth")
    Trainer(_config(root / "run", phantom)).fit()
    task = SynthesisTask(_config(root / "run", phantom))
    poses = task.validation_poses(10**13)[:3]
    np.save(root / "poses.npy", poses.numpy())
    return root, root / "run" / "checkpoints" / "last.pt", task, poses


def _simulate(phantom, poses_file, out, pixel):
    return main(["simulate", str(phantom), "--poses", str(poses_file), "--probe", PROBE["probe"], "--lines",
                 str(PROBE["n_lines"]), "--samples", str(PROBE["n_samples"]), "--depth", str(PROBE["depth_mm"]),
                 "--pixel", repr(pixel), "--device", "cpu", "--out", str(out)])


def _synthesize(ckpt, poses_file, out):
    return main(["synthesize", str(ckpt), "--poses", str(poses_file), "--device", "cpu", "--out", str(out)])


def _poses_of(path):
    return np.array(json.loads(path.read_text())["poses"])


def test_stacks_of_both_commands_share_one_header(run, phantom):
    root, ckpt, task, poses = run
    px = task.source.pixel_mm
    assert _synthesize(ckpt, root / "poses.npy", root / "G") == 0
    assert _simulate(phantom, root / "poses.npy", root / "S", px) == 0
    ref = nib.load(str(root / "S" / "frames.nii.gz"))
    for name in ("generated", "simulated"):
        img = nib.load(str(root / "G" / f"{name}.nii.gz"))
        assert img.shape == ref.shape == (task.source.width, task.source.height, 3)
        np.testing.assert_array_equal(img.affine, ref.affine)
        assert img.header.get_xyzt_units() == ref.header.get_xyzt_units() == ("mm", "unknown")
        for key in ref.header:  # dims, pixdim, qform / sform codes and rows, units: the whole header
            np.testing.assert_array_equal(img.header[key], ref.header[key], err_msg=f"{name}.nii.gz {key}")

    # the documented position: voxel (j, i, n) at x = x_min + j px (lateral), y = z_min + i px (depth), probe frame
    probe = Probe.preset(PROBE["probe"], n_lines=PROBE["n_lines"], n_samples=PROBE["n_samples"],
                         depth_mm=PROBE["depth_mm"])
    x0, _, z0, _ = probe.image_extent_mm()
    assert x0 < -1 and z0 < -1  # (the old synthesize header put the first pixel at (0, 0))
    ct = torch.from_numpy(np.asarray(nib.load(str(phantom)).dataobj))[None, None]
    with torch.no_grad():
        res = simulate_ct(ct, np.eye(4), poses.float(), probe, pixel_mm=px)
    np.testing.assert_allclose(ref.affine[:2, 3], (res.extent_mm[0], res.extent_mm[2]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ref.affine[:2, 3], (x0, z0), rtol=0, atol=1e-6)
    # ... which, through each pose, is the world point the synthesis frame's pixel images
    W, H, N = ref.shape
    jj, ii = np.meshgrid(np.arange(W), np.arange(H), indexing="ij")
    xy = ref.affine @ np.stack([jj.ravel(), ii.ravel(), np.zeros(jj.size), np.ones(jj.size)])
    probe_pts = np.stack([xy[0], np.zeros(jj.size), xy[1], np.ones(jj.size)])  # probe frame: y is the elevation
    world = np.einsum("nij,jk->nki", poses.numpy(), probe_pts)[..., :3].reshape(N, W, H, 3).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(world, task.source.plane_points(poses).numpy(), rtol=0, atol=1e-5)


def _write_plus(path, poses):
    lines = ["ObjectType = Image", "NDims = 3", f"DimSize = 8 6 {len(poses)}", "ElementType = MET_UCHAR"]
    for i, m in enumerate(poses):
        lines += [f"Seq_Frame{i:04d}_ProbeToTrackerTransform = " + " ".join(f"{v:.17g}" for v in m.reshape(-1)),
                  f"Seq_Frame{i:04d}_ProbeToTrackerTransformStatus = OK"]
    path.write_bytes(("\n".join([*lines, "ElementDataFile = LOCAL"]) + "\n").encode() + bytes(range(256)))


def test_each_command_reads_the_others_pose_records(run, phantom, capsys):
    root, ckpt, task, poses = run
    px = task.source.pixel_mm
    P = poses.numpy()
    # the references: both commands from the .npy
    if not (root / "G" / "generate.json").is_file():
        assert _synthesize(ckpt, root / "poses.npy", root / "G") == 0
    if not (root / "S" / "simulate.json").is_file():
        assert _simulate(phantom, root / "poses.npy", root / "S", px) == 0
    frames = np.asarray(nib.load(str(root / "S" / "frames.nii.gz")).dataobj)
    generated = np.asarray(nib.load(str(root / "G" / "generated.nii.gz")).dataobj)

    # medfast simulate replays its own record and medfast synthesize's
    for record in (root / "S" / "simulate.json", root / "G" / "generate.json"):
        out = root / f"S_{record.parent.name}"
        assert _simulate(phantom, record, out, px) == 0, capsys.readouterr().err
        np.testing.assert_array_equal(_poses_of(out / "simulate.json"), P)
        np.testing.assert_array_equal(np.asarray(nib.load(str(out / "frames.nii.gz")).dataobj), frames)

    # medfast synthesize reads medfast simulate's record and every format medfast simulate reads
    (root / "poses.csv").write_text("\n".join(",".join(f"{v:.17g}" for v in m.reshape(-1)) for m in P) + "\n")
    np.savez(root / "poses.npz", poses=P)
    _write_plus(root / "sweep.seq.mha", P)
    for source in (root / "S" / "simulate.json", root / "poses.csv", root / "poses.npz", root / "sweep.seq.mha"):
        out = root / f"G_{source.name}"
        assert _synthesize(ckpt, source, out) == 0, capsys.readouterr().err
        np.testing.assert_array_equal(_poses_of(out / "generate.json"), P)
        np.testing.assert_array_equal(np.asarray(nib.load(str(out / "generated.nii.gz")).dataobj), generated)

    # neither takes a file of another kind for poses
    capsys.readouterr()
    assert _synthesize(ckpt, phantom, root / "bad") == 1
    assert _simulate(phantom, phantom, root / "bad", px) == 1
    err = capsys.readouterr().err
    assert err.count("unsupported pose file format '.gz'") == 2 and ".json" in err and ".mha" in err
    assert "Traceback" not in err


def test_vector_flags_take_negative_values(tmp_path, phantom, capsys):
    # `--travel -10,0,0` was read as an option ("expected one argument"); `--travel=-10,0,0` worked
    common = ["simulate", str(phantom), "--probe", "L11-5v", "--lines", "16", "--samples", "64", "--depth", "20",
              "--frames", "2", "--tilt", "0", "--device", "cpu", "--start", "40,0,28"]
    vectors = {"--travel": "-10,0,-4", "--lateral": "-1,0,0", "--direction": "-0.1,1,0"}
    spaced = [s for flag, value in vectors.items() for s in (flag, value)]
    joined = [f"{flag}={value}" for flag, value in vectors.items()]
    assert main([*common, *spaced, "--out", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    assert main([*common, *joined, "--out", str(tmp_path / "b")]) == 0
    pa, pb = _poses_of(tmp_path / "a" / "simulate.json"), _poses_of(tmp_path / "b" / "simulate.json")
    np.testing.assert_array_equal(pa, pb)
    np.testing.assert_allclose(pa[-1, :3, 3] - pa[0, :3, 3], (-10, 0, -4), atol=1e-9)
    # --start too, and exponent forms (argparse took only plain numbers such as -1 or -.5 for values)
    from medfast.cli import build_parser

    args = build_parser().parse_args(["simulate", "--start", "-4,-16,-4", "--gain", "-1e1", "--centre", "-.5,0,1"])
    assert args.start == (-4.0, -16.0, -4.0) and args.gain == -10.0 and args.centre == (-0.5, 0.0, 1.0)
    assert build_parser().parse_args(["register", "f", "m", "--bending-weight", "-1e-3"]).bending_weight == -1e-3
    # a bad negative value now reaches the flag's own check
    with pytest.raises(SystemExit):
        main(["demo", "--magnitude", "-1e1"])
    err = capsys.readouterr().err
    assert "--magnitude" in err and "expected one argument" not in err
    # an option name is still an option
    with pytest.raises(SystemExit):
        main(["simulate", "--travel", "--frames", "2"])
    assert "--travel: expected one argument" in capsys.readouterr().err


def test_synthesize_and_predict_refuse_what_they_would_ignore(run, capsys):
    # (a dead-option hunt: --frames with --poses, and predict --probabilities on a synthesis checkpoint, were
    # accepted and ignored)
    root, ckpt, _, _ = run
    assert main(["synthesize", str(ckpt), "--poses", str(root / "poses.npy"), "--frames", "10", "--device", "cpu",
                 "--out", str(root / "F")]) == 1
    assert "--frames does not apply with --poses" in capsys.readouterr().err
    assert not (root / "F").exists()
    assert main(["predict", str(root / "poses.npy"), "--model", str(ckpt), "--probabilities", "--device", "cpu",
                 "--out", str(root / "P")]) != 0
    assert "--probabilities does not apply to synthesis checkpoints" in capsys.readouterr().err
    assert not (root / "P").exists()


def test_synthesize_without_matplotlib_removes_an_earlier_grid(run, monkeypatch):
    # (a hunt: grid.png of an earlier run stayed beside frames it did not show when figures were off)
    import medfast._figures

    root, ckpt, _, _ = run
    assert _synthesize(ckpt, root / "poses.npy", root / "G") == 0
    assert (root / "G" / "grid.png").is_file()
    monkeypatch.setattr(medfast._figures, "have_matplotlib", lambda: False)
    assert _synthesize(ckpt, root / "poses.npy", root / "G") == 0
    assert not (root / "G" / "grid.png").exists() and (root / "G" / "generate.json").is_file()
