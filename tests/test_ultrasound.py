"""Ultrasound simulation: op conventions, gradients and physics (speckle, attenuation, interfaces,
geometry, speckle decorrelation, parameter fitting)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medfast.ops._ussim import noise_table, ray_march
from medfast.ultrasound import (
    HU_KNOTS,
    LabelTable,
    Probe,
    freehand_sweep,
    hu_to_properties,
    look_at,
    simulate,
    simulate_ct,
    simulate_labels,
)
from medfast.ultrasound.io import INVESALIUS_CRANIUM, read_inv3
from tests.conftest import simd_and_generic

WATER_BG = (1.5, 0.0, 0.0, 0.0, 0.0)


def homogeneous(z=1.5, alpha=0.0, rho=1.0, mu=1.0, sd=0.0, dtype=torch.float32):
    """A 2x2x2 volume of one tissue filling (via a huge voxel size) all of the simulated region."""
    props = torch.tensor([z, alpha, rho, mu, sd], dtype=dtype).view(1, 5, 1, 1, 1).expand(1, 5, 2, 2, 2).clone()
    affine = np.diag([400.0, 400.0, 400.0, 1.0])
    affine[:3, 3] = -200.0
    return props, affine, (z, alpha, rho, mu, sd)


def small_linear(**kw):
    args = dict(n_lines=96, n_samples=512, depth_mm=30.0)
    args.update(kw)
    return Probe.preset("L11-5v", **args)


POSE0 = look_at((0.0, 0.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0))


# ---------------------------------------------------------------------------------------------
# Op conventions
# ---------------------------------------------------------------------------------------------


def _march_inputs(dtype=torch.float64, B=2, R=3, S=9, seed=0, shape=(4, 5, 6)):
    gen = torch.Generator().manual_seed(seed)
    props = torch.empty(1, *shape, 5, dtype=dtype)
    props[..., 0] = 1.2 + torch.rand(1, *shape, generator=gen, dtype=dtype)
    props[..., 1] = torch.rand(1, *shape, generator=gen, dtype=dtype)
    props[..., 2] = 0.2 + torch.rand(1, *shape, generator=gen, dtype=dtype)
    props[..., 3] = torch.rand(1, *shape, generator=gen, dtype=dtype)
    props[..., 4] = 0.3 * torch.rand(1, *shape, generator=gen, dtype=dtype)
    start = torch.tensor([0.3, 0.4, 0.2], dtype=dtype) + torch.rand(B, R, 1, 3, generator=gen, dtype=dtype)
    step = torch.tensor([0.31, 0.37, 0.43], dtype=dtype)
    coords = start + torch.arange(S, dtype=dtype)[:, None] * step
    G = [0.7, 0.1, 0.0, 0.05, 0.0, 0.8, 0.2, 0.1, 0.1, 0.0, 0.9, 0.3]
    return props, coords, noise_table(seed, rows=64), G


def test_ray_march_opcheck():
    props, coords, noise, G = _march_inputs(torch.float32)
    props.requires_grad_(True)
    coords.requires_grad_(True)
    torch.library.opcheck(torch.ops.medfast.ussim_march, (props, coords, noise, G, 0.05, [1.5, 0, 0, 0, 0], 3, 2.5))


def test_ray_march_gradcheck_float64():
    props, coords, noise, G = _march_inputs(torch.float64, B=1, R=2, S=7, shape=(3, 4, 4))
    props.requires_grad_(True)
    coords.requires_grad_(True)

    for sharp in (1.0, 1.7, (1.3, 1.0, 2.9)):  # one value for all axes, or one per voxel axis
        def f(p, c, sharp=sharp):
            return ray_march(p, c, noise, G, 0.08, [1.5, 0.1, 0.5, 0.3, 0.1], 1, sharp)

        assert torch.autograd.gradcheck(f, (props, coords), eps=1e-6, atol=1e-6)


def run_log_transmission_reference(Z: torch.Tensor) -> torch.Tensor:
    """log transmission of each step along the last axis of Z (docs/ultrasound.md): per monotone run of steps
    (one strict direction) with start impedance s, step i loses L(s, Z_i) - L(s, Z_{i-1}), L(a, b) = log(1 -
    ((b - a) / (b + a))^2), so a run loses the step from its start to its end; sample 0 loses nothing."""
    def L(a, b):
        return torch.log(1 - ((b - a) / (b + a)) ** 2)

    out = torch.zeros_like(Z)
    for idx in np.ndindex(*Z.shape[:-1]):
        z = Z[idx]
        direction, zs = 0, None
        for i in range(1, z.shape[0]):
            d = int(torch.sign(z[i] - z[i - 1]))
            if d != 0 and d == direction:
                out[idx + (i,)] = L(zs, z[i]) - L(zs, z[i - 1])
            else:
                zs = z[i - 1]
                out[idx + (i,)] = L(z[i - 1], z[i])
            direction = d
    return out


def test_ray_march_matches_reference():
    """The kernel against a direct torch re-implementation of the same formulas (speckle off)."""
    props, coords, _, G = _march_inputs(torch.float64, B=1, R=2, S=8)
    coords = coords[:, :, :1] + (coords - coords[:, :, :1]) * 0.5  # stay inside the volume
    table = torch.zeros(1, 4)
    table[0, 0] = 1.0
    out = ray_march(props, coords, table, G, 0.1, [1.5, 0, 0, 0, 0], 0)
    vol = props[0].permute(3, 0, 1, 2)[None]  # (1, 5, D, H, W)
    D, H, W = vol.shape[2:]
    c = coords[0]
    grid = torch.stack([c[..., 2] / (W - 1), c[..., 1] / (H - 1), c[..., 0] / (D - 1)], -1) * 2 - 1
    v = torch.nn.functional.grid_sample(vol, grid[None, :, :, None], align_corners=True)[0, :, :, :, 0]  # (5, R, S)
    Z = v[0]
    R = torch.zeros_like(Z)
    R[:, 1:] = (Z[:, 1:] - Z[:, :-1]) / (Z[:, 1:] + Z[:, :-1])
    u = run_log_transmission_reference(Z) - 0.1 * v[1]
    E = torch.exp(torch.cumsum(u, 1) - u)
    amp = v[2].sqrt() * v[3]
    torch.testing.assert_close(out[0, ..., 0], E * R)
    torch.testing.assert_close(out[0, ..., 1], E * amp)
    torch.testing.assert_close(out[0, ..., 2], torch.zeros_like(E))


def _sharpened_reference(props, coords, sharp):
    """Impedance and attenuation at the positions by sharpened trilinear interpolation, in torch: per voxel
    axis a, the fraction t becomes clamp((t - 1/2) k_a + 1/2, 0, 1) (docs/ultrasound.md); (2, B, R, S)."""
    vol = props[0]  # (D, H, W, 5), positions inside the volume
    f = coords.floor()
    z = ((coords - f - 0.5) * torch.tensor(sharp, dtype=coords.dtype) + 0.5).clamp(0, 1)
    i = f.long()
    out = 0
    for a in (0, 1):
        for b in (0, 1):
            for e in (0, 1):
                w = (z[..., 0] if a else 1 - z[..., 0]) * (z[..., 1] if b else 1 - z[..., 1]) * \
                    (z[..., 2] if e else 1 - z[..., 2])
                out = out + w[..., None] * vol[i[..., 0] + a, i[..., 1] + b, i[..., 2] + e, :2]
    return out.movedim(-1, 0)


def test_ray_march_per_axis_sharpness_matches_reference():
    # each voxel axis its own sharpness: the specular echo E * R from the reference interpolation
    props, coords, _, G = _march_inputs(torch.float64, B=1, R=3, S=9)
    coords = coords[:, :, :1] + (coords - coords[:, :, :1]) * 0.5  # stay inside the volume
    table = torch.zeros(1, 4)
    table[0, 0] = 1.0
    sharp = (1.0, 2.5, 4.0)
    out = ray_march(props, coords, table, G, 0.1, [1.5, 0, 0, 0, 0], 0, sharp)
    Z, alpha = _sharpened_reference(props, coords, sharp)[:, 0]
    R = torch.zeros_like(Z)
    R[:, 1:] = (Z[:, 1:] - Z[:, :-1]) / (Z[:, 1:] + Z[:, :-1])
    u = run_log_transmission_reference(Z) - 0.1 * alpha
    E = torch.exp(torch.cumsum(u, 1) - u)
    torch.testing.assert_close(out[0, ..., 0], E * R)
    # one value is the same sharpness on all three axes
    assert torch.equal(ray_march(props, coords, table, G, 0.1, [1.5, 0, 0, 0, 0], 0, 2.5),
                       ray_march(props, coords, table, G, 0.1, [1.5, 0, 0, 0, 0], 0, [2.5] * 3))
    for bad in ((1.0, 2.0), (1.0, 0.5, 2.0), (1.0, float("nan"), 2.0)):
        with pytest.raises(ValueError, match="sharp"):
            ray_march(props, coords, table, G, 0.1, [1.5, 0, 0, 0, 0], 0, bad)


def gradcheck_inputs(shape, seed):
    """Float64 ``(props, affine, pose)`` for the simulator's gradchecks: random tissue of ``shape`` voxels and an
    oblique pose, both requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    props = torch.empty(1, 5, *shape, dtype=torch.float64)
    props[:, 0] = 1.4 + 0.4 * torch.rand(*shape, generator=gen, dtype=torch.float64)
    props[:, 1] = 0.5 * torch.rand(*shape, generator=gen, dtype=torch.float64)
    props[:, 2] = 0.5 + torch.rand(*shape, generator=gen, dtype=torch.float64)
    props[:, 3] = torch.rand(*shape, generator=gen, dtype=torch.float64)
    props[:, 4] = 0.1
    affine = np.diag([2.0, 2.2, 1.1, 1.0])
    affine[:3, 3] = (-2.1, -2.3, -0.4)
    pose = look_at((0.13, 0.07, 0.2), (0.1, 0.05, 1.0), (1.0, 0.0, 0.0))[None].clone().requires_grad_(True)
    return props.requires_grad_(True), affine, pose


