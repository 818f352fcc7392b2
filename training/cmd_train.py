"""The `s4l train` command: preset + data + overrides -> a typed config -> `trainer.train`.

    s4l train --preset NAME --data ROOT --workdir DIR
              [--labels FILE | --labels-per-class N | --label-fraction F] [--set key=value ...]
    s4l train --list-presets

Multi-process: `torchrun --nproc_per_node=N -m s4l.cli train ...` (same arguments). Running the
same command again resumes the workdir exactly; a different config in that workdir is refused.
Top-level imports are torch-free (docs/contracts.md "The s4l command").
"""

from __future__ import annotations

import argparse
import logging

from s4l.errors import UserError

HELP = "train a model from a paper preset (S4L, baselines, MOAM); resumes the workdir"

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="preset name (see --list-presets)")
    parser.add_argument("--list-presets", action="store_true",
                        help="list the presets with their paper row and number, then exit")
    parser.add_argument("--all", action="store_true",
                        help="with --list-presets: also list the -smoke variants")
    parser.add_argument("--data", help="training data: an image-folder root "
                        "(ROOT/train/<class>/..., ROOT/<eval split>/...) or builtin:digits")
    parser.add_argument("--workdir", help="run folder: config.json, checkpoint.pt, metrics.jsonl")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--labels", metavar="FILE",
                        help="label map: JSON {'values': [basename, ...]} or one basename per "
                        "line (the release's label_map_count_128000_index_0, SimCLR's lists)")
    labels.add_argument("--labels-per-class", type=int, metavar="N",
                        help="label a balanced random subset of N images per class")
    labels.add_argument("--label-fraction", type=float, metavar="F",
                        help="label a balanced random fraction F of each class (0 < F <= 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        dest="overrides",
                        help="override a config field, e.g. --set optim.lr=0.1 "
                        "(values are JSON: 0.1, true, null, [140,160])")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as JSON and exit without training")


def build_config(args: argparse.Namespace):
    """The resolved TrainConfig for these arguments (no torch needed)."""
    from s4l.training import config as C
    from s4l.training.presets import get_preset

    if not args.preset:
        raise UserError("give --preset NAME (s4l train --list-presets shows them)")
    preset = get_preset(args.preset)
    overrides: list = []
    if args.data:
        overrides.append(("data.root", args.data))
    label_flags = {"data.labels": args.labels, "data.labels_per_class": args.labels_per_class,
                   "data.label_fraction": args.label_fraction}
    if any(v is not None for v in label_flags.values()):
        overrides.extend((k, v) for k, v in label_flags.items())
    overrides.extend(args.overrides)
    cfg = C.apply_overrides(preset.config, overrides)
    missing = [k for k in preset.requires if _get(cfg, k) in (None, "")]
    if missing:
        raise UserError(
            f"preset {preset.name} needs {', '.join(missing)}: e.g. "
            + " ".join(f"--set {k}=PATH" for k in missing)
            + f" ({preset.row.method}; see its docstring in s4l.training.presets)")
    return cfg


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def main(args: argparse.Namespace) -> int:
    from s4l.training.presets import format_table

    if args.list_presets:
        print(format_table(include_smoke=args.all))
        return 0
    cfg = build_config(args)
    if args.print_config:
        import json

        from s4l.training import config as C

        print(json.dumps(C.to_dict(cfg), indent=2, sort_keys=True))
        return 0
    if not args.workdir:
        raise UserError("give --workdir DIR (where config, checkpoints and metrics go)")
    if not cfg.data.root:
        raise UserError("give --data ROOT (an image folder, or builtin:digits)")
    from s4l.training.trainer import train

    final = train(cfg, args.workdir, device=args.device, progress=not args.no_progress)
    shown = {k: v for k, v in final.items() if "top" in k}
    log.info("done: %s", ", ".join(f"{k} {v:.2f}" for k, v in shown.items()) or "no eval")
    return 0
