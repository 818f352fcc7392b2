"""The study's JSON report (the ledger, its summary per method, convergence, diagnosis, cost),
written after every run, with its page and plots."""

from __future__ import annotations

import logging
import os
import statistics
from pathlib import Path
from typing import Any

from s4l.io import atomic_write_json, atomic_write_text
from s4l.study.cost import estimate
from s4l.study.ledger import full_wall, now
from s4l.study.markdown import markdown
from s4l.study.plan import Planner, convergence_id, diagnosis_id
from s4l.study.plots import plot, plot_curves
from s4l.study.spec import Study
from s4l.training.paper import TABLE1 as PAPER

log = logging.getLogger("s4l.study")

# ---------------------------------------------------------------------------- the report


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


def _arms(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method with finished final runs: its schedule and the readings the pages compare."""
    out = {}
    for r in rows:
        if not r["test_top1"]:
            continue
        final = next((x for x in runs if x.get("method") == r["method"] and x.get("final")), {})
        out[r["method"]] = {
            "label": r["label"], "labelled_epochs": final.get("labelled_epochs"),
            "steps": final.get("steps"), "unlabelled_passes": r.get("unlabelled_passes"),
            **{k: r.get(k) or [] for k in ("test_top1", "test_top1_rotation_averaged",
                                           "heldout_top1")}}
    return out


def beside_report(beside: dict[str, str], rows: list[dict[str, Any]],
                  runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The methods this study shares with an earlier study's report, both studies' readings side
    by side; an unreadable earlier report is said in the page, never fatal to this one."""
    from s4l.errors import UserError
    from s4l.safeload import load_json_file

    out: dict[str, Any] = {"report": beside["report"], "label": beside["label"]}
    try:
        earlier = load_json_file(Path(beside["report"]), "earlier study report", 64 << 20)
        theirs = _arms(earlier["summary"], earlier["runs"])
        out["study"] = earlier.get("study")
    except (UserError, OSError, KeyError, TypeError, AttributeError) as e:  # missing or foreign
        return {**out, "error": f"{type(e).__name__}: {e}"}
    ours = _arms(rows, runs)
    out["methods"] = [{"method": k, "earlier": theirs[k], "this": ours.get(k)}
                      for k in theirs if k in {r["method"] for r in rows}]
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
    wall = sum(full_wall(r) for r in runs)
    # Retrains (a finished run trained again for its checkpoint) and the analyses cost too.
    wall_again = sum(x.get("wall_s") or 0.0 for r in runs for x in r.get("retrained", []))
    wall_analyses = sum(a.get("wall_s") or 0.0 for a in analyses.values())
    total = wall + wall_again + wall_analyses
    cores = os.cpu_count() or 1
    doc = {
        "study": study.name, "title": study.title, "study_file": study.source_file,
        "command": command, "updated_at": now(), "data": study.data,
        "counts": planner.counts, "schedule": study.schedule,
        "stage_schedule": study.stage_schedule,
        "label_file": str(planner.label_file) if planner.label_file else None,
        "label_file_sha256": file_sha256(planner.label_file) if planner.label_file else None,
        "common_overrides": dict(study.common), "sweep": {k: list(v) for k, v in study.sweep},
        "method_grids": {m.key: {k: list(v) for k, v in m.grid} for m in study.methods if m.grid},
        "method_extra_points": {m.key: [dict(p) for p in m.extra]
                                for m in study.methods if m.extra},
        "method_refine_points": {m.key: [dict(p) for p in m.refine]
                                 for m in study.methods if m.refine},
        "selection": {k: v for k, v in planner.selection.items()},
        "summary": (rows := summary(planner, ledger)), "convergence": conv,
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
                 **estimate(planner)},
        "machine": machine_info(), "failed": failed,
    }
    if study.beside:
        doc["beside"] = beside_report(study.beside, rows, runs)
    report.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(report.with_suffix(".json"), doc, newline=True, indent=2, default=str)
    try:
        plot(doc, report.with_suffix(".png"))
        if study.curve_points:
            plot_curves(doc, report.with_name(report.name + "_curves.png"))
    except Exception as e:  # the plot must not lose the numbers
        log.warning("plot failed: %s", e)
    atomic_write_text(report.with_suffix(".md"), markdown(doc, study, report.with_suffix(".png").name))


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

