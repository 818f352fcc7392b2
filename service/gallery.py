"""Galleries for /search: `s4l extract` feature files checked against the served model, held
L2-normalised in memory, searched exactly (exhaustive cosine) block by block.

Memory per row: ``itemsize * D`` for the vectors (float32 by default, float16 on request), 4 B
label, 8 B path offset and the UTF-8 path itself (``Gallery.bytes_per_row``). Loading reads the
file in blocks and never holds more than one float32 block beside the stored matrix. A search
is one float32 matmul per block of rows (``BLOCK_ROWS``) with an argpartition top-k per block,
merged at the end, so no ``[Q, N]`` score matrix is ever built.

Why float32 is the default (benchmarks/search.py, 100,000 x 2,048 on the shared 2-core dev
machine): float32 searches at 0.84-1.00x a bare numpy matmul over the same rows; float16 halves
the memory but numpy widens float16 to float32 at several ns per value, and that cost made its
searches 0.03x (1 query per call) to 0.22x (64 queries) the matmul.

Reads HDF5 through ``s4l.evaluation.features`` (h5py + numpy, no torch), imported on first load
so a server without galleries does not need h5py.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from s4l.service.backend import ModelInfo

log = logging.getLogger(__name__)

STORAGE_DTYPES = ("float32", "float16")
# Rows per matmul block. float32 rows are used in place, so only the [Q, rows] scores scale with
# it (32 MB at 64 queries). Measured in one run on 100,000 x 2,048 (2 shared cores), median ms
# per search vs the bare matmul: 1 query 107 / 122 / 237 for 131,072 / 32,768 / 8,192-row
# blocks vs 99; 64 queries 872 / 954 / 1177 vs 780. float16 rows are widened into a
# [rows, D] float32 buffer, so that block is smaller.
BLOCK_ROWS = {"float32": 131072, "float16": 4096}
LOAD_BYTES = 8 << 20  # float32 bytes read from the file per load step
MAX_TOP_K = 1000
EMBEDDING_LAYER = "pre_logits"  # the served `embedding` (canonical name, s4l.evaluation.features)


class GalleryError(Exception):
    """A feature file that cannot serve as a gallery of this model (start-up refusal)."""


def served_model_hash(info: ModelInfo) -> str:
    """The hash `s4l extract` writes as ``model_hash`` for this model: the source checkpoint's
    sha256 from the ONNX metadata (so features extracted from the checkpoint or from its ONNX
    export both match), else the ONNX file's own sha256 (as OnnxEncoder does)."""
    return info.metadata.get("s4l.checkpoint_sha256") or info.metadata.get("file_sha256", "")


@dataclass(frozen=True)
class Hits:
    """Top-k of each query: gallery row indices and cosine scores, both ``[Q, k]``, best first."""

    rows: np.ndarray
    scores: np.ndarray


