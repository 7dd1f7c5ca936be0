"""The suite registry, the runner and the report writers of ``medfast bench``."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import fnmatch
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

# the simulator's default number of elevation sub-rays: issue 4's frames/s target is for those settings
DEFAULT_SUB_RAYS = 3


@dataclasses.dataclass
class Row:
    """One medfast-vs-peer comparison. ratio = peer time / medfast time (> 1: medfast is faster)."""

    suite: str
    case: str
    peer: str
    medfast_ms: float | None
    peer_ms: float | None
    ratio: float | None
    medfast_peak_mib: float | None = None
    peer_peak_mib: float | None = None
    target: str = ""  # what the row must meet, e.g. ">= 3x, mem <= peer" ("": no target)
    met: str = ""  # "yes", "no", "n/a" (a side did not run) or "" (no target)


@dataclasses.dataclass
class Suite:
    """A benchmark script, how to call it, and how to read its JSON results into rows."""

    name: str
    script: str
    args: Callable[[str, bool, Path], list[str]]  # (device, quick, out_dir) -> argv
    collect: Callable[[Path, str | None], list[Row]]  # (out_dir, device or None: any) -> rows
    devices: tuple[str, ...] = ("cpu", "cuda")
    peers: tuple[str, ...] = ()  # importable modules the suite needs (missing -> skipped)
    device_peers: dict[str, tuple[str, ...]] | None = None  # per device, replacing ``peers`` there

    def needs(self, device: str) -> tuple[str, ...]:
        """The importable modules the suite needs on ``device``."""
        return (self.device_peers or {}).get(device, self.peers)


def _ratio(peer_ms, ours_ms):
    return peer_ms / ours_ms if peer_ms and ours_ms else None


def _load(out: Path, pattern: str, device: str | None = None):
    """The last (sorted) file of ``out`` matching ``pattern``; with ``device``, only among the files whose
    name holds it as a word (``loss_cuda_latest.json``, ``metrics_cuda.json``), so that the CPU and CUDA
    results of a suite never stand in for each other."""
    files = sorted(out.glob(pattern))
    if device:
        files = [f for f in files if device in re.split(r"[_.-]", f.name)]
    if not files:
        raise FileNotFoundError(f"no {pattern}{f' for {device}' if device else ''} written in {out}")
    return json.loads(files[-1].read_text())


# ---- adapters: one per script's JSON layout --------------------------------------------------------


def _warp_rows(out: Path, device: str | None = None) -> list[Row]:
    data = _load(out, "warp_*_latest.json", device)
    rows = []
    for r in data["rows"]:
        ours, peer = r.get("medfast") or {}, r.get("peer_result") or {}
        rows.append(Row("warp", r["case"] + f" {r['size']}^3", r["peer"], ours.get("ms"), peer.get("ms"),
                        r.get("ratio"), ours.get("peak_mib"), peer.get("peak_mib"), r.get("target") or "",
                        r.get("met") or ""))
    return rows


def _loss_rows(out: Path, device: str | None = None) -> list[Row]:
    rows = []
    for r in _load(out, "loss_*_latest.json", device):
        batch, dtype = r.get("batch", 1), r.get("dtype", "float32")
        case = (f"Dice+CE fwd+bwd {'' if batch == 1 else f'B={batch} '}{r['size']}^3 C={r['classes']}"
                + ("" if dtype == "float32" else f" {dtype} logits"))
        for peer in ("monai", "torch"):
            if f"{peer}_ms" not in r and f"{peer}_status" not in r:
                continue
            name = "MONAI DiceCELoss" if peer == "monai" else "PyTorch one-hot"
            if f"{peer}_ms" not in r:
                name += f" ({r[f'{peer}_status']})"
            rows.append(Row("loss", case, name, r.get("medfast_ms"), r.get(f"{peer}_ms"),
                            _ratio(r.get(f"{peer}_ms"), r.get("medfast_ms")), r.get("medfast_extra_peak_mib"),
                            r.get(f"{peer}_extra_peak_mib"), (r.get("target") or "") if peer == "monai" else "",
                            (r.get("met") or "") if peer == "monai" else ""))
        if "medfast_nosync_ms" in r and "monai_ms" in r:  # CUDA: check_labels=False, no device sync
            rows.append(Row("loss", case + ", check_labels=False", "MONAI DiceCELoss", r["medfast_nosync_ms"],
                            r["monai_ms"], _ratio(r["monai_ms"], r["medfast_nosync_ms"]),
                            r.get("medfast_nosync_extra_peak_mib"), r.get("monai_extra_peak_mib")))
    return rows


def _at_least(ratio: float | None, need: float, cpu: bool) -> tuple[str, str]:
    """(target, met) of a ratio target that an issue sets for this CPU only (issues 3 and 5)."""
    if not cpu:
        return "", ""
    return f">= {need:g}x", "n/a" if ratio is None else ("yes" if ratio >= need else "no")


def _metrics_rows(out: Path, device: str | None = None) -> list[Row]:
    data = _load(out, "metrics_*.json", device)
    size = re.match(r"(\d+)\^3", data["case"])
    label = f" {size.group(1)}^3" if size else ""
    cpu = data["case"].endswith("device cpu")
    rows = []
    for case, t in data["ms"].items():
        ratio = _ratio(t.get("monai"), t["medfast"])
        # issue 3 on the CPU: Hausdorff-95 at least 10x MONAI (every pair, the far-apart one included)
        target = _at_least(ratio, 10, cpu) if case.startswith("hausdorff95") else ("", "")
        rows.append(Row("metrics", f"{case}{label}", "MONAI", t["medfast"], t.get("monai"), ratio, None, None, *target))
    return rows


def _distance_rows(out: Path, device: str | None = None) -> list[Row]:
    data = _load(out, "distance_*.json", device)
    size = re.search(r"(\d+)\^3", data["case"])
    ms, peak = data["ms"], data.get("peak_mib", {})
    case = f"EDT {size.group(1) if size else ''}^3"
    rows = [Row("distance", case, peer, ms["medfast"], ms[peer], _ratio(ms[peer], ms["medfast"]), peak.get("medfast"),
                peak.get(peer)) for peer in ms if peer != "medfast"]
    return rows + [Row("distance", case, f"{peer} (skipped: {why})", ms["medfast"], None, None, peak.get("medfast"))
                   for peer, why in data.get("skipped", {}).items()]


def _registration_rows(out: Path, device: str | None = None) -> list[Row]:
    d = _load(out, "registration_*latest.json", device)
    cpu = d.get("device", "cpu") == "cpu"
    threads = f", {d['threads']} thread{'s' if d['threads'] != 1 else ''}" if d.get("threads") else ""
    rows = []
    for r in d.get("lncc", []):
        ratio = _ratio(r["monai_ms"], r["medfast_ms"])
        rows.append(Row("registration", f"LNCC fwd+bwd {r['size']}^3 k={r['kernel']}{threads}", "MONAI LNCC",
                        r["medfast_ms"], r["monai_ms"], ratio, r.get("medfast_extra_peak_mib"),
                        r.get("monai_extra_peak_mib"), *_at_least(ratio, 5, cpu)))
    st = d.get("step")
    if st:
        case = f"LocalNet step {st['size']}^3 (LNCC + bending + warp){threads}"
        ratio = _ratio(st["monai_ms"], st["medfast_ms"])
        # results from before the three builds have no monai_fastnet: their MONAI build ran on medfast's network
        three_builds = "monai_fastnet_ms" in st
        peer = ("MONAI build (stock torch.nn LocalNet + MONAI Warp/LNCC/BendingEnergy)" if three_builds
                else "MONAI Warp/LNCC/BendingEnergy on medfast's LocalNet")
        rows.append(Row("registration", case, peer, st["medfast_ms"], st["monai_ms"], ratio,
                        st.get("medfast_extra_peak_mib"), st.get("monai_extra_peak_mib"),
                        *(_at_least(ratio, 2, cpu) if three_builds else ("", ""))))
        if three_builds:
            rows.append(Row("registration", case, "MONAI Warp/LNCC/BendingEnergy on medfast's LocalNet",
                            st["medfast_ms"], st["monai_fastnet_ms"], _ratio(st["monai_fastnet_ms"], st["medfast_ms"]),
                            st.get("medfast_extra_peak_mib"), st.get("monai_fastnet_extra_peak_mib")))
    b = d.get("step_breakdown")
    if b:
        rows.append(Row("registration", f"step parts {b['size']}^3: warp + LNCC + bending fwd+bwd (medfast's "
                        f"LocalNet fwd+bwd: {b['net_ms']:.0f} ms; ops-only step ratio ceiling "
                        f"{b['ratio_ceiling']:.2f}x){threads}",
                        "MONAI Warp/LNCC/BendingEnergy", b["medfast_losses_ms"], b["monai_losses_ms"],
                        _ratio(b["monai_losses_ms"], b["medfast_losses_ms"])))
        if "monai_net_ms" in b:
            rows.append(Row("registration", f"step parts {b['size']}^3: LocalNet fwd+bwd{threads}",
                            "the same LocalNet on stock torch.nn layers (NCDHW)", b["net_ms"], b["monai_net_ms"],
                            _ratio(b["monai_net_ms"], b["net_ms"])))
    return rows


def _segmentation_rows(out: Path, device: str | None = None) -> list[Row]:
    d = _load(out, "segmentation_*_latest.json", device)
    shape = f"B={d['batch']} {d['size']}^3 C={d['classes']}"
    rows = []
    for key, label in (("loss", "Dice+CE fwd+bwd on UNet logits"), ("step", "UNet training step")):
        ours, peer = d[key]["medfast"], d[key]["monai"]
        rows.append(Row("segmentation", f"{label} {shape}", "MONAI DiceCELoss", ours["ms"], peer["ms"],
                        _ratio(peer["ms"], ours["ms"]), ours.get("extra_peak_mib"), peer.get("extra_peak_mib")))
    return rows


def _ultrasound_rows(out: Path, device: str | None = None) -> list[Row]:
    d = _load(out, "ultrasound_*_latest.json", device)
    s = d["summary"]
    ours = [r for r in d["medfast"] if r["case"] == "forward" and r.get("sub_rays") == 3]
    ours_ms = ours[0]["seconds_per_call"] * 1e3 if ours else None
    rows = []
    for r in d["medfast"]:
        target = ("", "")
        # issue 4: >= 100 frames/s for single frames with the default settings (3 sub-rays), not the lighter ones
        if (r.get("device") == "cpu" and r["case"] == "forward" and r["batch"] == 1
                and r.get("sub_rays") == DEFAULT_SUB_RAYS):
            target = (">= 100 frames/s", "yes" if r["frames_per_second"] >= 100 else "no")
        # its peak is the process's resident size (torch included), not an extra peak as the other rows': in the text
        rss = f", process RSS {r['peak_mib']:.0f} MiB" if r.get("peak_mib") is not None else ""
        rows.append(Row("ultrasound", f"{r['case']} frame (B={r['batch']}, {r['sub_rays']} sub-rays, {r['volume']}^3): "
                        f"{r['frames_per_second']:.1f} frames/s{rss}", "-", r["seconds_per_call"] * 1e3, None, None,
                        None, None, *target))
    if ours_ms and "pymust_seconds_60k_scatterers_one_transmit_extrapolated" in s:
        peer_ms = s["pymust_seconds_60k_scatterers_one_transmit_extrapolated"] * 1e3
        rows.append(Row("ultrasound", "frame vs pymust simus (60k scatterers, one transmit, extrapolated)",
                        "pymust", ours_ms, peer_ms, _ratio(peer_ms, ours_ms)))
    return rows


def _classification_rows(out: Path, device: str | None = None) -> list[Row]:
    d = _load(out, "classification_*_latest.json", device)
    h, w = d["image_shape"]
    case = (f"simulated batch B={d['batch']} {h}x{w} ({d['n_lines']} lines x {d['n_samples']} samples, "
            f"{d['volumes']}) vs {d['model']} step: data {100 * d['render_fraction_of_step']:.0f}% of step")
    # no ratio: the step is not a peer doing the same work (the fraction is in the case text)
    return [Row("classification", case, f"{d['model']} training step", d["render_ms"], d["step_ms"], None)]


def _distance_args(device: str, quick: bool, out: Path) -> list[str]:
    """CUDA: 128^3 in quick mode (fewer repeats), 256^3 in full mode (128^3 is launch-bound on a GPU)."""
    argv = ["--device", device, "--out", str(out / f"distance_{device}.json")]
    if device == "cuda":
        return argv + (["--repeats", "5"] if quick else ["--size", "256"])
    return argv + (["--size", "64"] if quick else [])


def _registration_args(device: str, quick: bool, out: Path) -> list[str]:
    """CUDA: LNCC at 64^3 and 128^3 in both modes; the LocalNet step at 64^3 (quick) or 128^3 (full)."""
    argv = ["--device", device, "--out", str(out)]
    if device == "cuda":
        return argv + (["--sizes", "64", "128", "--step-size", "64"] if quick else ["--step-size", "128"])
    return argv + (["--sizes", "32", "64", "--step-size", "32"] if quick else [])


SUITES: list[Suite] = [
    Suite("warp", "run_warp.py", lambda d, q, o: ["--device", d, "--out", str(o)] + (["--quick"] if q else []),
          _warp_rows),
    # CUDA: the case (B=2 128^3, C = 4/16/64, float32 and bfloat16 logits) even in quick mode, fewer repeats
    Suite("loss", "bench_loss.py",
          lambda d, q, o: ["--device", d, "--out", str(o)]
          + ((["--repeats", "10"] if d == "cuda" else ["--size", "64", "--classes", "4", "16"]) if q else []),
          _loss_rows, peers=("monai",)),
    Suite("metrics", "bench_metrics.py",
          lambda d, q, o: ["--device", d, "--out", str(o / f"metrics_{d}.json")] + (["--size", "64"] if q else []),
          _metrics_rows, peers=("monai",)),
    # CUDA: the peer is CuPy (skipped inside the script when absent), scipy on the CPU for reference
    Suite("distance", "bench_distance.py", _distance_args, _distance_rows, peers=("scipy", "monai"),
          device_peers={"cuda": ("scipy",)}),
    Suite("registration", "bench_registration.py", _registration_args, _registration_rows, peers=("monai",)),
    Suite("segmentation", "bench_segmentation.py",
          lambda d, q, o: ["--device", d, "--out", str(o)] + (["--size", "32", "--repeats", "3"] if q else []),
          _segmentation_rows, peers=("monai",)),
    Suite("ultrasound", "bench_ultrasound.py",
          lambda d, q, o: ["--device", d, "--out", str(o)]
          + (["--size", "64", "--repeats", "3", "--pymust-scatterers", "100"] if q else []),
          _ultrasound_rows, peers=("pymust",)),
    # ratio = step time / batch rendering time: > 10 means data generation under 10 % of the step
    Suite("classification", "bench_classification.py",
          lambda d, q, o: ["--device", d, "--out", str(o)] + (["--repeats", "5"] if q else ["--batch", "64"]
                                                              if d == "cuda" else []),
          _classification_rows),
]


def benchmarks_dir() -> Path:
    """The benchmark scripts: inside the installed wheel, else the source tree's benchmarks/."""
    pkg = Path(__file__).resolve().parent.parent
    for candidate in (pkg / "benchmarks", pkg.parent / "benchmarks"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"medfast's benchmark scripts were not found next to {pkg}")


