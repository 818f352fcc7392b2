"""Run every benchmark under benchmarks/, collect their JSON, write docs/benchmarks.md.

Each benchmark script (``benchmarks/*.py`` other than this one) measures its subject against a
reference measured IN THE SAME RUN (GUIDE.md section 5: these machines are shared and noisy) and
writes a JSON report. This runner

- finds the scripts, reads each one's flags from its ``--help`` (so a renamed or removed flag is
  dropped with a warning instead of crashing the run),
- runs them one after the other in subprocesses, each with its own ``--out`` in the results folder,
- ``--quick``: small sizes (minutes in total on 2 CPU cores); default: each script's full default
  sizes (the issues' targets; tens of minutes to hours on 2 CPU cores),
- collects every ratio the reports hold (any numeric field whose name says ``ratio``, ``_over_``
  or ``speedup``) and writes ``docs/benchmarks.md``: per benchmark its command, exit status, wall
  time and ratios, plus the machine (CPU model, cores, GPU if any), the date and the git commit.

    .venv/bin/python benchmarks/run_all.py --quick            # a few minutes, small sizes
    .venv/bin/python benchmarks/run_all.py                    # full sizes (long)
    .venv/bin/python benchmarks/run_all.py --quick --only probe,extract

A script the runner does not know is run with ``--quick`` in quick mode if it has that flag (and
skipped otherwise), and with no arguments in full mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
log = logging.getLogger("bench.run_all")


@dataclasses.dataclass(frozen=True)
class Known:
    """What the runner knows about a benchmark script: its quick / full arguments, the reference
    its ratios are against (for the docs), and a time limit."""

    quick: tuple[str, ...]
    full: tuple[str, ...] = ()
    reference: str = ""
    full_cpu: tuple[str, ...] | None = None  # full-mode arguments when no GPU is present
    timeout_quick_s: int = 900
    timeout_full_s: int = 6 * 3600


KNOWN: dict[str, Known] = {
    "train_throughput": Known(
        quick=("--size", "64", "--width", "0.25", "--batch", "16", "--steps", "3", "--warmup", "1"),
        # Without a GPU: the CPU table's network (experiments/table1_small.toml), not width 1 at 224.
        full_cpu=("--size", "32", "--width", "0.25", "--batch", "64", "--stem", "small-s2",
                  "--channels-last", "--steps", "10", "--warmup", "2"),
        reference="the same run's supervised fp32 step on synthetic tensors: S4L-Rotation vs "
                  "supervised cost per image, bf16 vs fp32, real JPEG loading vs synthetic"),
    "extract": Known(
        quick=("--n", "64", "--rounds", "1", "--width", "0.25", "--batch-size", "16"),
        full=("--rounds", "1"),
        reference="the raw model on the same already-preprocessed batches (images/s), measured "
                  "before and after each end-to-end run; target >= 0.9"),
    "probe": Known(
        quick=("--n", "4000", "--dim", "512", "--classes", "20", "--max-epochs", "10"),
        # Without a GPU: 30,000 of the evaluation issue's 100,000 rows, so the page fits ~10 minutes.
        full_cpu=("--n", "30000"),
        reference="scikit-learn L-BFGS's time to fit (the ratio is the SGD variant's time to reach "
                  "its top-1 minus 1 point; < 1 = faster; null = not reached)"),
    "serve": Known(
        quick=("--duration", "4", "--rounds", "1", "--concurrency", "1,8", "--images", "16",
               "--stall-seconds", "2"),
        full=("--int8", "--duration", "10"),
        reference="the raw onnxruntime session on the same crops, in alternating windows "
                  "(targets: >= 0.85x raw throughput at concurrency >= 8, p99 <= 1.3x raw p50 at 1)"),
    "heads": Known(
        quick=("--duration", "3", "--windows", "2"),
        reference="/classify with one 205-class head on the same server and images, in "
                  "alternating windows (target: 4 heads < 1.05x one head per image)"),
    "backends": Known(
        quick=("--width", "0.25", "--duration", "2", "--rounds", "1", "--concurrency", "1,8",
               "--images", "16", "--extract-n", "32", "--calibration-images", "16",
               "--heldout-images", "16"),
        full=("--duration", "12", "--rounds", "2"),
        reference="raw onnxruntime fp32 on the same crops (batch 8), in alternating windows, for "
                  "each engine raw, served /embed at 1/8/32 clients and s4l extract (targets on a "
                  "bf16 CPU: served OpenVINO bf16 >= 1.8x at 8 clients, int8 on the faster "
                  "backend >= 3.5x)"),
    "protocols": Known(
        quick=("--images", "4", "--duration", "8", "--rounds", "2"),
        reference="/embed multipart on the same images and server, requests interleaved one by one "
                  "(target: a binary Open Inference Protocol v2 request >= 0.95x; JSON UINT8 data "
                  "may be slower, by the ratio shown)"),
    "search": Known(
        quick=("--rows", "20000", "--windows", "1"),
        reference="a bare numpy float32 q @ M.T over the same unit rows, in alternating windows "
                  "(Gallery.search queries/s over matmul queries/s; target >= 0.8); RSS per row"),
}
# docs/benchmarks.md below this line is written by hand (tables with context a JSON report does
# not carry) and kept when the runner rewrites the generated part above it.
KEEP_MARKER = "<!-- hand-written below: kept by benchmarks/run_all.py -->"


def write_doc(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    if KEEP_MARKER in old:
        text = text.rstrip("\n") + "\n\n" + old[old.index(KEEP_MARKER):]
    path.write_text(text)


# Field names that hold a ratio ("iterations" and "duration" contain "ratio" but are not one).
RATIO_KEY = re.compile(r"(?:^|_)ratios?(?:_|$)|_over_|_vs_|speedup", re.I)


# ============================================================================ discovery, flags


def discover(only: list[str] | None) -> list[Path]:
    scripts = sorted(p for p in HERE.glob("*.py")
                     if p.name != Path(__file__).name and not p.name.startswith("_"))
    if only:
        names = {p.stem for p in scripts}
        missing = [n for n in only if n not in names]
        if missing:
            raise SystemExit(f"no benchmark script(s) {missing} in {HERE}; present: {sorted(names)}")
        scripts = [p for p in scripts if p.stem in only]
    return scripts


def script_flags(script: Path) -> set[str] | None:
    """The long options a script's --help lists (None if --help fails)."""
    try:
        r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                           timeout=120, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        return None
    if r.returncode != 0:
        return None
    return set(re.findall(r"(?<![\w-])(--[a-zA-Z][\w-]*)", r.stdout))


