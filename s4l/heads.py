"""Head artifacts: a fitted linear task head on the raw embedding, saved and loaded with checks.

A head file is an ``.npz`` (no pickle, no object arrays) holding ``weight`` ``[C, D]`` float32,
``bias`` ``[C]`` float32 and ``meta``: a UTF-8 JSON document stored as a uint8 array. The
metadata carries the class names, the model hash, layer and preprocessing of the feature files
the head was fitted on, its validation metrics, solver and settings, the s4l version, and a
sha256 over the arrays, so a hand-edited or truncated file is refused rather than served.
Torch-free and sklearn-free: the server imports this module.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from s4l.errors import UserError
from s4l.io import atomic_write_bytes
from s4l.safeload import load_npz_safely, parse_json

FORMAT = "s4l-head"
FORMAT_VERSION = 1
MAX_HEAD_BYTES = 512 * 1024 * 1024  # 64k classes x 2048 dims of float32 fits well under this
# `embedding` in an ONNX model is the checkpoint's `pre_logits` (docs/contracts.md).
_LAYER_ALIASES = {"embedding": "pre_logits"}


def canonical_layer(name: str) -> str:
    return _LAYER_ALIASES.get(name, name)


@dataclass(frozen=True, eq=False)
class Head:
    """Scores = embedding @ weight.T + bias, on the raw (unstandardised) embedding."""

    weight: np.ndarray  # [C, D] float32
    bias: np.ndarray  # [C] float32
    class_names: tuple[str, ...]
    model_hash: str
    layer: str = "pre_logits"
    preprocess: dict | None = None
    metrics: dict = field(default_factory=dict)  # validation top1/top5 (percent)
    solver: str = ""
    settings: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)  # s4l version, feature files, created_at

    def __post_init__(self):
        w = np.ascontiguousarray(self.weight, np.float32)
        b = np.ascontiguousarray(self.bias, np.float32)
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise UserError(f"head weight {w.shape} and bias {b.shape} disagree (want [C, D], [C])")
        if len(self.class_names) != w.shape[0]:
            raise UserError(f"head has {w.shape[0]} rows but {len(self.class_names)} class names")
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise UserError("head weights hold NaN or infinite values")
        w.setflags(write=False)
        b.setflags(write=False)
        wt = np.ascontiguousarray(w.T)  # [D, C]: a plain GEMM, 2-4x faster than a strided w.T
        wt.setflags(write=False)
        object.__setattr__(self, "_weight_t", wt)
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "bias", b)
        object.__setattr__(self, "class_names", tuple(str(n) for n in self.class_names))

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def apply(self, embeddings: np.ndarray) -> np.ndarray:
        """[N, D] raw embeddings -> [N, C] float32 logits."""
        return np.dot(np.asarray(embeddings, np.float32), self._weight_t) + self.bias

    def describe(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "dim": self.dim, "labels": list(self.class_names),
                "model_hash": self.model_hash, "layer": self.layer, "metrics": self.metrics,
                "solver": self.solver, "settings": self.settings, "provenance": self.provenance}


def from_standardized(weight, bias, mean, scale, **kw) -> Head:
    """Fold a per-dimension standardisation ``(x - mean) / scale`` into the linear layer, so
    the head applies to raw embeddings: W' = W / scale, b' = b - W' @ mean (float64, then fp32)."""
    w = np.asarray(weight, np.float64) / np.asarray(scale, np.float64)[None, :]
    b = np.asarray(bias, np.float64) - w @ np.asarray(mean, np.float64)
    return Head(weight=w.astype(np.float32), bias=b.astype(np.float32), **kw)


def _arrays_sha256(weight: np.ndarray, bias: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in (weight, bias):
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a, "<f4").tobytes())
    return h.hexdigest()


