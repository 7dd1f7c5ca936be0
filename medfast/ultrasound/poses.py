"""Tracked probe poses from a file: NumPy arrays, JSON (the poses ``medfast simulate`` / ``medfast synthesize``
record), text matrices, position + quaternion tables and the header of PLUS / IGSIO sequence files, as
``(B, 4, 4)`` probe-to-world poses (mm) for :func:`medfast.ultrasound.simulate` and ``medfast synthesize``.

See docs/ultrasound.md, "Tracked poses from a file"."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from medfast.ultrasound.simulate import RIGID_TOL  # the tolerance simulate() applies

__all__ = ["read_poses"]

FORMATS = ("npy", "npz", "json", "text", "plus")
UNITS = {"mm": 1.0, "cm": 10.0, "m": 1000.0}
_SPLIT = re.compile(r"[,;\s]+")
_PLUS_SUFFIXES = (".mha", ".mhd", ".seq", ".igs")
_TEXT_SUFFIXES = (".csv", ".tsv", ".txt", ".dat")
#: the file name endings each format is read from (``format=None``); any other ending is refused
SUFFIXES = {"npy": (".npy",), "npz": (".npz",), "json": (".json",), "text": _TEXT_SUFFIXES,
            "plus": (".mha", ".mhd", ".seq.mha", ".igs.mha")}


def _label(where: str) -> str:
    return f" {where}" if where else ""


def rigid_problem(m: np.ndarray) -> str | None:
    """What keeps the ``(4, 4)`` float64 matrix ``m`` from being a rigid transform, in words (None if it is one)."""
    if not np.isfinite(m).all():
        return "holds NaN or inf values"
    if np.abs(m[3] - (0.0, 0.0, 0.0, 1.0)).max() > 1e-6:
        return f"its last row is {np.round(m[3], 6).tolist()}, not (0, 0, 0, 1)"
    rot = m[:3, :3]
    norms = np.linalg.norm(rot, axis=0)
    gram_err = np.abs(rot.T @ rot - np.eye(3))
    if np.abs(norms - 1).max() > RIGID_TOL or gram_err.max() > RIGID_TOL:
        # a shear only if the columns' dot products (off the diagonal) are off: a scale within the norm tolerance
        # (1.0006) still fails the Gram check on its diagonal (1.0006^2 - 1 = 1.2e-3) and is a scale
        if np.abs(norms - 1).max() <= RIGID_TOL and (gram_err - np.diag(np.diag(gram_err))).max() > RIGID_TOL:
            return "its 3x3 part is not a rotation (columns not orthogonal: a shear)"
        if np.ptp(norms) <= RIGID_TOL * norms.max():
            return (f"it is scaled by {norms.mean():.6g} (the rotation's columns have that norm, not 1): a pixel-to-mm "
                    "or unit scale, not a rigid pose")
        return (f"its 3x3 part is not a rotation (column norms {np.round(norms, 6).tolist()}): an anisotropic scale "
                "(e.g. pixel spacing), not a rigid pose")
    if np.linalg.det(rot) < 0:
        return "it is reflected (determinant -1: a mirror, not a rotation; check the handedness of the frame)"
    return None


def _check_rigid(mats: np.ndarray, labels: list[str], path: object) -> None:
    for m, where in zip(mats, labels, strict=True):
        problem = rigid_problem(m)
        if problem:
            raise ValueError(f"{path}{_label(where)}: not a rigid transform: {problem}")


def _as_matrices(arr: np.ndarray, path: object, what: str) -> np.ndarray:
    """``(4, 4)``, ``(B, 4, 4)`` or ``(B, 3, 4)`` numbers as ``(B, 4, 4)`` float64."""
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{path}: {what} must hold real numbers, got dtype {arr.dtype}")
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] not in ((4, 4), (3, 4)):
        raise ValueError(f"{path}: {what} must be (4, 4) or (B, 4, 4) matrices (or (B, 3, 4)), got shape "
                         f"{arr.shape}")
    if arr.shape[0] < 1:
        raise ValueError(f"{path}: {what} holds no poses (shape {arr.shape})")
    if arr.shape[1] == 3:
        arr = np.concatenate([arr, np.broadcast_to([[[0.0, 0.0, 0.0, 1.0]]], (arr.shape[0], 1, 4))], 1)
    return arr


def _read_npz(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        keys = list(z.keys())
        if "poses" in keys:
            key = "poses"
        elif len(keys) == 1:
            key = keys[0]
        else:
            raise ValueError(f"{path}: holds the arrays {keys}; name the poses array 'poses' (or keep only one)")
        return _as_matrices(z[key], path, f"array {key!r}")


def _read_npy(path: Path) -> np.ndarray:
    """``np.load`` of a ``.npy`` file, once its header's shape is known to fit the file: a header claiming 10^9
    poses would otherwise allocate them (119 GiB) before the read fails."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        try:
            version = fmt.read_magic(f)
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read_header(f)
        except (ValueError, EOFError) as exc:
            raise ValueError(f"{path}: not a valid .npy file ({exc})") from None
        start = f.tell()
    need = math.prod(shape) * dtype.itemsize
    have = path.stat().st_size - start
    if not dtype.hasobject and need > have:
        raise ValueError(f"{path}: the .npy header claims an array of shape {shape} ({need} bytes) but the file holds "
                         f"{have} bytes of data (truncated or corrupt file?)")
    return np.load(path, allow_pickle=False)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's dict, refusing a key given twice (``json`` would keep the last one silently: two "poses"
    lists, one of them ignored)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice in one JSON object")
        out[key] = value
    return out


