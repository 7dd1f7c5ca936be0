"""What `medfast register` writes, checked against independent readers: ddf.nii.gz in ITK's LPS convention (a scipy
map_coordinates reconstruction, and SimpleITK's DisplacementFieldTransform when SimpleITK is installed), the fixed
file's own layout and affine for single slices, load_ddf's round trip, affine.txt / affine.tfm, and a GlobalNet's
affine holding over the whole fixed grid (not only the network's field of view)."""

import json

import numpy as np
import pytest
import torch

import medfast as mf
from medfast.cli import main

nib = pytest.importorskip("nibabel")
ndimage = pytest.importorskip("scipy.ndimage")
try:  # not a dependency: the ITK checks run where it is installed (the test extra)
    import SimpleITK as sitk
except ImportError:  # pragma: no cover - depends on the environment
    sitk = None

needs_sitk = pytest.mark.skipif(sitk is None, reason="SimpleITK is not installed")


def _rot(ax, deg):
    t = np.radians(deg)
    c, s = np.cos(t), np.sin(t)
    r = np.eye(3)
    i, j = [k for k in range(3) if k != ax]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _affine(lin, shape, centre):
    a = np.eye(4)
    a[:3, :3] = lin
    a[:3, 3] = np.asarray(centre, float) - lin @ ((np.asarray(shape, float) - 1) / 2)
    return a


def _ramp(affine, shape):
    """Intensities linear in world (RAS) coordinates: linear interpolation is exact, in any reader."""
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"), -1)
    w = g @ affine[:3, :3].T + affine[:3, 3]
    return (100 + 2.0 * w[..., 0] - 1.3 * w[..., 1] + 0.7 * w[..., 2]).astype(np.float32)


# fixed: oblique / flipped axes (LPS-like), moving: RAS, another spacing and a larger field of view. 2D: both slices
# in the same plane (at the same depth), so that a 3D reader (ITK) samples the moving slice where medfast does.
CASES = {
    "3d": ((16, 14, 12), _rot(2, 12) @ _rot(0, 7) @ np.diag([-2.0, -2.5, 3.0]), (3, -2, 5),
           (48, 44, 40), np.diag([2.0, 2.0, 2.0]), (-1, 2, 0)),
    "axial 2D (X, Y)": ((24, 20), _rot(2, 15) @ np.diag([-1.5, -2.0, 1.0]), (2, 1, 4),
                        (64, 60), np.diag([1.2, 1.3, 1.0]), (0, 0, 4)),
    "axial slice (X, Y, 1)": ((24, 20, 1), _rot(2, 15) @ np.diag([-1.5, -2.0, 1.0]), (2, 1, 4),
                              (64, 60, 1), np.diag([1.2, 1.3, 1.0]), (0, 0, 4)),
    "coronal slice (X, 1, Z)": ((24, 1, 20), _rot(1, 15) @ np.diag([-1.5, -3.0, 2.0]), (2, 1, -3),
                                (64, 1, 60), np.diag([1.2, 2.0, 1.3]), (0, 1, 0)),
    "sagittal slice (1, Y, Z)": ((1, 24, 20), _rot(0, 15) @ np.diag([3.0, -1.5, 2.0]), (-2, 1, 3),
                                 (1, 64, 60), np.diag([2.0, 1.2, 1.3]), (-2, 0, 0)),
}


def _pad3(shape):
    return tuple(shape) + (1,) * (3 - len(shape))


def _write_pair(tmp_path, case):
    fshape, flin, fc, mshape, mlin, mc = CASES[case]
    af, am = _affine(flin, _pad3(fshape), fc), _affine(mlin, _pad3(mshape), mc)
    fixed = 100 + 50 * np.exp(-(((_ramp(af, _pad3(fshape)) - 100) / 30.0) ** 2))  # any image
    paths = {}
    for name, data, aff in (("fixed", fixed.reshape(fshape), af), ("moving", _ramp(am, _pad3(mshape)).reshape(mshape),
                                                                   am)):
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), aff), tmp_path / f"{name}.nii.gz")
        paths[name] = str(tmp_path / f"{name}.nii.gz")
    return paths, af, am


