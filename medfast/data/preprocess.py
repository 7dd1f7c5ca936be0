"""Preprocessing applied once per subject on load: resampling to a target spacing (medfast.resample),
centred crop/pad to a shape, intensity normalization. Each function returns the new affine too."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from medfast._typing import MatrixLike, ShapeLike
from medfast.ops._validate import check_tensor, plain, py_scalar

__all__ = ["LEGACY_REORIENT_DIMS", "REORIENT_DIMS", "closest_orientation", "crop_or_pad", "normalize_intensity",
           "reorient_dims_of", "reorient_to_ras", "resample_to_spacing", "spatial_affine"]


#: The spatial dims that ``data.reorient`` (``NiftiDataset(reorient=True)``) reorients. Checkpoints record it
#: (``"reorient_dims"``); one without the key was trained when 2D images were used in storage order.
REORIENT_DIMS: tuple[int, ...] = (2, 3)
#: What a checkpoint without ``"reorient_dims"`` means: 3D volumes reoriented, 2D images in storage order.
LEGACY_REORIENT_DIMS: tuple[int, ...] = (3,)


def reorient_dims_of(checkpoint: dict) -> tuple[int, ...]:
    """The ``"reorient_dims"`` a checkpoint dict records (:data:`LEGACY_REORIENT_DIMS` without the key)."""
    dims = checkpoint.get("reorient_dims") if isinstance(checkpoint, dict) else None
    if dims is None:
        return LEGACY_REORIENT_DIMS
    return tuple(int(d) for d in dims)


def _canonical_plane_rotation(affine: np.ndarray) -> np.ndarray | None:
    """``(2, 3)``: world -> in-plane coordinates of the plane of voxel axes 0 and 1 of a 4x4 affine, for a normal
    whose sign does not depend on the storage order (None for an axial or degenerate plane: world x, y).

    :func:`spatial_affine` orients the normal with ``n_z >= 0``, which leaves its sign to the storage order for
    a plane that contains the z axis (coronal, sagittal): a flipped or transposed copy of the same slice then
    gets a mirrored frame. Reorientation must not depend on it, so ties go to ``n_y``, then ``n_x``."""
    normal = np.cross(affine[:3, 0], affine[:3, 1])
    norm = np.linalg.norm(normal)
    if not np.any(affine[2, :2]) or not np.isfinite(norm) or norm == 0:
        return None
    normal = normal / norm
    lead = next((v for v in normal[::-1] if abs(v) > 1e-6), 1.0)  # z, then y, then x decides the sign
    if lead < 0:
        normal = -normal
    if normal[2] <= -1 + 1e-12:  # cannot happen after the sign choice; guards the division below
        return None
    v = np.cross(normal, [0.0, 0.0, 1.0])
    vx = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    return (np.eye(3) + vx + vx @ vx / (1.0 + normal[2]))[:2]


def closest_orientation(affine: np.ndarray, spatial_dims: int) -> np.ndarray:
    """nibabel's orientation array ``(spatial_dims, 2)`` (``io_orientation``) that flips/permutes the voxel axes
    to point closest to the positive axes of the image's frame: world R, A, S in 3D; in 2D the in-plane frame
    (x, y: R, A for an axial image; a tilted plane laid flat as :func:`spatial_affine` does, with the normal's
    sign fixed independently of the storage order). The same world grid stored in any axis order or direction
    gives voxel axes along the same world directions.

    ``affine`` is the 4x4 NIfTI affine (or, in 2D, an in-plane ``(3, 3)`` one, used as is)."""
    from nibabel import orientations as ornt_mod

    affine = np.asarray(affine, dtype=np.float64)
    if spatial_dims == 3:
        return ornt_mod.io_orientation(spatial_affine(affine, 3))
    if spatial_dims != 2:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    a2 = spatial_affine(affine, 2)
    rot = _canonical_plane_rotation(affine) if affine.shape == (4, 4) else None
    if rot is not None:
        a2 = np.eye(3)
        a2[:2] = rot @ affine[:3, [0, 1, 3]]
    return ornt_mod.io_orientation(a2)


def reorient_to_ras(data: np.ndarray, affine: np.ndarray, channels: bool) -> tuple[np.ndarray, np.ndarray]:
    """Flips/permutes the spatial axes so that they point closest to the image frame's positive axes (nibabel's
    ``as_closest_canonical`` on arrays; :func:`closest_orientation`); exact (no interpolation), the affine is
    updated so every voxel keeps its world position.

    3D: Right, Anterior, Superior; returns the ``(4, 4)`` affine. 2D (``(C, X, Y)`` / ``(X, Y)``): the in-plane
    frame of :func:`spatial_affine` (R, A for an axial image); returns the ``(3, 3)`` in-plane affine (that of
    :func:`spatial_affine`, reoriented), so the same slice stored flipped or transposed gives the same array.

    Parameters
    ----------
    data : ndarray
        ``(C, *S)`` with ``channels`` else ``(*S)``, 2 or 3 spatial axes.
    affine : ndarray
        ``(4, 4)`` voxel-to-world affine (2D: or the ``(3, 3)`` in-plane one).
    """
    from nibabel import orientations as ornt_mod

    spatial = data.shape[1:] if channels else data.shape
    nd = len(spatial)
    affine = np.asarray(affine, dtype=np.float64)
    ornt = closest_orientation(affine, nd)
    if nd == 2:
        affine = spatial_affine(affine, 2)
    if np.array_equal(ornt, [[i, 1] for i in range(nd)]):
        return data, affine
    new_affine = affine @ ornt_mod.inv_ornt_aff(ornt, spatial)
    if channels:
        out = np.stack([ornt_mod.apply_orientation(c, ornt) for c in data])
    else:
        out = ornt_mod.apply_orientation(data, ornt)
    return np.ascontiguousarray(out), new_affine


def spatial_affine(affine: MatrixLike, ndim: int) -> np.ndarray:
    """The ``(ndim + 1, ndim + 1)`` affine of the first ``ndim`` spatial axes of a 4x4 NIfTI affine.

    An ``(ndim + 1, ndim + 1)`` affine is returned as is (any ``ndim >= 1``); a 4x4 one serves ``ndim`` 1 to 3.
    For ``ndim=3`` the rows and columns of the 3 axes are kept.

    For ``ndim=2`` (a 2D image stored in a NIfTI: its plane is spanned by voxel axes 0 and 1) the 2D affine maps
    voxels to coordinates (mm) in the image's plane: world space is turned by the smallest rotation ``Rot`` that
    takes the plane's unit normal ``n`` (the sign with ``n_z >= 0``) to the world z axis, which lays the plane
    flat onto x-y, and the x, y rows are kept: ``a2[:2] = P @ A[:3, [0, 1, 3]]`` with ``P = Rot[:2]``.
    So an axial image (``A[2, :2] == 0``, any in-plane orientation, flipped axes included) gets exactly rows and
    columns 0, 1, 3 of ``A``, and a coronal, sagittal or oblique one its true in-plane voxel sizes, angles and
    distances (``P`` is orthonormal on the plane; shear and flips are kept). World positions are recovered with
    ``Q = P.T`` (``(3, 2)``, an orthonormal basis of the plane): ``A @ [i, j, 0, 1]`` is
    ``Q @ (a2 @ [i, j, 1])[:2] + n (n . A[:3, 3])``, which holds for any 2D grid whose affine is derived from
    ``a2`` (resampled, cropped). A singular affine (voxel axes 0 and 1 parallel) keeps rows and columns 0, 1, 3.
    """
    ndim = py_scalar(ndim)  # NumPy ints and 0-d integer tensors as the ints they hold
    if isinstance(ndim, bool) or not isinstance(ndim, int) or ndim < 1:
        raise ValueError(f"ndim must be an int >= 1 (the number of spatial axes), got {ndim!r}")
    # a 4x4 NIfTI affine has 3 spatial axes: more read row 3 twice (garbage), 2**63 overflowed unnamed
    nifti = ndim <= 3
    shapes = " or ".join(dict.fromkeys([f"({ndim + 1}, {ndim + 1})"] + (["(4, 4)"] if nifti else [])))
    try:
        affine = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"affine must be a numeric {shapes} matrix, got {affine!r}") from None
    if not nifti and affine.shape != (ndim + 1, ndim + 1):
        raise ValueError(f"ndim={ndim} spatial axes need an ({ndim + 1}, {ndim + 1}) affine (a 4x4 NIfTI affine has "
                         f"3), got shape {affine.shape}")
    if affine.shape not in ((ndim + 1, ndim + 1), (4, 4)):
        raise ValueError(f"affine must be a {shapes} matrix for {ndim} spatial axes, got shape {affine.shape}")
    if not np.isfinite(affine).all():
        raise ValueError(f"affine must be finite, got {affine.tolist()}")
    if affine.shape == (ndim + 1, ndim + 1):
        return affine
    idx = list(range(ndim)) + [3]
    out = affine[np.ix_(idx, idx)]
    if ndim != 2 or affine.shape != (4, 4) or not np.any(affine[2, :2]):
        return out  # 3D, or an axial 2D plane: x, y are its in-plane coordinates
    normal = np.cross(affine[:3, 0], affine[:3, 1])
    norm = np.linalg.norm(normal)
    if not np.isfinite(norm) or norm == 0:
        return out
    normal = normal / norm
    if normal[2] < 0:
        normal = -normal
    # Rodrigues: the rotation about n x z that takes n to z (n_z >= 0, so 1 + n_z >= 1)
    v = np.cross(normal, [0.0, 0.0, 1.0])
    vx = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    rot = np.eye(3) + vx + vx @ vx / (1.0 + normal[2])
    res = np.eye(3)
    res[:2] = rot[:2] @ affine[:3, [0, 1, 3]]
    return res


def resample_to_spacing(image: torch.Tensor, affine: MatrixLike, spacing: Sequence[float] | np.ndarray | torch.Tensor,
                        *, mode: str | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Resamples an image ``(C, *S)`` or a label map ``(*S)`` to voxels of size ``spacing`` (mm).

    The layout follows from the rank: ``spacing`` gives the number of spatial axes (2 or 3), and ``image`` has
    that many axes (``(*S)``, no channel axis: a label map) or one more (``(C, *S)``), whatever its dtype.
    The new grid covers the same field of view: its shape is ``round(S * old_spacing / spacing)`` and its
    first voxel centre sits half a new voxel inside the old grid's corner. Directions are kept. Uses
    :func:`medfast.resample` (``border`` padding).

    Parameters
    ----------
    mode : {"nearest", "linear", "cubic"}, optional
        Interpolation; default ``"nearest"`` for an integer tensor (label values are not averaged) and
        ``"linear"`` for a floating one. Integer results are rounded (and clipped to the dtype's range).

    Returns
    -------
    (Tensor, ndarray)
        The resampled tensor (same rank and dtype as the input) and its ``(ndim + 1, ndim + 1)`` affine.
    """
    from medfast.ops import resample

    image = check_tensor("image", image)
    if image.is_complex() or image.dtype == torch.bool:
        raise TypeError(f"image must be a real (integer or floating) tensor, got {image.dtype}")
    try:
        new = np.asarray([py_scalar(v) for v in spacing], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be 2 or 3 positive finite numbers (mm), got {spacing!r}") from None
    ndim = len(new)
    if ndim not in (2, 3) or image.dim() not in (ndim, ndim + 1):
        raise ValueError(f"image must be (*S) (a label map) or (C, *S) with one spatial axis per spacing value; got "
                         f"shape {tuple(image.shape)} for {ndim} spacing values {list(spacing)}")
    if not (np.isfinite(new).all() and (new > 0).all()):
        raise ValueError(f"spacing must be {ndim} positive finite numbers (mm), got {list(spacing)}")
    if mode is None:
        mode = "linear" if image.is_floating_point() else "nearest"
    if mode not in ("nearest", "linear", "cubic"):
        raise ValueError(f"mode must be one of 'nearest', 'linear', 'cubic'; got {mode!r}")
    channels = image.dim() == ndim + 1
    x = image if channels else image[None]
    a = spatial_affine(affine, ndim)
    old = np.sqrt((a[:ndim, :ndim] ** 2).sum(axis=0))
    if not (old > 0).all():
        raise ValueError(f"affine has a zero voxel size along axis {int(np.argmin(old))}: {a.tolist()}")
    if np.allclose(old, new, rtol=1e-4):
        return image, a
    shape = np.maximum(1, np.round(np.array(x.shape[1:]) * old / new))
    if np.prod(shape) > 2.0**31:  # a spacing in metres or a typo (1e-9): a terabyte allocation otherwise
        raise ValueError(f"spacing {list(spacing)} would resample the {list(x.shape[1:])} image at "
                         f"{[float(v) for v in old]} mm to {[int(v) for v in shape]} voxels (over 2^31); "
                         "spacing is in mm")
    shape = shape.astype(int)
    scale = new / old
    out_aff = a.copy()
    out_aff[:ndim, :ndim] = a[:ndim, :ndim] * scale[None, :]
    # corner of the field of view (voxel -0.5) stays put: new voxel 0 centre at old voxel 0.5*scale - 0.5
    out_aff[:ndim, ndim] = a[:ndim, :ndim] @ (0.5 * scale - 0.5) + a[:ndim, ndim]
    # float64 keeps every int32 / int64 value exact (float32 rounds them above 2^24)
    work = torch.float64 if image.dtype in (torch.int32, torch.int64) else torch.float32
    out = resample(plain(x).to(work)[None], a, out_aff, [int(s) for s in shape], mode=mode, padding="border")[0]
    if not image.is_floating_point():
        info = torch.iinfo(image.dtype)
        out = out.round().clamp(info.min, info.max)  # (cubic overshoots)
    out = out.to(image.dtype)
    return (out if channels else out[0]), out_aff


def crop_or_pad(image: torch.Tensor, affine: MatrixLike, shape: ShapeLike, *,
                value: float = 0.0) -> tuple[torch.Tensor, np.ndarray]:
    """Centred crop and/or zero-pad of the trailing spatial axes of ``image`` to ``shape``; moves the affine's
    origin so that every kept voxel stays at the same world position."""
    image = check_tensor("image", image)
    ndim = len(shape)
    shape = [py_scalar(t) for t in shape]  # torch.Size, NumPy or 0-d tensor sizes too
    if ndim == 0 or any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 1 for t in shape):
        raise ValueError(f"shape must be positive ints (one per spatial axis), got {tuple(shape)}")
    if image.dim() < ndim:
        raise ValueError(f"image must have at least the {ndim} spatial axes of shape {tuple(shape)}, got shape "
                         f"{tuple(image.shape)}")
    image = plain(image)  # a MetaTensor's affine would stay the uncropped grid's: the returned one is right
    sizes = image.shape[-ndim:]
    a = spatial_affine(affine, ndim).copy()
    slices, pads, shift = [], [], np.zeros(ndim)
    for i, (s, t) in enumerate(zip(sizes, shape)):
        if s >= t:
            lo = (s - t) // 2
            slices.append(slice(lo, lo + t))
            pads.append((0, 0))
            shift[i] = lo
        else:
            lo = (t - s) // 2
            slices.append(slice(None))
            pads.append((lo, t - s - lo))
            shift[i] = -lo
    out = image[(...,) + tuple(slices)]
    flat = [p for pair in reversed(pads) for p in pair]
    if any(flat):
        out = torch.nn.functional.pad(out, flat, value=value)
    a[:ndim, ndim] = a[:ndim, :ndim] @ shift + a[:ndim, ndim]
    return out.contiguous(), a


