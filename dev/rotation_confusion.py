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

The images go through the checkpoint's own eval crop and scaling, as the trainer's evaluation
does (CIFAR-10 at 32 px for the studies' models). The data root is an image folder; the studies
unpack CIFAR-10 (../shared/data/cifar10-jpg.tar.gz) to ~/.cache/s4l-test-data/cifar10.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from s4l.datasets import open_source  # noqa: E402
from s4l.imaging import eval_crop  # noqa: E402
from s4l.training.checkpoint import load_for_inference  # noqa: E402
from s4l.training.objectives.losses import rotate_copies  # noqa: E402
from s4l.training.transforms import to_model_input  # noqa: E402

DEGREES = ("0", "90", "180", "270")


def _batches(source, indices, size, preprocess):
    for start in range(0, len(indices), size):
        crops = [eval_crop(source.load(i), preprocess) for i in indices[start:start + size]]
        yield to_model_input(np.stack(crops))


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
    confusion = np.zeros((4, 4), dtype=np.int64)
    with torch.inference_mode():
        for x in _batches(source, indices, args.batch_size, loaded.preprocess):
            rotated, labels = rotate_copies(x)
            logits = loaded.model(rotated, heads=("rotation",))["rotation"]
            np.add.at(confusion, (labels.numpy(), logits.argmax(1).numpy()), 1)
    accuracy = float(np.trace(confusion) / confusion.sum())
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "split": args.split,
                          "images": len(indices), "rotation_accuracy": accuracy,
                          "confusion": confusion.tolist()}))
        return 0
    print(f"{args.checkpoint}: {len(indices)} {args.split} images x 4 rotations, "
          f"rotation accuracy {100 * accuracy:.1f}%")
    print("true\\pred " + "".join(f"{d:>7}" for d in DEGREES))
    for d, row in zip(DEGREES, confusion):
        print(f"{d:>9} " + "".join(f"{v:7d}" for v in row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
