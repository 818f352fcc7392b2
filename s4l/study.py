"""`s4l study CONFIG.toml`: a declarative, resumable study of training runs, and its report.

A study is a short TOML file (experiments/*.toml): the data and label regime, one schedule for
every method (labelled epochs, the paper's protocol, or forwarded images, a compute-matched
comparison), the methods (a preset each), an optional learning-rate x weight-decay sweep selected
on the held-out split, seeds, a convergence check, diagnosis variants. This module turns it into
training runs, runs what is not finished, and writes `<report>.json`, `<report>.md` and
`<report>.png`.

- Finished runs are kept: a run is identified by a portable hash of its config (paths replaced
  by the data set's name and the label file's sha256), and its result is recorded in the report
  JSON as soon as it ends, so committing that file keeps the study across machines. A run with a
  checkpoint resumes exactly (the trainer's resume).
- Selection: a method's sweep runs seed 0 of every grid point; the point with the best held-out
  top-1 (ties: the smaller lr, then the smaller wd; the test split is never looked at) is the
  method's selected config, whose seeds 1.. are the final runs, together with the sweep run of
  the selected point (its seed 0). Without a sweep, the presets' hyper-parameters are used.
- `--dry-run` prints the plan, each run's forwarded images, its status and the estimated time
  left, at rates measured on this study's finished runs (defaults before any).

- Two-stage rows: a method with `pretrain = "<preset>"` starts from the checkpoint of a stage run
  (`stage/<preset>/seed<s>`, shared by every method with that stage and seed; sized by
  `stage_schedule = {images = N}`, default the study's schedule, which must then be an images
  budget); a method with `teacher = "<method>"` is a pseudo-label student: the teacher's run of
  the same seed labels every training image (`s4l pseudo-label`) and the student trains on all of
  them with no label file. A dependent run's record holds its dependencies' hashes (`deps`), so
  a changed stage or teacher makes it a new run; a finished dependency whose checkpoint is not on
  this machine (only the ledger is) is retrained before a run that needs it.
- Diagnosis: each `[[diagnosis]]` is a variant of a method's selected config (`set`, or
  `hyper_of` another method's selected lr / wd), run at `seed` (default 0) or, with `seeds = n`,
  at seeds `seed .. seed + n - 1`; each seed is read against the method's selected config at the
  same seed, and several seeds add their mean ± std beside the references'. `kind =
  "bn-recompute"` is an analysis of the selected run instead (BN statistics recomputed).

Study file keys (all optional except `name`, `data`, `schedule` and `method`): see
experiments/table1_protocol.toml, which documents each one, and experiments/table1_small.toml
(pretraining stages and a pseudo-label teacher).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as dt
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
import tomllib
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from s4l.errors import UserError

HELP = "run a declarative study of training runs (sweep, seeds, diagnosis) and write its report"
log = logging.getLogger("s4l.study")
ROOT = Path(__file__).resolve().parents[1]

# Forwarded images/s per objective before any run of the study has finished (dry-run estimates
# only; rates measured on the study's finished runs replace them). Measured on the 2-core VM
# (2026-12-02, width 0.25, 32 px, small-s2 stem, one BN batch, fp32) with
# `benchmarks/train_throughput.py --size 32 --width 0.25 --batch 64 --stem small-s2
# --channels-last --no-jpeg`: supervised 333, S4L-Rotation 401; exemplar is a guess (8 augmented
# copies per image are made by the loader).
DEFAULT_RATE = {"supervised": 330.0, "s4l-rotation": 400.0, "rotation": 400.0,
                "s4l-exemplar": 300.0, "exemplar": 300.0, "fine-tune": 330.0,
                "pseudo-label": 330.0, "vat": 140.0, "vat-entmin": 140.0, "linear": 500.0}
# VAT: a power iteration and an adversarial pass per image (~0.4x); a linear head: no backward
# through the backbone (~1.5x); fine-tune and pseudo-label students cost a supervised step.

# The paper's Table 1 (ImageNet, ResNet50v2): top-5 at 10% / 1% labels, and the release's top-1
# where it reports one (S4L_REFERENCE.md section 2).
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

SWEEP_KEYS = ("optim.lr", "optim.weight_decay")
SHORT = {"optim.lr": "lr", "optim.weight_decay": "wd", "objective.rotation_weight": "rotw",
         "objective.class_rotations": "cls"}


# ============================================================================ the study file


@dataclasses.dataclass(frozen=True)
class Method:
    key: str                       # "supervised", "s4l-rotation", ... (the report's row)
    preset: str
    seeds: int = 1
    label: str = ""                # the row's name in the report
    pretrain: str | None = None    # a stage preset whose checkpoint initialises the run
    teacher: str | None = None     # a method whose final run (same seed) pseudo-labels the data
    sweep: bool = True             # False: the preset's hyper-parameters, no sweep
    set: tuple[tuple[str, Any], ...] = ()
    grid: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # this method's values of some of the
                                   # study's sweep keys (the others: the study's lists)


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    key: str
    method: str
    label: str
    kind: str = "train"            # "train" (a run with `set`) or "bn-recompute" (analysis)
    set: tuple[tuple[str, Any], ...] = ()
    hyper_of: str | None = None    # train with this method's selected lr / wd
    seed: int = 0                  # the first seed
    seeds: int = 1                 # how many: one run per seed, seed .. seed + seeds - 1

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seed, self.seed + self.seeds))


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    title: str
    data: str
    labels_per_class: int | None
    label_seed: int
    heldout_per_class: int
    schedule: dict[str, Any]       # {"labelled_epochs": N} or {"images": N}
    methods: tuple[Method, ...]
    sweep: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    common: tuple[tuple[str, Any], ...] = ()
    convergence: dict[str, Any] | None = None
    diagnosis: tuple[Diagnosis, ...] = ()
    report: str = ""
    label_file: str | None = None  # a saved label file (relative to the study file's folder)
    notes: str = ""
    source_file: str = ""
    transfer: dict[str, Any] | None = None  # {backbone, baseline_preset, data, schedules}
    stage_schedule: dict[str, Any] | None = None  # pretraining stages' {"images": N} (default:
                                                  # the study's schedule)
    curve_points: int = 0          # held-out evaluations per run (a learning curve); 0: at the end

    def method(self, key: str) -> Method:
        for m in self.methods:
            if m.key == key:
                return m
        raise UserError(f"study {self.name}: no method {key!r} (have {[m.key for m in self.methods]})")


def _pairs(d: Any, where: str) -> tuple[tuple[str, Any], ...]:
    if d is None:
        return ()
    if not isinstance(d, dict):
        raise UserError(f"{where} must be a table of config keys, got {type(d).__name__}")
    # TOML has no null: the string "null" stands for None (e.g. bn.ghost_batch = "null").
    return tuple((str(k), tuple(v) if isinstance(v, list) else (None if v == "null" else v))
                 for k, v in d.items())


def load_study(path: str | os.PathLike) -> Study:
    """Parse and check a study file; every mistake is one clear UserError."""
    from s4l.training import config as C
    from s4l.training.presets import get_preset

    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"study file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None
    known = {"name", "title", "data", "labels_per_class", "label_seed", "heldout_per_class",
             "schedule", "method", "sweep", "set", "convergence", "diagnosis", "report",
             "label_file", "notes", "transfer",
             "stage_schedule", "curve_points"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"{path}: unknown keys {unknown}; valid: {sorted(known)}")
    for k in ("name", "data", "schedule", "method"):
        if k not in raw:
            raise UserError(f"{path}: missing {k!r}")
    sched = raw["schedule"]
    if not isinstance(sched, dict) or len(sched) != 1 or next(iter(sched)) not in (
            "labelled_epochs", "images"):
        raise UserError(f"{path}: schedule must be {{labelled_epochs = N}} or {{images = N}}, "
                        f"got {sched!r}")
    if not next(iter(sched.values())) > 0:
        raise UserError(f"{path}: schedule must be > 0, got {sched!r}")
    stage_sched = raw.get("stage_schedule")
    if stage_sched is not None and (not isinstance(stage_sched, dict) or set(stage_sched) != {
            "images"} or not stage_sched["images"] > 0):
        raise UserError(f"{path}: stage_schedule must be {{images = N}}, N > 0, got {stage_sched!r}")
    methods = []
    for i, m in enumerate(raw["method"]):
        if not isinstance(m, dict) or "key" not in m or "preset" not in m:
            raise UserError(f"{path}: method #{i + 1} needs key and preset")
        bad = sorted(set(m) - {f.name for f in dataclasses.fields(Method)})
        if bad:
            raise UserError(f"{path}: method {m['key']!r} has unknown keys {bad}")
        get_preset(m["preset"])  # a clear error for an unknown preset
        if m.get("pretrain"):
            get_preset(m["pretrain"])
        methods.append(Method(**{**m, "set": _pairs(m.get("set"), f"method {m['key']}.set"),
                                 "grid": _pairs(m.get("grid"), f"method {m['key']}.grid"),
                                 "label": m.get("label", m["key"])}))
    keys = [m.key for m in methods]
    if len(set(keys)) != len(keys):
        raise UserError(f"{path}: method keys repeat: {keys}")
    by_key = {m.key: m for m in methods}
    for m in methods:
        if m.teacher and m.teacher not in keys:
            raise UserError(f"{path}: method {m.key!r} has teacher {m.teacher!r}, not a method")
        seen, t = {m.key}, m.teacher
        while t:
            if t in seen:
                raise UserError(f"{path}: method {m.key!r}: its teachers form a cycle ({t!r})")
            seen.add(t)
            t = by_key[t].teacher
        if m.teacher and m.sweep and raw.get("sweep"):
            # A swept student would need its teacher's selection before the teacher's own
            # sweep is planned; the student takes the preset's hyper-parameters instead.
            raise UserError(f"{path}: method {m.key!r} has a teacher: set sweep = false on it")
    sweep = _pairs(raw.get("sweep"), "sweep")
    for k, v in sweep:
        if k not in SWEEP_KEYS:
            raise UserError(f"{path}: sweep key {k!r}; the sweep is over {SWEEP_KEYS}")
        if not isinstance(v, tuple) or not v:
            raise UserError(f"{path}: sweep.{k} must be a non-empty list")
    for m in methods:
        for k, v in m.grid:
            if k not in dict(sweep):
                raise UserError(f"{path}: method {m.key!r}: grid key {k!r} is not a sweep key "
                                f"of the study ({[k for k, _ in sweep]})")
            if not isinstance(v, tuple) or not v:
                raise UserError(f"{path}: method {m.key!r}: grid.{k} must be a non-empty list")
    diags = []
    for d in raw.get("diagnosis", []):
        bad = sorted(set(d) - {f.name for f in dataclasses.fields(Diagnosis)})
        if bad or "key" not in d or "method" not in d:
            raise UserError(f"{path}: a diagnosis needs key and method (unknown keys {bad})")
        if d["method"] not in keys or (d.get("hyper_of") and d["hyper_of"] not in keys):
            raise UserError(f"{path}: diagnosis {d['key']!r} names a method that is not in the study")
        if d.get("kind", "train") not in ("train", "bn-recompute"):
            raise UserError(f"{path}: diagnosis {d['key']!r} kind must be train or bn-recompute")
        for k, low in (("seed", 0), ("seeds", 1)):
            v = d.get(k, low)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise UserError(f"{path}: diagnosis {d['key']!r}: {k} must be an integer "
                                f">= {low}, got {v!r}")
        if d.get("kind") == "bn-recompute" and d.get("seeds", 1) != 1:
            raise UserError(f"{path}: diagnosis {d['key']!r}: a bn-recompute analysis reads one "
                            "run; give it seed, not seeds")
        diags.append(Diagnosis(**{**d, "set": _pairs(d.get("set"), f"diagnosis {d['key']}.set"),
                                  "label": d.get("label", d["key"])}))
    # A pretraining stage reads no labels: only a budget of forwarded images can size it.
    if any(m.pretrain for m in methods) and "images" not in (stage_sched or sched):
        raise UserError(f"{path}: a pretraining stage has no labelled epochs; with schedule "
                        f"{sched!r}, give the stages a budget: stage_schedule = {{images = N}}")
    conv = raw.get("convergence")
    if conv is not None:
        # `method = "m"` (one arm) or `methods = ["m", ...]` (every arm of a comparison).
        arms = conv.get("methods", [conv.get("method")] if "method" in conv else [])
        if (not isinstance(conv, dict) or ("method" in conv) == ("methods" in conv)
                or not arms or any(a not in keys for a in arms) or len(set(arms)) != len(arms)
                or not conv.get("factor", 2) > 1):
            raise UserError(f"{path}: convergence needs method (or methods, a list) naming study "
                            f"methods and a factor > 1, got {conv}")
        conv = {"methods": list(arms), "factor": conv.get("factor", 2)}
    curve_points = raw.get("curve_points", 0)
    if isinstance(curve_points, bool) or not isinstance(curve_points, int) or curve_points < 0:
        raise UserError(f"{path}: curve_points must be an integer >= 0, got {curve_points!r}")
    transfer = raw.get("transfer")
    if transfer is not None:
        if transfer.get("backbone") not in keys or "baseline_preset" not in transfer:
            raise UserError(f"{path}: transfer needs backbone (a study method) and "
                            f"baseline_preset, got {transfer}")
        get_preset(transfer["baseline_preset"])
    study = Study(
        transfer=transfer,
        name=raw["name"], title=raw.get("title", raw["name"]), data=raw["data"],
        labels_per_class=raw.get("labels_per_class"), label_seed=raw.get("label_seed", 0),
        heldout_per_class=raw.get("heldout_per_class", 10), schedule=dict(sched),
        methods=tuple(methods), sweep=sweep, common=_pairs(raw.get("set"), "set"),
        convergence=conv, diagnosis=tuple(diags),
        report=raw.get("report", f"runs/{raw['name']}/report"),
        label_file=(str((path.parent / raw["label_file"]).resolve()) if raw.get("label_file")
                    else None),
        notes=raw.get("notes", ""), source_file=str(path),
        stage_schedule=dict(stage_sched) if stage_sched else None, curve_points=curve_points)
    # Every override must be a config key with a valid value: check on one preset now.
    probe = get_preset(methods[0].preset).config
    for pairs in (study.common, *(m.set for m in methods), *(d.set for d in diags)):
        C.apply_overrides(probe, list(pairs))
    return study


# ============================================================================ runs


@dataclasses.dataclass
class Run:
    id: str
    method: str
    role: str                      # sweep | final | convergence | diagnosis | stage
    seed: int
    config: Any                    # TrainConfig
    budget: dict[str, Any]
    hyper: dict[str, Any]
    workdir: Path
    deps: list[str] = dataclasses.field(default_factory=list)
    pseudo_labels: Path | None = None
    teacher_ckpt: Path | None = None
    diagnosis: str | None = None
    alias_of: str | None = None    # the same config as another run: its result is reused
    pending: bool = False          # depends on a selection not made yet (cost is an estimate)
    dep_hashes: dict[str, str] = dataclasses.field(default_factory=dict)  # {dep id: its hash}

    @functools.cached_property
    def hash(self) -> str:
        # Cached: the planner compares every new run's hash with every earlier run's, and the
        # hash reads the label file (sha256); a run's config never changes after planning.
        return portable_hash(self.config)


def diagnosis_id(key: str, seed: int) -> str:
    return f"diagnosis/{key}/seed{seed}"


def convergence_id(method: str, factor: float) -> str:
    return f"convergence/{method}/x{factor:g}/seed0"


def portable_hash(cfg) -> str:
    """The config hash with the data root replaced by its name and the label file by its sha256,
    so the same run on another machine (other paths) has the same identity."""
    from s4l.provenance import file_sha256
    from s4l.training import config as C

    d = C.semantic_dict(cfg)
    d["data.root"] = Path(str(d.get("data.root"))).name
    for k in ("data.labels", "data.pseudo_labels", "init.checkpoint"):
        if d.get(k):
            p = Path(d[k])
            d[k] = file_sha256(p)[:16] if p.exists() and k == "data.labels" else p.name
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_data(name: str) -> str:
    """A data root: "cifar10" / "imagenette" from ../shared/data (unpacked once into the cache),
    "builtin:..." as is, or a folder."""
    from s4l.provenance import unpack_once

    archives = {"cifar10": ("cifar10-jpg.tar.gz", "cifar10"),
                "imagenette": ("imagenette-224.tar.gz", "imagenette-224")}
    if name in archives:
        shared = Path(os.environ.get("S4L_SHARED_DATA", ROOT.parent / "shared" / "data"))
        cache = Path(os.environ.get("S4L_TEST_CACHE", Path.home() / ".cache" / "s4l-test-data"))
        archive, top = archives[name]
        if not (cache / f".{top}.done").exists() and not (shared / archive).exists():
            raise UserError(f"{shared / archive} is absent: set S4L_SHARED_DATA, or give the "
                            "unpacked folder as the study's data")
        return str(unpack_once(shared / archive, top, cache))
    if name.startswith("builtin:") or Path(name).is_dir():
        return name
    raise UserError(f"study data {name!r}: not cifar10, builtin:NAME or an existing folder")


def _steps(cfg, study: Study, counts: dict[str, int], schedule: dict[str, Any]):
    """The config with its preset's schedule shape (warmup / decays / end in its own
    proportions) stretched to the study's length; and the budget record."""
    from s4l.training import config as C
    from s4l.training.objectives import OBJECTIVES

    obj = OBJECTIVES[cfg.objective.name]
    per_step, b_l, b_u = obj.forwarded_per_step(cfg.optim.batch_size, cfg.optim.unsup_batch_mult)
    n_lab = counts["train"] if cfg.data.pseudo_labels else counts["labelled"]
    spe = n_lab // b_l if obj.uses_labelled else counts["train"] // b_u
    if spe < 1:
        raise UserError(f"{cfg.preset}: batch {b_l or b_u} is larger than the data ({n_lab} "
                        f"labelled / {counts['train']} training images)")
    if "labelled_epochs" in schedule and obj.uses_labelled:
        steps = max(1, round(schedule["labelled_epochs"] * spe))
    elif "images" in schedule:
        steps = max(1, int(schedule["images"]) // per_step)
    else:
        raise UserError(f"{cfg.preset} has no labelled stream: give its stage an images budget")
    o = cfg.optim
    epochs = steps / spe
    f = epochs / o.total_epochs
    # A learning curve: `curve_points` evenly spaced held-out evaluations (the last is the final
    # one); the test split is read once, at the end. Without it: one evaluation, at the end.
    points = study.curve_points if study.curve_points and obj.uses_labelled else 0
    evals = [("eval.every_epochs", epochs / points), ("eval.intermediate", "heldout"),
             # a train record at least once per curve point (an execution-only field)
             ("log_every_steps", max(1, min(cfg.log_every_steps, steps // points)))] \
        if points else [("eval.every_epochs", epochs)]
    cfg = C.apply_overrides(cfg, [
        ("optim.warmup_epochs", round(o.warmup_epochs * f, 6)),
        ("optim.decay_epochs", [round(e * f, 6) for e in o.decay_epochs]),
        ("optim.total_epochs", epochs), ("optim.total_steps", steps),
        *evals, ("checkpoint.every_epochs", epochs),
        ("checkpoint.every_steps", max(1, steps // 10)),
    ])
    # Passes over the unlabelled images (S4L_REFERENCE.md: the release's 10% setting gives its
    # self-supervised stream 20); 0 for an objective that reads no unlabelled batch.
    passes = steps * b_u / counts["train"] if obj.uses_unlabelled and b_u else 0.0
    return cfg, {"unlabelled_passes": round(passes, 3),"steps": steps, "images_per_step": per_step, "labelled_batch": b_l,
                 "unlabelled_batch": b_u, "images": steps * per_step, "steps_per_epoch": spe,
                 "labelled_epochs": round(epochs, 3) if obj.uses_labelled else None,
                 "objective": cfg.objective.name}


class Planner:
    """Builds the study's runs; selections come from the finished sweep runs (the ledger)."""

    def __init__(self, study: Study, data: str, work: Path, ledger: dict[str, dict],
                 smoke: bool = False, overrides: Sequence[str] = ()) -> None:
        from s4l.datasets import open_source, training_subsets

        self.study, self.data, self.work, self.ledger = study, data, work, ledger
        self.smoke, self.overrides = smoke, list(overrides)
        self.source = open_source(data, "train")
        self.label_file = self._label_file()
        sub = training_subsets(self.source, label_map=self.label_file,
                               val_per_class=study.heldout_per_class, label_seed=study.label_seed)
        self.counts = {"labelled": len(sub.labelled), "train": len(sub.unlabelled),
                       "heldout": len(sub.val), "classes": len(self.source.classes)}
        self.runs: dict[str, Run] = {}
        self.selection: dict[str, dict[str, Any]] = {}

    # ---------------------------------------------------------------- label file
    def _label_file(self) -> Path | None:
        from s4l.datasets import (
            balanced_subset,
            label_map_names,
            read_label_map,
            select_labelled,
            write_label_map,
        )

        s = self.study
        if s.labels_per_class is None and not s.label_file:
            return None
        if s.label_file and not self.smoke:
            path = Path(s.label_file)
            if not path.exists():
                raise UserError(f"study {s.name}: label file {path} does not exist")
        else:
            path = self.work / f"label_map_{s.labels_per_class}per_class_seed{s.label_seed}.json"
            if not path.exists():
                idx = balanced_subset(self.source.samples, per_class=s.labels_per_class,
                                      seed=s.label_seed, class_names=self.source.classes)
                path.parent.mkdir(parents=True, exist_ok=True)
                write_label_map(path, label_map_names(self.source, idx))
        idx = select_labelled(self.source, read_label_map(path))
        counts = [0] * len(self.source.classes)
        for i in idx:
            counts[self.source.samples[i][1]] += 1
        if s.labels_per_class is not None and set(counts) != {s.labels_per_class}:
            raise UserError(f"{path} has {counts} labels per class, not {s.labels_per_class}")
        return path

    # ---------------------------------------------------------------- configs
    def config(self, preset: str, seed: int, pairs: Sequence[tuple[str, Any]],
               schedule: dict[str, Any] | None = None, labelled: bool = True):
        from s4l.training import config as C
        from s4l.training.presets import get_preset

        s = self.study
        cfg = get_preset(preset + ("-smoke" if self.smoke else "")).config
        base = [("data.root", self.data), ("seed", seed), ("data.val_per_class",
                s.heldout_per_class), ("data.label_seed", s.label_seed),
                ("data.labels_per_class", None), ("data.label_fraction", None),
                ("data.labels", str(self.label_file) if self.label_file and labelled else None)]
        cfg = C.apply_overrides(cfg, base + list(s.common) + list(pairs))
        cfg = C.apply_overrides(cfg, self.overrides)
        return _steps(cfg, s, self.counts, schedule or s.schedule)

    def add(self, rid: str, method: Method, role: str, seed: int, pairs, hyper,
            schedule=None, **kw) -> Run:
        if rid in self.runs:
            return self.runs[rid]
        labelled = not any(k == "data.pseudo_labels" for k, _ in pairs) and role != "transfer"
        cfg, budget = self.config(kw.pop("preset", method.preset), seed, pairs, schedule,
                                  labelled=labelled)
        run = Run(rid, method.key, role, seed, cfg, budget, hyper, self.work / rid, **kw)
        # A dependency's checkpoint enters the config as a path: its identity is its hash.
        run.dep_hashes = {d: self.owner(self.runs[d]).hash for d in run.deps}
        h = run.hash
        for other in self.runs.values():
            if (other.hash == h and other.alias_of is None
                    and sorted(other.dep_hashes.values()) == sorted(run.dep_hashes.values())):
                run.alias_of = other.id
                break
        self.runs[rid] = run
        return run

    def owner(self, run: Run) -> Run:
        """The run that trains: itself, or the run it is the same config as."""
        return self.runs[run.alias_of] if run.alias_of else run

    def grid(self, m: Method | None = None) -> list[dict[str, Any]]:
        """The sweep's points (for `m`: with its own lists where it gives some), in order."""
        own = dict(m.grid) if m else {}
        keys = [k for k, _ in self.study.sweep]
        lists = [own.get(k, v) for k, v in self.study.sweep]
        return [dict(zip(keys, vals)) for vals in itertools.product(*lists)]

    @staticmethod
    def tag(hyper: dict[str, Any]) -> str:
        return "_".join(f"{SHORT.get(k, k.split('.')[-1])}{v:g}" if isinstance(v, float)
                        else f"{SHORT.get(k, k.split('.')[-1])}{v}" for k, v in hyper.items()) or "preset"

    def result(self, run: Run) -> dict[str, Any] | None:
        """The run's finished record, if its config and its dependencies' are today's."""
        owner = self.owner(run)
        rec = self.ledger.get(owner.id)
        if rec and rec.get("hash") == owner.hash and rec.get("deps", {}) == owner.dep_hashes:
            return rec
        return None

    def select(self, m: Method) -> dict[str, Any] | None:
        """The method's selected hyper-parameters, or None while its sweep is unfinished."""
        if not self.study.sweep or not m.sweep:
            return {"hyper": {}, "selected_on": "none: the preset's hyper-parameters",
                    "run": None}
        cands = []
        for hyper in self.grid(m):
            run = self.runs[f"sweep/{m.key}/{self.tag(hyper)}/seed0"]
            rec = self.result(run)
            if rec is None or rec.get("heldout_top1") is None:
                return None
            cands.append((rec["heldout_top1"], hyper, run.id))
        best = max(cands, key=lambda c: (c[0], *(-v if isinstance(v, int | float) else 0
                                                 for v in c[1].values())))
        return {"hyper": best[1], "run": best[2], "heldout_top1": best[0],
                "selected_on": self.selected_on(),
                "candidates": [{"hyper": h, "heldout_top1": a, "run": r} for a, h, r in cands]}

    def selected_on(self) -> str:
        return (f"heldout: {self.counts['heldout']} training images "
                f"({self.study.heldout_per_class} per class), never trained on")

    # ---------------------------------------------------------------- the plan
    def build(self) -> list[Run]:
        s = self.study
        for m in s.methods:
            if s.sweep and m.sweep:
                if m.teacher:
                    raise UserError(f"study {s.name}: method {m.key!r} has a teacher: it cannot "
                                    "be swept (sweep = false)")
                for hyper in self.grid(m):
                    pairs, deps, kw, _ = self._inputs(m, 0)  # a stage only: no teacher + sweep
                    self.add(f"sweep/{m.key}/{self.tag(hyper)}/seed0", m, "sweep", 0,
                             [*m.set, *hyper.items(), *pairs], hyper, deps=deps, **kw)
        for m in s.methods:
            sel = self.select(m)
            self.selection[m.key] = sel or {"hyper": self.grid(m)[0], "pending": True}
        for m in s.methods:
            sel = self.selection[m.key]
            hyper, pending = sel["hyper"], sel.get("pending", False)
            for seed in range(m.seeds):
                if seed == 0 and sel.get("run"):
                    continue  # the selected sweep run is the final run of seed 0
                self._final(m, seed, hyper, pending)
        for key in (s.convergence or {}).get("methods", []):
            m = s.method(key)
            sel = self.selection[m.key]
            factor = s.convergence["factor"]
            sched = {k: v * factor for k, v in s.schedule.items()}
            pairs, deps, kw, waits = self._inputs(m, 0)
            self.add(convergence_id(m.key, factor), m, "convergence", 0,
                     [*m.set, *sel["hyper"].items(), *pairs], sel["hyper"], schedule=sched,
                     pending=sel.get("pending", False) or waits, deps=deps, **kw)
        if s.transfer:
            # The self-supervised baseline forwards as many images as the backbone's run.
            m = s.method(s.transfer["backbone"])
            backbone = self.runs[self.final_id(m, 0)]
            base = Method("transfer-baseline", s.transfer["baseline_preset"])
            self.add(f"transfer/{base.preset}/seed0", base, "transfer", 0, [], {},
                     schedule={"images": backbone.budget["images"]},
                     pending=self.selection[m.key].get("pending", False))
        for d in s.diagnosis:
            m = s.method(d.method)
            src = self.selection[d.hyper_of or d.method]
            if d.kind == "bn-recompute":
                continue  # an analysis of a final run (run after it), not a training run
            hyper = {**src["hyper"], **dict(d.set)}
            for seed in d.seed_list:
                pairs, deps, kw, waits = self._inputs(m, seed)
                self.add(diagnosis_id(d.key, seed), m, "diagnosis", seed,
                         [*m.set, *src["hyper"].items(), *d.set, *pairs], hyper, diagnosis=d.key,
                         pending=src.get("pending", False) or waits or
                         self.selection[d.method].get("pending", False), deps=deps, **kw)
        return list(self.runs.values())

    def final_id(self, m: Method, seed: int) -> str:
        """The id of `m`'s selected config at `seed`: seed 0 is the selected sweep run (when
        the method has a sweep), seeds 1.. are final runs of their own."""
        sel = self.selection[m.key]
        return sel["run"] if seed == 0 and sel.get("run") else f"final/{m.key}/seed{seed}"

    def _final(self, m: Method, seed: int, hyper: dict[str, Any], pending: bool) -> Run:
        pairs, deps, kw, waits = self._inputs(m, seed)
        return self.add(f"final/{m.key}/seed{seed}", m, "final", seed,
                        [*m.set, *hyper.items(), *pairs], hyper, deps=deps,
                        pending=pending or waits, **kw)

    def _inputs(self, m: Method, seed: int):
        """What a run of `m` at `seed` starts from: (config pairs, dependency ids, Run fields,
        pending): the pretraining stage's checkpoint and / or the teacher's pseudo-labels."""
        pairs: list[tuple[str, Any]] = []
        deps: list[str] = []
        kw: dict[str, Any] = {}
        pending = False
        if m.pretrain:
            # The stage is shared by every method with the same pretraining preset and seed. It
            # reads the label file too (its objective ignores the labels) so that its held-out
            # split is the same images as every other run's; an images schedule gives it the
            # same budget as one run.
            stage = Method(m.pretrain, m.pretrain)
            pre = self.add(f"stage/{m.pretrain}/seed{seed}", stage, "stage", seed, [], {},
                           schedule=self.study.stage_schedule)
            deps.append(pre.id)
            pairs.append(("init.checkpoint", str(self.owner(pre).workdir / "checkpoint.pt")))
        if m.teacher:
            t = self.study.method(m.teacher)
            tid = self.final_id(t, seed)
            tsel = self.selection[t.key]
            teacher = self.runs.get(tid) or self._final(t, seed, tsel["hyper"],
                                                        tsel.get("pending", False))
            pending = tsel.get("pending", False) or teacher.pending
            # The student trains on ALL images with the teacher's labels (no label file). The
            # file's name holds the teacher's hash: another teacher is another file (and another
            # student identity), never a stale file reused.
            owner = self.owner(teacher)
            pl = self.work / "pseudo_labels" / f"{m.teacher}-seed{seed}-{owner.hash[:8]}.json"
            pairs.append(("data.pseudo_labels", str(pl)))
            deps.append(teacher.id)
            kw = {"pseudo_labels": pl, "teacher_ckpt": owner.workdir / "checkpoint.pt"}
        return pairs, deps, kw, pending


# ============================================================================ the ledger


def load_ledger(path: Path) -> tuple[dict[str, dict], dict[str, Any]]:
    """Finished runs recorded in the report JSON: {run id: record}, and the analyses."""
    from s4l.safeload import load_json_file

    if not path.exists():
        return {}, {}
    doc = load_json_file(path, "study report", 64 << 20)
    return {r["id"]: r for r in doc.get("runs", []) if r.get("status") == "done"}, \
        dict(doc.get("analyses", {}))


def record_of(run: Run, metrics: dict[str, Any], wall_s: float | None,
              resumed_at_step: int = 0) -> dict[str, Any]:
    """The ledger's record of a finished run. `wall_s` is this session's time; a run resumed
    from an earlier session's checkpoint also gets `resumed_at_step` and `wall_s_full`, its
    wall time scaled to every step (what the cost and the rates use)."""
    from s4l.provenance import git_commit

    def get(k):
        v = metrics.get(k)
        return None if v is None else round(float(v), 4)

    rec = {"id": run.id, "method": run.method, "role": run.role, "seed": run.seed,
           "status": "done", "hash": run.hash, "preset": run.config.preset,
           "labelled_epochs": run.budget["labelled_epochs"], "steps": run.budget["steps"],
           "images_per_step": run.budget["images_per_step"], "images": run.budget["images"],
           "hyper": run.hyper, "diagnosis": run.diagnosis,
           "heldout_top1": get("heldout/top1"), "heldout_top5": get("heldout/top5"),
           "test_top1": get("eval/top1"), "test_top5": get("eval/top5"),
           "test_top1_rotation_averaged": get("eval/top1_rotation_averaged"),
           "test_top5_rotation_averaged": get("eval/top5_rotation_averaged"),
           "heldout_top1_rotation_averaged": get("heldout/top1_rotation_averaged"),
           "unlabelled_passes": run.budget.get("unlabelled_passes"),
           "wall_s": None if wall_s is None else round(wall_s, 1),
           "loadavg_end": round(os.getloadavg()[0], 2),
           "finished_at": _now(), "host": platform.node(), "cpu": _cpu(),
           "commit": git_commit(ROOT).get("commit")}
    if resumed_at_step and wall_s:
        done = run.budget["steps"] - resumed_at_step
        rec["resumed_at_step"] = resumed_at_step
        rec["wall_s_full"] = round(wall_s * run.budget["steps"] / max(done, 1), 1)
    if run.dep_hashes:  # the stage / teacher this run was made from (its identity, with `hash`)
        rec["deps"] = dict(run.dep_hashes)
    if run.config.eval.intermediate == "heldout":  # a study with curve_points
        rec["curve"] = curve_of(run.workdir)
    return rec


# Train-record keys that are bookkeeping, not measurements of the model.
_NOT_CURVE = {"step", "epoch", "lr", "images_per_s", "images_per_step", "kind", "time"}


def curve_of(workdir: Path) -> list[dict[str, Any]]:
    """The run's learning curve from its metrics.jsonl: one point per held-out evaluation (the
    last is the final one), each with the training metrics averaged over the steps since the
    previous point (train_loss_class, train_loss_rotation, train_acc_rotation, ...)."""
    from s4l.training.trainer import read_metrics

    points, window = [], []
    for rec in read_metrics(workdir):
        kind = rec.get("kind")
        if kind == "train":
            window.append(rec)
        elif kind in ("eval", "final") and rec.get("heldout/top1") is not None:
            pt: dict[str, Any] = {"step": int(rec["step"]), "epoch": round(float(rec["epoch"]), 3)}
            for k in ("top1", "top5", "top1_rotation_averaged"):
                if rec.get(f"heldout/{k}") is not None:
                    pt[f"heldout_{k}"] = round(float(rec[f"heldout/{k}"]), 3)
            keys = sorted({k for r in window for k, v in r.items()
                           if k not in _NOT_CURVE and isinstance(v, (int, float))})
            for k in keys:
                vals = [float(r[k]) for r in window if isinstance(r.get(k), (int, float))]
                pt[f"train_{k}"] = round(statistics.fmean(vals), 5)
            points.append(pt)
            window = []
    return points


# What a retrain (a finished run trained again on a machine without its checkpoint) adds to
# the run's record, beside the first measurement, which the tables keep.
RETRAINED_KEYS = ("heldout_top1", "test_top1", "test_top5", "wall_s", "cpu", "host",
                  "finished_at", "commit")


def _full_wall(rec: dict[str, Any]) -> float:
    """A record's wall time for every step (a resumed run's is scaled from its own session)."""
    return rec.get("wall_s_full") or rec.get("wall_s") or 0.0


@functools.cache
def _cpu() -> str:
    from s4l.provenance import machine_info

    return machine_info().get("cpu") or "?"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# ============================================================================ running


def execute(run: Run, planner: Planner, progress: bool) -> tuple[dict[str, Any], float, int]:
    """Pseudo-label first if the run needs it, then train (or resume); (metrics, wall s of this
    session, the step it resumed from: 0 for a fresh run)."""
    from s4l.cli import main as s4l_main
    from s4l.training.checkpoint import find_resume, read_checkpoint
    from s4l.training.trainer import train

    t0 = time.time()
    part = find_resume(run.workdir)
    resumed = int(read_checkpoint(part).get("step", 0)) if part else 0
    if run.pseudo_labels is not None and not run.pseudo_labels.exists():
        run.pseudo_labels.parent.mkdir(parents=True, exist_ok=True)
        argv = ["pseudo-label", "--checkpoint", str(run.teacher_ckpt), "--data", planner.data,
                "--out", str(run.pseudo_labels), "--workers", str(run.config.data.workers)]
        if planner.label_file:
            argv += ["--labels", str(planner.label_file)]
        if not progress:
            argv.append("--no-progress")
        log.info("s4l %s", " ".join(shlex.quote(a) for a in argv))
        if s4l_main(argv) != 0 or not run.pseudo_labels.exists():
            raise RuntimeError("s4l pseudo-label failed")
    log.info("training %s (%s, %d steps x %d images)", run.id, run.config.preset,
             run.budget["steps"], run.budget["images_per_step"])
    metrics = train(run.config, run.workdir, progress=progress)
    return metrics, time.time() - t0, resumed


def bn_recompute(run: Run, batches: int = 40, batch_size: int = 250) -> dict[str, float]:
    """Re-estimate every BN layer's statistics on unrotated training images (eval crop, a fixed
    random sample of labelled + unlabelled images) and re-evaluate the test and held-out splits."""
    import numpy as np
    import torch

    from s4l.training import distributed as D
    from s4l.training.checkpoint import load_for_inference
    from s4l.training.data import make_eval_loader
    from s4l.training.objectives import build_objective
    from s4l.training.trainer import _Data, evaluate

    cfg = run.config
    inf = load_for_inference(run.workdir / "checkpoint.pt")
    model = inf.model
    env = D.DistEnv()
    data = _Data(cfg, env)
    obj = build_objective(cfg.objective.name, cfg.objective.objective_config(),
                          len(data.class_names))
    before = evaluate(model, obj, data, cfg, env)
    pool = np.array(sorted(set(data.labelled) | set(data.unlabelled)))
    idx = np.sort(np.random.default_rng(0).permutation(pool)[: batches * batch_size])
    from s4l.imaging import PreprocessSpec

    spec = PreprocessSpec(resize=cfg.data.eval_resize, crop=cfg.data.image_size,
                          interpolation="area")
    loader = make_eval_loader(data.source, idx, spec=spec, batch_size=batch_size,
                              workers=min(cfg.data.workers, 2))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over every batch
    model.train()
    with torch.no_grad():
        for images, _ in loader:
            model(images.flatten(0, 1), heads=("classes",))
    model.eval()
    after = evaluate(model, obj, data, cfg, env)
    keep = ("eval/top1", "eval/top5", "heldout/top1", "heldout/top5")
    return {"run": run.id, "bn_images": int(len(idx)),
            **{f"before/{k}": round(before[k], 4) for k in keep if k in before},
            **{f"after/{k}": round(after[k], 4) for k in keep if k in after}}


def next_run(planner: Planner, plan: list[Run], only: Sequence[str], failed: dict[str, str],
             retrain: set[str], retrained: set[str]) -> Run | None:
    """The first run to train now, dependencies first: unfinished (or a finished dependency to
    retrain), not pending, wanted (the methods in `only` and everything they depend on), every
    dependency finished and the checkpoint it needs on this machine. A finished dependency whose
    checkpoint is absent (a fresh machine with only the ledger) is retrained once, first."""
    wanted: set[str] | None = None
    if only:
        wanted, stack = set(), [r.id for r in plan if r.method in only]
        while stack:
            rid = stack.pop()
            if rid not in wanted:
                wanted.add(rid)
                stack.extend(planner.runs[rid].deps)
    for r in plan:
        if r.alias_of or r.pending or r.id in failed or (wanted is not None and r.id not in wanted):
            continue
        if planner.result(r) is not None and r.id not in retrain:
            continue
        blocked = [d for d in r.deps if d in failed or planner.owner(planner.runs[d]).id in failed]
        if blocked:
            failed[r.id] = f"skipped: needs {blocked}"
            log.error("%s: %s", r.id, failed[r.id])
            continue
        needed = [Path(r.config.init.checkpoint)] if r.config.init.checkpoint else []
        if r.pseudo_labels is not None and not r.pseudo_labels.exists():
            needed.append(r.teacher_ckpt)
        ready = True
        for d in r.deps:
            dep = planner.owner(planner.runs[d])
            ckpt = dep.workdir / "checkpoint.pt"
            if planner.result(dep) is None or dep.id in retrain:
                ready = False  # it comes first in the plan (or is pending)
            elif ckpt in needed and not ckpt.exists():
                if dep.id in retrained:
                    failed[r.id] = f"{dep.id} was retrained but {ckpt} is still absent"
                    log.error("%s: %s", r.id, failed[r.id])
                else:
                    log.info("%s needs %s, finished elsewhere (in the ledger) but not on this "
                             "machine: retraining it", r.id, ckpt)
                    retrain.add(dep.id)
                    retrained.add(dep.id)
                    return dep
                ready = False
        if ready:
            return r
    return None


def run_study(study: Study, *, workdir: Path, report: Path, smoke: bool = False,
              overrides: Sequence[str] = (), only: Sequence[str] = (), dry_run: bool = False,
              progress: bool = False, command: str = "", rate: float | None = None,
              report_only: bool = False) -> int:
    data = resolve_data("builtin:digits" if smoke and study.data == "cifar10" else study.data)
    ledger_path = report.with_suffix(".json")
    ledger, analyses = load_ledger(ledger_path)
    failed: dict[str, str] = {}
    retrain: set[str] = set()      # finished dependencies whose checkpoint is not on this machine
    retrained: set[str] = set()
    if only and study.transfer and study.transfer["backbone"] in only:
        only = [*only, "transfer-baseline"]  # the backbone's self-supervised comparison run
    started = time.time()
    while True:
        planner = Planner(study, data, workdir, ledger, smoke=smoke, overrides=overrides)
        plan = planner.build()
        if dry_run:
            print_plan(planner, plan, analyses, rate)
            return 0
        if report_only:  # rewrite the page from the ledger; the command that ran stays named
            if ledger_path.exists():
                command = json.loads(ledger_path.read_text()).get("command") or command
            write_report(study, planner, ledger, analyses, report, command, failed, 0.0)
            return 0
        run = next_run(planner, plan, only, failed, retrain, retrained)
        if run is None:  # a finished run an analysis still needs, not on this machine
            run = retrain_for_analyses(study, planner, analyses, only, failed, retrained)
            if run is not None:
                retrain.add(run.id)
        if run is None:
            break
        again = run.id in retrain and run.id in ledger
        retrain.discard(run.id)
        try:
            metrics, wall, resumed = execute(run, planner, progress)
            rec = record_of(run, metrics, wall, resumed)
            if again:  # retrained for its checkpoint: the study keeps its first measurement
                ledger[run.id].setdefault("retrained", []).append(
                    {k: rec.get(k) for k in RETRAINED_KEYS})
            else:
                ledger[run.id] = rec
        except KeyboardInterrupt:
            raise
        except Exception as e:  # one failed run must not stop the study: record, go on
            failed[run.id] = f"{type(e).__name__}: {e}"
            log.error("%s failed: %s\n%s", run.id, e, traceback.format_exc())
        # Analyses run as soon as their runs are finished, while the checkpoints they read
        # are on this machine (a session may end before the rest of the plan does).
        planner = Planner(study, data, workdir, ledger, smoke=smoke, overrides=overrides)
        planner.build()
        run_analyses(study, planner, analyses, workdir, report, smoke, only, failed)
        write_report(study, planner, ledger, analyses, report, command, failed,
                     time.time() - started)
    run_analyses(study, planner, analyses, workdir, report, smoke, only, failed)
    write_report(study, planner, ledger, analyses, report, command, failed,
                 time.time() - started)
    for rid, why in failed.items():
        log.error("%s did not finish: %s", rid, why)
    return 1 if failed else 0


def due_analyses(study: Study, planner: Planner, analyses: dict[str, Any],
                 only: Sequence[str]) -> list[tuple[str, dict[str, Run], str]]:
    """The analyses (BN statistics recomputed, transfer) whose runs are all finished but that
    are not recorded for those runs yet: (key, {name: run whose checkpoint it reads}, hash)."""
    out = []
    for d in study.diagnosis:
        if d.kind != "bn-recompute" or (only and d.method not in only):
            continue
        m = study.method(d.method)
        if planner.selection[m.key].get("pending"):
            continue
        run = planner.runs.get(planner.final_id(m, d.seed))
        if run is None or planner.result(run) is None:
            continue
        if analyses.get(d.key, {}).get("hash") != run.hash:
            out.append((d.key, {m.key: run}, run.hash))
    t = study.transfer
    if t and (not only or t["backbone"] in only):
        m = study.method(t["backbone"])
        if not planner.selection[m.key].get("pending"):
            runs = {m.key: planner.runs[planner.final_id(m, 0)],
                    "rotation-only": planner.runs[f"transfer/{t['baseline_preset']}/seed0"]}
            key = "+".join(r.hash for r in runs.values())
            if (all(planner.result(r) is not None for r in runs.values())
                    and analyses.get("transfer", {}).get("hash") != key):
                out.append(("transfer", runs, key))
    return out


def retrain_for_analyses(study: Study, planner: Planner, analyses: dict[str, Any],
                         only: Sequence[str], failed: dict[str, str],
                         retrained: set[str]) -> Run | None:
    """A finished run (in the ledger) that a due analysis reads but whose checkpoint is not on
    this machine (a fresh machine with only the committed report): retrained once."""
    for key, runs, _ in due_analyses(study, planner, analyses, only):
        for r in runs.values():
            r = planner.owner(r)
            if (r.workdir / "checkpoint.pt").exists() or r.id in failed:
                continue
            if r.id in retrained:
                failed[key] = f"{r.id} was retrained but its checkpoint is still absent"
                continue
            log.info("%s needs %s, finished elsewhere (in the ledger) but not on this machine: "
                     "retraining it", key, r.workdir / "checkpoint.pt")
            retrained.add(r.id)
            return r
    return None


def run_analyses(study: Study, planner: Planner, analyses: dict[str, Any], workdir: Path,
                 report: Path, smoke: bool, only: Sequence[str], failed: dict[str, str]) -> None:
    """Every due analysis whose checkpoints are on this machine; a failure is recorded in
    `failed` and does not stop the study."""
    labels = {d.key: d.label for d in study.diagnosis}
    for key, runs, h in due_analyses(study, planner, analyses, only):
        if key in failed or not all((planner.owner(r).workdir / "checkpoint.pt").exists()
                                    for r in runs.values()):
            continue
        t0 = time.time()
        try:
            if key == "transfer":
                transfer_step(study, planner, analyses, workdir, report, smoke, runs, h)
            else:
                (run,) = runs.values()
                log.info("diagnosis %s: BN statistics of %s recomputed on training images",
                         key, run.id)
                analyses[key] = {**bn_recompute(planner.owner(run)), "hash": h,
                                 "label": labels[key], "finished_at": _now()}
            # Its cost counts in the study's (feature extraction and probes are not free).
            analyses[key].update(wall_s=round(time.time() - t0, 3), cpu=_cpu())
        except Exception as e:
            failed[key] = f"{type(e).__name__}: {e}"
            log.error("analysis %s failed: %s\n%s", key, e, traceback.format_exc())


def transfer_step(study: Study, planner: Planner, analyses: dict[str, Any], workdir: Path,
                  report: Path, smoke: bool, runs: dict[str, Run], key: str) -> None:
    """Linear probes of the backbone's final seed-0 run and of the self-supervised baseline on
    another domain (the paper's Places205 study); both runs are finished, here."""
    import shutil

    from s4l.evaluation.transfer import transfer_probe

    t = study.transfer
    ckpts = {name: planner.owner(r).workdir / "checkpoint.pt" for name, r in runs.items()}
    root = resolve_data(t.get("data", "imagenette"))
    out = workdir / "transfer" / key
    log.info("transfer: features of %s and linear probes for %s", root, list(ckpts))
    rep = transfer_probe(ckpts, root, out,
                         schedules="short=2,long=4" if smoke else t.get("schedules",
                                                                         "short=30,long=300"),
                         per_class=8 if smoke else t.get("per_class"))
    png = report.with_name(report.name + "_transfer.png")
    if (out / "probe" / "learning_curves.png").exists():
        shutil.copyfile(out / "probe" / "learning_curves.png", png)
    results = {}
    for name, r in zip(ckpts, rep["results"]):
        results[name] = {"run": runs[name].id, "dim": r["train"].get("dim"),
                         "train_rows": r["train"]["rows"], "val_rows": r["val"]["rows"],
                         "sklearn_top1": r.get("sklearn", {}).get("top1"),
                         **{f"sgd_{s}_{k}": v["top1" if k == "top1" else "top5"]
                            for s, v in r.get("sgd", {}).items() for k in ("top1", "top5")},
                         **{f"sgd_{s}_epochs": v["schedule"]["epochs"]
                            for s, v in r.get("sgd", {}).items()}}
    analyses["transfer"] = {"hash": key, "data": t.get("data", "imagenette"),
                            "results": results, "plot": png.name, "finished_at": _now()}


# ============================================================================ plan and cost


def rates(ledger: dict[str, dict], given: float | None = None) -> dict[str, float]:
    """Forwarded images/s per objective, from this study's finished runs (else the defaults);
    `given` is one rate for every objective instead."""
    if given:
        return dict.fromkeys({*DEFAULT_RATE, *OBJECTIVE_OF.values()}, float(given))
    # Per objective: the runs made on this machine's CPU model where there are any (a study
    # may move between machines), else every finished run.
    acc: dict[str, dict[bool, list[float]]] = {}
    for r in ledger.values():
        if r.get("wall_s"):
            obj = OBJECTIVE_OF.get(r["method"], r["method"])
            acc.setdefault(obj, {True: [], False: []})[r.get("cpu") == _cpu()].append(
                r["images"] / _full_wall(r))
    out = dict(DEFAULT_RATE)
    out.update({k: statistics.median(v[True] or v[False]) for k, v in acc.items()})
    return out


OBJECTIVE_OF: dict[str, str] = {}


def plan_cost(planner: Planner, plan: list[Run], given_rate: float | None = None):
    """Estimated seconds per run at the rates measured on the study's finished runs (else the
    defaults): ([(run, seconds, status)], total s, s left, rates)."""
    for r in plan:
        OBJECTIVE_OF[r.method] = r.config.objective.name
    rate = rates(planner.ledger, given_rate)
    rows, left, total = [], 0.0, 0.0
    for r in plan:
        done = planner.result(r) is not None
        status = ("same as " + r.alias_of) if r.alias_of else (
            "done" if done else ("pending" if r.pending else "todo"))
        if not done and not r.alias_of and (r.workdir / "checkpoint.pt").exists():
            status = "partial"
        sec = r.budget["images"] / rate.get(r.config.objective.name, 500.0)
        if not r.alias_of:
            total += sec
            left += 0 if done else sec
        rows.append((r, sec, status))
    return rows, total, left, rate


def print_plan(planner: Planner, plan: list[Run], analyses: dict[str, Any],
               given_rate: float | None = None) -> None:
    rows, total, left, rate = plan_cost(planner, plan, given_rate)
    print(f"study {planner.study.name}: {planner.counts['labelled']} labelled, "
          f"{planner.counts['train']} training, {planner.counts['heldout']} held-out images")
    print(f"{'run':<52} {'steps':>6} {'img/step':>8} {'images':>11} {'est.':>8}  status")
    for r, sec, status in rows:
        print(f"{r.id:<52} {r.budget['steps']:>6} {r.budget['images_per_step']:>8} "
              f"{r.budget['images']:>11,} {sec / 60:>6.1f}m  {status}")
    for m, sel in planner.selection.items():
        if sel.get("pending"):
            print(f"{m}: selection pending (its sweep is unfinished); later runs are planned "
                  "with the first grid point")
        elif sel.get("run"):
            print(f"{m}: selected {Planner.tag(sel['hyper'])} (held-out top-1 "
                  f"{sel['heldout_top1']:.2f})")
    print(f"\n{len(plan)} runs; {total / 3600:.2f} h on this machine in all, "
          f"{left / 3600:.2f} h left (rates: "
          + ", ".join(f"{k} {v:.0f} img/s" for k, v in sorted(rate.items())) + ")")


# ============================================================================ the report


def _ms(vals: Sequence[float]) -> str:
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def summary(planner: Planner, ledger: dict[str, dict]) -> list[dict[str, Any]]:
    out = []
    for m in planner.study.methods:
        ids = [planner.final_id(m, s) for s in range(m.seeds)]
        sel = planner.selection[m.key]
        # While a sweep is unfinished no run is final yet (seed 0 is not chosen).
        recs = [] if sel.get("pending") else [
            rec for i in ids if (rec := planner.result(planner.runs[i])) is not None]
        # Earlier stages (pretraining, the pseudo-label teacher): their own budget, per seed.
        first = planner.runs[ids[0]]
        out.append({"method": m.key, "label": m.label, "seeds_planned": m.seeds,
                    "seeds_done": [r["seed"] for r in recs],
                    "selected": None if sel.get("pending") else sel["hyper"],
                    **{k: [r[k] for r in recs if r.get(k) is not None]
                       for k in ("test_top1", "test_top5", "heldout_top1",
                                 "test_top1_rotation_averaged", "test_top5_rotation_averaged",
                                 "heldout_top1_rotation_averaged")},
                    "images_per_run": first.budget["images"],
                    "unlabelled_passes": first.budget.get("unlabelled_passes"),
                    "earlier_stages": [d.rsplit("/", 1)[0] for d in first.deps],
                    "earlier_stage_images": sum(planner.runs[d].budget["images"]
                                                for d in first.deps),
                    "paper": PAPER.get(m.key)})
    return out


def write_report(study: Study, planner: Planner, ledger: dict[str, dict], analyses: dict,
                 report: Path, command: str, failed: dict[str, str], session_s: float) -> None:
    from s4l.provenance import file_sha256, machine_info

    finals = {planner.final_id(m, s) for m in study.methods for s in range(m.seeds)}
    runs = []
    for r in planner.runs.values():
        rec = planner.result(r)
        if rec is None or r.alias_of:
            continue
        runs.append({**rec, "final": r.id in finals, "in_sweep": r.role == "sweep",
                     "selected_on": (planner.selection.get(r.method, {}).get("selected_on")
                                     if r.role != "sweep" else planner.selected_on())})
    # Keep finished runs of the ledger that today's plan does not hold (another config).
    planned = {r["id"] for r in runs}
    kept = [dict(r, final=False, stale=True) for i, r in ledger.items() if i not in planned]
    conv = convergence_report(study, planner)
    # Diagnosis runs that are the same config as another run (e.g. a sweep point) reuse it.
    # Each seed is read against the diagnosed method's selected config at that seed.
    diagnosis = {}
    for d in study.diagnosis:
        m, by_seed, first = study.method(d.method), [], None
        for seed in d.seed_list:
            run = planner.runs.get(diagnosis_id(d.key, seed))
            rec = planner.result(run) if run else None
            if rec is None:
                continue
            first = first or {**rec, "diagnosis": d.key, "same_as": run.alias_of}
            ref_run = None if planner.selection[m.key].get("pending") else \
                planner.runs.get(planner.final_id(m, seed))
            ref = planner.result(ref_run) if ref_run else None
            by_seed.append({"seed": seed, "id": rec["id"], "same_as": run.alias_of,
                            **{k: rec.get(k) for k in ("test_top1", "test_top5", "heldout_top1")},
                            "reference": ref and ref["id"],
                            "reference_test_top1": ref and ref["test_top1"]})
        if first:
            diagnosis[d.key] = {**first, "by_seed": by_seed}
            tops = [b["test_top1"] for b in by_seed]
            refs = [b["reference_test_top1"] for b in by_seed]
            if len(tops) > 1:
                diagnosis[d.key]["test_top1_mean_std"] = [round(statistics.fmean(tops), 3),
                                                          round(statistics.stdev(tops), 3)]
                if None not in refs:
                    diagnosis[d.key]["reference_test_top1_mean_std"] = [
                        round(statistics.fmean(refs), 3), round(statistics.stdev(refs), 3)]
    wall = sum(_full_wall(r) for r in runs)
    # Retrains (a finished run trained again for its checkpoint) and the analyses cost too.
    wall_again = sum(x.get("wall_s") or 0.0 for r in runs for x in r.get("retrained", []))
    wall_analyses = sum(a.get("wall_s") or 0.0 for a in analyses.values())
    total = wall + wall_again + wall_analyses
    cores = os.cpu_count() or 1
    doc = {
        "study": study.name, "title": study.title, "study_file": study.source_file,
        "command": command, "updated_at": _now(), "data": study.data,
        "counts": planner.counts, "schedule": study.schedule,
        "stage_schedule": study.stage_schedule,
        "label_file": str(planner.label_file) if planner.label_file else None,
        "label_file_sha256": file_sha256(planner.label_file) if planner.label_file else None,
        "common_overrides": dict(study.common), "sweep": {k: list(v) for k, v in study.sweep},
        "method_grids": {m.key: {k: list(v) for k, v in m.grid} for m in study.methods if m.grid},
        "selection": {k: v for k, v in planner.selection.items()},
        "summary": summary(planner, ledger), "convergence": conv,
        "analyses": analyses, "diagnosis": diagnosis, "runs": runs + kept,
        "cost": {"machine_hours": round(total / 3600, 3),
                 "cpu_hours": round(total * cores / 3600, 3),
                 "runs_machine_hours": round(wall / 3600, 3),
                 "retrain_machine_hours": round(wall_again / 3600, 3),
                 "analyses_machine_hours": round(wall_analyses / 3600, 3),
                 "note": "sum of the wall time on their machine (cores: "
                         f"{cores}) of the finished runs, of their retrains and of the analyses "
                         "(analyses finished before this was recorded count 0); "
                         "cpu_hours = wall x cores",
                 **_estimate(planner)},
        "machine": machine_info(), "failed": failed,
    }
    _write_json(report.with_suffix(".json"), doc)
    try:
        plot(doc, report.with_suffix(".png"))
        if study.curve_points:
            plot_curves(doc, report.with_name(report.name + "_curves.png"))
    except Exception as e:  # the plot must not lose the numbers
        log.warning("plot failed: %s", e)
    report.with_suffix(".md").write_text(markdown(doc, study, report.with_suffix(".png").name))


def convergence_report(study: Study, planner: Planner) -> list[dict[str, Any]]:
    """Per arm of `[convergence]`: the selected config at seed 0 at the study's schedule and at
    `factor` times it; the arm passes when held-out top-1 moves by less than 1 point."""
    out = []
    for key in (study.convergence or {}).get("methods", []):
        m = study.method(key)
        f = study.convergence["factor"]
        base, long = (planner.result(planner.runs[planner.final_id(m, 0)])
                      if planner.final_id(m, 0) in planner.runs else None,
                      planner.result(planner.runs[convergence_id(m.key, f)]))
        if planner.selection[m.key].get("pending"):
            base = long = None  # no config is selected yet

        pair = {k: [base and base.get(k), long and long.get(k)]
                for k in ("labelled_epochs", "steps", "unlabelled_passes", "heldout_top1",
                          "test_top1")}
        gain = {k: round(pair[k][1] - pair[k][0], 3) if None not in pair[k] else None
                for k in ("heldout_top1", "test_top1")}
        held = gain["heldout_top1"]
        out.append({"method": m.key, "factor": f, **pair,
                    "gain_when_doubling": gain["test_top1"], "heldout_gain_when_doubling": held,
                    "converged": None if held is None else abs(held) < 1.0})
    return out


def _estimate(planner: Planner) -> dict[str, Any]:
    _, total, left, rate = plan_cost(planner, list(planner.runs.values()))
    cores = os.cpu_count() or 1
    return {"estimated_machine_hours_total": round(total / 3600, 2),
            "estimated_machine_hours_left": round(left / 3600, 2),
            "estimated_cpu_hours_total": round(total * cores / 3600, 2),
            "estimate_rates_img_per_s": {k: round(v) for k, v in sorted(rate.items())},
            "estimate_note": "every planned run's forwarded images / the median rate of the "
                             "study's finished runs of its objective (defaults where none)"}


def plot(doc: dict[str, Any], path: Path) -> None:
    """Left: the final runs' test top-1, every seed a dot, the mean a bar. Right (studies with a
    sweep): every finished sweep point's held-out top-1 (what selects) and test top-1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["summary"]
    sweep = [r for r in doc["runs"] if r["role"] == "sweep" and not r.get("stale")]
    fig, axes = plt.subplots(1, 2 if doc["sweep"] else 1, figsize=(13 if doc["sweep"] else 7, 4.8),
                             squeeze=False)
    ax = axes[0][0]
    for i, row in enumerate(rows):
        ys = row["test_top1"]
        ax.scatter([i] * len(ys), ys, color="C0", zorder=3, label="one seed" if i == 0 else None)
        if ys:
            ax.hlines(statistics.fmean(ys), i - 0.25, i + 0.25, color="k", zorder=2,
                      label="mean" if i == 0 else None)
    if not any(r["test_top1"] for r in rows):
        ax.text(0.5, 0.5, "no final runs yet", transform=ax.transAxes, ha="center", color="0.4")
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=20, ha="right")
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("final runs (selected configs): every seed is a dot")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if doc["sweep"]:
        _plot_sweep(axes[0][1], doc, rows, sweep)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CURVE_PANELS = (("heldout_top1", "held-out top-1 (%)"),
                ("train_loss_class", "train class loss"),
                ("train_loss_rotation", "train rotation loss"),
                ("train_acc_rotation", "train rotation accuracy"))


def curve_runs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs whose curves the page shows: every final run (every arm, every seed) and every
    convergence run."""
    return [r for r in doc["runs"] if r.get("curve") and not r.get("stale")
            and (r.get("final") or r["role"] == "convergence")]


def plot_curves(doc: dict[str, Any], path: Path) -> None:
    """One panel per measurement (held-out top-1, class loss, rotation loss and accuracy) against
    labelled epochs; a colour per method, a line per seed, dashed for the doubled schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = curve_runs(doc)
    methods = list(dict.fromkeys(r["method"] for r in doc["summary"]))
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(18, 4.2), squeeze=False)
    for ax, (key, name) in zip(axes[0], CURVE_PANELS):
        for r in runs:
            pts = [p for p in r["curve"] if p.get(key) is not None]
            if not pts:
                continue
            spe = r["steps"] / max(r.get("labelled_epochs") or 1, 1e-9)
            xs = [p["step"] / spe for p in pts]
            colour = f"C{methods.index(r['method']) % 10}" if r["method"] in methods else "0.5"
            conv = r["role"] == "convergence"
            ax.plot(xs, [p[key] for p in pts], color=colour, alpha=0.85, lw=1.4,
                    ls="--" if conv else "-", marker="." if not conv else None,
                    label=f"{r['method']} s{r['seed']}" + (" (2x)" if conv else ""))
        ax.set_xlabel("labelled epochs")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if not runs:
            ax.text(0.5, 0.5, "no curves yet", transform=ax.transAxes, ha="center", color="0.4")
    if runs:
        axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_sweep(ax, doc: dict[str, Any], rows: list[dict[str, Any]],
                sweep: list[dict[str, Any]]) -> None:
    """Held-out top-1 (what selects) of every finished sweep point against the sweep's last key
    (log axis where it spans 10x), a line per method and value of the first key; the selected
    point ringed, test top-1 as faint crosses. A sweep of one key: a line per method."""
    keys = list(doc["sweep"])
    xkey, lkey = keys[-1], (keys[0] if len(keys) > 1 else None)
    xs = [float(v) for v in doc["sweep"][xkey]]
    log = min(xs) > 0 and max(xs) / min(xs) >= 10
    styles = ("-", "--", ":", "-.")
    lvals = list(doc["sweep"][lkey]) if lkey else [None]
    for j, m in enumerate(r["method"] for r in rows):
        for k, lv in enumerate(lvals):
            pts = sorted((r for r in sweep if r["method"] == m
                          and (lkey is None or r["hyper"].get(lkey) == lv)),
                         key=lambda r: float(r["hyper"][xkey]))
            if not pts:
                continue
            x = [float(r["hyper"][xkey]) for r in pts]
            lab = m + (f", {lkey.split('.')[-1]} {lv:g}" if lkey else "")
            ax.plot(x, [r["heldout_top1"] for r in pts], styles[k % 4], color=f"C{j}",
                    marker="o", label=lab)
            ax.scatter(x, [r["test_top1"] for r in pts], color=f"C{j}", marker="x", alpha=0.5,
                       zorder=3)
            for r in pts:
                if doc["selection"].get(m, {}).get("run") == r["id"]:
                    ax.scatter([float(r["hyper"][xkey])], [r["heldout_top1"]], s=160,
                               facecolors="none", edgecolors="k", linewidths=1.5, zorder=4)
    if log:
        ax.set_xscale("log")
    ax.set_xticks(xs, [f"{v:g}" for v in xs])
    ax.set_xlabel(xkey)
    ax.set_ylabel("held-out top-1 (%), lines; test top-1, crosses")
    ax.set_title("sweep, seed 0 (ringed: selected on held-out)")
    ax.grid(alpha=0.3)
    if sweep:
        ax.legend(loc="lower left", fontsize=7)


def _num(x: float | None, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


# The paper's orderings (Table 1, top-5): (better, worse, what the paper found).
ORDERINGS = (
    ("s4l-rotation", "supervised", "S4L-Rotation beats supervised: +3.39 (10%) / +4.94 (1%) top-5"),
    ("s4l-exemplar", "supervised", "S4L-Exemplar beats supervised: +3.29 (10%) / -1.41 (1%) top-5"),
    ("s4l-rotation", "s4l-exemplar", "S4L-Rotation vs S4L-Exemplar: +0.10 (10%) / +6.35 (1%) top-5"),
)


def orderings(rows: list[dict[str, Any]]) -> list[str]:
    """One line per paper ordering whose two methods have finished final runs: the difference
    of mean test top-1 and whether it exceeds the seeds' spread."""
    by = {r["method"]: r for r in rows if r["test_top1"]}
    out = []
    for a, b, paper in ORDERINGS:
        if a not in by or b not in by:
            continue
        xa, xb = by[a]["test_top1"], by[b]["test_top1"]
        d = statistics.fmean(xa) - statistics.fmean(xb)
        spread = max([statistics.stdev(x) for x in (xa, xb) if len(x) > 1], default=None)
        if spread is None:
            verdict = "one seed each: no spread to judge it by"
        elif abs(d) <= spread:
            verdict = f"within the seeds' spread (largest std {spread:.2f})"
        else:
            verdict = ("holds" if d > 0 else "reversed") + f" (beyond the largest std, {spread:.2f})"
        out.append(f"{by[a]['label']} minus {by[b]['label']}: **{d:+.2f}** points of test top-1 "
                   f"({len(xa)} vs {len(xb)} seeds): {verdict}. Paper: {paper}.")
    return out


def diff_se(a: Sequence[float], b: Sequence[float]) -> tuple[float, float | None]:
    """mean(a) - mean(b) and its standard error sqrt(s_a^2/n_a + s_b^2/n_b) (None below 2
    seeds on either side)."""
    d = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return d, None
    return d, math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))


def readings_section(doc: dict[str, Any], study: Study) -> list[str]:
    """Both readings of the rotation-family rows (rotation-0 and rotation-averaged, top-1 and
    top-5), each row's difference to supervised with its standard error, and the decision rule
    (a gain beyond twice its standard error, held-out agreeing)."""
    rows = doc["summary"]
    sup = next((r for r in rows if r["method"] == "supervised"), None)
    if not study.curve_points or not any(r.get("test_top1_rotation_averaged") for r in rows):
        return []
    out = ["\n## Both readings, and the difference to supervised\n",
           "Rotation-0: the class head on the upright image (the table above). Rotation-"
           "averaged: the mean of the class logits over the 4 rotations (the release reports "
           "both). Mean ± standard deviation over seeds; Δ: minus supervised's mean, ± its "
           "standard error sqrt(s²/n + s²/n).\n",
           "| method | unlabelled passes | test top-1 | test top-5 | top-1 rot.-averaged | "
           "top-5 rot.-averaged | Δ top-1 | Δ top-1 rot.-averaged | Δ held-out top-1 |",
           "|---|---|---|---|---|---|---|---|---|"]

    def delta(r, k):
        if not sup or r is sup or not r.get(k) or not sup.get("test_top1"):
            return "-"
        ref = sup["test_top1" if k.startswith("test_top1") else "heldout_top1"]
        d, se = diff_se(r[k], ref)
        return f"{d:+.2f}" + (f" ± {se:.2f}" if se is not None else "")

    for r in rows:
        out.append(f"| {r['label']} | {_num(r.get('unlabelled_passes'), 1)} | "
                   f"{_ms(r['test_top1'])} | {_ms(r['test_top5'])} | "
                   f"{_ms(r.get('test_top1_rotation_averaged') or [])} | "
                   f"{_ms(r.get('test_top5_rotation_averaged') or [])} | "
                   f"{delta(r, 'test_top1')} | {delta(r, 'test_top1_rotation_averaged')} | "
                   f"{delta(r, 'heldout_top1')} |")
    if sup and len(sup["test_top1"]) >= 2:
        out.append("")
        for r in rows:
            if r is sup or len(r["test_top1"]) < 2:
                continue
            d, se = diff_se(r["test_top1"], sup["test_top1"])
            dh, _ = diff_se(r["heldout_top1"], sup["heldout_top1"])
            helps = d > 2 * se and dh > 0
            n = f"{len(r['test_top1'])} vs {len(sup['test_top1'])} seeds"
            out.append(f"- **Decision rule, {r['label']}** ({n}): test top-1 {d:+.2f} against "
                       f"2 x SE = {2 * se:.2f}; held-out {dh:+.2f}. "
                       + ("It helps at this scale by the rule." if helps else
                          "It does not pass the rule: no gain beyond the noise is shown."))
    return out


def curves_section(doc: dict[str, Any], study: Study) -> list[str]:
    if not study.curve_points:
        return []
    runs = curve_runs(doc)
    out = ["\n## Learning curves\n",
           f"Every final run and every convergence run evaluates held-out top-1 at "
           f"{study.curve_points} evenly spaced points (the test split only once, at the end); "
           "each point keeps the training losses and accuracies averaged since the previous one "
           "(`curve` in the JSON).\n"]
    if not runs:
        return out + ["No run has finished yet."]
    png = Path(study.report).name + "_curves.png"
    out.append(f"![learning curves]({png})\n")
    n = max(len(r["curve"]) for r in runs)
    out.append("| run | " + " | ".join(f"{i + 1}" for i in range(n)) + " |")
    out.append("|---" * (n + 1) + "|")
    for r in runs:
        cells = [_num(p.get("heldout_top1"), 1) for p in r["curve"]] + ["-"] * (n - len(r["curve"]))
        out.append(f"| `{r['id']}` (held-out top-1 at each point) | " + " | ".join(cells) + " |")
    return out


def convergence_section(conv: Any) -> list[str]:
    if isinstance(conv, dict):  # a report written before convergence had several arms
        conv = [{**conv, "gain_when_doubling": conv.get("supervised_gain_when_doubling_epochs")}]
    if not conv:
        return []
    out = ["\n## Convergence\n",
           "Each arm's selected config, seed 0, at the study's schedule and at "
           f"{conv[0]['factor']:g}x it. An arm passes when held-out top-1 moves by less than 1 "
           "point.\n",
           "| arm | labelled epochs | steps | unlabelled passes | held-out top-1 | test top-1 | "
           "test gain | converged |", "|---|---|---|---|---|---|---|---|"]

    def two(v, nd=2):
        v = v or [None, None]
        return f"{_num(v[0], nd)} -> {_num(v[1], nd)}"

    for c in conv:
        ok = c.get("converged")
        out.append(f"| {c['method']} | {two(c.get('labelled_epochs'), 0)} | "
                   f"{two(c.get('steps'), 0)} | {two(c.get('unlabelled_passes'), 1)} | "
                   f"{two(c.get('heldout_top1'))} | {two(c.get('test_top1'))} | "
                   f"{_num(c.get('gain_when_doubling'))} | "
                   f"{'-' if ok is None else ('yes' if ok else '**no: still moving**')} |")
    return out


def markdown(doc: dict[str, Any], study: Study, png: str) -> str:
    c = doc["counts"]
    out = [f"# {doc['title']}\n",
           f"Generated by `{doc['command'] or 's4l study ' + study.source_file}` from "
           f"`{study.source_file}`; updated {doc['updated_at']}. Every number below is read from "
           f"the runs' own final metrics (`{Path(study.report).name}.json`).\n"]
    if study.notes:
        out.append(study.notes.strip() + "\n")
    sched = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in doc["schedule"].items())
    out.append(f"- data: {doc['data']}; {c['labelled']:,} labelled images, {c['train']:,} "
               f"training images (labelled ones included), {c['heldout']:,} held-out training "
               f"images for every choice, the test split evaluated once at the end.")
    out.append(f"- schedule: {sched} for every method; each preset's warmup / decay proportions "
               "are kept.")
    if doc["common_overrides"]:
        out.append("- every run: " + ", ".join(f"`{k}={v}`" for k, v in doc["common_overrides"].items()))
    if doc["sweep"]:
        own = doc.get("method_grids") or {}
        out.append(f"- sweep (seed 0, {'each method the same grid' if not own else 'the grid'}): "
                   + " x ".join(f"`{k}` in {v}" for k, v in doc["sweep"].items())
                   + "".join(f"; {m}: " + ", ".join(f"`{k}` in {v} only" for k, v in g.items())
                             for m, g in own.items()))
    staged = any(r.get("earlier_stages") for r in doc["summary"])
    if staged:
        stage = doc.get("stage_schedule") or doc["schedule"]
        out.append("- earlier stages: a self-supervised pretraining stage (`stage/<preset>/seed<s>`, "
                   f"{', '.join(f'{k} {v:,}' for k, v in stage.items())}, shared by the rows that "
                   "start from it) or the pseudo-label teacher (the teacher method's run of the "
                   "same seed) is a run of its own with its own budget, listed per row under "
                   "'earlier stage'; making the pseudo-label file is not counted.")
    cost = doc["cost"]
    cpus = collections.Counter(r.get("cpu") or "not recorded" for r in doc["runs"])
    out.append(f"- cost so far: {cost['machine_hours']:.2f} h of wall time on the machines "
               f"({cost['cpu_hours']:.2f} CPU hours at {doc['machine'].get('cores_logical', '?')} "
               f"cores): runs {cost.get('runs_machine_hours', cost['machine_hours']):.2f} h, "
               f"retrains {cost.get('retrain_machine_hours', 0.0):.2f} h, analyses "
               f"{cost.get('analyses_machine_hours', 0.0):.2f} h; runs per machine: "
               + ", ".join(f"{c} ({n})" for c, n in cpus.most_common()) + ".")
    if "estimated_machine_hours_total" in cost:
        out.append(f"- whole study, estimated: {cost['estimated_machine_hours_total']:.1f} h of "
                   f"this machine ({cost['estimated_cpu_hours_total']:.1f} CPU hours), "
                   f"{cost['estimated_machine_hours_left']:.1f} h left, at the rates its "
                   "finished runs measured (`--dry-run` lists every run).")
    out.append("")
    out.append(f"![every seed of every method]({png})\n")
    out.append("## Final runs (selected configs)\n")
    if doc["sweep"]:
        out.append("Seed 0 of each method is its sweep run at the selected point (in the JSON: "
                   "`final: true, in_sweep: true`); seeds 1.. are new runs of that config. "
                   "Mean ± standard deviation over seeds.\n")
    out.append("| method | seeds | selected | test top-1 | test top-5 | held-out top-1 | "
               "paper top-5 1% / 10% | release top-1 10% |" + (" images | earlier stage |"
                                                               if staged else ""))
    out.append("|---|---|---|---|---|---|---|---|" + ("---|---|" if staged else ""))
    for r in doc["summary"]:
        p = r["paper"] or {}
        sel = "pending" if r["selected"] is None else (Planner.tag(r["selected"]) if r["selected"]
                                                        else "preset")
        extra = ""
        if staged:
            st = r.get("earlier_stages") or []
            extra = (f" {r['images_per_run']:,} | " + (f"+{r['earlier_stage_images']:,} "
                     f"({', '.join(st)})" if st else "-") + " |")
        out.append(f"| {r['label']} | {len(r['seeds_done'])}/{r['seeds_planned']} | {sel} | "
                   f"{_ms(r['test_top1'])} | {_ms(r['test_top5'])} | {_ms(r['heldout_top1'])} | "
                   f"{_num(p.get('top5_1'))} / {_num(p.get('top5_10'))} | {_num(p.get('top1_10'))} |"
                   + extra)
    sup = next((r for r in doc["summary"] if r["method"] == "supervised"), None)
    # The paper's column nearest the study's label fraction (1% below 5% of the images, else 10%).
    col = "1" if c["labelled"] < 0.05 * (c["train"] + c["heldout"]) else "10"
    if sup and sup["test_top1"]:
        out.append("")
        for r in doc["summary"]:
            if r is sup or not r["test_top1"]:
                continue
            d = statistics.fmean(r["test_top1"]) - statistics.fmean(sup["test_top1"])
            paper = (r["paper"] or {}).get(f"top5_{col}"), PAPER["supervised"][f"top5_{col}"]
            out.append(f"- {r['label']} minus supervised: {d:+.2f} points of test top-1 "
                       f"({len(r['test_top1'])} vs {len(sup['test_top1'])} seeds)"
                       + (f"; the paper's {col}% column: {paper[0] - paper[1]:+.2f} top-5"
                          if paper[0] else ""))
    out.extend(readings_section(doc, study))
    reading = orderings(doc["summary"])
    if reading:
        out.append("\n## Which of the paper's orderings hold here\n")
        out.extend(f"- {line}" for line in reading)
    out.extend(convergence_section(doc.get("convergence")))
    out.extend(curves_section(doc, study))
    if doc["sweep"]:
        out.append("\n## Sweep (seed 0; selected on the held-out split)\n")
        out.append("| method | config | held-out top-1 | test top-1 (not used to select) | selected |")
        out.append("|---|---|---|---|---|")
        for m, sel in doc["selection"].items():
            for rec in (r for r in doc["runs"] if r["method"] == m and r["role"] == "sweep"
                        and not r.get("stale")):
                mark = "yes" if rec["id"] == sel.get("run") else (
                    "(sweep unfinished)" if sel.get("pending") else "")
                out.append(f"| {m} | {Planner.tag(rec['hyper'])} | {_num(rec['heldout_top1'])} | "
                           f"{_num(rec.get('test_top1'))} | {mark} |")
    if doc["diagnosis"] or doc["analyses"]:
        out.append("\n## Diagnosis\n")
        runs = {r["id"]: r for r in doc["runs"]}
        # Each step against the diagnosed method's selected config at the step's own seed (the
        # report names that run per seed), and the supervised seed-0 run. A one-seed difference
        # of about the seeds' spread above is noise.
        refs = {m: runs.get(sel.get("run")) for m, sel in doc["selection"].items()}
        sup0 = refs.get("supervised")
        diagnosed = list(dict.fromkeys(d.method for d in study.diagnosis))
        out.append("One row per step and seed (0 unless the row names another); a step run at "
                   "several seeds adds their mean ± standard deviation. Δ: test top-1 minus "
                   "that of the diagnosed method's selected config at the same seed (a reference "
                   "row; for supervised's comparison row, minus the first reference, "
                   f"{diagnosed[0]}). A step that closes the gap to supervised moves Δ towards "
                   "supervised's.\n")
        out.append("| step | run | test top-1 | Δ | test top-5 | held-out top-1 |")
        out.append("|---|---|---|---|---|---|")

        def delta(x, ref):
            return "-" if x is None or ref is None else f"{x - ref:+.2f}"

        ref_rows = {}
        for d in study.diagnosis:
            for b in doc["diagnosis"].get(d.key, {}).get("by_seed", []):
                if b["reference"]:
                    ref_rows[(d.method, b["seed"])] = b["reference"]
            if d.key in doc["analyses"]:
                ref_rows[(d.method, d.seed)] = doc["analyses"][d.key]["run"]
        for (m, seed), rid in sorted(ref_rows.items(),
                                     key=lambda kv: (diagnosed.index(kv[0][0]), kv[0][1])):
            ref = runs.get(rid)
            if ref:
                name = f"{m}, selected (the reference)" if seed == 0 else \
                    f"{m}, selected, seed {seed} (the reference of seed-{seed} steps)"
                out.append(f"| {name} | `{ref['id']}` | "
                           f"{_num(ref['test_top1'])} | 0 | {_num(ref['test_top5'])} | "
                           f"{_num(ref['heldout_top1'])} |")
        if sup0 and "supervised" not in diagnosed:
            first = refs.get(diagnosed[0])
            out.append(f"| supervised, selected (for comparison) | `{sup0['id']}` | "
                       f"{_num(sup0['test_top1'])} | "
                       f"{delta(sup0['test_top1'], first and first['test_top1'])} | "
                       f"{_num(sup0['test_top5'])} | {_num(sup0['heldout_top1'])} |")
        for d in study.diagnosis:
            rec = doc["diagnosis"].get(d.key, {})
            a = doc["analyses"].get(d.key)
            if a:
                b, af = a.get("before/eval/top1"), a.get("after/eval/top1")
                out.append(f"| {d.label}: before | `{a['run']}` | {_num(b)} | - | "
                           f"{_num(a.get('before/eval/top5'))} | {_num(a.get('before/heldout/top1'))} |")
                out.append(f"| {d.label}: after ({a['bn_images']:,} images) | `{a['run']}` | "
                           f"{_num(af)} | {delta(af, b)} | "
                           f"{_num(a.get('after/eval/top5'))} | {_num(a.get('after/heldout/top1'))} |")
                continue
            done = {b["seed"]: b for b in rec.get("by_seed", [])}
            for seed in d.seed_list:
                at = "" if seed == 0 else f", seed {seed}"
                b = done.get(seed)
                if b is None:
                    out.append(f"| {d.label}{at} | not run yet | - | - | - | - |")
                    continue
                out.append(f"| {d.label} | `{b['id']}` ({Planner.tag(rec['hyper'])}{at}) | "
                           f"{_num(b['test_top1'])} | "
                           f"{delta(b['test_top1'], b['reference_test_top1'])} | "
                           f"{_num(b['test_top5'])} | {_num(b['heldout_top1'])} |")
            if rec.get("test_top1_mean_std"):
                mean, std = rec["test_top1_mean_std"]
                ref_ms = rec.get("reference_test_top1_mean_std")
                vs = "-" if not ref_ms else \
                    f"{mean - ref_ms[0]:+.2f} (reference {ref_ms[0]:.2f} ± {ref_ms[1]:.2f})"
                top5 = [b["test_top5"] for b in done.values() if b["test_top5"] is not None]
                out.append(f"| {d.label}: mean of {len(done)} seeds | seeds "
                           f"{', '.join(map(str, done))} | **{mean:.2f} ± {std:.2f}** | {vs} | "
                           f"{_ms(top5)} | {_ms([b['heldout_top1'] for b in done.values()])} |")
    tr = doc["analyses"].get("transfer")
    if study.transfer:
        out.append("\n## Transfer: linear probes of frozen features on another domain\n")
        if not tr:
            out.append("Not run yet: it needs the backbone's final seed-0 run and the "
                       f"`{study.transfer['baseline_preset']}` run of the same forwarded images.")
        else:
            out.append(f"Frozen `pre_logits` features of {tr['data']} (train / val), multinomial "
                       "logistic regression; top-1 on val (%). The paper's claim: S4L features "
                       "reach good accuracy with the short schedule, the self-supervised ones "
                       "need the long one.\n")
            out.append("| backbone | run | L-BFGS | SGD short | SGD long |")
            out.append("|---|---|---|---|---|")
            for name, r in tr["results"].items():
                out.append(f"| {name} | `{r['run']}` | {_num(r.get('sklearn_top1'))} | "
                           f"{_num(r.get('sgd_short_top1'))} ({r.get('sgd_short_epochs', '-')} ep.) | "
                           f"{_num(r.get('sgd_long_top1'))} ({r.get('sgd_long_epochs', '-')} ep.) |")
            out.append(f"\n![learning curves]({tr['plot']})")
    out.append("\n## Every run\n")
    out.append("| run | labelled epochs | steps | images | wall | held-out top-1 | test top-1 | "
               "test top-5 | final |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for r in doc["runs"]:
        w = _full_wall(r)
        out.append(f"| `{r['id']}`{' (stale)' if r.get('stale') else ''} | "
                   f"{_num(r.get('labelled_epochs'), 0)} | {r['steps']:,} | {r['images']:,} | "
                   f"{'-' if not w else f'{w / 60:.1f} min'}"
                   f"{'*' if r.get('resumed_at_step') else ''} | {_num(r.get('heldout_top1'))} | "
                   f"{_num(r.get('test_top1'))} | {_num(r.get('test_top5'))} | "
                   f"{'yes' if r.get('final') else ''} |")
    again = [r for r in doc["runs"] if r.get("retrained")]
    if again:
        out.append("\nRetrained on a machine without their checkpoint (an analysis or a later run "
                   "reads it); the tables keep the first measurement, the analyses read the "
                   "retrained checkpoint:\n")
        for r in again:
            out.extend(f"- `{r['id']}`: test top-1 {_num(r.get('test_top1'))} first, "
                       f"{_num(x.get('test_top1'))} retrained ({x.get('cpu') or '?'}, "
                       f"{x.get('finished_at')})" for x in r["retrained"])
    out.append("\nWall times are those of the run's own session; the load average at its end is "
               "in the JSON (`loadavg_end`): a figure taken while other jobs shared the cores is "
               "an indication only. *: resumed from a checkpoint of an earlier session "
               "(`resumed_at_step`); its wall time is that session's, scaled to every step.")
    if doc["failed"]:
        out.append("\nDid not finish in the last session: " + "; ".join(
            f"`{k}`: {v}" for k, v in doc["failed"].items()))
    return "\n".join(out) + "\n"


# ============================================================================ the command


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="the study file (TOML), e.g. experiments/table1_protocol.toml")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its cost, run nothing")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report (JSON, page, plot) from the recorded runs, train nothing")
    p.add_argument("--workdir", default=None, help="where the runs live (default runs/<name>)")
    p.add_argument("--report", default=None,
                   help="report path without suffix (default: the study's `report`)")
    p.add_argument("--only", default=None,
                   help="comma-separated methods to run now (and the stages / teachers they need)")
    p.add_argument("--smoke", action="store_true",
                   help="the presets' -smoke variants (tiny nets; builtin:digits for cifar10): "
                        "the plumbing in seconds, not results")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run (changes every run's identity)")
    p.add_argument("--progress", action="store_true", help="progress bars")


def main(args: argparse.Namespace) -> int:
    study = load_study(args.study)
    if args.smoke:
        key = next(iter(study.schedule))
        study = dataclasses.replace(study, schedule={key: 2 if key == "labelled_epochs" else 128},
                                    labels_per_class=min(study.labels_per_class or 5, 5),
                                    heldout_per_class=min(study.heldout_per_class, 2),
                                    stage_schedule=study.stage_schedule and {"images": 128})
    work = Path(args.workdir or (ROOT / "runs" / (study.name + ("-smoke" if args.smoke else ""))))
    report = Path(args.report) if args.report else (
        work / "report" if args.smoke else Path(study.report))
    if not report.is_absolute() and not args.report:
        report = ROOT / report
    work.mkdir(parents=True, exist_ok=True)
    report.parent.mkdir(parents=True, exist_ok=True)
    only = [x for x in (args.only or "").split(",") if x]
    command = "s4l study " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
        if sys.argv[1:2] == ["study"] else ""
    return run_study(study, workdir=work, report=report, smoke=args.smoke,
                     overrides=args.overrides, only=only, dry_run=args.dry_run,
                     report_only=args.report_only,
                     progress=args.progress, command=command)

