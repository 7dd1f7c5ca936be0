"""The suite registry, the runner and the report writers of ``medfast bench``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import fnmatch
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from medfast._atomic import replacing
from medfast._signals import Terminated, signals_deferred

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
    # importable modules the script cannot run without (missing -> the whole suite is skipped); the peers it
    # reports per row when absent go in ``optional`` instead, so that one missing peer does not hide the others
    peers: tuple[str, ...] = ()
    device_peers: dict[str, tuple[str, ...]] | None = None  # per device, replacing ``peers`` there
    optional: tuple[str, ...] = ()  # peers the script skips per row (its crash on one of them reads "skipped")
    # files the script reads, relative to the benchmarks folder's parent: a source checkout has them, an installed
    # wheel (benchmarks shipped as medfast/benchmarks, no configs/) does not -> the suite is skipped, not failed
    files: tuple[str, ...] = ()

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


# run_warp.BUSY_CORES: other processes using more cores than this while a side was timed skew it (its "*")
_WARP_BUSY_CORES = 0.2


def _warp_side(res: dict) -> str:
    """What run_warp's table says of a side beside its time: why it did not run, or its "*" (timed while
    other processes were busy); "" for a clean measurement. A "|" would end the Markdown cell."""
    if res.get("status", "ok") != "ok":
        return f"{res['status']}: {res.get('reason') or '-'}".replace("|", "/")
    busy = res.get("background_cores") or 0.0
    return f"*: timed while other processes used {busy:.2f} cores" if busy > _WARP_BUSY_CORES else ""


def _warp_rows(out: Path, device: str | None = None) -> list[Row]:
    data = _load(out, "warp_*_latest.json", device)
    rows = []
    for r in data["rows"]:
        ours, peer = r.get("medfast") or {}, r.get("peer_result") or {}
        # as the loss / distance rows: a side that did not run says so and why (a blank row read as an n/a
        # configuration), a skewed one keeps run_warp's mark, and a row's caveat (its note) stays with its peer
        mine, theirs = _warp_side(ours), _warp_side(peer)
        case = r["case"] + f" {r['size']}^3" + (f" (medfast {mine})" if mine else "")
        name = r["peer"] + (f" ({theirs})" if theirs else "") + (f" ({r['note']})" if r.get("note") else "")
        rows.append(Row("warp", case, name, ours.get("ms"), peer.get("ms"), r.get("ratio"), ours.get("peak_mib"),
                        peer.get("peak_mib"), r.get("target") or "", r.get("met") or ""))
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
    # per frame: a CUDA call renders a batch of 64 (pymust's time is one frame's)
    ours_ms = ours[0]["seconds_per_call"] / ours[0].get("batch", 1) * 1e3 if ours else None
    rows = []
    for r in d["medfast"]:
        target = ("", "")
        # issue 4: >= 100 frames/s for single frames with the default settings (3 sub-rays), not the lighter ones
        if (r.get("device") == "cpu" and r["case"] == "forward" and r["batch"] == 1
                and r.get("sub_rays") == DEFAULT_SUB_RAYS):
            target = (">= 100 frames/s", "yes" if r["frames_per_second"] >= 100 else "no")
        # its peak is the process's resident size (torch included) on the CPU, the CUDA allocator's peak on a GPU; not
        # an extra peak as the other rows': in the text
        what = "process RSS" if r.get("device", "cpu") == "cpu" else "CUDA allocator peak"
        rss = f", {what} {r['peak_mib']:.0f} MiB" if r.get("peak_mib") is not None else ""
        rows.append(Row("ultrasound", f"{r['case']} frame (B={r['batch']}, {r['sub_rays']} sub-rays, {r['volume']}^3): "
                        f"{r['frames_per_second']:.1f} frames/s{rss}", "-", r["seconds_per_call"] * 1e3, None, None,
                        None, None, *target))
    if ours_ms and "pymust_seconds_60k_scatterers_one_transmit_extrapolated" in s:
        peer_ms = s["pymust_seconds_60k_scatterers_one_transmit_extrapolated"] * 1e3
        rows.append(Row("ultrasound", "frame vs pymust simus (60k scatterers, one transmit, extrapolated)",
                        "pymust", ours_ms, peer_ms, _ratio(peer_ms, ours_ms)))
    elif ours_ms and d.get("pymust") == []:  # an optional peer: the script ran without it (see the suite's log)
        rows.append(Row("ultrasound", "frame vs pymust simus (60k scatterers, one transmit, extrapolated)",
                        "pymust (not run: not installed or failed)", ours_ms, None, None))
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


#: The benchmark suites ``medfast bench`` runs, in order.
SUITES: list[Suite] = [
    Suite("warp", "run_warp.py", lambda d, q, o: ["--device", d, "--out", str(o)] + (["--quick"] if q else []),
          _warp_rows, optional=("monai", "interpol", "scipy", "cupy")),
    # CUDA: the case (B=2 128^3, C = 4/16/64, float32 and bfloat16 logits) even in quick mode, fewer repeats
    Suite("loss", "bench_loss.py",
          lambda d, q, o: ["--device", d, "--out", str(o)]
          + ((["--repeats", "10"] if d == "cuda" else ["--size", "64", "--classes", "4", "16"]) if q else []),
          _loss_rows, optional=("monai",)),
    Suite("metrics", "bench_metrics.py",
          lambda d, q, o: ["--device", d, "--out", str(o / f"metrics_{d}.json")] + (["--size", "64"] if q else []),
          _metrics_rows, peers=("monai", "scipy")),
    # scipy is the reference the script checks medfast against; MONAI (and CuPy / cuCIM on CUDA) are skipped per row
    Suite("distance", "bench_distance.py", _distance_args, _distance_rows, peers=("scipy",),
          optional=("monai", "cupy", "cupyx", "cucim")),
    Suite("registration", "bench_registration.py", _registration_args, _registration_rows, peers=("monai",)),
    Suite("segmentation", "bench_segmentation.py",
          lambda d, q, o: ["--device", d, "--out", str(o)] + (["--size", "32", "--repeats", "3"] if q else []),
          _segmentation_rows, peers=("monai",)),
    Suite("ultrasound", "bench_ultrasound.py",
          lambda d, q, o: ["--device", d, "--out", str(o)]
          + (["--size", "64", "--repeats", "3", "--pymust-scatterers", "50", "200", "--pymust-repeats", "1"]
             if q else []),
          _ultrasound_rows, optional=("pymust",)),
    # no ratio (the step is no peer): the case text gives data generation's share of the step (target: < 10 %)
    Suite("classification", "bench_classification.py",
          lambda d, q, o: ["--device", d, "--out", str(o)] + (["--repeats", "5"] if q else ["--batch", "64"]
                                                              if d == "cuda" else []),
          _classification_rows, files=("configs/cls_demo_cpu.yaml",)),
]


def benchmarks_dir() -> Path:
    """The benchmark scripts: inside the installed wheel, else the source tree's benchmarks/."""
    pkg = Path(__file__).resolve().parent.parent
    for candidate in (pkg / "benchmarks", pkg.parent / "benchmarks"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"medfast's benchmark scripts were not found next to {pkg}")


