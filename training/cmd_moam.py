"""The `s4l moam` command: MOAM's three steps and the pseudo-labelling between them, resumable.

    s4l moam --data IMAGENET --workdir runs/moam --labels FILE [--scale cifar10] [--smoke]

A thin wrapper over `s4l.training.moam_pipeline.run_moam` (paper Table 2). Top-level imports are
torch-free (docs/contracts.md "The s4l command").
"""

from __future__ import annotations

import argparse
import logging

HELP = "MOAM (paper Table 2): step 1 -> pseudo-labels -> step 2 -> step 3, resumable"

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="image-folder root or builtin:digits")
    parser.add_argument("--workdir", required=True, help="one folder per stage beneath it")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--labels", help="label map of the labelled subset")
    g.add_argument("--labels-per-class", type=int)
    g.add_argument("--label-fraction", type=float)
    parser.add_argument("--scale", default="imagenet", help="imagenet, cifar10 or imagenette")
    parser.add_argument("--smoke", action="store_true", help="the seconds-long CPU variants")
    for stage in ("step1", "step2", "step3"):
        parser.add_argument(f"--set-{stage}", action="append", default=[], metavar="KEY=VALUE",
                            help=f"config override for {stage}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    from s4l.training.moam_pipeline import run_moam

    summary = run_moam(args.data, args.workdir, labels=args.labels,
                       labels_per_class=args.labels_per_class,
                       label_fraction=args.label_fraction, scale=args.scale, smoke=args.smoke,
                       overrides={"step1": args.set_step1, "step2": args.set_step2,
                                  "step3": args.set_step3},
                       device=args.device, progress=not args.no_progress)
    log.info("MOAM done: %s", summary["final_checkpoint"])
    return 0