def keep_known_flags(args: tuple[str, ...], flags: set[str]) -> tuple[list[str], list[str]]:
    """Drop options the script no longer has (with their values); return (kept, dropped)."""
    kept, dropped, i = [], [], 0
    while i < len(args):
        a = args[i]
        has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        if a.startswith("--") and a.split("=", 1)[0] not in flags:
            dropped.append(a)
            i += 2 if has_value else 1
            continue
        kept.append(a)
        if has_value:
            kept.append(args[i + 1])
            i += 1
        i += 1
    return kept, dropped


# ============================================================================ running


def run_one(script: Path, quick: bool, out_dir: Path, env: dict[str, str],
            gpu: bool = False) -> dict[str, Any]:
    """Run one benchmark; return its record (command, status, wall time, report, ratios)."""
    name = script.stem
    known = KNOWN.get(name)
    flags = script_flags(script)
    rec: dict[str, Any] = {"name": name, "script": str(script.relative_to(ROOT)),
                           "reference": known.reference if known else None}
    if flags is None:
        rec.update(status="error", error=f"{script.name} --help failed")
        return rec
    if known:
        full = known.full if gpu or known.full_cpu is None else known.full_cpu
        args, dropped = keep_known_flags(known.quick if quick else full, flags)
        if dropped:
            log.warning("%s: the script has no %s any more; running without", name, dropped)
            rec["dropped_flags"] = dropped
            if quick and "--quick" in dropped:  # its full sizes could take hours: do not guess
                rec.update(status="skipped", error="the script has no --quick flag")
                return rec
    elif quick and "--quick" not in flags:
        rec.update(status="skipped", error="unknown to the runner and has no --quick flag")
        return rec
    else:
        args = ["--quick"] if quick else []
    out = out_dir / f"{name}.json"
    if "--out" in flags:  # relative to the repository root (the subprocess's cwd) when inside it
        args += ["--out", os.path.relpath(out, ROOT) if out.is_relative_to(ROOT) else str(out)]
    cmd = [sys.executable, str(script.relative_to(ROOT)), *args]
    rec["command"] = " ".join(shlex.quote(c) for c in [".venv/bin/python", *cmd[1:]])
    timeout = (known.timeout_quick_s if quick else known.timeout_full_s) if known else \
        (900 if quick else 6 * 3600)
    log.info("running %s", rec["command"])
    t0 = time.time()
    started = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                           check=False)
        rec["exit_code"] = r.returncode
        tail = (r.stdout + "\n" + r.stderr).strip().splitlines()[-15:]
        rec["output_tail"] = tail
        rec["status"] = "ok" if r.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        rec.update(status="timeout", error=f"exceeded {timeout} s")
    rec["wall_s"] = round(time.time() - t0, 1)
    # The report: --out if the script takes it, else its default file if written during this run.
    report_path = out if "--out" in flags else HERE / "results" / f"{name}.json"
    if report_path.exists() and report_path.stat().st_mtime >= started - 1:
        try:
            rec["report"] = json.loads(report_path.read_text())
            rec["report_path"] = str(report_path.relative_to(ROOT)
                                     if report_path.is_relative_to(ROOT) else report_path)
        except json.JSONDecodeError as e:
            rec["error"] = f"unreadable report {report_path}: {e}"
    elif rec["status"] == "ok":
        rec["status"] = "no-report"
    rec["ratios"] = ratios(rec.get("report"))
    log.info("%s: %s in %.0f s, %d ratio(s)", name, rec["status"], rec["wall_s"], len(rec["ratios"]))
    return rec


