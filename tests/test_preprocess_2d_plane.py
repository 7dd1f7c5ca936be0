"""2D images stored in a NIfTI whose plane is not axial: :func:`medfast.data.spatial_affine` gives the 2D affine
in the image's own plane (true in-plane voxel sizes, angles and distances), so resampling a coronal or oblique
2D image to a spacing works and keeps world positions; axial 2D images keep exactly the previous 2D affine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfast.data import NiftiDataset, resample_to_spacing, spatial_affine, voxel_spacing

nib = pytest.importorskip("nibabel")

# coronal slice: voxel axis 0 -> world x (0.8 mm), voxel axis 1 -> world z (1.6 mm), plane at y = 5
CORONAL = np.array([[0.8, 0, 0, 0], [0, 0, -3.0, 5], [0, 1.6, 0, 0], [0, 0, 0, 1.0]])


def _old_spatial_affine(affine, ndim):
    """The previous formula: rows and columns 0, ..., ndim - 1 and 3."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape == (ndim + 1, ndim + 1):
        return affine
    idx = list(range(ndim)) + [3]
    return affine[np.ix_(idx, idx)]


def _rot(axis, degrees):
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    r = np.eye(4)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _tilted(degrees):
    """1 mm pixels, the plane turned ``degrees`` about x out of x-y."""
    return _rot(0, degrees)


def _frame(a3, a2):
    """``Q`` (3, 2) and the plane offset ``c`` with ``A[:3, :2] = Q a2[:2, :2]`` and ``A[:3, 3] = Q a2[:2, 2] + c``;
    checks that ``Q`` is orthonormal (the 2D coordinates are distances in the plane) and ``c`` normal to it."""
    q = a3[:3, :2] @ np.linalg.inv(a2[:2, :2])
    np.testing.assert_allclose(q.T @ q, np.eye(2), atol=1e-12)
    c = a3[:3, 3] - q @ a2[:2, 2]
    np.testing.assert_allclose(q.T @ c, 0, atol=1e-12)
    return q, c


def _to_world(q, c, a2, ij):
    """World (3D) position of 2D voxel coordinates ``ij`` (N, 2) of a grid with 2D affine ``a2``."""
    p = ij @ a2[:2, :2].T + a2[:2, 2]
    return p @ q.T + c


def _blob(shape, centre, sigma=2.0):
    g = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    r2 = sum((gi - ci) ** 2 for gi, ci in zip(g, centre))
    return np.exp(-r2 / (2 * sigma ** 2))


def _centroid(img):
    img = np.asarray(img, dtype=np.float64)
    g = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in img.shape], indexing="ij")
    return np.array([(gi * img).sum() / img.sum() for gi in g])


# -- non-axial planes ------------------------------------------------------------------------------------------
def test_coronal_spacing_and_affine():
    a2 = spatial_affine(CORONAL, 2)
    np.testing.assert_allclose(voxel_spacing(a2), [0.8, 1.6], atol=1e-12)
    assert abs(np.linalg.det(a2)) > 1
    _frame(CORONAL, a2)
    # voxel centres keep their world positions
    ij = np.array([[0, 0], [29, 0], [0, 19], [12.5, 7.25]])
    world = ij @ CORONAL[:3, :2].T + CORONAL[:3, 3]
    np.testing.assert_allclose(_to_world(*_frame(CORONAL, a2), a2, ij), world, atol=1e-12)


def test_coronal_resample_to_spacing_keeps_world_positions():
    shape, centre = (30, 20), (12.0, 7.0)
    image = torch.from_numpy(_blob(shape, centre)).float()[None]
    out, out_aff = resample_to_spacing(image, CORONAL, (1.0, 1.0))
    assert tuple(out.shape) == (1, 24, 32)  # round(30 * 0.8), round(20 * 1.6): same field of view
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(voxel_spacing(out_aff), [1.0, 1.0], atol=1e-12)
    q, c = _frame(CORONAL, spatial_affine(CORONAL, 2))
    # every new voxel centre sits at the world position of its old-grid coordinates
    a2 = spatial_affine(CORONAL, 2)
    new_ij = np.stack(np.meshgrid(np.arange(24.0), np.arange(32.0), indexing="ij"), -1).reshape(-1, 2)
    old_ij = (new_ij @ out_aff[:2, :2].T + out_aff[:2, 2] - a2[:2, 2]) @ np.linalg.inv(a2[:2, :2]).T
    np.testing.assert_allclose(_to_world(q, c, out_aff, new_ij), old_ij @ CORONAL[:3, :2].T + CORONAL[:3, 3],
                               atol=1e-9)
    # the landmark (the blob's centre) is where the original 3D affine puts it
    landmark = CORONAL @ [*centre, 0, 1]
    found = _to_world(q, c, out_aff, _centroid(out[0].numpy())[None])[0]
    np.testing.assert_allclose(found, landmark[:3], atol=0.1)
    # and no distortion: 2 old voxels along axis 1 (3.2 mm) span 3.2 new 1 mm voxels
    assert abs(_centroid(out[0].numpy())[1] - ((centre[1] + 0.5) * 1.6 - 0.5)) < 0.1


