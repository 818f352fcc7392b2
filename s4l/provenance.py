"""Where an artifact came from: file hashes, the git commit, library versions (torch-free)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def file_sha256(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """SHA-256 of a file, read in blocks (checkpoints and feature files can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def git_commit(where: str | os.PathLike | None = None) -> dict[str, object]:
    """The git commit of the checkout holding `where` (default: this package) and whether
    tracked files differ from it; {"commit": None, "dirty": None} outside a checkout."""
    import subprocess

    cwd = Path(where) if where is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                                 timeout=5, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if not sha:
        return {"commit": None, "dirty": None}
    return {"commit": sha, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def machine_info() -> dict:
    """The machine a measurement ran on, for results files: CPU model, logical / usable cores
    (affinity and container CPU sets respected), memory, GPU names (nvidia-smi, so torch is not
    needed), load average, OS, Python, and torch's version and thread count when torch is loaded."""
    import platform
    import subprocess
    import sys

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict = {
        "cpu": cpu, "cores_logical": os.cpu_count(),
        "cores_usable": (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else os.cpu_count()),
        "os": platform.platform(), "python": platform.python_version(),
        "hostname": platform.node(),
    }
    try:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
        info["memory_gib"] = round(int(mem) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    gpu = None
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20, check=False)
        if r.returncode == 0 and r.stdout.strip():
            gpu = [ln.strip() for ln in r.stdout.strip().splitlines()]
    except (OSError, subprocess.TimeoutExpired):
        pass
    info["gpu"] = gpu
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    else:
        try:
            from importlib.metadata import version

            info["torch"] = version("torch")
        except Exception:  # not installed: the serving image has no torch
            pass
    return info
