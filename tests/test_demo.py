"""`s4l demo --smoke`: the whole pipeline (train x2, extract, probe, export, serve + HTTP) for real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _demo(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "s4l.cli", "demo", "--smoke", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reuses_artifacts(tmp_path):
    out = tmp_path / "demo"
    first = _demo(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for step in range(1, 6):
        assert f"step {step}/5" in first.stdout
    for artifact in ("s4l-rotation/checkpoint.pt", "supervised/checkpoint.pt", "features_train.h5",
                     "features_test.h5", "probe/report.json", "probe/learning_curves.png",
                     "model.onnx", "summary.json"):
        assert (out / artifact).exists(), artifact
    summary = json.loads((out / "summary.json").read_text())
    assert summary["served"]["dim"] == 128  # pre_logits at width 1/16: root 4 channels x 32
    assert set(summary["train"]) == {"s4l-rotation", "supervised"}
    assert "POST /classify" in first.stdout and "GET /readyz -> 200" in first.stdout
    assert "s4l_images_total" in first.stdout
    # The probe's head is served next to the model and answers with it in one call.
    assert "GET /heads -> 200" in first.stdout and "probe head:" in first.stdout
    assert summary["served"]["served_probe_head_top1"].endswith("/4")
    assert "POST /search" in first.stdout and summary["served"]["search_nearest_same_label"]

    second = _demo(out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing" in second.stdout
    assert "$ s4l export" not in second.stdout and "$ s4l extract" not in second.stdout


def test_demo_failure_stops_with_a_clear_message(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "s4l-rotation").write_text("a file where the workdir should be")
    proc = _demo(out)
    assert proc.returncode != 0
    assert "s4l demo: error:" in proc.stderr and "train" in proc.stderr
