"""The `s4l pseudo-label` command: a teacher checkpoint labels every training image.

    s4l pseudo-label --checkpoint CKPT --data ROOT [--labels FILE] --out FILE

Centre crop, unrotated (the release's tool); the file also stores the teacher's confidence and
its 5-crop x 4-rotation averaged prediction, keeps ground truth for labelled images and records
provenance (teacher sha256, data root, label file). Train a student on it with
`s4l train --preset pseudo-label-10pct --set data.pseudo_labels=FILE`.
Top-level imports are torch-free (docs/contracts.md "The s4l command").
"""

from __future__ import annotations

import argparse
import logging

HELP = "label every training image with a teacher checkpoint (for pseudo-label students)"

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="teacher checkpoint (.pt from s4l train)")
    parser.add_argument("--data", required=True, help="image-folder root or builtin:digits")
    parser.add_argument("--labels", metavar="FILE", default=None,
                        help="label map of the images that keep their ground truth (default: "
                        "the teacher's own labelled subset, from its stored config)")
    parser.add_argument("--out", required=True, help="output JSON file")
    parser.add_argument("--split", default="train", help="split to label (default train)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    from s4l.errors import UserError

    if args.batch_size < 1 or args.workers < 0:
        raise UserError("--batch-size must be >= 1 and --workers >= 0")
    from s4l.training.teacher_labels import pseudo_label

    summary = pseudo_label(args.checkpoint, args.data, args.out, labels=args.labels,
                           split=args.split, batch_size=args.batch_size, workers=args.workers,
                           device=args.device, progress=not args.no_progress)
    log.info("pseudo-labels: %s", summary)
    return 0
