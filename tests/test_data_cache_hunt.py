"""NiftiDataset's disk cache (key, contents, integrity), relabel's memory, the patch crop of a short volume,
the z-score's std and the construction-time checks of spacing / shape / clip_percentiles."""

from __future__ import annotations

import io
import math
import os
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medfast.data import AugmentConfig, NiftiDataset, RandomAugment, normalize_intensity, random_crop_theta
from medfast.data.dataset import relabel
from medfast.data.preprocess import crop_or_pad
from medfast.data.synthetic import make_blobs


def _pt(cache: Path) -> Path:
    [pt] = cache.glob("*.pt")
    return pt


# --- relabel ---------------------------------------------------------------------------------------------------

def test_relabel_of_huge_label_ids_builds_no_lookup_table():
    # the lookup table was as long as the largest label value: 614454277 (an Allen CCF structure id) took 19 s
    # and 5 GB for a 32^3 map; an id past 2^31 needs 64 GB
    big, huge = 614454277, 2**33 + 5
    lab = np.zeros((4, 4, 4), np.int64)
    lab[0], lab[1], lab[2, :2] = big, huge, 7  # 7: not in the map, stays
    tracemalloc.start()
    try:
        out = relabel(lab, {big: 2, huge: 3})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1e6  # (a table would be gigabytes)
    expect = np.zeros((4, 4, 4), np.int64)
    expect[0], expect[1], expect[2, :2] = 2, 3, 7
    assert out.dtype == np.int64 and out.shape == lab.shape and np.array_equal(out, expect)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.int64])
def test_relabel_gives_what_the_lookup_table_gave(dtype):
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 40, (9, 8, 7)).astype(dtype)
    mapping = {3: 1, 5: 0, 39: 2, 100: 4, 0: 6}  # 100: absent from the map's input, harmless
    lut = np.arange(max(int(lab.max()), *mapping) + 1)  # (the old implementation, as the reference)
    for k, v in mapping.items():
        lut[k] = v
    out = relabel(lab, mapping)
    assert out.dtype == lut[lab].dtype and out.shape == lab.shape and np.array_equal(out, lut[lab])
    assert relabel(lab, {}) is lab  # no map: the array itself, as before


# --- the patch crop of a volume shorter than the patch -----------------------------------------------------------

