"""GPU checks of the training framework: a few real training steps of each task through the generic Trainer,
with and without mixed precision, plus a torchrun (DDP) launch; writes one JSON file and prints a table.

    python scripts/gpu_train_check.py --device cuda --out out/gpu/train_check
    python scripts/gpu_train_check.py --device cpu --small --out /tmp/train_check   # the logic, on a CPU

Checks (``--only NAME``, repeatable):

seg_none, seg_bf16, seg_fp16
    3D segmentation (the segmentation task: UNet + fused Dice+CE, on-device augmentation) with
    ``trainer.amp`` none, bf16 and fp16 (the trainer's GradScaler). The trainer uses autocast on CUDA only:
    on the CPU all three run in float32 (``amp_effective`` says so).
reg_bf16
    3D registration (the registration task: LocalNet + warp + LNCC + bending energy + label Dice) with bf16.
cls_sim
    Classification of simulated ultrasound rendered on the fly on the training device (the classification
    task, ``data.dataset=simulated_ultrasound`` with synthetic phantom brains): step time against the
    rendering time, images/s.
cls_sim_thread
    The same with ``MEDFAST_USSIM_CUDA_MARCH=thread`` (one thread per line instead of the default
    warp-cooperative CUDA march).
cls_sim_eager
    The same with the renderer's CUDA graphs off (``cuda_graphs=False``: one eager simulation per
    (volume, probe) group), against which ``cls_sim`` (one graph replay per batch) is compared.
ddp_shared
    ``torchrun --nproc_per_node=2`` of ``medfast train`` with ``MEDFAST_DIST_BACKEND=gloo``: two processes
    that may share one GPU, so the trainer's own multi-process path runs on a one-GPU machine.
ddp
    ``torchrun --standalone --nproc_per_node=N -m medfast train CONFIG`` of the classification task (the
    trainer's own torchrun/DDP path: NCCL on CUDA, gloo on the CPU), then a DDP probe under torchrun: one
    process group (NCCL / gloo), the segmentation UNet wrapped in DistributedDataParallel, bf16 autocast
    on CUDA, the Dice loss's differentiable all-reduce (``ddp_sync``) and a gradient all-reduce. With one
    GPU, N = 1, and the trainer then (by design) creates no process group: only the probe exercises NCCL.

Data are synthetic and made in memory (blobs for segmentation and registration, phantom brains for the
simulator), so nothing is downloaded and nibabel is not needed. Needs: torch, numpy, PyYAML, tqdm (and
matplotlib only if present; plots are off). For each check the JSON records the losses, whether they are
finite and decreasing (mean of the last third below the first third), ms/step (median after two warm-up
steps), peak GPU memory, the dtype of the network's output (evidence that autocast was active), and the
GradScaler's scale. Exit status 1 if a check failed or produced a non-finite loss.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKS = ("seg_none", "seg_bf16", "seg_fp16", "reg_bf16", "cls_sim", "cls_sim_thread", "cls_sim_eager", "ddp",
          "ddp_shared")


# ------------------------------------------------------------------------------------------------------
# synthetic data (in memory; items in the format of medfast.data.NiftiDataset)
# ------------------------------------------------------------------------------------------------------


def make_blobs(n: int, shape: tuple[int, ...], classes: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` subjects: ``classes - 1`` random ellipsoids on a background, intensity = class + noise (z-scored)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float32)
    items = []
    for i in range(n):
        lab = np.zeros(shape, dtype=np.int64)
        for c in range(1, classes):
            centre = rng.uniform(0.3, 0.7, len(shape)) * np.asarray(shape)
            radii = rng.uniform(0.15, 0.3, len(shape)) * np.asarray(shape)
            lab[(((grid - centre) / radii) ** 2).sum(-1) <= 1] = c
        img = lab.astype(np.float32) + rng.normal(0, 0.3, shape).astype(np.float32)
        img = (img - img.mean()) / img.std()
        items.append({"image": torch.from_numpy(img)[None].contiguous(), "label": torch.from_numpy(lab),
                      "affine": torch.eye(4, dtype=torch.float64), "files": f"synthetic:blob_{i:03d}", "index": i})
    return items


class MemoryDataset(torch.utils.data.Dataset):
    """Subjects held in memory; ``ds[(i, seed)]`` adds the sampler's augmentation seed, as NiftiDataset."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        item = dict(self.items[int(i)])
        if seed is not None:
            item["seed"] = int(seed)
        return item