class Gallery:
    """One loaded gallery: unit-norm vectors ``[N, D]``, labels, paths, class names, provenance."""

    def __init__(self, name: str, vectors: np.ndarray, labels: np.ndarray, paths_blob: bytes,
                 path_offsets: np.ndarray, *, class_names: list[str] | None = None,
                 source: str = "", model_hash: str = "", layer: str = EMBEDDING_LAYER):
        if vectors.ndim != 2 or len(vectors) == 0:
            raise GalleryError(f"gallery {name}: no rows")
        if len(labels) != len(vectors) or len(path_offsets) != len(vectors) + 1:
            raise GalleryError(f"gallery {name}: vectors, labels and paths disagree in length")
        self.name, self.vectors, self.labels = name, vectors, labels
        self._paths, self._offsets = paths_blob, path_offsets
        self.class_names, self.source, self.model_hash, self.layer = class_names, source, model_hash, layer

    @property
    def rows(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def nbytes(self) -> int:
        return self.vectors.nbytes + self.labels.nbytes + self._offsets.nbytes + len(self._paths)

    @property
    def bytes_per_row(self) -> float:
        return self.nbytes / self.rows

    def path(self, row: int) -> str:
        return self._paths[self._offsets[row]:self._offsets[row + 1]].decode("utf-8")

    def search(self, queries: np.ndarray, top_k: int, block_rows: int | None = None) -> Hits:
        """Exact cosine top-k of each query row (a zero query scores 0 against every row)."""
        block_rows = block_rows or BLOCK_ROWS.get(str(self.vectors.dtype), 4096)
        q = np.array(queries, dtype=np.float64, ndmin=2)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, gallery {self.name} has {self.dim}")
        # Normalise in float64, scaled by the largest value first, so any finite vector works.
        q /= np.maximum(np.abs(q).max(axis=1, keepdims=True), np.finfo(np.float64).tiny)
        q = (q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-300)).astype(np.float32)
        k = max(1, min(int(top_k), self.rows))
        best_s = np.full((len(q), k), -np.inf, np.float32)
        best_i = np.full((len(q), k), -1, np.int64)
        buf = None if self.vectors.dtype == np.float32 else np.empty((block_rows, self.dim), np.float32)
        for lo in range(0, self.rows, block_rows):
            block = self.vectors[lo:lo + block_rows]
            if buf is not None:  # float16 storage: widen one block at a time
                np.copyto(buf[:len(block)], block)
                block = buf[:len(block)]
            s = q @ block.T  # [Q, n] float32
            # Seed the running top-k from a small slice first, so that the rest of the block is
            # only compared with the k-th best so far (an argpartition of every [Q, n] block
            # costs several times the matmul).
            seed = min(s.shape[1], max(4 * k, 1024)) if np.isneginf(best_s).any() else 0
            if seed:
                best_s, best_i = _merge(best_s, best_i, s[:, :seed], lo)
            best_s, best_i = _merge(best_s, best_i, s[:, seed:], lo + seed)
        order = np.lexsort((best_i, -best_s))  # best first; ties by row, so answers are stable
        return Hits(rows=np.take_along_axis(best_i, order, 1),
                    scores=np.take_along_axis(best_s, order, 1))

    def matches(self, hits: Hits, i: int) -> list[dict[str, Any]]:
        """Query ``i``'s hits as JSON-ready dicts: row, path, label (None if unknown), class name."""
        out = []
        for row, score in zip(hits.rows[i].tolist(), hits.scores[i].tolist()):
            label = int(self.labels[row])
            known = label >= 0
            name = self.class_names[label] if known and self.class_names and label < len(self.class_names) else None
            out.append({"row": row, "path": self.path(row), "label": label if known else None,
                        "class_name": name, "score": score})
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "rows": self.rows, "dim": self.dim,
                "dtype": str(self.vectors.dtype), "bytes_per_row": round(self.bytes_per_row, 1),
                "bytes": self.nbytes, "source": self.source, "model_hash": self.model_hash,
                "layer": self.layer, "num_classes": len(self.class_names) if self.class_names else None,
                "search": "exact cosine"}


def _merge(best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, offset: int):
    """The running top-k ``[Q, k]`` updated with the scores ``s`` ``[Q, n]`` of rows from ``offset``."""
    if s.shape[1] == 0:
        return best_s, best_i
    q_n, k = best_s.shape
    qi, cj = np.nonzero(s > best_s.min(axis=1, keepdims=True))
    if len(qi) == 0:
        return best_s, best_i
    counts = np.bincount(qi, minlength=q_n)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    pos = np.arange(len(qi)) - starts[qi]  # np.nonzero is row-major: rank within its query
    width = int(counts.max())
    cand_s = np.full((q_n, k + width), -np.inf, np.float32)
    cand_i = np.full((q_n, k + width), -1, np.int64)
    cand_s[:, :k], cand_i[:, :k] = best_s, best_i
    cand_s[qi, k + pos], cand_i[qi, k + pos] = s[qi, cj], cj + offset
    part = np.argpartition(cand_s, width, axis=1)[:, width:]  # the k largest
    return np.take_along_axis(cand_s, part, 1), np.take_along_axis(cand_i, part, 1)


