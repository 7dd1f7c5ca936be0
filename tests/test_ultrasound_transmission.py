"""The transmission loss at an interface of a coarse volume (docs/ultrasound.md, "Sharp interfaces in coarse
volumes"): the step's full 1 - R^2 wherever the samples fall, also where the sharpened ramp puts samples inside
the step (summed per sample, its pieces lost 40-60 % of the step in dB)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medfast.ultrasound import Probe, look_at, simulate

POSE0 = look_at((0.0, 0.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0))


def _level_change_db(z1: float, z2: float, spacing: float, offset_mm: float) -> float:
    """Scatter level below / above an interface at 10 mm (speckle off, no attenuation), in dB."""
    n = int(round(20.0 / spacing))
    props = torch.zeros(1, 5, 3, 3, n)
    z = torch.arange(n) * spacing
    props[:, 0] = torch.where(z < 10.0, z1, z2)
    props[:, 2] = 1.0
    props[:, 3] = 0.005
    affine = np.array([[200.0, 0, 0, -200], [0, 200.0, 0, -200], [0, 0, spacing, offset_mm], [0, 0, 0, 1]])
    probe = Probe.preset("L11-5v", n_lines=24, n_samples=1001, depth_mm=20.0)  # dz = 0.02 mm
    res = simulate(props, affine, POSE0, probe, tgc_db_cm_mhz=0.0, return_lines=True, speckle=False)
    env = res.envelope[0, 6:-6]
    return 20 * math.log10(float(env[:, 650:850].mean()) / float(env[:, 150:400].mean()))


@pytest.mark.parametrize("z2", [6.0, 2.5])  # soft tissue -> bone (-3.45 dB), Z 1.63 -> 2.5 (-0.79 dB)
@pytest.mark.parametrize("spacing", [0.5, 1.0, 2.0])
def test_interface_transmission_is_the_full_step_wherever_the_samples_fall(spacing, z2):
    z1 = 1.63
    step_db = 20 * math.log10(1 - ((z2 - z1) / (z2 + z1)) ** 2)
    got = [_level_change_db(z1, z2, spacing, off * 0.02) for off in (0.0, 0.25, 0.5, 0.75)]
    print(f"{spacing} mm voxels, Z {z1} -> {z2}: {min(got):.3f} .. {max(got):.3f} dB (step {step_db:.3f} dB)")
    assert all(abs(g - step_db) <= 0.02 for g in got), (got, step_db)


def test_interface_between_samples_loses_the_full_step():
    step_db = 20 * math.log10(1 - ((6.0 - 1.63) / (6.0 + 1.63)) ** 2)
    got = _level_change_db(1.63, 6.0, 0.02, 0.0)  # a volume on the sample grid: the step between two samples
    assert abs(got - step_db) <= 0.02, (got, step_db)


def test_a_step_up_and_back_down_loses_both_steps():
    """A bone plate (1.63 -> 6 -> 1.63, 3 mm thick, 1 mm voxels): two runs, each the full step; no attenuation."""
    n = 20
    props = torch.zeros(1, 5, 3, 3, n)
    z = torch.arange(n) * 1.0
    props[:, 0] = torch.where((z >= 8.0) & (z < 11.0), 6.0, 1.63)
    props[:, 2] = 1.0
    props[:, 3] = 0.005
    affine = np.array([[200.0, 0, 0, -200], [0, 200.0, 0, -200], [0, 0, 1.0, 0.013], [0, 0, 0, 1]])
    probe = Probe.preset("L11-5v", n_lines=24, n_samples=1001, depth_mm=20.0)
    res = simulate(props, affine, POSE0, probe, tgc_db_cm_mhz=0.0, return_lines=True, speckle=False)
    env = res.envelope[0, 6:-6]
    got = 20 * math.log10(float(env[:, 700:900].mean()) / float(env[:, 100:300].mean()))
    step_db = 20 * math.log10(1 - ((6.0 - 1.63) / (6.0 + 1.63)) ** 2)
    assert abs(got - 2 * step_db) <= 0.04, (got, 2 * step_db)


@pytest.mark.parametrize("sharp", [1.0, 3.0])
def test_gradcheck_through_long_monotone_runs(sharp):
    """A ray along an impedance ramp (monotone over many samples: long runs, whose later steps owe their start
    sample a term) and back down: float64 gradcheck w.r.t. the property volume and the sample positions."""
    from medfast.ops._ussim import noise_table, ray_march

    g = torch.Generator().manual_seed(0)
    D = 6
    props = torch.rand(1, D, 3, 3, 5, generator=g, dtype=torch.float64) * 0.2
    ramp = torch.tensor([1.5, 1.9, 3.5, 6.0, 2.0, 1.6], dtype=torch.float64)
    props[..., 0] = ramp[None, :, None, None] + props[..., 0] * 0.1
    props[..., 2] = 1.0
    S = 48
    t = torch.linspace(0.2, D - 1.3, S, dtype=torch.float64)
    coords = torch.stack([t, 1.0 + 0.1 * t.sin(), 1.0 + 0.05 * t], -1)[None, None].clone()
    props.requires_grad_(True)
    coords.requires_grad_(True)
    noise = noise_table(3, rows=64)
    G = [0.7, 0.1, 0.0, 0.05, 0.0, 0.8, 0.2, 0.1, 0.1, 0.0, 0.9, 0.3]

    def f(p, c):
        return ray_march(p, c, noise, G, 0.08, [1.5, 0.1, 0.5, 0.3, 0.1], 1, sharp)

    assert torch.autograd.gradcheck(f, (props, coords), eps=1e-6, atol=1e-6)