def _record_output_dtype(model: torch.nn.Module, store: dict) -> torch.nn.Module:
    def hook(_module, _inputs, output):
        out = output
        while isinstance(out, (list, tuple)):
            out = out[-1]
        if isinstance(out, torch.Tensor) and "output_dtype" not in store:
            store["output_dtype"] = str(out.dtype).replace("torch.", "")

    model.register_forward_hook(hook)
    return model


def _tasks():
    """Subclasses of the real tasks that only swap the NIfTI data for in-memory subjects (and record the
    network's output dtype, and the classification task's rendering time)."""
    from medfast.tasks.classification.task import ClassificationTask
    from medfast.tasks.registration import RegistrationTask
    from medfast.tasks.segmentation import SegmentationTask

    class RecordsOutputDtype:  # mixin: self.record gets the network output's dtype
        subjects: list[dict[str, Any]] = []

        def __init__(self, config) -> None:
            super().__init__(config)
            self.record: dict[str, Any] = {}

        def build_model(self):
            return _record_output_dtype(super().build_model(), self.record)

    class MemorySegmentation(RecordsOutputDtype, SegmentationTask):
        def build_datasets(self):
            return MemoryDataset(self.subjects), None

    class MemoryRegistration(RecordsOutputDtype, RegistrationTask):
        def _subjects(self, images, labels):  # names "synthetic:blob_XXX" -> the in-memory subjects
            by_name = {s["files"]: s for s in self.subjects}
            return MemoryDataset([by_name[name] for name in images])

        def build_datasets(self):  # the label Dice's class count reads label FILES (none here): from memory
            train, val = super().build_datasets()
            self.num_classes = max(2, 1 + max(int(s["label"].max()) for s in self.subjects))
            return train, val

    class TimedClassification(RecordsOutputDtype, ClassificationTask):
        def __init__(self, config) -> None:
            super().__init__(config)
            self.render_s: list[float] = []
            self.graphs = True

        def images(self, batch, device):
            if self.source is not None and not self.graphs:
                self.source.cuda_graphs = False
            _sync(device)
            t0 = time.perf_counter()
            out = super().images(batch, device)
            _sync(device)
            self.render_s.append(time.perf_counter() - t0)
            return out

    return MemorySegmentation, MemoryRegistration, TimedClassification


# ------------------------------------------------------------------------------------------------------
# configurations
# ------------------------------------------------------------------------------------------------------


def _trainer_keys(out_dir: Path, device: str, steps: int, batch: int, amp: str) -> list[str]:
    return [f"trainer.out_dir={out_dir}", f"trainer.device={device}", f"trainer.max_steps={steps}",
            f"trainer.batch_size={batch}", f"trainer.amp={amp}", "trainer.val_every=0", "trainer.checkpoint_every=0",
            "trainer.progress=false", "trainer.tensorboard=false", "trainer.plots=false", "trainer.log_every=1"]


def seg_config(out_dir: Path, device: str, steps: int, amp: str, small: bool):
    from medfast.train import load_config

    patch = [16, 16, 16] if small else [64, 64, 64]
    chans = [4, 8, 16] if small else [16, 32, 64, 128]
    return load_config([], _trainer_keys(out_dir, device, steps, 2, amp) + [
        "task=segmentation", "data.train_images=[synthetic:blob_000]", "data.train_labels=[synthetic:blob_000]",
        f"augment.patch_size={patch}", "augment.rotation=10.0", "augment.deform_grid=4", "augment.deform_magnitude=1.0",
        f"model.channels={chans}", "model.out_channels=3", "model.norm=instance", "optim.lr=0.01",
        "optim.scheduler=constant"])


