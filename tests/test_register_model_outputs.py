"""`medfast register --model` (one forward pass of a trained network) makes its outputs as the optimization does:
the native moving image (and labels) sampled once, in its own grid, through the header map and the predicted
transform (checked against an independent scipy reconstruction from ddf.nii.gz and both NIfTI affines), while the
network is still fed the moving image resampled onto the fixed grid, exactly as before; headers that do not overlap
are refused (under half: a warning, and ``overlap_before`` is recorded); a displacement network reports
``folding_percent``. The checkpoints are tiny random-weight LocalNet / GlobalNet models."""

import json

import numpy as np
import pytest
import torch

from medfast.cli import main
from medfast.nets import GlobalNet, LocalNet
from medfast.tasks.registration import (
    ModelInfo,
    _folding_percent,
    load_ddf,
    load_model_info,
    load_nifti,
    normalize_intensity,
    register_with_model,
    save_model,
    to_fixed_grid,
)

nib = pytest.importorskip("nibabel")
ndimage = pytest.importorskip("scipy.ndimage")

KW = dict(spatial_dims=3, in_channels=2, num_channel_initial=4, depth=2)
FIX_SHAPE, MOV_SHAPE = (20, 18, 14), (36, 40, 34)


def _rotation(deg):
    """xyz Euler angles (degrees) as a 3x3 rotation."""
    out = np.eye(3)
    for axis, a in enumerate(np.radians(deg)):
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = r @ out
    return out


def _affines():
    """Fixed: oblique, anisotropic, a small field of view; moving: LPS, 2 mm, a larger one, shifted."""
    af = np.eye(4)
    af[:3, :3] = _rotation([10, -15, 20]) * [2.5, 3.0, 3.5]
    af[:3, 3] = -af[:3, :3] @ ((np.array(FIX_SHAPE) - 1) / 2)
    am = np.diag([-2.0, -2.0, 2.0, 1.0])
    am[:3, 3] = -am[:3, :3] @ ((np.array(MOV_SHAPE) - 1) / 2) + [3, -2, 1]
    return af, am


def _world(aff, shape):
    ijk = np.indices(shape).reshape(3, -1)
    return aff[:3, :3] @ ijk + aff[:3, 3:]


def _head(world):
    """A smooth synthetic head (mm), with a masked background."""
    x, y, z = world
    r = np.sqrt((x / 30) ** 2 + (y / 36) ** 2 + (z / 28) ** 2)
    return np.where(r < 1, 100 + 60 * np.sin(x / 7) * np.cos(y / 9) + 20 * z / 28, 0.0) + 5


def _labels(world):
    """Labels with ids past float32's integers (2^24 + 1)."""
    e = np.linalg.norm(world / [[28], [32], [24]], axis=0) < 1
    lab = np.zeros(world.shape[1], np.int64)
    lab[e] = 70001
    lab[e & (world[0] > 0)] = 16777217
    lab[np.linalg.norm((world - [[5], [5], [0]]) / 9, axis=0) < 1] = 3
    return lab


def _pair(tmp_path, am=None):
    af, am0 = _affines()
    am = am0 if am is None else am
    files = {}
    for stem, aff, shape in (("fixed", af, FIX_SHAPE), ("moving", am, MOV_SHAPE)):
        w = _world(aff, shape)
        for kind, data in ((stem, _head(w).astype(np.float32)), (stem[0] + "l", _labels(w).astype(np.int32))):
            files[kind] = str(tmp_path / f"{kind}.nii.gz")
            nib.save(nib.Nifti1Image(data.reshape(shape), aff), files[kind])
    return files, af, am


def _localnet(path):
    torch.manual_seed(0)
    kw = dict(KW, extract_levels=(0, 1, 2))
    net = LocalNet(**kw)
    with torch.no_grad():  # random weights: a sizable (several mm), smooth-ish displacement
        for name, p in net.named_parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.15 if "heads" in name else 0.5)
    save_model(path, net, kw, [16, 16, 16], spacing=[3.0, 3.0, 3.0])


def _globalnet(path):
    torch.manual_seed(1)
    net = GlobalNet(**KW)
    with torch.no_grad():
        net.head.weight.normal_(0, 0.02)
        net.head.bias.add_(torch.randn_like(net.head.bias) * 0.05)
    save_model(path, net, KW, [16, 16, 16], spacing=[4.0, 4.0, 4.0])


