"""The tiny-validation-set study at small scale (paper Fig. 3) on CIFAR-10, resumable.

The paper trains a sweep of supervised 1%-label models and shows that their accuracies on 1,000
(1 per class), 5,000 and 50,046 held-out training images are strongly correlated, so the tiny set
selects models as well as the big one (S4L_REFERENCE.md section 2). Here:

1. one label file of 100 labels per class (1,000 CIFAR-10 labels), written once and reused;
2. a sweep of supervised runs (preset ``cifar10-supervised-1pct``) over learning rate x weight
   decay (default 4 x 3 = 12 runs), each with the same compute budget (``table1_small``'s
   definition: forward+backward images; 25,000 by default, and its CPU defaults: stride-2 stem,
   one BN batch per step), all holding out the same ``--val-per-class`` training
   images per class (default 50 = a 500-image pool, the paper's 50:1 ratio of pool to tiny set);
3. ``s4l val-study`` on that held-out pool with 1, 5 and all (``--val-per-class``) images per class.

Every run has its own workdir and is skipped once ``final_metrics.json`` exists (resumed from
its checkpoint otherwise); ``s4l val-study`` reuses each model's extracted logits, so the same
command continues across sessions::

    .venv/bin/python experiments/val_study_small.py --dry-run      # the plan and its cost
    .venv/bin/python experiments/val_study_small.py                # the sweep + the study (hours)
    .venv/bin/python experiments/val_study_small.py --smoke --data IMAGE_FOLDER   # plumbing only

Outputs in ``--workdir`` (default runs/val_study_small): the label file; per (labels, pool,
budget) a folder with the sweep runs, ``heldout_pool.txt`` (the pool as a Places205-format list)
and ``study/val_study.{json,png}``; ``val_study_small.{md,json,png}`` (the latest study);
unless ``--no-docs`` (or ``--smoke``), ``docs/val_study_small.md`` and ``docs/val_study_small.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import table1_small as t1  # noqa: E402  (the sibling script: budget, provenance, helpers)

ROOT = t1.ROOT
PRESET = "cifar10-supervised-1pct"
DEFAULT_BUDGET = 25_000  # 12 runs in about 15 minutes on 2 CPU cores (table1_small CPU defaults)
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
    ap.add_argument("--seed", type=int, default=0, help="training seed of every sweep run")
    ap.add_argument("--budget-scale", type=float, default=1.0,
                    help=f"multiply the per-run budget ({DEFAULT_BUDGET:,} images; smoke "
                    f"{t1.SMOKE_BUDGET}) by this")
    ap.add_argument("--stem", default=t1.DEFAULT_STEM, choices=("small", "small-s2"),
                    help="network stem (default small-s2, as table1_small.py)")
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


def build_sweep(args, data: str, source, label_file: Path, work: Path, budget: int) -> list[t1.Run]:
    """One budgeted supervised run per (lr, wd), all on the same labels and held-out pool."""
    counts = t1.count_images(source, label_file, args.val_per_class, args.label_seed)
    tag = f"{counts.labelled}labels"
    base = work / (f"{tag}-val{args.val_per_class}-budget{budget}"
                   + (f"-labelseed{args.label_seed}" if args.label_seed else ""))
    preset = PRESET + ("-smoke" if args.smoke else "")
    runs = []
    for lr, wd in itertools.product(args.lr_list, args.wd_list):
        name = f"lr{lr:g}_wd{wd:g}"
        cfg = t1.make_config(preset, data, args.seed, label_file, args.val_per_class,
                             args.overrides, [("optim.lr", lr), ("optim.weight_decay", wd)],
                             args.label_seed, stem=args.stem, ghost_bn=args.ghost_bn)
        cfg, rec = t1.apply_budget(cfg, budget, counts.labelled, counts.train)
        rec.update(lr=lr, weight_decay=wd)
        runs.append(t1.Run(f"{tag}/{name}", name, "supervised", tag, args.seed, preset,
                           base / name, cfg, rec, []))
    return runs


def write_pool(source, label_file: Path, val_per_class: int, label_seed: int, out: Path) -> str:
    """The held-out pool (the trainer's own data.val_per_class split) as a Places205-format list
    relative to the train split, so `s4l val-study` reads exactly those images."""
    from s4l.datasets import ImageFolderSplit, training_subsets

    if not isinstance(source, ImageFolderSplit):
        raise SystemExit(f"{source!r}: the study reads the held-out images back from files; give "
                         "an image-folder root with --data (builtin:digits has no files)")
    sub = training_subsets(source, label_map=label_file, label_seed=label_seed,
                           val_per_class=val_per_class)
    lines = [f"{source.relpath(i)} {source.samples[i][1]}\n" for i in sub.val]
    text = "".join(lines)
    if not out.exists() or out.read_text() != text:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    log.info("held-out pool: %d images (%d per class) in %s", len(lines), val_per_class, out)
    return f"places205:{out}@{source.split_dir}"


def summary_markdown(study: dict, runs: list[t1.Run], meta: dict) -> str:
    """The report: the sweep (held-out and test accuracy per run) and the study's numbers."""
    m, g = meta["machine"], meta["git"]
    gpu = ", ".join(m["gpu"]) if m.get("gpu") else "none"
    tests = {r.name: (t1.run_state(r).get("metrics") or {}) for r in runs}
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
        f"{meta['budget']:,} forward+backward images each ({runs[0].budget['steps']:,} steps x "
        f"{runs[0].budget['images_per_step']} images)",
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
    by_name = {r.name: r for r in runs}
    for name, acc in zip(study["models"], study["full_accuracy"]):
        run_name = name.split("/")[0]
        r = by_name.get(run_name)
        test = tests.get(run_name, {}).get("eval/top1")
        lines.append(f"| {run_name} | {r.budget['lr']:g} | {r.budget['weight_decay']:g} | {acc:.2f} "
                     f"| {'-' if test is None else f'{test:.2f}'} |" if r else f"| {name} | | | {acc:.2f} | |")
    lines += ["", f"All numbers: `{meta['study_json']}`.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    command = "python experiments/val_study_small.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    from s4l.cli import main as s4l_main
    from s4l.datasets import open_source

    data = t1.cifar10_root(args.data)
    source = open_source(data, "train")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    label_file = t1.ensure_label_map(
        t1.label_file_path(work, f"{args.labels_per_class * len(source.classes)}labels",
                           args.label_seed), source,
        args.labels_per_class, args.label_seed)
    budget = max(1, round((t1.SMOKE_BUDGET if args.smoke else DEFAULT_BUDGET) * args.budget_scale))
    runs = build_sweep(args, data, source, label_file, work, budget)
    if args.dry_run:
        rate = args.rate or t1.measured_rate(runs)
        t1.print_plan(runs, rate or 80.0, "--rate" if args.rate else
                      ("measured on this sweep's finished runs" if rate else "default guess"))
        return 0

    # -- 1. the sweep
    failed = {}
    for run in runs:
        st = t1.run_state(run)
        if st["status"] == "done":
            log.info("%s: finished, skipped (held-out top-1 %.2f)", run.id,
                     st["metrics"].get("heldout/top1", float("nan")))
            continue
        if st["status"] == "stale":
            failed[run.id] = "stale: finished with another configuration; remove its workdir"
            continue
        try:
            t1.execute(run, data, {}, progress=not args.no_progress and sys.stderr.isatty())
        except KeyboardInterrupt:
            raise
        except Exception as e:  # record and go on: the study uses the runs that finished
            failed[run.id] = f"{type(e).__name__}: {e}"
            log.error("%s failed: %s\n%s", run.id, e, traceback.format_exc())
    done = [r for r in runs if t1.run_state(r)["status"] == "done"]
    if len(done) < 2:
        log.error("only %d sweep run(s) finished: the study needs 2", len(done))
        return 1

    # -- 2. the study on the held-out pool (logits per checkpoint are cached by s4l val-study)
    base = done[0].workdir.parent
    pool = write_pool(source, label_file, args.val_per_class, args.label_seed,
                      base / "heldout_pool.txt")
    sizes = sorted({1, 5, args.val_per_class} & set(range(1, args.val_per_class + 1)))
    study_dir = base / "study"
    argv_vs = ["val-study", "--models", *[str(r.workdir / "checkpoint.pt") for r in done],
               "--data", pool, "--split", "train", "--out", str(study_dir),
               "--per-class", *map(str, sizes), "--draws", str(args.draws),
               "--workers", str(runs[0].config.data.workers), "--overwrite"]
    if args.no_progress or not sys.stderr.isatty():
        argv_vs.append("--no-progress")
    log.info("s4l %s", " ".join(shlex.quote(a) for a in argv_vs))
    rc = s4l_main(argv_vs)
    if rc != 0:
        log.error("s4l val-study failed (exit %d)", rc)
        return 1
    study = json.loads((study_dir / "val_study.json").read_text())

    # -- 3. the report
    meta = {"created_at": t1._now(), "command": command, "smoke": args.smoke, "preset": runs[0].preset,
            "labels": int(runs[0].regime.removesuffix("labels")), "seed": args.seed, "budget": budget,
            "val_per_class": args.val_per_class, "machine": t1.machine_info(), "git": t1.git_info(),
            "study_json": str(study_dir / "val_study.json"), "sweep_runs": len(runs),
            "finished_runs": len(done), "failed": failed}
    text = summary_markdown(study, runs, meta)
    (work / "val_study_small.md").write_text(text)
    shutil.copyfile(study_dir / "val_study.png", work / "val_study_small.png")
    t1._write_json(work / "val_study_small.json", {**meta, "study": study,
                   "runs": [{"id": r.id, "budget": r.budget, "workdir": str(r.workdir),
                             "status": t1.run_state(r)["status"],
                             "wall_s": sum(s.get("wall_s", 0) for s in t1.wall_record(r)["sessions"])}
                            for r in runs]})
    if not args.no_docs and not args.smoke:
        shutil.copyfile(work / "val_study_small.png", ROOT / "docs" / "val_study_small.png")
        (ROOT / "docs" / "val_study_small.md").write_text(text)
        log.info("wrote docs/val_study_small.md and docs/val_study_small.png at %s",
                 time.strftime("%H:%M"))
    print(text)
    if failed:
        log.error("%d sweep run(s) did not finish: %s", len(failed), failed)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
