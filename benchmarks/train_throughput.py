"""Training throughput: supervised vs S4L-Rotation steps, fp32 vs bf16, synthetic vs real JPEGs.

Measures training images/s of the trainer's own step (`s4l.training.trainer.train_step`:
forward + backward + SGD update, objective from the OBJECTIVES table) at standard width
(width 1, 224 px) by default, and reports ratios measured in the same run:

- S4L-Rotation per-image cost vs supervised: seconds per SOURCE image of a step (S4L-Rotation
  forwards 4 rotations of a labelled AND an unlabelled batch: ~8x the images of a supervised
  step of the same batch size) and seconds per FORWARDED image (what the hardware sees);
- bf16 autocast vs fp32 (same objective, same batch);
- real JPEG loading (Imagenette from ../shared/data through `s4l.training.data`'s loaders,
  decode + inception crop + flip in worker processes) vs synthetic tensors;
- at <= 64 px, the two settings experiments/table1_small.toml changes to fit 2 CPU cores: the
  stride-2 vs stride-1 small stem, and one BN batch per step vs the presets' per-device BN shards
  (`--bn-shards`, one forward pass each).

    python benchmarks/train_throughput.py                      # width 1, 224 px (GPU-sized)
    python benchmarks/train_throughput.py --size 64 --width 0.25 --batch 16 --steps 3  # CPU
    python benchmarks/train_throughput.py --size 32 --width 0.25 --batch 64 --stem small-s2 \
        --channels-last --steps 20 --warmup 3      # the CPU table's settings (run_all full)

Writes JSON (default benchmarks/results/train_throughput.json). Not a test: numbers depend on
the machine; compare ratios, not absolute values, across machines.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch
from _report import host, write_report

from s4l.training.config import OptimConfig
from s4l.training.distributed import DistEnv
from s4l.training.model import ModelSpec, build_model
from s4l.training.objectives import ObjectiveConfig, build_objective
from s4l.training.trainer import build_optimizer, precision_autocast, train_step

log = logging.getLogger("train_throughput")
ROOT = Path(__file__).resolve().parents[1]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _synthetic_batches(obj, batch: int, size: int, n: int):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        b = {}
        if obj.uses_labelled:
            b["labelled"] = torch.rand(batch, obj.copies, 3, size, size, generator=g) * 2 - 1
            b["labels"] = torch.randint(0, 10, (batch,), generator=g)
        if obj.uses_unlabelled:
            b["unlabelled"] = torch.rand(batch, obj.copies, 3, size, size, generator=g) * 2 - 1
        out.append(b)
    return out


def _split(batch: dict, shards: int) -> list[dict]:
    """One step's batch cut into `shards` BN shards along the batch dimension (the trainer's
    per-device BN batch, bn.ghost_batch)."""
    return [{k: v.chunk(shards)[i] for k, v in batch.items()} for i in range(shards)]


def measure(name: str, *, width: float, size: int, batch: int, steps: int, warmup: int,
            precision: str, dev: torch.device, channels_last: bool, batches=None,
            stem: str | None = None, bn_shards: int = 1) -> dict:
    """Time `steps` optimiser steps (after `warmup`) on synthetic data or the given iterator."""
    obj = build_objective(name, ObjectiveConfig(), 10)
    stem = stem or ("small" if size <= 32 else "imagenet")  # as the presets: CIFAR 32 px small
    model = build_model(ModelSpec(width=width, stem=stem, heads=obj.heads())).to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, OptimConfig(lr=0.01))
    env = DistEnv(device=dev)
    ac = precision_autocast(precision, dev)
    data = batches if batches is not None else iter(_synthetic_batches(obj, batch, size, 4) * 10_000)
    model.train()
    for _ in range(warmup):
        train_step(model, obj, opt, _split(next(data), bn_shards), dev, ac, None, env)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        m = train_step(model, obj, opt, _split(next(data), bn_shards), dev, ac, None, env)
    m["loss"].item()
    _sync(dev)
    dt = (time.perf_counter() - t0) / steps
    fwd = obj.forwarded_per_step(batch, 1)[0]  # one unlabelled image per labelled one
    return {"objective": name, "precision": precision, "batch": batch, "stem": stem,
            "bn_shards": bn_shards,
            "seconds_per_step": dt, "source_images_per_s": batch / dt,
            "forwarded_images_per_s": fwd / dt, "forwarded_per_step": fwd,
            "loss": float(m["loss"])}


def _jpeg_batches(obj, batch: int, size: int, workers: int):
    """Supervised-shaped batches from Imagenette JPEGs through the training loaders."""
    from s4l.datasets import open_source
    from s4l.io import shared_dataset
    from s4l.training.data import make_train_loaders

    try:
        cache = shared_dataset("imagenette-224.tar.gz", "imagenette-224")
    except FileNotFoundError:
        return None
    src = open_source(str(cache), "train")
    idx = list(range(len(src)))
    data = make_train_loaders(src, idx, idx, batch_size=batch,
                              unsup_batch_size=batch if obj.uses_unlabelled else 0,
                              image_size=size, copies=obj.copies, workers=workers)

    def gen():
        for (x_l, y_l), unl in data:
            b = {"labelled": x_l, "labels": y_l}
            if unl is not None:
                b["unlabelled"] = unl[0]
            yield b
    return gen()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32, help="labelled (and unlabelled) batch")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--stem", choices=("imagenet", "small", "small-s2"), default=None,
                   help="network stem (default: small at <= 32 px, else imagenet)")
    p.add_argument("--bn-shards", type=int, default=8,
                   help="BN shards of the per-device-BN comparison (default 8: the cifar10 "
                   "presets' ghost batch of 8 at batch 64)")
    p.add_argument("--no-jpeg", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"))
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dev = torch.device(a.device)
    kw = dict(width=a.width, size=a.size, batch=a.batch, steps=a.steps, warmup=a.warmup,
              dev=dev, channels_last=a.channels_last, stem=a.stem)
    runs = {}
    for name in ("supervised", "s4l-rotation"):
        for prec in ("fp32", "bf16"):
            r = measure(name, precision=prec, **kw)
            runs[f"{name}/{prec}/synthetic"] = r
            log.info("%-13s %-4s synthetic: %8.1f source img/s, %8.1f forwarded img/s",
                     name, prec, r["source_images_per_s"], r["forwarded_images_per_s"])
    # The two settings experiments/table1_small.toml changes for CPU (supervised fp32, synthetic):
    # the stride-2 vs stride-1 small stem, and one BN batch vs the presets' per-device BN shards.
    extra = {}
    if a.size <= 64:
        other = "small" if (a.stem or "small") == "small-s2" else "small-s2"
        runs[f"supervised/fp32/synthetic/stem-{other}"] = measure(
            "supervised", precision="fp32", **{**kw, "stem": other})
        extra["stem"] = other
    if a.batch % a.bn_shards == 0 and a.bn_shards > 1:
        runs[f"supervised/fp32/synthetic/bn-shards-{a.bn_shards}"] = measure(
            "supervised", precision="fp32", bn_shards=a.bn_shards, **kw)
    jpeg = None
    if not a.no_jpeg:
        obj = build_objective("supervised", ObjectiveConfig(), 10)
        it = _jpeg_batches(obj, a.batch, a.size, a.workers)
        if it is None:
            from s4l.io import shared_data_dir

            log.info("imagenette-224.tar.gz not found under %s: JPEG run skipped", shared_data_dir())
        else:
            jpeg = measure("supervised", precision="fp32", batches=it, **kw)
            runs["supervised/fp32/jpeg"] = jpeg
            log.info("supervised    fp32 jpeg:      %8.1f source img/s (%d workers)",
                     jpeg["source_images_per_s"], a.workers)
    sup, rot = runs["supervised/fp32/synthetic"], runs["s4l-rotation/fp32/synthetic"]
    ratios = {
        "s4l_rotation_vs_supervised_seconds_per_source_image":
            sup["source_images_per_s"] / rot["source_images_per_s"],
        "s4l_rotation_vs_supervised_seconds_per_forwarded_image":
            sup["forwarded_images_per_s"] / rot["forwarded_images_per_s"],
        "bf16_vs_fp32_speedup_supervised":
            runs["supervised/bf16/synthetic"]["source_images_per_s"] / sup["source_images_per_s"],
        "bf16_vs_fp32_speedup_s4l_rotation":
            runs["s4l-rotation/bf16/synthetic"]["source_images_per_s"] / rot["source_images_per_s"],
    }
    if jpeg is not None:
        ratios["jpeg_vs_synthetic_throughput_supervised"] = \
            jpeg["source_images_per_s"] / sup["source_images_per_s"]
    if "stem" in extra:
        o = runs[f"supervised/fp32/synthetic/stem-{extra['stem']}"]
        s1, s2 = (o, sup) if extra["stem"] == "small" else (sup, o)
        ratios["stride2_vs_stride1_small_stem_speedup_supervised"] = \
            s2["source_images_per_s"] / s1["source_images_per_s"]
    key = f"supervised/fp32/synthetic/bn-shards-{a.bn_shards}"
    if key in runs:
        ratios[f"one_bn_batch_vs_{a.bn_shards}_bn_shards_speedup_supervised"] = \
            sup["source_images_per_s"] / runs[key]["source_images_per_s"]
    for k, v in ratios.items():
        log.info("%-55s %.3f", k, v)
    result = {
        "benchmark": "train_throughput",
        "command": " ".join(["python", *sys.argv]),
        "settings": {**{k: v for k, v in vars(a).items() if k != "out"}},
        "host": host(device=str(dev),
                     gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None),
        "runs": runs,
        "ratios": ratios,
    }
    write_report(a.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
