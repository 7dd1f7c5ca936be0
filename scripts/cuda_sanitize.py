"""Exercises every CUDA kernel of medfast once on small inputs, for compute-sanitizer:

    compute-sanitizer --tool memcheck python scripts/cuda_sanitize.py
"""

import torch

import medfast as mf


def main() -> None:
    torch.manual_seed(0)
    for ndim, shape in [(2, (9, 7)), (3, (5, 6, 4))]:
        for dtype in (torch.float32, torch.float64, torch.float16):
            image = torch.rand(2, 2, *shape, device="cuda", dtype=dtype, requires_grad=True)
            pos = torch.float64 if dtype == torch.float64 else torch.float32
            ddf = (torch.randn(2, ndim, *shape, device="cuda", dtype=pos) * 4).requires_grad_()
            with torch.no_grad():
                ddf[0, 0, 0] = float("nan")
                ddf[1, -1, -1] = 1e30
            for mode in ("nearest", "linear", "cubic"):
                for padding in ("zeros", "border", "reflection"):
                    for deterministic in (False, True):
                        torch.use_deterministic_algorithms(deterministic)
                        out = mf.warp(image, ddf, mode=mode, padding=padding)
                        out.nan_to_num().sum().backward()
            torch.use_deterministic_algorithms(False)
            theta = torch.eye(ndim, ndim + 1, device="cuda", dtype=pos)[None].repeat(2, 1, 1).requires_grad_()
            mf.affine_warp(image, theta, shape=[3] * ndim, mode="cubic").sum().backward()
    torch.cuda.synchronize()
    print("cuda_sanitize: all kernels ran")


if __name__ == "__main__":
    main()
