"""The GPU check's scripts run their logic on the CPU, so that a lent GPU's few minutes are not lost to a
Python error in them: the training checks of the classification renderer (with and without CUDA
graphs), the rendering profile, the warp profile at a tiny size, the Nsight Compute targets' filter,
and the shell script's syntax."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_committed_results

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_gpu_check_shell_syntax():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], check=True)


def test_train_check_classification_graph_and_eager(tmp_path):
    _run([str(ROOT / "scripts" / "gpu_train_check.py"), "--device", "cpu", "--small", "--steps", "3", "--only",
          "cls_sim", "--only", "cls_sim_eager", "--out", str(tmp_path / "tc")], tmp_path)
    report = json.loads((tmp_path / "tc" / "train_check.json").read_text())
    rows = {r["check"]: r for r in report["results"]}
    assert not report["failed"]
    assert set(rows) == {"cls_sim", "cls_sim_eager"}
    assert rows["cls_sim"]["cuda_graphs"] is True and rows["cls_sim_eager"]["cuda_graphs"] is False
    assert rows["cls_sim"]["graph_replays"] == 0  # on the CPU the renderer renders eagerly
    assert all(r["finite"] and r["ms_render_per_step"] > 0 for r in rows.values())


def test_train_check_segmentation_and_registration(tmp_path):
    # the in-memory subjects replace the NIfTI files of the real tasks: the registration check once failed on
    # a GPU because the label Dice counted its classes from label files these subjects do not have
    _run([str(ROOT / "scripts" / "gpu_train_check.py"), "--device", "cpu", "--small", "--steps", "3", "--only",
          "seg_none", "--only", "reg_bf16", "--out", str(tmp_path / "tc")], tmp_path)
    report = json.loads((tmp_path / "tc" / "train_check.json").read_text())
    rows = {r["check"]: r for r in report["results"]}
    assert not report["failed"] and set(rows) == {"seg_none", "reg_bf16"}
    assert all(r["finite"] for r in rows.values())


def test_render_profile_both_modes(tmp_path):
    _run([str(ROOT / "benchmarks" / "gpu_render_profile.py"), "--device", "cpu", "--batch", "4", "--repeats", "1",
          "--out", str(tmp_path)], tmp_path)
    result = json.loads((tmp_path / "gpu_render_profile.json").read_text())
    assert set(result) == {"graph", "eager"} and result["graph"]["wall_ms_median"] > 0


@pytest.mark.filterwarnings("ignore")
def test_warp_profile_and_ncu_targets(tmp_path):
    _run([str(ROOT / "benchmarks" / "gpu_warp_profile.py"), "--sizes", "8", "--out", str(tmp_path)], tmp_path)
    rows = json.loads((tmp_path / "warp_cuda_profile.json").read_text())["rows"]
    assert {r["impl"] for r in rows} == {"default", "merged", "plain", "plain-int64", "plain-ilp1", "plain-ilp2",
                                          "plain-ilp4", "grid_sample"}
    out = _run([str(ROOT / "benchmarks" / "gpu_ncu_targets.py"), "--filter"], tmp_path).stdout.strip()
    # the kernel profile needs a GPU to run; here it must at least import (its helpers resolve)
    _run(["-c", f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import gpu_kernel_profile"], tmp_path)
    assert "forward_kernel" in out and "sums_kernel" in out


def test_gpu_test_selection_covers_every_gpu_test():
    # gpu_check.sh runs, of the files with GPU tests, those whose node id says cuda or cupy: every test
    # that is skipped for want of a GPU must be among them (else a lease would never run it)
    import re

    files = [str(p) for p in sorted((ROOT / "tests").glob("test_*.py"))
             if re.search(r'requires_cuda|skipif\(not torch\.cuda|import cupy|importorskip\("cupy"\)', p.read_text())]
    gpu_only: list[str] = []

    class Recorder:
        def pytest_collection_modifyitems(self, items):
            for item in items:
                for mark in item.iter_markers("skipif"):
                    if "GPU" in str(mark.kwargs.get("reason", "")) or "CUDA" in str(mark.kwargs.get("reason", "")):
                        gpu_only.append(item.nodeid)

    assert pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *files], plugins=[Recorder()]) == 0
    assert len(gpu_only) > 100
    missed = [n for n in gpu_only if "cuda" not in n.lower() and "cupy" not in n.lower()]
    assert not missed, missed[:10]


def _summary_rows(prefix: str, tmp_path) -> dict[str, str]:
    """gpu_summary.py's table of the committed GPU results of ``prefix``: {row name: row}."""
    out = _run([str(ROOT / "scripts" / "gpu_summary.py"), str(ROOT / "benchmarks" / "results" / "gpu"), "--prefix",
                prefix], tmp_path).stdout
    return {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines() if line.startswith("| ")}


