"""What every benchmark report does alike: name the machine it ran on, and land on disk.

Imported by the scripts beside it (``from _report import host, write_report``: a script's own
folder is first on ``sys.path``); the leading underscore keeps ``run_all.py`` from running it
as a benchmark.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("?" where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "?"
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")


def host(**extra: Any) -> dict[str, Any]:
    """The machine block of a report: CPU, usable cores, load, versions, the time; torch's
    version, threads and CUDA only where the benchmark imported torch (this never imports it);
    `extra` adds or overrides fields."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "cpu_model": cpu_model(), "cpus_usable": usable, "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    cuda=torch.cuda.is_available())
    info.update(extra)
    return info


def write_report(out: str | Path, report: dict[str, Any]) -> Path:
    """Write `report` as indented JSON at `out` (folders made; numpy scalars as floats) and say
    where."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"wrote {path}")
    return path
