"""Registration networks, instance optimization, `medfast register` end to end on tiny synthetic data."""

import json
import math

import numpy as np
import pytest
import torch

import medfast as mf
from medfast.cli import main
from medfast.nets import GlobalNet, LocalNet
from medfast.nets.registration import affine_ddf, centred_to_voxel
from medfast.tasks.registration import (
    COLIN27_PATH,
    RegistrationConfig,
    level_theta,
    normalize_intensity,
    register_pair,
    run_registration_demo,
    save_model,
)

nib = pytest.importorskip("nibabel")


def _phantom(shape=(28, 30, 26)):
    """Smooth image of three ellipsoids (labels 1..3) with distinct intensities, plus its labels."""
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij"))
    labels = torch.zeros(shape, dtype=torch.long)
    specs = [((0.0, 0.0, 0.0), (0.75, 0.65, 0.7), 1), ((0.15, -0.1, 0.1), (0.4, 0.35, 0.3), 2),
             ((-0.25, 0.25, -0.1), (0.2, 0.25, 0.2), 3)]
    for c, r, k in specs:
        d = sum(((grid[i] - c[i]) / r[i]) ** 2 for i in range(3))
        labels[d <= 1] = k
    image = torch.tensor([0.0, 0.3, 0.7, 1.0])[labels]
    image = torch.nn.functional.avg_pool3d(image[None, None], 3, 1, 1, count_include_pad=False)[0, 0]
    return image, labels


def _transform(image, labels, seed=0):
    """A known affine (rotation + shift) and smooth deformation of the phantom."""
    g = torch.Generator().manual_seed(seed)
    shape = image.shape
    a = math.radians(8)
    A = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]]) * 1.05
    centred = torch.cat([A, torch.tensor([[0.06], [-0.05], [0.04]])], 1)[None]
    theta = centred_to_voxel(centred, shape)
    coarse = torch.randn(1, 3, 4, 4, 4, generator=g) * 1.2
    u = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
    moving = mf.affine_warp(image[None, None], theta, ddf=u)[0, 0]
    mlab = mf.affine_warp(labels[None, None].float(), theta, ddf=u, mode="nearest")[0, 0].long()
    return moving, mlab


_FAST = RegistrationConfig(affine_levels=(2, 1), affine_iters=40, affine_lr=0.02, deform_levels=(2, 1),
                           deform_iters=40, deform_lr=0.5, kernel_size=5, bending_weight=0.5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_nets_start_at_identity_and_train(ndim):
    shape = (20, 18, 16)[:ndim] if ndim == 3 else (24, 20)
    x = torch.rand(2, 2, *shape)
    local = LocalNet(ndim, num_channel_initial=4, depth=2, extract_levels=(0, 1, 2))
    ddf = local(x)
    assert ddf.shape == (2, ndim, *shape) and ddf.abs().max() == 0
    ddf.pow(2).sum().backward()  # heads are zero: gradients reach them
    assert local.heads["0"].weight.grad is not None
    glob = GlobalNet(ndim, num_channel_initial=4, depth=2)
    theta, gddf = glob(x)
    torch.testing.assert_close(theta, torch.eye(ndim, ndim + 1).expand(2, -1, -1))
    assert gddf.shape == (2, ndim, *shape) and gddf.abs().max() < 1e-5
    with pytest.raises(ValueError, match="input must have shape"):
        local(torch.rand(1, 3, *shape))
    with pytest.raises(ValueError, match="extract_levels"):
        LocalNet(ndim, depth=2, extract_levels=(3,))


@pytest.mark.parametrize("channels_last", [None, False])
def test_localnet_cpu_path_matches_stock_torch_layers(channels_last):
    """The 3D CPU paths (oneDNN convolutions forward and backward, channels-last by default with the
    instance norm as a one-channel-per-group group norm; or NCDHW) give the outputs and gradients of the
    same network on the stock torch.nn layers."""
    from medfast.nets import use_torch_layers

    torch.manual_seed(0)
    net = LocalNet(3, num_channel_initial=4, depth=2, extract_levels=(0, 1, 2), channels_last=channels_last)
    with torch.no_grad():
        for h in net.heads.values():
            h.weight.normal_(0, 0.1)
    stock = use_torch_layers(LocalNet(3, num_channel_initial=4, depth=2, extract_levels=(0, 1, 2),
                                      channels_last=False))
    stock.load_state_dict(net.state_dict())  # same parameters: checkpoints load both ways
    # odd sizes: ceil-mode pooling and the transposed-conv crop are exercised too
    x = torch.rand(1, 2, 13, 10, 9)

    def run(model):
        model.zero_grad()
        out = model(x)
        out.pow(2).sum().backward()
        return out, [p.grad.clone() for p in model.parameters()]

    fast, fast_grads = run(net)
    ref, ref_grads = run(stock)
    assert fast.is_contiguous()
    assert _uses_onednn(fast)
    assert not _uses_onednn(ref)
    torch.testing.assert_close(fast.detach(), ref.detach(), rtol=1e-4, atol=1e-5)
    # (the biases of convolutions followed by a norm have an exact-zero gradient: compare on the global scale)
    scale = max(float(g.abs().max()) for g in ref_grads)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * scale)
    assert isinstance(net.heads["0"], torch.nn.Conv3d) and isinstance(net.encoder.blocks[0][1], torch.nn.InstanceNorm3d)
    assert type(stock.heads["0"]) is torch.nn.Conv3d


