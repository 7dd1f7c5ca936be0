"""Throughput of classification on simulated ultrasound: the time to render one training batch on the device
(medfast.ultrasound.simulate from descriptors, as ClassificationTask.training_step does) against the time of
one training step of the model (forward, backward, AdamW update) on that batch, with the model and the
simulator of a config (default configs/cls_demo_cpu.yaml). Target on a GPU: data generation under 10 % of
the step time.

    python benchmarks/bench_classification.py --device cuda --out benchmarks/results

Writes ``classification_<device>_<date>.json`` and ``classification_<device>_latest.json`` to ``--out``.
Uses the packaged brains when installed, else phantom brains (the JSON says which).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, repeats: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def make_case(config: str, device: torch.device, batch: int | None = None, n_batches: int = 12,
              overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The case this script and ``test_bench_classification.py`` (pytest-benchmark) time, with the model and
    simulator of ``config``: ``render()`` renders the next of ``n_batches`` pre-drawn batches of descriptors
    on ``device`` (cycling), ``step()`` is one training step (forward, loss, backward, optimizer update) on
    one rendered batch. Returns a dict with both and what the JSON reports (cfg, source, batch, amp, volumes)."""
    from medfast.data import DatasetError, collate
    from medfast.tasks.classification import ClassificationLoss, SimulatedUltrasound, build_classifier
    from medfast.train import load_config
    from medfast.train.trainer import build_optimizer, resolve_amp

    cfg = load_config([config], list(overrides))
    dargs = dict(cfg.data.dataset_args)
    batch = batch or cfg.trainer.batch_size
    try:
        source = SimulatedUltrasound.from_args(dargs, cfg.data.shape, cfg.data.normalize, cfg.trainer.seed)
        volumes = "packaged brains"
    except DatasetError as exc:
        print(f"packaged volumes unavailable ({exc}); using phantom brains")
        dargs.update(volumes=["phantom:1", "phantom:2"], val_volumes=[])
        source = SimulatedUltrasound.from_args(dargs, cfg.data.shape, cfg.data.normalize, cfg.trainer.seed)
        volumes = "phantoms"
    ds = source.train_dataset(max(batch, int(dargs.get("samples_per_epoch", 1024))))
    batches = [collate([ds[((b * batch + i) % len(ds), 1000 * b + i)] for i in range(batch)])
               for b in range(n_batches)]

    model = build_classifier(cfg).to(device).train()
    opt = build_optimizer(model.parameters(), cfg.optim)
    loss_fn = ClassificationLoss(cfg.model.kwargs.get("encoding", "nominal"))
    amp = resolve_amp(cfg.trainer.amp, device)
    images = source.render(batches[0], device)
    labels = batches[0]["label"].to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = loss_fn(model(images), labels)
        loss.backward()
        opt.step()

    it = itertools.cycle(batches)

    def render():
        source.render(next(it), device)

    return {"cfg": cfg, "source": source, "batch": batch, "amp": amp, "volumes": volumes, "render": render,
            "step": step}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--config", default=str(ROOT / "configs" / "cls_demo_cpu.yaml"))
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the config's)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    device = torch.device(args.device)
    case = make_case(args.config, device, args.batch, args.repeats + 2, args.overrides)
    cfg, source, batch, amp = case["cfg"], case["source"], case["batch"], case["amp"]
    volumes, render, step = case["volumes"], case["render"], case["step"]

    for _ in range(2):  # warm-up: property volumes, grids, kernels, cuDNN autotuning
        render()
        step()
    render_ms = _time(render, args.repeats, device)
    step_ms = _time(step, args.repeats, device)
    med = statistics.median  # (the mean of the two middle values for an even count)
    r, s = med(render_ms), med(step_ms)
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "config": str(args.config),
        "volumes": volumes,
        "batch": batch,
        "image_shape": list(source.image_shape),
        "n_lines": source.probes[0].n_lines,
        "n_samples": source.probes[0].n_samples,
        "sub_rays": source.sub_rays,
        "probes": source.probe_names,
        "model": cfg.model.name,
        "amp": str(amp).replace("torch.", "") if amp else "none",
        "render_ms": r,
        "step_ms": s,
        "render_fraction_of_step": r / s,
        "render_ms_all": render_ms,
        "step_ms_all": step_ms,
        "images_per_second_rendered": batch / r * 1e3,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in (f"classification_{device.type}_{stamp}.json", f"classification_{device.type}_latest.json"):
        (out / name).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{device}: render B={batch} {r:.1f} ms, {cfg.model.name} step {s:.1f} ms, data = {100 * r / s:.1f} % "
          f"of the step ({volumes}, load {result['load_average']})")


if __name__ == "__main__":
    main()