def _known_field(shape, seed=0):
    """A fixed-voxel transform: a small affine ``theta`` and a smooth bump on top (``ddf`` total)."""
    n = len(shape)
    g = torch.Generator().manual_seed(seed)
    theta = torch.eye(n, n + 1, dtype=torch.float64)
    theta[:, :n] += 0.04 * torch.randn(n, n, generator=g, dtype=torch.float64)
    theta[:, n] = torch.tensor([1.5, -2.0, 1.0][:n], dtype=torch.float64)
    x = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))
    ddf = torch.einsum("ij,j...->i...", theta[:, :n], x) + theta[:, n].view(n, *(1,) * n) - x
    for i in range(n):
        ddf[i] += 0.8 * torch.sin(x[(i + 1) % n] / 3.0 + i) * torch.cos(x[i] / 4.0)
    return theta[None].float(), ddf[None].float()


def _register_known(tmp_path, case):
    """write_outputs of a known transform for a pair read as ``medfast register`` reads it."""
    from medfast.data.io import single_slice_axis
    from medfast.tasks.registration import (
        RegistrationResult,
        load_nifti,
        normalize_intensity,
        to_fixed_grid,
        write_outputs,
    )

    paths, af, am = _write_pair(tmp_path, case)
    fdata, faff = load_nifti(paths["fixed"])
    mdata, maff = load_nifti(paths["moving"])
    moving = to_fixed_grid(mdata, maff, faff, fdata.shape)[None, None].double()
    theta, ddf = _known_field(fdata.shape)
    warped = mf.warp(moving, ddf.double()).float()  # medfast's warp of the raw intensities (the reference)
    n = ddf.shape[1]
    res = RegistrationResult(theta, ddf, warped, None, {})
    out = tmp_path / "out"
    write_outputs(out, res, faff, normalize_intensity(torch.as_tensor(fdata)[None, None], spatial_dims=n),
                  normalize_intensity(moving.float(), spatial_dims=n),
                  fixed_slice_axis=single_slice_axis(nib.load(paths["fixed"]).shape),
                  fixed_header=nib.load(paths["fixed"]).header)
    # where x + ddf stays on the fixed grid, medfast's warp of the resampled moving image is exact (a ramp)
    pos = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in fdata.shape],
                                     indexing="ij")) + ddf[0]
    inside = np.all([(pos[i] >= 0).numpy() & (pos[i] <= fdata.shape[i] - 1).numpy() for i in range(n)], 0)
    return paths, af, am, faff, theta, ddf, warped[0, 0].numpy(), inside, out


