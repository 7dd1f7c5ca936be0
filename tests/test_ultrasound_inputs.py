"""The ultrasound simulator's conversions and input checks found by a bug hunt with user data: the CT -> property
conversion's memory (slabs, same values), scaled NIfTI read as float32, `medfast simulate` converting the CT once,
poses that cannot image the volume, label tables (empty, huge keys), non-finite vector flags and the units of
frames.nii.gz."""

import importlib
import json
import subprocess
import sys
import textwrap
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from medfast.cli import main
from medfast.ultrasound import HU_KNOTS, LabelTable, Probe, hu_to_properties, look_at, simulate, simulate_ct
from medfast.ultrasound.tissue import MAX_LABEL, WATER

tissue = importlib.import_module("medfast.ultrasound.tissue")
sim_module = importlib.import_module("medfast.ultrasound.simulate")

SIM = ["--lines", "16", "--samples", "64", "--device", "cpu"]


def _whole_volume_formula(ct, knots=HU_KNOTS):
    """hu_to_properties as it was: the formula on the whole volume at once."""
    ct = ct[:, 0] if ct.dim() == 5 else ct
    k = torch.as_tensor(knots, dtype=ct.dtype)
    hu, vals = k[:, 0], k[:, 1:]
    x = ct.clamp(hu[0], hu[-1])
    idx = torch.searchsorted(hu.contiguous(), x.detach().contiguous(), right=True).clamp(1, hu.numel() - 1) - 1
    h0, h1 = hu[idx], hu[idx + 1]
    t = ((x - h0) / (h1 - h0)).unsqueeze(1)
    v0 = vals[idx].permute(0, 4, 1, 2, 3)
    v1 = vals[idx + 1].permute(0, 4, 1, 2, 3)
    return v0 + t * (v1 - v0)


# --- hu_to_properties: slabs, same values and layout, gradients kept -----------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 7, 5, 6), (2, 9, 4, 5)])
def test_hu_to_properties_slabs_give_the_same_values_and_strides(monkeypatch, dtype, shape):
    monkeypatch.setattr(tissue, "_SLAB_VOXELS", 64)  # many slabs, a last one partly filled
    gen = torch.Generator().manual_seed(0)
    ct = torch.randn(shape, generator=gen, dtype=dtype) * 800
    ct.view(-1)[:4] = torch.tensor([-5000.0, 5000.0, 40.0, -1000.0], dtype=dtype)  # beyond the ends, on knots
    out = hu_to_properties(ct)
    ref = _whole_volume_formula(ct)
    assert out.dtype == dtype and out.shape == ref.shape and out.stride() == ref.stride()
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(out, ref)  # bitwise: the same operations in the same order
    # and against an independent piecewise-linear interpolation (NumPy)
    k = np.array(HU_KNOTS)
    x = (ct[:, 0] if ct.dim() == 5 else ct).double().numpy()
    for c in range(5):
        np.testing.assert_allclose(out[:, c].double().numpy(), np.interp(x, k[:, 0], k[:, c + 1]),
                                   rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)


def test_hu_to_properties_integer_ct_and_no_grad_mode():
    ct = torch.arange(-1200, 3200, 37, dtype=torch.int16)[:100].reshape(1, 1, 4, 5, 5)
    with torch.no_grad():
        out = hu_to_properties(ct)
    assert out.dtype == torch.float32 and torch.equal(out, _whole_volume_formula(ct.float()))


def test_hu_to_properties_keeps_its_gradients():
    gen = torch.Generator().manual_seed(1)
    ct = (torch.randn(1, 1, 3, 4, 5, generator=gen, dtype=torch.float64) * 400).requires_grad_(True)
    knots = torch.tensor(HU_KNOTS, dtype=torch.float64, requires_grad=True)
    out = hu_to_properties(ct, knots)
    assert out.requires_grad
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    g_ct, g_k = torch.autograd.grad((out * w).sum(), (ct, knots))
    r_ct, r_k = torch.autograd.grad((_whole_volume_formula(ct, knots) * w).sum(), (ct, knots))
    torch.testing.assert_close(g_ct, r_ct, rtol=0, atol=0)
    torch.testing.assert_close(g_k, r_k, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda c: hu_to_properties(c), (ct,))
    # only the CT requires grad, or only the knots
    assert hu_to_properties(ct).requires_grad and hu_to_properties(ct.detach(), knots).requires_grad


