"""The operator boundary: direct ``torch.ops.medfast.*`` calls (bad gradients, empty axes, mixed devices), the
registrations that ``import medfast`` alone must bring, and the public ops under torch.compile(fullgraph=True,
dynamic=True) and torch.export with dynamic sizes. A call that used to kill the process runs in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import medfast as mf

ops = torch.ops.medfast
ROOT = Path(__file__).resolve().parents[1]
G = [0.7, 0.1, 0.0, 0.05, 0.0, 0.8, 0.2, 0.1, 0.1, 0.0, 0.9, 0.3]
BG = [1.5, 0.0, 0.0, 0.0, 0.0]


def run_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that imports this checkout's medfast (and nothing else of it); a crash
    shows as a negative return code instead of taking pytest down."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def assert_ran(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"return code {proc.returncode} (negative: killed by that signal)\n{proc.stderr}"
    return proc.stdout


# ---------------------------------------------------------------------------------------------
# Backward ops: the grad argument is checked (shape, dtype) before the kernels read it
# ---------------------------------------------------------------------------------------------

_STATS_PRE = """
import torch, medfast
ops = torch.ops.medfast
z = torch.rand(2, 3, 4, 4); y = torch.randint(0, 3, (2, 4, 4)); t = torch.rand(2, 3, 4, 4)
def raises(fn):
    try:
        fn()
    except (ValueError, TypeError) as e:
        print(type(e).__name__, str(e).splitlines()[0])
    else:
        print("accepted")
