"""Benchmark: `s4l extract` end-to-end images/s into HDF5 vs the raw model on the same batches.

The issue's target: with the standard-width ResNet50v2 at 224 px on Imagenette JPEGs, the whole
extraction (JPEG decode + eval crop in worker processes, model, HDF5 shards, merge) runs at
>= 0.9x the throughput of the bare model call on the same, already preprocessed batches, for
both the checkpoint (torch) and the ONNX (onnxruntime) path. The raw throughput is measured in
the same run, alternating: raw, end-to-end, raw, end-to-end, ... (--rounds end-to-end runs),
each end-to-end run is divided by the mean of the raw runs on either side of it, and the median
of those ratios is reported, because the machines are shared and noisy. The fraction of the
extraction loop's wall time the model was busy (the rest is waiting for decoded batches and
HDF5 shard writes) is reported as well, and the loop's own throughput: the whole command also
pays fixed costs (loading the model, hashing the model file, the merge) that a short run
cannot amortise.

    .venv/bin/python benchmarks/extract.py --n 256           # both paths, ~2-3 minutes on 2 CPUs
    .venv/bin/python benchmarks/extract.py --n 64 --paths onnx

Writes benchmarks/results/extract.json. Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _report import host, write_report

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.extract")


def imagenette_root() -> Path:
    """Imagenette unpacked in the test cache (the same place tests/conftest.py uses)."""
    from s4l.io import shared_dataset

    try:
        return shared_dataset("imagenette-224.tar.gz", "imagenette-224")
    except FileNotFoundError as e:
        sys.exit(f"{e}: this benchmark needs the Imagenette JPEGs")


def write_list(root: Path, n: int, lst: Path) -> list[str]:
    """The first n val images, round-robin over classes, as a Places205-format list file."""
    by_class = [sorted(d.glob("*.JPEG")) for d in sorted((root / "val").iterdir()) if d.is_dir()]
    rows, i = [], 0
    while len(rows) < n:
        for c, files in enumerate(by_class):
            if i < len(files) and len(rows) < n:
                rows.append((files[i].relative_to(root).as_posix(), c))
        i += 1
    lst.write_text("".join(f"{p} {c}\n" for p, c in rows))
    return [str(root / p) for p, _ in rows]


def raw_throughput(encoder, crops: np.ndarray, batch_size: int, layer: str) -> float:
    encoder(crops[:batch_size], layer)  # warm-up
    t0 = time.perf_counter()
    for lo in range(0, len(crops), batch_size):
        encoder(crops[lo : lo + batch_size], layer)
    return len(crops) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="images (default 256)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: spare cores)")
    ap.add_argument("--paths", nargs="+", choices=("checkpoint", "onnx"), default=["checkpoint", "onnx"])
    ap.add_argument("--width", type=float, default=1.0, help="ResNet50v2 width (1.0 = standard)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="end-to-end runs, each between two raw-model runs (default 3)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "extract.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from s4l.evaluation.encoders import open_encoder
    from s4l.evaluation.extract import ExtractConfig, default_workers, extract
    from s4l.imaging import PreprocessSpec, decode_image, eval_crop
    from s4l.training.checkpoint import save_checkpoint
    from s4l.training.model import ModelSpec, build_model

    root = imagenette_root()
    work = Path(tempfile.mkdtemp(prefix="s4l-bench-extract-"))
    lst = work / "list.txt"
    files = write_list(root, args.n, lst)
    data = f"places205:{lst}@{root}"
    spec = PreprocessSpec()  # 256 / 224, area: the release's eval crop

    # A standard-width model with random weights: throughput does not depend on the values.
    torch.manual_seed(0)
    mspec = ModelSpec(width=args.width, heads={"classes": 10})
    ckpt = work / "model.pt"
    save_checkpoint(ckpt, {
        "model_spec": mspec.to_dict(), "model": build_model(mspec).state_dict(), "ema": None,
        "config": {"benchmark": True}, "config_hash": "bench", "class_names": None,
        "preprocess": spec.to_dict(), "step": 0, "epoch": 0, "optimizer": None, "rng": None,
        "data_state": None, "provenance": {},
    })
    models = {"checkpoint": (ckpt, "pre_logits")}
    if "onnx" in args.paths:
        from s4l.service.export import export_onnx

        export_onnx(ckpt, work / "model.onnx")
        models["onnx"] = (work / "model.onnx", "embedding")

    log.info("preprocessing %d images once for the raw-model reference", len(files))
    crops = np.stack([eval_crop(decode_image(f), spec) for f in files])
    results = {}
    for name in args.paths:
        path, layer = models[name]
        encoder = open_encoder(path)
        raws = [raw_throughput(encoder, crops, args.batch_size, layer)]
        e2es, loops, ratios, loop_ratios, busy = [], [], [], [], []
        for r in range(args.rounds):
            out = work / f"{name}-{r}.h5"
            t0 = time.perf_counter()
            summary = extract(ExtractConfig(model=str(path), data=data, out=str(out), split="val",
                                            layer=layer, batch_size=args.batch_size,
                                            workers=args.workers, shard_size=max(args.n // 4, 1)))
            e2es.append(summary["rows"] / (time.perf_counter() - t0))
            loops.append(summary["rows"] / summary["seconds"])
            busy.append(summary["model_seconds"] / summary["seconds"])
            raws.append(raw_throughput(encoder, crops, args.batch_size, layer))
            # Each end-to-end run against the mean of the raw runs just before and after it.
            ref = (raws[-2] + raws[-1]) / 2
            ratios.append(e2es[-1] / ref)
            loop_ratios.append(loops[-1] / ref)
            out.unlink()
        results[name] = {
            "ratio_median": float(np.median(ratios)), "ratios": ratios,
            "loop_ratio_median": float(np.median(loop_ratios)), "loop_ratios": loop_ratios,
            "raw_images_per_s": raws, "end_to_end_images_per_s": e2es,
            "loop_images_per_s": loops, "model_busy_fraction": busy, "rows": summary["rows"],
        }
        print(f"{name:10s} raw model {np.median(raws):7.2f} img/s | whole command {np.median(e2es):7.2f} "
              f"img/s, ratio {np.median(ratios):.3f} (rounds {', '.join(f'{x:.3f}' for x in ratios)}) | "
              f"extraction loop {np.median(loops):7.2f} img/s, ratio {np.median(loop_ratios):.3f} | "
              f"model busy {100 * np.median(busy):.0f}% of the loop (target ratio >= 0.9)")
        del encoder
    report = {
        "benchmark": "extract",
        "what": "end-to-end s4l extract images/s (whole command incl. model load, decode, HDF5 "
                "merge) / raw model images/s on the same preprocessed batches; median over rounds",
        "rounds": args.rounds,
        "n": args.n, "batch_size": args.batch_size,
        "workers": default_workers() if args.workers is None else args.workers,
        "width": args.width, "image_size": spec.crop,
        "host": host(),
        "results": results,
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