def ratios(report: Any, path: str = "", in_ratios: bool = False) -> list[dict[str, Any]]:
    """Every ratio-like numeric field (or null, for "target not reached") with its JSON path:
    a field whose name says so, or any number inside a dict called "ratios"."""
    out: list[dict[str, Any]] = []
    if isinstance(report, dict):
        for k, v in report.items():
            p = f"{path}.{k}" if path else str(k)
            if isinstance(v, dict):
                out.extend(ratios(v, p, in_ratios=str(k).lower() == "ratios"))
            elif (in_ratios or RATIO_KEY.search(str(k))) and not isinstance(v, bool) \
                    and (v is None or isinstance(v, (int, float))):
                out.append({"metric": p, "value": v})
            else:
                out.extend(ratios(v, p))
    elif isinstance(report, list):
        for i, v in enumerate(report):
            label = v.get("concurrency", i) if isinstance(v, dict) else i
            key = f"c={label}" if isinstance(v, dict) and "concurrency" in v else str(i)
            if isinstance(v, (dict, list)):
                out.extend(ratios(v, f"{path}[{key}]"))
    return out


# ============================================================================ provenance, docs


def machine_info() -> dict[str, Any]:
    from s4l.provenance import machine_info as info

    m = info()
    m["loadavg_before"] = m.pop("loadavg", None) or [0.0, 0.0, 0.0]
    return m


def git_info() -> dict[str, Any]:
    from s4l.provenance import git_commit

    return git_commit(ROOT)


def _fmt(v: Any) -> str:
    if v is None:
        return "null (not reached)"
    return f"{v:.3f}"