def test_simulate_gradcheck_props_and_pose():
    probe = Probe.preset("L11-5v", n_lines=4, n_samples=12, depth_mm=3.0, n_elements=8)  # 2.1 mm wide
    props, affine, pose = gradcheck_inputs((3, 3, 4), 1)

    def f(p, q):
        return simulate(p, affine, q, probe, sub_rays=2, dynamic_range_db=400.0, tgc_db_cm_mhz=0.3,
                        interface_mm=10.0, background=(1.5, 0.2, 1.0, 0.3, 0.05)).lines_db

    assert torch.autograd.gradcheck(f, (props, pose), eps=1e-6, atol=1e-5, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# Physics
# ---------------------------------------------------------------------------------------------


def test_fully_developed_speckle_statistics():
    props, affine, _ = homogeneous()
    probe = small_linear()
    envs, logs = [], []
    for seed in range(2):
        res = simulate(props, affine, POSE0, probe, seed=seed, tgc_db_cm_mhz=0.0, return_lines=True)
        env = res.envelope[0, 8:-8, 64:-32]  # away from the edges of the image
        envs.append(env.flatten())
        logs.append(20 * torch.log10(env).flatten())
    env = torch.cat(envs)
    snr = float(env.mean() / env.std())
    db_std = float(torch.cat(logs).std())
    print(f"speckle: envelope mean/std {snr:.3f} (Rayleigh 1.913), log std {db_std:.2f} dB (Rayleigh 5.57)")
    assert abs(snr - 1.91) <= 0.05
    assert abs(db_std - 5.57) <= 0.3


def test_attenuation_slope():
    alpha = 0.5
    props, affine, _ = homogeneous(alpha=alpha, z=1.5)
    probe = small_linear(n_samples=768, depth_mm=40.0)
    slopes = []
    lines = []
    for seed in range(2):
        res = simulate(props, affine, POSE0, probe, seed=seed, tgc_db_cm_mhz=0.0, return_lines=True)
        lines.append(res.envelope[0, 8:-8].square().mean(0))  # mean intensity per depth
    intensity = torch.stack(lines).mean(0)
    z_cm = probe.depths() / 10
    keep = slice(60, -30)
    db = 10 * torch.log10(intensity[keep].double())
    A = torch.stack([z_cm[keep], torch.ones_like(z_cm[keep])], 1)
    slope = float(torch.linalg.lstsq(A, db[:, None]).solution[0])
    slopes.append(slope)
    expected = -2 * alpha * probe.fc_mhz
    print(f"attenuation: slope {slope:.3f} dB/cm, expected {expected:.3f} dB/cm")
    assert abs(slope - expected) <= 0.03 * abs(expected)


def _layered(z1, z2, depth_of_interface, spacing=0.02, mu=0.005):
    """Two half-spaces (z < interface: Z1, z >= interface: Z2) sampled on a grid aligned with the
    probe samples; the probe looks along +z from z = 0."""
    n = int(round(20.0 / spacing))
    props = torch.zeros(1, 5, 3, 3, n)
    z = torch.arange(n) * spacing
    props[:, 0] = torch.where(z < depth_of_interface, z1, z2)
    props[:, 2] = 1.0
    props[:, 3] = mu
    affine = np.array([[200.0, 0, 0, -200], [0, 200.0, 0, -200], [0, 0, spacing, 0], [0, 0, 0, 1]])
    return props, affine


def test_planar_interface_reflection_and_transmission():
    z1, z2 = 1.5, 2.5
    probe = Probe.preset("L11-5v", n_lines=64, n_samples=1001, depth_mm=20.0)  # dz = 0.02 mm
    props, affine = _layered(z1, z2, 10.0)
    above = below = 0.0
    peaks = []
    for seed in range(3):
        res = simulate(props, affine, POSE0, probe, tgc_db_cm_mhz=0.0, return_lines=True, seed=seed)
        env = res.envelope[0, 8:-8]
        peaks.append(env[:, 480:520].max(1).values.median())
        above += float(env[:, 150:420].square().mean())
        below += float(env[:, 580:850].square().mean())
    expected_r = abs(z2 - z1) / (z2 + z1)
    peak = float(torch.stack(peaks).median())
    print(f"interface: echo {peak:.4f}, |Z2-Z1|/(Z2+Z1) = {expected_r:.4f}")
    assert abs(peak - expected_r) <= 0.05 * expected_r
    ratio, expected_t = math.sqrt(below / above), 1 - expected_r**2
    print(f"interface: level below / above {ratio:.4f}, transmission 1-R^2 = {expected_t:.4f}")
    assert abs(ratio - expected_t) <= 0.03 * expected_t


def _target_volume(world_pos, spacing=0.1, half=6.0):
    n = int(round(2 * half / spacing)) + 1
    props = torch.zeros(1, 5, n, n, n)
    props[:, 0] = 1.5
    ax = torch.arange(n) * spacing - half
    g = torch.meshgrid(ax, ax, ax, indexing="ij")
    r2 = sum(c**2 for c in g)
    props[:, 2] = 1.0
    props[:, 3] = torch.exp(-r2 / (2 * 0.12**2))
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = np.asarray(world_pos) - half
    return props, affine


@pytest.mark.parametrize("kind", ["linear", "convex"])
def test_geometry_point_target_pixel(kind):
    gen = torch.Generator().manual_seed(7 if kind == "linear" else 8)
    target = np.array([12.0, -7.0, 30.0])
    if kind == "linear":
        probe = Probe.preset("L11-5v", n_lines=192, n_samples=800, depth_mm=30.0)
        x_p, z_p = 6.3, 17.4  # where the target should appear in the probe frame
    else:
        probe = Probe.preset("C5-2v", n_lines=256, n_samples=800, depth_mm=50.0, fov_deg=30.0)
        x_p, z_p = -9.1, 33.3
    # Arbitrary pose such that the target lies at probe-frame (x_p, 0, z_p).
    angles = (torch.rand(3, generator=gen, dtype=torch.float64) - 0.5) * 1.5
    pose = look_at((0, 0, 0), (math.sin(angles[0]), math.sin(angles[1]), 1.0), (1.0, math.sin(angles[2]), 0.2))
    offset = pose[:3, :3] @ torch.tensor([x_p, 0.0, z_p], dtype=torch.float64)
    pose[:3, 3] = torch.as_tensor(target) - offset
    props, affine = _target_volume(target)
    res = simulate(props, affine, pose, probe, speckle=False, tgc_db_cm_mhz=0.0, pixel_mm=0.1,
                   dynamic_range_db=40.0, gain_db=0.0)
    img = res.bmode[0, 0].double()
    mask = img > img.max() - 0.15  # within 6 dB of the peak
    rows, cols = torch.nonzero(mask, as_tuple=True)
    w = img[rows, cols] - (img.max() - 0.15)
    r_c = float((rows * w).sum() / w.sum())
    c_c = float((cols * w).sum() / w.sum())
    r_e, c_e = probe.pixel_of(x_p, z_p, pixel_mm=0.1)
    print(f"{kind}: target at pixel ({r_c:.2f}, {c_c:.2f}), expected ({r_e:.2f}, {c_e:.2f})")
    assert abs(r_c - r_e) <= 0.5 and abs(c_c - c_e) <= 0.5


def test_speckle_world_anchored_and_decorrelates():
    props, affine, _ = homogeneous()
    probe = small_linear()

    def frame(dx):
        pose = POSE0.clone()
        pose[0, 3] = dx
        return simulate(props, affine, pose, probe, tgc_db_cm_mhz=0.0, return_lines=True).envelope[0]

    ref = frame(0.0)
    spacing = probe.width_mm / (probe.n_lines - 1)

    def corr(dx):
        # Compare the same world region: shift the lines by a whole number of line spacings.
        k = int(round(dx / spacing))
        moved = frame(dx)
        a = ref[20 + k:76 + k, 64:-32].flatten()
        b = moved[20:76, 64:-32].flatten()
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm()))

    same_place = corr(3 * spacing)  # the probe moved by 3 lines: the same world speckle
    lateral_res = float(probe.lateral_fwhm_mm(torch.tensor(15.0)))
    sub = frame(0.1 * lateral_res)
    a, b = ref[20:76, 64:-32].flatten(), sub[20:76, 64:-32].flatten()
    a, b = a - a.mean(), b - b.mean()
    sub_corr = float((a * b).sum() / (a.norm() * b.norm()))
    far = frame(5 * lateral_res + 0.5 * spacing)
    b = far[20:76, 64:-32].flatten()
    b = b - b.mean()
    far_corr = float((a * b).sum() / (a.norm() * b.norm()))
    print(f"speckle correlation: same world place {same_place:.3f}, shift 0.1 res {sub_corr:.3f}, "
          f"shift 5 res {far_corr:.3f}")
    assert same_place > 0.95
    assert sub_corr > 0.8
    assert abs(far_corr) < 0.2