@pytest.mark.parametrize("case", list(CASES))
def test_ddf_nifti_is_lps_mm_in_the_fixed_layout(tmp_path, case):
    """ddf.nii.gz holds LPS vectors (x, y negated relative to nibabel's RAS): undoing that and sampling the moving
    file at fixed point + ddf (scipy, trilinear, in the moving file's own voxels) reproduces medfast's warp."""
    paths, af, am, faff, theta, ddf, warped, inside, out = _register_known(tmp_path, case)
    fshape = CASES[case][0]
    img = nib.load(out / "ddf.nii.gz")
    assert img.header.get_intent()[0] == "vector" and img.header.get_intent()[2] == "displacement_mm"
    np.testing.assert_allclose(img.affine, af, atol=1e-6)  # the fixed file's affine, its flat axis in place
    comps = np.asarray(img.dataobj, dtype=np.float64)[:, :, :, 0]  # (X, Y, Z, c)
    if case == "3d" or "coronal" in case or "sagittal" in case:
        assert img.shape == (*_pad3(fshape), 1, 3)  # world vectors (ITK reads these slices as 3D images)
        ras = comps * [-1, -1, 1]
    else:  # axial: ITK's 2D frame, LPS x, y
        assert img.shape == (*fshape[:2], 1, 1, 2)
        ras = np.concatenate([-comps, np.zeros(comps.shape[:-1] + (1,))], -1)
    ijk = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in _pad3(fshape)], indexing="ij"), -1)
    moving_world = ijk @ af[:3, :3].T + af[:3, 3] + ras
    mvox = (moving_world - am[:3, 3]) @ np.linalg.inv(am[:3, :3]).T
    mdata = np.asarray(nib.load(paths["moving"]).dataobj, dtype=np.float64).reshape(_pad3(CASES[case][3]))
    sampled = ndimage.map_coordinates(mdata, np.moveaxis(mvox, -1, 0), order=1, mode="nearest")
    sampled = sampled.reshape(warped.shape)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(sampled[inside], warped[inside], atol=2e-3)
    # the 2D outputs keep the fixed file's layout and affine too
    for name in ("warped.nii.gz",):
        w = nib.load(out / name)
        assert w.shape == tuple(fshape)
        np.testing.assert_allclose(w.affine, af, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_load_ddf_and_affine_txt_round_trip(tmp_path, case):
    from medfast.tasks.registration import load_ddf, load_nifti

    paths, af, am, faff, theta, ddf, warped, inside, out = _register_known(tmp_path, case)
    loaded, laff = load_ddf(out / "ddf.nii.gz")
    assert loaded.shape == ddf.shape and loaded.dtype == torch.float32
    torch.testing.assert_close(loaded, ddf, atol=1e-4, rtol=0)
    np.testing.assert_allclose(laff, load_nifti(paths["fixed"])[1], atol=1e-6)
    # affine.txt: RAS world mm, fixed point -> moving point, the affine part (theta) of the transform
    m = np.loadtxt(out / "affine.txt")
    n = ddf.shape[1]
    x = np.array([3.0, 5.0, 2.0][:n])
    p = faff[:3, :n] @ x + faff[:3, 3]
    q = faff[:3, :n] @ (theta[0, :, :n].double().numpy() @ x + theta[0, :, n].double().numpy()) + faff[:3, 3]
    np.testing.assert_allclose(m[:3, :3] @ p + m[:3, 3], q, atol=1e-4)
    np.testing.assert_allclose(m[3], [0, 0, 0, 1])


def _sitk_read(path, pixel):
    img = sitk.ReadImage(str(path), pixel)
    return img


@needs_sitk
@pytest.mark.parametrize("case", list(CASES))
def test_itk_applies_the_ddf_and_affine_like_medfast(tmp_path, case):
    """SimpleITK reads ddf.nii.gz (and affine.tfm) as they are and resamples the moving file like medfast's warp."""
    paths, af, am, faff, theta, ddf, warped, inside, out = _register_known(tmp_path, case)
    fixed = _sitk_read(paths["fixed"], sitk.sitkFloat64)
    moving = _sitk_read(paths["moving"], sitk.sitkFloat64)
    field = _sitk_read(out / "ddf.nii.gz", sitk.sitkVectorFloat64)
    if field.GetDimension() == 2 and fixed.GetDimension() == 3:  # an axial slice (X, Y, 1): its 2D image
        fixed, moving = fixed[:, :, 0], moving[:, :, 0]
    assert field.GetDimension() == fixed.GetDimension() == field.GetNumberOfComponentsPerPixel()
    assert field.GetSize() == fixed.GetSize()
    np.testing.assert_allclose(field.GetDirection(), fixed.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(field.GetOrigin(), fixed.GetOrigin(), atol=1e-5)
    w = sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field), sitk.sitkLinear, 0.0)
    w = sitk.GetArrayFromImage(w).T.reshape(warped.shape)  # ITK arrays are (z, y, x)
    np.testing.assert_allclose(w[inside], warped[inside], atol=2e-3)
    # warped.nii.gz reads in ITK on the fixed grid (a coronal slice stored (X, 1, Z) was refused as singular)
    wimg = sitk.ReadImage(str(out / "warped.nii.gz"))
    assert wimg.GetSize() == sitk.ReadImage(paths["fixed"]).GetSize()
    # affine.tfm: the affine part; ITK resamples the moving image like medfast.affine_warp (exact on a ramp)
    from medfast.tasks.registration import load_nifti, to_fixed_grid

    tfm = sitk.ReadTransform(str(out / "affine.tfm"))
    wa = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tfm, sitk.sitkLinear, 0.0)).T.reshape(warped.shape)
    fdata, _ = load_nifti(paths["fixed"])
    mdata, maff = load_nifti(paths["moving"])
    mv = to_fixed_grid(mdata, maff, faff, fdata.shape)[None, None].double()
    ref = mf.affine_warp(mv, theta.double())[0, 0].numpy()
    n = theta.shape[1]
    pos = np.einsum("ij,j...->i...", theta[0, :, :n].double().numpy(),
                    np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in fdata.shape], indexing="ij")))
    pos += theta[0, :, n].double().numpy().reshape(n, *(1,) * n)
    ok = np.all([(pos[i] >= 0) & (pos[i] <= fdata.shape[i] - 1) for i in range(n)], 0)
    assert ok.mean() > 0.5
    np.testing.assert_allclose(wa[ok], ref[ok], atol=2e-3)


