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
        try:
            self._check(self._f)
        except BaseException:
            self.close()
            raise
        f = self._f
        self.features: h5py.Dataset = f["features"]
        self.attrs = {k: _attr(v) for k, v in f.attrs.items()}

    def _check(self, f: h5py.File) -> None:
        """The contract, checked before any row is read: schema, types, lengths, storage.

        A feature file is data from someone else: every dataset must be stored in this file
        (no external links, virtual datasets or external raw storage that would make h5py read
        other files), have the dtype and length the contract says, and hold the bytes its
        shape declares (so a tiny file cannot ask for terabytes of zeros).
        """
        where = str(self.path)
        version = f.attrs.get("schema_version")
        if version is None:
            raise UserError(f"{where} has no schema_version attribute: not an s4l feature file")
        if isinstance(version, np.ndarray) or not isinstance(version, int | np.integer):
            raise UserError(f"{where}: schema_version {version!r} is not an integer; "
                            "not an s4l feature file")
        if int(version) != SCHEMA_VERSION:
            raise UserError(
                f"{where} has feature schema version {int(version)}; this s4l reads "
                f"version {SCHEMA_VERSION}. Re-extract it with this version's `s4l extract`."
            )
        missing = [k for k in ("features", "labels", "paths") if k not in f]
        if missing:
            raise UserError(f"{where} lacks dataset(s) {missing}")
        names = [k for k in ROW_DATASETS if k in f]
        if "errors" in f:
            names += ["errors/path", "errors/reason"]
        for name in names:
            _check_local_dataset(f, name, where)
        feats = f["features"]
        if feats.ndim != 2 or feats.dtype.kind != "f":
            raise UserError(f"{where}: features must be a 2-D float array, got "
                            f"{feats.dtype} of shape {feats.shape}")
        n = feats.shape[0]
        if f["labels"].shape != (n,) or f["labels"].dtype.kind not in "iu":
            raise UserError(f"{where}: features {feats.shape} and labels {f['labels'].shape} "
                            f"({f['labels'].dtype}) disagree: labels must be {n} integers")
        if f["paths"].shape != (n,) or h5py.check_string_dtype(f["paths"].dtype) is None:
            raise UserError(f"{where}: paths must be {n} strings, got {f['paths'].dtype} of "
                            f"shape {f['paths'].shape}")
        if "logits" in f:
            lg = f["logits"]
            if lg.ndim != 2 or lg.shape[0] != n or lg.dtype.kind != "f":
                raise UserError(f"{where}: logits must be a float [{n}, C] array, got "
                                f"{lg.dtype} of shape {lg.shape}")
        if "errors" in f:
            for k in ("path", "reason"):
                if h5py.check_string_dtype(f["errors"][k].dtype) is None or f["errors"][k].ndim != 1:
                    raise UserError(f"{where}: errors/{k} must be a list of strings")
            if f["errors/path"].shape != f["errors/reason"].shape:
                raise UserError(f"{where}: errors/path and errors/reason differ in length")
        cn = f.attrs.get("class_names")
        if isinstance(cn, bytes | str) and _attr(cn) not in ("", "null"):
            from s4l.safeload import parse_json

            names_ = parse_json(_attr(cn), f"{where} attribute class_names")
            if not isinstance(names_, list) or not all(isinstance(c, str) for c in names_):
                raise UserError(f"{where}: attribute class_names must be a JSON list of strings")

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

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Feature rows ``[lo, hi)``, refused if any value is NaN or infinite."""
        x = self.features[lo:hi]
        _check_finite(x, f"{self.path}: features rows {lo}..{hi}")
        return x

    def read_logits(self) -> np.ndarray | None:
        """All logits (None without a class head), refused if any value is NaN or infinite."""
        if self.logits is None:
            return None
        x = self.logits[...]
        _check_finite(x, f"{self.path}: logits")
        return x

    def iter_blocks(self, order: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start_row, features block)`` chunk by chunk, in ``order`` of block indices."""
        b = self.block_rows
        nblocks = (self.n + b - 1) // b
        for i in range(nblocks) if order is None else order:
            lo = i * b
            yield lo, self.rows(lo, min(self.n, lo + b))

    def close(self) -> None:
        try:
            self._f.close()
        except Exception:  # noqa: BLE001 - closing twice or a half-opened file
            pass

    def __enter__(self) -> FeatureFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# A compressed dataset may legitimately be smaller than its data, but not by more than this
# (float features compress a few times at most; a bomb of zeros compresses ~1000x).
MAX_COMPRESSION_RATIO = 64


def _check_local_dataset(f: h5py.File, name: str, where: str) -> None:
    """`name` is a real dataset of this file whose declared size its storage backs."""
    parent, _, leaf = name.rpartition("/")
    grp = f[parent] if parent else f
    link = grp.get(leaf, getlink=True)
    if isinstance(link, h5py.ExternalLink):
        raise UserError(f"{where}: {name} is an external link to {link.filename!r}; a feature "
                        "file must hold its own data")
    if isinstance(link, h5py.SoftLink):
        raise UserError(f"{where}: {name} is a soft link ({link.path}); expected a dataset")
    ds = grp[leaf]
    if not isinstance(ds, h5py.Dataset):
        raise UserError(f"{where}: {name} is not a dataset")
    if ds.is_virtual:
        raise UserError(f"{where}: {name} is a virtual dataset (it maps other files); "
                        "a feature file must hold its own data")
    if ds.external:
        raise UserError(f"{where}: {name} keeps its data in external file(s) "
                        f"{[e[0] for e in ds.external][:3]}; a feature file must hold its own data")
    if ds.dtype.kind == "O" and h5py.check_string_dtype(ds.dtype) is None:
        raise UserError(f"{where}: {name} holds objects of type {ds.dtype}, not numbers or strings")
    # Variable-length strings store a heap reference per element (16 bytes with default file
    # settings; 8 is a safe floor); the strings themselves live in the file's heap.
    per_item = 8 if ds.dtype.kind == "O" else ds.dtype.itemsize
    declared = int(np.prod(ds.shape, dtype=np.int64)) * per_item
    stored = ds.id.get_storage_size()
    ratio = 1 if ds.compression is None else MAX_COMPRESSION_RATIO
    if declared > stored * ratio:
        raise UserError(f"{where}: {name} declares shape {ds.shape} ({declared / 2**20:.1f} MiB) "
                        f"but the file stores only {stored / 2**20:.1f} MiB of it; the file is "
                        "truncated or not a real feature file")


def _check_finite(x: np.ndarray, what: str) -> None:
    if x.size and not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=tuple(range(1, x.ndim))))[0])
        raise UserError(f"{what} hold NaN or infinite values (first at row offset {bad}); "
                        "features must be finite numbers")


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