def test_fit_attenuation_by_gradient_descent():
    true_alpha = 0.7
    probe = small_linear(n_lines=32, n_samples=256, depth_mm=30.0)
    props, affine, _ = homogeneous(alpha=true_alpha)
    target = simulate(props, affine, POSE0, probe, tgc_db_cm_mhz=0.0).lines_db.detach()
    alpha = torch.tensor(0.3, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=0.05)
    for _ in range(60):
        p = torch.cat([props[:, :1], alpha.expand(1, 1, 2, 2, 2), props[:, 2:]], 1)
        loss = (simulate(p, affine, POSE0, probe, tgc_db_cm_mhz=0.0).lines_db - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"fitted alpha {float(alpha.detach()):.4f} (true {true_alpha})")
    assert abs(float(alpha.detach()) - true_alpha) < 0.02


def test_fit_label_table_impedance():
    """Gradient descent on a label-table impedance recovers it from the interface echo."""
    probe = Probe.preset("L11-5v", n_lines=16, n_samples=400, depth_mm=8.0)
    labels = torch.zeros(1, 1, 3, 3, 400, dtype=torch.long)
    labels[..., 200:] = 1
    affine = np.array([[50.0, 0, 0, -50], [0, 50.0, 0, -50], [0, 0, 0.02, 0], [0, 0, 0, 1]])
    truth = torch.tensor([[1.5, 0.3, 1.0, 0.02, 0.0], [2.2, 0.3, 1.0, 0.02, 0.0]])
    def envelope(table):
        return simulate_labels(labels, LabelTable(table), affine, POSE0, probe, speckle=False,
                               return_lines=True).envelope

    target = envelope(truth).detach()
    z2 = torch.tensor(1.8, requires_grad=True)
    opt = torch.optim.Adam([z2], lr=0.05)
    for _ in range(60):
        table = torch.cat([truth[:1], torch.cat([z2.view(1, 1), truth[1:, 1:]], 1)], 0)
        loss = (envelope(table) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"fitted Z2 {float(z2.detach()):.4f} (true 2.2)")
    assert abs(float(z2.detach()) - 2.2) < 0.02


# ---------------------------------------------------------------------------------------------
# API: tissue inputs, sweeps, validation
# ---------------------------------------------------------------------------------------------


def test_presets_are_pymusts():
    pymust = pytest.importorskip("pymust")
    for name in ("L11-5v", "C5-2v"):
        p, ref = Probe.preset(name), pymust.getparam(name)
        assert p.fc_mhz == pytest.approx(ref["fc"] / 1e6)
        assert p.bandwidth == pytest.approx(ref["bandwidth"] / 100)
        assert p.pitch_mm == pytest.approx(ref["pitch"] * 1e3)
        assert p.n_elements == ref["Nelements"]
        assert p.elevation_mm == pytest.approx(ref["height"] * 1e3)
        assert p.elevation_focus_mm == pytest.approx(ref["focus"] * 1e3)
        if math.isfinite(ref["radius"]):
            assert p.radius_mm == pytest.approx(ref["radius"] * 1e3)


def test_hu_map_is_piecewise_linear_and_differentiable():
    ct = torch.tensor([-1000.0, -50.0, 0.0, 40.0, 2000.0], dtype=torch.float64).view(1, 1, 1, 1, 5)
    ct.requires_grad_(True)
    props = hu_to_properties(ct)
    assert props.shape == (1, 5, 1, 1, 5)
    assert float(props[0, 0, 0, 0, 0]) == pytest.approx(0.0004)
    assert float(props[0, 0, 0, 0, 3]) == pytest.approx(1.63)
    assert float(props[0, 0, 0, 0, 1]) == pytest.approx((1.38 + 1.48) / 2)
    assert float(props[0, 3, 0, 0, 3]) == pytest.approx(0.015)
    assert torch.autograd.gradcheck(lambda c: hu_to_properties(c + 0.3), (ct,))


def test_ct_labels_and_raw_maps_agree():
    labels = torch.zeros(1, 1, 6, 6, 6, dtype=torch.long)
    labels[..., 3:] = 1
    table = LabelTable({0: (1.5, 0.3, 1.0, 0.2, 0.05), 1: (1.7, 0.6, 0.8, 0.4, 0.1)})
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = -8
    probe = Probe.preset("L11-5v", n_lines=16, n_samples=64, depth_mm=10.0)
    pose = look_at((0.0, 0.0, -4.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0))
    a = simulate_labels(labels, table, affine, pose, probe).bmode
    b = simulate(table.values[labels[:, 0]].permute(0, 4, 1, 2, 3), affine, pose, probe).bmode
    torch.testing.assert_close(a, b)
    ct = torch.full((1, 1, 4, 4, 4), 40.0)
    c = simulate_ct(ct, affine, pose, probe).bmode
    assert c.shape == a.shape and float(c.std()) > 0


