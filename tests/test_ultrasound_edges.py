"""Edge cases of the ultrasound simulator found by a bug hunt: impossible probe settings, tiny depths,
non-finite settings, non-rigid poses, anisotropic voxels, the noise-table cache, label maps and tables,
and the `medfast simulate` command's flags."""

import argparse
import gc
import importlib

import numpy as np
import pytest
import torch

from medfast.ultrasound import LabelTable, Probe, look_at, simulate

# the module (medfast.ultrasound.simulate is the function of that name)
simulate_module = importlib.import_module("medfast.ultrasound.simulate")


def _homogeneous(shape=(24, 24, 24), spacing=(1.0, 1.0, 1.0)):
    props = torch.zeros(1, 5, *shape, dtype=torch.float64)
    props[:, 0], props[:, 1], props[:, 2], props[:, 3], props[:, 4] = 1.6, 0.5, 1.0, 0.02, 0.005
    return props, np.diag([*spacing, 1.0])


POSE = look_at((12.0, 12.0, 1.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0))
PROBE = Probe.preset("L11-5v", n_lines=8, n_samples=32, depth_mm=20.0)


@pytest.mark.parametrize("bandwidth", [2.0, 2.5, 50.0])
def test_bandwidth_of_two_or_more_is_refused(bandwidth):
    with pytest.raises(ValueError, match="bandwidth"):
        Probe.preset("L11-5v", bandwidth=bandwidth)


@pytest.mark.parametrize("depth", [0.5, 1.0, 3.0])
def test_shallow_depths_simulate(depth):
    # the lateral beam table had 24 equal knots at 1 mm (0 / 0) and reversed ones below
    probe = Probe.preset("L11-5v", n_lines=8, n_samples=32, depth_mm=depth)
    width = probe.lateral_fwhm_mm(probe.depths(dtype=torch.float64))
    assert torch.isfinite(width).all() and (width > 0).all()
    props, affine = _homogeneous()
    out = simulate(props, affine, POSE, probe)
    assert torch.isfinite(out.bmode).all()


def test_numpy_scalars_are_accepted():
    probe = Probe.preset("L11-5v", fc_mhz=np.float32(7.6), n_lines=np.int64(8), n_samples=np.int64(32))
    assert isinstance(probe.fc_mhz, float) and isinstance(probe.n_lines, int)
    props, affine = _homogeneous()
    assert simulate(props, affine, POSE, probe, sub_rays=np.int64(2)).bmode is not None


@pytest.mark.parametrize("kwargs, match", [
    (dict(gain_db=float("nan")), "gain_db"),
    (dict(tgc_db_cm_mhz=float("inf")), "tgc_db_cm_mhz"),
    (dict(dynamic_range_db=float("inf")), "dynamic_range_db"),
    (dict(pixel_mm=float("inf")), "pixel_mm"),
    (dict(interface_mm=0.0), "interface_mm"),
    (dict(background=[float("nan")] * 5), "background"),
    (dict(background=1.48), "background"),
    (dict(seed=1.5), "seed"),
    (dict(seed="1"), "seed"),
    (dict(seed=2**64), "seed"),
])
def test_non_finite_and_mistyped_settings_are_refused(kwargs, match):
    props, affine = _homogeneous()
    with pytest.raises(ValueError, match=match):
        simulate(props, affine, POSE, PROBE, **kwargs)


@pytest.mark.parametrize("name, matrix", [
    ("scale", np.diag([2.0, 2.0, 2.0, 1.0])),
    ("shear", np.array([[1, 0.3, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])),
    ("mirror", np.diag([1.0, 1.0, -1.0, 1.0])),
    ("singular", np.diag([1.0, 1.0, 0.0, 1.0])),
])
def test_non_rigid_poses_are_refused(name, matrix):
    props, affine = _homogeneous()
    pose = POSE @ torch.from_numpy(matrix)
    with pytest.raises(ValueError, match="pose must be rigid"):
        simulate(props, affine, pose, PROBE)


def test_look_at_and_affine_checks():
    for direction in ((0, 0, 0), (float("nan"), 0, 1)):
        with pytest.raises(ValueError, match="direction"):
            look_at((0, 0, 0), direction, (1, 0, 0))
    props, affine = _homogeneous()
    bad = affine.copy()
    bad[3, 2] = 1.0
    with pytest.raises(ValueError, match="last row must be"):
        simulate(props, bad, POSE, PROBE)


def test_interface_echo_does_not_depend_on_which_axis_is_coarse():
    # a planar impedance step across world z, in volumes whose coarse axis lies along or across it
    probe = Probe.preset("L11-5v", n_lines=16, n_samples=256, depth_mm=30.0)
    pose = look_at((20.0, 20.0, 5.3), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0))
    echoes = {}
    for sp in ((4.0, 4.0, 4.0), (1.0, 1.0, 4.0), (0.5, 0.5, 4.0)):
        shape = [int(round(40 / s)) for s in sp]
        props = torch.zeros(1, 5, *shape, dtype=torch.float64)
        props[:, 0] = 1.5
        props[:, 0, :, :, torch.arange(shape[2]) * sp[2] >= 20] = 2.5
        env = simulate(props, np.diag([*sp, 1.0]), pose, probe, speckle=False, tgc_db_cm_mhz=0, sub_rays=1,
                       return_lines=True).envelope
        echoes[sp] = float(env[0, 8].max())
    ref = echoes[(4.0, 4.0, 4.0)]
    for e in echoes.values():
        assert abs(e - ref) < 0.02 * ref, echoes  # the mean voxel size gave 0.18 / 0.16 against 0.22


