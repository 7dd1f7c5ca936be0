"""Segmentation metrics: hard Dice, Hausdorff distance and average surface distance.

Plain PyTorch on the tensor's device (CPU or CUDA) plus :func:`medfast.distance_transform`; results match
MONAI's ``DiceMetric``, ``compute_hausdorff_distance`` and ``compute_average_surface_distance``.
"""

from medfast.metrics._segmentation import dice, hausdorff_distance, surface_distance

__all__ = ["dice", "hausdorff_distance", "surface_distance"]
