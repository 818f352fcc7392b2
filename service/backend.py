"""Inference backends behind one small interface: ONNX Runtime for serving, a deterministic dummy for tests."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from s4l.imaging import PreprocessSpec
from s4l.provenance import file_sha256

log = logging.getLogger(__name__)

INPUT_NAME = "images"
EMBEDDING = "embedding"
LOGITS = "logits"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ModelLoadError(Exception):
    """The model file is missing, is not an s4l ONNX export, or the requested provider is absent."""


@dataclass(frozen=True)
class ModelInfo:
    """What the server knows about the loaded model, all read from the model itself."""

    model_id: str
    preprocess: PreprocessSpec
    embedding_dim: int
    class_names: list[str] | None
    num_classes: int | None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return self.preprocess.crop


class Backend(Protocol):
    """Runs a uint8 ``[N, H, W, 3]`` batch; returns ``embedding`` ``[N, D]`` and maybe ``logits``."""

    info: ModelInfo
    provider: str

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def available_cpus() -> int:
    """CPUs this process may really use: affinity mask, then the cgroup CPU quota (containers)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def _cgroup_cpu_quota() -> float | None:
    v2 = Path("/sys/fs/cgroup/cpu.max")
    try:
        if v2.exists():
            q, p = v2.read_text().split()[:2]
            return None if q == "max" else int(q) / int(p)
        q1 = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
        p1 = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
        if q1.exists() and p1.exists():
            q, p = int(q1.read_text()), int(p1.read_text())
            return None if q <= 0 else q / p
    except (OSError, ValueError):
        return None
    return None


def parse_metadata(meta: dict[str, str], *, source: str) -> tuple[PreprocessSpec, list[str] | None, int]:
    """Read the s4l metadata_props (docs/contracts.md, "ONNX model") or say what is missing."""
    missing = [k for k in ("s4l.preprocess", "s4l.embedding_dim") if k not in meta]
    if missing:
        raise ModelLoadError(f"{source} is not an s4l export: metadata {missing} missing "
                             "(export it with `s4l export`)")
    try:
        spec = PreprocessSpec.from_dict(json.loads(meta["s4l.preprocess"]))
        dim = int(meta["s4l.embedding_dim"])
        names = json.loads(meta["s4l.class_names"]) if meta.get("s4l.class_names") else None
    except (ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(f"{source}: unreadable s4l metadata: {e}") from e
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ModelLoadError(f"{source}: s4l.class_names must be a JSON list of strings")
    return spec, names, dim


def choose_providers(requested: str, available: list[str]) -> list[str]:
    """cpu -> CPU only; cuda -> CUDA or refuse; auto -> CUDA when present, else CPU."""
    if requested == "cpu":
        return [CPU]
    if requested == "cuda":
        if CUDA not in available:
            raise ModelLoadError(
                f"provider 'cuda' requested but onnxruntime offers only {available}; install "
                "onnxruntime-gpu with a working CUDA runtime, or set S4L_PROVIDER=cpu")
        return [CUDA, CPU]
    if requested == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    raise ModelLoadError(f"unknown provider {requested!r} (cpu, cuda or auto)")


class OnnxBackend:
    """An onnxruntime session over an ``s4l export`` file, thread pools sized to the usable CPUs."""

    backend = "onnxruntime"
    precision = "fp32"

    def __init__(self, path: str | os.PathLike, *, provider: str = "cpu", intra_op_threads: int = 0,
                 model_id: str | None = None, spinning: bool = False):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"model file {path} does not exist")
        if not os.access(path, os.R_OK):
            raise ModelLoadError(f"model file {path} is not readable by this user (uid "
                                 f"{os.getuid()}): permission denied")
        from s4l.onnxcheck import OnnxCheckError, check_onnx_file

        try:
            check_onnx_file(path)  # before onnxruntime reads anything the file points to
        except OnnxCheckError as e:
            raise ModelLoadError(str(e)) from None
        providers = choose_providers(provider, ort.get_available_providers())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads or available_cpus()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning threads keep cores busy between calls; the server decodes images on the same
        # cores, so by default they sleep instead (S4L_ORT_SPINNING=true to change).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"onnxruntime cannot load {path}: {e}") from e
        active = self.session.get_providers()
        if provider == "cuda" and active[0] != CUDA:
            raise ModelLoadError(f"provider 'cuda' requested but the session runs on {active}")
        self.provider = active[0]
        self.threads = opts.intra_op_num_threads

        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME or inputs[0].type != "tensor(uint8)":
            raise ModelLoadError(f"{path}: expected one uint8 input named {INPUT_NAME!r}, got "
                                 f"{[(i.name, i.type) for i in inputs]}")
        self.output_names = [o.name for o in self.session.get_outputs()]
        if EMBEDDING not in self.output_names:
            raise ModelLoadError(f"{path}: no {EMBEDDING!r} output (has {self.output_names})")
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        spec, names, dim = parse_metadata(meta, source=str(path))
        shape = inputs[0].shape
        if len(shape) != 4 or shape[1:] != [spec.crop, spec.crop, 3]:
            raise ModelLoadError(f"{path}: input shape {shape} does not match crop {spec.crop}")
        num_classes = None
        if LOGITS in self.output_names:
            c = self.session.get_outputs()[self.output_names.index(LOGITS)].shape[-1]
            num_classes = int(c) if isinstance(c, int) else (len(names) if names else None)
        sha = file_sha256(path)
        self.info = ModelInfo(model_id=model_id or f"{path.stem}-{sha[:12]}", preprocess=spec,
                              embedding_dim=dim, class_names=names, num_classes=num_classes,
                              metadata={**meta, "file_sha256": sha})
        log.info("loaded %s on %s with %d intra-op threads", path, self.provider, self.threads)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {INPUT_NAME: images})
        return dict(zip(self.output_names, outs))

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


