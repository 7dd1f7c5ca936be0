"""Ultrasound inputs found by a hunt with user data: label-table rows and HU knots that break the background rule
(Z > 0, attenuation and density >= 0), simulate_labels' dtype, the pose's last row getting a gradient, non-finite
float label maps and half-precision poses."""

import numpy as np
import pytest
import torch

from medfast.ultrasound import LabelTable, Probe, hu_to_properties, look_at, simulate, simulate_labels

GOOD = (1.63, 0.5, 1.0, 0.015, 0.004)
PROBE = Probe.preset("L11-5v", n_lines=8, n_samples=64, depth_mm=10.0, n_elements=32)
POSE = look_at((8.0, 8.0, 1.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)).float()


def _labels():
    lab = torch.zeros(1, 1, 16, 16, 16, dtype=torch.int64)
    lab[..., 8:] = 1
    return lab


# (name, row, what the message must say): Z <= 0 imaged like air, a negative attenuation was an exponential gain
BAD_ROWS = [("Z = 0", (0.0, 0.5, 1.0, 0.02, 0.005)), ("Z < 0", (-1.5, 0.5, 1.0, 0.02, 0.005)),
            ("alpha < 0", (1.7, -5.0, 1.0, 0.02, 0.005)), ("density < 0", (1.7, 0.5, -1.0, 0.02, 0.005))]


@pytest.mark.parametrize("name,row", BAD_ROWS)
def test_label_table_rows_follow_the_background_rule(name, row):
    with pytest.raises(ValueError, match="label 3: the impedance Z must be > 0 and the attenuation alpha"):
        LabelTable({0: GOOD, 3: row})
    values = torch.tensor([GOOD, GOOD, row, GOOD], dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"label 2: the impedance Z must be > 0 .*got \[" + f"{row[0]}"):
        LabelTable(values)
    # the same row as simulate's background was refused already
    with pytest.raises(ValueError, match="background impedance must be > 0"):
        simulate(torch.ones(1, 5, 16, 16, 16), np.eye(4), POSE, PROBE, background=row)


def test_label_table_boundary_rows_and_trainable_tables_still_work():
    # zero attenuation and density (water, an anechoic fluid) and any amplitudes are legal, as in background
    LabelTable({0: (1.48, 0.0, 0.0, 0.0, 0.0), 1: (1.6, 0.5, 1.0, -0.01, -0.002)})
    values = torch.tensor([GOOD, (6.0, 15.0, 1.0, 0.05, 0.012)], dtype=torch.float64, requires_grad=True)
    table = LabelTable(values)
    assert table.values is values and values.is_leaf  # the check read detached values: still the trainable leaf
    simulate_labels(_labels(), table, np.eye(4), POSE, PROBE).bmode.sum().backward()
    assert values.grad is not None and bool(torch.isfinite(values.grad).all()) and bool(values.grad[:, 0].ne(0).any())


@pytest.mark.parametrize("column,value", [(2, -5.0), (3, -1.0)])
def test_knots_refuse_negative_attenuation_and_density(column, value):
    knots = [[-1000.0, 1.63, 0.5, 1.0, 0.015, 0.004], [0.0, 1.5, 0.1, 0.5, 0.01, 0.002],
             [1000.0, 1.7, 0.5, 1.0, 0.02, 0.005]]
    knots[2][column] = value
    with pytest.raises(ValueError, match=r"alpha \(column 2\) and scatterer density \(column 3\) must be >= 0, "
                                         r"got negative ones in rows \[2\]"):
        hu_to_properties(torch.zeros(1, 1, 2, 2, 2), knots)
    # a trainable valid knot tensor keeps its gradient (checked on detached values)
    knots[2][column] = 0.0
    k = torch.tensor(knots, dtype=torch.float64, requires_grad=True)
    hu_to_properties(torch.full((1, 1, 2, 2, 2), 500.0, dtype=torch.float64), k).sum().backward()
    assert k.grad is not None and bool(k.grad[1:, 1:].ne(0).any())


