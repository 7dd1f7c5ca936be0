"""Inputs that `medfast simulate / predict / evaluate` must read right or refuse in one line naming the file or
option: the default probe placement on a user's CT, NaN voxels, broken affines, RGB / complex data, the
simulate --out folder, Analyze-pair (.img/.hdr) case names, and the documented default pixel size."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from medfast.cli import main
from tests.conftest import train_tiny_segmentation

SIM = ["--lines", "16", "--samples", "64", "--frames", "1", "--device", "cpu"]

@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    """Tiny blobs data and a 1-step segmentation checkpoint: (data folder, checkpoint)."""
    data, _, checkpoint = train_tiny_segmentation(tmp_path_factory.mktemp("cli_inputs"), 1)
    return data, checkpoint


def _err(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _ct(path, data=None, affine=None):
    data = np.zeros((16, 16, 16), np.float32) if data is None else data
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def _with_sform(path, data, sform):
    """A NIfTI whose only transform is ``sform``, written as is (nibabel refuses to build a qform from a singular
    matrix, so the header rows are set directly)."""
    hdr = nib.Nifti1Image(data, np.eye(4)).header
    hdr["qform_code"], hdr["sform_code"] = 0, 2
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = sform[0], sform[1], sform[2]
    nib.save(nib.Nifti1Image(data, None, header=hdr), str(path))
    return path


# --- 1: the default probe position is on the skin, not in the air before it ----------------------------------
@pytest.mark.parametrize("probe, min_bright", [("L11-5v", 0.2), ("C5-2v", 0.04)])
def test_default_start_puts_the_probe_on_a_user_ct_skin(tmp_path, capsys, probe, min_bright):
    # a soft-tissue cylinder (50 HU) with a 3 mm fat rim (-100 HU) in air, along z (the sweep's travel)
    n = 64
    x, y = np.meshgrid(np.arange(n) - (n - 1) / 2, np.arange(n) - (n - 1) / 2, indexing="ij")
    r = np.broadcast_to(np.hypot(x, y)[..., None], (n, n, n))
    ct = np.where(r < 25, 50.0, np.where(r < 28, -100.0, -1000.0)).astype(np.float32)
    path = _ct(tmp_path / "cylinder.nii.gz", ct)
    out = tmp_path / "out"
    assert main(["simulate", str(path), "--out", str(out), "--probe", probe, *SIM]) == 0
    start = np.array(json.loads((out / "simulate.json").read_text())["poses"][0])[:3, 3]
    assert ct[tuple(np.rint(start).astype(int))] > -300, f"probe at {start} is in the air"
    frame = np.asarray(nib.load(str(out / "frames.nii.gz")).dataobj)
    # with the probe 1 mm out in the air: 0 % (L11-5v) and 1.6 % (C5-2v) of the pixels
    assert (frame > 0.05).mean() > min_bright


# --- 2: NaN / inf CT voxels ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_simulate_refuses_a_ct_with_nan_or_inf(tmp_path, capsys, value):
    data = np.zeros((16, 16, 16), np.float32)
    data[3, 4, 5] = value
    path = _ct(tmp_path / "ct.nii.gz", data)
    assert main(["simulate", str(path), "--out", str(tmp_path / "out"), *SIM]) == 1
    err = _err(capsys)
    assert str(path) in err and "holds NaN or inf values" in err
    assert not (tmp_path / "out" / "frames.nii.gz").exists()


# --- 3: zero / singular / non-finite affines -----------------------------------------------------------------
BAD_AFFINES = {
    "zero": (np.zeros((4, 4)), "singular"),
    "flat": (np.diag([1.0, 1.0, 0.0, 1.0]), "singular"),
    "parallel": (np.array([[1.0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "singular"),
    "nan": (np.where(np.eye(4) > 0, np.nan, 0.0), "NaN or inf"),
}


@pytest.mark.parametrize("kind", sorted(BAD_AFFINES))
def test_simulate_names_a_ct_with_a_broken_affine(tmp_path, capsys, kind):
    sform, match = BAD_AFFINES[kind]
    path = _with_sform(tmp_path / "ct.nii.gz", np.zeros((16, 16, 16), np.float32), sform)
    assert main(["simulate", str(path), "--out", str(tmp_path / "out"), *SIM]) == 1
    err = _err(capsys)
    assert str(path) in err and "affine" in err and match in err


@pytest.mark.parametrize("kind", sorted(BAD_AFFINES))
def test_predict_and_evaluate_name_a_file_with_a_broken_affine(seg, tmp_path, capsys, kind):
    data, ckpt = seg
    sform, match = BAD_AFFINES[kind]
    img = np.asarray(nib.load(str(data / "images" / "case_000.nii.gz")).dataobj)
    bad = _with_sform(tmp_path / "scan.nii.gz", img, sform)
    assert main(["predict", str(bad), "--model", str(ckpt), "--out", str(tmp_path / "p"), "--device", "cpu"]) == 1
    err = _err(capsys)
    assert str(bad) in err and "affine" in err and match in err
    lab = np.asarray(nib.load(str(data / "labels" / "case_000.nii.gz")).dataobj)
    badlab = _with_sform(tmp_path / "lab.nii.gz", lab, sform)
    with pytest.raises(SystemExit, match="affine") as info:
        main(["evaluate", str(badlab), str(data / "labels" / "case_000.nii.gz")])
    assert str(badlab) in str(info.value)


def test_a_single_slice_image_may_have_a_degenerate_third_axis(tmp_path):
    from medfast.data import load_nifti

    # a 2D image is placed by its first two voxel axes: a zero third column is harmless, parallel axes are not
    path = _with_sform(tmp_path / "slice.nii.gz", np.ones((6, 5, 1), np.float32), np.diag([0.5, 0.5, 0.0, 1.0]))
    assert load_nifti(path).data.shape == (1, 6, 5, 1)
    from medfast.data.io import DatasetError

    flat = _with_sform(tmp_path / "flat.nii.gz", np.ones((6, 5), np.float32), BAD_AFFINES["parallel"][0])
    with pytest.raises(DatasetError, match="singular"):
        load_nifti(flat)


# --- 4: RGB and complex data ---------------------------------------------------------------------------------
def _rgb(shape):
    out = np.zeros(shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    out["R"] = 1
    return out


@pytest.mark.parametrize("kind, match", [("rgb", "RGB"), ("complex", "complex")])
def test_rgb_and_complex_volumes_are_refused_naming_the_file(seg, tmp_path, capsys, kind, match):
    data, ckpt = seg

    def make(shape):
        if kind == "rgb":
            return _rgb(shape)
        return (np.ones(shape) + 2j).astype(np.complex64)  # its imaginary part was silently dropped

    ct = _ct(tmp_path / "ct.nii.gz", make((16, 16, 16)))
    assert main(["simulate", str(ct), "--out", str(tmp_path / "out"), *SIM]) == 1
    err = _err(capsys)
    assert str(ct) in err and match in err
    img = _ct(tmp_path / "img.nii.gz", make((12, 12, 12)))
    assert main(["predict", str(img), "--model", str(ckpt), "--out", str(tmp_path / "p"), "--device", "cpu"]) == 1
    err = _err(capsys)
    assert str(img) in err and match in err
    with pytest.raises(SystemExit, match=match) as info:
        main(["evaluate", str(img), str(data / "labels" / "case_000.nii.gz")])
    assert str(img) in str(info.value)


def test_read_inv3_refuses_complex_ct_numbers(tmp_path):
    import io
    import plistlib
    import tarfile

    from medfast.ultrasound.io import read_inv3

    matrix = (np.ones((2, 2, 2)) + 1j).astype(np.complex64)
    meta = {"matrix": {"shape": [2, 2, 2], "dtype": "complex64", "filename": "matrix.dat"}, "spacing": [1.0] * 3}
    path = tmp_path / "c.inv3"
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in (("main.plist", plistlib.dumps(meta)), ("matrix.dat", matrix.tobytes())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ValueError, match="complex") as info:
        read_inv3(path)
    assert str(path) in str(info.value)


# --- 5: simulate --out ---------------------------------------------------------------------------------------
def test_simulate_out_that_is_a_file_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    import medfast.ultrasound

    def no_work(*args, **kwargs):
        raise AssertionError("simulated before checking --out")

    monkeypatch.setattr(medfast.ultrasound, "simulate_ct", no_work)
    ct = _ct(tmp_path / "ct.nii.gz")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["simulate", str(ct), "--out", str(afile), *SIM]) == 1
    assert "--out" in (err := _err(capsys)) and "exists and is not a folder" in err
    assert main(["simulate", str(ct), "--out", str(afile / "sub"), *SIM]) == 1
    assert "--out" in (err := _err(capsys)) and "is a file" in err


def test_simulate_rerun_with_fewer_frames_leaves_only_its_own(tmp_path, capsys):
    ct = _ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    args = ["simulate", str(ct), "--out", str(out), "--lines", "16", "--samples", "64", "--device", "cpu"]
    assert main([*args, "--frames", "3"]) == 0
    (out / "frames" / "notes.txt").write_text("mine")  # not a frame: kept
    assert main([*args, "--frames", "1"]) == 0
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["frame_000.png", "notes.txt"]
    assert json.loads((out / "simulate.json").read_text())["frames"] == 1


def test_simulate_write_error_is_one_line_naming_out(tmp_path, capsys):
    ct = _ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "frames").write_text("a file where the frames folder goes")
    assert main(["simulate", str(ct), "--out", str(out), *SIM]) == 1
    err = _err(capsys)
    assert "medfast simulate: error: cannot write the results to --out" in err and str(out) in err


# --- 6: an Analyze / NIfTI pair (.img + .hdr) is named by its case ------------------------------------------
def test_case_name_strips_analyze_pair_suffixes():
    from medfast.data.dataset import case_name

    for name in ("scan.img", "scan.hdr", "scan.img.gz", "scan.nii", "scan.nii.gz", "scan_0000.img"):
        assert case_name(f"/d/{name}") == "scan", name
    assert case_name("scan.image") == "scan.image"


def test_predict_an_img_hdr_pair_then_evaluate(seg, tmp_path, capsys):
    data, ckpt = seg
    src = nib.load(str(data / "images" / "case_000.nii.gz"))
    pair = tmp_path / "in" / "scan.img"
    pair.parent.mkdir()
    nib.save(nib.Nifti1Pair(np.asarray(src.dataobj), src.affine), str(pair))
    assert (tmp_path / "in" / "scan.hdr").is_file()
    pred = tmp_path / "pred"
    assert main(["predict", str(pair), "--model", str(ckpt), "--out", str(pred), "--device", "cpu"]) == 0
    assert [p.name for p in pred.iterdir()] == ["scan_seg.nii.gz"]
    ref = tmp_path / "ref"
    ref.mkdir()
    shutil.copy(data / "labels" / "case_000.nii.gz", ref / "scan.nii.gz")
    capsys.readouterr()
    assert main(["evaluate", str(pred), str(ref)]) == 0
    assert "1 case(s)" in capsys.readouterr().out


# --- 7: the documented default pixel size is the one used ----------------------------------------------------
def test_default_pixel_size_is_the_documented_one():
    import torch

    from medfast.ultrasound import Probe, look_at, simulate

    probe = Probe.preset("C5-2v", n_lines=16, n_samples=64)
    x0, x1, z0, z1 = probe.image_extent_mm()
    props = torch.zeros(1, 5, 8, 8, 8)
    props[:, 0], props[:, 1], props[:, 2], props[:, 3], props[:, 4] = 1.6, 0.5, 1.0, 0.02, 0.005
    res = simulate(props, np.diag([2.0, 2, 2, 1]), look_at((8, 8, 0), (0, 0, 1), (1, 0, 0)), probe)
    assert res.pixel_mm == pytest.approx((z1 - z0) / (probe.n_samples // 2))
    assert res.pixel_mm != pytest.approx(probe.depth_mm / (probe.n_samples / 2))  # a convex probe's differs
    doc = " ".join(simulate.__doc__.split())
    assert "(z1 - z0) / (n_samples // 2)" in doc and "(default: depth / (n_samples / 2))" not in doc