def _missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _patterns(only: str | None) -> list[str]:
    return [p.strip() for p in (only or "").split(",") if p.strip()]


def unmatched_patterns(only: str | None) -> list[str]:
    """The ``--only`` patterns that name no suite (a typo must not silently shrink the run)."""
    return [p for p in _patterns(only) if not any(fnmatch.fnmatch(s.name, p) for s in SUITES)]


def _selected(only: str | None) -> list[Suite]:
    pats = _patterns(only)
    return [s for s in SUITES if not pats or any(fnmatch.fnmatch(s.name, p) for p in pats)]


_NO_MODULE = re.compile(r"\s*(?:ModuleNotFoundError|ImportError): No module named '([^']+)'")


def _last_line(text: str) -> str:
    return next((line for line in reversed(text.splitlines()) if line.strip()), "")


def _missing_peer(text: str, allowed: set[str]) -> str | None:
    """The peer whose absence ended the script: the log's last line (the traceback's exception) names a missing
    module that the suite declares as a peer. A "No module named" elsewhere in the log (a message, a caught
    import) or a missing core dependency (yaml, medfast._C) is a failure, not a skip."""
    gone = _NO_MODULE.match(_last_line(text))
    return gone.group(1) if gone and gone.group(1).split(".")[0] in allowed else None


_IMPORT_FAILURE = re.compile(r"\s*(?:[\w.]+\.)?(?:ImportError|ModuleNotFoundError)\b")


def _unimportable_peer(text: str, peers: tuple[str, ...], cwd: Path) -> str | None:
    """The skip reason when the script ended with the import error of a declared peer that is installed but cannot
    be imported (a MONAI built for another torch): ``import <peer>`` alone ends with the same last line. Else None
    (the suite failed). Checked only after such a failure: each check is a Python start."""
    last = _last_line(text).strip()
    if not _IMPORT_FAILURE.match(last):
        return None
    for peer in peers:
        if importlib.util.find_spec(peer) is None:
            continue  # not installed: _missing_peer's case
        try:
            probe = subprocess.run([sys.executable, "-c", f"import {peer}"], cwd=cwd, capture_output=True, text=True,
                                   timeout=300)
        except subprocess.TimeoutExpired:
            continue
        if probe.returncode != 0 and _last_line(probe.stderr).strip() == last:
            return f"peer could not be imported: {peer} ({last})"
    return None


