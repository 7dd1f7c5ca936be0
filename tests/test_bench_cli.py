"""`medfast bench`: suite selection, skipped/failed suites, the adapters on the committed results, and the
JSON / Markdown / PNG reports (with stand-in suites, so this test takes seconds, not a benchmark run)."""

import json
import sys
from pathlib import Path

import pytest

from medfast.bench import runner

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def test_adapters_read_the_committed_results():
    rows = runner._warp_rows(RESULTS) + runner._loss_rows(RESULTS)
    assert {r.suite for r in rows} == {"warp", "loss"}
    for adapter in (runner._metrics_rows, runner._distance_rows, runner._segmentation_rows, runner._ultrasound_rows,
                    runner._registration_rows, runner._classification_rows):
        got = adapter(RESULTS)
        assert got and all(r.medfast_ms for r in got)
    assert all(r.medfast_ms for r in rows)
    assert all(r.ratio == pytest.approx(r.peer_ms / r.medfast_ms, rel=1e-6) for r in rows if r.peer_ms)
    assert sum(r.ratio is not None for r in rows) >= 0.8 * len(rows)  # grid_sample has no cubic: no ratio
    (cls,) = runner._classification_rows(RESULTS)  # ratio = training step time / batch rendering time
    assert cls.ratio == pytest.approx(cls.peer_ms / cls.medfast_ms) and "data" in cls.case
    loss = [r for r in rows if r.suite == "loss" and r.peer == "MONAI DiceCELoss"]
    assert {r.case.split("C=")[1] for r in loss} >= {"4", "16", "64"}


def _suite(name, body, tmp_path, peers=()):
    script = tmp_path / f"{name}.py"
    script.write_text(body)

    def collect(out):
        data = json.loads((out / "r.json").read_text())
        return [runner.Row(name, "case", "peer", data["ours"], data["peer"], data["peer"] / data["ours"])]

    return runner.Suite(name, script.name, lambda d, q, o: [str(o / "r.json")], collect, peers=peers)


def test_runner_reports_ok_skipped_and_failed(tmp_path, monkeypatch):
    ok = _suite("good", "import json, sys\njson.dump({'ours': 2.0, 'peer': 6.0}, open(sys.argv[1], 'w'))\n", tmp_path)
    absent = _suite("absent", "import not_a_real_peer_module\n", tmp_path)
    declared = _suite("declared", "", tmp_path, peers=("not_a_real_peer_module",))
    broken = _suite("broken", "raise SystemExit('boom')\n", tmp_path)
    monkeypatch.setattr(runner, "SUITES", [ok, absent, declared, broken])
    monkeypatch.setattr(runner, "benchmarks_dir", lambda: tmp_path)
    status, rows = runner.run_suites("cpu", True, None, tmp_path / "work", progress=lambda m: None)
    assert status["good"]["status"] == "ok" and rows[0].ratio == pytest.approx(3.0)
    assert status["absent"]["status"] == "skipped" and "not_a_real_peer_module" in status["absent"]["reason"]
    assert status["declared"]["status"] == "skipped"
    assert status["broken"]["status"] == "failed"
    status, _ = runner.run_suites("cpu", True, "go*", tmp_path / "work2", progress=lambda m: None)
    assert list(status) == ["good"]

    meta = runner._meta("cpu", True)
    paths = runner.write_reports(tmp_path / "out", meta, {"good": {"status": "ok", "rows": 1, "seconds": 1.0}}, rows)
    names = {p.name for p in paths}
    assert "bench_cpu_latest.json" in names and "bench_cpu_latest.png" in names
    assert all(p.stat().st_size > 0 for p in paths)
    report = json.loads((tmp_path / "out" / "bench_cpu_latest.json").read_text())
    assert report["rows"][0]["ratio"] == pytest.approx(3.0) and report["meta"]["quick"] is True
    assert "| good | case | peer | 2.00 | 6.00 | 3.00x |" in (tmp_path / "out" / "bench_cpu_latest.md").read_text()

    # An --only run of another suite refreshes it in the latest report and keeps "good" (marked with its run);
    # its dated report holds only what it ran.
    meta2 = {**runner._meta("cpu", True), "date": "20990101-000000"}
    other = [runner.Row("other", "case", "peer", 1.0, 5.0, 5.0)]
    paths = runner.write_reports(tmp_path / "out", meta2, {"other": {"status": "ok", "rows": 1, "seconds": 1.0}},
                                 other)
    latest = json.loads((tmp_path / "out" / "bench_cpu_latest.json").read_text())
    assert {r["suite"] for r in latest["rows"]} == {"good", "other"}
    assert latest["suites"]["good"]["from"] == meta["date"] and "from" not in latest["suites"]["other"]
    assert f"(from the run of {meta['date']})" in (tmp_path / "out" / "bench_cpu_latest.md").read_text()
    dated = json.loads(paths[0].read_text())
    assert [r["suite"] for r in dated["rows"]] == ["other"]


def test_cli_lists_suites_and_rejects_unknown_selection(tmp_path, capsys):
    from medfast.cli import main

    assert main(["bench", "--list"]) == 0
    assert "warp" in capsys.readouterr().out
    assert main(["bench", "--only", "no-such-suite", "--out", str(tmp_path)]) == 2


def test_benchmark_scripts_are_found():
    where = runner.benchmarks_dir()
    assert all((where / s.script).is_file() for s in runner.SUITES), where
    assert sys.executable
