"""The training commands' CPU allocator settings (s4l/cpu_alloc.py): they take effect, they cut the
page faults of a repeated large allocation, and they change no arithmetic (bit-identical weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from s4l.training.checkpoint import read_checkpoint

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")

# Three SGD steps of the CIFAR-10 studies' model (batch 256) after a warm-up step, in a fresh
# process (torch and glibc read their settings at start-up): minor page faults per step.
PROBE = r"""
import json, os, resource
from s4l.cpu_alloc import tune_for_training
applied = tune_for_training()
import torch
import torch.nn.functional as F
from s4l.training.model import ModelSpec, build_model
torch.manual_seed(0)
spec = ModelSpec(width=0.25, stem="small-s2", heads={"classes": 10})
model = build_model(spec).to(memory_format=torch.channels_last)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x = torch.randn(256, 3, 32, 32).to(memory_format=torch.channels_last)
y = torch.randint(0, 10, (256,))
def step():
    loss = F.cross_entropy(model(x, heads=("classes",))["classes"], y)
    opt.zero_grad()
    loss.backward()
    opt.step()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
print(json.dumps({"applied": applied, "faults_per_step": faults,
                  "thp": os.environ.get("THP_MEM_ALLOC_ENABLE")}))
"""


def _clean_env(**env: str) -> dict[str, str]:
    unset = ("S4L_CPU_ALLOC", "THP_MEM_ALLOC_ENABLE", "GLIBC_TUNABLES")
    return {**{k: v for k, v in os.environ.items() if k not in unset},
            "OMP_NUM_THREADS": "1", **env}


def _probe(**env: str) -> dict:
    res = subprocess.run([sys.executable, "-c", PROBE], env=_clean_env(**env),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_settings_take_effect_and_cut_page_faults_of_a_training_step():
    # Three probes of each, alternating, compared by their medians: one probe's count moves with
    # the machine's memory state (a stop's fresh-clone run once gave 22,200 tuned against 19,600
    # default, where the next pairs on the same machine gave 18,300 / 27,300 and 21,000 / 32,100).
    pairs = [(_probe(), _probe(S4L_CPU_ALLOC="default")) for _ in range(3)]
    tuned = sorted((p[0] for p in pairs), key=lambda r: r["faults_per_step"])[1]
    default = sorted((p[1] for p in pairs), key=lambda r: r["faults_per_step"])[1]
    assert all(p[0]["applied"] == {"huge_pages": True, "glibc_heap": True} for p in pairs)
    assert all(p[0]["thp"] == "1" for p in pairs)
    assert all(p[1]["applied"] == {"huge_pages": False, "glibc_heap": False} for p in pairs)
    assert all(p[1]["thp"] is None for p in pairs)
    # Measured on a 2-core Xeon (THP `madvise`): ~20,000 faults a step by default, ~11,600 with
    # the glibc heap kept, ~4,100 with huge pages too. Whether the kernel backs a huge-page
    # request is its own business (fragmented memory, khugepaged and defrag settings): on the CI
    # machine the same probe gave 26,600 -> 13,700, the glibc part's cut and little more. So the
    # bound is the glibc part's, which holds wherever the settings take effect.
    assert tuned["faults_per_step"] < default["faults_per_step"] * 0.8, pairs


def test_a_variable_the_user_set_is_left_alone():
    assert _probe(THP_MEM_ALLOC_ENABLE="0")["thp"] == "0"


def _train(workdir: Path, **env: str) -> dict:
    args = ["train", "--preset", "s4l-rotation-10pct-smoke", "--data", "builtin:digits",
            "--workdir", str(workdir), "--device", "cpu", "--no-progress",
            "--set", "optim.total_steps=3", "--set", "data.workers=0",
            "--set", "optim.warmup_epochs=0"]
    res = subprocess.run([sys.executable, "-m", "s4l.cli", *args], env=_clean_env(**env),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return read_checkpoint(workdir / "checkpoint.pt")["model"]


def test_training_is_bit_identical_with_and_without_the_settings(tmp_path):
    tuned = _train(tmp_path / "tuned")
    default = _train(tmp_path / "default", S4L_CPU_ALLOC="default")
    assert tuned.keys() == default.keys()
    changed = [k for k in tuned if not torch.equal(tuned[k], default[k])]
    assert not changed, changed
