"""Checks of the service helpers' assumptions and of small torch-free pieces (the helpers
themselves live in tests/support/server.py)."""

from __future__ import annotations

import os

import pytest

# -- checks of the helpers' assumptions and of small torch-free pieces --------------------------

def test_available_cpus_respects_affinity_and_quota():
    from s4l.service.backend import available_cpus

    n = available_cpus()
    assert 1 <= n <= len(os.sched_getaffinity(0))


def test_cgroup_quota_parsing(tmp_path, monkeypatch):
    from s4l.service import backend

    cpu_max = tmp_path / "cpu.max"
    real_path = backend.Path

    def fake_path(p):
        return cpu_max if str(p) == "/sys/fs/cgroup/cpu.max" else real_path(p)

    monkeypatch.setattr(backend, "Path", fake_path)
    cpu_max.write_text("150000 100000\n")
    assert backend._cgroup_cpu_quota() == pytest.approx(1.5)
    assert backend.available_cpus() == 1
    cpu_max.write_text("max 100000\n")
    assert backend._cgroup_cpu_quota() is None
