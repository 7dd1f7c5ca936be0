"""Times medfast.distance_transform against its peers on one bool mask (default 128^3, 1 % background),
in the same run, and writes the results to benchmarks/results/distance_<device>_latest.json.

CPU (``--device cpu``): against scipy.ndimage.distance_transform_edt and MONAI's
monai.transforms.utils.distance_transform_edt (scipy per channel on CPU); median wall time.

CUDA (``--device cuda``): medfast on the GPU against CuPy's cupyx.scipy.ndimage.distance_transform_edt
(float32 distances, input shared with torch through DLPack, CuPy's allocations routed through torch's
allocator so that the same peak-memory statistics see both), and MONAI's when cuCIM is installed (without
it MONAI runs scipy on the CPU); scipy on the CPU as a reference. GPU times: median of CUDA-event-timed
calls after a warm-up; peak memory: torch.cuda.max_memory_allocated of one call above what was allocated
before it. A peer that is not installed, or that is installed but cannot be imported (its error given), is
reported as skipped (``"skipped"`` in the JSON).

    python benchmarks/bench_distance.py [--device cpu] [--size 128] [--background 0.01] [--repeats 11]

Ratios are peer time / medfast time (> 1: medfast is faster).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cuda_timing import cuda_median_ms, cuda_peak_mib, median
from scipy import ndimage

import medfast as mf

HERE = Path(__file__).resolve().parent
SPACING = (1.5, 1.0, 0.8)


def timed_ms(fn, repeats: int) -> float:
    """Median wall time of fn() in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def cupy_timed_ms(cp, fn, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() between CuPy events on CuPy's current stream."""
    for _ in range(warmup):
        fn()
    cp.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(repeats):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    return median(times)


def _cupy_on_torch_allocator(cp) -> None:
    """CuPy's device allocations through torch's caching allocator (the tensor owning each block lives as
    long as CuPy's pointer), so that torch.cuda.max_memory_allocated sees them."""

    def alloc(nbytes: int):
        block = torch.empty(max(nbytes, 1), dtype=torch.uint8, device="cuda")
        return cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(block.data_ptr(), nbytes, block), 0)

    cp.cuda.set_allocator(alloc)


def make_mask(n: int, background: float) -> torch.Tensor:
    """(1, n, n, n) bool, True = foreground, ``background`` of the voxels False at random (seed 0)."""
    torch.manual_seed(0)
    return torch.rand(1, n, n, n) >= background


def edt_cases(mask: torch.Tensor, device: str) -> dict[str, Callable[[], Callable[[], Any]] | str]:
    """The implementations this script and ``test_bench_distance.py`` (pytest-benchmark) time on ``mask``:
    {name: setup} where setup() prepares the peer and returns the timed call, or {name: why it is skipped}.
    CPU: medfast, scipy, monai. CUDA: medfast on the GPU, cupy, monai (needs cuCIM), scipy (CPU)."""
    mask_np = mask[0].numpy()

    def scipy_call():
        return lambda: ndimage.distance_transform_edt(mask_np, sampling=SPACING)

    if device != "cuda":
        out: dict[str, Callable[[], Callable[[], Any]] | str] = {
            "medfast": lambda: lambda: mf.distance_transform(mask, SPACING), "scipy": scipy_call}
        if importlib.util.find_spec("monai") is None:
            out["monai"] = "monai is not installed"
        else:
            def monai_cpu():
                from monai.transforms.utils import distance_transform_edt as monai_edt

                return lambda: monai_edt(mask, sampling=list(SPACING))

            out["monai"] = monai_cpu
        return out

    mask_gpu = mask.cuda()
    out = {"medfast": lambda: lambda: mf.distance_transform(mask_gpu, SPACING)}
    if importlib.util.find_spec("cupyx") is None:
        out["cupy"] = "cupy is not installed (pip install cupy-cuda12x / cupy-cuda13x)"
    else:
        def cupy_gpu():
            import cupy as cp
            from cupyx.scipy.ndimage import distance_transform_edt as cupy_edt

            _cupy_on_torch_allocator(cp)
            mask_u8 = mask_gpu[0].to(torch.uint8)  # DLPack: uint8 everywhere (bool needs a recent CuPy)
            mask_cp = cp.from_dlpack(mask_u8)  # zero-copy view of the torch tensor
            return lambda: cupy_edt(mask_cp, sampling=SPACING, float64_distances=False)

        out["cupy"] = cupy_gpu
    if importlib.util.find_spec("monai") is None:
        out["monai"] = "monai is not installed"
    elif importlib.util.find_spec("cucim") is None or importlib.util.find_spec("cupy") is None:
        out["monai"] = "MONAI's GPU distance transform needs cuCIM and CuPy; without them it runs scipy on the CPU"
    else:
        def monai_gpu():
            from monai.transforms.utils import distance_transform_edt as monai_edt

            return lambda: monai_edt(mask_gpu, sampling=list(SPACING))  # channel first

        out["monai"] = monai_gpu
    out["scipy (CPU)"] = scipy_call  # the reference a user without a GPU library has
    return out


