"""Runs the warp benchmark suite (all cases of ``warp_cases`` in one run) and writes the results.

    python benchmarks/run_warp.py [--device cpu|cuda] [--quick] [--size 128] [--out benchmarks/results]

Writes ``warp_<device>_<host>_<date>.{json,md,png}`` and ``warp_<device>_latest.{json,md,png}``
under ``--out``. Ratios are peer time / medfast time (> 1: medfast is faster). On CPU each
(implementation, case) runs in a fresh subprocess so that its peak resident memory can be measured
cleanly (see ``warp_cases.cpu_peak_mib``); on CUDA they run in this process by default (peak from
torch's allocator statistics).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import warp_cases as wc

HERE = Path(__file__).resolve().parent
RESULT_TAG = "WARP_RESULT "
MEM_TOLERANCE_MIB = 1.0  # page granularity and allocator noise
BUSY_CORES = 0.2  # other processes using more than this (in cores) disturb a measurement


# ---------------------------------------------------------------------------------------------
# Running the measurements
# ---------------------------------------------------------------------------------------------


def worker(payload: str) -> None:
    """Subprocess entry: one measurement, printed as a tagged JSON line."""
    job = json.loads(payload)
    if job["kind"] == "calibrate":
        res: dict[str, Any] = {"measured_mib": wc.calibrate_memory(job["device"], job["mib"])}
    else:
        res = wc.measure(job["impl"], wc.Case.from_dict(job["case"]), **job["opts"])
    print(RESULT_TAG + json.dumps(res), flush=True)


def run_job(job: dict[str, Any], isolate: bool, timeout_s: float) -> dict[str, Any]:
    """Runs a job in a fresh interpreter (isolate) or in this one."""
    if not isolate:
        if job["kind"] == "calibrate":
            return {"measured_mib": wc.calibrate_memory(job["device"], job["mib"])}
        return wc.measure(job["impl"], wc.Case.from_dict(job["case"]), **job["opts"])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    env = {**os.environ, **wc.MALLOC_ENV}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=HERE, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"status": "error", "reason": f"worker exit {proc.returncode}: " + " | ".join(tail)[-300:]}


class CpuMeter:
    """CPU time that OTHER processes used while a job ran, in cores on average: the system's busy
    time (/proc/stat) minus this process's and its waited-for children's. None off Linux."""

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
        except OSError:
            return None
        busy = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")  # no idle, iowait
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        own = sum(u.ru_utime + u.ru_stime for u in usage)
        return busy, own, time.monotonic()

    def other_cores(self) -> float | None:
        end = self._read()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return None
        other = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return max(0.0, other / (end[2] - self.start[2]))


def measure_job(impl: str, case: wc.Case, opts: dict[str, Any], isolate: bool, timeout_s: float) -> dict[str, Any]:
    """One measurement, annotated with the other processes' CPU use while it ran (and, for medfast,
    the build of its extension)."""
    try:
        wc.check(impl, case)  # cheap: no subprocess for what cannot run
    except wc.NotRun as e:
        return {"status": e.status, "reason": str(e)}
    meter, built = CpuMeter(), _built(_extension_stamp())
    res = run_job({"kind": "measure", "impl": impl, "case": case.to_dict(), "opts": opts}, isolate, timeout_s)
    res["background_cores"] = meter.other_cores()
    if impl == "medfast":
        res["extension_built"] = built if built == _built(_extension_stamp()) else "rebuilt while measured"
    return res


def _contaminated(res: dict[str, Any]) -> bool:
    return res.get("status") == "ok" and (res.get("background_cores") or 0.0) > BUSY_CORES


def run_all(
    case_list: list[wc.Case], opts: dict[str, Any], isolate: bool, timeout_s: float, wait_idle_s: float
) -> dict[str, Any]:
    """Measures medfast once per configuration and every peer case; keyed by "impl|config". With
    ``wait_idle_s`` > 0, waits up to that long before each job for other busy processes to finish,
    and at the end re-measures once each job that they disturbed, keeping the quieter result.

    In this process (``isolate`` off) on the CPU, only the first measurement reads a peak memory (the others
    None): each leaves glibc's heap (its free blocks, malloc_steady_state's thresholds) to the next, whose peak
    then read up to 2.8x too high."""
    # medfast first, back to back: the fewer minutes its jobs span, the less chance of a rebuild
    jobs = {("medfast", c.config): c.with_peer("medfast") for c in case_list}
    jobs.update({(c.peer, c.config): c for c in case_list})
    results: dict[str, Any] = {}
    probe_once = not isolate and any(c.device == "cpu" for c in case_list)
    probed = False

    def one(i: int, impl: str, case: wc.Case, tag: str = "") -> dict[str, Any]:
        nonlocal probed
        if wait_idle_s > 0:
            wait_idle(wait_idle_s, interval_s=0.3)
        t0 = time.perf_counter()
        res = measure_job(impl, case, {**opts, "memory": False} if probe_once and probed else opts, isolate,
                          timeout_s)
        probed = probed or res["status"] in ("ok", "error")  # the step ran (or its setup did): the heap moved
        shown = f"{_ms(res['ms'])} ms, peak {_fmt(res.get('peak_mib'))} MiB" if res["status"] == "ok" else res
        bg = f", others used {res['background_cores']:.2f} cores" if _contaminated(res) else ""
        took = f"{time.perf_counter() - t0:.1f} s{bg}"
        print(f"[{i}/{len(jobs)}{tag}] {impl:<11} {case.config}: {shown} ({took})", flush=True)
        return res

    for i, ((impl, config), case) in enumerate(jobs.items(), 1):
        results[f"{impl}|{config}"] = one(i, impl, case)
    for i, ((impl, config), case) in enumerate(jobs.items(), 1):
        first = results[f"{impl}|{config}"]
        if wait_idle_s > 0 and _contaminated(first):
            again = one(i, impl, case, " retry")
            if again["status"] == "ok" and (again.get("background_cores") or 0.0) < first["background_cores"]:
                if again.get("peak_mib") is None:  # in-process: the first run was the one that read the peak
                    again["peak_mib"] = first.get("peak_mib")
                results[f"{impl}|{config}"] = again
    return results


def busy_processes(interval_s: float = 1.0, threshold: float = 100 * BUSY_CORES) -> list[str]:
    """Other processes using more than ``threshold`` % of a core: they skew timings on a small
    machine (a parallel region waits for its preempted thread). Empty without psutil."""
    try:
        import psutil
    except ImportError:
        return []
    mine = {os.getpid()} | {c.pid for c in psutil.Process().children(recursive=True)}
    procs = [p for p in psutil.process_iter(["pid", "name"]) if p.pid not in mine]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(interval_s)
    busy = []
    for p in procs:
        try:
            pct = p.cpu_percent(None)
        except psutil.Error:
            continue
        if pct > threshold:
            busy.append(f"{p.info['name']} (pid {p.pid}, {pct:.0f}%)")
    return busy


def wait_idle(max_wait_s: float, interval_s: float = 1.0) -> list[str]:
    """Waits up to ``max_wait_s`` for the other processes to go quiet; returns those still busy."""
    deadline = time.monotonic() + max_wait_s
    busy = busy_processes(interval_s)
    while busy and time.monotonic() < deadline:
        print(f"waiting for busy processes: {', '.join(busy)}", flush=True)
        time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
        busy = busy_processes(interval_s)
    return busy


def bandwidth_rows(size: int, opts: dict[str, Any]) -> dict[str, Any]:
    """CUDA: medfast forward on ``size``^3 against the card's DRAM bandwidth."""
    peak, copy = wc.dram_peak_gbs(), wc.copy_gbs()
    ref = peak or copy
    rows = []
    for mode in wc.MODES:
        for channels in wc.CHANNELS:
            case = wc.Case("medfast", mode, channels, "fwd", size, "cuda", wc.default_padding(mode))
            res = wc.measure("medfast", case, **{**opts, "memory": False})
            row = {"mode": mode, "channels": channels, "size": size, "status": res["status"]}
            if res["status"] == "ok":
                gbs = wc.ideal_bytes(case) / (res["ms"] * 1e-3) / 1e9
                row.update(ms=res["ms"], gbs=gbs, fraction=gbs / ref)
                row["met"] = ("yes" if gbs >= 0.5 * ref else "no") if mode != "cubic" else ""
            else:
                row["reason"] = res.get("reason")
            rows.append(row)
            print(f"bandwidth {mode} c{channels} {size}^3: {row}", flush=True)
    return {"dram_peak_gbs": peak, "copy_gbs": copy, "reference_gbs": ref, "rows": rows}


