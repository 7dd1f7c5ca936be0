"""Data: folder/file-list datasets, errors naming the file, preprocessing checked against world
coordinates, caching, collate, and the on-device augmentation (deterministic per seed, image and labels
moved together, nearest labels)."""

import gzip
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medfast.data import (
    DatasetError,
    NiftiDataset,
    RandomAugment,
    collate,
    crop_or_pad,
    find_pairs,
    load_nifti,
    normalize_intensity,
    resample_to_spacing,
    save_nifti,
)
from medfast.data.dataset import case_name
from medfast.data.synthetic import make_blobs
from medfast.train import AugmentConfig
from tests.conftest import default_dtype


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return str(path)


def test_folder_layout_and_items(tmp_path):
    images, labels = make_blobs(tmp_path, n=3, shape=(10, 12, 8))
    found = find_pairs(tmp_path)
    assert found == (images, labels)
    ds = NiftiDataset(*found, normalize="none")
    item = ds[(1, 77)]
    assert item["image"].shape == (1, 10, 12, 8) and item["image"].dtype == torch.float32
    assert item["label"].shape == (10, 12, 8) and item["label"].dtype == torch.int64
    assert item["seed"] == 77 and item["files"] == images[1]
    ref = np.asarray(nib.load(labels[1]).dataobj)
    assert np.array_equal(item["label"].numpy(), ref)
    # nnU-Net naming: images/case_0000.nii.gz with labels/case.nii.gz
    (tmp_path / "nn" / "images").mkdir(parents=True)
    (tmp_path / "nn" / "labels").mkdir()
    _save(tmp_path / "nn" / "images" / "case_0000.nii.gz", np.zeros((4, 4, 4), np.float32))
    _save(tmp_path / "nn" / "labels" / "case.nii.gz", np.zeros((4, 4, 4), np.uint8))
    assert find_pairs(tmp_path / "nn")[1][0].endswith("labels/case.nii.gz")


def test_errors_name_the_file(tmp_path):
    img = _save(tmp_path / "img.nii.gz", np.zeros((6, 6, 6), np.float32))
    lab_shape = _save(tmp_path / "lab_shape.nii.gz", np.zeros((6, 6, 5), np.uint8))
    aff = np.eye(4)
    aff[0, 3] = 5.0
    lab_aff = _save(tmp_path / "lab_affine.nii.gz", np.zeros((6, 6, 6), np.uint8), aff)
    with pytest.raises(DatasetError, match=r"lab_shape\.nii\.gz.*shape"):
        NiftiDataset([img], [lab_shape])
    with pytest.raises(DatasetError, match=r"lab_affine\.nii\.gz.*different affines"):
        NiftiDataset([img], [lab_aff])
    with pytest.raises(DatasetError, match=r"not found: .*missing\.nii\.gz"):
        NiftiDataset([img, str(tmp_path / "missing.nii.gz")])
    (tmp_path / "garbage.nii.gz").write_bytes(b"this is not a nifti file")
    with pytest.raises(DatasetError, match=r"garbage\.nii\.gz"):
        NiftiDataset([str(tmp_path / "garbage.nii.gz")])
    # valid header, truncated voxel data: caught on load, naming the file
    raw = gzip.decompress((tmp_path / "img.nii.gz").read_bytes())
    (tmp_path / "trunc.nii.gz").write_bytes(gzip.compress(raw[: len(raw) - 500]))
    ds = NiftiDataset([str(tmp_path / "trunc.nii.gz")])
    with pytest.raises(DatasetError, match=r"trunc\.nii\.gz"):
        ds[0]
    nan = np.zeros((4, 4, 4), np.float32)
    nan[1, 1, 1] = np.nan
    with pytest.raises(DatasetError, match=r"nan\.nii\.gz.*NaN"):
        NiftiDataset([_save(tmp_path / "nan.nii.gz", nan)])[0]
    frac = _save(tmp_path / "frac.nii.gz", np.full((6, 6, 6), 0.5, np.float32))
    with pytest.raises(DatasetError, match=r"frac\.nii\.gz.*non-integer"):
        NiftiDataset([img], [frac])[0]
    with pytest.raises(DatasetError, match="2 images but 1 label"):
        NiftiDataset([img, img], [lab_shape])
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no NIfTI files"):
        find_pairs(tmp_path / "empty")
    (tmp_path / "nolab" / "images").mkdir(parents=True)
    (tmp_path / "nolab" / "labels").mkdir()
    _save(tmp_path / "nolab" / "images" / "a.nii.gz", np.zeros((2, 2, 2), np.float32))
    with pytest.raises(DatasetError, match=r"no label for image .*a\.nii\.gz"):
        find_pairs(tmp_path / "nolab")


# --- nnU-Net's one file per channel: images/case_0000.nii.gz, case_0001.nii.gz, ... + labels/case.nii.gz -------
_OBLIQUE = np.array([[0, -1.5, 0, 10.0], [2.0, 0, 0, -4.0], [0, 0, 1.25, 3.0], [0, 0, 0, 1]])