@needs_committed_results
def test_gpu_summary_of_the_committed_h200_results(tmp_path):
    lines = _summary_rows("h200b_", tmp_path)
    assert "1345 GB/s (28 % of 4800)" in lines["2: warp forward 256^3, plain"]
    assert "0.958 ms, 2.19x" in lines["2: warp fwd+bwd 256^3 kernels, plain"] and lines[
        "2: warp fwd+bwd 256^3 kernels, plain"].endswith("| yes |")
    assert "1.72x" in lines["3: Dice+CE fwd+bwd B=2 128^3 C=16"] and lines[
        "3: Dice+CE fwd+bwd B=2 128^3 C=16"].endswith("| no |")
    assert "1555 frames/s" in lines["4: ultrasound_fwdbwd_b64_warp"]
    assert "(31 %)" in lines["6: cls_sim (batch 64)"]
    assert lines["7: warp vs CuPy map_coordinates / affine_transform"].endswith("| not run |")
    # the next run's files beside them (h200c_, with CuPy rows) are not read under the h200b_ prefix, and read
    # under their own
    lines = _summary_rows("h200c_", tmp_path)
    assert "1339 GB/s (28 % of 4800)" in lines["2: warp forward 256^3, plain-ilp1"]
    assert "2.72x" in lines["3: Dice+CE fwd+bwd B=2 128^3 C=16"]
    assert "(15 %)" in lines["6: cls_sim (batch 64)"]
    assert lines["7: warp vs CuPy map_coordinates / affine_transform"].startswith(
        "| 7: warp vs CuPy map_coordinates / affine_transform | 9 rows")
    # the second lease of that day: the warp backward with its register budget, the default sums
    lines = _summary_rows("h200d_", tmp_path)
    assert "1.039 ms, 2.02x" in lines["2: warp fwd+bwd 256^3 kernels, default"]
    assert "3.15x" in lines["3: Dice+CE fwd+bwd B=2 128^3 C=64"] and lines[
        "3: Dice+CE fwd+bwd B=2 128^3 C=64"].endswith("| yes |")
    assert "3063 frames/s" in lines["4: ultrasound_fwdbwd_b64_warp_merged_hostposes"]


def test_gpu_summary_shows_the_host_time_of_a_loss_step(tmp_path):
    res = tmp_path / "res"
    res.mkdir()
    (res / "gpu_kernel_profile.json").write_text(json.dumps({"workloads": {"dice_ce_b2_c4_128_warpsums_nocheck": {
        "wall_ms": 0.8, "plain_ms": 0.7, "host_ms": 0.55, "kernel_ms": {"a": 0.1, "b": 0.05}}}}))
    out = _run([str(ROOT / "scripts" / "gpu_summary.py"), str(res)], tmp_path).stdout
    row = next(line for line in out.splitlines() if "dice_ce_b2_c4" in line)
    assert "0.700 ms per step, host 0.550 ms, kernels 0.150 ms" in row


@needs_committed_results
def test_gpu_summary_reads_the_full_resolution_demos(tmp_path):
    """The demo rows of gpu_check.sh's demo_register / demo_seg steps (fed here with the CPU demo's own
    report and a trainer results.json), and "not run" without them."""
    res = tmp_path / "res"
    (res / "demo_register").mkdir(parents=True)
    demo = json.loads((ROOT / "benchmarks" / "results" / "registration_demo_cpu.json").read_text())
    (res / "demo_register" / "demo.json").write_text(json.dumps(demo))
    (res / "demo_seg").mkdir()
    (res / "demo_seg" / "results.json").write_text(json.dumps({
        "step": 300, "finished": True, "device": "cuda", "amp": "bf16", "first_loss": 1.9, "last_loss": 0.6,
        "validation": {"mean_dice": 0.81}, "seconds": 120.0}))
    out = _run([str(ROOT / "scripts" / "gpu_summary.py"), str(res)], tmp_path).stdout
    reg = next(line for line in out.splitlines() if "Colin27" in line)
    assert f"{demo['dice_before']:.3f} -> {demo['dice_affine']:.3f} -> {demo['dice_after']:.3f}" in reg
    assert reg.endswith("| yes |")
    seg = next(line for line in out.splitlines() if "segmentation demo" in line)
    assert "300 steps on cuda (bf16)" in seg and "val mean_dice 0.810" in seg and seg.endswith("| yes |")
    empty = _run([str(ROOT / "scripts" / "gpu_summary.py"), str(tmp_path / "none")], tmp_path).stdout
    assert sum("demo" in line and line.endswith("| not run |") for line in empty.splitlines()) == 2