class DummyBackend:
    """Deterministic stand-in for unit tests of batching and routing (integration tests use ONNX).

    The embedding of an image is its first ``dim`` pixel values / 255 plus its mean, so every
    result can be checked against its own input; every batch size is recorded.
    """

    def __init__(self, *, crop: int = 32, dim: int = 8, class_names: list[str] | None = None,
                 delay_s: float = 0.0, fail_on_value: int | None = None):
        spec = PreprocessSpec(resize=crop, crop=crop, interpolation="area")
        self.info = ModelInfo(model_id="dummy", preprocess=spec, embedding_dim=dim,
                              class_names=class_names,
                              num_classes=len(class_names) if class_names else None)
        self.provider = "dummy"
        self.backend, self.precision = "dummy", "fp32"
        self.delay_s = delay_s
        self.fail_on_value = fail_on_value
        self.batch_sizes: list[int] = []
        self._lock = threading.Lock()
        self.concurrent = 0
        self.max_concurrent = 0

    def expected(self, crop: np.ndarray) -> dict[str, np.ndarray]:
        """What run() gives for one preprocessed image (tests compare against it)."""
        return {k: v[0] for k, v in self._compute(crop[None]).items()}

    def _compute(self, images: np.ndarray) -> dict[str, np.ndarray]:
        flat = images.reshape(len(images), -1).astype(np.float32)
        emb = flat[:, : self.info.embedding_dim] / 255.0 + flat.mean(1, keepdims=True) / 255.0
        out = {EMBEDDING: emb.astype(np.float32)}
        if self.info.num_classes:
            c = self.info.num_classes
            means = flat.reshape(len(images), -1, 3).mean(1) / 255.0  # [N, 3]
            out[LOGITS] = np.stack([means[:, i % 3] * (i + 1) for i in range(c)], 1).astype(np.float32)
        return out

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        with self._lock:
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
            self.batch_sizes.append(len(images))
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            if self.fail_on_value is not None and (images == self.fail_on_value).all(axis=(1, 2, 3)).any():
                raise RuntimeError("dummy backend asked to fail on this batch")
            return self._compute(images)
        finally:
            with self._lock:
                self.concurrent -= 1

    def close(self) -> None:
        pass


def describe(backend: Backend) -> dict[str, Any]:
    info = backend.info
    return {"model": info.model_id, "provider": backend.provider,
            "backend": getattr(backend, "backend", "onnxruntime"),
            "precision": getattr(backend, "precision", "fp32"), "embedding_dim": info.embedding_dim,
            "num_classes": info.num_classes, "labels": info.class_names,
            "preprocess": info.preprocess.to_dict(), "input": {"name": INPUT_NAME, "dtype": "uint8",
            "shape": ["N", info.image_size, info.image_size, 3]}}
