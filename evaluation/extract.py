"""Batch feature extraction into one HDF5 file: sharded, crash-safe, resumable, torchrun-ready.

The work is cut into fixed shards of ``shard_size`` samples. Each shard is written to a temporary
file in ``OUT.parts/`` and renamed when complete, next to a ``manifest.json`` describing the run
(model, data, layer, dtype, sample list hash, sharding). Starting the same command again after a
crash skips the finished shards; batches never straddle a shard, so a resumed run computes every
row from exactly the same batch as an uninterrupted one and the merged file is identical to it
(all datasets; attributes other than ``created_at``). Under ``torchrun`` rank r takes the shards
k with k % world_size == r, and rank 0 merges them into one file identical to a single-process
run. Images that cannot be decoded are recorded in ``errors`` (path, reason) and skipped.

Decoding and the eval crop (:func:`s4l.imaging.eval_crop`, the same crop as training and the
server) run in DataLoader worker processes, prefetching while the model runs (the "decode in
parallel workers overlapped with inference" habit of GUIDE.md section 5).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from s4l import __version__
from s4l.errors import UserError
from s4l.evaluation.features import SCHEMA_VERSION, Rows, merge_shards, write_rows
from s4l.imaging import ImageError, PreprocessSpec, eval_crop
from s4l.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that defines an extraction (the same config resumes the same run)."""

    model: str
    data: str
    out: str
    split: str = "val"
    layer: str = "pre_logits"
    batch_size: int = 64
    workers: int | None = None  # None: one per spare CPU core
    dtype: str = "float32"
    shard_size: int = 1024
    overwrite: bool = False
    device: str | None = None  # None: CUDA (this rank's) when available, else CPU
    backend: str = "onnxruntime"  # ONNX models: onnxruntime or openvino
    precision: str = "auto"  # ONNX models: fp32, bf16 (openvino, native bf16 CPUs), auto
    parity_images: str | None = None  # openvino's parity gate: a folder of images (None: built-in)
    progress: bool = True


def parts_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".parts")


def shard_path(parts: Path, k: int) -> Path:
    return parts / f"shard-{k:06d}.h5"


