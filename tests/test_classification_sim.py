"""Simulated freehand-ultrasound classification data (phantom volumes made here, and the packaged real
brains when installed), class-activation maps, and the task end to end through ``medfast train``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medfast.data import DatasetError, collate
from medfast.nets import DenseNetClassifier, ResNetClassifier, SonoNet
from medfast.tasks.classification import (
    PLANES,
    SimulatedUltrasound,
    class_activation_map,
    load_brain_volume,
    save_cam_png,
)
from medfast.tasks.classification.simulated import ITK_DATA, MRICRON

SMALL = dict(volumes=["phantom:1", "phantom:2"], val_volumes=["phantom:3"], n_lines=32, n_samples=64,
             sub_rays=1, image_shape=(32, 32), voxel_mm=3.0, variants=2)


@pytest.fixture(scope="module")
def source():
    return SimulatedUltrasound(**SMALL)


# ---------------------------------------------------------------------------------------------- descriptors


def test_descriptors_balanced_deterministic_and_pose_split(source):
    train = source.train_dataset(64)
    a, b = train[(5, 123)], train[(5, 123)]
    assert a["files"] == b["files"] and torch.equal(a["pose_u"], b["pose_u"])
    assert not torch.equal(train[(5, 124)]["pose_u"], a["pose_u"])  # the seed draws the pose
    labels = [int(train[(i, i)]["label"]) for i in range(16)]
    vols = [int(train[(i, i)]["volume"]) for i in range(16)]
    assert sorted(set(labels)) == [0, 1, 2, 3] and np.bincount(labels).tolist() == [4] * 4
    assert sorted(set(vols)) == [0, 1]  # training volumes only
    # pose split: 4 bins of [-1, 1]; training in bins 0 and 2, held out in bins 1 and 3
    tr = torch.stack([train[(i, 1000 + i)]["pose_u"] for i in range(64)])
    poses, volumes = source.validation_datasets(32)
    ho = torch.stack([poses[i]["pose_u"] for i in range(32)])
    bins = lambda u: torch.clamp(((u + 1) / 2 * 4).floor(), 0, 3).long()  # noqa: E731
    assert set(bins(tr).unique().tolist()) == {0, 2}
    assert set(bins(ho).unique().tolist()) == {1, 3}
    # held-out volumes: the validation volume only, fixed descriptors
    assert {int(volumes[i]["volume"]) for i in range(8)} == {2}
    assert volumes[3]["files"] == volumes[3]["files"] and volumes[3]["seed"] == volumes[3]["seed"]
    assert poses[0]["subset"] == "held_out_poses" and volumes[0]["subset"] == "held_out_volumes"
    with pytest.raises(IndexError):
        train[64]


def test_nominal_pose_sits_on_the_brain_surface_looking_along_the_plane(source):
    vol = source.volumes[0]
    inv = np.linalg.inv(vol.affine)

    def inside(p):
        ijk = np.rint(inv[:3, :3] @ p + inv[:3, 3]).astype(int)
        return bool(np.all(ijk >= 0) and np.all(ijk < vol.mask.shape) and vol.mask[tuple(ijk)])

    for c, name in enumerate(source.planes):
        pose = source.poses([0], [c], torch.zeros(1, 6), [3.0])[0].numpy()
        target, direction, lateral = (np.array(v) for v in PLANES[name])
        np.testing.assert_allclose(pose[:3, 2], direction, atol=1e-12)  # beam
        np.testing.assert_allclose(pose[:3, 0], lateral, atol=1e-12)  # array
        pos = pose[:3, 3]
        assert not inside(pos)  # in the gel, outside the brain
        assert inside(pos + (3.0 + 6.0) * pose[:3, 2])  # tissue a few mm below the probe
        # the beam line passes through the plane's target point
        t = vol.centre + target * vol.half_extent
        off = (t - pos) - ((t - pos) @ pose[:3, 2]) * pose[:3, 2]
        assert np.linalg.norm(off) < 1e-6
    # perturbations rotate and shift the pose by the configured amounts
    u = torch.tensor([[1.0, 0, 0, 0, 0, 0]])
    tilted = source.poses([0], [2], u, [3.0])[0].numpy()
    angle = np.degrees(np.arccos(np.clip(tilted[:3, 2] @ np.array(PLANES["coronal"][1]), -1, 1)))
    assert angle == pytest.approx(12.0, abs=1e-6)


def _poses_reference(source, volume, plane, u, gel):
    """poses() as first written: plane frames computed per call and the surface found by reading every
    0.5-voxel sample up to 2.5 half extents + 10 mm of each line (now it skips the samples that cannot lie in
    the volume, and reads the mask flat)."""
    from medfast.tasks.classification.simulated import _rotation

    u = np.asarray(u, dtype=np.float64)
    vol, plane = np.asarray(volume), np.asarray(plane)
    frames = []
    for name in source.planes:
        target, d, lat = (np.asarray(a, dtype=np.float64) for a in source.plane_table[name])
        z = d / np.linalg.norm(d)
        x = lat - (lat @ z) * z
        x = x / np.linalg.norm(x)
        frames.append((target, np.stack([x, np.cross(z, x), z], 1)))
    targets = np.stack([f[0] for f in frames])[plane]
    R = np.stack([f[1] for f in frames])[plane] @ _rotation(0, u[:, 0] * source.max_rot) \
        @ _rotation(1, u[:, 1] * source.max_rot) @ _rotation(2, u[:, 2] * source.max_rot)
    centre = np.stack([v.centre for v in source.volumes])[vol]
    half = np.stack([v.half_extent for v in source.volumes])[vol]
    p = centre + targets * half + R[:, :, 1] * (u[:, 3:4] * source.max_shift) \
        + R[:, :, 0] * (u[:, 4:5] * source.max_lateral)
    t_surf = np.zeros(len(u))
    for v in np.unique(vol):
        sel = np.nonzero(vol == v)[0]
        bv = source.volumes[int(v)]
        step = 0.5 * float(np.linalg.norm(bv.affine[:3, 0]))
        t = np.arange(0.0, 2.5 * float(bv.half_extent.max()) + 10.0, step)
        inv = np.linalg.inv(bv.affine)
        start = p[sel] @ inv[:3, :3].T + inv[:3, 3]
        back = -R[sel, :, 2] @ inv[:3, :3].T
        ijk = np.rint(start[:, None, :] + t[None, :, None] * back[:, None, :]).astype(np.int64)
        padded, shape = np.pad(bv.mask, 1), np.array(bv.mask.shape)
        np.clip(ijk, -1, shape, out=ijk)
        ijk += 1
        inside = padded[ijk[..., 0], ijk[..., 1], ijk[..., 2]]
        last = len(t) - 1 - np.argmax(inside[:, ::-1], axis=1)
        t_surf[sel] = np.where(inside.any(1), t[last], 0.0)
    out = np.tile(np.eye(4), (len(u), 1, 1))
    out[:, :3, :3] = R
    out[:, :3, 3] = p - R[:, :, 2] * (t_surf + np.asarray(gel))[:, None]
    return torch.from_numpy(out)


def test_poses_equal_the_full_surface_march(source):
    # poses() reads only the samples that can round into the volume (_samples_in_box): bitwise the poses of
    # reading every sample, for random poses, beams along a voxel axis (zero direction components) and poses
    # shifted far enough that some lines miss the brain
    rng = np.random.default_rng(0)
    B = 300
    vol = rng.integers(0, len(source.volumes), B)
    plane = rng.integers(0, len(source.planes), B)
    u = rng.uniform(-1, 1, (B, 6))
    u[:20, :3] = 0  # nominal planes: the beam along a voxel axis
    far = SimulatedUltrasound(**{**SMALL, "max_shift_mm": 200.0, "max_lateral_mm": 200.0})
    gel = rng.uniform(1, 5, B)
    for src in (source, far):
        got = src.poses(vol.tolist(), plane.tolist(), torch.from_numpy(u), gel.tolist())
        assert torch.equal(got, _poses_reference(src, vol, plane, u, gel))


def test_samples_in_box_against_brute_force():
    # lines inside, parallel to a face, and wholly outside: nothing past the count rounds into the volume
    from medfast.tasks.classification.simulated import _samples_in_box

    shape = np.array([20, 30, 40])
    t = np.arange(0.0, 200.0, 0.5)
    starts = np.array([[5.0, 5, 5], [5, 5, 5], [-50, 5, 5], [5, 5, 5], [100, 100, 100]])
    dirs = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0], [0.3, -0.5, 0.8], [1, 1, 1]])
    for k in range(len(starts)):
        pts = np.rint(starts[k] + t[:, None] * dirs[k])
        ok = np.all((pts >= 0) & (pts < shape), axis=1)
        n = _samples_in_box(starts[k:k + 1], dirs[k:k + 1], t, shape)
        assert not ok[n:].any()  # nothing past the count rounds into the volume
        assert n == 0 or np.all((starts[k] + t[n - 1] * dirs[k] >= -1) & (starts[k] + t[n - 1] * dirs[k] <= shape))
    assert _samples_in_box(starts[4:], dirs[4:], t, shape) == 0


# ---------------------------------------------------------------------------------------------- rendering


def test_render_shapes_range_and_batch_independence(source):
    ds = source.train_dataset(32)
    items = [ds[(i, 50 + i)] for i in range(6)]
    batch = collate(items)
    img = source.render(batch, "cpu")
    assert img.shape == (6, 1, 32, 32) and img.dtype == torch.float32
    assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
    assert (img.flatten(1).mean(1) > 0.02).all()  # tissue in view, not a black frame
    # each image depends on its own descriptor only (what DDP equivalence needs), and rendering is repeatable
    alone = torch.cat([source.render(collate([it]), "cpu") for it in items[:3]])
    torch.testing.assert_close(img[:3], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(source.render(batch, "cpu"), img, rtol=0, atol=0)
    # the standard planes look different: mean absolute difference between classes well above within-class
    per_class = {}
    for i in range(24):
        it = ds[(i, 900 + i)]
        per_class.setdefault(int(it["label"]), []).append(it)
    means = {c: source.render(collate(v), "cpu").mean(0) for c, v in per_class.items()}
    between = min((means[a] - means[b]).abs().mean() for a in means for b in means if a < b)
    assert between > 0.01


def test_fixed_shape_render_equals_the_grouped_render():
    # _render_all (every frame through every (volume, probe) group, then each frame's own group: what the
    # CUDA graph captures) against the eager render of one simulation per group
    src = SimulatedUltrasound(**{**SMALL, "probes": ["C5-2v", "P4-2v"], "variants": 3, "sub_rays": 2})
    ds = src.train_dataset(64)
    batch = collate([ds[(i, 300 + i)] for i in range(12)])
    groups, inputs = src.render_inputs(batch)
    assert len(groups) >= 3  # several volumes and probes in the batch
    eager = src.render(batch, "cpu")
    with torch.no_grad():
        fixed = src._render_all(groups, inputs)
    torch.testing.assert_close(fixed, eager, rtol=0, atol=1e-6)  # CPU SIMD lane grouping: last-bit differences
    # a frame taken from another group's images would differ by far more
    wrong = inputs.clone()
    wrong[:, 19] = (wrong[:, 19] + 1) % len(groups)
    with torch.no_grad():
        assert (src._render_all(groups, wrong) - eager).abs().max() > 0.1


def test_cached_tables_a_capture_reads_stay_alive_past_the_caches_eviction():
    # a CUDA graph keeps only its static input and output: the noise tables it read were held by the LRU of
    # 16 alone, so 17 volumes later the graph replayed freed memory. retain_cached() (around the capture)
    # collects every cached constant the render reads, and the graph entry keeps that list.
    import gc
    import importlib
    import weakref

    S = importlib.import_module("medfast.ultrasound.simulate")  # (the package's `simulate` is the function)

    src = SimulatedUltrasound(**{**SMALL, "volumes": [f"phantom:{i}" for i in range(S._NOISE_CACHE_SIZE + 2)],
                                 "val_volumes": [], "variants": 1, "n_lines": 8, "n_samples": 32,
                                 "image_shape": (8, 8)})
    ds = src.train_dataset(4 * len(src.planes) * (S._NOISE_CACHE_SIZE + 2))
    per_volume = len(src.planes)

    def batch(volumes):
        return collate([ds[(v * per_volume, v)] for v in volumes])

    groups, inputs = src.render_inputs(batch([0, 1]))
    with torch.no_grad(), S.retain_cached() as kept:
        src._render_all(groups, inputs)
    noise = [t for t in kept if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == 4]
    assert len(noise) >= 2  # the two volumes' speckle tables
    refs = [weakref.ref(t) for t in noise]
    del noise
    with torch.no_grad():
        for v in range(2, S._NOISE_CACHE_SIZE + 2):  # enough other volumes to evict both from the LRU
            src.render(batch([v]), "cpu")
    gc.collect()
    assert all(r() is not None for r in refs)
    del kept
    gc.collect()
    assert not any(r() is not None for r in refs)  # (only the list held them: the test can fail)


def test_failed_graph_capture_falls_back_to_eager_rendering(monkeypatch):
    src = SimulatedUltrasound(**SMALL)
    batch = collate([src.train_dataset(8)[(i, i)] for i in range(4)])
    groups, inputs = src.render_inputs(batch)

    def fail(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(src, "_capture", fail)
    assert src._replay(groups, inputs, torch.device("cpu")) is None  # first time: eager, no capture yet
    assert src.cuda_graphs is True
    with pytest.warns(UserWarning, match="CUDA graph capture failed .*rendering without graphs"):
        assert src._replay(groups, inputs, torch.device("cpu")) is None  # second time: the capture fails
    assert src.cuda_graphs is False and src.graph_replays == 0
    assert SimulatedUltrasound.from_args({"volumes": ["phantom:1"], "cuda_graphs": False}, (32, 32), "none",
                                         0).cuda_graphs is False


def test_render_normalize_and_validation(tmp_path):
    src = SimulatedUltrasound(**{**SMALL, "val_volumes": [], "normalize": "zscore"})
    img = src.render(collate([src.train_dataset(8)[(i, i)] for i in range(4)]), "cpu")
    torch.testing.assert_close(img.flatten(1).mean(1), torch.zeros(4), atol=1e-4, rtol=0)
    # unit population std (correction=0), as the user-image path and the preprocessing (at 32x32 pixels the
    # sample std differs by 5e-4)
    torch.testing.assert_close(img.flatten(1).std(1, correction=0), torch.ones(4), atol=1e-4, rtol=0)
    assert len(src.validation_datasets(8)) == 1  # no held-out volume set without val_volumes
    with pytest.raises(ValueError, match="unknown plane 'apical'"):
        SimulatedUltrasound(**{**SMALL, "planes": ["coronal", "apical"]})
    with pytest.raises(ValueError, match="unknown probe"):
        SimulatedUltrasound(**{**SMALL, "probes": ["X9"]})
    with pytest.raises(DatasetError, match="unknown volume 'brain7'"):
        load_brain_volume("brain7")
    with pytest.raises(DatasetError, match="nope.nii.gz: volume file not found"):
        load_brain_volume({"path": str(tmp_path / "nope.nii.gz")})
    with pytest.raises(ValueError, match="unknown key"):
        SimulatedUltrasound.from_args({"volumes": ["phantom:1"], "probe": "C5-2v"}, (32, 32), "none", 0)
    custom = SimulatedUltrasound(**{**SMALL, "planes": ["coronal", "oblique"],
                                    "custom_planes": {"oblique": [[0, 0, 0], [-1, 0, -1], [0, 1, 0]]}})
    assert custom.planes == ["coronal", "oblique"]


@pytest.mark.parametrize("kind", ["complex", "rgb"])
def test_complex_and_rgb_volumes_are_refused_naming_the_file(tmp_path, kind):
    """A brain volume of complex voxels lost its imaginary part silently; an RGB one gave numpy's error."""
    nib = pytest.importorskip("nibabel")
    if kind == "complex":
        data = np.ones((12, 12, 12), np.complex64) * (3 + 4j)
    else:
        data = np.zeros((12, 12, 12), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "v.nii.gz"))
    with pytest.raises(DatasetError, match=f"v.nii.gz: holds {'complex' if kind == 'complex' else 'RGB'}"):
        load_brain_volume({"name": "v", "path": str(tmp_path / "v.nii.gz")})


