"""Tiny synthetic segmentation data (blobs in noise) written as NIfTI: for smoke tests and examples."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medfast.data.io import save_nifti

__all__ = ["make_blobs"]


def make_blobs(folder: str | Path, n: int = 4, shape: Sequence[int] = (24, 24, 24), classes: int = 3,
               spacing: Sequence[float] | None = None, seed: int = 0, layout: str = "folder") -> tuple[
                   list[str], list[str]]:
    """Writes ``n`` image/label pairs: ``classes - 1`` random ellipsoids (2D: ellipses) on a background,
    class ``c`` with mean intensity ``c`` plus Gaussian noise (std 0.3).

    Parameters
    ----------
    folder : path
        ``layout="folder"``: files go to ``folder/images/case_XXX.nii.gz`` and ``folder/labels/``; ``"flat"``:
        ``folder/case_XXX_img.nii.gz`` and ``..._seg.nii.gz``.
    shape : sequence of int
        2 or 3 spatial sizes (2D images are written as ``(H, W)`` NIfTI files).
    spacing : sequence of float, optional
        Voxel size in mm (default 1); the affine is diagonal with that spacing.

    Returns
    -------
    (list of str, list of str)
        Image and label paths.
    """
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    nd = len(shape)
    sp = np.ones(nd) if spacing is None else np.asarray(spacing, dtype=float)
    affine = np.eye(4)
    affine[np.arange(nd), np.arange(nd)] = sp
    affine[:nd, 3] = -0.5 * np.asarray(shape) * sp
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(float)
    images, labels = [], []
    for i in range(n):
        lab = np.zeros(shape, dtype=np.uint8)
        for c in range(1, classes):
            centre = rng.uniform(0.3, 0.7, nd) * np.asarray(shape)
            radii = rng.uniform(0.15, 0.3, nd) * np.asarray(shape)
            inside = (((grid - centre) / radii) ** 2).sum(-1) <= 1
            lab[inside] = c
        img = (lab.astype(np.float32) + rng.normal(0, 0.3, shape)).astype(np.float32)
        if layout == "folder":
            ip, lp = folder / "images" / f"case_{i:03d}.nii.gz", folder / "labels" / f"case_{i:03d}.nii.gz"
        else:
            ip, lp = folder / f"case_{i:03d}_img.nii.gz", folder / f"case_{i:03d}_seg.nii.gz"
        save_nifti(img, affine, ip)
        save_nifti(lab, affine, lp)
        images.append(str(ip))
        labels.append(str(lp))
    return images, labels