@pytest.mark.parametrize("case", ["3d", "axial slice (X, Y, 1)", "coronal slice (X, 1, Z)"])
def test_cli_outputs_keep_the_fixed_layout_and_load_ddf_repeats_the_warp(tmp_path, case):
    """`medfast register` end to end: warped / ddf / warped_labels in the fixed file's shape and affine (a coronal
    slice stays (X, 1, Z)), and load_ddf's field reproduces warped.nii.gz: the native moving array sampled once
    (scipy, trilinear) at A_m^-1 A_f (x + ddf)."""
    from medfast.tasks.registration import grid_affines, load_ddf, load_nifti, normalize_intensity

    paths, af, am = _write_pair(tmp_path, case)
    fshape = CASES[case][0]
    fdata = np.asarray(nib.load(paths["fixed"]).dataobj)
    lab = (fdata > np.median(fdata)).astype(np.int16) + 1
    nib.save(nib.Nifti1Image(lab, af), tmp_path / "fl.nii.gz")
    mdata = np.asarray(nib.load(paths["moving"]).dataobj)
    nib.save(nib.Nifti1Image((mdata > np.median(mdata)).astype(np.int16), am), tmp_path / "ml.nii.gz")
    out = tmp_path / "out"
    assert main(["register", paths["fixed"], paths["moving"], "--fixed-labels", str(tmp_path / "fl.nii.gz"),
                 "--moving-labels", str(tmp_path / "ml.nii.gz"), "--out", str(out), "--affine-levels", "1",
                 "--affine-iters", "8", "--deform-levels", "1", "--deform-iters", "8", "--kernel-size", "3",
                 "--device", "cpu", "--no-progress"]) == 0
    for name in ("warped.nii.gz", "warped_labels.nii.gz"):
        img = nib.load(out / name)
        assert img.shape == tuple(fshape), name
        np.testing.assert_allclose(img.affine, af, atol=1e-6)
    ddf_img = nib.load(out / "ddf.nii.gz")
    assert ddf_img.shape[:3] == _pad3(fshape) and ddf_img.shape[3] == 1
    np.testing.assert_allclose(ddf_img.affine, af, atol=1e-6)
    ddf, faff = load_ddf(out / "ddf.nii.gz")
    assert float(ddf.abs().max()) > 0.05  # the registration moved something
    fd, fa = load_nifti(paths["fixed"])
    md, ma = load_nifti(paths["moving"])
    n = fd.ndim
    # register samples the native moving array (normalized on its own voxels) once, through the header map
    mv = normalize_intensity(torch.as_tensor(md, dtype=torch.float32), spatial_dims=n).double().numpy()
    a_m, a_f = grid_affines(ma, fa, n)
    p = np.linalg.solve(a_m, a_f)
    pos = np.stack(np.meshgrid(*[np.arange(v, dtype=np.float64) for v in fd.shape], indexing="ij")) + \
        ddf[0].double().numpy()
    pos = np.einsum("ij,j...->i...", p[:n, :n], pos) + p[:n, n].reshape(n, *[1] * n)
    again = ndimage.map_coordinates(mv, pos, order=1, mode="grid-constant", cval=0.0)
    warped = np.asarray(nib.load(out / "warped.nii.gz").dataobj).reshape(again.shape)
    np.testing.assert_allclose(again, warped, atol=1e-4)
    # the recipe of docs/registration.md: one affine_warp with theta = P[:n] and the ddf turned by P's linear part
    theta = torch.as_tensor(p[:n], dtype=torch.float32)[None]
    u = torch.einsum("ij,bj...->bi...", torch.as_tensor(p[:n, :n], dtype=torch.float32), ddf)
    recipe = mf.affine_warp(normalize_intensity(torch.as_tensor(md, dtype=torch.float32)[None, None], spatial_dims=n),
                            theta, ddf=u)
    np.testing.assert_allclose(recipe[0, 0].numpy(), warped, atol=1e-4)
    if sitk is not None and case != "axial slice (X, Y, 1)":  # ITK reads these as the fixed file's 3D grid
        assert sitk.ReadImage(str(out / "ddf.nii.gz")).GetSize() == sitk.ReadImage(paths["fixed"]).GetSize()
        assert sitk.ReadImage(str(out / "warped_labels.nii.gz")).GetSize() == _pad3(fshape)


