"""Table 1 at small scale: every method of the paper's Table 1 on CIFAR-10, same budget, resumable.

The paper's Table 1 (S4L_REFERENCE.md section 2) compares, at 10% / 1% ImageNet labels, a
supervised baseline, pseudo-labels, VAT, VAT + EntMin, rotation / exemplar self-supervision
followed by a linear head or by fine-tuning, and S4L-Rotation / S4L-Exemplar. This script runs the
same rows on CIFAR-10 (32 px, ResNet50v2 with the small stem, width 0.25 = the ``cifar10-*``
presets of ``s4l.training.presets``) with:

- 4,000 labels (400 per class, class-balanced), drawn ONCE and saved as a label file
  (``s4l.datasets.write_label_map``) that every run reads (``data.labels``); optionally a second
  regime with 1,000 labels (``--low-label-regime``, the 1%-column presets);
- a tiny validation split held out of training (``data.val_per_class`` per class, the same images
  for every run that has a labelled subset). Nothing is selected on the test set: every row uses
  its preset's hyper-parameters and reports its FINAL checkpoint; the held-out accuracy is listed
  beside it as the number one would select by;
- the SAME compute budget for every training run: ``steps x images per step`` where images per
  step counts every image that goes through forward + backward (labelled + unlabelled, times 4
  for the rotation family, times 8 for the exemplar family). The schedule of each preset keeps its
  warmup / decay proportions and is stretched to that many steps. Two-stage rows (self-supervised
  pretraining, the pseudo-label teacher) spend one budget per stage; results.md says so per row;
- fixed seeds: 3 (``--seeds 0,1,2``) for the supervised baseline and S4L-Rotation, the first
  seed for every other row (``--all-seeds`` to run all seeds everywhere);
- CPU-sized defaults so that the whole table fits about 2 hours on 2 CPU cores: 100,000 images
  per run, a 3x3 stride-2 stem (``--stem small-s2``, about 3.5x cheaper than the presets' stride-1
  stem at 32 px), one BN batch per step instead of the presets' per-device BN shards
  (``--ghost-bn`` restores them), channels-last, one loader worker;
- top-1 / top-5 on the 10,000 CIFAR-10 test images, mean and spread over seeds.

Each training run has its own workdir. A run with ``final_metrics.json`` is finished and skipped,
a run with a checkpoint is resumed exactly by the trainer, so the same command continues the
table across sessions::

    .venv/bin/python experiments/table1_small.py --dry-run             # the plan and its cost
    .venv/bin/python experiments/table1_small.py                       # the whole table (hours)
    .venv/bin/python experiments/table1_small.py --only supervised --budget-scale 0.1
    .venv/bin/python experiments/table1_small.py --smoke --data builtin:digits   # plumbing only

Outputs, in ``--workdir`` (default runs/table1_small): ``label_map_<N>labels_seed<k>.json``,
``<N>labels-budget<B>/<row>/seed<s>/`` (the trainer's workdirs), ``results.md``,
``results.json`` and ``results.png`` (the table beside the paper's numbers, the budget, seeds,
machine, git commit, wall time per run); with ``--docs``, ``docs/table1_small.{md,png}``. Rows not run yet appear as "-".
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import re
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from s4l.provenance import file_sha256, git_commit, machine_info

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("S4L_SHARED_DATA", ROOT.parent / "shared" / "data"))
CACHE = Path(os.environ.get("S4L_TEST_CACHE", Path.home() / ".cache" / "s4l-test-data"))
log = logging.getLogger("table1_small")

# CIFAR-10 forward+backward images per run, the cifar10 presets' budget (training/presets.py).
DEFAULT_BUDGET = 100_000
DEFAULT_STEM = "small-s2"
# CPU-sized defaults (2 cores, the whole table in about 2 hours): a stride-2 3x3 stem, one BN
# batch per step (the presets' per-device BN shards, a TPU artefact, run one forward pass per
# shard: ~2x slower on CPU), channels-last, one loader worker. --stem small / --ghost-bn restore
# the presets' choices; --set overrides win over all of these.
CPU_DEFAULTS = (("channels_last", True), ("data.workers", 1))
SMOKE_BUDGET = 128
# Rough CPU cost of one budget image relative to a supervised image, for --dry-run estimates only:
# VAT adds a power-iteration forward+backward and an adversarial forward+backward; a linear probe
# backpropagates through the head only.
COST = {"vat": 3.0, "vat-entmin": 3.0, "moam": 2.0, "linear": 0.4}  # moam: VAT on half the batch

# The paper's Table 1 (top-5, 10% / 1% labels) and the release's top-1 where it reports one
# (S4L_REFERENCE.md section 2). These are the references printed beside our numbers.
PAPER = {
    "supervised": {"top5_10": 80.43, "top5_1": 48.43, "top1_10": 56.36, "top1_1": 25.09},
    "pseudo-labels": {"top5_10": 82.41, "top5_1": 51.56, "top1_10": 60.24},
    "vat": {"top5_10": 82.78, "top5_1": 44.05, "top1_10": 59.98},
    "vat-entmin": {"top5_10": 83.39, "top5_1": 46.96, "top1_10": 60.87},
    "rotation-linear": {"top5_10": 39.75, "top5_1": 25.98},
    "rotation-finetune": {"top5_10": 78.53, "top5_1": 45.11},
    "exemplar-linear": {"top5_10": 32.32, "top5_1": 21.33},
    "exemplar-finetune": {"top5_10": 81.01, "top5_1": 44.90},
    "s4l-rotation": {"top5_10": 83.82, "top5_1": 53.37, "top1_10": 61.37},
    "s4l-exemplar": {"top5_10": 83.72, "top5_1": 47.02, "top1_10": 62.17},
}


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One Table 1 row: its preset stem and the stage it needs first (if any)."""

    key: str
    method: str
    preset: str          # stem: "cifar10-<preset>-10pct" / "-1pct"
    needs: str | None = None   # "teacher" | "rotation-pretrain" | "exemplar-pretrain"
    multi_seed: bool = False