@pytest.mark.parametrize("degrees", [30, -30, 60, 89])
def test_tilted_plane_is_not_stretched(degrees):
    a = _tilted(degrees)
    a2 = spatial_affine(a, 2)
    np.testing.assert_allclose(voxel_spacing(a2), [1.0, 1.0], atol=1e-12)
    image = torch.rand(1, 20, 30)
    out, out_aff = resample_to_spacing(image, a, (1.0, 1.0))
    assert out.shape == image.shape and torch.equal(out, image)  # already 1 mm: nothing resampled
    out, _ = resample_to_spacing(image, a, (0.5, 0.5))
    assert tuple(out.shape) == (1, 40, 60)


def test_sagittal_and_oblique_keep_in_plane_geometry():
    rng = np.random.default_rng(0)
    sagittal = np.array([[0, 0, 2.0, -7], [0.7, 0, 0, 3], [0, -1.3, 0, 11], [0, 0, 0, 1]])
    oblique = _rot(2, 25) @ _rot(0, 40) @ np.diag([0.9, 1.7, 2.5, 1.0])
    oblique[:3, 3] = [4, -5, 6]
    sheared = oblique.copy()
    sheared[:3, 1] += 0.4 * sheared[:3, 0]
    for a in (sagittal, oblique, sheared, np.diag([-1, 1, 1, 1]) @ oblique):
        a2 = spatial_affine(a, 2)
        np.testing.assert_allclose(voxel_spacing(a2), voxel_spacing(a)[:2], atol=1e-12)
        q, c = _frame(a, a2)
        ij = rng.uniform(-5, 40, (10, 2))
        np.testing.assert_allclose(_to_world(q, c, a2, ij), ij @ a[:3, :2].T + a[:3, 3], atol=1e-9)
        # in-plane angle (shear) and orientation (handedness in the plane) kept
        col = a[:3, :2]
        np.testing.assert_allclose(a2[:2, 0] @ a2[:2, 1], col[:, 0] @ col[:, 1], atol=1e-12)
        np.testing.assert_allclose(abs(np.linalg.det(a2[:2, :2])), np.linalg.norm(np.cross(*col.T)), atol=1e-12)


def test_coronal_nifti_dataset_with_spacing(tmp_path):
    img = _blob((30, 20), (12.0, 7.0)).astype(np.float32)
    lab = (img > 0.5).astype(np.uint8)
    nib.save(nib.Nifti1Image(img, CORONAL), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(lab, CORONAL), str(tmp_path / "lab.nii.gz"))
    ds = NiftiDataset([str(tmp_path / "img.nii.gz")], [str(tmp_path / "lab.nii.gz")], spatial_dims=2,
                      spacing=(1.0, 1.0), normalize="none", cache="none")
    item = ds[0]
    assert tuple(item["image"].shape) == (1, 24, 32)
    assert tuple(item["label"].shape) == (24, 32)
    np.testing.assert_allclose(voxel_spacing(item["affine"].numpy()), [1.0, 1.0], atol=1e-12)