def _missing(modules: tuple[str, ...]) -> list[str]:
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]


def run_suites(device: str, quick: bool, only: str | None, log_dir: Path,
               progress: Callable[[str], None] = print) -> tuple[dict, list[Row]]:
    """Runs the selected suites one after another; returns ({suite: status}, rows)."""
    where = benchmarks_dir()
    status, rows = {}, []
    for suite in SUITES:
        if only and not any(fnmatch.fnmatch(suite.name, p.strip()) for p in only.split(",")):
            continue
        if device not in suite.devices:
            status[suite.name] = {"status": "skipped", "reason": f"no {device} variant (runs on {suite.devices})"}
            continue
        missing = _missing(suite.needs(device))
        if missing:
            status[suite.name] = {"status": "skipped", "reason": f"peer not installed: {', '.join(missing)}"}
            progress(f"{suite.name}: skipped (peer not installed: {', '.join(missing)})")
            continue
        out = log_dir / suite.name
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(where / suite.script), *suite.args(device, quick, out)]
        progress(f"{suite.name}: running {' '.join(cmd[1:])}")
        start = time.perf_counter()
        with open(out / "log.txt", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=where.parent).returncode
        seconds = time.perf_counter() - start
        text = (out / "log.txt").read_text(errors="replace")
        if rc != 0:
            gone = re.search(r"No module named '([^']+)'", text)
            state = "skipped" if gone else "failed"
            reason = f"peer not installed: {gone.group(1)}" if gone else text.strip().splitlines()[-1:]
            status[suite.name] = {"status": state, "reason": reason, "seconds": seconds, "log": str(out / "log.txt")}
            progress(f"{suite.name}: {state} ({reason})")
            continue
        try:
            got = suite.collect(out, device)
        except (FileNotFoundError, KeyError, ValueError) as exc:
            status[suite.name] = {"status": "failed", "reason": f"unreadable results: {exc}", "seconds": seconds}
            progress(f"{suite.name}: failed (unreadable results: {exc})")
            continue
        rows.extend(got)
        status[suite.name] = {"status": "ok", "rows": len(got), "seconds": round(seconds, 1)}
        progress(f"{suite.name}: ok, {len(got)} comparisons in {seconds:.0f} s")
    return status, rows


