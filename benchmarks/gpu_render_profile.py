"""Where the time of the classification task's on-the-fly rendering goes on a GPU: host (Python and
dispatch) against kernels, for one batch (default 64) of ``SimulatedUltrasound.render`` with the simulator
of configs/cls_demo_cpu.yaml (as ``benchmarks/bench_classification.py``).

Reports the synchronized wall time per batch (median), the CUDA kernel time per batch (torch.profiler),
the host time the CPU spends issuing it, and the Python functions with the most own time (cProfile),
so that the next change to the renderer targets what dominates. Both renderings, in the same run: one
CUDA graph replay per batch (``graph``, the default on a GPU) and one eager simulation per (volume, probe)
group (``eager``, ``cuda_graphs=False``).

    python benchmarks/gpu_render_profile.py --out DIR [--device cuda] [--batch 64]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_classification import ROOT, _sync, make_case  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    dev = torch.device(args.device)
    case = make_case(str(ROOT / "configs" / "cls_demo_cpu.yaml"), dev, args.batch)
    results = {}
    for mode in ("graph", "eager"):
        case["source"].cuda_graphs = mode == "graph"
        results[mode] = profile_render(case, dev, args)
        if mode == "graph":
            results[mode]["graph_replays"] = case["source"].graph_replays
            results[mode]["graphs_on"] = case["source"].cuda_graphs  # False if the capture failed
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_render_profile.json").write_text(json.dumps(results, indent=1))


def profile_render(case: dict, dev: torch.device, args) -> dict:
    render = case["render"]
    for _ in range(3):
        render()
    _sync(dev)
    walls, hosts = [], []
    for _ in range(args.repeats):
        _sync(dev)
        t0 = time.perf_counter()
        render()
        hosts.append((time.perf_counter() - t0) * 1e3)  # the CPU is free again: everything is queued
        _sync(dev)
        walls.append((time.perf_counter() - t0) * 1e3)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(args.repeats):
            render()
        _sync(dev)
    kernels: dict[str, float] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", 0.0) or 0.0
        if dev.type == "cuda" and t > 0 and ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.key[:90]] = kernels.get(ev.key[:90], 0.0) + t / 1e3 / args.repeats
    launches = sum(ev.count for ev in prof.key_averages() if ev.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                          "cudaLaunchKernelExC"))
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(args.repeats):
        render()
    _sync(dev)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(15)
    result = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
        "batch": args.batch, "volumes": case["volumes"], "wall_ms_median": statistics.median(walls),
        "host_issue_ms_median": statistics.median(hosts), "kernel_ms_per_batch": sum(kernels.values()),
        "kernel_launches_per_batch": launches / args.repeats,
        "kernels": dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:15]), "cprofile_tottime": s.getvalue(),
    }
    mode = "graph" if case["source"].cuda_graphs else "eager"
    print(f"render batch {args.batch} ({mode}): wall {result['wall_ms_median']:.2f} ms, host issue "
          f"{result['host_issue_ms_median']:.2f} ms, kernels {result['kernel_ms_per_batch']:.2f} ms, "
          f"{result['kernel_launches_per_batch']:.0f} launches per batch", flush=True)
    for k, v in list(result["kernels"].items())[:8]:
        print(f"    {v:8.4f} ms  {k}")
    print(s.getvalue()[:4000])
    return result


if __name__ == "__main__":
    main()
