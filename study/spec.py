"""The study file (experiments/*.toml): its typed tables, the study they make, and its checks.

A study is a short TOML file: the data and label regime, one schedule for every method (labelled
epochs, the paper's protocol, or forwarded images, a compute-matched comparison), the methods (a
preset each), an optional learning-rate x weight-decay sweep selected on the held-out split,
seeds, a convergence check, diagnosis variants, a transfer analysis. experiments/table1_protocol.toml
documents each key; experiments/table1_small.toml shows pretraining stages and a pseudo-label
teacher.

The file is read with the training config's typed machinery (`s4l.training.config.from_dict`:
frozen dataclasses, type checks, unknown keys listed): `StudyFile`, `MethodEntry`,
`DiagnosisEntry`, `ConvergenceEntry` and `TransferEntry` are the file's tables as written;
`load_study` then checks what types cannot say (a method named twice, a teacher cycle, a sweep
key that is not one) and builds the `Study` the planner reads. Every mistake is one UserError.

Relative paths: `label_file` is relative to the study file's folder; `report` (default
`runs/<name>/report`) and the default workdir `runs/<name>` are relative to the current working
directory (run `s4l study` from the checkout, as the docs do), never to where s4l is installed.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

from s4l.errors import UserError

SWEEP_KEYS = ("optim.lr", "optim.weight_decay")


# ---------------------------------------------------------------------------- the file's tables


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    """One `[[method]]` table."""
    key: str
    preset: str
    seeds: int = 1
    label: str | None = None
    pretrain: str | None = None
    teacher: str | None = None
    sweep: bool = True
    set: dict[str, Any] | None = None
    grid: dict[str, Any] | None = None
    extra: Any = None  # checked by _extra_points (a list of whole sweep points)
    refine: Any = None  # checked by _extra_points too (partial points, after the selection)


@dataclasses.dataclass(frozen=True)
class DiagnosisEntry:
    """One `[[diagnosis]]` table."""
    key: str
    method: str
    label: str | None = None
    kind: str = "train"
    set: dict[str, Any] | None = None
    hyper_of: str | None = None
    seed: int = 0
    seeds: int = 1


@dataclasses.dataclass(frozen=True)
class ConvergenceEntry:
    """`[convergence]`: `method = "m"` (one arm) or `methods = [...]`, and a factor > 1."""
    method: str | None = None
    methods: tuple[str, ...] | None = None
    factor: int | float = 2


@dataclasses.dataclass(frozen=True)
class TransferEntry:
    """`[transfer]`: linear probes of the backbone method's run on another domain."""
    backbone: str | None = None
    baseline_preset: str | None = None
    data: str | None = None
    schedules: str | None = None
    per_class: int | None = None


@dataclasses.dataclass(frozen=True)
class BesideEntry:
    """`[beside]`: an earlier study's JSON report whose methods the page sets beside this one's
    (`report`: relative to the current directory, as this study's own `report`)."""
    report: str
    label: str | None = None


@dataclasses.dataclass(frozen=True)
class StudyFile:
    """The study file's top level, as written."""
    name: str
    data: str
    schedule: dict[str, Any]
    method: tuple[dict[str, Any], ...]
    title: str | None = None
    labels_per_class: int | None = None
    label_seed: int = 0
    heldout_per_class: int = 10
    sweep: dict[str, Any] | None = None
    set: dict[str, Any] | None = None
    convergence: ConvergenceEntry | None = None
    diagnosis: tuple[dict[str, Any], ...] = ()
    report: str | None = None
    label_file: str | None = None
    notes: str = ""
    transfer: TransferEntry | None = None
    stage_schedule: dict[str, Any] | None = None
    curve_points: int = 0
    beside: BesideEntry | None = None


# ---------------------------------------------------------------------------- the study

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
    extra: tuple[tuple[tuple[str, Any], ...], ...] = ()  # whole points swept after the grid's
    refine: tuple[tuple[tuple[str, Any], ...], ...] = ()  # once grid + extra have finished: the
                                   # selected point with these values changed, then re-selected


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
    beside: dict[str, str] | None = None  # {report, label}: an earlier study set beside this one

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


