"""Edge cases of the data pipeline, the classification metrics and the DLPack helpers found by a bug
hunt: constant images under z-score, argument checks of the preprocessing and the augmentation, 2D NIfTI
pairs with a trailing singleton axis, silent wrong metric values, NumPy arrays with negative strides."""

import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

import medfast as mf
from medfast import interop
from medfast.data import NiftiDataset, RandomAugment, crop_or_pad, normalize_intensity
from medfast.tasks.classification import metrics as cm
from medfast.train import AugmentConfig
from tests.conftest import default_dtype


@pytest.mark.parametrize("value", [0.1, -3.3, 0.7, 1000.0])
def test_zscore_of_a_constant_channel_is_zero(value):
    # the float32 mean is off by a rounding unit; dividing by the 1e-8 floor made it -1.49 (0.1) or -47.7 (-3.3)
    x = torch.full((2, 12, 12, 12), value)
    x[1] = 0.3
    assert normalize_intensity(x).abs().max() == 0
    masked = torch.zeros(1, 8, 8, 8)
    masked[0, 2:6, 2:6, 2:6] = abs(value)  # a constant foreground (12.5 % of the voxels)
    assert normalize_intensity(masked).abs().max() == 0
    single = torch.zeros(1, 4, 4)
    single[0, 1, 1] = abs(value)  # one foreground voxel (6 %): its std is undefined, was NaN
    assert torch.equal(normalize_intensity(single), torch.zeros_like(single))
    ramp = torch.linspace(-1, 5, 8 * 8 * 8).reshape(1, 8, 8, 8)
    torch.testing.assert_close(normalize_intensity(ramp), (ramp - ramp.mean()) / ramp.std(correction=0))


def test_zscore_of_a_ct_keeps_its_zero_hu_voxels():
    # a CT is 99 % non-zero like a masked image, but its 0 HU is water: it was left at 0 (the mean's value)
    # and out of the statistics; a plain z-score (MONAI NormalizeIntensity()) is the reference
    from monai.transforms import NormalizeIntensity

    rng = np.random.default_rng(0)
    ct = torch.as_tensor(rng.integers(-1024, 1500, (1, 16, 16, 16)).astype(np.float32))
    ct[0, :4] = 0.0
    # (rtol: float32 sums in another order; both divide the variance by n)
    torch.testing.assert_close(normalize_intensity(ct), torch.as_tensor(NormalizeIntensity()(ct)), rtol=1e-3, atol=1e-5)
    mr = ct.clamp_min(0)  # no negative voxel: a masked image, zeros stay 0 (MONAI nonzero=True)
    torch.testing.assert_close(normalize_intensity(mr), torch.as_tensor(NormalizeIntensity(nonzero=True)(mr)),
                               rtol=1e-3, atol=1e-5)


