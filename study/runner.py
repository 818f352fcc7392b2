"""Running a study: the next run to train (dependencies first), training it through the library,
the analyses when their runs are finished, and the report after every run."""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from s4l.errors import UserError
from s4l.study.analyses import bn_recompute, transfer_step
from s4l.study.cost import print_plan
from s4l.study.ledger import RETRAINED_KEYS, cpu_name, load_ledger, now, record_of
from s4l.study.lock import study_lock
from s4l.study.park import ask_for_checkpoint, forget, park, parked_step, unpark
from s4l.study.plan import Planner, Run, resolve_data
from s4l.study.report import write_report
from s4l.study.spec import Study
from s4l.training import ckpt_request

log = logging.getLogger("s4l.study")

# ---------------------------------------------------------------------------- running


def execute(run: Run, planner: Planner, progress: bool) -> tuple[dict[str, Any], float, int]:
    """Pseudo-label first if the run needs it, then train (or resume); (metrics, wall s of this
    session, the step it resumed from: 0 for a fresh run)."""
    from s4l.training.checkpoint import find_resume, read_checkpoint
    from s4l.training.teacher_labels import pseudo_label
    from s4l.training.trainer import train

    t0 = time.time()
    part = find_resume(run.workdir)
    resumed = int(read_checkpoint(part).get("step", 0)) if part else 0
    if run.pseudo_labels is not None and not run.pseudo_labels.exists():
        run.pseudo_labels.parent.mkdir(parents=True, exist_ok=True)
        log.info("pseudo-labels of %s by %s -> %s", planner.data, run.teacher_ckpt,
                 run.pseudo_labels)
        pseudo_label(run.teacher_ckpt, planner.data, run.pseudo_labels,
                     labels=str(planner.label_file) if planner.label_file else None,
                     workers=run.config.data.workers, progress=progress)
        if not run.pseudo_labels.exists():
            raise RuntimeError("s4l pseudo-label failed")
    log.info("training %s (%s, %d steps x %d images)", run.id, run.config.preset,
             run.budget["steps"], run.budget["images_per_step"])
    metrics = train(run.config, run.workdir, progress=progress)
    return metrics, time.time() - t0, resumed


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
              report_only: bool = False, park_dir: Path | None = None,
              park_now: bool = False, park_wait: float = 600.0) -> int:
    """Train what is left of the plan (one process per work folder: study/lock.py), or print
    it (`dry_run`), or rewrite the report from the ledger (`report_only`), or copy the
    unfinished runs' resume state to `park_dir` (`park_now`; study/park.py). Training first
    restores what is parked in `park_dir`."""
    kw = dict(workdir=workdir, report=report, smoke=smoke, overrides=overrides, only=only,
              dry_run=dry_run, progress=progress, command=command, rate=rate,
              report_only=report_only, park_dir=park_dir, park_now=park_now,
              park_wait=park_wait)
    if dry_run or report_only or park_now:
        return _run_study(study, **kw)
    # SIGUSR1 (`--park` beside it) asks for a checkpoint; held between runs too, so a request
    # that comes while no run trains never meets the signal's default action (terminate).
    with study_lock(workdir), ckpt_request.handling():
        return _run_study(study, **kw)


def _run_study(study: Study, *, workdir: Path, report: Path, smoke: bool,
               overrides: Sequence[str], only: Sequence[str], dry_run: bool,
               progress: bool, command: str, rate: float | None, report_only: bool,
               park_dir: Path | None, park_now: bool, park_wait: float) -> int:
    data = resolve_data("builtin:digits" if smoke and study.data == "cifar10" else study.data)
    ledger_path = report.with_suffix(".json")
    ledger, analyses = load_ledger(ledger_path)
    failed: dict[str, str] = {}
    retrain: set[str] = set()      # finished dependencies whose checkpoint is not on this machine
    retrained: set[str] = set()
    if only and study.transfer and study.transfer["backbone"] in only:
        only = [*only, "transfer-baseline"]  # the backbone's self-supervised comparison run
    started = time.time()
    stale: set[str] = set()        # parked copies of another config, said once
    while True:
        planner = Planner(study, data, workdir, ledger, smoke=smoke, overrides=overrides)
        plan = planner.build()
        done = {r.id for r in plan if planner.result(r) is not None}
        if dry_run:
            print_plan(planner, plan, analyses, rate)
            for r in plan:
                step = parked_step(park_dir, r) if park_dir and r.id not in done else None
                if step is not None:
                    print(f"{r.id}: parked at step {step} in {park_dir} (resumes there)")
            return 0
        if park_now:
            if park_dir is None:
                raise UserError("--park needs a park folder")
            said = ask_for_checkpoint(workdir, plan, done, park_wait) if park_wait > 0 else None
            if said:
                print(said, flush=True)
            lines = park(plan, done, park_dir)
            print("\n".join(lines) if lines else
                  "nothing to park: no unfinished run has a checkpoint in " + str(workdir))
            return 0
        if park_dir is not None and not report_only:  # runs planned later may be parked too
            for line in unpark(plan, done, park_dir, stale):
                log.info("%s", line)
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
            if park_dir is not None:
                forget(run, park_dir)
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
                                 "label": labels[key], "finished_at": now()}
            # Its cost counts in the study's (feature extraction and probes are not free).
            analyses[key].update(wall_s=round(time.time() - t0, 3), cpu=cpu_name())
        except Exception as e:
            failed[key] = f"{type(e).__name__}: {e}"
            log.error("analysis %s failed: %s\n%s", key, e, traceback.format_exc())

