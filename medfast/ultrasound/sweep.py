"""Freehand sweeps: smooth sequences of probe poses like a tracked hand-held acquisition."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from medfast._typing import ArrayLike, Float, Int, MatrixLike
from medfast.ops._validate import py_scalar

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


def _smooth_noise(n: int, gen: torch.Generator, harmonics: int = 3, samples: int = 257) -> torch.Tensor:
    """(n,) smooth random deviation at t = linspace(0, 1, n), 0 at both ends (the first frame is the
    start pose, the last lies ``travel`` away), largest |value| 1 over the sweep: a few low-frequency
    sinusoids with random phases, minus the straight line through their end values. Its shape is
    drawn on a fixed fine grid, so it does not depend on n (one frame or two: no deviation)."""
    t = torch.linspace(0, 1, samples, dtype=torch.float64)
    out = torch.zeros(samples, dtype=torch.float64)
    for k in range(1, harmonics + 1):
        phase = float(torch.rand(1, generator=gen, dtype=torch.float64)) * 2 * math.pi
        amp = float(torch.rand(1, generator=gen, dtype=torch.float64)) / k
        out += amp * torch.sin(2 * math.pi * k * 0.5 * t + phase)
    out -= out[0] * (1 - t) + out[-1] * t
    out /= max(1e-9, float(out.abs().max()))
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    tn = torch.linspace(0, 1, n, dtype=torch.float64)
    return torch.from_numpy(np.interp(tn.numpy(), t.numpy(), out.numpy()))


def freehand_sweep(
    start_pose: MatrixLike,
    travel_mm: ArrayLike,
    n_frames: Int,
    *,
    tilt_deg: Float = 4.0,
    rock_deg: Float = 4.0,
    twist_deg: Float = 3.0,
    wobble_mm: Float = 1.0,
    seed: Int = 0,
) -> torch.Tensor:
    """Poses of a freehand sweep: the probe slides by ``travel_mm`` (world mm) from ``start_pose``
    with smooth small tilts (about the lateral axis), rocks (about the elevation axis), twists (about
    the beam axis) and positional wobble, as a tracked hand-held probe does.

    Parameters
    ----------
    start_pose : Tensor or ndarray
        ``(4, 4)`` rigid probe-to-world pose of the first frame (mm): the first pose is exactly this.
    travel_mm : sequence of 3 floats, ndarray or Tensor
        Displacement of the array centre from the first to the last frame, world mm (exactly: the
        deviations below are 0 at both ends of the sweep).
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
        ``(n_frames, 4, 4)`` float64 probe-to-world poses, ready for ``simulate`` (one batched call);
        differentiable w.r.t. ``start_pose``.
    """
    if isinstance(start_pose, np.ndarray):
        start_pose = torch.from_numpy(start_pose)
    if not isinstance(start_pose, torch.Tensor) or tuple(start_pose.shape) != (4, 4):
        raise ValueError(f"start_pose must be a (4, 4) tensor or array, got "
                         f"{tuple(start_pose.shape) if hasattr(start_pose, 'shape') else type(start_pose).__name__}")
    # the tensors are read on the host; a complex one lost its imaginary part there, a bool eye was a pose
    for name, t in (("start_pose", start_pose), ("travel_mm", travel_mm)):
        if isinstance(t, torch.Tensor):
            bad_dtype = t.is_complex() or t.dtype == torch.bool
        else:
            bad_dtype = isinstance(t, np.ndarray) and t.dtype.kind in "bc"
        if bad_dtype:
            raise TypeError(f"{name} must hold real numbers (mm), got {t.dtype}")
        if isinstance(t, torch.Tensor) and t.device.type == "meta":
            raise ValueError(f"{name} is a meta tensor: a meta tensor has no values (the sweep is built on the host)")
    pose = start_pose.to(torch.float64)  # keeps the graph: the sweep is differentiable in start_pose
    base = pose.detach()  # for the checks
    rot = base[:3, :3]
    finite = bool(torch.isfinite(base).all())
    orthonormal = finite and float((rot.T @ rot - torch.eye(3, dtype=torch.float64)).abs().max()) <= 1e-3
    last_row = finite and float((base[3] - torch.tensor([0.0, 0, 0, 1], dtype=torch.float64)).abs().max()) <= 1e-6
    if not (orthonormal and last_row and float(torch.linalg.det(rot)) > 0):
        raise ValueError("start_pose must be a finite rigid probe-to-world pose (rotation + translation, last row "
                         "(0, 0, 0, 1))")
    # NumPy scalars and 0-d tensors as the Python numbers they hold (docs/api/interop.md)
    n_frames, seed = py_scalar(n_frames), py_scalar(seed)
    tilt_deg, rock_deg, twist_deg, wobble_mm = (py_scalar(v) for v in (tilt_deg, rock_deg, twist_deg, wobble_mm))
    if isinstance(n_frames, bool) or not isinstance(n_frames, numbers.Integral) or n_frames < 1:
        raise ValueError(f"n_frames must be an int >= 1, got {n_frames!r}")
    n_frames = int(n_frames)
    try:
        travel = torch.as_tensor(travel_mm, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"travel_mm must be 3 finite values, got {travel_mm!r}") from None
    if travel.shape != (3,) or not bool(torch.isfinite(travel).all()):
        raise ValueError(f"travel_mm must be 3 finite values, got {travel_mm!r}")
    for name, value in (("tilt_deg", tilt_deg), ("rock_deg", rock_deg), ("twist_deg", twist_deg),
                        ("wobble_mm", wobble_mm)):
        if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must be a 64-bit int, got {seed!r}")
    gen = torch.Generator().manual_seed(int(seed) % 2**64)
    t = torch.linspace(0, 1, n_frames, dtype=torch.float64)
    angles = [math.radians(a) * _smooth_noise(n_frames, gen) for a in (tilt_deg, rock_deg, twist_deg)]
    wob = torch.stack([wobble_mm * _smooth_noise(n_frames, gen) for _ in range(3)], -1)
    # Rotations in the probe frame: tilt about x (lateral), rock about y (elevation), twist about z.
    R = _rotation(0, angles[0]) @ _rotation(1, angles[1]) @ _rotation(2, angles[2])
    poses = pose.expand(n_frames, 4, 4).clone()
    poses[:, :3, :3] = pose[:3, :3] @ R
    poses[:, :3, 3] = pose[:3, 3] + t[:, None] * travel + wob
    return poses
