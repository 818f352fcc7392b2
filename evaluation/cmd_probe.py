"""The `s4l probe` command: linear logistic regression on frozen features (paper section 4 transfer)."""

from __future__ import annotations

import argparse

HELP = "fit linear probes (scikit-learn L-BFGS and SGD short/long) on HDF5 features; top-1/top-5"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", nargs="+", required=True, metavar="H5",
                        help="training feature file(s) from `s4l extract`")
    parser.add_argument("--val", nargs="+", required=True, metavar="H5",
                        help="validation feature file(s), paired with --train in order")
    parser.add_argument("--out", required=True, help="output folder (report.json, learning_curves.png, heads/*.npz)")
    parser.add_argument("--solver", nargs="+", choices=("sklearn", "sgd"), default=["sklearn", "sgd"],
                        help="which solvers to run (default both)")
    parser.add_argument("--schedules", default=None, metavar="SPEC",
                        help="SGD schedules and their epochs, e.g. 'short=30,long=520' (default); "
                        "'short=5' runs only a 5-epoch short schedule")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate per 256 images")
    parser.add_argument("--wd", default="auto",
                        help="SGD weight decay; 'auto' = the L2 strength scikit-learn chose (1/(C n))")
    parser.add_argument("--C", dest="cs", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1, 1.0, 10.0],
                        help="scikit-learn inverse regularisation strengths to choose from")
    parser.add_argument("--holdout", type=float, default=0.2,
                        help="fraction of the training features held out to choose C")
    parser.add_argument("--sklearn-max-rows", type=int, default=200_000,
                        help="scikit-learn works in memory: subsample training rows beyond this")
    parser.add_argument("--no-standardize", action="store_true",
                        help="use raw features (default: per-dimension standardisation from train)")
    parser.add_argument("--knn-k", type=int, default=20,
                        help="weighted kNN evaluation beside the probe (cosine, Wu et al. 2018); 0: skip")
    parser.add_argument("--knn-temperature", type=float, default=0.07)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.add_argument("--no-progress", action="store_true")


def build_settings(args: argparse.Namespace):
    from s4l.evaluation.report import probe_settings

    return probe_settings(
        solvers=args.solver, schedules=args.schedules, batch_size=args.batch_size, lr=args.lr,
        wd=args.wd, cs=args.cs, holdout=args.holdout, sklearn_max_rows=args.sklearn_max_rows,
        standardize=not args.no_standardize, knn_k=args.knn_k,
        knn_temperature=args.knn_temperature, device=args.device, seed=args.seed)


def main(args: argparse.Namespace) -> int:
    from s4l.evaluation.report import probe_files

    report = probe_files(args.train, args.val, args.out, build_settings(args),
                         overwrite=args.overwrite, progress=not args.no_progress)
    for r in report["results"]:
        line = [r["train"]["path"]]
        if "sklearn" in r:
            line.append(f"L-BFGS top1 {r['sklearn']['top1']:.2f} top5 {r['sklearn']['top5']:.2f}")
        for name, s in r.get("sgd", {}).items():
            line.append(f"SGD {name} top1 {s['top1']:.2f} top5 {s['top5']:.2f}")
        if "knn" in r:
            line.append(f"kNN k={r['knn']['k']} top1 {r['knn']['top1']:.2f} top5 {r['knn']['top5']:.2f}")
        for solver, path in r.get("heads", {}).items():
            line.append(f"head {solver}: {path}")
        print(" | ".join(line))
    return 0


if __name__ == "__main__":
    from s4l.cli import main as cli_main

    raise SystemExit(cli_main(["probe", *__import__("sys").argv[1:]]))
