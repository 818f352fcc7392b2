"""The small-scale reproductions end to end: Table 1 as a study (experiments/table1_small.toml,
`s4l study`) and experiments/val_study_small.py.

Tiny configurations on a generated 3-class image folder: the presets' -smoke variants, the smoke
budget of 128 forwarded images per run, 1 seed. Table 1 is a tiny study file with the structure
of experiments/table1_small.toml (its `[set]` table and its rows' presets, pretraining stages and
teacher) and three of its rows: supervised, pseudo-labels (taught by the supervised run) and
rotation + linear (after a rotation pretraining stage). Checked: every record holds its run's own
final metrics; every run spends the same budget and the schedule arithmetic agrees with the
trainer's; the pseudo-label student is taught by the supervised run and trains on all images;
the stage's checkpoint initialises the dependent run; a second invocation trains nothing; on a
machine with only the ledger, a dependency whose checkpoint a run needs is retrained first.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import make_image_folder

from s4l import study as S

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import val_study_small as vs  # noqa: E402

TABLE1 = S.load_study(EXPERIMENTS / "table1_small.toml")
ROWS = ("supervised", "pseudo-labels", "rotation-linear")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "data", classes=("a", "b", "c"),
                             per_class=12, size=32)


def _value(v) -> str:
    return '"null"' if v is None else json.dumps(v)


def tiny_table1(data: Path, report: Path, rows=ROWS) -> str:
    """experiments/table1_small.toml at toy size: its [set] (workers 0) and the given rows."""
    sets = {**dict(TABLE1.common), "data.workers": 0}
    text = ['name = "tiny_table1"', f'data = "{data}"', "labels_per_class = 4",
            "heldout_per_class = 1", "schedule = { images = 128 }", f'report = "{report}"', "",
            "[set]", *(f'"{k}" = {_value(v)}' for k, v in sets.items())]
    for m in TABLE1.methods:
        if m.key in rows:
            text += ["", "[[method]]", f'key = "{m.key}"', f'label = "{m.label}"',
                     f'preset = "{m.preset}"']
            text += [f'{k} = "{getattr(m, k)}"' for k in ("pretrain", "teacher") if getattr(m, k)]
    return "\n".join(text) + "\n"


def _stamps(paths):
    return {str(p): p.stat().st_mtime_ns for p in paths}


@pytest.fixture(scope="module")
def table1(folder, tmp_path_factory):
    from s4l.cli import main

    tmp = tmp_path_factory.mktemp("t1")
    path, work, report = tmp / "tiny.toml", tmp / "work", tmp / "docs" / "tiny"
    path.write_text(tiny_table1(folder, report))
    argv = ["study", str(path), "--smoke", "--workdir", str(work), "--report", str(report)]
    assert main(argv) == 0
    return {"argv": argv, "work": work, "report": report,
            "doc": json.loads(report.with_suffix(".json").read_text())}


def test_table1_records_hold_each_runs_own_metrics_and_the_budget(table1):
    doc, work = table1["doc"], table1["work"]
    runs = {r["id"]: r for r in doc["runs"]}
    assert set(runs) == {"final/supervised/seed0", "final/pseudo-labels/seed0",
                         "stage/cifar10-rotation-pretrain/seed0", "final/rotation-linear/seed0"}
    budget = doc["schedule"]["images"]
    assert budget == 128  # --smoke
    for rid, r in runs.items():
        final = json.loads((work / rid / "final_metrics.json").read_text())
        assert final["step"] == r["steps"]
        assert r["images"] == r["steps"] * r["images_per_step"]
        assert budget - r["images_per_step"] < r["images"] <= budget, rid
        if r["role"] == "stage":
            continue
        assert r["test_top1"] == pytest.approx(final["eval/top1"], abs=1e-4)  # 4 decimals
        assert r["test_top5"] is None and "eval/top3" in final  # 3 classes: top-3 only
        assert r["heldout_top1"] == pytest.approx(final["heldout/top1"], abs=1e-4)
    rows = {s["method"]: s for s in doc["summary"]}
    assert list(rows) == list(ROWS)
    assert rows["supervised"]["test_top1"] == [runs["final/supervised/seed0"]["test_top1"]]
    assert rows["supervised"]["paper"]["top5_10"] == 80.43
    assert rows["rotation-linear"]["earlier_stages"] == ["stage/cifar10-rotation-pretrain"]
    assert rows["rotation-linear"]["earlier_stage_images"] == \
        runs["stage/cifar10-rotation-pretrain/seed0"]["images"]
    md = table1["report"].with_suffix(".md").read_text()
    assert "| Supervised baseline | 1/1 | preset |" in md and "earlier stage" in md
    assert table1["report"].with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table1_student_is_taught_by_the_supervised_run_and_stage_initialises(table1):
    from s4l.provenance import file_sha256
    from s4l.training.checkpoint import read_checkpoint

    doc, work = table1["doc"], table1["work"]
    runs = {r["id"]: r for r in doc["runs"]}
    teacher = (work / "final" / "supervised" / "seed0" / "checkpoint.pt").resolve()
    cfg = json.loads((work / "final/pseudo-labels/seed0/config.json").read_text())["data"]
    assert cfg["labels"] is None and cfg["labels_per_class"] is None  # all images, no label file
    prov = json.loads(Path(cfg["pseudo_labels"]).read_text())["provenance"]
    assert prov["teacher_checkpoint"] == str(teacher)
    assert prov["teacher_sha256"] == file_sha256(teacher)
    assert runs["final/pseudo-labels/seed0"]["deps"] == {
        "final/supervised/seed0": runs["final/supervised/seed0"]["hash"]}
    # Ground truth where labelled: the study's label file, the one the teacher trained on.
    assert prov["label_file_sha256"] == doc["label_file_sha256"]
    sup = json.loads((work / "final/supervised/seed0/config.json").read_text())["data"]
    assert sup["labels"] == doc["label_file"]

    stage = (work / "stage" / "cifar10-rotation-pretrain" / "seed0" / "checkpoint.pt").resolve()
    lin = json.loads((work / "final/rotation-linear/seed0/config.json").read_text())
    assert Path(lin["init"]["checkpoint"]).resolve() == stage
    init = read_checkpoint(work / "final/rotation-linear/seed0/checkpoint.pt")["provenance"]["init"]
    assert init["checkpoint"] == str(stage) and init["sha256"] == file_sha256(stage)
    # The stage reads the label file too, so its held-out split is every other run's.
    scfg = json.loads((work / "stage/cifar10-rotation-pretrain/seed0/config.json").read_text())
    assert scfg["data"]["labels"] == doc["label_file"]


def test_table1_rerun_trains_nothing_and_a_missing_stage_is_retrained(table1, capsys):
    from s4l.cli import main

    work, report = table1["work"], table1["report"]
    files = sorted(work.glob("**/checkpoint.pt")) + sorted(work.glob("pseudo_labels/*.json"))
    assert len(files) == 5
    before = _stamps(files)
    assert main(table1["argv"]) == 0
    assert _stamps(files) == before
    # A fresh machine with only the ledger: nothing is retrained while nothing needs it.
    shutil.rmtree(work)
    capsys.readouterr()
    assert main([*table1["argv"], "--dry-run"]) == 0
    assert "todo" not in capsys.readouterr().out
    assert main(table1["argv"]) == 0
    assert not list(work.glob("**/checkpoint.pt"))
    # Drop rotation-linear's record: it needs the stage's checkpoint, absent here, so the stage
    # is retrained first (--only names the row; its stage comes with it); nothing else runs.
    doc = json.loads(report.with_suffix(".json").read_text())
    doc["runs"] = [r for r in doc["runs"] if r["id"] != "final/rotation-linear/seed0"]
    report.with_suffix(".json").write_text(json.dumps(doc))
    assert main([*table1["argv"], "--only", "rotation-linear"]) == 0
    trained = sorted(str(p.relative_to(work)) for p in work.glob("**/checkpoint.pt"))
    assert trained == ["final/rotation-linear/seed0/checkpoint.pt",
                       "stage/cifar10-rotation-pretrain/seed0/checkpoint.pt"]
    again = {r["id"]: r for r in json.loads(report.with_suffix(".json").read_text())["runs"]}
    assert set(again) == {r["id"] for r in table1["doc"]["runs"]}


def test_table1_plan_budget_matches_the_trainer(folder, tmp_path):
    """Every row of the real study, planned at toy size: the same budget for every run, and the
    steps the study plans are the steps the trainer runs."""
    from s4l.training.objectives import build_objective
    from s4l.training.trainer import make_plan

    budget = 384
    study = dataclasses.replace(TABLE1, data=str(folder), labels_per_class=4, heldout_per_class=1,
                                label_file=None, schedule={"images": budget})
    planner = S.Planner(study, str(folder), tmp_path / "w", {}, smoke=True)
    plan = planner.build()
    seeds = {m.key: sorted(r.seed for r in plan if r.method == m.key) for m in TABLE1.methods}
    assert seeds == {m.key: list(range(m.seeds)) for m in TABLE1.methods}
    assert seeds["supervised"] == seeds["s4l-rotation"] == [0, 1, 2] and seeds["vat"] == [0]
    assert sorted(r.id for r in plan if r.role == "stage") == [
        "stage/cifar10-exemplar-pretrain/seed0", "stage/cifar10-rotation-pretrain/seed0"]
    counts = planner.counts
    assert counts == {"labelled": 12, "train": 33, "heldout": 3, "classes": 3}
    ids = [r.id for r in plan]
    for run in plan:
        b = run.budget
        assert budget - b["images_per_step"] < b["images"] <= budget, run.id
        assert run.config.optim.total_steps == b["steps"]
        obj = build_objective(run.config.objective.name,
                              run.config.objective.objective_config(), 3)
        n_lab = counts["train"] if run.config.data.pseudo_labels else counts["labelled"]
        p = make_plan(run.config, obj, n_lab, counts["train"], 1)
        assert p.total_steps == b["steps"], run.id
        # The schedule (in the trainer's epochs) ends exactly at the last step, so every LR decay
        # of the preset happens within the budget.
        assert p.steps_per_epoch == b["steps_per_epoch"], run.id
        assert round(run.config.optim.total_epochs * p.steps_per_epoch) == b["steps"], run.id
        assert max(run.config.optim.decay_epochs) < run.config.optim.total_epochs
        assert p.eval_every >= p.total_steps  # the test split is evaluated only at the end
        assert all(ids.index(d) < ids.index(run.id) for d in run.deps)  # dependencies first
    s4l = next(r for r in plan if r.method == "s4l-rotation")
    assert s4l.budget["images_per_step"] == 4 * (s4l.budget["labelled_batch"] +
                                                 s4l.budget["unlabelled_batch"])
    student = planner.runs["final/pseudo-labels/seed0"]
    assert student.deps == ["final/supervised/seed0"] and student.config.data.labels is None


def test_swept_and_diagnosed_runs_of_a_staged_method_start_from_the_stage(folder, tmp_path):
    """A sweep, a convergence run and a diagnosis of a method with a pretraining stage all start
    from the stage; a student waits for its teacher's selection."""
    methods = {m.key: m for m in TABLE1.methods}
    study = dataclasses.replace(
        TABLE1, data=str(folder), labels_per_class=4, heldout_per_class=1, label_file=None,
        schedule={"images": 128}, sweep=(("optim.lr", (0.01, 0.1)),),
        methods=(methods["supervised"], methods["rotation-linear"],
                 dataclasses.replace(methods["pseudo-labels"], sweep=False)),
        convergence={"methods": ["rotation-linear"], "factor": 2},
        diagnosis=(S.Diagnosis("d", "rotation-linear", "d", set=(("optim.momentum", 0.5),)),))
    planner = S.Planner(study, str(folder), tmp_path / "w", {}, smoke=True)
    plan = {r.id: r for r in planner.build()}
    stage = "stage/cifar10-rotation-pretrain/seed0"
    staged = [r for r in plan.values() if r.method == "rotation-linear"]
    assert {r.role for r in staged} == {"sweep", "final", "convergence", "diagnosis"}
    for r in staged:
        assert r.deps == [stage], r.id
        assert r.config.init.checkpoint == str(plan[stage].workdir / "checkpoint.pt")
    student = plan["final/pseudo-labels/seed0"]
    assert student.pending and student.deps == ["final/supervised/seed0"]  # sweep unfinished