def _nnunet_folder(root, cases=("a", "b"), channels=2, shape=(6, 7, 5), affine=_OBLIQUE, seed=0):
    """``root/images/<case>_000k.nii.gz`` (random float32 channels) and ``root/labels/<case>.nii.gz``."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for c in cases:
        for k in range(channels):
            _save(root / "images" / f"{c}_{k:04d}.nii.gz", rng.normal(10 * k, 1 + k, shape).astype(np.float32), affine)
        _save(root / "labels" / f"{c}.nii.gz", rng.integers(0, 3, shape).astype(np.uint8), affine)
    return root


def test_nnunet_dataset_folder_names_are_found(tmp_path):
    """An nnU-Net dataset folder (imagesTr/ + labelsTr/, no images/) is read as it is; images/ wins if present."""
    root = _nnunet_folder(tmp_path / "Dataset001_X", channels=2)
    (root / "images").rename(root / "imagesTr")
    (root / "labels").rename(root / "labelsTr")
    images, labels = find_pairs(root)
    assert images == [[str(root / "imagesTr" / f"{c}_000{k}.nii.gz") for k in range(2)] for c in "ab"]
    assert labels == [str(root / "labelsTr" / f"{c}.nii.gz") for c in "ab"]
    _nnunet_folder(root, cases=("z",), channels=2)  # images/ + labels/ beside them: the medfast layout is used
    assert find_pairs(root)[1] == [str(root / "labels" / "z.nii.gz")]
    with pytest.raises(DatasetError, match=r"missing/images.*imagesTr/ \+ labelsTr/"):  # both layouts named
        find_pairs(tmp_path / "missing")


def test_nnunet_channel_files_are_one_case_stacked_in_channel_order(tmp_path):
    root = _nnunet_folder(tmp_path / "nn", channels=3)
    # a case in one 4D file in the same folder: a plain path, mixed with the channel lists
    ref = np.stack([np.asarray(nib.load(str(root / "images" / f"b_000{k}.nii.gz")).dataobj) for k in range(3)], -1)
    _save(root / "images" / "c.nii.gz", ref, _OBLIQUE)
    shutil.copy(root / "labels" / "b.nii.gz", root / "labels" / "c.nii.gz")
    images, labels = find_pairs(root)
    d = root / "images"
    assert images == [[str(d / f"a_000{k}.nii.gz") for k in range(3)], [str(d / f"b_000{k}.nii.gz") for k in range(3)],
                      str(d / "c.nii.gz")]
    assert labels == [str(root / "labels" / f"{c}.nii.gz") for c in "abc"]
    assert case_name(images[0]) == "a"
    for reorient in (False, True):
        ds = NiftiDataset(images, labels, normalize="none", in_channels=3, reorient=reorient)
        for i in range(2):
            item = ds[i]
            assert item["files"] == " + ".join(images[i])
            # channel k is file k, as nibabel reads it (reoriented: the same flips/permutations for each)
            expect = np.stack([np.asarray(nib.load(f).dataobj) for f in images[i]])
            if not reorient:
                np.testing.assert_array_equal(item["image"].numpy(), expect)
                np.testing.assert_array_equal(item["affine"].numpy(), _OBLIQUE)
            for k, f in enumerate(images[i]):
                one = NiftiDataset([f], normalize="none", reorient=reorient)[0]
                np.testing.assert_array_equal(item["image"][k].numpy(), one["image"][0].numpy())
                np.testing.assert_array_equal(item["affine"].numpy(), one["affine"].numpy())
            lab = np.asarray(nib.load(labels[i]).dataobj)
            if not reorient:
                np.testing.assert_array_equal(item["label"].numpy(), lab)
        # the 4D file holding case b's channels reads as case b's channel files, preprocessing included
        four_d = ds[2]
        for key in ("image", "label", "affine"):
            assert torch.equal(four_d[key], ds[1][key])
    # tuples work too; zscore normalizes each channel on its own
    z = NiftiDataset([tuple(images[0])], normalize="zscore", reorient=False)[0]["image"]
    assert z.shape == (3, 6, 7, 5)
    np.testing.assert_allclose(z.flatten(1).mean(1).numpy(), 0, atol=1e-5)
    # config file lists take a case's channel files as a nested list
    from medfast.train.config import config_from_dict

    cfg = config_from_dict({"data": {"train_images": images, "train_labels": labels, "test_images": [images[0]]}})
    assert cfg.data.train_images == images and cfg.data.test_images == [images[0]]


def test_nnunet_channel_count_is_checked_against_in_channels(tmp_path):
    images, labels = find_pairs(_nnunet_folder(tmp_path, channels=2))
    NiftiDataset(images, labels, in_channels=2)
    with pytest.raises(DatasetError, match=r"a_0000\.nii\.gz \+ .*a_0001\.nii\.gz has 2 channel\(s\).*3 are expected"):
        NiftiDataset(images, labels, in_channels=3)
    ds = NiftiDataset(images, labels, in_channels=3, check=False)
    with pytest.raises(DatasetError, match=r"a_0001\.nii\.gz has 2 channel\(s\) but 3 are expected"):
        ds[0]


def test_nnunet_channel_files_on_other_grids_name_the_file(tmp_path):
    root = _nnunet_folder(tmp_path, channels=2)
    images, labels = find_pairs(root)
    bad = root / "images" / "b_0001.nii.gz"
    shifted = _OBLIQUE.copy()
    shifted[0, 3] += 2.0
    first = root / "images" / "b_0000.nii.gz"
    for data, affine, match in [
            (np.zeros((6, 7, 4), np.float32), _OBLIQUE, f"channel file {bad} has spatial shape \\(6, 7, 4\\) but the "
                                                        f"case's first channel file {first} has \\(6, 7, 5\\)"),
            (np.zeros((6, 7, 5), np.float32), shifted, f"channel file {bad} and the case's first channel file {first} "
                                                       "have different affines"),
            (np.zeros((6, 7, 5, 2), np.float32), _OBLIQUE, f"{bad} holds 2 channels")]:
        _save(bad, data, affine)
        # the header check at construction, and the load itself when the check is off
        with pytest.raises(DatasetError, match=match):
            NiftiDataset(images, labels)
        ds = NiftiDataset(images, labels, check=False)
        ds[0]
        with pytest.raises(DatasetError, match=match):
            ds[1]


def test_nnunet_channel_numbering_errors_name_the_case(tmp_path):
    root = _nnunet_folder(tmp_path / "gap", cases=("a",), channels=3)
    (root / "images" / "a_0001.nii.gz").unlink()
    with pytest.raises(DatasetError, match="case 'a' has channel files _0000, _0002 but not _0001"):
        find_pairs(root)
    root = _nnunet_folder(tmp_path / "count", cases=("b", "c"), channels=2)
    _nnunet_folder(root, cases=("a",), channels=3)
    with pytest.raises(DatasetError, match="case 'a' has 3 channel file\\(s\\).* but case 'b' has 2"):
        find_pairs(root)
    root = _nnunet_folder(tmp_path / "twice", cases=("a",), channels=2)
    _save(root / "images" / "a_0001.nii", np.zeros((6, 7, 5), np.float32), _OBLIQUE)
    with pytest.raises(DatasetError, match="case 'a': .*a_0001.nii.* and .*a_0001.nii.gz are both channel 0001"):
        find_pairs(root)
    # a lone _0000 file stays a path; names that only look like channels (no _0000) are plain images
    from medfast.data.dataset import group_channel_files

    assert group_channel_files(["d/x_0000.nii.gz", "d/scan_2019.nii.gz", "d/scan_2020.nii.gz", "e/x_0001.nii"]) == [
        "d/x_0000.nii.gz", "d/scan_2019.nii.gz", "d/scan_2020.nii.gz", "e/x_0001.nii"]


def _save_as(path, data, affine=None):
    """A gzip NIfTI (``.nii.gz`` content) under ``path``'s name, whatever the case of its suffix."""
    tmp = path.parent / "_tmp.nii.gz"
    _save(tmp, data, affine)
    os.replace(tmp, path)
    return str(path)