def reg_config(out_dir: Path, device: str, steps: int, amp: str, small: bool, names: list[str]):
    from medfast.train import load_config

    shape = [16, 16, 16] if small else [64, 64, 64]
    chans = [4, 8, 16] if small else [16, 32, 64, 128]
    return load_config([], _trainer_keys(out_dir, device, steps, 2, amp) + [
        "task=registration", f"data.train_images={names}", f"data.train_labels={names}", f"data.shape={shape}",
        "data.normalize=none", "model.name=localnet", f"model.channels={chans}", "augment.rotation=6.0",
        "augment.scale=0.05", "augment.deform_magnitude=2.0", "augment.deform_grid=4", "augment.gamma=0.0",
        "augment.intensity_scale=0.0", "augment.intensity_shift=0.0", "augment.noise_std=0.0", "optim.lr=0.003",
        "optim.scheduler=constant", "task_args={kernel_size: 7, bending_weight: 0.5, dice_weight: 1.0}"])


def cls_keys(small: bool) -> list[str]:
    if small:
        sim = ("{volumes: ['phantom:1', 'phantom:2'], val_volumes: [], n_lines: 32, n_samples: 64, sub_rays: 1, "
               "voxel_mm: 3.0, variants: 2, samples_per_epoch: 64}")
        shape, blocks = [32, 32], "[2, 2]"
    else:
        sim = ("{volumes: ['phantom:1', 'phantom:2'], val_volumes: [], probes: [C5-2v, P4-2v], depth_mm: 90, "
               "n_lines: 64, n_samples: 128, sub_rays: 2, voxel_mm: 2.0, variants: 3, samples_per_epoch: 1024}")
        shape, blocks = [64, 64], "[3, 4]"
    return ["task=classification", "data.dataset=simulated_ultrasound", f"data.shape={shape}",
            "data.normalize=none", f"data.dataset_args={sim}", "model.name=densenet", "model.spatial_dims=2",
            "model.in_channels=1", "model.out_channels=4", "model.channels=[16]",
            f"model.kwargs={{growth_rate: 8, blocks: {blocks}, bn_size: 2, stem_stride: 2, stem_pool: true}}",
            "optim.lr=0.003", "optim.scheduler=constant"] + ([] if small else ["data.num_workers=2"])
    # (on a GPU the loader workers compute the render inputs, the poses, off the training process)


def cls_config(out_dir: Path, device: str, steps: int, amp: str, small: bool, batch: int):
    from medfast.train import load_config

    return load_config([], _trainer_keys(out_dir, device, steps, batch, amp) + cls_keys(small))


# ------------------------------------------------------------------------------------------------------
# running one check
# ------------------------------------------------------------------------------------------------------


