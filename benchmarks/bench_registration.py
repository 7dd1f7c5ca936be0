"""Registration benchmarks, medfast against MONAI in the same run. On the CPU each measurement runs in a
fresh process (its peak memory is that process's RSS above the inputs); on CUDA (``--device cuda``) all run
in this process, one after another: times are the median of CUDA-event-timed calls after warm-up calls, peak
memory is ``torch.cuda.max_memory_allocated`` over the warm-up calls above what the inputs (and model) hold.

1. LNCC forward + backward (box window k = 9): ``medfast.lncc_loss`` against MONAI's
   ``LocalNormalizedCrossCorrelationLoss(kernel_type="rectangular")`` at 64^3 and 128^3.
2. One registration training step (forward, backward, Adam step) of the same LocalNet architecture and
   parameters, three builds:
   - ``medfast``: ``medfast.nets.LocalNet`` (on the CPU channels-last, oneDNN convolutions forward and
     backward) + ``medfast.warp`` + fused LNCC + bending energy;
   - ``monai``: the MONAI build, the same network on the stock ``torch.nn`` layers (``nn.Conv3d``,
     ``nn.InstanceNorm3d``, NCDHW: ``medfast.nets.use_torch_layers``) +
     ``monai.networks.blocks.Warp`` + MONAI LNCC + MONAI ``BendingEnergyLoss``;
   - ``monai_fastnet``: medfast's network with MONAI's warp and losses, which isolates what the ops
     alone give.
3. The step's breakdown: the LocalNet forward + backward alone (medfast's path and the stock path), and
   the warp + LNCC + bending energy forward + backward of each build on the same displacement.

    python benchmarks/bench_registration.py [--device cpu] [--sizes 64 128] [--step-size 64] [--out benchmarks/results]

Writes ``registration_<device>_latest.json`` and ``registration_<device>_latest.png``; the 1-minute load
average is recorded before and after (the machines here are shared).
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


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


CUDA_WARMUP = 3  # untimed calls first on CUDA (allocator, cuDNN and kernel caches); they are the memory probe


def _median_ms(fn, repeats: int, device: str = "cpu") -> float:
    """Median milliseconds of fn(): wall time after one warm-up call on the CPU; CUDA events on the current
    stream after CUDA_WARMUP calls on CUDA."""
    if device != "cuda":
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[len(times) // 2]
    from cuda_timing import cuda_median_ms

    return cuda_median_ms(fn, repeats, CUDA_WARMUP)


def _time_and_peak(step, repeats: int, device: str, clear=None) -> dict:
    """{"ms": median ms, "extra_peak_mib": peak memory of one call above what is held before it, after a warm-up
    and ``clear()`` (CPU: resident growth in a worker started with warp_cases.MALLOC_ENV)}."""
    if device != "cuda":
        import warp_cases as wc

        before = _rss_mib("VmRSS")
        extra = wc.cpu_extra_peak_mib(step, clear)
        ms = _median_ms(step, repeats)
        if extra is None:  # not Linux: the process's peak above the inputs
            extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
        return {"ms": ms, "extra_peak_mib": extra}
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(CUDA_WARMUP):
        step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    ms = _median_ms(step, repeats, device)
    return {"ms": ms, "extra_peak_mib": (peak - base) / 2**20, "peak_mib": peak / 2**20}


def lncc_case(impl: str, size: int, k: int, device: str = "cpu"):
    """The LNCC case this script and ``test_bench_registration.py`` (pytest-benchmark) time: (step, loss),
    step() = the forward + backward of ``impl``'s LNCC (box window k) on a ``size``^3 pair on ``device``."""
    import torch

    torch.manual_seed(0)
    t = torch.rand(1, 1, size, size, size)
    p = (t + 0.2 * torch.rand_like(t)).to(device).requires_grad_()
    t = t.to(device)
    if impl == "medfast":
        import medfast as mf

        def loss():
            return mf.lncc_loss(p, t, kernel_size=k)
    else:
        from monai.losses import LocalNormalizedCrossCorrelationLoss

        fn = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=k, kernel_type="rectangular")

        def loss():
            return fn(p, t)

    def step():
        p.grad = None
        loss().backward()

    step.clear_grad = lambda: setattr(p, "grad", None)  # for the memory probe: the gradient counts as extra
    return step, loss


