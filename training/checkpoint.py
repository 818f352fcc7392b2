"""Checkpoint files: atomic writes, and strict loading of a trained model for inference.

The format (docs/contracts.md "Checkpoint") is one `torch.save` dict holding the model, EMA,
optimizer, schedule position, RNG states, data-order position, the full config and provenance.
Writes go through `s4l.io.atomic_open` (a temp file in the same folder, fsync'ed, then
`os.replace`d over the target), so a crash or a full disk never leaves a half-written checkpoint
behind.

A checkpoint is data, never code: it is read with `torch.load(weights_only=True)`, whose
unpickler builds only tensors and plain Python containers/scalars, so a file whose pickle names
any other global (`os.system`, a class's `__reduce__`) is refused before anything runs. s4l
writes nothing else (RNG states are stored as tensors and ints); the only extra types allowed
are the few globals that checkpoints written before this change carry (numpy's RNG state as an
`ndarray`, torch's `TorchVersion` string).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s4l.errors import UserError
from s4l.imaging import PreprocessSpec
from s4l.io import atomic_open
from s4l.provenance import file_sha256, git_commit
from s4l.training.model import ModelSpec, S4LModel, build_model

FORMAT = "s4l-checkpoint"
FORMAT_VERSION = 1


def config_hash(config: Any) -> str:
    """A stable hash of a JSON-able config (keys sorted)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write `payload` to `path` atomically: the previous file survives any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)
    return path


# Checkpoints written before this release hold numpy's MT19937 state as an ndarray and torch's
# version as a `TorchVersion` (a str subclass); these globals rebuild exactly those (a plain
# array of a plain dtype, a string) and nothing else.
_NP_CORE = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core to np._core
_LEGACY_GLOBALS = [np.ndarray, np.dtype, _NP_CORE.multiarray._reconstruct,
                   type(np.dtype(np.uint32)), torch.torch_version.TorchVersion]


def _refusal(path: Path, e: Exception) -> str:
    """One line for a checkpoint torch's weights-only unpickler refused."""
    # torch's message is several paragraphs (and suggests turning the check off): keep the one
    # line that names what was refused.
    lines = [ln.strip() for ln in str(e).splitlines()]
    detail = next((ln for ln in lines if "GLOBAL" in ln or ln.lower().startswith("unsupported")),
                  "forbidden objects")
    detail = detail.split(" was not an allowed")[0].split(" whose module")[0][:200].rstrip(".")
    return (f"checkpoint {path} cannot be read: it is not a valid s4l checkpoint or carries "
            f"forbidden objects ({detail}); nothing in it was run")


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint dict, checking that it is an s4l checkpoint of a known version.

    Only tensors and plain containers/scalars are unpickled (`weights_only=True`); a file that
    names any other Python object is refused with a one-line error and none of it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(_LEGACY_GLOBALS):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(_refusal(path, e)) from None
    except Exception as e:  # noqa: BLE001 - any other reading failure means a broken file
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"checkpoint {path} cannot be read: not a valid s4l checkpoint "
                        f"({type(e).__name__}: {first})") from None
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


# ============================================================================ training resume
# The save/resume half: what the trainer stores besides the model, and the strict checks that
# make resume exact or loud (S4L_REFERENCE.md section 5: "resume that silently starts fresh
# when loading fails, or restarts the LR schedule" is a known trap).

RESUME_NAME = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    """Every RNG the training step draws from: python, numpy, torch CPU and CUDA.

    Stored as tensors and ints only, so the checkpoint loads under `weights_only=True`.
    """
    import random

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state` (CUDA states only when this process uses CUDA).

    Also accepts the numpy state as the tuple `np.random.get_state()` returns, which
    checkpoints written before the tensor form hold.
    """
    import random

    random.setstate(state["python"])
    ns = state["numpy"]
    if isinstance(ns, dict):
        keys = ns["keys"].numpy() if isinstance(ns["keys"], torch.Tensor) else np.asarray(ns["keys"])
        ns = (ns["kind"], keys.astype(np.uint32), ns["pos"], ns["has_gauss"], ns["cached_gaussian"])
    np.random.set_state(ns)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def provenance() -> dict[str, Any]:
    """Where an artifact came from: git sha (if in a checkout), versions, host, time."""
    import datetime
    import platform

    from s4l import __version__

    git = git_commit()
    sha = git["commit"] and (git["commit"] + ("-dirty" if git["dirty"] else ""))
    versions = {"s4l": __version__, "torch": str(torch.__version__), "python": platform.python_version()}
    try:
        import torchvision

        versions["torchvision"] = str(torchvision.__version__)
    except ImportError:
        pass
    return {
        "git_sha": sha,
        "versions": versions,
        "host": platform.node(),
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def load_for_resume(path: str | os.PathLike, config: dict[str, Any], config_hash: str,
                    semantic_diff=None) -> dict[str, Any]:
    """Read a workdir's checkpoint for resuming, refusing one written by another config.

    `config_hash` is the hash of the run's semantic config; on a mismatch the error lists the
    differing keys (`semantic_diff(stored_config, config)` -> {key: (stored, now)}).
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    for key in ("model", "optimizer", "step", "rng", "data_state", "config", "config_hash"):
        if key not in ckpt:
            raise UserError(f"{path} cannot be resumed from: it has no {key!r} entry")
    if ckpt["config_hash"] != config_hash:
        lines = []
        if semantic_diff is not None:
            for k, (old, new) in semantic_diff(ckpt["config"], config).items():
                lines.append(f"  {k}: workdir has {old!r}, this run has {new!r}")
        detail = "\n".join(lines) if lines else "  (config hashes differ)"
        raise UserError(
            f"the workdir {path.parent} holds a run with a different configuration; refusing to "
            f"resume it. Differing keys:\n{detail}\nUse another --workdir, or repeat the "
            "original command to continue that run."
        )
    return ckpt


def find_resume(workdir: str | os.PathLike) -> Path | None:
    """The workdir's checkpoint to resume from, or None for a fresh run."""
    p = Path(workdir) / RESUME_NAME
    return p if p.exists() else None
