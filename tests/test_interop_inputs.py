"""Inputs as MONAI / NumPy users pass them (a bug hunt): NumPy and 0-d tensor scalars for scalar arguments,
MONAI MetaTensors, unsigned label maps as ITK-SNAP saves them, per-batch spacings as arrays, big-endian arrays,
and medfast.interop with array-API libraries and namedtuple results."""

import collections
import types
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

import medfast as mf
from medfast import interop
from medfast.data import crop_or_pad, resample_to_spacing
from medfast.data.augment import AugmentConfig, RandomAugment
from medfast.losses import DiceCELoss, global_mutual_information
from medfast.metrics import dice, hausdorff_distance, surface_distance


def _small():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 8, 8, 8, generator=g)
    v = 0.3 * torch.randn(1, 3, 8, 8, 8, generator=g)
    lg = torch.randn(1, 3, 8, 8, 8, generator=g)
    y = torch.randint(0, 3, (1, 8, 8, 8), generator=g)
    return x, v, lg, y


@pytest.mark.parametrize("kind", ["numpy", "tensor"])
def test_numpy_and_0d_tensor_scalars_equal_python_scalars(kind):
    x, v, lg, y = _small()
    i = (lambda n: np.int64(n)) if kind == "numpy" else (lambda n: torch.tensor(n))
    f = (lambda n: np.float32(n)) if kind == "numpy" else (lambda n: torch.tensor(n, dtype=torch.float64))
    b = (lambda n: np.bool_(n)) if kind == "numpy" else (lambda n: torch.tensor(n))
    pairs = [
        (lambda: mf.integrate(v, i(3)), lambda: mf.integrate(v, 3)),
        (lambda: mf.lncc_loss(x, x.flip(2), i(5), smooth_dr=f(1e-3)),
         lambda: mf.lncc_loss(x, x.flip(2), 5, smooth_dr=float(np.float32(1e-3)))),
        (lambda: mf.dice_ce_loss(lg, y, lambda_dice=f(0.5), lambda_ce=f(2.0), smooth=f(1e-3), ignore_index=i(2),
                                 include_background=b(False)),
         lambda: mf.dice_ce_loss(lg, y, lambda_dice=0.5, lambda_ce=2.0, smooth=float(np.float32(1e-3)), ignore_index=2,
                                 include_background=False)),
        (lambda: DiceCELoss(smooth_nr=f(1e-3), smooth_dr=f(1e-3))(lg, y),
         lambda: DiceCELoss(smooth_nr=float(np.float32(1e-3)), smooth_dr=float(np.float32(1e-3)))(lg, y)),
        (lambda: global_mutual_information(x, x.flip(3), num_bins=i(16), sigma_ratio=f(0.5)),
         lambda: global_mutual_information(x, x.flip(3), num_bins=16, sigma_ratio=0.5)),
        (lambda: mf.distance_transform(y > 0, spacing=f(2.0)), lambda: mf.distance_transform(y > 0, spacing=2.0)),
        (lambda: dice(y, y.flip(1), i(3), include_background=b(True), ignore_index=i(2)),
         lambda: dice(y, y.flip(1), 3, include_background=True, ignore_index=2)),
        (lambda: hausdorff_distance(y, y.flip(1), num_classes=i(3), percentile=f(95.0), directed=b(True)),
         lambda: hausdorff_distance(y, y.flip(1), num_classes=3, percentile=95.0, directed=True)),
        (lambda: mf.warp(x, v, mode="cubic", prefiltered=b(False)), lambda: mf.warp(x, v, mode="cubic")),
    ]
    for got, want in pairs:
        torch.testing.assert_close(got(), want(), rtol=0, atol=0, equal_nan=True)


def test_scalar_arguments_still_refuse_what_is_not_a_scalar():
    x, v, lg, y = _small()
    with pytest.raises(ValueError, match="steps"):
        mf.integrate(v, np.float64(3.5))
    with pytest.raises(ValueError, match="lambda_dice"):
        mf.dice_ce_loss(lg, y, lambda_dice=np.float32(-1))
    with pytest.raises(TypeError, match="ignore_index"):
        mf.dice_ce_loss(lg, y, ignore_index=np.float32(2))
    with pytest.raises(TypeError, match="prefiltered"):
        mf.warp(x, v, prefiltered=np.int64(1))
    with pytest.raises(ValueError, match="lambda_ce"):  # a tensor that requires grad is not read as a number
        mf.dice_ce_loss(lg, y, lambda_ce=torch.tensor(1.0, requires_grad=True))
    with pytest.raises(TypeError, match="kernel_size"):
        mf.lncc_loss(x, x, np.array([5.0, 5.0, 5.0]))