def test_noise_tables_are_cached_within_a_bound():
    props, affine = _homogeneous()
    gc.collect()
    for seed in range(40):
        simulate(props, affine, POSE, PROBE, seed=seed, scan_convert=False)
    assert len(simulate_module._NOISE_CACHE) <= simulate_module._NOISE_CACHE_SIZE
    # the most recent seed is still cached, and a repeated seed gives the same frame
    a = simulate(props, affine, POSE, PROBE, seed=39).bmode
    b = simulate(props, affine, POSE, PROBE, seed=39).bmode
    assert torch.equal(a, b)


def test_label_tables_and_float_label_maps():
    for bad in ({1.5: (1.6, 0.5, 1.0, 0.02, 0.005)}, {True: (1.6, 0.5, 1.0, 0.02, 0.005)},
                {1: (float("nan"), 0.5, 1.0, 0.02, 0.005)}, {1: "abcde"}):
        with pytest.raises(ValueError):
            LabelTable(bad)
    with pytest.raises(ValueError, match="finite"):
        LabelTable(torch.full((2, 5), float("nan")))
    table = LabelTable({1: (1.6, 0.5, 1.0, 0.02, 0.005)})
    labels = torch.zeros(1, 1, 4, 4, 4)
    labels[..., 2:] = 1.0
    assert torch.equal(table.properties(labels), table.properties(labels.long()))  # whole floats are labels
    with pytest.raises(ValueError, match="labels must be integers"):
        table.properties(labels * 0.9999)


def test_memory_check_counts_the_scan_converted_image():
    props, affine = _homogeneous()
    with pytest.raises(ValueError, match="image pixels"):
        simulate(props, affine, POSE, PROBE, pixel_mm=1e-4)


def _cli_args(**kw):
    base = dict(volume=None, probe="L11-5v", lines=8, samples=32, depth=None, frames=2, batch=1, start=None,
                centre=None, direction=(0.0, 1.0, 0.0), lateral=(1.0, 0.0, 0.0), travel=(0.0, 0.0, 10.0), tilt=4.0,
                gain=0.0, dynamic_range=60.0, pixel=None, seed=0, device="cpu", out="unused")
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("kw, match", [
    (dict(depth=0.0), "--depth must be a positive"), (dict(frames=0), "--frames must be >= 1"),
    (dict(batch=0), "--batch must be >= 1"), (dict(pixel=0.0), "--pixel must be"),
    (dict(dynamic_range=0.0), "--dynamic-range must be"), (dict(gain=float("nan")), "--gain must be"),
    (dict(direction=(0.0, 0.0, 0.0)), "--direction must not be zero"),
    (dict(lateral=(0.0, 1.0, 0.0)), "lateral must not be parallel"),
])
def test_simulate_command_reports_bad_flags_in_one_line(kw, match, tmp_path, capsys):
    from medfast.ultrasound.cli import main

    vol = tmp_path / "ct.nii.gz"
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)), vol)
    assert main(_cli_args(volume=str(vol), out=str(tmp_path / "out"), **kw)) == 1
    err = capsys.readouterr().err
    assert "medfast simulate: error:" in err and "Traceback" not in err
    assert match in err


