"""MONAI drop-in details (a bug hunt): MONAI's (B, 1, *S) label layout in the surface metrics, DiceLoss's
weight forms, DiffusionLoss's and GlobalMutualInformationLoss's positional arguments; and a sagittal or
coronal single-slice label map in medfast evaluate."""

import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

import medfast.losses as fl
import medfast.metrics as fm
from medfast.tasks.evaluation import evaluate_pair

monai = pytest.importorskip("monai")
ml = pytest.importorskip("monai.losses")
mm = pytest.importorskip("monai.metrics")


def _onehot(x: torch.Tensor, classes: int = 2) -> torch.Tensor:
    return torch.nn.functional.one_hot(x[:, 0], classes).movedim(-1, 1).float()


@pytest.mark.parametrize("ndim", [2, 3])
def test_channel_axis_label_maps_equal_monai(ndim):
    shape = (16,) * ndim
    p = torch.zeros(2, 1, *shape, dtype=torch.long)
    t = torch.zeros(2, 1, *shape, dtype=torch.long)
    p[(slice(None), 0, *[slice(2, 14)] * ndim)] = 1
    t[(slice(None), 0, *[slice(5, 11)] * ndim)] = 1
    t[1] = t[1].roll(2, -1)
    sp = [0.7, 1.3, 2.0][:ndim]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = mm.compute_hausdorff_distance(_onehot(p), _onehot(t), percentile=95, spacing=sp)
        asd = mm.compute_average_surface_distance(_onehot(p), _onehot(t), symmetric=True, spacing=sp)
    got_hd = fm.hausdorff_distance(p, t, 95, sp, num_classes=2)  # (B, 1, *S): the 1 is MONAI's channel
    got_asd = fm.surface_distance(p, t, sp, num_classes=2, symmetric=True)
    torch.testing.assert_close(got_hd, hd.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_asd, asd.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fm.hausdorff_distance(p[:, 0], t[:, 0], 95, sp, num_classes=2), got_hd)
    if ndim == 2:  # the size-1 axis is not read as a depth-1 axis of a 3D map (HD 3.61 / ASSD 1.39 before)
        assert got_hd[0, 0].item() == pytest.approx(hd[0, 0].item(), rel=1e-5)


def test_dice_loss_takes_monai_weight_forms():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 3, (2, 1, 6, 5, 4), generator=g)
    for kw in (dict(weight=2.0), dict(weight=[0.5, 1.0, 3.0]), dict(include_background=False, weight=[1.0, 2.0]),
               dict(include_background=False, weight=torch.tensor([1.0, 2.0], dtype=torch.float64)),
               dict(include_background=False, weight=4.0, batch=True)):
        want = ml.DiceLoss(to_onehot_y=True, softmax=True, **kw)(x, y)
        got = fl.DiceLoss(**kw)(x, y)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        gw, = torch.autograd.grad(want, x)
        gg, = torch.autograd.grad(got, x)
        torch.testing.assert_close(gg, gw, rtol=1e-10, atol=1e-12)
    w = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)  # a weight tensor stays differentiable
    fl.DiceLoss(weight=w)(x, y).backward()
    assert w.grad is not None and w.grad.item() != 0
    with pytest.raises(ValueError, match="weight must be one value or C = 3 values, got"):
        fl.DiceLoss(weight=[1.0, 2.0])(x, y)
    with pytest.raises(ValueError, match=r"or 2 without the background"):
        fl.DiceLoss(include_background=False, weight=[1.0, 2.0, 3.0, 4.0])(x, y)


def test_registration_losses_take_monai_positional_arguments():
    g = torch.Generator().manual_seed(1)
    ddf = torch.randn(1, 3, 8, 8, 8, generator=g)
    a, b = torch.rand(1, 1, 8, 8, 8, generator=g), torch.rand(1, 1, 8, 8, 8, generator=g)
    for args in ((), (True,), (False, "sum"), (True, "none")):
        torch.testing.assert_close(fl.DiffusionLoss(*args)(ddf), ml.DiffusionLoss(*args)(ddf), rtol=1e-5, atol=1e-6)
    assert isinstance(fl.DiffusionLoss(), fl.GradientNormLoss)
    for args in (("gaussian", 16), ("gaussian", 23, 0.5, "sum")):
        torch.testing.assert_close(fl.GlobalMutualInformationLoss(*args)(a, b),
                                   ml.GlobalMutualInformationLoss(*args)(a, b), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fl.GlobalMutualInformationLoss(kernel_type="gaussian", num_bins=16)(a, b),
                               fl.GlobalMutualInformationLoss(num_bins=16)(a, b))
    with pytest.raises(ValueError, match="kernel_type must be 'gaussian'"):
        fl.GlobalMutualInformationLoss("b-spline")


@pytest.mark.parametrize("flat", [0, 1])
def test_evaluate_single_sagittal_or_coronal_slice_is_2d(tmp_path, flat):
    g = np.indices((40, 30)).astype(float)
    ref = ((((g[0] - 20) / 12) ** 2 + ((g[1] - 15) / 8) ** 2) < 1).astype(np.uint8)
    pred = ((((g[0] - 22) / 10) ** 2 + ((g[1] - 14) / 9) ** 2) < 1).astype(np.uint8)
    spacing_3d = np.insert(np.array([0.5, 0.8]), flat, 3.0)  # the flat axis gets the 3 mm
    for name, x in (("p", pred), ("r", ref)):
        image = nib.Nifti1Image(np.expand_dims(x, flat), np.diag([*spacing_3d, 1.0]))
        nib.save(image, str(tmp_path / f"{name}.nii.gz"))
    [row] = evaluate_pair(tmp_path / "p.nii.gz", tmp_path / "r.nii.gz")
    want = fm.hausdorff_distance(torch.from_numpy(pred)[None].long(), torch.from_numpy(ref)[None].long(), 95,
                                 [0.5, 0.8], num_classes=2)
    assert row["hd"] == pytest.approx(float(want[0, 0]), abs=1e-4)


def test_dice_loss_weight_forms_with_numpy_flags():
    logits, lab = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    want = fl.DiceLoss(include_background=False, weight=[1.0, 2.0])(logits, lab)
    torch.testing.assert_close(fl.DiceLoss(include_background=np.False_, weight=[1.0, 2.0])(logits, lab), want)