def test_upper_case_nifti_suffixes_are_read_grouped_and_named(tmp_path):
    # (a hunt: SCAN.NII.GZ, as some PACS exports and Windows tools name it, was refused as a truncated
    # uncompressed file, left out of folder scans, and named "Mixed.Nii" instead of "Mixed")
    data = np.arange(9 * 9 * 9, dtype=np.float32).reshape(9, 9, 9)
    np.testing.assert_array_equal(load_nifti(_save_as(tmp_path / "SCAN.NII.GZ", data)).data[0], data)
    assert [case_name(n) for n in ("d/Mixed.Nii", "d/UPPER.NII.GZ", "d/c_0000.Nii.Gz", "d/x.IMG")] == [
        "Mixed", "UPPER", "c", "x"]
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for k in range(2):
        _save_as(root / "images" / f"CASE_{k:04d}.NII.GZ", data + k)
    _save_as(root / "labels" / "CASE.NII.GZ", np.ones((9, 9, 9), np.uint8))
    images, labels = find_pairs(root)
    assert images == [[str(root / "images" / f"CASE_{k:04d}.NII.GZ") for k in range(2)]]
    assert labels == [str(root / "labels" / "CASE.NII.GZ")]
    assert NiftiDataset(images, labels, normalize="none", reorient=False, in_channels=2)[0]["image"].shape == (
        2, 9, 9, 9)


def test_nnunet_disk_cache_key_follows_every_channel_file(tmp_path):
    images, labels = find_pairs(_nnunet_folder(tmp_path / "d", cases=("a",), channels=2))
    kwargs = dict(normalize="none", reorient=False, cache="disk", cache_dir=tmp_path / "cache")
    ds = NiftiDataset(images, labels, **kwargs)
    before = ds[0]["image"]
    key = ds._key(0)
    # rewrite channel 1 only (new size and mtime): the cached stack must not be served again
    new = np.full((6, 7, 5), 7.0, np.float32)
    _save(Path(images[0][1]), new, _OBLIQUE)
    st = os.stat(images[0][1])
    os.utime(images[0][1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = NiftiDataset(images, labels, **kwargs)
    assert again._key(0) != key
    after = again[0]["image"]
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], torch.from_numpy(new))
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