def _uses_onednn(out: torch.Tensor) -> bool:
    """Whether medfast's oneDNN convolution is in the autograd graph of ``out``."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn.name().startswith("_OneDNNConv3d"):
            return True
        todo.extend(f for f, _ in fn.next_functions)
    return False


def test_affine_conventions():
    shape = (9, 10, 11)
    centred = torch.eye(3, 4)[None].clone()
    centred[0, :, 3] = torch.tensor([0.2, -0.1, 0.3])
    theta = centred_to_voxel(centred, shape)
    h = torch.tensor([(s - 1) / 2 for s in shape])
    torch.testing.assert_close(theta[0, :, 3], centred[0, :, 3] * h)  # translation in voxels = t * half size
    torch.testing.assert_close(level_theta(centred, shape, 1), theta)
    # level f: level voxel i sits at f i + (f - 1) / 2 in full-resolution voxels
    for f in (2, 3):
        tl = level_theta(centred, shape, f)
        i = torch.tensor([1.0, 2.0, 3.0])
        x = f * i + (f - 1) / 2
        full = theta[0, :, :3] @ x + theta[0, :, 3]
        torch.testing.assert_close((full - (f - 1) / 2) / f, tl[0, :, :3] @ i + tl[0, :, 3])
    ddf = affine_ddf(theta, shape)
    torch.testing.assert_close(ddf[0, :, 0, 0, 0], theta[0, :, 3])


def test_instance_optimization_improves_every_stage():
    image, labels = _phantom()
    moving, mlab = _transform(image, labels)
    res = register_pair(image, moving, labels, mlab, _FAST, progress=False)
    m = res.metrics
    assert m["dice_before"] < m["dice_affine"] < m["dice_after"], m
    assert m["dice_after"] > 0.8
    assert m["lncc_before"] > m["lncc_affine"] > m["lncc_after"]
    assert res.ddf.shape == (1, 3, *image.shape) and res.warped_labels.shape == image.shape
    # the warped image is the moving image sampled at x + ddf
    torch.testing.assert_close(res.warped, mf.warp(normalize_intensity(moving[None, None]),
                                                   res.ddf), atol=1e-4, rtol=0)


def test_weak_supervision_and_velocity_2d():
    image, labels = _phantom((40, 44, 3))
    image, labels = image[:, :, 1], labels[:, :, 1]
    moving = torch.roll(image, (2, -2), (0, 1))
    mlab = torch.roll(labels, (2, -2), (0, 1))
    cfg = RegistrationConfig(affine_levels=(), deform_levels=(2, 1), deform_iters=40, deform_lr=1.0,
                             kernel_size=5, dice_weight=1.0, velocity=True)
    res = register_pair(image, moving, labels, mlab, cfg, progress=False)
    assert res.metrics["dice_after"] > res.metrics["dice_before"] + 0.1
    assert res.metrics["dice_affine"] == res.metrics["dice_before"]  # affine stage skipped


def test_register_pair_bad_inputs():
    a = torch.rand(8, 8, 8)
    with pytest.raises(ValueError, match="share a grid"):
        register_pair(a, torch.rand(8, 8, 9), progress=False)
    with pytest.raises(ValueError, match="give both"):
        register_pair(a, a, fixed_labels=torch.ones(8, 8, 8, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="no foreground"):
        register_pair(a, a, torch.zeros(8, 8, 8), torch.zeros(8, 8, 8), progress=False)
    with pytest.raises(ValueError, match="kernel_size"):
        RegistrationConfig(kernel_size=4)
    with pytest.raises(ValueError, match="deform_levels"):
        RegistrationConfig(deform_levels=(0,))
    with pytest.raises(TypeError, match="fixed must be a tensor"):
        register_pair([1, 2], a, progress=False)


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)


def test_cli_register_end_to_end(tmp_path, capsys):
    image, labels = _phantom((24, 26, 22))
    moving, mlab = _transform(image, labels, seed=1)
    affine = np.diag([2.0, 2.0, 2.5, 1.0])
    affine[:3, 3] = [-20, -30, -25]
    _write(tmp_path / "f.nii.gz", image.numpy(), affine)
    _write(tmp_path / "m.nii.gz", (moving * 1000).numpy(), affine)
    _write(tmp_path / "fl.nii.gz", labels.numpy().astype(np.int16), affine)
    _write(tmp_path / "ml.nii.gz", mlab.numpy().astype(np.int16), affine)
    out = tmp_path / "out"
    rc = main(["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "--fixed-labels",
               str(tmp_path / "fl.nii.gz"), "--moving-labels", str(tmp_path / "ml.nii.gz"), "--out", str(out),
               "--affine-levels", "2,1", "--deform-levels", "2,1", "--affine-iters", "30", "--deform-iters", "30",
               "--kernel-size", "5", "--device", "cpu", "--no-progress"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dice_after"] > metrics["dice_before"]
    assert printed["dice_after"] == pytest.approx(metrics["dice_after"])
    ddf = nib.load(out / "ddf.nii.gz")
    assert ddf.shape == (24, 26, 22, 1, 3)
    np.testing.assert_allclose(ddf.affine, affine)
    warped = nib.load(out / "warped.nii.gz")
    assert warped.shape == (24, 26, 22)
    np.testing.assert_allclose(warped.affine, affine)
    # ddf in mm: the fixed affine's linear part times the voxel displacement
    res_vox = np.asarray(ddf.dataobj)[..., 0, :] / np.array([2.0, 2.0, 2.5])
    assert np.abs(res_vox).max() > 0.5
    assert (out / "overlay.png").stat().st_size > 1000
    assert nib.load(out / "warped_labels.nii.gz").shape == (24, 26, 22)

    # a trained-model checkpoint (here an untrained LocalNet: the identity) through --model
    net = LocalNet(3, num_channel_initial=4, depth=2, extract_levels=(0, 1))
    save_model(tmp_path / "net.pt", net, dict(spatial_dims=3, num_channel_initial=4, depth=2, extract_levels=(0, 1)),
               (16, 16, 16))
    rc = main(["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "--model",
               str(tmp_path / "net.pt"), "--out", str(tmp_path / "out2"), "--device", "cpu"])
    assert rc == 0
    m2 = json.loads((tmp_path / "out2" / "metrics.json").read_text())
    assert m2["lncc_after"] == pytest.approx(m2["lncc_before"], abs=1e-6)  # identity network

    # errors: no traceback, exit status 1, the file named
    rc = main(["register", str(tmp_path / "missing.nii.gz"), str(tmp_path / "m.nii.gz"), "--out", str(out)])
    assert rc == 1
    assert "missing.nii.gz" in capsys.readouterr().err
    rc = main(["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "--fixed-labels",
               str(tmp_path / "fl.nii.gz"), "--out", str(out)])
    assert rc == 1


def _reoriented(data, affine, ornt):
    """The same image stored in another voxel order: ``ornt`` as nibabel's orientation arrays."""
    from nibabel import orientations as ornt_mod

    ornt = np.asarray(ornt, dtype=float)
    new_affine = affine @ ornt_mod.inv_ornt_aff(ornt, data.shape)
    return np.ascontiguousarray(ornt_mod.apply_orientation(data, ornt)), new_affine


