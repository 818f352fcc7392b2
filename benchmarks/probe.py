"""Benchmark: time for each linear-probe solver to reach the scikit-learn accuracy (within 1 point).

Synthetic but learnable features shaped like ResNet50v2 pre_logits (``--n`` x 2048, default
100,000 train rows, non-negative, classes that live in a low-dimensional subspace plus noise).
The reference is scikit-learn's L-BFGS at a fixed C (the regularisation choice is the probe's
own held-out search, not timed here). Each SGD variant (the paper's protocol: momentum 0.9,
lr 0.1 per 256, batch 256; in memory, and streamed from an HDF5 file) is timed until its
validation top-1 first comes within 1 point of the reference, and reported as a ratio of the
reference time (< 1: faster than L-BFGS).

    .venv/bin/python benchmarks/probe.py --n 10000        # a quick run (~1 minute on 2 CPUs)
    .venv/bin/python benchmarks/probe.py                  # the issue's 100k x 2048

Writes benchmarks/results/probe.json. Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _report import host, write_report

ROOT = Path(__file__).resolve().parents[1]


def synthetic(n: int, dim: int, classes: int, seed: int, rank: int = 48, noise: float = 2.0):
    """Class means in a `rank`-dim subspace, lifted to `dim`, plus noise, through a ReLU."""
    g = np.random.default_rng(1234)  # the same classes for train and val
    basis = g.normal(0, 1 / np.sqrt(rank), (rank, dim)).astype(np.float32)
    means = g.normal(0, 1.0, (classes, rank)).astype(np.float32)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    z = means[y] + rng.normal(0, noise, (n, rank)).astype(np.float32)
    x = z @ basis + rng.normal(0, 0.5, (n, dim)).astype(np.float32)
    return np.maximum(x, 0).astype(np.float32), y.astype(np.int64)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="training rows (default 100,000)")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--C", type=float, default=0.01, help="scikit-learn C for the reference fit")
    ap.add_argument("--max-epochs", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "probe.json"))
    args = ap.parse_args()


    from s4l.evaluation import features as F
    from s4l.evaluation.probe import (
        ArrayRows,
        FileRows,
        Schedule,
        SGDSettings,
        Standardizer,
        fit_sgd,
        fit_sklearn,
    )

    t0 = time.perf_counter()
    tx, ty = synthetic(args.n, args.dim, args.classes, seed=0)
    vx, vy = synthetic(max(args.n // 5, 1000), args.dim, args.classes, seed=1)
    print(f"data: {tx.shape} train, {vx.shape} val ({time.perf_counter() - t0:.1f}s to generate)")

    # -- reference: scikit-learn L-BFGS (standardisation included in its time)
    t0 = time.perf_counter()
    std = Standardizer.fit(ArrayRows(tx, ty))
    sk = fit_sklearn(std(tx), ty, std(vx), vy, num_classes=args.classes, cs=(args.C,))
    t_sk = time.perf_counter() - t0
    target = sk["top1"] - 1.0
    print(f"sklearn L-BFGS: top1 {sk['top1']:.2f} in {t_sk:.1f}s ({sk['n_iter']} iterations)")

    results = {"sklearn_lbfgs": {"seconds": t_sk, "top1": sk["top1"], "ratio": 1.0,
                                 "iterations": sk["n_iter"]}}
    wd = 1.0 / (args.C * args.n)  # the same L2 strength as the reference
    schedule = Schedule(args.max_epochs, (2 / 3, 5 / 6))
    with tempfile.TemporaryDirectory() as tmp:
        attrs = {"schema_version": 1, "model_hash": "synthetic", "layer": "pre_logits"}
        F.write_rows(f"{tmp}/t.h5", F.Rows(tx, ty, [str(i) for i in range(len(ty))]), attrs)
        F.write_rows(f"{tmp}/v.h5", F.Rows(vx, vy, [str(i) for i in range(len(vy))]), attrs)
        with F.FeatureFile(f"{tmp}/t.h5") as tf, F.FeatureFile(f"{tmp}/v.h5") as vf:
            variants = {
                "sgd_in_memory": lambda: (ArrayRows(tx, ty), ArrayRows(vx, vy)),
                "sgd_hdf5_stream": lambda: (FileRows(tf), FileRows(vf)),
            }
            for name, make in variants.items():
                t0 = time.perf_counter()
                train, val = make()
                s = Standardizer.fit(train)
                hit = {}

                def on_epoch(p, hit=hit, t0=t0):
                    if p["top1"] >= target and not hit:
                        hit.update(epoch=p["epoch"], seconds=time.perf_counter() - t0, top1=p["top1"])
                    return bool(hit)

                r = fit_sgd(train, val, num_classes=args.classes, schedule=schedule,
                            settings=SGDSettings(weight_decay=wd), standardizer=s, on_epoch=on_epoch)
                res = {"reached": bool(hit), "epochs_run": len(r["curve"]),
                       "final_top1": r["curve"][-1]["top1"],
                       "best_top1": max(p["top1"] for p in r["curve"]),
                       "seconds_run": time.perf_counter() - t0, **hit}
                res["ratio"] = hit["seconds"] / t_sk if hit else None
                results[name] = res
                if hit:
                    print(f"{name}: reached {hit['top1']:.2f} (target {target:.2f}) at epoch "
                          f"{hit['epoch']} in {hit['seconds']:.1f}s -> ratio {res['ratio']:.3f} of L-BFGS")
                else:
                    print(f"{name}: did not reach {target:.2f} in {args.max_epochs} epochs "
                          f"({res['seconds_run']:.1f}s, {res['seconds_run'] / t_sk:.3f} of "
                          f"L-BFGS's time; best {res['best_top1']:.2f})")
    report = {
        "benchmark": "probe",
        "what": "seconds to reach scikit-learn L-BFGS top-1 minus 1 point, as a ratio of L-BFGS's time",
        "n_train": args.n, "n_val": len(vy), "dim": args.dim, "classes": args.classes,
        "C": args.C, "target_top1": target,
        "host": host(),
        "results": results,
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