# ---- a GlobalNet's affine over the whole fixed grid ------------------------------------------------------


def _centred_to_voxel(centred, shape):
    """Independent numpy version: x_moving = h * (A (x - c) / h + t) + c with c the centre, h the half size."""
    n = len(shape)
    c = (np.asarray(shape, float) - 1) / 2
    h = np.maximum(np.asarray(shape, float) - 1, 1) / 2
    t = np.eye(n + 1)
    t[:n, :n] = np.diag(h) @ centred[:, :n] @ np.diag(1 / h)
    t[:n, n] = h * centred[:, n] + c - t[:n, :n] @ c
    return t


@pytest.mark.parametrize("kind", ["GlobalNet", "RegistrationNet"])
def test_model_affine_holds_beyond_the_network_field_of_view(tmp_path, kind):
    """A 72 mm network grid in a 128 mm fixed image: the written transform is the predicted affine everywhere (was
    the border value of the network's displacement outside its grid: up to 6.8 mm off); theta and affine.txt
    return it."""
    from medfast.nets import GlobalNet
    from medfast.tasks.registration import ModelInfo, RegistrationNet, network_grid, register_with_model, write_outputs

    torch.manual_seed(0)
    c, s = np.cos(0.17), np.sin(0.17)
    centred = np.array([[1.0, 0, 0, 0.1], [0, c, -s, 0], [0, s, c, 0]])
    if kind == "GlobalNet":
        net = GlobalNet(3, 2, 4, 2)
        head = net.head
    else:  # global_net first, the LocalNet's output zeroed: the total is the affine
        net = RegistrationNet(3, 2, 4, 2, global_net=True)
        head = net.globalnet.head
        with torch.no_grad():
            for h in net.local.heads.values():
                h.weight.zero_()
                h.bias.zero_()
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor(centred, dtype=torch.float32).reshape(-1))
    info = ModelInfo([24, 24, 24], [3.0, 3.0, 3.0])
    a = np.diag([-2.0, 2.0, 2.0, 1.0])  # stored LPS-ish: the network grid is reoriented
    a[:3, 3] = [63, -63, -63]
    shape = (64, 64, 64)
    g = np.stack(np.meshgrid(*[np.arange(k, dtype=float) for k in shape], indexing="ij"), -1)
    img = (100 + 50 * np.exp(-((g - 31.5) ** 2).sum(-1) / 200)).astype(np.float32)
    res = register_with_model(img, img, net.eval(), info, fixed_affine=a)
    grid = network_grid(a, shape, info)
    m = grid @ _centred_to_voxel(centred, info.input_shape) @ np.linalg.inv(grid)  # world: fixed -> moving
    p = g @ a[:3, :3].T + a[:3, 3]
    q = p @ m[:3, :3].T + m[:3, 3]
    d = res.ddf[0].double().numpy()
    err = np.linalg.norm(p + np.moveaxis(np.einsum("ij,j...->i...", a[:3, :3], d), 0, -1) - q, axis=-1)
    y = (p - grid[:3, 3]) @ np.linalg.inv(grid[:3, :3]).T
    inside = np.all((y >= 0) & (y <= 23), -1)
    assert 0.05 < inside.mean() < 0.5
    assert err.max() < 2e-3, (err[inside].max(), err[~inside].max())
    theta_f = np.linalg.inv(a) @ m @ a
    np.testing.assert_allclose(res.theta[0].double().numpy(), theta_f[:3], atol=1e-4)
    out = tmp_path / "out"
    write_outputs(out, res, a, torch.as_tensor(img)[None, None], torch.as_tensor(img)[None, None])
    np.testing.assert_allclose(np.loadtxt(out / "affine.txt"), m, atol=1e-4)