def render(summary: dict[str, Any]) -> str:
    m, g = summary["machine"], summary["git"]
    lines = [
        "# Benchmarks",
        "",
        f"Written by `benchmarks/run_all.py` on {summary['date']} "
        f"({'QUICK mode: small sizes, indicative only' if summary['quick'] else 'full mode'}):",
        "",
        f"    {summary['command']}",
        "",
        f"- machine: {m['cpu']}, {m['cores_usable']} usable / {m['cores_logical']} logical cores"
        + (f", {m['memory_gib']} GiB" if "memory_gib" in m else "")
        + f", GPU: {', '.join(m['gpu']) if m['gpu'] else 'none'}; {m['os']}, Python {m['python']}",
        f"- load average before / after: {m['loadavg_before']} / {summary['loadavg_after']} "
        "(shared machine: every ratio below is against a reference measured in the same run)",
        f"- git commit: `{g['commit']}`{' (with uncommitted changes)' if g['dirty'] else ''}",
        f"- total wall time: {summary['wall_s']:.0f} s",
        "",
        "| benchmark | status | wall | ratios (value: subject / reference) |",
        "|---|---|---|---|",
    ]
    for b in summary["benchmarks"]:
        head = ", ".join(f"{r['metric']} {_fmt(r['value'])}" for r in b.get("ratios", [])[:4])
        more = len(b.get("ratios", [])) - 4
        lines.append(f"| {b['name']} | {b['status']} | {b.get('wall_s', 0):.0f} s | "
                     f"{head or '-'}{f' (+{more} more)' if more > 0 else ''} |")
    for b in summary["benchmarks"]:
        lines += ["", f"## {b['name']}", ""]
        if b.get("command"):
            lines += ["    " + b["command"], ""]
        if b.get("reference"):
            lines.append(f"Reference: {b['reference']}.")
        what = (b.get("report") or {}).get("what")
        if what:
            lines.append(f"Measures: {what}.")
        lines.append(f"Status: {b['status']}" + (f" ({b['error']})" if b.get("error") else "")
                     + (f"; flags dropped: {b['dropped_flags']}" if b.get("dropped_flags") else "")
                     + (f"; report `{b['report_path']}`" if b.get("report_path") else "") + ".")
        if b.get("ratios"):
            lines += ["", "| metric | ratio |", "|---|---|"]
            lines += [f"| `{r['metric']}` | {_fmt(r['value'])} |" for r in b["ratios"]]
        if b["status"] not in ("ok", "skipped") and b.get("output_tail"):
            lines += ["", "Last output lines:", "", "```", *b["output_tail"], "```"]
    lines.append("")
    return "\n".join(lines)


# ============================================================================ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small sizes: minutes in total on 2 CPU cores (default: full sizes)")
    ap.add_argument("--only", default=None, help="comma-separated benchmark names (script stems)")
    ap.add_argument("--results-dir", default=None,
                    help="where the JSON reports go (default benchmarks/results/run_all-quick or "
                    "-full)")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"),
                    help="the markdown summary to write (default docs/benchmarks.md)")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and their commands")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite the markdown from the results folder's summary.json, run nothing")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.render_only:
        mode = "quick" if args.quick else "full"
        path = Path(args.results_dir or HERE / "results" / f"run_all-{mode}") / "summary.json"
        summary = json.loads(path.read_text())
        for b in summary["benchmarks"]:
            b["ratios"] = ratios(b.get("report"))
        path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        write_doc(Path(args.doc), render(summary))
        log.info("re-rendered %s from %s", args.doc, path)
        return 0
    scripts = discover([s.strip() for s in args.only.split(",")] if args.only else None)
    if args.list:
        gpu = bool(machine_info().get("gpu"))
        for s in scripts:
            k = KNOWN.get(s.stem)
            full = (k.full if gpu or k.full_cpu is None else k.full_cpu) if k else ()
            a = (k.quick if args.quick else full) if k else (("--quick",) if args.quick else ())
            print(f"{s.stem:18s} python {s.relative_to(ROOT)} {' '.join(a)}"
                  + ("" if k else "   (unknown to the runner)"))
        return 0
    mode = "quick" if args.quick else "full"
    out_dir = Path(args.results_dir or HERE / "results" / f"run_all-{mode}")
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    command = ".venv/bin/python benchmarks/run_all.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    machine = machine_info()
    if machine["loadavg_before"][0] > 3:
        log.warning("load average %.1f: other work is running; absolute numbers will be low, "
                    "the same-run ratios less so", machine["loadavg_before"][0])
    t0 = time.time()
    records = [run_one(s, args.quick, out_dir, env, gpu=bool(machine.get("gpu")))
               for s in scripts]
    summary = {
        "kind": "s4l-benchmarks", "quick": args.quick, "command": command,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine, "git": git_info(),
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.time() - t0, 1), "benchmarks": records,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    write_doc(Path(args.doc), render(summary))
    log.info("wrote %s and %s", args.doc, out_dir / "summary.json")
    bad = [b["name"] for b in records if b["status"] not in ("ok", "skipped")]
    if bad:
        log.error("did not complete: %s", bad)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
