"""Exercises every CUDA kernel family of medfast once on small inputs, for compute-sanitizer:

    compute-sanitizer --tool memcheck --error-exitcode 3 python scripts/cuda_sanitize.py
    python scripts/cuda_sanitize.py --device cpu            # the same calls on the CPU launchers
    python scripts/cuda_sanitize.py --only loss --only lncc  # some families

Families (one line of output each): warp (warp / affine_warp / spline_coefficients / resample / compose /
integrate, forward and backward, every mode and padding, deterministic and not), loss (the fused Dice / CE /
Dice+CE over integer, (B, 1, *S) and soft targets, softmax and sigmoid, ignore_index, voxel and class
weights, batch Dice, float16/bfloat16/float32/float64 logits, 2D and 3D, 33 and 130 classes; forward and
backward), distance (distance_transform: mask dtypes, empty and all-foreground masks, anisotropic
spacing), metrics (hard Dice, Hausdorff / HD95 and surface distances: the seed-distance kernels, empty
masks, anisotropic and per-element spacing), lncc (forward and backward, 2D / 3D, every dtype),
ultrasound (ray_march; the simulator from raw property maps, a label map and a CT, linear / convex /
phased probes, forward and backward w.r.t. the tissue parameters and the probe pose; the backward once
more with the merged property-gradient scatter, MEDFAST_USSIM_CUDA_SCATTER=merged), loss_smem (600
classes: the loss launcher's opt-in shared-memory plan; last, because it crashed the process on an H200).

Inputs are tiny (memcheck slows kernels 10-100x): the whole run takes seconds without the sanitizer.
Exit status 0 when every family ran; 1 (after trying every family) when one raised.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
import warnings

import numpy as np
import torch

import medfast as mf

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _finite(name: str, x: torch.Tensor) -> None:
    """Cheap sanity check of a result (NaN/inf where none should be is a kernel bug worth a loud error)."""
    if not torch.isfinite(x).all():
        raise AssertionError(f"{name}: non-finite values in the result")


# ----------------------------------------------------------------------------------------------------
# warp family (csrc/warp): warp_forward / warp_backward / spline_prefilter
# ----------------------------------------------------------------------------------------------------


def check_warp(dev: torch.device) -> int:
    calls = 0
    for ndim, shape in [(2, (9, 7)), (3, (5, 6, 4))]:
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            image = torch.rand(2, 2, *shape, device=dev, dtype=dtype, requires_grad=True)
            pos = torch.float64 if dtype == torch.float64 else torch.float32
            ddf = (torch.randn(2, ndim, *shape, device=dev, dtype=pos) * 4).requires_grad_()
            with torch.no_grad():  # a NaN and a huge displacement: out-of-range taps must stay in bounds
                ddf[0, 0, 0] = float("nan")
                ddf[1, -1, -1] = 1e30
            for mode in ("nearest", "linear", "cubic"):
                for padding in ("zeros", "border", "reflection"):
                    for deterministic in (False, True):
                        torch.use_deterministic_algorithms(deterministic)
                        try:
                            out = mf.warp(image, ddf, mode=mode, padding=padding)
                            out.float().nan_to_num().sum().backward()
                        finally:
                            torch.use_deterministic_algorithms(False)
                        calls += 2
            theta = torch.eye(ndim, ndim + 1, device=dev, dtype=pos)[None].repeat(2, 1, 1)
            theta = (theta + 0.05 * torch.randn_like(theta)).requires_grad_()
            for mode in ("linear", "cubic"):
                out = mf.affine_warp(image, theta, shape=[3] * ndim, mode=mode)
                out.float().sum().backward()
                calls += 2
            # batch-1 field broadcast over a batch of 2 images, image-only and field-only gradients
            f1 = (torch.randn(1, ndim, *shape, device=dev, dtype=pos)).requires_grad_()
            mf.warp(image.detach(), f1, mode="linear").float().sum().backward()
            mf.warp(image, f1.detach(), mode="cubic", padding="reflection").float().sum().backward()
            calls += 4
        # spline coefficients (spline_prefilter forward + its transposed backward)
        x = torch.rand(2, 3, *shape, device=dev, dtype=torch.float64, requires_grad=True)
        for padding in ("zeros", "border", "reflection"):
            mf.spline_coefficients(x, padding=padding).sum().backward()
            calls += 2
        # world-space resampling and DDF composition / integration
        img = torch.rand(1, 2, *shape, device=dev, requires_grad=True)
        a_in = np.diag([1.5] * ndim + [1.0])
        a_out = np.diag([2.0] * ndim + [1.0])
        a_out[:ndim, ndim] = 0.7
        mf.resample(img, a_in, a_out, [4] * ndim, mode="cubic", padding="border").sum().backward()
        a = (torch.randn(2, ndim, *shape, device=dev) * 0.5).requires_grad_()
        b = (torch.randn(2, ndim, *shape, device=dev) * 0.5).requires_grad_()
        mf.compose(a, b).sum().backward()
        mf.integrate(a, steps=3).sum().backward()
        calls += 3 + 2 * 3 + 2 * 3
    # an empty output grid direction and a 1-voxel axis
    img = torch.rand(1, 1, 1, 5, 4, device=dev, requires_grad=True)
    flat = torch.zeros(1, 3, 1, 5, 4, device=dev, requires_grad=True)
    mf.warp(img, flat, mode="cubic", padding="reflection").sum().backward()
    return calls + 2


# ----------------------------------------------------------------------------------------------------
# loss family (csrc/loss): softmax_stats / soft_stats and their backward kernels
# ----------------------------------------------------------------------------------------------------


def _loss_call(fn, logits: torch.Tensor, target: torch.Tensor, **kw) -> None:
    z = logits.detach().clone().requires_grad_()
    out = fn(z, target, **kw)
    _finite(fn.__name__, out.detach().float())
    out.float().sum().backward()
    _finite(f"{fn.__name__} gradient", z.grad.float())


def check_loss(dev: torch.device) -> int:
    calls = 0
    gen = torch.Generator().manual_seed(1)
    for spatial in [(5, 7), (3, 4, 5)]:
        B, C = 2, 4
        for dtype in FLOATS:
            logits = (torch.randn(B, C, *spatial, generator=gen) * 3).to(dev, dtype)
            labels = torch.randint(0, C, (B, *spatial), generator=gen).to(dev)
            vw = torch.rand(B, *spatial, generator=gen).to(dev, torch.float64 if dtype == torch.float64
                                                            else torch.float32)
            ignored = labels.clone()
            ignored[:, 0] = 255
            soft = torch.softmax(torch.randn(B, C, *spatial, generator=gen), 1).to(dev, dtype)
            multi = (torch.rand(B, C, *spatial, generator=gen) > 0.6).to(dev, dtype)
            cases = [
                (mf.dice_ce_loss, labels, {}),
                (mf.dice_ce_loss, labels[:, None], {"batch_dice": True, "include_background": False}),
                (mf.dice_ce_loss, ignored, {"ignore_index": 255, "class_weight": [0.5, 1.0, 2.0, 0.0]}),
                (mf.dice_ce_loss, labels, {"voxel_weight": vw, "reduction": "sum", "lambda_dice": 0.3}),
                (mf.dice_ce_loss, soft, {}),  # soft (probability) targets, softmax
                (mf.dice_ce_loss, multi, {"activation": "sigmoid", "batch_dice": True}),
                (mf.dice_loss, labels, {"reduction": "none", "smooth": (0.0, 1e-5)}),
                (mf.dice_loss, ignored, {"ignore_index": 255, "voxel_weight": vw, "batch_dice": True}),
                (mf.dice_loss, multi, {"activation": "sigmoid", "voxel_weight": vw}),
                (mf.dice_loss, soft, {"class_weight": torch.tensor([1.0, 2.0, 0.5, 1.0])}),
                (mf.cross_entropy, labels, {}),
                (mf.cross_entropy, ignored, {"ignore_index": 255, "class_weight": [0.2, 1.0, 3.0, 1.0],
                                             "voxel_weight": vw}),
                (mf.cross_entropy, soft, {"reduction": "sum"}),
                (mf.cross_entropy, multi, {"activation": "sigmoid", "class_weight": [1.0, 0.5, 2.0, 1.0]}),
            ]
            for fn, target, kw in cases:
                _loss_call(fn, logits, target, **kw)
                calls += 2
            # one sigmoid channel (binary segmentation) and a non-contiguous (channels-last-like) view
            one = logits[:, :1].contiguous()
            _loss_call(mf.dice_ce_loss, one, (labels[:, None] > 1).to(dtype), activation="sigmoid")
            _loss_call(mf.dice_ce_loss, logits.transpose(-1, -2), labels.transpose(-1, -2))
            calls += 4
    # many classes: the CUDA launcher's shared-memory plans (256-thread and smaller blocks); the opt-in
    # plan (C = 600) is the separate family loss_smem, run last (it killed the process on an H200)
    for C in (33, 130):
        logits = torch.randn(1, C, 3, 4, 5, generator=gen).to(dev)
        labels = torch.randint(0, C, (1, 3, 4, 5), generator=gen).to(dev)
        _loss_call(mf.dice_ce_loss, logits, labels)
        _loss_call(mf.dice_ce_loss, logits, torch.softmax(torch.randn(1, C, 3, 4, 5, generator=gen), 1).to(dev))
        calls += 4
    # every voxel ignored: the sums are zero, the kernels must still read nothing out of range
    z = torch.randn(2, 3, 4, 5, device=dev, requires_grad=True)
    mf.dice_loss(z, torch.full((2, 4, 5), 255, device=dev), ignore_index=255).backward()
    calls += 2
    # the class-transposed label sums (MEDFAST_LOSS_CUDA_SUMS=warp; the CPU ignores the variable): label
    # targets with weights and ignored voxels, the dtypes, class counts across its block plans (256, 128
    # and 32 threads), and a volume whose last round is partly past its chunk
    with _env("MEDFAST_LOSS_CUDA_SUMS", "warp"):
        for C, spatial in ((4, (5, 7)), (33, (3, 4, 5)), (130, (3, 4, 5)), (7, (13, 11, 9))):
            labels = torch.randint(0, C + 1, (2, *spatial), generator=gen)
            labels[labels == C] = 255
            vw = torch.rand(2, *spatial, generator=gen).to(dev)
            for dtype in FLOATS:
                logits = (torch.randn(2, C, *spatial, generator=gen) * 3).to(dev, dtype)
                _loss_call(mf.dice_ce_loss, logits, labels.to(dev), ignore_index=255, voxel_weight=vw)
                calls += 2
        mf.dice_loss(z, torch.full((2, 4, 5), 255, device=dev), ignore_index=255).backward()
        calls += 2
    return calls


def check_loss_smem(dev: torch.device) -> int:
    """C = 600 classes: past the default 48 KiB of shared memory per block (the CUDA launcher's opt-in
    plan, or its error). Run last: on an H200 (torch 2.11, 2026-11-27) the forward of this case ended the
    process with SIGSEGV instead of returning or raising, which would hide the families after it."""
    gen = torch.Generator().manual_seed(6)
    C = 600
    logits = torch.randn(1, C, 3, 4, 5, generator=gen).to(dev)
    labels = torch.randint(0, C, (1, 3, 4, 5), generator=gen).to(dev)
    soft = torch.softmax(torch.randn(1, C, 3, 4, 5, generator=gen), 1).to(dev)
    with warnings.catch_warnings():  # past this GPU's shared memory: the PyTorch-ops sums, with a warning
        warnings.simplefilter("ignore")
        _loss_call(mf.dice_ce_loss, logits, labels)
        _loss_call(mf.dice_ce_loss, logits, soft)
    return 4


# ----------------------------------------------------------------------------------------------------
# distance family (csrc/distance): distance_transform
# ----------------------------------------------------------------------------------------------------


def check_distance(dev: torch.device) -> int:
    calls = 0
    gen = torch.Generator().manual_seed(2)
    for shape, spacing in [((3, 9, 7), (0.7, 2.5)), ((2, 5, 6, 4), (3.0, 0.5, 1.25)), ((1, 1, 6, 5), None)]:
        base = torch.rand(shape, generator=gen) > 0.7
        base[0] = False  # element 0: no foreground at all
        if shape[0] > 1:
            base[1] = True  # element 1: no background (the virtual background voxel)
        for mask_dtype in (torch.bool, torch.uint8, torch.int32, torch.float32, torch.float64):
            mask = base.to(dev, mask_dtype)
            for dtype in (torch.float32, torch.float64):
                out = mf.distance_transform(mask, spacing=spacing, dtype=dtype)
                _finite("distance_transform", out)
                calls += 1
        # a non-contiguous mask and a single float spacing
        out = mf.distance_transform(base.to(dev).transpose(-1, -2), spacing=1.5)
        _finite("distance_transform", out)
        calls += 1
    return calls


# ----------------------------------------------------------------------------------------------------
# metrics (plain torch over the distance kernels: seed_distances)
# ----------------------------------------------------------------------------------------------------


def check_metrics(dev: torch.device) -> int:
    from medfast.metrics import dice, hausdorff_distance, surface_distance

    calls = 0
    gen = torch.Generator().manual_seed(3)
    for spatial, spacing in [((12, 10), (0.8, 2.0)), ((8, 9, 7), (2.5, 0.9, 1.3))]:
        K = 3
        pred = torch.randint(0, K, (2, *spatial), generator=gen)
        target = torch.randint(0, K, (2, *spatial), generator=gen)
        pred[1][pred[1] == 2] = 0  # class 2 empty in pred of element 1 (inf / nan distances)
        target[0][target[0] == 1] = 0  # class 1 empty in target of element 0
        pred, target = pred.to(dev), target.to(dev)
        per_element = [list(spacing), [s * 1.5 for s in spacing]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the empty (batch, class) pairs warn, as in MONAI
            for pct in (None, 95, 50):
                hausdorff_distance(pred, target, pct, spacing, num_classes=K)
                hausdorff_distance(pred, target, pct, per_element, num_classes=K, directed=True,
                                   include_background=True)
                calls += 2
            for symmetric in (False, True):
                surface_distance(pred, target, spacing, num_classes=K, symmetric=symmetric)
                calls += 1
            # one-hot masks, and both masks empty for every class
            oh_p = torch.nn.functional.one_hot(pred, K).movedim(-1, 1).bool()
            oh_t = torch.nn.functional.one_hot(target, K).movedim(-1, 1).to(torch.uint8)
            hausdorff_distance(oh_p, oh_t, 95, spacing)
            surface_distance(oh_p, oh_t, spacing, symmetric=True)
            empty = torch.zeros_like(pred)
            hausdorff_distance(empty, empty, 95, spacing, num_classes=K)
            surface_distance(empty, target, spacing, num_classes=K)
            calls += 4
        d = dice(pred, target, K)
        dice(pred, target, K, ignore_index=K, include_background=False, ignore_empty=False)
        assert d.shape == (2, K)
        calls += 2
    return calls


# ----------------------------------------------------------------------------------------------------
# lncc family (csrc/lncc): lncc / lncc_backward
# ----------------------------------------------------------------------------------------------------


def check_lncc(dev: torch.device) -> int:
    calls = 0
    gen = torch.Generator().manual_seed(4)
    for spatial, kernel in [((11, 9), 5), ((6, 7, 5), 3), ((6, 7, 5), (3, 5, 7)), ((4, 3, 5), 9)]:
        for dtype in FLOATS:
            p = torch.rand(2, 2, *spatial, generator=gen).to(dev, dtype).requires_grad_()
            t = torch.rand(2, 2, *spatial, generator=gen).to(dev, dtype).requires_grad_()
            for reduction in ("mean", "none"):
                loss = mf.lncc_loss(p, t, kernel_size=kernel, reduction=reduction)
                _finite("lncc_loss", loss.detach())
                loss.sum().backward()
                calls += 2
            # gradient w.r.t. one input only, and a constant image (zero local variance)
            mf.local_ncc(p, t.detach(), kernel_size=kernel, smooth_nr=1e-5).sum().backward()
            flat = torch.ones(2, 2, *spatial, device=dev, dtype=dtype)
            mf.lncc_loss(p, flat, kernel_size=kernel).backward()
            calls += 4
    return calls


# ----------------------------------------------------------------------------------------------------
# ultrasound family (csrc/ussim): ussim_march (+ backward), ussim_march_lines (+ backward), ussim_psf
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _env(name: str, value: str):
    """Sets environment variable name to value inside the block, then restores it (or its absence)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before



