"""Dice+CE forward+backward: medfast against MONAI DiceCELoss and a plain PyTorch softmax + one-hot
implementation, same run.

    python benchmarks/bench_loss.py [--device cpu] [--size 128] [--classes 4 16 64] [--out benchmarks/results]
    python benchmarks/bench_loss.py --device cuda [--batch 2] [--dtypes float32 bfloat16] [--repeats 20]

CPU (default B = 1, float32 logits): each measurement runs in a fresh process; time = median wall time of
``--repeats`` calls after one warm-up, extra peak = peak RSS minus the RSS after the inputs are made.

CUDA (default B = 2, float32 and bfloat16 logits): all measurements in this process, one after another;
time = median of ``--repeats`` CUDA-event-timed calls after ``--warmup`` untimed ones, extra peak =
``torch.cuda.max_memory_allocated`` over the warm-up calls minus what was allocated once the inputs were
made (the logits' gradient counts as extra, as on CPU). Target (the issue's, on a GPU): medfast at least
3x faster than MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` with no more extra peak memory.

Writes ``loss_<device>_latest.json`` under ``--out``: a list of rows, one per (classes, dtype); ratios are
peer time / medfast time (> 1: medfast is faster). A peer that is not installed, or that is installed but cannot
be imported (its error in the row), is reported as skipped.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

IMPLS = ("medfast", "monai", "torch")
# CUDA only: medfast with check_labels=False (no label-range check, so no device sync per call; a bad
# label gives a NaN loss). On the CPU a sync costs nothing, so the row would only repeat "medfast".
NOSYNC = "medfast_nosync"
REQUIRES = {"monai": "monai"}  # Python module each peer needs (missing -> skipped)
DTYPES = ("float32", "bfloat16", "float16")
TARGET_RATIO = {"cuda": 3.0}  # vs MONAI, per device; with "mem <= peer"
MEM_TOLERANCE_MIB = 1.0  # allocator / page granularity


def _loss_fn(impl: str):
    import torch.nn.functional as F

    if impl in ("medfast", NOSYNC):
        from medfast.losses import DiceCELoss

        return DiceCELoss(check_labels=impl == "medfast")
    if impl == "monai":
        from monai.losses import DiceCELoss

        return DiceCELoss(to_onehot_y=True, softmax=True)

    def plain(logits, target):  # what a user writes without a fused loss
        onehot = F.one_hot(target[:, 0], logits.shape[1]).movedim(-1, 1).to(logits.dtype)
        p = logits.softmax(1)
        dims = tuple(range(2, logits.dim()))
        dice = 1 - (2 * (p * onehot).sum(dims) + 1e-5) / (p.sum(dims) + onehot.sum(dims) + 1e-5)
        return dice.mean() + F.cross_entropy(logits, target[:, 0])

    return plain


def _inputs(size: int, classes: int, batch: int, dtype: str, device: str):
    import torch

    torch.manual_seed(0)
    shape = (batch, classes, size, size, size)
    logits = torch.randn(shape, device=device).to(getattr(torch, dtype)).requires_grad_()
    target = torch.randint(0, classes, (batch, 1, size, size, size), device=device)
    return logits, target


def check_agreement(classes: int, device: str = "cpu", size: int = 12) -> None:
    """Before timing: every implementation that runs gives the same loss and gradient as medfast on a small
    float64 case (a fast but wrong kernel must not reach the tables). Raises AssertionError naming the peer."""
    import torch

    torch.manual_seed(0)
    base = torch.randn(2, classes, size, size, size, dtype=torch.float64, device=device)
    target = torch.randint(0, classes, (2, 1, size, size, size), device=device)
    results = {}
    for impl in IMPLS:
        if missing_peer(impl):
            continue
        logits = base.clone().requires_grad_()
        fn = _loss_fn(impl)
        loss = fn(logits, target)
        loss.backward()
        results[impl] = (loss.detach(), logits.grad)
    ref_loss, ref_grad = results["medfast"]
    for impl, (loss, grad) in results.items():
        # the plain reference's smoothing differs from MONAI's / medfast's only in the 1e-5 terms
        tol = 1e-6 if impl != "torch" else 1e-4
        if not (torch.allclose(loss, ref_loss, rtol=tol, atol=tol) and torch.allclose(grad, ref_grad, rtol=tol,
                                                                                          atol=tol)):
            raise AssertionError(f"bench_loss: {impl} disagrees with medfast at C = {classes} (loss {loss.item()} vs "
                                 f"{ref_loss.item()}, max gradient difference "
                                 f"{(grad - ref_grad).abs().max().item():.3g}): not timing a different result")


def make_step(impl: str, size: int, classes: int, batch: int = 1, dtype: str = "float32", device: str = "cpu"):
    """The case this script and ``test_bench_loss.py`` (pytest-benchmark) time: the inputs on ``device`` and
    ``step()`` = the Dice+CE forward + backward of ``impl`` (medfast / monai / torch). Returns (step, logits)."""
    import torch

    logits, target = _inputs(size, classes, batch, dtype, device)
    fn = _loss_fn(impl)
    if isinstance(fn, torch.nn.Module):
        fn = fn.to(device)

    def step():
        logits.grad = None
        fn(logits, target).backward()

    return step, logits


def worker(impl: str, size: int, classes: int, repeats: int, batch: int = 1, dtype: str = "float32") -> dict:
    """CPU: one implementation in this (fresh) process, started with warp_cases.MALLOC_ENV; the extra peak is
    the resident growth of one call after a warm-up, with the logits' gradient dropped first (so it counts)."""
    import warp_cases as wc

    step, logits = make_step(impl, size, classes, batch, dtype, "cpu")
    before = _rss_mib("VmRSS")  # inputs (and torch) only
    extra = wc.cpu_extra_peak_mib(step, clear=lambda: setattr(logits, "grad", None))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB, all of the process
    return {"ms": sorted(times)[len(times) // 2] * 1e3, "peak_rss_mib": peak,
            "extra_peak_mib": extra if extra is not None else peak - before,
            "logits_mib": logits.numel() * logits.element_size() / 2**20}


def measure_cuda(impl: str, size: int, classes: int, repeats: int, batch: int, dtype: str, warmup: int = 3) -> dict:
    """CUDA: one implementation in this process; CUDA-event times, peak from torch's allocator."""
    import torch
    from cuda_timing import cuda_event_times, median

    torch.cuda.empty_cache()
    step, logits = make_step(impl, size, classes, batch, dtype, "cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()  # inputs only
    torch.cuda.reset_peak_memory_stats()
    for _ in range(max(warmup, 1)):
        step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    times = cuda_event_times(step, repeats)
    return {"ms": median(times), "min_ms": min(times), "peak_mib": peak / 2**20,
            "extra_peak_mib": (peak - base) / 2**20, "logits_mib": logits.numel() * logits.element_size() / 2**20}


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def missing_peer(impl: str) -> str | None:
    """Why ``impl`` cannot run here (its package is not installed, or cannot be imported), else None."""
    module = REQUIRES.get(impl)
    if module and importlib.util.find_spec(module) is None:
        return f"skipped: {module} is not installed"
    failure = _import_failure(module) if module else None
    return f"skipped: {module} could not be imported ({failure})" if failure else None


@functools.cache
def _import_failure(module: str) -> str | None:
    """The error of ``import module`` (once per process), else None. An installed but broken peer (a MONAI built
    for another torch: ImportError) failed the whole suite in check_agreement, medfast's rows with it."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # whatever its import raises: the peer cannot run, the others can
        return f"{type(exc).__name__}: {exc}"
    return None


# on the CPU (issue 3): at C = 16, >= 5x MONAI with extra peak memory <= 1.25x the logits' size
CPU_TARGET = {"classes": 16, "ratio": 5.0, "logits_factor": 1.25}


def target_of(device: str, classes: int | None = None) -> tuple[str, float | None]:
    """The target of the medfast-vs-MONAI rows on ``device``: (description, minimum ratio)."""
    if device == "cpu" and classes == CPU_TARGET["classes"]:
        return f">= {CPU_TARGET['ratio']:g}x, mem <= {CPU_TARGET['logits_factor']:g}x logits", CPU_TARGET["ratio"]
    ratio = TARGET_RATIO.get(device)
    return (f">= {ratio:g}x, mem <= peer", ratio) if ratio else ("", None)


def torch_itemsize(dtype: str) -> int:
    """Bytes per element of a logits dtype name ("float32", "bfloat16", ...)."""
    return {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}[dtype]


def make_row(res: dict[str, dict], device: str, size: int, classes: int, batch: int, dtype: str) -> dict:
    """One result row (the layout ``medfast.bench.runner._loss_rows`` reads)."""
    row: dict = {"classes": classes, "size": size, "batch": batch, "dtype": dtype, "device": device}
    for impl, r in res.items():
        if "status" in r:
            row[f"{impl}_status"] = r["status"]
        else:
            row.update({f"{impl}_{k}": v for k, v in r.items()})
    ours = row.get("medfast_ms")
    for peer in ("monai", "torch"):
        theirs = row.get(f"{peer}_ms")
        row[f"ratio_vs_{peer}"] = theirs / ours if theirs and ours else None
        nosync = row.get(f"{NOSYNC}_ms")
        if nosync:
            row[f"{NOSYNC}_ratio_vs_{peer}"] = theirs / nosync if theirs else None
    desc, min_ratio = target_of(device, classes)
    row["target"], row["met"] = desc, ""
    if min_ratio:
        ratio, mine, peer = row["ratio_vs_monai"], row.get("medfast_extra_peak_mib"), row.get("monai_extra_peak_mib")
        if device == "cpu":  # the bound is the logits' size, not MONAI's memory
            itemsize = torch_itemsize(dtype)
            peer = CPU_TARGET["logits_factor"] * batch * classes * size**3 * itemsize / 2**20
        if ratio is None or mine is None or peer is None:
            row["met"] = "n/a"
        else:
            row["met"] = "yes" if ratio >= min_ratio and mine <= peer + MEM_TOLERANCE_MIB else "no"
    return row


def _line(row: dict) -> str:
    def cell(impl: str) -> str:
        if f"{impl}_ms" not in row:
            return f"{impl} {row.get(f'{impl}_status', '-')}"
        ratio = "" if impl == "medfast" else f" ({row[f'ratio_vs_{impl}']:.1f}x)"
        return f"{impl} {row[f'{impl}_ms']:8.2f} ms{ratio}"

    mem = " / ".join(f"{row[f'{i}_extra_peak_mib']:.0f}" if f"{i}_extra_peak_mib" in row else "-" for i in IMPLS)
    logits = row.get("medfast_logits_mib", row.get("monai_logits_mib", float("nan")))
    met = f"  target {row['target']}: {row['met']}" if row["target"] else ""
    return (f"B={row['batch']} C={row['classes']:3d} {row['dtype']:8s}  " + "  ".join(cell(i) for i in IMPLS)
            + f"  extra peak MiB medfast / monai / torch {mem} (logits {logits:.0f}){met}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--classes", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--batch", type=int, help="batch size (default 1 on CPU, 2 on CUDA)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES,
                   help="logits dtypes (default float32 on CPU, float32 bfloat16 on CUDA)")
    p.add_argument("--repeats", type=int, help="timed calls (default 3 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int, default=3, help="CUDA: untimed calls first (also the memory probe)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = 2 if args.device == "cuda" else 1
    if args.dtypes is None:
        args.dtypes = ["float32", "bfloat16"] if args.device == "cuda" else ["float32"]
    if args.repeats is None:
        args.repeats = 20 if args.device == "cuda" else 3
    return args


def _cpu_measure(impl: str, args: argparse.Namespace, classes: int, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, str(args.size), str(classes), str(args.repeats),
           str(args.batch), dtype]
    import warp_cases as wc

    proc = subprocess.run(cmd, capture_output=True, text=True, env=wc.worker_env())
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])
        return {"status": f"error: {tail[-300:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cuda_measure(impl: str, args: argparse.Namespace, classes: int, dtype: str) -> dict:
    import gc

    import torch

    try:
        return measure_cuda(impl, args.size, classes, args.repeats, args.batch, dtype, args.warmup)
    except torch.OutOfMemoryError as exc:
        return {"status": f"out of memory: {str(exc).splitlines()[0][:200]}"}
    except Exception as exc:  # a peer's own failure is a result, not a crash of the run
        return {"status": f"error: {type(exc).__name__}: {exc}"[:300]}
    finally:  # the next measurement starts from an empty cache
        gc.collect()
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        impl, size, classes, repeats, *rest = args.worker
        batch, dtype = (int(rest[0]), rest[1]) if rest else (1, "float32")
        print(json.dumps(worker(impl, int(size), int(classes), int(repeats), batch, dtype)))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("bench_loss: --device cuda but torch sees no GPU", file=sys.stderr)
            return 2
        import medfast

        if not medfast.build_info().get("cuda_kernels"):
            print("bench_loss: medfast was built without CUDA kernels", file=sys.stderr)
            return 2
        print(f"{torch.cuda.get_device_name()}: B={args.batch} {args.size}^3, {args.repeats} CUDA-event-timed "
              f"calls after {args.warmup} warm-up calls", flush=True)
    measure = _cuda_measure if args.device == "cuda" else _cpu_measure
    impls = IMPLS + ((NOSYNC,) if args.device == "cuda" else ())
    for impl in IMPLS:
        if missing_peer(impl):
            print(f"{impl}: {missing_peer(impl)}", flush=True)
    rows = []
    for classes in args.classes:
        check_agreement(classes, args.device)
    for dtype in args.dtypes:
        for classes in args.classes:
            res = {impl: ({"status": missing_peer(impl)} if missing_peer(impl) else measure(impl, args, classes, dtype))
                   for impl in impls}
            row = make_row(res, args.device, args.size, classes, args.batch, dtype)
            rows.append(row)
            print(_line(row) + (f"  (check_labels=False: {row[f'{NOSYNC}_ms']:.2f} ms)" if f"{NOSYNC}_ms" in row
                                else ""), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"loss_{args.device}_latest.json"
    path.write_text(json.dumps(rows, indent=1))
    print(f"wrote {path}")
    return 0 if all("medfast_ms" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