# ---- reports -------------------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(meta: dict, status: dict, rows: list[Row]) -> str:
    lines = [f"# medfast bench: {meta['device_name']} ({meta['host']}, {meta['date']})", "",
             f"torch {meta['torch']}, medfast {meta['medfast']}, {meta['threads']} CPU threads"
             + (", quick sizes" if meta["quick"] else ""), "",
             "Ratio = peer time / medfast time (> 1: medfast is faster). Peak: memory in MiB above the inputs during "
             "a call (CPU: resident growth, GPU: allocator). Target: what a row "
             "must meet where the issues set one (met?: yes / no / n/a where a side did not run).", "",
             "| suite | case | peer | medfast ms | peer ms | ratio | medfast peak | peer peak | target | met? |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        cells = [r.suite, r.case, r.peer, _fmt(r.medfast_ms, ".2f"), _fmt(r.peer_ms, ".2f"),
                 _fmt(r.ratio, ".2f") + "x", _fmt(r.medfast_peak_mib, ".0f"), _fmt(r.peer_peak_mib, ".0f"),
                 r.target, r.met]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| suite | status | detail |", "|---|---|---|"]
    for name, s in status.items():
        detail = s.get("reason") or f"{s.get('rows', 0)} comparisons, {s.get('seconds', 0):.0f} s"
        if s.get("from"):
            detail += f" (from the run of {s['from']})"
        lines.append(f"| {name} | {s['status']} | {detail} |")
    return "\n".join(lines) + "\n"