def check_ultrasound(dev: torch.device) -> int:
    from medfast.ultrasound import (
        LabelTable,
        Probe,
        hu_to_properties,
        look_at,
        noise_table,
        ray_march,
        simulate,
        simulate_ct,
        simulate_labels,
    )

    calls = 0
    gen = torch.Generator().manual_seed(5)
    # the raw op: props (channels last) and coordinates, both differentiable, float32 and float64
    for dtype in (torch.float32, torch.float64):
        shape = (4, 5, 6)
        props = torch.empty(1, *shape, 5, dtype=dtype)
        props[..., 0] = 1.2 + torch.rand(1, *shape, generator=gen, dtype=dtype)
        props[..., 1] = torch.rand(1, *shape, generator=gen, dtype=dtype)
        props[..., 2] = 0.2 + torch.rand(1, *shape, generator=gen, dtype=dtype)
        props[..., 3] = torch.rand(1, *shape, generator=gen, dtype=dtype)
        props[..., 4] = 0.3 * torch.rand(1, *shape, generator=gen, dtype=dtype)
        start = torch.tensor([-1.0, 0.4, 0.2], dtype=dtype) + torch.rand(2, 3, 1, 3, generator=gen, dtype=dtype)
        coords = start + torch.arange(12, dtype=dtype)[:, None] * torch.tensor([0.51, 0.37, 0.43], dtype=dtype)
        p = props.to(dev).requires_grad_()
        c = coords.to(dev).requires_grad_()
        G = [0.7, 0.1, 0.0, 0.05, 0.0, 0.8, 0.2, 0.1, 0.1, 0.0, 0.9, 0.3]
        for sharp in (1.0, 2.5):
            out = ray_march(p, c, noise_table(3, rows=64, device=dev), G, 0.05, [1.5, 0.1, 0.5, 0.3, 0.1], 3, sharp)
            _finite("ray_march", out.detach())
            (out * torch.randn_like(out)).sum().backward()
            calls += 2
    march_props, march_coords = p.detach(), c.detach()  # float64, for the merged scatter below

    # the simulator: a small inhomogeneous volume, three probe geometries, three tissue inputs
    D = 10
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = -13.5
    labels = torch.zeros(1, 1, D, D, D, dtype=torch.long)
    labels[..., 5:] = 1
    labels[..., 2:4, 3:7, 3:7] = 2
    ct = torch.where(labels == 1, 900.0, torch.where(labels == 2, -80.0, 40.0)).float()
    probes = [Probe.preset("L11-5v", n_lines=8, n_samples=32, depth_mm=12.0),
              Probe.preset("C5-2v", n_lines=8, n_samples=32, depth_mm=20.0),
              Probe.preset("P4-2v", n_lines=8, n_samples=32, depth_mm=20.0)]
    poses = torch.stack([look_at((0.0, 0.0, -8.0), (0.0, 0.05, 1.0), (1.0, 0.0, 0.0)),
                         look_at((1.0, -1.0, -9.0), (0.1, 0.0, 1.0), (0.0, 1.0, 0.0))]).float()
    for probe in probes:
        # raw property maps, w.r.t. the maps and the pose; speckle on and off; return_lines (IQ, envelope)
        props = hu_to_properties(ct).detach().to(dev).requires_grad_()
        pose = poses.to(dev).requires_grad_()
        for speckle, sub_rays in ((True, 2), (False, 1)):
            res = simulate(props, affine, pose, probe, sub_rays=sub_rays, speckle=speckle, return_lines=True,
                           seed=7)
            _finite("simulate bmode", res.bmode.detach())
            (res.lines_db.sum() + res.envelope.sum() + res.bmode.sum()).backward()
            calls += 2
        assert props.grad is not None and pose.grad is not None
        # a label map with a trainable table (the tissue parameters)
        table = LabelTable({0: (1.5, 0.3, 1.0, 0.2, 0.05), 1: (1.7, 0.6, 0.8, 0.4, 0.1),
                            2: (1.45, 0.1, 0.2, 0.1, 0.02)})
        values = table.values.clone().to(dev).requires_grad_()
        res = simulate_labels(labels.to(dev), LabelTable(values), affine, poses.to(dev), probe)
        res.bmode.sum().backward()
        assert values.grad is not None
        # a CT in Hounsfield units, differentiable in the CT and the pose, in float64
        ct64 = ct.double().to(dev).requires_grad_()
        pose64 = poses.double().to(dev).requires_grad_()
        res = simulate_ct(ct64, affine, pose64, probe, sub_rays=1, tgc_db_cm_mhz=0.0)
        res.lines_db.sum().backward()
        calls += 4
    # a batch of volumes (one per pose), without autograd (the in-place path), probe outside the volume
    vols = hu_to_properties(torch.cat([ct, ct.flip(-1)])).to(dev)
    far = poses.clone()
    far[1, :3, 3] += torch.tensor([200.0, 0.0, 0.0])
    with torch.no_grad():
        simulate(vols, affine, far.to(dev), probes[1], sub_rays=3)
    calls += 1
    # the backward with the merged property-gradient scatter (CUDA: scatter_merged_kernel after the ray
    # backward, lines_scatter_merged_kernel after the lines backward; the CPU ignores the variable): raw
    # ray_march, and the simulator over one volume per pose with a pose partly outside the volume
    with _env("MEDFAST_USSIM_CUDA_SCATTER", "merged"):
        p = march_props.clone().requires_grad_()
        out = ray_march(p, march_coords, noise_table(3, rows=64, device=dev), G, 0.05, [1.5, 0.1, 0.5, 0.3, 0.1], 3,
                        2.5)
        (out * torch.randn_like(out)).sum().backward()
        _finite("ray_march merged-scatter gradient", p.grad)
        v = vols.clone().requires_grad_()
        simulate(v, affine, far.to(dev), probes[1], sub_rays=3).bmode.sum().backward()
        _finite("simulate merged-scatter gradient", v.grad)
        calls += 2
    return calls