def test_a_volume_with_nan_voxels_is_refused_naming_the_file(tmp_path):
    """A user T1 with a NaN background (as SPM writes) loaded without a word; NaN x mask stayed NaN and the rendered
    frames were half NaN."""
    nib = pytest.importorskip("nibabel")
    data = np.full((16, 16, 16), np.nan, np.float32)
    data[4:12, 4:12, 4:12] = 100.0
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "t1nan.nii.gz"))
    with pytest.raises(DatasetError, match="t1nan.nii.gz: the volume holds NaN or inf voxels"):
        load_brain_volume({"name": "t1nan", "path": str(tmp_path / "t1nan.nii.gz")})


REAL = {"mni152": None, "colin27": MRICRON / "ch2bet.nii.gz", "itk_kmeans": ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz"}


@pytest.mark.parametrize("name", list(REAL))
def test_real_brain_volumes(name):
    """The packaged brains load in RAS with a plausible brain size, and every standard plane shows tissue."""
    if name == "mni152":
        pytest.importorskip("nilearn", reason="MNI152 ships in the nilearn wheel: pip install nilearn")
    elif not REAL[name].is_file():
        pytest.skip(f"{REAL[name]} missing: install the Debian package (scripts/data.sh)")
    vol = load_brain_volume(name, voxel_mm=3.0)
    size = 2 * vol.half_extent
    assert 110 < size[0] < 170 and 140 < size[1] < 210 and 90 < size[2] < 160, size  # L-R, A-P, I-S (mm)
    assert 0.3 < float(vol.intensity[torch.from_numpy(vol.mask)].median()) < 1.0
    src = SimulatedUltrasound(volumes=[name], val_volumes=[], n_lines=32, n_samples=64,
                              sub_rays=1, image_shape=(32, 32), voxel_mm=3.0, variants=1)
    ds = src.train_dataset(4)
    img = src.render(collate([ds[(i, i)] for i in range(4)]), "cpu")
    assert (img.flatten(1).mean(1) > 0.03).all()


# ---------------------------------------------------------------------------------------------- CAM


def test_cam_equals_the_cam_formula_for_a_linear_head():
    """For global average pooling + a linear head, Grad-CAM is relu(sum_k w_ck F_k) (Zhou et al. 2016), up to
    a positive factor; both are divided by their maximum here."""
    torch.manual_seed(0)
    net = DenseNetClassifier(2, 1, 3, width=4, growth_rate=4, blocks=(2, 2)).eval()
    x = torch.randn(2, 1, 16, 20)
    target = torch.tensor([2, 0])
    cam, got_target = class_activation_map(net, x, target)
    assert cam.shape == (2, 16, 20) and torch.equal(got_target, target)
    with torch.no_grad():
        f = net.features(x)
        w = net.head.out.weight[target]  # (2, C)
        ref = torch.relu((w[:, :, None, None] * f).sum(1, keepdim=True))
        ref = torch.nn.functional.interpolate(ref, size=(16, 20), mode="bilinear", align_corners=False)[:, 0]
        ref = ref / ref.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-5)
    # default target: the predicted class; other encodings run
    _, pred = class_activation_map(net, x)
    assert torch.equal(pred, net(x).argmax(1))
    for enc, k in (("ordinal", 4), ("binary", 2)):
        m = SonoNet(1, k, enc, width=4, convs_per_block=(1, 1)).eval()
        c, t = class_activation_map(m, x, encoding=enc)
        assert c.shape == (2, 16, 20) and (c >= 0).all() and (c <= 1).all() and t.shape == (2,)
    with pytest.raises(TypeError, match="features"):
        class_activation_map(torch.nn.Linear(3, 3), x)
    with pytest.raises(ValueError, match="3 entries for 2 images"):
        class_activation_map(net, x, torch.tensor([0, 1, 2]))


