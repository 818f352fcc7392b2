"""How well a rotation-family checkpoint solves its pretext task: the rotation head's accuracy and
4x4 confusion matrix (true rotation in rows, predicted in columns; 0, 90, 180, 270 degrees
counter-clockwise) on every `--every`-th image of a data split, each image in its 4 rotations.

Dev only: a diagnostic for the passes study (issue 27), where S4L-Rotation's training-batch
rotation accuracy levelled off at 0.5-0.7 (a 4-way task: chance is 0.25).
It tells "the net never learns the task" (accuracy near 0.25) from "it confuses the two sideways
rotations" (the 90/270 cells) from "it is weak everywhere" (errors spread over every cell).
Run from the repository root with the project venv, e.g.

    .venv/bin/python dev/rotation_confusion.py \
        runs/table1_passes/sweep/s4l-rotation/lr0.025_wd0.03/seed0/checkpoint.pt \
        ~/.cache/s4l-test-data/cifar10 --split test --every 10

The images go through the trainer's own eval loader with the checkpoint's eval crop (CIFAR-10 at
32 px for the studies' models); an undecodable image is logged and left out. The data root is an image folder; the studies
unpack CIFAR-10 (../shared/data/cifar10-jpg.tar.gz) to ~/.cache/s4l-test-data/cifar10.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from s4l.datasets import open_source
from s4l.training.checkpoint import load_for_inference
from s4l.training.data import make_eval_loader
from s4l.training.objectives.losses import rotate_copies

DEGREES = ("0", "90", "180", "270")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("data", help="an image-folder root (the layouts s4l train reads)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--every", type=int, default=1, help="use every N-th image of the split")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)
    if args.every < 1 or args.batch_size < 1:
        ap.error("--every and --batch-size must be at least 1")

    loaded = load_for_inference(args.checkpoint)
    if "rotation" not in loaded.model.heads:
        print(f"{args.checkpoint}: no rotation head (heads: {sorted(loaded.model.heads)})",
              file=sys.stderr)
        return 2
    source = open_source(args.data, args.split)
    indices = list(range(0, len(source), args.every))
    loader = make_eval_loader(source, indices, spec=loaded.preprocess, batch_size=args.batch_size)
    confusion = np.zeros((4, 4), dtype=np.int64)
    with torch.inference_mode():
        for x, class_labels in loader:  # the trainer's eval path: x [b, 1, 3, crop, crop]
            x = x.flatten(0, 1)[class_labels >= 0]  # an undecodable image comes as label -1
            if not len(x):
                continue
            rotated, labels = rotate_copies(x)
            logits = loaded.model(rotated, heads=("rotation",))["rotation"]
            np.add.at(confusion, (labels.numpy(), logits.argmax(1).numpy()), 1)
    images = int(confusion.sum()) // 4
    if not images:
        print(f"{args.data} ({args.split}): no decodable image among those chosen", file=sys.stderr)
        return 2
    accuracy = float(np.trace(confusion) / confusion.sum())
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "split": args.split,
                          "images": images, "rotation_accuracy": accuracy,
                          "confusion": confusion.tolist()}))
        return 0
    print(f"{args.checkpoint}: {images} {args.split} images x 4 rotations, "
          f"rotation accuracy {100 * accuracy:.1f}%")
    print("true\\pred " + "".join(f"{d:>7}" for d in DEGREES))
    for d, row in zip(DEGREES, confusion):
        print(f"{d:>9} " + "".join(f"{v:7d}" for v in row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
