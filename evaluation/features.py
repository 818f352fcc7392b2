"""The HDF5 feature-file contract: writing shards, merging them, and checked reading.

Layout (docs/contracts.md, "HDF5 features"): datasets ``features [N, D]`` (float32 or float16),
``labels [N]`` int64 (-1 unknown), ``paths [N]`` UTF-8, optional ``logits [N, C]`` and
``errors`` (path + reason of images that could not be decoded); root attributes
``schema_version`` (1), ``model_hash``, ``layer``, ``preprocess`` (JSON), ``data_root``,
``created_at``, ``s4l_version``, ``class_names`` (JSON). Row data is chunked in whole rows so a
reader of a row range (the streaming probe) touches only the chunks it needs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from s4l.errors import UserError

SCHEMA_VERSION = 1
ROW_DATASETS = ("features", "labels", "paths", "logits")
# Attributes that legitimately differ between two runs of the same extraction.
VOLATILE_ATTRS = ("created_at",)
# Target bytes per chunk of `features`: big enough for fast sequential reads, small enough that
# a random row read does not drag in megabytes.
CHUNK_BYTES = 1 << 20
# `embedding` in an ONNX model is the checkpoint's `pre_logits` (docs/contracts.md).
LAYER_ALIASES = {"embedding": "pre_logits"}

_STR = h5py.string_dtype("utf-8")


def chunk_rows(dim: int, itemsize: int) -> int:
    """Rows per chunk so one chunk of a ``[N, dim]`` dataset is about CHUNK_BYTES."""
    return int(max(16, min(4096, CHUNK_BYTES // max(1, dim * itemsize))))


def canonical_layer(name: str) -> str:
    return LAYER_ALIASES.get(name, name)


@dataclass
class Rows:
    """One block of extracted rows (a shard, or a whole file) held in memory."""

    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    logits: np.ndarray | None = None
    errors: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def _create_rows(f: h5py.File, name: str, data: np.ndarray, total: int | None = None) -> h5py.Dataset:
    n = len(data) if total is None else total
    if data.ndim == 2:
        rows = chunk_rows(data.shape[1], data.dtype.itemsize)
        chunks = (max(1, min(rows, n)), data.shape[1])
        shape = (n, data.shape[1])
    else:
        chunks = (max(1, min(chunk_rows(1, 8) * 16, n)),)
        shape = (n,)
    ds = f.create_dataset(name, shape=shape, dtype=data.dtype, chunks=chunks if n else None)
    if total is None and n:
        ds[...] = data
    return ds


def write_rows(path: str | os.PathLike, rows: Rows, attrs: dict) -> None:
    """Write one complete file (used for shards); the caller renames it into place."""
    with h5py.File(path, "w") as f:
        _write_attrs(f, attrs)
        _create_rows(f, "features", rows.features)
        _create_rows(f, "labels", rows.labels.astype(np.int64))
        f.create_dataset("paths", data=np.array(rows.paths, dtype=object), dtype=_STR)
        if rows.logits is not None:
            _create_rows(f, "logits", rows.logits)
        _write_errors(f, rows.errors)
        f.flush()


def _write_errors(f: h5py.File, errors: Sequence[tuple[str, str]]) -> None:
    g = f.create_group("errors")
    g.create_dataset("path", data=np.array([e[0] for e in errors], dtype=object), dtype=_STR)
    g.create_dataset("reason", data=np.array([e[1] for e in errors], dtype=object), dtype=_STR)


def _write_attrs(f: h5py.File, attrs: dict) -> None:
    for k, v in attrs.items():
        if isinstance(v, dict | list | tuple) or v is None:
            v = json.dumps(v, sort_keys=True)
        f.attrs[k] = v


def read_errors(f: h5py.File) -> list[tuple[str, str]]:
    if "errors" not in f:
        return []
    g = f["errors"]
    return list(zip(_strings(g["path"]), _strings(g["reason"])))


def _strings(ds: h5py.Dataset) -> list[str]:
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in ds[...]]


def merge_shards(shards: Sequence[str | os.PathLike], out: str | os.PathLike, attrs: dict) -> int:
    """Concatenate complete shard files, in order, into one contract file at ``out``.

    Copies chunk-sized blocks so memory stays bounded whatever the total size. Returns N.
    """
    sizes, dims, dtypes, logit_dims = [], set(), set(), set()
    errors: list[tuple[str, str]] = []
    for s in shards:
        with h5py.File(s, "r") as f:
            sizes.append(f["features"].shape[0])
            dims.add(f["features"].shape[1])
            dtypes.add(f["features"].dtype)
            logit_dims.add(f["logits"].shape[1] if "logits" in f else None)
            errors.extend(read_errors(f))
    if len(dims) != 1 or len(dtypes) != 1 or len(logit_dims) != 1:
        raise RuntimeError(f"shards disagree: dims {dims}, dtypes {dtypes}, logits {logit_dims}")
    dim, dtype, logit_dim = dims.pop(), dtypes.pop(), logit_dims.pop()
    total = int(sum(sizes))
    with h5py.File(out, "w") as f:
        _write_attrs(f, attrs)
        feats = _create_rows(f, "features", np.empty((0, dim), dtype), total)
        labels = _create_rows(f, "labels", np.empty((0,), np.int64), total)
        paths = f.create_dataset("paths", shape=(total,), dtype=_STR)
        logits = None
        if logit_dim is not None:
            logits = _create_rows(f, "logits", np.empty((0, logit_dim), np.float32), total)
        at = 0
        for s, n in zip(shards, sizes):
            with h5py.File(s, "r") as g:
                for lo in range(0, n, feats.chunks[0] if feats.chunks else max(n, 1)):
                    hi = min(n, lo + (feats.chunks[0] if feats.chunks else n))
                    feats[at + lo : at + hi] = g["features"][lo:hi]
                    if logits is not None:
                        logits[at + lo : at + hi] = g["logits"][lo:hi]
                if n:
                    labels[at : at + n] = g["labels"][...]
                    paths[at : at + n] = g["paths"][...]
            at += n
        _write_errors(f, errors)
        f.flush()
    return total


# ----------------------------------------------------------------------------------------------
# Reading


class FeatureFile:
    """A checked, read-only view of one feature file. Row data stays on disk until asked for."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"feature file {self.path} does not exist")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise UserError(f"{self.path} is not a readable HDF5 file: {e}") from None
        f = self._f
        version = f.attrs.get("schema_version")
        if version is None:
            self.close()
            raise UserError(f"{self.path} has no schema_version attribute: not an s4l feature file")
        if int(version) != SCHEMA_VERSION:
            self.close()
            raise UserError(
                f"{self.path} has feature schema version {int(version)}; this s4l reads "
                f"version {SCHEMA_VERSION}. Re-extract it with this version's `s4l extract`."
            )
        missing = [k for k in ("features", "labels", "paths") if k not in f]
        if missing:
            self.close()
            raise UserError(f"{self.path} lacks dataset(s) {missing}")
        self.features: h5py.Dataset = f["features"]
        if self.features.ndim != 2 or f["labels"].shape != (self.features.shape[0],):
            self.close()
            raise UserError(
                f"{self.path}: features {self.features.shape} and labels {f['labels'].shape} disagree"
            )
        self.attrs = {k: _attr(v) for k, v in f.attrs.items()}

    # -- metadata
    @property
    def n(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def layer(self) -> str:
        return str(self.attrs.get("layer", ""))

    @property
    def model_hash(self) -> str:
        return str(self.attrs.get("model_hash", ""))

    @property
    def class_names(self) -> list[str] | None:
        v = self.attrs.get("class_names")
        return json.loads(v) if isinstance(v, str) and v not in ("", "null") else None

    @property
    def labels(self) -> np.ndarray:
        return self._f["labels"][...]

    @property
    def paths(self) -> list[str]:
        return _strings(self._f["paths"])

    @property
    def logits(self) -> h5py.Dataset | None:
        return self._f["logits"] if "logits" in self._f else None

    @property
    def errors(self) -> list[tuple[str, str]]:
        return read_errors(self._f)

    @property
    def block_rows(self) -> int:
        """Rows per stored chunk: the natural unit for streaming reads."""
        return int(self.features.chunks[0]) if self.features.chunks else max(1, self.n)

    def iter_blocks(self, order: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start_row, features block)`` chunk by chunk, in ``order`` of block indices."""
        b = self.block_rows
        nblocks = (self.n + b - 1) // b
        for i in range(nblocks) if order is None else order:
            lo = i * b
            yield lo, self.features[lo : min(self.n, lo + b)]

    def close(self) -> None:
        try:
            self._f.close()
        except Exception:  # noqa: BLE001 - closing twice or a half-opened file
            pass

    def __enter__(self) -> FeatureFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _attr(v):
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.generic):
        return v.item()
    return v


def check_pair(train: FeatureFile, val: FeatureFile) -> None:
    """Refuse to probe a train/val pair that did not come from the same model and layer.

    A probe fitted on one model's features and scored on another's would report a meaningless
    number, so every mismatch here is an error, not a warning.
    """
    problems = []
    if train.dim != val.dim:
        problems.append(f"feature dimension {train.dim} vs {val.dim}")
    if train.model_hash and val.model_hash and train.model_hash != val.model_hash:
        problems.append(f"model {train.model_hash[:12]} vs {val.model_hash[:12]}")
    if canonical_layer(train.layer) != canonical_layer(val.layer):
        problems.append(f"layer {train.layer!r} vs {val.layer!r}")
    tp, vp = train.attrs.get("preprocess"), val.attrs.get("preprocess")
    if tp and vp and json.loads(tp) != json.loads(vp):
        problems.append(f"preprocessing {tp} vs {vp}")
    tc, vc = train.class_names, val.class_names
    if tc is not None and vc is not None and tc != vc:
        problems.append(f"class names differ ({len(tc)} vs {len(vc)} classes)")
    if problems:
        raise UserError(
            f"{train.path} and {val.path} are not a train/val pair from one model: "
            + "; ".join(problems)
        )


def stable_attrs(path: str | os.PathLike) -> dict:
    """Root attributes minus the volatile ones (for comparing two runs)."""
    with h5py.File(path, "r") as f:
        return {k: _attr(v) for k, v in f.attrs.items() if k not in VOLATILE_ATTRS}
