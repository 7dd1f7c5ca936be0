"""Does a C++ argument check inside a medfast operator reach Python as an exception?

On the lent H200 (torch 2.11, Python 3.12, medfast built with /opt/gcc g++ 13.3) the first such check
of a pytest worker ended the process with a segmentation fault (benchmarks/results/gpu/h200b_*); the
same tests pass here (torch 2.11 and 2.14, g++ 12). The same crash follows from a libstdc++ linked
statically into the extension (reproduced with g++ 13 -static-libstdc++): CMakeLists.txt now links
torch's shared libstdc++ and refuses such a build. Each probe runs in its own process, so one crash
names its call and the others still run; with --native, a crashing probe is rerun under cuda-gdb (or
gdb) for a native backtrace. Also prints the toolchain and the libraries the extension resolves to.

    python scripts/exception_probe.py [--native]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

PROBES = {
    # torch's own check, for comparison: always an exception
    "torch_core": "torch.zeros(2).view(3)",
    "distance_spacing": "torch.ops.medfast.distance_transform(torch.ones(1, 5, 5, dtype=torch.bool), [1.0], "
    "torch.float32)",
    "seed_shape": "s = torch.rand(2, 5, 6, 7) < 0.1; torch.ops.medfast.seed_distances(s, s[:, :3], [1.0, 1.0, 1.0])",
    "warp_rank": "torch.ops.medfast.warp_forward(torch.rand(1, 1, 4, 4), None, torch.zeros(1, 3, 4, 4, 4), [4, 4, 4], "
    "'linear', 'zeros')",
    "warp_on_cuda": "torch.ops.medfast.warp_forward(torch.rand(1, 1, 4, 4, device='cuda'), None, "
    "torch.zeros(1, 3, 4, 4, 4, device='cuda'), [4, 4, 4], 'linear', 'zeros')",
    "lncc_kernel": "torch.ops.medfast.lncc(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), [3], 0.0, 1e-5)",
}


def run_probe(name: str) -> None:
    import torch

    import medfast  # noqa: F401  (registers the operators)

    try:
        exec(PROBES[name], {"torch": torch})
    except Exception as exc:  # the expected outcome
        print(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
        return
    print(f"{name}: no exception")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--probe", help=argparse.SUPPRESS)
    p.add_argument("--native", action="store_true", help="rerun a crashing probe under cuda-gdb / gdb")
    args = p.parse_args()
    if args.probe:
        run_probe(args.probe)
        return 0
    import torch

    import medfast

    so = medfast._C.__file__
    print("torch", torch.__version__, "python", sys.version.split()[0], "extension", so)
    print("compiler", medfast.build_info().get("compiler"))
    # A C++ runtime linked into the extension (its own __cxa_throw / personality / unwinder beside the
    # shared libstdc++ that torch uses) is a known cause of crashes on throw (pytorch issue 57744).
    for cmd in (["sh", "-c", f"ldd {so} | grep -E 'stdc|gcc_s|gomp|cudart|c10|torch_python'"],
                ["sh", "-c", "command -v g++ c++ gcc; g++ --version | head -1; ls -l $(command -v g++)"],
                ["sh", "-c", "ldconfig -p | grep -E 'libstdc|libgcc_s|libgomp'"],
                ["sh", "-c", f"readelf -d {so} | grep -E 'NEEDED|RPATH|RUNPATH'"],
                ["sh", "-c", f"nm -D --defined-only {so} | grep -E '__cxa_throw|__gxx_personality|_Unwind_|"
                 "__cxa_begin_catch' || echo 'no C++ runtime symbols defined in the extension'"],
                ["sh", "-c", "g++ -print-file-name=libstdc++.so; g++ -print-file-name=libstdc++.a; "
                 "g++ -dumpspecs | grep -n -i -A1 'static-libstdc\\|static-libgcc' | head -8"]):
        out = subprocess.run(cmd, capture_output=True, text=True)
        print(f"$ {' '.join(cmd)}\n{out.stdout}{out.stderr}", end="")
    crashed = []
    for name in PROBES:
        r = subprocess.run([sys.executable, __file__, "--probe", name], capture_output=True, text=True)
        line = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(f"[rc {r.returncode:4d}] {line}" + ("" if r.returncode == 0 else f"  <- {r.stderr.strip()[-300:]}"))
        if r.returncode != 0:
            crashed.append(name)
    debugger = shutil.which("cuda-gdb") or shutil.which("gdb")
    if args.native and crashed and debugger:
        r = subprocess.run([debugger, "-batch", "-ex", "run", "-ex", "bt 40", "--args", sys.executable, __file__,
                            "--probe", crashed[0]], capture_output=True, text=True, timeout=180)
        print(f"native backtrace of {crashed[0]} ({debugger}):\n{r.stdout[-6000:]}\n{r.stderr[-2000:]}")
    print(f"exception probes: {len(PROBES) - len(crashed)} of {len(PROBES)} raised cleanly")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