def save_head(path: str | os.PathLike, head: Head) -> Path:
    """Write ``head`` atomically (temp file, fsync, rename)."""
    import s4l

    path = Path(path)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "class_names": list(head.class_names),
            "model_hash": head.model_hash, "layer": head.layer, "preprocess": head.preprocess,
            "metrics": head.metrics, "solver": head.solver, "settings": head.settings,
            "provenance": {"s4l_version": s4l.__version__, **head.provenance},
            "shape": list(head.weight.shape),
            "arrays_sha256": _arrays_sha256(head.weight, head.bias)}
    blob = np.frombuffer(json.dumps(meta, sort_keys=True, allow_nan=False).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, weight=head.weight.astype("<f4"), bias=head.bias.astype("<f4"), meta=blob)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, buf.getvalue())


def load_head(path: str | os.PathLike, *, max_bytes: int = MAX_HEAD_BYTES) -> Head:
    """Read and verify a head file; any problem is a UserError with a one-line reason."""
    path = Path(path)
    where = f"head file {path}"
    # One pickle-free reader for every .npz s4l accepts (object arrays and zip bombs refused).
    arrays = load_npz_safely(path, max_bytes, what="head file")
    missing = {"weight", "bias", "meta"} - set(arrays)
    if missing:
        raise UserError(f"{where}: not an s4l head (missing {sorted(missing)})")
    weight, bias, blob = arrays["weight"], arrays["bias"], arrays["meta"]
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise UserError(f"{where}: metadata is not a uint8 JSON blob")
    try:
        text = blob.tobytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: metadata is not valid JSON ({e})") from None
    meta = parse_json(text, f"{where} metadata")  # strict: repeated keys, NaN refused
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{where}: not an s4l head (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{where}: format version {meta.get('format_version')!r}, this s4l reads {FORMAT_VERSION}")
    if weight.dtype != np.float32 or bias.dtype != np.float32:
        raise UserError(f"{where}: weight/bias must be float32, got {weight.dtype}/{bias.dtype}")
    if list(weight.shape) != meta.get("shape"):
        raise UserError(f"{where}: weight shape {list(weight.shape)} but metadata says {meta.get('shape')}")
    if _arrays_sha256(weight, bias) != meta.get("arrays_sha256"):
        raise UserError(f"{where}: weights do not match their recorded sha256 (edited or corrupted)")
    names = meta.get("class_names")
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise UserError(f"{where}: class_names must be a list of strings")
    if not isinstance(meta.get("model_hash"), str) or not meta["model_hash"]:
        raise UserError(f"{where}: no model_hash recorded")
    try:
        return Head(weight=weight, bias=bias, class_names=tuple(names), model_hash=meta["model_hash"],
                    layer=str(meta.get("layer", "pre_logits")), preprocess=meta.get("preprocess"),
                    metrics=dict(meta.get("metrics") or {}), solver=str(meta.get("solver", "")),
                    settings=dict(meta.get("settings") or {}),
                    provenance=dict(meta.get("provenance") or {}))
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def check(head: Head, *, model_dim: int, model_hash: str, layer: str = "pre_logits",
          name: str = "head") -> None:
    """Refuse a head fitted on another model, layer or embedding size (UserError, one line)."""
    if head.dim != model_dim:
        raise UserError(f"head {name!r} takes {head.dim}-d features but the model's embedding is "
                        f"{model_dim}-d")
    if canonical_layer(head.layer) != canonical_layer(layer):
        raise UserError(f"head {name!r} was fitted on layer {head.layer!r}, the model serves {layer!r}")
    if head.model_hash != model_hash:
        raise UserError(f"head {name!r} was fitted on features of model {head.model_hash[:12]}, "
                        f"this model is {model_hash[:12]}")


def parse_head_spec(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (name, path)."""
    name, sep, path = spec.partition("=")
    name = name.strip()
    if not sep or not name or not path:
        raise UserError(f"--head wants NAME=PATH, got {spec!r}")
    if not all(c.isalnum() or c in "-_." for c in name):
        raise UserError(f"head name {name!r}: use letters, digits, '-', '_' or '.'")
    return name, path
