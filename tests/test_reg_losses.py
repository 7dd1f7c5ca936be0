"""Registration losses and regularizers against MONAI (and DeepReg's nested-difference bending energy)."""

import pytest
import torch
from monai.losses import BendingEnergyLoss as MonaiBending
from monai.losses import DiffusionLoss as MonaiDiffusion
from monai.losses import GlobalMutualInformationLoss as MonaiMI
from monai.losses import deform as monai_deform
from monai.losses.deform import spatial_gradient

from medfast.losses import (
    BendingEnergyLoss,
    GlobalMutualInformationLoss,
    GradientNormLoss,
    LocalNormalizedCrossCorrelationLoss,
    SSDLoss,
    bending_energy,
    global_mutual_information,
    gradient_norm,
    label_dice_loss,
)


def _ddf(ndim, B=2, dtype=torch.float64):
    shape = (7, 6, 8) if ndim == 3 else (9, 7)
    return torch.randn(B, ndim, *shape, dtype=dtype).requires_grad_()


def _grad(loss, x):
    return torch.autograd.grad(loss, x)[0]


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bending_energy_matches_monai(ndim, normalize, reduction):
    u = _ddf(ndim)
    ref = MonaiBending(normalize=normalize, reduction=reduction)(u)
    # current MONAI (1.6) uses compact second-difference stencils; older releases nested first differences
    stencil = "compact" if hasattr(monai_deform, "spatial_gradient_squared") else "deepreg"
    ours = BendingEnergyLoss(normalize=normalize, reduction=reduction, stencil=stencil)(u)
    # MONAI computes the normalize factor in float32 (an int64 size tensor divided): 1e-7 relative
    tol = dict(rtol=1e-5, atol=1e-6) if normalize else {}
    torch.testing.assert_close(ours, ref, **tol)
    torch.testing.assert_close(_grad(ours.sum(), u), _grad(ref.sum(), u), **tol)


@pytest.mark.parametrize("ndim", [2, 3])
def test_bending_energy_deepreg_stencil(ndim):
    """DeepReg: energy = sum_ij c_ij (d_j d_i u)^2 with nested central differences (each crops 1)."""
    u = _ddf(ndim)
    dims = range(2, u.dim())
    ref = 0
    for i in dims:
        di = spatial_gradient(u, i)
        for j in dims:
            if j >= i:
                ref = ref + (1 if i == j else 2) * spatial_gradient(di, j) ** 2
    ref = ref.mean()
    ours = bending_energy(u, stencil="deepreg")
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(_grad(ours, u), _grad(ref, u))


def test_bending_energy_zero_for_affine_fields():
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in (6, 7, 8)], indexing="ij"))
    A = torch.randn(3, 3, dtype=torch.float64)
    u = (torch.einsum("ij,j...->i...", A, grid) + torch.randn(3, 1, 1, 1, dtype=torch.float64))[None]
    assert bending_energy(u).item() == pytest.approx(0, abs=1e-20)
    assert bending_energy(u, stencil="deepreg").item() == pytest.approx(0, abs=1e-20)
    assert gradient_norm(u).item() > 0


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradient_norm_l2_matches_monai_diffusion(ndim, normalize, reduction):
    u = _ddf(ndim)
    ref = MonaiDiffusion(normalize=normalize, reduction=reduction)(u)
    ours = GradientNormLoss("l2", normalize=normalize, reduction=reduction)(u)
    tol = dict(rtol=1e-5, atol=1e-6) if normalize else {}  # MONAI's float32 normalize factor
    torch.testing.assert_close(ours, ref, **tol)
    torch.testing.assert_close(_grad(ours.sum(), u), _grad(ref.sum(), u), **tol)


def test_gradient_norm_l1():
    u = _ddf(3)
    ref = sum(spatial_gradient(u, d).abs() for d in range(2, 5)).mean()
    torch.testing.assert_close(gradient_norm(u, norm="l1"), ref)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("num_bins", [23, 12])
def test_mutual_information_matches_monai(reduction, num_bins):
    t = torch.rand(2, 1, 9, 8, 7, dtype=torch.float64)
    p = (t**2 + 0.1 * torch.rand_like(t)).clamp(0, 1).requires_grad_()
    kw = dict(num_bins=num_bins, sigma_ratio=0.7, reduction=reduction)
    ref = MonaiMI(kernel_type="gaussian", **kw)(p, t)
    ours = GlobalMutualInformationLoss(**kw)(p, t)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(_grad(ours.sum(), p), _grad(ref.sum(), p))


