"""The `s4l` command: one table of subcommands, each a thin module with configure() and main().

Subcommand modules are imported only when their command runs (or for `--help`), and keep their
heavy imports (torch, onnxruntime) inside main(), so `s4l serve` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from s4l import __version__
from s4l.errors import UserError

COMMANDS: dict[str, str] = {
    "train": "s4l.training.cmd_train",
    "pseudo-label": "s4l.training.cmd_pseudo_label",
    "extract": "s4l.evaluation.cmd_extract",
    "probe": "s4l.evaluation.cmd_probe",
    "val-study": "s4l.evaluation.cmd_val_study",
    "export": "s4l.service.cmd_export",
    "serve": "s4l.service.cmd_serve",
    "demo": "s4l.demo",
}


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            return None
        raise


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s4l",
        description="S4L: self-supervised semi-supervised learning (Zhai et al., ICCV 2019): "
        "train, evaluate, export and serve ResNet50v2 feature extractors.",
    )
    parser.add_argument("--version", action="version", version=f"s4l {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        if only is not None and name != only:
            # Listed without loading the module, so `s4l serve` never imports training code.
            sub.add_parser(name)
            continue
        module = _load(module_name)
        if module is None:
            p = sub.add_parser(name, help="(not available in this build)")
            p.set_defaults(_module=None)
            continue
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Load only the chosen subcommand's module when one is named.
    first = next((a for a in argv if not a.startswith("-")), None)
    chosen = first if first in COMMANDS else None
    parser = build_parser(only=chosen)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.command is None:
        parser.print_help()
        return 2
    module = getattr(args, "_module", None)
    if module is None:
        print(f"s4l {args.command}: not available in this build", file=sys.stderr)
        return 2
    try:
        return int(module.main(args) or 0)
    except UserError as e:
        print(f"s4l {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"s4l {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
