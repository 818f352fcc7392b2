"""`s4l export`: checkpoint -> checked ONNX model (optionally int8, optionally a Triton repository)."""

from __future__ import annotations

import argparse
import logging

HELP = "export a checkpoint to ONNX (uint8 NHWC in, embedding/logits out), checked against torch"

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="s4l checkpoint (.pt)")
    src.add_argument("--from-onnx", metavar="ONNX",
                     help="an existing `s4l export` file to bake --head into (no checkpoint needed)")
    parser.add_argument("--out", required=True, help="ONNX file to write (the model to serve)")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="use_ema", action="store_const", const=True, default=None,
                     help="export the EMA weights (an error if the checkpoint has none)")
    ema.add_argument("--no-ema", dest="use_ema", action="store_const", const=False,
                     help="export the raw weights even when EMA weights exist")
    parser.add_argument("--int8", action="store_true",
                        help="static int8 quantisation; --out gets the int8 model, the fp32 one "
                             "is kept as <stem>.fp32.onnx")
    parser.add_argument("--calibration", metavar="DATA",
                        help="calibration images for --int8 (image-folder root, builtin:digits, ...)")
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--heldout-images", type=int, default=64)
    parser.add_argument("--triton-repo", metavar="DIR", help="also write a Triton model repository")
    parser.add_argument("--triton-max-batch", type=int, default=32)
    parser.add_argument("--report", metavar="JSON", help="write the export report here")
    parser.add_argument("--head", metavar="NAME=PATH",
                        help="bake this head (from `s4l probe`, heads/*.npz) into the graph as its "
                             "`logits` output, class names in the metadata (replaces a class head)")


def main(args: argparse.Namespace) -> int:
    from s4l.errors import UserError
    from s4l.service.export import export_onnx

    if args.int8 and not args.calibration:
        raise UserError("--int8 needs --calibration DATA (images to calibrate activation ranges)")
    if args.calibration and not args.int8:
        raise UserError("--calibration is only used with --int8")
    if args.from_onnx:
        if not args.head:
            raise UserError("--from-onnx needs --head NAME=PATH (what to bake into it)")
        if args.int8:
            raise UserError("--int8 needs --checkpoint")
        _bake(args, args.from_onnx)
        return 0
    report = export_onnx(args.checkpoint, args.out, use_ema=args.use_ema,
                         int8_calibration=args.calibration if args.int8 else None,
                         calibration_images=args.calibration_images,
                         heldout_images=args.heldout_images,
                         triton_repo=None if args.head else args.triton_repo,
                         triton_max_batch_size=args.triton_max_batch)
    log.info("wrote %s (embedding %d, classes %s); torch vs onnxruntime max relative error %s",
             report.onnx_path, report.embedding_dim, report.num_classes, report.parity)
    if report.int8:
        log.info("int8 vs fp32 on %d held-out images: %s", report.int8["heldout_images"], report.int8)
    baked = _bake(args, args.out) if args.head else None
    if args.report:
        from s4l.io import atomic_write_json

        atomic_write_json(args.report, {**report.to_dict(), "baked_head": baked}, indent=2)
    return 0


def _bake(args: argparse.Namespace, source: str) -> dict:
    from s4l.heads import load_head, parse_head_spec
    from s4l.service.bake_head import bake_head

    name, path = parse_head_spec(args.head)
    parity = bake_head(source, load_head(path), args.out, name=name)
    log.info("baked head %s (%s) into %s as `logits`; vs the artifact: max relative error %.2e",
             name, path, args.out, parity["max_rel_error"])
    if args.triton_repo:
        from s4l.service.triton import write_triton_repo

        write_triton_repo(args.out, args.triton_repo, max_batch_size=args.triton_max_batch)
    return {"name": name, "path": path, **parity}
