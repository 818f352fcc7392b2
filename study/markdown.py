"""The study's page (`<report>.md`), one function per section, every number read from the JSON
report."""

from __future__ import annotations

import collections
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from s4l.study.ledger import full_wall
from s4l.study.plan import Planner
from s4l.study.plots import curve_runs
from s4l.study.spec import Study
from s4l.training.paper import TABLE1 as PAPER


def _ms(vals: Sequence[float]) -> str:
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals):.2f}"


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
            out.append(f"- **Decision rule, {r['label']}** " + decision_line(
                r["test_top1"], sup["test_top1"], r["heldout_top1"], sup["heldout_top1"]))
    return out


def decision_line(test: Sequence[float], sup_test: Sequence[float], heldout: Sequence[float],
                  sup_heldout: Sequence[float], seeds: int = 3) -> str:
    """Issue 27's rule read on one method against supervised: it helps when its mean test top-1
    is higher by more than twice the standard error of the difference and its mean held-out
    top-1 is higher too. Says which way it failed when it fails, and that a reading on fewer
    than `seeds` seeds per arm is preliminary."""
    d, se = diff_se(test, sup_test)
    dh, _ = diff_se(heldout, sup_heldout)
    n = f"{len(test)} vs {len(sup_test)} seeds"
    head = f"({n}): test top-1 {d:+.2f} against 2 x SE = {2 * se:.2f}; held-out {dh:+.2f}. "
    if d > 2 * se and dh > 0:
        verdict = "It helps at this scale by the rule."
    elif d > 2 * se:
        verdict = ("It does not pass the rule: the test gain is beyond the noise but held-out "
                   "does not agree.")
    elif d < -2 * se:
        verdict = ("It does not pass the rule: it is below supervised by more than twice the "
                   "standard error, worse at this scale.")
    else:
        verdict = "It does not pass the rule: no difference beyond the noise is shown."
    if min(len(test), len(sup_test)) < seeds:
        verdict += f" Preliminary: the rule is for {seeds} seeds per arm."
    return head + verdict


def curves_section(doc: dict[str, Any], study: Study) -> list[str]:
    if not study.curve_points:
        return []
    runs = curve_runs(doc)
    out = ["\n## Learning curves\n",
           f"Every run (sweep points, every seed, the convergence runs) evaluates held-out top-1 at "
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
        final = " **final**" if r.get("final") else ""
        out.append(f"| `{r['id']}`{final} | " + " | ".join(cells) + " |")
    out.append("\nHeld-out top-1 at each of the points above (the last is the run's final "
               "evaluation).")
    return out


def _converged(ok: bool | None, held: float | None) -> str:
    """The 1-point rule's verdict, and which way a failing arm moved: still climbing (more
    training would help) or falling (the longer schedule overfits: the shorter one is past
    converging, not short of it)."""
    if ok is None:
        return "-"
    if ok:
        return "yes"
    return ("**no: held-out still climbing**" if held is not None and held > 0
            else "no by the rule: held-out falls (the longer schedule overfits)")


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
                   f"{_converged(ok, c.get('heldout_gain_when_doubling'))} |")
    return out


def header_section(doc: dict[str, Any], study: Study) -> list[str]:
    """The title, where the numbers come from, the set-up (data, schedule, sweep, stages) and the cost."""
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
        extra = doc.get("method_extra_points") or {}
        same = not own and not extra and not doc.get("method_refine_points")
        out.append(f"- sweep (seed 0, {'each method the same grid' if same else 'the grid'}): "
                   + " x ".join(f"`{k}` in {v}" for k, v in doc["sweep"].items())
                   + "".join(f"; {m}: " + ", ".join(f"`{k}` in {v} only" for k, v in g.items())
                             for m, g in own.items())
                   + "".join(f"; {m} also at " + " and ".join(
                       "(" + ", ".join(f"`{k}={v}`" for k, v in p.items()) + ")" for p in pts)
                             for m, pts in extra.items())
                   + "".join(f"; then {m}'s selected point with " + " and with ".join(
                       ", ".join(f"`{k}={v}`" for k, v in p.items()) for p in pts)
                             + " (refine: run once the points before have finished, the "
                             "selection made again over all)"
                             for m, pts in (doc.get("method_refine_points") or {}).items()))
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
    return out