def _world(affine, shape):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), 0).reshape(len(shape), -1)
    return (affine[:3, :3] @ grid + affine[:3, 3:]).reshape(3, *shape)


def test_resample_to_spacing_keeps_world_positions():
    # an image whose value is the world x coordinate: linear resampling reproduces it exactly on the new grid
    affine = np.array([[0, 1.5, 0, -10], [2.0, 0, 0, 4], [0, 0, -1, 7], [0, 0, 0, 1]])
    shape = (12, 10, 14)
    world = _world(affine, shape)
    image = torch.from_numpy(world[0:1].astype(np.float32))
    out, new_aff = resample_to_spacing(image, affine, [3.0, 3.0, 2.0])
    assert np.allclose(np.sqrt((new_aff[:3, :3] ** 2).sum(0)), [3, 3, 2])
    assert out.shape[1:] == (8, 5, 7)  # round(12 * 2 / 3), round(10 * 1.5 / 3), round(14 / 2)
    expect = _world(new_aff, out.shape[1:])[0]
    inside = (expect >= world[0].min()) & (expect <= world[0].max())
    np.testing.assert_allclose(out[0].numpy()[inside], expect[inside], atol=1e-4)
    # field of view kept: corners of the old and new grids (voxel -0.5) coincide
    corner = lambda a: a[:3, :3] @ np.full(3, -0.5) + a[:3, 3]  # noqa: E731
    np.testing.assert_allclose(corner(new_aff), corner(affine), atol=1e-9)
    # labels: nearest, values preserved
    lab = torch.randint(0, 4, shape)
    lab_out, _ = resample_to_spacing(lab, affine, [3.0, 3.0, 2.0], mode="nearest")
    assert lab_out.dtype == torch.int64 and set(lab_out.unique().tolist()) <= {0, 1, 2, 3}


def test_crop_or_pad_moves_the_origin():
    affine = np.diag([2.0, 1.0, 3.0, 1.0])
    affine[:3, 3] = [1, 2, 3]
    image = torch.arange(6 * 4 * 5, dtype=torch.float32).view(1, 6, 4, 5)
    out, new = crop_or_pad(image, affine, (4, 6, 5))
    assert out.shape == (1, 4, 6, 5)
    # voxel (0, 1, 0) of the output is input voxel (1, 0, 0): same world point
    assert out[0, 0, 1, 0] == image[0, 1, 0, 0]
    np.testing.assert_allclose(new @ [0, 1, 0, 1], affine @ [1, 0, 0, 1])
    assert out[0, 0, 0, 0] == 0  # padding


def test_normalize_and_cache(tmp_path):
    x = torch.zeros(1, 10, 10, 10)
    x[0, 2:8, 2:8, 2:8] = torch.rand(6, 6, 6) * 50 + 100
    z = normalize_intensity(x, "zscore")
    fg = z[x != 0]
    assert abs(fg.mean().item()) < 1e-4 and abs(fg.std(correction=0).item() - 1) < 1e-3 and (z[x == 0] == 0).all()
    m = normalize_intensity(x, "minmax")
    assert m.min() == 0 and m.max() == 1
    with pytest.raises(ValueError, match="normalize"):
        normalize_intensity(x, "bogus")
    images, labels = make_blobs(tmp_path / "d", n=2, shape=(8, 8, 8))
    ds = NiftiDataset(images, labels, cache="disk", cache_dir=tmp_path / "cache", spacing=[2.0, 2.0, 2.0])
    first = ds[0]
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    again = NiftiDataset(images, labels, cache="disk", cache_dir=tmp_path / "cache", spacing=[2.0, 2.0, 2.0])
    again.load = None  # a cache hit must not reload
    assert torch.equal(again[0]["image"], first["image"]) and first["image"].shape == (1, 4, 4, 4)


def test_compact_labels_hold_the_same_values_in_fewer_bytes(tmp_path):
    images, labels = make_blobs(tmp_path / "d", n=2, shape=(8, 8, 8), classes=3)
    wide = NiftiDataset(images, labels, spacing=[2.0, 2.0, 2.0])
    narrow = NiftiDataset(images, labels, spacing=[2.0, 2.0, 2.0], compact_labels=True)
    assert wide[0]["label"].dtype == torch.int64 and narrow[0]["label"].dtype == torch.uint8
    assert torch.equal(narrow[0]["label"].long(), wide[0]["label"])
    # values past uint8 (or negative) take int32
    big = tmp_path / "big.nii.gz"
    arr = np.asarray(nib.load(labels[0]).dataobj).astype(np.int32)
    arr[0, 0, 0] = 300
    nib.save(nib.Nifti1Image(arr, nib.load(labels[0]).affine), str(big))
    item = NiftiDataset(images[:1], [str(big)], compact_labels=True, normalize="none")[0]
    assert item["label"].dtype == torch.int32 and int(item["label"].max()) == 300
    # the disk cache keeps the two forms apart
    for compact in (False, True):
        NiftiDataset(images, labels, cache="disk", cache_dir=tmp_path / "cache", compact_labels=compact)[0]
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    with pytest.raises(TypeError, match="compact_labels must be a bool"):
        NiftiDataset(images, labels, compact_labels="yes")


