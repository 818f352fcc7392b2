"""Heads benchmark: /classify with 1 task head vs 4 task heads per image, same server, same run.

A real `s4l serve` on a standard-width ResNet50v2 at 224 px (untrained: speed does not depend on
the weights) with four 205-class probe heads (Places205-sized, random weights stamped with the
model's hash). Sequential requests of --images JPEGs each alternate between `?head=h0` and
`?head=h0&head=h1&head=h2&head=h3` in --windows pairs of windows, so both see the same machine
load; the ratio of per-image times is the cost of three extra heads (target < 1.05x: the
backbone runs once per image whatever the number of heads). Also the bare numpy cost of the
heads per image, for scale.

    .venv/bin/python benchmarks/heads.py [--duration 4] [--windows 4] [--out benchmarks/results/heads.json]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from _report import host, write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
log = logging.getLogger("bench.heads")


def jpegs(n: int, size: int = 256, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        # Smooth random images (JPEG-friendly, like photos rather than noise).
        small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def make_heads(model: Path, workdir: Path, n: int, classes: int) -> list[Path]:
    import onnxruntime as ort

    from s4l.heads import Head, save_head

    meta = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_modelmeta()
    md = dict(meta.custom_metadata_map)
    dim, mh = int(md["s4l.embedding_dim"]), md["s4l.checkpoint_sha256"]
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        h = Head(weight=rng.normal(0, 0.02, (classes, dim)).astype(np.float32),
                 bias=np.zeros(classes, np.float32),
                 class_names=tuple(f"h{i}c{j}" for j in range(classes)), model_hash=mh,
                 solver="benchmark-random")
        paths.append(save_head(workdir / f"h{i}.npz", h))
    return paths


def window(client: httpx.Client, url: str, files, seconds: float) -> tuple[int, float]:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n == 0:
        r = client.post(url, files=files)
        r.raise_for_status()
        n += 1
    return n, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per window")
    ap.add_argument("--windows", type=int, default=4, help="window pairs (1 head, 4 heads)")
    ap.add_argument("--images", type=int, default=4, help="images per request")
    ap.add_argument("--classes", type=int, default=205)
    ap.add_argument("--workdir", default=None, help="reuse the exported model here")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from serve import build_model
    from support.server import ServerProcess

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="s4l-bench-heads-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model, _ = build_model(workdir, None, 0, 0, reuse=True)
    heads = make_heads(model, workdir, 4, args.classes)
    blobs = jpegs(args.images)
    files = [("files", (f"i{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)]
    env = {"S4L_HEADS": ",".join(f"h{i}={p}" for i, p in enumerate(heads)),
           "S4L_MAX_IMAGES_PER_REQUEST": str(max(64, args.images))}
    env.pop("OMP_NUM_THREADS", None)
    one, four = [], []
    with ServerProcess(model, env=env, log=workdir / "server.log") as srv:
        u1 = f"{srv.url}/classify?head=h0"
        u4 = f"{srv.url}/classify?head=h0&head=h1&head=h2&head=h3"
        with httpx.Client(timeout=120) as c:
            for u in (u1, u4):  # warm-up, and a check that both answer
                r = c.post(u, files=files)
                r.raise_for_status()
            assert "heads" in r.json()["results"][0], r.text[:200]
            for w in range(args.windows):
                order = ((u1, one), (u4, four)) if w % 2 == 0 else ((u4, four), (u1, one))
                for u, sink in order:
                    n, dt = window(c, u, files, args.duration)
                    sink.append(dt / (n * args.images))
                log.info("window %d: 1 head %.2f ms/img, 4 heads %.2f ms/img", w,
                         1e3 * one[-1], 1e3 * four[-1])
    # The heads alone: numpy on one request's embeddings.
    from s4l.heads import load_head

    hs = [load_head(p) for p in heads]
    emb = np.random.default_rng(2).normal(size=(args.images, hs[0].dim)).astype(np.float32)
    t0, reps = time.perf_counter(), 200
    for _ in range(reps):
        for h in hs:
            h.apply(emb)
    head_ms = 1e3 * (time.perf_counter() - t0) / (reps * args.images * len(hs))
    ratios = [f / o for f, o in zip(four, one)]
    result = {
        "benchmark": "heads", "command": "benchmarks/heads.py " + " ".join(argv or sys.argv[1:]),
        "host": host(),
        "model": "ResNet50v2 width 1, 224 px, untrained, fp32 onnxruntime CPU",
        "heads": {"count": 4, "classes": args.classes, "dim": hs[0].dim},
        "images_per_request": args.images,
        "ms_per_image_1_head": [1e3 * x for x in one],
        "ms_per_image_4_heads": [1e3 * x for x in four],
        "ratio_4_vs_1_per_window": ratios,
        "ratio_4_vs_1_median": float(np.median(ratios)),
        "numpy_ms_per_image_per_head": head_ms,
        "target": "4 heads < 1.05x one head per image",
        "met": bool(np.median(ratios) < 1.05),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        write_report(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
