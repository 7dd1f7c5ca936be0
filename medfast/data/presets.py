"""Built-in data sets made from real images shipped in packages (see DATA.md); selected with
``data.dataset`` in a config. Each builder writes prepared NIfTI files into a folder and returns the
``DataConfig`` file lists to use."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medfast._atomic import replacing
from medfast.data.io import DatasetError

__all__ = ["ITK_DATA", "MRICRON", "mni152_tissue"]

#: Where Debian's insighttoolkit5-examples installs the ITK example data (the KmeansTest segmentation that
#: ``mni152_tissue`` reads).
ITK_DATA = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")
#: Where Debian's mricron-data installs Colin27 and its atlases.
MRICRON = Path("/usr/share/mricron/templates")  # Debian mricron-data: Colin27 and its atlases

#: KmeansTest labels -> the mni152_tissue classes: 4 (darkest brain class, CSF-like) -> 1, 5 (GM) -> 2,
#: 6 (WM) -> 3; 1 (air), 2-3 (scalp/skull) and 0 -> background.
KMEANS_TO_TISSUE = {0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 2, 6: 3}


def _save(img, path: Path) -> None:
    """nibabel save to a temporary name, then rename: concurrent ranks never read a partial file, and a failed
    or interrupted save leaves no temporary one."""
    import nibabel as nib

    with replacing(path) as tmp:
        nib.save(img, str(tmp))


def _mni_files(what: str = "the mni152_tissue data set") -> dict[str, Path]:
    """The MNI152 2009a T1 / GM / WM files of the nilearn wheel; ``what`` names the user in the error."""
    try:
        import nilearn
    except ImportError as exc:
        raise DatasetError(f"{what} needs the nilearn wheel: pip install nilearn") from exc
    root = Path(nilearn.__file__).parent / "datasets" / "data"
    files = {k: root / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
    for path in files.values():
        if not path.is_file():
            raise DatasetError(f"MNI152 file missing from the nilearn wheel: {path}")
    return files


def _mni_tissue() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The MNI152 T1 (float32), its tissue labels (uint8, see :func:`mni152_tissue`) and their affine."""
    import nibabel as nib

    files = _mni_files()
    t1 = nib.load(str(files["t1"]))
    data = np.asarray(t1.dataobj, dtype=np.float32)
    gm = np.asarray(nib.load(str(files["gm"])).dataobj, dtype=np.float32)
    wm = np.asarray(nib.load(str(files["wm"])).dataobj, dtype=np.float32)
    csf = np.clip(255.0 - gm - wm, 0, None)
    labels = (np.argmax(np.stack([csf, gm, wm]), axis=0) + 1).astype(np.uint8)
    labels[data <= 0] = 0
    return data, labels, t1.affine


def mni152_tissue(folder: str | Path, test_subject: bool = True) -> dict[str, list]:
    """MNI152 2009a T1 (brain-extracted) with 4 classes: 0 background (outside the brain), 1 CSF (inside the
    brain mask where neither tissue map dominates), 2 grey matter, 3 white matter: the argmax of
    ``(255 - gm - wm, gm, wm)`` inside ``t1 > 0``.

    With ``test_subject`` (and the Debian ``insighttoolkit5-examples`` package installed) also the ITK
    ``KmeansTest`` subject: its T1 masked to the brain (from ``KmeansTest_T1RawSkullStrip``), reoriented to
    RAS like the MNI152, as a test set with its k-means tissue labels mapped by :data:`KMEANS_TO_TISSUE`. The
    k-means labels are intensity clusters, not manual tracings: an approximate reference.

    Returns
    -------
    dict
        ``train_images``, ``train_labels`` and (if available) ``test_images``, ``test_labels``,
        ``test_label_map``.
    """
    import nibabel as nib

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _mni_files()  # a clear error without the nilearn wheel, even when the files are cached
    img_out, lab_out = folder / "mni152_t1.nii.gz", folder / "mni152_tissue.nii.gz"
    if not (img_out.is_file() and lab_out.is_file()):
        data, labels, affine = _mni_tissue()
        _save(nib.Nifti1Image(data, affine), img_out)
        _save(nib.Nifti1Image(labels, affine), lab_out)
    out: dict[str, list] = {"train_images": [str(img_out)], "train_labels": [str(lab_out)]}
    seg = ITK_DATA / "KmeansTest_T1KmeansPrelimSegmentation.nii.gz"
    mask = ITK_DATA / "KmeansTest_T1RawSkullStrip.nii.gz"
    raw = ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz"
    if test_subject and seg.is_file() and mask.is_file() and raw.is_file():
        t_img, t_lab = folder / "itk_kmeans_t1_brain.nii.gz", folder / "itk_kmeans_labels.nii.gz"
        if not (t_img.is_file() and t_lab.is_file()):
            r = nib.as_closest_canonical(nib.load(str(raw)))
            m = nib.as_closest_canonical(nib.load(str(mask)))
            s = nib.as_closest_canonical(nib.load(str(seg)))
            brain = np.asarray(r.dataobj, dtype=np.float32) * (np.asarray(m.dataobj) > 0)
            _save(nib.Nifti1Image(brain, r.affine), t_img)
            _save(nib.Nifti1Image(np.asarray(s.dataobj).astype(np.uint8), s.affine), t_lab)
        out.update(test_images=[str(t_img)], test_labels=[str(t_lab)], test_label_map=KMEANS_TO_TISSUE)
    return out
