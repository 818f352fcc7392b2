"""Time and peak memory of `s4l import-tfhub` on a module directory (issue 26: <= ~2x the module).

    .venv/bin/python benchmarks/tfhub_import.py MODULE_DIR [MODULE_DIR ...] \
        [--json benchmarks/results/tfhub_import.json]

Each import runs in a fresh process (`s4l.cli.main`, as the command runs); that process reports
its peak resident memory (VmHWM) and the resident memory just before the import (after importing
torch and the importer), so the import's own share is their difference. Standard-width and
4x-wide modules are written with dev/make_tfhub_fixtures.py (TensorFlow; not committed).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, re, sys, time
def mem(k):
    return int(re.search(k + r':\s+(\d+)', open('/proc/self/status').read()).group(1)) * 1024
import torch, torchvision  # noqa: F401  (what the command imports before converting)
import s4l.training.tfhub.importer  # noqa: F401
from s4l.cli import main
before = mem('VmRSS')
t = time.perf_counter()
rc = main(['import-tfhub', sys.argv[1], '--out', sys.argv[2], '--no-progress'])
print(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t, 'rss_before': before,
                  'peak_rss': mem('VmHWM')}))
"""


def measure(module: Path) -> dict:
    variables = sum(p.stat().st_size for p in (module / "variables").iterdir())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m.pt"
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", CHILD, str(module), str(out)],
                           capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
        res = json.loads(r.stdout.strip().splitlines()[-1])
        res["checkpoint_bytes"] = out.stat().st_size
    res.update(module=str(module), variables_bytes=variables, process_wall_s=wall,
               import_share_bytes=res["peak_rss"] - res["rss_before"])
    res["peak_over_module"] = res["peak_rss"] / variables
    res["import_share_over_module"] = res["import_share_bytes"] / variables
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modules", nargs="+", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from s4l.training.tfhub import crc32c

    rows = [measure(m) for m in args.modules]
    mib = 2**20
    for r in rows:
        print(f"{r['module']}: variables {r['variables_bytes'] / mib:.0f} MiB, import "
              f"{r['seconds']:.1f} s (process {r['process_wall_s']:.1f} s), peak RSS "
              f"{r['peak_rss'] / mib:.0f} MiB = {r['peak_over_module']:.2f}x the module "
              f"(before import {r['rss_before'] / mib:.0f} MiB; import's share "
              f"{r['import_share_bytes'] / mib:.0f} MiB = {r['import_share_over_module']:.2f}x)")
    if args.json:
        doc = {"command": "benchmarks/tfhub_import.py " + " ".join(map(str, args.modules)),
               "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                          f"{len(__import__('os').sched_getaffinity(0))} CPUs (shared)",
               "crc32c_backend": crc32c.backend_name(), "results": rows}
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