def test_collate_in_a_worker_gives_the_batch_of_the_process(tmp_path):
    # in a DataLoader worker the batch is stacked into shared memory (no copy when it is sent): the same batch
    from medfast.data import collate

    images, labels = make_blobs(tmp_path / "d", n=2, shape=(8, 8, 8))
    ds = NiftiDataset(images, labels, compact_labels=True)
    here = collate([ds[0], ds[1]])
    assert not here["image"].is_shared()
    [there] = list(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=_collate_noting_shared, num_workers=1))
    assert there["stacked_shared"] == [True, True] and there["label"].dtype == torch.uint8
    for key in ("image", "label", "affine"):
        assert torch.equal(here[key], there[key]), key
    # compact label maps of one batch can differ in dtype (uint8, int32): the batch takes the wider, as
    # torch.stack does (the worker's shared buffer was uint8 and wrapped 300 to 44)
    big = tmp_path / "big.nii.gz"
    arr = np.asarray(nib.load(labels[1]).dataobj).astype(np.int32)
    arr[arr > 0] = 300
    nib.save(nib.Nifti1Image(arr, nib.load(labels[1]).affine), str(big))
    mixed = NiftiDataset(images, [labels[0], str(big)], compact_labels=True)
    assert [mixed[i]["label"].dtype for i in range(2)] == [torch.uint8, torch.int32]
    [there] = list(torch.utils.data.DataLoader(mixed, batch_size=2, collate_fn=_collate_noting_shared, num_workers=1))
    here = collate([mixed[0], mixed[1]])
    assert there["label"].dtype == here["label"].dtype == torch.int32 and there["stacked_shared"] == [True, True]
    assert torch.equal(there["label"], here["label"]) and int(there["label"].max()) == 300


def _collate_noting_shared(items):
    from medfast.data import collate

    out = collate(items)
    out["stacked_shared"] = [out["image"].is_shared(), out["label"].is_shared()]
    return out


def test_collate_pads_to_the_largest():
    a = {"image": torch.ones(1, 4, 5), "label": torch.ones(4, 5, dtype=torch.long), "files": "a", "seed": 1}
    b = {"image": torch.ones(1, 6, 3), "label": torch.ones(6, 3, dtype=torch.long), "files": "b", "seed": 2}
    batch = collate([a, b])
    assert batch["image"].shape == (2, 1, 6, 5) and batch["label"].shape == (2, 6, 5)
    assert batch["files"] == ["a", "b"] and batch["seed"] == [1, 2]
    assert batch["image"][0, 0, 5, 0] == 0 and batch["image"][1, 0, 0, 4] == 0


def test_augment_is_deterministic_and_moves_image_and_labels_together():
    g = torch.Generator().manual_seed(0)
    label = torch.zeros(2, 20, 22, 18, dtype=torch.long)
    label[:, 4:14, 6:16, 5:12] = 1
    label[:, 8:12, 9:13, 7:10] = 2
    image = (label.float() * 10)[:, None] + 0.0 * torch.rand(2, 1, 20, 22, 18, generator=g)
    cfg = AugmentConfig(rotation=15, scale=0.15, deform_magnitude=1.5, deform_grid=4, gamma=0, intensity_scale=0,
                        intensity_shift=0, noise_std=0, flip=[0])
    aug = RandomAugment(cfg)
    img1, lab1 = aug(image, label, [5, 6], (16, 16, 16))
    img2, lab2 = aug(image, label, [5, 6], (16, 16, 16))
    assert img1.shape == (2, 1, 16, 16, 16) and lab1.shape == (2, 16, 16, 16) and lab1.dtype == torch.long
    assert torch.equal(img1, img2) and torch.equal(lab1, lab2)
    img3, _ = aug(image, label, [7, 6], (16, 16, 16))
    assert not torch.equal(img1[0], img3[0]) and torch.equal(img1[1], img3[1])  # per-sample seeds
    assert set(lab1.unique().tolist()) <= {0, 1, 2}  # nearest: no new label values
    # where the linearly warped image is (nearly) a whole class value, the nearest-warped label agrees
    sure = (img1[:, 0] - (img1[:, 0] / 10).round() * 10).abs() < 0.5
    agree = (lab1 == (img1[:, 0] / 10).round().long())[sure].float().mean()
    assert sure.float().mean() > 0.6 and agree > 0.995
    assert not torch.equal(lab1[0], label[0, 2:18, 3:19, 1:17])  # it did deform
    # disabled: an exact whole-voxel crop of the input
    crop, crop_lab = RandomAugment(AugmentConfig(enabled=False))(image, label, [3, 4], (8, 9, 10))
    found = False
    for i in range(20 - 8 + 1):
        for j in range(22 - 9 + 1):
            for k in range(18 - 10 + 1):
                if torch.equal(crop_lab[0], label[0, i:i + 8, j:j + 9, k:k + 10]) and torch.equal(
                        crop[0], image[0, :, i:i + 8, j:j + 9, k:k + 10]):
                    found = True
    assert found


