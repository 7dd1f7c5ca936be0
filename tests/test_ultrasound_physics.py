"""Physics of the ultrasound simulator that a bug hunt found wrong: the speckle power depended on how
densely the lines and samples were spaced, strong interfaces echoed more than their reflection
coefficient, and coarse volumes attenuated a bone or air echo before the wave reached the interface."""

import math

import numpy as np
import pytest
import torch

from medfast.ultrasound import Probe, look_at, simulate
from medfast.ultrasound._speckle import _CORRELATION_VAR

# A homogeneous scattering medium (density 1, amplitude 1, no spread, no attenuation): the mean
# speckle intensity |IQ|^2 must equal the scatter power, 1.
SPECKLE = torch.tensor([1.5, 0.0, 1.0, 1.0, 0.0]).view(1, 5, 1, 1, 1).expand(1, 5, 2, 2, 2).clone()
BIG = np.diag([400.0, 400.0, 400.0, 1.0])
BIG[:3, 3] = -200.0
DOWN = look_at((0.0, 0.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0))[None].float()


def _mean_intensity(probe, seeds=(0,)):
    nl = probe.n_lines
    out = 0.0
    for seed in seeds:
        r = simulate(SPECKLE, BIG, DOWN, probe, seed=seed, tgc_db_cm_mhz=0.0, return_lines=True)
        out = out + r.envelope[0, nl // 8: -nl // 8].double().square().mean(0)  # (S,)
    return out / len(seeds)


@pytest.mark.parametrize("name, n_lines, n_samples", [
    ("L11-5v", 64, 128), ("L11-5v", 64, 512), ("L11-5v", 512, 512), ("L11-5v", 128, 2048),
    ("C5-2v", 256, 1024), ("P4-2v", 256, 512),
])
def test_speckle_power_does_not_depend_on_sampling(name, n_lines, n_samples):
    # before: 1.0 at 64 x 128, 2.4 at 64 x 512, 9.5 at 1024 x 512 (L11-5v), up to 136 near a phased
    # array's apex: correlated neighbouring samples were summed as if independent
    probe = Probe.preset(name, n_lines=n_lines, n_samples=n_samples, depth_mm=30.0)
    intensity = _mean_intensity(probe)
    mean = float(intensity[n_samples // 4: -n_samples // 8].mean())
    assert 10 * math.log10(mean) == pytest.approx(0.0, abs=0.5)


def test_sector_speckle_does_not_fade_with_depth_without_attenuation():
    # the lines of a phased array converge at its apex: before, the near field was several dB
    # brighter than the far field with no attenuation at all (-1.97 dB/cm at 96 x 512)
    probe = Probe.preset("P4-2v", n_lines=96, n_samples=512, depth_mm=40.0)
    intensity = _mean_intensity(probe, seeds=(0, 1, 2))
    z = probe.depths(dtype=torch.float64) / 10.0
    keep = slice(512 // 8, -512 // 12)
    fit = np.polyfit(z[keep].numpy(), 10 * np.log10(intensity[keep].numpy()), 1)
    assert abs(fit[0]) < 0.6  # dB/cm


def _scatter_volumes(cases):
    """(len(cases), 5, 2, 2, 2) homogeneous, non-attenuating volumes of (density, mean, spread)."""
    return torch.stack([torch.tensor([1.5, 0.0, rho, mu, sd]) for rho, mu, sd in cases])[..., None, None, None] \
        .expand(-1, -1, 2, 2, 2).clone()


# (density, mean, spread) of the scatter amplitude: the mean intensity is density (mean^2 + spread^2) = 1
SPREAD_CASES = ((1.0, 1.0, 0.0), (1.0, 0.0, 1.0), (0.5, 1.0, 1.0))


@pytest.mark.parametrize("n_lines", [64, 128, 512])
def test_amplitude_spread_speckle_power_does_not_depend_on_line_spacing(n_lines):
    # before: with mean 0, spread 1 the mean intensity was -1.21 / -1.14 / -2.33 dB at 64 / 128 / 512 lines
    # (and -0.64 / -0.60 / -1.11 dB with mean = spread): the spread field was the interpolated g times the
    # interpolated n, correlated as the square of the field the scatter gain normalises for
    probe = Probe.preset("L11-5v", n_lines=n_lines, n_samples=1024)
    poses = DOWN.expand(len(SPREAD_CASES), 4, 4)
    intensity = sum(simulate(_scatter_volumes(SPREAD_CASES), BIG, poses, probe, seed=seed, tgc_db_cm_mhz=0.0,
                             return_lines=True).envelope[:, n_lines // 8: -n_lines // 8, 128:-64].double()
                    .square().mean((1, 2)) for seed in range(3)) / 3
    for case, level in zip(SPREAD_CASES, intensity.tolist()):
        assert 10 * math.log10(level) == pytest.approx(0.0, abs=0.25), case


def test_amplitude_spread_speckle_power_does_not_fade_with_depth_in_a_sector():
    # before: -2.3 / -2.5 / -2.3 / -2.0 / -1.3 dB over these depth bands with mean 0, spread 1 (P4-2v)
    probe = Probe.preset("P4-2v", n_lines=256, n_samples=1024)
    poses = DOWN.expand(len(SPREAD_CASES), 4, 4)
    intensity = sum(simulate(_scatter_volumes(SPREAD_CASES), BIG, poses, probe, seed=seed, tgc_db_cm_mhz=0.0,
                             return_lines=True).envelope[:, 32:-32].double().square().mean(1)
                    for seed in range(4)) / 4  # (cases, S)
    z = probe.depths(dtype=torch.float64)
    for lo, hi in ((3, 10), (10, 25), (25, 50), (50, 80), (80, 115)):
        for case, level in zip(SPREAD_CASES, intensity[:, (z >= lo) & (z < hi)].mean(1).tolist()):
            assert 10 * math.log10(level) == pytest.approx(0.0, abs=0.25), (case, lo, hi)


def _field_correlation_by_quadrature():
    """The correlation of the normalised trilinear noise field at distance r (cells), averaged over
    the phase in a cell and over directions: derived independently of the simulator's constant."""
    t = (np.arange(2048) + 0.5) / 2048
    nodes = np.arange(4.0)

    def weights(x):
        w = np.maximum(0.0, 1.0 - np.abs(x[:, None] - nodes[None]))
        return w, np.sqrt((w * w).sum(1))

    taus = np.linspace(0.0, 2.0, 201)
    wx, sx = weights(t)
    rho1 = np.array([np.mean((wx * weights(t + tau)[0]).sum(1) / (sx * weights(t + tau)[1])) for tau in taus])
    k = np.arange(2048) + 0.5
    z = 1.0 - 2.0 * k / k.size
    phi = math.pi * (1.0 + math.sqrt(5.0)) * k
    u = np.abs(np.stack([np.sqrt(1 - z * z) * np.cos(phi), np.sqrt(1 - z * z) * np.sin(phi), z], 1))
    r = np.linspace(0.0, 2.0 * math.sqrt(3.0), 121)
    return r, np.interp(r[:, None, None] * u[None], taus, rho1, right=0.0).prod(-1).mean(-1)


def test_the_gaussian_correlation_model_matches_the_noise_field():
    r, rho = _field_correlation_by_quadrature()
    model = np.exp(-r * r / (2 * _CORRELATION_VAR))
    assert np.abs(model - rho).max() < 0.015
    # what the gain integrates: the area under the correlation along a line
    assert np.trapezoid(model, r) == pytest.approx(np.trapezoid(rho, r), rel=0.01)


@pytest.mark.parametrize("voxel_mm", [0.5, 1.0, 2.0])
def test_bone_echo_is_not_attenuated_before_the_interface(voxel_mm):
    # the impedance was sharpened to a step at the voxel midpoint but the attenuation was trilinear, so
    # bone's 15 dB/cm/MHz ramped up over the half voxel in front of the surface and weakened its own
    # echo: -1.3 / -2.7 / -5.5 dB at 0.5 / 1 / 2 mm voxels (L11-5v)
    probe = Probe.preset("L11-5v", n_lines=16, n_samples=1001, depth_mm=30.0)
    n = int(round(40 / voxel_mm)) + 1
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = (-20, -20, 0)
    inside = (torch.arange(n).float() * voxel_mm >= 20.0)[None, None, :]
    props = torch.zeros(1, 5, n, n, n)
    props[:, 0] = torch.where(inside, 6.0, 1.63)  # soft tissue (no attenuation) -> bone
    props[:, 1] = torch.where(inside, 15.0, 0.0)
    env = simulate(props, affine, DOWN, probe, speckle=False, tgc_db_cm_mhz=0.0, return_lines=True).envelope
    window = slice(int(17 / probe.dz_mm), int(23 / probe.dz_mm))
    echo = float(env[0, 4:-4, window].max(1).values.median())
    reflection = (6.0 - 1.63) / (6.0 + 1.63)
    assert 20 * math.log10(echo / reflection) == pytest.approx(0.0, abs=0.5)


def test_correlated_energy_is_the_quadratic_form_without_the_matrix():
    # w^T C w summed over the lags of the Toeplitz C (an (S, J, J) matrix was 4 GB at 8192 x 257 taps)
    from medfast.ultrasound._speckle import _correlated_energy

    gen = torch.Generator().manual_seed(0)
    w = torch.rand(40, 25, dtype=torch.float64, generator=gen)
    step = torch.rand(40, dtype=torch.float64, generator=gen) * 0.3
    lag = torch.arange(25, dtype=torch.float64)
    corr = torch.exp(-(lag[:, None] - lag[None]).square() * (step / 0.1).square()[:, None, None]
                     / (2 * _CORRELATION_VAR))
    torch.testing.assert_close(_correlated_energy(w, step, 0.1), torch.einsum("si,sij,sj->s", w, corr, w))


# An interface across a fine (0.5 mm) voxel axis of a thick-slice volume (5 mm along another axis). The
# sharpening was one value for all axes, set by the thickest (5 mm / 2 samples = 16 at dz 0.157 mm): across
# the fine axes the impedance step was a tenth of a sample wide, so the echo snapped to the sample grid
# (+-0.06 mm jumps under sub-sample probe shifts) and its pose gradient was exactly 0.
THICK_PROBE = dict(name="L11-5v", n_lines=16, n_samples=128, depth_mm=20.0)


def _thick_slice_echo(axis, shift_mm, thick_axis, grad=True):
    """Echo depth (envelope centroid of the middle line, mm) of an impedance step across voxel axis ``axis``
    (0.5 mm voxels; ``thick_axis`` 5 mm, or None: isotropic), the probe looking along that axis from
    ``shift_mm`` + 10 mm in front of the step; and d depth / d shift by autograd (the true value: -1)."""
    probe = Probe.preset(**THICK_PROBE)
    spacing = [0.5, 0.5, 0.5]
    if thick_axis is not None:
        spacing[thick_axis] = 5.0
    shape = [int(round(32 / s)) for s in spacing]
    props = torch.zeros(1, 5, *shape, dtype=torch.float64)
    props[:, 0] = 1.5
    props[0, 0].narrow(axis, shape[axis] // 2, shape[axis] - shape[axis] // 2).fill_(2.5)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -np.array(spacing) * (np.array(shape) - 1) / 2
    eye = np.eye(3)
    pose = look_at(tuple(eye[axis] * (shift_mm - 10.0)), tuple(eye[axis]), tuple(eye[(axis + 1) % 3]))
    pose = pose.requires_grad_(grad)
    env = simulate(props, affine, pose, probe, speckle=False, tgc_db_cm_mhz=0.0, return_lines=True).envelope[0, 8]
    z = torch.arange(probe.n_samples, dtype=torch.float64) * probe.dz_mm
    depth = (env * z).sum() / env.sum()
    if not grad:
        return float(depth.detach()), None
    depth.backward()
    return float(depth.detach()), float(pose.grad[:3, 3] @ torch.as_tensor(eye[axis]))


@pytest.mark.parametrize("axis, thick_axis", [(0, 2), (1, 0), (2, 1), (0, None)])
def test_thick_slice_pose_gradient_across_fine_axes(axis, thick_axis):
    h = 1e-4
    for shift in (0.0, 0.05, 0.1):
        depth, grad = _thick_slice_echo(axis, shift, thick_axis)
        fd = (_thick_slice_echo(axis, shift + h, thick_axis, False)[0] -
              _thick_slice_echo(axis, shift - h, thick_axis, False)[0]) / (2 * h)
        assert depth == pytest.approx(10.0, abs=0.2)
        assert grad == pytest.approx(fd, rel=1e-3, abs=1e-3)  # before: autograd 0, finite difference 0
        assert grad == pytest.approx(-1.0, abs=0.15)  # (the centroid of a sampled echo: -0.92 to -1.1)


@pytest.mark.parametrize("axis, thick_axis", [(0, 2), (2, 0)])
def test_thick_slice_echo_moves_smoothly_with_the_probe(axis, thick_axis):
    # echo depth + probe shift (the interface's position) over sub-sample shifts: constant, where it
    # jumped by +-0.06 mm (the echo stayed on a sample, then jumped to the next)
    dz = Probe.preset(**THICK_PROBE).dz_mm
    pos = [_thick_slice_echo(axis, s, thick_axis, False)[0] + s for s in np.linspace(0.0, dz, 6)]
    assert max(pos) - min(pos) < 0.01


def _ncc(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("name, depths", [("C5-2v", (60.0, 30.0)), ("L11-5v", (20.0, 8.0))])
def test_slice_sub_rays_decorrelate_speckle_over_the_slice_thickness(name, depths):
    # Two poses of a sweep d mm apart in elevation: the speckle intensity of a Gaussian elevation beam
    # correlates as exp(-d^2 / (2 s^2)), s = slice FWHM / 2.355 (at and away from the elevation focus;
    # averaged over the depths of the window, where the slice widens away from the focus).
    # With the default 3 rays each reading the field on one line, it fell to ~0 by d = 0.3 mm
    # (C5-2v at its 60 mm focus: 0.02 against 0.92).
    probe = Probe.preset(name, n_lines=64, n_samples=512)
    dys = (0.0, 0.3, 0.5, 1.0)
    poses = torch.stack([look_at((0.0, dy, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)) for dy in dys]).float()
    env = simulate(SPECKLE, BIG, poses, probe, sub_rays="slice", tgc_db_cm_mhz=0.0, return_lines=True).envelope
    for z0 in depths:
        s0 = int(round(z0 / probe.dz_mm))
        intensity = env[:, 8:-8, s0 - 40: s0 + 40].square()
        s = probe.elevation_fwhm_mm(probe.depths(dtype=torch.float64)[s0 - 40: s0 + 40]) / 2.355
        for k, dy in enumerate(dys[1:], 1):
            expected = float(torch.exp(-dy * dy / (2 * s * s)).mean())
            assert _ncc(intensity[0], intensity[k]) == pytest.approx(expected, abs=0.1), (z0, dy)


def test_slice_sub_rays_count_and_speckle_power():
    from medfast.ultrasound.simulate import slice_sub_rays

    probe = Probe.preset("C5-2v", n_lines=96, n_samples=256, depth_mm=80.0)
    assert slice_sub_rays(probe) == 95  # 1.5 x 13.5 mm element height / 0.216 mm cell = 93.8 -> 95 (odd)
    assert probe.elevation_mm / slice_sub_rays(probe) <= probe.wavelength_mm / 3
    assert slice_sub_rays(probe, 0.5) == 41
    # the mean speckle intensity is still the scatter power with ~30x more (correlated) rays, on a probe
    # aligned with the scatter grid (every ray at one phase of its cells: -1.8 dB at one cell spacing)
    r = simulate(SPECKLE, BIG, DOWN, probe, sub_rays="slice", tgc_db_cm_mhz=0.0, return_lines=True)
    mean = float(r.envelope[0, 12:-12, 64:-32].double().square().mean())
    assert 10 * math.log10(mean) == pytest.approx(0.0, abs=0.5)
    with pytest.raises(ValueError, match="sub_rays"):
        simulate(SPECKLE, BIG, DOWN, probe, sub_rays="slices")


def test_slice_sub_rays_gradcheck():
    from tests.test_ultrasound import gradcheck_inputs

    probe = Probe.preset("L11-5v", n_lines=3, n_samples=8, depth_mm=2.0, n_elements=8)
    props, affine, pose = gradcheck_inputs((3, 3, 3), 2)

    def f(p, q):
        return simulate(p, affine, q, probe, sub_rays="slice", scatter_cell_mm=0.7, dynamic_range_db=400.0,
                        tgc_db_cm_mhz=0.3, interface_mm=10.0, background=(1.5, 0.2, 1.0, 0.3, 0.05)).lines_db

    assert torch.autograd.gradcheck(f, (props, pose), eps=1e-6, atol=1e-5, rtol=1e-3)
