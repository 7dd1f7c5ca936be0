"""``medfast evaluate``: Dice, Hausdorff-95 and average symmetric surface distance of predicted label maps
against reference label maps (NIfTI), per case and class, in millimetres from the files' affines.

The metrics are :func:`medfast.metrics.dice`, :func:`medfast.metrics.hausdorff_distance` and
:func:`medfast.metrics.surface_distance` (the numbers of MONAI's ``DiceMetric``,
``compute_hausdorff_distance`` and ``compute_average_surface_distance``), so a folder of predictions is
scored in seconds where the scipy-based route takes minutes. Writes ``metrics.csv`` (one row per case and
class found in the prediction or the reference) and ``summary.json`` (per class: mean, standard deviation and
count over the cases where the metric is defined), and prints the summary.
"""

from __future__ import annotations

import argparse
import csv
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfast._jsonsafe import dumps as json_dumps
from medfast.data.dataset import _SUFFIXES, CHANNEL_SUFFIX, _is_nifti_name, _stem, case_name
from medfast.data.io import DatasetError, Volume, load_nifti, same_grid, single_slice_as_2d, voxel_spacing

__all__ = ["case_dice", "class_counts", "evaluate_pair", "find_evaluation_pairs", "finite_mean", "run_evaluate",
           "summarize"]

METRICS = ("dice", "hd", "asd")
CSV_FIELDS = ("case", "class", *METRICS, "pred_voxels", "reference_voxels")


def find_evaluation_pairs(pred: str | Path, reference: str | Path) -> list[tuple[Path, Path]]:
    """(prediction, reference) file pairs: two files, or two folders matched by name.

    In folder mode every reference ``<name>.nii[.gz]`` needs a prediction named ``<name>.nii[.gz]`` or
    ``<name>_seg.nii[.gz]`` (what ``medfast predict`` writes, also for nnU-Net-named images
    ``<name>_0000.nii.gz``, and for a case stored one file per channel, ``<name>_0000``, ``<name>_0001``, ...),
    or ``<name>_0000_seg.nii[.gz]`` (older medfast predict outputs of such images);
    predictions without a reference are ignored.

    Raises
    ------
    DatasetError
        A missing path, a file paired with a folder, an empty reference folder, or a reference without a
        prediction (named).
    """
    pred, reference = Path(pred), Path(reference)
    for what, path in (("prediction", pred), ("reference", reference)):
        if not path.exists():
            raise DatasetError(f"{what} not found: {path}")
    if pred.is_file() and reference.is_file():
        return [(pred, reference)]
    if not (pred.is_dir() and reference.is_dir()):
        raise DatasetError(f"give two NIfTI files or two folders, got {pred} and {reference}")
    # not dot files (macOS AppleDouble "._case.nii.gz" companions are no NIfTI)
    refs = sorted(p for p in reference.iterdir() if _is_nifti_name(p.name) and not p.name.startswith("."))
    if not refs:
        raise DatasetError(f"no NIfTI files (*.nii, *.nii.gz) in the reference folder {reference}")
    # the prediction folder's NIfTI files by name with the suffix in lower case: suffixes match in any case
    # (SCAN.NII.GZ), case names exactly (A and a are two cases)
    available = {_lower_suffix(p.name): p for p in sorted(pred.iterdir()) if _is_nifti_name(p.name) and p.is_file()}
    pairs = []
    for ref in refs:
        stem = _stem(ref)
        # as `medfast predict` names them: after the case (an nnU-Net _0000 image suffix dropped)
        names = dict.fromkeys((stem, stem + "_seg", stem + CHANNEL_SUFFIX + "_seg", case_name(ref) + "_seg"))
        found = list(dict.fromkeys(available[key] for name in names for suf in _SUFFIXES
                                   if (key := name + suf) in available))
        if not found:
            raise DatasetError(f"no prediction for {ref} in {pred} (expected {pred / (stem + '.nii.gz')} or "
                               f"{pred / (stem + '_seg.nii.gz')})")
        if len(found) > 1:  # e.g. predictions written beside their images: the image would be scored as a label map
            raise DatasetError(f"several predictions for {ref} in {pred}: {', '.join(f.name for f in found)}; keep "
                               f"one (or give the predictions a folder of their own)")
        pairs.append((found[0], ref))
    return pairs


