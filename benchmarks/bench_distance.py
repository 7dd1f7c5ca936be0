"""Times medfast.distance_transform against scipy.ndimage.distance_transform_edt and MONAI's
monai.transforms.utils.distance_transform_edt (scipy per channel on CPU) on one 128^3 mask, in the
same run, and writes the results to benchmarks/results/distance_cpu_latest.json.

    python benchmarks/bench_distance.py [--size 128] [--background 0.01] [--repeats 5]

Ratios are peer time / medfast time (> 1: medfast is faster).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

import medfast as mf

HERE = Path(__file__).resolve().parent


def timed_ms(fn, repeats: int) -> float:
    """Median wall time of fn() in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--background", type=float, default=0.01, help="fraction of background voxels")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "distance_cpu_latest.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    n = args.size
    mask = torch.rand(1, n, n, n) >= args.background  # True = foreground
    spacing = (1.5, 1.0, 0.8)
    mask_np = mask[0].numpy()

    got = mf.distance_transform(mask, spacing)
    ref = ndimage.distance_transform_edt(mask_np, sampling=spacing)
    max_err = float(np.abs(got[0].double().numpy() - ref).max())

    rows = {"medfast": timed_ms(lambda: mf.distance_transform(mask, spacing), args.repeats)}
    rows["scipy"] = timed_ms(lambda: ndimage.distance_transform_edt(mask_np, sampling=spacing), args.repeats)
    try:
        from monai.transforms.utils import distance_transform_edt as monai_edt

        rows["monai"] = timed_ms(lambda: monai_edt(mask, sampling=list(spacing)), args.repeats)
    except ImportError:
        pass

    result = {
        "case": f"distance_transform {n}^3 bool mask, {args.background:g} background, spacing {spacing}",
        "host": platform.node(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "max_abs_error_vs_scipy": max_err,
        "ms": rows,
        "ratio_vs_medfast": {k: v / rows["medfast"] for k, v in rows.items() if k != "medfast"},
    }
    print(result["case"], f"({result['threads']} threads), max |medfast - scipy| = {max_err:.2e}")
    for name, ms in rows.items():
        ratio = "" if name == "medfast" else f"   {ms / rows['medfast']:.2f}x medfast time"
        print(f"  {name:8s} {ms:9.2f} ms{ratio}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
