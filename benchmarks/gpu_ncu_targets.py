"""One launch of each kernel that a GPU target still waits on, for Nsight Compute (``ncu``) to profile:
the warp forward at 256^3 (issue: half the DRAM bandwidth; the default ilp1 kernel and forward_kernel) and
its backward (twice the kernel time of grid_sample's backward on an H200, h200c_warp_profile), the Dice+CE
label sums and gradient kernels at C = 16, B = 2, 128^3, and the ultrasound line march, PSF and
property-gradient scatter at batch 16.
``scripts/gpu_check.sh`` runs it under ``ncu`` (when installed) with the kernel-name filter below, so
the next change to those kernels can start from their measured limiters (memory throughput, stall
reasons, occupancy) instead of guesses.

    ncu --section SpeedOfLight --section Occupancy -k "regex:$(python gpu_ncu_targets.py --filter)" \\
        python benchmarks/gpu_ncu_targets.py
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

FILTER = ("forward_kernel|forward_ilp_kernel|backward_kernel|sums_kernel|sums_warp_kernel|grad_kernel|lines_warp_kernel"
          "|psf_axial|lines_scatter")


def main() -> None:
    if "--filter" in sys.argv:
        print(FILTER)
        return
    import medfast as mf
    from medfast.ultrasound import Probe, hu_to_properties, look_at, simulate

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    image = torch.rand(1, 1, 256, 256, 256, device=dev, generator=g)
    ddf = F.interpolate(torch.randn(1, 3, 8, 8, 8, device=dev, generator=g) * 4, size=(256,) * 3,
                        mode="trilinear").contiguous()
    mf.warp(image, ddf)  # the default forward (ilp1)
    os.environ["MEDFAST_WARP_CUDA_FORWARD"] = "one"  # forward_kernel, for comparison
    mf.warp(image, ddf)
    os.environ.pop("MEDFAST_WARP_CUDA_FORWARD")
    image.requires_grad_()
    ddf.requires_grad_()
    mf.warp(image, ddf).backward(torch.ones_like(image))  # backward_kernel, the plain scatter for one channel

    z = torch.randn(2, 16, 128, 128, 128, device=dev, generator=g, requires_grad=True)
    t = torch.randint(0, 16, (2, 128, 128, 128), device=dev, generator=g)
    mf.dice_ce_loss(z, t).backward()

    probe = Probe.preset("C5-2v", n_lines=256, n_samples=1024)
    hu = torch.rand(1, 1, 64, 64, 64, device=dev, generator=g) * 2000 - 1000
    props = hu_to_properties(hu).requires_grad_()
    poses = look_at((32.0, 32.0, 1.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)).expand(16, 4, 4).clone()
    poses[:, 1, 3] += torch.linspace(-5, 5, 16, dtype=torch.float64)
    simulate(props, np.eye(4), poses.float(), probe, sub_rays=3).bmode.mean().backward()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