ROWS = (
    RowSpec("supervised", "Supervised baseline", "supervised", multi_seed=True),
    RowSpec("pseudo-labels", "Pseudo-labels", "pseudo-label", needs="teacher"),
    RowSpec("vat", "VAT", "vat"),
    RowSpec("vat-entmin", "VAT + Entropy Minimization", "vat-entmin"),
    RowSpec("rotation-linear", "Self-sup. Rotation + Linear", "rotation-linear",
            needs="rotation-pretrain"),
    RowSpec("rotation-finetune", "Self-sup. Rotation + Fine-tune", "rotation-finetune",
            needs="rotation-pretrain"),
    RowSpec("exemplar-linear", "Self-sup. Exemplar + Linear", "exemplar-linear",
            needs="exemplar-pretrain"),
    RowSpec("exemplar-finetune", "Self-sup. Exemplar + Fine-tune", "exemplar-finetune",
            needs="exemplar-pretrain"),
    RowSpec("s4l-rotation", "S4L-Rotation", "s4l-rotation", multi_seed=True),
    RowSpec("s4l-exemplar", "S4L-Exemplar", "s4l-exemplar"),
)
ROW_KEYS = tuple(r.key for r in ROWS)


@dataclasses.dataclass
class Run:
    """One training run of the plan (a row's run, or a stage another row needs)."""

    id: str                      # "<regime>/<name>/seed<s>"
    name: str                    # row key, or "rotation-pretrain" / "exemplar-pretrain"
    row: str | None              # the Table 1 row it reports, None for a pretraining stage
    regime: str
    seed: int
    preset: str
    workdir: Path
    config: Any                  # TrainConfig (budgeted)
    budget: dict[str, Any]
    deps: list[str]
    pseudo_labels: Path | None = None   # pseudo-label file to make from the teacher first
    teacher: Path | None = None         # the teacher run's checkpoint


@dataclasses.dataclass(frozen=True)
class Regime:
    """A label regime: how many labels per class and which presets' column it uses."""

    per_class: int
    column: str  # "10pct" or "1pct"

    def tag(self, n_classes: int) -> str:
        return f"{self.per_class * n_classes}labels"


# ============================================================================ data and labels


def cifar10_root(given: str | None) -> str:
    """The CIFAR-10 root: the one given, or ../shared/data's tarball unpacked into the cache
    (the same place tests/conftest.py unpacks it)."""
    if given:
        return given
    from s4l.provenance import unpack_once

    archive = SHARED / "cifar10-jpg.tar.gz"
    if not (CACHE / ".cifar10.done").exists():
        if not archive.exists():
            sys.exit(f"{archive} is absent; pass the unpacked CIFAR-10 root with --data")
        log.info("unpacking %s into %s", archive, CACHE)
    return str(unpack_once(archive, "cifar10", CACHE))


def label_file_path(work: Path, tag: str, seed: int) -> Path:
    """Where a regime's label file lives: one file per (number of labels, draw seed)."""
    return work / f"label_map_{tag}_seed{seed}.json"


def ensure_label_map(path: Path, source, per_class: int, seed: int) -> Path:
    """Write the class-balanced label file once; afterwards only check that it still fits."""
    from s4l.datasets import balanced_subset, label_map_names, read_label_map, select_labelled

    if path.exists():
        idx = select_labelled(source, read_label_map(path))
        counts = [0] * len(source.classes)
        for i in idx:
            counts[source.samples[i][1]] += 1
        if set(counts) != {per_class}:
            raise SystemExit(f"{path} has {counts} labels per class, not {per_class}: it was made "
                             "for another regime; use another --workdir")
        log.info("reusing label file %s (%d labels)", path, len(idx))
        return path
    from s4l.datasets import write_label_map

    idx = balanced_subset(source.samples, per_class=per_class, seed=seed,
                          class_names=source.classes)
    write_label_map(path, label_map_names(source, idx))
    log.info("wrote label file %s: %d per class, %d labels (seed %d)", path, per_class, len(idx), seed)
    return path


@dataclasses.dataclass(frozen=True)
class Counts:
    """Image counts the trainer will see (for the step arithmetic of the budget)."""

    labelled: int     # the labelled subset
    train: int        # all training images minus the held-out validation split
    classes: int


def count_images(source, label_file: Path, val_per_class: int, label_seed: int = 0) -> Counts:
    from s4l.datasets import training_subsets

    sub = training_subsets(source, label_map=label_file, val_per_class=val_per_class,
                           label_seed=label_seed)
    return Counts(labelled=len(sub.labelled), train=len(sub.unlabelled), classes=len(source.classes))


# ============================================================================ the budget


def images_per_step(cfg) -> tuple[int, int, int]:
    """(images through forward+backward per step, labelled batch, unlabelled batch)."""
    from s4l.training.objectives import OBJECTIVES

    return OBJECTIVES[cfg.objective.name].forwarded_per_step(cfg.optim.batch_size,
                                                             cfg.optim.unsup_batch_mult)


