"""torch.func transforms, forward-mode AD, torch.compile with dynamic shapes and torch.export: what a
bug hunt found (silently zero forward-mode tangents, raw errors under vmap and torch.func.grad, graph
breaks and fixed sizes under dynamic shapes, a wrong fake layout under inductor)."""

import warnings

import numpy as np
import pytest
import torch
import torch._dynamo.utils as dynamo_utils
import torch.autograd.forward_ad as fwAD

import medfast as mf
from medfast.metrics import hausdorff_distance
from medfast.ultrasound import Probe, look_at, simulate

torch.manual_seed(0)
IMG = torch.randn(1, 2, 5, 6, 7, dtype=torch.float64)
DDF = torch.randn(1, 3, 5, 6, 7, dtype=torch.float64)
LABELS = torch.randint(0, 2, (1, 5, 6, 7))
PROPS = torch.rand(1, 5, 6, 6, 6, dtype=torch.float64) + 1
POSE = look_at((15.0, 15.0, -2.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)).double()
PROBE = Probe.preset("L11-5v", n_lines=8, n_samples=32, depth_mm=20.0)

# (name, function of one tensor, the tensor): every differentiable op family
CASES = [
    ("warp", lambda d: mf.warp(IMG, d).square().sum(), DDF),
    ("affine_warp", lambda t: mf.affine_warp(IMG, t).sum(), torch.eye(3, 4, dtype=torch.float64)[None]),
    ("spline_coefficients", lambda x: mf.spline_coefficients(x).sum(), IMG),
    ("lncc_loss", lambda x: mf.lncc_loss(x, IMG.flip(-1), 3), IMG),
    ("dice_ce_loss", lambda x: mf.dice_ce_loss(x, LABELS), IMG),
    ("dice_loss soft", lambda x: mf.dice_loss(x, torch.softmax(IMG, 1)), IMG),
    ("simulate", lambda p: simulate(p, np.diag([5.0, 5, 5, 1]), POSE, PROBE, seed=1).lines_db.sum(), PROPS),
]


@pytest.mark.parametrize("name, fn, x", CASES, ids=[c[0] for c in CASES])
def test_forward_mode_and_func_gradients_are_refused_not_silently_wrong(name, fn, x):
    # before: torch.func.jvp and forward_ad gave a zero / missing tangent (finite differences: 25.7 for
    # warp); torch.func.grad failed deep inside PyTorch or on a host check ("no storage")
    with pytest.raises(NotImplementedError, match="forward-mode"):
        torch.func.jvp(fn, (x,), (torch.ones_like(x),))
    with pytest.raises(NotImplementedError, match="reverse mode"):
        torch.func.grad(fn)(x)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward_ad"):
        fn(fwAD.make_dual(x, torch.ones_like(x)))
    # reverse mode is unaffected
    x = x.clone().requires_grad_(True)
    fn(x).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_vmap_matches_a_loop():
    z = torch.randn(4, 2, 3, 5, 6, 7)
    y = torch.randint(0, 3, (4, 2, 5, 6, 7))
    ref = torch.stack([mf.dice_ce_loss(z[i], y[i]) for i in range(4)])
    # before: the default label check read the batched labels on the host, a raw C++ error
    torch.testing.assert_close(torch.func.vmap(mf.dice_ce_loss)(z, y), ref)
    bad = y.clone()
    bad[1, 0, 0, 0, 0] = 7  # out of range: NaN for that element under vmap (no host check possible)
    got = torch.func.vmap(mf.dice_ce_loss)(z, bad)
    assert torch.isnan(got[1]) and torch.isfinite(got[[0, 2, 3]]).all()
    img, ddf = torch.randn(3, 1, 2, 6, 7, 8), torch.randn(3, 1, 3, 6, 7, 8)
    torch.testing.assert_close(torch.func.vmap(mf.warp)(img, ddf),
                               torch.stack([mf.warp(img[i], ddf[i]) for i in range(3)]))


