"""Parking: a study's unfinished runs carried from one machine to the next.

A study can outlive the machine it runs on (a preemptible instance, a session with a time limit,
a laptop that goes home): its finished runs survive in the report JSON, but an unfinished run's
checkpoint lives in the work folder and is lost with it. `s4l study FILE --park` copies each
unfinished run's resume state (checkpoint.pt and the metrics.jsonl its learning curve is read
from) into a park folder that travels (commit it, sync it), with a manifest naming the run's
identity. The next `s4l study FILE` on any machine first restores every parked run that is
further on than its work folder, then trains as usual: the run resumes at the parked step and
finishes with the same weights as an uninterrupted run (tests/test_study_park.py).

Identity: the manifest holds the run's portable hash (study/plan.py: the label file by content,
the data by folder name), and the checkpoint's own config may differ from this machine's run
only in its paths; a parked run of another config is refused, never resumed. Once the run is
finished (in the ledger) its parked copy is deleted.
"""

from __future__ import annotations

import logging
import platform
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from s4l.errors import UserError
from s4l.study.ledger import cpu_name, now
from s4l.study.plan import Run

log = logging.getLogger("s4l.study")

MANIFEST = "parked.json"
# The keys a run's config may differ in between machines: where things are, not what they are.
PATH_KEYS = frozenset({"data.root", "data.labels", "data.pseudo_labels", "init.checkpoint"})


def default_park_dir(name: str) -> Path:
    """parked/NAME under the current directory, beside runs/NAME (cmd_study.py's rule)."""
    return Path.cwd() / "parked" / name


def _slot(park: Path, run: Run) -> Path:
    return park / run.id


def _copy(src: Path, dst: Path) -> None:
    from s4l.io import atomic_path

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _ckpt_step(path: Path) -> int:
    from s4l.training.checkpoint import read_checkpoint

    return int(read_checkpoint(path).get("step", 0))


def _manifest(slot: Path) -> dict[str, Any] | None:
    from s4l.safeload import load_json_file

    p = slot / MANIFEST
    return load_json_file(p, "parked run manifest", 1 << 20) if p.exists() else None


def park(runs: Iterable[Run], done: set[str], park_dir: Path) -> list[str]:
    """Copy every unfinished run's resume state that is further on than its parked copy into
    `park_dir`; delete the parked copies of finished runs. Lines saying what was done."""
    from s4l.io import atomic_write_json

    out = []
    for run in runs:
        slot = _slot(park_dir, run)
        if run.id in done or run.alias_of:
            out += _drop_finished(run, park_dir)
            continue
        ckpt = run.workdir / "checkpoint.pt"
        if not ckpt.exists():
            continue
        tmp = park_dir / (run.id + ".parking")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # Copied first, then read: a checkpoint is replaced by a rename, so the copy is one
        # whole checkpoint (the one that was current when it was opened), never a torn one.
        _copy(ckpt, tmp / "checkpoint.pt")
        step = _ckpt_step(tmp / "checkpoint.pt")
        old = _manifest(slot) if slot.exists() else None
        if old and old.get("hash") == run.hash and int(old.get("step", -1)) >= step:
            shutil.rmtree(tmp)
            out.append(f"{run.id}: already parked at step {old['step']}")
            continue
        metrics = run.workdir / "metrics.jsonl"
        if metrics.exists():
            from s4l.training.metrics import truncate_metrics

            _copy(metrics, tmp / "metrics.jsonl")
            truncate_metrics(tmp / "metrics.jsonl", step)  # records past the checkpoint go
        size = sum(p.stat().st_size for p in tmp.iterdir())
        atomic_write_json(tmp / MANIFEST, {
            "id": run.id, "hash": run.hash, "step": step, "steps": run.budget["steps"],
            "parked_at": now(), "host": platform.node(), "cpu": cpu_name(), "bytes": size}, indent=1,
            newline=True)
        if slot.exists():
            shutil.rmtree(slot)
        slot.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(slot)
        out.append(f"{run.id}: parked at step {step} of {run.budget['steps']} "
                   f"({size / 2**20:.1f} MiB) -> {slot}")
    return out


def ask_for_checkpoint(workdir: Path, runs: Iterable[Run], done: set[str],
                       wait_s: float) -> str | None:
    """If an `s4l study` on this machine holds the work folder, ask it for a checkpoint now
    (SIGUSR1: training/ckpt_request.py) and wait up to `wait_s` for an unfinished run's
    checkpoint to be rewritten. A line saying what happened, or None when no study runs here."""
    import os
    import time

    from s4l.study.lock import holder
    from s4l.training.ckpt_request import SIGNAL

    who = holder(workdir)
    if who is None or SIGNAL is None:
        return None
    pid, host = who
    if host != platform.node():
        return f"the running study is on {host}: parking the checkpoints on disk as they are"
    ckpts = [r.workdir / "checkpoint.pt" for r in runs if r.id not in done and not r.alias_of]

    def stamps():
        return {p: p.stat().st_mtime_ns for p in ckpts if p.exists()}

    before = stamps()
    try:
        os.kill(pid, SIGNAL)
    except (ProcessLookupError, PermissionError) as e:
        return f"could not ask pid {pid} for a checkpoint ({e}): parking what is on disk"
    print(f"asked the running study (pid {pid}) for a checkpoint at its next logging step; "
          f"waiting up to {wait_s:.0f} s", flush=True)
    t0 = time.monotonic()
    while time.monotonic() - t0 < wait_s:
        if stamps() != before:
            time.sleep(0.5)  # the rename is the last act of a save; let its log line out
            return f"the running study wrote a checkpoint after {time.monotonic() - t0:.0f} s"
        if holder(workdir) is None:
            return "the study ended while waiting: parking what is on disk"
        time.sleep(0.2)
    return (f"no new checkpoint within {wait_s:.0f} s (the study may be between runs or "
            "evaluating): parking what is on disk")


