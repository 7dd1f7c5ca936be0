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

SCALED = torch.diag(torch.tensor([1.1, 1.1, 1.1, 1.0], dtype=torch.float64))

# (name, function of one tensor, the tensor): every differentiable op family
CASES = [
    ("warp", lambda d: mf.warp(IMG, d).square().sum(), DDF),
    ("affine_warp", lambda t: mf.affine_warp(IMG, t).sum(), torch.eye(3, 4, dtype=torch.float64)[None]),
    ("spline_coefficients", lambda x: mf.spline_coefficients(x).sum(), IMG),
    ("lncc_loss", lambda x: mf.lncc_loss(x, IMG.flip(-1), 3), IMG),
    ("dice_ce_loss", lambda x: mf.dice_ce_loss(x, LABELS), IMG),
    ("dice_loss soft", lambda x: mf.dice_loss(x, torch.softmax(IMG, 1)), IMG),
    ("simulate", lambda p: simulate(p, np.diag([5.0, 5, 5, 1]), POSE, PROBE, seed=1).lines_db.sum(), PROPS),
    # tensor affines: the host read of the affines raised "Cannot access data pointer" before the named error
    ("resample", lambda x: mf.resample(x, torch.eye(4, dtype=torch.float64), SCALED, (5, 6, 7)).sum(), IMG),
    ("resample affine", lambda a: mf.resample(IMG, a, torch.eye(4, dtype=torch.float64), (5, 6, 7)).sum(),
     torch.eye(4, dtype=torch.float64)),
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


# ---- vmap with a shared, unbatched argument (in_dims=(0, None)): the usual pattern, one label map for every call.
# Before: the losses read the (batched) label-range report and class_weight on the host ("Cannot access data
# pointer of Tensor that doesn't have storage"), resample checked a vmapped affine's values (PyTorch's
# data-dependent control flow error).

def _loop(fn, args, in_dims):
    n = next(a.shape[d] for a, d in zip(args, in_dims) if d is not None)
    return torch.stack([fn(*[a if d is None else a.select(d, i) for a, d in zip(args, in_dims)]) for i in range(n)])


def _vmap_matches_loop(fn, args, in_dims, wrt):
    """vmap's values, and the gradients of a weighted sum of them (reverse mode through vmap: torch.func.grad /
    jacrev are refused for these ops), equal a Python loop's."""
    args = [a.clone().requires_grad_(i in wrt) for i, a in enumerate(args)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (PyTorch's "no batching rule: performance drop")
        got = torch.func.vmap(fn, in_dims=in_dims)(*args)
    ref = _loop(fn, args, in_dims)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    if wrt:
        w = torch.randn_like(ref)
        inputs = [args[i] for i in wrt]
        for g, r in zip(torch.autograd.grad((got * w).sum(), inputs), torch.autograd.grad((ref * w).sum(), inputs)):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    return got


_Z = torch.randn(3, 2, 3, 5, 6, dtype=torch.float64)  # vmapped over dim 0: (2, 3, 5, 6) logits per call
_Y = torch.randint(0, 3, (3, 2, 5, 6))
_VW = torch.rand(3, 2, 5, 6, dtype=torch.float64)
_CW = torch.rand(3, 3, dtype=torch.float64) + 0.1
LOSSES = [mf.dice_loss, mf.cross_entropy, mf.dice_ce_loss]
SHARED = [  # (id, function of the loss, args, in_dims, indices differentiated)
    ("labels None", lambda L: L, (_Z, _Y[0]), (0, None), [0]),
    ("labels (B, 1, *S) None", lambda L: L, (_Z, _Y[0][:, None]), (0, None), [0]),
    ("ignore_index", lambda L: lambda z, y: L(z, y, ignore_index=2), (_Z, _Y[0]), (0, None), [0]),
    ("voxel_weight only", lambda L: lambda w: L(_Z[0], _Y[0], voxel_weight=w), (_VW,), (0,), []),
    ("voxel_weight, logits", lambda L: lambda z, w: L(z, _Y[0], voxel_weight=w), (_Z, _VW), (0, 0), [0]),
    ("class_weight", lambda L: lambda z, y, c: L(z, y, class_weight=c), (_Z, _Y, _CW), (0, 0, 0), [0, 2]),
    ("class_weight only", lambda L: lambda c: L(_Z[0], _Y[0], class_weight=c), (_CW,), (0,), []),
    ("class_weight list", lambda L: lambda c: L(_Z[0], _Y[0], class_weight=list(c)), (_CW,), (0,), []),
    ("class_weight, labels None", lambda L: lambda z, c: L(z, _Y[0], class_weight=c), (_Z, _CW), (0, 0), [0]),
]


@pytest.mark.parametrize("loss", LOSSES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", SHARED, ids=[c[0] for c in SHARED])
def test_vmap_losses_with_a_shared_argument_match_a_loop(loss, case):
    _, make, args, in_dims, wrt = case
    _vmap_matches_loop(make(loss), args, in_dims, wrt)


@pytest.mark.parametrize("loss", LOSSES, ids=lambda f: f.__name__)
def test_vmap_losses_bad_labels_give_nan_and_eager_still_raises(loss):
    bad = _Y[0].clone()
    bad[1, 2, 3] = 5  # out of range for C = 3
    with pytest.raises(ValueError, match="target holds label 5"):  # eager: the host check as before
        loss(_Z[0], bad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # a shared map with a bad label: every element's loss is NaN (the documented check_labels=False form)
        assert torch.isnan(torch.func.vmap(loss, in_dims=(0, None))(_Z, bad)).all()
        got = torch.func.vmap(lambda w: loss(_Z[0], bad, voxel_weight=w))(_VW)
        assert torch.isnan(got).all()
        # vmapped labels, one element bad: that element alone, the others as the loop
        labels = _Y.clone()
        labels[2, 0, 0, 0] = -1
        got = torch.func.vmap(loss)(_Z, labels)
    assert torch.isnan(got[2]) and torch.isfinite(got[:2]).all()
    torch.testing.assert_close(got[:2], torch.stack([loss(_Z[i], _Y[i]) for i in range(2)]))


def test_vmap_unbatched_class_weight_still_checked():
    # only a vmapped class_weight goes unchecked; a shared one is read on the host, eager as before
    for cw in (torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64), [1.0, float("nan"), 1.0]):
        with pytest.raises(ValueError, match="class_weight must be non-negative and finite"):
            mf.dice_ce_loss(_Z[0], _Y[0], class_weight=cw)
        with warnings.catch_warnings(), pytest.raises(ValueError, match="class_weight must be non-negative"):
            warnings.simplefilter("ignore")
            torch.func.vmap(lambda z, y, cw=cw: mf.dice_ce_loss(z, y, class_weight=cw))(_Z, _Y)


_RIMG = torch.rand(3, 1, 1, 5, 6, dtype=torch.float64)
_A = torch.eye(3, dtype=torch.float64).repeat(3, 1, 1)
_A[:, :2, 2] = torch.rand(3, 2, dtype=torch.float64)
_A[:, 0, 0] = 1 + 0.1 * torch.rand(3, dtype=torch.float64)
_EYE = torch.eye(3, dtype=torch.float64)
RESAMPLE = [
    ("affine_out", lambda a: mf.resample(_RIMG[0], _EYE, a, (4, 4)), (_A,), (0,), [0]),
    ("affine_in", lambda a: mf.resample(_RIMG[0], a, _EYE, (4, 4)), (_A,), (0,), [0]),
    ("image, affine_in", lambda i, a: mf.resample(i, a, _EYE, (4, 4)), (_RIMG, _A), (0, 0), [0, 1]),
    ("image, affine_out None", lambda i, a: mf.resample(i, _EYE, a, (4, 4)), (_RIMG, _A[0]), (0, None), [0, 1]),
    ("affine batch of 1", lambda a: mf.resample(_RIMG[0], _EYE, a, (4, 4)), (_A[:, None],), (0,), [0]),
]


@pytest.mark.parametrize("case", RESAMPLE, ids=[c[0] for c in RESAMPLE])
def test_vmap_resample_over_affines_matches_a_loop(case):
    _, fn, args, in_dims, wrt = case
    _vmap_matches_loop(fn, args, in_dims, wrt)


# (a singular affine_out is no error: a degenerate output grid)
@pytest.mark.parametrize("which, bad", [("affine_in", "nan"), ("affine_in", "inf"), ("affine_in", "singular"),
                                        ("affine_out", "nan"), ("affine_out", "inf")])
def test_vmap_resample_bad_affine_gives_nan_and_eager_still_raises(which, bad):
    A = _A.clone()
    A[1, 0, 0 if bad != "nan" else 2] = {"nan": float("nan"), "inf": float("inf"), "singular": 0.0}[bad]

    def fn(a):
        return mf.resample(_RIMG[0], a, _EYE, (4, 4)) if which == "affine_in" else mf.resample(_RIMG[0], _EYE, a,
                                                                                                (4, 4))

    with pytest.raises(ValueError, match=("singular" if bad == "singular" else f"{which} must be finite")):
        fn(A[1])  # eager, as before
    with pytest.raises(ValueError, match=("singular" if bad == "singular" else f"{which} must be finite")):
        fn(A[1].clone().requires_grad_(True))  # eager tensor path (autograd): as before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = torch.func.vmap(fn)(A)
    # (an inf in affine_in solved to a finite, wrong theta: that element would have been silently wrong)
    assert torch.isnan(got[1]).all() and torch.isfinite(got[[0, 2]]).all()
    torch.testing.assert_close(got[[0, 2]], torch.stack([fn(A[0]), fn(A[2])]))


OTHERS = [  # the other op families with one argument shared: they already matched a loop (regression cover)
    ("warp ddf None", mf.warp, (_RIMG, torch.randn(1, 2, 5, 6, dtype=torch.float64)), (0, None), [0, 1]),
    ("warp image None", mf.warp, (_RIMG[0], torch.randn(3, 1, 2, 5, 6, dtype=torch.float64)), (None, 0), [0, 1]),
    ("affine_warp theta None", mf.affine_warp, (_RIMG, _A[0, None, :2]), (0, None), [0, 1]),
    ("affine_warp image None", mf.affine_warp, (_RIMG[0], _A[:, None, :2]), (None, 0), [0, 1]),
    ("lncc_loss target None", lambda a, b: mf.lncc_loss(a, b, 3), (_RIMG, _RIMG[0].flip(-1)), (0, None), [0, 1]),
    ("local_ncc pred None", lambda a, b: mf.local_ncc(a, b, 3), (_RIMG[0], _RIMG.flip(-1)), (None, 0), [0, 1]),
    ("compose ddf_b None", mf.compose, (torch.randn(3, 1, 2, 5, 6, dtype=torch.float64),
                                        torch.randn(1, 2, 5, 6, dtype=torch.float64)), (0, None), [0, 1]),
    ("distance_transform", lambda m: mf.distance_transform(m, spacing=(1.0, 2.0)), (_Y == 1,), (0,), []),
]


@pytest.mark.parametrize("case", OTHERS, ids=[c[0] for c in OTHERS])
def test_vmap_other_ops_with_a_shared_argument_match_a_loop(case):
    _, fn, args, in_dims, wrt = case
    _vmap_matches_loop(fn, args, in_dims, wrt)


@pytest.mark.parametrize("metric", ["dice", "hausdorff_distance", "surface_distance"])
@pytest.mark.parametrize("in_dims", [(0, 0), (0, None)])
def test_metrics_refuse_vmap_by_name(metric, in_dims):
    # before: ".item() ... data-dependent" from inside the label check (README: the metrics do not support vmap)
    from medfast import metrics

    p = torch.randint(0, 3, (4, 2, 8, 8))
    t = torch.randint(0, 3, (4, 2, 8, 8))
    fn = {"dice": lambda a, b: metrics.dice(a, b, 3),
          "hausdorff_distance": lambda a, b: metrics.hausdorff_distance(a, b, 95, num_classes=3),
          "surface_distance": lambda a, b: metrics.surface_distance(a, b, num_classes=3)}[metric]
    with pytest.raises(NotImplementedError, match="torch.func transform"):
        torch.func.vmap(fn, in_dims=in_dims)(p, t if in_dims[1] == 0 else t[0])
    assert torch.isfinite(fn(p[0], t[0])).any()  # outside a transform: as before
