"""Tracked probe poses from a file (medfast.ultrasound.read_poses, `medfast simulate --poses`): every format round
trips known poses, the quaternion convention against scipy's Rotation, scalar-first / scalar-last headers, units,
the order of calibration and inversion on a pose that must image a known point, PLUS / IGSIO headers with a frame
whose status is not OK, errors naming the file and the line / frame, and the command end to end."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from medfast.cli import main
from medfast.ultrasound import Probe, look_at, read_poses, simulate_ct
from medfast.ultrasound.cli import SWEEP_FLAGS
from medfast.ultrasound.poses import quaternion_to_matrix

B = 5


def _known(n=B, seed=0):
    rot = Rotation.random(n, random_state=seed)
    m = np.tile(np.eye(4), (n, 1, 1))
    m[:, :3, :3] = rot.as_matrix()
    m[:, :3, 3] = np.random.default_rng(seed).uniform(-80, 80, (n, 3))
    return m, rot


def _rigid(rotvec, t):
    m = np.eye(4)
    m[:3, :3] = Rotation.from_rotvec(rotvec).as_matrix()
    m[:3, 3] = t
    return m


# --- each format round trips ---------------------------------------------------------------------------------------
def test_npy_and_npz_round_trip(tmp_path):
    poses, _ = _known()
    np.save(tmp_path / "p.npy", poses)
    np.save(tmp_path / "one.npy", poses[2])
    np.save(tmp_path / "top.npy", poses[:, :3].astype(np.float32))  # (B, 3, 4), float32
    np.savez(tmp_path / "named.npz", times=np.arange(B), poses=poses)
    np.savez(tmp_path / "single.npz", poses)
    for name in ("p.npy", "named.npz", "single.npz"):
        out = read_poses(tmp_path / name)
        assert out.dtype == torch.float64 and out.shape == (B, 4, 4)
        np.testing.assert_array_equal(out.numpy(), poses)
    np.testing.assert_array_equal(read_poses(tmp_path / "one.npy").numpy(), poses[2:3])
    np.testing.assert_allclose(read_poses(tmp_path / "top.npy").numpy(), poses, atol=1e-5)
    np.savez(tmp_path / "two.npz", a=poses, b=poses)
    with pytest.raises(ValueError, match=r"two\.npz.*'poses'"):
        read_poses(tmp_path / "two.npz")


@pytest.mark.parametrize("sep", [",", " ", "\t"])
@pytest.mark.parametrize("cols", [16, 12])
@pytest.mark.parametrize("header", [False, True])
def test_text_matrix_rows_round_trip(tmp_path, sep, cols, header):
    poses, _ = _known()
    path = tmp_path / ("p.csv" if sep == "," else "p.txt")
    rows = [sep.join(f"{v:.17g}" for v in m.reshape(-1)[:cols]) for m in poses]
    names = [f"m{i}{j}" for i in range(cols // 4) for j in range(4)]
    path.write_text("\n".join(([sep.join(names)] if header else []) + ["# a comment", *rows, ""]))
    np.testing.assert_array_equal(read_poses(path).numpy(), poses)


def test_savetxt_4x4_blocks(tmp_path):
    poses, _ = _known()
    np.savetxt(tmp_path / "one.txt", poses[0])  # a calibration matrix as numpy writes it
    np.testing.assert_array_equal(read_poses(tmp_path / "one.txt").numpy(), poses[:1])
    np.savetxt(tmp_path / "all.txt", poses.reshape(-1, 4))
    np.testing.assert_array_equal(read_poses(tmp_path / "all.txt").numpy(), poses)


def test_json_layouts_round_trip(tmp_path):
    # the layouts medfast simulate (simulate.json) and medfast synthesize (generate.json) record, a bare list, one
    # matrix; the values are Python floats, which JSON keeps exactly
    poses, _ = _known()
    layouts = {"list.json": poses.tolist(), "simulate.json": {"probe": "L11-5v", "frames": B, "poses": poses.tolist()},
               "generate.json": {"psnr": None, "swd": float("nan"), "poses": poses.tolist()},
               "top.json": poses[:, :3].tolist()}
    for name, data in layouts.items():
        (tmp_path / name).write_text(json.dumps(data))
        out = read_poses(tmp_path / name)
        assert out.dtype == torch.float64 and out.shape == (B, 4, 4), name
        np.testing.assert_array_equal(out.numpy(), poses, err_msg=name)
    (tmp_path / "one.json").write_text(json.dumps(poses[2].tolist()))
    np.testing.assert_array_equal(read_poses(tmp_path / "one.json").numpy(), poses[2:3])
    # units, inversion and calibration apply as to every format
    np.testing.assert_allclose(read_poses(tmp_path / "list.json", units="cm")[:, :3, 3].numpy(), poses[:, :3, 3] * 10)


def test_json_errors_are_named(tmp_path):
    poses, _ = _known(3)
    path = tmp_path / "p.json"
    for text, match in (
        ("{not json", r"p\.json: not valid JSON"),
        (json.dumps({"frames": 3, "probe": "C5-2v"}), r"p\.json: a JSON object must hold the poses under the key "
                                                       r"'poses'.*'frames', 'probe'"),
        (json.dumps([[1, 2], [3, 4]]), r"p\.json: the JSON list must be \(4, 4\) or \(B, 4, 4\)"),
        (json.dumps({"poses": [poses[0].tolist(), poses[1, :2].tolist()]}), r"its 'poses' must be a list of 4x4 "
                                                                             r"matrices of numbers"),
        (json.dumps([[["a"] * 4] * 4]), r"must be a list of 4x4 matrices of numbers"),
        (json.dumps({"poses": []}), r"must be \(4, 4\)"),
    ):
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            read_poses(path)
    bad = poses.copy()
    bad[1, 0, 3] = np.nan  # written as null, as medfast writes a NaN
    path.write_text(json.dumps({"poses": [[[None if np.isnan(v) else v for v in row] for row in m] for m in bad]}))
    with pytest.raises(ValueError, match=r"p\.json pose 1: not a rigid transform: holds NaN"):
        read_poses(path)


@pytest.mark.parametrize("name", ["ct.nii.gz", "model.pt", "run.yaml", "poses"])
def test_unsupported_suffix_is_named(tmp_path, name):
    # a NIfTI or a checkpoint used to reach the text parser and fail as "not a number" on its first line
    poses, _ = _known(2)
    np.savetxt(tmp_path / name, poses.reshape(2, 16))
    with pytest.raises(ValueError, match=r"unsupported pose file format .*\.npy, \.npz, \.json, \.csv.*\.seq\.mha"):
        read_poses(tmp_path / name)
    if not name.endswith(".gz"):  # (np.savetxt gzips a .gz)
        np.testing.assert_array_equal(read_poses(tmp_path / name, format="text").numpy(), poses)  # format= reads it


# --- position + quaternion ---------------------------------------------------------------------------------------
def test_quaternion_formula_matches_scipy():
    rot = Rotation.random(50, random_state=3)
    np.testing.assert_allclose(quaternion_to_matrix(rot.as_quat(scalar_first=True)), rot.as_matrix(), atol=1e-14)
    # by hand: 90 degrees about z takes x to y (an active rotation, Hamilton)
    c = np.sqrt(0.5)
    np.testing.assert_allclose(quaternion_to_matrix(np.array([c, 0, 0, c])) @ [1, 0, 0], [0, 1, 0], atol=1e-15)


@pytest.mark.parametrize("layout", ["scalar_first", "scalar_last_tum", "shuffled_ros"])
def test_position_quaternion_csv(tmp_path, layout):
    poses, rot = _known()
    t = poses[:, :3, 3]
    if layout == "scalar_first":
        q = rot.as_quat(scalar_first=True)
        header, cols = "x,y,z,qw,qx,qy,qz", np.concatenate([t, q], 1)
        sep = ","
    elif layout == "scalar_last_tum":  # TUM: timestamp tx ty tz qx qy qz qw
        q = rot.as_quat()
        header, cols = "# timestamp tx ty tz qx qy qz qw\ntimestamp tx ty tz qx qy qz qw", \
            np.concatenate([np.arange(B)[:, None] * 0.05, t, q], 1)
        sep = " "
    else:  # ROS-style names, any order, extra columns ignored
        q = rot.as_quat()
        header = ",".join(f"field.pose.{n}" for n in ("orientation.x", "position.z", "frame", "orientation.w",
                                                       "position.x", "orientation.z", "position.y", "orientation.y"))
        cols = np.stack([q[:, 0], t[:, 2], np.arange(B), q[:, 3], t[:, 0], q[:, 2], t[:, 1], q[:, 1]], 1)
        sep = ","
    path = tmp_path / "track.csv"
    path.write_text(header + "\n" + "\n".join(sep.join(f"{v:.17g}" for v in r) for r in cols) + "\n")
    out = read_poses(path).numpy()
    np.testing.assert_allclose(out[:, :3, :3], rot.as_matrix(), atol=1e-12)
    np.testing.assert_array_equal(out[:, :3, 3], t)
    np.testing.assert_array_equal(out[:, 3], np.tile([0.0, 0, 0, 1], (B, 1)))


def test_quaternion_header_errors(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text("x,y,qw,qx,qy,qz\n1,2,1,0,0,0\n")
    with pytest.raises(ValueError, match=r"q\.csv line 1: .*none for z"):
        read_poses(path)
    path.write_text("x,y,z,qw,qx,qy,qz\n1,2,3,1,0,0,0\n1,2,3,2,0,0,0\n")
    with pytest.raises(ValueError, match=r"q\.csv line 3 \(pose 1\): the quaternion .* norm 2"):
        read_poses(path)
    path.write_text("x,y,z,qw,qx,qy,qz\n1,2,3,nan,0,0,0\n")
    with pytest.raises(ValueError, match=r"q\.csv line 2 \(pose 0\).*NaN"):
        read_poses(path)


# --- units, calibration, inversion -------------------------------------------------------------------------------
@pytest.mark.parametrize("units, scale", [("m", 1000.0), ("cm", 10.0), ("mm", 1.0)])
def test_units_scale_translations_only(tmp_path, units, scale):
    poses, _ = _known()
    in_units = poses.copy()
    in_units[:, :3, 3] /= scale
    np.save(tmp_path / "p.npy", in_units)
    out = read_poses(tmp_path / "p.npy", units=units).numpy()
    np.testing.assert_allclose(out, poses, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="units must be one of"):
        read_poses(tmp_path / "p.npy", units="inch")


def test_calibration_and_invert_image_the_known_point(tmp_path):
    # The true probe pose images target T on its beam axis at 40 mm depth. The tracker gives the pose of the sensor
    # (marker) on the probe, S = P @ inv(C), with C the probe-to-sensor calibration: world <- sensor <- probe.
    target = np.array([12.0, -30.0, 55.0])
    direction = np.array([0.3, 1.0, -0.2]) / np.linalg.norm([0.3, 1.0, -0.2])
    true_pose = look_at(target - 40 * direction, direction, (1.0, 0.0, 0.5)).numpy()
    calib = _rigid([0.4, -0.9, 0.3], [15.0, -5.0, 80.0])  # the marker ~80 mm up the handle, turned
    sensor = true_pose @ np.linalg.inv(calib)
    np.save(tmp_path / "sensor.npy", sensor[None])
    np.save(tmp_path / "world_to_sensor.npy", np.linalg.inv(sensor)[None])
    np.savetxt(tmp_path / "calib.txt", calib)
    for pose in (read_poses(tmp_path / "sensor.npy", calibration=calib),
                 read_poses(tmp_path / "sensor.npy", calibration=tmp_path / "calib.txt"),
                 read_poses(tmp_path / "sensor.npy", calibration=torch.from_numpy(calib)),
                 read_poses(tmp_path / "world_to_sensor.npy", invert=True, calibration=calib)):
        np.testing.assert_allclose(pose[0].numpy(), true_pose, atol=1e-9)
        probe_point = np.linalg.inv(pose[0].numpy()) @ np.append(target, 1.0)
        np.testing.assert_allclose(probe_point[:3], [0.0, 0.0, 40.0], atol=1e-9)  # on the axis, 40 mm deep
    wrong = calib @ sensor  # the calibration on the left: not the pose
    assert np.abs(wrong - true_pose).max() > 1.0
    # units scale the file, not the calibration (mm)
    np.save(tmp_path / "sensor_m.npy", _scaled(sensor, 1e-3)[None])
    np.testing.assert_allclose(read_poses(tmp_path / "sensor_m.npy", units="m", calibration=calib)[0].numpy(),
                               true_pose, atol=1e-9)
    with pytest.raises(ValueError, match="calibration: not a rigid transform: it is scaled by 2"):
        read_poses(tmp_path / "sensor.npy", calibration=np.diag([2.0, 2, 2, 1]))


def _scaled(m, s):
    m = m.copy()
    m[..., :3, 3] *= s
    return m


# --- PLUS / IGSIO sequence headers -------------------------------------------------------------------------------
def _plus(path, poses, status, extra_binary=True):
    lines = ["ObjectType = Image", "NDims = 3", f"DimSize = 8 6 {len(poses)}", "ElementType = MET_UCHAR",
             "UltrasoundImageOrientation = MF"]
    ref = _rigid([0.1, 0.2, 0.3], [1.0, 2.0, 3.0])
    for i, (m, st) in enumerate(zip(poses, status, strict=True)):
        flat = " ".join(f"{v:.17g}" for v in m.reshape(-1))
        lines += [f"Seq_Frame{i:04d}_FrameNumber = {i}",
                  f"Seq_Frame{i:04d}_ReferenceToTrackerTransform = " + " ".join(f"{v:.17g}" for v in ref.reshape(-1)),
                  f"Seq_Frame{i:04d}_ReferenceToTrackerTransformStatus = OK",
                  f"Seq_Frame{i:04d}_ProbeToTrackerTransform = {flat}",
                  f"Seq_Frame{i:04d}_ProbeToTrackerTransformStatus = {st}",
                  f"Seq_Frame{i:04d}_Timestamp = {i * 0.1:.3f}", f"Seq_Frame{i:04d}_ImageStatus = OK"]
    lines.append("ElementDataFile = LOCAL")
    data = ("\n".join(lines) + "\n").encode()
    if extra_binary:  # pixel data: bytes that are not header lines (no '=', not UTF-8): must never be parsed
        data += bytes(range(256)) * 4 + b"\xff\xfe no equals\nSeq_Frame0000_ProbeToTrackerTransform = x"
    path.write_bytes(data)
    return ref


def test_plus_sequence_header_skips_frames_not_ok(tmp_path):
    poses, _ = _known(4)
    path = tmp_path / "sweep.seq.mha"
    ref = _plus(path, poses, ["OK", "OK", "INVALID", "OK"])
    with pytest.warns(UserWarning, match=r"skipped 1 of 4 frames whose ProbeToTrackerTransformStatus is not OK "
                                         r"\(frames 2\)"):
        out = read_poses(path)  # default: ProbeToTracker, not the reference marker's ReferenceToTracker
    np.testing.assert_array_equal(out.numpy(), poses[[0, 1, 3]])
    with pytest.raises(ValueError, match=r"sweep\.seq\.mha frame 2 \(Seq_Frame0002_ProbeToTrackerTransform\): "
                                         r"status 'INVALID'"):
        read_poses(path, invalid="error")
    np.testing.assert_array_equal(read_poses(path, transform="ReferenceToTrackerTransform").numpy(),
                                  np.tile(ref, (4, 1, 1)))
    with pytest.raises(ValueError, match=r"no frame holds the transform 'StylusToTracker'.*ProbeToTracker"):
        read_poses(path, transform="StylusToTracker")
    mhd = tmp_path / "sweep.mhd"  # a detached header (pixel data in another file, not read)
    _plus(mhd, poses, ["OK"] * 4, extra_binary=False)
    np.testing.assert_array_equal(read_poses(mhd).numpy(), poses)


def test_plus_frame_that_is_not_rigid_is_named(tmp_path):
    poses, _ = _known(3)
    poses[1, :3, :3] *= 0.2  # an ImageToProbe-like pixel scale
    _plus(tmp_path / "s.mha", poses, ["OK"] * 3)
    with pytest.raises(ValueError, match=r"s\.mha frame 1 \(Seq_Frame0001_ProbeToTrackerTransform\): not a rigid "
                                         r"transform: it is scaled by 0\.2"):
        read_poses(tmp_path / "s.mha")


# --- errors name the file, the line and the problem --------------------------------------------------------------
def _rows(path, poses):
    path.write_text("\n".join(",".join(f"{v:.17g}" for v in m.reshape(-1)) for m in poses) + "\n")


@pytest.mark.parametrize("damage, match", [
    (lambda m: m.__setitem__((2, slice(0, 3), slice(0, 3)), m[2, :3, :3] * 1.5), r"line 3 \(pose 2\).*scaled by 1\.5"),
    (lambda m: m.__setitem__((2, slice(None), 0), -m[2, :, 0]), r"line 3 \(pose 2\).*reflected"),
    (lambda m: m.__setitem__((2, 0, 3), np.nan), r"line 3 \(pose 2\).*NaN"),
    (lambda m: m.__setitem__((2, 3, 0), 0.5), r"line 3 \(pose 2\).*last row"),
    (lambda m: m.__setitem__((2, 0, 1), m[2, 0, 1] + 0.1), r"line 3 \(pose 2\).*not a rotation"),
])
def test_non_rigid_rows_are_named(tmp_path, damage, match):
    poses, _ = _known()
    damage(poses)
    _rows(tmp_path / "bad.csv", poses)
    with pytest.raises(ValueError, match=r"bad\.csv " + match):
        read_poses(tmp_path / "bad.csv")
    np.save(tmp_path / "bad.npy", poses)
    with pytest.raises(ValueError, match=r"bad\.npy pose 2: not a rigid transform"):
        read_poses(tmp_path / "bad.npy")


def test_bad_rows_are_named(tmp_path):
    poses, _ = _known(3)
    path = tmp_path / "bad.csv"
    _rows(path, poses)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1] + ",7", lines[2]]))
    with pytest.raises(ValueError, match=r"bad\.csv line 2 \(pose 1\): expected 16 numbers .* got 17"):
        read_poses(path)
    path.write_text("\n".join([lines[0], lines[1], lines[2].replace(lines[2].split(",")[5], "abc", 1)]))
    with pytest.raises(ValueError, match=r"bad\.csv line 3 \(pose 2\): 'abc' is not a number"):
        read_poses(path)
    path.write_text("# only a comment\n")
    with pytest.raises(ValueError, match="holds no poses"):
        read_poses(path)
    with pytest.raises(FileNotFoundError, match="no such pose file"):
        read_poses(tmp_path / "missing.csv")


# --- medfast simulate --poses ------------------------------------------------------------------------------------
SIM = ["--lines", "16", "--samples", "64", "--device", "cpu", "--probe", "L11-5v", "--depth", "20"]


def _ct(tmp_path):
    ct = np.full((24, 24, 24), 40, np.int16)
    ct[10:14] = 1200
    ct[:, 5:8, 15:18] = -100
    nib.save(nib.Nifti1Image(ct, np.eye(4)), str(tmp_path / "ct.nii.gz"))
    return ct


def _cli_poses():
    return torch.stack([look_at((2.0, 6 + k, 12 - k), (1.0, 0.1 * k, 0.0), (0.0, 1.0, 0.2)) for k in range(3)])


def _frames(out):
    return np.asarray(nib.load(str(out / "frames.nii.gz")).dataobj).transpose(2, 1, 0)


def test_simulate_command_with_poses_equals_simulate(tmp_path):
    ct = _ct(tmp_path)
    poses = _cli_poses()
    np.save(tmp_path / "poses.npy", poses.numpy())
    out = tmp_path / "out"
    assert main(["simulate", str(tmp_path / "ct.nii.gz"), *SIM, "--batch", "2", "--poses", str(tmp_path / "poses.npy"),
                 "--out", str(out)]) == 0
    probe = Probe.preset("L11-5v", n_lines=16, n_samples=64, depth_mm=20.0)
    with torch.no_grad():
        ref = simulate_ct(torch.from_numpy(ct).float()[None, None], np.eye(4), poses.float(), probe).bmode[:, 0]
    frames = _frames(out)
    assert frames.shape[0] == 3 and frames.std() > 0
    np.testing.assert_array_equal(frames, ref.numpy())
    summary = json.loads((out / "simulate.json").read_text())
    assert summary["frames"] == 3 and summary["poses_file"] == str(tmp_path / "poses.npy")
    np.testing.assert_array_equal(np.array(summary["poses"]), poses.numpy())

    # the same probe poses as sensor poses in metres (CSV, quaternions) with a calibration file: the same frames
    calib = _rigid([0.2, 0.5, -0.4], [10.0, 20.0, 60.0])
    np.savetxt(tmp_path / "calib.txt", calib)
    sensor = poses.numpy() @ np.linalg.inv(calib)
    rows = [[*(m[:3, 3] / 1000), *Rotation.from_matrix(m[:3, :3]).as_quat(scalar_first=True)] for m in sensor]
    (tmp_path / "track.csv").write_text("x,y,z,qw,qx,qy,qz\n" + "\n".join(",".join(f"{v:.17g}" for v in r)
                                                                       for r in rows))
    out2 = tmp_path / "out2"
    assert main(["simulate", str(tmp_path / "ct.nii.gz"), *SIM, "--poses", str(tmp_path / "track.csv"),
                 "--pose-units", "m", "--calibration", str(tmp_path / "calib.txt"), "--out", str(out2)]) == 0
    np.testing.assert_allclose(np.array(json.loads((out2 / "simulate.json").read_text())["poses"]), poses.numpy(),
                               atol=1e-9)
    np.testing.assert_allclose(_frames(out2), frames, atol=1e-3)  # float rounding of the composed poses


@pytest.mark.parametrize("flag", SWEEP_FLAGS)
@pytest.mark.parametrize("poses_first", [True, False])
def test_simulate_poses_excludes_the_sweep_flags(tmp_path, capsys, flag, poses_first):
    value = {"--tilt": "2", "--frames": "3"}.get(flag, "1,0,0")
    args = ["--poses", "p.npy", flag, value] if poses_first else [flag, value, "--poses", "p.npy"]
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "ct.nii.gz", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "not allowed with" in err and flag in err and "--poses" in err


def test_simulate_pose_errors_are_one_line(tmp_path, capsys):
    _ct(tmp_path)
    ct = str(tmp_path / "ct.nii.gz")
    assert main(["simulate", ct, *SIM, "--calibration", "c.txt", "--out", str(tmp_path / "o")]) == 1
    assert "--calibration needs --poses" in capsys.readouterr().err
    poses = _cli_poses().numpy()
    poses[1, :3, :3] *= 2
    _rows(tmp_path / "bad.csv", poses)
    assert main(["simulate", ct, *SIM, "--poses", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "--poses" in err and "bad.csv line 2 (pose 1)" in err and "scaled by 2" in err and "Traceback" not in err
    far = _cli_poses().numpy()
    far[:, :3, 3] += 1000
    np.save(tmp_path / "far.npy", far)
    assert main(["simulate", ct, *SIM, "--poses", str(tmp_path / "far.npy"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "no scanline" in err and "read from --poses" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "frames.nii.gz").exists()


def test_simulate_command_images_a_batch_wholly_off_the_volume(tmp_path):
    # the probe in the air before it touches the patient: a whole --batch of poses misses the volume; simulate()
    # alone refuses such a batch, the command only a file none of whose poses images the volume
    ct = _ct(tmp_path)
    off = _cli_poses()[:1].repeat(2, 1, 1)
    off[:, :3, 3] += 1000
    poses = torch.cat([off, _cli_poses()])
    np.save(tmp_path / "poses.npy", poses.numpy())
    out = tmp_path / "out"
    assert main(["simulate", str(tmp_path / "ct.nii.gz"), *SIM, "--batch", "2", "--gain", "40", "--poses",
                 str(tmp_path / "poses.npy"), "--out", str(out)]) == 0
    probe = Probe.preset("L11-5v", n_lines=16, n_samples=64, depth_mm=20.0)
    with torch.no_grad():  # all five in one call (legal: some meet the volume): what a pose off the volume gives
        ref = simulate_ct(torch.from_numpy(ct).float()[None, None], np.eye(4), poses.float(), probe,
                          gain_db=40.0).bmode[:, 0]
    frames = _frames(out)
    assert frames.shape[0] == 5 and frames[2:].std() > 0
    np.testing.assert_array_equal(frames, ref.numpy())


# --- tracking tools' own text layouts, the first row, the suffix, arguments ----------------------------------------
def test_tum_and_rostopic_files_with_commented_headers(tmp_path):
    poses, rot = _known()
    t, q = poses[:, :3, 3], rot.as_quat()  # scalar last (x, y, z, w), as both tools write
    # TUM RGB-D benchmark trajectory: comment lines, the last one naming the columns
    tum = ["# ground truth trajectory", "# file: 'rgbd_dataset_freiburg1_xyz.bag'", "# timestamp tx ty tz qx qy qz qw"]
    tum += [f"{1305031098.6659 + 0.01 * i:.4f} " + " ".join(f"{v:.17g}" for v in (*t[i], *q[i])) for i in range(B)]
    # rostopic echo -p of a geometry_msgs/PoseStamped topic: a '%' header, a frame_id text column
    ros = ["%time,field.header.seq,field.header.stamp,field.header.frame_id,field.pose.position.x,"
           "field.pose.position.y,field.pose.position.z,field.pose.orientation.x,field.pose.orientation.y,"
           "field.pose.orientation.z,field.pose.orientation.w"]
    ros += [f"{1600000000000000000 + i},{i},{1600000000000000000 + i},world," + ",".join(f"{v:.17g}" for v in
                                                                                      (*t[i], *q[i])) for i in range(B)]
    # ... of a geometry_msgs/TransformStamped topic (tf2): translation.{x,y,z} and rotation.{x,y,z,w}
    tf = ["%time,field.header.seq,field.header.stamp,field.header.frame_id,field.child_frame_id,"
          "field.transform.translation.x,field.transform.translation.y,field.transform.translation.z,"
          "field.transform.rotation.x,field.transform.rotation.y,field.transform.rotation.z,field.transform.rotation.w"]
    tf += [f"{1600000000000000000 + i},{i},{1600000000000000000 + i},tracker,probe," + ",".join(f"{v:.17g}" for v in
                                                                                             (*t[i], *q[i]))
           for i in range(B)]
    for name, lines in (("groundtruth.txt", tum), ("pose.csv", ros), ("tf.csv", tf)):
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        out = read_poses(tmp_path / name).numpy()
        np.testing.assert_allclose(out[:, :3, :3], rot.as_matrix(), atol=1e-12)
        np.testing.assert_array_equal(out[:, :3, 3], t)
    # a prose comment before matrix rows is no header, even one naming a quaternion column
    (tmp_path / "m.csv").write_text("# poses of the probe (qw first in the tracker's own log)\n")
    with open(tmp_path / "m.csv", "a") as f:
        f.write("\n".join(",".join(f"{v:.17g}" for v in m.reshape(-1)) for m in poses) + "\n")
    np.testing.assert_array_equal(read_poses(tmp_path / "m.csv").numpy(), poses)


def test_a_damaged_first_row_is_not_taken_for_a_header(tmp_path):
    poses, _ = _known(3)
    path = tmp_path / "p.csv"
    _rows(path, poses)
    lines = path.read_text().splitlines()
    vals = lines[0].split(",")
    vals[15] = "N/A"  # a missing value in the first pose's row: dropped as a header, every frame got the next pose
    path.write_text("\n".join([",".join(vals), *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"p\.csv line 1 \(pose 0\): 'N/A' is not a number"):
        read_poses(path)
    # a header of names only is still a header (of matrices: dropped; of quaternions: read)
    path.write_text(",".join(f"m{i}{j}" for i in range(4) for j in range(4)) + "\n" + "\n".join(lines) + "\n")
    np.testing.assert_array_equal(read_poses(path).numpy(), poses)


def test_a_uniform_scale_within_the_norm_tolerance_is_called_a_scale():
    from medfast.ultrasound.poses import rigid_problem

    m = np.eye(4)
    m[:3, :3] *= 1.0006  # column norms within 1e-3 of 1, the Gram matrix's diagonal (1.0012) not
    assert "scaled by 1.0006" in rigid_problem(m)
    m[:3, :3] *= 1.0004 / 1.0006
    assert rigid_problem(m) is None
    s = np.eye(4)
    s[0, 1] = 0.01  # a shear is still a shear
    assert "shear" in rigid_problem(s)


def test_the_format_is_the_last_suffix_and_transform_is_a_str(tmp_path):
    poses, _ = _known(2)
    _rows(tmp_path / "run.seq.csv", poses)  # was read as a PLUS header: "not a MetaImage ... header"
    np.testing.assert_array_equal(read_poses(tmp_path / "run.seq.csv").numpy(), poses)
    _plus(tmp_path / "s.seq.mha", poses, ["OK", "OK"])
    np.testing.assert_allclose(read_poses(tmp_path / "s.seq.mha").numpy(), poses, atol=1e-12)
    with pytest.raises(TypeError, match="transform must be a str"):  # was AttributeError: 'int' ... 'removesuffix'
        read_poses(tmp_path / "s.seq.mha", transform=5)
