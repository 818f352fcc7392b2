"""The `s4l extract` command: frozen features of a data set into one HDF5 file (resumable, torchrun)."""

from __future__ import annotations

import argparse

HELP = "extract frozen features (checkpoint or ONNX model) of an image set into an HDF5 file"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint (.pt) or exported model (.onnx)")
    parser.add_argument("--data", required=True,
                        help="image-folder root, places205:LIST_FILE@IMAGES_ROOT, or builtin:digits")
    parser.add_argument("--out", required=True, help="output HDF5 file, e.g. features.h5")
    parser.add_argument("--split", default="val", help="split of an image folder (train, val, test)")
    parser.add_argument("--layer", default="pre_logits",
                        help="checkpoints: pre_logits (default), stage1..stage4 (pooled), logits; "
                        "ONNX: embedding (= pre_logits), logits")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding worker processes (default: one per spare CPU core; 0 = inline)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--shard-size", type=int, default=1024,
                        help="images per shard: the unit of resume and of torchrun work sharing")
    parser.add_argument("--backend", default=None,
                        help="ONNX models: onnxruntime (default) or openvino (env S4L_BACKEND; "
                             "pip install 's4l[openvino]')")
    parser.add_argument("--precision", default=None,
                        help="ONNX models: fp32, bf16 or auto (env S4L_PRECISION, default auto: "
                             "bf16 on openvino where the CPU has native bf16 and the parity gate "
                             "passes, else fp32); recorded in the file's attributes")
    parser.add_argument("--parity-images", default=None, metavar="DIR",
                        help="held-out images for openvino's parity gate (env S4L_PARITY_IMAGES; "
                             "default: built-in crops)")
    parser.add_argument("--device", default=None, help="torch device (default: this rank's GPU or CPU)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output (kept until the new one is complete)")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    from s4l.evaluation.extract import ExtractConfig, extract

    if args.workers is not None and args.workers < 0:
        from s4l.errors import UserError

        raise UserError("--workers must be >= 0")
    import os

    from s4l.errors import UserError

    backend = args.backend or os.environ.get("S4L_BACKEND") or "onnxruntime"
    precision = args.precision or os.environ.get("S4L_PRECISION") or "auto"
    if backend not in ("onnxruntime", "openvino"):
        raise UserError(f"unknown backend {backend!r} (onnxruntime or openvino)")
    if precision not in ("fp32", "bf16", "auto"):
        raise UserError(f"unknown precision {precision!r} (fp32, bf16 or auto)")
    cfg = ExtractConfig(
        model=args.model, data=args.data, out=args.out, split=args.split, layer=args.layer,
        batch_size=args.batch_size, workers=args.workers, dtype=args.dtype,
        shard_size=args.shard_size, overwrite=args.overwrite, device=args.device,
        backend=backend, precision=precision,
        parity_images=args.parity_images or os.environ.get("S4L_PARITY_IMAGES") or None,
        progress=not args.no_progress,
    )
    summary = extract(cfg)
    if summary["rank"] == 0:
        print(f"{summary['out']}: {summary['rows']} rows, {summary['errors']} undecodable, "
              f"{summary['shards_skipped']} of {summary['shards']} shards reused")
    return 0


if __name__ == "__main__":
    # `torchrun -m s4l.evaluation.cmd_extract ...` runs the command on every rank.
    import sys

    from s4l.cli import main as cli_main

    raise SystemExit(cli_main(["extract", *sys.argv[1:]]))
