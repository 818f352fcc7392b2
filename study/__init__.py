"""Multi-run studies: a study file -> plan -> runs -> ledger -> report (`s4l study`).

The fourth part, above training/ and evaluation/ (docs/architecture.md): planning is pure and
unit-tested; running calls library functions, never the CLI. One module per concern:
`spec` (the study file), `plan` (runs, identities, selection), `ledger` (finished runs),
`runner` (what to train next, training, analyses), `lock` (one study process per work
folder), `park` (unfinished runs carried to another machine), `analyses` (BN recompute, transfer), `cost`
(rates, estimates, the dry-run table), `report` (the JSON), `markdown` (the page), `plots`,
`cmd_study` (the command).

The names below are the study's public API (`from s4l import study as S; S.load_study(...)`).
"""

from s4l.study.cost import DEFAULT_RATE, OBJECTIVE_OF, plan_cost, print_plan, rates
from s4l.study.ledger import curve_of, full_wall, load_ledger, now, record_of
from s4l.study.markdown import diff_se, markdown
from s4l.study.plan import Planner, Run, portable_hash, resolve_data
from s4l.study.report import summary, write_report
from s4l.study.runner import execute, next_run, run_study
from s4l.study.spec import Diagnosis, Method, Study, load_study
from s4l.training.paper import TABLE1 as PAPER

__all__ = [
    "DEFAULT_RATE", "OBJECTIVE_OF", "PAPER", "Diagnosis", "Method", "Planner", "Run", "Study",
    "curve_of", "diff_se", "execute", "full_wall", "load_ledger", "load_study", "markdown",
    "next_run", "now", "plan_cost", "portable_hash", "print_plan", "rates", "record_of",
    "resolve_data", "run_study", "summary", "write_report",
]
