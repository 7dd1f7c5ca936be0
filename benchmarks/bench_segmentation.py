"""Segmentation training step (UNet forward + Dice/CE loss + backward + AdamW step): medfast's
``DiceCELoss`` against MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` on the same medfast UNet, same
run; each measurement in a fresh process for its peak memory. Also the loss alone (forward + backward).
On CUDA (``--device cuda``) peak memory is ``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_segmentation.py [--size 64] [--classes 4] [--device cpu] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(impl: str, what: str, size: int, classes: int, batch: int, repeats: int, device: str) -> dict:
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

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()
    step()
    sync()
    before = _rss_mib()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        extra = peak - before
    return {"ms": sorted(times)[len(times) // 2] * 1e3, "ms_all": [t * 1e3 for t in times], "peak_mib": peak,
            "extra_peak_mib": extra}


def _run(impl, what, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, what, str(args.size), str(args.classes), str(args.batch),
           str(args.repeats), args.device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
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
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        impl, what, size, classes, batch, repeats, device = args.worker
        print(json.dumps(worker(impl, what, int(size), int(classes), int(batch), int(repeats), device)))
        return
    import torch

    results = {"device": args.device, "size": args.size, "classes": args.classes, "batch": args.batch,
               "repeats": args.repeats, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "load_average_before": os.getloadavg()}
    for what in ("step", "loss"):
        results[what] = {impl: _run(impl, what, args) for impl in IMPLS}
        r = results[what]
        r["monai_over_medfast"] = r["monai"]["ms"] / r["medfast"]["ms"]
        print(f"{what}: medfast {r['medfast']['ms']:.1f} ms, MONAI {r['monai']['ms']:.1f} ms "
              f"(x{r['monai_over_medfast']:.2f}); extra peak MiB medfast {r['medfast']['extra_peak_mib']:.0f} / "
              f"MONAI {r['monai']['extra_peak_mib']:.0f}", flush=True)
    results["load_average_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if args.device == "cpu" else "cuda"
    (args.out / f"segmentation_{tag}_latest.json").write_text(json.dumps(results, indent=2))
    _plot(results, args.out / f"segmentation_{tag}_latest.png")


if __name__ == "__main__":
    main()