def test_hu_to_properties_refuses_non_finite_knots_and_impedance_not_positive():
    ct = torch.full((1, 1, 2, 2, 2), 40.0)
    good = [(0.0, 1.5, 0.5, 1.0, 0.01, 0.0), (100.0, 1.7, 0.7, 1.0, 0.02, 0.0)]
    hu_to_properties(ct, good)
    for row, col, value, match in ((0, 1, float("nan"), r"knots must hold finite values.*rows \[0\]"),
                                   (1, 3, float("inf"), r"knots must hold finite values.*rows \[1\]"),
                                   (0, 1, 0.0, r"knots: the impedance Z .* must be > 0"),
                                   (1, 1, -1.6, r"knots: the impedance Z .* must be > 0")):
        bad = [list(r) for r in good]
        bad[row][col] = value  # a NaN property made every frame NaN; Z <= 0 gave nonsense reflections
        with pytest.raises(ValueError, match=match):
            hu_to_properties(ct, bad)
        with pytest.raises(ValueError, match=match):  # a trainable tensor too
            hu_to_properties(ct, torch.tensor(bad, requires_grad=True))


def test_hu_to_properties_peak_memory_is_about_its_output():
    # the whole-volume formula's temporaries: ~97 bytes a voxel beside its 20-byte output (908 MiB for 9.8 M voxels)
    code = textwrap.dedent("""
        import resource, torch
        torch.set_num_threads(1)
        from medfast.ultrasound import hu_to_properties
        ct = torch.linspace(-1100, 3100, 64 * 256 * 256).reshape(1, 1, 64, 256, 256)
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        before = peak()
        out = hu_to_properties(ct)
        print((peak() - before) / ct.numel())
    """)
    per_voxel = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                     check=True).stdout.split()[-1])
    assert per_voxel < 40, f"peak RSS grew {per_voxel:.0f} bytes a voxel (output: 20)"


# --- read_volume: a scaled NIfTI as float32 --------------------------------------------------------------------
def test_read_volume_reads_a_scaled_nifti_as_float32(tmp_path):
    from medfast.ultrasound.io import read_volume

    raw = np.random.default_rng(0).integers(0, 3000, (6, 7, 8)).astype(np.int16)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(0.5, -1024.0)
    nib.save(img, str(tmp_path / "scaled.nii.gz"))
    vol, _ = read_volume(tmp_path / "scaled.nii.gz")
    assert vol.dtype == np.float32  # nibabel's default: float64, 8 bytes a voxel
    np.testing.assert_array_equal(vol, raw * 0.5 - 1024.0)
    nib.save(nib.Nifti1Image(raw, np.eye(4)), str(tmp_path / "plain.nii.gz"))
    vol, _ = read_volume(tmp_path / "plain.nii.gz")
    assert vol.dtype == np.int16 and np.array_equal(vol, raw)  # unscaled: the file's own type, as before


# --- medfast simulate converts the CT once ---------------------------------------------------------------------
def test_simulate_command_converts_the_ct_once_with_the_same_frames(tmp_path, monkeypatch):
    ct = np.full((24, 24, 24), 40, np.int16)
    ct[10:14] = 1200
    nib.save(nib.Nifti1Image(ct, np.eye(4)), str(tmp_path / "ct.nii.gz"))
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return hu_to_properties(*args, **kwargs)

    monkeypatch.setattr("medfast.ultrasound.hu_to_properties", counting)
    monkeypatch.setattr(sim_module, "hu_to_properties", counting)  # what simulate_ct calls
    args = [str(tmp_path / "ct.nii.gz"), *SIM, "--frames", "3", "--batch", "1", "--probe", "L11-5v",
            "--depth", "20", "--direction", "1,0,0", "--lateral", "0,1,0", "--travel", "0,0,6"]
    assert main(["simulate", *args, "--out", str(tmp_path / "out")]) == 0
    assert len(calls) == 1  # was once per batch
    frames = np.asarray(nib.load(str(tmp_path / "out" / "frames.nii.gz")).dataobj).transpose(2, 1, 0)
    poses = torch.tensor(json.loads((tmp_path / "out" / "simulate.json").read_text())["poses"])
    probe = Probe.preset("L11-5v", n_lines=16, n_samples=64, depth_mm=20.0)
    with torch.no_grad():
        ref = simulate_ct(torch.from_numpy(ct).float()[None, None], np.eye(4), poses.float(), probe).bmode[:, 0]
    assert np.array_equal(frames, ref.numpy())


# --- poses that cannot image the volume ------------------------------------------------------------------------
def _tissue(n=32):
    return hu_to_properties(torch.full((1, 1, n, n, n), 40.0))