def test_zscore_of_a_masked_image_ignores_a_few_ringing_negatives():
    # a skull-stripped MR resampled with a ringing kernel: a few voxels just below 0 outside the brain. One
    # voxel of -0.001 switched the statistics from the brain to the whole volume (brain mean +1.85, background
    # -0.51); MONAI NormalizeIntensity(nonzero=True) is the reference, as without the ringing voxels
    from monai.transforms import NormalizeIntensity

    g = torch.Generator().manual_seed(0)
    zz, yy, xx = torch.meshgrid(*[torch.arange(24.0)] * 3, indexing="ij")
    brain = ((zz - 12) ** 2 + (yy - 12) ** 2 + (xx - 12) ** 2) < 9**2
    mr = torch.zeros(1, 24, 24, 24)
    mr[0][brain] = 100 + 20 * torch.randn(int(brain.sum()), generator=g)
    ring = mr.clone()
    ring[0, 12, 12, 2] = -0.001
    ring[0, 3, 12, 12] = -0.02
    ref = torch.as_tensor(NormalizeIntensity(nonzero=True)(ring.clone()))  # (MONAI works in place)
    torch.testing.assert_close(normalize_intensity(ring), ref, rtol=1e-3, atol=1e-4)
    assert abs(float(normalize_intensity(ring)[0][brain].mean())) < 0.05  # (was +1.85)
    # a cubic resample rings on ~10 % of the voxels (the 1 % count rule missed it: brain mean +1.8 again); by
    # magnitude, still a masked image
    import scipy.ndimage as ndi

    th = np.deg2rad(7.0)
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    c = np.full(3, 11.5)
    cubic = ndi.affine_transform(mr[0].numpy(), rot, offset=c - rot @ c, order=3, mode="constant", cval=0.0)
    cubic[np.abs(cubic) < 1e-3] = 0
    cubic = torch.from_numpy(cubic)[None]
    assert int((cubic < 0).sum()) > 0.05 * int((cubic != 0).sum())
    torch.testing.assert_close(normalize_intensity(cubic), torch.as_tensor(NormalizeIntensity(nonzero=True)(
        cubic.clone())), rtol=1e-3, atol=1e-4)
    # a real share of negative voxels (here 5 % of the non-zero ones) is a CT-like image: every voxel counts
    ct_like = mr.clone()
    ct_like[0][brain & (zz < 5.5)] = -300.0
    assert int((ct_like < 0).sum()) > 0.01 * int((ct_like != 0).sum())
    torch.testing.assert_close(normalize_intensity(ct_like), torch.as_tensor(NormalizeIntensity()(ct_like.clone())),
                               rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method", ["zscore", "minmax"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_normalize_refuses_non_finite_voxels(method, bad):
    # zscore gave an all-zero channel (a NaN std took the constant-image branch), minmax all NaN
    x = torch.randn(1, 8, 8, 8)
    x[0, 1, 2, 3] = bad
    with pytest.raises(ValueError, match=r"image has 1 NaN or infinite voxel\(s\) \(first at index \[0, 1, 2, 3\]\)"):
        normalize_intensity(x, method)
    torch.testing.assert_close(normalize_intensity(x, "none"), x, equal_nan=True, rtol=0, atol=0)  # nothing computed


def test_clip_percentiles_under_a_float64_default_dtype():
    # the quantile levels took the default dtype: "quantile() q tensor must be same dtype as the input tensor"
    x = torch.rand(1, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    ref = normalize_intensity(x, clip_percentiles=(1, 99))
    with default_dtype(torch.float64):
        got = normalize_intensity(x, clip_percentiles=(1, 99))
    assert torch.equal(got, ref)


def test_clip_percentiles_of_a_channel_over_2_24_voxels():
    # float32 linspace indices rounded the last one up to numel: IndexError on a 512 x 512 x 65 CT
    n = 2**24 + 4
    x = torch.arange(n, dtype=torch.float32).reshape(1, 4, n // 4)
    out = normalize_intensity(x, "none", clip_percentiles=(0.5, 99.5))
    assert abs(float(out.min()) - 0.005 * (n - 1)) < 20 and abs(float(out.max()) - 0.995 * (n - 1)) < 20


@pytest.mark.parametrize("affine, match", [
    (np.eye(3), r"affine must be a \(4, 4\) matrix for 3 spatial axes, got shape"),
    (np.diag([np.nan, 1, 1, 1]), "affine must be finite"),
    (np.diag([0.0, 1, 1, 1]), "zero voxel size along axis 0")])
def test_preprocessing_names_a_bad_affine(affine, match):
    from medfast.data import resample_to_spacing

    x = torch.rand(1, 8, 8, 8)
    with pytest.raises(ValueError, match=match):
        resample_to_spacing(x, affine, [2, 2, 2])
    if not match.startswith("zero"):
        with pytest.raises(ValueError, match=match):
            crop_or_pad(x, affine, [4, 4, 4])


@pytest.mark.parametrize("clip", [(99, 1), (-5, 150), (0.5,), "ab"])
def test_clip_percentiles_are_checked(clip):
    with pytest.raises(ValueError, match="clip_percentiles"):
        normalize_intensity(torch.rand(1, 4, 4, 4), clip_percentiles=clip)


def test_crop_or_pad_refuses_non_positive_sizes():
    with pytest.raises(ValueError, match="shape must be positive ints"):
        crop_or_pad(torch.rand(1, 8, 8, 8), np.eye(4), [-4, 8, 8])


def test_2d_pairs_with_a_trailing_singleton_axis(tmp_path):
    img = np.random.rand(20, 16, 1, 2).astype(np.float32)  # 2 channels of a 2D image
    lab = np.random.randint(0, 2, (20, 16)).astype(np.int16)
    nib.save(nib.Nifti1Image(img, np.eye(4)), tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / "a_seg.nii.gz")
    ds = NiftiDataset([str(tmp_path / "a.nii.gz")], [str(tmp_path / "a_seg.nii.gz")], spatial_dims=2)
    ds.check()  # was "label has shape (20, 16) but its image ... has shape (20, 16, 1, 2)"
    item = ds[0]
    image, label = (item["image"], item["label"]) if isinstance(item, dict) else item[:2]
    assert tuple(image.shape) == (2, 20, 16) and tuple(label.shape) == (20, 16)


def test_vector_layout_channels_are_read_as_channels(tmp_path):
    # (X, Y, Z, 1, C), how ITK / SimpleITK store a multi-channel image: "1 channel(s) but 4 are expected"
    # from the header check, then "expected a 2D, 3D or 4D NIfTI" when loading
    img = np.random.rand(8, 9, 10, 1, 4).astype(np.float32)
    nib.save(nib.Nifti1Image(img, np.eye(4)), tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 10), np.int16), np.eye(4)), tmp_path / "a_seg.nii.gz")
    ds = NiftiDataset([str(tmp_path / "a.nii.gz")], [str(tmp_path / "a_seg.nii.gz")], in_channels=4, normalize="none")
    ds.check()
    item = ds[0]
    image = item["image"] if isinstance(item, dict) else item[0]
    np.testing.assert_array_equal(image.numpy(), np.moveaxis(img[:, :, :, 0], -1, 0))
    nib.save(nib.Nifti1Image(np.random.rand(8, 9, 10, 2, 4).astype(np.float32), np.eye(4)), tmp_path / "b.nii.gz")
    from medfast.data import DatasetError

    with pytest.raises(DatasetError, match="b.nii.gz: expected a 2D, 3D or 4D NIfTI .*vector layout"):
        NiftiDataset([str(tmp_path / "b.nii.gz")], [str(tmp_path / "a_seg.nii.gz")], in_channels=4).check()


