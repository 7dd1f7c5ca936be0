"""Figures of the simulator's physics checks (the same set-ups as tests/test_ultrasound.py).

    python -m medfast.ultrasound.figures docs/images/ultrasound_physics.png
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from medfast.ultrasound import Probe, look_at, simulate


def _homogeneous(alpha=0.0):
    props = torch.tensor([1.5, alpha, 1.0, 1.0, 0.0], dtype=torch.float32).view(1, 5, 1, 1, 1)
    props = props.expand(1, 5, 2, 2, 2).clone()
    affine = np.diag([400.0, 400.0, 400.0, 1.0])
    affine[:3, 3] = -200.0
    return props, affine


def physics_figure(path: str) -> dict:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures are left alone

    from medfast._figures import save_figure

    pose = look_at((0.0, 0.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0))
    probe = Probe.preset("L11-5v", n_lines=96, n_samples=768, depth_mm=40.0)
    out = {}
    fig = Figure(figsize=(16, 3.6))
    ax = fig.subplots(1, 4)

    # 1. Speckle statistics against the Rayleigh law.
    props, affine = _homogeneous()
    env = simulate(props, affine, pose, probe, tgc_db_cm_mhz=0.0, return_lines=True).envelope[0, 8:-8, 64:-32]
    e = (env / env.square().mean().sqrt()).flatten().numpy()
    out["speckle_mean_over_std"] = float(e.mean() / e.std())
    out["speckle_log_std_db"] = float((20 * np.log10(e)).std())
    ax[0].hist(e, bins=80, density=True, alpha=0.6, label="simulated envelope")
    x = np.linspace(0, 3.5, 200)
    ax[0].plot(x, 2 * x * np.exp(-x * x), "k", label="Rayleigh")
    ax[0].set_title(f"speckle: mean/std {out['speckle_mean_over_std']:.3f} (1.913), "
                    f"log std {out['speckle_log_std_db']:.2f} dB (5.57)", fontsize=8)
    ax[0].legend(fontsize=7)

    # 2. Attenuation slope with TGC off.
    alpha = 0.5
    props, affine = _homogeneous(alpha)
    env = simulate(props, affine, pose, probe, tgc_db_cm_mhz=0.0, return_lines=True).envelope[0, 8:-8]
    z = probe.depths().numpy() / 10
    db = 10 * np.log10(env.square().mean(0).numpy())
    keep = slice(60, -30)
    slope, icpt = np.polyfit(z[keep], db[keep], 1)
    out["attenuation_slope_db_cm"] = float(slope)
    out["attenuation_expected_db_cm"] = -2 * alpha * probe.fc_mhz
    ax[1].plot(z * 10, db, lw=0.6, label="mean intensity")
    ax[1].plot(z * 10, slope * z + icpt, "k--", label=f"fit {slope:.2f} dB/cm")
    ax[1].set_title(f"attenuation: slope {slope:.2f} dB/cm, -2 alpha fc = {-2 * alpha * probe.fc_mhz:.2f}",
                    fontsize=8)
    ax[1].set_xlabel("depth (mm)", fontsize=7)
    ax[1].legend(fontsize=7)

    # 3. Planar interface Z 1.5 -> 2.5 at 10 mm.
    p3 = Probe.preset("L11-5v", n_lines=64, n_samples=1001, depth_mm=20.0)
    n = 1250  # 25 mm: the volume ends beyond the imaged depth
    props = torch.zeros(1, 5, 3, 3, n, dtype=torch.float32)
    zz = torch.arange(n, dtype=torch.float32) * 0.02
    props[:, 0] = torch.where(zz < 10.0, 1.5, 2.5)
    props[:, 2] = 1.0
    props[:, 3] = 0.005
    aff = np.array([[200.0, 0, 0, -200], [0, 200.0, 0, -200], [0, 0, 0.02, 0], [0, 0, 0, 1]])
    env = simulate(props, aff, pose, p3, tgc_db_cm_mhz=0.0, return_lines=True).envelope[0, 8:-8]
    prof = env.median(0).values.numpy()
    out["interface_echo"] = float(env[:, 480:520].max(1).values.median())
    out["interface_expected"] = 0.25
    ax[2].semilogy(p3.depths().numpy(), prof, lw=0.7)
    ax[2].axhline(0.25, color="k", ls="--", lw=0.7)
    ax[2].set_title(f"interface: echo {out['interface_echo']:.3f}, (Z2-Z1)/(Z2+Z1) = 0.250", fontsize=8)
    ax[2].set_xlabel("depth (mm)", fontsize=7)

    # 4. Speckle correlation against lateral pose shift (256 lines: 0.15 mm apart).
    probe = Probe.preset("L11-5v", n_lines=256, n_samples=768, depth_mm=40.0)
    props, affine = _homogeneous()
    ref = simulate(props, affine, pose, probe, tgc_db_cm_mhz=0.0, return_lines=True).envelope[0, 60:200, 64:-32]
    shifts = np.linspace(0, 0.6, 13)
    corr = []
    for dx in shifts:
        p = pose.clone()
        p[0, 3] = float(dx)
        e2 = simulate(props, affine, p, probe, tgc_db_cm_mhz=0.0, return_lines=True).envelope[0, 60:200, 64:-32]
        a, b = ref.flatten() - ref.mean(), e2.flatten() - e2.mean()
        corr.append(float((a * b).sum() / (a.norm() * b.norm())))
    out["speckle_correlation_vs_shift_mm"] = dict(zip([round(float(s), 3) for s in shifts], corr))
    ax[3].plot(shifts, corr, "o-")
    ax[3].set_xlabel("lateral probe shift (mm)", fontsize=7)
    res_mm = float(probe.lateral_fwhm_mm(torch.tensor(20.0, dtype=torch.float64)))
    ax[3].axvline(res_mm, color="k", ls="--", lw=0.7, label=f"lateral -6 dB width at 20 mm ({res_mm:.2f} mm)")
    ax[3].legend(fontsize=7)
    ax[3].set_title("speckle correlation vs lateral pose shift (L11-5v)", fontsize=8)
    for a in ax:
        a.tick_params(labelsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(physics_figure(sys.argv[1] if len(sys.argv) > 1 else "ultrasound_physics.png"), indent=1))