def _sync(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summary(losses: list[float], seconds: list[float]) -> dict[str, Any]:
    finite = bool(losses) and all(math.isfinite(v) for v in losses)
    k = max(1, len(losses) // 3)
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    timed = seconds[2:] if len(seconds) > 3 else seconds
    return {"steps": len(losses), "losses": [round(v, 6) for v in losses], "finite": finite,
            "first_loss": first, "last_loss": last, "decreasing": finite and last < first,
            "ms_per_step": 1000 * statistics.median(timed) if timed else None,
            "ms_per_step_first": 1000 * seconds[0] if seconds else None}


def run_trainer_check(name: str, config, task, device: torch.device) -> dict[str, Any]:
    from medfast.train import Trainer

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(config, task=task)
    t0 = time.perf_counter()
    trainer.fit()
    _sync(device)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (Path(config.trainer.out_dir) / "train_log.jsonl").read_text().splitlines()]
    out = _summary([r["loss"] for r in rows], [r["seconds"] for r in rows])
    out.update(
        check=name, task=config.task, amp_requested=config.trainer.amp,
        amp_effective=str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "none",
        grad_scaler=trainer.scaler.is_enabled(),
        grad_scale=float(trainer.scaler.get_scale()) if trainer.scaler.is_enabled() else None,
        output_dtype=task.record.get("output_dtype"), batch_size=config.trainer.batch_size,
        wall_s=wall,
        peak_gpu_mem_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    )
    return out


def check_seg(amp: str, args, device: torch.device, work: Path) -> dict[str, Any]:
    Seg, _, _ = _tasks()
    cfg = seg_config(work / f"seg_{amp}", str(device), args.steps, amp, args.small)
    shape = (24, 24, 24) if args.small else (96, 96, 96)
    Seg.subjects = make_blobs(4, shape, 3, seed=1)
    cfg.data.train_images = cfg.data.train_labels = [s["files"] for s in Seg.subjects]
    out = run_trainer_check(f"seg_{amp}", cfg, Seg(cfg), device)
    out.update(volume=list(shape), patch=cfg.augment.patch_size, channels=cfg.model.channels)
    return out


def check_reg(args, device: torch.device, work: Path) -> dict[str, Any]:
    _, Reg, _ = _tasks()
    shape = (16, 16, 16) if args.small else (64, 64, 64)
    Reg.subjects = make_blobs(3, shape, 3, seed=2)
    names = [s["files"] for s in Reg.subjects]
    cfg = reg_config(work / "reg_bf16", str(device), args.steps, "bf16", args.small, names)
    out = run_trainer_check("reg_bf16", cfg, Reg(cfg), device)
    out.update(volume=list(shape), channels=cfg.model.channels)
    return out


def check_cls(args, device: torch.device, work: Path, march: str | None = None, graphs: bool = True) -> dict[str, Any]:
    """The classification check; ``march``: MEDFAST_USSIM_CUDA_MARCH for its rendering (None: default);
    ``graphs``: the renderer's CUDA graphs."""
    _, _, Cls = _tasks()
    batch = 8 if args.small else 64
    name = "cls_sim" + (f"_{march}" if march else "") + ("" if graphs else "_eager")
    cfg = cls_config(work / name, str(device), args.steps, "auto", args.small, batch)
    task = Cls(cfg)
    task.graphs = graphs
    before = os.environ.get("MEDFAST_USSIM_CUDA_MARCH")
    if march is not None:
        os.environ["MEDFAST_USSIM_CUDA_MARCH"] = march
    try:
        out = run_trainer_check(name, cfg, task, device)
    finally:
        if before is None:
            os.environ.pop("MEDFAST_USSIM_CUDA_MARCH", None)
        else:
            os.environ["MEDFAST_USSIM_CUDA_MARCH"] = before
    render = task.render_s[: out["steps"]]
    timed = render[2:] if len(render) > 3 else render
    ms_render = 1000 * statistics.median(timed) if timed else None
    out.update(image_shape=cfg.data.shape, n_lines=cfg.data.dataset_args["n_lines"],
               n_samples=cfg.data.dataset_args["n_samples"], sub_rays=cfg.data.dataset_args["sub_rays"],
               ms_render_per_step=ms_render, cuda_graphs=bool(task.source and task.source.cuda_graphs),
               graph_replays=task.source.graph_replays if task.source is not None else 0,
               render_fraction=ms_render / out["ms_per_step"] if ms_render and out["ms_per_step"] else None,
               images_per_s=1000 * batch / out["ms_per_step"] if out["ms_per_step"] else None,
               render_images_per_s=1000 * batch / ms_render if ms_render else None)
    return out


# ------------------------------------------------------------------------------------------------------
# DDP: torchrun of `medfast train`, and the NCCL/gloo probe
# ------------------------------------------------------------------------------------------------------


def _torchrun(nproc: int, cmd: list[str], log: Path, timeout: float,
              extra_env: dict[str, str] | None = None) -> tuple[int, float, str]:
    full = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1",
               **(extra_env or {}))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, env=env)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, text = 124, f"timed out after {timeout} s\n{exc.stdout or ''}{exc.stderr or ''}"
    log.write_text(" ".join(full) + "\n\n" + text)
    return rc, time.perf_counter() - t0, text