def lncc_worker(impl: str, size: int, k: int, repeats: int, device: str = "cpu") -> dict:
    step, loss = lncc_case(impl, size, k, device)
    return {**_time_and_peak(step, repeats, device, clear=step.clear_grad), "value": float(loss())}


def _localnet(channels: int, stock: bool):
    """The benchmark's LocalNet: medfast's layers, or (``stock``) the same network on the stock
    ``torch.nn`` layers in NCDHW, as a MONAI user would build it."""
    from medfast.nets import LocalNet, use_torch_layers

    net = LocalNet(3, in_channels=2, num_channel_initial=channels, depth=3, extract_levels=(0, 1, 2, 3),
                   channels_last=False if stock else None)
    return use_torch_layers(net) if stock else net


# medfast network + medfast ops; stock-layer network + MONAI ops; medfast network + MONAI ops
STEP_BUILDS = ("medfast", "monai", "monai_fastnet")


def train_step(impl: str, size: int, channels: int, device: str = "cpu"):
    """The training step this script and ``test_bench_registration.py`` time: step() = forward, backward and
    Adam step of a LocalNet with ``impl``'s network path and warp + LNCC + bending energy (``STEP_BUILDS``)."""
    import torch

    if impl not in STEP_BUILDS:
        raise ValueError(f"impl must be one of {STEP_BUILDS}, got {impl!r}")
    torch.manual_seed(0)
    net = _localnet(channels, stock=impl == "monai")
    with torch.no_grad():  # non-zero heads so the warp and the regularizer see a real field
        for h in net.heads.values():
            h.weight.normal_(0, 1e-2)
    net = net.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    fixed = torch.rand(1, 1, size, size, size).to(device)
    moving = torch.rand(1, 1, size, size, size).to(device)
    if impl == "medfast":
        import medfast as mf
        from medfast.losses import BendingEnergyLoss

        bending = BendingEnergyLoss()

        def loss_fn():
            ddf = net(torch.cat([moving, fixed], 1))
            warped = mf.warp(moving, ddf, padding="border")
            return mf.lncc_loss(warped, fixed, kernel_size=9) + 0.5 * bending(ddf)
    else:
        from monai.losses import BendingEnergyLoss, LocalNormalizedCrossCorrelationLoss
        from monai.networks.blocks import Warp

        warp = Warp(mode="bilinear", padding_mode="border").to(device)
        lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=9, kernel_type="rectangular").to(device)
        bending = BendingEnergyLoss()

        def loss_fn():
            ddf = net(torch.cat([moving, fixed], 1))
            return lncc(warp(moving, ddf), fixed) + 0.5 * bending(ddf)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step


def step_worker(impl: str, size: int, channels: int, repeats: int, device: str = "cpu") -> dict:
    return _time_and_peak(train_step(impl, size, channels, device), repeats, device)


def parts_worker(impl: str, size: int, channels: int, repeats: int, device: str = "cpu") -> dict:
    """The step's parts: this build's LocalNet forward + backward (medfast's path, or the stock
    ``torch.nn`` path for MONAI) and its warp + LNCC + bending energy forward + backward."""
    import torch
    import warp_cases as wc

    wc.malloc_steady_state()  # timing only: glibc's usual heap, not the memory probe's (MALLOC_ENV)

    torch.manual_seed(0)
    fixed = torch.rand(1, 1, size, size, size).to(device)
    moving = torch.rand(1, 1, size, size, size).to(device)
    out = {}
    net = _localnet(channels, stock=impl != "medfast").to(device)
    x = torch.cat([moving, fixed], 1)
    grad = torch.randn(1, 3, size, size, size).to(device)

    def net_step():
        net.zero_grad(set_to_none=True)
        net(x).backward(grad)

    out["net_ms"] = _median_ms(net_step, repeats, device)
    ddf = (torch.randn(1, 3, size, size, size) * 2).to(device).requires_grad_()
    if impl == "medfast":
        import medfast as mf
        from medfast.losses import BendingEnergyLoss

        bending = BendingEnergyLoss()

        def loss_fn():
            return mf.lncc_loss(mf.warp(moving, ddf, padding="border"), fixed, kernel_size=9) + 0.5 * bending(ddf)
    else:
        from monai.losses import BendingEnergyLoss, LocalNormalizedCrossCorrelationLoss
        from monai.networks.blocks import Warp

        warp = Warp(mode="bilinear", padding_mode="border").to(device)
        lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=9, kernel_type="rectangular").to(device)
        bending = BendingEnergyLoss()

        def loss_fn():
            return lncc(warp(moving, ddf), fixed) + 0.5 * bending(ddf)

    def loss_step():
        ddf.grad = None
        loss_fn().backward()

    out["losses_ms"] = _median_ms(loss_step, max(repeats, 5), device)
    return out