def test_freehand_sweep_batched_equals_single_frames():
    probe = Probe.preset("C5-2v", n_lines=32, n_samples=128, depth_mm=30.0)
    ct = torch.zeros(1, 1, 12, 12, 12)
    ct[..., 6:, :, :] = 900.0
    ct[..., 3:5, 4:8, 4:8] = -80.0
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    start = look_at((24.0, 24.0, -5.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0))
    poses = freehand_sweep(start, (0.0, 10.0, 0.0), 5, seed=2)
    assert poses.shape == (5, 4, 4)
    R = poses[:, :3, :3]
    torch.testing.assert_close(R @ R.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(5, 3, 3))
    steps = (poses[1:, :3, 3] - poses[:-1, :3, 3]).norm(dim=1)
    assert float(steps.max()) < 5.0  # smooth: no jumps
    batched = simulate_ct(ct, affine, poses.float(), probe).bmode
    for i in (0, 3):
        single = simulate_ct(ct, affine, poses[i:i + 1].float(), probe).bmode
        torch.testing.assert_close(batched[i:i + 1], single, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    props, affine, _ = homogeneous()
    probe = small_linear(n_lines=8, n_samples=16)
    with pytest.raises(ValueError, match="pose must be"):
        simulate(props, affine, torch.eye(3), probe)
    with pytest.raises(TypeError, match="pose must be"):
        simulate(props, affine, np.eye(4), probe)
    with pytest.raises(ValueError, match="affine is required"):
        simulate(props, None, POSE0, probe)
    with pytest.raises(ValueError, match="not invertible"):
        simulate(props, np.zeros((4, 4)), POSE0, probe)
    with pytest.raises(ValueError, match="unknown probe"):
        simulate(props, affine, POSE0, "X9-9z")
    with pytest.raises(ValueError, match="n_lines"):
        Probe.preset("L11-5v", n_lines=0)
    with pytest.raises(ValueError, match="depth_mm"):
        Probe.preset("L11-5v", depth_mm=-1.0)
    with pytest.raises(ValueError, match="props must be"):
        simulate(props[:, :3], affine, POSE0, probe)
    with pytest.raises(ValueError, match="GiB"):
        simulate(props, affine, POSE0.expand(4, 4, 4), Probe.preset("L11-5v"), max_bytes=1 << 20)
    with pytest.raises(ValueError, match="labels must lie"):
        LabelTable({0: WATER_BG}).properties(torch.ones(1, 1, 2, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="props batch"):
        simulate(props.expand(3, -1, -1, -1, -1), affine, POSE0.expand(2, 4, 4), probe)


def test_probe_radius_must_be_a_number_for_every_kind():
    # unused by a linear or phased probe, it was stored as given ("x", True) without complaint
    for name in ("L11-5v", "P4-2v", "C5-2v"):
        for bad in ("x", None, True):
            with pytest.raises(ValueError, match="radius_mm must be a number"):
                Probe.preset(name, radius_mm=bad)
    with pytest.raises(ValueError, match="radius_mm must be a number, got 'x'"):
        Probe(kind="linear", fc_mhz=7.6, bandwidth=0.77, n_elements=128, pitch_mm=0.3, radius_mm="x")
    assert Probe.preset("L11-5v", radius_mm=np.float32(0)).radius_mm == 0.0  # numbers still pass, as floats
    assert Probe.preset("L11-5v", radius_mm=math.inf).radius_mm == math.inf  # pymust's radius of a flat array


# ---------------------------------------------------------------------------------------------
# Several volumes in one call (volume_index)
# ---------------------------------------------------------------------------------------------


def _three_volumes(dtype=torch.float64):
    """Three property volumes on one 1 mm grid (variants of one layered scene) and 4 poses."""
    g = torch.Generator().manual_seed(21)
    base = torch.zeros(1, 1, 12, 12, 12, dtype=dtype)
    base[..., 6:, :, :] = 600.0
    vols = []
    for k in range(3):
        knots = torch.tensor(HU_KNOTS, dtype=dtype).clone()
        knots[:, 2] *= 0.6 + 0.3 * k  # attenuation
        knots[1:, 1] += 0.05 * k  # impedance
        vols.append(hu_to_properties(base + 40.0 * torch.rand(base.shape, generator=g, dtype=dtype), knots))
    props = torch.cat(vols)
    poses = freehand_sweep(look_at((6.0, 6.0, -2.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)), (0, 3, 0), 4)
    return props.to(dtype), np.eye(4), poses.to(dtype)


def test_volume_index_equals_one_volume_per_frame():
    props, affine, poses = _three_volumes()
    probe = small_linear(n_lines=16, n_samples=96, depth_mm=14.0)
    index = [2, 0, 2, 1]
    p1 = props.clone().requires_grad_(True)
    a = simulate(p1, affine, poses, probe, volume_index=index, seed=3)
    # the reference: each frame's volume copied into a per-frame batch
    p2 = props.clone().requires_grad_(True)
    b = simulate(p2[index], affine, poses, probe, seed=3)
    torch.testing.assert_close(a.bmode, b.bmode, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.lines_db, b.lines_db, rtol=0, atol=1e-10)
    w = torch.randn(a.lines_db.shape, generator=torch.Generator().manual_seed(0), dtype=props.dtype)
    (a.lines_db * w).sum().backward()
    (b.lines_db * w).sum().backward()
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-9, atol=1e-12)
    assert float(p1.grad[1].abs().sum()) > 0 and float(p1.grad[2].abs().sum()) > 0  # every used volume
    # a tensor index (CPU or not), and volumes that no pose uses get a zero gradient
    p3 = props.clone().requires_grad_(True)
    c = simulate(p3, affine, poses[[0, 2]], probe, volume_index=torch.tensor([2, 2]), seed=3)
    torch.testing.assert_close(c.bmode, a.bmode[[0, 2]], rtol=0, atol=1e-12)
    c.lines_db.sum().backward()
    assert float(p3.grad[:2].abs().max()) == 0.0 and float(p3.grad[2].abs().max()) > 0


def test_volume_index_float32_simd_matches_generic():
    props, affine, poses = _three_volumes(torch.float32)
    probe = small_linear(n_lines=16, n_samples=96, depth_mm=14.0)
    with torch.no_grad():
        fast, slow = simd_and_generic(lambda: simulate(props, affine, poses, probe, volume_index=[1, 0, 2, 1]).bmode)
        ref = simulate(props[[1, 0, 2, 1]], affine, poses, probe).bmode
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(slow, fast, rtol=0, atol=2e-4)


def test_march_lines_volume_index_gradcheck_and_opcheck():
    from medfast.ops._ussim import march_lines

    g = torch.Generator().manual_seed(2)
    props = torch.stack([1.3 + 0.5 * torch.rand(3, 4, 4, 5, generator=g, dtype=torch.float64)] +
                        [torch.rand(3, 4, 4, 5, generator=g, dtype=torch.float64) for _ in range(4)], -1)
    start = torch.rand(2, 2, 2, 3, generator=g, dtype=torch.float64) * 2.0 + 0.5
    step = torch.tensor([0.31, 0.27, 0.2], dtype=torch.float64).expand(2, 2, 3).clone()
    weights = torch.rand(2, 7, 3, generator=g, dtype=torch.float64)
    noise = noise_table(1, rows=64)
    G = [0.7, 0.1, 0.0, 0.05, 0.0, 0.8, 0.2, 0.1, 0.1, 0.0, 0.9, 0.3]
    index = torch.tensor([2, 0])
    args = (noise, G, 0.05, list(WATER_BG), 3, 1.5, index)
    torch.library.opcheck(torch.ops.medfast.ussim_march_lines, (props, start, step, weights) + args)
    torch.autograd.gradcheck(lambda p, s0: march_lines(p, s0, step, weights, *args),
                             (props.clone().requires_grad_(True), start.clone().requires_grad_(True)))


def test_volume_index_bad_inputs():
    props, affine, poses = _three_volumes(torch.float32)
    probe = small_linear(n_lines=8, n_samples=32, depth_mm=14.0)
    with pytest.raises(ValueError, match=r"volume_index values must lie in \[0, 3\)"):
        simulate(props, affine, poses, probe, volume_index=[0, 1, 3, 0])
    with pytest.raises(ValueError, match="volume_index values"):
        simulate(props, affine, poses, probe, volume_index=torch.tensor([0, -1, 0, 0]))
    with pytest.raises(ValueError, match=r"volume_index must have shape \(4,\)"):
        simulate(props, affine, poses, probe, volume_index=[0, 1])
    with pytest.raises(TypeError, match="volume_index must"):
        simulate(props, affine, poses, probe, volume_index=[0.0, 1.0, 1.0, 0.0])
    with pytest.raises(TypeError, match="volume_index must"):
        simulate(props, affine, poses, probe, volume_index=torch.ones(4))
    with pytest.raises(ValueError, match="props batch"):  # 3 volumes, 4 poses, no index
        simulate(props, affine, poses, probe)
    # the op itself checks a CPU index (shape, dtype, range) before any kernel runs
    from medfast.ops._ussim import march_lines

    p = props.permute(0, 2, 3, 4, 1).contiguous()
    start, step, w = torch.zeros(2, 3, 1, 3), torch.full((2, 3, 3), 0.1), torch.ones(1, 5, 3)
    noise = noise_table(0, rows=16)
    G = [1.0, 0, 0, 0, 0, 1.0, 0, 0, 0, 0, 1.0, 0]
    with pytest.raises(ValueError, match="volume_index values must lie"):
        march_lines(p, start, step, w, noise, G, 0.1, WATER_BG, 0, 1.0, torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="volume_index must be int64"):
        march_lines(p, start, step, w, noise, G, 0.1, WATER_BG, 0, 1.0, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="volume_index must be"):
        march_lines(p, start, step, w, noise, G, 0.1, WATER_BG, 0, 1.0, torch.tensor([0, 1, 1]))


@pytest.mark.skipif(not INVESALIUS_CRANIUM.is_file(),
                    reason="InVesalius head CT missing: apt-get install invesalius-examples (scripts/data.sh)")
def test_invesalius_reader():
    vol, affine = read_inv3(INVESALIUS_CRANIUM)
    assert vol.shape == (108, 256, 256) and vol.dtype == np.int16
    assert -1100 <= vol.min() < -900 and 2000 < vol.max() < 3100
    assert affine[2, 0] == pytest.approx(1.5) and affine[0, 2] == pytest.approx(0.9570312)


# ---------------------------------------------------------------------------------------------
# CUDA against CPU
# ---------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("scatter", ["plain", "merged"])
def test_cuda_matches_cpu_forward_and_backward(scatter, monkeypatch):
    # the property gradient by either scatter (MEDFAST_USSIM_CUDA_SCATTER; ray_march: scatter_kernel or
    # scatter_merged_kernel)
    monkeypatch.setenv("MEDFAST_USSIM_CUDA_SCATTER", scatter)
    props, coords, noise, G = _march_inputs(torch.float64, B=2, R=5, S=40)
    args = (noise, G, 0.07, [1.5, 0.1, 0.5, 0.3, 0.1], 5)
    p1, c1 = props.clone().requires_grad_(True), coords.clone().requires_grad_(True)
    out = ray_march(p1, c1, *args)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    p2, c2 = props.cuda().requires_grad_(True), coords.cuda().requires_grad_(True)
    out2 = ray_march(p2, c2, noise.cuda(), *args[1:])
    (out2 * g.cuda()).sum().backward()
    torch.testing.assert_close(out2.cpu(), out)
    torch.testing.assert_close(p2.grad.cpu(), p1.grad)
    torch.testing.assert_close(c2.grad.cpu(), c1.grad)


@cuda
@pytest.mark.parametrize("mode", ["thread", "warp"])
@pytest.mark.parametrize("scatter", ["plain", "merged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("volumes", ["one", "per_frame", "indexed"])
def test_cuda_march_lines_matches_cpu(mode, scatter, dtype, volumes, monkeypatch):
    # Both CUDA line marches (MEDFAST_USSIM_CUDA_MARCH: one thread per line, or one warp per line with
    # the transmission as a warp prefix scan) against the CPU: S not a multiple of 32, impedance jumps and
    # a clamped impedance, lines entering and leaving the volume, one volume for all frames or one each;
    # the property gradient by either scatter (MEDFAST_USSIM_CUDA_SCATTER: one atomic per sample and
    # corner, or the warp's lanes of one cell summed first; warp march: lines_scatter_merged_kernel,
    # thread march: scatter_merged_kernel).
    from medfast.ops._ussim import march_lines

    monkeypatch.setenv("MEDFAST_USSIM_CUDA_MARCH", mode)
    monkeypatch.setenv("MEDFAST_USSIM_CUDA_SCATTER", scatter)
    g = torch.Generator().manual_seed(4)
    D, H, W, B, L, E, S = 9, 7, 11, 2, 5, 3, 203
    props = torch.stack([1.3 + 0.6 * torch.rand(B, D, H, W, generator=g, dtype=dtype)] +
                        [torch.rand(B, D, H, W, generator=g, dtype=dtype) for _ in range(4)], -1)
    props[:, 4, :, :, 0] = -0.2
    index = torch.tensor([1, 1]) if volumes == "indexed" else None
    if volumes == "one":
        props = props[:1].contiguous()
    start = torch.rand(B, L, E, 3, generator=g, dtype=dtype) * torch.tensor([D, H, W], dtype=dtype) - 1.0
    step = (torch.rand(B, L, 3, generator=g, dtype=dtype) - 0.5) * 0.15
    weights = torch.rand(E, S, 3, generator=g, dtype=dtype)
    noise = noise_table(5, rows=256)
    G = [2.3, 0.4, 0.0, 0.7, -0.3, 1.9, 0.2, -5.0, 0.1, 0.0, 2.6, 1.25]
    args = (G, 0.03, WATER_BG, 11, 4.0)
    p1, s1 = props.clone().requires_grad_(True), start.clone().requires_grad_(True)
    ref = march_lines(p1, s1, step, weights, noise, *args, index)
    p2, s2 = props.cuda().requires_grad_(True), start.cuda().requires_grad_(True)
    out = march_lines(p2, s2, step.cuda(), weights.cuda(), noise.cuda(), *args,
                      None if index is None else index.cuda())
    scale = ref.abs().amax(dim=(0, 1, 3), keepdim=True).clamp_min(1e-12)
    tol = 1e-4 if dtype == torch.float32 else 1e-10  # float32: the emulated thread march differs by ~5e-5
    torch.testing.assert_close(out.detach().cpu() / scale, ref.detach() / scale, rtol=0, atol=tol)
    # the backward (ray kernel of the same mode, then the scatter into the indexed volumes)
    gout = torch.randn(ref.shape, generator=g, dtype=dtype)
    (ref * gout).sum().backward()
    (out * gout.cuda()).sum().backward()
    gtol = dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(p2.grad.cpu(), p1.grad, **gtol)
    torch.testing.assert_close(s2.grad.cpu(), s1.grad, **gtol)


@cuda
@pytest.mark.parametrize("mode", ["thread", "warp"])
def test_cuda_simulation_matches_cpu(mode, monkeypatch):
    monkeypatch.setenv("MEDFAST_USSIM_CUDA_MARCH", mode)
    ct = torch.zeros(1, 1, 20, 20, 20)
    ct[..., 10:, :, :] = 900.0
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    probe = Probe.preset("C5-2v", n_lines=64, n_samples=256, depth_mm=30.0)
    poses = freehand_sweep(look_at((20.0, 20.0, -2.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)), (0, 8, 0), 4).float()
    a = simulate_ct(ct, affine, poses, probe).bmode
    b = simulate_ct(ct.cuda(), affine, poses.cuda(), probe).bmode.cpu()
    torch.testing.assert_close(b, a, atol=2e-4, rtol=1e-3)
    # A CPU pose with a GPU volume (checked on the host, copied without a device sync): same frames,
    # and its gradient comes back to the CPU pose.
    cpu_pose = poses.clone().requires_grad_(True)
    c = simulate_ct(ct.cuda(), affine, cpu_pose, probe).bmode
    torch.testing.assert_close(c.cpu(), b)
    c.mean().backward()
    assert cpu_pose.grad is not None and cpu_pose.grad.device.type == "cpu"
    # several volumes by a volume index (list: checked on the host, copied without a sync)
    ct2 = torch.cat([ct, ct.flip(-1)])
    d = simulate_ct(ct2.cuda(), affine, poses.cuda(), probe, volume_index=[1, 0, 1, 1]).bmode.cpu()
    e = simulate_ct(ct2, affine, poses, probe, volume_index=[1, 0, 1, 1]).bmode
    torch.testing.assert_close(d, e, atol=2e-4, rtol=1e-3)


def test_simulate_command_on_a_nifti(tmp_path):
    import nibabel as nib

    from medfast.cli import main

    ct = np.full((40, 40, 40), -1000, dtype=np.int16)
    ct[5:35, 5:35, 5:35] = 40  # a soft-tissue cube in air
    ct[20:24, 10:30, 10:30] = 1200  # a bone plate
    nib.save(nib.Nifti1Image(ct, np.diag([1.5, 1.5, 1.5, 1.0])), str(tmp_path / "ct.nii.gz"))
    out = tmp_path / "out"
    rc = main(["simulate", str(tmp_path / "ct.nii.gz"), "--out", str(out), "--frames", "3", "--lines", "32",
               "--samples", "128", "--depth", "40", "--direction", "1,0,0", "--lateral", "0,1,0",
               "--travel", "0,0,5"])
    assert rc == 0
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["frame_000.png", "frame_001.png", "frame_002.png"]
    stack = nib.load(str(out / "frames.nii.gz"))
    assert stack.shape[2] == 3 and stack.header.get_zooms()[0] > 0
    assert (out / "figure.png").is_file() and (out / "simulate.json").is_file()
    frames = np.asarray(stack.dataobj)
    assert frames.max() > 0.5  # the skin and the bone plate are bright


def test_batch_of_volumes_matches_single_calls_and_grads():
    """(B, 5, D, H, W) volumes with B poses: each frame uses its own volume (forward and gradient)."""
    probe = Probe.preset("L11-5v", n_lines=16, n_samples=64, depth_mm=10.0, n_elements=32)
    gen = torch.Generator().manual_seed(3)
    ct = (40 + 300 * torch.rand(2, 1, 6, 6, 6, generator=gen)).requires_grad_(True)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -5
    poses = look_at((0.0, 0.0, -4.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)).expand(2, 4, 4).float()
    both = simulate_ct(ct, affine, poses, probe).lines_db
    both.sum().backward()
    for b in range(2):
        single_ct = ct.detach()[b:b + 1].clone().requires_grad_(True)
        single = simulate_ct(single_ct, affine, poses[b:b + 1], probe).lines_db
        torch.testing.assert_close(both[b:b + 1], single.detach(), atol=1e-4, rtol=1e-4)
        single.sum().backward()
        torch.testing.assert_close(ct.grad[b:b + 1], single_ct.grad, atol=1e-3, rtol=1e-3)


# --- AVX2 line march (csrc/ussim/ussim_cpu_avx2.cpp) against the generic path ------------------------


@pytest.mark.parametrize("sharp", [4.0, (4.0, 1.0, 2.5)])
@pytest.mark.parametrize("speckle", [True, False])
@pytest.mark.parametrize("S", [203, 64])
def test_march_lines_simd_matches_generic(speckle, S, sharp):
    from medfast.ops._ussim import march_lines

    g = torch.Generator().manual_seed(3)
    D, H, W = 9, 7, 11
    props = torch.stack([1.3 + 0.6 * torch.rand(D, H, W, generator=g),  # impedance with jumps
                         torch.rand(D, H, W, generator=g), torch.rand(D, H, W, generator=g),
                         torch.rand(D, H, W, generator=g), 0.5 * torch.rand(D, H, W, generator=g)], -1)[None]
    props[0, 4, :, :, 0] = -0.2  # clamped impedance
    B, L, E = 2, 5, 3
    start = torch.rand(B, L, E, 3, generator=g) * torch.tensor([D, H, W]) - 1.0
    step = (torch.rand(B, L, 3, generator=g) - 0.5) * 0.15
    start[1, 3, 1] = 3e7  # a line far outside: the generic fallback
    weights = torch.rand(E, S, 3, generator=g)
    noise = noise_table(5, rows=256) if speckle else torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    G = [2.3, 0.4, 0.0, 0.7, -0.3, 1.9, 0.2, -5.0, 0.1, 0.0, 2.6, 1.25]
    with torch.no_grad():
        fast, slow = simd_and_generic(lambda: march_lines(props, start, step, weights, noise, G, 0.03,
                                                           WATER_BG, 11, sharp))
    scale = slow.abs().amax(dim=(0, 1, 3), keepdim=True).clamp_min(1e-12)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast / scale, slow / scale, rtol=0, atol=2e-5)
    # deterministic
    with torch.no_grad():
        again = march_lines(props, start, step, weights, noise, G, 0.03, WATER_BG, 11, sharp)
    assert torch.equal(again, fast)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_march_lines_simd_crosses_volume(axis):
    # Lines that enter, cross and leave the volume along each axis: the AVX2 path reads the corner
    # values in place inside the volume and through load_cell (background) at the border.
    from medfast.ops._ussim import march_lines

    g = torch.Generator().manual_seed(7)
    D, H, W = 6, 9, 13
    props = torch.stack([1.3 + 0.6 * torch.rand(D, H, W, generator=g)] +
                        [torch.rand(D, H, W, generator=g) for _ in range(4)], -1)[None]
    L, E, S = 4, 2, 96
    size = [D, H, W][axis]
    start = torch.rand(1, L, E, 3, generator=g) * torch.tensor([D, H, W]) - 0.5
    start[..., axis] = -3.0
    step = torch.zeros(1, L, 3)
    step[..., axis] = (size + 6.0) / S
    step += (torch.rand(1, L, 3, generator=g) - 0.5) * 0.01
    weights = torch.rand(E, S, 3, generator=g)
    noise = noise_table(5, rows=256)
    G = [1.7, 0.1, 0.0, 0.3, 0.0, 1.5, 0.2, -2.0, 0.1, 0.0, 2.1, 0.75]
    with torch.no_grad():
        fast, slow = simd_and_generic(lambda: march_lines(props, start, step, weights, noise, G, 0.03,
                                                           WATER_BG, 11, 4.0))
    scale = slow.abs().amax(dim=(0, 1, 3), keepdim=True).clamp_min(1e-12)
    torch.testing.assert_close(fast / scale, slow / scale, rtol=0, atol=2e-5)


# --- CPU backward (csrc/ussim/ussim_cpu.cpp: cell records; ussim_cpu_avx2.cpp: AVX2 float32 props-only) --


def _backward_case(S, speckle=True, seed=3, dtype=torch.float32):
    """Rays (B = 2, R = 6) through a 9 x 7 x 11 volume with impedance jumps, a clamped impedance
    (< kMinImpedance) and a zero-density region; rays start outside, cross and leave the volume, one
    ray bends (not a line: the kernel takes any sample positions) and one lies far outside (3e7: the
    generic fallback of the AVX2 path)."""
    g = torch.Generator().manual_seed(seed)
    D, H, W = 9, 7, 11
    props = torch.stack([1.3 + 0.6 * torch.rand(D, H, W, generator=g), torch.rand(D, H, W, generator=g),
                         0.2 + torch.rand(D, H, W, generator=g), torch.rand(D, H, W, generator=g),
                         0.5 * torch.rand(D, H, W, generator=g)], -1)[None]
    props[0, 4, :, :, 0] = -0.2  # clamped impedance
    props[0, :, 2, :, 2] = -0.1  # density <= 0: sqrt(rho) = 0
    B, R = 2, 6
    start = torch.rand(B, R, 1, 3, generator=g) * torch.tensor([D, H, W]) - 1.0
    start[:, :2, :, 2] = -2.5  # enter the volume from outside
    step = (torch.rand(B, R, 1, 3, generator=g) - 0.5) * (24.0 / S)
    step[:, :2, :, 2] = 16.0 / S  # ... and leave it
    i = torch.arange(S, dtype=torch.float32)[:, None]
    coords = start + i * step
    coords[0, 2] += 0.8 * torch.sin(i * 0.05)  # a bent ray
    coords[1, 3] += 3e7  # far outside
    grad = torch.randn(B, R, S, 3, generator=g)
    noise = noise_table(5, rows=256) if speckle else torch.tensor([[0.7, -0.2, 0.4, 0.0]])
    G = [2.3, 0.4, 0.0, 0.7, -0.3, 1.9, 0.2, -5.0, 0.1, 0.0, 2.6, 1.25]
    return (grad.to(dtype), props.to(dtype), coords.to(dtype), noise, G, 0.03, list(WATER_BG), 11, 4.0)


def _march_backward(args, props_grad=True, coords_grad=False):
    return torch.ops.medfast.ussim_march_backward(*args, props_grad, coords_grad)


def _assert_props_grad_close(a, b, atol):
    scale = b.abs().amax(dim=(0, 1, 2, 3), keepdim=True).clamp_min(1e-12)  # per property channel
    torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=atol)


@pytest.mark.parametrize("speckle", [True, False])
@pytest.mark.parametrize("S", [203, 64, 9, 1])
def test_march_backward_simd_matches_generic(speckle, S):
    # The AVX2 float32 backward (property gradient only) against the generic one, and both against the
    # float64 generic backward (the arithmetic that gradcheck checks).
    args = _backward_case(S, speckle)
    (gp_fast, gc_fast), (gp_slow, _) = simd_and_generic(lambda: _march_backward(args))
    assert gc_fast.numel() == 0
    assert torch.isfinite(gp_fast).all()
    if S > 1:  # (one sample: R_0 = 0 and no transmission loss, no impedance or attenuation gradient)
        assert gp_fast.abs().amax(dim=(0, 1, 2, 3)).min() > 0  # every channel gets a gradient
    _assert_props_grad_close(gp_fast, gp_slow, 2e-5)
    args64 = [a.double() if isinstance(a, torch.Tensor) and a.dtype == torch.float32 and a is not args[3] else a
              for a in args]
    gp64, _ = _march_backward(args64)
    _assert_props_grad_close(gp_fast.double(), gp64, 2e-5)
    _assert_props_grad_close(gp_slow.double(), gp64, 2e-5)
    # deterministic
    assert torch.equal(_march_backward(args)[0], gp_fast)


def _coords_case(S, speckle, sharp, seed=3):
    """_backward_case plus a ray that misses the volume (all cells outside it) and one that grazes its
    border (cells partly outside: background corners), a background with scatterers (density > 0, so
    that the scatter field has a position gradient outside the volume too) and the given sharpness."""
    grad, props, coords, noise, G, att, _, hseed, _ = _backward_case(S, speckle, seed)
    coords = coords.clone()
    i = torch.arange(S, dtype=torch.float32)[:, None]
    coords[1, 4] = torch.tensor([-4.0, 2.0, -3.0]) + i * torch.tensor([0.01, 0.02, 14.0 / S])  # misses
    coords[1, 5] = torch.tensor([-0.6, 6.4, -2.0]) + i * torch.tensor([0.003, -0.004, 15.0 / S])  # grazes
    bg = [1.45, 0.2, 0.3, 0.6, 0.25]
    return (grad, props, coords, noise, G, att, bg, hseed, sharp)


def _assert_coords_grad_close(a, b, atol):
    scale = b.abs().amax(dim=(0, 1, 2), keepdim=True).clamp_min(1e-12)  # per axis
    torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=atol)