def _torchrun_train_cmd(args, device: torch.device, work: Path, name: str) -> tuple[Path, list[str]]:
    """(run folder, torchrun arguments) of a short `medfast train` of the small classification config."""
    import yaml

    run_dir = work / f"{name}_train"
    cfg = {"trainer": {"max_steps": args.steps, "batch_size": 4, "val_every": 0, "checkpoint_every": 0,
                       "progress": False, "tensorboard": False, "plots": False, "amp": "bf16", "threads": 1}}
    cfg_path = work / f"{name}_cls.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    overrides = [a for k in cls_keys(small=True) for a in ("--set", k)]
    return run_dir, ["-m", "medfast", "train", str(cfg_path), *overrides, "--device", device.type, "--out",
                     str(run_dir)]


def check_ddp(args, device: torch.device, work: Path) -> dict[str, Any]:
    if args.nproc:
        nproc = args.nproc
    elif device.type == "cuda":
        nproc = max(1, min(2, torch.cuda.device_count()))
    else:
        nproc = 2
    run_dir, cmd = _torchrun_train_cmd(args, device, work, "ddp")
    rc, wall, text = _torchrun(nproc, cmd, work / "ddp_train.log", args.ddp_timeout)
    out: dict[str, Any] = {"check": "ddp", "nproc_per_node": nproc, "backend": "nccl" if device.type == "cuda"
                           else "gloo", "train_rc": rc, "train_wall_s": wall, "log": str(work / "ddp_train.log")}
    res_path = run_dir / "results.json"
    if rc == 0 and res_path.is_file():
        res = json.loads(res_path.read_text())
        rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
        out.update(_summary([r["loss"] for r in rows], [r["seconds"] for r in rows]))
        out.update(world_size=res.get("world_size"), amp_effective=res.get("amp"), device=res.get("device"),
                   trainer_ddp=res.get("world_size", 1) > 1)
        if not out["trainer_ddp"]:
            out["note"] = ("one process: WORLD_SIZE=1, so the trainer creates no process group (by design); "
                           "the DDP probe below exercises the backend")
    else:
        out.update(finite=False, error=text[-2000:])
    # the probe: process group + DDP wrapper + differentiable all-reduce, under torchrun
    probe_json = work / "ddp_probe.json"
    rc2, wall2, text2 = _torchrun(nproc, [str(Path(__file__).resolve()), "--ddp-probe", "--device", device.type,
                                          "--out", str(probe_json), *(["--small"] if args.small else [])],
                                  work / "ddp_probe.log", args.ddp_timeout)
    out.update(probe_rc=rc2, probe_wall_s=wall2)
    if rc2 == 0 and probe_json.is_file():
        out["probe"] = json.loads(probe_json.read_text())
    else:
        out["probe_error"] = text2[-2000:]
    probe_ok = rc2 == 0 and out.get("probe", {}).get("finite", False)
    out["finite"] = bool(out.get("finite")) and probe_ok
    out["ok"] = rc == 0 and out["finite"]
    return out