def test_surface_metrics_of_a_transposed_label_map_compile_with_inductor():
    # the surface_edges fake kept a permuted mask's strides while the kernel returns a contiguous
    # tensor: opcheck failed and inductor asserted on strides (a Fortran-ordered NIfTI label map)
    mask = (torch.rand(2, 7, 6, 5) > 0.4).transpose(1, 3)
    torch.library.opcheck(torch.ops.medfast.surface_edges, (mask,))
    pred = torch.randint(0, 3, (2, 7, 6, 5)).transpose(1, 3)
    target = torch.randint(0, 3, (2, 5, 6, 7))
    eager = hausdorff_distance(pred, target, num_classes=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(lambda a, b: hausdorff_distance(a, b, num_classes=3), backend="inductor")(pred, target)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("loss", [mf.dice_loss, mf.dice_ce_loss, mf.cross_entropy])
def test_losses_compile_with_dynamic_shapes_and_fullgraph(loss):
    # before: math.isfinite on the (symbolic) smooth / lambda values broke the graph
    f = torch.compile(loss, backend="eager", dynamic=True, fullgraph=True)
    for width in (6, 7, 9):
        z, y = torch.randn(2, 3, 5, 6, width), torch.randint(0, 3, (2, 5, 6, width))
        torch.testing.assert_close(f(z, y, check_labels=False), loss(z, y))


def test_resample_compiles_with_fullgraph():
    # before: the host finiteness check and the singular-matrix try/except were data-dependent branches
    img = torch.rand(1, 1, 8, 9, 10)
    a_in = torch.diag(torch.tensor([1.0, 1.2, 0.9, 1.0], dtype=torch.float64))
    a_out = a_in.clone()
    a_out[:3, 3] = 0.5
    f = torch.compile(mf.resample, backend="eager", fullgraph=True)
    torch.testing.assert_close(f(img, a_in, a_out, (6, 7, 8)), mf.resample(img, a_in, a_out, (6, 7, 8)))


def test_spatial_sizes_stay_symbolic():
    # the warp schema took int[] (not SymInt[]) shapes and the soft-target loss divided by float(count):
    # torch.export refused a dynamic spatial size and dynamic=True compiled a graph per size
    class Warp(torch.nn.Module):
        def forward(self, img, ddf):
            return mf.warp(img, ddf)

    class SoftDice(torch.nn.Module):
        def forward(self, z, t):
            return mf.dice_loss(z, t)

    S = torch.export.Dim("S", min=4, max=64)
    img, ddf, z = torch.randn(2, 2, 6, 7, 8), torch.randn(2, 3, 6, 7, 8), torch.randn(2, 3, 6, 7, 8)
    warp = torch.export.export(Warp(), (img, ddf), dynamic_shapes=({4: S}, {4: S}))
    dice = torch.export.export(SoftDice(), (z, torch.softmax(z, 1)), dynamic_shapes=({4: S}, {4: S}))
    img, ddf, z = torch.randn(2, 2, 6, 7, 11), torch.randn(2, 3, 6, 7, 11), torch.randn(2, 3, 6, 7, 11)
    torch.testing.assert_close(warp.module()(img, ddf), mf.warp(img, ddf))
    torch.testing.assert_close(dice.module()(z, torch.softmax(z, 1)), mf.dice_loss(z, torch.softmax(z, 1)))
    dynamo_utils.counters.clear()
    f = torch.compile(lambda i, d: mf.warp(i, d), backend="eager", dynamic=True)
    for width in (8, 9, 10, 11):
        i, d = torch.randn(1, 1, 6, 7, width), torch.randn(1, 3, 6, 7, width)
        torch.testing.assert_close(f(i, d), mf.warp(i, d))
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1


def test_complex_class_weight_and_affine_are_refused():
    # they were cast to real with only PyTorch's "discards the imaginary part" warning
    z, y = torch.randn(1, 2, 4, 5, 6), torch.randint(0, 2, (1, 4, 5, 6))
    with pytest.raises(TypeError, match="class_weight"):
        mf.dice_ce_loss(z, y, class_weight=torch.tensor([1.0 + 1j, 1.0]))
    with pytest.raises(TypeError, match="class_weight"):
        mf.dice_ce_loss(z, y, class_weight=[1.0 + 1j, 1.0])
    with pytest.raises(TypeError, match="affine_in"):
        mf.resample(torch.rand(1, 1, 4, 5, 6), torch.eye(4, dtype=torch.complex64), torch.eye(4), (4, 5, 6))