@pytest.mark.parametrize("sharp", [1.0, 4.0, (1.0, 4.0, 2.5)])
@pytest.mark.parametrize("speckle", [True, False])
@pytest.mark.parametrize("S", [203, 64, 9, 1])
def test_march_backward_coords_simd_matches_generic(speckle, S, sharp):
    # The AVX2 float32 position gradient (ussim_cpu_avx2.cpp, pass 6 of backward_ray8) against the generic
    # march_ray_backward, alone and with the property gradient (one sweep), for rays inside, entering,
    # leaving, grazing and missing the volume and one far outside (the generic fallback); both against
    # the float64 generic backward (the arithmetic that gradcheck checks).
    args = _coords_case(S, speckle, sharp)
    (gc_fast, gp_fast, gc_both), (gc_slow, gp_slow, _) = simd_and_generic(
        lambda: (_march_backward(args, False, True)[1], *_march_backward(args, True, True)))
    assert torch.equal(gc_fast, gc_both)  # the same arithmetic with and without the property gradient
    assert torch.isfinite(gc_fast).all()
    if S > 1:
        assert (gc_fast.abs().amax(dim=(0, 1, 2)) > 0).all()
        assert gc_fast[1, 5].abs().max() > 0  # grazing the border: the property gradient
        # missing the volume: only the scatter field of the background (density > 0) moves with the position
        assert (gc_fast[1, 4].abs().max() > 0) == speckle
    _assert_coords_grad_close(gc_fast, gc_slow, 1e-5)  # (measured: < 1e-6)
    _assert_props_grad_close(gp_fast, gp_slow, 2e-5)
    args64 = [a.double() if isinstance(a, torch.Tensor) and a.dtype == torch.float32 and a is not args[3] else a
              for a in args]
    _, gc64 = _march_backward(args64, False, True)
    _assert_coords_grad_close(gc_fast.double(), gc64, 1e-5)
    _assert_coords_grad_close(gc_slow.double(), gc64, 1e-5)
    # deterministic
    assert torch.equal(_march_backward(args, False, True)[1], gc_fast)


