"""The simulator and the tissue maps under every grad mode, torch's default dtype and forward-mode AD / torch.func
(a bug hunt): the simulator's caches of constants must not depend on the first call's mode, and the tissue maps'
no-autograd fast path must not catch dual or functorch-wrapped tensors."""

import importlib

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD

from medfast.ultrasound import HU_KNOTS, LabelTable, Probe, freehand_sweep, hu_to_properties, look_at, simulate
from tests.conftest import default_dtype

simulate_module = importlib.import_module("medfast.ultrasound.simulate")  # (the package's simulate is the function)

PROBE = Probe.preset("L11-5v", n_lines=24, n_samples=96, depth_mm=20.0)
AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])
MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "enable_grad": torch.enable_grad}


def _scene():
    props = torch.ones(1, 5, 24, 24, 24, dtype=torch.float32)
    props[:, 0] = 1.6
    props[:, 0, :, :, 12:] = 2.4  # an interface: the pose gradient is not zero
    props[:, 1], props[:, 3], props[:, 4] = 0.5, 0.02, 0.005
    pose = look_at((12.0, 12.0, 0.5), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)).float()[None]
    return props, pose


def _gradients(speckle):
    """d mean(bmode) / d pose and d props, each from its own call (they save different constants)."""
    props, pose = _scene()
    out = []
    for wrt in ("pose", "props"):
        pr = props.clone().requires_grad_(wrt == "props")
        po = pose.clone().requires_grad_(wrt == "pose")
        res = simulate(pr, AFFINE, po, PROBE, sub_rays=2, speckle=speckle, return_lines=True)
        (res.bmode.mean() + res.envelope.mean()).backward()
        out.append((po if wrt == "pose" else pr).grad)
    return out


def _frame(speckle):
    props, pose = _scene()
    return simulate(props, AFFINE, pose, PROBE, sub_rays=2, speckle=speckle).bmode


@pytest.mark.parametrize("speckle", [True, False])
@pytest.mark.parametrize("first", sorted(MODES))
def test_the_first_calls_grad_mode_does_not_stick_to_the_caches(first, speckle):
    # before: one call under torch.inference_mode (a validation pass) cached inference tensors (noise table, probe
    # tables, affine inverse), and every later differentiable call failed, "Inference tensors cannot be saved for
    # backward", until the process restarted
    simulate_module._clear_caches()
    want_grads, want = _gradients(speckle), _frame(speckle)  # caches built by a differentiable call
    simulate_module._clear_caches()
    props, pose = _scene()
    with MODES[first]():
        first_frame = simulate(props, AFFINE, pose, PROBE, sub_rays=2, speckle=speckle, return_lines=True).bmode
    torch.testing.assert_close(first_frame, want, rtol=0, atol=0)
    for got, ref in zip(_gradients(speckle), want_grads):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # and the other way round: constants cached by differentiable calls serve calls under inference_mode and no_grad,
    # inputs that require grad included, without recording a graph
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            res = simulate(props.clone().requires_grad_(), AFFINE, pose.clone().requires_grad_(), PROBE, sub_rays=2,
                           speckle=speckle, return_lines=True)
        assert not res.bmode.requires_grad and not res.lines_db.requires_grad and res.bmode.grad_fn is None
        assert res.bmode.is_inference() == (mode is torch.inference_mode)
        torch.testing.assert_close(res.bmode, want, rtol=0, atol=0)