def peer_call(name: str, setup: Callable[[], Callable[[], Any]] | str, skipped: dict[str, str]):
    """The timed call of a peer from its ``edt_cases`` entry, or None with why in ``skipped``: not installed, or
    installed but its import fails (a MONAI or CuPy built for another torch / CUDA; it was reported as "not
    installed", or ended the suite, medfast's rows with it)."""
    if isinstance(setup, str):
        skipped[name] = setup
        return None
    try:
        return setup()
    except Exception as exc:  # the peer's setup is its import (and a DLPack view): a failure there skips it alone
        skipped[name] = f"{name} could not be imported ({type(exc).__name__}: {exc})"
        print(f"{name}: skipped, {skipped[name]}", flush=True)
        return None


def run_cpu(mask: torch.Tensor, args) -> dict:
    cases = edt_cases(mask, "cpu")
    ours, scipy_edt = cases["medfast"](), cases["scipy"]()
    got = ours()
    ref = scipy_edt()
    max_err = float(np.abs(got[0].double().numpy() - ref).max())

    rows = {"medfast": timed_ms(ours, args.repeats)}
    rows["scipy"] = timed_ms(scipy_edt, args.repeats)
    skipped = {}
    monai_fn = peer_call("monai", cases["monai"], skipped)
    if monai_fn is not None:
        try:
            rows["monai"] = timed_ms(monai_fn, args.repeats)
        except ImportError as exc:  # MONAI imports its backend (scipy) at the first call
            skipped["monai"] = f"monai could not be imported ({type(exc).__name__}: {exc})"
    return {"ms": rows, "max_abs_error_vs_scipy": max_err, "skipped": skipped}


def run_cuda(mask: torch.Tensor, args) -> dict:
    cases = edt_cases(mask, "cuda")
    ref = ndimage.distance_transform_edt(mask[0].numpy(), sampling=SPACING)
    ours = cases["medfast"]()
    got = ours()
    errors = {"medfast": float(np.abs(got[0].double().cpu().numpy() - ref).max())}
    del got

    rows = {"medfast": cuda_median_ms(ours, args.repeats, warmup=3)}
    peaks = {"medfast": cuda_peak_mib(ours)}
    skipped = {}
    if isinstance(cases["cupy"], str):
        print(f"cupy: skipped, {cases['cupy']}", flush=True)
    theirs = peer_call("cupy", cases["cupy"], skipped)
    if theirs is not None:
        import cupy as cp

        errors["cupy"] = float(np.abs(cp.asnumpy(theirs()).astype(np.float64) - ref).max())
        rows["cupy"] = cupy_timed_ms(cp, theirs, args.repeats)
        peaks["cupy"] = cuda_peak_mib(theirs)
    monai_fn = peer_call("monai", cases["monai"], skipped)
    if monai_fn is not None:
        rows["monai"] = cuda_median_ms(monai_fn, args.repeats, warmup=3)
        peaks["monai"] = cuda_peak_mib(monai_fn)
    # scipy on the CPU: the reference a user without a GPU library has (fewer repeats: it is slow)
    rows["scipy (CPU)"] = timed_ms(cases["scipy (CPU)"](), max(1, min(args.repeats, 3)))
    return {"ms": rows, "peak_mib": peaks, "max_abs_error_vs_scipy": errors["medfast"],
            "max_abs_error_vs_scipy_per_impl": errors, "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--background", type=float, default=0.01, help="fraction of background voxels")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--out", type=Path, help="JSON file (default results/distance_<device>_latest.json)")
    args = parser.parse_args(argv)
    out = args.out or HERE / "results" / f"distance_{args.device}_latest.json"
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("bench_distance: --device cuda but torch sees no GPU", file=sys.stderr)
            return 2
        if not mf.build_info().get("cuda_kernels"):
            print("bench_distance: medfast was built without CUDA kernels", file=sys.stderr)
            return 2

    n = args.size
    mask = make_mask(n, args.background)  # True = foreground
    res = run_cuda(mask, args) if args.device == "cuda" else run_cpu(mask, args)
    rows = res["ms"]
    result = {
        "case": f"distance_transform {n}^3 bool mask, {args.background:g} background, spacing {SPACING}",
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "host": platform.node(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **res,
        "ratio_vs_medfast": {k: v / rows["medfast"] for k, v in rows.items() if k != "medfast"},
    }
    print(f"{result['case']} on {result['device_name']} ({result['threads']} CPU threads), "
          f"max |medfast - scipy| = {result['max_abs_error_vs_scipy']:.2e}")
    peaks = res.get("peak_mib", {})
    for name, ms in rows.items():
        ratio = "" if name == "medfast" else f"   {ms / rows['medfast']:.2f}x medfast time"
        peak = f"   peak {peaks[name]:.0f} MiB" if name in peaks else ""
        print(f"  {name:12s} {ms:9.2f} ms{ratio}{peak}")
    for name, why in res["skipped"].items():
        print(f"  {name:12s} skipped: {why}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
