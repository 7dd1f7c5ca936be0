"""Data: NIfTI I/O (nibabel), datasets from file lists or ``images/`` + ``labels/`` folders, preprocessing
(resampling with :func:`medfast.resample`, crop/pad, intensity normalization), caching, and on-device
augmentation built on :func:`medfast.affine_warp` and :func:`medfast.integrate`."""

from medfast.data.augment import AugmentConfig, RandomAugment, random_crop_theta
from medfast.data.dataset import NiftiDataset, collate, find_pairs
from medfast.data.io import DatasetError, Volume, load_nifti, save_nifti, voxel_spacing
from medfast.data.preprocess import crop_or_pad, normalize_intensity, resample_to_spacing, spatial_affine

__all__ = [
    "AugmentConfig",
    "DatasetError",
    "NiftiDataset",
    "RandomAugment",
    "Volume",
    "collate",
    "crop_or_pad",
    "find_pairs",
    "load_nifti",
    "normalize_intensity",
    "random_crop_theta",
    "resample_to_spacing",
    "save_nifti",
    "spatial_affine",
    "voxel_spacing",
]