def _constant(net):
    """Constant positive weights: symmetric receptive fields, so the features peak over a symmetric dot."""
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
            torch.nn.init.constant_(m.weight, 1.0 / m.weight[0].numel())
    return net.eval()


# (network, dot centre in pixels, every axis): the centre is on a feature cell, derived by hand from the layers
# (2x2 pooling: cell j on 2j + 0.5; stride-2 3x3 conv or 3x3 max pool of padding 1: on 2j), so a map resampled
# where the cells really are peaks on the dot. Plain upsampling (align_corners=False) was off by 1.5-7.5 px.
CAM_DOTS = {
    "sononet": (lambda: SonoNet(1, 2, width=4, convs_per_block=(1, 1, 1, 1)), 2, 35.5),  # 3.5 + 8 j
    "resnet": (lambda: ResNetClassifier(2, 1, 2, width=4), 2, 32.0),  # 8 j
    "resnet_stem2": (lambda: ResNetClassifier(2, 1, 2, width=4, stem_stride=2), 2, 32.0),  # 16 j
    "resnet_3d": (lambda: ResNetClassifier(3, 1, 2, width=2, blocks=(1, 1, 1)), 3, 24.0),  # 4 j
    "resnet_3d_stem2": (lambda: ResNetClassifier(3, 1, 2, width=2, blocks=(1, 1, 1), stem_stride=2), 3, 24.0),
    "densenet": (lambda: DenseNetClassifier(2, 1, 2, width=4, growth_rate=4, blocks=(1, 1, 1)), 2, 33.5),  # 1.5+4j
    "densenet_stem2": (lambda: DenseNetClassifier(2, 1, 2, width=4, growth_rate=4, blocks=(2, 2),
                                                  stem_stride=2), 2, 33.0),  # 1 + 4 j
    "densenet_pool": (lambda: DenseNetClassifier(2, 1, 2, width=4, growth_rate=4, blocks=(2, 2),
                                                 stem_pool=True), 2, 33.0),  # 1 + 4 j
    "densenet_demo": (lambda: DenseNetClassifier(2, 1, 2, width=8, growth_rate=4, blocks=(2, 2), stem_stride=2,
                                                 stem_pool=True), 2, 34.0),  # 2 + 8 j (configs/cls_demo_cpu.yaml)
    "densenet_3d": (lambda: DenseNetClassifier(3, 1, 2, width=2, growth_rate=2, blocks=(1, 1), stem_stride=2,
                                               stem_pool=True), 3, 26.0),  # 2 + 8 j
}