def plot(meta: dict, rows: list[Row], path: Path) -> bool:
    """The ratio chart as a PNG at ``path``; False (and no file: an older chart there is removed, so that it
    cannot stand beside a report it does not show) when no row has a ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.ratio]
    if not shown:
        path.unlink(missing_ok=True)
        return False
    suites = sorted({r.suite for r in shown})
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(suites)}
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(shown) + 1.5))
    y = range(len(shown))
    ax.barh(list(y), [r.ratio for r in shown], color=[colors[r.suite] for r in shown])
    ax.set_yticks(list(y), [f"{r.suite}: {r.case} vs {r.peer}" for r in shown], fontsize=7)
    ax.set_xscale("log")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("speed ratio (peer time / medfast time, log scale; > 1: medfast faster)")
    ax.set_title(f"medfast bench, {meta['device_name']}, {meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _meta(device: str, quick: bool) -> dict:
    import medfast

    name = torch.cuda.get_device_name(0) if device == "cuda" else (platform.processor() or platform.machine())
    return {"host": platform.node() or "host", "device": device, "device_name": f"{device}: {name}",
            "date": _dt.datetime.now().strftime("%Y%m%d-%H%M%S"), "torch": torch.__version__,
            "medfast": medfast.__version__, "threads": torch.get_num_threads(), "quick": quick,
            "python": sys.version.split()[0]}


def _with_earlier_suites(latest: Path, meta: dict, status: dict, rows: list[Row]) -> tuple[dict, list[Row]]:
    """This run's suites plus, from the previous latest report of the same device, the suites this run did
    not touch (an ``--only`` run refreshes its suites without dropping the others), each marked with the
    date of the run it comes from."""
    try:
        prev = json.loads(latest.read_text())
    except (OSError, ValueError):
        return status, rows
    if prev.get("meta", {}).get("device") != meta["device"]:
        return status, rows
    order = {s.name: i for i, s in enumerate(SUITES)}
    kept = {name: {**s, "from": s.get("from", prev["meta"].get("date"))}
            for name, s in prev.get("suites", {}).items() if name not in status}
    fields = {f.name for f in dataclasses.fields(Row)}
    old_rows = [Row(**{k: v for k, v in r.items() if k in fields})
                for r in prev.get("rows", []) if r.get("suite") in kept]
    merged = dict(sorted({**kept, **status}.items(), key=lambda kv: order.get(kv[0], len(order))))
    return merged, sorted(old_rows + rows, key=lambda r: order.get(r.suite, len(order)))


def write_reports(out: Path, meta: dict, status: dict, rows: list[Row]) -> list[Path]:
    """The dated report holds this run only; ``bench_<device>_latest`` also keeps the suites it did not run."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{meta['device']}_{re.sub(r'[^A-Za-z0-9_.-]', '_', meta['host'])}_{meta['date']}"
    latest = f"bench_{meta['device']}_latest"
    paths = []
    for name, (st, rw) in ((stem, (status, rows)),
                           (latest, _with_earlier_suites(out / f"{latest}.json", meta, status, rows))):
        report = {"meta": meta, "suites": st, "rows": [dataclasses.asdict(r) for r in rw]}
        (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / f"{name}.md").write_text(markdown(meta, st, rw))
        chart = plot(meta, rw, out / f"{name}.png")
        paths += [out / f"{name}.{ext}" for ext in ("json", "md", "png") if ext != "png" or chart]
    return paths


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="smaller volumes and fewer repeats (minutes, not tens)")
    p.add_argument("--only", metavar="PATTERN", help="comma-separated suite names or globs, e.g. 'warp,loss'")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the reports")
    p.add_argument("--list", action="store_true", help="list the suites and exit")