def test_augment_intensity_and_2d():
    cfg = AugmentConfig(rotation=10, deform_magnitude=1.0, deform_grid=3, gamma=0.3, noise_std=0.1, bias_field=0.2)
    image = torch.rand(1, 2, 24, 20)
    label = torch.randint(0, 3, (1, 24, 20))
    out, lab = RandomAugment(cfg)(image, label, [1], None)
    assert out.shape == (1, 2, 24, 20) and lab.shape == (1, 24, 20) and torch.isfinite(out).all()
    geo, _ = RandomAugment(cfg, geometric_only=True)(image, label, [1], None)
    assert not torch.allclose(out, geo)
    with pytest.raises(ValueError, match="seeds"):
        RandomAugment(cfg)(image, label, [1, 2], None)


@pytest.mark.parametrize("nd", [2, 3])
def test_augment_does_not_depend_on_the_default_dtype(nd):
    """Under torch.set_default_dtype(torch.float64) the same seeds give what they give under the float32 default
    (geometry, flips, deformation, labels, intensities, bias field, noise: every draw has its own dtype; without it
    the float64 draws used up the generators differently) and the image keeps its dtype."""
    cfg = AugmentConfig(shear=0.1, translation=2.0, flip=list(range(nd)), deform_grid=3, bias_field=0.2,
                        noise_std=0.05)
    image = torch.rand(2, 2, *[14] * nd, generator=torch.Generator().manual_seed(0))
    label = (image[:, 0] > 0.5).long()
    aug = RandomAugment(cfg)

    def run():
        return {dt: aug(image.to(dt), label, [123, 2**40 + 7], [10] * nd) for dt in (torch.float32, torch.float64)}

    ref = run()
    with default_dtype(torch.float64):
        got = run()
    for dt in (torch.float32, torch.float64):
        assert got[dt][0].dtype == ref[dt][0].dtype == dt and got[dt][1].dtype == torch.long
        assert torch.equal(got[dt][0], ref[dt][0]) and torch.equal(got[dt][1], ref[dt][1])
    for dt in (torch.float16, torch.bfloat16):  # warped in float32, returned in the dtype given (was float32)
        out, lab = aug(image.to(dt), label, [123, 2**40 + 7], [10] * nd)
        assert out.dtype == dt and torch.equal(out, aug(image.to(dt).float(), label, [123, 2**40 + 7],
                                                        [10] * nd)[0].to(dt))


def test_load_and_save_nifti_round_trip(tmp_path):
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    path = save_nifti(np.arange(24).reshape(2, 3, 4), affine, tmp_path / "x.nii.gz", dtype=np.int16)
    vol = load_nifti(path, label=True)
    assert vol.data.shape == (2, 3, 4) and np.array_equal(vol.data, np.arange(24).reshape(2, 3, 4))
    np.testing.assert_allclose(vol.affine, affine)
    four = _save(tmp_path / "4d.nii.gz", np.random.rand(3, 4, 5, 2).astype(np.float32))
    assert load_nifti(four).data.shape == (2, 3, 4, 5)


