"""`s4l study --park`: an unfinished run carried to another machine and finished there.

The user's path, as docs/reproducing.md writes it: a real `s4l study` process is SIGKILLed mid-run
(a machine that goes away), `--park` copies the run's state to a park folder, the work folder is
deleted, and `s4l study` in another work folder (another path: its label file's path differs)
restores the parked run and finishes it. The result must be the uninterrupted run's: identical
weights and momentum, the same test number and the same learning curve, recorded as resumed at
the parked step. Damaged and stale parked copies get one clear line and are never trained from.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder

from s4l import study as S
from s4l.errors import UserError
from s4l.study.park import MANIFEST, park, unpark
from s4l.training.checkpoint import read_checkpoint

RUN = "final/s4l-rotation/seed0"
STEPS = 60
STUDY = """name = "p"
data = "{data}"
labels_per_class = 4
heldout_per_class = 2
schedule = {{ labelled_epochs = {steps} }}
curve_points = 3
report = "docs/p"

[set]
"data.workers" = 0
"bn.ghost_batch" = "null"

[[method]]
key = "s4l-rotation"
preset = "cifar10-s4l-rotation-10pct-smoke"
seeds = 1
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _study(tmp: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "s4l.cli", "study", "p.toml", *args], cwd=tmp,
                       env=_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def _steps_logged(workdir: Path) -> int:
    try:
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            pass  # a line being written
    return max(steps)