def unpark(runs: Iterable[Run], done: set[str], park_dir: Path, stale: set[str]) -> list[str]:
    """Restore into its work folder every parked unfinished run that is further on there than
    here (its checkpoint's paths rewritten to this machine's); delete the parked copies of
    finished runs. A parked copy of another config (the study file changed since) is not used:
    a warning, once (`stale` holds the ones said), and it stays. A damaged one stops the study
    with one clear line; nothing is overwritten."""
    from s4l.training import config as C
    from s4l.training.checkpoint import read_checkpoint, save_checkpoint

    out = []
    if not park_dir.is_dir():
        return out
    for run in runs:
        slot = _slot(park_dir, run)
        if not (slot / MANIFEST).exists():
            continue
        if run.id in done or run.alias_of:
            out += _drop_finished(run, park_dir)
            continue
        src = slot / "checkpoint.pt"
        try:
            man = _manifest(slot)
        except (UserError, OSError, ValueError) as e:
            raise UserError(f"the parked run {slot} is unreadable ({e}); delete that folder to "
                            f"train {run.id} from its work folder's state (or step 0)") from None
        if man.get("hash") != run.hash:
            if run.id not in stale:
                stale.add(run.id)
                log.warning("the parked run %s is of another config (identity %s, this study's "
                            "%s is %s): the study file changed since it was parked; not used. "
                            "Delete that folder, or restore the study file", slot,
                            man.get("hash"), run.id, run.hash)
            continue
        here = run.workdir / "checkpoint.pt"
        if here.exists() and _ckpt_step(here) >= int(man.get("step", 0)):
            continue  # this machine is as far on or further: keep its own state
        try:
            ck = read_checkpoint(src)
        except (UserError, OSError, ValueError) as e:
            raise UserError(f"the parked checkpoint {src} is unreadable ({e}); delete {slot} to "
                            f"train {run.id} from its work folder's state (or step 0)") from None
        differing = {k: v for k, v in C.diff(ck.get("config", {}), run.config).items()
                     if k not in PATH_KEYS}
        if differing:
            lines = "; ".join(f"{k}: parked {a!r}, here {b!r}" for k, (a, b) in differing.items())
            raise UserError(f"the parked checkpoint {src} does not match its manifest's run "
                            f"{run.id} ({lines}); delete {slot}")
        step = int(ck.get("step", 0))
        if step != int(man.get("step", -1)):
            raise UserError(f"the parked checkpoint {src} is at step {step}, its manifest says "
                            f"{man.get('step')}: delete {slot}")
        ck["config"], ck["config_hash"] = C.to_dict(run.config), C.config_hash(run.config)
        run.workdir.mkdir(parents=True, exist_ok=True)
        (run.workdir / "config.json").unlink(missing_ok=True)  # the trainer writes this one's
        if (slot / "metrics.jsonl").exists():
            _copy(slot / "metrics.jsonl", run.workdir / "metrics.jsonl")
        else:
            (run.workdir / "metrics.jsonl").unlink(missing_ok=True)
        ck = {k: v for k, v in ck.items() if k not in ("format", "format_version")}
        save_checkpoint(here, ck)
        out.append(f"{run.id}: restored from {slot} at step {step} of {run.budget['steps']} "
                   f"(parked {man.get('parked_at')} on {man.get('host')})")
    return out


def _drop_finished(run: Run, park_dir: Path) -> list[str]:
    """A finished run's parked copy is stale: delete it. The line saying so, if there was one."""
    slot = _slot(park_dir, run)
    if not slot.exists():
        return []
    shutil.rmtree(slot)
    return [f"{run.id}: finished; its parked copy {slot} removed"]


def forget(run: Run, park_dir: Path) -> None:
    """The study just finished `run`: delete its parked copy, saying so in the log."""
    for line in _drop_finished(run, park_dir):
        log.info("%s", line)


def parked_step(park_dir: Path, run: Run) -> int | None:
    """The step this run is parked at (a parked copy of this config), or None."""
    try:
        man = _manifest(_slot(park_dir, run))
    except UserError:
        return None
    return int(man["step"]) if man and man.get("hash") == run.hash else None
