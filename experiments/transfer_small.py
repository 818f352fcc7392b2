"""Transfer at small scale: S4L-Rotation vs rotation-only features, linear probes on another domain.

The paper's Places205 experiment (S4L_REFERENCE.md section 4), shrunk to run here: two
backbones are trained on CIFAR-10 with the trainer library -

- S4L-Rotation (preset ``cifar10-s4l-rotation-10pct``: rotation loss on all images + class loss
  on 10% labels), and
- rotation-only self-supervision (preset ``cifar10-rotation-pretrain``: no labels at all),

their frozen ``pre_logits`` features of Imagenette (real photos of 10 other classes: a second
domain standing in for Places205) are extracted with ``s4l extract``, and linear logistic
regression is fitted with the ``short`` and ``long`` SGD schedules plus the scikit-learn
reference. The paper's claim to check: the S4L features reach good accuracy much sooner (short
schedule) than the rotation-only ones.

Every step is resumable and skipped when its output exists (the trainer resumes its workdir,
extraction resumes its shards), so re-running the same command continues where it stopped:

    .venv/bin/python experiments/transfer_small.py                       # the full run (hours on 2 CPUs)
    .venv/bin/python experiments/transfer_small.py --smoke               # a minute: the plumbing only
    .venv/bin/python experiments/transfer_small.py --s4l-ckpt A.pt --rot-ckpt B.pt   # skip training

Outputs: WORKDIR/ (runs, features, probe/report.json, probe/learning_curves.png) and, unless
``--no-docs``, docs/transfer_small.md (results table + the command) and docs/transfer_small.png.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

from s4l.io import atomic_write_bytes, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"s4l_rotation": "cifar10-s4l-rotation-10pct", "rotation": "cifar10-rotation-pretrain"}
LABELS = {"s4l_rotation": "S4L-Rotation (10% labels)", "rotation": "Rotation only (self-supervised)"}
log = logging.getLogger("transfer_small")


def unpack(name: str, top: str, given: str | None) -> Path:
    """A data set root: the one given, or ../shared/data's tarball unpacked into the cache."""
    if given:
        return Path(given)
    from s4l.io import data_cache_dir, shared_data_dir, unpack_once

    archive, cache = shared_data_dir() / name, data_cache_dir()
    if not (cache / f".{top}.done").exists() and not archive.exists():
        sys.exit(f"{archive} is absent; pass the unpacked root with --{top.split('-')[0]}")
    return unpack_once(archive, top, cache)


def train_backbone(name: str, cifar: Path, workdir: Path, smoke: bool, overrides: list[str]) -> Path:
    """Train (or resume, or just re-read) one backbone with the trainer library."""
    from s4l.training import config as C
    from s4l.training.presets import get_preset
    from s4l.training.trainer import train

    preset = get_preset(PRESETS[name] + ("-smoke" if smoke else ""))
    cfg = C.apply_overrides(preset.config, [f"data.root={'builtin:digits' if smoke else cifar}",
                                            *overrides])
    run = workdir / "runs" / name
    final = run / "final_metrics.json"
    if not final.exists():
        log.info("training %s (%s) in %s", name, preset.name, run)
        train(cfg, run)
    return run / "checkpoint.pt"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "transfer_small"))
    ap.add_argument("--cifar10", help="unpacked CIFAR-10 root (default: ../shared/data, unpacked)")
    ap.add_argument("--imagenette", help="unpacked Imagenette root (default: ../shared/data, unpacked)")
    ap.add_argument("--s4l-ckpt", help="use this S4L-Rotation checkpoint instead of training one")
    ap.add_argument("--rot-ckpt", help="use this rotation-only checkpoint instead of training one")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="trainer config override for both runs, e.g. optim.total_steps=2000")
    ap.add_argument("--schedules", default="short=30,long=300",
                    help="probe SGD schedules in epochs (default short=30,long=300)")
    ap.add_argument("--per-class", type=int, default=None,
                    help="use only the first N Imagenette images per class and split")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny presets on builtin:digits, 8 Imagenette images per class, 2/4-epoch "
                    "probes: checks the plumbing in about a minute, results meaningless")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/transfer_small.*")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.smoke:
        args.per_class = args.per_class or 8
        if args.schedules == ap.get_default("schedules"):
            args.schedules = "short=2,long=4"
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    command = "python experiments/transfer_small.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    from s4l.evaluation.transfer import transfer_probe

    # -- 1. backbones
    cifar = None if (args.s4l_ckpt and args.rot_ckpt) or args.smoke else unpack(
        "cifar10-jpg.tar.gz", "cifar10", args.cifar10)
    ckpts = {
        "s4l_rotation": Path(args.s4l_ckpt) if args.s4l_ckpt else
        train_backbone("s4l_rotation", cifar, workdir, args.smoke, args.overrides),
        "rotation": Path(args.rot_ckpt) if args.rot_ckpt else
        train_backbone("rotation", cifar, workdir, args.smoke, args.overrides),
    }
    # -- 2. features of the other domain, 3. probes (both schedules), one line per backbone
    nette = unpack("imagenette-224.tar.gz", "imagenette-224", args.imagenette)
    report = transfer_probe(ckpts, nette, workdir, schedules=args.schedules,
                            per_class=args.per_class)
    probe_dir = workdir / "probe"
    # -- 4. the results table
    table = results_table(report, ckpts)
    print(table)
    if not args.no_docs:
        write_docs(report, table, command, probe_dir / "learning_curves.png", args.smoke)
    return 0


def results_table(report: dict, ckpts: dict) -> str:
    rows = ["| backbone (CIFAR-10) | L-BFGS top-1 | " + " | ".join(
        f"SGD {s} top-1 ({{}} epochs)" for s in ("short", "long")) + " |"]
    lines = []
    for name, r in zip(ckpts, report["results"]):
        cells = [LABELS[name], f"{r['sklearn']['top1']:.2f}" if "sklearn" in r else "-"]
        epochs = {}
        for s in ("short", "long"):
            if s in r.get("sgd", {}):
                cells.append(f"{r['sgd'][s]['top1']:.2f} (top-5 {r['sgd'][s]['top5']:.2f})")
                epochs[s] = r["sgd"][s]["schedule"]["epochs"]
            else:
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    head = rows[0].format(epochs.get("short", "-"), epochs.get("long", "-"))
    return "\n".join([head, "|---|---|---|---|", *lines])


def write_docs(report: dict, table: str, command: str, png: Path, smoke: bool) -> None:
    docs = ROOT / "docs"
    atomic_write_bytes(docs / "transfer_small.png", png.read_bytes())
    r0 = report["results"][0]
    text = f"""# Transfer at small scale: S4L-Rotation vs rotation-only features

Made by `experiments/transfer_small.py` on {report['created_at']}{' (SMOKE RUN: tiny models, meaningless numbers)' if smoke else ''}:

    {command}

Backbones trained on CIFAR-10 (presets `{PRESETS['s4l_rotation']}`, `{PRESETS['rotation']}`);
frozen `pre_logits` features of Imagenette ({r0['train']['rows']} train / {r0['val']['rows']} val
images) probed with multinomial logistic regression (top-1 on Imagenette val, %):

{table}

![learning curves](transfer_small.png)

Every number, the settings and the feature-file hashes are in the run's `probe/report.json`.
"""
    atomic_write_text(docs / "transfer_small.md", text)
    log.info("wrote docs/transfer_small.md and docs/transfer_small.png at %s", time.strftime("%H:%M"))


if __name__ == "__main__":
    raise SystemExit(main())