def _raise_terminated(signum, frame):
    # as Ctrl-C: the running suite stopped, the finished suites' reports written, the work folder removed
    raise Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` inside the block. Main thread only, and only over the default action (it
    killed this process and left the running suite orphaned): a caller's own handler or an ignored SIGTERM stays."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _signal_name(exc: BaseException | None) -> str:
    return "SIGTERM" if isinstance(exc, Terminated) else "SIGINT"


def _how(signame: str) -> str:
    """How the report and the messages name a stop."""
    return "Ctrl-C" if signame == "SIGINT" else signame


def _stop_suite(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Stops a suite started in its own session, with the workers it started: SIGTERM to its process group, then
    SIGKILL to what is left of the group once the script has ended or after ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):  # (none left: the group is gone)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _run_one(suite: Suite, device: str, quick: bool, log_dir: Path, where: Path,
             progress: Callable[[str], None], rows: list[Row]) -> dict:
    if device not in suite.devices:
        return {"status": "skipped", "reason": f"no {device} variant (runs on {suite.devices})"}
    missing = _missing(suite.needs(device))
    if missing:
        progress(f"{suite.name}: skipped (peer not installed: {', '.join(missing)})")
        return {"status": "skipped", "reason": f"peer not installed: {', '.join(missing)}"}
    absent = [f for f in suite.files if not (where.parent / f).is_file()]
    if absent:
        why = f"{', '.join(absent)} not here (a source checkout has it; an installed medfast does not)"
        progress(f"{suite.name}: skipped ({why})")
        return {"status": "skipped", "reason": why}
    out = log_dir / suite.name
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.txt"
    cmd = [sys.executable, str(where / suite.script), *suite.args(device, quick, out)]
    progress(f"{suite.name}: running {' '.join(cmd[1:])}")
    start = time.perf_counter()
    proc = None
    try:
        with open(log_path, "w") as log:
            # In its own session, so that a stop reaches the suite's workers too (_stop_suite: its process group);
            # a stop while it starts lands once it can be stopped (a Popen cut short left the child running).
            with signals_deferred():
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=where.parent,
                                        start_new_session=True)
            rc = proc.wait()
    except BaseException as exc:  # Ctrl-C, SIGTERM (Terminated), a caller's own stop: no suite may outlive it
        if proc is not None:
            with signals_deferred(deliver=False):  # a second Ctrl-C must not cut the stopping short
                _stop_suite(proc)
        if isinstance(exc, KeyboardInterrupt):
            raise _Interrupted(log_path, time.perf_counter() - start, _signal_name(exc)) from None
        raise
    seconds = time.perf_counter() - start
    text = log_path.read_text(errors="replace")
    if rc != 0:
        peers = suite.needs(device) + suite.optional
        gone = _missing_peer(text, set(peers))
        if gone:
            progress(f"{suite.name}: skipped (peer not installed: {gone})")
            return {"status": "skipped", "reason": f"peer not installed: {gone}", "seconds": round(seconds, 1)}
        broken = _unimportable_peer(text, peers, where.parent)
        if broken:  # as a missing peer, with the import's error (and the log)
            progress(f"{suite.name}: skipped ({broken})")
            return {"status": "skipped", "reason": broken, "seconds": round(seconds, 1), "log": str(log_path)}
        # a string always, and never empty: an empty reason read like an empty successful run in the Markdown
        last = _last_line(text).strip()
        reason = last or f"exit code {rc}"
        progress(f"{suite.name}: failed ({reason})")
        return {"status": "failed", "reason": reason, "seconds": round(seconds, 1), "log": str(log_path)}
    try:
        got = suite.collect(out, device)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        progress(f"{suite.name}: failed (unreadable results: {exc})")
        return {"status": "failed", "reason": f"unreadable results: {exc}", "seconds": round(seconds, 1),
                "log": str(log_path)}
    rows.extend(got)
    progress(f"{suite.name}: ok, {len(got)} comparisons in {seconds:.0f} s")
    return {"status": "ok", "rows": len(got), "seconds": round(seconds, 1)}


class _Interrupted(Exception):
    def __init__(self, log: Path | None = None, seconds: float | None = None, signame: str = "SIGINT"):
        super().__init__("interrupted")
        self.log, self.seconds, self.signame = log, seconds, signame


def run_suites(device: str, quick: bool, only: str | None, log_dir: Path,
               progress: Callable[[str], None] = print) -> tuple[dict, list[Row]]:
    """Runs the selected suites one after another; returns ({suite: status}, rows). Ctrl-C or SIGTERM stops the
    run: the running suite's processes are stopped, the suite it hit (its ``signal`` noted) and the ones after it
    are marked "interrupted", the finished ones are returned as they are."""
    where = benchmarks_dir()
    # the scripts run in another working directory: a relative work folder must mean the caller's
    log_dir = Path(log_dir).expanduser().resolve()
    status, rows = {}, []
    selected = _selected(only)
    with _sigterm_as_interrupt():
        for i, suite in enumerate(selected):
            done = len(rows)
            try:
                status[suite.name] = _run_one(suite, device, quick, log_dir, where, progress, rows)
            except (KeyboardInterrupt, _Interrupted) as exc:
                del rows[done:]  # an interrupted suite reports no rows, even if it got as far as reading them
                signame = exc.signame if isinstance(exc, _Interrupted) else _signal_name(exc)
                how = _how(signame)
                cur = {"status": "interrupted", "reason": f"interrupted ({how}) while it ran", "signal": signame}
                if isinstance(exc, _Interrupted) and exc.log is not None:
                    cur.update(seconds=round(exc.seconds, 1), log=str(exc.log))
                status[suite.name] = cur
                for rest in selected[i + 1:]:
                    status[rest.name] = {"status": "interrupted",
                                         "reason": "not run (the run was interrupted before it)"}
                progress(f"{suite.name}: interrupted ({how}); not run: "
                         f"{', '.join(r.name for r in selected[i + 1:]) or '-'}")
                break
    return status, rows


# ---- reports -------------------------------------------------------------------------------------------

# what makes two runs' rows comparable: results from another host, thread count, torch or size mode must not stand
# under one header (nor replace full-size rows with quick ones) in bench_<device>_latest
COMPARABLE = ("host", "quick", "torch", "threads")
_RUN_KEYS = ("host", "device", "device_name", "date", "torch", "medfast", "threads", "quick", "python")


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _suite_meta(entry: dict, report_meta: dict) -> dict:
    """The meta of the run a suite's rows come from. Reports written before suites carried their own take the
    report's, dated by the suite's ``from``."""
    if entry.get("meta"):
        return entry["meta"]
    return {**{k: report_meta.get(k) for k in _RUN_KEYS}, "date": entry.get("from", report_meta.get("date"))}


def _run_label(m: dict) -> str:
    return (f"{m.get('date')} ({m.get('host')}, torch {m.get('torch')}, medfast {m.get('medfast')}, "
            f"{m.get('threads')} threads, {'quick' if m.get('quick') else 'full'} sizes)")


def _detail(s: dict) -> str:
    # by status: a failed suite with no message must not read like an ok run with 0 comparisons
    detail = (f"{s.get('rows', 0)} comparisons, {s.get('seconds') or 0:.0f} s" if s["status"] == "ok"
              else str(s.get("reason") or s["status"]))
    if s.get("log"):
        detail += f" (log: {Path(s['log']).name})"
    if s.get("from"):
        detail += f" (from the run of {s['from']})"
    if s.get("rerun"):
        r = s["rerun"]
        detail += f"; its rerun of {r['date']} {r['status']} ({r.get('reason') or '-'}): these rows kept"
    return detail


def markdown(meta: dict, status: dict, rows: list[Row]) -> str:
    runs = sorted({str(_suite_meta(s, meta).get("date")) for s in status.values()})
    lines = [f"# medfast bench: {meta['device_name']} ({meta['host']}, {meta['date']})", "",
             f"torch {meta['torch']}, medfast {meta['medfast']}, {meta['threads']} CPU threads"
             + (", quick sizes" if meta["quick"] else ""), ""]
    if len(runs) > 1:
        lines += [f"The suites come from {len(runs)} runs ({', '.join(runs)}) of the same host, torch, thread count "
                  "and sizes: the status table gives each suite's run.", ""]
    lines += ["Ratio = peer time / medfast time (> 1: medfast is faster). Peak: memory in MiB above the inputs during "
              "a call (CPU: resident growth, GPU: allocator). Target: what a row "
              "must meet where the issues set one (met?: yes / no / n/a where a side did not run). #: the row's "
              "number in the chart.", "",
              "| # | suite | case | peer | medfast ms | peer ms | ratio | medfast peak | peer peak | target | met? |",
              "|---:|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for i, r in enumerate(rows, 1):
        cells = [str(i), r.suite, r.case, r.peer, _fmt(r.medfast_ms, ".2f"), _fmt(r.peer_ms, ".2f"),
                 "-" if r.ratio is None else f"{r.ratio:.2f}x", _fmt(r.medfast_peak_mib, ".0f"),
                 _fmt(r.peer_peak_mib, ".0f"), r.target, r.met]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| suite | status | run | detail |", "|---|---|---|---|"]
    for name, s in status.items():
        lines.append(f"| {name} | {s['status']} | {_run_label(_suite_meta(s, meta))} | {_detail(s)} |")
    return "\n".join(lines) + "\n"


def _short(text: str, n: int) -> str:
    """A chart label's part: without its parentheses (the Markdown has the full text), at most ``n`` characters."""
    while True:
        shorter = re.sub(r"\s*\([^()]*\)", "", text)
        if shorter == text:
            break
        text = shorter
    text = re.sub(r"\s+", " ", text).strip(" ,:;")
    return text if len(text) <= n else text[: n - 1].rstrip() + "…"


def chart_label(number: int, r: Row) -> str:
    """``#<Markdown row> suite: case vs peer``, short: 176-character labels left the bars 47 px of 1000."""
    vs = "" if f"vs {r.peer}".lower() in r.case.lower() else f" vs {_short(r.peer, 18)}"
    return f"#{number} {r.suite}: {_short(r.case, 40)}{vs}"


def _ratio_cap(ratios: list[float], extrapolated: list[bool]) -> float:
    """Where the ratio axis ends: the measured ratios' range, a lone far outlier clipped (8x the 90th percentile);
    an extrapolated row (pymust's 11,561x) never stretches the axis."""
    measured = sorted(x for x, e in zip(ratios, extrapolated) if not e) or sorted(ratios)
    q90 = measured[int(0.9 * (len(measured) - 1))]
    return max(1.0, min(measured[-1], 8 * q90)) * 1.15


def plot(meta: dict, rows: list[Row], path: Path, status: dict | None = None) -> bool:
    """The chart as a PNG at ``path``: the speed ratios (log scale, value on each bar) and, where a row has them,
    medfast's and the peer's peak memory. False (and no file: an older chart there is removed, so that it cannot
    stand beside a report it does not show) when no row has a ratio."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures are left alone
    from matplotlib.patches import Patch

    shown = [(i, r) for i, r in enumerate(rows, 1) if r.ratio]
    if not shown:
        path.unlink(missing_ok=True)
        return False
    ratios = [r.ratio for _, r in shown]
    extrapolated = ["extrapolat" in f"{r.case} {r.peer}".lower() for _, r in shown]
    cap = _ratio_cap(ratios, extrapolated)
    lo = min(0.5, min(ratios) / 1.6)
    has_mem = any(r.medfast_peak_mib is not None or r.peer_peak_mib is not None for _, r in shown)
    suites = list(dict.fromkeys(r.suite for _, r in shown))  # colours only: each label starts with its suite
    colors = {s: matplotlib.colormaps["tab10"](i % 10) for i, s in enumerate(suites)}
    n = len(shown)
    fig = Figure(figsize=(18 if has_mem else 12, 0.24 * n + 2.2))
    axes = fig.subplots(1, 2 if has_mem else 1, sharey=True, squeeze=False,
                        gridspec_kw={"width_ratios": [1.5, 1] if has_mem else [1]})
    ax = axes[0][0]
    y = list(range(n))
    # bars grow from the 1x line: leftwards for a slower medfast (a log axis has no zero to start from)
    bars = ax.barh(y, [min(x, cap) - 1 for x in ratios], left=1, height=0.7, color=[colors[r.suite] for _, r in shown])
    for bar, x in zip(bars, ratios):
        if x > cap:
            bar.set_hatch("//")
    for yi, x, e in zip(y, ratios, extrapolated):
        text = f"{x:.2f}x" if x < 10 else f"{x:,.1f}x" if x < 1000 else f"{x:,.0f}x"
        if x > cap:
            ax.text(cap / 1.04, yi, f"{text}{' (extrapolated)' if e else ''}, clipped", va="center", ha="right",
                    fontsize=6.5, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
        elif x >= 1:
            ax.text(x * 1.04, yi, text + (" (extrapolated)" if e else ""), va="center", ha="left", fontsize=6.5)
        else:
            ax.text(x / 1.04, yi, text, va="center", ha="right", fontsize=6.5)
    ax.set_xscale("log")
    ax.set_xlim(lo, cap * 2.2)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(y, [chart_label(i, r) for i, r in shown], fontsize=7)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlabel("speed ratio: peer time / medfast time (log scale; > 1: medfast faster)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", which="major", color="0.85", lw=0.5)
    ax.set_axisbelow(True)
    for k in range(1, n):  # a thin line between suites
        if shown[k][1].suite != shown[k - 1][1].suite:
            for a in axes[0]:
                a.axhline(k - 0.5, color="0.7", lw=0.5)
    if has_mem:
        mx = axes[0][1]
        mems = [v for _, r in shown for v in (r.medfast_peak_mib, r.peer_peak_mib) if v is not None and v > 0]
        floor = min(mems) / 2 if mems else 0.5
        for key, color, dy in (("medfast_peak_mib", "tab:blue", -0.19), ("peer_peak_mib", "0.6", 0.19)):
            for yi, (_, r) in zip(y, shown):
                v = getattr(r, key)
                if v is None:
                    continue
                if v > 0:
                    mx.barh(yi + dy, v - floor, left=floor, height=0.36, color=color)
                mx.text(max(v, floor) * 1.05, yi + dy, f"{v:.0f}", va="center", ha="left", fontsize=5.5)
        for yi, (_, r) in zip(y, shown):
            if r.medfast_peak_mib is None and r.peer_peak_mib is None:
                mx.text(floor * 1.1, yi, "no peak recorded", va="center", ha="left", fontsize=5.5, color="0.5")
        mx.set_xscale("log")
        mx.set_xlim(floor, (max(mems) if mems else 1.0) * 3)
        mx.set_xlabel("peak memory above the inputs, MiB (log scale)", fontsize=8)
        mx.tick_params(axis="x", labelsize=7)
        mx.tick_params(axis="y", left=False)
        mx.grid(axis="x", which="major", color="0.85", lw=0.5)
        mx.set_axisbelow(True)
        mx.legend(handles=[Patch(color="tab:blue", label="medfast"), Patch(color="0.6", label="peer")], fontsize=7,
                  loc="best", framealpha=0.9)
    runs = sorted({str(_suite_meta(s, meta).get("date")) for s in (status or {}).values()}) or [meta["date"]]
    fig.suptitle(f"medfast bench, {meta['device_name']}, {meta['host']}, {meta['threads']} threads, "
                 f"{'quick' if meta['quick'] else 'full'} sizes; run{'s' if len(runs) > 1 else ''} "
                 f"{', '.join(runs)} (#: row of the Markdown report, which has the full case text)", fontsize=9,
                 y=1.0, va="bottom")  # above the axes: savefig's tight box takes it in
    fig.tight_layout()
    with replacing(path) as tmp:  # whole or not at all: a stop while it renders leaves the previous chart
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    return True


def _meta(device: str, quick: bool) -> dict:
    import medfast

    name = torch.cuda.get_device_name(0) if device == "cuda" else (platform.processor() or platform.machine())
    return {"host": platform.node() or "host", "device": device, "device_name": f"{device}: {name}",
            "date": _dt.datetime.now().strftime("%Y%m%d-%H%M%S"), "torch": torch.__version__,
            "medfast": medfast.__version__, "threads": torch.get_num_threads(), "quick": quick,
            "python": sys.version.split()[0]}


def _differs(a: dict, b: dict) -> list[str]:
    return [k for k in COMPARABLE if a.get(k) != b.get(k)]


def _stderr(msg: str) -> None:
    print(f"medfast bench: {msg}", file=sys.stderr)


#: the fields a report's row must have (the others have defaults)
_ROW_NEEDS = tuple(f.name for f in dataclasses.fields(Row) if f.default is dataclasses.MISSING)
_JSON_TYPES = {type(None): "null", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean"}


def _not_a_report(data: object) -> str | None:
    """Why parsed JSON is not a medfast bench report (what the merge reads of one), else None."""
    if not isinstance(data, dict):
        return f"{_JSON_TYPES.get(type(data), type(data).__name__)}, not an object"
    if not isinstance(data.get("meta", {}), dict):
        return '"meta" is not an object'
    suites = data.get("suites")
    if not isinstance(suites, dict):
        return 'no "suites" object'
    for name, s in suites.items():
        if not isinstance(s, dict) or not isinstance(s.get("status"), str) or not isinstance(s.get("meta") or {}, dict):
            return f'suite {name!r} has no "status" (or is not an object)'
    rows = data.get("rows", [])
    if not isinstance(rows, list) or not all(isinstance(r, dict) and all(k in r for k in _ROW_NEEDS) for r in rows):
        return f'"rows" is not a list of rows with {", ".join(_ROW_NEEDS)}'
    return None


def _with_earlier_suites(latest: Path, meta: dict, status: dict, rows: list[Row],
                         say: Callable[[str], None] = _stderr) -> tuple[dict, list[Row], str | None]:
    """This run's suites plus, from the previous latest report of the same device, the suites this run did not
    touch (an ``--only`` run refreshes its suites without dropping the others) and those whose rerun gave no
    results (peer now missing, failed, interrupted): their earlier rows stay, marked with their run's date.

    Returns (status, rows, None), or (status, rows, why) when the latest report must be left as it is: an earlier
    suite would stay beside this run's but comes from another host / torch / thread count / size mode (or this
    quick run would replace full-size rows). A run that reruns every earlier suite replaces the latest. A latest
    file that is no report (unreadable JSON, ``null``, no suites) counts as none, and ``say`` tells so."""
    try:
        prev = json.loads(latest.read_text())
        why = _not_a_report(prev)
    except OSError:
        return status, rows, None
    except ValueError as exc:
        why = f"not readable JSON: {exc}"
    if why:  # (it ended the run with a traceback, and this run's reports with it)
        say(f"{latest} is not a medfast bench report ({why}): ignored, this run's report replaces it")
        return status, rows, None
    prev_meta = prev.get("meta", {})
    if prev_meta.get("device") != meta["device"]:
        return status, rows, None
    earlier = {name: {**s, "meta": _suite_meta(s, prev_meta)} for name, s in prev.get("suites", {}).items()}
    keep = {name for name, s in earlier.items()
            if name not in status or (status[name]["status"] != "ok" and s["status"] == "ok")}
    other = {name: _differs(s["meta"], meta) for name, s in earlier.items()}
    other = {name: keys for name, keys in other.items() if keys}
    if other:
        quick_over_full = meta["quick"] and any(not s["meta"].get("quick") for s in earlier.values())
        if not keep and not quick_over_full:
            return status, rows, None
        name = next(iter(other))
        diff = "; ".join(f"{k} {earlier[name]['meta'].get(k)!r} there, {meta.get(k)!r} here" for k in other[name])
        why = (f"{latest.stem}.* left as they are: its suites {', '.join(other)} come from another setup ({diff}), "
               + ("and a quick run does not replace full-size results" if quick_over_full and not keep
                  else "and would stand beside this run's under one header")
               + ". This run is in its dated report only (another --out starts a new latest).")
        return status, rows, why
    order = {s.name: i for i, s in enumerate(SUITES)}
    merged = {}
    for name in keep:
        entry = {**earlier[name], "from": earlier[name].get("from") or earlier[name]["meta"].get("date")}
        if name in status:
            new = status[name]
            entry["rerun"] = {"date": meta["date"], "status": new["status"], "reason": new.get("reason", ""),
                              **({"log": new["log"]} if new.get("log") else {})}
        merged[name] = entry
    merged.update({name: s for name, s in status.items() if name not in keep})
    fields = {f.name for f in dataclasses.fields(Row)}
    old_rows = [Row(**{k: v for k, v in r.items() if k in fields})
                for r in prev.get("rows", []) if r.get("suite") in keep]
    merged = dict(sorted(merged.items(), key=lambda kv: order.get(kv[0], len(order))))
    return merged, sorted(old_rows + rows, key=lambda r: order.get(r.suite, len(order))), None


def write_reports(out: Path, meta: dict, status: dict, rows: list[Row],
                  say: Callable[[str], None] = _stderr) -> list[Path]:
    """The dated report holds this run only; ``bench_<device>_latest`` also keeps the suites it did not run (when
    their runs are comparable, else it is left as it is and ``say`` tells why). Every suite carries the meta of
    its run; failed suites' logs are copied beside the reports (the work folder is temporary).

    Each file is replaced whole (written under a temporary name, then renamed), a report's JSON last, the dated
    report before the latest, and Ctrl-C / SIGTERM take effect once all are written: a stop here left a latest
    JSON and Markdown of this run beside the previous run's chart."""
    with signals_deferred():
        return _write_reports(out, meta, status, rows, say)


def _write_text(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def _write_report(out: Path, name: str, meta: dict, status: dict, rows: list[Row]) -> list[Path]:
    """``out/name.{png,md,json}``: the JSON, the file that readers and the next run's merge trust, is replaced last."""
    chart = plot(meta, rows, out / f"{name}.png", status)
    _write_text(out / f"{name}.md", markdown(meta, status, rows))
    report = {"meta": meta, "suites": status, "rows": [dataclasses.asdict(r) for r in rows]}
    _write_text(out / f"{name}.json", json.dumps(report, indent=1) + "\n")
    return [out / f"{name}.{ext}" for ext in ("json", "md", "png") if ext != "png" or chart]


def _write_reports(out: Path, meta: dict, status: dict, rows: list[Row], say: Callable[[str], None]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{meta['device']}_{re.sub(r'[^A-Za-z0-9_.-]', '_', meta['host'])}_{meta['date']}"
    latest = f"bench_{meta['device']}_latest"
    run_meta = {k: meta.get(k) for k in _RUN_KEYS}
    status = {name: {**s, "meta": s.get("meta") or run_meta} for name, s in status.items()}
    for name, s in status.items():
        log = Path(s["log"]) if s.get("log") else None
        if log is not None and log.is_file():
            copy = out / f"{stem}_{name}.log"
            if log.resolve() != copy.resolve():
                shutil.copyfile(log, copy)
            s["log"] = str(copy)
    paths = [Path(s["log"]) for s in status.values() if s.get("log") and Path(s["log"]).parent == out]
    # this run's report first: a latest that cannot be merged must not cost it
    paths += _write_report(out, stem, meta, status, rows)
    st, rw, refused = _with_earlier_suites(out / f"{latest}.json", meta, status, rows, say)
    if refused:
        say(refused)
    else:
        paths += _write_report(out, latest, meta, st, rw)
    return paths


def replot(report: Path) -> int:
    """``--replot JSON``: the Markdown and the PNG of a report rendered again beside it, from its JSON (after a
    change of the report layout; no suite runs)."""
    fields = {f.name for f in dataclasses.fields(Row)}
    try:
        data = json.loads(report.read_text())
        meta, status = data["meta"], data["suites"]
        rows = [Row(**{k: v for k, v in r.items() if k in fields}) for r in data["rows"]]
        md, png = report.with_suffix(".md"), report.with_suffix(".png")
        _write_text(md, markdown(meta, status, rows))
        chart = plot(meta, rows, png, status)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _stderr(f"--replot {report}: not a readable medfast bench report, or its folder is not writable ({exc})")
        return 2
    print(f"wrote {md}" + (f", {png}" if chart else ""))
    return 0


def _unwritable(out: Path) -> str | None:
    """Why the reports could not be written to ``out`` (checked before tens of minutes of suites), else None."""
    if out.exists() and not out.is_dir():
        return "exists and is not a folder"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        return f"is not a writable folder ({exc.strerror or exc})"
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="smaller volumes and fewer repeats (minutes, not tens)")
    p.add_argument("--only", metavar="PATTERN", help="comma-separated suite names or globs, e.g. 'warp,loss'")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the reports")
    p.add_argument("--list", action="store_true", help="list the suites and exit")
    p.add_argument("--replot", metavar="JSON", type=Path,
                   help="render the Markdown and PNG of a report JSON again, beside it, and exit (no suite runs)")


def main(args: argparse.Namespace) -> int:
    """Runs ``medfast bench`` with arguments parsed by a parser :func:`add_arguments` set up (``device``,
    ``quick``, ``only``, ``out``, ``list``, ``replot``): the selected suites, then the JSON, Markdown and PNG
    reports in ``args.out``. Returns the exit status: 0, 1 when a suite failed, 2 for a usage error (nothing
    run), 130 when interrupted by Ctrl-C (SIGINT), 143 by SIGTERM (the reports of the finished suites written).

    From Python: ``medfast.bench.main(argparse.Namespace(device="cpu", quick=True, only="warp",
    out=Path("results"), list=False, replot=None))``, or :func:`run_suites` for the rows without reports.
    """
    if args.list:
        for s in SUITES:
            by_device = {d: ", ".join(s.needs(d)) or "-" for d in s.devices}
            peers = (f"needs: {by_device[s.devices[0]]}" if len(set(by_device.values())) == 1
                     else "; ".join(f"needs on {d}: {p}" for d, p in by_device.items()))
            optional = f"; optional peers: {', '.join(s.optional)}" if s.optional else ""
            print(f"{s.name:14s} {s.script:26s} devices: {', '.join(s.devices)}; {peers}{optional}")
        return 0
    if getattr(args, "replot", None) is not None:
        return replot(args.replot)
    if args.device == "cuda" and not torch.cuda.is_available():
        _stderr("--device cuda but no GPU is visible")
        return 2
    if args.only is not None and not _patterns(args.only):
        # an empty pattern (an unset shell variable) must not mean "every suite" (tens of minutes)
        _stderr(f"--only needs suite names or globs, got {args.only!r} (see --list)")
        return 2
    unknown = unmatched_patterns(args.only)
    if unknown:  # a typo in one pattern must not silently drop its suite from the run
        _stderr(f"--only {', '.join(repr(p) for p in unknown)} matches no suite; the suites: "
                f"{', '.join(s.name for s in SUITES)}")
        return 2
    why = _unwritable(args.out)
    if why:
        _stderr(f"--out {args.out} {why}: nothing run")
        return 2
    meta = _meta(args.device, args.quick)
    notes: list[str] = []
    paths: list[Path] | None = None
    stop: KeyboardInterrupt | None = None  # a Ctrl-C / SIGTERM outside the suites (run_suites handles theirs)
    # SIGTERM as Ctrl-C: it killed this process alone, leaving the suite running and the work folder behind
    with _sigterm_as_interrupt():
        try:
            with tempfile.TemporaryDirectory(prefix="medfast-bench-") as tmp:
                work = os.environ.get("MEDFAST_BENCH_WORK")
                log_dir = Path(work).expanduser().resolve() if work else Path(tmp)
                status, rows = run_suites(args.device, args.quick, args.only, log_dir,
                                          progress=lambda msg: print(f"[medfast bench] {msg}", flush=True))
                if not status:
                    _stderr(f"no suite matches --only {args.only!r}")
                    return 2
                # inside the work folder's lifetime: the failed suites' logs are copied from it. A stop that
                # write_reports holds off lands here, once ``paths`` is set.
                with signals_deferred():
                    paths = write_reports(args.out, meta, status, rows, say=notes.append)
        except KeyboardInterrupt as exc:
            stop = exc
    if paths is None:
        _stderr(f"interrupted ({_how(_signal_name(stop))}) before the reports were written")
        return _interrupted_exit([_signal_name(stop)])
    latest = f"bench_{meta['device']}_latest"
    print(next(p for p in paths if p.suffix == ".md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths if not p.stem.startswith(latest)))
    for note in notes:
        _stderr(note)
    signals = [s["signal"] for s in status.values() if s.get("signal")]
    if stop is not None:
        _stderr(f"interrupted ({_how(_signal_name(stop))}): it took effect once the reports were written")
        return _interrupted_exit(signals + [_signal_name(stop)])
    if any(s["status"] == "interrupted" for s in status.values()):
        _stderr("interrupted: the reports hold the suites that finished")
        return _interrupted_exit(signals)
    return 1 if any(s["status"] == "failed" for s in status.values()) else 0


def _interrupted_exit(signals: list[str]) -> int:
    """128 + the signal's number, as a shell reports a process that a signal ended: 143 for SIGTERM, else 130."""
    return 128 + int(signal.SIGTERM if "SIGTERM" in signals else signal.SIGINT)