WORKERS = {"lncc": lncc_worker, "step": step_worker, "parts": parts_worker}


def _run(kind: str, impl: str, *params) -> dict:
    """One measurement: in a fresh process on the CPU, in this process on CUDA."""
    if _DEVICE == "cuda":
        import gc

        import torch

        try:
            return WORKERS[kind](impl, *params, device="cuda")
        finally:
            gc.collect()
            torch.cuda.empty_cache()
    cmd = [sys.executable, __file__, "--worker", kind, impl, *map(str, params), str(_THREADS)]
    import warp_cases as wc

    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=wc.worker_env()).stdout
    return json.loads(out.strip().splitlines()[-1])


_THREADS = 0
_DEVICE = "cpu"


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"LNCC fwd+bwd {r['size']}^3 k={r['kernel']}", r["monai_ms"], r["medfast_ms"]) for r in result["lncc"]]
    s = result.get("step")
    if s:
        rows.append((f"LocalNet step {s['size']}^3", s["monai_ms"], s["medfast_ms"]))
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.7 * len(rows)))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [r[1] for r in rows], 0.4, label="MONAI", color="#999999")
    ax.barh([i - 0.2 for i in y], [r[2] for r in rows], 0.4, label="medfast", color="#1f77b4")
    for i, r in enumerate(rows):
        ax.text(r[1], i + 0.2, f" {r[1] / r[2]:.1f}x", va="center", fontsize=8)
    ax.set_yticks(list(y))
    ax.set_yticklabels([r[0] for r in rows], fontsize=8)
    ax.set_xscale("log")
    on = result.get("device_name") or "CPU"
    ax.set_xlabel(f"median ms ({on}, lower is better)")
    ax.legend(fontsize=8)
    where = (f"CPU ({result['threads']} threads, load {result['load_before']:.1f})" if "threads" in result
             else f"{on} (load {result['load_before']:.1f})")
    ax.set_title(f"registration, {where}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--kernel", type=int, default=9)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--step-size", type=int, default=64, help="volume edge of the training step (0: skip)")
    p.add_argument("--step-channels", type=int, default=8)
    p.add_argument("--step-repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads in every worker (0: torch's default); on a loaded machine 1 avoids "
                        "measuring the OS scheduler instead of the code")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        kind, impl, *params = args.worker
        import torch

        if int(params[-1]):
            torch.set_num_threads(int(params[-1]))
        params = params[:-1]
        print(json.dumps(WORKERS[kind](impl, *map(int, params))))
        return 0
    import torch

    global _THREADS, _DEVICE
    _THREADS, _DEVICE = args.threads, args.device
    if args.device == "cuda":
        import medfast

        if not torch.cuda.is_available():
            print("bench_registration: --device cuda but torch sees no GPU", file=sys.stderr)
            return 2
        if not medfast.build_info().get("cuda_kernels"):
            print("bench_registration: medfast was built without CUDA kernels", file=sys.stderr)
            return 2
        if args.threads:
            torch.set_num_threads(args.threads)
        # no "threads" key on CUDA: the runner labels CPU rows with it
        result = {"device": "cuda", "device_name": torch.cuda.get_device_name(), "cuda_warmup": CUDA_WARMUP}
    else:
        result = {"device": "cpu", "threads": args.threads or torch.get_num_threads()}
    result.update({"cpu_count": os.cpu_count(), "load_before": os.getloadavg()[0],
                   "time": time.strftime("%Y-%m-%d %H:%M:%S"), "lncc": []})
    for size in args.sizes:
        res = {impl: _run("lncc", impl, size, args.kernel, args.repeats) for impl in ("medfast", "monai")}
        row = {"size": size, "kernel": args.kernel, **{f"{i}_{m}": v for i, r in res.items() for m, v in r.items()}}
        row["speedup"] = res["monai"]["ms"] / res["medfast"]["ms"]
        if not abs(row["medfast_value"] - row["monai_value"]) <= 1e-4 * max(1.0, abs(row["monai_value"])):
            raise SystemExit(f"bench_registration: LNCC {size}^3 values disagree (medfast {row['medfast_value']}, "
                             f"MONAI {row['monai_value']}): not reporting the timing of a different result")
        result["lncc"].append(row)
        print(f"LNCC {size}^3 k={args.kernel}: medfast {row['medfast_ms']:.1f} ms, MONAI {row['monai_ms']:.1f} ms "
              f"-> {row['speedup']:.1f}x; extra peak MiB medfast {row['medfast_extra_peak_mib']:.0f} / "
              f"MONAI {row['monai_extra_peak_mib']:.0f}; values {row['medfast_value']:.6f} / "
              f"{row['monai_value']:.6f}", flush=True)
    if args.step_size:
        res = {impl: _run("step", impl, args.step_size, args.step_channels, args.step_repeats)
               for impl in STEP_BUILDS}
        row = {"size": args.step_size, "channels": args.step_channels,
               **{f"{i}_{m}": v for i, r in res.items() for m, v in r.items()}}
        row["speedup"] = res["monai"]["ms"] / res["medfast"]["ms"]
        row["ops_speedup"] = res["monai_fastnet"]["ms"] / res["medfast"]["ms"]
        result["step"] = row
        print(f"LocalNet step {args.step_size}^3 (ch {args.step_channels}): medfast {row['medfast_ms']:.0f} ms, "
              f"MONAI build {row['monai_ms']:.0f} ms -> {row['speedup']:.2f}x; MONAI ops on medfast's network "
              f"{row['monai_fastnet_ms']:.0f} ms -> {row['ops_speedup']:.2f}x; extra peak MiB medfast "
              f"{row['medfast_extra_peak_mib']:.0f} / MONAI {row['monai_extra_peak_mib']:.0f} / MONAI ops "
              f"{row['monai_fastnet_extra_peak_mib']:.0f}", flush=True)
        parts = {impl: _run("parts", impl, args.step_size, args.step_channels, args.step_repeats)
                 for impl in ("medfast", "monai")}
        net_ms = parts["medfast"]["net_ms"]
        brk = {"size": args.step_size, "net_ms": net_ms, "monai_net_ms": parts["monai"]["net_ms"],
               "medfast_losses_ms": parts["medfast"]["losses_ms"], "monai_losses_ms": parts["monai"]["losses_ms"]}
        # the step ratio of the ops alone if medfast's warp + LNCC + bending cost nothing (medfast's network in both)
        brk["ratio_ceiling"] = (net_ms + brk["monai_losses_ms"]) / net_ms
        result["step_breakdown"] = brk
        print(f"step breakdown {args.step_size}^3: LocalNet fwd+bwd medfast {net_ms:.0f} ms, stock torch.nn "
              f"{brk['monai_net_ms']:.0f} ms; warp + LNCC + bending fwd+bwd medfast {brk['medfast_losses_ms']:.1f} ms, "
              f"MONAI {brk['monai_losses_ms']:.1f} ms; ops-only step ratio ceiling {brk['ratio_ceiling']:.2f}x",
              flush=True)
    result["load_after"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        stem = "registration_cuda_latest"
    else:
        stem = "registration_cpu_latest" if not args.threads else f"registration_cpu_{args.threads}thread_latest"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    _plot(result, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