def test_a_pose_far_outside_the_volume_is_refused_naming_the_pose():
    probe = Probe.preset("L11-5v", n_lines=16, n_samples=64, depth_mm=20.0)
    far = look_at((1000, 1000, 1000), (0, 1, 0), (1, 0, 0))
    with pytest.raises(ValueError, match=r"pose: no scanline .* meets the volume .*\(1000, 1000, 1000\)"):
        simulate(_tissue(), np.eye(4), far, probe)
    # one pose of the batch inside is enough (the other's frame is blank, as any pose partly outside)
    near = look_at((16, -5, 16), (0, 1, 0), (1, 0, 0))
    res = simulate(_tissue(), np.eye(4), torch.stack([far, near]), probe)
    assert float(res.bmode[1].max()) > 0.1 and float(res.bmode[0].max()) == 0


def test_a_pose_beside_the_volume_facing_away_is_refused():
    # the array 2 mm off a corner, the beam pointing away: the image plane's bounding box in voxel space overlaps
    # the volume's (a box-axis test would pass it); only an axis of the plane separates them
    probe = Probe.preset("L11-5v", n_lines=16, n_samples=64, depth_mm=20.0)
    d = np.array([1.0, 1.0, 0.0]) / np.sqrt(2)
    pose = look_at(np.array([33.5, 33.5, 16.0]) + 2 * d, d, (0, 0, 1))
    with pytest.raises(ValueError, match="no scanline"):
        simulate(_tissue(), np.eye(4), pose, probe)
    pose = look_at(np.array([33.5, 33.5, 16.0]) + 2 * d, -d, (0, 0, 1))  # facing the volume: legal
    assert float(simulate(_tissue(), np.eye(4), pose, probe).bmode.max()) > 0.1


@pytest.mark.parametrize("preset", ["L11-5v", "C5-2v", "P4-2v"])
def test_the_outside_check_never_refuses_a_pose_whose_samples_reach_the_volume(preset):
    # random poses around an anisotropic, oblique volume: a pose with a sub-ray sample in [-1, D] x [-1, H] x [-1, W]
    # must pass (no false refusal); most poses far off must be flagged
    probe = Probe.preset(preset, n_lines=24, n_samples=48, depth_mm=30.0)
    rng = np.random.default_rng(0)
    shape = (20, 12, 16)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    affine = np.eye(4)
    affine[:3, :3] = q * np.array([1.5, 2.5, 1.0])
    affine[:3, 3] = rng.normal(size=3) * 10
    inv = np.linalg.inv(affine)
    poses = []
    for _ in range(400):
        rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        rot *= np.sign(np.linalg.det(rot))
        p = np.eye(4)
        p[:3, :3], p[:3, 3] = rot, affine[:3, 3] + rng.uniform(-70, 70, 3)
        poses.append(p)
    poses = np.stack(poses)
    meets = sim_module._meets_volume(poses, inv, shape, probe)
    # the centre shortcut (a probe box centred in the volume meets it, no separating-axis test) changes no answer
    centre = np.einsum("ij,bjk,k->bi", inv[:3], poses, sim_module._probe_box(probe).mean(0))
    assert 0 < ((centre >= -1) & (centre <= np.array(shape))).all(-1).sum() < 400  # both routes taken
    assert (meets == sim_module._boxes_meet(inv[:3] @ poses, sim_module._probe_box(probe), shape)).all()
    pts = sim_module.probe_points(probe, 3).reshape(-1, 3).numpy()  # (L E S, 3) probe frame
    vox = np.einsum("ij,bjk,nk->bni", inv[:3], poses, np.c_[pts, np.ones(len(pts))])
    inside = ((vox >= -1) & (vox <= np.array(shape))).all(-1).any(-1)
    assert inside.any() and (~meets).any()
    assert not (inside & ~meets).any()
    assert (~meets).sum() >= 0.5 * (~inside).sum()  # flags a fair share of those off the volume (a box test)


def test_simulate_command_refuses_a_sweep_off_the_volume_naming_start(tmp_path, capsys):
    nib.save(nib.Nifti1Image(np.full((16, 16, 16), 40, np.int16), np.eye(4)), str(tmp_path / "ct.nii.gz"))
    rc = main(["simulate", str(tmp_path / "ct.nii.gz"), *SIM, "--frames", "2", "--out", str(tmp_path / "out"),
               "--start", "1000,1000,1000"])
    err = capsys.readouterr().err
    assert rc == 1 and "no scanline" in err and "--start" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "frames.nii.gz").exists()


