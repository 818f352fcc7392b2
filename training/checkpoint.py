"""Checkpoint files: atomic writes, and strict loading of a trained model for inference.

The format (docs/contracts.md "Checkpoint") is one `torch.save` dict holding the model, EMA,
optimizer, schedule position, RNG states, data-order position, the full config and provenance.
Writes go to a temporary file in the same folder, are fsync'ed, then `os.replace`d over the
target, so a crash or a full disk never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from s4l.training.model import ModelSpec, S4LModel, build_model

from s4l.errors import UserError
from s4l.imaging import PreprocessSpec

FORMAT = "s4l-checkpoint"
FORMAT_VERSION = 1


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_hash(config: Any) -> str:
    """A stable hash of a JSON-able config (keys sorted)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write `payload` to `path` atomically: the previous file survives any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint dict, checking that it is an s4l checkpoint of a known version."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a broken file
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not an s4l checkpoint (no format={FORMAT!r} marker)")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path} has checkpoint format version {ckpt.get('format_version')}, "
            f"this s4l reads version {FORMAT_VERSION}"
        )
    return ckpt


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True) with an error that names the mismatching keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
        if shape:
            parts.append(
                f"{len(shape)} shape mismatches (e.g. {shape[0]}: checkpoint "
                f"{tuple(state[shape[0]].shape)} vs model {tuple(own[shape[0]].shape)})"
            )
        raise UserError(f"{what} does not match the model: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


@dataclasses.dataclass
class InferenceModel:
    """A trained model ready for inference, with what is needed to use it correctly."""

    model: S4LModel
    spec: ModelSpec
    class_names: list[str] | None
    preprocess: PreprocessSpec
    config: dict[str, Any]
    sha256: str
    path: Path
    used_ema: bool


def load_for_inference(
    path: str | os.PathLike, use_ema: bool | None = None, map_location: str = "cpu"
) -> InferenceModel:
    """Load a checkpoint's model in eval mode (EMA weights when present, unless use_ema=False)."""
    path = Path(path)
    ckpt = read_checkpoint(path, map_location=map_location)
    try:
        spec = ModelSpec.from_dict(ckpt["model_spec"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: bad or missing model_spec ({e})") from e
    model = build_model(spec)
    ema = ckpt.get("ema")
    if use_ema is True and ema is None:
        raise UserError(f"{path} has no EMA weights (trained without EMA); drop --ema")
    used_ema = ema is not None and use_ema is not False
    load_state_strict(model, ema if used_ema else ckpt["model"], f"{path} ({'ema' if used_ema else 'model'})")
    model.eval()
    return InferenceModel(
        model=model,
        spec=spec,
        class_names=ckpt.get("class_names"),
        preprocess=PreprocessSpec.from_dict(ckpt.get("preprocess") or {}),
        config=ckpt.get("config") or {},
        sha256=file_sha256(path),
        path=path,
        used_ema=used_ema,
    )