def _extra_points(points: Any, where: str,
                  field: str = "extra") -> tuple[tuple[tuple[str, Any], ...], ...]:
    """`extra = [{"optim.lr" = 0.05, "optim.weight_decay" = 0.01}, ...]`: whole sweep points a
    method runs beside its grid (e.g. another method's selection), each a number per key; the
    same shape for `refine` (there a table may give some of the keys)."""
    if points is None:
        return ()
    if not isinstance(points, list) or not points:
        raise UserError(f"{where}: {field} must be a non-empty list of tables, got {points!r}")
    out = []
    for point in points:
        if not isinstance(point, dict) or not point:
            raise UserError(f"{where}: each {field} point is a table of sweep values, got "
                            f"{point!r}")
        for k, v in point.items():
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise UserError(f"{where}: {field} point {point!r}: {k} must be a number")
        out.append(tuple(point.items()))
    return tuple(out)


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
    f: StudyFile = C.from_dict(raw, StudyFile, where=str(path))
    sched = f.schedule
    if len(sched) != 1 or next(iter(sched)) not in ("labelled_epochs", "images"):
        raise UserError(f"{path}: schedule must be {{labelled_epochs = N}} or {{images = N}}, "
                        f"got {sched!r}")
    if not next(iter(sched.values())) > 0:
        raise UserError(f"{path}: schedule must be > 0, got {sched!r}")
    stage_sched = f.stage_schedule
    if stage_sched is not None and (set(stage_sched) != {"images"}
                                    or not stage_sched["images"] > 0):
        raise UserError(f"{path}: stage_schedule must be {{images = N}}, N > 0, got {stage_sched!r}")
    methods = []
    for i, table in enumerate(f.method):
        name = table.get("key", f"#{i + 1}") if isinstance(table, dict) else f"#{i + 1}"
        m: MethodEntry = C.from_dict(table, MethodEntry, where=f"{path}: method {name!r}")
        get_preset(m.preset)  # a clear error for an unknown preset
        if m.pretrain:
            get_preset(m.pretrain)
        methods.append(Method(
            key=m.key, preset=m.preset, seeds=m.seeds, label=m.label or m.key,
            pretrain=m.pretrain, teacher=m.teacher, sweep=m.sweep,
            set=_pairs(m.set, f"method {m.key}.set"), grid=_pairs(m.grid, f"method {m.key}.grid"),
            extra=_extra_points(m.extra, f"{path}: method {m.key!r}"),
            refine=_extra_points(m.refine, f"{path}: method {m.key!r}", "refine")))
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
        if m.teacher and m.sweep and f.sweep:
            # A swept student would need its teacher's selection before the teacher's own
            # sweep is planned; the student takes the preset's hyper-parameters instead.
            raise UserError(f"{path}: method {m.key!r} has a teacher: set sweep = false on it")
    sweep = _pairs(f.sweep, "sweep")
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
        for point in m.extra:
            if {k for k, _ in point} != {k for k, _ in sweep}:
                raise UserError(f"{path}: method {m.key!r}: each extra point gives every sweep "
                                f"key, {[k for k, _ in sweep]}, and no other; got "
                                f"{[k for k, _ in point]}")
        for point in m.refine:
            if not {k for k, _ in point} <= {k for k, _ in sweep}:
                raise UserError(f"{path}: method {m.key!r}: refine points change sweep keys "
                                f"only ({[k for k, _ in sweep]}); got {[k for k, _ in point]}")
        if m.refine and not m.sweep:
            raise UserError(f"{path}: method {m.key!r}: refine needs a sweep (sweep = false)")
    diags = []
    for i, table in enumerate(f.diagnosis):
        name = table.get("key", f"#{i + 1}") if isinstance(table, dict) else f"#{i + 1}"
        d: DiagnosisEntry = C.from_dict(table, DiagnosisEntry, where=f"{path}: diagnosis {name!r}")
        if d.method not in keys or (d.hyper_of and d.hyper_of not in keys):
            raise UserError(f"{path}: diagnosis {d.key!r} names a method that is not in the study")
        if d.kind not in ("train", "bn-recompute"):
            raise UserError(f"{path}: diagnosis {d.key!r} kind must be train or bn-recompute")
        for k, low in (("seed", 0), ("seeds", 1)):
            v = getattr(d, k)
            if v < low:
                raise UserError(f"{path}: diagnosis {d.key!r}: {k} must be an integer "
                                f">= {low}, got {v!r}")
        if d.kind == "bn-recompute" and d.seeds != 1:
            raise UserError(f"{path}: diagnosis {d.key!r}: a bn-recompute analysis reads one "
                            "run; give it seed, not seeds")
        diags.append(Diagnosis(key=d.key, method=d.method, label=d.label or d.key, kind=d.kind,
                               set=_pairs(d.set, f"diagnosis {d.key}.set"), hyper_of=d.hyper_of,
                               seed=d.seed, seeds=d.seeds))
    # A pretraining stage reads no labels: only a budget of forwarded images can size it.
    if any(m.pretrain for m in methods) and "images" not in (stage_sched or sched):
        raise UserError(f"{path}: a pretraining stage has no labelled epochs; with schedule "
                        f"{sched!r}, give the stages a budget: stage_schedule = {{images = N}}")
    conv = None
    if f.convergence is not None:
        c = f.convergence
        arms = list(c.methods) if c.methods is not None else ([c.method] if c.method else [])
        if ((c.method is None) == (c.methods is None) or not arms
                or any(a not in keys for a in arms) or len(set(arms)) != len(arms)
                or not c.factor > 1):
            raise UserError(f"{path}: convergence needs method (or methods, a list) naming study "
                            f"methods and a factor > 1, got {raw.get('convergence')}")
        conv = {"methods": arms, "factor": c.factor}
    if f.curve_points < 0:
        raise UserError(f"{path}: curve_points must be an integer >= 0, got {f.curve_points!r}")
    transfer = None
    if f.transfer is not None:
        transfer = {k: v for k, v in dataclasses.asdict(f.transfer).items() if v is not None}
        if f.transfer.backbone not in keys or f.transfer.baseline_preset is None:
            raise UserError(f"{path}: transfer needs backbone (a study method) and "
                            f"baseline_preset, got {transfer}")
        get_preset(f.transfer.baseline_preset)
    study = Study(
        transfer=transfer,
        name=f.name, title=f.title or f.name, data=f.data,
        labels_per_class=f.labels_per_class, label_seed=f.label_seed,
        heldout_per_class=f.heldout_per_class, schedule=dict(sched),
        methods=tuple(methods), sweep=sweep, common=_pairs(f.set, "set"),
        convergence=conv, diagnosis=tuple(diags),
        report=f.report or f"runs/{f.name}/report",
        label_file=(str((path.parent / f.label_file).resolve()) if f.label_file else None),
        notes=f.notes, source_file=str(path),
        stage_schedule=dict(stage_sched) if stage_sched else None, curve_points=f.curve_points,
        beside=({"report": f.beside.report, "label": f.beside.label or f.beside.report}
                if f.beside else None))
    # Every override must be a config key with a valid value: check on one preset now.
    probe = get_preset(methods[0].preset).config
    for pairs in (study.common, *(m.set for m in methods), *(d.set for d in diags)):
        C.apply_overrides(probe, list(pairs))
    return study