def test_the_table1_study_file_and_the_paper_numbers():
    from s4l.datasets import read_label_map
    from s4l.provenance import file_sha256
    from s4l.training.presets import ROWS as PRESET_ROWS

    assert [m.key for m in TABLE1.methods] == list(S.PAPER)
    assert TABLE1.schedule == {"images": 100000} and not TABLE1.sweep
    assert TABLE1.heldout_per_class == 10 and TABLE1.labels_per_class == 400
    assert dict(TABLE1.common) == {"model.stem": "small-s2", "bn.ghost_batch": None,
                                   "channels_last": True, "data.workers": 1}
    # The label file is the draw the old script made (its results name this sha256).
    assert file_sha256(TABLE1.label_file).startswith("ee673acdd1fe")
    names = read_label_map(TABLE1.label_file)
    assert len(names) == 4000 and {sum(n.startswith(c + "/") for n in names)
                                   for c in {n.split("/")[0] for n in names}} == {400}
    number = {r.name: r.number for r in PRESET_ROWS}
    for m in TABLE1.methods:
        row = m.preset.removeprefix("cifar10-")
        for col in ("10", "1"):
            assert number[row.replace("10pct", f"{col}pct")] == \
                f"top-5 {S.PAPER[m.key][f'top5_{col}']:.2f}"


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
        assert r["budget"]["images"] <= 64  # 128 x --budget-scale 0.5
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
    found = {p.stem for p in run_all.discover(None)}
    assert found >= {"extract", "probe", "serve"}
    assert "_report" not in found  # the scripts' shared helper is not a benchmark


def test_benchmark_reports_name_their_machine(tmp_path, capsys):
    """benchmarks/_report.py: the host block every report carries, and the JSON it writes
    (numpy scalars included, folders made)."""
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location(
        "_report", Path(__file__).resolve().parents[1] / "benchmarks" / "_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    host = report.host(cpus_usable=1, engine="x")
    assert host["cpus_usable"] == 1 and host["engine"] == "x"  # extra fields override
    assert host["cpu_model"] and host["python"] and len(host["loadavg"]) == 3
    out = report.write_report(tmp_path / "a" / "b.json", {"ratio": np.float32(0.5), "host": host})
    assert json.loads(out.read_text()) == {"ratio": 0.5, "host": host}
    assert f"wrote {out}" in capsys.readouterr().out