@pytest.mark.parametrize("indexed", [False, True])
def test_march_lines_backward_coords_simd_matches_generic(indexed):
    # The position gradient of march_lines' backward (positions on the fly) through both CPU paths, with
    # one volume per frame or a volume index (frames on other volumes than their own).
    grad, props, start, step, weights, noise, G, att, bg, seed, sharp = _lines_case(torch.float32, S=203)
    props = torch.cat([props, props.flip(1)] + ([0.5 * props] if indexed else []))
    vidx = torch.tensor([2, 0]) if indexed else None
    ops = torch.ops.medfast

    def run():
        return ops.ussim_march_lines_backward(grad, props, start, step, weights, noise, G, att, bg, seed, sharp, True,
                                              True, vidx)

    (gp_fast, gc_fast), (gp_slow, gc_slow) = simd_and_generic(run)
    assert gc_fast.abs().max() > 0
    _assert_coords_grad_close(gc_fast, gc_slow, 1e-5)
    _assert_props_grad_close(gp_fast, gp_slow, 2e-5)


@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_march_backward_thread_count_and_gradient_subsets(simd, dtype):
    # The cell records are added into the volume in ray order: bitwise the same gradient with 1 and 2
    # threads. Props-only and coords-only calls give the gradients of the call that asks for both.
    from medfast._extension import _C

    args = _backward_case(203, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        _C._set_cpu_simd(simd)
        torch.set_num_threads(1)
        gp1, _ = _march_backward(args)
        _, gc1 = _march_backward(args, False, True)
        torch.set_num_threads(2)
        gp2, _ = _march_backward(args)
        _, gc2 = _march_backward(args, False, True)
        gp_both, gc_both = _march_backward(args, True, True)
        gp_none, gc_none = _march_backward(args, False, False)
    finally:
        torch.set_num_threads(threads)
        _C._set_cpu_simd(True)
    assert torch.equal(gp1, gp2)
    assert torch.equal(gc1, gc2)
    assert torch.equal(gc2, gc_both)
    assert gp_none.numel() == 0 and gc_none.numel() == 0
    assert torch.isfinite(gc_both).all() and gc_both.abs().max() > 0
    assert gc_both[1, 3].abs().max() == 0  # the ray far outside samples the constant background
    _assert_props_grad_close(gp2, gp_both, 2e-5 if dtype == torch.float32 else 1e-12)


def test_march_backward_batch_of_volumes():
    # Bv = B: each ray's records go into its own batch element's volume.
    args = list(_backward_case(64))
    props = args[1]
    args[1] = torch.cat([props, props.flip(1)])
    gp, _ = _march_backward(args)
    for b in range(2):
        one = list(args)
        one[0], one[1], one[2] = args[0][b:b + 1], args[1][b:b + 1], args[2][b:b + 1]
        gp_b, _ = _march_backward(one)
        assert torch.equal(gp[b:b + 1], gp_b)


def _lines_case(dtype, S=150):
    g = torch.Generator().manual_seed(9)
    D, H, W = 9, 7, 11
    props = torch.stack([1.3 + 0.6 * torch.rand(D, H, W, generator=g)] +
                        [torch.rand(D, H, W, generator=g) for _ in range(4)], -1)[None]
    B, L, E = 2, 5, 3
    start = torch.rand(B, L, E, 3, generator=g) * torch.tensor([D, H, W]) - 1.0
    step = (torch.rand(B, L, 3, generator=g) - 0.5) * 0.15
    start[1, 3, 1] = 3e7  # a sub-ray far outside (the generic fallback of the AVX2 path)
    weights = torch.rand(E, S, 3, generator=g)
    grad = torch.randn(B, L, 3, S, generator=g)
    G = [2.3, 0.4, 0.0, 0.7, -0.3, 1.9, 0.2, -5.0, 0.1, 0.0, 2.6, 1.25]
    return [t.to(dtype) for t in (grad, props, start, step, weights)] + [noise_table(5, rows=256), G, 0.03,
                                                                          list(WATER_BG), 11, [4.0, 1.5, 3.0]]


@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("props_grad, coords_grad", [(True, False), (False, True), (True, True)])
def test_march_lines_backward_matches_materialized(simd, dtype, props_grad, coords_grad):
    # ussim_march_lines_backward computes each sub-ray's positions start + i * step and echo gradients
    # grad * weights on the fly (CPU); the same values as ussim_march_backward on the materialised
    # (B, L E, S, 3) tensors (the CUDA path): bitwise the same gradients.
    from medfast._extension import _C

    grad, props, start, step, weights, noise, G, att, bg, seed, sharp = _lines_case(dtype)
    B, L, E, _ = start.shape
    S = weights.shape[1]
    i = torch.arange(S, dtype=dtype)
    coords = (start[:, :, :, None, :] + i[:, None] * step[:, :, None, None, :]).reshape(B, L * E, S, 3)
    gech = (grad.transpose(2, 3)[:, :, None] * weights).reshape(B, L * E, S, 3)
    ops = torch.ops.medfast
    try:
        _C._set_cpu_simd(simd)
        gp, gc = ops.ussim_march_lines_backward(grad, props, start, step, weights, noise, G, att, bg, seed, sharp,
                                                props_grad, coords_grad)
        gp_ref, gc_ref = ops.ussim_march_backward(gech, props, coords, noise, G, att, bg, seed, sharp, props_grad,
                                                  coords_grad)
    finally:
        _C._set_cpu_simd(True)
    assert gp.shape == gp_ref.shape and gc.shape == gc_ref.shape
    assert gp.numel() == (props.numel() if props_grad else 0)
    assert gc.numel() == (coords.numel() if coords_grad else 0)
    assert torch.equal(gp, gp_ref)
    assert torch.equal(gc, gc_ref)
    if props_grad:
        assert gp.abs().max() > 0
    if coords_grad:
        assert gc.abs().max() > 0


@pytest.mark.parametrize("simd", [True, False])
def test_march_lines_backward_volume_index(simd):
    # Frames reading volumes through a volume index (two frames on volume 1, none on volume 0 ... and
    # back): the records go into each frame's volume; the same as on the materialised tensors.
    from medfast._extension import _C

    grad, props, start, step, weights, noise, G, att, bg, seed, sharp = _lines_case(torch.float32)
    props = torch.cat([props, props.flip(1), 0.5 * props])
    B, L, E, _ = start.shape
    S = weights.shape[1]
    i = torch.arange(S, dtype=torch.float32)
    coords = (start[:, :, :, None, :] + i[:, None] * step[:, :, None, None, :]).reshape(B, L * E, S, 3)
    gech = (grad.transpose(2, 3)[:, :, None] * weights).reshape(B, L * E, S, 3)
    ops = torch.ops.medfast
    for index in ([1, 1], [2, 0]):
        vidx = torch.tensor(index)
        try:
            _C._set_cpu_simd(simd)
            gp, _ = ops.ussim_march_lines_backward(grad, props, start, step, weights, noise, G, att, bg, seed, sharp,
                                                   True, False, vidx)
            gp_ref, _ = ops.ussim_march_backward(gech, props, coords, noise, G, att, bg, seed, sharp, True, False,
                                                 vidx)
        finally:
            _C._set_cpu_simd(True)
        assert torch.equal(gp, gp_ref)
        for v in range(3):
            assert (gp[v].abs().max() > 0) == (v in index)


def test_march_lines_backward_opcheck():
    args = _lines_case(torch.float32, S=20)
    torch.library.opcheck(torch.ops.medfast.ussim_march_lines_backward, (*args, True, True))


def test_march_lines_backward_simd_matches_generic():
    # The autograd of march_lines (coords materialised, the per-ray backward) through both CPU paths.
    from medfast.ops._ussim import march_lines

    g = torch.Generator().manual_seed(9)
    D, H, W = 9, 7, 11
    props0 = torch.stack([1.3 + 0.6 * torch.rand(D, H, W, generator=g)] +
                         [torch.rand(D, H, W, generator=g) for _ in range(4)], -1)[None]
    B, L, E, S = 1, 6, 3, 150
    start = torch.rand(B, L, E, 3, generator=g) * torch.tensor([D, H, W]) - 1.0
    step = (torch.rand(B, L, 3, generator=g) - 0.5) * 0.15
    weights = torch.rand(E, S, 3, generator=g)
    noise = noise_table(5, rows=256)
    G = [2.3, 0.4, 0.0, 0.7, -0.3, 1.9, 0.2, -5.0, 0.1, 0.0, 2.6, 1.25]
    up = torch.randn(B, L, 3, S, generator=g)

    def run():
        props = props0.clone().requires_grad_(True)
        (march_lines(props, start, step, weights, noise, G, 0.03, WATER_BG, 11, 4.0) * up).sum().backward()
        return props.grad

    fast, slow = simd_and_generic(run)
    _assert_props_grad_close(fast, slow, 2e-5)


def test_simulate_simd_matches_generic():
    # A 1 mm voxel volume (as in the benchmark): the paths may differ by an ulp of a sample position,
    # which moves the scatter field by (scatter cells per voxel) ulps.
    g = torch.Generator().manual_seed(1)
    ct = 40 + 60 * torch.nn.functional.interpolate(torch.randn(1, 1, 4, 4, 4, generator=g), size=(32, 32, 32),
                                                   mode="trilinear", align_corners=False)
    ct[..., 20:23, :, :] = 1200.0
    props = hu_to_properties(ct)
    pose = look_at((16.0, 16.0, 0.5), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0))
    probe = small_linear(depth_mm=30.0)
    fast, slow = simd_and_generic(lambda: simulate(props, np.eye(4), pose, probe, return_lines=True))
    scale = float(slow.envelope.max())
    torch.testing.assert_close(fast.envelope / scale, slow.envelope / scale, rtol=0, atol=1e-4)