def test_per_channel_files_without_channel_0000_get_their_own_message(tmp_path):
    # nnU-Net's c_0001 ... c_0003 without c_0000: "no label for image c_0001" told the user to label a modality
    from medfast.data import DatasetError
    from medfast.data.dataset import find_pairs

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for k in range(1, 4):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "images" / f"c_000{k}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), tmp_path / "labels" / "c.nii.gz")
    with pytest.raises(DatasetError, match="case 'c' has channel files .* but no c_0000 file"):
        find_pairs(tmp_path)


def test_augment_checks_the_label_grid_and_flip_axes_and_keeps_float64():
    aug = RandomAugment(AugmentConfig())
    img = torch.rand(1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="label must be"):
        aug(img, torch.randint(0, 3, (1, 12, 16, 16)), [1])  # another grid: was warped out of alignment
    with pytest.raises(ValueError, match="label must be"):
        aug(img, torch.randint(0, 3, (1, 1, 16, 16, 16)), [1])
    with pytest.raises(ValueError, match="augment.flip"):
        RandomAugment(AugmentConfig(flip=[3]))(img, None, [1])
    out, lab = aug(img.double(), torch.randint(0, 3, (1, 16, 16, 16)), [1])  # was a TypeError about theta
    assert out.dtype == torch.float64 and lab.dtype == torch.int64


def test_classification_metrics_refuse_what_they_would_get_wrong():
    with pytest.raises(ValueError, match="differ in shape"):
        cm.accuracy([1], [1, 0, 1])  # NumPy broadcast it: 0.667
    with pytest.raises(ValueError, match="NaN"):
        cm.roc_auc(np.array([0.1, np.nan, 0.8, 0.4]), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="average"):
        cm.roc_auc(np.random.rand(6, 3), [0, 1, 2, 0, 1, 2], average="micro")
    with pytest.raises(ValueError, match="target indices"):
        cm.roc_auc(np.random.rand(4, 3), [0, 1, 5, 2])
    with pytest.raises(ValueError, match="num_classes"):
        cm.roc_auc(np.random.rand(4, 3), [0, 1, 2, 2], num_classes=4)
    with pytest.raises(ValueError, match="whole numbers"):
        cm.confusion_matrix(np.array([0.7, 1.0]), [0, 1], 2)
    assert cm.confusion_matrix(np.array([0.0, 1.0]), [0, 1], 2).trace() == 2  # whole floats are indices


def test_interop_copies_negative_strides_and_warns_on_read_only_arrays():
    img = np.random.rand(1, 1, 8, 9, 10).astype(np.float32)
    ddf = np.zeros((1, 3, 8, 9, 10), np.float32)
    flipped = np.flip(img, 2)
    out = interop.call(mf.warp, flipped, ddf)  # was a storage-size overflow from DLPack
    np.testing.assert_allclose(out, flipped)
    ro = img.copy()
    ro.flags.writeable = False
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        interop.as_tensor(ro)
    assert any("not writable" in str(m.message) for m in w)


def test_disk_cache_leaves_the_global_numpy_stream_alone(tmp_path):
    # the cache's temporary file name came from np.random: a cold read moved the trainer-seeded stream (and
    # two jobs with the same seed sharing the cache wrote the same temporary file)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8)).astype(np.float32), np.eye(4)),
             tmp_path / "img.nii.gz")
    ds = NiftiDataset([str(tmp_path / "img.nii.gz")], cache="disk", cache_dir=str(tmp_path / "cache"))
    draws = []
    for _ in ("cold", "warm"):
        np.random.seed(0)
        ds[0]
        draws.append(np.random.rand())
    assert draws[0] == draws[1]
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1 and not list((tmp_path / "cache").glob(".*"))