@pytest.mark.parametrize("patch", [24, 25, 22, 21])
def test_disabled_augment_zero_pads_a_short_volume_without_a_half_voxel_shift(patch):
    # a patch longer than the volume by an odd count (24 for 21) sat half a voxel off: the image came back
    # interpolated (0.5, 1.5, ..., 10.0) while the nearest-neighbour label snapped to whole voxels
    img = torch.arange(21, dtype=torch.float32).view(1, 1, 21, 1, 1).expand(1, 1, 21, 4, 4).contiguous()
    lab = torch.arange(21).view(1, 21, 1, 1).expand(1, 21, 4, 4).contiguous()
    out, lo = RandomAugment(AugmentConfig(enabled=False))(img, lab, [0], patch_size=[patch, 4, 4])
    ref_img, _ = crop_or_pad(img[0], np.eye(4), [patch, 4, 4])
    ref_lab, _ = crop_or_pad(lab[0], np.eye(4), [patch, 4, 4])
    assert torch.equal(out[0], ref_img) and torch.equal(lo[0], ref_lab)
    theta = random_crop_theta([21, 4, 4], [patch, 4, 4], torch.Generator().manual_seed(0))
    assert float(theta[0, 3]) == -((patch - 21) // 2)  # a whole-voxel offset


# --- the disk cache's key ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("given", ["scan.img", "scan.hdr"])
def test_disk_cache_key_follows_the_header_of_an_hdr_img_pair(tmp_path, given):
    # the key stat'ed only the named file: a header edit (voxel size 1 -> 2 mm) left scan.img as it was, and
    # the cache served the subject resampled with the old voxel size
    a = np.random.default_rng(0).normal(size=(10, 9, 8)).astype(np.float32)
    nib.save(nib.Nifti1Pair(a, np.eye(4)), str(tmp_path / "scan.img"))
    kw = dict(cache="disk", cache_dir=tmp_path / "cache", normalize="none", reorient=False, spacing=[2.0, 2.0, 2.0])
    files = [str(tmp_path / given)]
    assert NiftiDataset(files, **kw)[0]["image"].shape == (1, 5, 4, 4)
    hdr = tmp_path / "scan.hdr"
    img = nib.load(str(tmp_path / "scan.img"))
    h = img.header.copy()
    h.set_sform(np.diag([2.0, 2, 2, 1]), 1)
    h.set_qform(np.diag([2.0, 2, 2, 1]), 1)
    h.set_zooms((2.0, 2.0, 2.0))
    st = (tmp_path / "scan.img").stat()
    with open(hdr, "wb") as f:
        h.write_to(f)
    os.utime(hdr, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later time, whatever the clock's resolution
    assert NiftiDataset(files, **kw)[0]["image"].shape == (1, 10, 9, 8)  # (was the stale (1, 5, 4, 4))


def test_disk_cache_takes_numpy_and_tensor_settings(tmp_path):
    # json.dumps of the key refused np.float32 / np.int64 (TypeError), which the memory cache took
    images, labels = make_blobs(tmp_path / "d", n=1, shape=(8, 8, 8))
    plain = dict(spacing=[2.0, 2.0, 2.0], shape=[6, 6, 6], clip_percentiles=[1.0, 99.0])
    typed = dict(spacing=np.array([2, 2, 2], np.float32), shape=np.array([6, 6, 6]),
                 clip_percentiles=np.array([1, 99], np.float32))
    tensor = dict(spacing=torch.tensor([2.0, 2.0, 2.0]), shape=torch.tensor([6, 6, 6]),
                  clip_percentiles=(np.float64(1), torch.tensor(99.0)))
    ref = NiftiDataset(images, labels, cache="none", **plain)
    for kw in (typed, tensor):
        ds = NiftiDataset(images, labels, cache="disk", cache_dir=tmp_path / "cache", **kw)
        assert ds._key(0) == ref._key(0)  # the same settings, the same cache file
        for a, b in ((ds[0], ref[0]), (ds[0], NiftiDataset(images, labels, cache="memory", **kw)[0])):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert all(type(v) is float for v in ds.spacing) and all(type(v) is int for v in ds.shape)
    # Python ints stay ints: the key of a cache written before is the same
    assert NiftiDataset(images, labels, check=False, spacing=[2, 2, 2]).spacing == [2, 2, 2]


# --- the disk cache's contents ------------------------------------------------------------------------------------

def test_cached_item_has_the_index_and_files_of_the_dataset_that_reads_it(tmp_path, monkeypatch):
    # the cache kept the writer's "index" and "files": the same files in another order read index 1 as 0
    images, labels = make_blobs(tmp_path / "d", n=2, shape=(8, 8, 8))
    kw = dict(cache="disk", cache_dir=tmp_path / "cache")
    first = NiftiDataset(images, labels, **kw)
    [first[i] for i in range(2)]
    again = NiftiDataset(images[::-1], labels[::-1], **kw)
    again.load = None  # cache hits only
    for i in range(2):
        assert again[i]["index"] == i and again[i]["files"] == images[::-1][i]
        assert torch.equal(again[i]["image"], first[1 - i]["image"])
    assert list(again[0]) == list(NiftiDataset(images, labels, cache="none")[0])  # the same keys, in order
    # a relative path: the files as this dataset was given them (was the writer's absolute path)
    monkeypatch.chdir(tmp_path / "d")
    rel = [os.path.relpath(p) for p in images]
    ds = NiftiDataset(rel, [os.path.relpath(p) for p in labels], **kw)
    ds.load = None
    assert ds[0]["files"] == rel[0] and ds[0]["index"] == 0


def _flip_image_bytes(pt: Path, image: torch.Tensor) -> bytes:
    data = pt.read_bytes()
    raw = image.contiguous().numpy().tobytes()
    at = data.find(raw)  # (torch.save stores a tensor's bytes as they are)
    assert at >= 0
    b = bytearray(data)
    for k in range(at + len(raw) // 2, at + len(raw) // 2 + 64):
        b[k] ^= 0xFF
    return bytes(b)


def _saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("case", ["flipped bytes", "other dict", "a tensor", "older format", "wrong key", "truncated"])
def test_damaged_or_foreign_cache_files_are_rebuilt(tmp_path, case):
    # flipped bytes inside the stored image loaded without an error and were served (off by up to 376); a valid
    # .pt of another dict was served as the subject; a .pt of a tensor crashed in dict(...)
    images, labels = make_blobs(tmp_path / "d", n=1, shape=(10, 9, 8))
    kw = dict(cache="disk", cache_dir=tmp_path / "cache")
    good = NiftiDataset(images, labels, cache="none")[0]
    ds = NiftiDataset(images, labels, **kw)
    ds[0]
    pt = _pt(tmp_path / "cache")
    stored = torch.load(pt, weights_only=True)
    bad = {"flipped bytes": lambda: _flip_image_bytes(pt, good["image"]),
           "other dict": lambda: _saved({"image": torch.zeros(1, 2, 2, 2)}),
           "a tensor": lambda: _saved(torch.zeros(3)),
           "older format": lambda: _saved({**good, "image": good["image"] + 1}),
           "wrong key": lambda: _saved({**stored, "key": "0" * 16}),
           "truncated": lambda: pt.read_bytes()[: pt.stat().st_size // 2]}[case]()
    pt.write_bytes(bad)
    item = NiftiDataset(images, labels, **kw)[0]
    assert torch.equal(item["image"], good["image"]) and torch.equal(item["label"], good["label"])
    assert item["index"] == 0 and item["files"] == images[0]
    # the file was rewritten: the next read is a cache hit with the right arrays
    assert ds._cached_arrays(torch.load(pt, weights_only=True), ds._key(0)) is not None
    hit = NiftiDataset(images, labels, **kw)
    hit.load = None
    assert torch.equal(hit[0]["image"], good["image"])


# --- z-score ------------------------------------------------------------------------------------------------------

def test_zscore_uses_the_population_std_as_monai():
    # torch.std_mean's default Bessel correction gave a foreground of 120 voxels a std of 0.9958, 0.013 off
    # MONAI's NormalizeIntensity(nonzero=True), which the docstring names as the reference
    from monai.transforms import NormalizeIntensity

    rng = np.random.default_rng(1)
    x = np.zeros((1, 10, 10, 10), np.float32)
    x[0, 3:7, 3:8, 2:8] = rng.normal(100, 20, size=(4, 5, 6))
    z = normalize_intensity(torch.from_numpy(x), "zscore")
    ref = torch.as_tensor(NormalizeIntensity(nonzero=True, channel_wise=True)(torch.from_numpy(x.copy())))
    torch.testing.assert_close(z, ref, rtol=0, atol=1e-5)
    assert abs(float(z[0][x[0] != 0].std(correction=0)) - 1) < 1e-5
    small = torch.from_numpy(rng.normal(0, 3, size=(2, 3, 4, 2)).astype(np.float32))  # no mask: every voxel
    torch.testing.assert_close(normalize_intensity(small), torch.as_tensor(NormalizeIntensity(channel_wise=True)(
        small.clone())), rtol=0, atol=1e-5)


# --- spacing / shape / clip_percentiles checked at construction ---------------------------------------------------

@pytest.mark.parametrize(("kw", "error", "match"), [
    (dict(spacing=[2.0, 2.0]), ValueError, r"spacing must be 3 positive finite voxel sizes in mm \(one per spatial "
                                           r"axis: spatial_dims=3\), got \[2.0, 2.0\]"),
    (dict(spacing=[1.0, 1.0, 1.0, 1.0]), ValueError, "spacing must be 3 "),
    (dict(spacing=[0, 1, 1]), ValueError, r"spacing must be .*got \[0, 1, 1\]"),
    (dict(spacing=[1, -1.5, 1]), ValueError, "spacing must be "),
    (dict(spacing=[1, math.nan, 1]), ValueError, "spacing must be "),
    (dict(spacing=[1, math.inf, 1]), ValueError, "spacing must be "),
    (dict(spacing=[1, True, 1]), ValueError, "spacing must be "),
    (dict(spacing=[1, "2", 1]), ValueError, "spacing must be "),
    (dict(spacing=2.0), TypeError, "spacing must be a sequence of 3 "),
    (dict(spacing="2,2,2"), TypeError, "spacing must be a sequence of 3 "),
    (dict(spacing=[1.0, 1.0, 1.0], spatial_dims=2), ValueError, r"spacing must be 2 .*spatial_dims=2"),
    (dict(shape=[8, 8]), ValueError, r"shape must be 3 positive ints \(voxels\) .*got \[8, 8\]"),
    (dict(shape=[8, 0, 8]), ValueError, "shape must be 3 positive ints"),
    (dict(shape=[8, 8.5, 8]), ValueError, "shape must be 3 positive ints"),
    (dict(shape=[8, 8.0, 8]), ValueError, "shape must be 3 positive ints"),
    (dict(shape=np.array(8)), TypeError, "shape must be a sequence of 3 "),
    (dict(clip_percentiles=[99, 1]), ValueError, r"clip_percentiles must satisfy 0 <= lo < hi <= 100, got \[99, 1\]"),
    (dict(clip_percentiles=[1, 101]), ValueError, "clip_percentiles must satisfy 0 <= lo < hi <= 100"),
    (dict(clip_percentiles=[-1, 50]), ValueError, "clip_percentiles must satisfy 0 <= lo < hi <= 100"),
    (dict(clip_percentiles=[5, 5]), ValueError, "clip_percentiles must satisfy 0 <= lo < hi <= 100"),
    (dict(clip_percentiles=[5]), ValueError, r"clip_percentiles must be 2 percentiles \(lo, hi\), got \[5\]"),
    (dict(clip_percentiles=[1, math.nan]), ValueError, "clip_percentiles must be 2 percentiles"),
])
def test_bad_spacing_shape_and_clip_percentiles_are_refused_at_construction(tmp_path, kw, error, match):
    # they were checked only when the first subject loaded (in a data-loader worker, after the headers were read)
    with pytest.raises(error, match=match):
        NiftiDataset([str(tmp_path / "never_read.nii.gz")], check=False, **kw)


def test_good_spacing_shape_and_clip_percentiles_are_taken(tmp_path):
    images, labels = make_blobs(tmp_path / "d", n=1, shape=(8, 8, 8))
    item = NiftiDataset(images, labels, spacing=(2, 2.0, np.float64(2)), shape=[5, 5, 5],
                        clip_percentiles=(0, 100))[0]
    assert item["image"].shape == (1, 5, 5, 5)
    ds = NiftiDataset([str(tmp_path / "x.nii.gz")], check=False, spatial_dims=2, spacing=[1, 0.5], shape=(4, 4))
    assert ds.spacing == [1, 0.5] and ds.shape == [4, 4]