# ---------------------------------------------------------------------------------------------
# Rows, targets, report
# ---------------------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ms(x: float) -> str:
    """Milliseconds with about three significant digits."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _label(case: wc.Case) -> str:
    pass_ = "fwd+bwd" if case.pass_ == "fwdbwd" else "fwd"
    op = "" if case.op == "warp" else f"{case.op} "
    return f"{op}{case.mode} c{case.channels} {pass_} vs {case.peer}"


def make_rows(case_list: list[wc.Case], results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for case in case_list:
        mine, peer = results[f"medfast|{case.config}"], results[f"{case.peer}|{case.config}"]
        tgt = wc.target(case)
        row: dict[str, Any] = {
            "case": _label(case),
            **case.to_dict(),
            "medfast": mine,
            "peer_result": peer,
            "target": tgt.describe() if tgt else "",
            "ratio": None,
            "met": "",
        }
        if wc.not_adjoint(case):  # what its time is (medfast bench shows it with the peer)
            row["note"] = wc.NOT_ADJOINT_NOTE
        if mine.get("status") == "ok" and peer.get("status") == "ok":
            row["ratio"] = peer["ms"] / mine["ms"]
            if tgt:
                ok = tgt.min_ratio is None or row["ratio"] >= tgt.min_ratio
                if ok and tgt.mem_le_peer:
                    mm, pm = mine.get("peak_mib"), peer.get("peak_mib")
                    # no peak read (in-process after the first case, or no /proc): memory not judged, not failed
                    ok = None if mm is None or pm is None else mm <= pm + MEM_TOLERANCE_MIB
                row["met"] = "n/a" if ok is None else "yes" if ok else "no"
        elif tgt:
            row["met"] = "n/a"
        rows.append(row)
    return rows


def _cell_ms(res: dict[str, Any]) -> str:
    if res.get("status") != "ok":
        return res.get("status", "?")
    return _ms(res["ms"]) + ("*" if _contaminated(res) else "")


def _cell_mem(res: dict[str, Any]) -> str:
    return _fmt(res.get("peak_mib")) if res.get("status") == "ok" else "-"


def to_markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        f"# medfast.warp benchmark: {meta['device']}, {meta['size']}^3",
        "",
        f"- host `{meta['host']}` ({meta['device_name']}), {meta['date']}, torch {meta['torch']}, "
        f"{meta['threads']} threads, medfast {meta['medfast']} (extension built {_built(meta['medfast_extension'])})",
        f"- peers: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        f"- timing: median of {meta['opts']['repeats']} calls at most (>= 3, {meta['opts']['budget_s']:g} s budget) "
        f"after >= {meta['opts']['warmup']} warm-up calls lasting >= {meta['opts'].get('warmup_s', 0.3):g} s; "
        "ratio = peer ms / medfast ms (> 1: medfast faster)",
        f"- peak memory: {meta['memory_method']}; calibration: a 100 MiB tensor reads as "
        f"{_fmt(meta['memory_calibration_mib'])} MiB",
        f"- padding: {meta['padding']}; inputs: random image, smooth random DDF (about +-4 voxels), batch 1",
    ]
    busy = meta["busy_processes"]["before"] + meta["busy_processes"]["after"]
    if busy:
        lines.append(f"- **warning**: other processes were busy at the start or end: {', '.join(sorted(set(busy)))}")
    builds = {r["medfast"].get("extension_built") for r in report["rows"] if r["medfast"].get("status") == "ok"}
    if len(builds - {None}) > 1:
        lines.append(f"- **warning**: medfast's rows come from several builds: {', '.join(sorted(builds - {None}))}")
    elif meta.get("warning"):
        lines.append(f"- note: {meta['warning']} (after the last medfast measurement)")
    lines += [
        "",
        "| case | medfast ms | peer ms | ratio peer/medfast | medfast peak MiB | peer peak MiB | target | met? |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in report["rows"]:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        lines.append(
            f"| {r['case']} | {_cell_ms(r['medfast'])} | {_cell_ms(r['peer_result'])} | {ratio} | "
            f"{_cell_mem(r['medfast'])} | {_cell_mem(r['peer_result'])} | {r['target']} | {r['met']} |"
        )
    if any(_contaminated(r["medfast"]) or _contaminated(r["peer_result"]) for r in report["rows"]):
        lines += ["", f"\\* other processes used more than {BUSY_CORES} cores during this measurement (skewed)."]
    notes = [f"- {r['case']}: {r['peer']} ({r['note']})" for r in report["rows"] if r.get("note")]
    if notes:
        lines += ["", "Notes:", ""] + notes
    not_run = [r for r in report["rows"] if r["peer_result"].get("status") != "ok"]
    reasons = sorted({(r["peer"], r["peer_result"]["status"], r["peer_result"].get("reason", "")) for r in not_run})
    if reasons:
        lines += ["", "Not run:", ""] + [f"- {p} ({s}): {why}" for p, s, why in reasons]
    bw = report.get("bandwidth")
    if bw:
        lines += [
            "",
            f"## Forward bandwidth ({bw['rows'][0]['size']}^3)" if bw["rows"] else "## Forward bandwidth",
            "",
            f"DRAM peak {_fmt(bw['dram_peak_gbs'], 0)} GB/s (spec), device copy {_fmt(bw['copy_gbs'], 0)} GB/s; "
            "GB/s = (image + ddf read + output written) / time; target >= 50% of peak (linear, nearest).",
            "",
            "| mode | channels | medfast ms | GB/s | % of peak | met? |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for r in bw["rows"]:
            if r["status"] == "ok":
                pct = f"{100 * r['fraction']:.0f}%"
                lines.append(
                    f"| {r['mode']} | {r['channels']} | {_ms(r['ms'])} | {r['gbs']:.0f} | {pct} | {r['met']} |"
                )
            else:
                lines.append(f"| {r['mode']} | {r['channels']} | {r['status']} | - | - | - |")
    agree = report.get("agreement")
    if agree:
        lines += [
            "",
            f"## Agreement with medfast ({meta['agreement_size']}^3, 2 channels)",
            "",
            "max |peer - medfast| / max |value|; a large value means different semantics, not a bug in the timing. "
            "Except torch-interpol's cubic image gradient with reflection padding: it is not the adjoint of its own "
            "forward pass (float64 dot-product tests: 0.01-0.3 relative error, depending on the field; medfast's "
            "passes to 8e-16), so its fwd+bwd time is that of a wrong gradient (no target on it).",
            "",
            "| peer | mode | pass | padding | out | grad image | grad ddf |",
            "|---|---|---|---|---:|---:|---:|",
        ]
        for a in agree:
            if a["status"] != "ok":
                continue
            cells = [f"{a[k]:.1e}" if k in a else "-" for k in ("out", "grad_image", "grad_ddf")]
            peer = a["peer"] if a.get("op", "warp") == "warp" else f"{a['peer']} ({a['op']})"
            lines.append(f"| {peer} | {a['mode']} | {a['pass']} | {a['padding']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> bool:
    """Horizontal bars of the ratios (log scale), one per row, coloured by peer; targets as ticks."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in report["rows"] if r["ratio"] is not None]
    if not rows:
        return False
    colors = dict(zip(wc.PEERS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(rows) + 1.6))
    ys = range(len(rows))[::-1]
    ax.barh(list(ys), [r["ratio"] for r in rows], color=[colors[r["peer"]] for r in rows])
    for y, r in zip(ys, rows, strict=True):
        tgt = wc.target(wc.Case.from_dict(r))
        if tgt and tgt.min_ratio:
            ax.plot([tgt.min_ratio] * 2, [y - 0.4, y + 0.4], color="red", lw=2)
        ax.text(r["ratio"], y, f" {r['ratio']:.1f}x", va="center", fontsize=7)
    ax.set_yticks(list(ys), [r["case"] for r in rows], fontsize=7)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel("peer time / medfast time (log; > 1: medfast faster; red: target)")
    meta = report["meta"]
    ax.set_title(f"medfast.warp vs peers, {meta['device']} {meta['size']}^3, {meta['host']} {meta['date']}", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in wc.PEERS if any(r["peer"] == p for r in rows)]
    ax.legend(handles, [p for p in wc.PEERS if any(r["peer"] == p for r in rows)], fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _extension_stamp() -> str:
    """Path and modification time of medfast's compiled extension (which build was measured)."""
    spec = importlib.util.find_spec("medfast._C")
    path = spec.origin if spec and spec.origin else "?"
    mtime = datetime.datetime.fromtimestamp(os.path.getmtime(path)).isoformat(timespec="seconds") if spec else "?"
    return f"{path} ({mtime})"


def _built(stamp: str) -> str:
    return stamp.rsplit("(", 1)[-1].rstrip(")")


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("monai", "torch-interpol", "scipy", "cupy-cuda13x", "cupy-cuda12x", "cupy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="size 64 (unless --size), fewer repeats: about 2 min on CPU")
    p.add_argument("--size", type=int, help="volume edge (default 128, 64 with --quick)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--padding", default="auto", choices=("auto", *wc.PADDINGS))
    p.add_argument("--peers", nargs="+", choices=wc.PEERS, help="only these peers")
    p.add_argument("--modes", nargs="+", choices=wc.MODES, help="only these modes")
    p.add_argument("--ops", nargs="+", choices=wc.OPS, default=list(wc.OPS),
                   help="ops: warp (ddf) and affine (affine_warp vs scipy/cupy affine_transform); default both")
    p.add_argument("--repeats", type=int, help="timed calls at most (15, quick 5; twice that on CUDA)")
    p.add_argument("--warmup", type=int, help="untimed calls first, at least (2, quick 1), and for >= 1 s (quick 0.3)")
    p.add_argument("--budget", type=float, help="seconds of timed calls per case beyond the first 3")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, help="subprocess per case (default: on CPU)")
    p.add_argument("--bw-size", type=int, default=256, help="CUDA: volume edge of the bandwidth rows (0: none)")
    p.add_argument("--no-agreement", action="store_true", help="skip the small-volume agreement check")
    p.add_argument("--timeout", type=float, default=900, help="seconds per isolated case")
    p.add_argument("--wait-idle", type=float, default=0, help="before each case, wait up to this long (s) for quiet")
    p.add_argument("--render", type=Path, help="only write md + png for a saved JSON report (into --out)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if args.render:  # a saved JSON report (e.g. from another machine) -> <stem>.md + .png in --out
        report, base = json.loads(args.render.read_text()), args.out / args.render.stem
        args.out.mkdir(parents=True, exist_ok=True)
        base.with_suffix(".md").write_text(to_markdown(report))
        plot(report, base.with_suffix(".png"))
        print(f"wrote {base}.md/.png")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("run_warp: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    size = args.size or (64 if args.quick else 128)
    opts = {
        "warmup": args.warmup if args.warmup is not None else (1 if args.quick else 2),
        "warmup_s": 0.3 if args.quick else 1.0,
        "repeats": args.repeats or (5 if args.quick else 15) * (2 if args.device == "cuda" else 1),
        "budget_s": args.budget if args.budget is not None else (1.0 if args.quick else 6.0),
    }
    isolate = args.isolate if args.isolate is not None else args.device == "cpu"
    case_list = [
        c
        for c in wc.cases(size, args.device, args.padding, tuple(args.ops))
        if (not args.peers or c.peer in args.peers) and (not args.modes or c.mode in args.modes)
    ]
    busy_before = wait_idle(args.wait_idle) if args.wait_idle else busy_processes()
    if busy_before:
        print(f"warning: other processes are busy, timings will be noisy: {', '.join(busy_before)}", flush=True)
    t0 = time.perf_counter()
    threads = wc.set_threads()
    import medfast

    stamp = _extension_stamp()
    calib = run_job({"kind": "calibrate", "device": args.device, "mib": 100}, isolate, args.timeout)
    results = run_all(case_list, opts, isolate, args.timeout, args.wait_idle)
    report: dict[str, Any] = {
        "meta": {
            "op": wc.OP,
            "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
            "host": socket.gethostname(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "size": size,
            "padding": args.padding + (" (zeros; reflection for cubic)" if args.padding == "auto" else ""),
            "quick": args.quick,
            "threads": threads,
            "torch": torch.__version__,
            "medfast": medfast.__version__,
            "medfast_build": medfast.build_info(),
            "medfast_extension": stamp,
            "versions": versions(),
            "opts": opts,
            "isolated": isolate,
            "memory_method": memory_method(args.device, isolate),
            "memory_calibration_mib": calib.get("measured_mib"),
            "agreement_size": 20,
        },
        "rows": make_rows(case_list, results),
        "results": results,
    }
    if args.device == "cuda" and args.bw_size:
        report["bandwidth"] = bandwidth_rows(args.bw_size, opts)
    if not args.no_agreement:
        report["agreement"] = wc.agreement(args.device, args.padding, size=20, ops=tuple(args.ops))
    report["meta"]["wall_s"] = time.perf_counter() - t0
    report["meta"]["busy_processes"] = {"before": busy_before, "after": busy_processes()}
    if _extension_stamp() != stamp:
        report["meta"]["warning"] = f"medfast's extension was rebuilt during the run: now {_extension_stamp()}"
        print("warning: " + report["meta"]["warning"], flush=True)

    paths = write_report(report, args.out)
    print(to_markdown(report))
    print(f"wrote {', '.join(str(p) for p in paths)} in {report['meta']['wall_s']:.0f} s")
    failed = medfast_failures(report)
    if failed:
        # exit 1: `medfast bench` then marks the suite failed (its reason: this last line) and keeps the earlier rows;
        # a medfast error read as an ok suite with blank rows. stdout first: the log interleaves both streams
        sys.stdout.flush()
        print(f"run_warp: medfast did not run {len(failed)} configuration{'s' if len(failed) > 1 else ''}, "
              f"the first: {failed[0]}"[:400], file=sys.stderr, flush=True)
        return 1
    return 0


def medfast_failures(report: dict[str, Any]) -> list[str]:
    """``"config: status (reason)"`` of each medfast measurement that is not ok (the timed rows', the bandwidth
    rows'): the suite failed there, whatever the peers did."""
    out = [f"{r['config']}: {r['medfast'].get('status')} ({r['medfast'].get('reason') or '-'})"
           for r in report["rows"] if r["medfast"].get("status") != "ok"]
    out += [f"bandwidth {r['mode']} c{r['channels']} {r['size']}^3: {r['status']} ({r.get('reason') or '-'})"
            for r in (report.get("bandwidth") or {}).get("rows", []) if r["status"] != "ok"]
    return list(dict.fromkeys(out))  # a config's medfast result is shared by its peers' rows: once each


def memory_method(device: str, isolate: bool) -> str:
    """How the peaks were read, as the run did it (run_all: in-process on the CPU, the first case only)."""
    if device == "cuda":
        return "torch.cuda max_memory_allocated minus allocated before the call (inputs excluded)"
    probe = "peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS before one call after the warm-up"
    if not isolate:
        return (f"{probe}, all cases in this process (--no-isolate): the first measured case only, '-' for the "
                "others (each would read the heap state the cases before it left, up to 2.8x too high)")
    return (f"{probe}, fresh process per case started with MALLOC_MMAP_THRESHOLD_=128 KiB, so that freed blocks "
            "leave RSS (inputs excluded; timing then uses glibc's steady-state thresholds)")


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    """Writes ``warp_<device>_<host>_<date>.{json,md,png}`` in ``out`` and copies them to
    ``warp_<device>_latest.*``."""
    out.mkdir(parents=True, exist_ok=True)
    device = report["meta"]["device"]
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", report["meta"]["host"])
    base = out / f"warp_{device}_{host}_{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    base.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    base.with_suffix(".md").write_text(to_markdown(report))
    suffixes = [".json", ".md"] + ([".png"] if plot(report, base.with_suffix(".png")) else [])
    for suffix in suffixes:
        shutil.copyfile(base.with_suffix(suffix), (out / f"warp_{device}_latest").with_suffix(suffix))
    return [base.with_suffix(s) for s in suffixes]


if __name__ == "__main__":
    sys.exit(main())