def main(args: argparse.Namespace) -> int:
    if args.list:
        for s in SUITES:
            by_device = {d: ", ".join(s.needs(d)) or "-" for d in s.devices}
            peers = (f"peers: {by_device[s.devices[0]]}" if len(set(by_device.values())) == 1
                     else "; ".join(f"peers on {d}: {p}" for d, p in by_device.items()))
            print(f"{s.name:14s} {s.script:26s} devices: {', '.join(s.devices)}; {peers}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("medfast bench: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    if args.only is not None and not any(p.strip() for p in args.only.split(",")):
        # an empty pattern (an unset shell variable) must not mean "every suite" (tens of minutes)
        print(f"medfast bench: --only needs suite names or globs, got {args.only!r} (see --list)", file=sys.stderr)
        return 2
    meta = _meta(args.device, args.quick)
    with tempfile.TemporaryDirectory(prefix="medfast-bench-") as tmp:
        log_dir = Path(os.environ.get("MEDFAST_BENCH_WORK", tmp))
        status, rows = run_suites(args.device, args.quick, args.only, log_dir,
                                  progress=lambda msg: print(f"[medfast bench] {msg}", flush=True))
    if not status:
        print(f"medfast bench: no suite matches --only {args.only!r}", file=sys.stderr)
        return 2
    paths = write_reports(args.out, meta, status, rows)
    print(markdown(meta, status, rows))
    print("wrote " + ", ".join(str(p) for p in paths if p.stem != f"bench_{meta['device']}_latest"))
    return 1 if any(s["status"] == "failed" for s in status.values()) else 0