def test_mni152_tissue_preset(tmp_path):
    """The demo data set: 4 tissue classes on the MNI152 T1; the ITK KmeansTest subject as a test set."""
    pytest.importorskip("nilearn", reason="needs the nilearn wheel (pip install nilearn; scripts/data.sh)")
    from medfast.data.presets import ITK_DATA, KMEANS_TO_TISSUE, mni152_tissue

    files = mni152_tissue(tmp_path)
    t1 = nib.load(files["train_images"][0])
    lab = np.asarray(nib.load(files["train_labels"][0]).dataobj)
    assert t1.shape == lab.shape == (197, 233, 189)
    counts = np.bincount(lab.ravel(), minlength=4)
    assert len(counts) == 4 and (counts > 10_000).all()
    data = np.asarray(t1.dataobj)
    assert (lab[data <= 0] == 0).all() and (lab[data > 0] > 0).all()
    # WM brighter than GM brighter than CSF on a T1
    means = [data[lab == c].mean() for c in (1, 2, 3)]
    assert means[0] < means[1] < means[2]
    if not (ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz").is_file():
        pytest.skip("ITK KmeansTest files missing (apt-get install insighttoolkit5-examples; scripts/data.sh)")
    test_img = nib.load(files["test_images"][0])
    assert nib.aff2axcodes(test_img.affine) == ("R", "A", "S")
    tl = np.asarray(nib.load(files["test_labels"][0]).dataobj)
    mapped = np.vectorize(KMEANS_TO_TISSUE.get)(tl)
    ti = np.asarray(test_img.dataobj)
    means = [ti[mapped == c].mean() for c in (1, 2, 3)]
    assert means[0] < means[1] < means[2] and (ti[mapped == 0] == 0).mean() > 0.99


def test_reorient_gives_the_same_subject_whatever_the_storage_order(tmp_path):
    rng = np.random.default_rng(0)
    ras = rng.random((6, 7, 5)).astype(np.float32)
    lab = (ras > 0.5).astype(np.uint8)
    aff = np.diag([2.0, 1.0, 3.0, 1.0])
    aff[:3, 3] = [-5, 4, 2]
    a = NiftiDataset([_save(tmp_path / "ras.nii.gz", ras, aff)], [_save(tmp_path / "ras_l.nii.gz", lab, aff)],
                     normalize="none")[0]
    # the same subject stored as L, S, A (x flipped, y and z swapped), like the ITK KmeansTest files
    lsa = np.flip(ras, 0).transpose(0, 2, 1).copy()
    lsa_lab = np.flip(lab, 0).transpose(0, 2, 1).copy()
    aff2 = np.zeros((4, 4))
    aff2[0, 0], aff2[1, 2], aff2[2, 1], aff2[3, 3] = -2.0, 1.0, 3.0, 1.0
    aff2[:3, 3] = aff[:3, :3] @ [5, 0, 0] + aff[:3, 3]  # voxel (0,0,0) of the flipped copy = voxel (5,0,0)
    assert nib.aff2axcodes(aff2) == ("L", "S", "A")
    b = NiftiDataset([_save(tmp_path / "lsa.nii.gz", lsa, aff2)], [_save(tmp_path / "lsa_l.nii.gz", lsa_lab, aff2)],
                     normalize="none")[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    np.testing.assert_allclose(a["affine"].numpy(), b["affine"].numpy(), atol=1e-12)
    c = NiftiDataset([str(tmp_path / "lsa.nii.gz")], normalize="none", reorient=False)[0]
    assert c["image"].shape == (1, 6, 5, 7)


# a 2D slice stored in other voxel orders: (array view, 2x2 voxel map) with each variant its own inverse
_STORED_2D = {"xflip": (lambda a: a[::-1], [[-1, 0], [0, 1]]), "yflip": (lambda a: a[:, ::-1], [[1, 0], [0, -1]]),
              "transpose": (lambda a: np.swapaxes(a, 0, 1), [[0, 1], [1, 0]]),
              "xyflip": (lambda a: a[::-1, ::-1], [[-1, 0], [0, -1]])}


def _stored_affine(affine, shape, m):
    """The 4x4 affine of a slice (voxel axes 0, 1 in its plane; as-is shape ``shape``) stored with stored voxel
    ``q = m @ p + t``: every world point keeps its place."""
    m = np.asarray(m, dtype=np.float64)
    t = np.array([(shape[i] - 1) if m[i].min() < 0 else 0 for i in range(2)], dtype=np.float64)  # flipped axes
    # p = m^-1 (q - t): columns of the stored voxel axes = affine's columns through m^-1
    inv = np.linalg.inv(m)
    out = np.array(affine, dtype=np.float64)
    out[:3, :2] = affine[:3, :2] @ inv
    out[:3, 3] = affine[:3, :2] @ (-inv @ t) + affine[:3, 3]
    return out


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal", "oblique"])
def test_reorient_2d_gives_the_same_slice_whatever_the_storage_order(tmp_path, plane):
    """2D images are reoriented too (they used to enter in storage order): the same slice stored as is, flipped
    along x, y, both, or transposed gives the same image and label arrays (labels on their image), also after
    resampling and cropping. A coronal / sagittal slice's frame from spatial_affine mirrors with the storage
    (the plane's normal has n_z = 0): the orientation must not follow it."""
    rng = np.random.default_rng(0)
    img = rng.random((9, 6)).astype(np.float32)
    lab = (img > 0.5).astype(np.uint8)
    affines = {"axial": [[0.8, 0, 0, 5], [0, 1.5, 0, -3], [0, 0, 3.0, 2]],
               "coronal": [[0.8, 0, 0, 5], [0, 0, 3.0, 7], [0, 1.5, 0, -3]],  # voxel axes x, z
               "sagittal": [[0, 0, 3.0, 5], [0.8, 0, 0, 7], [0, 1.5, 0, -3]],  # voxel axes y, z
               "oblique": [[0.8, 0, 0, 5], [0, 1.5 * np.cos(0.4), -3 * np.sin(0.4), 7],
                           [0, 1.5 * np.sin(0.4), 3 * np.cos(0.4), -3]]}
    aff = np.vstack([affines[plane], [0, 0, 0, 1]])
    kw = dict(spatial_dims=2, normalize="none", cache="none")
    items = {}
    for name, (view, m) in {"as_is": (lambda a: a, np.eye(2)), **_STORED_2D}.items():
        a = aff if name == "as_is" else _stored_affine(aff, img.shape, m)
        si = _save(tmp_path / f"{name}_i.nii.gz", np.ascontiguousarray(view(img))[..., None], a)
        sl = _save(tmp_path / f"{name}_l.nii.gz", np.ascontiguousarray(view(lab))[..., None], a)
        # the stored copy holds the same world content: voxel centres with their values
        world = (a[:3, :2] @ np.indices(view(img).shape).reshape(2, -1)).T + a[:3, 3]
        ref_world = (aff[:3, :2] @ np.indices(img.shape).reshape(2, -1)).T + aff[:3, 3]
        order = np.lexsort(np.round(world, 6).T)
        ref_order = np.lexsort(np.round(ref_world, 6).T)
        np.testing.assert_array_equal(view(img).ravel()[order], img.ravel()[ref_order])
        items[name] = (NiftiDataset([si], [sl], **kw)[0],
                       NiftiDataset([si], [sl], spacing=[0.6, 1.1], shape=[8, 12], **kw)[0])
    for name in _STORED_2D:
        for got, ref in zip(items[name], items["as_is"]):
            assert torch.equal(got["image"], ref["image"]), name
            assert torch.equal(got["label"], ref["label"]), name
            # the same pixel sizes, and the label still on its image
            np.testing.assert_allclose(np.linalg.norm(got["affine"][:2, :2].numpy(), axis=0),
                                       np.linalg.norm(ref["affine"][:2, :2].numpy(), axis=0))
        assert torch.equal(items[name][0]["label"], (items[name][0]["image"][0] > 0.5).long())
        if plane == "axial":  # the in-plane frame is world x, y: the same affine
            np.testing.assert_allclose(items[name][0]["affine"].numpy(), items["as_is"][0]["affine"].numpy(),
                                       atol=1e-12)
    a2 = items["as_is"][0]["affine"].numpy()
    if plane == "axial":
        assert a2[0, 0] > 0 and a2[1, 1] > 0  # R, A
    # reorient=False: storage order, as before
    raw = NiftiDataset([str(tmp_path / "transpose_i.nii.gz")], reorient=False, **kw)[0]
    assert torch.equal(raw["image"][0], torch.from_numpy(np.ascontiguousarray(img.T)))


def test_disk_cache_key_tells_2d_reorientation_apart(tmp_path):
    """The disk cache key holds the reorientation for 2D images too: an entry cached in storage order (reorient
    off, or written before 2D images were reoriented) is not read back as reoriented."""
    p = _save(tmp_path / "s.nii.gz", np.zeros((4, 3, 1), np.float32), np.diag([-1.0, 1, 1, 1]))
    kw = dict(spatial_dims=2, cache="disk", cache_dir=tmp_path / "c")
    assert NiftiDataset([p], reorient=True, **kw)._key(0) != NiftiDataset([p], reorient=False, **kw)._key(0)


def test_disk_cache_key_follows_the_preprocessing_version(tmp_path, monkeypatch):
    """A preprocessing change that gives other arrays for the same files and settings (the z-score's masked-image
    rule, 2026-11-29) raises PREPROCESS_VERSION: a cache written before is not served after it (it was)."""
    import medfast.data.dataset as dataset_module

    p = _save(tmp_path / "s.nii.gz", np.zeros((4, 3, 2), np.float32))
    kw = dict(spatial_dims=3, cache="disk", cache_dir=tmp_path / "c")
    key = NiftiDataset([p], **kw)._key(0)
    monkeypatch.setattr(dataset_module, "PREPROCESS_VERSION", dataset_module.PREPROCESS_VERSION + 1)
    assert NiftiDataset([p], **kw)._key(0) != key


def test_label_map_keys_and_values_are_non_negative_integers(tmp_path):
    # a negative key indexed the lookup table from its end: {-1: 0} silently relabelled the largest label (2)
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[2:4], lab[4:6] = 1, 2
    image = _save(tmp_path / "img.nii.gz", np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32))
    label = _save(tmp_path / "lab.nii.gz", lab)
    for bad, error, named in (({-1: 0}, ValueError, "key -1 is negative"),
                              ({2: -1}, ValueError, "the value of key 2 is negative"),
                              ({1.5: 0}, TypeError, "key 1.5 must be an integer"),
                              ({1: 0.5}, TypeError, "the value of key 1 must be an integer"),
                              ({True: 0}, TypeError, "key True must be an integer")):
        with pytest.raises(error, match=named):
            NiftiDataset([image], [label], label_map=bad, num_classes=3)
    # integers as NumPy scalars or strings (JSON keys) are integers; unlisted values keep theirs
    ds = NiftiDataset([image], [label], label_map={np.int64(2): np.uint8(1), "1": 0}, num_classes=2)
    assert ds.label_map == {2: 1, 1: 0}
    want = np.where(lab == 1, 0, np.where(lab == 2, 1, lab))
    assert np.array_equal(ds[0]["label"].numpy(), want)