def test_coronal_predict_with_spacing(tmp_path, monkeypatch):
    """``medfast predict`` on a coronal 2D image with a model trained at 1 mm: no crash, the output on the input's
    grid (probabilities brought back through the same in-plane frame)."""
    import medfast.tasks.segmentation as seg
    from medfast.nets import UNet
    from medfast.train import config_from_dict, config_to_dict

    def oracle(model, image, config):
        p1 = torch.sigmoid(40 * (image[:, :1].float() - 0.5))
        return torch.cat([1 - p1, p1], 1)

    config = config_from_dict({
        "task": "segmentation",
        "data": {"normalize": "none", "val_fraction": 0, "cache": "none", "spacing": [1.0, 1.0]},
        "model": {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [2, 4]},
        "augment": {"patch_size": [8, 8]},
        "inference": {"roi_size": [8, 8]},
        "trainer": {"max_steps": 1, "batch_size": 1, "val_every": 0, "checkpoint_every": 0, "device": "cpu",
                    "progress": False, "tensorboard": False, "plots": False, "threads": 1},
    })
    m = config.model
    net = UNet(2, m.in_channels, m.out_channels, m.channels, m.convs_per_level, m.norm, m.deep_supervision)
    ckpt = tmp_path / "model.pt"
    torch.save({"model": net.state_dict(), "config": config_to_dict(config), "task": "segmentation"}, ckpt)
    monkeypatch.setattr(seg, "predict_volume", oracle)
    img = np.zeros((30, 20, 1), np.float32)
    img[8:20, 4:12] = 1
    nib.save(nib.Nifti1Image(img, CORONAL), str(tmp_path / "cor.nii.gz"))
    (out,) = seg.predict_files(ckpt, [str(tmp_path / "cor.nii.gz")], tmp_path / "out", device="cpu",
                               progress=False)
    res = nib.load(str(out))
    assert res.shape == (30, 20, 1)
    np.testing.assert_allclose(res.affine, CORONAL)
    pred = np.asarray(res.dataobj)[..., 0]
    truth = img[..., 0] > 0.5
    assert (pred.astype(bool) == truth).mean() > 0.97


# -- axial planes: exactly the previous 2D affine --------------------------------------------------------------
AXIAL = [
    np.diag([0.5, 0.8, 3.0, 1.0]),
    np.array([[0.7, 0, 0, 10], [0, 0.9, 0, -20], [0, 0, 2.5, 33], [0, 0, 0, 1]]),
    np.diag([-0.7, -0.9, 2.5, 1.0]),  # LPS-stored
    np.array([[-0.7, 0, 0, 120], [0, 0.9, 0, -20], [0, 0, -2.5, 33], [0, 0, 0, 1]]),
    np.array([[0, 1.2, 0, 1], [-0.6, 0, 0, 2], [0, 0, 4, 3], [0, 0, 0, 1]]),  # axes swapped and flipped
    _rot(2, 17) @ np.diag([0.6, 1.1, 2.0, 1.0]),  # rotated in-plane
    np.array([[1.0, 0.3, 0.2, 5], [0.1, -1.4, 0.5, 6], [0, 0, 2.0, 7], [0, 0, 0, 1]]),  # sheared, oblique 3rd axis
    np.eye(4),
]


@pytest.mark.parametrize("a", AXIAL)
def test_axial_2d_affine_unchanged(a):
    assert np.array_equal(spatial_affine(a, 2), _old_spatial_affine(a, 2))
    image = torch.rand(1, 14, 11)
    out, out_aff = resample_to_spacing(image, a, (0.75, 0.75))
    a_old = _old_spatial_affine(a, 2)
    ref, ref_aff = resample_to_spacing(image, a_old, (0.75, 0.75))
    assert torch.equal(out, ref) and np.array_equal(out_aff, ref_aff)


def test_nearly_axial_is_continuous():
    """Rounding noise out of the x-y plane changes the 2D affine by about as much (no jump to another frame)."""
    for a in AXIAL:
        b = a.copy()
        b[2, :2] = [1e-9, -2e-9]
        np.testing.assert_allclose(spatial_affine(b, 2), _old_spatial_affine(a, 2), atol=1e-7)


def test_other_shapes_unchanged():
    a = CORONAL
    assert np.array_equal(spatial_affine(a, 3), a)
    a2 = np.array([[0.8, 0, 1], [0, 1.6, 2], [0, 0, 1]])
    assert np.array_equal(spatial_affine(a2, 2), a2)
    singular = np.array([[1.0, 2.0, 0, 0], [0, 0, 1, 0], [1.0, 2.0, 0, 0], [0, 0, 0, 1]])
    assert np.array_equal(spatial_affine(singular, 2), _old_spatial_affine(singular, 2))