def _small_negatives(x: torch.Tensor) -> bool:
    """No negative voxel, or negative ones whose mean magnitude is at most a tenth of the positive voxels' median:
    interpolation ringing (a masked MR resampled with a cubic kernel: ~10 % of its voxels, a few percent of its
    intensities), not intensities of their own (a CT: air -1000 HU, fat -100, next to soft tissue's +40)."""
    neg = x[x < 0]
    if neg.numel() == 0:
        return True
    pos = x[x > 0]
    return pos.numel() > 0 and float(-neg.mean()) <= 0.1 * float(pos.median())


def normalize_intensity(image: torch.Tensor, method: str = "zscore",
                        clip_percentiles: Sequence[float] | None = None) -> torch.Tensor:
    """Per-channel intensity normalization of ``(C, *S)``.

    ``"zscore"``: zero mean, unit variance (the population variance, dividing by n, as MONAI and nnU-Net); when
    5-100 % of the voxels are non-zero and the negative ones, if any, are small (their mean magnitude at most a
    tenth of the positive voxels' median: the ringing of a masked image resampled with a cubic or sinc kernel)
    the image is masked (e.g. skull-stripped: 0 is its
    background), the statistics come from the non-zero voxels and the zeros stay 0, as MONAI's
    ``NormalizeIntensity(nonzero=True)``; otherwise from every voxel (a CT's 0 HU is water, not background: its
    air and fat lie at -1000 and -100 HU next to soft tissue's +40, and all voxels count);
    ``"minmax"``: to [0, 1]; ``"none"``. ``clip_percentiles=(lo, hi)`` first clips each channel to those
    percentiles (0-100). A NaN or infinite voxel raises ``ValueError`` (no statistic would mean anything).
    """
    image = check_tensor("image", image)
    if image.dim() < 2:
        raise ValueError(f"image must be a (C, *S) tensor, got shape {tuple(image.shape)}")
    if image.is_complex():
        raise TypeError(f"image must be a real tensor, got {image.dtype}")
    if method not in ("zscore", "minmax", "none"):
        raise ValueError(f"normalize must be one of zscore, minmax, none; got {method!r}")
    if clip_percentiles is not None:
        try:
            lo_p, hi_p = (float(p) for p in clip_percentiles)
        except (TypeError, ValueError):
            raise ValueError(f"clip_percentiles must be two percentiles (lo, hi), got {clip_percentiles!r}") from None
        if not 0 <= lo_p < hi_p <= 100:
            raise ValueError(f"clip_percentiles must satisfy 0 <= lo < hi <= 100, got {clip_percentiles!r}")
    out = image.to(torch.float32).clone()
    if method != "none" or clip_percentiles is not None:
        bad = ~torch.isfinite(out)
        if bad.any():
            raise ValueError(f"image has {int(bad.sum())} NaN or infinite voxel(s) (first at index "
                             f"{[int(i) for i in bad.nonzero()[0]]}); {method} normalization needs finite values")
    for c in range(out.shape[0]):
        x = out[c]
        if clip_percentiles is not None:
            lo, hi = lo_p / 100, hi_p / 100
            flat = x.flatten()
            if flat.numel() > 2_000_000:  # an even subsample; integer indices (float32 ones round past 2^24)
                flat = flat[torch.arange(2_000_000) * (flat.numel() - 1) // (2_000_000 - 1)]
            qlo, qhi = torch.quantile(flat, torch.tensor([lo, hi], dtype=flat.dtype))
            x.clamp_(qlo, qhi)
        if method == "zscore":
            mask = x != 0
            # masked image (e.g. skull-stripped): zeros are its background unless the image has real intensities
            # below them (a CT); ringing of a resampled masked MR (up to ~10 % of its voxels, small) does not count
            nonzero = int(mask.sum())
            masked = 0.05 * x.numel() < nonzero < x.numel() and _small_negatives(x)
            ref = x[mask] if masked else x
            # the population std (correction=0), as MONAI's NormalizeIntensity and nnU-Net's ZScoreNormalization
            std, mean = torch.std_mean(ref, correction=0) if ref.numel() > 1 else (ref.new_zeros(()), ref.mean())
            if not float(std) > 1e-6 * float(mean.abs()):
                # constant (to float32 rounding): 0, not the rounding error of the mean divided by 1e-8
                x.zero_()
            elif masked:
                x.copy_(torch.where(mask, (x - mean) / std, torch.zeros_like(x)))
            else:
                x.sub_(mean).div_(std)
        elif method == "minmax":
            x.sub_(x.min()).div_((x.max() - x.min()).clamp_min(1e-8))
    return out
