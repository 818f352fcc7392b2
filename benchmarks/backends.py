"""Backends benchmark: onnxruntime vs OpenVINO (fp32, bf16) and int8 on both, served and extracting.

Standard-width ResNet50v2 at 224 px (untrained weights: speed does not depend on them; the same
model as benchmarks/serve.py) on Imagenette 224 px JPEGs from ../shared/data. Configurations:

    ort-fp32   onnxruntime, the fp32 export            (the server's default)
    ov-fp32    OpenVINO, fp32 export, INFERENCE_PRECISION_HINT f32
    ov-bf16    OpenVINO, fp32 export, bf16 (only where the CPU has native bf16; else skipped)
    ort-int8   onnxruntime, the int8 QDQ export
    ov-int8    OpenVINO, the int8 QDQ export, --precision auto

Every number is divided by raw onnxruntime fp32 measured in the same run, in alternating
windows (raw ort fp32, subject, raw ort fp32, subject, ...) so both see the same load of this
shared machine:

- raw: the engine alone on preprocessed crops, batch --raw-batch;
- served: a real `s4l serve --backend B --precision P` process, /embed with one image per
  request, closed-loop clients at each --concurrency level (raw reference: batch --raw-batch);
- extract: `s4l extract` (library call: decode workers, model, HDF5 shards, merge) of --extract-n
  images; its loop images/s (model load and the parity gate excluded) against raw ort fp32
  windows before and after.

    .venv/bin/python benchmarks/backends.py --duration 12 --rounds 2 [--out benchmarks/results/backends.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from _report import host, write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
log = logging.getLogger("bench.backends")

CONFIGS = {  # name -> (model file: fp32 or int8, backend, precision)
    "ort-fp32": ("fp32", "onnxruntime", "fp32"),
    "ov-fp32": ("fp32", "openvino", "fp32"),
    "ov-bf16": ("fp32", "openvino", "bf16"),
    "ort-int8": ("int8", "onnxruntime", "fp32"),
    "ov-int8": ("int8", "openvino", "auto"),
}


def imagenette() -> Path:
    try:
        from s4l.io import shared_dataset  # the shared cache, where present
    except ImportError:
        shared_dataset = None
    if shared_dataset is not None:
        try:
            return shared_dataset("imagenette-224.tar.gz", "imagenette-224")
        except FileNotFoundError as e:
            raise SystemExit(f"{e}: this benchmark needs ../shared/data") from None
    cache = Path(os.environ.get("S4L_TEST_CACHE", Path.home() / ".cache" / "s4l-test-data"))
    root = cache / "imagenette-224"
    if not (cache / ".imagenette-224.done").exists():
        archive = ROOT.parent / "shared" / "data" / "imagenette-224.tar.gz"
        if not archive.exists():
            raise SystemExit(f"{archive} missing: this benchmark needs ../shared/data")
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tf:
            tf.extractall(cache, filter="data")
        (cache / ".imagenette-224.done").touch()
    return root


def server_process():
    try:
        from support.server import ServerProcess
    except ImportError:
        from test_server_support import ServerProcess
    return ServerProcess


class Engine:
    """One configuration run in this process: ``run(crops) -> embedding``."""

    def __init__(self, path: Path, backend: str, precision: str, threads: int):
        self.backend = backend
        if backend == "onnxruntime":
            from s4l.service.backend import OnnxBackend

            self._b = OnnxBackend(path, intra_op_threads=threads)
            self.precision = "fp32"
        else:
            from s4l.service.backend_openvino import OpenVinoBackend

            self._b = OpenVinoBackend(path, precision=precision, threads=threads)
            self.gate = self._b.gate()
            self.precision = self._b.precision

    def run(self, crops: np.ndarray) -> None:
        self._b.run(crops)


def raw_window(engine: Engine, crops: np.ndarray, batch: int, seconds: float) -> dict:
    engine.run(crops[:batch])  # warm-up
    n, i, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n == 0:
        engine.run(np.take(crops, range(i, i + batch), axis=0, mode="wrap"))
        n += batch
        i += batch
    wall = time.perf_counter() - t0
    return {"_n": n, "_wall": wall, "images_per_s": n / wall}


def pooled(windows: list[dict]) -> float:
    return sum(w["_n"] for w in windows) / sum(w["_wall"] for w in windows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=12.0,
                    help="seconds per subject and level (split into --rounds windows; the raw "
                         "reference gets as long again)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--images", type=int, default=64, help="Imagenette val images to cycle through")
    ap.add_argument("--raw-batch", type=int, default=8)
    ap.add_argument("--extract-n", type=int, default=192, help="images per extraction (0: skip)")
    ap.add_argument("--calibration-images", type=int, default=64)
    ap.add_argument("--heldout-images", type=int, default=64)
    ap.add_argument("--width", type=float, default=1.0, help="ResNet50v2 width (1.0 = standard)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "backends.json"))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--reuse", action="store_true", help="reuse the exports already in --workdir")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    import serve as bserve  # benchmarks/serve.py: the model builder and the closed-loop clients

    from s4l.service.backend import available_cpus
    from s4l.service.backend_openvino import bf16_support, cpu_flags

    t_start = time.perf_counter()
    data = imagenette()
    blobs, crops = bserve.sample_images(data, args.images)
    threads = available_cpus()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="s4l-bench-backends-"))
    workdir.mkdir(parents=True, exist_ok=True)

    # -- the models: fp32 and int8 exports of the same network ---------------------------------
    from s4l.training import model as tm

    orig = tm.ModelSpec
    if args.width != 1.0:  # a narrower network for quick runs, through the same builder

        class Narrow(orig):
            def __init__(self, **kw):
                super().__init__(**{**kw, "width": args.width})
        tm.ModelSpec = Narrow
    try:
        model_int8, export_report = bserve.build_model(workdir, data, args.calibration_images,
                                                       args.heldout_images, args.reuse)
    finally:
        tm.ModelSpec = orig
    paths = {"fp32": workdir / "r50.fp32.onnx", "int8": model_int8}

    import openvino as ov

    support = bf16_support(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    names = [c for c in args.configs.split(",") if c]
    if not support.native and "ov-bf16" in names:
        log.warning("ov-bf16 skipped: %s", support.reason)
        names.remove("ov-bf16")
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx_vnni")))
    ref = Engine(paths["fp32"], "onnxruntime", "fp32", threads)
    window = args.duration / args.rounds
    results: dict = {}
    ServerProcess = server_process()

    for name in names:
        kind, backend, precision = CONFIGS[name]
        path = paths[kind]
        res: dict = {"model": kind, "backend": backend, "precision_requested": precision}
        # -- raw ------------------------------------------------------------------------------
        from s4l.service.backend import ModelLoadError

        try:
            eng = Engine(path, backend, precision, threads)
        except ModelLoadError as e:  # the parity gate refused it: say so, measure the rest
            log.error("%s refused: %s", name, e)
            results[name] = {**res, "precision": "-", "refused": str(e), "raw": None, "served": {}}
            continue
        res["precision"] = eng.precision
        if backend == "openvino":
            res["parity"] = eng.gate.to_dict()
        rw, sw = [], []
        for _ in range(args.rounds):
            rw.append(raw_window(ref, crops, args.raw_batch, window))
            sw.append(raw_window(eng, crops, args.raw_batch, window))
        res["raw"] = {"images_per_s": pooled(sw), "ref_images_per_s": pooled(rw),
                      "ratio_vs_raw_ort_fp32": pooled(sw) / pooled(rw)}
        del eng
        log.info("%s raw: %.2f img/s, %.2fx raw ort fp32 (%.2f)", name, pooled(sw),
                 pooled(sw) / pooled(rw), pooled(rw))
        # -- served ---------------------------------------------------------------------------
        env = {"S4L_MAX_QUEUE_IMAGES": "1024", "S4L_LOG_LEVEL": "warning",
               "OMP_NUM_THREADS": str(threads), "S4L_BACKEND": backend, "S4L_PRECISION": precision}
        res["served"] = {}
        with ServerProcess(path, env=env, log=workdir / f"server-{name}.log") as srv:
            info = httpx.get(srv.url + "/info", timeout=30).json()
            res["server_info"] = {k: info.get(k) for k in ("backend", "precision", "provider", "batching")}
            for c in [int(x) for x in args.concurrency.split(",")]:
                rw, sw = [], []
                for _ in range(args.rounds):
                    rw.append(raw_window(ref, crops, args.raw_batch, window))
                    d = bserve.drive(srv.url, blobs, c, window)
                    sw.append(d)
                errors = sum(d["errors"] for d in sw)
                lat = np.concatenate([d["_lat"] for d in sw])
                res["served"][str(c)] = {
                    "images_per_s": pooled(sw), "ref_images_per_s": pooled(rw),
                    "ratio_vs_raw_ort_fp32": pooled(sw) / pooled(rw), "errors": errors,
                    "p50_ms": 1e3 * float(np.median(lat)), "p99_ms": 1e3 * float(np.percentile(lat, 99))}
                log.info("%s served c=%d: %.2f img/s, %.2fx raw ort fp32 (%.2f), errors %d", name, c,
                         pooled(sw), pooled(sw) / pooled(rw), pooled(rw), errors)
            if "Traceback" in srv.output():
                log.error("server log has a traceback:\n%s", srv.output()[-3000:])
        # -- extraction -----------------------------------------------------------------------
        if args.extract_n:
            res["extract"] = extract_run(path, backend, precision, data, args, ref, crops, workdir, name)
        results[name] = res

    out = {
        "host": host(cpus_usable=threads, bf16_flags_and_related=flags, bf16=support.__dict__,
                     openvino=ov.__version__, onnxruntime=__import__("onnxruntime").__version__),
        "model": f"ResNet50v2 width {args.width} (untrained), 224 px, 10-class head",
        "int8_export_agreement_vs_fp32": export_report.get("int8"),
        "duration_s": args.duration, "rounds": args.rounds, "raw_batch": args.raw_batch,
        "wall_s": time.perf_counter() - t_start,
        "results": results,
    }
    ort8 = results.get("ort-int8", {}).get("served", {}).get("8", {}).get("ratio_vs_raw_ort_fp32")
    ov8 = results.get("ov-int8", {}).get("served", {}).get("8", {}).get("ratio_vs_raw_ort_fp32")
    bf = results.get("ov-bf16", {}).get("served", {}).get("8", {}).get("ratio_vs_raw_ort_fp32")
    out["targets"] = {
        "served_bf16_ge_1.8x_at_8": None if bf is None else bf >= 1.8,
        "int8_faster_backend_ge_3.5x_at_8": None if ort8 is None and ov8 is None
        else max(x for x in (ort8, ov8) if x is not None) >= 3.5,
    }
    print(table(out))
    print(json.dumps(out["targets"]))
    write_report(args.out, out)
    return 0


def extract_run(path, backend, precision, data, args, ref, crops, workdir, name) -> dict:
    from s4l.evaluation.extract import ExtractConfig, extract

    lst = workdir / "extract-list.txt"
    if not lst.exists():
        files = sorted((data / "val").rglob("*.JPEG"))[: args.extract_n]
        lst.write_text("".join(f"{f.relative_to(data).as_posix()} 0\n" for f in files))
    before = raw_window(ref, crops, args.raw_batch, args.duration / args.rounds)
    cfg = ExtractConfig(model=str(path), data=f"places205:{lst}@{data}", out=str(workdir / f"{name}.h5"),
                        split="val", batch_size=32, overwrite=True, progress=False,
                        backend=backend, precision=precision)
    s = extract(cfg)
    after = raw_window(ref, crops, args.raw_batch, args.duration / args.rounds)
    rate = s["images_this_run"] / s["seconds"]
    refrate = pooled([before, after])
    import h5py

    with h5py.File(cfg.out) as f:
        attrs = {k: f.attrs[k] for k in ("backend", "precision")}
    log.info("%s extract: %.2f img/s, %.2fx raw ort fp32 (%.2f); attrs %s", name, rate,
             rate / refrate, refrate, attrs)
    return {"images": s["images_this_run"], "images_per_s": rate, "ref_images_per_s": refrate,
            "ratio_vs_raw_ort_fp32": rate / refrate, "model_busy_fraction": s["model_seconds"] / s["seconds"],
            "attrs": {k: str(v) for k, v in attrs.items()}}


def table(out: dict) -> str:
    levels = sorted({int(c) for r in out["results"].values() for c in r.get("served", {})})
    head = ["config", "precision", "raw"] + [f"served c={c}" for c in levels] + ["extract"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(d):
        return "-" if not d else f"{d['images_per_s']:.1f} ({d['ratio_vs_raw_ort_fp32']:.2f}x)"
    for name, r in out["results"].items():
        rows.append("| " + " | ".join([name, r["precision"], cell(r["raw"])]
                                      + [cell(r["served"].get(str(c))) for c in levels]
                                      + [cell(r.get("extract"))]) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