@pytest.mark.parametrize("S, K", [(203, 7), (203, 16), (20, 15), (9, 3), (64, 1)])
def test_psf_simd_matches_generic(S, K):
    # The PSF forward compiled for AVX2 + FMA (csrc/ussim/ussim_cpu.cpp; float32 axial rows register-
    # blocked in ussim_cpu_avx2.cpp, the row ends and short rows by the header loop) against the
    # baseline build.
    from medfast.ops._ussim import psf

    g = torch.Generator().manual_seed(4)
    B, L, J = 2, 9, 5
    x = torch.randn(B, L, 3, S, generator=g)
    h = torch.rand(3, K, generator=g)
    w = torch.rand(3, J, S, generator=g)
    with torch.no_grad():
        fast, slow = simd_and_generic(lambda: psf(x, h, w))
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    assert torch.equal(psf(x, h, w), fast)


def _cell_row_reference(c0: int, c1: int, c2: int, seed: int, rows: int) -> int:
    """cell_row of csrc/ussim/ussim.h in Python: 32-bit key of the wrapped cell products and the seed,
    Wellons' lowbias32 finalizer, masked to the table size."""
    m = 0xFFFFFFFF
    key = ((c0 * 0x9E3779B1) & m) ^ ((c1 * 0x85EBCA77) & m) ^ ((c2 * 0xC2B2AE3D) & m)
    key ^= (seed & m) ^ ((seed >> 32) & m)
    x = key
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    x ^= x >> 16
    return x & (rows - 1)