FAMILIES = {
    "warp": check_warp,
    "loss": check_loss,
    "distance": check_distance,
    "metrics": check_metrics,
    "lncc": check_lncc,
    "ultrasound": check_ultrasound,
    "loss_smem": check_loss_smem,  # last: see its docstring
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--only", action="append", choices=list(FAMILIES), metavar="FAMILY",
                        help=f"run only this family (repeatable): {', '.join(FAMILIES)}")
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            print("cuda_sanitize: no CUDA GPU visible (use --device cpu)", file=sys.stderr)
            return 2
        if not mf.build_info()["cuda_kernels"]:
            print("cuda_sanitize: medfast was built without CUDA kernels (MEDFAST_CUDA=1 pip install -e .)",
                  file=sys.stderr)
            return 2
    torch.manual_seed(0)
    failed = []
    t_all = time.perf_counter()
    for name in args.only or list(FAMILIES):
        t0 = time.perf_counter()
        try:
            calls = FAMILIES[name](dev)
            _sync(dev)
        except Exception:  # noqa: BLE001 - report every family, then fail
            traceback.print_exc()
            print(f"cuda_sanitize: {name:<10} FAILED ({time.perf_counter() - t0:.2f} s)", flush=True)
            failed.append(name)
            continue
        print(f"cuda_sanitize: {name:<10} ok  {calls:4d} op calls  {time.perf_counter() - t0:6.2f} s",
              flush=True)
    torch.use_deterministic_algorithms(False)
    if failed:
        print(f"cuda_sanitize: FAILED families: {', '.join(failed)} on {dev}")
        return 1
    print(f"cuda_sanitize: all kernels ran on {dev} ({time.perf_counter() - t_all:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