def test_an_affine_tensor_reused_in_place_does_not_change_the_cached_one():
    # before: the cache of validated affines kept a float64 CPU affine tensor itself: after the caller wrote another
    # matrix into it, a later call with the first matrix got the second's scatter grid (other speckle)
    simulate_module._clear_caches()
    props, pose = _scene()
    m = torch.eye(4, dtype=torch.float64)
    want = simulate(props, m, pose, PROBE, sub_rays=1).bmode
    m[:3, 3] = 0.37  # reused for another volume's affine
    simulate(props, m, pose, PROBE, sub_rays=1)
    got = simulate(props, torch.eye(4, dtype=torch.float64), pose, PROBE, sub_rays=1).bmode
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _everything():
    """The package's outputs from fresh caches (so that the builders run under the current default dtype)."""
    simulate_module._clear_caches()
    props, pose = _scene()
    ct = torch.arange(-1100, 3300, 9, dtype=torch.int32)[: 8 * 8 * 6].view(1, 1, 8, 8, 6)
    labels = torch.arange(8 * 8 * 6).view(1, 1, 8, 8, 6) % 3
    table = LabelTable({0: (1.5, 0.1, 0.2, 0.01, 0.0), 2: (1.7, 0.5, 1.0, 0.02, 0.004)})
    start = look_at((0.0, 0.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0))
    out = {"hu int": hu_to_properties(ct), "hu float32": hu_to_properties(ct.float()),
           "labels": table.properties(labels), "labels float64": table.properties(labels, dtype=torch.float64),
           "sweep": freehand_sweep(start, (0.0, 0.0, 30.0), 5, seed=3), "grid": PROBE.scan_grid()[0]}
    for speckle in (True, False):
        res = simulate(props, AFFINE, pose, PROBE, sub_rays=2, speckle=speckle, return_lines=True)
        out[f"speckle={speckle}"] = res.bmode
        out[f"iq speckle={speckle}"] = res.iq
    return out


def test_a_float64_default_dtype_changes_nothing():
    # before: simulate(speckle=False) failed, "noise table must be float32", and the bad table stayed cached after
    # the default dtype was restored
    with default_dtype(torch.float64):
        got = _everything()
    want = _everything()
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


CT = torch.linspace(-1150.0, 3150.0, 2 * 4 * 5 * 6, dtype=torch.float64).view(2, 1, 4, 5, 6)
KNOTS = torch.tensor(HU_KNOTS, dtype=torch.float64)


def _reverse_jvp(fn, x, v):
    """J v from the reverse-mode Jacobian (PyTorch core autograd)."""
    jac = torch.autograd.functional.jacobian(fn, x)
    y = fn(x)
    return (jac.reshape(y.numel(), x.numel()) @ v.reshape(-1)).view_as(y)


@pytest.mark.parametrize("wrt", ["ct", "knots"])
def test_hu_to_properties_under_forward_mode_ad_and_torch_func(wrt):
    # before: dual and functorch-wrapped tensors report requires_grad=False, so the map took its no-autograd slab
    # path (out= and in-place ops): "Trying to use forward AD with add_out", "Batching rule not implemented"
    fn = (lambda c: hu_to_properties(c, KNOTS)) if wrt == "ct" else (lambda k: hu_to_properties(CT, k))
    x = CT if wrt == "ct" else KNOTS
    v = torch.randn_like(x)
    want_out, want_tangent = fn(x), _reverse_jvp(fn, x, v)
    out, tangent = torch.func.jvp(fn, (x,), (v,))
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(tangent, want_tangent)
    with fwAD.dual_level():
        dual = fwAD.unpack_dual(fn(fwAD.make_dual(x, v)))
    torch.testing.assert_close(dual.primal, want_out, rtol=0, atol=0)
    torch.testing.assert_close(dual.tangent, want_tangent)
    small = x[..., :2] if wrt == "ct" else x
    torch.testing.assert_close(torch.func.jacfwd(fn)(small), torch.func.jacrev(fn)(small))
    if wrt == "ct":  # (vmap over knots: their increasing-HU check reads them on the host)
        batch = torch.stack([x, x + 100 * v])
        torch.testing.assert_close(torch.func.vmap(fn)(batch), torch.stack([fn(b) for b in batch]), rtol=0, atol=0)


def test_label_table_under_forward_mode_ad():
    # no fast path there: checked, as hu_to_properties' was not
    labels = torch.arange(4 * 5 * 6).view(1, 1, 4, 5, 6) % 3
    values = torch.rand(3, 5, dtype=torch.float64)
    v = torch.randn_like(values)

    def fn(t):
        return LabelTable(t).properties(labels)

    out, tangent = torch.func.jvp(fn, (values,), (v,))
    torch.testing.assert_close(out, fn(values), rtol=0, atol=0)
    torch.testing.assert_close(tangent, _reverse_jvp(fn, values, v))
