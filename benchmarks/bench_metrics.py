"""Times medfast.metrics against MONAI in the same run, on one pair of 128^3 segmentations (two overlapping
smoothed random blobs; background + 1 foreground class), and writes benchmarks/results/metrics_cpu_latest.json.

    python benchmarks/bench_metrics.py [--size 128] [--repeats 5] [--device cpu]

Cases: Hausdorff-95 (medfast.metrics.hausdorff_distance vs monai.metrics.compute_hausdorff_distance, one-hot
(1, 2, S, S, S) masks, include_background=False, spacing (1.5, 1.0, 0.8)) on the blob pair (the target case),
on a near-identical pair (the blob against itself shifted by one voxel: a good segmentation) and on two
disjoint balls (surfaces far apart: the worst case for medfast's search), on a background + 8-class pair of
volumes tiled by smooth random regions (multiclass_pair: many large surfaces), and hard Dice
(medfast.metrics.dice on label maps vs monai.metrics.DiceMetric on the same label maps with num_classes=2).
Ratios are MONAI time / medfast time (> 1: medfast is faster).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

import medfast.metrics as mm

HERE = Path(__file__).resolve().parent


def timed_ms(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of fn() in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def blob(size: int, seed: int, shift: int) -> torch.Tensor:
    """A smooth random blob: a ball of radius ~size/3 with a low-frequency random boundary."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((size,) * 3), sigma=size / 16)
    noise /= noise.std()
    z, y, x = np.meshgrid(*[np.arange(size) - size / 2 for _ in range(3)], indexing="ij")
    r = np.sqrt((z - shift) ** 2 + y**2 + x**2) / (size / 3)
    return torch.from_numpy(r + 0.15 * noise < 1.0)


CLASSES = 9  # the multi-class case: background + 8 regions


def multiclass_pair(size: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two one-hot (1, classes, S, S, S) bool segmentations of a volume tiled by smooth random regions (the
    argmax of upsampled noise; each region spans the volume), the second from the same noise plus a weaker
    independent part: the boundaries move by a few voxels, as between a prediction and its label map."""
    g = torch.Generator().manual_seed(3)
    coarse = max(size // 8, 2)
    base = torch.randn(1, classes, coarse, coarse, coarse, generator=g)
    extra = torch.randn(1, classes, coarse, coarse, coarse, generator=g)

    def regions(noise: torch.Tensor) -> torch.Tensor:
        up = torch.nn.functional.interpolate(noise, size=(size,) * 3, mode="trilinear", align_corners=False)
        return torch.nn.functional.one_hot(up.argmax(1), classes).permute(0, 4, 1, 2, 3).contiguous().bool()

    return regions(base), regions(base + 0.3 * extra)


def make_cases(n: int, device: torch.device) -> tuple[dict[str, dict[str, Callable[[], Any]]], dict[str, Any]]:
    """The cases this script and ``test_bench_metrics.py`` (pytest-benchmark) time, on ``n``^3 masks on
    ``device``: ({case: {"medfast": fn, "monai": fn}}, the inputs); MONAI's calls only where it is installed."""
    pred_fg = blob(n, 1, 0).to(device)
    target_fg = blob(n, 2, n // 16).to(device)
    pred_1h = torch.stack([~pred_fg, pred_fg])[None]  # (1, 2, S, S, S) bool one-hot
    target_1h = torch.stack([~target_fg, target_fg])[None]
    pred_lab = pred_fg.long()[None]  # (1, S, S, S) label maps
    target_lab = target_fg.long()[None]
    spacing = (1.5, 1.0, 0.8)

    def one_hot(fg: torch.Tensor) -> torch.Tensor:
        return torch.stack([~fg, fg])[None]  # (1, 2, S, S, S) bool one-hot

    grid = torch.stack(torch.meshgrid(*[torch.arange(n)] * 3, indexing="ij"))
    ball_a = ((grid - n // 4) ** 2).sum(0) < (n // 6) ** 2
    ball_b = ((grid - 3 * n // 4) ** 2).sum(0) < (n // 5) ** 2
    seg_pred, seg_target = multiclass_pair(n, CLASSES)
    hd_pairs = {
        "hausdorff95": (pred_1h, target_1h),
        "hausdorff95 near-identical": (pred_1h, one_hot(torch.roll(pred_fg, 1, 0))),
        "hausdorff95 disjoint balls": (one_hot(ball_a.to(device)), one_hot(ball_b.to(device))),
        f"hausdorff95 {CLASSES - 1} classes": (seg_pred.to(device), seg_target.to(device)),
    }
    calls: dict[str, dict[str, Callable[[], Any]]] = {
        k: {"medfast": functools.partial(mm.hausdorff_distance, *pair, 95, spacing)} for k, pair in hd_pairs.items()}
    calls["dice"] = {"medfast": functools.partial(mm.dice, pred_lab, target_lab, 2)}
    if importlib.util.find_spec("monai") is not None:
        from monai.metrics import DiceMetric, compute_hausdorff_distance

        for k, pair in hd_pairs.items():
            calls[k]["monai"] = functools.partial(compute_hausdorff_distance, *pair, percentile=95,
                                                  spacing=list(spacing))
        dice_metric = DiceMetric(include_background=True, reduction="none", num_classes=2)
        calls["dice"]["monai"] = functools.partial(dice_metric, pred_lab[:, None], target_lab[:, None])
    return calls, {"pred_fg": pred_fg, "target_fg": target_fg, "spacing": spacing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    out = args.out or HERE / "results" / f"metrics_{device.type}_latest.json"

    n = args.size
    calls, inputs = make_cases(n, device)
    if any("monai" not in c for c in calls.values()):  # the runner reports the suite as skipped
        raise ModuleNotFoundError("No module named 'monai'", name="monai")
    pred_fg, target_fg, spacing = inputs["pred_fg"], inputs["target_fg"], inputs["spacing"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # per class (the foreground classes)
        hd_values = {k: {impl: fn()[0].tolist() for impl, fn in c.items()} for k, c in calls.items() if k != "dice"}
        hd_ours, hd_monai = hd_values["hausdorff95"]["medfast"][0], hd_values["hausdorff95"]["monai"][0]
        dice_ours, dice_monai = calls["dice"]["medfast"]().cpu(), calls["dice"]["monai"]().cpu()
        rows = {k: {impl: timed_ms(fn, args.repeats, device) for impl, fn in c.items()} for k, c in calls.items()}
    result = {
        "case": f"{n}^3 blob pair (background + 1 class), spacing {spacing}, device {device}",
        "host": platform.node(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "foreground_voxels": {"pred": int(pred_fg.sum()), "target": int(target_fg.sum())},
        "values": {
            **hd_values,
            "dice": {"medfast": dice_ours[0].tolist(), "monai": dice_monai[0].tolist()},
        },
        "ms": rows,
        "ratio_monai_over_medfast": {k: v["monai"] / v["medfast"] for k, v in rows.items()},
    }
    print(result["case"], f"({result['threads']} threads)")
    print(f"  HD95 medfast {hd_ours:.5f}  monai {hd_monai:.5f}; dice medfast {dice_ours[0].tolist()} "
          f"monai {dice_monai[0].tolist()}")
    for case, times in rows.items():
        ratio = times["monai"] / times["medfast"]
        print(f"  {case:12s} medfast {times['medfast']:9.2f} ms   monai {times['monai']:9.2f} ms   {ratio:.1f}x")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