def check_ddp_shared(args, device: torch.device, work: Path) -> dict[str, Any]:
    """Two processes of ``medfast train`` under torchrun on however many GPUs there are (one is enough):
    gloo (``MEDFAST_DIST_BACKEND=gloo``) lets them share a GPU, so the trainer's multi-process path
    (process group, DDP over CUDA parameters, the distributed sampler, rank-0 logging) runs on a
    one-GPU machine, where the ``ddp`` check's world size is 1."""
    nproc = 2
    run_dir, cmd = _torchrun_train_cmd(args, device, work, "ddp_shared")
    rc, wall, text = _torchrun(nproc, cmd, work / "ddp_shared_train.log", args.ddp_timeout,
                               {"MEDFAST_DIST_BACKEND": "gloo"})
    out: dict[str, Any] = {"check": "ddp_shared", "nproc_per_node": nproc, "backend": "gloo", "train_rc": rc,
                           "train_wall_s": wall, "log": str(work / "ddp_shared_train.log"),
                           "gpus": torch.cuda.device_count() if device.type == "cuda" else 0}
    res_path = run_dir / "results.json"
    if rc == 0 and res_path.is_file():
        res = json.loads(res_path.read_text())
        rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
        out.update(_summary([r["loss"] for r in rows], [r["seconds"] for r in rows]))
        out.update(world_size=res.get("world_size"), amp_effective=res.get("amp"), device=res.get("device"))
        out["ok"] = out["world_size"] == nproc and bool(out.get("finite"))
    else:
        out.update(finite=False, ok=False, error=text[-2000:])
    return out


