"""Where the GPU time of medfast.warp goes, against the grid_sample route (CUDA only).

For linear warps (128^3 with 1 and 4 channels, 256^3 with 1) it reports, per implementation:
  * ``kernels``: the CUDA time of each kernel of one forward + backward, from torch.profiler
    (GPU work only: no Python or launch overhead);
  * ``step_ms``: forward + backward as a user calls it, one call timed with CUDA events;
  * ``pipelined_ms``: the mean of 50 back-to-back calls between one pair of events (the GPU
    stays busy when the CPU side is faster than the kernels);
  * the forward's effective bandwidth (ideal traffic / kernel time).
The medfast rows come in both image-gradient scatters of the CUDA backward
(``MEDFAST_WARP_CUDA_SCATTER`` = plain, the default, or merged), and the plain one also with the flat
index split by int64 division (``MEDFAST_WARP_CUDA_INDEX=int64``) instead of FastDiv, and the forward with 32-bit
tap offsets and 1 (the default), 2 or 4 output voxels per thread (``MEDFAST_WARP_CUDA_FORWARD`` = ilp1 / ilp2 /
ilp4); "plain" and "merged" use forward_kernel (``one``), "default" sets no variable (what a user gets).

    python benchmarks/gpu_warp_profile.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from cuda_timing import cuda_median_ms
from torch.profiler import ProfilerActivity, profile

import medfast as mf
from medfast.ops._reference import grid_sample_warp


def step_fn(impl: str, image: torch.Tensor, ddf: torch.Tensor, grad: torch.Tensor):
    warp = (lambda i, d: mf.warp(i, d, mode="linear")) if impl != "grid_sample" else grid_sample_warp

    def step():
        image.grad = ddf.grad = None
        torch.autograd.backward(warp(image, ddf), grad)

    return step


def one_call_ms(step, repeats: int = 20) -> float:
    if not torch.cuda.is_available():  # --device cpu: only to check this script without a GPU
        import time

        t0 = time.perf_counter()
        step()
        return (time.perf_counter() - t0) * 1e3
    return cuda_median_ms(step, repeats)


def pipelined_ms(step, n: int = 50) -> float:
    if not torch.cuda.is_available():
        return one_call_ms(step)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def kernel_ms(step, n: int = 10) -> dict[str, float]:
    """Mean CUDA milliseconds per step of each kernel (by name, shortened)."""
    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
        if cuda:
            torch.cuda.synchronize()
    per: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        t = (getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)) if cuda else 0.0
        t = t or (0.0 if cuda else ev.self_cpu_time_total)
        if t > 0 and ev.key and not ev.key.startswith(("cudaLaunch", "cudaMemcpy", "Memcpy", "cudaStream")):
            per[ev.key[:90]] += t / 1e3 / n
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    args = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for size, channels in [(s, c) for s in args.sizes for c in ((1, 4) if s == args.sizes[0] else (1,))]:
        gen = torch.Generator(device=dev).manual_seed(0)
        image = torch.rand(1, channels, size, size, size, device=dev, generator=gen).requires_grad_()
        coarse = torch.randn(1, 3, 8, 8, 8, device=dev, generator=gen) * 4
        ddf = F.interpolate(coarse, size=(size,) * 3, mode="trilinear").contiguous().requires_grad_()
        grad = torch.randn(1, channels, size, size, size, device=dev, generator=gen)
        for impl in ("default", "merged", "plain", "plain-int64", "plain-ilp1", "plain-ilp2", "plain-ilp4",
                     "grid_sample"):
            os.environ["MEDFAST_WARP_CUDA_SCATTER"] = "merged" if impl == "merged" else "plain"
            os.environ["MEDFAST_WARP_CUDA_INDEX"] = "int64" if impl == "plain-int64" else "fast"
            os.environ["MEDFAST_WARP_CUDA_FORWARD"] = impl[len("plain-"):] if "ilp" in impl else "one"
            if impl == "default":  # what a user gets: no variable set
                for var in ("MEDFAST_WARP_CUDA_SCATTER", "MEDFAST_WARP_CUDA_INDEX", "MEDFAST_WARP_CUDA_FORWARD"):
                    os.environ.pop(var)
            step = step_fn(impl, image, ddf, grad)
            for _ in range(5):
                step()
            if dev == "cuda":
                torch.cuda.synchronize()
            kernels = kernel_ms(step)
            row = {
                "size": size,
                "channels": channels,
                "impl": impl,
                "step_ms": one_call_ms(step),
                "pipelined_ms": pipelined_ms(step),
                "kernel_total_ms": sum(kernels.values()),
                "kernels": kernels,
            }
            if impl != "grid_sample":
                fwd = {k: v for k, v in kernels.items() if "forward_kernel" in k or "forward_ilp_kernel" in k}
                if fwd:
                    n = size**3
                    row["forward_GBps"] = (3 * n + 2 * channels * n) * 4 / sum(fwd.values()) / 1e6
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                              if k != "kernels"}), flush=True)
            for k, v in list(kernels.items())[:6]:
                print(f"    {v:8.4f} ms  {k}", flush=True)
    os.environ.pop("MEDFAST_WARP_CUDA_SCATTER", None)
    os.environ.pop("MEDFAST_WARP_CUDA_INDEX", None)
    os.environ.pop("MEDFAST_WARP_CUDA_FORWARD", None)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    info = {"device": name, "torch": torch.__version__, "medfast": mf.build_info()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "warp_cuda_profile.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