"""


@pytest.mark.parametrize("grad", ["torch.ones(0)", "torch.ones(1, 3, 4)", "torch.ones(2, 3, 5)"])
@pytest.mark.parametrize("op", ["softmax_stats_backward(g, z, y, None)", "soft_stats_backward(g, z, t, None, True)"])
def test_stats_backward_refuses_a_grad_of_another_shape(op, grad):
    # an empty grad segfaulted; (1, 3, 4) for B = 2 was read past its end (garbage gradient of batch element 1)
    out = assert_ran(run_python(_STATS_PRE + f"g = {grad}\nraises(lambda: ops.{op})"))
    assert out.startswith("ValueError") and "grad must be (B, C, 4) = (2, 3, 4)" in out, out


@pytest.mark.parametrize("op", ["softmax_stats_backward", "soft_stats_backward"])
def test_stats_backward_grad_dtype_and_strides(op):
    z = torch.rand(2, 3, 4, 4)
    other = torch.randint(0, 3, (2, 4, 4)) if op == "softmax_stats_backward" else torch.rand(2, 3, 4, 4)
    extra = () if op == "softmax_stats_backward" else (False,)
    fn = getattr(ops, op)
    with pytest.raises(TypeError, match="grad must have the sums' dtype Float, got Double"):
        fn(torch.ones(2, 3, 4, dtype=torch.float64), z, other, None, *extra)
    with pytest.raises(TypeError, match="grad must have the sums' dtype Double, got Float"):
        fn(torch.ones(2, 3, 4), z.double(), other, None, *extra)
    # any strides are fine: the launchers read a contiguous copy
    g = torch.randn(4, 3, 2).permute(2, 1, 0)
    assert not g.is_contiguous()
    torch.testing.assert_close(fn(g, z, other, None, *extra), fn(g.contiguous(), z, other, None, *extra),
                               rtol=0, atol=0)
    # the gradient of the sums w.r.t. the logits, as autograd through the PyTorch reference of the same sums
    from medfast.ops._loss import _stats_reference

    zz = z.double().requires_grad_()
    if op == "softmax_stats_backward":
        ref = torch.autograd.grad(_stats_reference(zz, other, None, "labels"), zz, g.double())[0]
    else:
        ref = torch.autograd.grad(_stats_reference(zz, other, None, "softmax"), zz, g.double())[0]
    torch.testing.assert_close(fn(g, z, other, None, *extra).double(), ref, rtol=1e-5, atol=1e-6)


def test_other_backward_ops_refuse_a_non_floating_grad():
    stats = torch.rand(2, 3, 4)
    scalars = [1.0, 1e-5, 1e-5, 1.0, 1.0]
    with pytest.raises(TypeError, match="grad must be floating"):
        ops.loss_finalize_backward(torch.ones((), dtype=torch.int64), stats, None, None, scalars, 1)
    props = torch.rand(1, 4, 5, 6, 5) + 0.5
    coords = torch.rand(1, 3, 7, 3) * 3
    noise = torch.rand(64, 4)
    with pytest.raises(TypeError, match="grad must be floating"):
        ops.ussim_march_backward(torch.ones(1, 3, 7, 3, dtype=torch.int32), props, coords, noise, G, 0.05, BG, 3,
                                 [1.0] * 3, True, True)
    start, step, weights = torch.rand(1, 2, 2, 3) + 1, torch.full((1, 2, 3), 0.3), torch.rand(2, 5, 3)
    with pytest.raises(TypeError, match="grad must be floating"):
        ops.ussim_march_lines_backward(torch.ones(1, 2, 3, 5, dtype=torch.int64), props, start, step, weights, noise,
                                       G, 0.05, BG, 3, [1.0] * 3, True, True)


def test_lncc_and_warp_backward_check_their_grad():
    # (these checks predate this file: the audit of every backward op's grad argument, kept)
    p, t = torch.rand(1, 1, 5, 6), torch.rand(1, 1, 5, 6)
    _, sums = ops.lncc(p, t, [3, 3], 0.0, 1e-5)
    with pytest.raises(ValueError, match="grad must have pred's shape"):
        ops.lncc_backward(torch.ones(1, 1, 5, 5), p, t, sums, [3, 3], 0.0, 1e-5)
    ddf = torch.zeros(1, 2, 5, 6)
    with pytest.raises(ValueError, match="grad has shape"):
        ops.warp_backward(torch.ones(1, 1, 5), p, None, ddf, [5, 6], "linear", "zeros", True, True)


# ---------------------------------------------------------------------------------------------
# Empty axes: empty outputs of the right shape (an integer division by a zero size was SIGFPE)
# ---------------------------------------------------------------------------------------------

_EMPTY_CASES = {
    "lncc 2d": ("ops.lncc(r(1, 1, 6, 0), r(1, 1, 6, 0), [3, 3], 0.0, 1e-5)", [(1, 1, 6, 0), (5, 1, 1, 6, 0)]),
    "lncc 3d": ("ops.lncc(r(1, 1, 4, 6, 0), r(1, 1, 4, 6, 0), [3, 3, 3], 0.0, 1e-5)",
                [(1, 1, 4, 6, 0), (5, 1, 1, 4, 6, 0)]),
    "lncc first axis": ("ops.lncc(r(1, 1, 0, 6), r(1, 1, 0, 6), [3, 3], 0.0, 1e-5)", [(1, 1, 0, 6), (5, 1, 1, 0, 6)]),
    "lncc_backward": ("ops.lncc_backward(r(1, 1, 4, 0), r(1, 1, 4, 0), r(1, 1, 4, 0), r(5, 1, 1, 4, 0), [3, 3], 0.0, "
                      "1e-5)", [(1, 1, 4, 0), (1, 1, 4, 0)]),
    "ussim_psf": ("ops.ussim_psf(r(1, 4, 3, 0), r(3, 5), r(3, 3, 0), False)", [(1, 2, 4, 0)]),
    "ussim_psf transpose": ("ops.ussim_psf(r(1, 2, 4, 0), r(3, 5), r(3, 3, 0), True)", [(1, 4, 3, 0)]),
}


@pytest.mark.parametrize("case", list(_EMPTY_CASES))
def test_empty_axis_gives_empty_outputs(case):
    code, shapes = _EMPTY_CASES[case]
    out = assert_ran(run_python(f"""
        import torch, medfast
        ops = torch.ops.medfast; r = torch.rand
        out = {code}
        out = out if isinstance(out, tuple) else (out,)
        print([tuple(o.shape) for o in out])
    """))
    assert out.strip() == str(shapes)


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True, dynamic=True) and torch.export with dynamic sizes
# ---------------------------------------------------------------------------------------------

_A = torch.eye(4, dtype=torch.float64)
_COMPILED = {
    "lncc_loss": lambda a, b: mf.lncc_loss(a, b, kernel_size=3),
    "local_ncc": lambda a, b: mf.local_ncc(a, b, kernel_size=3, smooth_nr=1e-6),
    "affine_warp": lambda a, b: mf.affine_warp(a, torch.eye(3, 4)[None].expand(a.shape[0], 3, 4) * 0.9),
    "resample": lambda a, b: mf.resample(a, _A, _A * 1.1, a.shape[2:]),
}


@pytest.mark.parametrize("name", list(_COMPILED))
def test_fullgraph_dynamic_compile_matches_eager(name):
    # lncc: math.isfinite of a symbolic float; affine_warp / resample: __index__ of a symbolic size
    fn = _COMPILED[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="eager", fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(0)
    for shape in [(2, 1, 6, 7, 8), (1, 1, 6, 7, 10)]:
        a, b = torch.rand(shape, generator=g), torch.rand(shape, generator=g)
        torch.testing.assert_close(compiled(a, b), fn(a, b), rtol=0, atol=0)


def test_affine_warp_automatic_dynamic_second_shape():
    # default torch.compile: the second spatial size recompiles with a symbolic one (was a fullgraph failure)
    fn = _COMPILED["affine_warp"]
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    for shape in [(1, 1, 6, 7, 8), (1, 1, 6, 7, 10), (1, 1, 6, 7, 11)]:
        a = torch.rand(shape)
        torch.testing.assert_close(compiled(a, a), fn(a, a), rtol=0, atol=0)


def test_export_affine_warp_with_a_dynamic_spatial_size():
    class AffineWarp(torch.nn.Module):
        def forward(self, img, theta):
            return mf.affine_warp(img, theta)  # output shape: the image's

    S = torch.export.Dim("S", min=4, max=64)
    theta = torch.eye(3, 4)[None] + 0.03
    ep = torch.export.export(AffineWarp(), (torch.rand(1, 1, 6, 7, 8), theta), dynamic_shapes=({4: S}, None))
    img = torch.rand(1, 1, 6, 7, 13)
    out = ep.module()(img, theta)
    assert out.shape == img.shape
    torch.testing.assert_close(out, mf.affine_warp(img, theta), rtol=0, atol=0)


def _weighted_dice_ce(z, y):
    return mf.dice_ce_loss(z, y, class_weight=[1.0, 2.0, 0.5])


def test_constant_class_weight_list_compiles_and_exports():
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(2, 3, 6, 7, 8, generator=g), torch.randint(0, 3, (2, 6, 7, 8), generator=g)
    # reference: PyTorch's cross-entropy with the same weights plus the Dice term of the unweighted call's
    # definition (medfast's own eager value is checked against MONAI elsewhere)
    eager = _weighted_dice_ce(z, y)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(_weighted_dice_ce, backend="eager", fullgraph=True, dynamic=True)(z, y),
                               eager, rtol=0, atol=0)

    class M(torch.nn.Module):
        def forward(self, z, y):
            return _weighted_dice_ce(z, y)

    ep = torch.export.export(M(), (z, y))
    torch.testing.assert_close(ep.module()(z, y), eager, rtol=0, atol=0)
    ce = torch.nn.functional.cross_entropy(z, y, weight=torch.tensor([1.0, 2.0, 0.5]))
    p = z.softmax(1)
    oh = torch.nn.functional.one_hot(y, 3).permute(0, 4, 1, 2, 3).float()
    dice = 1 - (2 * (p * oh).sum((2, 3, 4)) + 1e-5) / (p.sum((2, 3, 4)) + oh.sum((2, 3, 4)) + 1e-5)
    torch.testing.assert_close(eager, (dice * torch.tensor([1.0, 2.0, 0.5])).mean() + ce, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [[1.0, -1.0, 1.0], [1.0, float("nan"), 1.0], [1.0, float("inf"), 1.0],
                                 [1.0, 1e39, 1.0]])
def test_class_weight_list_values_still_checked(bad):
    z, y = torch.randn(1, 3, 4, 4), torch.randint(0, 3, (1, 4, 4))
    with pytest.raises(ValueError, match="class_weight must be non-negative and finite"):
        mf.dice_loss(z, y, class_weight=bad)  # (1e39 is inf in the float32 loss)


def test_class_weight_list_length_and_number_types():
    z, y = torch.randn(1, 3, 4, 4), torch.randint(0, 3, (1, 4, 4))
    with pytest.raises(ValueError, match="class_weight must have C = 3 entries, got 2"):
        mf.dice_ce_loss(z, y, class_weight=[1.0, 2.0])
    # NumPy scalars are numbers too; a float64 loss keeps 1e39
    a = mf.dice_ce_loss(z, y, class_weight=[np.float32(1.0), np.int64(2), 0.5])
    torch.testing.assert_close(a, mf.dice_ce_loss(z, y, class_weight=torch.tensor([1.0, 2.0, 0.5])))
    assert torch.isfinite(mf.dice_loss(z.double(), y, class_weight=[1.0, 1e39, 1.0]))


# ---------------------------------------------------------------------------------------------
# The ussim_* ops after `import medfast` alone: fake kernels and autograd registered
# ---------------------------------------------------------------------------------------------


def test_ussim_registrations_come_with_import_medfast():
    out = assert_ran(run_python("""
        import sys, torch, medfast
        from torch._subclasses.fake_tensor import FakeTensorMode
        assert "medfast.ultrasound" not in sys.modules
        ops = torch.ops.medfast
        G = [0.7, 0.1, 0.0, 0.05, 0.0, 0.8, 0.2, 0.1, 0.1, 0.0, 0.9, 0.3]
        x, h, w = torch.rand(1, 4, 3, 8), torch.rand(3, 5), torch.rand(3, 3, 8)
        with FakeTensorMode() as m:
            print(tuple(ops.ussim_psf(m.from_tensor(x), m.from_tensor(h), m.from_tensor(w), False).shape))
        f = torch.compile(lambda x: ops.ussim_psf(x, h, w, False), fullgraph=True, backend="aot_eager")
        print(torch.equal(f(x), ops.ussim_psf(x, h, w, False)))
        props = (torch.rand(1, 4, 5, 6, 5) + 0.5).requires_grad_()
        coords = (torch.rand(1, 3, 7, 3) * 3).requires_grad_()
        ops.ussim_march(props, coords, torch.rand(64, 4), G, 0.05, [1.5, 0, 0, 0, 0], 3, [1.0] * 3).sum().backward()
        print(props.grad is not None and coords.grad is not None and bool(props.grad.abs().sum() > 0))
        assert "medfast.ultrasound" not in sys.modules
    """))
    assert out.split() == ["(1,", "2,", "4,", "8)", "True", "True"]


def _lines_inputs():
    g = torch.Generator().manual_seed(2)
    props = torch.stack([1.3 + 0.5 * torch.rand(2, 4, 4, 5, generator=g, dtype=torch.float64)] +
                        [torch.rand(2, 4, 4, 5, generator=g, dtype=torch.float64) for _ in range(4)], -1)
    start = torch.rand(2, 2, 2, 3, generator=g, dtype=torch.float64) * 2.0 + 0.5
    step = torch.tensor([0.31, 0.27, 0.2], dtype=torch.float64).expand(2, 2, 3).clone()
    weights = torch.rand(2, 6, 3, generator=g, dtype=torch.float64)
    return props, start, step, weights, torch.rand(64, 4, generator=g)


def test_direct_march_lines_call_is_differentiated():
    # the op itself has autograd now (it was only wrapped by an autograd.Function: a direct call gave no gradient)
    props, start, step, weights, noise = _lines_inputs()
    args = (noise, G, 0.05, BG, 3, [1.5, 1.5, 1.5], None)
    torch.autograd.gradcheck(lambda p, s0, st: ops.ussim_march_lines(p, s0, st, weights, *args),
                             (props.requires_grad_(), start.requires_grad_(), step.requires_grad_()))


def test_direct_psf_call_is_differentiated_twice():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 5, 3, 9, generator=g, dtype=torch.float64, requires_grad=True)
    h, w = torch.rand(3, 3, generator=g, dtype=torch.float64), torch.rand(3, 3, 9, generator=g, dtype=torch.float64)
    torch.autograd.gradcheck(lambda x: ops.ussim_psf(x, h, w, False), (x,))
    torch.autograd.gradgradcheck(lambda x: ops.ussim_psf(x, h, w, False), (x,))
    y = torch.rand(2, 2, 5, 9, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda y: ops.ussim_psf(y, h, w, True), (y,))
    # the adjoint: <psf(x), y> = <x, psf^T(y)>
    lhs = (ops.ussim_psf(x, h, w, False) * y).sum()
    rhs = (x * ops.ussim_psf(y, h, w, True)).sum()
    torch.testing.assert_close(lhs, rhs)


# ---------------------------------------------------------------------------------------------
# Fake / meta kernels: tensors of one call on one device
# ---------------------------------------------------------------------------------------------


def _mixed_calls(meta):
    """One call of each op with one argument moved by ``meta`` (to the meta device)."""
    r = torch.rand
    p, t = r(1, 1, 8, 8), r(1, 1, 8, 8)
    z, y, st = r(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4)), r(2, 3, 4)
    props, coords, noise = r(1, 4, 5, 6, 5) + 0.5, r(1, 3, 7, 3) * 3, r(64, 4)
    start, step, weights = r(1, 2, 2, 3) + 1, torch.full((1, 2, 3), 0.3), r(2, 5, 3)
    sc = [1.0, 1e-5, 1e-5, 1.0, 1.0]
    return {
        "lncc": (lambda: ops.lncc(p, meta(t), [3, 3], 0.0, 1e-5), "target"),
        "warp_forward": (lambda: ops.warp_forward(p, None, meta(r(1, 2, 8, 8)), [8, 8], "linear", "zeros"), "ddf"),
        "softmax_stats": (lambda: ops.softmax_stats(z, meta(y), None), "labels"),
        "soft_stats": (lambda: ops.soft_stats(z, meta(r(2, 3, 4, 4)), None, False), "target"),
        "loss_finalize": (lambda: ops.loss_finalize(st, meta(torch.ones(3)), None, sc, 1), "class_weight"),
        "ussim_march": (lambda: ops.ussim_march(props, meta(coords), noise, G, 0.05, BG, 3, [1.0] * 3), "coords"),
        "ussim_march_lines": (lambda: ops.ussim_march_lines(props, start, meta(step), weights, noise, G, 0.05, BG, 3,
                                                            [1.0] * 3), "step"),
        "ussim_psf": (lambda: ops.ussim_psf(r(1, 4, 3, 8), meta(r(3, 5)), r(3, 3, 8), False), "h"),
    }


@pytest.mark.parametrize("op", list(_mixed_calls(lambda t: t)))
def test_mixed_cpu_and_meta_call_raises(op):
    # the fake kernel is also the Meta kernel: it returned an uninitialized CPU tensor
    fn, name = _mixed_calls(lambda t: t.to("meta"))[op]
    with pytest.raises(ValueError, match=f"medfast::{op}: {name} is on meta but .* is on cpu"):
        fn()
    same, _ = _mixed_calls(lambda t: t)[op]
    same()  # the same call on one device runs


def test_one_device_meta_and_fake_calls_still_work():
    p, t = torch.rand(1, 1, 8, 8, device="meta"), torch.rand(1, 1, 8, 8, device="meta")
    out, sums = ops.lncc(p, t, [3, 3], 0.0, 1e-5)
    assert out.device.type == "meta" and sums.shape == (5, 1, 1, 8, 8)
    with FakeTensorMode() as m:
        fp, ft = m.from_tensor(torch.rand(1, 1, 8, 8)), m.from_tensor(torch.rand(1, 1, 8, 8))
        assert ops.lncc(fp, ft, [3, 3], 0.0, 1e-5)[0].shape == (1, 1, 8, 8)
        # each fake tensor reports the device it stands for: a fake CUDA tensor beside a fake CPU one is refused
        fake_cuda = m.from_tensor(torch.rand(1, 1, 8, 8, device="meta"))
        fake_cuda.fake_device = torch.device("cuda", 0)
        with pytest.raises(ValueError, match="medfast::lncc: target is on cuda:0 but pred is on cpu"):
            ops.lncc(fp, fake_cuda, [3, 3], 0.0, 1e-5)