@pytest.fixture(scope="module")
def parked(tmp_path_factory):
    """The uninterrupted reference, and a run killed mid-way then parked (its work folder gone)."""
    tmp = tmp_path_factory.mktemp("park")
    data = make_image_folder(tmp / "data", classes=("a", "b", "c"), per_class=12, size=32)
    (tmp / "p.toml").write_text(STUDY.format(data=data, steps=STEPS))
    _study(tmp, "--workdir", "ref", "--report", "ref/report")

    # The study is frozen once its run has logged the chosen step; `--park` asks it for a
    # checkpoint (SIGUSR1, pending while it is stopped), it is thawed, saves at its next logging
    # step (every step for the -smoke presets; its regular checkpoints come every 6), and the
    # park takes that one. Then the machine goes (SIGKILL).
    target = random.randrange(13, 36)
    killed = tmp / "a" / RUN
    err = open(tmp / "a.err", "w")  # noqa: SIM115  (the study's log, read after it is killed)
    proc = subprocess.Popen([sys.executable, "-m", "s4l.cli", "study", "p.toml",
                             "--workdir", "a"], cwd=tmp, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 300
    while _steps_logged(killed) < target:
        assert proc.poll() is None, "the study ended before the chosen step"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGSTOP)
    time.sleep(0.2)  # a checkpoint being renamed into place has landed
    scheduled = read_checkpoint(killed / "checkpoint.pt")["step"]
    parker = subprocess.Popen([sys.executable, "-m", "s4l.cli", "study", "p.toml", "--workdir",
                               "a", "--park", "--park-wait", "120"], cwd=tmp, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = parker.stdout.readline()
    proc.send_signal(signal.SIGCONT)
    rest, perr = parker.communicate(timeout=300)
    assert parker.returncode == 0, perr[-3000:]
    assert proc.poll() is None, "SIGUSR1 ended the study"  # it handles the request, lives on
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    err.close()
    assert first.startswith(f"asked the running study (pid {proc.pid}) for a checkpoint"), first
    assert "the running study wrote a checkpoint after" in rest, rest
    # The study went on after the park (as a machine does until it goes): the parked step is
    # the one the manifest names, not the work folder's last.
    at = json.loads((tmp / "parked" / "p" / RUN / MANIFEST).read_text())["step"]
    # A checkpoint newer than the scheduled one on disk when the park was asked for (the
    # requested one, or a scheduled one that came first), and the request was handled.
    assert scheduled < at < STEPS and target <= at
    assert "checkpoint requested (SIGUSR1): saving at step" in (tmp / "a.err").read_text()

    out = first + rest
    # No study runs there now: the work folder's last checkpoint (the study went on after the
    # first park) replaces the parked one, and a third park finds nothing newer.
    last = read_checkpoint(killed / "checkpoint.pt")["step"]
    later = _study(tmp, "--workdir", "a", "--park").stdout
    assert (f"{RUN}: parked at step {last} of" if last > at else
            f"{RUN}: already parked at step {at}") in later, later
    again = _study(tmp, "--workdir", "a", "--park").stdout
    assert f"{RUN}: already parked at step {last}" in again, again
    first_at, at = at, last
    shutil.rmtree(tmp / "a")  # the machine is gone; the park folder travelled
    return {"tmp": tmp, "at": at, "first_at": first_at, "out": out}


def test_park_copies_the_killed_runs_state_with_its_manifest(parked):
    tmp, at = parked["tmp"], parked["at"]
    slot = tmp / "parked" / "p" / RUN
    assert f"{RUN}: parked at step {parked['first_at']} of {STEPS}" in parked["out"]
    man = json.loads((slot / MANIFEST).read_text())
    assert man["step"] == at and man["id"] == RUN and len(man["hash"]) == 16
    assert read_checkpoint(slot / "checkpoint.pt")["step"] == at
    # The curve travels up to the checkpoint, nothing past it.
    recs = [json.loads(x) for x in (slot / "metrics.jsonl").read_text().splitlines()]
    assert recs and max(r["step"] for r in recs) == at
    umask = os.umask(0)
    os.umask(umask)
    for f in ("checkpoint.pt", "metrics.jsonl", MANIFEST):  # not 0600: as any file the user writes
        assert (slot / f).stat().st_mode & 0o777 == 0o666 & ~umask
    done = _study(tmp, "--workdir", "ref", "--report", "ref/report", "--park",
                  "--park-dir", "elsewhere").stdout
    assert done.startswith("nothing to park") and not (tmp / "elsewhere").exists()
    dry = _study(tmp, "--workdir", "b", "--dry-run").stdout
    assert f"{RUN}: parked at step {at} in" in dry


def test_a_damaged_parked_checkpoint_is_one_clear_line_and_trains_nothing(parked, tmp_path):
    park = tmp_path / "damaged"
    shutil.copytree(parked["tmp"] / "parked" / "p", park)
    ck = park / RUN / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    p = _study(parked["tmp"], "--workdir", str(tmp_path / "c"), "--park-dir", str(park),
               "--report", str(tmp_path / "c" / "report"), check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"the parked checkpoint {ck} is unreadable" in p.stderr and "Traceback" not in p.stderr
    assert not list((tmp_path / "c").glob("**/checkpoint.pt"))
    assert ck.exists()  # nothing deleted: the user decides


def test_a_parked_copy_of_another_config_is_not_resumed(parked, tmp_path, caplog):
    """The study file changed since the run was parked (its identity differs): a warning once,
    the work folder untouched, the parked copy kept. A checkpoint that contradicts its
    manifest (a config beyond paths) is refused."""
    park = tmp_path / "park"
    shutil.copytree(parked["tmp"] / "parked" / "p", park)
    study = S.load_study(parked["tmp"] / "p.toml")
    planner = S.Planner(study, str(parked["tmp"] / "data"), tmp_path / "w", {})
    plan = planner.build()
    man_path = park / RUN / MANIFEST
    man = json.loads(man_path.read_text())
    man_path.write_text(json.dumps({**man, "hash": "0" * 16}))
    stale: set[str] = set()
    assert unpark(plan, set(), park, stale) == [] and unpark(plan, set(), park, stale) == []
    assert sum("is of another config" in r.message for r in caplog.records) == 1
    assert not list(tmp_path.glob("w/**/checkpoint.pt")) and (park / RUN / "checkpoint.pt").exists()

    other = S.Planner(study, str(parked["tmp"] / "data"), tmp_path / "w", {},
                      overrides=["optim.momentum=0.5"]).build()
    man_path.write_text(json.dumps({**man, "hash": other[0].hash}))
    with pytest.raises(UserError, match=r"does not match its manifest's run .*optim\.momentum"):
        unpark(other, set(), park, set())


def test_a_finished_runs_parked_copy_is_removed_by_park_and_by_unpark(parked, tmp_path):
    """A run finished elsewhere (or here) leaves its parked copy stale: both `--park` and the
    study's start delete it and say so, and restore nothing."""
    study = S.load_study(parked["tmp"] / "p.toml")
    plan = S.Planner(study, str(parked["tmp"] / "data"), tmp_path / "w", {}).build()
    calls = {"park": lambda store: park(plan, {RUN}, store),
             "unpark": lambda store: unpark(plan, {RUN}, store, set())}
    for name, call in calls.items():
        store = tmp_path / name
        shutil.copytree(parked["tmp"] / "parked" / "p", store)
        assert (store / RUN / "checkpoint.pt").exists()
        assert call(store) == [f"{RUN}: finished; its parked copy {store / RUN} removed"], name
        assert not (store / RUN).exists() and call(store) == []
        assert not list((tmp_path / "w").glob("**/checkpoint.pt"))


def test_the_parked_run_finishes_elsewhere_as_if_never_interrupted(parked):
    tmp, at = parked["tmp"], parked["at"]
    p = _study(tmp, "--workdir", "b")
    assert f"{RUN}: restored from" in p.stderr and f"at step {at} of {STEPS}" in p.stderr
    a = read_checkpoint(tmp / "ref" / RUN / "checkpoint.pt")
    b = read_checkpoint(tmp / "b" / RUN / "checkpoint.pt")
    assert a["step"] == b["step"] == STEPS
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after the move"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert b["config"]["data"]["labels"].startswith(str(tmp / "b"))  # this machine's paths

    ref = json.loads((tmp / "ref" / "report.json").read_text())["runs"][0]
    (rec,) = json.loads((tmp / "docs" / "p.json").read_text())["runs"]
    assert rec["hash"] == ref["hash"] and rec["resumed_at_step"] == at
    for k in ("test_top1", "test_top1_rotation_averaged", "heldout_top1"):
        assert rec[k] == ref[k]
    assert [c["step"] for c in rec["curve"]] == [c["step"] for c in ref["curve"]]
    assert rec["curve"] == ref["curve"]  # losses averaged from the parked records too
    assert not (tmp / "parked" / "p" / RUN).exists()  # finished: the parked copy is gone