def _lower_suffix(name: str) -> str:
    """``name`` with its ``.nii`` / ``.nii.gz`` suffix in lower case (the case name as it is)."""
    suffix = next(suf for suf in sorted(_SUFFIXES, key=len, reverse=True) if name.lower().endswith(suf))
    return name[: len(name) - len(suffix)] + suffix


def _as_2d(vol: Volume) -> Volume:
    """A label map stored ``(X, Y, 1)`` -- how 2D label maps are often stored, and how ``medfast predict`` writes
    the segmentation of such an input -- as the 2D ``(X, Y)`` map it is (scored as a one-slice 3D volume, every
    foreground pixel would be surface, and HD / ASSD would be wrong); likewise a single sagittal or coronal
    slice ``(1, Y, Z)`` / ``(X, 1, Z)``, whose affine's columns follow its axes (so that the spacing is the
    in-plane one); other maps unchanged."""
    data, affine = single_slice_as_2d(vol.data, vol.affine)
    return vol if data is vol.data else Volume(data, affine, vol.header, vol.path)


def scoring_spacing(vol: Volume) -> list[float]:
    """The voxel size (mm) of ``vol``'s spatial axes, from its affine: 2 values for a 2D map, 3 for a 3D one."""
    return [float(s) for s in voxel_spacing(vol.affine)[: vol.data.ndim]]


def _check_same_space(pred: Any, ref: Any) -> bool:
    """Raises DatasetError unless the two maps share a grid; returns whether the grid is sheared (its voxel axes
    not at right angles: distances from its voxel size would be wrong there)."""
    if pred.data.shape != ref.data.shape:
        raise DatasetError(f"{pred.path} has shape {pred.data.shape} but its reference {ref.path} has "
                           f"{ref.data.shape}")
    try:  # in the reference's voxels (a tolerance in mm let a 1.8-voxel shift of 0.5 um voxels pass)
        on_grid = same_grid(pred.affine, ref.affine, ref.data.shape)
    except np.linalg.LinAlgError:
        raise DatasetError(f"{ref.path}: its affine is singular: {np.asarray(ref.affine).tolist()}") from None
    if not on_grid:
        raise DatasetError(f"{pred.path} and its reference {ref.path} have different affines (not the same voxel "
                           f"grid): resample the prediction to the reference first")
    if pred.data.ndim not in (2, 3) or sum(n > 1 for n in ref.data.shape) < 2:
        raise DatasetError(f"{ref.path}: expected a 2D or 3D label map (at least two axes longer than one voxel), "
                           f"got shape {ref.data.shape}")
    return sheared_grid(ref.affine, ref.data.ndim)