def test_cli_model_metrics_and_outputs_for_a_globalnet(tmp_path):
    """Through `medfast register --model`: ddf.nii.gz (LPS) equals the world affine G T G^-1 of metrics.json's
    network grid at every fixed voxel."""
    from medfast.nets import GlobalNet
    from medfast.tasks.registration import save_model

    net = GlobalNet(3, 2, 4, 2)
    centred = np.array([[1.02, 0, 0.03, 0.1], [0, 0.98, -0.1, -0.05], [0, 0.1, 1.0, 0.02]])
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor(centred, dtype=torch.float32).reshape(-1))
    save_model(tmp_path / "g.pt", net, {"spatial_dims": 3, "in_channels": 2, "num_channel_initial": 4, "depth": 2},
               [16, 16, 16], [3.0] * 3)
    paths, af, am = _write_pair(tmp_path, "3d")
    out = tmp_path / "out"
    assert main(["register", paths["fixed"], paths["moving"], "--model", str(tmp_path / "g.pt"), "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    grid = np.array(json.loads((out / "metrics.json").read_text())["network_grid"])
    m = grid @ _centred_to_voxel(centred, [16, 16, 16]) @ np.linalg.inv(grid)
    shape = CASES["3d"][0]
    g = np.stack(np.meshgrid(*[np.arange(k, dtype=float) for k in shape], indexing="ij"), -1)
    p = g @ af[:3, :3].T + af[:3, 3]
    d = np.asarray(nib.load(out / "ddf.nii.gz").dataobj, dtype=np.float64)[..., 0, :] * [-1, -1, 1]  # LPS -> RAS
    np.testing.assert_allclose(p + d, p @ m[:3, :3].T + m[:3, 3], atol=2e-3)
    np.testing.assert_allclose(np.loadtxt(out / "affine.txt"), m, atol=1e-4)


# ---- the fixed file's qform / sform on every output ------------------------------------------------------


def _fixed_with_forms(path, forms, shape):
    """A fixed image whose header has ``forms``: qform and sform disagreeing (qform code 1, 30 mm off and turned;
    sform code 2), a qform only, or neither (pixdim only, as some converters write)."""
    a = _affine(_rot(2, 10) @ np.diag([1.2, -1.0, 1.5]), _pad3(shape), (-10, -8, -12))
    rng = np.random.default_rng(0)
    data = rng.normal(0, 5, shape).astype(np.float32)
    data[tuple(slice(s // 4, max(3 * s // 4, 1)) for s in shape)] += 100
    img = nib.Nifti1Image(data, a)
    if forms == "qform != sform":
        b = a.copy()
        b[:3, :3] = _rot(0, 8) @ a[:3, :3]
        b[0, 3] += 30
        img.set_qform(b, code=1)
        img.set_sform(a, code=2)
    elif forms == "qform only":
        img.set_qform(a, code=1)
        img.set_sform(None, code=0)
    else:
        img.header.set_zooms((1.2, 1.0, 1.5)[:len(shape)])
        img.set_qform(None, code=0)
        img.set_sform(None, code=0)
    nib.save(img, path)
    return data


@needs_sitk
@pytest.mark.parametrize("layout", ["3d", "coronal slice (X, 1, Z)"])
@pytest.mark.parametrize("forms", ["qform != sform", "qform only", "neither"])
def test_cli_outputs_carry_the_fixed_qform_and_sform(tmp_path, forms, layout):
    """warped / warped_labels / ddf.nii.gz keep the fixed file's qform and sform (matrices and codes), so that
    SimpleITK (which prefers the qform) places each exactly on the fixed image, as nibabel (the sform) does. A fresh
    header (sform only) put them 30 mm off where the forms disagree, and flipped where the file had neither."""
    shape = (12, 10, 8) if layout == "3d" else (12, 1, 10)
    fixed = tmp_path / "fixed.nii.gz"
    data = _fixed_with_forms(fixed, forms, shape)
    faff = nib.load(fixed).affine
    moving = tmp_path / "moving.nii.gz"
    nib.save(nib.Nifti1Image(np.roll(data, 1, axis=0), faff), moving)
    for name, img in (("fl", fixed), ("ml", moving)):
        nib.save(nib.Nifti1Image((np.asarray(nib.load(img).dataobj) > 50).astype(np.int16), faff),
                 tmp_path / f"{name}.nii.gz")
    out = tmp_path / "out"
    assert main(["register", str(fixed), str(moving), "--fixed-labels", str(tmp_path / "fl.nii.gz"),
                 "--moving-labels", str(tmp_path / "ml.nii.gz"), "--out", str(out), "--affine-levels", "1",
                 "--affine-iters", "2", "--deform-levels", "1", "--deform-iters", "2", "--kernel-size", "3",
                 "--device", "cpu", "--no-progress"]) == 0
    fh = nib.load(fixed).header
    ref = sitk.ReadImage(str(fixed))
    for name in ("warped.nii.gz", "warped_labels.nii.gz", "ddf.nii.gz"):
        h = nib.load(out / name).header
        assert (int(h["qform_code"]), int(h["sform_code"])) == (int(fh["qform_code"]), int(fh["sform_code"])), name
        np.testing.assert_allclose(h.get_qform(), fh.get_qform(), atol=1e-5, err_msg=name)
        np.testing.assert_allclose(h.get_sform(), fh.get_sform(), atol=1e-5, err_msg=name)
        np.testing.assert_allclose(nib.load(out / name).affine, faff, atol=1e-5, err_msg=name)
        img = sitk.ReadImage(str(out / name))
        assert img.GetSize() == ref.GetSize(), name
        np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-4, err_msg=name)
        np.testing.assert_allclose(img.GetDirection(), ref.GetDirection(), atol=1e-6, err_msg=name)
        np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-6, err_msg=name)
    ddf = nib.load(out / "ddf.nii.gz")
    assert ddf.shape == (*shape, 1, 3) and ddf.header.get_intent()[::2] == ("vector", "displacement_mm")
    assert sitk.ReadImage(str(out / "ddf.nii.gz")).GetNumberOfComponentsPerPixel() == 3
    assert nib.load(out / "warped_labels.nii.gz").header.get_intent()[0] == "label"


def test_label_ids_past_float32_integers_are_warped_and_written_exactly(tmp_path):
    """Allen-CCF-like ids (614454277) and 2^24 + 1 were rounded by a float32 nearest warp (Dice 0 of identical maps,
    ids written that the input never held); a uint32 id of 3e9 wrapped negative in the int32 output."""
    from medfast.tasks.registration import RegistrationConfig, _label_codes, _label_values, register_pair

    g = np.random.default_rng(0)
    img = ndimage.gaussian_filter(g.random((20, 22, 18)), 2).astype(np.float32)
    lab = np.zeros(img.shape, np.int64)
    lab[3:10, 4:12, 3:9], lab[11:17, 5:15, 8:15], lab[4:9, 14:20, 10:16] = 2**24 + 1, 614454277, 3_000_000_000
    cfg = RegistrationConfig(affine_levels=(1,), affine_iters=2, deform_levels=(1,), deform_iters=2)
    res = register_pair(torch.from_numpy(img), torch.from_numpy(img), torch.from_numpy(lab), torch.from_numpy(lab),
                        config=cfg, progress=False)
    assert set(res.metrics["dice_before_per_label"].values()) == {1.0}
    assert set(torch.unique(res.warped_labels).tolist()) <= {0, 2**24 + 1, 614454277, 3_000_000_000}
    codes, values = _label_codes(torch.from_numpy(lab))
    assert torch.equal(_label_values(codes, values), torch.from_numpy(lab))
    assert torch.equal(_label_values(torch.zeros(2), values), torch.zeros(2, dtype=torch.long))  # outside: 0
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    for name, data in (("f.nii.gz", img), ("m.nii.gz", img), ("fl.nii.gz", lab.astype(np.uint32)),
                       ("ml.nii.gz", lab.astype(np.uint32))):
        nib.save(nib.Nifti1Image(data, affine), str(tmp_path / name))
    rc = main(["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "--fixed-labels",
               str(tmp_path / "fl.nii.gz"), "--moving-labels", str(tmp_path / "ml.nii.gz"), "--out",
               str(tmp_path / "o"), "--affine-levels", "1", "--deform-levels", "1", "--affine-iters", "2",
               "--deform-iters", "2", "--device", "cpu", "--no-progress"])
    assert rc == 0
    written = np.asarray(nib.load(str(tmp_path / "o" / "warped_labels.nii.gz")).dataobj)
    assert set(np.unique(written).tolist()) <= {0, 2**24 + 1, 614454277, 3_000_000_000}
    assert 3_000_000_000 in set(np.unique(written).tolist())


@pytest.mark.parametrize("unit", ["micron", "meter"])
def test_nifti_in_another_spatial_unit_is_refused(tmp_path, unit):
    """nibabel's affine is in the file's unit: a micron file's 1.5 um voxels were read as 1.5 mm, and ITK read the
    outputs (which copy the header) 1000x off."""
    from medfast.data import DatasetError
    from medfast.data.io import load_nifti

    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.diag([1.5, 1.5, 1.5, 1.0]))
    img.header.set_xyzt_units(unit)
    nib.save(img, str(tmp_path / "x.nii.gz"))
    with pytest.raises(DatasetError, match=f"its spatial unit is '{unit}' .*medfast reads world coordinates in mm"):
        load_nifti(tmp_path / "x.nii.gz")
    rc = main(["register", str(tmp_path / "x.nii.gz"), str(tmp_path / "x.nii.gz"), "--out", str(tmp_path / "o"),
               "--no-progress"])
    assert rc != 0 and not (tmp_path / "o" / "ddf.nii.gz").exists()
    img.header.set_xyzt_units("mm")
    nib.save(img, str(tmp_path / "x.nii.gz"))
    assert load_nifti(tmp_path / "x.nii.gz").data.shape[-3:] == (4, 4, 4)


def test_training_validation_dice_keeps_label_ids_past_float32_integers():
    """RegistrationTask.validation_step warped float32 labels: ids 2^24 + 1 and 2^24 + 3 (Allen CCF) rounded, an
    identity warp of identical maps scored Dice 0 (a review of the exact-ids fix, which missed this path)."""
    import types

    from medfast.tasks.registration import RegistrationTask

    shape = (8, 8, 8)
    lab = torch.zeros(shape, dtype=torch.int64)
    lab[:4], lab[4:] = 2**24 + 1, 2**24 + 3
    img = torch.rand(1, 1, *shape)
    stub = types.SimpleNamespace(val_augment=None, args={"kernel_size": 3},
                                 _pair=lambda batch, device, aug: (img, img, lab[None], lab[None]),
                                 _forward=lambda model, m, f: (torch.zeros(1, 3, *shape), m))
    rows = RegistrationTask.validation_step(stub, None, {}, torch.device("cpu"))
    assert rows[0]["dice_before"] == 1.0 and rows[0]["dice_after"] == 1.0


def test_a_non_standard_time_unit_code_is_read():
    """xyzt_units = mm + time code 64: nibabel's get_xyzt_units raises KeyError on it, which the unit check
    passed on as a traceback naming no file; only the spatial bits count."""
    import tempfile
    from pathlib import Path

    from medfast.data.io import load_nifti

    with tempfile.TemporaryDirectory() as tmp:
        img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
        img.header["xyzt_units"] = 2 + 64
        nib.save(img, str(Path(tmp) / "t.nii.gz"))
        assert load_nifti(Path(tmp) / "t.nii.gz").data.shape[-3:] == (4, 4, 4)