@pytest.mark.parametrize("content", ["2d", "4d", "text"])
def test_simulate_command_names_an_unreadable_volume(content, tmp_path, capsys):
    import nibabel as nib

    from medfast.ultrasound.cli import main

    path = tmp_path / ("vol.nii.gz" if content != "text" else "vol.nii")
    if content == "text":
        path.write_text("not a volume")
    else:
        shape = (8, 8) if content == "2d" else (8, 8, 8, 2)
        nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), path)
    assert main(_cli_args(volume=str(path), out=str(tmp_path / "out"))) == 1
    err = capsys.readouterr().err
    assert "medfast simulate: error: cannot read the volume" in err and str(path) in err


def test_second_derivatives_of_the_simulator_raise():
    props, affine = _homogeneous()
    props.requires_grad_(True)
    out = simulate(props, affine, POSE, PROBE, scan_convert=False).lines_db
    (g,) = torch.autograd.grad(out.square().mean(), props, create_graph=True)
    with pytest.raises(RuntimeError, match="ultrasound ray march: second derivatives"):
        torch.autograd.grad(g.square().sum(), props, allow_unused=True)


def test_freehand_sweep_is_differentiable_in_the_start_pose():
    # the start pose was detached: a pose fitted through simulate(..., freehand_sweep(start, ...)) got no gradient
    from medfast.ultrasound import freehand_sweep

    pos = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    start = look_at(pos, (0.0, 0.0, 1.0), (1.0, 0.0, 0.0))
    poses = freehand_sweep(start, (10.0, 0.0, 0.0), 5, seed=1)
    (g,) = torch.autograd.grad(poses[:, :3, 3].sum(), pos)
    torch.testing.assert_close(g, torch.full((3,), 5.0, dtype=torch.float64))  # every frame moves with it
    assert torch.autograd.gradcheck(lambda p: freehand_sweep(look_at(p, (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)),
                                                             (10.0, 0.0, 0.0), 4, seed=2, wobble_mm=0.5),
                                    (pos,))


def test_freehand_sweep_starts_at_the_start_pose_and_travels_exactly():
    from medfast.ultrasound import freehand_sweep

    start = look_at((122.5, 38.0, 60.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0))
    for n in (1, 2, 7, 40):
        poses = freehand_sweep(start, (0.0, 0.0, 30.0), n, seed=3)
        torch.testing.assert_close(poses[0], start)  # was up to 6 degrees and 1 mm away
        if n > 1:
            torch.testing.assert_close(poses[-1, :3, 3] - poses[0, :3, 3], torch.tensor([0.0, 0.0, 30.0],
                                                                                       dtype=torch.float64))
    poses = freehand_sweep(start, (0.0, 0.0, 30.0), 40, seed=3, wobble_mm=1.0)
    straight = start[:3, 3] + torch.linspace(0, 1, 40, dtype=torch.float64)[:, None] * torch.tensor([0, 0, 30.0],
                                                                                                   dtype=torch.float64)
    dev = (poses[:, :3, 3] - straight).abs().max()
    assert 0.5 < float(dev) <= 1.0 + 1e-9  # the wobble is there, within its bound
    R = poses[:, :3, :3]
    torch.testing.assert_close(R @ R.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(40, 3, 3))
    for kwargs, match in ((dict(travel_mm=(0, float("nan"), 1)), "travel_mm"), (dict(tilt_deg=float("inf")), "tilt"),
                          (dict(n_frames=True), "n_frames"), (dict(seed=1.5), "seed"),
                          (dict(start_pose=torch.diag(torch.tensor([2.0, 2, 2, 1]))), "start_pose")):
        args = dict(start_pose=start, travel_mm=(0, 0, 30), n_frames=4)
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            freehand_sweep(args.pop("start_pose"), args.pop("travel_mm"), args.pop("n_frames"), **args)
    assert freehand_sweep(start.numpy(), (0, 0, 30), 3).shape == (3, 4, 4)  # a NumPy start pose


