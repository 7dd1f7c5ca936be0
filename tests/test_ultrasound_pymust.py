"""Point-spread function of the simulator against pymust (MUST) with the same probe presets.

pymust simulates the RF of a single point scatterer at the transmit focus (``simus``, focused
transmit), demodulates (``rf2iq``) and beamforms it (``dasmtx``, full receive aperture); the -6 dB
axial and lateral widths of its envelope are compared with medfast's simulated point target.
pymust is a test-only dependency (requirements-dev.txt).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfast.ultrasound import Probe, look_at, simulate
from medfast.ultrasound.tissue import WATER

pymust = pytest.importorskip("pymust")


def _fwhm(profile: np.ndarray, step: float) -> float:
    m = profile.max()
    i = int(profile.argmax())
    half = m / 2
    a = i
    while a > 0 and profile[a - 1] >= half:
        a -= 1
    b = i
    while b < len(profile) - 1 and profile[b + 1] >= half:
        b += 1
    left = a - (profile[a] - half) / (profile[a] - profile[a - 1]) if a > 0 else a
    right = b + (profile[b] - half) / (profile[b] - profile[b + 1]) if b < len(profile) - 1 else b
    return float((right - left) * step)


def pymust_widths(name: str, depth_mm: float) -> tuple[float, float]:
    param = pymust.getparam(name)
    param.fs = 4 * param.fc
    zf = depth_mm * 1e-3
    delays = pymust.txdelay(0.0, zf, param)
    rf, _ = pymust.simus(np.array([0.0]), np.array([zf]), np.array([1.0]), delays, param)
    iq = pymust.rf2iq(rf, param)
    step = 1540 / param.fc / 10
    x, z = np.meshgrid(np.arange(-3e-3, 3e-3, step), np.arange(zf - 2e-3, zf + 2e-3, step))
    M = pymust.dasmtx(iq, x, z, delays, param)
    env = np.abs((M @ iq.flatten(order="F")).reshape(x.shape, order="F"))
    i, j = np.unravel_index(np.argmax(env), env.shape)
    return _fwhm(env[:, j], step * 1e3), _fwhm(env[i, :], step * 1e3)


def medfast_widths(name: str, depth_mm: float) -> tuple[float, float]:
    """A point target (a Gaussian scatterer blob of sigma 0.02 mm) at the transmit focus, imaged with
    2048 lines and 0.02 mm samples so that the response is finely sampled in both directions."""
    probe = Probe.preset(name, focus_mm=depth_mm, depth_mm=depth_mm + 5, n_lines=2048,
                         n_samples=int(round((depth_mm + 5) / 0.02)) + 1)
    spacing, sigma, half = 0.01, 0.02, 0.3
    n = int(round(2 * half / spacing)) + 1
    ax = torch.arange(n) * spacing - half
    g = torch.meshgrid(ax, ax, ax, indexing="ij")
    props = torch.zeros(1, 5, n, n, n)
    # water's impedance, as the background around the block: no specular echo from the block's faces 0.3 mm from the
    # target (R 0.007, which broadened the axial profile once the speckle-free scatter level stopped growing as 1/dz)
    props[:, 0] = WATER[0]
    props[:, 2] = 1.0
    props[:, 3] = torch.exp(-sum(c**2 for c in g) / (2 * sigma**2))
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = (-half, -half, depth_mm - half)
    pose = look_at((0.0, 0.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)).float()
    res = simulate(props, affine, pose, probe, speckle=False, tgc_db_cm_mhz=0.0, sub_rays=1, return_lines=True)
    env = res.envelope[0].double()  # (L, S)
    line, s_peak = np.unravel_index(int(env.argmax()), env.shape)
    origin, direction = probe.line_geometry()
    x = (origin + direction * probe.depths()[s_peak])[:, 0].numpy()  # lateral position of each line
    prof = env[:, s_peak].numpy()
    grid = np.arange(x[line] - 2.0, x[line] + 2.0, 0.002)
    lateral = _fwhm(np.interp(grid, x, prof), 0.002)
    axial = _fwhm(env[line].numpy(), probe.dz_mm)
    return axial, lateral


# L11-5v and C5-2v calibrated medfast's PSF_CALIBRATION; P4-2v is a held-out check.
@pytest.mark.parametrize("name,depth", [("L11-5v", 20.0), ("C5-2v", 60.0), ("P4-2v", 50.0)])
def test_point_spread_function_matches_pymust(name, depth):
    ref_ax, ref_lat = pymust_widths(name, depth)
    ax, lat = medfast_widths(name, depth)
    print(f"{name} at {depth} mm: axial {ax:.3f} mm (pymust {ref_ax:.3f}), lateral {lat:.3f} mm (pymust {ref_lat:.3f})")
    assert abs(ax - ref_ax) <= 0.15 * ref_ax
    assert abs(lat - ref_lat) <= 0.15 * ref_lat