# --- LabelTable ------------------------------------------------------------------------------------------------
def test_an_empty_label_table_tensor_is_refused():
    with pytest.raises(ValueError, match="label table tensor is empty"):
        LabelTable(torch.empty(0, 5))


def test_label_table_with_large_keys_is_dense_and_refuses_keys_above_the_limit():
    small = {0: (1.4, 0.1, 0.2, 0.3, 0.4), 3: (1.6, 0.5, 1.0, 0.01, 0.003), 7: [2.0, 1.0, 0.5, 0.02, 0.01]}
    rows = [list(WATER)] * 8
    for k, v in small.items():
        rows[k] = list(v)
    assert torch.equal(LabelTable(small).values, torch.tensor(rows, dtype=torch.float32))  # the former build
    t = time.perf_counter()
    big = LabelTable({0: small[0], 4 * 10**6: small[3]})
    assert time.perf_counter() - t < 3.0  # a Python list of rows: 7.5 s
    assert big.n_labels == 4 * 10**6 + 1 and torch.equal(big.values[-1], torch.tensor(small[3]).float())
    assert torch.equal(big.values[1:-1].unique(dim=0), torch.tensor([WATER], dtype=torch.float32))
    with pytest.raises(ValueError, match=f"key {MAX_LABEL + 1} is above the limit {MAX_LABEL}"):
        LabelTable({0: small[0], MAX_LABEL + 1: small[3]})


# --- non-finite vector flags -----------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value", [("--travel", "nan,0,0"), ("--start", "0,inf,0"), ("--centre", "0,0,-inf"),
                                         ("--direction", "nan,1,0"), ("--lateral", "1,nan,0")])
def test_simulate_names_a_non_finite_vector_flag(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit):
        main(["simulate", str(tmp_path / "ct.nii.gz"), *SIM, "--out", str(tmp_path / "out"), flag, value])
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "finite" in err and "Traceback" not in err


def test_simulate_refuses_centre_with_start(tmp_path, capsys):
    # --centre only places the first frame on the skin: with --start it was silently ignored (identical frames)
    nib.save(nib.Nifti1Image(np.full((16, 16, 16), 40, np.int16), np.eye(4)), str(tmp_path / "ct.nii.gz"))
    rc = main(["simulate", str(tmp_path / "ct.nii.gz"), *SIM, "--frames", "2", "--out", str(tmp_path / "out"),
               "--start", "8,1,8", "--centre", "8,8,8"])
    err = capsys.readouterr().err
    assert rc == 1 and "give --start or --centre, not both" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "frames.nii.gz").exists()


# --- frames.nii.gz: units and placement --------------------------------------------------------------------------
def test_simulate_frames_nifti_declares_mm_and_the_first_pixel_position(tmp_path):
    nib.save(nib.Nifti1Image(np.full((24, 24, 24), 40, np.int16), np.eye(4)), str(tmp_path / "ct.nii.gz"))
    assert main(["simulate", str(tmp_path / "ct.nii.gz"), *SIM, "--frames", "2", "--probe", "C5-2v",
                 "--direction", "1,0,0", "--lateral", "0,1,0", "--out", str(tmp_path / "out")]) == 0
    img = nib.load(str(tmp_path / "out" / "frames.nii.gz"))
    assert img.header.get_xyzt_units()[0] == "mm"
    x0, _, z0, _ = Probe.preset("C5-2v", n_lines=16, n_samples=64).image_extent_mm()
    px = json.loads((tmp_path / "out" / "simulate.json").read_text())["pixel_mm"]
    np.testing.assert_allclose(img.affine, [[px, 0, 0, x0], [0, px, 0, z0], [0, 0, 1, 0], [0, 0, 0, 1]], rtol=1e-6)


def test_volumes_with_a_mixed_case_suffix_are_read(tmp_path):
    """nib.load keeps only an all-lower or all-upper suffix: for CT.Nii.gz it looked for CT.nii.gz and named a file
    the user never gave. The simulator's reader and the warp demo's read it as what it is."""
    from medfast.demo import load_volume
    from medfast.ultrasound.io import read_volume

    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    affine = np.diag([2.0, 1.5, 1.0, 1.0])
    path = tmp_path / "CT.Nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "CT.nii.gz"))
    (tmp_path / "CT.nii.gz").rename(path)
    vol, aff = read_volume(path)
    assert np.array_equal(np.asarray(vol), data) and np.allclose(aff, affine)
    assert load_volume(path) is not None
