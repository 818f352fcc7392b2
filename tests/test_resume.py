"""Exact resume: SIGKILL a real `s4l train` run mid-way, rerun the same command, compare weights."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from s4l.errors import UserError
from s4l.training import config as C
from s4l.training.checkpoint import read_checkpoint
from s4l.training.presets import get_preset
from s4l.training.trainer import read_metrics, train

# MOAM step 1 exercises every piece of state: rotation + VAT (draws from torch's RNG) + EntMin,
# EMA, momentum buffers, two data streams crossing an epoch boundary (15 steps/epoch).
ARGS = ["--preset", "moam-step1-smoke", "--data", "builtin:digits", "--no-progress",
        "--set", "optim.total_steps=30", "--set", "checkpoint.every_steps=4",
        "--set", "data.workers=1", "--set", "log_every_steps=2", "--set", "eval.every_epochs=0.5"]


def _cmd(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "s4l.cli", "train", *ARGS, "--workdir", str(workdir)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _states(workdir: Path) -> dict:
    ck = read_checkpoint(workdir / "checkpoint.pt")
    return ck


def _records(workdir: Path) -> list[dict]:
    out = []
    try:
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return out


def test_sigkill_then_same_command_gives_identical_weights(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_cmd(ref), env=_env(), check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen(_cmd(killed), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # Kill at a random step after the first checkpoint (step 4): watch metrics.jsonl (a record
    # every 2 steps) for the chosen step, leaving 10+ steps of margin before the run ends.
    target = random.randrange(6, 21, 2)
    deadline = time.time() + 180
    while not any(r.get("step", 0) >= target for r in _records(killed)):
        assert proc.poll() is None, "run ended before the chosen kill step"
        assert time.time() < deadline
        time.sleep(0.01)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = read_checkpoint(killed / "checkpoint.pt")["step"]
    assert 4 <= killed_at < 30

    subprocess.run(_cmd(killed), env=_env(), check=True, capture_output=True, timeout=300)
    _assert_same_run(ref, killed)


def _assert_same_run(ref: Path, killed: Path) -> None:
    """The resumed run ended as the uninterrupted one: weights, EMA, momentum, data position,
    and each training record and evaluation once, with the same values."""
    a, b = _states(ref), _states(killed)
    assert a["step"] == b["step"] == 30
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["data_state"] == b["data_state"]
    # metrics.jsonl has each training step's record once, as the uninterrupted run.
    ra = [r for r in read_metrics(ref) if r["kind"] == "train"]
    rb = [r for r in read_metrics(killed) if r["kind"] == "train"]
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    # Mid-run evaluations (EMA weights, every 8 steps) happened and did not perturb the run.
    ea = [r for r in read_metrics(ref) if r["kind"] == "eval"]
    eb = [r for r in read_metrics(killed) if r["kind"] == "eval"]
    assert [r["step"] for r in ea] == [8, 16, 24] and ea == eb


def test_sigusr1_checkpoints_at_the_next_logging_step_and_resumes_exactly(tmp_path):
    """`kill -USR1`: a checkpoint off the regular schedule (every 100 steps here, never within
    30), at the next logging boundary (every 2 steps); the run goes on; killed after it and run
    again, it ends as the uninterrupted run."""
    args = ["--set", "checkpoint.every_steps=100"]
    ref, asked = tmp_path / "ref", tmp_path / "asked"
    subprocess.run([*_cmd(ref), *args], env=_env(), check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen([*_cmd(asked), *args], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    target = random.randrange(5, 19)
    deadline = time.time() + 180
    while not any(r.get("step", 0) >= target for r in _records(asked)):
        assert proc.poll() is None, "run ended before the chosen step"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    while not (asked / "checkpoint.pt").exists():
        assert proc.poll() is None, "the run ended (or died) instead of checkpointing"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    step = read_checkpoint(asked / "checkpoint.pt")["step"]
    assert target <= step < 30 and step % 2 == 0, step
    assert f"checkpoint requested (SIGUSR1): saving at step {step}" in err

    subprocess.run([*_cmd(asked), *args], env=_env(), check=True, capture_output=True,
                   timeout=300)
    _assert_same_run(ref, asked)


def _tiny(**sets) -> C.TrainConfig:
    cfg = get_preset("supervised-10pct-smoke").config
    base = {"optim.total_steps": 6, "checkpoint.every_steps": 2}
    return C.apply_overrides(cfg, list({**base, **sets}.items()))


def test_workdir_of_another_config_is_refused_with_the_differing_keys(tmp_path):
    train(_tiny(), tmp_path, progress=False)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(UserError, match=r"(?s)different configuration.*optim\.lr: workdir has 0\.1, "
                                        r"this run has 0\.5"):
        train(_tiny(**{"optim.lr": 0.5}), tmp_path, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before  # nothing lost
    # The same config resumes (a finished run only re-evaluates).
    assert train(_tiny(), tmp_path, progress=False)["step"] == 6


def test_checkpoint_config_mismatch_is_refused_even_without_config_json(tmp_path):
    train(_tiny(), tmp_path, progress=False)
    (tmp_path / "config.json").unlink()
    with pytest.raises(UserError, match=r"optim\.weight_decay"):
        train(_tiny(**{"optim.weight_decay": 0.5}), tmp_path, progress=False)


def test_unreadable_checkpoint_fails_loudly_instead_of_starting_fresh(tmp_path):
    train(_tiny(**{"optim.total_steps": 2}), tmp_path, progress=False)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        train(_tiny(**{"optim.total_steps": 2}), tmp_path, progress=False)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import s4l.training.checkpoint as ckpt_mod

    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: half written, then the disk is full
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(UserError, match=r"(?s)step 4.*No space left.*step 2\) is intact"):
        train(_tiny(), tmp_path, progress=False)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    ck = read_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["step"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # Space freed: the same command resumes from step 2 and finishes.
    assert train(_tiny(), tmp_path, progress=False)["step"] == 6


def test_checkpoint_contents_follow_the_contract(tmp_path):
    train(_tiny(**{"ema.half_life_epochs": 1.0}), tmp_path, progress=False)
    ck = read_checkpoint(tmp_path / "checkpoint.pt")
    for key in ("model_spec", "model", "ema", "config", "config_hash", "class_names",
                "preprocess", "step", "epoch", "optimizer", "rng", "data_state", "provenance"):
        assert key in ck, key
    assert ck["class_names"] == [str(i) for i in range(10)]
    assert ck["preprocess"] == {"resize": 16, "crop": 16, "interpolation": "area"}
    assert ck["config_hash"] == C.config_hash(C.from_dict(ck["config"]))
    assert set(ck["provenance"]["versions"]) >= {"torch", "s4l", "python"}
    assert "git_sha" in ck["provenance"]
    assert json.loads((tmp_path / "config.json").read_text()) == ck["config"]
    from s4l.training.checkpoint import load_for_inference

    inf = load_for_inference(tmp_path / "checkpoint.pt")
    assert inf.used_ema and not inf.model.training


def test_resume_with_another_process_count_is_refused(tmp_path):
    train(_tiny(**{"optim.total_steps": 4}), tmp_path, progress=False)
    ck = read_checkpoint(tmp_path / "checkpoint.pt")
    ck["rng"] = ck["rng"] * 2  # as if written by 2 processes
    ck["step"] = 2
    torch.save(ck, tmp_path / "checkpoint.pt")
    with pytest.raises(UserError, match="written by 2 process"):
        train(_tiny(**{"optim.total_steps": 4}), tmp_path, progress=False)
