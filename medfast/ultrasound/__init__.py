"""Fast, differentiable B-mode ultrasound simulation (CPU + CUDA), see docs/ultrasound.md.

Quick start::

    from medfast.ultrasound import Probe, simulate_ct, look_at, freehand_sweep, read_poses
    probe = Probe.preset("C5-2v")
    pose = look_at(position=(100, 20, 80), direction=(0, 1, 0), lateral=(1, 0, 0))
    poses = freehand_sweep(pose, travel_mm=(0, 0, 40), n_frames=16)
    frames = simulate_ct(ct_hu, affine, poses, probe).bmode   # (16, 1, H, W)
    tracked = read_poses("sweep.seq.mha", calibration="probe_to_sensor.txt")  # or .csv / .npy poses
"""

from medfast.ops._ussim import PROP_NAMES, noise_table, ray_march
from medfast.ultrasound.poses import read_poses
from medfast.ultrasound.probe import Probe
from medfast.ultrasound.simulate import SimulationResult, look_at, simulate, simulate_ct, simulate_labels
from medfast.ultrasound.sweep import freehand_sweep
from medfast.ultrasound.tissue import HU_KNOTS, WATER, LabelTable, hu_to_properties

__all__ = [
    "HU_KNOTS",
    "PROP_NAMES",
    "WATER",
    "LabelTable",
    "Probe",
    "SimulationResult",
    "freehand_sweep",
    "hu_to_properties",
    "look_at",
    "noise_table",
    "ray_march",
    "read_poses",
    "simulate",
    "simulate_ct",
    "simulate_labels",
]
