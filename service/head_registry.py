"""The server's task heads: one immutable registry (model head + head files), swapped whole on reload.

A request takes ``state.heads`` once and uses that object to the end, so a reload (admin route
or SIGHUP) that replaces the reference never changes the heads of a request in flight. Loading
checks every file against the served model (embedding size, model hash, layer) and refuses the
whole set when one file is bad: the old registry stays.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from s4l.errors import UserError
from s4l.heads import Head, check, load_head, parse_head_spec
from s4l.service.backend import LOGITS, ModelInfo

MODEL_HEAD = "model"  # the exported model's own class head (its `logits` output)
MODEL_LAYER = "pre_logits"  # what an s4l export's `embedding` output is


def model_hash(info: ModelInfo) -> str:
    """The hash feature files and heads record for this model: the checkpoint's sha256 that
    ``s4l export`` wrote into the ONNX metadata (what ``s4l extract`` on either the checkpoint or
    the ONNX file records), else the ONNX file's own sha256."""
    md = info.metadata
    return md.get("s4l.checkpoint_sha256") or md.get("file_sha256") or info.model_id


@dataclass(frozen=True)
class HeadRegistry:
    """Heads by name, the default, and where each came from. Never mutated: replaced."""

    heads: dict[str, Head]
    paths: dict[str, str]
    model_head: bool  # the model has its own `logits` output, served as "model"
    model_labels: tuple[str, ...] | None = None
    generation: int = 0
    loaded_at: float = field(default_factory=time.time)

    @property
    def names(self) -> list[str]:
        return ([MODEL_HEAD] if self.model_head else []) + list(self.heads)

    @property
    def default(self) -> str | None:
        if self.model_head:
            return MODEL_HEAD
        return next(iter(self.heads)) if len(self.heads) == 1 else None

    def describe(self, info: ModelInfo) -> dict[str, Any]:
        items = []
        if self.model_head:
            items.append({"name": MODEL_HEAD, "source": "model", "path": None,
                          "num_classes": info.num_classes, "labels": info.class_names,
                          "model_hash": model_hash(info), "layer": MODEL_LAYER, "metrics": {},
                          "solver": None, "settings": {}, "provenance": {}})
        for name, h in self.heads.items():
            items.append({"name": name, "source": "file", "path": self.paths[name], **h.describe()})
        return {"default": self.default, "generation": self.generation,
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
                "heads": items}


def load_registry(specs: tuple[str, ...] | list[str], info: ModelInfo, *, has_logits: bool,
                  generation: int = 0) -> HeadRegistry:
    """Read and check every ``NAME=PATH``; a UserError with a one-line reason on any problem."""
    heads: dict[str, Head] = {}
    paths: dict[str, str] = {}
    mh = model_hash(info)
    for spec in specs:
        name, path = parse_head_spec(spec)
        if name == MODEL_HEAD:
            raise UserError(f"head name {MODEL_HEAD!r} is reserved for the model's own class head")
        if name in heads:
            raise UserError(f"head {name!r} given twice")
        head = load_head(path)
        check(head, model_dim=info.embedding_dim, model_hash=mh, layer=MODEL_LAYER, name=name)
        heads[name], paths[name] = head, str(path)
    return HeadRegistry(heads=heads, paths=paths, model_head=has_logits,
                        model_labels=tuple(info.class_names) if info.class_names else None,
                        generation=generation)


def head_logits(registry: HeadRegistry, names: list[str], outs: list[dict]) -> dict[str, np.ndarray]:
    """Logits [N, C] of each named head over the model outputs of N images (one matmul per head
    over the whole request: the backbone ran once per image, whatever the number of heads)."""
    emb = np.stack([o["embedding"] for o in outs]) if outs else None
    result = {}
    for name in names:
        if name == MODEL_HEAD:
            result[name] = np.stack([o[LOGITS] for o in outs]) if outs else np.zeros((0, 0), np.float32)
        else:
            h = registry.heads[name]
            with np.errstate(over="ignore", invalid="ignore"):  # the route reports non-finite rows
                result[name] = h.apply(emb) if emb is not None else np.zeros((0, h.num_classes), np.float32)
    return result


_reload_lock = threading.Lock()


def reload_heads(state) -> HeadRegistry:
    """Re-read the head files named at start-up and swap them in at once (one reference
    assignment). A bad file raises UserError and leaves ``state.heads`` as it was."""
    with _reload_lock:
        old = state.heads
        specs = tuple(f"{n}={p}" for n, p in old.paths.items()) if old else state.settings.heads
        new = load_registry(specs, state.backend.info, has_logits=old.model_head if old else False,
                            generation=(old.generation + 1) if old else 0)
        state.heads = new
        return new
