"""The ``medfast`` command line (info, demo) and the warp demo on synthetic and real data."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import medfast
from medfast import cli, demo

OUTPUTS = ("warped_linear.nii.gz", "warped_cubic.nii.gz", "ddf_voxels.nii.gz", "warp_demo.png", "demo.json")
NO_NILEARN = importlib.util.find_spec("nilearn") is None


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_info_text(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert medfast.__version__ in out
    assert torch.__version__ in out
    for label in ("torch built against", "CUDA kernels", "OpenMP", "CPU threads", "GPU"):
        assert label in out


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["medfast"] == medfast.__version__
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda_kernels"], bool)
    assert isinstance(info["gpus"], list)


@pytest.mark.parametrize("argv", [["no-such-command"], [], ["demo", "--repeats", "0"], ["info", "--bogus"]])
def test_cli_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2


def test_python_m_medfast_info():
    proc = subprocess.run(
        [sys.executable, "-m", "medfast", "info"], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert medfast.__version__ in proc.stdout
    assert torch.__version__ in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_demo_cuda_without_gpu_is_a_clean_error(tmp_path, capsys):
    assert cli.main(["demo", "--device", "cuda", "--out", str(tmp_path)]) == 1
    assert "device='cuda' but no CUDA GPU is visible (use cpu or auto)" in capsys.readouterr().err


def test_missing_nilearn_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nilearn" else real(name, *a))
    with pytest.raises(ImportError, match="pip install nilearn"):
        demo.mni_template_path()


# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def synthetic_nifti(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A small int16 T1-like volume with a rotated, anisotropic, flipped affine."""
    nib = pytest.importorskip("nibabel")
    shape = (24, 28, 20)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    blob = np.exp(-4 * (grid**2).sum(0)) + 0.5 * (np.abs(grid[0]) < 0.2)
    data = (1000 * blob + 50 * np.random.default_rng(0).random(shape)).astype(np.int16)
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-1.2, 0.9, 2.5])  # flipped first axis, anisotropic voxels
    affine[:3, 3] = [30.0, -12.5, 7.0]
    path = tmp_path / "synthetic.nii.gz"
    img = nib.Nifti1Image(data, affine)
    img.header["cal_min"], img.header["cal_max"] = 0.0, 800.0  # a display window, as scanners write one
    img.to_filename(path)
    return path, data, affine


def _check_outputs(out_dir: Path, shape: tuple[int, ...], affine: np.ndarray) -> dict:
    nib = pytest.importorskip("nibabel")
    for name in OUTPUTS:
        assert (out_dir / name).is_file(), name
    for name in ("warped_linear.nii.gz", "warped_cubic.nii.gz"):
        img = nib.load(out_dir / name)
        assert img.shape == shape
        np.testing.assert_allclose(img.affine, affine, atol=1e-5)
        assert np.isfinite(img.get_fdata()).all()
    ddf = nib.load(out_dir / "ddf_voxels.nii.gz")
    assert ddf.shape == (*shape, 1, 3)
    np.testing.assert_allclose(ddf.affine, affine, atol=1e-5)
    assert ddf.header.get_intent()[:3:2] == ("vector", "ddf_voxels")  # not ITK's mm displacement intent
    assert ddf.header["cal_min"] == ddf.header["cal_max"] == 0  # not the image's display window
    return json.loads((out_dir / "demo.json").read_text())


@pytest.mark.parametrize("kind", ["rgb", "complex"])
def test_demo_rgb_or_complex_image_is_a_clean_error(tmp_path, capsys, kind):
    """RGB voxels gave numpy's DTypePromotionError traceback, complex ones a warp of the real part, silently."""
    nib = pytest.importorskip("nibabel")
    if kind == "rgb":
        data = np.zeros((16, 16, 16), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    else:
        data = np.ones((16, 16, 16), np.complex64) * (3 + 4j)
    path = tmp_path / f"{kind}.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    assert cli.main(["demo", "--image", str(path), "--out", str(tmp_path / "out"), "--device", "cpu",
                     "--repeats", "1"]) == 1
    err = capsys.readouterr().err
    assert f"medfast demo: error: {path} holds {'RGB' if kind == 'rgb' else 'complex'}" in err
    assert "Traceback" not in err and not (tmp_path / "out" / "warped_linear.nii.gz").exists()


def test_demo_on_synthetic_volume(synthetic_nifti, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path, data, affine = synthetic_nifti
    out_dir = tmp_path / "out"
    result = demo.run_warp_demo(out_dir, device="cpu", seed=3, magnitude=2.0, repeats=1, image_path=path)
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "grid_sample" in printed

    saved = _check_outputs(out_dir, data.shape, affine)
    assert saved == json.loads(json.dumps(result))
    assert result["shape"] == list(data.shape)
    assert result["device"] == "cpu"
    assert result["max_abs_diff_vs_grid_sample"] < 1e-4
    assert result["timing"]["agree"]
    for kind in ("forward", "forward_backward"):
        assert result["timing"][kind]["medfast_s"] > 0
        assert result["timing"][kind]["speedup"] > 0
    deformation = result["deformation"]
    assert deformation["max_displacement_vox"] == pytest.approx(2.0, rel=0.1)
    assert deformation["folded_fraction"] == 0.0
    assert result["build_info"]["medfast"] == medfast.__version__


def test_demo_tiny_deformation_keeps_the_input(synthetic_nifti, tmp_path):
    """Axis order and intensity units survive the round trip: a near-identity warp returns the input."""
    pytest.importorskip("matplotlib")
    nib = pytest.importorskip("nibabel")
    path, data, _ = synthetic_nifti
    demo.run_warp_demo(tmp_path, device="cpu", magnitude=1e-4, repeats=1, image_path=path, verbose=False)
    warped = nib.load(tmp_path / "warped_linear.nii.gz").get_fdata()
    np.testing.assert_allclose(warped, data, atol=1e-3 * np.abs(data).max())
    ddf = nib.load(tmp_path / "ddf_voxels.nii.gz").get_fdata()
    assert 0 < np.abs(ddf).max() <= 1.05e-4


def test_random_deformation_is_seeded_and_scaled():
    a = demo.random_deformation((16, 18, 14), 1.5, seed=7)
    b = demo.random_deformation((16, 18, 14), 1.5, seed=7)
    c = demo.random_deformation((16, 18, 14), 1.5, seed=8)
    assert a.shape == (1, 3, 16, 18, 14) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.norm(dim=1).max()) == pytest.approx(1.5, rel=0.05)
    assert float(demo.jacobian_determinant(a).min()) > 0


@pytest.mark.slow
@pytest.mark.skipif(NO_NILEARN, reason="the MNI152 template ships with nilearn: pip install nilearn")
def test_demo_on_mni_template(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    nib = pytest.importorskip("nibabel")
    template = nib.load(demo.mni_template_path())
    assert template.shape == (197, 233, 189)
    result = demo.run_warp_demo(tmp_path, device="cpu", repeats=1)
    assert "speed-up" in capsys.readouterr().out
    _check_outputs(tmp_path, template.shape, template.affine)
    assert result["max_abs_diff_vs_grid_sample"] < 1e-4
    assert result["deformation"]["max_displacement_vox"] == pytest.approx(demo.DEFAULT_MAGNITUDE, rel=0.05)
    assert result["deformation"]["folded_fraction"] == 0.0
