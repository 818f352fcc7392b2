"""CPU training-step rate of the study's model: bf16 autocast against fp32, and the OpenMP thread
count, each pair measured in alternating windows of the same run (ratios, not absolute rates, are
what a shared machine gives reliably).

    .venv/bin/python benchmarks/train_step_cpu.py                 # fp32 vs bf16, S4L-Rotation step
    .venv/bin/python benchmarks/train_step_cpu.py --batch 64 --heads classes --compare threads

The model is the CIFAR-10 studies' ResNet50v2 (width 0.25, 3x3 stride-2 stem, channels_last);
the default batch, 1,536, is one step of experiments/table1_passes.toml's S4L-Rotation arm
((64 labelled + 320 unlabelled) x 4 rotations); 64 with `--heads classes` is its supervised step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def measure(batch: int, heads: list[str], bf16: bool, steps: int) -> float:
    """Images/s over `steps` SGD steps (after one warm-up step)."""
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

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x, heads=tuple(heads))
            loss = sum(F.cross_entropy(out[h].float(), ys[h]) for h in heads)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t)


def child(args) -> None:
    print(json.dumps({"img_s": measure(args.batch, args.heads, args.bf16, args.steps)}))


def run_variant(args, bf16: bool, threads: int) -> float:
    """One window in a fresh process (OpenMP's thread count is fixed at start-up)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--child", "--batch", str(args.batch), "--steps",
           str(args.steps), "--heads", *args.heads] + (["--bf16"] if bf16 else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["img_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1536)
    p.add_argument("--heads", nargs="+", default=["classes", "rotation"],
                   choices=["classes", "rotation"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compare", choices=["precision", "threads"], default="precision")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="OpenMP threads for --compare precision")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.compare == "precision":
        variants = {"fp32": (False, args.threads), "bf16": (True, args.threads)}
    else:
        variants = {f"{n} thread(s)": (False, n) for n in (1, os.cpu_count() or 1)}
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):  # alternating windows
        for name, (bf16, threads) in variants.items():
            rates[name].append(run_variant(args, bf16, threads))
    ref = next(iter(variants))
    load = os.getloadavg()[0]
    print(f"batch {args.batch}, heads {args.heads}, {args.rounds} rounds x {args.steps} steps; "
          f"load average at the end {load:.2f}")
    for name, r in rates.items():
        print(f"  {name:14s} best {max(r):7.1f} img/s  all {[round(v) for v in r]}  "
              f"ratio to {ref}: {max(r) / max(rates[ref]):.2f}x")


if __name__ == "__main__":
    main()