@pytest.mark.parametrize("name", list(CAM_DOTS))
def test_cam_peaks_on_a_dot_for_every_backbone(name):
    """Grad-CAM of a constant-weight network on one bright dot (3 px wide, 4 px for a half-pixel centre) peaks
    on the dot within 0.25 px along every axis: the map is placed where each network's feature cells sit."""
    make, dims, c = CAM_DOTS[name]
    size = 64 if dims == 2 else 48
    lo = int(c - 1.5) if c % 1 else int(c) - 1
    x = torch.zeros(1, 1, *[size] * dims)
    x[(0, 0) + (slice(lo, lo + (4 if c % 1 else 3)),) * dims] = 1.0
    cam, _ = class_activation_map(_constant(make()), x, target=[1])
    top = (cam[0] >= 0.99 * cam[0].max()).nonzero().double()
    assert cam.shape == x.shape[1:] and (top.mean(0) - c).abs().max() < 0.25, (name, top.mean(0).tolist(), c)


def test_cam_resampling_against_scipy_and_plain_upsampling():
    """The resampling is linear interpolation at feature coordinate (p - origin) / stride, clamped at the
    border (scipy map_coordinates, order 1, mode 'nearest'); a model without ``feature_grid`` keeps the
    plain ``F.interpolate(align_corners=False)`` upsampling."""
    from scipy.ndimage import map_coordinates

    torch.manual_seed(0)
    for net, shape in ((ResNetClassifier(2, 1, 3, width=4, blocks=(1, 1, 1), stem_stride=2), (37, 50)),
                       (DenseNetClassifier(3, 1, 3, width=4, growth_rate=4, blocks=(1, 1), stem_stride=2,
                                           stem_pool=True), (19, 24, 30))):
        net = net.eval()
        x = torch.randn(2, 1, *shape)
        target = torch.tensor([2, 0])
        cam, _ = class_activation_map(net, x, target)
        with torch.no_grad():
            f = net.features(x)
            w = net.head.out.weight[target]
            raw = torch.relu((w.view(2, -1, *[1] * len(shape)) * f).sum(1)).double().numpy()
        origin, stride = net.feature_grid()
        coords = np.meshgrid(*[(np.arange(n) - o) / s for n, o, s in zip(shape, origin, stride, strict=True)],
                             indexing="ij")
        ref = np.stack([map_coordinates(r, coords, order=1, mode="nearest") for r in raw])
        ref /= ref.reshape(2, -1).max(1).reshape(2, *[1] * len(shape))
        torch.testing.assert_close(cam, torch.from_numpy(ref).float(), rtol=1e-4, atol=1e-5)

    class Plain(torch.nn.Module):  # a user's network: features / pool / head, no feature_grid
        def __init__(self, net):
            super().__init__()
            self.features, self.pool, self.head = net.features, net.pool, net.head

    net = ResNetClassifier(2, 1, 3, width=4, blocks=(1, 1, 1)).eval()
    x = torch.randn(2, 1, 24, 28)
    cam, _ = class_activation_map(Plain(net), x, torch.tensor([1, 2]))
    with torch.no_grad():
        ref = torch.relu((net.head.out.weight[[1, 2]][:, :, None, None] * net.features(x)).sum(1, keepdim=True))
        ref = torch.nn.functional.interpolate(ref, size=(24, 28), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(cam, ref / ref.flatten(1).amax(1)[:, None, None], rtol=1e-4, atol=1e-5)


def test_cam_localizes_a_bright_square(tmp_path):
    """A small net trained to tell 'square present' from 'absent' (random image brightness, so only the
    square tells) puts the CAM of 'present' on the square: peak within 2 pixels of it, mean inside > 3x
    outside. (A trained map tends to peak on the square's edges; where the map is placed is checked to
    0.25 px by test_cam_peaks_on_a_dot_for_every_backbone.)"""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n, size, s = 64, 20, 4

    def make(n):
        x = 0.3 * torch.randn(n, 1, size, size, generator=g) + 0.6 * torch.randn(n, 1, 1, 1, generator=g)
        y = torch.arange(n) % 2
        boxes = torch.randint(0, size - s + 1, (n, 2), generator=g)
        for i in range(n):
            if y[i]:
                r, c = boxes[i].tolist()
                x[i, 0, r:r + s, c:c + s] += 1.5
        return x, y, boxes

    x, y, _ = make(n)
    net = DenseNetClassifier(2, 1, 2, width=8, growth_rate=8, blocks=(2, 2), bn_size=2)
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is fastest, and immune to a busy machine
    try:
        for _ in range(40):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    for m in net.modules():  # exact batch-norm statistics of the training set for eval mode
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        net(x)
    net.eval()
    xt, yt, bt = make(32)
    assert (net(xt).argmax(1) == yt).float().mean() > 0.75
    pos = yt == 1
    cam, _ = class_activation_map(net, xt[pos], torch.ones(int(pos.sum()), dtype=torch.long))
    assert cam.shape == (int(pos.sum()), size, size)
    hits, ratios = 0, []
    for m, (r, c) in zip(cam, bt[pos].tolist(), strict=True):
        pr, pc = divmod(int(m.argmax()), size)
        hits += (r - 2 <= pr < r + s + 2) and (c - 2 <= pc < c + s + 2)
        inside = torch.zeros_like(m, dtype=torch.bool)
        inside[r:r + s, c:c + s] = True
        ratios.append(float(m[inside].mean() / m[~inside].mean().clamp_min(1e-6)))
    assert hits >= 0.8 * int(pos.sum()), hits
    assert np.median(ratios) > 3, ratios
    path = save_cam_png(xt[pos][:4], cam[:4], tmp_path / "cam.png", ["a", "b", "c", "d"])
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="must be 2D and match"):
        save_cam_png(xt[:2], cam[:3], tmp_path / "bad.png")