def final_runs_section(doc: dict[str, Any], png: str) -> list[str]:
    """The plot, the final runs' table against the paper, and each row minus supervised."""
    out: list[str] = []
    c = doc["counts"]
    staged = any(r.get("earlier_stages") for r in doc["summary"])
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
    return out


def beside_section(doc: dict[str, Any]) -> list[str]:
    """This study's methods beside an earlier study's (`[beside]`): schedule, passes, both
    readings and each study's difference to its own supervised arm."""
    b = doc.get("beside")
    if not b:
        return []
    out = [f"\n## Beside {b['label']}\n"]
    if b.get("error"):
        return out + [f"The earlier report `{b['report']}` could not be read ({b['error']}).\n"]
    out += [f"The methods both studies ran, from `{b['report']}` and this page's JSON. Mean ± "
            "standard deviation over seeds; Δ: minus the same study's supervised mean, ± its "
            "standard error.\n",
            "| method | study | labelled epochs | steps | unlabelled passes | test top-1 | "
            "test top-1 rot.-averaged | held-out top-1 | Δ test top-1 |",
            "|---|---|---|---|---|---|---|---|---|"]
    sup = next((m for m in b["methods"] if m["method"] == "supervised"), None)
    for m in b["methods"]:
        for which, name in (("earlier", b.get("study") or "earlier"), ("this", doc["study"])):
            arm = m[which]
            if arm is None:
                out.append(f"| {m['earlier']['label']} | {name} | pending | | | | | | |")
                continue
            ref = sup and sup[which]
            delta = "-"
            if ref and m is not sup and ref["test_top1"]:
                d, se = diff_se(arm["test_top1"], ref["test_top1"])
                delta = f"{d:+.2f}" + (f" ± {se:.2f}" if se is not None else "")
            epochs = arm.get("labelled_epochs")
            out.append(f"| {arm['label']} | {name} | {_num(epochs, 0)} | "
                       f"{arm.get('steps') or '-'} | {_num(arm.get('unlabelled_passes'), 2)} | "
                       f"{_ms(arm['test_top1'])} | {_ms(arm['test_top1_rotation_averaged'])} | "
                       f"{_ms(arm['heldout_top1'])} | {delta} |")
    return out


def orderings_section(doc: dict[str, Any]) -> list[str]:
    """Which of the paper's orderings hold here."""
    out: list[str] = []
    reading = orderings(doc["summary"])
    if reading:
        out.append("\n## Which of the paper's orderings hold here\n")
        out.extend(f"- {line}" for line in reading)
    return out


def sweep_section(doc: dict[str, Any]) -> list[str]:
    """Every sweep point's held-out and test top-1, the selected one marked."""
    out: list[str] = []
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
    return out


def diagnosis_section(doc: dict[str, Any], study: Study) -> list[str]:
    """The diagnosis steps and analyses, each against its reference run."""
    out: list[str] = []
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
    return out


def transfer_section(doc: dict[str, Any], study: Study) -> list[str]:
    """The transfer probes' table and plot."""
    out: list[str] = []
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
    return out


def runs_section(doc: dict[str, Any]) -> list[str]:
    """Every run, retrains, the wall-time note and what did not finish."""
    out: list[str] = []
    out.append("\n## Every run\n")
    out.append("| run | labelled epochs | steps | images | wall | held-out top-1 | test top-1 | "
               "test top-5 | final |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for r in doc["runs"]:
        w = full_wall(r)
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
    return out


def markdown(doc: dict[str, Any], study: Study, png: str) -> str:
    """The whole page, section by section."""
    out = [*header_section(doc, study), *final_runs_section(doc, png), *beside_section(doc),
           *readings_section(doc, study), *orderings_section(doc),
           *convergence_section(doc.get("convergence")), *curves_section(doc, study),
           *sweep_section(doc), *diagnosis_section(doc, study),
           *transfer_section(doc, study), *runs_section(doc)]
    return "\n".join(out) + "\n"