def _nccl_version() -> str:
    v = torch.cuda.nccl.version()
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def ddp_probe(args) -> int:
    """Runs inside torchrun: one process group over all ranks, the segmentation UNet in DDP, three steps of
    the real segmentation loss plus the batch-Dice loss with ``ddp_sync`` (differentiable all-reduce)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import medfast as mf

    Seg, _, _ = _tasks()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(1)
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = seg_config(Path(tmp), str(device), 3, "bf16", args.small)
    Seg.subjects = make_blobs(2 * world, (24, 24, 24) if args.small else (64, 64, 64), 3, seed=3)
    task = Seg(cfg)
    model = DDP(task.build_model().to(device), device_ids=[local] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    from medfast.data import collate

    patch = cfg.augment.patch_size
    losses, times = [], []
    for step in range(3):
        keys = [(rank + world * k, 100 * step + rank + world * k) for k in range(2)]  # this rank's half
        batch = collate([MemoryDataset(Seg.subjects)[key] for key in keys])
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        image, label = batch["image"].to(device), batch["label"].to(device)
        image, label = task.augment(image.float(), label, batch["seed"], patch)  # as the task's training_step
        with amp:
            logits = model(image)
        loss = task._loss(logits, label)
        synced = mf.dice_loss(logits.float(), label, batch_dice=True, ddp_sync=True)  # all-reduced sums
        total = loss + 0.1 * synced
        total.backward()
        opt.step()
        value = total.detach().reshape(1).float()
        dist.all_reduce(value)
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(value.item() / world)
    grads_equal = True
    if world > 1:  # DDP averaged the gradients: every rank holds the same parameters
        p = next(model.parameters()).detach().flatten()[:64].float().clone()
        ref = p.clone()
        dist.broadcast(ref, 0)
        grads_equal = bool(torch.equal(p, ref))
    if rank == 0:
        Path(args.out).write_text(json.dumps({
            "backend": backend, "world_size": world,
            "nccl_version": _nccl_version() if device.type == "cuda" else None,
            "losses": losses, "finite": all(math.isfinite(v) for v in losses),
            "ms_per_step": 1000 * statistics.median(times[1:]), "params_equal_across_ranks": grads_equal,
            "output_dtype": task.record.get("output_dtype")}, indent=2))
    dist.barrier()
    dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(results: list[dict[str, Any]]) -> None:
    head = f"{'check':<10} {'amp':<9} {'out':<9} {'finite':<6} {'decr':<5} {'loss first->last':<19} " \
           f"{'ms/step':>8} {'peak MB':>8}  extra"
    print(head)
    print("-" * len(head))
    for r in results:
        if "error" in r and "steps" not in r:
            print(f"{r['check']:<10} ERROR: {r['error'].strip().splitlines()[-1][:90]}")
            continue
        extra = ""
        if r["check"].startswith("cls_sim"):
            extra = (f"render {_fmt(r.get('ms_render_per_step'), '.1f')} ms/step "
                     f"({_fmt(r.get('render_fraction'), '.0%')}), {_fmt(r.get('images_per_s'), '.0f')} img/s "
                     f"(render alone {_fmt(r.get('render_images_per_s'), '.0f')} img/s)")
        elif r["check"] == "ddp":
            probe = r.get("probe") or {}
            extra = (f"nproc {r['nproc_per_node']} world {r.get('world_size')} rc {r['train_rc']}; probe "
                     f"{probe.get('backend', '?')} world {probe.get('world_size')} rc {r.get('probe_rc')}")
        elif r.get("grad_scaler"):
            extra = f"GradScaler scale {r.get('grad_scale')}"
        loss = f"{_fmt(r.get('first_loss'), '.4g')} -> {_fmt(r.get('last_loss'), '.4g')}"
        print(f"{r['check']:<10} {str(r.get('amp_effective', '-')):<9} {str(r.get('output_dtype', '-')):<9} "
              f"{str(r.get('finite')):<6} {str(r.get('decreasing')):<5} {loss:<19} "
              f"{_fmt(r.get('ms_per_step'), '8.1f')} {_fmt(r.get('peak_gpu_mem_mb'), '8.0f')}  {extra}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", default="out/gpu/train_check", help="output folder (train_check.json, logs, runs)")
    p.add_argument("--small", action="store_true", help="small sizes (for a CPU run)")
    p.add_argument("--steps", type=int, default=None, help="training steps per check (default 15; 8 with --small)")
    p.add_argument("--only", action="append", choices=CHECKS, metavar="CHECK", help=f"one of {', '.join(CHECKS)}")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes for the ddp check (default: min(2, GPUs) on cuda, 2 on the CPU)")
    p.add_argument("--ddp-timeout", type=float, default=240.0, help="seconds per torchrun launch")
    p.add_argument("--ddp-probe", action="store_true", help=argparse.SUPPRESS)  # internal: run under torchrun
    args = p.parse_args(argv)
    if args.ddp_probe:
        return ddp_probe(args)
    args.steps = args.steps or (8 if args.small else 15)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_train_check: no CUDA GPU visible (use --device cpu)", file=sys.stderr)
        return 2
    import medfast as mf

    info = mf.build_info()
    if device.type == "cuda" and not info["cuda_kernels"]:
        print("gpu_train_check: medfast was built without CUDA kernels (MEDFAST_CUDA=1 pip install -e .)",
              file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    work = out_dir / "runs"
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    results: list[dict[str, Any]] = []
    runners = {"seg_none": lambda: check_seg("none", args, device, work),
               "seg_bf16": lambda: check_seg("bf16", args, device, work),
               "seg_fp16": lambda: check_seg("fp16", args, device, work),
               "reg_bf16": lambda: check_reg(args, device, work),
               "cls_sim": lambda: check_cls(args, device, work),
               "cls_sim_thread": lambda: check_cls(args, device, work, "thread"),
               "cls_sim_eager": lambda: check_cls(args, device, work, graphs=False),
               "ddp": lambda: check_ddp(args, device, work),
               "ddp_shared": lambda: check_ddp_shared(args, device, work)}
    for name in args.only or CHECKS:
        t0 = time.perf_counter()
        try:
            res = runners[name]()
        except Exception:  # noqa: BLE001 - record the failure, run the other checks
            res = {"check": name, "error": traceback.format_exc(), "finite": False}
            print(res["error"], file=sys.stderr)
        res["check_s"] = time.perf_counter() - t0
        results.append(res)
        print(f"gpu_train_check: {name} done in {res['check_s']:.1f} s", flush=True)
    failed = [r["check"] for r in results if "error" in r or not r.get("finite") or r.get("ok") is False]
    report = {
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "medfast_build": info, "small": args.small, "steps": args.steps, "total_s": time.perf_counter() - t_all,
        "failed": failed, "results": results,
    }
    path = out_dir / "train_check.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print()
    print_table(results)
    print(f"\ngpu_train_check: {len(results) - len(failed)}/{len(results)} checks ok on {device} in "
          f"{report['total_s']:.0f} s; report {path}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
