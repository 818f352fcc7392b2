"""Memory-allocator settings for training on the CPU, applied by the training commands.

A CPU training step allocates and frees the same large activation buffers every step. By default
torch asks glibc for them, glibc serves anything above its mmap threshold with a fresh mmap and
returns it with munmap, and the kernel zero-fills every 4 KiB page again on first touch: on the
CIFAR-10 studies' S4L-Rotation step (batch 1,536) that is ~580,000 page faults a step and a fifth
of the CPU time in the kernel. Two settings remove most of it without changing any arithmetic:

- `THP_MEM_ALLOC_ENABLE=1` (read by torch's CPU allocator once, at its first allocation, so it is
  set before torch is imported): buffers of 2 MiB or more are 2 MiB aligned and madvised as
  transparent huge pages (effective where /sys/kernel/mm/transparent_hugepage/enabled is
  `madvise` or `always`);
- glibc `mallopt`: a fixed 32 MiB mmap threshold (glibc's ceiling) and a 1 GiB trim threshold,
  so freed blocks below 32 MiB stay in the heap for the next step.

`benchmarks/train_step_cpu.py --compare allocator` measures them (1.24x and 1.26x images/s in two
runs, 24-30x fewer page faults, ~8% more peak memory on a 2-core Xeon); tests/test_cpu_alloc.py checks that training with and without them
gives bit-identical weights. `S4L_CPU_ALLOC=default` turns both off; a THP_MEM_ALLOC_ENABLE already
in the environment is left as it is. Nothing here applies to `s4l serve` (onnxruntime has its own
arena) or on other C libraries than glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

OFF_VARIABLE = "S4L_CPU_ALLOC"
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 1024 * 1024 * 1024
_M_TRIM_THRESHOLD = -1  # malloc.h
_M_MMAP_THRESHOLD = -3


def tune_for_training() -> dict[str, bool]:
    """Apply both settings unless S4L_CPU_ALLOC=default; say which took effect."""
    if os.environ.get(OFF_VARIABLE, "").strip().lower() in ("default", "off", "0"):
        log.debug("%s=default: CPU allocator left as it is", OFF_VARIABLE)
        return {"huge_pages": False, "glibc_heap": False}
    huge_pages = _enable_huge_pages()
    glibc_heap = _keep_glibc_heap()
    log.debug("CPU allocator: huge pages %s, glibc heap kept %s", huge_pages, glibc_heap)
    return {"huge_pages": huge_pages, "glibc_heap": glibc_heap}


def _enable_huge_pages() -> bool:
    if "torch" in sys.modules:  # torch read the variable at its first allocation: too late
        return os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return os.environ["THP_MEM_ALLOC_ENABLE"] == "1"


def _keep_glibc_heap() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl has mallopt as a no-op stub)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
