"""The simulator as a layer in a user's code (a bug hunt): autocast, torch.func transforms, a differentiable
affine, and the validation of probes and arguments."""

import math

import numpy as np
import pytest
import torch

from medfast.ultrasound import Probe, look_at, simulate, simulate_ct


def _interface_scene():
    props = torch.tensor([1.6, 0.0, 0.0, 0.0, 0.0]).view(1, 5, 1, 1, 1).repeat(1, 1, 24, 24, 120)
    props[:, 0, :, :, 81:] = 3.0  # an interface at voxel k = 80.5, far from the origin in world space
    aff = np.eye(4)
    aff[:3, 3] = (-11.5, -11.5, 0.0)
    probe = Probe.preset("L11-5v", n_lines=8, n_samples=128, depth_mm=12.0, n_elements=32)
    pose = look_at((0.3, 0.2, 74.3), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)).float()
    return props, aff, pose, probe


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_does_not_change_the_frames(dtype):
    props, aff, pose, probe = _interface_scene()
    ref = simulate(props, aff, pose, probe, speckle=False, return_lines=True)
    with torch.autocast("cpu", dtype=dtype):  # (the pose matmul ran in bf16: the echo moved by 0.3 mm)
        out = simulate(props, aff, pose, probe, speckle=False, return_lines=True)
    assert out.bmode.dtype == torch.float32
    torch.testing.assert_close(out.bmode, ref.bmode, rtol=0, atol=0)
    torch.testing.assert_close(out.lines_db, ref.lines_db, rtol=0, atol=0)


def test_torch_func_transforms_are_refused_and_leave_no_trace():
    props, aff, pose, probe = _interface_scene()
    want = simulate(props, aff, pose, probe, seed=8).bmode
    batch = props.expand(2, -1, -1, -1, -1)
    for fn, arg, kw in ((lambda p: simulate(p[None], aff, pose, probe, seed=8).bmode[0], batch, {}),
                        (lambda q: simulate(props, aff, q, probe).bmode[0], torch.stack([pose, pose]), {}),
                        (lambda p: simulate(p[None], aff, pose, probe, seed=9).bmode[0], batch,
                         {"randomness": "different"})):
        with pytest.raises(NotImplementedError, match="does not run under torch.func transforms"):
            torch.func.vmap(fn, **kw)(arg)
    # a failed vmap used to leave a batched noise table in the cache: every later call failed
    torch.testing.assert_close(simulate(props, aff, pose, probe, seed=8).bmode, want, rtol=0, atol=0)
    simulate(props, aff, pose, probe, seed=9)


def test_an_affine_that_requires_grad_is_refused():
    props, aff, pose, probe = _interface_scene()
    a = torch.tensor(aff, requires_grad=True)
    with pytest.raises(ValueError, match="pass inv"):  # silently detached before
        simulate(props, a, pose, probe)


def test_probe_and_argument_validation():
    with pytest.raises(ValueError, match="less than 180 degrees"):
        Probe(kind="convex", fc_mhz=3.0, bandwidth=0.8, n_elements=128, pitch_mm=0.5, radius_mm=10.0)
    with pytest.raises(ValueError, match="positive, finite radius_mm"):
        Probe.preset("C5-2v", radius_mm=math.inf)
    with pytest.raises(ValueError, match="fov_deg must be a number"):
        Probe.preset("P4-2v", fov_deg="60")
    assert Probe.preset("P4-2v", fov_deg=np.float64(60.0)).sector_rad == pytest.approx(math.radians(60))
    with pytest.raises(ValueError, match="fov_deg is for convex and phased probes"):  # was silently ignored
        Probe.preset("L11-5v", fov_deg=60.0)
    assert Probe.preset("C5-2v", fov_deg=30.0).sector_rad == pytest.approx(math.radians(30))
    props, aff, pose, probe = _interface_scene()
    with pytest.raises(TypeError, match="affine must be a"):
        simulate(props, "eye", pose, probe)
    with pytest.raises(ValueError, match="dynamic_range_db must be a positive finite number, got True"):
        simulate(props, aff, pose, probe, dynamic_range_db=True)
    with pytest.raises(ValueError, match="background impedance must be > 0"):
        simulate(props, aff, pose, probe, background=(-1.5, 0, 0, 0, 0))
    with pytest.raises(TypeError, match="ct must be float32 or float64"):
        simulate_ct(torch.zeros(1, 1, 8, 8, 8, dtype=torch.float16), aff, pose, probe)
