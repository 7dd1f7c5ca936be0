"""The GPU targets of the open issues against one GPU check's results, as a Markdown table.

Reads the files ``scripts/gpu_check.sh`` leaves in its result folder (or their renamed copies under
``benchmarks/results/gpu/``, e.g. ``h200b_*``): the warp profile, the kernel profile, the training
checks, the rendering profile and the benchmark reports. Prints one row per target with the measured
figure, the target and whether it is met, so the session after a lease starts from the numbers rather
than from the logs. Files that are missing give "not run".

    python scripts/gpu_summary.py DIR [--prefix h200b_] [--peak-gbps 4800]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# DRAM bandwidth (GB/s) by device name, for the warp forward's "half the bandwidth" target
PEAK_GBPS = {"H200": 4800.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0, "A100": 2039.0}


def _load(folder: Path, prefix: str, *names: str) -> Any:
    """The first of ``{prefix}{name}`` in folder, or a file below it whose name starts with ``prefix`` and ends in
    name, read as JSON (another run's files beside them, with another prefix, are not read)."""
    for name in names:
        path = folder / f"{prefix}{name}"
        if not path.is_file():
            path = next((p for p in sorted(folder.rglob(f"{prefix}*{name}")) if p.is_file()), None)
        if path is not None:
            return json.loads(path.read_text())
    return None


def _bench_rows(folder: Path, prefix: str, suite: str) -> list[dict] | None:
    """The benchmark rows of one suite: a renamed per-suite report (``{prefix}bench_{suite}.json``), or
    the suite's rows of ``bench_cuda_latest.json`` that ``medfast bench`` writes."""
    data = _load(folder, prefix, f"bench_{suite}.json")
    if data is not None:
        return data.get("rows", [])
    data = _load(folder, prefix, "bench_cuda_latest.json")
    if data is None:
        return None
    rows = [r for r in data.get("rows", []) if r.get("suite") == suite]
    return rows or None


def _peak(device: str | None, given: float | None) -> float | None:
    if given:
        return given
    for key, value in PEAK_GBPS.items():
        if device and key in device:
            return value
    return None


def rows(folder: Path, prefix: str = "", peak_gbps: float | None = None) -> list[tuple[str, str, str, str]]:
    """(issue and case, measured, target, met) rows."""
    out: list[tuple[str, str, str, str]] = []

    def add(case: str, value: str, target: str, met: bool | str | None) -> None:
        verdict = met if isinstance(met, str) else ("not run" if met is None else ("yes" if met else "no"))
        out.append((case, value, target, verdict))

    warp = _load(folder, prefix, "warp_cuda_profile.json")
    if warp is None:
        add("2: warp linear fwd+bwd 256^3 vs grid_sample route", "not run", ">= 2x", None)
        add("2: warp forward 256^3, share of DRAM bandwidth", "not run", ">= 50 %", None)
    else:
        device = warp.get("info", {}).get("device")
        peak = _peak(device, peak_gbps)
        big = [r for r in warp["rows"] if r["size"] == max(r["size"] for r in warp["rows"]) and r["channels"] == 1]
        by_impl = {r["impl"]: r for r in big}
        gs = by_impl.get("grid_sample")
        for impl, r in by_impl.items():
            if impl == "grid_sample":
                continue
            if gs:
                ratio = gs["kernel_total_ms"] / r["kernel_total_ms"]
                add(f"2: warp fwd+bwd {r['size']}^3 kernels, {impl}", f"{r['kernel_total_ms']:.3f} ms, {ratio:.2f}x",
                    ">= 2x", ratio >= 2.0)
            if "forward_GBps" in r:
                share = r["forward_GBps"] / peak if peak else None
                add(f"2: warp forward {r['size']}^3, {impl}",
                    f"{r['forward_GBps']:.0f} GB/s" + (f" ({100 * share:.0f} % of {peak:.0f})" if share else ""),
                    ">= 50 % of DRAM bandwidth", None if share is None else share >= 0.5)

    loss = _bench_rows(folder, prefix, "loss")
    if loss is None:
        add("3: Dice+CE vs MONAI DiceCELoss (GPU)", "not run", ">= 3x", None)
    else:
        for r in loss:
            if "MONAI" in str(r.get("peer")) and r.get("ratio"):
                add(f"3: {r['case']}", f"{r['medfast_ms']:.2f} ms, {r['ratio']:.2f}x"
                    + (f" ({r['peer']})" if r["peer"] != "MONAI DiceCELoss" else ""), ">= 3x", r["ratio"] >= 3.0)

    kernels = _load(folder, prefix, "kernel_profile.json")
    if kernels is None:
        add("4: ultrasound forward B=64", "not run", ">= 10,000 frames/s", None)
        add("4: ultrasound forward+backward B=64", "not run", ">= 3,000 frames/s", None)
    else:
        for name, w in kernels.get("workloads", {}).items():
            if "frames_per_s" not in w or "_b64_" not in name or "thread" in name:
                continue
            fps = w["frames_per_s"]
            fwdbwd = "fwdbwd" in name
            target = 3000.0 if fwdbwd else 10000.0
            add(f"4: {name}", f"{fps:.0f} frames/s" + ("" if "plain_ms" in w else " (profiled)"),
                f">= {target:,.0f} frames/s", fps >= target)
        for name, w in kernels.get("workloads", {}).items():
            if name.startswith("dice_ce") and "kernel_ms" in w:
                host = f", host {w['host_ms']:.3f} ms" if "host_ms" in w else ""
                add(f"3: {name} (kernel profile)", f"{w.get('plain_ms', w['wall_ms']):.3f} ms per step{host}, kernels "
                    f"{sum(w['kernel_ms'].values()):.3f} ms", "(diagnostic)", "-")

    train = _load(folder, prefix, "train_check.json")
    if train is None:
        add("6: classification rendering share of the step", "not run", "< 10 %", None)
    else:
        for r in train.get("results", []):
            if r.get("check", "").startswith("cls_sim") and r.get("render_fraction") is not None:
                add(f"6: {r['check']} (batch {r.get('batch_size')})",
                    f"{r['ms_render_per_step']:.1f} of {r['ms_per_step']:.1f} ms ({100 * r['render_fraction']:.0f} %)"
                    + (f", {r.get('graph_replays')} graph replays" if "graph_replays" in r else ""),
                    "< 10 %", r["render_fraction"] < 0.10)

    render = _load(folder, prefix, "gpu_render_profile.json", "render_profile.json")
    if isinstance(render, dict) and "graph" in render:
        for mode in ("graph", "eager"):
            r = render.get(mode, {})
            if "wall_ms_median" in r:
                add(f"6: rendering a batch of {r.get('batch')}, {mode}"
                    + ("" if mode == "eager" or render[mode].get("graphs_on", True) else " (capture failed)"),
                    f"{r['wall_ms_median']:.2f} ms, host {r['host_issue_ms_median']:.2f} ms, "
                    f"{r['kernel_launches_per_batch']:.0f} launches", "(diagnostic)", "-")

    reg = _load(folder, prefix, "demo_register/demo.json")
    if reg is None:
        add("5: Colin27 -> MNI152 demo at full resolution", "not run", "runs; Dice up at each stage", None)
    else:
        d0, d1, d2 = reg["dice_before"], reg["dice_affine"], reg["dice_after"]
        add(f"5: Colin27 -> MNI152 demo at {reg['resolution_mm']:g} mm on {reg.get('device')}",
            f"Dice {d0:.3f} -> {d1:.3f} -> {d2:.3f} in {reg['time_total_s']:.0f} s", "runs; Dice up at each stage",
            d0 < d1 < d2)
    seg = _load(folder, prefix, "demo_seg/results.json")
    if seg is None:
        add("5: tissue segmentation demo at 1 mm (seg_demo_gpu.yaml)", "not run", "trains", None)
    else:
        val = seg.get("validation") or {}
        dice = next((f", val {k} {v:.3f}" for k, v in val.items() if "dice" in k and isinstance(v, float)), "")
        add(f"5: tissue segmentation demo at 1 mm, {seg.get('step')} steps on {seg.get('device')} ({seg.get('amp')})",
            f"loss {seg['first_loss']:.3f} -> {seg['last_loss']:.3f} in {seg['seconds']:.0f} s{dice}", "trains",
            bool(seg.get("finished")) and seg["last_loss"] < seg["first_loss"])

    dist = _bench_rows(folder, prefix, "distance")
    if dist is not None:
        for r in dist:
            if r.get("peer") == "cupy" and r.get("ratio"):
                add(f"7: {r['case']} vs CuPy", f"{r['medfast_ms']:.2f} ms, {r['ratio']:.2f}x", "(peer reported)",
                    "reported")
    cupy_rows = [r for r in _bench_rows(folder, prefix, "warp") or [] if "cupy" in str(r.get("peer", "")).lower()
                 and r.get("ratio")]
    add("7: warp vs CuPy map_coordinates / affine_transform", f"{len(cupy_rows)} rows" if cupy_rows else "not run",
        "(peer reported)", "reported" if cupy_rows else None)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--prefix", default="", help="file name prefix of renamed results (e.g. h200b_)")
    p.add_argument("--peak-gbps", type=float, default=None, help="DRAM bandwidth of the GPU (default: by name)")
    args = p.parse_args()
    table = rows(args.folder, args.prefix, args.peak_gbps)
    print("| issue: case | measured | target | met |")
    print("|---|---|---|---|")
    for case, value, target, met in table:
        print(f"| {case} | {value} | {target} | {met} |")


if __name__ == "__main__":
    main()
