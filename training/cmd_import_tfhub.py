"""The `s4l import-tfhub` command: a TF-Hub module of the original S4L release -> an s4l checkpoint.

    s4l import-tfhub gs://s4l-models/<module> --out model.pt
    s4l import-tfhub ./module_dir | module.tgz --out model.pt

The result is a normal checkpoint (`ema` empty): `s4l export`, `extract`, `probe`,
`pseudo-label` and `serve` (after export) use it unchanged. No TensorFlow is needed.
Top-level imports are torch-free (docs/contracts.md "The s4l command").
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

HELP = "import a TF-Hub module of the original S4L release (dir, .tar/.tgz, https:// or gs://) as a checkpoint"

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC",
                        help="module directory, .tar/.tar.gz/.tgz of one, or an https:// or "
                        "gs://s4l-models/... location (downloaded, resumable, cached)")
    parser.add_argument("--out", required=True, help="checkpoint file to write (.pt)")
    parser.add_argument("--cache-dir", default=None,
                        help="download cache (default $S4L_CACHE_DIR/tfhub or ~/.cache/s4l/tfhub)")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    from s4l.training.tfhub.importer import import_tfhub

    report = import_tfhub(args.src, args.out, progress=not args.no_progress,
                          cache=Path(args.cache_dir) if args.cache_dir else None)
    log.info("%s", report.summary())
    return 0
