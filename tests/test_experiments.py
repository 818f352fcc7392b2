"""The small-scale reproduction scripts (experiments/table1_small.py, val_study_small.py) end to end.

Tiny configurations on a generated 3-class image folder: the presets' -smoke variants, a budget
of a few dozen images per run, 1 seed. Checked: the results files hold the runs' own final
metrics beside the paper's numbers, every run spends the same budget and the schedule arithmetic
agrees with the trainer's, the label file is written once and reused, the pseudo-label row is
taught by the supervised run, and a second invocation skips finished runs (resumability).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
from conftest import make_image_folder

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import table1_small as t1  # noqa: E402
import val_study_small as vs  # noqa: E402


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=12, size=32)


def _stamps(paths):
    return {str(p): p.stat().st_mtime_ns for p in paths}


def test_table1_tiny_end_to_end_and_resume(folder, tmp_path, caplog):
    from s4l.datasets import read_label_map

    work = tmp_path / "t1"
    argv = ["--smoke", "--data", str(folder), "--workdir", str(work), "--labels-per-class", "4",
            "--val-per-class", "1", "--seeds", "0", "--only", "supervised,pseudo-labels",
            "--budget-scale", "0.5", "--set", "data.workers=0", "--no-progress"]
    assert t1.main(argv) == 0
    res = json.loads((work / "results.json").read_text())
    assert [r["row"] for r in res["rows"]] == ["supervised", "pseudo-labels"]
    assert (work / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![our rows beside the paper's](results.png)" in (work / "results.md").read_text()
    label_file = work / "label_map_12labels_seed0.json"
    assert len(read_label_map(label_file)) == 12  # 4 per class x 3 classes
    assert res["regimes"][0]["label_file"] == str(label_file)
    runs = {r["id"]: r for r in res["runs"]}
    assert set(runs) == {"12labels/supervised/seed0", "12labels/pseudo-labels/seed0"}
    for rid, rec in runs.items():
        assert rec["status"] == "done" and rec["wall_s"] > 0
        final = json.loads((Path(rec["workdir"]) / "final_metrics.json").read_text())
        # The table reports each run's own final test metrics (nothing hard-coded).
        assert rec["metrics"]["top1"] == final["eval/top1"]
        assert rec["metrics"]["top5"] == final["eval/top3"] and rec["top_k"] == 3  # 3 classes
        assert rec["metrics"]["heldout_top1"] == final["heldout/top1"]
        assert final["step"] == rec["budget"]["steps"]
        assert rec["budget"]["images"] == rec["budget"]["steps"] * rec["budget"]["images_per_step"]
        assert res["budget"]["images_per_run"] - rec["budget"]["images_per_step"] < \
            rec["budget"]["images"] <= res["budget"]["images_per_run"]
        # Every labelled run reads the saved label file.
        cfg = json.loads((Path(rec["workdir"]) / "config.json").read_text())
        if rid.endswith("supervised/seed0"):
            assert cfg["data"]["labels"] == str(label_file)
        else:
            assert cfg["data"]["labels"] is None and cfg["data"]["pseudo_labels"]
            pl = json.loads(Path(cfg["data"]["pseudo_labels"]).read_text())
            assert pl["provenance"]["teacher_checkpoint"].endswith("supervised/seed0/checkpoint.pt")
    sup = res["rows"][0]
    assert sup["summary"]["top1"]["mean"] == runs["12labels/supervised/seed0"]["metrics"]["top1"]
    assert sup["paper"]["top5"] == 80.43 and sup["seeds_done"] == [0]
    md = (work / "results.md").read_text()
    assert "| Supervised baseline | 80.43 | 56.36 |" in md and "Pseudo-labels" in md
    assert res["machine"]["cores_logical"] >= 1 and "commit" in res["git"]

    # Second invocation: the finished runs are skipped, nothing is retrained or relabelled.
    files = [Path(r["workdir"]) / n for r in runs.values()
             for n in ("checkpoint.pt", "final_metrics.json")] + [label_file]
    before = _stamps(files)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="table1_small"):
        assert t1.main(argv) == 0
    assert _stamps(files) == before
    assert sum("finished, skipped" in m for m in caplog.messages) == 2
    again = json.loads((work / "results.json").read_text())
    assert [r["sessions"] for r in again["runs"]] == [1, 1]

    # A finished run of another configuration is not passed off as this one's.
    assert t1.main([*argv, "--set", "optim.momentum=0.5"]) == 1
    stale = json.loads((work / "results.json").read_text())
    assert {r["status"] for r in stale["runs"]} == {"stale"}


def test_plan_budget_matches_the_trainer(folder, tmp_path):
    """Same budget for every row, and the steps the script plans are the steps the trainer runs."""
    from s4l.datasets import open_source
    from s4l.training.objectives import build_objective
    from s4l.training.trainer import make_plan

    args = t1.parse_args(["--smoke", "--data", str(folder), "--workdir", str(tmp_path / "w"),
                          "--labels-per-class", "4", "--val-per-class", "1", "--seeds", "0,1",
                          "--budget-scale", "3", "--low-label-regime", "3"])
    source = open_source(str(folder), "train")
    regimes = [t1.Regime(4, "10pct"), t1.Regime(3, "1pct")]
    budget = 3 * t1.SMOKE_BUDGET
    plan = t1.build_plan(args, str(folder), source, regimes, tmp_path / "w", budget)
    rows = {(r.regime, r.row) for r in plan if r.row}
    assert rows == {(reg, k) for reg in ("12labels", "9labels") for k in t1.ROW_KEYS}
    seeds = {r.row: sorted(x.seed for x in plan if x.row == r.row and x.regime == "12labels")
             for r in plan if r.row}
    assert seeds["supervised"] == seeds["s4l-rotation"] == [0, 1]
    assert seeds["vat"] == [0]
    assert seeds["pseudo-labels"] == [0]
    counts = t1.count_images(source, tmp_path / "w" / "label_map_12labels_seed0.json", 1)
    for run in plan:
        b = run.budget
        assert budget - b["images_per_step"] < b["images"] <= budget, run.id
        assert run.config.optim.total_steps == b["steps"]
        obj = build_objective(run.config.objective.name,
                              run.config.objective.objective_config(), 3)
        n_lab = counts.train if run.config.data.pseudo_labels else (
            4 * 3 if run.regime == "12labels" else 3 * 3)
        p = make_plan(run.config, obj, n_lab, counts.train, 1)
        assert p.total_steps == b["steps"], run.id
        # The schedule (in the trainer's epochs) ends exactly at the last step, so every LR decay
        # of the preset happens within the budget.
        assert p.steps_per_epoch == b["steps_per_epoch"], run.id
        assert round(run.config.optim.total_epochs * p.steps_per_epoch) == b["steps"], run.id
        assert max(run.config.optim.decay_epochs) < run.config.optim.total_epochs
        assert p.eval_every >= p.total_steps  # the test split is evaluated only at the end
        # Dependencies come first in the plan.
        ids = [r.id for r in plan]
        assert all(ids.index(d) < ids.index(run.id) for d in run.deps)
    # The S4L-Rotation row counts its 4 rotated copies of both streams.
    s4l = next(r for r in plan if r.row == "s4l-rotation")
    assert s4l.budget["images_per_step"] == 4 * (s4l.budget["labelled_batch"] +
                                                 s4l.budget["unlabelled_batch"])


def test_paper_numbers_match_the_presets():
    from s4l.training.presets import ROWS

    number = {r.name: r.number for r in ROWS}
    for spec in t1.ROWS:
        for col in ("10", "1"):
            assert number[f"{spec.preset}-{col}pct"] == f"top-5 {t1.PAPER[spec.key][f'top5_{col}']:.2f}"


def test_val_study_tiny_end_to_end_and_resume(folder, tmp_path):
    from s4l.datasets import open_source, training_subsets

    work = tmp_path / "vs"
    argv = ["--smoke", "--data", str(folder), "--workdir", str(work), "--labels-per-class", "4",
            "--val-per-class", "3", "--label-seed", "1", "--lrs", "0.01,0.1", "--wds", "0.001",
            "--draws", "3",
            "--budget-scale", "0.5", "--set", "data.workers=0", "--no-progress", "--no-docs"]
    assert vs.main(argv) == 0
    out = json.loads((work / "val_study_small.json").read_text())
    study = out["study"]
    assert len(study["models"]) == 2 and study["pool_images"] == 9
    assert sorted(s["per_class"] for s in study["sizes"].values()) == [1, 3]
    # The pool is exactly the runs' held-out split: no pool image was trained on.
    pool_file = next(work.glob("*/heldout_pool.txt"))
    pool = [ln.split()[0] for ln in pool_file.read_text().splitlines()]
    assert len(pool) == 9
    source = open_source(str(folder), "train")
    for r in out["runs"]:
        assert r["status"] == "done"
        final = json.loads((Path(r["workdir"]) / "final_metrics.json").read_text())
        assert final["heldout/n"] == 9
        d = json.loads((Path(r["workdir"]) / "config.json").read_text())["data"]
        sub = training_subsets(source, label_map=d["labels"], label_seed=d["label_seed"],
                               val_per_class=d["val_per_class"])
        assert sorted(source.relpath(i) for i in sub.val) == sorted(pool)
    # The pool accuracies are those of the runs' own held-out evaluation (same images, same crop).
    held = sorted(json.loads((Path(r["workdir"]) / "final_metrics.json").read_text())["heldout/top1"]
                  for r in out["runs"])
    assert sorted(study["full_accuracy"]) == pytest.approx(held)
    assert (work / "val_study_small.png").stat().st_size > 10_000
    md = (work / "val_study_small.md").read_text()
    assert "| 1 | 3 |" in md and "lr0.1_wd0.001" in md

    files = [Path(r["workdir"]) / "checkpoint.pt" for r in out["runs"]]
    files += list(work.glob("*/study/logits/*.h5"))
    assert len(files) == 4
    before = _stamps(files)
    assert vs.main(argv) == 0
    assert _stamps(files) == before


def test_benchmark_runner_flags_and_ratios():
    """benchmarks/run_all.py: stale flags are dropped with their values; every ratio is collected."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "run_all", Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = run_all  # its dataclasses look their module up
    spec.loader.exec_module(run_all)
    kept, dropped = run_all.keep_known_flags(
        ("--n", "64", "--gone", "3", "--int8", "--rounds", "1"), {"--n", "--int8", "--rounds"})
    assert kept == ["--n", "64", "--int8", "--rounds", "1"] and dropped == ["--gone"]
    report = {"served_fp32": [{"concurrency": 1, "ratio_vs_raw": 0.8, "p99_over_raw_single_p50": 1.6},
                              {"concurrency": 8, "ratio_vs_raw": 0.9}],
              "results": {"sklearn_lbfgs": {"ratio": 1.0, "seconds": 3.0, "iterations": 46},
                          "sgd": {"ratio": None, "reached": False}},
              "duration_s_per_level": 4.0, "ratios": {"bf16_speedup": 0.9, "jpeg_vs_synth": 0.6},
              "targets": {"ratio_ok": True}}
    got = {r["metric"]: r["value"] for r in run_all.ratios(report)}
    assert got == {"served_fp32[c=1].ratio_vs_raw": 0.8,
                   "served_fp32[c=1].p99_over_raw_single_p50": 1.6,
                   "served_fp32[c=8].ratio_vs_raw": 0.9,
                   "results.sklearn_lbfgs.ratio": 1.0, "results.sgd.ratio": None,
                   "ratios.bf16_speedup": 0.9, "ratios.jpeg_vs_synth": 0.6}
    assert {p.stem for p in run_all.discover(None)} >= {"extract", "probe", "serve"}
