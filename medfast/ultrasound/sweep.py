"""Freehand sweeps: smooth sequences of probe poses like a tracked hand-held acquisition."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["freehand_sweep"]


def _rotation(axis: int, angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    R = torch.zeros(angle.shape + (3, 3), dtype=angle.dtype)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    R[..., axis, axis] = 1
    R[..., i, i] = c
    R[..., j, j] = c
    R[..., i, j] = -s
    R[..., j, i] = s
    return R


def _smooth_noise(n: int, gen: torch.Generator, harmonics: int = 3) -> torch.Tensor:
    """(n,) smooth random curve in [-1, 1]-ish: a few low-frequency sinusoids with random phases."""
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    out = torch.zeros(n, dtype=torch.float64)
    for k in range(1, harmonics + 1):
        phase = float(torch.rand(1, generator=gen, dtype=torch.float64)) * 2 * math.pi
        amp = float(torch.rand(1, generator=gen, dtype=torch.float64)) / k
        out += amp * torch.sin(2 * math.pi * k * 0.5 * t + phase)
    return out / max(1e-9, float(out.abs().max()))


def freehand_sweep(
    start_pose: torch.Tensor,
    travel_mm: Sequence[float],
    n_frames: int,
    *,
    tilt_deg: float = 4.0,
    rock_deg: float = 4.0,
    twist_deg: float = 3.0,
    wobble_mm: float = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    """Poses of a freehand sweep: the probe slides by ``travel_mm`` (world mm) from ``start_pose``
    with smooth small tilts (about the lateral axis), rocks (about the elevation axis), twists (about
    the beam axis) and positional wobble, as a tracked hand-held probe does.

    Parameters
    ----------
    start_pose : Tensor
        ``(4, 4)`` probe-to-world pose of the first frame (mm).
    travel_mm : sequence of 3 floats
        Displacement of the array centre from the first to the last frame, world mm.
    n_frames : int
        Number of poses (>= 1).
    tilt_deg, rock_deg, twist_deg : float
        Largest deviation of each rotation (degrees).
    wobble_mm : float
        Largest positional deviation from the straight path (mm).
    seed : int
        Seed of the smooth random deviations.

    Returns
    -------
    Tensor
        ``(n_frames, 4, 4)`` float64 probe-to-world poses, ready for ``simulate`` (one batched call).
    """
    if not isinstance(start_pose, torch.Tensor) or start_pose.shape != (4, 4):
        raise ValueError(f"start_pose must be a (4, 4) tensor, got {getattr(start_pose, 'shape', start_pose)}")
    if not isinstance(n_frames, int) or n_frames < 1:
        raise ValueError(f"n_frames must be an int >= 1, got {n_frames!r}")
    travel = torch.as_tensor(travel_mm, dtype=torch.float64)
    if travel.shape != (3,):
        raise ValueError(f"travel_mm must have 3 values, got {tuple(travel.shape)}")
    gen = torch.Generator().manual_seed(int(seed))
    base = start_pose.detach().to(torch.float64)
    t = torch.linspace(0, 1, n_frames, dtype=torch.float64)
    angles = [math.radians(a) * _smooth_noise(n_frames, gen) for a in (tilt_deg, rock_deg, twist_deg)]
    wob = torch.stack([wobble_mm * _smooth_noise(n_frames, gen) for _ in range(3)], -1)
    # Rotations in the probe frame: tilt about x (lateral), rock about y (elevation), twist about z.
    R = _rotation(0, angles[0]) @ _rotation(1, angles[1]) @ _rotation(2, angles[2])
    poses = base.expand(n_frames, 4, 4).clone()
    poses[:, :3, :3] = base[:3, :3] @ R
    poses[:, :3, 3] = base[:3, 3] + t[:, None] * travel + wob
    return poses
