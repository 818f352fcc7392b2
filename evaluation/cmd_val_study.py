"""The `s4l val-study` command: small vs full validation sets for model selection (paper Fig. 3)."""

from __future__ import annotations

import argparse

HELP = "score a sweep of models on small class-balanced validation subsets vs the full pool"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", required=True, metavar="CKPT",
                        help="classifier checkpoints (or .onnx with logits) to compare, e.g. a lr/wd sweep")
    parser.add_argument("--data", required=True,
                        help="the validation pool held out from training: image-folder root, "
                        "places205:LIST@ROOT or builtin:digits")
    parser.add_argument("--split", default="val", help="split of the pool (default val)")
    parser.add_argument("--out", required=True, help="output folder (val_study.json, val_study.png)")
    parser.add_argument("--per-class", type=int, nargs="+", default=[1, 5],
                        help="small-set sizes in images per class (default 1 5)")
    parser.add_argument("--draws", type=int, default=10, help="random subsets per size (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    from s4l.evaluation.val_study import run_val_study

    r = run_val_study(args.models, args.data, args.split, args.out, per_class=args.per_class,
                      draws=args.draws, seed=args.seed, batch_size=args.batch_size,
                      workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"full-pool best: {r['full_best_name']} ({max(r['full_accuracy']):.2f}%)")
    for s in r["sizes"].values():
        c = s["correlation"]
        print(f"{s['per_class']}/class ({s['images']} images): Pearson {c['pearson']['mean']:.3f} "
              f"Spearman {c['spearman']['mean']:.3f} Kendall {c['kendall']['mean']:.3f}; "
              f"picks the best in {s['picks_best_fraction']:.0%} of draws, "
              f"mean regret {s['pick_regret_points']['mean']:.2f} points")
    return 0