def load_gallery(name: str, path: str | os.PathLike, info: ModelInfo,
                 storage: str = "float32") -> Gallery:
    """Read and check one feature file against the served model; refuse with one line why.

    Checks: a readable s4l feature file of this schema version (FeatureFile), the same model hash,
    the embedding layer, the model's dimension and preprocessing, at least one row, finite values.
    """
    from s4l.errors import UserError
    from s4l.evaluation.features import FeatureFile, canonical_layer

    if storage not in STORAGE_DTYPES:
        raise GalleryError(f"gallery storage must be one of {STORAGE_DTYPES}, not {storage!r}")
    where = f"gallery {name} ({path})"
    try:
        ff = FeatureFile(path)
    except UserError as e:
        raise GalleryError(f"gallery {name}: {e}") from None
    with ff:
        want = served_model_hash(info)
        got = ff.model_hash
        if not want:
            raise GalleryError(f"{where}: the served model carries no hash to check the gallery against")
        if got != want:
            raise GalleryError(f"{where} was extracted with model {got[:12] or '(none)'}, the server "
                               f"runs model {want[:12]}: re-extract it with this model")
        if canonical_layer(ff.layer) != EMBEDDING_LAYER:
            raise GalleryError(f"{where} holds layer {ff.layer!r}, not the embedding "
                               "(extract with --layer pre_logits or, from ONNX, embedding)")
        if ff.dim != info.embedding_dim:
            raise GalleryError(f"{where} has dimension {ff.dim}; the model's embedding has "
                               f"{info.embedding_dim}")
        pre = ff.attrs.get("preprocess")
        if pre and json.loads(pre) != info.preprocess.to_dict():
            raise GalleryError(f"{where} was extracted with preprocessing {pre}; the model uses "
                               f"{info.preprocess.to_json()}")
        if ff.n == 0:
            raise GalleryError(f"{where} has no rows")
        vectors = _read_unit_rows(ff, storage, where)
        labels = np.asarray(ff.labels, dtype=np.int32)
        blob, offsets = _read_paths(ff)
        return Gallery(name, vectors, labels, blob, offsets, class_names=ff.class_names,
                       source=str(Path(path).resolve()), model_hash=got, layer=ff.layer)


def _read_unit_rows(ff, storage: str, where: str) -> np.ndarray:
    n, d = ff.n, ff.dim
    out = np.empty((n, d), dtype=storage)
    step = max(ff.block_rows, (LOAD_BYTES // (4 * d)) // ff.block_rows * ff.block_rows)
    buf = np.empty((min(step, n), d), np.float32)  # the one float32 block, reused
    zero = 0
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        block = buf[:hi - lo]
        ff.features.read_direct(block, np.s_[lo:hi], np.s_[0:hi - lo])  # HDF5 converts float16
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            raise GalleryError(f"{where}: row {lo + int(np.argmin(finite))} has NaN or infinite values")
        norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))[:, None]
        zero += int((norms == 0).sum())
        np.divide(block, np.where(norms > 0, norms, 1.0), out=block, casting="unsafe")
        out[lo:hi] = block
    if zero:
        log.warning("%s: %d all-zero rows score 0 against every query", where, zero)
    return out


def _read_paths(ff) -> tuple[bytes, np.ndarray]:
    ds = ff._f["paths"]
    parts, offsets, at = [], [0], 0
    for lo in range(0, ff.n, 65536):
        for s in ds[lo:lo + 65536]:
            b = s if isinstance(s, bytes) else str(s).encode("utf-8")
            parts.append(b)
            at += len(b)
            offsets.append(at)
    return b"".join(parts), np.asarray(offsets, dtype=np.int64)


def parse_gallery_specs(value: Any) -> dict[str, Path]:
    """``NAME=PATH`` items (a list, or one comma-separated string from S4L_GALLERIES) -> dict."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return {str(k): Path(v) for k, v in value.items()}
    items = value.split(",") if isinstance(value, str) else list(value)
    out: dict[str, Path] = {}
    for item in items:
        item = str(item).strip()
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"gallery {item!r} is not NAME=PATH (e.g. places=features.h5)")
        if name in out:
            raise ValueError(f"gallery name {name!r} given twice")
        out[name] = Path(path)
    return out


def load_galleries(specs: dict[str, Path], info: ModelInfo, storage: str = "float32") -> dict[str, Gallery]:
    galleries = {}
    for name, path in specs.items():
        g = load_gallery(name, path, info, storage)
        log.info("gallery %s: %d rows x %d from %s (%.0f bytes per row, %s)", name, g.rows, g.dim,
                 g.source, g.bytes_per_row, g.vectors.dtype)
        galleries[name] = g
    return galleries
