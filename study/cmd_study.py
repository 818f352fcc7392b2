"""`s4l study CONFIG.toml`: parse the arguments, load the study file, run it (GUIDE.md habit 8).

Defaults never depend on where s4l is installed: the workdir `runs/<name>`, the park folder
`parked/<name>` and a relative `report` of the study file resolve against the current working
directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from s4l.study.park import default_park_dir
from s4l.study.runner import run_study
from s4l.study.spec import load_study

HELP = "run a declarative study of training runs (sweep, seeds, diagnosis) and write its report"

# ---------------------------------------------------------------------------- the command


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="the study file (TOML), e.g. experiments/table1_protocol.toml")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its cost, run nothing")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report (JSON, page, plot) from the recorded runs, train nothing")
    p.add_argument("--workdir", default=None, help="where the runs live (default runs/<name>)")
    p.add_argument("--report", default=None,
                   help="report path without suffix (default: the study's `report`)")
    p.add_argument("--only", default=None,
                   help="comma-separated methods to run now (and the stages / teachers they need)")
    p.add_argument("--smoke", action="store_true",
                   help="the presets' -smoke variants (tiny nets; builtin:digits for cifar10): "
                        "the plumbing in seconds, not results")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run (changes every run's identity)")
    p.add_argument("--park", action="store_true",
                   help="copy every unfinished run's checkpoint and curve to the park folder "
                        "(for another machine to resume from), train nothing")
    p.add_argument("--park-wait", type=float, default=600.0, metavar="SECONDS",
                   help="with --park: first ask a study running on this work folder for a "
                        "checkpoint now (SIGUSR1; it saves at its next logging step) and wait "
                        "this long for it; 0 parks the checkpoints on disk as they are")
    p.add_argument("--park-dir", default=None,
                   help="the park folder (default parked/<name>); every training start restores "
                        "what is parked there and further on than the work folder")
    p.add_argument("--progress", action="store_true", help="progress bars")


def main(args: argparse.Namespace) -> int:
    study = load_study(args.study)
    if args.smoke:
        key = next(iter(study.schedule))
        study = dataclasses.replace(study, schedule={key: 2 if key == "labelled_epochs" else 128},
                                    labels_per_class=min(study.labels_per_class or 5, 5),
                                    heldout_per_class=min(study.heldout_per_class, 2),
                                    stage_schedule=study.stage_schedule and {"images": 128})
    # Relative to the current directory (the checkout, as the docs run it), never to where
    # s4l is installed.
    work = Path(args.workdir).absolute() if args.workdir else \
        Path.cwd() / "runs" / (study.name + ("-smoke" if args.smoke else ""))
    report = Path(args.report) if args.report else (
        work / "report" if args.smoke else Path(study.report))
    if not report.is_absolute() and not args.report:
        report = Path.cwd() / report
    park_dir = Path(args.park_dir).absolute() if args.park_dir else \
        default_park_dir(study.name + ("-smoke" if args.smoke else ""))
    work.mkdir(parents=True, exist_ok=True)
    report.parent.mkdir(parents=True, exist_ok=True)
    only = [x for x in (args.only or "").split(",") if x]
    command = "s4l study " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
        if sys.argv[1:2] == ["study"] else ""
    return run_study(study, workdir=work, report=report, smoke=args.smoke,
                     overrides=args.overrides, only=only, dry_run=args.dry_run,
                     report_only=args.report_only, park_dir=park_dir, park_now=args.park,
                     park_wait=args.park_wait,
                     progress=args.progress, command=command)