def test_mutual_information_prefers_aligned_images():
    t = torch.rand(1, 1, 12, 12, 12, dtype=torch.float64)
    mi = GlobalMutualInformationLoss()
    assert mi(1 - t, t) < mi(torch.rand_like(t), t)  # anti-correlated still informative


def test_ssd_and_label_dice():
    p, t = torch.rand(2, 1, 5, 6, 7), torch.rand(2, 1, 5, 6, 7)
    torch.testing.assert_close(SSDLoss()(p, t), torch.nn.functional.mse_loss(p, t))
    torch.testing.assert_close(SSDLoss("sum")(p, t), torch.nn.functional.mse_loss(p, t, reduction="sum"))
    lab = (torch.rand(1, 2, 6, 6, 6) > 0.5).float()
    assert label_dice_loss(lab, lab).item() == pytest.approx(0, abs=1e-6)
    assert label_dice_loss(lab, 1 - lab).item() == pytest.approx(1, abs=1e-4)


def test_gradcheck_regularizers():
    u = _ddf(3, B=1)
    torch.autograd.gradcheck(lambda x: bending_energy(x, normalize=True), (u,))
    torch.autograd.gradcheck(lambda x: gradient_norm(x, norm="l1"), (u,))


def test_bad_inputs():
    with pytest.raises(ValueError, match="ddf must have shape"):
        bending_energy(torch.rand(1, 2, 5, 5, 5))
    with pytest.raises(ValueError, match="must be > 2"):
        gradient_norm(torch.rand(1, 3, 5, 2, 5))
    with pytest.raises(ValueError, match="needs every spatial size > 4"):
        bending_energy(torch.rand(1, 3, 5, 4, 5), stencil="deepreg")
    with pytest.raises(ValueError, match="stencil must be one of"):
        BendingEnergyLoss(stencil="fd")
    with pytest.raises(TypeError, match="ddf must be a torch.Tensor"):
        bending_energy([1.0])
    with pytest.raises(ValueError, match="norm must be one of"):
        gradient_norm(torch.rand(1, 3, 5, 5, 5), norm="l3")
    with pytest.raises(ValueError, match="target must have pred's shape"):
        SSDLoss()(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 5))
    with pytest.raises(ValueError, match="num_bins must be an int"):
        GlobalMutualInformationLoss(num_bins=1)(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4))
    # smoothing terms: a negative or NaN one gave a NaN loss, a string a TypeError from tensor arithmetic
    x = torch.rand(1, 1, 4, 4)
    for kw in ({"smooth_nr": -1.0}, {"smooth_dr": float("nan")}, {"smooth_nr": "1e-7"}):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=f"{name} must be a non-negative finite number"):
            global_mutual_information(x, x, **kw)
        with pytest.raises(ValueError, match=f"{name} must be a non-negative finite number"):
            GlobalMutualInformationLoss(**kw)
    with pytest.raises(ValueError, match="smooth must be a non-negative finite number"):
        label_dice_loss(x, x, smooth=float("nan"))
    # the LNCC module checks its window and smoothing when built, as MONAI's (not at the first forward)
    for kw, error, match in (({"kernel_size": 4}, ValueError, "positive odd"),
                             ({"kernel_size": 0}, ValueError, "positive odd"),
                             ({"kernel_size": (3, 3)}, ValueError, "3 entries"),
                             ({"kernel_size": 3.0}, TypeError, "kernel_size must be an int"),
                             ({"smooth_dr": -1.0}, ValueError, "smooth_dr must be a non-negative"),
                             ({"smooth_dr": 0.0}, ValueError, "smooth_dr must be > 0")):
        with pytest.raises(error, match=match):
            LocalNormalizedCrossCorrelationLoss(**kw)
    assert LocalNormalizedCrossCorrelationLoss(spatial_dims=2, kernel_size=(3, 5)).kernel_size == (3, 5)


def test_empty_batch_is_refused_by_name():
    """A batch of size 0 gave NaN (ssd, bending energy, gradient norm, label Dice: a mean over nothing) or a
    reshape error (mutual information); the fused ops refuse it with the argument's name."""
    empty, ddf = torch.rand(0, 1, 8, 8, 8), torch.rand(0, 3, 8, 8, 8)
    for call in (lambda: global_mutual_information(empty, empty), lambda: GlobalMutualInformationLoss()(empty, empty),
                 lambda: SSDLoss()(empty, empty), lambda: label_dice_loss(empty, empty)):
        with pytest.raises(ValueError, match=r"pred is empty: shape \(0, 1, 8, 8, 8\)"):
            call()
    for call in (lambda: bending_energy(ddf), lambda: gradient_norm(ddf)):
        with pytest.raises(ValueError, match=r"ddf is empty: shape \(0, 3, 8, 8, 8\)"):
            call()