def _read_json(path: Path) -> np.ndarray:
    """A JSON list of 4x4 matrices (or one matrix), or an object holding it under ``"poses"`` (``simulate.json``,
    ``generate.json``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError(f"{path}: not valid pose JSON (nested too deeply)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    except ValueError as exc:  # a duplicate key
        raise ValueError(f"{path}: {exc}") from None
    what = "the JSON list"
    if isinstance(data, dict):
        if "poses" not in data:
            raise ValueError(f"{path}: a JSON object must hold the poses under the key 'poses' (as simulate.json and "
                             f"generate.json do); its keys are {list(data)[:12]}")
        data, what = data["poses"], "its 'poses'"
    try:  # null (a NaN as medfast writes it) becomes NaN, refused by the rigid check with the pose's index
        arr = np.asarray(data, dtype=np.float64)
    except OverflowError:  # an integer beyond float64's range
        raise ValueError(f"{path}: {what} holds a number too large for a float (beyond 1.8e308)") from None
    except RecursionError:
        raise ValueError(f"{path}: {what} is nested too deeply for 4x4 matrices") from None
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {what} must be a list of 4x4 matrices of numbers (nested lists of equal "
                         "lengths)") from None
    return _as_matrices(arr, path, what)


# --- text: matrices or position + quaternion ---------------------------------------------------------------------
def _float(tok: str) -> float | None:
    try:
        return float(tok)
    except ValueError:
        return None


def _norm_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _quaternion_column(n: str) -> str | None:
    """The quaternion component (w, x, y, z) a column name denotes: qw, quat_w, quaternion.w, orientation.w,
    rotation.w (a tf2 / geometry_msgs Transform) ..."""
    for c in "wxyz":
        if n == f"q{c}" or any(n.endswith(s + c) for s in ("quat", "quaternion", "orientation", "rotation", "q")):
            return c
    return None


def _position_column(n: str) -> str | None:
    """The position axis a column name denotes: x, tx, px, pos_x, position.x, translation.x ..."""
    for c in "xyz":
        if n == c or any(n.endswith(s + c) for s in ("t", "p", "pos", "position", "translation", "trans")):
            return c
    return None


def _columns(header: list[str], path: Path, lineno: int) -> dict[str, int] | None:
    """Column index of each of x, y, z, qw, qx, qy, qz found by name, or None when the header names no quaternion
    (then the file holds matrices)."""
    found: dict[str, int] = {}
    for i, name in enumerate(header):
        n = _norm_name(name)
        q = _quaternion_column(n)
        key = f"q{q}" if q else _position_column(n)
        if key is None:
            continue
        if key in found:
            raise ValueError(f"{path} line {lineno}: columns {header[found[key]]!r} and {name!r} both name "
                             f"{'the quaternion ' + key[1] if key[0] == 'q' else 'position ' + key}")
        found[key] = i
    quat = [k for k in ("qw", "qx", "qy", "qz") if k in found]
    if not quat:
        return None
    missing = [k for k in ("x", "y", "z", "qw", "qx", "qy", "qz") if k not in found]
    if missing:
        raise ValueError(f"{path} line {lineno}: a position + quaternion header needs columns for x, y, z, qw, qx, qy, "
                         f"qz (by name, in any order); found none for {', '.join(missing)} in {header}")
    return found


def quaternion_to_matrix(q: np.ndarray) -> np.ndarray:
    """``(..., 4)`` unit quaternions (w, x, y, z), Hamilton convention (an active rotation, as
    ``scipy.spatial.transform.Rotation.from_quat(q, scalar_first=True)``), as ``(..., 3, 3)`` rotation matrices."""
    w, x, y, z = np.moveaxis(q, -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def _tokens(text: str) -> list[str]:
    return [t.strip("\"'") for t in _SPLIT.split(text) if t]


def _read_text(path: Path) -> tuple[np.ndarray, list[str]]:
    rows: list[tuple[int, list[str]]] = []
    comment = None  # the last comment line before the first row: (line number, its text without the comment mark)
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            mark = next((m for m in ("#", "%", "//") if text.startswith(m)), None)
            if text and mark is None:
                rows.append((lineno, _tokens(text)))
            elif mark is not None and not rows:
                comment = (lineno, text[len(mark):])
    if not rows:
        raise ValueError(f"{path}: holds no poses (an empty file or only comment lines)")
    columns, header = None, False
    head_line, head = rows[0]
    words = [_float(t) is None for t in head]
    if any(words):
        # a header only if all names, or if it names the position + quaternion columns: a damaged first pose row
        # ("N/A") dropped as a header paired every later frame with the wrong pose; it now fails as "not a number"
        columns = _columns(head, path, head_line)
        header = all(words) or columns is not None
    if header:
        rows = rows[1:]
        if not rows:
            raise ValueError(f"{path}: holds a header line but no poses")
    elif comment is not None:
        # no header line: a commented one (TUM's "# timestamp tx ty tz qx qy qz qw", rostopic echo -p's
        # "%time,field.pose..."); a comment is free text, so only one naming a full position + quaternion set counts
        try:
            columns = _columns(_tokens(comment[1]), path, comment[0])
        except ValueError:
            columns = None
    if columns is not None:
        return _quaternion_rows(rows, columns, path)
    mats, labels = [], []
    if all(len(toks) == 4 for _, toks in rows) and len(rows) % 4 == 0:  # np.savetxt of (4, 4) matrices
        groups = [rows[i:i + 4] for i in range(0, len(rows), 4)]
    else:
        groups = [[r] for r in rows]
    for k, group in enumerate(groups):
        where = (f"line {group[0][0]}" if len(group) == 1 else f"lines {group[0][0]}-{group[-1][0]}") + f" (pose {k})"
        toks = [t for _, ts in group for t in ts]
        vals = [_float(t) for t in toks]
        if any(v is None for v in vals):
            bad = next(t for t, v in zip(toks, vals, strict=True) if v is None)
            raise ValueError(f"{path} {where}: {bad!r} is not a number (a pose row holds 16 numbers, a 4x4 matrix "
                             "row by row, or 12, its top 3x4)")
        if len(vals) not in (16, 12):
            raise ValueError(f"{path} {where}: expected 16 numbers (a 4x4 matrix row by row) or 12 (its top 3x4 "
                             f"rows), got {len(vals)}")
        mats.append(_as_matrices(np.array(vals).reshape(-1, 4), path, "a pose")[0])
        labels.append(where)
    return np.stack(mats), labels


def _quaternion_rows(rows, columns, path) -> tuple[np.ndarray, list[str]]:
    need = max(columns.values())
    mats, labels = [], []
    for k, (lineno, toks) in enumerate(rows):
        where = f"line {lineno} (pose {k})"
        if len(toks) <= need:
            raise ValueError(f"{path} {where}: {len(toks)} values, the header names {need + 1} columns or more")
        vals = {key: _float(toks[i]) for key, i in columns.items()}
        bad = [key for key, v in vals.items() if v is None]
        if bad:
            raise ValueError(f"{path} {where}: {toks[columns[bad[0]]]!r} in column {bad[0]} is not a number")
        q = np.array([vals["qw"], vals["qx"], vals["qy"], vals["qz"]])
        t = np.array([vals["x"], vals["y"], vals["z"]])
        if not (np.isfinite(q).all() and np.isfinite(t).all()):
            raise ValueError(f"{path} {where}: not a rigid transform: holds NaN or inf values")
        norm = float(np.linalg.norm(q))
        if abs(norm - 1) > RIGID_TOL:
            raise ValueError(f"{path} {where}: the quaternion (w, x, y, z) = {q.tolist()} has norm {norm:.6g}, not 1: "
                             "not a rotation (or its columns are not named qw, qx, qy, qz)")
        m = np.eye(4)
        m[:3, :3] = quaternion_to_matrix(q / norm)
        m[:3, 3] = t
        mats.append(m)
        labels.append(where)
    return np.stack(mats), labels


# --- PLUS / IGSIO sequence file header --------------------------------------------------------------------------
_FRAME = re.compile(r"^Seq_Frame(\d+)_(\w+?)Transform(Status)?$")


def _read_plus_header(path: Path) -> list[tuple[str, str]]:
    """``key = value`` lines of a MetaImage header, up to ElementDataFile (the pixel data is never read)."""
    items = []
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("latin-1").strip()
            if not line:
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise ValueError(f"{path}: not a MetaImage / PLUS sequence header (line {line[:60]!r} is not "
                                 "'key = value')")
            key, value = key.strip(), value.strip()
            if key == "ElementDataFile":
                return items
            items.append((key, value))
    return items


def _default_transform(names: list[str], path: Path) -> str:
    """ProbeToReference, else ProbeToTracker, else the first other *ToReference, else *ToTracker (not the reference
    marker's ReferenceToTracker), in header order."""
    for pick in (lambda n: n == "ProbeToReference", lambda n: n == "ProbeToTracker",
                 lambda n: n.endswith("ToReference"), lambda n: n.endswith("ToTracker") and n != "ReferenceToTracker"):
        for n in names:
            if pick(n):
                return n
    raise ValueError(f"{path}: no *ToReference / *ToTracker transform among the frames' transforms {names}; "
                     "name one with transform=")


def _read_plus(path: Path, transform: str | None, invalid: str) -> tuple[np.ndarray, list[str]]:
    values: dict[str, dict[int, str]] = {}
    status: dict[str, dict[int, str]] = {}
    for key, value in _read_plus_header(path):
        m = _FRAME.match(key)
        if m:
            (status if m.group(3) else values).setdefault(m.group(2), {})[int(m.group(1))] = value
    names = list(values)
    if not names:
        raise ValueError(f"{path}: the header holds no Seq_Frame####_*Transform lines (not a PLUS / IGSIO tracked "
                         "sequence, or the transforms were not recorded)")
    name = transform.removesuffix("Transform") if transform else _default_transform(names, path)
    if name not in values:
        raise ValueError(f"{path}: no frame holds the transform {name!r}; the file holds {names}")
    frames = sorted(values[name])
    mats, labels, skipped = [], [], []
    for fr in frames:
        where = f"frame {fr} (Seq_Frame{fr:04d}_{name}Transform)"
        st = status.get(name, {}).get(fr, "OK")
        if st.upper() != "OK":
            if invalid == "error":
                raise ValueError(f"{path} {where}: status {st!r}, not OK (invalid='skip' leaves such frames out)")
            skipped.append(fr)
            continue
        vals = [_float(t) for t in _SPLIT.split(values[name][fr]) if t]
        if len(vals) != 16 or any(v is None for v in vals):
            raise ValueError(f"{path} {where}: expected 16 numbers (a 4x4 matrix row by row), got "
                             f"{values[name][fr][:80]!r}")
        mats.append(np.array(vals).reshape(4, 4))
        labels.append(where)
    if not mats:
        raise ValueError(f"{path}: none of the {len(frames)} frames has the status OK for {name}Transform")
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (" ..." if len(skipped) > 10 else "")
        warnings.warn(f"{path}: skipped {len(skipped)} of {len(frames)} frames whose {name}TransformStatus is not OK "
                      f"(frames {shown})", UserWarning, stacklevel=3)
    return np.stack(mats), labels


def _guess_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    last = suffixes[-1] if suffixes else ""
    for fmt in ("npy", "npz", "json"):
        if last in SUFFIXES[fmt]:
            return fmt
    if last in _PLUS_SUFFIXES:  # the last suffix only: a .seq.mha ends in .mha, run.seq.csv is a CSV
        return "plus"
    if last in _TEXT_SUFFIXES:
        return "text"
    # not guessed as text: a NIfTI, a checkpoint or a YAML would fail on its first line as "not a number"
    known = ", ".join(s for fmt in FORMATS for s in SUFFIXES[fmt])
    raise ValueError(f"{path}: unsupported pose file format {last or '(no suffix)'!r}: expected one of {known}")


def _calibration(calibration: object) -> np.ndarray:
    if isinstance(calibration, (str, Path)):
        mats = read_poses(calibration).numpy()
        if len(mats) != 1:
            raise ValueError(f"{calibration}: a calibration file must hold one 4x4 matrix, got {len(mats)}")
        return mats[0]
    if isinstance(calibration, torch.Tensor):
        calibration = calibration.detach().cpu().numpy()
    try:
        arr = np.asarray(calibration)
    except (TypeError, ValueError):
        raise ValueError(f"calibration must be a (4, 4) matrix or a file, got {type(calibration).__name__}") from None
    if arr.shape != (4, 4) or arr.dtype.kind not in "iuf":
        raise ValueError(f"calibration must be a (4, 4) matrix of numbers (or a file), got shape {arr.shape} "
                         f"{arr.dtype}")
    arr = arr.astype(np.float64)
    problem = rigid_problem(arr)
    if problem:
        raise ValueError(f"calibration: not a rigid transform: {problem}")
    return arr


def read_poses(path: str | Path, *, format: str | None = None, units: str = "mm",  # noqa: A002 (the natural name)
               calibration: object = None, invert: bool = False, transform: str | None = None,
               invalid: str = "skip") -> torch.Tensor:
    """Reads tracked probe poses from a file as ``(B, 4, 4)`` probe-to-world matrices (mm), in file order.

    Parameters
    ----------
    path : str or Path
        The file. Formats (``format``, by default from the suffix):

        - ``"npy"`` / ``"npz"``: an array of shape ``(4, 4)``, ``(B, 4, 4)`` or ``(B, 3, 4)`` (an ``.npz``: the
          array named ``poses``, or its only array).
        - ``"json"`` (``.json``): a list of 4x4 matrices (or one), or an object holding that list under
          ``"poses"``, as ``simulate.json`` (``medfast simulate``) and ``generate.json`` (``medfast synthesize``)
          record the poses they used.
        - ``"text"`` (``.csv``, ``.tsv``, ``.txt``, ``.dat``): comma, semicolon, space or tab separated;
          lines starting with ``#``, ``%`` or ``//`` are comments. Either one pose per row, 16 numbers (the 4x4
          matrix row by row) or 12 (its top 3 rows), or 4x4 blocks of 4 rows (``np.savetxt`` of a matrix), with or
          without a header line (only names: a first row mixing numbers and words is a bad pose row, not a
          header); or a header naming position and quaternion columns, found by name in any order, other
          columns (time stamps, ...) ignored: position ``x, y, z`` (or ``tx``, ``pos_x``, ``position.x``,
          ``translation.x``), quaternion ``qw, qx, qy, qz`` (or ``quat_w``, ``orientation.w``, ``rotation.w``,
          ...). Without a header line, the last comment line before the first row is the header if it names all
          seven (TUM's ``# timestamp tx ty tz qx qy qz qw``, ``rostopic echo -p``'s ``%time,...``). Naming the
          columns settles scalar-first (``x,y,z,qw,qx,qy,qz``) and scalar-last (``tx ty tz qx qy qz qw``, TUM)
          alike. The quaternion is a Hamilton unit quaternion rotating probe axes into world axes (scipy's
          ``Rotation.from_quat``); its norm must be 1 within 1e-3 (then it is normalised).
        - ``"plus"`` (``.mha``, ``.mhd``, ``.seq.mha``, ``.igs.mha``; the last suffix decides): a PLUS toolkit /
          IGSIO tracked sequence;
          only the text header is read (up to ``ElementDataFile``), never the pixel data: the lines
          ``Seq_Frame####_<transform>Transform = 16 numbers``, in frame-number order.

        Any other suffix is refused ("unsupported pose file format", naming the suffixes above) unless
        ``format`` is given.
    units : {"mm", "cm", "m"}
        Units of the file's translations; they are scaled to mm (rotations have no unit).
    calibration : (4, 4) array, tensor or file, optional
        Rigid probe-to-sensor calibration (mm): the medfast probe frame (origin at the array centre, +z axial, +x
        lateral, +y elevation) in the frame of the tracked sensor (the marker on the probe). Applied on the right:
        ``pose = sensor_to_world @ calibration``. A file is read by this function (one matrix, mm).
    invert : bool
        The file holds world-to-sensor transforms (a camera-style extrinsic): each is inverted first.
    transform : str, optional
        PLUS files (a non-str raises TypeError): the transform to read (``"ProbeToTracker"``, with or without the
        ``Transform`` suffix). Default: ``ProbeToReference``, else ``ProbeToTracker``, else the first other
        ``*ToReference``, else the first ``*ToTracker`` but ``ReferenceToTracker`` (the reference marker), in header
        order.
    invalid : {"skip", "error"}
        PLUS files: a frame whose ``...TransformStatus`` is not ``OK`` is left out (a ``UserWarning`` gives their
        count and numbers) or raises ``ValueError``.

    Returns
    -------
    Tensor
        ``(B, 4, 4)`` float64 probe-to-world poses in mm, ready for :func:`simulate`.

    Raises
    ------
    ValueError
        An unsupported suffix (``format=None``); or naming the file, the line or frame (and pose index) and the
        problem: not valid JSON, not a number, a wrong count of numbers, NaN / inf, a matrix that is not rigid
        (scaled, sheared, reflected, last row not (0, 0, 0, 1); rotation orthonormal within 1e-3), a quaternion
        of norm other than 1.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such pose file")
    fmt = _guess_format(path) if format is None else format
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)} (or None: from the suffix), got {format!r}")
    if units not in UNITS:
        raise ValueError(f"units must be one of {', '.join(UNITS)}, got {units!r}")
    if invalid not in ("skip", "error"):
        raise ValueError(f"invalid must be 'skip' or 'error', got {invalid!r}")
    if not isinstance(invert, bool):
        raise TypeError(f"invert must be a bool, got {invert!r}")
    if transform is not None and not isinstance(transform, str):
        raise TypeError(f"transform must be a str (a PLUS transform name such as 'ProbeToTracker') or None, got "
                        f"{type(transform).__name__} {transform!r}")
    calib = None if calibration is None else _calibration(calibration)
    try:
        if fmt == "npy":
            mats = _as_matrices(_read_npy(path), path, "the array")
            labels = [f"pose {i}" for i in range(len(mats))]
        elif fmt == "npz":
            mats = _read_npz(path)
            labels = [f"pose {i}" for i in range(len(mats))]
        elif fmt == "json":
            mats = _read_json(path)
            labels = [f"pose {i}" for i in range(len(mats))]
        elif fmt == "plus":
            mats, labels = _read_plus(path, transform, invalid)
        else:
            mats, labels = _read_text(path)
    except (OSError, EOFError) as exc:  # a damaged .npy / .npz
        raise ValueError(f"{path}: cannot be read as {fmt}: {type(exc).__name__}: {exc}") from None
    except (RecursionError, OverflowError, MemoryError) as exc:  # str(MemoryError()) is empty: name the type
        raise ValueError(f"{path}: cannot be read as {fmt}: {type(exc).__name__}: {exc}".rstrip(": ")) from None
    except ValueError as exc:  # numpy's own ("Failed to read all data ...") do not name the file
        if str(path) in str(exc):
            raise
        raise ValueError(f"{path}: cannot be read as {fmt}: {exc}") from None
    if fmt in ("npy", "npz", "json") and len(mats) == 1:
        labels = [""]
    mats = mats.copy()
    mats[:, :3, 3] *= UNITS[units]
    _check_rigid(mats, labels, path)
    if invert:  # rigid: the inverse is (R^T, -R^T t), exact where np.linalg.inv rounds
        rt = mats[:, :3, :3].transpose(0, 2, 1)
        inv = np.zeros_like(mats)
        inv[:, :3, :3] = rt
        inv[:, :3, 3] = -(rt @ mats[:, :3, 3:])[..., 0]
        inv[:, 3, 3] = 1.0
        mats = inv
    if calib is not None:
        mats = mats @ calib
    return torch.from_numpy(np.ascontiguousarray(mats))
