"""A training run's metrics: metrics.jsonl (one JSON object per line, "kind" = train / eval /
final) and TensorBoard, its truncation on resume, and reading it back."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from s4l.io import atomic_write_text

log = logging.getLogger("s4l.training.trainer")

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """metrics.jsonl (one JSON object per line, "kind" = train/eval/final) and TensorBoard."""

    def __init__(self, workdir: Path, enabled: bool, purge_step: int | None) -> None:
        self.enabled = enabled
        self.path = workdir / METRICS_FILE
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(workdir / "tb"), purge_step=purge_step)
            except ImportError:
                log.info("tensorboard not installed: metrics go to %s only", self.path)

    def write(self, kind: str, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, **record}
        with open(self.path, "a") as f:  # not atomic: a log appended as the run goes
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        if self.tb is not None and "step" in rec:
            for k, v in rec.items():
                if k in ("step", "kind") or not isinstance(v, int | float) or isinstance(v, bool):
                    continue
                if isinstance(v, float) and not math.isfinite(v):
                    continue
                self.tb.add_scalar(f"{kind}/{k}", v, rec["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if rec.get("kind") != "final" and rec.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text(path, "".join(keep))


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a workdir's metrics.jsonl."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
