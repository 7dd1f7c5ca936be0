"""`medfast evaluate`: Dice / HD / ASSD of predicted label maps against references, end to end on NIfTI files."""

from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")

import medfast.metrics as mm  # noqa: E402
from medfast.cli import main  # noqa: E402
from medfast.tasks.evaluation import evaluate_pair, find_evaluation_pairs  # noqa: E402

SPACING = (1.5, 1.0, 0.8)
AFFINE = np.diag([*SPACING, 1.0])


def _save(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.int16), affine), str(path))
    return path


def _cubes(shift=0):
    """Label 1: a 6^3 cube (shifted by `shift` voxels along axis 0); label 2: a 4 x 5 x 3 box."""
    lab = np.zeros((20, 18, 16), dtype=np.int16)
    lab[4 + shift : 10 + shift, 3:9, 2:8] = 1
    lab[13:17, 10:15, 9:12] = 2
    return lab


def test_evaluate_known_geometry(tmp_path):
    """A cube moved by 2 voxels along axis 0 (1.5 mm voxels): Dice 4/6 and Hausdorff 3 mm exactly; the box
    untouched: Dice 1, distances 0."""
    pred, ref = _save(tmp_path / "p.nii.gz", _cubes(2)), _save(tmp_path / "r.nii.gz", _cubes())
    rows = evaluate_pair(pred, ref, percentile=100)
    assert [r["class"] for r in rows] == [1, 2]
    assert rows[0]["dice"] == pytest.approx(4 / 6) and rows[0]["hd"] == pytest.approx(3.0)
    assert rows[1]["dice"] == 1.0 and rows[1]["hd"] == 0.0 and rows[1]["asd"] == 0.0
    assert rows[0]["pred_voxels"] == rows[0]["reference_voxels"] == 216
    assert rows[0]["case"] == "r"