def _moving_voxels(out, af, am):
    """Independent: the moving array voxel of every fixed voxel, from ddf.nii.gz (LPS mm) and both affines."""
    ddf = np.asarray(nib.load(out / "ddf.nii.gz").dataobj, dtype=np.float64)[..., 0, :] * [-1, -1, 1]  # RAS
    world = _world(af, FIX_SHAPE) + ddf.reshape(-1, 3).T
    return np.linalg.solve(am, np.vstack([world, np.ones(world.shape[1])]))[:3]


def _dice(a, b, ids):
    return float(np.mean([2 * ((a == k) & (b == k)).sum() / ((a == k).sum() + (b == k).sum()) for k in ids]))


@pytest.mark.parametrize("kind", ["LocalNet", "GlobalNet"])
def test_model_outputs_sample_the_native_moving_image_once(tmp_path, kind):
    """warped.nii.gz is the native moving image (normalized on its own voxels) sampled once at the moving point of
    ddf.nii.gz; warped_labels one nearest step from the native labels, Dice after from them. It was the moving image
    resampled onto the fixed grid, normalized there, then warped: zeros where the displacement left the fixed field
    of view inside the moving image, 0.67 off, labels moved by two nearest steps, Dice after 0.04 off."""
    files, af, am = _pair(tmp_path)
    (_localnet if kind == "LocalNet" else _globalnet)(tmp_path / "m.pt")
    out = tmp_path / "out"
    cls = LocalNet if kind == "LocalNet" else GlobalNet
    seen, forward = [], cls.forward
    try:  # what the network is fed
        cls.forward = lambda self, x: (seen.append(x.clone()), forward(self, x))[1]
        assert main(["register", files["fixed"], files["moving"], "--model", str(tmp_path / "m.pt"), "--fixed-labels",
                     files["fl"], "--moving-labels", files["ml"], "--out", str(out), "--no-progress", "--device",
                     "cpu"]) == 0
        # only the outputs change: the network still sees the moving image resampled onto the fixed grid by the
        # headers (then onto its own grid), exactly
        net, info = load_model_info(tmp_path / "m.pt")
        (fdata, faff), (mdata, maff) = load_nifti(files["fixed"]), load_nifti(files["moving"])  # as the CLI reads
        register_with_model(fdata, to_fixed_grid(mdata, maff, faff, FIX_SHAPE), net, info, fixed_affine=faff)
    finally:
        cls.forward = forward
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], seen[1], rtol=0, atol=0)
    mvox = _moving_voxels(out, af, am)
    mdata = np.asarray(nib.load(files["moving"]).dataobj)
    mnorm = normalize_intensity(torch.as_tensor(mdata)).numpy()
    ref = ndimage.map_coordinates(mnorm, mvox, order=1, mode="grid-constant", cval=0.0).reshape(FIX_SHAPE)
    warped = np.asarray(nib.load(out / "warped.nii.gz").dataobj)
    # a real test: the transform moves points beyond the fixed field of view, into the moving image
    fvox = np.linalg.solve(af, am @ np.vstack([mvox, np.ones(mvox.shape[1])]))[:3]
    beyond = np.any((fvox < -0.5) | (fvox > np.array(FIX_SHAPE)[:, None] - 0.5), 0)
    inside_moving = np.all((mvox >= 0) & (mvox <= np.array(MOV_SHAPE)[:, None] - 1), 0)
    assert (beyond & inside_moving & (ref.reshape(-1) > 0.05)).sum() > 5
    np.testing.assert_allclose(warped, ref, atol=1e-5)

    mlab = np.asarray(nib.load(files["ml"]).dataobj).astype(np.int64)
    ref_lab = mlab[tuple(np.clip(np.floor(mvox + 0.5).astype(np.int64), 0, np.array(MOV_SHAPE)[:, None] - 1))]
    ref_lab[~np.all((mvox > -0.5) & (mvox < np.array(MOV_SHAPE)[:, None] - 0.5), 0)] = 0
    ref_lab = ref_lab.reshape(FIX_SHAPE)
    wl = np.asarray(nib.load(out / "warped_labels.nii.gz").dataobj)
    # where a position lies on a voxel boundary (to float32 rounding) either neighbour is right
    tie = np.any(np.abs(mvox - np.floor(mvox) - 0.5) < 1e-4, 0).reshape(FIX_SHAPE)
    assert tie.mean() < 0.005
    np.testing.assert_array_equal(wl[~tie], ref_lab[~tie])  # one nearest step, the exact ids (2^24 + 1 included)
    assert set(np.unique(wl)) == {0, 3, 70001, 16777217}
    flab = np.asarray(nib.load(files["fl"]).dataobj)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dice_after"] == pytest.approx(_dice(wl, flab, [3, 70001, 16777217]), abs=1e-9)
    assert metrics["dice_after"] == pytest.approx(_dice(ref_lab, flab, [3, 70001, 16777217]), abs=1e-3)


