"""The study's ledger: finished runs' records (kept in the report JSON, so committing that file
keeps the study across machines) and the learning curves read from a run's metrics."""

from __future__ import annotations

import datetime as dt
import functools
import os
import platform
import statistics
from pathlib import Path
from typing import Any

from s4l.study.plan import Run

# ---------------------------------------------------------------------------- the ledger


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
           "finished_at": now(), "host": platform.node(), "cpu": cpu_name(),
           "commit": git_commit().get("commit")}
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
    from s4l.training.metrics import read_metrics

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


def full_wall(rec: dict[str, Any]) -> float:
    """A record's wall time for every step (a resumed run's is scaled from its own session)."""
    return rec.get("wall_s_full") or rec.get("wall_s") or 0.0


@functools.cache
def cpu_name() -> str:
    from s4l.provenance import machine_info

    return machine_info().get("cpu") or "?"


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
