"""`medfast bench`: suite selection, skipped/failed suites, the adapters on the committed results, and the
JSON / Markdown / PNG reports (with stand-in suites, so this test takes seconds, not a benchmark run)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from medfast.bench import runner
from tests.conftest import needs_committed_results

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


@needs_committed_results
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
    (cls,) = runner._classification_rows(RESULTS)  # the step is no peer: no speed ratio, the share in the text
    assert cls.ratio is None and cls.peer_ms > cls.medfast_ms and "data" in cls.case
    loss = [r for r in rows if r.suite == "loss" and r.peer == "MONAI DiceCELoss"]
    assert {r.case.split("C=")[1] for r in loss} >= {"4", "16", "64"}


def _suite(name, body, tmp_path, peers=(), optional=()):
    script = tmp_path / f"{name}.py"
    script.write_text(body)

    def collect(out, device=None):
        data = json.loads((out / "r.json").read_text())
        return [runner.Row(name, "case", "peer", data["ours"], data["peer"], data["peer"] / data["ours"])]

    return runner.Suite(name, script.name, lambda d, q, o: [str(o / "r.json")], collect, peers=peers,
                        optional=optional)


GOOD = "import json, sys\njson.dump({'ours': 2.0, 'peer': 6.0}, open(sys.argv[1], 'w'))\n"


def test_runner_reports_ok_skipped_and_failed(tmp_path, monkeypatch):
    ok = _suite("good", GOOD, tmp_path)
    absent = _suite("absent", "import not_a_real_peer_module\n", tmp_path, optional=("not_a_real_peer_module",))
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
    # an empty pattern (an unset shell variable) is refused, not read as "every suite"
    for empty in ("", " , "):
        assert main(["bench", "--only", empty, "--out", str(tmp_path)]) == 2
        assert "--only needs suite names" in capsys.readouterr().err


def test_reports_without_ratios_write_no_chart_and_drop_a_stale_one(tmp_path):
    meta = runner._meta("cpu", True)
    good = [runner.Row("good", "case", "peer", 2.0, 6.0, 3.0)]
    runner.write_reports(tmp_path, meta, {"good": {"status": "ok", "rows": 1, "seconds": 1.0}}, good)
    assert (tmp_path / "bench_cpu_latest.png").exists()
    # the same suite rerun with its peer missing: its dated report has no ratios, so no chart; the latest keeps
    # the earlier rows (and their chart)
    meta2 = {**meta, "date": "20990101-000000"}
    paths = runner.write_reports(tmp_path, meta2, {"good": {"status": "skipped", "reason": "peer not installed"}},
                                 [])
    assert not any(p.suffix == ".png" and "20990101" in p.name for p in paths)
    assert not any(tmp_path.glob("*20990101-000000.png"))
    assert (tmp_path / "bench_cpu_latest.png").exists()
    # a chart with nothing to show is removed rather than left beside a report it does not show
    no_ratio = [runner.Row("good", "case", "peer", 2.0, None, None)]
    assert not runner.plot(meta, no_ratio, tmp_path / "bench_cpu_latest.png")
    assert not (tmp_path / "bench_cpu_latest.png").exists()


def test_benchmark_scripts_are_found():
    where = runner.benchmarks_dir()
    assert all((where / s.script).is_file() for s in runner.SUITES), where
    assert sys.executable


# ---- the CUDA variants of the loss / distance / registration suites, checked on the CPU ---------------------


def _script(name):
    """A benchmark script loaded as a module (they are scripts, not a package)."""
    path = runner.benchmarks_dir() / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(path.parent))  # run_warp imports warp_cases
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def test_gpu_suites_run_on_cuda_with_device_named_results(tmp_path):
    suites = {s.name: s for s in runner.SUITES}
    for name in ("loss", "distance", "registration", "warp"):
        suite = suites[name]
        assert suite.devices == ("cpu", "cuda"), name
        for quick in (True, False):
            argv = suite.args("cuda", quick, tmp_path)
            assert argv[argv.index("--device") + 1] == "cuda", (name, argv)
            assert "cpu" not in " ".join(argv), (name, argv)
    assert suites["distance"].args("cuda", True, tmp_path)[3].endswith("distance_cuda.json")
    # scipy: the reference; MONAI and CuPy are skipped inside the script (per row) when absent
    assert suites["distance"].needs("cuda") == suites["distance"].needs("cpu") == ("scipy",)
    assert {"monai", "cupy"} <= set(suites["distance"].optional)
    assert suites["loss"].needs("cuda") == () and suites["loss"].optional == ("monai",)
    # CPU arguments as before the CUDA variants (no batch / dtype change on the CPU)
    assert suites["loss"].args("cpu", True, tmp_path) == ["--device", "cpu", "--out", str(tmp_path), "--size", "64",
                                                          "--classes", "4", "16"]


def test_bench_loss_arguments_per_device():
    bench_loss = _script("bench_loss")
    cpu = bench_loss.parse_args(["--size", "32"])
    assert (cpu.device, cpu.batch, cpu.dtypes, cpu.repeats) == ("cpu", 1, ["float32"], 3)
    cuda = bench_loss.parse_args(["--device", "cuda"])
    assert (cuda.size, cuda.classes, cuda.batch, cuda.dtypes, cuda.repeats) == (
        128, [4, 16, 64], 2, ["float32", "bfloat16"], 20)
    assert bench_loss.parse_args(["--device", "cuda", "--batch", "1", "--dtypes", "float32"]).batch == 1
    with pytest.raises(SystemExit):
        bench_loss.parse_args(["--device", "tpu"])


def test_bench_loss_targets():
    bench_loss = _script("bench_loss")

    def res(ours, monai, ours_mib, monai_mib):
        return {"medfast": {"ms": ours, "extra_peak_mib": ours_mib},
                "monai": {"ms": monai, "extra_peak_mib": monai_mib}, "torch": {"status": "skipped: test"}}

    met = bench_loss.make_row(res(1.0, 3.5, 100.0, 900.0), "cuda", 128, 4, 2, "float32")
    assert met["target"] == ">= 3x, mem <= peer" and met["met"] == "yes"
    assert met["ratio_vs_monai"] == pytest.approx(3.5) and met["ratio_vs_torch"] is None
    assert met["torch_status"] == "skipped: test" and "torch_ms" not in met
    assert bench_loss.make_row(res(1.0, 2.0, 100.0, 900.0), "cuda", 128, 4, 2, "float32")["met"] == "no"  # too slow
    assert bench_loss.make_row(res(1.0, 9.0, 950.0, 900.0), "cuda", 128, 4, 2, "float32")["met"] == "no"  # memory
    skipped = {"medfast": {"ms": 1.0, "extra_peak_mib": 1.0}, "monai": {"status": "skipped: monai is not installed"},
               "torch": {"ms": 2.0, "extra_peak_mib": 1.0}}
    assert bench_loss.make_row(skipped, "cuda", 128, 4, 2, "float32")["met"] == "n/a"
    cpu = bench_loss.make_row(res(1.0, 3.5, 100.0, 900.0), "cpu", 128, 4, 1, "float32")
    assert (cpu["target"], cpu["met"]) == ("", "")
    # on the CPU only C = 16 has a target: 5x, extra memory within 1.25x the logits (128 MiB at 128^3)
    c16 = bench_loss.make_row(res(1.0, 5.5, 150.0, 900.0), "cpu", 128, 16, 1, "float32")
    assert (c16["target"], c16["met"]) == (">= 5x, mem <= 1.25x logits", "yes")
    assert bench_loss.make_row(res(1.0, 5.5, 170.0, 900.0), "cpu", 128, 16, 1, "float32")["met"] == "no"
    assert bench_loss.make_row(res(1.0, 4.5, 100.0, 900.0), "cpu", 128, 16, 1, "float32")["met"] == "no"


def test_bench_loss_nosync_row():
    # CUDA: medfast with check_labels=False is a second medfast column and its own MONAI row
    bench_loss = _script("bench_loss")
    res = {"medfast": {"ms": 2.0, "extra_peak_mib": 10.0}, "monai": {"ms": 3.0, "extra_peak_mib": 90.0},
           "torch": {"ms": 4.0, "extra_peak_mib": 80.0}, bench_loss.NOSYNC: {"ms": 1.0, "extra_peak_mib": 10.0}}
    row = bench_loss.make_row(res, "cuda", 128, 16, 2, "float32")
    assert row["ratio_vs_monai"] == pytest.approx(1.5) and row["medfast_nosync_ratio_vs_monai"] == pytest.approx(3.0)
    assert row["met"] == "no"  # the target is judged on the default (checked) loss


def test_loss_collector_adds_the_nosync_row(tmp_path):
    (tmp_path / "loss_cuda_latest.json").write_text(json.dumps(
        [_loss_row("cuda", 16, 2.0, 3.0, 2, "float32", medfast_nosync_ms=1.0, medfast_nosync_extra_peak_mib=10.0)]))
    rows = runner._loss_rows(tmp_path, "cuda")
    nosync = [r for r in rows if r.case.endswith("check_labels=False")]
    assert len(rows) == 3 and len(nosync) == 1 and nosync[0].ratio == pytest.approx(3.0) and nosync[0].target == ""


def _loss_row(device, classes, ours, monai, batch, dtype, **extra):
    row = {"classes": classes, "size": 128, "batch": batch, "dtype": dtype, "device": device, "medfast_ms": ours,
           "medfast_extra_peak_mib": 10.0, "monai_ms": monai, "monai_extra_peak_mib": 100.0, "torch_ms": 2 * monai,
           "torch_extra_peak_mib": 90.0, "target": ">= 3x, mem <= peer" if device == "cuda" else "",
           "met": ("yes" if monai / ours >= 3 else "no") if device == "cuda" else ""}
    row.update(extra)
    return row


def test_loss_collector_reads_the_results_of_its_device(tmp_path):
    cpu = [_loss_row("cpu", 4, 10.0, 40.0, 1, "float32")]
    cuda = [_loss_row("cuda", c, 1.0, 4.0, 2, dt) for dt in ("float32", "bfloat16") for c in (4, 16, 64)]
    cuda[-1] = _loss_row("cuda", 64, 1.0, 2.0, 2, "bfloat16")
    (tmp_path / "loss_cpu_latest.json").write_text(json.dumps(cpu))
    (tmp_path / "loss_cuda_latest.json").write_text(json.dumps(cuda))
    rows = runner._loss_rows(tmp_path, "cuda")
    assert len(rows) == 12 and all("B=2 128^3" in r.case for r in rows)
    monai = [r for r in rows if r.peer == "MONAI DiceCELoss"]
    assert [r.case for r in monai][:2] == ["Dice+CE fwd+bwd B=2 128^3 C=4", "Dice+CE fwd+bwd B=2 128^3 C=16"]
    assert monai[-1].case == "Dice+CE fwd+bwd B=2 128^3 C=64 bfloat16 logits"
    assert all(r.target == ">= 3x, mem <= peer" for r in monai)
    assert [r.met for r in monai] == ["yes"] * 5 + ["no"]
    assert monai[0].ratio == pytest.approx(4.0)
    assert (monai[0].medfast_peak_mib, monai[0].peer_peak_mib) == (10.0, 100.0)
    assert all(r.target == "" and r.met == "" for r in rows if r.peer == "PyTorch one-hot")
    (cpu_row, _) = runner._loss_rows(tmp_path, "cpu")
    assert cpu_row.case == "Dice+CE fwd+bwd 128^3 C=4" and cpu_row.ratio == pytest.approx(4.0) and cpu_row.target == ""
    # a peer the script skipped is a row without a time, not a failure
    (tmp_path / "loss_cuda_latest.json").write_text(json.dumps(
        [{k: v for k, v in _loss_row("cuda", 4, 1.0, 4.0, 2, "float32", monai_status="skipped: monai is not installed",
                                     met="n/a").items() if not k.startswith("monai_ms")}]))
    skipped = [r for r in runner._loss_rows(tmp_path, "cuda") if r.peer.startswith("MONAI")]
    assert skipped[0].peer_ms is None and skipped[0].ratio is None and "not installed" in skipped[0].peer
    with pytest.raises(FileNotFoundError):
        runner._loss_rows(tmp_path / "nothing", "cuda")
    (tmp_path / "cpu_only").mkdir()
    (tmp_path / "cpu_only" / "loss_cpu_latest.json").write_text(json.dumps(cpu))
    with pytest.raises(FileNotFoundError):  # never the CPU results for a CUDA run
        runner._loss_rows(tmp_path / "cpu_only", "cuda")


def test_distance_and_registration_collectors_on_cuda_results(tmp_path):
    (tmp_path / "distance_cpu.json").write_text(json.dumps({"case": "distance_transform 64^3", "ms": {
        "medfast": 5.0, "scipy": 50.0}}))
    (tmp_path / "distance_cuda.json").write_text(json.dumps({
        "case": "distance_transform 256^3 bool mask", "ms": {"medfast": 2.0, "scipy (CPU)": 4000.0},
        "peak_mib": {"medfast": 128.0}, "skipped": {"cupy": "cupy is not installed"}}))
    rows = runner._distance_rows(tmp_path, "cuda")
    assert [r.peer for r in rows] == ["scipy (CPU)", "cupy (skipped: cupy is not installed)"]
    assert rows[0].case == "EDT 256^3" and rows[0].ratio == pytest.approx(2000.0) and rows[0].medfast_peak_mib == 128
    assert rows[1].peer_ms is None and rows[1].ratio is None
    assert [r.peer for r in runner._distance_rows(tmp_path, "cpu")] == ["scipy"]

    (tmp_path / "registration_cpu_latest.json").write_text(json.dumps({"threads": 2, "lncc": [
        {"size": 64, "kernel": 9, "medfast_ms": 10.0, "monai_ms": 30.0}]}))
    (tmp_path / "registration_cuda_latest.json").write_text(json.dumps({
        "device": "cuda", "device_name": "NVIDIA H100", "lncc": [
            {"size": 128, "kernel": 9, "medfast_ms": 1.0, "monai_ms": 5.0, "medfast_extra_peak_mib": 20.0,
             "monai_extra_peak_mib": 200.0}],
        "step": {"size": 128, "medfast_ms": 30.0, "monai_ms": 45.0}}))
    rows = runner._registration_rows(tmp_path, "cuda")
    assert [r.case for r in rows] == ["LNCC fwd+bwd 128^3 k=9", "LocalNet step 128^3 (LNCC + bending + warp)"]
    assert rows[0].ratio == pytest.approx(5.0) and rows[0].peer_peak_mib == 200.0
    assert runner._registration_rows(tmp_path, "cpu")[0].case == "LNCC fwd+bwd 64^3 k=9, 2 threads"


def test_runner_passes_the_device_and_skips_per_device_peers(tmp_path, monkeypatch):
    seen = []
    script = tmp_path / "s.py"
    script.write_text("import json, sys\njson.dump({'ours': 1.0, 'peer': 4.0}, open(sys.argv[1], 'w'))\n")

    def collect(out, device=None):
        seen.append(device)
        data = json.loads((out / f"r_{device}.json").read_text())
        return [runner.Row("s", "case", "peer", data["ours"], data["peer"], data["peer"] / data["ours"],
                           target=">= 3x", met="yes")]

    suite = runner.Suite("s", script.name, lambda d, q, o: [str(o / f"r_{d}.json")], collect,
                         device_peers={"cuda": ("not_a_real_peer_module",)})
    monkeypatch.setattr(runner, "SUITES", [suite])
    monkeypatch.setattr(runner, "benchmarks_dir", lambda: tmp_path)
    status, rows = runner.run_suites("cpu", True, None, tmp_path / "work", progress=lambda m: None)
    assert status["s"]["status"] == "ok" and seen == ["cpu"] and rows[0].met == "yes"
    status, _ = runner.run_suites("cuda", True, None, tmp_path / "work2", progress=lambda m: None)
    assert status["s"]["status"] == "skipped" and "not_a_real_peer_module" in status["s"]["reason"]
    text = runner.markdown(runner._meta("cpu", True), {"s": {"status": "ok", "rows": 1, "seconds": 1.0}}, rows)
    assert "| target | met? |" in text and "| s | case | peer | 1.00 | 4.00 | 4.00x | - | - | >= 3x | yes |" in text


def test_warp_suite_has_the_affine_transform_peers():
    wc = _script("warp_cases")
    cuda = [c for c in wc.cases(16, "cuda") if c.op == "affine"]
    assert {c.peer for c in cuda} == {"cupy"} and {c.mode for c in cuda} == set(wc.MODES)
    assert all(c.pass_ == "fwd" for c in cuda) and "affine" in cuda[0].config
    assert {c.peer for c in wc.cases(16, "cpu") if c.op == "affine"} == {"scipy"}
    assert not [c for c in wc.cases(16, "cpu", ops=("warp",)) if c.op == "affine"]
    theta = wc.affine_theta(16)
    assert theta.shape == (1, 3, 4) and theta.dtype == __import__("torch").float32
    pytest.importorskip("scipy")
    rows = wc.agreement("cpu", size=12, ops=("affine",))  # scipy affine_transform: medfast's conventions
    assert {r["mode"] for r in rows} == set(wc.MODES)
    assert all(r["status"] == "ok" and r["out"] < 1e-5 for r in rows), rows


# ---- the pytest-benchmark tests of benchmarks/ (`pytest benchmarks --benchmark-only`) --------------------------

BENCH_TEST_FILES = ("test_bench_warp.py", "test_bench_loss.py", "test_bench_metrics.py", "test_bench_distance.py",
                    "test_bench_registration.py", "test_bench_segmentation.py", "test_bench_ultrasound.py",
                    "test_bench_classification.py")


def test_every_suite_has_a_pytest_benchmark_module():
    where = runner.benchmarks_dir()
    assert all((where / f).is_file() for f in BENCH_TEST_FILES), where
    assert {s.name for s in runner.SUITES} == {f[len("test_bench_"):-len(".py")] for f in BENCH_TEST_FILES}


def test_pytest_benchmarks_run_once_at_the_smallest_size(tmp_path):
    """``pytest benchmarks --benchmark-disable``: each benchmark body once, untimed, at 16^3 on the CPU, so that a
    broken benchmark test fails here; medfast's own cases must run (only peers may be skipped)."""
    import os
    import subprocess
    import xml.etree.ElementTree as ET

    pytest.importorskip("pytest_benchmark")
    where = runner.benchmarks_dir()
    report = tmp_path / "junit.xml"
    env = {**os.environ, "MEDFAST_BENCH_SIZE": "16", "MEDFAST_BENCH_DEVICE": "cpu", "MEDFAST_BENCH_ROUNDS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", str(where), "--benchmark-disable", "-q", "-p",
                           "no:cacheprovider", "-W", "ignore", f"--junitxml={report}", "--rootdir", str(where)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    cases = ET.parse(report).getroot().iter("testcase")
    ran, skipped = set(), {}
    for case in cases:
        name = f"{case.get('classname')}.{case.get('name')}"
        skip = case.find("skipped")
        if skip is None:
            ran.add(name)
        else:
            skipped[name] = skip.get("message", "")
    files = {n.split(".")[0] for n in ran}
    assert files == {f[:-3] for f in BENCH_TEST_FILES}, files
    medfast_skipped = {n: m for n, m in skipped.items() if "medfast" in n}
    assert not medfast_skipped, medfast_skipped
    assert all("not installed" in m or "n/a" in m for m in skipped.values()), skipped
    assert len(ran) >= 60, sorted(ran)
    # the CUDA parametrization (batch 2 and bfloat16 for the loss, CuPy for the EDT, ...) collects too
    env["MEDFAST_BENCH_DEVICE"] = "cuda"
    proc = subprocess.run([sys.executable, "-m", "pytest", str(where), "--collect-only", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(where)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "test_loss[C4-bfloat16-monai]" in proc.stdout and "test_distance[cupy]" in proc.stdout


def test_registration_rows_of_the_three_step_builds(tmp_path):
    """The CPU step rows: the MONAI build (stock network) with issue 5's 2x target, MONAI's blocks on
    medfast's network without one, the network parts; LNCC rows carry the 5x target; no CUDA targets."""
    data = {"threads": 2, "lncc": [{"size": 64, "kernel": 9, "medfast_ms": 10.0, "monai_ms": 40.0}],
            "step": {"size": 64, "channels": 8, "medfast_ms": 300.0, "monai_ms": 900.0, "monai_fastnet_ms": 360.0},
            "step_breakdown": {"size": 64, "net_ms": 280.0, "monai_net_ms": 800.0, "medfast_losses_ms": 20.0,
                               "monai_losses_ms": 80.0, "ratio_ceiling": 1.29}}
    (tmp_path / "registration_cpu_latest.json").write_text(json.dumps(data))
    rows = runner._registration_rows(tmp_path, "cpu")
    assert [(r.target, r.met) for r in rows] == [(">= 5x", "no"), (">= 2x", "yes"), ("", ""), ("", ""), ("", "")]
    assert rows[1].peer.startswith("MONAI build (stock torch.nn LocalNet") and rows[1].ratio == pytest.approx(3.0)
    assert rows[2].peer == "MONAI Warp/LNCC/BendingEnergy on medfast's LocalNet" and rows[2].ratio == pytest.approx(1.2)
    assert rows[4].peer_ms == 800.0 and rows[4].ratio == pytest.approx(800 / 280)
    data["device"] = "cuda"
    (tmp_path / "registration_cuda_latest.json").write_text(json.dumps(data))
    assert {r.target for r in runner._registration_rows(tmp_path, "cuda")} == {""}


def test_metrics_rows_carry_the_cpu_hausdorff_target(tmp_path):
    (tmp_path / "metrics_cpu.json").write_text(json.dumps({
        "case": "128^3 blob pair (background + 1 class), spacing (1.5, 1.0, 0.8), device cpu",
        "ms": {"hausdorff95": {"medfast": 8.0, "monai": 120.0}, "hausdorff95 disjoint balls": {"medfast": 10.0,
               "monai": 50.0}, "dice": {"medfast": 5.0, "monai": 20.0}}}))
    rows = runner._metrics_rows(tmp_path, "cpu")
    assert [(r.case, r.target, r.met) for r in rows] == [
        ("hausdorff95 128^3", ">= 10x", "yes"), ("hausdorff95 disjoint balls 128^3", ">= 10x", "no"),
        ("dice 128^3", "", "")]
    (tmp_path / "metrics_cuda.json").write_text(json.dumps({
        "case": "128^3 blob pair (background + 1 class), spacing (1.5, 1.0, 0.8), device cuda",
        "ms": {"hausdorff95": {"medfast": 1.0, "monai": 2.0}}}))
    assert runner._metrics_rows(tmp_path, "cuda")[0].target == ""


def test_ultrasound_rows_carry_the_cpu_frame_rate_target(tmp_path):
    def row(case, batch, fps, device="cpu", sub_rays=3):
        return {"case": case, "device": device, "batch": batch, "sub_rays": sub_rays, "volume": 128,
                "seconds_per_call": batch / fps, "frames_per_second": fps, "peak_mib": 700.0}

    (tmp_path / "ultrasound_cpu_latest.json").write_text(json.dumps({"summary": {}, "medfast": [
        row("forward", 1, 136.0), row("forward", 1, 90.0), row("forward_backward", 1, 30.0),
        row("forward", 1, 260.0, sub_rays=1)]}))
    rows = runner._ultrasound_rows(tmp_path, "cpu")
    # the target is for the default 3 sub-rays only (a 1-sub-ray "yes" stood beside a 3-sub-ray "no")
    assert [(r.target, r.met) for r in rows] == [(">= 100 frames/s", "yes"), (">= 100 frames/s", "no"), ("", ""),
                                                 ("", "")]
    # the simulator's peak is the process's resident size: in the text, not in the extra-peak column
    assert all(r.medfast_peak_mib is None and "process RSS 700 MiB" in r.case for r in rows)


def test_ultrasound_pymust_ratio_is_per_frame_on_a_batch(tmp_path):
    """A CUDA call renders 64 frames: the pymust ratio divided one frame's time by the whole call's (the h200c
    report's 30,198x for a per-frame 1.93 million x), and a GPU's allocator peak was called process RSS."""
    def row(case, batch, fps, sub_rays=3):
        return {"case": case, "device": "cuda", "batch": batch, "sub_rays": sub_rays, "volume": 64,
                "seconds_per_call": batch / fps, "frames_per_second": fps, "peak_mib": 614.0}

    (tmp_path / "ultrasound_cuda_latest.json").write_text(json.dumps({
        "summary": {"pymust_seconds_60k_scatterers_one_transmit_extrapolated": 189.76895},
        "medfast": [row("forward", 64, 10184.3), row("forward_backward", 64, 2995.9)]}))
    rows = runner._ultrasound_rows(tmp_path, "cuda")
    pymust = [r for r in rows if r.peer == "pymust"][0]
    assert pymust.medfast_ms == pytest.approx(1e3 / 10184.3)
    assert pymust.ratio == pytest.approx(189768.95 * 10184.3 / 1e3, rel=1e-6)
    assert all("CUDA allocator peak 614 MiB" in r.case for r in rows if r.peer != "pymust")


def test_bench_loss_checks_agreement_before_timing(monkeypatch):
    bench_loss = _script("bench_loss")
    bench_loss.check_agreement(3, size=6)  # medfast, MONAI and the plain reference agree
    real = bench_loss._loss_fn

    def wrong(impl):  # a peer that gives another result must stop the benchmark, not reach its table
        fn = real(impl)
        return (lambda logits, target: 1.01 * fn(logits, target)) if impl == "monai" else fn

    monkeypatch.setattr(bench_loss, "_loss_fn", wrong)
    with pytest.raises(AssertionError, match="monai disagrees with medfast"):
        bench_loss.check_agreement(3, size=6)


# ---- the runner's robustness: merged latest report, chart, peers, --out / --only, Ctrl-C, failures ------------

def _stand_ins(monkeypatch, tmp_path, *suites):
    monkeypatch.setattr(runner, "SUITES", list(suites))
    monkeypatch.setattr(runner, "benchmarks_dir", lambda: tmp_path)
    monkeypatch.delenv("MEDFAST_BENCH_WORK", raising=False)


def _args(out, only=None):
    import argparse

    return argparse.Namespace(list=False, replot=None, device="cpu", only=only, quick=True, out=out)


def _ok(suite, rows=1):
    return {"status": "ok", "rows": rows, "seconds": 1.0}


def test_latest_keeps_each_suites_run_and_refuses_other_setups(tmp_path, capsys):
    out = tmp_path / "out"
    full = {**runner._meta("cpu", False), "date": "20990101-000000", "host": "vm", "threads": 2}
    runner.write_reports(out, full, {"warp": _ok("warp"), "distance": _ok("distance")},
                         [runner.Row("warp", "linear", "grid_sample", 1.0, 9.0, 9.0),
                          runner.Row("distance", "EDT 128^3", "scipy", 1.0, 7.0, 7.0)])
    before = (out / "bench_cpu_latest.json").read_text()
    # a quick run on another host, with other threads and torch: not merged (it would relabel the vm's full-size
    # rows and replace the 128^3 EDT by a 64^3 one); its own dated report is written, and why is said
    laptop = {**runner._meta("cpu", True), "host": "laptop", "threads": 8, "torch": "2.99.0",
              "date": "20990102-000000"}
    said = []
    paths = runner.write_reports(out, laptop, {"distance": _ok("distance")},
                                 [runner.Row("distance", "EDT 64^3", "scipy", 1.0, 3.0, 3.0)], say=said.append)
    assert (out / "bench_cpu_latest.json").read_text() == before
    assert not any(p.name.startswith("bench_cpu_latest") for p in paths)
    assert (out / "bench_cpu_laptop_20990102-000000.json").is_file()
    assert len(said) == 1 and "bench_cpu_latest" in said[0] and "'vm' there, 'laptop' here" in said[0]
    # the same setup, one suite rerun: merged, each suite with its own run's meta, shown per suite
    later = {**full, "date": "20990103-000000", "medfast": "9.9"}
    runner.write_reports(out, later, {"distance": _ok("distance")},
                         [runner.Row("distance", "EDT 128^3", "scipy", 1.0, 8.0, 8.0)])
    latest = json.loads((out / "bench_cpu_latest.json").read_text())
    assert latest["suites"]["warp"]["meta"]["date"] == "20990101-000000"
    assert latest["suites"]["distance"]["meta"]["date"] == "20990103-000000"
    assert latest["suites"]["distance"]["meta"]["medfast"] == "9.9"
    assert latest["suites"]["warp"]["meta"]["medfast"] != "9.9"
    md = (out / "bench_cpu_latest.md").read_text()
    assert "| warp | ok | 20990101-000000 (vm," in md and "| distance | ok | 20990103-000000 (vm," in md
    assert "2 runs (20990101-000000, 20990103-000000)" in md
    # a quick run of every suite on the same host does not replace full-size rows either
    quick = {**later, "quick": True, "date": "20990104-000000"}
    runner.write_reports(out, quick, {"warp": _ok("warp"), "distance": _ok("distance")}, [], say=said.append)
    assert json.loads((out / "bench_cpu_latest.json").read_text()) == latest and "quick run" in said[-1]
    # a full run of every suite on another host replaces the latest (nothing of the old setup stays beside it)
    other = {**full, "host": "box", "date": "20990105-000000"}
    runner.write_reports(out, other, {"warp": _ok("warp"), "distance": _ok("distance")},
                         [runner.Row("warp", "linear", "grid_sample", 1.0, 5.0, 5.0)])
    latest = json.loads((out / "bench_cpu_latest.json").read_text())
    assert {s["meta"]["host"] for s in latest["suites"].values()} == {"box"} and len(latest["rows"]) == 1


def test_a_rerun_without_results_keeps_the_earlier_rows(tmp_path):
    meta = {**runner._meta("cpu", True), "date": "20990101-000000"}
    runner.write_reports(tmp_path, meta, {"good": _ok("good")}, [runner.Row("good", "case", "peer", 2.0, 6.0, 3.0)])
    # rerun with the peer gone (or failed / interrupted): the earlier rows stay, dated, the attempt noted
    for date, state in (("20990102-000000", "skipped"), ("20990103-000000", "failed")):
        runner.write_reports(tmp_path, {**meta, "date": date}, {"good": {"status": state, "reason": "peer gone"}}, [])
        latest = json.loads((tmp_path / "bench_cpu_latest.json").read_text())
        assert [r["ratio"] for r in latest["rows"]] == [3.0]
        good = latest["suites"]["good"]
        assert good["status"] == "ok" and good["from"] == "20990101-000000"
        assert good["rerun"] == {"date": date, "status": state, "reason": "peer gone"}
        md = (tmp_path / "bench_cpu_latest.md").read_text()
        assert f"rerun of {date} {state} (peer gone): these rows kept" in md and "| 1 | good | case |" in md


def _figure_of(monkeypatch, meta, rows, path, status=None):
    """The Figure runner.plot saved (it uses no pyplot), drawn on an Agg canvas for inspection."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figs, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figs.append(fig), save(fig, *a, **k))[1])
    assert runner.plot(meta, rows, path, status)
    FigureCanvasAgg(figs[0]).draw()
    return figs[0]


@needs_committed_results
def test_chart_is_readable(tmp_path, monkeypatch):
    """The committed latest report's chart: short labels, a wide plot area, values on the bars, pymust's
    extrapolated 11,561x clipped with its value written, and a peak-memory panel."""
    d = json.loads((RESULTS / "bench_cpu_latest.json").read_text())
    rows = [runner.Row(**r) for r in d["rows"]]
    fig = _figure_of(monkeypatch, d["meta"], rows, tmp_path / "c.png", d["suites"])
    ratio_ax, mem_ax = fig.axes
    width = fig.get_size_inches()[0] * fig.dpi
    assert ratio_ax.get_window_extent().width > 0.35 * width and mem_ax.get_window_extent().width > 0.2 * width
    labels = [t.get_text() for t in ratio_ax.get_yticklabels()]
    assert max(map(len, labels)) <= 90 and labels[0].startswith("#1 warp: ")
    texts = [t.get_text() for t in ratio_ax.texts]
    shown = [r for r in rows if r.ratio]
    assert len(texts) == len(shown) and f"{shown[0].ratio:#.3g}x" in texts  # (the committed run's own value)
    outlier = max(r.ratio for r in shown)
    assert ratio_ax.get_xlim()[1] < outlier / 10  # the extrapolated row does not set the axis
    assert any(f"{outlier:,.0f}x (extrapolated), clipped" in t for t in texts)
    mem = [t.get_text() for t in mem_ax.texts]
    assert "8" in mem and "96" in mem and "2560" in mem  # warp linear c1 fwd: medfast 8 MiB, grid_sample 96 MiB
    # the Markdown numbers its rows as the chart does, with the full case text
    md = runner.markdown(d["meta"], d["suites"], rows)
    assert f"| {rows.index(shown[-1]) + 1} | ultrasound | {shown[-1].case} |" in md


def test_replot_renders_a_report_again(tmp_path, capsys):
    from medfast.cli import main

    meta = runner._meta("cpu", True)
    runner.write_reports(tmp_path, meta, {"good": _ok("good")}, [runner.Row("good", "case", "peer", 2.0, 6.0, 3.0)])
    report = tmp_path / "bench_cpu_latest.json"
    (tmp_path / "bench_cpu_latest.png").unlink()
    (tmp_path / "bench_cpu_latest.md").write_text("old")
    before = report.read_text()
    assert main(["bench", "--replot", str(report)]) == 0
    assert report.read_text() == before and (tmp_path / "bench_cpu_latest.png").stat().st_size > 0
    assert "| 1 | good | case | peer | 2.00 | 6.00 | 3.00x |" in (tmp_path / "bench_cpu_latest.md").read_text()
    assert main(["bench", "--replot", str(tmp_path / "nothing.json")]) == 2
    assert "--replot" in capsys.readouterr().err


def test_optional_peers_do_not_skip_the_suite(tmp_path, monkeypatch):
    suites = {s.name: s for s in runner.SUITES}
    # bench_ultrasound.py runs without pymust (and judges the frame-rate target), bench_distance.py without MONAI
    assert suites["ultrasound"].needs("cpu") == () and "pymust" in suites["ultrasound"].optional
    assert "monai" not in suites["distance"].needs("cpu")
    s = _suite("s", GOOD, tmp_path, optional=("not_a_real_peer_module",))
    _stand_ins(monkeypatch, tmp_path, s)
    status, rows = runner.run_suites("cpu", True, None, tmp_path / "work", progress=lambda m: None)
    assert status["s"]["status"] == "ok" and len(rows) == 1
    # the collector reports the peer the script ran without as a row
    (tmp_path / "us").mkdir()
    (tmp_path / "us" / "ultrasound_cpu_latest.json").write_text(json.dumps({"summary": {}, "pymust": [], "medfast": [
        {"case": "forward", "device": "cpu", "batch": 1, "sub_rays": 3, "volume": 64, "seconds_per_call": 0.01,
         "frames_per_second": 100.0}]}))
    pm = runner._ultrasound_rows(tmp_path / "us", "cpu")[-1]
    assert pm.peer.startswith("pymust (not run") and pm.ratio is None and pm.medfast_ms == pytest.approx(10.0)


def test_skipped_only_for_a_declared_peer_ending_the_script(tmp_path, monkeypatch):
    logged = _suite("logged", "print(\"optional backend: No module named 'fancyplot'\")\n"
                    "raise RuntimeError('kernel returned NaN')\n", tmp_path, optional=("fancyplot",))
    core = _suite("core", "import not_a_core_dependency\n", tmp_path, peers=())  # like yaml: no peer of the suite
    peer = _suite("peer", "import not_a_peer_either.sub\n", tmp_path, optional=("not_a_peer_either",))
    _stand_ins(monkeypatch, tmp_path, logged, core, peer)
    status, _ = runner.run_suites("cpu", True, None, tmp_path / "work", progress=lambda m: None)
    assert status["logged"] == {**status["logged"], "status": "failed", "reason": "RuntimeError: kernel returned NaN"}
    assert status["core"]["status"] == "failed" and "not_a_core_dependency" in status["core"]["reason"]
    assert status["peer"]["status"] == "skipped" and status["peer"]["reason"] == "peer not installed: not_a_peer_either"


def test_failed_suites_have_a_reason_and_a_kept_log(tmp_path, monkeypatch, capsys):
    loud = _suite("loud", "raise SystemExit('boom: bad input')\n", tmp_path)
    quiet = _suite("quiet", "import sys; print('step 1 ok', file=sys.stderr); sys.exit(3)\n"
                   "", tmp_path)
    silent = _suite("silent", "import sys; sys.exit(4)\n", tmp_path)
    _stand_ins(monkeypatch, tmp_path, loud, quiet, silent)
    assert runner.main(_args(tmp_path / "out")) == 1
    report = json.loads(next((tmp_path / "out").glob("bench_cpu_*-*.json")).read_text())
    st = report["suites"]
    assert (st["loud"]["reason"], st["quiet"]["reason"], st["silent"]["reason"]) == (
        "boom: bad input", "step 1 ok", "exit code 4")
    for name in ("loud", "quiet", "silent"):
        log = Path(st[name]["log"])
        assert log.is_file() and log.parent == tmp_path / "out", log  # beside the report, not in a deleted folder
    assert "step 1 ok" in Path(st["quiet"]["log"]).read_text()
    md = (tmp_path / "out" / "bench_cpu_latest.md").read_text()
    assert "| silent | failed |" in md and "exit code 4 (log: bench_cpu_" in md and "0 comparisons" not in md


def test_out_must_be_a_writable_folder_before_anything_runs(tmp_path, monkeypatch, capsys):
    from medfast.cli import main

    monkeypatch.setattr(runner, "run_suites", lambda *a, **k: pytest.fail("ran suites before checking --out"))
    afile = tmp_path / "afile"
    afile.write_text("")
    for out in (afile, afile / "sub"):
        assert main(["bench", "--quick", "--only", "distance", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}" in err and "nothing run" in err


def test_only_patterns_must_each_match_a_suite(tmp_path, monkeypatch, capsys):
    from medfast.cli import main

    monkeypatch.setattr(runner, "run_suites", lambda *a, **k: pytest.fail("ran despite a typo in --only"))
    assert main(["bench", "--only", "distance,clasification", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'clasification' matches no suite" in err and "classification" in err and "'distance'" not in err
    assert runner.unmatched_patterns("dist*, loss ,x?") == ["x?"]


def test_ctrl_c_keeps_the_finished_suites(tmp_path, monkeypatch, capsys):
    first = _suite("first", GOOD, tmp_path)
    second = _suite("second", GOOD, tmp_path)
    third = _suite("third", GOOD, tmp_path)

    def interrupted(out, device=None):
        raise KeyboardInterrupt

    second.collect = interrupted
    _stand_ins(monkeypatch, tmp_path, first, second, third)
    assert runner.main(_args(tmp_path / "out")) == 130
    latest = json.loads((tmp_path / "out" / "bench_cpu_latest.json").read_text())
    assert [r["suite"] for r in latest["rows"]] == ["first"]
    assert {n: s["status"] for n, s in latest["suites"].items()} == {
        "first": "ok", "second": "interrupted", "third": "interrupted"}
    assert "interrupted" in capsys.readouterr().err


def test_a_relative_work_folder_is_the_callers(tmp_path, monkeypatch):
    scripts = tmp_path / "pkg" / "benchmarks"
    scripts.mkdir(parents=True)
    s = _suite("s", GOOD, scripts)
    _stand_ins(monkeypatch, scripts, s)
    monkeypatch.chdir(tmp_path)  # the scripts run in pkg/: a relative folder must still mean tmp_path/relwork
    status, rows = runner.run_suites("cpu", True, None, Path("relwork"), progress=lambda m: None)
    assert status["s"]["status"] == "ok" and (tmp_path / "relwork" / "s" / "r.json").is_file()
    monkeypatch.setenv("MEDFAST_BENCH_WORK", "relwork2")
    assert runner.main(_args(tmp_path / "out")) == 0
    assert (tmp_path / "relwork2" / "s" / "r.json").is_file()


@needs_committed_results
def test_readme_cpu_figures_are_those_of_the_runs_it_cites():
    """The README's CPU figures name the result file that holds them (bench_cpu_latest.md is overwritten by
    every run: figures cited from it went stale), and its "Latest CPU run" table is that run's."""
    import re

    text = (RESULTS.parent.parent / "README.md").read_text()

    def rows_of(stem):
        return json.loads((RESULTS / f"{stem}.json").read_text())["rows"]

    # Hausdorff-95 after the surface_edges change: the **bold** ratios, in the benchmark's case order
    para = text[text.index("Then the surface distances crop"):]
    para = para[:para.index("\n\n")]
    (cited,) = re.findall(r"`(bench_cpu_[^`]+)\.md`", para)
    hd = [r["ratio"] for r in rows_of(cited) if r["case"].startswith("hausdorff95")]
    assert [float(x) for x in re.findall(r"\*\*([\d.]+)x\*\*", para)] == [round(x, 1) for x in hd]
    # the table: the run its introduction names, case by case
    intro = text[text.index("Latest CPU run ("):]
    stem = re.search(r"full table in\s+`benchmarks/results/(bench_cpu_[^`]+)\.md`", intro).group(1)
    warp = {(r["case"], r["peer"]): r for r in rows_of(stem) if r["suite"] == "warp"}
    table = [line for line in intro[intro.index("| case | medfast |"):].splitlines()[2:8]]
    assert len(table) == 6
    for line in table:
        case, ms, *peers, _ = [c.strip() for c in line.strip("|").split("|")]
        mode, ch, pass_ = re.match(r"(\w+), (\d) channels?, (forward\+backward|forward)", case).groups()
        key = f"{mode} c{ch} {'fwd+bwd' if 'backward' in pass_ else 'fwd'} vs {{}} 128^3"
        got = warp[(key.format("grid_sample"), "grid_sample")]
        assert float(ms.split()[0]) == pytest.approx(got["medfast_ms"], rel=0.03), line
        for peer, cell in zip(("grid_sample", "monai", "interpol"), peers):
            if cell.endswith("x"):
                assert float(cell[:-1]) == pytest.approx(warp[(key.format(peer), peer)]["ratio"], rel=0.02), line


def test_a_suite_missing_its_source_files_is_skipped(tmp_path, monkeypatch):
    """An installed wheel ships benchmarks/ as medfast/benchmarks but not configs/: the classification suite failed
    (config file not found) and `medfast bench` exited 1; it is skipped, saying why."""
    assert "configs/cls_demo_cpu.yaml" in {s.name: s for s in runner.SUITES}["classification"].files
    where = tmp_path / "pkg" / "benchmarks"
    where.mkdir(parents=True)
    s = _suite("needs_config", GOOD, where)
    s = runner.Suite(s.name, s.script, s.args, s.collect, files=("configs/x.yaml",))
    monkeypatch.setattr(runner, "SUITES", [s])
    monkeypatch.setattr(runner, "benchmarks_dir", lambda: where)
    status, _ = runner.run_suites("cpu", True, None, tmp_path / "work", progress=lambda m: None)
    assert status["needs_config"]["status"] == "skipped"
    assert "configs/x.yaml not here" in status["needs_config"]["reason"]
    (tmp_path / "pkg" / "configs").mkdir()
    (tmp_path / "pkg" / "configs" / "x.yaml").write_text("{}\n")
    status, _ = runner.run_suites("cpu", True, None, tmp_path / "work2", progress=lambda m: None)
    assert status["needs_config"]["status"] == "ok"


# ---- the warp suite's failures, caveats and memory probe; pymust's extrapolation; the report's ratio cell -------

def test_warp_suite_fails_when_medfast_fails_and_keeps_the_earlier_rows(tmp_path, monkeypatch):
    """A medfast error in a warp configuration: run_warp.py exited 0 and `medfast bench` read the suite as ok,
    its rows blank where medfast's times should be (replacing the earlier run's). Now exit 1: failed, earlier
    rows kept, the reason naming the configuration."""
    where = runner.benchmarks_dir()
    wrapper = tmp_path / "warp_medfast_fails.py"
    wrapper.write_text(
        f"import sys\nsys.path.insert(0, {str(where)!r})\nimport run_warp, warp_cases as wc\n"
        "def crash(case, inputs):\n"
        "    def boom(image, ddf):\n        raise RuntimeError('simulated medfast failure')\n    return boom\n"
        "wc.PREPARE['medfast'] = crash\nsys.exit(run_warp.main(sys.argv[1:]))\n")
    args = ["--size", "8", "--peers", "grid_sample", "--modes", "nearest", "--ops", "warp", "--no-isolate",
            "--no-agreement", "--repeats", "3", "--warmup", "0", "--budget", "0"]
    warp = runner.Suite("warp", wrapper.name, lambda d, q, o: ["--device", d, "--out", str(o), "--quick", *args],
                        runner._warp_rows)
    _stand_ins(monkeypatch, tmp_path, warp)
    out = tmp_path / "out"
    earlier = {**runner._meta("cpu", True), "date": "20990101-000000"}
    runner.write_reports(out, earlier, {"warp": _ok("warp")}, [runner.Row("warp", "linear", "grid_sample", 1.0, 9.0,
                                                                          9.0)])
    assert runner.main(_args(out, only="warp")) == 1
    latest = json.loads((out / "bench_cpu_latest.json").read_text())
    assert [r["ratio"] for r in latest["rows"]] == [9.0]
    rerun = latest["suites"]["warp"]["rerun"]
    assert rerun["status"] == "failed" and "medfast did not run 4 configurations" in rerun["reason"]
    assert "simulated medfast failure" in rerun["reason"]
    # this run's dated report (not the earlier one of 2099: glob order is the file system's)
    mine = [p for p in out.glob("bench_cpu_*-*.json") if "20990101" not in p.name]
    assert len(mine) == 1
    dated = json.loads(mine[0].read_text())
    assert dated["suites"]["warp"]["status"] == "failed" and dated["rows"] == []


def _warp_json(tmp_path, rows):
    (tmp_path / "warp_cpu_latest.json").write_text(json.dumps({"rows": rows}))
    return runner._warp_rows(tmp_path, "cpu")


def test_warp_rows_say_why_a_side_did_not_run(tmp_path):
    """A skipped or failing peer (and a failing medfast) reached the report as a blank row, like an n/a
    configuration; run_warp's "*" (timed while other processes were busy) was dropped."""
    ok = {"status": "ok", "ms": 2.0, "peak_mib": 1.0, "background_cores": 0.0}
    busy = {**ok, "ms": 6.0, "background_cores": 1.5}

    def row(peer, mine, theirs, **extra):
        ratio = theirs["ms"] / mine["ms"] if "ms" in mine and "ms" in theirs else None
        return {"case": f"nearest c1 fwd vs {peer}", "size": 12, "peer": peer, "medfast": mine, "peer_result": theirs,
                "ratio": ratio, "target": "", "met": "", **extra}

    rows = _warp_json(tmp_path, [
        row("monai", ok, {"status": "error", "reason": "RuntimeError: MONAI Warp blew up | worker exit 1"}),
        row("interpol", ok, {"status": "skipped", "reason": "interpol is not installed"}),
        row("grid_sample", ok, {"status": "n/a", "reason": "grid_sample 'bicubic' is 2D only"}),
        row("scipy", {"status": "error", "reason": "RuntimeError: illegal memory access"}, ok),
        row("grid_sample", busy, busy)])
    assert rows[0].peer == "monai (error: RuntimeError: MONAI Warp blew up / worker exit 1)"
    assert rows[1].peer == "interpol (skipped: interpol is not installed)"
    assert rows[2].peer == "grid_sample (n/a: grid_sample 'bicubic' is 2D only)"
    assert rows[3].case == "nearest c1 fwd vs scipy 12^3 (medfast error: RuntimeError: illegal memory access)"
    assert rows[3].peer == "scipy" and rows[3].medfast_ms is None
    assert rows[4].case.endswith("(medfast *: timed while other processes used 1.50 cores)")
    assert rows[4].peer == "grid_sample (*: timed while other processes used 1.50 cores)"
    assert rows[0].case == "nearest c1 fwd vs monai 12^3" and rows[0].ratio is None
    assert runner._WARP_BUSY_CORES == _script("run_warp").BUSY_CORES


def test_warp_measure_and_agreement_survive_a_broken_peer_setup(monkeypatch):
    """measure() promised never to raise for a failing peer, but its setup (PREPARE: an import, a module) sat
    outside the try: in-process, a cupy built for another CUDA ended the whole suite (the agreement too)."""
    wc = _script("warp_cases")

    def broken(case, inputs):
        raise ImportError("libnvrtc.so.12: cannot open shared object file")

    monkeypatch.setitem(wc.PREPARE, "grid_sample", broken)
    res = wc.measure("grid_sample", wc.Case("grid_sample", "linear", 1, "fwd", 8), repeats=3, warmup=0, budget_s=0)
    assert res == {"status": "error", "reason": "ImportError: libnvrtc.so.12: cannot open shared object file"}
    monkeypatch.setattr(wc, "PEERS", ("grid_sample",))
    monkeypatch.setattr(wc, "MODES", ("linear",))
    rows = wc.agreement("cpu", size=8, ops=("warp",))
    assert rows and all(r["status"] == "error" and "libnvrtc" in r["reason"] for r in rows)
    # medfast's own failure is the suite's: raised
    monkeypatch.setitem(wc.PREPARE, "medfast", broken)
    with pytest.raises(ImportError):
        wc.agreement("cpu", size=8, ops=("warp",))


def test_cubic_interpol_target_is_judged_on_the_forward(tmp_path):
    """torch-interpol's cubic image gradient (zeros / reflection) is not the adjoint of its forward: its fwd+bwd
    rows timed a wrong gradient under ">= 10x, met: yes". The forward rows carry the target; the fwd+bwd rows a
    note, which the bench report shows with the peer."""
    rw = _script("run_warp")
    wc = sys.modules["warp_cases"]
    fwd, fwdbwd = (wc.Case("interpol", "cubic", 1, p, 16, "cpu", "reflection") for p in ("fwd", "fwdbwd"))
    assert wc.target(fwd).min_ratio == 10.0 and wc.target(fwdbwd) is None
    assert wc.target(wc.Case("interpol", "cubic", 1, "fwdbwd", 16, "cpu", "border")).min_ratio == 10.0  # adjoint
    ok = {"status": "ok", "ms": 10.0, "peak_mib": 1.0}
    results = {f"{impl}|{c.config}": {**ok, "ms": 10.0 if impl == "medfast" else 150.0}
               for c in (fwd, fwdbwd) for impl in ("medfast", "interpol")}
    made = rw.make_rows([fwd, fwdbwd], results)
    assert [(r["target"], r["met"], r.get("note")) for r in made] == [
        (">= 10x", "yes", None), ("", "", wc.NOT_ADJOINT_NOTE)]
    rows = _warp_json(tmp_path, made)
    assert rows[0].peer == "interpol" and rows[1].peer == f"interpol ({wc.NOT_ADJOINT_NOTE})"
    assert "not the adjoint" in rows[1].peer and not rows[1].target
    assert f"{wc.NOT_ADJOINT_NOTE}" in rw.to_markdown({"meta": _warp_meta(), "rows": made})


def _warp_meta(**extra):
    return {"device": "cpu", "size": 16, "host": "h", "device_name": "cpu", "date": "d", "torch": "t", "threads": 2,
            "medfast": "m", "medfast_extension": "x (d)", "versions": {}, "padding": "auto",
            "opts": {"repeats": 3, "budget_s": 0, "warmup": 0}, "memory_method": "m",
            "memory_calibration_mib": 100.0, "busy_processes": {"before": [], "after": []}, **extra}


def test_in_process_cpu_run_reads_the_first_peak_only(monkeypatch):
    """--no-isolate on the CPU: every case after the first read a peak up to 2.8x too high (the heap state the
    earlier cases left), under a report that said "fresh process per case". Now the later peaks are not read
    ("-", their memory target n/a, not "no") and the report says how the peaks were read."""
    rw = _script("run_warp")
    wc = sys.modules["warp_cases"]
    seen = []

    def fake(impl, case, opts, isolate, timeout_s):
        seen.append(opts.get("memory", True))
        return {"status": "ok", "ms": 1.0 if impl == "medfast" else 9.0,
                "peak_mib": 1.0 if opts.get("memory", True) else None, "background_cores": 0.0}

    monkeypatch.setattr(rw, "measure_job", fake)
    cases = [wc.Case("grid_sample", "linear", c, "fwdbwd", 8) for c in (1, 4)]
    results = rw.run_all(cases, {"repeats": 3}, isolate=False, timeout_s=10, wait_idle_s=0)
    assert seen == [True, False, False, False]
    rows = rw.make_rows(cases, results)
    assert rows[0]["met"] == "n/a" and rows[1]["met"] == "n/a"  # speed met, memory not read
    seen.clear()
    rw.run_all(cases, {"repeats": 3}, isolate=True, timeout_s=10, wait_idle_s=0)
    assert seen == [True] * 4
    results = rw.run_all(cases, {"repeats": 3}, isolate=True, timeout_s=10, wait_idle_s=0)
    assert [r["met"] for r in rw.make_rows(cases, results)] == ["yes", "yes"]
    assert "fresh process per case" in rw.memory_method("cpu", True)
    in_process = rw.memory_method("cpu", False)
    assert "fresh process" not in in_process and "first measured case only" in in_process


def test_pymust_extrapolation_fits_the_fixed_cost(tmp_path, monkeypatch):
    """pymust's 60k-scatterer time was min(seconds / n) of single calls, counting simus's fixed cost once per
    scatterer (the quick run: one call at 100 scatterers, about 1.2x too slow). Now a + b n over two or more
    counts (the fastest of --pymust-repeats calls each), recorded with the fit."""
    bu = _script("bench_ultrasound")
    a, b = 0.7, 0.0337
    calls = []

    def spawn(args):
        calls.append(args)
        if args[0] == "pymust":
            return [{"case": "pymust_simus", "n_scatterers": int(n), "seconds": a + b * int(n), "times": [0.0],
                     "rf_shape": [1, 1], "peak_mib": 1.0} for n in args[2:]]
        return {"case": args[0], "device": "cpu", "batch": 1, "sub_rays": int(args[3]), "volume": 8,
                "seconds_per_call": 0.01, "frames_per_second": 100.0, "best_seconds_per_call": 0.01,
                "best_frames_per_second": 100.0, "peak_mib": 1.0, "repeats": 1}

    monkeypatch.setattr(bu, "_spawn", spawn)
    bu.main(["--out", str(tmp_path), "--size", "8", "--pymust-scatterers", "100", "400"])
    assert calls[-1] == ["pymust", "3", "100", "400"]
    s = json.loads((tmp_path / "ultrasound_cpu_latest.json").read_text())["summary"]
    assert s["pymust_seconds_60k_scatterers_one_transmit_extrapolated"] == pytest.approx(a + b * 60000)
    assert s["pymust_fit"]["fixed_seconds"] == pytest.approx(a)
    assert s["pymust_seconds_per_scatterer"] == pytest.approx(b)
    assert s["speed_ratio_vs_pymust_60k"] == pytest.approx((a + b * 60000) / 0.01)
    # a slope the noise made non-positive is not extrapolated: the per-scatterer upper bound, named
    flat = bu.pymust_fit([{"n_scatterers": 100, "seconds": 4.0}, {"n_scatterers": 400, "seconds": 3.9}])
    assert flat["extrapolated_seconds"] == pytest.approx(3.9 / 400 * 60000) and "upper bound" in flat["method"]
    for bad in (["100"], ["100", "100"], ["0", "100"]):  # one count cannot separate the fixed cost
        with pytest.raises(SystemExit):
            bu.main(["--out", str(tmp_path), "--pymust-scatterers", *bad])
    quick = {s.name: s for s in runner.SUITES}["ultrasound"].args("cpu", True, tmp_path)
    counts = quick[quick.index("--pymust-scatterers") + 1:quick.index("--pymust-repeats")]
    assert len(set(counts)) >= 2


def test_a_missing_ratio_renders_as_a_dash():
    md = runner.markdown(runner._meta("cpu", True), {"s": _ok("s")}, [runner.Row("s", "case", "peer", 2.0, None, None)])
    assert "| 1 | s | case | peer | 2.00 | - | - | - | - |  |  |" in md and "-x" not in md


# ---- stops (SIGTERM, Ctrl-C at any point), broken peers, a corrupt latest, the pytest-benchmark setup --------

_STOP_DRIVER = """
import argparse, signal, sys
from pathlib import Path
from medfast.bench import runner
# Python's own Ctrl-C handler: a process started in the background (CI's pytest) inherits SIGINT ignored, and the
# runner rightly leaves an ignored SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
here = Path(sys.argv[1])
slow = lambda d, q, o: [str(here / "pids")]
runner.SUITES = [runner.Suite("slow", "slow.py", slow, lambda out, device=None: []),
                 runner.Suite("after", "slow.py", slow, lambda out, device=None: [])]
runner.benchmarks_dir = lambda: here
sys.exit(runner.main(argparse.Namespace(list=False, replot=None, device="cpu", only=None, quick=True,
                                        out=here / "out")))
"""
# a suite that starts a worker of its own (as bench_loss.py does on the CPU), says their pids, and runs on
_SLOW_SUITE = """
import os, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1] + ".tmp", "w").write(f"{os.getpid()} {worker.pid}")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(120)
"""


def _running(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_stop_ends_the_running_suite_and_its_workers_and_writes_the_reports(tmp_path):
    """SIGTERM (a scheduler's stop) killed medfast bench alone: its suite and the suite's workers ran on, orphaned,
    the work folder stayed and no report was written. Ctrl-C sent to medfast bench's pid alone left the suite's
    worker running too. Both now stop the suite's process group, write the reports and remove the work folder."""
    import os
    import signal
    import subprocess
    import time

    runs = {}
    for sig in (signal.SIGTERM, signal.SIGINT):  # side by side: each run's start is Python's and torch's import
        here = tmp_path / sig.name
        (here / "tmp").mkdir(parents=True)
        (here / "slow.py").write_text(_SLOW_SUITE)
        (here / "driver.py").write_text(_STOP_DRIVER)
        env = {**os.environ, "TMPDIR": str(here / "tmp")}
        env.pop("MEDFAST_BENCH_WORK", None)
        runs[sig] = (here, subprocess.Popen([sys.executable, str(here / "driver.py"), str(here)], env=env,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        for sig, (here, proc) in runs.items():
            deadline = time.monotonic() + 120
            while not (here / "pids").exists():
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
                time.sleep(0.1)
            suite, worker = map(int, (here / "pids").read_text().split())
            os.kill(proc.pid, sig)  # the pid alone, as `kill` and a scheduler's stop do
            output = proc.communicate(timeout=60)[0]
            assert proc.returncode == 128 + sig, (proc.returncode, output[-3000:])
            time.sleep(0.2)
            assert not _running(suite) and not _running(worker), output[-3000:]
            assert not list((here / "tmp").iterdir())  # the temporary work folder is removed
            latest = json.loads((here / "out" / "bench_cpu_latest.json").read_text())
            how = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
            assert latest["suites"]["slow"]["status"] == "interrupted", latest["suites"]
            assert latest["suites"]["slow"]["reason"] == f"interrupted ({how}) while it ran"
            assert latest["suites"]["after"]["status"] == "interrupted"
            assert "interrupted: the reports hold the suites that finished" in output
    finally:
        for here, proc in runs.values():
            proc.kill()
            proc.wait()
            # what the old runner left behind
            for pid in map(int, (here / "pids").read_text().split() if (here / "pids").exists() else ()):
                if _running(pid):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler for the test: a process started in the background (CI's pytest) inherits SIGINT
    ignored, and the runner rightly leaves an ignored SIGINT ignored."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_stop_while_the_reports_are_written_leaves_a_matching_set(tmp_path, monkeypatch, capsys, python_sigint):
    """Ctrl-C while the reports were written (they are written one after another, the charts take seconds) left
    the latest JSON and Markdown of the new run beside the previous run's chart; a failure inside a write left a
    truncated file under its final name."""
    import signal

    from matplotlib.figure import Figure

    meta = {**runner._meta("cpu", True), "date": "20990101-000000"}
    runner.write_reports(tmp_path, meta, {"good": _ok("good")}, [runner.Row("good", "case", "peer", 2.0, 6.0, 3.0)])
    files = {ext: tmp_path / f"bench_cpu_latest.{ext}" for ext in ("json", "md", "png")}
    real_plot = runner.plot

    def plot_with(action):
        def plot(meta, rows, path, status=None):
            if "latest" in path.name:
                action()
            return real_plot(meta, rows, path, status)
        return plot

    def latest():
        return ({ext: f.read_bytes() for ext, f in files.items()},
                json.loads(files["json"].read_text())["meta"]["date"])

    # a Ctrl-C (SIGINT) while the latest chart renders: held off until every file is written, then raised
    monkeypatch.setattr(runner, "plot", plot_with(lambda: signal.raise_signal(signal.SIGINT)))
    before, _ = latest()
    with pytest.raises(KeyboardInterrupt):
        runner.write_reports(tmp_path, {**meta, "date": "20990102-000000"}, {"good": _ok("good")},
                             [runner.Row("good", "case", "peer", 2.0, 8.0, 4.0)])
    after, date = latest()
    assert date == "20990102-000000" and all(after[ext] != before[ext] for ext in files)
    assert "4.00x" in files["md"].read_text()

    # an exception inside the chart of the latest: the chart comes before the JSON, so the latest set stays whole
    # (this run is in its dated report)
    def boom():
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "plot", plot_with(boom))
    with pytest.raises(KeyboardInterrupt):
        runner.write_reports(tmp_path, {**meta, "date": "20990103-000000"}, {"good": _ok("good")},
                             [runner.Row("good", "case", "peer", 2.0, 10.0, 5.0)])
    assert latest() == (after, "20990102-000000")
    assert any(tmp_path.glob("bench_cpu_*_20990103-000000.json"))

    # a chart write cut short (a full disk, a kill) leaves the previous chart, not a truncated one
    monkeypatch.setattr(runner, "plot", real_plot)

    def broken_savefig(fig, fname, *args, **kwargs):
        Path(fname).write_bytes(b"\x89PNG truncated")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError):
        runner.write_reports(tmp_path, {**meta, "date": "20990104-000000"}, {"good": _ok("good")},
                             [runner.Row("good", "case", "peer", 2.0, 12.0, 6.0)])
    assert latest() == (after, "20990102-000000")
    assert not [p.name for p in tmp_path.iterdir() if ".tmp." in p.name]  # no temporary file left either

    # through main: the stop is reported once the reports are written, with Ctrl-C's exit code
    monkeypatch.undo()
    _stand_ins(monkeypatch, tmp_path, _suite("good", GOOD, tmp_path))
    monkeypatch.setattr(runner, "plot", plot_with(lambda: signal.raise_signal(signal.SIGINT)))
    assert runner.main(_args(tmp_path / "out")) == 130
    assert json.loads((tmp_path / "out" / "bench_cpu_latest.json").read_text())["suites"]["good"]["status"] == "ok"
    assert (tmp_path / "out" / "bench_cpu_latest.png").is_file()
    assert "took effect once the reports were written" in capsys.readouterr().err


def test_a_latest_file_that_is_no_report_is_replaced_with_a_note(tmp_path):
    """A bench_cpu_latest.json that was valid JSON but no report ended the run with an AttributeError / KeyError
    traceback before even the dated report was written."""
    meta = runner._meta("cpu", True)
    rows = [runner.Row("loss", "Dice+CE", "MONAI", 10.0, None, None)]  # (no ratio: no chart, seconds saved)
    for i, content in enumerate(["null", "[]", '{"meta": {"device": "cpu"}}', '{"meta": {"device": "cpu"}, '
                                 '"suites": {"loss": {"rows": 4}}}', '{"meta": {}, "suites": {}, "rows": [{}]}',
                                 '{"meta": [], "suites": {}}', "{truncated"]):
        out = tmp_path / str(i)
        out.mkdir()
        (out / "bench_cpu_latest.json").write_text(content)
        said = []
        runner.write_reports(out, {**meta, "date": f"2099010{i}-000000"}, {"loss": _ok("loss")}, rows, say=said.append)
        assert len(said) == 1 and "is not a medfast bench report" in said[0] and "ignored" in said[0], (content, said)
        latest = json.loads((out / "bench_cpu_latest.json").read_text())
        assert list(latest["suites"]) == ["loss"] and latest["rows"][0]["medfast_ms"] == 10.0, content
        assert len(list(out.glob("bench_cpu_*-000000.json"))) == 1  # the dated report


def _broken_module(tmp_path, name):
    """An installed package whose import fails, as a MONAI built for another torch does."""
    pkg = tmp_path / "site" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"raise ImportError('{name}: undefined symbol _ZN3c10')\n")
    return pkg.parent


def test_a_peer_that_cannot_be_imported_is_skipped_with_its_error(tmp_path, monkeypatch):
    """An installed peer whose import fails: bench_loss's agreement check imported it unguarded (the whole suite
    failed), bench_distance called it "not installed", and a suite that needs it failed (exit code 1)."""
    site = _broken_module(tmp_path, "medfast_broken_peer")
    monkeypatch.syspath_prepend(str(site))
    import os

    # the suites and their checks run in their own processes
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))

    bench_loss = _script("bench_loss")
    monkeypatch.setitem(bench_loss.REQUIRES, "monai", "medfast_broken_peer")
    why = bench_loss.missing_peer("monai")
    assert why == ("skipped: medfast_broken_peer could not be imported (ImportError: medfast_broken_peer: undefined "
                   "symbol _ZN3c10)"), why
    bench_loss.check_agreement(3, size=6)  # medfast and the plain reference, the broken peer left out
    row = bench_loss.make_row({"medfast": {"ms": 1.0}, "monai": {"status": why}, "torch": {"ms": 3.0}}, "cpu", 8, 3,
                              1, "float32")
    assert row["monai_status"] == why and row["ratio_vs_torch"] == 3.0

    bench_distance = _script("bench_distance")

    def cases(mask, device):
        def broken():
            import medfast_broken_peer  # noqa: F401

        return {**real_cases(mask, device), "monai": broken}

    real_cases = bench_distance.edt_cases
    monkeypatch.setattr(bench_distance, "edt_cases", cases)
    import argparse

    res = bench_distance.run_cpu(bench_distance.make_mask(8, 0.01), argparse.Namespace(repeats=1))
    assert set(res["ms"]) == {"medfast", "scipy"}
    assert res["skipped"] == {"monai": "monai could not be imported (ImportError: medfast_broken_peer: undefined "
                                       "symbol _ZN3c10)"}

    # a suite that cannot run without the peer: skipped as for a missing one, its error the reason (exit code 0);
    # an import error that is not the peer's stays a failure
    needs = _suite("needs", "import medfast_broken_peer\n", tmp_path, peers=("medfast_broken_peer",))
    other = _suite("other", "from os import no_such_name\n", tmp_path, peers=("medfast_broken_peer",))
    _stand_ins(monkeypatch, tmp_path, needs)
    assert runner.main(_args(tmp_path / "out")) == 0
    st = json.loads((tmp_path / "out" / "bench_cpu_latest.json").read_text())["suites"]["needs"]
    assert st["status"] == "skipped" and st["reason"] == (
        "peer could not be imported: medfast_broken_peer (ImportError: medfast_broken_peer: undefined symbol _ZN3c10)")
    _stand_ins(monkeypatch, tmp_path, other)
    status, _ = runner.run_suites("cpu", True, None, tmp_path / "work", progress=lambda m: None)
    assert status["other"]["status"] == "failed" and "no_such_name" in status["other"]["reason"]


def test_pytest_benchmark_environment_is_checked(monkeypatch):
    """MEDFAST_BENCH_DEVICE=gpu timed the CPU under the label gpu (or ended in an INTERNALERROR SystemExit), and
    MEDFAST_BENCH_SIZE=abc gave int()'s error without naming the variable."""
    import re

    for name, value in (("MEDFAST_BENCH_DEVICE", "gpu"), ("MEDFAST_BENCH_DEVICE", "CUDA"),
                        ("MEDFAST_BENCH_SIZE", "abc"), ("MEDFAST_BENCH_SIZE", "0"), ("MEDFAST_BENCH_SIZE", "16.5"),
                        ("MEDFAST_BENCH_ROUNDS", "-1"), ("MEDFAST_BENCH_ROUNDS", "")):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with pytest.raises(pytest.UsageError, match=re.escape(f"{name}={value!r}")):
                _script("pytest_common")
    with monkeypatch.context() as m:
        m.setenv("MEDFAST_BENCH_DEVICE", "cuda")
        m.setenv("MEDFAST_BENCH_SIZE", "16")
        m.setenv("MEDFAST_BENCH_ROUNDS", "2")
        pc = _script("pytest_common")
        assert (pc.DEVICE, pc.size(64), pc.ROUNDS) == ("cuda", 16, 2)
    for name in ("MEDFAST_BENCH_DEVICE", "MEDFAST_BENCH_SIZE", "MEDFAST_BENCH_ROUNDS"):
        monkeypatch.delenv(name, raising=False)
    pc = _script("pytest_common")
    assert (pc.DEVICE, pc.size(64), pc.ROUNDS) == ("cpu", 64, 3)


def test_pytest_benchmarks_without_the_plugin_are_skipped_and_a_bad_setting_is_one_error(tmp_path):
    """Without pytest-benchmark, `pytest benchmarks/` gave one "fixture 'benchmark' not found" error per test; a bad
    MEDFAST_BENCH_* value is one usage error line when pytest starts, not a traceback per module."""
    import os
    import subprocess

    where = runner.benchmarks_dir()
    env = {**os.environ, "MEDFAST_BENCH_SIZE": "16", "MEDFAST_BENCH_DEVICE": "cpu"}
    env.pop("MEDFAST_BENCH_ROUNDS", None)
    base = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--rootdir", str(where)]
    # -p no:benchmark: an installed plugin disabled, as good as none
    proc = subprocess.run(base + ["-p", "no:benchmark", str(where / "test_bench_distance.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "fixture 'benchmark' not found" not in proc.stdout and "3 skipped" in proc.stdout, proc.stdout[-3000:]
    assert "pip install pytest-benchmark" in proc.stdout
    proc = subprocess.run(base + [str(where / "test_bench_distance.py")], cwd=tmp_path,
                          env={**env, "MEDFAST_BENCH_DEVICE": "gpu"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 4, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "ERROR: MEDFAST_BENCH_DEVICE='gpu': expected one of cpu, cuda" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


@needs_committed_results
def test_documented_replot_command_names_a_file_of_the_checkout():
    import re

    docs = (RESULTS.parent.parent / "docs" / "benchmarks.md").read_text()
    for path in re.findall(r"medfast bench --replot (\S+?)`", docs):
        assert (RESULTS.parent.parent / path).is_file(), path  # run from the repository's root
