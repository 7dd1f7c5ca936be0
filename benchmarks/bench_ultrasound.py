"""Ultrasound simulation speed: medfast.ultrasound against pymust ``simus`` (same probe), same run.

Frames of 256 lines x 1024 samples (C5-2v preset, 100 mm deep) from a 128^3 CT-like volume (1 mm
voxels, smooth random tissue with bone and air). Each measurement runs in a fresh process (peak
memory = its max RSS on CPU, torch.cuda.max_memory_allocated on GPU).

    python benchmarks/bench_ultrasound.py [--device cpu|cuda] [--out benchmarks/results]

pymust (a Python port of MUST, Garcia 2022) computes the RF signals of all 128 elements for one
transmit by summing over every scatterer and frequency; its cost grows linearly with the number of
scatterers, after a fixed cost per call. It is timed on one plane-wave transmit at two or more small
scatterer counts (the fastest of ``--pymust-repeats`` calls each, in one process), the times are fitted as
a + b n (a: simus's fixed cost) and extrapolated to the 60,000 scatterers that a fully developed speckle
of the same image needs (the count the issue quotes) as a + b * 60000; the DAS beamforming that a B-mode
image also needs is NOT included, so the ratio below is a lower bound of medfast's advantage.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def _volume(size: int, device):
    import torch

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 1, size // 8, size // 8, size // 8, generator=g)
    smooth = torch.nn.functional.interpolate(noise, size=(size,) * 3, mode="trilinear", align_corners=False)
    ct = 40 + 60 * smooth
    zz = torch.arange(size).view(1, 1, size, 1, 1)
    ct = torch.where((zz > size * 0.55) & (zz < size * 0.6), torch.full_like(ct, 1200.0), ct)  # a bone plate
    ct[..., : size // 4, size // 3: size // 2, size // 3: size // 2] = -100.0  # a fat block
    return ct.to(device)


def make_step(case: str, device: str, batch: int, sub_rays: int, size: int):
    """The case this script and ``test_bench_ultrasound.py`` (pytest-benchmark) time: step() = ``batch`` frames
    of medfast.ultrasound.simulate, ``case`` "forward" (no grad) or "forward_backward" (gradient of the
    B-mode mean with respect to the property volume)."""
    import numpy as np
    import torch

    from medfast.ultrasound import Probe, hu_to_properties, look_at, simulate

    dev = torch.device(device)
    probe = Probe.preset("C5-2v", n_lines=256, n_samples=1024)
    ct = _volume(size, dev)
    # hu_to_properties returns channels-last strides: the kernel reads them without a copy.
    props = hu_to_properties(ct)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    base = look_at((size / 2, size / 2, 1.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0))
    poses = base.expand(batch, 4, 4).clone()
    poses[:, 1, 3] += torch.linspace(-10, 10, batch, dtype=torch.float64)
    # on the host, as a tracker gives them and as docs/ultrasound.md advises: a pose on the GPU costs a device
    # sync for its checks, so each step would wait for the previous one's kernels (the H200 run of 2026-11-28
    # passed GPU poses: h200c_bench_ultrasound)
    poses = poses.float()
    if case == "forward":
        def step():
            with torch.no_grad():
                return simulate(props, affine, poses, probe, sub_rays=sub_rays).bmode
    else:
        p = props.clone().requires_grad_(True)

        def step():
            p.grad = None
            out = simulate(p, affine, poses, probe, sub_rays=sub_rays).bmode
            out.mean().backward()
            return out

    return step


def worker(case: str, device: str, batch: int, sub_rays: int, repeats: int, size: int) -> dict:
    import numpy as np
    import torch

    dev = torch.device(device)
    step = make_step(case, device, batch, sub_rays, size)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    best = float(np.min(times))
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"case": case, "device": device, "batch": batch, "sub_rays": sub_rays, "volume": size,
            "seconds_per_call": med, "frames_per_second": batch / med, "best_seconds_per_call": best,
            "best_frames_per_second": batch / best, "peak_mib": peak, "repeats": repeats}


def pymust_case(n_scatterers: int):
    """The peer this script and ``test_bench_ultrasound.py`` time: run(k) = pymust ``simus`` of one
    plane-wave transmit of the C5-2v over the first ``k`` (default all) of ``n_scatterers`` random scatterers
    in the 100 mm sector; returns (RF, ...) as simus does."""
    import numpy as np
    import pymust

    param = pymust.getparam("C5-2v")
    rng = np.random.default_rng(0)
    # Scatterers in the 100 mm deep sector of the probe.
    r = 0.005 + 0.095 * rng.random(n_scatterers)
    th = (rng.random(n_scatterers) - 0.5) * 1.3
    x = (r + param.radius) * np.sin(th)
    z = (r + param.radius) * np.cos(th) - param.radius
    rc = rng.standard_normal(n_scatterers)
    delays = np.zeros((1, param.Nelements))  # one transmit from all elements at once
    param.fs = 4 * param.fc

    def run(k: int | None = None):
        return pymust.simus(x[:k], z[:k], rc[:k], delays, param)

    return run


def pymust_worker(counts: list[int], repeats: int) -> list[dict]:
    """simus at each of ``counts`` scatterers, ``repeats`` rounds over the counts (interleaved: a slow spell of a
    shared machine does not land on one count only); one row per count with the fastest call as its seconds."""
    run = pymust_case(max(counts))
    run(5)  # warm-up (first-call overheads), not timed
    times: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(repeats):
        for n in counts:
            t = time.perf_counter()
            rf, _ = run(n)
            times[n].append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return [{"case": "pymust_simus", "n_scatterers": n, "seconds": min(times[n]), "times": times[n],
             "rf_shape": list(rf.shape), "peak_mib": peak} for n in counts]


def pymust_fit(pm: list[dict], n: int = 60000) -> dict:
    """seconds = a + b * scatterers, least squares over ``pm``'s rows (their fastest calls), and its value at ``n``.
    A per-scatterer time from one count (seconds / count) counted simus's fixed cost a once per scatterer: at
    100 scatterers it inflated the extrapolation by about 1.2x. A slope that is not positive (timing noise over
    counts too close together) cannot be extrapolated: then that old estimate, an upper bound (fastest seconds /
    count), named in ``method``."""
    xs = [float(r["n_scatterers"]) for r in pm]
    ys = [float(r["seconds"]) for r in pm]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    if b > 0:
        a = my - b * mx
        return {"method": "least squares a + b n", "fixed_seconds": a, "seconds_per_scatterer": b,
                "counts": [int(x) for x in xs], "seconds": ys, "extrapolated_seconds": a + b * n}
    per = min(y / x for x, y in zip(xs, ys))
    return {"method": "no positive slope: fastest seconds / count (an upper bound)", "fixed_seconds": None,
            "seconds_per_scatterer": per, "counts": [int(x) for x in xs], "seconds": ys,
            "extrapolated_seconds": per * n}


def _spawn(args: list[str]) -> dict | list[dict]:
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None, help="default 1 on CPU, 64 on CUDA")
    ap.add_argument("--pymust-scatterers", type=int, nargs="*", default=[250, 1000],
                    help="scatterer counts pymust is timed at (at least two different, for the fit a + b n; "
                    "none: pymust not run)")
    ap.add_argument("--pymust-repeats", type=int, default=3, help="calls per count, the fastest kept (default 3)")
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    counts = args.pymust_scatterers
    if counts and (len(set(counts)) < 2 or min(counts) < 1):
        # one count cannot separate simus's fixed cost from its cost per scatterer
        ap.error(f"--pymust-scatterers needs at least two different positive counts (or none), got {counts}")
    if args.pymust_repeats < 1:
        ap.error(f"--pymust-repeats must be >= 1, got {args.pymust_repeats}")
    if args.worker is not None:
        w = args.worker
        if w[0] == "pymust":
            res = pymust_worker([int(n) for n in w[2:]], int(w[1]))
        else:
            res = worker(w[0], w[1], int(w[2]), int(w[3]), int(w[4]), int(w[5]))
        print(json.dumps(res))
        return

    import torch

    import medfast

    batch = args.batch or (64 if args.device == "cuda" else 1)
    rows = []
    for sub_rays in (1, 3):
        for case in ("forward", "forward_backward"):
            res = _spawn([case, args.device, str(batch), str(sub_rays), str(args.repeats), str(args.size)])
            rows.append(res)
            print(f"medfast {case:17s} sub_rays={sub_rays} batch={batch}: {res['frames_per_second']:9.1f} frames/s "
                  f"median ({res['seconds_per_call'] * 1e3:.1f} ms/call), best {res['best_frames_per_second']:.1f} "
                  f"frames/s, peak {res['peak_mib']:.0f} MiB", flush=True)
    pm = []
    if counts:
        try:
            pm = _spawn(["pymust", str(args.pymust_repeats), *map(str, counts)])
        except subprocess.CalledProcessError as exc:  # pymust missing
            print(f"pymust not run: {exc.stderr.strip().splitlines()[-1] if exc.stderr else exc}")
    for res in pm:
        print(f"pymust simus, 1 plane-wave transmit, {res['n_scatterers']} scatterers: {res['seconds']:.2f} s "
              f"(fastest of {len(res['times'])}; RF {res['rf_shape']})", flush=True)
    summary = {}
    if pm:
        fit = pymust_fit(pm)
        pm_60k = fit["extrapolated_seconds"]
        fixed = "" if fit["fixed_seconds"] is None else f"{fit['fixed_seconds']:.3f} s + "
        print(f"pymust fit ({fit['method']}): {fixed}{fit['seconds_per_scatterer'] * 1e3:.3f} ms/scatterer "
              f"-> 60k scatterers {pm_60k:.1f} s", flush=True)
        fwd = next(r for r in rows if r["case"] == "forward" and r["sub_rays"] == 3)
        smallest = min(pm, key=lambda r: r["n_scatterers"])
        summary = {
            "pymust_fit": fit,
            "pymust_seconds_per_scatterer": fit["seconds_per_scatterer"],
            "pymust_seconds_60k_scatterers_one_transmit_extrapolated": pm_60k,
            "medfast_seconds_per_frame_forward_sub_rays3": fwd["seconds_per_call"] / fwd["batch"],
            "speed_ratio_vs_pymust_60k": pm_60k / (fwd["seconds_per_call"] / fwd["batch"]),
            "speed_ratio_vs_pymust_measured_smallest": smallest["seconds"] / (fwd["seconds_per_call"] / fwd["batch"]),
        }
        print(f"speed ratio vs pymust simus (60k scatterers, one transmit, no beamforming): "
              f"{summary['speed_ratio_vs_pymust_60k']:.0f}x; vs the measured {smallest['n_scatterers']}-scatterer "
              f"run: {summary['speed_ratio_vs_pymust_measured_smallest']:.0f}x")
    info = medfast.build_info()
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": info["gpus"],
        "torch": torch.__version__,
        "frame": "256 lines x 1024 samples, C5-2v, 100 mm, scan-converted",
        "volume": f"{args.size}^3 CT-like, 1 mm voxels",
        "medfast": rows,
        "pymust": pm,
        "summary": summary,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"ultrasound_{args.device}_latest"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.2))
        labels = [f"{r['case']}\nsub_rays={r['sub_rays']}" for r in rows]
        ax.bar(labels, [r["frames_per_second"] for r in rows], color="tab:blue")
        ax.set_ylabel("frames / s")
        ax.set_title(f"medfast ultrasound, {args.device}, batch {batch} (256x1024 frames)", fontsize=9)
        ax.tick_params(labelsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=110)
    except ImportError:
        pass
    print(f"wrote {out / stem}.json")


if __name__ == "__main__":
    main()