def _inv3(path, matrix, shape, dtype, spacing=(1.0, 1.0, 1.0), filename="matrix.dat", drop=()):
    import io
    import plistlib
    import tarfile

    meta = {"matrix": {"shape": list(shape), "dtype": dtype, "filename": filename}, "spacing": list(spacing)}
    for key in drop:
        meta.pop(key)
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in (("main.plist", plistlib.dumps(meta)), ("matrix.dat", matrix.tobytes())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def test_read_inv3_refuses_what_it_would_misread(tmp_path):
    from medfast.ultrasound.io import read_inv3

    good = np.arange(8, dtype=np.int16).reshape(2, 2, 2)
    vol, _ = read_inv3(_inv3(tmp_path / "ok.inv3", good, (2, 2, 2), "int16"))
    assert np.array_equal(vol, good)
    cases = [
        (_inv3(tmp_path / "big.inv3", np.full((2, 2, 2), 1e6, np.float32), (2, 2, 2), "float32"), "do not fit"),
        (_inv3(tmp_path / "nan.inv3", np.full((2, 2, 2), np.nan, np.float32), (2, 2, 2), "float32"), "NaN"),
        (_inv3(tmp_path / "2d.inv3", good[0], (2, 2), "int16"), "expected a 3D volume"),
        (_inv3(tmp_path / "sp.inv3", good, (2, 2, 2), "int16", spacing=(0, 1, 1)), "spacing must be positive"),
        (_inv3(tmp_path / "key.inv3", good, (2, 2, 2), "int16", drop=("matrix",)), "lacks the entry"),
        (_inv3(tmp_path / "member.inv3", good, (2, 2, 2), "int16", filename="other.dat"), "no such member"),
    ]
    garbage = tmp_path / "garbage.inv3"
    garbage.write_bytes(b"not a tar at all")
    cases.append((garbage, "not a readable InVesalius project"))
    for path, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            read_inv3(path)
        assert str(path) in str(info.value)


def test_noise_table_cache_is_thread_safe():
    # the LRU lookup, insert and eviction ran without a lock: threads simulating with more seeds than
    # the cache holds raised KeyError (6 of 6 threads here) and the cache outgrew its bound
    import sys
    import threading

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: widens any race window
    errors = []

    def worker(k):
        try:
            for i in range(1500):
                seed = (7 * i + k) % 20
                table = simulate_module._noise(seed, torch.device("cpu"), True)
                assert torch.equal(table, simulate_module.noise_table(seed)) if i % 500 == 0 else True
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(repr(e))

    try:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:2]
    assert len(simulate_module._NOISE_CACHE) <= simulate_module._NOISE_CACHE_SIZE


def test_psf_rows_do_not_depend_on_thread_count_or_batch():
    # the AVX2 PSF's row loops were parallel_for lambdas: baseline code on pool threads, FMA code when
    # run inline, so a frame's pixels changed with torch.set_num_threads and with its batch (7.6e-6 dB)
    op = torch.ops.medfast.ussim_psf
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, 3, 64, generator=gen)
    h, w = torch.rand(3, 15, generator=gen), torch.rand(3, 7, 64, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(op(x[:1].contiguous(), h, w, False), op(x, h, w, False)[:1])
        props = torch.rand(1, 5, 8, 8, 8, generator=gen) + 1.0
        pose = look_at((20.0, 20.0, -5.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0))
        probe = Probe.preset("C5-2v", n_lines=48, n_samples=256, depth_mm=40.0)
        lines = []
        for n in (1, 2):
            torch.set_num_threads(n)
            lines.append(simulate(props, np.diag([5.0, 5, 5, 1]), pose, probe, seed=3).lines_db)
        assert torch.equal(lines[0], lines[1])
    finally:
        torch.set_num_threads(threads)


def test_seed_minus_one_and_speckle_off_do_not_share_a_noise_table():
    # both were cached under the key -1: whichever ran first set the other's scatterers
    import subprocess
    import sys

    script = """
import sys, torch, numpy as np
from medfast.ultrasound import Probe, simulate, look_at
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
props = torch.stack([1.3 + 0.5 * torch.rand(12, 12, 12, generator=g), 0.3 * torch.rand(12, 12, 12, generator=g),
                     0.5 + torch.rand(12, 12, 12, generator=g), torch.rand(12, 12, 12, generator=g),
                     0.2 * torch.rand(12, 12, 12, generator=g)])[None]
affine = np.diag([2.0, 2.0, 2.0, 1.0]); affine[:3, 3] = -12
probe = Probe.preset("L11-5v", n_lines=16, n_samples=64, depth_mm=20.0)
pose = look_at((0.0, 0.0, -10.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0))
runs = {"s": lambda: simulate(props, affine, pose, probe, seed=-1).lines_db,
        "p": lambda: simulate(props, affine, pose, probe, speckle=False).lines_db}
order = sys.argv[1]
out = {k: runs[k]() for k in order}
print(float(out["s"].sum()), float(out["p"].sum()))
"""
    sums = [subprocess.run([sys.executable, "-c", script, order], capture_output=True, text=True, check=True)
            .stdout.split() for order in ("sp", "ps")]
    assert sums[0] == sums[1]
    assert sums[0][0] != sums[0][1]  # speckle on and off differ (the comparison can fail)
