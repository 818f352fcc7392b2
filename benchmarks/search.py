"""Benchmark: gallery search (what POST /search runs) against a bare numpy float32 matmul.

A synthetic feature file in the `s4l extract` contract (``--rows`` x ``--dim``, default the
issue's 100,000 x 2,048, non-negative like ResNet50v2 pre_logits) is loaded by
``s4l.service.gallery.load_gallery`` in a fresh child process per storage dtype (float32, the
default, and float16), which reports:

- resident memory: RSS after load minus RSS before, per row (and the peak during load, VmHWM,
  to show that loading never held the file's float32 matrix beside the gallery);
- queries/s of ``Gallery.search(q, top_k=10)`` (exact cosine: per-block matmul + argpartition
  top-k, merge) against ``q @ M.T`` with ``M`` the same unit rows as a float32 numpy array (the
  bare matmul: no top-k, no normalisation), for batches of 1, 8 and 64 queries; the two are
  timed in alternating windows so both see the same machine load. Ratio = search q/s / matmul q/s.

This measures the gallery's search function, not HTTP (the /search route adds JSON parsing of
the query and the response, a thread hop, and, for image queries, the model forward).

    .venv/bin/python benchmarks/search.py                    # 100,000 x 2,048 (a few minutes)
    .venv/bin/python benchmarks/search.py --rows 20000       # quicker

Writes benchmarks/results/search.json. Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _report import host, write_report

ROOT = Path(__file__).resolve().parents[1]
HASH = "b" * 64


def write_features(path: Path, rows: int, dim: int, seed: int = 0) -> None:
    """A contract feature file written block by block (never the whole matrix in memory)."""
    import h5py

    from s4l.evaluation.features import SCHEMA_VERSION, chunk_rows
    from s4l.imaging import PreprocessSpec

    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        f.attrs.update({"schema_version": SCHEMA_VERSION, "model_hash": HASH, "layer": "pre_logits",
                        "preprocess": PreprocessSpec.for_image_size(224).to_json(),
                        "class_names": json.dumps([f"c{i}" for i in range(205)])})
        feats = f.create_dataset("features", (rows, dim), np.float32, chunks=(chunk_rows(dim, 4), dim))
        step = 8192
        for lo in range(0, rows, step):
            n = min(step, rows - lo)
            feats[lo:lo + n] = np.maximum(rng.standard_normal((n, dim), dtype=np.float32), 0)
        f.create_dataset("labels", data=rng.integers(0, 205, rows))
        f.create_dataset("paths", data=np.array([f"places205/train/{i:07d}.jpg" for i in range(rows)],
                                                dtype=object), dtype=h5py.string_dtype("utf-8"))


def _rss(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(path: str, dtype: str, dim: int, windows: int, top_k: int) -> dict:
    from s4l.imaging import PreprocessSpec
    from s4l.service.backend import ModelInfo
    from s4l.service.gallery import load_gallery

    info = ModelInfo(model_id="bench", preprocess=PreprocessSpec.for_image_size(224),
                     embedding_dim=dim, class_names=None, num_classes=None,
                     metadata={"s4l.checkpoint_sha256": HASH})
    before = _rss()
    t = time.perf_counter()
    g = load_gallery("bench", path, info, storage=dtype)
    load_s = time.perf_counter() - t
    after, peak = _rss(), _rss("VmHWM")
    out = {"dtype": dtype, "rows": g.rows, "dim": g.dim, "load_s": load_s,
           "rss_delta_bytes": after - before, "rss_delta_per_row": (after - before) / g.rows,
           "load_peak_over_before_bytes": peak - before, "gallery_bytes_per_row": g.bytes_per_row,
           "vector_bytes_per_row": g.vectors.itemsize * g.dim, "batches": {}}
    ref = np.ascontiguousarray(g.vectors, dtype=np.float32)  # the same unit rows, float32
    rng = np.random.default_rng(1)
    for q_n in (1, 8, 64):
        q = np.maximum(rng.standard_normal((q_n, dim), dtype=np.float32), 0)
        g.search(q, top_k), q @ ref.T  # warm
        times = {"matmul": [], "search": []}
        for _ in range(windows):
            for name, fn in (("matmul", lambda q=q: q @ ref.T),
                             ("search", lambda q=q: g.search(q, top_k))):
                reps, t0 = 0, time.perf_counter()
                while reps < 2 or time.perf_counter() - t0 < 1.0:
                    fn()
                    reps += 1
                times[name].append((time.perf_counter() - t0) / reps)
        mm, se = float(np.median(times["matmul"])), float(np.median(times["search"]))
        out["batches"][str(q_n)] = {"matmul_queries_per_s": q_n / mm, "search_queries_per_s": q_n / se,
                                    "ratio": mm / se, "window_ratios": [a / b for a, b in
                                                                        zip(times["matmul"], times["search"])]}
    # Exactness: the top-k rows agree with a float64 brute force on the stored rows.
    q = np.maximum(rng.standard_normal((4, dim)), 0)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ ref.T.astype(np.float64)
    hits = g.search(q, top_k)
    out["max_score_error_vs_float64"] = float(np.abs(np.take_along_axis(cos, hits.rows, 1) - hits.scores).max())
    out["top1_equal_float64"] = bool((hits.rows[:, 0] == cos.argmax(1)).all())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=3, help="alternating timing windows per batch size")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--dtypes", default="float32,float16")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "search.json"))
    ap.add_argument("--child", nargs=2, metavar=("FILE", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.dim, args.windows, args.top_k)))
        return 0

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gallery.h5"
        t = time.perf_counter()
        write_features(path, args.rows, args.dim)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s",
              flush=True)
        for dtype in args.dtypes.split(","):
            p = subprocess.run([sys.executable, __file__, "--child", str(path), dtype, "--dim",
                                str(args.dim), "--windows", str(args.windows), "--top-k", str(args.top_k)],
                               capture_output=True, text=True, check=True)
            r = json.loads(p.stdout.strip().splitlines()[-1])
            runs.append(r)
            print(f"{dtype}: load {r['load_s']:.1f} s, RSS +{r['rss_delta_per_row']:.0f} B/row "
                  f"(gallery {r['gallery_bytes_per_row']:.0f} B/row, vectors {r['vector_bytes_per_row']}), "
                  f"load peak +{r['load_peak_over_before_bytes'] / 1e6:.0f} MB, "
                  f"max score error {r['max_score_error_vs_float64']:.1e}", flush=True)
            for q_n, b in r["batches"].items():
                print(f"  {q_n:>2} queries/call: search {b['search_queries_per_s']:8.1f} q/s, "
                      f"numpy matmul {b['matmul_queries_per_s']:8.1f} q/s, ratio {b['ratio']:.2f}",
                      flush=True)
    report = {"benchmark": "search", "rows": args.rows, "dim": args.dim, "top_k": args.top_k,
              "host": host(numpy=np.__version__),
              "note": "ratio = Gallery.search queries/s / bare numpy q @ M.T queries/s, same run",
              "runs": runs}
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