def test_model_refuses_headers_that_do_not_overlap(tmp_path, capsys):
    """A moving header 500 mm away: the error of the optimization path, naming both files (was: exit 0 with an
    all-zero warped image); no output folder left behind."""
    far = _affines()[1]
    far[0, 3] += 500
    files, _, _ = _pair(tmp_path, far)
    _localnet(tmp_path / "m.pt")
    out = tmp_path / "out"
    assert main(["register", files["fixed"], files["moving"], "--model", str(tmp_path / "m.pt"), "--out", str(out),
                 "--no-progress", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "do not overlap" in err and "fixed.nii.gz" in err and "moving.nii.gz" in err
    assert not out.exists()


def test_model_warns_on_partial_overlap_and_records_it(tmp_path, capsys):
    part = _affines()[1]
    part[0, 3] += 40  # the moving grid (72 mm wide) moved most of the way off the fixed one
    files, _, _ = _pair(tmp_path, part)
    _localnet(tmp_path / "m.pt")
    out = tmp_path / "out"
    assert main(["register", files["fixed"], files["moving"], "--model", str(tmp_path / "m.pt"), "--out", str(out),
                 "--no-progress", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "fixed.nii.gz" in err and "moving.nii.gz" in err
    assert 0.02 < json.loads((out / "metrics.json").read_text())["overlap_before"] < 0.5


def test_model_metrics_report_overlap_and_folding(tmp_path):
    """metrics.json has overlap_before and, for a displacement network (LocalNet), folding_percent of the written
    ddf (none for a GlobalNet: an affine does not fold)."""
    files, af, am = _pair(tmp_path)
    _localnet(tmp_path / "l.pt")
    _globalnet(tmp_path / "g.pt")
    for name in ("l", "g"):
        assert main(["register", files["fixed"], files["moving"], "--model", str(tmp_path / f"{name}.pt"), "--out",
                     str(tmp_path / name), "--no-progress", "--device", "cpu"]) == 0
    ml, mg = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("l", "g"))
    assert ml["folding_percent"] == pytest.approx(_folding_percent(load_ddf(tmp_path / "l" / "ddf.nii.gz")[0]),
                                                  abs=0.1)
    assert "folding_percent" not in mg
    assert ml["overlap_before"] == pytest.approx(1.0) and mg["overlap_before"] == pytest.approx(1.0)


def test_register_with_model_moving_affine_arguments():
    """The API: a moving image on its own grid needs both affines; without them the grids must match."""
    net = LocalNet(**KW, extract_levels=(0, 1, 2)).eval()
    info = ModelInfo([16, 16, 16], [3.0, 3.0, 3.0])
    af, am = _affines()
    fixed = np.ones(FIX_SHAPE, np.float32)
    moving = np.ones(MOV_SHAPE, np.float32)
    with pytest.raises(ValueError, match="moving_affine"):
        register_with_model(fixed, moving, net, info, fixed_affine=af)
    with pytest.raises(ValueError, match="moving_affine needs fixed_affine"):
        register_with_model(fixed, moving, net, info, moving_affine=am)
    with pytest.raises(ValueError, match="moving_affine"):
        register_with_model(fixed, moving, net, info, fixed_affine=af, moving_affine=np.eye(3))
    res = register_with_model(fixed, moving, net, info, fixed_affine=af, moving_affine=am)
    assert res.warped.shape == (1, 1, *FIX_SHAPE) and res.metrics["overlap_before"] > 0.99
