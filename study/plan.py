"""Planning a study: its runs, their configs at the study's schedule, their portable identity,
and the selection of each method's hyper-parameters from the finished sweep (pure: it trains
nothing, reads only the data set's file list, the label file and the ledger)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from s4l.errors import UserError
from s4l.io import data_cache_dir, shared_data_dir, unpack_once
from s4l.study.spec import Method, Study

SHORT = {"optim.lr": "lr", "optim.weight_decay": "wd", "objective.rotation_weight": "rotw",
         "objective.class_rotations": "cls"}


# ---------------------------------------------------------------------------- runs


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
    archives = {"cifar10": ("cifar10-jpg.tar.gz", "cifar10"),
                "imagenette": ("imagenette-224.tar.gz", "imagenette-224")}
    if name in archives:
        shared, cache = shared_data_dir(), data_cache_dir()
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
    return cfg, {"unlabelled_passes": round(passes, 3), "steps": steps,
                 "images_per_step": per_step, "labelled_batch": b_l, "unlabelled_batch": b_u,
                 "images": steps * per_step, "steps_per_epoch": spe,
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
        """The sweep's points (for `m`: with its own lists where it gives some, then its extra
        points), in order."""
        own = dict(m.grid) if m else {}
        keys = [k for k, _ in self.study.sweep]
        lists = [own.get(k, v) for k, v in self.study.sweep]
        points = [dict(zip(keys, vals)) for vals in itertools.product(*lists)]
        for extra in (m.extra if m else ()):
            point = {k: dict(extra)[k] for k in keys}  # the sweep's key order: the run's tag
            if point not in points:
                points.append(point)
        return points

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

    def refined(self, m: Method, best: dict[str, Any]) -> list[dict[str, Any]]:
        """`m`'s refine points: `best` (its selection over grid + extra) with each refine table's
        values, in the sweep's key order; a point already swept is not repeated."""
        keys = [k for k, _ in self.study.sweep]
        done, out = self.grid(m), []
        for change in m.refine:
            point = {k: {**best, **dict(change)}[k] for k in keys}
            if point not in done and point not in out:
                out.append(point)
        return out

    def _candidates(self, m: Method, points: list[dict[str, Any]]):
        """[(held-out top-1, hyper, run id)] over `points`, or None while any is unfinished."""
        cands = []
        for hyper in points:
            run = self.runs[f"sweep/{m.key}/{self.tag(hyper)}/seed0"]
            rec = self.result(run)
            if rec is None or rec.get("heldout_top1") is None:
                return None
            cands.append((rec["heldout_top1"], hyper, run.id))
        return cands

    @staticmethod
    def _best(cands):
        # Ties go to the smaller values (the cheaper, less regularised point).
        return max(cands, key=lambda c: (c[0], *(-v if isinstance(v, int | float) else 0
                                                 for v in c[1].values())))

    def select(self, m: Method) -> dict[str, Any] | None:
        """The method's selected hyper-parameters, or None while its sweep is unfinished (its
        refine points, when it has some, included)."""
        if not self.study.sweep or not m.sweep:
            return {"hyper": {}, "selected_on": "none: the preset's hyper-parameters",
                    "run": None}
        cands = self._candidates(m, self.grid(m))
        if cands is not None and m.refine:
            more = self._candidates(m, self.refined(m, self._best(cands)[1]))
            cands = None if more is None else cands + more
        if cands is None:
            return None
        best = self._best(cands)
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
                points = self.grid(m)
                for hyper in points:
                    self._sweep_run(m, hyper)
                # Refine points exist once grid + extra have all finished: they start from that
                # selection (until then the plan cannot name them).
                cands = self._candidates(m, points) if m.refine else None
                for hyper in self.refined(m, self._best(cands)[1]) if cands else ():
                    self._sweep_run(m, hyper)
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

    def _sweep_run(self, m: Method, hyper: dict[str, Any]) -> Run:
        pairs, deps, kw, _ = self._inputs(m, 0)  # a stage only: no teacher + sweep
        return self.add(f"sweep/{m.key}/{self.tag(hyper)}/seed0", m, "sweep", 0,
                        [*m.set, *hyper.items(), *pairs], hyper, deps=deps, **kw)

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