def test_register_with_model_is_orientation_and_spacing_independent(tmp_path):
    """`medfast register --model` on the same pair stored RAS and stored LPS with the axes permuted gives
    the same warped image and world displacement; the network sees its training spacing and shape."""
    from medfast.data.preprocess import reorient_to_ras
    from medfast.tasks.registration import RegistrationNet, load_model_info

    image, labels = _phantom((24, 26, 22))
    moving, mlab = _transform(image, labels, seed=1)
    affine = np.diag([2.0, 1.5, 2.5, 1.0])
    affine[:3, 3] = [-20, -30, -25]
    torch.manual_seed(0)
    kw = dict(spatial_dims=3, in_channels=2, num_channel_initial=4, depth=2, extract_levels=(0, 1, 2))
    net = RegistrationNet(**kw)
    with torch.no_grad():  # a non-trivial (non-symmetric) field
        for h in net.local.heads.values():
            h.weight.normal_(0, 0.3)
            h.bias.normal_(0, 0.3)
    save_model(tmp_path / "net.pt", net, kw, (16, 18, 14), spacing=(3.0, 3.0, 3.5))
    _, info = load_model_info(tmp_path / "net.pt")
    assert info.spacing == [3.0, 3.0, 3.5] and info.input_shape == [16, 18, 14] and info.reorient

    # axis 0 flipped (R -> L), axis 1 flipped and moved last (A -> P), axis 2 moved to the middle
    lps = [[0, -1], [2, -1], [1, 1]]
    outs = {}
    for name, ornt in (("ras", None), ("lps", lps)):
        files = []
        for stem, data in (("f", image.numpy()), ("m", (moving * 1000).numpy()),
                           ("fl", labels.numpy().astype(np.int16)), ("ml", mlab.numpy().astype(np.int16))):
            arr, aff = (data, affine) if ornt is None else _reoriented(data, affine, ornt)
            _write(tmp_path / f"{name}_{stem}.nii.gz", arr, aff)
            files.append(str(tmp_path / f"{name}_{stem}.nii.gz"))
        out = tmp_path / f"out_{name}"
        assert main(["register", files[0], files[1], "--fixed-labels", files[2], "--moving-labels", files[3],
                     "--model", str(tmp_path / "net.pt"), "--out", str(out), "--device", "cpu"]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        grid = np.asarray(metrics["network_grid"])
        np.testing.assert_allclose(np.sqrt((grid[:3, :3] ** 2).sum(0)), [3.0, 3.0, 3.5])  # training spacing
        assert np.all(np.diag(grid[:3, :3]) > 0)  # RAS axes
        warped, ddf = nib.load(out / "warped.nii.gz"), nib.load(out / "ddf.nii.gz")
        assert warped.shape == ((24, 26, 22) if ornt is None else (24, 22, 26))
        # back to RAS voxel order for the comparison (exact flips/permutations)
        w, w_aff = reorient_to_ras(np.asarray(warped.dataobj), warped.affine, channels=False)
        d = np.asarray(ddf.dataobj)[..., 0, :]
        d, _ = reorient_to_ras(np.moveaxis(d, -1, 0), ddf.affine, channels=True)
        outs[name] = (w, w_aff, d, metrics)
    (w_r, a_r, d_r, m_r), (w_l, a_l, d_l, m_l) = outs["ras"], outs["lps"]
    np.testing.assert_allclose(a_l, a_r, atol=1e-6)
    assert np.abs(d_r).max() > 1.0  # the network moves voxels by more than a millimetre
    np.testing.assert_allclose(d_l, d_r, atol=1e-4 * np.abs(d_r).max())  # world displacement, mm
    np.testing.assert_allclose(w_l, w_r, atol=1e-4)
    assert m_l["dice_after"] == pytest.approx(m_r["dice_after"], abs=1e-3)
    assert m_l["lncc_after"] == pytest.approx(m_r["lncc_after"], abs=1e-4)


@pytest.mark.skipif(not COLIN27_PATH.is_file(), reason="needs Colin27 from Debian mricron-data (scripts/data.sh)")
def test_demo_colin27_to_mni_improves_at_each_stage(tmp_path):
    pytest.importorskip("nilearn", reason="needs the MNI152 T1 inside the nilearn wheel")
    cfg = RegistrationConfig(affine_levels=(2, 1), affine_iters=40, deform_levels=(2, 1), deform_iters=25)
    s = run_registration_demo(tmp_path, resolution=6.0, config=cfg, progress=False)
    assert s["dice_before"] < s["dice_affine"] < s["dice_after"], s
    assert (tmp_path / "demo.json").is_file() and (tmp_path / "overlay.png").is_file()


def test_register_pair_array_forms_and_non_finite_images(tmp_path):
    from medfast.tasks.registration import write_outputs

    cfg = RegistrationConfig(affine_levels=(1,), affine_iters=2, deform_levels=(1,), deform_iters=2, kernel_size=3)
    g = torch.Generator().manual_seed(0)
    img2 = torch.rand(16, 14, generator=g)
    res = register_pair(img2[None, None], img2[None, None], config=cfg, progress=False, spatial_dims=2)
    assert tuple(res.ddf.shape) == (1, 2, 16, 14)  # (1, C, H, W) is a 2D image with spatial_dims=2
    with pytest.raises(ValueError, match="needs spatial_dims=2"):
        register_pair(img2[None, None], img2[None, None], config=cfg, progress=False)
    img3 = torch.rand(2, 10, 12, 11, generator=g)  # (C, D, H, W): two channels
    res = register_pair(img3, img3, config=cfg, progress=False)
    assert tuple(res.ddf.shape) == (1, 3, 10, 12, 11)
    bad = img3.clone()
    bad[0, 3, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="moving contains NaN or inf"):
        register_pair(img3, bad, config=cfg, progress=False)
    # a 2D displacement is written as a NIfTI vector image: (X, Y, 1, 1, 2)
    res = register_pair(img2, img2, config=cfg, progress=False)
    paths = write_outputs(tmp_path, res, np.eye(4), img2[None, None], img2[None, None], None)
    assert nib.load(paths["ddf"]).shape == (16, 14, 1, 1, 2)


# 2D storage variants of one slice: each maps the as-is array onto the stored one and is its own inverse
_FLIPS_2D = {"xflip": lambda a: a[::-1], "yflip": lambda a: a[:, ::-1], "transpose": lambda a: np.swapaxes(a, 0, 1),
             "xyflip": lambda a: a[::-1, ::-1]}


def _stored_2d(affine, name):
    """The 4x4 affine of ``_FLIPS_2D[name]`` applied to a slice whose voxel axes 0, 1 lie in the plane of
    ``affine`` (its shape ``shape``): every voxel keeps its world position."""
    a = np.array(affine, dtype=np.float64)

    def at(shape):
        out = a.copy()
        if name == "transpose":
            out[:, [0, 1]] = a[:, [1, 0]]
            return out
        for ax in ((0,) if name == "xflip" else (1,) if name == "yflip" else (0, 1)):
            out[:, 3] = a[:, ax] * (shape[ax] - 1) + out[:, 3]
            out[:, ax] = -a[:, ax]
        return out

    return at


def _net_2d(seed=0):
    from medfast.tasks.registration import RegistrationNet

    torch.manual_seed(seed)
    kw = dict(spatial_dims=2, in_channels=2, num_channel_initial=4, depth=2, extract_levels=(0, 1, 2))
    net = RegistrationNet(**kw)
    with torch.no_grad():  # an untrained but non-trivial, deterministic field that is not mirror-symmetric
        for h in net.local.heads.values():
            h.weight.normal_(0, 0.3)
            h.bias.normal_(0, 0.3)
    return net, kw


@pytest.mark.parametrize("plane", ["axial", "coronal"])
def test_register_with_model_2d_is_storage_order_independent(tmp_path, plane):
    """The 2D pair stored as is, x-flipped, y-flipped, transposed or both flipped gives the network the same
    input and the same world displacement / warped image / Dice (2D images used to enter in storage order: a
    flipped copy gave another world field). A coronal slice is stored (X, 1, Z), whose in-plane frame
    (spatial_affine) is mirrored by a flip: the orientation must not follow it."""
    from medfast.tasks.registration import load_ddf, load_model_info, network_grid

    image, labels = _phantom((24, 26, 22))
    moving, mlab = _transform(image, labels, seed=1)
    k = 11  # one slice of the phantom pair: not symmetric
    data = {"f": image[:, :, k].numpy(), "m": (moving[:, :, k] * 1000).numpy(),
            "fl": labels[:, :, k].numpy().astype(np.int16), "ml": mlab[:, :, k].numpy().astype(np.int16)}
    if plane == "axial":  # (X, Y, 1)
        affine = np.diag([2.0, 1.5, 3.0, 1.0])
        expand = lambda a: a[:, :, None]  # noqa: E731
    else:  # coronal single slice (X, 1, Z); columns in the slice's order: x, z in plane, y (flat) last
        affine = np.array([[2.0, 0, 0, -20], [0, 0, 3.0, 5], [0, 1.5, 0, -30], [0, 0, 0, 1]])
        expand = lambda a: a[:, None, :]  # noqa: E731
    net, kw = _net_2d()
    save_model(tmp_path / "net.pt", net, kw, (16, 18), spacing=(2.5, 2.0))
    _, info = load_model_info(tmp_path / "net.pt")
    outs = {}
    for name in ("as_is", *_FLIPS_2D):
        flip = (lambda a: a) if name == "as_is" else _FLIPS_2D[name]
        aff = affine if name == "as_is" else _stored_2d(affine, name)(data["f"].shape)
        if plane == "coronal":  # the file's (X, 1, Z) column order
            aff = aff[:, [0, 2, 1, 3]]
        files = []
        for stem, arr in data.items():
            _write(tmp_path / f"{name}_{stem}.nii.gz", expand(np.ascontiguousarray(flip(arr))), aff)
            files.append(str(tmp_path / f"{name}_{stem}.nii.gz"))
        out = tmp_path / f"out_{name}"
        assert main(["register", files[0], files[1], "--fixed-labels", files[2], "--moving-labels", files[3],
                     "--model", str(tmp_path / "net.pt"), "--out", str(out), "--device", "cpu"]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        ddf, ddf_aff = load_ddf(out / "ddf.nii.gz")  # fixed voxels of the stored slice
        world = np.einsum("ij,jxy->ixy", ddf_aff[:3, :2], ddf[0].double().numpy())  # mm, (3, *S)
        warped = np.asarray(nib.load(out / "warped.nii.gz").dataobj).squeeze()
        grid = np.asarray(metrics["network_grid"])
        # back onto the as-is voxels (each variant is its own inverse)
        outs[name] = (np.stack([flip(w) for w in world]), flip(warped), metrics, grid)
        if plane == "axial":  # the network grid in world mm: the same whatever the storage
            assert network_grid(aff, flip(data["f"]).shape, info) == pytest.approx(grid), name
    w_ref, warped_ref, m_ref, g_ref = outs["as_is"]
    assert np.abs(w_ref).max() > 1.0  # the network moves pixels by more than a millimetre
    for name in _FLIPS_2D:
        w, warped, m, g = outs[name]
        np.testing.assert_allclose(w, w_ref, atol=1e-4 * np.abs(w_ref).max(), err_msg=name)
        np.testing.assert_allclose(warped, warped_ref, atol=1e-4, err_msg=name)
        assert m["dice_after"] == pytest.approx(m_ref["dice_after"], abs=1e-4), name
        assert m["lncc_after"] == pytest.approx(m_ref["lncc_after"], abs=1e-4), name
        if plane == "axial":
            np.testing.assert_allclose(g, g_ref, atol=1e-9, err_msg=name)


def test_register_with_model_2d_old_checkpoint_keeps_storage_order(tmp_path):
    """A checkpoint written before 2D reorientation (no "reorient_dims") trained its 2D network on storage order:
    it keeps seeing storage order (its network grid's axes are the fixed slice's own, flips included), exactly
    as a reorient=False checkpoint; 3D reorientation still applies to it."""
    from medfast.tasks.registration import ModelInfo, load_model_info, network_grid, register_with_model

    net, kw = _net_2d()
    save_model(tmp_path / "new.pt", net, kw, (16, 18), spacing=(2.5, 2.0))
    old = torch.load(tmp_path / "new.pt", weights_only=True)
    del old["reorient_dims"]
    torch.save(old, tmp_path / "old.pt")
    save_model(tmp_path / "off.pt", net, kw, (16, 18), spacing=(2.5, 2.0), reorient=False)
    _, info_old = load_model_info(tmp_path / "old.pt")
    _, info_off = load_model_info(tmp_path / "off.pt")
    assert load_model_info(tmp_path / "new.pt")[1].reorient_dims == (2, 3)
    assert info_old.reorient and info_old.reorient_dims == (3,)
    flipped = np.array([[-2.0, 0, 0, 40], [0, 1.5, 0, -3], [0, 0, 3.0, 0], [0, 0, 0, 1]])  # x stored R -> L
    shape = (20, 22)
    g_old = network_grid(flipped, shape, info_old)
    np.testing.assert_allclose(g_old, network_grid(flipped, shape, info_off), atol=1e-12)
    assert g_old[0, 0] < 0  # storage order: the grid's axis 0 runs to the left like the stored slice's
    assert network_grid(flipped, shape, ModelInfo([16, 18], [2.5, 2.0]))[0, 0] > 0  # this version: reoriented
    # 3D: an old checkpoint's 3D network still saw RAS
    aff3 = np.diag([-2.0, 2.0, 2.0, 1.0])
    g3 = network_grid(aff3, (10, 10, 10), ModelInfo([8, 8, 8], None, True, None, (3,)))
    assert g3[0, 0] > 0
    # predictions: the old checkpoint on the stored (flipped) arrays = reorient=False, and differs from this version
    image, labels = _phantom((20, 22, 5))
    fixed, moving = image[:, :, 2], torch.roll(image[:, :, 2], 2, 0)
    net_old, _ = load_model_info(tmp_path / "old.pt")
    r_old = register_with_model(fixed, moving, net_old, info_old, fixed_affine=flipped)
    r_off = register_with_model(fixed, moving, net_old, info_off, fixed_affine=flipped)
    r_new = register_with_model(fixed, moving, net_old, load_model_info(tmp_path / "new.pt")[1], fixed_affine=flipped)
    torch.testing.assert_close(r_old.ddf, r_off.ddf, rtol=0, atol=0)
    assert (r_new.ddf - r_old.ddf).abs().max() > 0.1