# ---------------------------------------------------------------------------------------------- the task


def write_config(path: Path, out: Path, steps: int = 4, extra: str = "") -> Path:
    path.write_text(f"""
task: classification
data:
  dataset: simulated_ultrasound
  shape: [32, 32]
  normalize: none
  dataset_args: {{volumes: ["phantom:1", "phantom:2"], val_volumes: ["phantom:3"], n_lines: 32, n_samples: 64,
                 sub_rays: 1, voxel_mm: 3.0, variants: 2, samples_per_epoch: 32, val_samples: 8}}
model: {{name: densenet, spatial_dims: 2, out_channels: 4, channels: [8],
        kwargs: {{growth_rate: 4, blocks: [2, 2], bn_size: 2}}}}
optim: {{lr: 0.003}}
trainer: {{out_dir: {out}, batch_size: 4, max_steps: {steps}, val_every: {steps}, checkpoint_every: {steps},
          progress: false, tensorboard: false, threads: 1}}
{extra}
""")
    return path


def test_train_and_predict_on_simulated_ultrasound(tmp_path, capsys):
    from medfast.cli import main

    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cls.yaml", out)
    assert main(["train", str(cfg)]) == 0
    results = json.loads((out / "results.json").read_text())
    rep = results["classification"]
    assert rep["classes"] == list(PLANES)
    for subset in ("held_out_poses", "held_out_volumes"):
        assert rep[subset]["n"] == 8 and 0 <= rep[subset]["balanced_accuracy"] <= 1
        assert np.array(rep[subset]["confusion_matrix"]).sum() == 8
        assert (out / f"confusion_matrix_{subset}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"accuracy_{subset}" in results["validation"]
    assert rep["n"] == 16
    assert (out / "cam.png").read_bytes()[:4] == b"\x89PNG"
    # predict on a PNG of a rendered frame: CSV + a CAM overlay per input
    from PIL import Image

    task_src = SimulatedUltrasound(**SMALL)
    frame = task_src.render(collate([task_src.train_dataset(8)[(2, 7)]]), "cpu")[0, 0].numpy()
    png = tmp_path / "frame.png"
    Image.fromarray((frame * 255).astype(np.uint8)).save(png)
    capsys.readouterr()
    assert main(["predict", str(png), "--model", str(out / "checkpoints" / "last.pt"), "--out",
                 str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / "cam" / "0000_frame.png").read_bytes()[:4] == b"\x89PNG"
    row = (tmp_path / "pred" / "predictions.csv").read_text().splitlines()[1]
    assert row.split(",")[1] in PLANES


def test_simulated_config_errors(tmp_path):
    from medfast.tasks.classification import ClassificationTask
    from medfast.train import load_config

    cfg = load_config(write_config(tmp_path / "a.yaml", tmp_path / "o"), ["model.out_channels=3"])
    with pytest.raises(DatasetError, match=r"4 classes .* but model.out_channels=3"):
        ClassificationTask(cfg).build_datasets()
    cfg = load_config(write_config(tmp_path / "b.yaml", tmp_path / "o"), ["data.dataset=nope"])
    with pytest.raises(DatasetError, match="data.dataset='nope'"):
        ClassificationTask(cfg).build_datasets()
    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "o"), ["model.in_channels=3"])
    with pytest.raises(ValueError, match="in_channels=1"):
        ClassificationTask(cfg).build_datasets()
    # classes other than the planes were overwritten by the planes silently; the planes themselves are fine
    # (a checkpoint's config records them)
    cfg = load_config(write_config(tmp_path / "d.yaml", tmp_path / "o"), ["data.dataset_args.classes=[a, b, c, d]"])
    with pytest.raises(ValueError, match=r"data.dataset_args.classes = \['a', 'b', 'c', 'd'\] but the simulated"):
        ClassificationTask(cfg).build_datasets()
    task = ClassificationTask(load_config(write_config(tmp_path / "e.yaml", tmp_path / "o"), []))
    task.build_datasets()
    planes = list(task.config.data.dataset_args["classes"])
    cfg = load_config(write_config(tmp_path / "f.yaml", tmp_path / "o"), [f"data.dataset_args.classes={planes}"])
    ClassificationTask(cfg).build_datasets()


