"""CPU training-step rate of the study's model: bf16 autocast against fp32, and the OpenMP thread
count, each pair measured in alternating windows of the same run (ratios, not absolute rates, are
what a shared machine gives reliably).

    .venv/bin/python benchmarks/train_step_cpu.py                 # fp32 vs bf16, S4L-Rotation step
    .venv/bin/python benchmarks/train_step_cpu.py --batch 64 --heads classes --compare threads
    .venv/bin/python benchmarks/train_step_cpu.py --compare allocator   # huge pages, glibc heap
    .venv/bin/python benchmarks/train_step_cpu.py --compare compile     # torch.compile (inductor)
    .venv/bin/python benchmarks/train_step_cpu.py --compare trainer     # the trainer's own step

The model is the CIFAR-10 studies' ResNet50v2 (width 0.25, 3x3 stride-2 stem, channels_last);
the default batch, 1,536, is one step of experiments/table1_passes.toml's S4L-Rotation arm
((64 labelled + 320 unlabelled) x 4 rotations); 64 with `--heads classes` is its supervised step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def measure(
    batch: int, heads: list[str], bf16: bool, steps: int, compiled: bool = False,
    trainer: bool = False,
) -> tuple[float, float]:
    """Images/s over `steps` SGD steps (after warm-up steps, which include compilation when
    `compiled`), and minor page faults per step (the child also reports its peak resident memory).

    `trainer`: the step is the trainer's own (`train_step` with the S4L-Rotation objective on a
    batch of batch/24 labelled and 5x as many unlabelled images, rotated on the fly, as the study
    feeds it), instead of one ready-made tensor through the model: the difference is what the
    trainer adds around the model."""
    import torch
    import torch.nn.functional as F

    from s4l.training.model import ModelSpec, build_model

    torch.manual_seed(0)
    sizes = {"classes": 10, "rotation": 4}
    model = build_model(ModelSpec(width=0.25, stem="small-s2", heads={h: sizes[h] for h in heads}))
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32).to(memory_format=torch.channels_last)
    ys = {h: torch.randint(0, sizes[h], (batch,)) for h in heads}
    forward = torch.compile(model) if compiled else model

    def bare_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = forward(x, heads=tuple(heads))
            loss = sum(F.cross_entropy(out[h].float(), ys[h]) for h in heads)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step = _trainer_step(model, opt, batch) if trainer else bare_step
    for _ in range(2 if compiled else 1):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    for _ in range(steps):
        step()
    rate = batch * steps / (time.perf_counter() - t)
    return rate, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps


def _trainer_step(model, opt, batch: int):
    import contextlib

    import torch

    from s4l.training.distributed import DistEnv
    from s4l.training.objectives import build_objective
    from s4l.training.trainer import train_step

    source = batch // 4  # 4 rotations of every image
    n_l = source // 6  # labelled : unlabelled = 1 : 5 (optim.unsup_batch_mult = 5)
    shard = {
        "labelled": torch.randn(n_l, 1, 3, 32, 32),
        "labels": torch.randint(0, 10, (n_l,)),
        "unlabelled": torch.randn(source - n_l, 1, 3, 32, 32),
    }
    objective = build_objective("s4l-rotation", None, 10)
    env = DistEnv()
    return lambda: train_step(model, objective, opt, [shard], env.device,
                              contextlib.nullcontext(), None, env)


def child(args) -> None:
    rate, faults = measure(args.batch, args.heads, args.bf16, args.steps, args.compiled,
                           args.trainer)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"img_s": rate, "faults_per_step": faults, "peak_rss_mib": peak_mib}))


# --compare allocator: the CPU allocator's settings, read by torch (c10) and glibc at start-up.
# THP_MEM_ALLOC_ENABLE=1 makes torch align allocations of 2 MiB and more to 2 MiB and madvise them
# as transparent huge pages (one page fault per 2 MiB instead of per 4 KiB, where the kernel's THP
# mode is `madvise` or `always`); the glibc tunables keep freed blocks below 32 MiB in the heap
# instead of returning them to the kernel after every step.
GLIBC_KEEP = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"
ALLOCATORS = {
    "default": {},
    "thp": {"THP_MEM_ALLOC_ENABLE": "1"},
    "thp+glibc": {"THP_MEM_ALLOC_ENABLE": "1", "GLIBC_TUNABLES": GLIBC_KEEP},
}


def run_variant(
    args, bf16: bool, threads: int, extra_env: dict | None = None, compiled: bool = False,
    trainer: bool = False,
) -> tuple[float, float, float]:
    """One window in a fresh process (OpenMP's thread count is fixed at start-up)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(extra_env or {})}
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--heads",
        *args.heads,
    ] + (["--bf16"] if bf16 else []) + (["--compiled"] if compiled else []) + (
        ["--trainer"] if trainer else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["img_s"], result["faults_per_step"], result["peak_rss_mib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1536)
    p.add_argument(
        "--heads", nargs="+", default=["classes", "rotation"], choices=["classes", "rotation"]
    )
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compare", choices=["precision", "threads", "allocator", "compile", "trainer"], default="precision")
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="OpenMP threads for --compare precision",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--trainer", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    compiled, trainer = {}, {}
    if args.compare == "precision":
        variants = {"fp32": (False, args.threads, {}), "bf16": (True, args.threads, {})}
    elif args.compare == "compile":  # both with the allocator settings training uses
        keep = ALLOCATORS["thp+glibc"]
        variants = {"eager": (False, args.threads, keep), "compiled": (False, args.threads, keep)}
        compiled = {"compiled": True}
    elif args.compare == "trainer":  # both with the allocator settings training uses
        keep = ALLOCATORS["thp+glibc"]
        variants = {"bare step": (False, args.threads, keep), "trainer": (False, args.threads, keep)}
        trainer = {"trainer": True}
    elif args.compare == "allocator":
        variants = {name: (False, args.threads, env) for name, env in ALLOCATORS.items()}
    else:
        variants = {f"{n} thread(s)": (False, n, {}) for n in (1, os.cpu_count() or 1)}
    rates: dict[str, list[float]] = {k: [] for k in variants}
    faults: dict[str, list[float]] = {k: [] for k in variants}
    peak: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):  # alternating windows
        for name, (bf16, threads, env) in variants.items():
            rate, per_step, peak_mib = run_variant(
                args, bf16, threads, env, compiled.get(name, False), trainer.get(name, False)
            )
            rates[name].append(rate)
            faults[name].append(per_step)
            peak[name].append(peak_mib)
    ref = next(iter(variants))
    load = os.getloadavg()[0]
    print(
        f"batch {args.batch}, heads {args.heads}, {args.rounds} rounds x {args.steps} steps; "
        f"load average at the end {load:.2f}"
    )
    for name, r in rates.items():
        print(
            f"  {name:14s} best {max(r):7.1f} img/s  all {[round(v) for v in r]}  "
            f"ratio to {ref}: {max(r) / max(rates[ref]):.2f}x  "
            f"page faults/step {min(faults[name]):,.0f}  peak RSS {max(peak[name]):,.0f} MiB"
        )


if __name__ == "__main__":
    main()
