"""Dice+CE forward+backward: medfast against MONAI DiceCELoss and a plain PyTorch softmax + one-hot
implementation, same run; each measurement in a fresh process for its peak memory.

    python benchmarks/bench_loss.py [--size 128] [--classes 4 16 64] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

IMPLS = ("medfast", "monai", "torch")


def _loss_fn(impl: str):
    import torch.nn.functional as F

    if impl == "medfast":
        from medfast.losses import DiceCELoss

        return DiceCELoss()
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


def worker(impl: str, size: int, classes: int, repeats: int) -> dict:
    import torch

    torch.manual_seed(0)
    logits = torch.randn(1, classes, size, size, size, requires_grad=True)
    target = torch.randint(0, classes, (1, 1, size, size, size))
    fn = _loss_fn(impl)
    before = _rss_mib("VmRSS")  # inputs (and torch) only

    def step():
        logits.grad = None
        fn(logits, target).backward()

    step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB, all of the process
    return {"ms": sorted(times)[len(times) // 2] * 1e3, "peak_rss_mib": peak,
            "extra_peak_mib": peak - before, "logits_mib": logits.numel() * 4 / 2**20}


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--classes", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        impl, size, classes, repeats = args.worker
        print(json.dumps(worker(impl, int(size), int(classes), int(repeats))))
        return
    # Baseline: a process that only creates the inputs and the gradient (what every loss must hold).
    rows = []
    for classes in args.classes:
        res = {}
        for impl in IMPLS:
            cmd = [sys.executable, __file__, "--worker", impl, str(args.size), str(classes), str(args.repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res[impl] = json.loads(out.strip().splitlines()[-1])
        row = {"classes": classes, "size": args.size, **{f"{k}_{m}": v[m] for k, v in res.items() for m in v}}
        row["ratio_vs_monai"] = res["monai"]["ms"] / res["medfast"]["ms"]
        row["ratio_vs_torch"] = res["torch"]["ms"] / res["medfast"]["ms"]
        rows.append(row)
        print(
            f"C={classes:3d}  medfast {res['medfast']['ms']:8.1f} ms  monai {res['monai']['ms']:8.1f} ms "
            f"({row['ratio_vs_monai']:.1f}x)  torch {res['torch']['ms']:8.1f} ms ({row['ratio_vs_torch']:.1f}x)  "
            f"extra peak MiB (above inputs) medfast {res['medfast']['extra_peak_mib']:.0f} / "
            f"monai {res['monai']['extra_peak_mib']:.0f} / torch {res['torch']['extra_peak_mib']:.0f} "
            f"(logits {res['medfast']['logits_mib']:.0f})",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loss_cpu_latest.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