def test_loader_workers_compute_the_render_inputs(tmp_path):
    # the task's collate (the trainer's collate_fn, run in the loader workers) adds the render inputs (the poses:
    # host work of about 1 ms a batch of 64), so with data.num_workers > 0 the training process does not compute
    # them; the same images and the same training either way
    from medfast.tasks.classification import ClassificationTask
    from medfast.train import Trainer, load_config

    cfg = load_config([str(write_config(tmp_path / "c.yaml", tmp_path / "r"))], [])
    task = ClassificationTask(cfg)
    train, _ = task.build_datasets()
    items = [train[(i, 11 + i)] for i in range(4)]
    batch = task.collate(items)
    groups, inputs = batch["render_inputs"]
    ref_groups, ref_inputs = task.source.render_inputs(collate(items))
    assert groups == ref_groups and torch.equal(inputs, ref_inputs)
    plain = collate(items)
    assert "render_inputs" not in plain
    assert torch.equal(task.source.render(batch, "cpu"), task.source.render(plain, "cpu"))
    # a pinned batch (a CUDA trainer's loader pins) may hold the tuples as lists: the groups are graph-cache keys
    listed = dict(batch, render_inputs=[[list(g) for g in groups], inputs])
    eager = task.source._render_eager
    got = []

    def noting(groups, *args):  # a CUDA graph's cache key: tuples, hashable
        got.append(groups)
        return eager(groups, *args)

    task.source._render_eager = noting
    assert torch.equal(task.source.render(listed, "cpu"), task.source.render(plain, "cpu"))
    assert got[0] == ref_groups and hash(got[0]) == hash(ref_groups)

    seen = []
    losses = {}
    for workers in (0, 2):
        c = load_config([str(write_config(tmp_path / f"w{workers}.yaml", tmp_path / f"w{workers}", steps=3))],
                        [f"data.num_workers={workers}", "trainer.val_every=0"])
        t = ClassificationTask(c)

        def noting(batch, device, t=t):
            seen.append("render_inputs" in batch)
            return ClassificationTask.images(t, batch, device)

        t.images = noting
        Trainer(c, t).fit()
        rows = (tmp_path / f"w{workers}" / "train_log.jsonl").read_text().splitlines()
        losses[workers] = [json.loads(r)["loss"] for r in rows]
    assert seen.count(True) == 6  # every training batch of both runs (the held-out scoring at the end renders
    # from its own loader)
    assert losses[0] == losses[2] and len(losses[0]) == 3


def test_a_task_collate_makes_the_trainer_batches(tmp_path):
    from medfast.tasks.classification import ClassificationTask
    from medfast.train import Trainer, load_config

    class Tagged(ClassificationTask):
        def collate(self, items):
            batch = super().collate(items)
            batch["tag"] = len(items)
            return batch

        def training_step(self, model, batch, device):
            assert batch["tag"] == 4
            return super().training_step(model, batch, device)

    c = load_config([str(write_config(tmp_path / "c.yaml", tmp_path / "r", steps=2))], ["trainer.val_every=0"])
    Trainer(c, Tagged(c)).fit()
