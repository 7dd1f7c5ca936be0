"""Segmentation training step (UNet forward + Dice/CE loss + backward + AdamW step): medfast's
``DiceCELoss`` against MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` on the same medfast UNet, same
run. Times come from one process that alternates the two implementations step by step (each with its own
copy of the same model and optimizer), so that the load of a shared machine hits both alike; peak memory
comes from a fresh process per implementation. Also the loss alone (forward + backward). On CUDA
(``--device cuda``) peak memory is ``torch.cuda.max_memory_allocated`` of one more call in the timing process.

    python benchmarks/bench_segmentation.py [--size 64] [--classes 4] [--device cpu] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPLS = ("medfast", "monai")


def _loss_fn(impl: str):
    if impl == "medfast":
        from medfast.losses import DiceCELoss

        return DiceCELoss()
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True)


def make_step(impl: str, what: str, size: int, classes: int, batch: int, device: str):
    """The case this script and ``test_bench_segmentation.py`` (pytest-benchmark) time: step() = one UNet
    training step (``what="step"``) or the loss forward + backward (``what="loss"``) with ``impl``'s Dice+CE."""
    import torch

    from medfast.nets import UNet

    torch.manual_seed(0)
    dev = torch.device(device)
    x = torch.randn(batch, 1, size, size, size, device=dev)
    target = torch.randint(0, classes, (batch, 1, size, size, size), device=dev)
    fn = _loss_fn(impl)
    if what == "step":
        net = UNet(3, 1, classes, channels=(16, 32, 64, 128)).to(dev)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            fn(net(x), target).backward()
            opt.step()
    else:
        logits = torch.randn(batch, classes, size, size, size, device=dev, requires_grad=True)

        def step():
            logits.grad = None
            fn(logits, target).backward()

        step.clear_grad = lambda: setattr(logits, "grad", None)  # for the memory probe: the gradient counts
    return step


def _setup(impl: str, what: str, size: int, classes: int, batch: int, device: str):
    import torch

    dev = torch.device(device)
    step = make_step(impl, what, size, classes, batch, device)

    def run():
        t = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    return run


def time_worker(what: str, size: int, classes: int, batch: int, repeats: int, device: str) -> dict:
    """Both implementations in this process, alternating; median and minimum per implementation."""
    import warp_cases as wc

    wc.malloc_steady_state()  # timing only: glibc's usual heap, not the memory probe's (MALLOC_ENV)
    runs = {impl: _setup(impl, what, size, classes, batch, device) for impl in IMPLS}
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for impl in IMPLS:  # warm-up
        runs[impl]()
    for r in range(repeats):
        order = IMPLS if r % 2 == 0 else IMPLS[::-1]
        for impl in order:
            times[impl].append(runs[impl]())
    out = {impl: {"ms": statistics.median(t) * 1e3, "min_ms": min(t) * 1e3, "ms_all": [x * 1e3 for x in t]}
           for impl, t in times.items()}
    if device.startswith("cuda"):  # the allocator's peak of one more call, here (no fresh process needed)
        import torch

        for impl in IMPLS:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            runs[impl]()
            peak = torch.cuda.max_memory_allocated()
            out[impl].update(peak_mib=peak / 2**20, extra_peak_mib=(peak - base) / 2**20)
    return out


def memory_worker(impl: str, what: str, size: int, classes: int, batch: int, device: str) -> dict:
    """Peak memory of one implementation alone in a fresh CPU process: the resident growth of one call in a worker
    started with warp_cases.MALLOC_ENV (see cpu_extra_peak_mib). On CUDA the timing worker measures it."""
    import warp_cases as wc

    step = make_step(impl, what, size, classes, batch, device)
    extra = wc.cpu_extra_peak_mib(step, getattr(step, "clear_grad", None))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mib": peak, "extra_peak_mib": extra}


def _run(args, *worker) -> dict:
    """One worker process; its duration on stderr, so a log cut off by a time limit says where the time went
    (on an H200 the quick 32^3 run did not finish in 80 s, 2026-11-28). A worker that outlives
    ``MEDFAST_BENCH_WORKER_TIMEOUT`` seconds (default 600) fails the run, naming the worker."""
    import warp_cases as wc

    cmd = [sys.executable, __file__, "--worker", *map(str, worker)]
    limit = float(os.environ.get("MEDFAST_BENCH_WORKER_TIMEOUT", "600"))
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=wc.worker_env(), timeout=limit)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"bench_segmentation: worker {' '.join(map(str, worker))} still running after "
                         f"{limit:.0f} s (MEDFAST_BENCH_WORKER_TIMEOUT)") from None
    print(f"bench_segmentation: worker {' '.join(map(str, worker))}: {time.perf_counter() - t0:.1f} s",
          file=sys.stderr, flush=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, what, title in zip(axes, ("step", "loss"), ("UNet training step", "Dice+CE loss fwd+bwd")):
        ms = [results[what][i]["ms"] for i in IMPLS]
        ax.bar(IMPLS, ms, color=["tab:blue", "tab:gray"])
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{title}\nMONAI / medfast = {ms[1] / ms[0]:.2f}x", fontsize=9)
    fig.suptitle(f"{results['device']}: batch {results['batch']}, {results['size']}^3, {results['classes']} classes",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "time":
            what, size, classes, batch, repeats, device = rest
            res = time_worker(what, int(size), int(classes), int(batch), int(repeats), device)
        else:
            impl, what, size, classes, batch, device = rest
            res = memory_worker(impl, what, int(size), int(classes), int(batch), device)
        print(json.dumps(res))
        return
    import torch

    results = {"device": args.device, "size": args.size, "classes": args.classes, "batch": args.batch,
               "repeats": args.repeats, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "load_average_before": os.getloadavg()}
    a = args
    for what in ("step", "loss"):
        r = _run(a, "time", what, a.size, a.classes, a.batch, a.repeats, a.device)
        if not a.device.startswith("cuda"):  # on CUDA the timing worker measured the memory (4 fewer processes)
            for impl in IMPLS:
                r[impl].update(_run(a, "memory", impl, what, a.size, a.classes, a.batch, a.device))
        r["monai_over_medfast"] = r["monai"]["ms"] / r["medfast"]["ms"]
        r["monai_over_medfast_min"] = r["monai"]["min_ms"] / r["medfast"]["min_ms"]
        results[what] = r
        print(f"{what}: medfast {r['medfast']['ms']:.1f} ms (min {r['medfast']['min_ms']:.1f}), MONAI "
              f"{r['monai']['ms']:.1f} ms (min {r['monai']['min_ms']:.1f}); ratio x{r['monai_over_medfast']:.2f} "
              f"(min x{r['monai_over_medfast_min']:.2f}); extra peak MiB medfast "
              f"{r['medfast']['extra_peak_mib']:.0f} / MONAI {r['monai']['extra_peak_mib']:.0f}", flush=True)
    results["load_average_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if args.device == "cpu" else "cuda"
    (args.out / f"segmentation_{tag}_latest.json").write_text(json.dumps(results, indent=2))
    _plot(results, args.out / f"segmentation_{tag}_latest.png")


if __name__ == "__main__":
    main()