def plan_shards(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[(lo, hi)] sample ranges, in order."""
    return [(lo, min(n, lo + shard_size)) for lo in range(0, n, shard_size)]


def default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus - 1))


# ----------------------------------------------------------------------------------------------
# The orchestration


def extract(cfg: ExtractConfig) -> dict:
    """Run (or resume) one extraction; returns a summary. Rank 0 writes ``cfg.out``."""
    # -- setup: refuse before any work what would clobber or cannot be done
    out = Path(cfg.out)
    if cfg.dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {DTYPES}, got {cfg.dtype!r}")
    if cfg.batch_size < 1 or cfg.shard_size < 1:
        raise UserError("--batch-size and --shard-size must be >= 1")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as features.h5")
    if out.exists() and not cfg.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it (it is kept until the new file is complete)")
    if not out.parent.is_dir():
        raise UserError(f"the folder of --out ({out.parent}) does not exist")
    dist = _Dist.from_env()
    try:
        return _extract(cfg, out, dist)
    finally:
        dist.close()


def _extract(cfg: ExtractConfig, out: Path, dist: _Dist) -> dict:
    # -- data
    from s4l.datasets import open_source

    source = open_source(cfg.data, cfg.split)
    n = len(source.samples)
    if n == 0:
        raise UserError(f"{cfg.data} (split {cfg.split!r}) holds no images")
    # -- model
    from s4l.evaluation.encoders import open_encoder

    encoder = open_encoder(cfg.model, device=_device(cfg.device, dist), backend=cfg.backend,
                           precision=cfg.precision, parity_images=cfg.parity_images)
    layer = encoder.check_layer(cfg.layer)
    # -- plan and manifest (rank 0 prepares OUT.parts/, every rank checks it)
    parts = parts_dir(out)
    manifest = _manifest(cfg, encoder, layer, source, n)
    if dist.rank == 0:
        _prepare_parts(parts, manifest, cfg.overwrite)
    dist.barrier()
    if dist.rank != 0:
        _read_manifest_matching(parts, manifest)
    shards = plan_shards(n, cfg.shard_size)
    mine = [k for k in range(len(shards)) if k % dist.world == dist.rank]
    todo = [k for k in mine if not shard_path(parts, k).exists()]
    if len(todo) < len(mine):
        log.info("resuming: %d of this rank's %d shards are already done", len(mine) - len(todo), len(mine))
    # -- run
    t0 = time.perf_counter()
    done_images, model_seconds = _run_shards(cfg, encoder, layer, source,
                                             [(k, *shards[k]) for k in todo], parts, dist,
                                             (manifest["dim"], manifest["logits_dim"]))
    seconds = time.perf_counter() - t0
    if done_images:
        # Near 100%: the model never waits for decoding (the goal of the worker overlap).
        log.info("%d images in %.1fs (%.2f img/s); the model was busy %.0f%% of that time",
                 done_images, seconds, done_images / seconds, 100 * model_seconds / seconds)
    dist.barrier()
    # -- merge (rank 0): into a temp file renamed over OUT (s4l.io.atomic_path); the parts go last
    summary = {"out": str(out), "rows": None, "errors": None, "shards": len(shards),
               "shards_skipped": len(mine) - len(todo), "images_this_run": done_images,
               "seconds": seconds, "model_seconds": model_seconds, "rank": dist.rank,
               "world_size": dist.world}
    if dist.rank == 0:
        missing = [k for k in range(len(shards)) if not shard_path(parts, k).exists()]
        if missing:
            raise RuntimeError(f"shards {missing[:5]} are missing after all ranks finished")
        attrs = _attrs(cfg, encoder, layer, source)
        with atomic_path(out) as tmp:
            rows = merge_shards([shard_path(parts, k) for k in range(len(shards))], tmp, attrs)
        shutil.rmtree(parts)
        import h5py

        with h5py.File(out, "r") as f:
            n_err = int(f["errors/path"].shape[0])
        summary.update(rows=rows, errors=n_err)
        if n_err:
            log.warning("%d image(s) could not be decoded; they are listed in %s:/errors", n_err, out)
        log.info("wrote %s: %d rows x %s (%s, layer %s)", out, rows, manifest["dim"], cfg.dtype, layer)
    dist.barrier()
    return summary


# ----------------------------------------------------------------------------------------------
# Manifest and attributes


def _samples_hash(samples) -> str:
    h = hashlib.sha256()
    for path, label in samples:
        h.update(f"{path}\t{label}\n".encode())
    return h.hexdigest()


def _manifest(cfg: ExtractConfig, encoder, layer: str, source, n: int) -> dict:
    probe = np.zeros((1, encoder.preprocess.crop, encoder.preprocess.crop, 3), np.uint8)
    feats, logits = encoder(probe, layer)
    return {
        "kind": "s4l-extract-parts",
        "schema_version": SCHEMA_VERSION,
        "model_file_sha256": encoder.file_sha256,
        "model_hash": encoder.model_hash,
        "data": cfg.data,
        "split": cfg.split,
        "layer": layer,
        "dim": int(feats.shape[1]),
        "logits_dim": None if logits is None else int(logits.shape[1]),
        "dtype": cfg.dtype,
        # A resumed run must compute its rows with the same engine and precision.
        "backend": encoder.backend,
        "precision": encoder.precision,
        "preprocess": encoder.preprocess.to_dict(),
        "batch_size": cfg.batch_size,
        "shard_size": cfg.shard_size,
        "num_samples": n,
        "samples_sha256": _samples_hash(source.samples),
    }


def _prepare_parts(parts: Path, manifest: dict, overwrite: bool) -> None:
    mpath = parts / MANIFEST
    if parts.exists():
        try:
            old = json.loads(mpath.read_text())
        except (OSError, ValueError):
            old = None
        if old == manifest:
            return
        if not overwrite:
            diff = sorted(k for k in manifest if old is None or old.get(k) != manifest[k])
            raise UserError(
                f"{parts} holds parts of a different extraction (differs in: {', '.join(diff) or 'manifest'}); "
                "run the same command to resume it, or pass --overwrite to start over"
            )
        log.info("--overwrite: removing the parts of a different extraction in %s", parts)
        shutil.rmtree(parts)
    parts.mkdir()
    atomic_write_json(mpath, manifest, indent=2, sort_keys=True)


def _read_manifest_matching(parts: Path, manifest: dict) -> None:
    old = json.loads((parts / MANIFEST).read_text())
    if old != manifest:
        raise RuntimeError(f"rank disagrees with the manifest in {parts}: {old} vs {manifest}")


def _attrs(cfg: ExtractConfig, encoder, layer: str, source) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "model_hash": encoder.model_hash,
        "model_file_sha256": encoder.file_sha256,
        "model_format": encoder.format,
        "model_path": str(Path(cfg.model).resolve()),
        "layer": layer,
        "preprocess": encoder.preprocess.to_json(),
        "data_root": cfg.data,
        "split": cfg.split,
        "class_names": json.dumps(list(source.classes) if source.classes is not None else None),
        "dtype": cfg.dtype,
        "backend": encoder.backend,
        "precision": encoder.precision,
        "parity": json.dumps(encoder.parity, sort_keys=True),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "s4l_version": __version__,
        "extract_config": json.dumps({k: v for k, v in asdict(cfg).items()
                                      if k in ("batch_size", "shard_size")}, sort_keys=True),
    }


# ----------------------------------------------------------------------------------------------
# Decoding workers and the model loop


class _Crops:
    """Map-style dataset: sample index -> (index, uint8 crop or None, error reason or None)."""

    def __init__(self, source, spec: PreprocessSpec):
        self.source, self.spec = source, spec

    def __len__(self) -> int:
        return len(self.source.samples)

    def __getitem__(self, i: int):
        try:
            return i, eval_crop(self.source.load(i), self.spec), None
        except ImageError as e:
            return i, None, f"{e.code}: {e}"
        except OSError as e:  # missing, unreadable, or not an image PIL knows
            return i, None, f"{type(e).__name__}: {e}"


def _collate(items):
    ids = [i for i, c, _ in items if c is not None]
    crops = [c for _, c, _ in items if c is not None]
    errors = [(i, r) for i, c, r in items if c is None]
    return ids, (np.stack(crops) if crops else None), errors


def _run_shards(cfg, encoder, layer, source, shards, parts: Path, dist, dims) -> tuple[int, float]:
    """Extract each (k, lo, hi) shard and write it to parts/shard-k.h5 (temp file, then rename)."""
    if not shards:
        return 0, 0.0
    import torch
    from tqdm import tqdm

    batches, last_of_shard = [], {}
    for k, lo, hi in shards:
        for b in range(lo, hi, cfg.batch_size):
            batches.append(list(range(b, min(hi, b + cfg.batch_size))))
        last_of_shard[len(batches) - 1] = (k, lo, hi)
    workers = default_workers() if cfg.workers is None else cfg.workers
    loader = torch.utils.data.DataLoader(
        _Crops(source, encoder.preprocess), batch_sampler=batches, num_workers=workers,
        collate_fn=_collate, prefetch_factor=4 if workers else None,
    )
    total = sum(hi - lo for _, lo, hi in shards)
    bar = tqdm(total=total, unit="img", desc=f"extract {Path(cfg.out).name}", dynamic_ncols=True,
               disable=not cfg.progress or dist.rank != 0, smoothing=0.1)
    dtype = np.dtype(cfg.dtype)
    buf = _ShardBuffer()
    model_seconds = 0.0
    for b, (ids, crops, errors) in enumerate(loader):
        if crops is not None:
            t0 = time.perf_counter()
            feats, logits = encoder(crops, layer)
            model_seconds += time.perf_counter() - t0
            buf.add(ids, feats.astype(dtype), logits)
        for i, reason in errors:
            buf.errors.append((str(source.samples[i][0]), reason))
        bar.update(len(batches[b]))
        if b in last_of_shard:
            k, lo, hi = last_of_shard[b]
            _write_shard(parts, k, buf.rows(source, dtype, *dims))
            buf = _ShardBuffer()
    bar.close()
    return total, model_seconds


class _ShardBuffer:
    def __init__(self):
        self.ids, self.feats, self.logits, self.errors = [], [], [], []

    def add(self, ids, feats, logits):
        self.ids.extend(ids)
        self.feats.append(feats)
        if logits is not None:
            self.logits.append(logits.astype(np.float32))

    def rows(self, source, dtype, dim: int, logits_dim: int | None) -> Rows:
        feats = np.concatenate(self.feats) if self.feats else np.zeros((0, dim), dtype)
        logits = None
        if logits_dim is not None:
            logits = (np.concatenate(self.logits) if self.logits
                      else np.zeros((0, logits_dim), np.float32))
        labels = np.array([int(source.samples[i][1]) for i in self.ids], np.int64)
        paths = [str(source.samples[i][0]) for i in self.ids]
        return Rows(feats, labels, paths, logits, self.errors)


def _write_shard(parts: Path, k: int, rows: Rows) -> None:
    final = shard_path(parts, k)
    with atomic_path(final) as tmp:
        write_rows(tmp, rows, {"shard": k})
    log.debug("shard %d: %d rows, %d errors", k, len(rows), len(rows.errors))


def _device(device: str | None, dist: _Dist) -> str | None:
    if device:
        return device
    import torch

    if torch.cuda.is_available():
        return f"cuda:{dist.local_rank}"
    return None


class _Dist:
    """torch.distributed as torchrun sets it up (gloo for the few barriers; no tensors move)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self._owns = False

    @classmethod
    def from_env(cls) -> _Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        d = cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
        if world > 1:
            import torch.distributed as td

            if not td.is_initialized():
                td.init_process_group("gloo")
                d._owns = True
        return d

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def close(self) -> None:
        if self._owns:
            import torch.distributed as td

            td.destroy_process_group()
            self._owns = False