def test_evaluate_folders_match_names_and_equal_the_metrics(tmp_path, capsys):
    ref_dir, pred_dir, out = tmp_path / "ref", tmp_path / "pred", tmp_path / "out"
    ref_dir.mkdir()
    pred_dir.mkdir()
    rng = np.random.default_rng(0)
    cases = {}
    for i in range(3):
        ref = _cubes()
        pred = np.roll(_cubes(), int(rng.integers(-2, 3)), axis=int(rng.integers(0, 3)))
        pred[0, 0, 0] = 2  # a stray voxel: HD95 and max differ
        _save(ref_dir / f"case{i}.nii.gz", ref)
        # medfast predict's name for one, the plain name for the others
        _save(pred_dir / (f"case{i}_seg.nii.gz" if i == 1 else f"case{i}.nii"), pred)
        cases[f"case{i}"] = (pred, ref)
    _save(pred_dir / "extra.nii.gz", _cubes())  # a prediction without a reference: ignored
    assert main(["evaluate", str(pred_dir), str(ref_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 case(s)" in printed and "| 1 |" in printed and "| all |" in printed
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["class"]) for r in rows] == [(f"case{i}", c) for i in range(3) for c in ("1", "2")]
    assert rows[2]["pred"].endswith("case1_seg.nii.gz")
    for r in rows:
        pred, ref = (torch.from_numpy(a.astype(np.int64))[None] for a in cases[r["case"]])
        c = int(r["class"])
        assert float(r["dice"]) == pytest.approx(float(mm.dice(pred, ref, 3)[0, c]))
        hd = mm.hausdorff_distance(pred, ref, 95, SPACING, num_classes=3)[0, c - 1]
        asd = mm.surface_distance(pred, ref, SPACING, num_classes=3, symmetric=True)[0, c - 1]
        assert float(r["hd"]) == pytest.approx(float(hd)) and float(r["asd"]) == pytest.approx(float(asd))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == 3 and summary["percentile"] == 95
    dice1 = [float(r["dice"]) for r in rows if r["class"] == "1"]
    assert summary["classes"]["1"]["dice"]["mean"] == pytest.approx(np.mean(dice1))
    assert summary["classes"]["1"]["dice"]["n"] == 3


def test_references_named_with_the_channel_suffix_find_predicts_output(tmp_path):
    # `medfast predict` names the prediction of subj_0000 (nnU-Net's channel suffix) subj_seg; evaluate
    # looked only for subj_0000[_seg] and stopped: the documented predict -> evaluate pipeline broke
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    for name in ("subj_0000", "subj_0001"):
        _save(ref_dir / f"{name}.nii.gz", _cubes())
    _save(pred_dir / "subj_seg.nii.gz", _cubes())
    _save(pred_dir / "subj_0001_seg.nii.gz", _cubes())
    pairs = find_evaluation_pairs(pred_dir, ref_dir)
    assert [(p.name, r.name) for p, r in pairs] == [("subj_seg.nii.gz", "subj_0000.nii.gz"),
                                                    ("subj_0001_seg.nii.gz", "subj_0001.nii.gz")]


def test_evaluate_empty_class_is_nan(tmp_path):
    ref = _cubes()
    pred = ref.copy()
    pred[pred == 2] = 0  # class 2 missing from the prediction
    rows = evaluate_pair(_save(tmp_path / "p.nii", pred), _save(tmp_path / "r.nii", ref), num_classes=4)
    assert [r["class"] for r in rows] == [1, 2, 3]
    assert rows[1]["dice"] == 0.0 and math.isnan(rows[1]["hd"]) and math.isnan(rows[1]["asd"])
    assert math.isnan(rows[2]["dice"]) and math.isnan(rows[2]["hd"])  # class 3: empty in both


def test_summary_json_writes_an_undefined_mean_as_null(tmp_path):
    # class 3, empty in both maps: every Dice and HD of it is NaN, so are their means; summary.json held bare NaN
    pred = _save(tmp_path / "p.nii.gz", _cubes())
    ref = _save(tmp_path / "r.nii.gz", _cubes())
    assert main(["evaluate", str(pred), str(ref), "--num-classes", "4", "--out", str(tmp_path / "out")]) == 0

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    summary = json.loads((tmp_path / "out" / "summary.json").read_text(), parse_constant=refuse)
    assert summary["classes"]["3"]["dice"] == {"mean": None, "std": None, "n": 0}
    assert summary["classes"]["1"]["dice"] == {"mean": 1.0, "std": 0.0, "n": 1}


def test_evaluate_bad_inputs_name_the_files(tmp_path):
    ref = _save(tmp_path / "r.nii.gz", _cubes())
    (tmp_path / "preds").mkdir()
    (tmp_path / "refs").mkdir()
    _save(tmp_path / "refs" / "a.nii.gz", _cubes())
    with pytest.raises(SystemExit, match=r"no prediction for .*a\.nii\.gz"):
        main(["evaluate", str(tmp_path / "preds"), str(tmp_path / "refs")])
    with pytest.raises(SystemExit, match="prediction not found"):
        main(["evaluate", str(tmp_path / "missing.nii.gz"), str(ref)])
    with pytest.raises(SystemExit, match="two NIfTI files or two folders"):
        main(["evaluate", str(ref), str(tmp_path / "refs")])
    small = _save(tmp_path / "small.nii.gz", _cubes()[:-1])
    with pytest.raises(SystemExit, match=r"small\.nii\.gz has shape"):
        main(["evaluate", str(small), str(ref)])
    moved = _save(tmp_path / "moved.nii.gz", _cubes(), affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(SystemExit, match="different affines"):
        main(["evaluate", str(moved), str(ref)])
    with pytest.raises(SystemExit, match="label 2 found but num_classes is 2"):
        main(["evaluate", str(ref), str(ref), "--num-classes", "2"])
    with pytest.raises(SystemExit, match="--percentile must be in"):
        main(["evaluate", str(ref), str(ref), "--percentile", "101"])
    with pytest.raises(SystemExit, match="--device='tpu' is not a device: use auto, cpu, cuda or cuda:N"):
        main(["evaluate", str(ref), str(ref), "--device", "tpu"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA GPU is visible"):
            main(["evaluate", str(ref), str(ref), "--device", "cuda"])
    assert find_evaluation_pairs(ref, ref) == [(ref, ref)]


def _binary_metrics(pred, ref, c):
    """Dice, HD95 and ASSD of class ``c`` alone, as a 2-class problem: independent of how evaluate numbers the
    classes (a distance to an empty mask: NaN, as evaluate writes it)."""
    p, r = (torch.from_numpy((a == c).astype(np.int64))[None] for a in (pred, ref))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        hd = float(mm.hausdorff_distance(p, r, 95, SPACING, num_classes=2)[0, 0])
        asd = float(mm.surface_distance(p, r, SPACING, num_classes=2, symmetric=True)[0, 0])
    return float(mm.dice(p, r, 2, ignore_empty=False)[0, 1]), *(x if math.isfinite(x) else math.nan for x in (hd, asd))


@pytest.mark.parametrize("values", [(2, 41, 2035), (5, 41, 70000)])
def test_sparse_label_values_score_only_the_classes_found(tmp_path, values):
    # every value 1 .. max was a class: FreeSurfer-style labels (2, 41, 1035, 2035, 11101 ..) took seconds to
    # minutes and gave a row per absent value; now the classes found in either map, by their label values
    # (70000: past the lookup table, remapped by a search)
    a, b, c = values
    ref = np.zeros((20, 18, 16), np.int64)
    ref[4:10, 3:9, 2:8] = a
    ref[13:17, 10:15, 9:12] = b
    pred = np.roll(ref, 1, axis=0)
    pred[0:2, 0:2, 0:2] = c  # only in the prediction
    for name, lab in (("p", pred), ("r", ref)):
        nib.save(nib.Nifti1Image(lab.astype(np.int32), AFFINE), str(tmp_path / f"{name}.nii.gz"))
    rows = evaluate_pair(tmp_path / "p.nii.gz", tmp_path / "r.nii.gz")
    assert [r["class"] for r in rows] == [a, b, c]
    for r in rows:
        dice, hd, asd = _binary_metrics(pred, ref, r["class"])
        assert r["dice"] == pytest.approx(dice)
        assert r["hd"] == pytest.approx(hd, nan_ok=True) and r["asd"] == pytest.approx(asd, nan_ok=True)
        assert (r["pred_voxels"], r["reference_voxels"]) == (int((pred == r["class"]).sum()),
                                                            int((ref == r["class"]).sum()))
    assert rows[2]["dice"] == 0.0 and math.isnan(rows[2]["hd"])  # a false positive: Dice 0, no distance
    # --num-classes: a row for each label below it (absent from both: NaN, not measured)
    rows = evaluate_pair(tmp_path / "p.nii.gz", tmp_path / "r.nii.gz", num_classes=c + 2, include_background=True)
    assert [r["class"] for r in rows] == list(range(c + 2))
    assert rows[0]["dice"] == pytest.approx(_binary_metrics(pred, ref, 0)[0])
    assert math.isnan(rows[1]["dice"]) and rows[1]["pred_voxels"] == rows[1]["reference_voxels"] == 0
    assert rows[c]["dice"] == 0.0 and math.isnan(rows[c + 1]["dice"])


def test_summary_lists_the_classes_found_and_counts_every_case(tmp_path, capsys):
    # case a holds labels 2 and 41, case b only 41, case c only the background (no row): the table lists 2 and
    # 41 (not 1, 3 .. 40), class 2 over the one case that has it, and 3 cases
    ref_dir, pred_dir, out = tmp_path / "ref", tmp_path / "pred", tmp_path / "out"
    ref_dir.mkdir()
    pred_dir.mkdir()
    a = np.array([0, 2, 41], np.int16)[_cubes()]  # 1 -> 2, 2 -> 41
    b = np.where(a == 2, 0, a)
    for name, lab in (("a", a), ("b", b), ("c", np.zeros_like(a))):
        _save(ref_dir / f"{name}.nii.gz", lab)
        _save(pred_dir / f"{name}.nii.gz", lab)
    assert main(["evaluate", str(pred_dir), str(ref_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 case(s)" in printed and "| 2 | 1.0000 +- 0.0000 (n=1) |" in printed and "| 41 |" in printed
    assert "| 1 |" not in printed and "| 3 |" not in printed
    with open(out / "metrics.csv") as f:
        assert [(r["case"], r["class"]) for r in csv.DictReader(f)] == [("a", "2"), ("a", "41"), ("b", "41")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == 3 and list(summary["classes"]) == ["2", "41"]
    # only the background everywhere: no rows, the CSV has its header
    assert main(["evaluate", str(pred_dir / "c.nii.gz"), str(ref_dir / "c.nii.gz"), "--out", str(tmp_path / "o2")]) == 0
    assert "1 case(s)" in capsys.readouterr().out
    assert (tmp_path / "o2" / "metrics.csv").read_text().splitlines()[0].startswith("case,class,dice,hd,asd,")


def test_pairing_refuses_two_candidates_and_reads_upper_case_suffixes(tmp_path):
    """Predictions written beside their images: the image case.nii.gz won over case_seg.nii.gz without a word and
    was scored as a label map. And a reference CASE2.NII.GZ was skipped (case-sensitive suffixes)."""
    from medfast.data import DatasetError

    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    lab = _cubes()
    _save(ref / "case.nii.gz", lab)
    _save(pred / "case.nii.gz", np.random.default_rng(0).random(lab.shape).astype(np.float32))  # the image
    _save(pred / "case_seg.nii.gz", lab)
    with pytest.raises(DatasetError, match=r"several predictions for .*case.nii.gz in .*: case.nii.gz, "
                                           r"case_seg.nii.gz; keep one"):
        find_evaluation_pairs(pred, ref)
    (pred / "case.nii.gz").unlink()
    _save(ref / "CASE2.NII.GZ", lab)
    _save(pred / "CASE2_seg.NII.GZ", lab)
    pairs = find_evaluation_pairs(pred, ref)
    assert [(p.name, r.name) for p, r in pairs] == [("CASE2_seg.NII.GZ", "CASE2.NII.GZ"),
                                                    ("case_seg.nii.gz", "case.nii.gz")]
    # case names that differ in case only are two cases (only the suffix matches in any case)
    _save(ref / "Case.nii.gz", lab)
    _save(pred / "Case_seg.nii.gz", lab)
    pairs = {r.name: p.name for p, r in find_evaluation_pairs(pred, ref)}
    assert pairs["Case.nii.gz"] == "Case_seg.nii.gz" and pairs["case.nii.gz"] == "case_seg.nii.gz"


def test_grids_are_compared_in_voxels_and_sheared_or_line_maps_are_handled(tmp_path):
    """A 1e-3 mm tolerance let 0.5 um voxels shifted by 1.8 voxels pass (Dice 1); a sheared grid (gantry tilt) gave
    distances from its column lengths (1.62 mm for a true 2.06 mm): its Dice is scored, its distances are NaN; a
    (1, 1, Z) map crashed in the metrics."""
    from medfast.data import DatasetError

    lab = _cubes()
    small = np.diag([5e-4, 5e-4, 5e-4, 1.0])
    shifted = small.copy()
    shifted[0, 3] = 9e-4
    _save(tmp_path / "r.nii.gz", lab, small)
    _save(tmp_path / "p.nii.gz", lab, shifted)
    with pytest.raises(DatasetError, match="different affines"):
        evaluate_pair(tmp_path / "p.nii.gz", tmp_path / "r.nii.gz")
    _save(tmp_path / "p.nii.gz", lab, small)
    assert evaluate_pair(tmp_path / "p.nii.gz", tmp_path / "r.nii.gz")[0]["dice"] == 1.0  # the same tiny grid
    sheared = np.eye(4)
    sheared[1, 2] = 0.8
    _save(tmp_path / "rs.nii.gz", lab, sheared)
    _save(tmp_path / "ps.nii.gz", lab, sheared)
    with pytest.warns(UserWarning, match="not at right angles .*Dice is scored, the surface distances are NaN"):
        rows = evaluate_pair(tmp_path / "ps.nii.gz", tmp_path / "rs.nii.gz")
    assert [r["dice"] for r in rows] == [1.0, 1.0] and all(math.isnan(r["hd"]) and math.isnan(r["asd"]) for r in rows)
    # 0.09 % another voxel size: each entry of inv(ref) @ pred is within 1e-3 of the identity, but voxel 19 of
    # the grid lies 0.017 voxel off: refused (the corners, not the entries, are compared)
    _save(tmp_path / "pz.nii.gz", lab, AFFINE @ np.diag([1.0009, 1.0, 1.0, 1.0]))
    with pytest.raises(DatasetError, match="different affines"):
        evaluate_pair(tmp_path / "pz.nii.gz", _save(tmp_path / "r2.nii.gz", lab))
    _save(tmp_path / "pz.nii.gz", lab, AFFINE @ np.diag([1.00001, 1.0, 1.0, 1.0]))  # float32 header rounding
    assert evaluate_pair(tmp_path / "pz.nii.gz", tmp_path / "r2.nii.gz")[0]["dice"] == 1.0
    rotated = np.eye(4)  # oblique but orthogonal: scored
    c, s = np.cos(0.3), np.sin(0.3)
    rotated[:2, :2] = [[c, -s], [s, c]]
    _save(tmp_path / "rr.nii.gz", lab, rotated)
    _save(tmp_path / "pr.nii.gz", lab, rotated)
    assert evaluate_pair(tmp_path / "pr.nii.gz", tmp_path / "rr.nii.gz")[0]["hd"] == 0.0
    line = np.zeros((1, 1, 6), np.int16)
    line[0, 0, 2:4] = 1
    for name in ("l.nii.gz", "m.nii.gz"):
        _save(tmp_path / name, line)
    with pytest.raises(DatasetError, match="at least two axes longer than one voxel"):
        evaluate_pair(tmp_path / "l.nii.gz", tmp_path / "m.nii.gz")


def test_the_command_shows_medfast_warnings_in_one_line(tmp_path):
    """A medfast warning under the command (here a sheared reference) is one ``medfast evaluate: warning: ...``
    line, not Python's ``FILE:LINE: UserWarning: ...`` plus a quoted source line."""
    import subprocess
    import sys

    sheared = np.eye(4)
    sheared[1, 2] = 0.8
    _save(tmp_path / "r.nii.gz", _cubes(), sheared)
    _save(tmp_path / "p.nii.gz", _cubes(), sheared)
    run = subprocess.run([sys.executable, "-m", "medfast", "evaluate", str(tmp_path / "p.nii.gz"),
                          str(tmp_path / "r.nii.gz"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if "right angles" in line]
    assert len(lines) == 1 and lines[0].startswith("medfast evaluate: warning: ") and "r.nii.gz" in lines[0]
    assert "UserWarning" not in run.stderr and "warnings.warn" not in run.stderr


def test_only_medfast_warnings_change_form_and_pytest_still_records_them():
    from medfast import cli

    with cli._plain_warnings("predict"):
        assert warnings.formatwarning("m", UserWarning, cli.__file__, 3) == "medfast predict: warning: m\n"
        other = warnings.formatwarning("m", UserWarning, "/elsewhere/x.py", 3)
        assert other.startswith("/elsewhere/x.py:3: UserWarning: m")
        with pytest.warns(UserWarning, match="recorded"):
            warnings.warn("recorded", stacklevel=1)
    assert warnings.formatwarning("m", UserWarning, cli.__file__, 3).startswith(cli.__file__)
