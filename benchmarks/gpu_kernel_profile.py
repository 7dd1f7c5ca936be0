"""Per-kernel CUDA time of medfast's GPU workloads (torch.profiler), to see where a step's time goes:
ultrasound frames (batch 64, 3 sub-rays, forward and forward+backward; and batch 5, the size of one
simulation call of the classification renderer), each with the one-thread-per-line CUDA march
(``MEDFAST_USSIM_CUDA_MARCH=thread``) and the warp-cooperative one (the default), the batch-64 forward+backward
of the warp march also with the merged property-gradient scatter (``MEDFAST_USSIM_CUDA_SCATTER=merged``;
the other rows: plain) and with the poses on the host instead of the GPU (a GPU pose costs a device sync per
call; the forward too), Dice+CE forward+backward (B=2, C=4 (default sums only), 16 and 64, 128^3) with
either label-sums kernel (``MEDFAST_LOSS_CUDA_SUMS`` = warp, the default, or thread), with and without the
label-range check (``check_labels``), and HD95 of two 128^3 masks. Each workload reports its step time as a user runs it
(CUDA events, no profiler; frames/s come from it), the profiled step time, the host time of a call from an
idle GPU, and each kernel's time.

    python benchmarks/gpu_kernel_profile.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_timing import cuda_median_ms  # noqa: E402


def kernels(step, n: int) -> tuple[float, dict[str, float]]:
    """(wall ms per step, {kernel: CUDA ms per step}) over n profiled steps."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / n
    per: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if t > 0 and not ev.key.startswith(("cudaLaunch", "cudaStream", "cudaMemcpy")):
            per[ev.key[:100]] += t / 1e3 / n
    return wall, dict(sorted(per.items(), key=lambda kv: -kv[1])[:15])