def sheared_grid(affine: Any, ndim: int) -> bool:
    """Whether the first ``ndim`` voxel axes of ``affine`` (a ``(4, 4)`` NIfTI affine, or an ``(ndim + 1,
    ndim + 1)`` one) are not at right angles in world space: distances from per-axis voxel sizes hold on a grid
    of right angles only (a gantry tilt shears it)."""
    a = np.asarray(affine, dtype=np.float64)
    lin = a[: len(a) - 1, :ndim]  # the map's axes in world space (a coronal slice's second axis is z)
    cols = lin / np.linalg.norm(lin, axis=0)
    return bool(np.abs(cols.T @ cols - np.eye(cols.shape[1])).max() > 1e-3)


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, num_classes)`` int64 voxel counts of each class in each batch element of a ``(B, *S)`` label map
    whose values lie in ``0 .. num_classes - 1``."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() or labels.dim() < 1:
        raise TypeError(f"labels must be an integer (B, *S) label map tensor, got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    b = labels.shape[0]
    offset = torch.arange(b, device=labels.device).view(b, 1) * num_classes
    flat = (labels.reshape(b, -1).long() + offset).flatten()
    return torch.bincount(flat, minlength=b * num_classes).view(b, num_classes)


def case_dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int, *, include_background: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dice per batch element and class as ``medfast evaluate``, the validation and the test set after training
    score it (nnU-Net's and BraTS's rule): 0 for a class in only one of ``pred`` and ``target`` (a false positive
    is a miss; :func:`medfast.metrics.dice`'s default, MONAI's ``ignore_empty``, makes a false positive NaN,
    which nan-aware means then skip), NaN only for a class in neither.

    ``pred``, ``target``: ``(B, *S)`` label maps in ``0 .. num_classes - 1``. Returns ``(dice, pred_voxels,
    target_voxels)``, each ``(B, C')`` (``C'`` the classes from 1, or from 0 with ``include_background``):
    float32 Dice and the int64 voxel counts of each class."""
    from medfast import metrics

    first = 0 if include_background else 1
    dice = metrics.dice(pred, target, num_classes, include_background=include_background, ignore_empty=False)
    n_p = class_counts(pred, num_classes)[:, first:]
    n_t = class_counts(target, num_classes)[:, first:]
    return torch.where((n_p == 0) & (n_t == 0), torch.nan, dice), n_p, n_t


def finite_mean(values: Any) -> tuple[float, int]:
    """The mean of the finite entries of ``values`` and their number (NaN and 0 where there are none, without
    NumPy's "Mean of empty slice" warning): a per-case or per-set mean Dice over the classes / cases it is
    defined for."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    return (float(v.mean()) if v.size else math.nan), int(v.size)


def _present_values(*maps: np.ndarray) -> np.ndarray:
    """The sorted label values found in any of ``maps`` (non-negative int64 arrays)."""
    top = max(int(m.max(initial=0)) for m in maps)
    if top < 1 << 20:  # a count per value: ~10x faster than a sort
        seen = np.zeros(top + 1, dtype=bool)
        for m in maps:
            seen |= np.bincount(m.ravel(), minlength=top + 1) > 0
        return np.flatnonzero(seen)
    return np.unique(np.concatenate([np.unique(m) for m in maps]))


def evaluate_pair(
    pred: str | Path,
    reference: str | Path,
    num_classes: int | None = None,
    *,
    percentile: float = 95,
    include_background: bool = False,
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """Dice, HD (``percentile``) and ASSD of one predicted label map against its reference.

    Only the classes found in the prediction or the reference are measured (their label values remapped to
    ``0 .. K - 1`` for the metrics): sparse label sets such as FreeSurfer's (2 .. 60, 1035 / 2035, 11101 ..
    12175) cost what their few present classes cost, not the largest label value.

    Parameters
    ----------
    pred, reference : path
        NIfTI label maps on the same voxel grid (same shape and affine); distances use the voxel size of the
        reference's affine, in mm. A map stored ``(X, Y, 1)`` is scored as the 2D image ``(X, Y)`` (2D surface
        distances, with the in-plane voxel size), as is a 2D ``(X, Y)`` file.
    num_classes : int, optional
        Labels are ``0 .. num_classes - 1``, and every one of them gets a row (those in neither map: NaN,
        not measured). Default: rows only for the label values found in the prediction or the reference.
    percentile : float
        Of the Hausdorff distance (95: HD95; 100: the maximum).
    include_background : bool
        Also score label 0.
    device : str or torch.device
        Where the metrics run.

    Returns
    -------
    list of dict
        One row per class, in increasing label value: ``case`` (the reference's name), ``class`` (the label
        value), ``dice`` (0 for a class in only one map, see :func:`case_dice`), ``hd`` (at ``percentile``),
        ``asd`` (symmetric; NaN where a metric is undefined: both masks empty, and for HD and ASD also
        exactly one empty, where MONAI gives nan or inf), and the voxel counts ``pred_voxels`` /
        ``reference_voxels``.

    Raises
    ------
    DatasetError
        Unreadable files, non-integer labels, different shapes or affines, labels >= num_classes (named).
    """
    from medfast import metrics
    from medfast.ops._distance import _check_spacing

    p, r = _as_2d(load_nifti(pred, label=True)), _as_2d(load_nifti(reference, label=True))
    sheared = _check_same_space(p, r)
    if sheared:
        warnings.warn(f"{reference}: its voxel axes are not at right angles (a sheared grid, e.g. a CT with gantry "
                      f"tilt): Dice is scored, the surface distances are NaN (resample the reference and the "
                      f"prediction to a grid of right angles to score them)", stacklevel=2)
    present = _present_values(p.data, r.data)
    top = int(present[-1]) if present.size else 0
    if num_classes is not None and top >= num_classes:
        raise DatasetError(f"{pred} / {reference}: label {top} found but num_classes is {num_classes}")
    first = 0 if include_background else 1
    # compact classes: 0 (the background, present or not) then the other values found, so that the metrics
    # run over K classes rather than the largest label + 1; at least 2 (the metrics need a foreground class)
    values = np.union1d([0], present)
    k = max(len(values), 2)
    if top < 1 << 20:
        lut = np.zeros(top + 1, dtype=np.int64)
        lut[values] = np.arange(len(values))
        pc, rc = lut[p.data], lut[r.data]
    else:  # a table that large would cost more than the search
        pc, rc = np.searchsorted(values, p.data), np.searchsorted(values, r.data)
    spacing = scoring_spacing(r)
    try:  # a broken pixdim (1e20 mm) would fail in the distance kernels without naming the file
        _check_spacing(spacing, len(spacing))
    except ValueError as exc:
        raise DatasetError(f"{reference}: the voxel size from its header cannot be scored: {exc}") from None
    pt = torch.from_numpy(pc).to(device)[None]
    rt = torch.from_numpy(rc).to(device)[None]
    dice, counts_p, counts_r = case_dice(pt, rt, k, include_background=include_background)
    if sheared:
        hd = asd = torch.full((k - first,), math.nan)
    else:
        with warnings.catch_warnings():  # empty classes are reported as NaN in the table instead
            warnings.simplefilter("ignore", UserWarning)
            hd = metrics.hausdorff_distance(pt, rt, percentile, spacing, num_classes=k,
                                            include_background=include_background)[0]
            asd = metrics.surface_distance(pt, rt, spacing, num_classes=k, symmetric=True,
                                           include_background=include_background)[0]
    case = _stem(Path(reference))
    found = set(present.tolist())
    measured = {int(v): i - first for i, v in enumerate(values) if i >= first and int(v) in found}
    classes = range(first, num_classes) if num_classes is not None else sorted(measured)
    rows = []
    for c in classes:
        i = measured.get(c)
        if i is None:  # in neither map
            rows.append({"case": case, "class": c, "dice": math.nan, "hd": math.nan, "asd": math.nan,
                         "pred_voxels": 0, "reference_voxels": 0})
            continue
        rows.append({
            "case": case, "class": c,
            "dice": float(dice[0, i]), "hd": _finite_or_nan(float(hd[i])), "asd": _finite_or_nan(float(asd[i])),
            "pred_voxels": int(counts_p[0, i]), "reference_voxels": int(counts_r[0, i]),
        })
    return rows


def _finite_or_nan(value: float) -> float:
    return value if math.isfinite(value) else math.nan


def summarize(rows: Sequence[dict[str, Any]], cases: int | None = None) -> dict[str, Any]:
    """Per class and over all (case, class) rows: mean, standard deviation (population) and count of each
    metric over the rows where it is defined (not NaN); with the numbers of cases and rows. The classes are
    those of the rows (with :func:`evaluate_pair`'s default, the classes found in some case). ``cases``: the
    number of cases scored (default: the cases named in the rows; a case holding no class has no row)."""

    def stats(values: list[float]) -> dict[str, float | int]:
        v = np.array([x for x in values if not math.isnan(x)], dtype=np.float64)
        return {"mean": float(v.mean()) if v.size else math.nan, "std": float(v.std()) if v.size else math.nan,
                "n": int(v.size)}

    classes = sorted({row["class"] for row in rows})
    n_cases = len({row["case"] for row in rows}) if cases is None else cases
    out: dict[str, Any] = {"cases": n_cases, "rows": len(rows), "classes": {}}
    for c in classes:
        sel = [row for row in rows if row["class"] == c]
        out["classes"][str(c)] = {m: stats([row[m] for row in sel]) for m in METRICS}
    out["all"] = {m: stats([row[m] for row in rows]) for m in METRICS}
    return out


def _write(rows: list[dict[str, Any]], summary: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.csv", "w", newline="") as f:
        # no rows: every case held only the background
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [*CSV_FIELDS, "pred", "reference"])
        writer.writeheader()
        writer.writerows(rows)
    # a metric defined in no row (a class empty in every case) has a NaN mean: null (bare NaN is not JSON)
    (out / "summary.json").write_text(json_dumps(summary, indent=2) + "\n")


def _format_summary(summary: dict[str, Any], percentile: float) -> str:
    hd = f"HD{percentile:g} (mm)" if percentile != 100 else "HD (mm)"
    lines = [f"{summary['cases']} case(s)", "", f"| class | Dice | {hd} | ASSD (mm) |", "|---|---:|---:|---:|"]

    def cell(s: dict[str, Any], rows: int) -> str:  # the count where some rows have no value
        if s["n"] == 0:
            return "-"
        return f"{s['mean']:.4f} +- {s['std']:.4f}" + ("" if s["n"] == rows else f" (n={s['n']})")

    for c, s in [*summary["classes"].items(), ("all", summary["all"])]:
        rows = summary["rows"] if c == "all" else summary["cases"]
        lines.append(f"| {c} | {cell(s['dice'], rows)} | {cell(s['hd'], rows)} | {cell(s['asd'], rows)} |")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``medfast evaluate``."""
    p = sub.add_parser(
        "evaluate",
        help="score predicted label maps against references: Dice, HD95, ASSD per class (CSV + JSON)",
        description=(
            "Scores PRED against REFERENCE (two NIfTI label maps, or two folders matched by name; a prediction "
            "may carry medfast predict's _seg suffix): Dice, Hausdorff distance (95th percentile by default) and "
            "average symmetric surface distance per case and class, in mm from the reference's affine. Writes "
            "metrics.csv and summary.json to --out and prints the per-class summary."
        ),
    )
    p.add_argument("pred", help="predicted label map (NIfTI) or folder of them")
    p.add_argument("reference", help="reference label map (NIfTI) or folder of them")
    p.add_argument("--num-classes", type=int, default=None,
                   help="labels are 0 .. N-1, each one a row (default: a row for each label found in the pair)")
    p.add_argument("--percentile", type=float, default=95.0, help="of the Hausdorff distance (default 95)")
    p.add_argument("--include-background", action="store_true", help="also score label 0")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--out", type=Path, default=None, help="folder for metrics.csv and summary.json")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    """The ``medfast evaluate`` command (see :func:`add_parser`); returns the exit status. An error ends it with
    ``SystemExit("medfast evaluate: error: ...")`` (exit status 1), the line the other commands print."""
    if args.num_classes is not None and args.num_classes < 2:
        raise SystemExit(f"medfast evaluate: error: --num-classes must be at least 2, got {args.num_classes}")
    if not 0 <= args.percentile <= 100:
        raise SystemExit(f"medfast evaluate: error: --percentile must be in [0, 100], got {args.percentile}")
    from medfast._device import resolve_device

    try:
        device = resolve_device(args.device, "--device", ValueError)
    except ValueError as exc:
        raise SystemExit(f"medfast evaluate: error: {exc}") from None
    if args.out is not None:
        from medfast.train.files import OutputError, check_out_dir

        try:
            check_out_dir(args.out, "--out")
        except OutputError as exc:
            raise SystemExit(f"medfast evaluate: error: {exc}") from None
    try:
        pairs = find_evaluation_pairs(args.pred, args.reference)
        rows: list[dict[str, Any]] = []
        for pred, ref in pairs:
            case = evaluate_pair(pred, ref, args.num_classes, percentile=args.percentile,
                                 include_background=args.include_background, device=device)
            for row in case:
                row["pred"], row["reference"] = str(pred), str(ref)
            rows.extend(case)
    except DatasetError as exc:
        raise SystemExit(f"medfast evaluate: error: {exc}") from None
    summary = summarize(rows, cases=len(pairs))
    summary["percentile"] = args.percentile
    print(_format_summary(summary, args.percentile))
    if args.out is not None:
        try:
            _write(rows, summary, args.out)
        except OSError as exc:
            raise SystemExit(f"medfast evaluate: error: cannot write to --out {args.out}: {exc}") from None
        print(f"wrote {args.out / 'metrics.csv'} and {args.out / 'summary.json'}")
    return 0