@pytest.mark.parametrize("seed", [0, 11, (7 << 32) + 5])
def test_scatter_hash_rows(seed):
    # Samples on the integer scatter-grid nodes read exactly one table row (corner weight 1, norm 1):
    # a table whose rows hold their own index shows which row each cell hashed to, through the
    # generic ray march and the AVX2 line march (vector hash), against the Python reference.
    from medfast.ops._ussim import march_lines

    rows = 1 << 12
    table = torch.zeros(rows, 4)
    table[:, 0] = torch.arange(rows, dtype=torch.float32)
    props = torch.tensor([1.5, 0.0, 1.0, 1.0, 0.0]).expand(1, 4, 4, 4, 5).contiguous()
    G = [1.0, 0.0, 0.0, -40.0, 0.0, 1.0, 0.0, 17.0, 0.0, 0.0, 1.0, -3.0]  # cell = voxel + offset
    S = 37
    start = torch.tensor([[[[-1.0, 2.0, -5.0]], [[0.0, -3.0, 1.0]]]])  # (1, 2, 1, 3)
    step = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 2.0]]])  # (1, 2, 3): integer nodes only
    ref = torch.tensor([[[_cell_row_reference(int(start[0, line, 0, 0] + i * step[0, line, 0]) - 40,
                                              int(start[0, line, 0, 1] + i * step[0, line, 1]) + 17,
                                              int(start[0, line, 0, 2] + i * step[0, line, 2]) - 3, seed, rows)
                          for i in range(S)] for line in range(2)]], dtype=torch.float32)
    coords = start[:, :, 0, None, :] + torch.arange(S, dtype=torch.float32)[:, None] * step[:, :, None, :]
    out = ray_march(props, coords, table, G, 0.0, [1.5, 0.0, 1.0, 1.0, 0.0], seed)
    torch.testing.assert_close(out[..., 1], ref, rtol=0, atol=0)
    weights = torch.ones(1, S, 3)
    with torch.no_grad():
        fast, slow = simd_and_generic(lambda: march_lines(props, start, step, weights, table, G, 0.0,
                                                           [1.5, 0.0, 1.0, 1.0, 0.0], seed))
    torch.testing.assert_close(fast[:, :, 1], ref, rtol=0, atol=0)
    torch.testing.assert_close(slow[:, :, 1], ref, rtol=0, atol=0)


def test_scatter_echo_of_the_node_values():
    # On the scatter-grid nodes a sample reads one table row (n, g n): its echo is sqrt(density) (mean n +
    # spread g n), i.e. the node's amplitude (mean + spread g) times its phase n, through the generic march
    # and the AVX2 line march; the default table holds (n, g n) of the same draws as (n, g) before.
    from medfast.ops._ussim import march_lines

    rows, seed = 1 << 8, 5
    table = noise_table(3, rows=rows)
    draws = torch.randn(rows, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(table[:, :2], draws[:, :2] * 0.5**0.5, rtol=0, atol=0)
    torch.testing.assert_close(table[:, 2:], draws[:, 2:3] * table[:, :2])
    gen = torch.Generator().manual_seed(1)
    props = torch.rand(1, 6, 6, 6, 5, generator=gen) + 0.2
    props[..., 0] = 1.5
    props[..., 1] = 0.0  # no attenuation, no interfaces: E = 1, R = 0
    G = [1.0, 0.0, 0.0, -40.0, 0.0, 1.0, 0.0, 17.0, 0.0, 0.0, 1.0, -3.0]
    S = 5
    start = torch.tensor([[[[0.0, 1.0, 0.0]], [[1.0, 0.0, 2.0]]]])  # (1, 2, 1, 3)
    step = torch.tensor([[[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]])  # integer voxels (= nodes), inside the volume
    coords = start[:, :, 0, None, :] + torch.arange(S, dtype=torch.float32)[:, None] * step[:, :, None, :]
    idx = coords.long()
    v = props[0][idx[..., 0], idx[..., 1], idx[..., 2]]  # (1, 2, S, 5)
    row = torch.tensor([[[_cell_row_reference(int(c[0]) - 40, int(c[1]) + 17, int(c[2]) - 3, seed, rows)
                          for c in line] for line in coords[0].tolist()]])
    n, gn = table[row, :2], table[row, 2:]
    ref = v[..., 2:3].sqrt() * (v[..., 3:4] * n + v[..., 4:5] * gn)  # (1, 2, S, 2)
    out = ray_march(props, coords, table, G, 0.0, [1.5, 0.0, 1.0, 1.0, 0.0], seed)
    torch.testing.assert_close(out[..., 1:], ref)
    with torch.no_grad():
        fast, slow = simd_and_generic(lambda: march_lines(props, start, step, torch.ones(1, S, 3), table, G, 0.0,
                                                           [1.5, 0.0, 1.0, 1.0, 0.0], seed))
    for lines in (fast, slow):
        torch.testing.assert_close(lines[:, :, 1:].transpose(2, 3), ref)


def test_scan_conversion_row_chunks():
    # One CPU frame without autograd is scan-converted in row chunks (one per thread): the same image
    # as one grid_sample over the whole grid, bit for bit.
    import importlib

    sim = importlib.import_module("medfast.ultrasound.simulate")
    probe = Probe.preset("C5-2v", n_lines=64, n_samples=200)
    scan = torch.rand(1, 64, 200, generator=torch.Generator().manual_seed(2))
    grid, _ = sim._cached("grid", probe, 1, "cpu", torch.float32, None)
    ref = torch.nn.functional.grid_sample(scan.transpose(1, 2)[:, None], grid, mode="bilinear",
                                          padding_mode="zeros", align_corners=True)
    threads = torch.get_num_threads()
    try:
        for n in (2, 3, 5):
            torch.set_num_threads(n)
            with torch.no_grad():
                img, _ = sim._scan_convert(scan, probe, None)
            assert img.shape == ref.shape
            assert torch.equal(img, ref)
    finally:
        torch.set_num_threads(threads)


def test_affine_cache_keys_on_the_values():
    # simulate() validates each distinct affine once and caches its inverse: a changed matrix (same
    # object, edited in place) must give other frames, and a bad one must still raise.
    ct = torch.zeros(1, 1, 12, 12, 12)
    ct[..., 6:, :, :] = 900.0
    probe = Probe.preset("C5-2v", n_lines=16, n_samples=64, depth_mm=20.0)
    pose = look_at((12.0, 12.0, -2.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)).float()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    a = simulate_ct(ct, affine, pose, probe).bmode
    torch.testing.assert_close(simulate_ct(ct, affine, pose, probe).bmode, a, rtol=0, atol=0)
    affine[:3, :3] *= 0.5
    assert not torch.equal(simulate_ct(ct, affine, pose, probe).bmode, a)
    affine[0, 0] = np.nan
    with pytest.raises(ValueError, match="affine contains NaN"):
        simulate_ct(ct, affine, pose, probe)


def test_scan_convert_false_gives_the_same_lines_and_no_image():
    props, affine, poses = _three_volumes(torch.float32)
    probe = small_linear(n_lines=16, n_samples=96, depth_mm=14.0)
    full = simulate(props, affine, poses, probe, volume_index=[0, 1, 2, 0], tgc_db_cm_mhz=0.7, gain_db=3.0)
    lines = simulate(props, affine, poses, probe, volume_index=[0, 1, 2, 0], tgc_db_cm_mhz=0.7, gain_db=3.0,
                     scan_convert=False)
    assert lines.bmode is None and full.bmode is not None
    assert torch.equal(lines.lines_db, full.lines_db) and lines.pixel_mm == full.pixel_mm
    # the cached TGC + gain vector is the documented 2 tgc fc z + gain (dB), added to every line
    no_tgc = simulate(props, affine, poses, probe, volume_index=[0, 1, 2, 0], tgc_db_cm_mhz=0.0,
                      scan_convert=False)
    z_cm = probe.depths(dtype=torch.float64) / 10.0
    expected = (2.0 * 0.7 * probe.fc_mhz * z_cm + 3.0).float()
    torch.testing.assert_close(lines.lines_db - no_tgc.lines_db, expected.expand_as(lines.lines_db),
                               rtol=0, atol=2e-4)


def test_bad_poses_raise():
    props, affine, poses = _three_volumes()
    probe = small_linear(n_lines=8, n_samples=32, depth_mm=10.0)
    bad = poses.clone()
    bad[1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="pose contains NaN or inf"):
        simulate(props[:1], affine, bad, probe)
    skew = poses.clone()
    skew[2, 3, 0] = 0.01
    with pytest.raises(ValueError, match="last row must be"):
        simulate(props[:1], affine, skew, probe)
    with pytest.raises(ValueError, match=r"pose must be \(B, 4, 4\)"):
        simulate(props[:1], affine, poses[:, :3], probe)
    with pytest.raises(TypeError, match="pose must be floating point"):
        simulate(props[:1], affine, poses.long(), probe)
    with pytest.raises(TypeError, match="pose must be a torch.Tensor"):
        simulate(props[:1], affine, poses.numpy(), probe)
    near = poses.clone()
    near[:, 3, 3] += 5e-5  # within the tolerance of 1e-4
    assert simulate(props[:1], affine, near, probe).bmode.shape[0] == 4