def workloads(dev: torch.device):
    from bench_ultrasound import _volume

    import medfast.losses as L
    from medfast.metrics import hausdorff_distance
    from medfast.ultrasound import Probe, hu_to_properties, look_at, simulate

    probe = Probe.preset("C5-2v", n_lines=256, n_samples=1024)
    props = hu_to_properties(_volume(128, dev))
    base = look_at((64.0, 64.0, 1.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0))
    poses = base.expand(64, 4, 4).clone()
    poses[:, 1, 3] += torch.linspace(-10, 10, 64, dtype=torch.float64)
    poses = poses.float().to(dev)
    affine = np.eye(4)

    def us_forward():
        with torch.no_grad():
            simulate(props, affine, poses, probe, sub_rays=3)

    def us_forward_b5():
        with torch.no_grad():
            simulate(props, affine, poses[:5], probe, sub_rays=3)

    p = props.clone().requires_grad_(True)

    def us_backward():
        p.grad = None
        simulate(p, affine, poses, probe, sub_rays=3).bmode.mean().backward()

    host_poses = poses.cpu()

    def us_backward_host_poses():  # as a tracker gives them: no device sync for the pose checks
        p.grad = None
        simulate(p, affine, host_poses, probe, sub_rays=3).bmode.mean().backward()

    def us_forward_host_poses():
        with torch.no_grad():
            simulate(props, affine, host_poses, probe, sub_rays=3)

    loss = L.DiceCELoss()

    unchecked = L.DiceCELoss(check_labels=False)

    def dice_ce_case(C: int, sums: str, check: bool = True):
        """Dice+CE forward + backward, B = 2, 128^3, C classes; sums: MEDFAST_LOSS_CUDA_SUMS (thread:
        sums_kernel, warp: the class-transposed label sums, the default); check: the label-range check."""
        logits = torch.randn(2, C, 128, 128, 128, device=dev, requires_grad=True)
        target = torch.randint(0, C, (2, 1, 128, 128, 128), device=dev)
        fn = loss if check else unchecked

        def step():
            os.environ["MEDFAST_LOSS_CUDA_SUMS"] = sums  # read by the launcher at every call
            logits.grad = None
            fn(logits, target).backward()

        return step

    zz, yy, xx = torch.meshgrid(*[torch.arange(128, device=dev)] * 3, indexing="ij")
    fa = (zz - 64) ** 2 + (yy - 60) ** 2 + (xx - 64) ** 2 < 40**2
    fb = (zz - 62) ** 2 + (yy - 66) ** 2 + (xx - 61) ** 2 < 38**2
    a, b = torch.stack([~fa, fa])[None], torch.stack([~fb, fb])[None]  # (1, 2, S, S, S) one-hot

    def hd95():
        hausdorff_distance(a, b, percentile=95)

    # name: (step, profiled steps, MEDFAST_USSIM_CUDA_MARCH, frames per step, MEDFAST_USSIM_CUDA_SCATTER)
    out = {}
    for march in ("thread", "warp"):
        out.update({f"ultrasound_fwd_b64_{march}": (us_forward, 5, march, 64, "plain"),
                    f"ultrasound_fwd_b5_{march}": (us_forward_b5, 10, march, 5, "plain"),
                    f"ultrasound_fwdbwd_b64_{march}": (us_backward, 3, march, 64, "plain")})
    out["ultrasound_fwdbwd_b64_warp_merged"] = (us_backward, 3, "warp", 64, "merged")
    out["ultrasound_fwdbwd_b64_warp_merged_hostposes"] = (us_backward_host_poses, 3, "warp", 64, "merged")
    # issue 4's forward target (10,000 frames/s at B >= 64, 128^3) with the poses as a tracker gives them
    out["ultrasound_fwd_b64_warp_hostposes"] = (us_forward_host_poses, 5, "warp", 64, "merged")
    # C = 4: where Dice+CE is furthest from its 3x target (host time, see "host_ms")
    out["dice_ce_b2_c4_128_warpsums"] = (dice_ce_case(4, "warp"), 10, None, 0, None)
    out["dice_ce_b2_c4_128_warpsums_nocheck"] = (dice_ce_case(4, "warp", False), 10, None, 0, None)
    for C in (16, 64):
        for sums in ("thread", "warp"):
            out[f"dice_ce_b2_c{C}_128_{sums}sums"] = (dice_ce_case(C, sums), 10, None, 0, None)
            out[f"dice_ce_b2_c{C}_128_{sums}sums_nocheck"] = (dice_ce_case(C, sums, False), 10, None, 0, None)
    out["hd95_128"] = (hd95, 10, None, 0, None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    dev = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "workloads": {}}
    for name, (step, n, march, frames, scatter) in workloads(dev).items():
        if march is not None:
            os.environ["MEDFAST_USSIM_CUDA_MARCH"] = march
        if scatter is not None:
            os.environ["MEDFAST_USSIM_CUDA_SCATTER"] = scatter
        try:
            step()
            torch.cuda.synchronize()
            wall, per = kernels(step, n)
        except Exception as exc:  # keep profiling the others; the error is in the report
            result["workloads"][name] = {"error": repr(exc)}
            print(f"{name}: error {exc!r}", flush=True)
            continue
        # the step as a user runs it, without the profiler's overhead (CUDA events, median of n)
        plain = cuda_median_ms(step, n)
        # the host's part: the call itself from an idle GPU (returns once its work is queued, or after the syncs
        # it makes, e.g. the label check); a step near host_ms is bound by the host, not the kernels
        host = []
        for _ in range(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        host_ms = sorted(host)[len(host) // 2]
        result["workloads"][name] = {"wall_ms": wall, "plain_ms": plain, "host_ms": host_ms, "kernel_ms": per}
        if frames:
            result["workloads"][name]["frames_per_s"] = frames * 1e3 / plain
            result["workloads"][name]["frames_per_s_profiled"] = frames * 1e3 / wall
        print(f"{name}: {plain:.3f} ms per step ({wall:.3f} profiled), host {host_ms:.3f} ms, kernels "
              f"{sum(per.values()):.3f} ms"
              + (f", {frames * 1e3 / plain:.0f} frames/s" if frames else ""), flush=True)
        for k, v in list(per.items())[:6]:
            print(f"    {v:8.4f} ms  {k}", flush=True)
    os.environ.pop("MEDFAST_USSIM_CUDA_MARCH", None)
    os.environ.pop("MEDFAST_USSIM_CUDA_SCATTER", None)
    os.environ.pop("MEDFAST_LOSS_CUDA_SUMS", None)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_kernel_profile.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