def test_simulate_labels_follows_the_table_dtype():
    lab = _labels()
    rows = [GOOD, (6.0, 15.0, 1.0, 0.05, 0.012)]
    f64 = simulate_labels(lab, LabelTable(torch.tensor(rows, dtype=torch.float64)), np.eye(4), POSE, PROBE,
                          return_lines=True)
    assert f64.bmode.dtype == f64.lines_db.dtype == torch.float64 and f64.iq.dtype == torch.complex128
    f32 = simulate_labels(lab, LabelTable(dict(enumerate(rows))), np.eye(4), POSE, PROBE)  # float32 table
    assert f32.bmode.dtype == torch.float32
    forced = simulate_labels(lab, LabelTable(torch.tensor(rows, dtype=torch.float64)), np.eye(4), POSE, PROBE,
                             dtype=torch.float32)
    torch.testing.assert_close(forced.bmode, f32.bmode, rtol=0, atol=0)  # dtype=float32: the former default
    torch.testing.assert_close(f64.bmode.float(), f32.bmode, rtol=0, atol=2e-3)
    half = simulate_labels(lab, LabelTable(torch.tensor(rows, dtype=torch.float16)), np.eye(4), POSE, PROBE)
    assert half.bmode.dtype == torch.float32  # a half table in float32, as before
    with pytest.raises(TypeError, match="dtype must be torch.float32, torch.float64 or None .*float16"):
        simulate_labels(lab, LabelTable(dict(enumerate(rows))), np.eye(4), POSE, PROBE, dtype=torch.float16)


def _pose_scene():
    """A float64 CT-like property volume whose affine has a far origin (the old last-row gradient grew with it)."""
    gen = torch.Generator().manual_seed(3)
    props = torch.empty(1, 5, 6, 6, 8, dtype=torch.float64)
    props[:, 0] = 1.4 + 0.4 * torch.rand(6, 6, 8, generator=gen, dtype=torch.float64)
    props[:, 1] = 0.5 * torch.rand(6, 6, 8, generator=gen, dtype=torch.float64)
    props[:, 2] = 1.0
    props[:, 3] = torch.rand(6, 6, 8, generator=gen, dtype=torch.float64)
    props[:, 4] = 0.1
    affine = np.diag([1.0, 1.0, 0.5, 1.0])
    affine[:3, 3] = (-52.5, 47.5, 98.0)
    pose = look_at((-50.0, 50.0, 98.2), (0.1, 0.05, 1.0), (1.0, 0.0, 0.0))
    probe = Probe.preset("L11-5v", n_lines=4, n_samples=12, depth_mm=3.0, n_elements=8)
    return props, affine, pose, probe


def _run(props, affine, pose, probe):
    return simulate(props, affine, pose, probe, sub_rays=2, dynamic_range_db=400.0, tgc_db_cm_mhz=0.3,
                    interface_mm=10.0).lines_db


def test_the_pose_last_row_gets_no_gradient():
    props, affine, pose0, probe = _pose_scene()
    for pose in (pose0.clone().requires_grad_(True), pose0[None].clone().requires_grad_(True)):
        (_run(props, affine, pose, probe) * torch.linspace(0, 1, 12, dtype=torch.float64)).sum().backward()
        grad = pose.grad.reshape(-1, 4, 4)
        assert torch.equal(grad[:, 3], torch.zeros_like(grad[:, 3]))  # was non-zero (and origin dependent)
        assert bool(grad[:, :3].ne(0).any())
        # a gradient step on the translation keeps the pose affine: the next call accepts it
        step = pose.detach().clone().reshape(-1, 4, 4)
        step[:, :, 3] -= 1e-4 * grad[:, :, 3]
        _run(props, affine, step, probe)


def test_the_pose_top_rows_gradient_matches_finite_differences():
    # the other gradients are unchanged: the top 3 rows against float64 finite differences
    props, affine, pose, probe = _pose_scene()
    last = pose[3:].clone()

    def f(top):
        return _run(props, affine, torch.cat([top, last])[None], probe)

    assert torch.autograd.gradcheck(f, (pose[:3].clone().requires_grad_(True),), eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_poses_are_refused(dtype):
    with pytest.raises(TypeError, match=f"pose must be float32 or float64, got {dtype}"):
        simulate_labels(_labels(), LabelTable({0: GOOD, 1: GOOD}), np.eye(4), POSE.to(dtype), PROBE)


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")])
def test_non_finite_float_label_maps_are_refused_clearly(value):
    lab = _labels().float()
    lab[0, 0, 0, 0, 0] = value
    with pytest.raises(ValueError, match="labels must be finite"):  # inf read as -2**63 before
        LabelTable({0: GOOD, 1: GOOD}).properties(lab)


def test_a_huge_float_label_is_named_as_it_is():
    lab = _labels().double()
    lab[0, 0, 0, 0, 0] = 1e30
    want = r"labels must lie in \[0, 1\] .*got \[0, 1000000000000000019884624838656\]"  # int(1e30), exact
    with pytest.raises(ValueError, match=want) as err:
        LabelTable({0: GOOD, 1: GOOD}).properties(lab)
    assert "-9223372036854775808" not in str(err.value)
