"""Smoke test of an installed medfast wheel: imports it outside the source tree and runs each op
family once on small tensors, forward and backward (warp, fused losses, distance transform and metrics,
local NCC, ultrasound simulation; scripts/wheel_check.sh runs it in a fresh venv)."""

import sys
from pathlib import Path

import torch

import medfast as mf


def main() -> int:
    assert "site-packages" in mf.__file__, f"medfast imported from {mf.__file__}, not from the installed wheel"
    info = mf.build_info()
    print(f"medfast {mf.__version__} from {mf.__file__}; torch {info['torch']} (built against "
          f"{info['torch_built_against']}); CUDA kernels: {info['cuda_kernels']}")
    assert (Path(mf.__file__).parent / "py.typed").is_file(), "the wheel lacks medfast/py.typed (PEP 561)"
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
    fixed = torch.rand(1, 1, 10, 11, 12)
    moving = (fixed + 0.1 * torch.rand_like(fixed)).requires_grad_()
    ncc = mf.local_ncc(moving, fixed, kernel_size=5)
    lncc = mf.lncc_loss(moving, fixed, kernel_size=5)
    lncc.backward()
    value = float(lncc.detach())
    assert ncc.shape == fixed.shape and bool(torch.isfinite(ncc).all()) and -1.0 <= value < 0.0, value
    assert moving.grad is not None and bool(torch.isfinite(moving.grad).all())
    print("local_ncc / lncc_loss: ok")
    from medfast.ultrasound import Probe, look_at, simulate

    # 8^3 voxels of 2.5 mm (a 20 mm cube centred on the origin) of soft tissue, imaged from just above it
    props = torch.tensor([1.6, 0.5, 1.0, 1.0, 0.1]).view(1, 5, 1, 1, 1).repeat(1, 1, 8, 8, 8).requires_grad_()
    affine = torch.diag(torch.tensor([2.5, 2.5, 2.5, 1.0], dtype=torch.float64))
    affine[:3, 3] = -8.75
    pose = look_at((0.0, 0.0, -10.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0))
    probe = Probe.preset("L11-5v", n_lines=8, n_samples=32, depth_mm=20)
    res = simulate(props, affine, pose, probe)
    res.lines_db.sum().backward()
    assert res.bmode is not None and res.bmode.dim() == 4 and res.lines_db.shape == (1, 8, 32), res.lines_db.shape
    assert bool(torch.isfinite(res.lines_db).all()) and float(res.bmode.detach().max()) > 0 and props.grad is not None
    print(f"ultrasound simulate: ok (B-mode {tuple(res.bmode.shape[-2:])})")
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
