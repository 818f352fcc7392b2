"""What OpenVINO's bf16 costs where the CPU cannot compute bf16: raw images/s under a oneDNN ISA cap.

OpenVINO's CPU kernels obey ``ONEDNN_MAX_CPU_ISA``; capped below AVX512_CORE_BF16 they see a CPU
without bf16 instructions, yet OpenVINO still lists BF16 in OPTIMIZATION_CAPABILITIES and still
defaults to it, running bf16 emulated. This measures, for the exports benchmarks/backends.py made
(``--workdir``), OpenVINO fp32 / bf16 / int8 and onnxruntime fp32 / int8 (raw, batch 8, 2 threads,
alternating windows), once with the cap and once without, each in a child process. onnxruntime's
kernels (MLAS) do not read the cap: its rows are the same-run reference, not a no-bf16 CPU.

    .venv/bin/python benchmarks/bf16_emulation.py --workdir /tmp/ov29/full [--out benchmarks/results/bf16_emulation.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _report import host, write_report

ROOT = Path(__file__).resolve().parents[1]


def child(workdir: Path, seconds: float, rounds: int) -> dict:
    import numpy as np
    import onnxruntime as ort
    import openvino as ov

    c = ov.Core()
    x = np.random.default_rng(0).integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)
    cfg = {"INFERENCE_NUM_THREADS": 2, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
           "ENABLE_CPU_PINNING": False}
    runs = {}
    for name, path, prec in [("ov-fp32", "r50.fp32.onnx", "f32"), ("ov-bf16", "r50.fp32.onnx", "bf16"),
                             ("ov-int8", "r50.onnx", "f32")]:
        req = c.compile_model(c.read_model(str(workdir / path)), "CPU",
                              {**cfg, "INFERENCE_PRECISION_HINT": prec}).create_infer_request()
        runs[name] = (lambda r: lambda: r.infer({"images": x}))(req)
    o = ort.SessionOptions()
    o.intra_op_num_threads = 2
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for name, path in [("ort-fp32", "r50.fp32.onnx"), ("ort-int8", "r50.onnx")]:
        sess = ort.InferenceSession(str(workdir / path), o, providers=["CPUExecutionProvider"])
        runs[name] = (lambda se: lambda: se.run(["embedding"], {"images": x}))(sess)
    for f in runs.values():
        f()
    tot = {p: [0, 0.0] for p in runs}
    for _ in range(rounds):
        for p, f in runs.items():
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < seconds:
                f()
                n += 8
            tot[p][0] += n
            tot[p][1] += time.perf_counter() - t0
    ips = {p: n / s for p, (n, s) in tot.items()}
    return {"capabilities": c.get_property("CPU", "OPTIMIZATION_CAPABILITIES"),
            "default_precision": str(c.get_property("CPU", "INFERENCE_PRECISION_HINT")),
            "images_per_s": ips,
            "ratio_vs_ort_fp32": {p: v / ips["ort-fp32"] for p, v in ips.items()},
            "bf16_over_fp32_ratio": ips["ov-bf16"] / ips["ov-fp32"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None, help="benchmarks/backends.py's --workdir (its exports)")
    ap.add_argument("--cap", default="AVX512_CORE_VNNI", help="the ONEDNN_MAX_CPU_ISA below bf16")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bf16_emulation.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.workdir is None:
        print("skipped: pass --workdir, the folder where benchmarks/backends.py exported its models")
        return 0
    workdir = Path(args.workdir)
    if args.child:
        print(json.dumps(child(workdir, args.seconds, args.rounds)))
        return 0
    if not (workdir / "r50.fp32.onnx").exists() or not (workdir / "r50.onnx").exists():
        print(f"skipped: no exports in {workdir}; run benchmarks/backends.py --workdir {workdir} first")
        return 0
    result = {"cap": args.cap}
    for label, cap in (("capped", args.cap), ("uncapped", None)):
        env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
        if cap:
            env["ONEDNN_MAX_CPU_ISA"] = cap
        out = subprocess.run([sys.executable, __file__, "--child", "--workdir", str(workdir),
                              "--seconds", str(args.seconds), "--rounds", str(args.rounds)],
                             env=env, capture_output=True, text=True, check=True)
        result[label] = json.loads(out.stdout.strip().splitlines()[-1])
        print(label, {k: round(v, 2) for k, v in result[label]["ratio_vs_ort_fp32"].items()},
              "bf16/fp32", round(result[label]["bf16_over_fp32_ratio"], 2))
    result["host"] = host()
    write_report(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
