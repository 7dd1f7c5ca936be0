"""A short GPU check of medfast.warp against the grid_sample route: times (CUDA events), peak
memory and the forward pass's effective DRAM bandwidth. The full suite is run_warp.py.

    python benchmarks/gpu_quick.py --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from cuda_timing import cuda_median_ms, cuda_peak_mib

import medfast as mf
from medfast.ops._reference import grid_sample_warp


def timed(fn, repeats: int = 20) -> float:
    """Median milliseconds of fn() on the current stream."""
    return cuda_median_ms(fn, repeats, warmup=3)


def measure(image: torch.Tensor, ddf: torch.Tensor, mode: str) -> dict:
    n, channels = ddf[0, 0].numel(), image.shape[1]
    img_g, ddf_g = image.clone().requires_grad_(), ddf.clone().requires_grad_()

    def fwd():
        return mf.warp(image, ddf, mode=mode)

    def fb():
        mf.warp(img_g, ddf_g, mode=mode).sum().backward()

    row = {"medfast_fwd_ms": timed(fwd), "medfast_fwdbwd_ms": timed(fb)}
    row["medfast_fwd_peak_mib"] = cuda_peak_mib(fwd)
    row["medfast_fwdbwd_peak_mib"] = cuda_peak_mib(fb)
    # Ideal traffic of the forward: read the ddf and the image once, write the output.
    row["medfast_fwd_GBps"] = (3 * n + 2 * channels * n) * 4 / row["medfast_fwd_ms"] / 1e6
    if mode != "cubic":

        def gfwd():
            return grid_sample_warp(image, ddf, mode)

        def gfb():
            grid_sample_warp(img_g, ddf_g, mode).sum().backward()

        row["grid_sample_fwd_ms"] = timed(gfwd)
        row["grid_sample_fwdbwd_ms"] = timed(gfb)
        row["grid_sample_fwd_peak_mib"] = cuda_peak_mib(gfwd)
        row["grid_sample_fwdbwd_peak_mib"] = cuda_peak_mib(gfb)
        row["ratio_fwd"] = row["grid_sample_fwd_ms"] / row["medfast_fwd_ms"]
        row["ratio_fwdbwd"] = row["grid_sample_fwdbwd_ms"] / row["medfast_fwdbwd_ms"]
    if n <= 128**3:  # the deterministic (sort-based) image gradient is much slower: time it on 128^3
        torch.use_deterministic_algorithms(True)
        try:
            row["medfast_fwdbwd_deterministic_ms"] = timed(fb, 5)
        finally:
            torch.use_deterministic_algorithms(False)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    rows = []
    for size in (128, 256):
        for channels in (1, 4) if size == 128 else (1,):
            image = torch.rand(1, channels, size, size, size, device="cuda")
            coarse = torch.randn(1, 3, 8, 8, 8, device="cuda") * 4
            ddf = F.interpolate(coarse, size=(size,) * 3, mode="trilinear")
            for mode in ("linear", "nearest", "cubic"):
                row = {"size": size, "channels": channels, "mode": mode, **measure(image, ddf, mode)}
                rows.append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "medfast": mf.build_info()}
    (args.out / "warp_cuda_quick.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