def apply_budget(cfg, budget_images: int, n_labelled: int, n_train: int):
    """Stretch the preset's schedule (warmup / decays / end, in its own proportions) to the number
    of steps that spends `budget_images` forward+backward images; no intermediate test-set eval
    (only the final one), a checkpoint every 10% of the run. Returns (config, budget record)."""
    from s4l.training import config as C
    from s4l.training.objectives import OBJECTIVES

    obj = OBJECTIVES[cfg.objective.name]
    per_step, b_l, b_u = images_per_step(cfg)
    # The trainer's epoch (trainer.make_plan): passes over the labelled subset, or over all
    # training images for the purely self-supervised objectives.
    steps_per_epoch = n_labelled // b_l if obj.uses_labelled else n_train // b_u
    if steps_per_epoch < 1:
        raise SystemExit(f"{cfg.preset}: batch {b_l or b_u} is larger than the data "
                         f"({n_labelled} labelled / {n_train} training images)")
    steps = max(1, budget_images // per_step)
    o = cfg.optim
    epochs = steps / steps_per_epoch
    f = epochs / o.total_epochs
    decays = [round(e * f, 6) for e in o.decay_epochs]
    cfg = C.apply_overrides(cfg, [
        ("optim.warmup_epochs", round(o.warmup_epochs * f, 6)),
        ("optim.decay_epochs", decays),
        ("optim.total_epochs", epochs),
        ("optim.total_steps", steps),
        ("eval.every_epochs", epochs),
        ("checkpoint.every_epochs", epochs),
        ("checkpoint.every_steps", max(1, steps // 10)),
    ])
    record = {"steps": steps, "images_per_step": per_step, "labelled_batch": b_l,
              "unlabelled_batch": b_u, "images": steps * per_step, "steps_per_epoch": steps_per_epoch,
              "epochs": round(epochs, 3), "objective": cfg.objective.name,
              "budget_images": budget_images}
    return cfg, record


# ============================================================================ the plan


def preset_name(stem: str, regime: Regime, smoke: bool) -> str:
    pretrain = stem.endswith("-pretrain")
    name = f"cifar10-{stem}" + ("" if pretrain else f"-{regime.column}")
    return name + ("-smoke" if smoke else "")


def make_config(preset: str, data: str, seed: int, label_file: Path | None, val_per_class: int,
                overrides: Sequence[str], extra: Sequence[tuple[str, Any]] = (), label_seed: int = 0,
                stem: str = "small", ghost_bn: bool = True):
    """The preset with this table's data, seed, label file and held-out split (the held-out draw
    uses `data.label_seed`, so it is the label draw's seed everywhere), then `--set` overrides."""
    from s4l.training import config as C
    from s4l.training.presets import get_preset

    cfg = get_preset(preset).config
    pairs: list = [*CPU_DEFAULTS, ("data.root", data), ("model.stem", stem), ("seed", seed), ("data.val_per_class", val_per_class),
                   ("data.label_seed", label_seed),
                   ("data.labels_per_class", None), ("data.label_fraction", None),
                   ("data.labels", str(label_file) if label_file else None), *extra]
    if not ghost_bn:
        pairs.append(("bn.ghost_batch", None))
    return C.apply_overrides(C.apply_overrides(cfg, pairs), list(overrides))


def build_plan(args, data: str, source, regimes: Sequence[Regime], work: Path,
               budget: int) -> list[Run]:
    """Every run the requested rows need (dependencies first), with budgeted configs."""
    n_classes = len(source.classes)
    seeds = args.seed_list
    rows = [r for r in ROWS if not args.only or r.key in args.only]
    runs: dict[str, Run] = {}
    for regime in regimes:
        tag = regime.tag(n_classes)
        label_file = ensure_label_map(label_file_path(Path(args.workdir), tag, args.label_seed), source,
                                      regime.per_class, args.label_seed)
        counts = count_images(source, label_file, args.val_per_class, args.label_seed)
        base = work / (f"{tag}-budget{budget}" + (f"-labelseed{args.label_seed}"
                                                      if args.label_seed else ""))

        def add(name: str, row: str | None, stem: str, seed: int, extra=(), deps=(),
                pseudo=None, teacher=None, label_file=label_file, counts=counts, base=base,
                regime=regime, tag=tag) -> Run:
            rid = f"{tag}/{name}/seed{seed}"
            if rid in runs:
                return runs[rid]
            preset = preset_name(stem, regime, args.smoke)
            cfg = make_config(preset, data, seed, label_file, args.val_per_class, args.overrides,
                              extra, args.label_seed, stem=args.stem, ghost_bn=args.ghost_bn)
            n_lab = counts.train if cfg.data.pseudo_labels else counts.labelled
            cfg, rec = apply_budget(cfg, budget, n_lab, counts.train)
            runs[rid] = Run(rid, name, row, tag, seed, preset, base / name / f"seed{seed}", cfg, rec,
                            list(deps), pseudo, teacher)
            return runs[rid]

        for row in rows:
            for seed in (seeds if row.multi_seed or args.all_seeds else seeds[:1]):
                if row.needs == "teacher":
                    teacher = add("supervised", "supervised" if "supervised" in ROW_KEYS else None,
                                  "supervised", seed)
                    pl = base / "pseudo_labels" / f"teacher-seed{seed}.json"
                    # The student trains on ALL images with the file's labels: no labelled subset.
                    add(row.key, row.key, row.preset, seed, deps=[teacher.id], pseudo=pl,
                        teacher=teacher.workdir / "checkpoint.pt", label_file=None,
                        extra=[("data.pseudo_labels", str(pl))])
                elif row.needs:
                    # The label file is given to the pretraining too (its objective ignores the
                    # labels) so that its held-out split is the same images as every other run's.
                    pre = add(row.needs, None, row.needs, seed)
                    ck = pre.workdir / "checkpoint.pt"
                    add(row.key, row.key, row.preset, seed, deps=[pre.id],
                        extra=[("init.checkpoint", str(ck))])
                else:
                    add(row.key, row.key, row.preset, seed)
    return list(runs.values())


# ============================================================================ running


def run_state(run: Run) -> dict[str, Any]:
    """done / partial (with its last logged step) / todo / stale (finished with another config)."""
    from s4l.training import config as C

    final = run.workdir / "final_metrics.json"
    if final.exists():
        metrics = json.loads(final.read_text())
        if metrics.get("config_hash") != C.config_hash(run.config):
            return {"status": "stale", "metrics": metrics}
        return {"status": "done", "metrics": metrics}
    if (run.workdir / "checkpoint.pt").exists():
        step = 0
        mfile = run.workdir / "metrics.jsonl"
        if mfile.exists():
            for line in mfile.read_text().splitlines():
                try:
                    step = max(step, int(json.loads(line).get("step", 0)))
                except (ValueError, json.JSONDecodeError):
                    pass
        return {"status": "partial", "step": step}
    return {"status": "todo"}


def wall_record(run: Run) -> dict[str, Any]:
    p = run.workdir / "table1_wall.json"
    return json.loads(p.read_text()) if p.exists() else {"sessions": []}


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def execute(run: Run, data: str, label_files: dict[str, Path], progress: bool) -> None:
    """Make the pseudo-label file if needed, then train (or resume) the run, timing it."""
    from s4l.cli import main as s4l_main
    from s4l.training.trainer import train

    t0 = time.time()
    rec = wall_record(run)
    session = {"started": _now(), "host": platform.node()}
    rec["sessions"].append(session)
    run.workdir.mkdir(parents=True, exist_ok=True)
    if run.pseudo_labels is not None and not run.pseudo_labels.exists():
        run.pseudo_labels.parent.mkdir(parents=True, exist_ok=True)
        argv = ["pseudo-label", "--checkpoint", str(run.teacher), "--data", data,
                "--labels", str(label_files[run.regime]), "--out", str(run.pseudo_labels),
                "--workers", str(run.config.data.workers)]
        if not progress:
            argv.append("--no-progress")
        log.info("s4l %s", " ".join(shlex.quote(a) for a in argv))
        rc = s4l_main(argv)
        if rc != 0 or not run.pseudo_labels.exists():
            raise RuntimeError(f"s4l pseudo-label failed (exit {rc})")
    log.info("training %s (%s, %d steps x %d images)", run.id, run.preset,
             run.budget["steps"], run.budget["images_per_step"])
    try:
        train(run.config, run.workdir, progress=progress)
        session["status"] = "finished"
    except BaseException as e:
        session["status"] = f"failed: {type(e).__name__}"
        raise
    finally:
        session["wall_s"] = round(time.time() - t0, 2)
        _write_json(run.workdir / "table1_wall.json", rec)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ============================================================================ provenance


def git_info() -> dict[str, Any]:
    return git_commit(ROOT)


# ============================================================================ results


METRICS = (("top1", "eval/top1"), ("top5", "eval/top5"),
           ("top1_rotation_averaged", "eval/top1_rotation_averaged"),
           ("top5_rotation_averaged", "eval/top5_rotation_averaged"),
           ("heldout_top1", "heldout/top1"), ("heldout_top5", "heldout/top5"))


def summarise(values: Sequence[float]) -> dict[str, Any] | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def collect(plan: list[Run]) -> tuple[list[dict], list[dict]]:
    """Per-run records and per-row summaries (finished runs only count)."""
    by_id = {r.id: r for r in plan}
    records = []
    for r in plan:
        st = run_state(r)
        wall = wall_record(r)
        rec = {"id": r.id, "name": r.name, "row": r.row, "regime": r.regime, "seed": r.seed,
               "preset": r.preset, "workdir": str(r.workdir), "status": st["status"],
               "budget": r.budget, "deps": r.deps,
               "wall_s": round(sum(s.get("wall_s", 0) for s in wall["sessions"]), 1),
               "sessions": len(wall["sessions"])}
        if st["status"] == "done":
            m = st["metrics"]
            rec["metrics"] = {k: m[src] for k, src in METRICS if src in m}
            # With fewer than 5 classes the trainer reports top-k, k = number of classes.
            for key in m:
                hit = re.fullmatch(r"(eval|heldout)/top([2-4])(_rotation_averaged)?", key)
                if hit:
                    name = ("heldout_" if hit[1] == "heldout" else "") + "top5" + (hit[3] or "")
                    rec["metrics"].setdefault(name, m[key])
                    rec["top_k"] = int(hit[2])
            rec["step"] = m.get("step")
        records.append(rec)
    rows = []
    for regime in sorted({r.regime for r in plan}, key=lambda t: -int(t.split("labels")[0])):
        for spec in ROWS:
            mine = [x for x in records if x["row"] == spec.key and x["regime"] == regime
                    and x["name"] == spec.key]
            if not mine:
                continue
            done = [x for x in mine if x["status"] == "done"]
            deps = {d for x in mine for d in x["deps"]}
            stage_images = sum(by_id[d].budget["images"] for d in deps) / max(1, len(mine))
            summary = {k: summarise([x["metrics"][k] for x in done if k in x.get("metrics", {})])
                       for k, _ in METRICS}
            col = "10" if mine[0]["preset"].split("-smoke")[0].endswith("10pct") else "1"
            paper = PAPER[spec.key]
            rows.append({
                "row": spec.key, "method": spec.method, "regime": regime,
                "paper": {"column": f"{col}%", "top5": paper.get(f"top5_{col}"),
                          "top1_release": paper.get(f"top1_{col}")},
                "seeds_planned": [x["seed"] for x in mine], "seeds_done": [x["seed"] for x in done],
                "images_per_run": mine[0]["budget"]["images"],
                "steps": mine[0]["budget"]["steps"],
                "images_per_step": mine[0]["budget"]["images_per_step"],
                "earlier_stage_images": int(stage_images),
                "earlier_stages": sorted(deps),
                "wall_s": [x["wall_s"] for x in done],
                "summary": {k: v for k, v in summary.items() if v is not None},
            })
    return records, rows


def _ms(s: dict | None) -> str:
    if not s:
        return "-"
    if s["std"] is None:
        return f"{s['mean']:.2f}"
    return f"{s['mean']:.2f} ± {s['std']:.2f}"


def _paper(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _dur(s: float) -> str:
    return "-" if not s else (f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.1f} min"
                              if s >= 90 else f"{s:.0f} s")


def write_results(out: Path, plan: list[Run], meta: dict[str, Any]) -> dict[str, Any]:
    records, rows = collect(plan)
    result = {"kind": "s4l-table1-small", **meta, "rows": rows, "runs": records}
    _write_json(out / "results.json", result)
    (out / "results.md").write_text(render_markdown(result))
    plot_results(result, out / "results.png")
    log.info("wrote %s, %s and %s", out / "results.md", out / "results.json", out / "results.png")
    return result


def plot_results(r: dict[str, Any], path: Path) -> None:
    """Per regime, one horizontal bar per row: our top-1 and top-5 (mean, std over seeds as error
    bars, every seed as a dot) beside the paper's top-5; rows without results are left empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = sorted({x["regime"] for x in r["rows"]}, key=lambda t: -int(t.split("labels")[0]))
    if not regimes:
        return
    runs = {x["id"]: x for x in r["runs"]}
    fig, axes = plt.subplots(1, len(regimes), figsize=(10.5 * len(regimes), 5.5), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        rows = [x for x in r["rows"] if x["regime"] == regime][::-1]
        y = list(range(len(rows)))
        h = 0.27
        for off, key, color, label in ((h, "top5", "tab:blue", "ours top-5"),
                                       (0.0, "top1", "tab:orange", "ours top-1")):
            means = [x["summary"].get(key, {}).get("mean", 0.0) for x in rows]
            stds = [x["summary"].get(key, {}).get("std") or 0.0 for x in rows]
            ax.barh([v + off for v in y], means, height=h, xerr=stds, color=color, label=label,
                    capsize=2)
            for yi, x in zip(y, rows):
                vals = [runs[f"{regime}/{x['row']}/seed{s}"]["metrics"][key]
                        for s in x["seeds_done"]
                        if key in runs.get(f"{regime}/{x['row']}/seed{s}", {}).get("metrics", {})]
                if len(vals) > 1:
                    ax.scatter(vals, [yi + off] * len(vals), s=9, color="black", zorder=5)
        paper = [x["paper"]["top5"] or 0.0 for x in rows]
        ax.barh([v - h for v in y], paper, height=h, color="lightgrey", edgecolor="grey",
                label=f"paper top-5 (ImageNet, {rows[0]['paper']['column']} labels)")
        ax.set_yticks(y, [x["method"] for x in rows], fontsize=8)
        ax.set_xlim(0, 100)
        ax.set_xlabel("accuracy (%)")
        ax.set_title(f"CIFAR-10, {regime}, {r['budget']['images_per_run']:,} images per run "
                     "(ours: test split, mean ± std over seeds)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def render_markdown(r: dict[str, Any]) -> str:
    m, g, b = r["machine"], r["git"], r["budget"]
    gpu = ", ".join(m["gpu"]) if m.get("gpu") else "none"
    lines = [
        "# Table 1 at small scale (CIFAR-10)",
        "",
        f"Made by `experiments/table1_small.py` on {r['created_at']}"
        + (" — SMOKE RUN: tiny nets, meaningless numbers" if r["smoke"] else "") + ":",
        "",
        f"    {r['command']}",
        "",
        "![our rows beside the paper's](results.png)",
        "",
        f"- data: `{r['data']}` ({r['train_images']} training images, {r['classes']} classes); "
        f"test = the `{r['eval_split']}` split ({r['eval_images']} images, never used to select)",
        "- labels: " + ", ".join(
            f"{x['regime']} ({x['per_class']}/class, file `{x['label_file']}`, sha256 "
            f"{x['label_file_sha256'][:12]})" for x in r["regimes"]),
        f"- held-out validation split: {r['val_per_class']} training images per class, removed from "
        "training (the pseudo-label student draws its own: see notes)",
        f"- budget: **{b['images_per_run']:,} forward+backward images per training run** "
        f"(steps x images per step; budget scale {b['scale']}); {b['definition']}",
        f"- seeds: {r['seeds']} for {', '.join(r['multi_seed_rows'])}; "
        + ("all seeds" if r["all_seeds"] else f"seed {r['seeds'][0]}") + " for the other rows",
        f"- machine: {m['cpu']}, {m['cores_usable']} usable / {m['cores_logical']} logical cores, "
        f"GPU: {gpu}; torch {m.get('torch', '?')}",
        f"- git commit: `{g['commit']}`{' (with uncommitted changes)' if g['dirty'] else ''}",
        f"- wall time of the runs so far: {_dur(sum(x['wall_s'] for x in r['runs']))}",
        "",
    ]
    for regime in sorted({x["regime"] for x in r["rows"]}, key=lambda t: -int(t.split("labels")[0])):
        rows = [x for x in r["rows"] if x["regime"] == regime]
        col = rows[0]["paper"]["column"]
        lines += [
            f"## {regime}",
            "",
            f"Ours: top-1 / top-5 (%) on the test split, mean ± std over seeds (final checkpoint). "
            f"Paper: ImageNet, ResNet50v2, {col} labels (top-5 from Table 1, top-1 from the "
            "original release where it reports one).",
            "",
            "| method | paper top-5 | paper top-1 | ours top-1 | ours top-5 | ours top-1 rot.-avg. "
            "| held-out top-1 | seeds done | steps x img/step | earlier stage | wall / run |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for x in rows:
            s = x["summary"]
            planned, done = x["seeds_planned"], x["seeds_done"]
            stage = (f"+{x['earlier_stage_images']:,} img ({', '.join(d.split('/')[1] for d in x['earlier_stages'])})"
                     if x["earlier_stages"] else "-")
            wall = _dur(statistics.fmean(x["wall_s"])) if x["wall_s"] else "-"
            lines.append(
                f"| {x['method']} | {_paper(x['paper']['top5'])} | {_paper(x['paper']['top1_release'])} "
                f"| {_ms(s.get('top1'))} | {_ms(s.get('top5'))} | {_ms(s.get('top1_rotation_averaged'))} "
                f"| {_ms(s.get('heldout_top1'))} | {len(done)}/{len(planned)} "
                f"| {x['steps']:,} x {x['images_per_step']} | {stage} | {wall} |")
        lines.append("")
    lines += ["## Runs", "", "| run | preset | status | steps | images | wall | test top-1 | test top-5 |",
              "|---|---|---|---|---|---|---|---|"]
    for x in r["runs"]:
        mt = x.get("metrics", {})
        lines.append(f"| {x['id']} | `{x['preset']}` | {x['status']} | {x['budget']['steps']:,} "
                     f"| {x['budget']['images']:,} | {_dur(x['wall_s'])} "
                     f"| {mt.get('top1', float('nan')):.2f} | {mt.get('top5', float('nan')):.2f} |"
                     if mt else
                     f"| {x['id']} | `{x['preset']}` | {x['status']} | {x['budget']['steps']:,} "
                     f"| {x['budget']['images']:,} | {_dur(x['wall_s'])} | - | - |")
    lines += [
        "",
        "## Notes",
        "",
        "- Same budget: every training run processes the same number of images through forward + "
        "backward (rotated / exemplar copies counted). It does not equalise FLOPs: VAT's power "
        "iteration and adversarial pass roughly triple its cost per image, and a linear probe "
        "backpropagates through the head only. Rows with an earlier stage (self-supervised "
        "pretraining, the pseudo-label teacher = the supervised run of the same seed) spend one more "
        "budget there, shown in 'earlier stage'.",
        "- No selection on the test set: hyper-parameters are the presets' (scaled from the "
        "release's ImageNet values), the reported model is the last checkpoint, and the test split "
        "is evaluated once, at the end. The held-out column is what a selection would use.",
        "- The pseudo-label student trains without a labelled subset (all images, hard labels), and "
        "the trainer then draws its held-out split from all training images rather than from the "
        "unlabelled ones, so the student's held-out images are not the other rows' and may include "
        "labelled images its teacher trained on; its held-out number is only indicative.",
        "- Rotation-family rows also report rotation-averaged accuracy (mean logits over the 4 "
        "rotations); the main columns are unrotated, as for every other row.",
        "- Small-scale numbers are not comparable in absolute terms with the paper's (CIFAR-10 "
        "32 px, width 0.25, minutes of CPU per run vs ImageNet 224 px on TPUs); what can be "
        "compared is the ordering of the rows.",
        "",
    ]
    return "\n".join(lines)


# ============================================================================ main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "table1_small"),
                    help="where the label files, runs and results go (default runs/table1_small)")
    ap.add_argument("--data", help="training data root (default: CIFAR-10 from ../shared/data, "
                    "unpacked into ~/.cache/s4l-test-data); any image folder with train/ and the "
                    "eval split, or builtin:digits")
    ap.add_argument("--labels-per-class", type=int, default=400,
                    help="labelled images per class of the main regime (default 400 = 4,000 "
                    "CIFAR-10 labels; 10%%-column presets)")
    ap.add_argument("--low-label-regime", type=int, nargs="?", const=100, default=None,
                    metavar="PER_CLASS", help="also run the low-label regime (default 100/class = "
                    "1,000 labels; 1%%-column presets)")
    ap.add_argument("--label-seed", type=int, default=0, help="seed of the label draw (default 0)")
    ap.add_argument("--val-per-class", type=int, default=10,
                    help="held-out validation images per class (default 10)")
    ap.add_argument("--seeds", default="0,1,2",
                    help="seeds of the supervised and S4L-Rotation rows (default 0,1,2); the "
                    "other rows use the first")
    ap.add_argument("--all-seeds", action="store_true", help="run every row with every seed")
    ap.add_argument("--only", default=None,
                    help=f"comma-separated rows to run (and what they need): {', '.join(ROW_KEYS)}")
    ap.add_argument("--budget-scale", type=float, default=1.0,
                    help=f"multiply the per-run budget ({DEFAULT_BUDGET:,} images; smoke "
                    f"{SMOKE_BUDGET}) by this")
    ap.add_argument("--stem", default=DEFAULT_STEM, choices=("small", "small-s2"),
                    help="network stem for 32 px (default small-s2: a 3x3 stride-2 conv, about "
                    "3.5x cheaper than the presets' stride-1 'small' stem)")
    ap.add_argument("--ghost-bn", action="store_true",
                    help="keep the presets' per-device BN batch (bn.ghost_batch: one forward pass "
                    "per BN shard, as on the release's TPU cores); default: one BN batch per step")
    ap.add_argument("--rate", type=float, default=None,
                    help="images/s for the --dry-run time estimate (default: measured from this "
                    "table's finished runs, else 80)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="trainer config override applied to every run (e.g. data.workers=0)")
    ap.add_argument("--smoke", action="store_true",
                    help="the presets' -smoke variants (1/16 width, 16 px, 64 eval images) and a "
                    "tiny budget: checks the plumbing in seconds, meaningless numbers")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and its estimated cost")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--docs", action="store_true",
                    help="also copy results.md / results.png to docs/table1_small.md / .png (the "
                    "published table; not with --smoke)")
    ap.add_argument("--imagenet-compute", type=float, nargs="?", const=1000.0, default=None,
                    metavar="IMG_PER_S", help="print each ImageNet preset's images processed and "
                    "GPU-days at IMG_PER_S forward+backward images/s per GPU (default 1000), exit")
    args = ap.parse_args(argv)
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not args.seed_list:
        ap.error("--seeds needs at least one seed")
    if args.only:
        args.only = [s.strip() for s in args.only.split(",") if s.strip()]
        bad = [s for s in args.only if s not in ROW_KEYS]
        if bad:
            ap.error(f"unknown row(s) {bad}; rows: {', '.join(ROW_KEYS)}")
    if args.budget_scale <= 0:
        ap.error("--budget-scale must be > 0")
    return args


IMAGENET_TRAIN = 1_281_167


def imagenet_compute(gpu_rate: float) -> list[dict[str, Any]]:
    """Images processed by each ImageNet preset (Tables 1 and 2) and a GPU-days estimate at
    `gpu_rate` forward+backward images/s per GPU (VAT rows weighted x3, linear x0.4: COST)."""
    from s4l.training.objectives import OBJECTIVES
    from s4l.training.presets import PRESETS

    out = []
    for p in PRESETS.values():
        if p.scale != "imagenet" or p.smoke:
            continue
        cfg = p.config
        obj = OBJECTIVES[cfg.objective.name]
        per_step, b_l, b_u = images_per_step(cfg)
        n_classes = 1000
        n_train = IMAGENET_TRAIN - cfg.data.val_per_class * n_classes
        n_lab = cfg.data.labels_per_class * n_classes if cfg.data.labels_per_class else n_train
        if cfg.data.pseudo_labels is not None or cfg.objective.name == "pseudo-label":
            n_lab = n_train  # the student trains on every image
        spe = n_lab // b_l if obj.uses_labelled else n_train // b_u
        steps = round(cfg.optim.total_epochs * spe)
        images = steps * per_step
        cost = COST.get(cfg.objective.name, 1.0) * cfg.model.width ** 2
        out.append({"preset": p.name, "row": p.paper_row, "paper": p.paper_number,
                    "width": cfg.model.width, "steps": steps, "images_per_step": per_step,
                    "images": images,
                    "gpu_days": images * cost / gpu_rate / 86400})
    return out


def print_plan(plan: list[Run], rate: float, rate_source: str) -> None:
    total_img = todo_img = 0.0
    todo_cost = 0.0
    print(f"{'run':<44} {'preset':<36} {'status':<8} {'steps':>7} {'img/step':>8} {'images':>10}")
    for r in plan:
        st = run_state(r)
        b = r.budget
        status = st["status"] + (f"@{st['step']}" if st["status"] == "partial" else "")
        print(f"{r.id:<44} {r.preset:<36} {status:<8} {b['steps']:>7} {b['images_per_step']:>8} "
              f"{b['images']:>10,}")
        total_img += b["images"]
        if st["status"] != "done":
            left = b["images"] * (1 - st.get("step", 0) / b["steps"])
            todo_img += left
            todo_cost += left * COST.get(r.config.objective.name, 1.0)
    print(f"\n{len(plan)} training runs, {total_img:,.0f} forward+backward images in all; "
          f"{todo_img:,.0f} left.")
    print(f"estimated time left: {todo_cost / rate / 3600:.2f} h at {rate:.0f} images/s "
          f"({rate_source}; VAT weighted x{COST['vat']:g}, linear x{COST['linear']:g})")


def measured_rate(plan: list[Run]) -> float | None:
    """Images/s (supervised-equivalent) of this table's finished runs, if any."""
    img = sec = 0.0
    for r in plan:
        if run_state(r)["status"] != "done":
            continue
        w = sum(s.get("wall_s", 0) for s in wall_record(r)["sessions"])
        if w > 0:
            img += r.budget["images"] * COST.get(r.config.objective.name, 1.0)
            sec += w
    return img / sec if sec > 0 else None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.imagenet_compute:
        print(f"| preset | paper row | paper | width | steps | images/step | images | GPU-days at "
              f"{args.imagenet_compute:g} img/s |\n|---|---|---|---|---|---|---|---|")
        for x in imagenet_compute(args.imagenet_compute):
            print(f"| `{x['preset']}` | {x['row']} | {x['paper']} | {x['width']:g} | {x['steps']:,} "
                  f"| {x['images_per_step']:,} | {x['images'] / 1e6:,.1f} M | {x['gpu_days']:.1f} |")
        return 0
    started = time.time()
    command = "python experiments/table1_small.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    from s4l.datasets import open_source

    data = cifar10_root(args.data) if not (args.smoke and args.data is None) else "builtin:digits"
    source = open_source(data, "train")
    regimes = [Regime(args.labels_per_class, "10pct")]
    if args.low_label_regime:
        regimes.append(Regime(args.low_label_regime, "1pct"))
    budget = max(1, int(round((SMOKE_BUDGET if args.smoke else DEFAULT_BUDGET) * args.budget_scale)))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    plan = build_plan(args, data, source, regimes, work, budget)
    label_files = {reg.tag(len(source.classes)):
                   label_file_path(work, reg.tag(len(source.classes)), args.label_seed)
                   for reg in regimes}

    if args.dry_run:
        rate = args.rate or measured_rate(plan)
        src = "--rate" if args.rate else ("measured on this table's finished runs" if rate else
                                          "default guess, no run finished yet")
        print_plan(plan, rate or 80.0, src)
        return 0

    failed: dict[str, str] = {}
    for run in plan:
        st = run_state(run)
        if st["status"] == "done":
            log.info("%s: finished, skipped (top-1 %s)", run.id,
                     f"{st['metrics'].get('eval/top1', float('nan')):.2f}")
            continue
        if st["status"] == "stale":
            failed[run.id] = "stale: finished with another configuration; remove its workdir"
            log.error("%s: %s (%s)", run.id, failed[run.id], run.workdir)
            continue
        blocked = [d for d in run.deps if d in failed]
        if blocked:
            failed[run.id] = f"skipped: needs {blocked}"
            log.error("%s: %s", run.id, failed[run.id])
            continue
        try:
            execute(run, data, label_files, progress=not args.no_progress and sys.stderr.isatty())
        except KeyboardInterrupt:
            raise
        except Exception as e:  # one failed run must not stop the table: record, go on
            failed[run.id] = f"{type(e).__name__}: {e}"
            log.error("%s failed: %s\n%s", run.id, e, traceback.format_exc())

    eval_source = open_source(data, plan[0].config.data.eval_split) if plan else None
    meta = {
        "created_at": _now(), "command": command, "smoke": args.smoke, "data": data,
        "train_images": len(source), "classes": len(source.classes),
        "eval_split": plan[0].config.data.eval_split if plan else None,
        "eval_images": (min(len(eval_source), plan[0].config.data.eval_limit)
                        if plan[0].config.data.eval_limit else len(eval_source)) if plan else 0,
        "regimes": [{"regime": reg.tag(len(source.classes)), "per_class": reg.per_class,
                     "presets": reg.column, "label_file": str(label_files[reg.tag(len(source.classes))]),
                     "label_file_sha256": file_sha256(label_files[reg.tag(len(source.classes))])}
                    for reg in regimes],
        "val_per_class": args.val_per_class,
        "seeds": args.seed_list, "all_seeds": args.all_seeds,
        "multi_seed_rows": [r.key for r in ROWS if r.multi_seed],
        "budget": {"images_per_run": budget, "scale": args.budget_scale,
                   "definition": "images per step = (labelled batch + unlabelled batch) x copies "
                   "(4 rotations for the rotation family, 8 for exemplar); steps = budget // "
                   "images per step; schedules keep their preset's proportions"},
        "overrides": args.overrides, "machine": machine_info(), "git": git_info(),
        "session_wall_s": round(time.time() - started, 1), "failed": failed,
    }
    result = write_results(work, plan, meta)
    if args.docs and not args.smoke:
        import shutil

        text = (work / "results.md").read_text().replace("(results.png)", "(table1_small.png)")
        (ROOT / "docs" / "table1_small.md").write_text(text)
        shutil.copyfile(work / "results.png", ROOT / "docs" / "table1_small.png")
        log.info("wrote docs/table1_small.md and docs/table1_small.png")
    for row in result["rows"]:
        s = row["summary"]
        log.info("%-14s %-32s top-1 %s  top-5 %s  (%d/%d seeds)", row["regime"], row["method"],
                 _ms(s.get("top1")), _ms(s.get("top5")), len(row["seeds_done"]),
                 len(row["seeds_planned"]))
    if failed:
        log.error("%d run(s) did not finish: %s", len(failed), "; ".join(f"{k}: {v}" for k, v in failed.items()))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
