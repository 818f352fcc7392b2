"""The tiny-validation-set study at small scale (paper Fig. 3) on CIFAR-10, resumable.

The paper trains a sweep of supervised 1%-label models and shows that their accuracies on 1,000
(1 per class), 5,000 and 50,046 held-out training images are strongly correlated, so the tiny set
selects models as well as the big one (S4L_REFERENCE.md section 2). Here:

1. one label file of 100 labels per class (1,000 CIFAR-10 labels), written once and reused;
2. a sweep of supervised runs (preset ``cifar10-supervised-1pct``) over learning rate x weight
   decay (default 4 x 3 = 12 runs): an ``s4l.study`` Study built below, so each run spends the same
   budget of forwarded images (25,000 by default) with the CPU defaults of
   experiments/table1_small.toml (stride-2 stem, one BN batch per step), all holding out the same
   ``--val-per-class`` training images per class (default 50 = a 500-image pool, the paper's 50:1
   ratio of pool to tiny set);
3. ``s4l val-study`` on that held-out pool with 1, 5 and all (``--val-per-class``) images per class.

The sweep's finished runs are recorded in its study ledger (``sweep.json``) and skipped; an
interrupted run resumes from its checkpoint; ``s4l val-study`` reuses each model's extracted
logits, so the same command continues across sessions::

    .venv/bin/python experiments/val_study_small.py --dry-run      # the plan and its cost
    .venv/bin/python experiments/val_study_small.py                # the sweep + the study (hours)
    .venv/bin/python experiments/val_study_small.py --smoke --data IMAGE_FOLDER   # plumbing only

Outputs in ``--workdir`` (default runs/val_study_small): per (labels, pool, budget) a folder with
the label file, the sweep runs (``sweep/supervised/<lr>_<wd>/seed0``), the sweep's study report
``sweep.{json,md,png}``, ``heldout_pool.txt`` (the pool as a Places205-format list) and
``study/val_study.{json,png}``; ``val_study_small.{md,json,png}`` (the latest study); unless
``--no-docs`` (or ``--smoke``), ``docs/val_study_small.md`` and ``docs/val_study_small.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from s4l import study as S
from s4l.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from s4l.provenance import git_commit, machine_info

# The checkout this script sits in (docs/ and runs/ are beside it).
ROOT = Path(__file__).resolve().parents[1]
PRESET = "cifar10-supervised-1pct"
DEFAULT_BUDGET = 25_000  # 12 runs in about 15 minutes on 2 CPU cores (the CPU defaults below)
SMOKE_BUDGET = 128
log = logging.getLogger("val_study_small")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "val_study_small"))
    ap.add_argument("--data", help="training data root with train/ and the eval split (default: "
                    "CIFAR-10 from ../shared/data, unpacked into ~/.cache/s4l-test-data); the pool "
                    "is read back from files, so builtin:digits does not work here")
    ap.add_argument("--labels-per-class", type=int, default=100, help="default 100 (1,000 labels)")
    ap.add_argument("--val-per-class", type=int, default=50,
                    help="held-out pool images per class (default 50)")
    ap.add_argument("--label-seed", type=int, default=0)
    ap.add_argument("--lrs", default="0.001,0.003,0.01,0.03",
                    help="learning rates of the sweep (default 0.001,0.003,0.01,0.03; the preset's "
                    "is 0.0025 at batch 64)")
    ap.add_argument("--wds", default="0.0001,0.001,0.01",
                    help="weight decays of the sweep (default 0.0001,0.001,0.01)")
    ap.add_argument("--seed", type=int, default=0,
                    help="training seed of every sweep run (default 0; another seed is a config "
                    "override: the run ids keep the study's seed0 slot)")
    ap.add_argument("--budget-scale", type=float, default=1.0,
                    help=f"multiply the per-run budget ({DEFAULT_BUDGET:,} images; smoke "
                    f"{SMOKE_BUDGET}) by this")
    ap.add_argument("--stem", default="small-s2", choices=("small", "small-s2"),
                    help="network stem (default small-s2, as experiments/table1_small.toml)")
    ap.add_argument("--ghost-bn", action="store_true",
                    help="keep the preset's per-device BN batch (default: one BN batch per step)")
    ap.add_argument("--draws", type=int, default=20, help="random small sets per size (default 20)")
    ap.add_argument("--rate", type=float, default=None, help="images/s for the --dry-run estimate")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="trainer config override for every run")
    ap.add_argument("--smoke", action="store_true",
                    help="the -smoke preset (1/16 width, 16 px) and a tiny budget: plumbing only")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/val_study_small.*")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.lr_list = [float(x) for x in args.lrs.split(",") if x.strip()]
    args.wd_list = [float(x) for x in args.wds.split(",") if x.strip()]
    if len(args.lr_list) * len(args.wd_list) < 2:
        ap.error("the study compares models: give at least 2 (lr, wd) combinations")
    if args.val_per_class < 1:
        ap.error("--val-per-class must be >= 1: the study needs a held-out pool")
    return args


def sweep_study(args, data: str, budget: int, report: Path) -> S.Study:
    """The lr x wd sweep of supervised runs as a Study: same labels, pool and budget for all."""
    common = [("channels_last", True), ("data.workers", 1), ("model.stem", args.stem)]
    if not args.ghost_bn:
        common.append(("bn.ghost_batch", None))
    if args.seed:
        common.append(("seed", args.seed))
    return S.Study(
        name="val_study_small", title="val_study_small: the supervised lr x wd sweep", data=data,
        labels_per_class=args.labels_per_class, label_seed=args.label_seed,
        heldout_per_class=args.val_per_class, schedule={"images": budget},
        methods=(S.Method("supervised", PRESET),),
        sweep=(("optim.lr", tuple(args.lr_list)), ("optim.weight_decay", tuple(args.wd_list))),
        common=tuple(common), report=str(report), source_file="experiments/val_study_small.py")


def write_pool(source, label_file: Path, val_per_class: int, label_seed: int, out: Path) -> str:
    """The held-out pool (the trainer's own data.val_per_class split) as a Places205-format list
    relative to the train split, so `s4l val-study` reads exactly those images."""
    from s4l.datasets import ImageFolderSplit, training_subsets

    if not isinstance(source, ImageFolderSplit):
        raise SystemExit(f"{source!r}: the study reads the held-out images back from files; give "
                         "an image-folder root with --data (builtin:digits has no files)")
    sub = training_subsets(source, label_map=label_file, label_seed=label_seed,
                           val_per_class=val_per_class)
    text = "".join(f"{source.relpath(i)} {source.samples[i][1]}\n" for i in sub.val)
    if not out.exists() or out.read_text() != text:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text)
    log.info("held-out pool: %d images (%d per class) in %s", len(sub.val), val_per_class, out)
    return f"places205:{out}@{source.split_dir}"


def summary_markdown(study: dict, runs: dict[str, tuple], meta: dict) -> str:
    """The report: the study's numbers and the sweep (held-out and test accuracy per run)."""
    m, g = meta["machine"], meta["git"]
    gpu = ", ".join(m["gpu"]) if m.get("gpu") else "none"
    first = next(iter(runs.values()))[0]
    lines = [
        "# Tiny validation sets at small scale (paper Fig. 3, CIFAR-10)",
        "",
        f"Made by `experiments/val_study_small.py` on {meta['created_at']}"
        + (" — SMOKE RUN: tiny nets, meaningless numbers" if meta["smoke"] else "") + ":",
        "",
        f"    {meta['command']}",
        "",
        f"- sweep: {len(study['models'])} supervised runs (preset `{meta['preset']}`), learning rate "
        f"x weight decay, {meta['labels']:,} labels, seed {meta['seed']}, "
        f"{meta['budget']:,} forward+backward images each ({first.budget['steps']:,} steps x "
        f"{first.budget['images_per_step']} images)",
        f"- pool: {study['pool_images']} training images held out of every run "
        f"({meta['val_per_class']} per class, {study['classes']} classes); small sets drawn "
        f"{study['draws']} times per size",
        f"- machine: {m['cpu']}, {m['cores_usable']} usable cores, GPU: {gpu}; git commit "
        f"`{g['commit']}`{' (with uncommitted changes)' if g['dirty'] else ''}",
        "",
        "| images per class | images | Pearson | Spearman | Kendall | picks the pool's best | "
        "mean regret (points) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in study["sizes"].values():
        c = s["correlation"]
        lines.append(
            f"| {s['per_class']} | {s['images']} | {c['pearson']['mean']:.3f} ± {c['pearson']['std']:.3f} "
            f"| {c['spearman']['mean']:.3f} ± {c['spearman']['std']:.3f} "
            f"| {c['kendall']['mean']:.3f} ± {c['kendall']['std']:.3f} "
            f"| {s['picks_best_fraction']:.0%} | {s['pick_regret_points']['mean']:.2f} |")
    lines += ["", "![small-set vs pool accuracy](val_study_small.png)", "",
              "| run | lr | weight decay | pool top-1 | test top-1 (never used to select) |",
              "|---|---|---|---|---|"]
    for name, acc in zip(study["models"], study["full_accuracy"]):
        tag = name.split("/")[0]
        run, rec = runs.get(tag, (None, {}))
        test = rec.get("test_top1")
        lines.append(f"| {tag} | {run.hyper['optim.lr']:g} | {run.hyper['optim.weight_decay']:g} "
                     f"| {acc:.2f} | {'-' if test is None else f'{test:.2f}'} |"
                     if run else f"| {name} | | | {acc:.2f} | |")
    lines += ["", f"All numbers: `{meta['study_json']}`.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    command = "python experiments/val_study_small.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    from s4l.cli import main as s4l_main
    from s4l.datasets import open_source

    data = S.resolve_data(args.data or "cifar10")
    n_classes = len(open_source(data, "train").classes)
    budget = max(1, round((SMOKE_BUDGET if args.smoke else DEFAULT_BUDGET) * args.budget_scale))
    work = Path(args.workdir)
    base = work / (f"{args.labels_per_class * n_classes}labels-val{args.val_per_class}-budget{budget}"
                   + (f"-labelseed{args.label_seed}" if args.label_seed else ""))
    study = sweep_study(args, data, budget, base / "sweep")

    # -- 1. the sweep: a study (its ledger, base/sweep.json, keeps the finished runs)
    rc = S.run_study(study, workdir=base, report=base / "sweep", smoke=args.smoke,
                     overrides=args.overrides, dry_run=args.dry_run, command=command,
                     progress=not args.no_progress and sys.stderr.isatty(), rate=args.rate)
    if args.dry_run:
        return rc
    ledger, _ = S.load_ledger(base / "sweep.json")
    planner = S.Planner(study, data, base, ledger, smoke=args.smoke, overrides=args.overrides)
    sweep = [r for r in planner.build() if r.role == "sweep"]
    done = {S.Planner.tag(r.hyper): (r, planner.result(r)) for r in sweep
            if planner.result(r) and (r.workdir / "checkpoint.pt").exists()}
    if len(done) < 2:
        log.error("only %d sweep run(s) finished: the study needs 2", len(done))
        return 1

    # -- 2. the study on the held-out pool (logits per checkpoint are cached by s4l val-study)
    pool = write_pool(planner.source, planner.label_file, args.val_per_class, args.label_seed,
                      base / "heldout_pool.txt")
    sizes = sorted({1, 5, args.val_per_class} & set(range(1, args.val_per_class + 1)))
    study_dir = base / "study"
    argv_vs = ["val-study", "--models", *[str(r.workdir / "checkpoint.pt") for r, _ in done.values()],
               "--data", pool, "--split", "train", "--out", str(study_dir),
               "--per-class", *map(str, sizes), "--draws", str(args.draws),
               "--workers", str(sweep[0].config.data.workers), "--overwrite"]
    if args.no_progress or not sys.stderr.isatty():
        argv_vs.append("--no-progress")
    log.info("s4l %s", " ".join(shlex.quote(a) for a in argv_vs))
    if (vs_rc := s4l_main(argv_vs)) != 0:
        log.error("s4l val-study failed (exit %d)", vs_rc)
        return 1
    result = json.loads((study_dir / "val_study.json").read_text())

    # -- 3. the report
    meta = {"created_at": S.now(), "command": command, "smoke": args.smoke,
            "preset": sweep[0].config.preset, "labels": planner.counts["labelled"],
            "seed": args.seed, "budget": budget, "val_per_class": args.val_per_class,
            "machine": machine_info(), "git": git_commit(ROOT),
            "study_json": str(study_dir / "val_study.json"), "sweep_runs": len(sweep),
            "finished_runs": len(done), "sweep_report": str(base / "sweep.json")}
    text = summary_markdown(result, done, meta)
    atomic_write_text(work / "val_study_small.md", text)
    atomic_write_bytes(work / "val_study_small.png", (study_dir / "val_study.png").read_bytes())
    atomic_write_json(work / "val_study_small.json", newline=True, indent=2, default=str, obj={**meta, "study": result, "runs": [
        {"id": r.id, "budget": r.budget, "hyper": r.hyper, "workdir": str(r.workdir),
         "status": "done" if planner.result(r) else "todo",
         "wall_s": (planner.result(r) or {}).get("wall_s")} for r in sweep]})
    if not args.no_docs and not args.smoke:
        atomic_write_bytes(ROOT / "docs" / "val_study_small.png",
                           (work / "val_study_small.png").read_bytes())
        atomic_write_text(ROOT / "docs" / "val_study_small.md", text)
        log.info("wrote docs/val_study_small.md and docs/val_study_small.png")
    print(text)
    if rc != 0:
        log.error("some sweep runs did not finish (see %s)", base / "sweep.md")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
