"""What a study costs: forwarded images/s per objective (measured on its finished runs, else
defaults), each planned run's estimate, and the `--dry-run` table."""

from __future__ import annotations

import os
import statistics
from typing import Any

from s4l.study.ledger import cpu_name, full_wall
from s4l.study.plan import Planner, Run

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

# ---------------------------------------------------------------------------- plan and cost


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
            acc.setdefault(obj, {True: [], False: []})[r.get("cpu") == cpu_name()].append(
                r["images"] / full_wall(r))
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
    later = sum(unplanned_refine(planner, plan, rows).values())
    total, left = total + later, left + later
    return rows, total, left, rate


def unplanned_refine(planner: Planner, plan: list[Run], rows) -> dict[str, float]:
    """{method: estimated seconds} of the refine points a method will run once its sweep has
    finished (not in the plan yet: they start from its selection), each costed as one of its
    sweep runs (a refine point that lands on a swept point is not run: an upper bound)."""
    out = {}
    for m in planner.study.methods:
        if not m.refine or not planner.selection.get(m.key, {}).get("pending"):
            continue
        grid = planner.grid(m)
        sweep = [sec for r, sec, _ in rows if r.method == m.key and r.role == "sweep"]
        if sweep and not any(r.method == m.key and r.role == "sweep" and r.hyper not in grid
                             for r in plan):
            out[m.key] = len(m.refine) * sweep[0]
    return out


def print_plan(planner: Planner, plan: list[Run], analyses: dict[str, Any],
               given_rate: float | None = None) -> None:
    rows, total, left, rate = plan_cost(planner, plan, given_rate)
    later = unplanned_refine(planner, plan, rows)
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
            if m in later:
                refine = [Planner.tag(dict(p)) for p in planner.study.method(m).refine]
                print(f"{m}: then its refine points, not listed above: its selection over the "
                      f"points above with {' / '.join(refine)} (about {later[m] / 60:.0f} min, "
                      "in the totals below)")
        elif sel.get("run"):
            print(f"{m}: selected {Planner.tag(sel['hyper'])} (held-out top-1 "
                  f"{sel['heldout_top1']:.2f})")
    print(f"\n{len(plan)} runs; {total / 3600:.2f} h on this machine in all, "
          f"{left / 3600:.2f} h left (rates: "
          + ", ".join(f"{k} {v:.0f} img/s" for k, v in sorted(rate.items())) + ")")


def estimate(planner: Planner) -> dict[str, Any]:
    _, total, left, rate = plan_cost(planner, list(planner.runs.values()))
    cores = os.cpu_count() or 1
    return {"estimated_machine_hours_total": round(total / 3600, 2),
            "estimated_machine_hours_left": round(left / 3600, 2),
            "estimated_cpu_hours_total": round(total * cores / 3600, 2),
            "estimate_rates_img_per_s": {k: round(v) for k, v in sorted(rate.items())},
            "estimate_note": "every planned run's forwarded images / the median rate of the "
                             "study's finished runs of its objective (defaults where none)"}

