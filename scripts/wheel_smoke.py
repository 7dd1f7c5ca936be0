"""Smoke test of an installed medfast wheel: imports it outside the source tree and runs each op
family once on small tensors, forward and backward (scripts/wheel_check.sh runs it in a fresh venv)."""

import sys

import torch

import medfast as mf


def main() -> int:
    assert "site-packages" in mf.__file__, f"medfast imported from {mf.__file__}, not from the installed wheel"
    info = mf.build_info()
    print(f"medfast {mf.__version__} from {mf.__file__}; torch {info['torch']} (built against "
          f"{info['torch_built_against']}); CUDA kernels: {info['cuda_kernels']}")
    torch.manual_seed(0)
    image = torch.rand(1, 2, 8, 9, 10, requires_grad=True)
    ddf = torch.randn(1, 3, 8, 9, 10, requires_grad=True)
    out = mf.warp(image, ddf)
    out.sum().backward()
    assert out.shape == image.shape and image.grad is not None and ddf.grad is not None
    print("warp: ok")
    logits = torch.randn(2, 4, 6, 7, 8, requires_grad=True)
    labels = torch.randint(0, 4, (2, 6, 7, 8))
    loss = mf.dice_ce_loss(logits, labels)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad is not None
    print("dice_ce_loss: ok")
    mask = torch.rand(1, 12, 13, 14) > 0.1
    dist = mf.distance_transform(mask)
    assert dist.shape == mask.shape and float(dist.max()) > 0
    print("distance_transform: ok")
    from medfast.metrics import hausdorff_distance

    a = torch.zeros(1, 1, 16, 16, 16, dtype=torch.bool)
    a[..., 4:12, 4:12, 4:12] = True
    b = torch.roll(a, 2, dims=2)
    hd = hausdorff_distance(a, b, percentile=None, include_background=True)
    assert abs(float(hd) - 2.0) < 1e-5, hd
    print("hausdorff_distance: ok")
    from medfast.bench.runner import SUITES, benchmarks_dir

    where = benchmarks_dir()
    assert "site-packages" in str(where), where
    missing = [s.script for s in SUITES if not (where / s.script).is_file()]
    assert not missing and not (where / "results").exists(), (missing, where)
    print(f"benchmark scripts: {len(SUITES)} suites in {where}")
    print("wheel smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