def test_kernel_size_and_shapes_as_arrays():
    x, _, _, _ = _small()
    want = mf.lncc_loss(x, x.flip(2), [5, 3, 5])
    for ks in (np.array([5, 3, 5]), torch.tensor([5, 3, 5])):
        torch.testing.assert_close(mf.lncc_loss(x, x.flip(2), ks), want, rtol=0, atol=0)
    img = torch.arange(6 * 7 * 8.0).view(6, 7, 8)
    want_t, want_a = crop_or_pad(img, np.eye(4), (4, 9, 8))
    for shape in (torch.Size([4, 9, 8]), np.array([4, 9, 8]), torch.tensor([4, 9, 8])):
        t, a = crop_or_pad(img, np.eye(4), shape)
        torch.testing.assert_close(t, want_t, rtol=0, atol=0)
        np.testing.assert_array_equal(a, want_a)


def test_augment_flip_axes_as_numpy_ints():
    image = torch.rand(1, 1, 6, 6, 6)
    outs = []
    for flip in ([np.int64(0)], [0]):  # a NumPy axis is an axis (it was refused as not an int)
        cfg = AugmentConfig(rotation=0, scale=0, translation=0, deform_magnitude=0, flip=flip)
        outs.append(RandomAugment(cfg, geometric_only=True)(image, None, [3])[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_metrics_take_wide_unsigned_label_maps(dtype):
    lab = torch.zeros(1, 12, 10, 8, dtype=torch.int64)
    lab[0, 3:8, 2:7, 2:6] = 1
    other = lab.roll(2, 1)
    for fn in (lambda p, t: dice(p, t, 2), lambda p, t: hausdorff_distance(p, t, num_classes=2, percentile=95),
               lambda p, t: surface_distance(p, t, num_classes=2)):
        torch.testing.assert_close(fn(other.to(dtype), lab.to(dtype)), fn(other, lab))
    onehot = torch.stack([lab == 0, lab == 1], 1)
    torch.testing.assert_close(hausdorff_distance(onehot.to(dtype), onehot.to(dtype)),
                               hausdorff_distance(onehot, onehot))
    bad = lab.to(dtype).clone()
    bad[0, 0, 0, 0] = 7
    with pytest.raises(ValueError, match="outside"):
        dice(bad, lab.to(dtype), 2)


def test_per_batch_spacing_as_arrays_and_tensors():
    p = torch.zeros(2, 12, 12, 12, dtype=torch.long)
    p[:, 3:9, 3:9, 3:9] = 1
    t = torch.zeros(2, 12, 12, 12, dtype=torch.long)
    t[:, 4:10, 3:8, 2:9] = 1
    want = hausdorff_distance(p, t, spacing=((1.5,) * 3, (2.0,) * 3), num_classes=2)
    assert want.flatten().tolist() == [1.5, 2.0]
    for sp in ([np.array([1.5] * 3), np.array([2.0] * 3)], np.array([[1.5] * 3, [2.0] * 3]),
               torch.tensor([[1.5] * 3, [2.0] * 3])):
        torch.testing.assert_close(hausdorff_distance(p, t, spacing=sp, num_classes=2), want, rtol=0, atol=0)
    shared = hausdorff_distance(p, t, spacing=np.array([1.5, 1.5, 1.5]), num_classes=2)
    assert shared.flatten().tolist() == [1.5, 1.5]
    with pytest.raises(ValueError, match="batch"):
        hausdorff_distance(p, t, spacing=np.ones((3, 3)), num_classes=2)


def test_big_endian_arrays_from_nibabel(tmp_path):
    header = nib.Nifti1Header().as_byteswapped(">")
    header.set_data_dtype(np.float32)
    data = np.random.default_rng(0).random((12, 10, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4), header=header), tmp_path / "be.nii")
    arr = np.asanyarray(nib.load(tmp_path / "be.nii").dataobj)[None, None]
    assert not arr.dtype.isnative
    out = interop.call(mf.resample, arr, np.eye(4), np.eye(4), (12, 10, 8), mode="nearest")
    np.testing.assert_array_equal(out[0, 0], data)
    swapped = np.diag([2.0, 2.0, 2.0, 1.0]).astype(">f8")
    torch.testing.assert_close(mf.resample(torch.from_numpy(data)[None, None], swapped, swapped, (12, 10, 8)),
                               torch.from_numpy(data)[None, None])


class _ForeignArray:
    """An array whose type lives in a module without from_dlpack (as JAX's lives in jaxlib), with an array-API
    namespace that has one."""

    def __init__(self, array):
        self.array = array

    def __dlpack__(self, *args, **kwargs):
        return self.array.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()

    def __array_namespace__(self, api_version=None):
        return types.SimpleNamespace(from_dlpack=lambda t: _ForeignArray(np.from_dlpack(t)))


def test_interop_returns_array_api_libraries_and_namedtuples():
    image = np.random.default_rng(0).random((1, 1, 6, 6, 6)).astype(np.float32)
    ddf = np.zeros((1, 3, 6, 6, 6), np.float32)
    out = interop.call(mf.warp, _ForeignArray(image), _ForeignArray(ddf))
    assert isinstance(out, _ForeignArray)
    np.testing.assert_array_equal(out.array, image)
    pair = collections.namedtuple("Pair", "lo hi")
    got = interop.call(lambda a: pair(a.min(), a.max()), image)
    assert type(got) is pair and isinstance(got.lo, np.ndarray) and float(got.hi) == float(image.max())


monai = pytest.importorskip("monai")


def test_monai_metatensor_outputs_on_another_grid_are_plain_tensors():
    from monai.data import MetaTensor

    warnings.simplefilter("ignore")
    a_out = np.diag([2.0, 2.0, 2.0, 1.0])
    img = MetaTensor(torch.rand(1, 1, 16, 16, 16), affine=torch.eye(4, dtype=torch.float64)).requires_grad_()
    ddf = MetaTensor(torch.zeros(1, 3, 6, 6, 6), affine=torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0])))
    outs = [mf.resample(img, img.affine, a_out, (8, 8, 8)), mf.warp(img, ddf),
            mf.affine_warp(img, torch.eye(3, 4)[None], shape=(5, 5, 5))]
    plain = img.detach().as_subclass(torch.Tensor)
    wants = [mf.resample(plain, np.eye(4), a_out, (8, 8, 8)), mf.warp(plain, ddf.as_subclass(torch.Tensor)),
             mf.affine_warp(plain, torch.eye(3, 4)[None], shape=(5, 5, 5))]
    for out, want in zip(outs, wants):
        assert type(out) is torch.Tensor  # not a MetaTensor claiming the input's grid
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    sum(o.sum() for o in outs).backward()
    assert img.grad is not None and float(img.grad.abs().sum()) > 0
    t, aff = crop_or_pad(MetaTensor(torch.rand(1, 10, 10, 10)), np.eye(4), (8, 8, 8))
    assert type(t) is torch.Tensor and aff[:3, 3].tolist() == [1.0, 1.0, 1.0]
    r, aff = resample_to_spacing(MetaTensor(torch.rand(1, 10, 10, 10)), np.eye(4), (2.0, 2.0, 2.0))
    assert type(r) is torch.Tensor and r.shape[1:] == (5, 5, 5)
    # losses and metrics keep working on MetaTensors (their outputs carry no grid)
    lg = MetaTensor(torch.randn(1, 3, 8, 8, 8))
    y = torch.randint(0, 3, (1, 8, 8, 8))
    torch.testing.assert_close(mf.dice_ce_loss(lg, y).as_subclass(torch.Tensor),
                               mf.dice_ce_loss(lg.as_subclass(torch.Tensor), y))


def test_monai_metatensor_volume_and_pose_give_plain_frames():
    from monai.data import MetaTensor

    from medfast.ultrasound import look_at, simulate_ct

    warnings.simplefilter("ignore")
    ct = torch.full((1, 1, 24, 24, 24), 40.0)
    ct[..., 12:, :, :] = 700.0
    pose = torch.as_tensor(look_at(position=(12, 12, 1), direction=(0, 0, 1), lateral=(1, 0, 0)), dtype=torch.float32)
    want = simulate_ct(ct, np.eye(4), pose, "L11-5v", sub_rays=1).bmode
    got = simulate_ct(MetaTensor(ct, affine=torch.eye(4, dtype=torch.float64)), np.eye(4), MetaTensor(pose),
                      "L11-5v", sub_rays=1).bmode
    assert type(got) is torch.Tensor
    torch.testing.assert_close(got, want, rtol=0, atol=0)
