"""The transmission loss at an interface of a coarse volume, as documented (docs/ultrasound.md, "Sharp
interfaces in coarse volumes"): the full step loss 1 - R^2 where the step falls between two samples, and
the sum of its pieces' losses (documented range) where the sharpened ramp spans samples."""

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


@pytest.mark.parametrize("spacing", [0.5, 1.0])
def test_bone_interface_transmission_in_documented_range(spacing):
    step_db = 20 * math.log10(1 - ((6.0 - 1.63) / (6.0 + 1.63)) ** 2)  # -3.45 dB
    got = [_level_change_db(1.63, 6.0, spacing, off * 0.02) for off in (0.0, 0.25, 0.5, 0.75)]
    print(f"{spacing} mm voxels: {min(got):.2f} .. {max(got):.2f} dB (step {step_db:.2f} dB)")
    # docs: -1.37 to -1.97 dB; a loss, never a gain, and never more than the step's
    assert all(-2.0 <= g <= -1.3 for g in got), got
    assert all(g > step_db for g in got)


def test_interface_between_samples_loses_the_full_step():
    step_db = 20 * math.log10(1 - ((6.0 - 1.63) / (6.0 + 1.63)) ** 2)
    got = _level_change_db(1.63, 6.0, 0.02, 0.0)  # a volume on the sample grid: the step between two samples
    assert abs(got - step_db) <= 0.05, (got, step_db)
