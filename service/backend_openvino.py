"""The OpenVINO backend: the same s4l ONNX file on OpenVINO's CPU plugin in fp32 or native bf16, gated
against onnxruntime fp32 before it may serve or extract (issue 29; docs/service.md "Backends").

Torch-free, like the rest of the server. ``openvino`` is an optional extra (``pip install
s4l[openvino]``): it is imported only when this backend is asked for, and its absence is one line.

Why a gate: bf16 keeps fp32's exponent range but only 8 bits of mantissa, so a deep network's
outputs drift by ~1e-3 relative. The gate runs the candidate and onnxruntime fp32 on the same
held-out crops and accepts when every embedding's cosine similarity is >= ``COSINE_GATE`` and the
top-1 class of the model's own head and of every task head agrees on every image. An int8
export is compared with onnxruntime running the same int8 file, at ``INT8_COSINE_GATE``.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from s4l.service.backend import EMBEDDING, INPUT_NAME, LOGITS, ModelLoadError, OnnxBackend

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "auto")
COSINE_GATE = 0.9999  # min cosine similarity of every held-out embedding vs onnxruntime fp32
# An int8 export runs int8 on both engines, each rounding its requantisation its own way
# (measured on the test model: cosine 0.99990 between them, OpenVINO fp32 or bf16 hint alike);
# the file's own agreement with fp32 was measured when it was made (s4l.int8_report).
INT8_COSINE_GATE = 0.999
# ... and they flip near-ties of the class head: the int8 file's top-1 agreement with fp32 is
# itself below 1 (s4l.int8_report), so two int8 engines are held to 0.95 rather than 1.
INT8_TOP1_GATE = 0.95
TOP1_GATE = 1.0  # top-1 agreement required on the model's head and on every task head
GATE_IMAGES = 32  # built-in held-out crops when no folder of images is given
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instructions that compute bf16 natively
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA, which OpenVINO's CPU kernels obey) that still allow native
# bf16. Capped below these, OpenVINO keeps listing BF16 and defaulting to it, but runs it
# emulated: measured here at 0.26x its fp32 with the cap at AVX512_CORE_VNNI (docs/benchmarks.md).
BF16_ISA_CAPS = ("ALL", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX",
                 "AVX10_1_512_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512",
                 "AVX10_2_512_AMX_2")
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}
INSTALL_HINT = "pip install 's4l[openvino]'"


def import_openvino():
    """The openvino module, or a ModelLoadError with one line saying how to get it."""
    try:
        import openvino
    except ImportError as e:
        raise ModelLoadError(
            f"backend 'openvino' needs the openvino package, which cannot be imported here ({e}); "
            f"install it with {INSTALL_HINT}, or use --backend onnxruntime") from None
    return openvino


# -- which precision: bf16 only where the CPU computes it natively ---------------------------


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> set[str]:
    """The first CPU's feature flags from /proc/cpuinfo (empty when unreadable: not Linux)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


@dataclass(frozen=True)
class Bf16Support:
    """Whether bf16 is native here, and the evidence: the CPU's flags and OpenVINO's capabilities."""

    native: bool
    cpu_flags: tuple[str, ...]  # the bf16 flags present (avx512_bf16, amx_bf16)
    openvino_capabilities: tuple[str, ...]
    reason: str


def bf16_support(capabilities: list[str] | tuple[str, ...], flags: set[str] | None = None,
                 machine: str | None = None, isa_cap: str | None = None) -> Bf16Support:
    """Native bf16 needs both: OpenVINO's CPU plugin lists ``BF16`` in OPTIMIZATION_CAPABILITIES
    and the CPU has an instruction that computes it (AVX512_BF16: Intel Cooper Lake, Sapphire
    Rapids and later, AMD Zen 4 and later; AMX-BF16), and no ``ONEDNN_MAX_CPU_ISA`` cap below
    them. Without those OpenVINO still lists BF16 and runs it by converting in software, slower
    than fp32: that is never chosen."""
    flags = cpu_flags() if flags is None else flags
    isa_cap = os.environ.get("ONEDNN_MAX_CPU_ISA") if isa_cap is None else isa_cap
    machine = (machine or platform.machine()).lower()
    present = tuple(f for f in BF16_CPU_FLAGS if f in flags)
    caps = tuple(capabilities)
    if machine not in ("x86_64", "amd64"):
        return Bf16Support(False, present, caps, f"{machine}: native bf16 is only detected on x86-64 here")
    if "BF16" not in caps:
        return Bf16Support(False, present, caps, "OpenVINO's CPU plugin does not offer BF16 on this CPU")
    if not present:
        return Bf16Support(False, present, caps, "the CPU has neither avx512_bf16 nor amx_bf16: "
                           "bf16 would be emulated, slower than fp32")
    if isa_cap and isa_cap.strip().upper() not in BF16_ISA_CAPS:
        return Bf16Support(False, present, caps, f"ONEDNN_MAX_CPU_ISA={isa_cap} caps the kernels "
                           "below bf16: bf16 would be emulated, slower than fp32")
    return Bf16Support(True, present, caps, f"CPU flags {', '.join(present)}; OpenVINO capability BF16")


def resolve_precision(backend: str, requested: str, support: Bf16Support | None) -> str:
    """fp32 or bf16 for ``requested`` (fp32, bf16, auto) on ``backend``, or a one-line refusal."""
    if requested not in PRECISIONS:
        raise ModelLoadError(f"unknown precision {requested!r} (fp32, bf16 or auto)")
    if backend not in BACKENDS:
        raise ModelLoadError(f"unknown backend {backend!r} (onnxruntime or openvino)")
    if backend == "onnxruntime":
        if requested == "bf16":
            raise ModelLoadError("precision 'bf16' needs --backend openvino (onnxruntime's CPU "
                                 "provider runs this model in fp32 only)")
        return "fp32"
    if requested == "fp32":
        return "fp32"
    assert support is not None
    if requested == "bf16" and not support.native:
        raise ModelLoadError(f"precision 'bf16' refused: {support.reason}; use --precision auto "
                             "or fp32")
    return "bf16" if support.native else "fp32"


# -- the compiled model ------------------------------------------------------------------------


class OpenVinoModel:
    """One ONNX file compiled for OpenVINO's CPU plugin at a given precision; ``run`` as the backend's."""

    def __init__(self, path: str | os.PathLike, precision: str, *, threads: int):
        ov = import_openvino()
        self.core = ov.Core()
        try:
            model = self.core.read_model(str(path))
            # The hint is explicit both ways: on a CPU with AMX, OpenVINO's own default is bf16.
            # One stream with all threads: the server and extraction make one call at a time
            # and parallelise inside it; no pinning, since decoding shares these cores.
            config = {"INFERENCE_PRECISION_HINT": _OV_PRECISION[precision],
                      "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                      "INFERENCE_NUM_THREADS": int(threads), "ENABLE_CPU_PINNING": False}
            self.compiled = self.core.compile_model(model, "CPU", config)
        except Exception as e:  # openvino raises RuntimeError and its own types
            raise ModelLoadError(f"openvino cannot compile {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        self.precision = precision
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: calls take turns

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        with self._lock:
            res = self._request.infer({INPUT_NAME: np.ascontiguousarray(images)})
            # Copies: the request's output buffers are reused by the next call.
            return {n: np.array(res[o], dtype=np.float32, copy=True)
                    for n, o in zip(self.output_names, self.compiled.outputs)}

    def close(self) -> None:
        # The request before the model it belongs to, the model before its Core.
        with self._lock:
            self._request = None
            self.compiled = None  # type: ignore[assignment]
            self.core = None


# -- the parity gate ---------------------------------------------------------------------------


def gate_images(spec, folder: str | os.PathLike | None = None, n: int = GATE_IMAGES) -> np.ndarray:
    """Held-out uint8 crops for the gate: up to ``n`` images of ``folder`` (any files Pillow
    reads, through the service's eval crop), else ``n`` built-in ones: smooth random colour
    fields with edges and noise, closer to photographs' statistics than uniform noise."""
    if folder is not None:
        from s4l.imaging import ImageError, decode_image, eval_crop

        files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
        crops = []
        for p in files:
            try:
                crops.append(eval_crop(decode_image(p.read_bytes()), spec))
            except (ImageError, OSError):
                continue
            if len(crops) == n:
                break
        if not crops:
            raise ModelLoadError(f"parity images: no readable image in {folder}")
        return np.stack(crops)
    from PIL import Image

    rng = np.random.default_rng(20261207)
    crop = spec.crop
    out = np.empty((n, crop, crop, 3), np.uint8)
    for i in range(n):
        cells = int(rng.integers(2, 9))
        low = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(low).resize((crop, crop), Image.BICUBIC), np.float32)
        if i % 2:  # a hard edge, as objects have
            img[:, : int(rng.integers(1, crop))] *= rng.uniform(0.3, 0.9)
        img += rng.normal(0, 8, img.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


@dataclass
class GateReport:
    """The figures the gate decided on (reported in /info and the extraction file's attributes)."""

    precision: str
    images: int
    source: str  # "built-in" or the folder
    embedding_cosine_min: float
    embedding_cosine_mean: float
    embedding_max_rel_error: float
    top1_agreement: dict[str, float] = field(default_factory=dict)  # head name -> fraction
    cosine_gate: float = COSINE_GATE
    top1_gate: float = TOP1_GATE
    reference: str = "onnxruntime fp32"
    passed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        top = ", ".join(f"{k} {v:.3f}" for k, v in self.top1_agreement.items()) or "no class head"
        return (f"cosine min {self.embedding_cosine_min:.6f} vs {self.reference} (gate >= "
                f"{self.cosine_gate}), top-1 agreement {top} (gate {self.top1_gate:g}), on {self.images} "
                f"{self.source} images")


def run_batched(run, images: np.ndarray, batch: int = 8) -> dict[str, np.ndarray]:
    outs: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(images), batch):
        for k, v in run(images[i:i + batch]).items():
            outs.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in outs.items()}


def gate_for(metadata: dict[str, str]) -> tuple[float, float, str]:
    """(cosine gate, top-1 gate, reference name) for a model with these s4l metadata_props."""
    if metadata.get("s4l.quantization", "none") != "none":
        return INT8_COSINE_GATE, INT8_TOP1_GATE, "onnxruntime on the same int8 file"
    return COSINE_GATE, TOP1_GATE, "onnxruntime fp32"


def parity_gate(candidate, reference, images: np.ndarray, *, precision: str, source: str,
                heads: dict[str, Any] | None = None, metadata: dict[str, str] | None = None
                ) -> GateReport:
    """Compare ``candidate`` with ``reference`` (both ``run``-like callables) on ``images``.
    ``heads``: task heads (objects with ``apply(embedding) -> logits``) checked for top-1 too."""
    got, ref = run_batched(candidate, images), run_batched(reference, images)
    a, b = got[EMBEDDING].astype(np.float64), ref[EMBEDDING].astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    scale = float(np.abs(b).max()) or 1.0
    top1: dict[str, float] = {}
    if LOGITS in ref and LOGITS in got:
        top1["model"] = float((got[LOGITS].argmax(1) == ref[LOGITS].argmax(1)).mean())
    for name, head in (heads or {}).items():
        top1[name] = float((head.apply(got[EMBEDDING]).argmax(1)
                            == head.apply(ref[EMBEDDING]).argmax(1)).mean())
    finite = bool(np.isfinite(a).all())
    report = GateReport(precision=precision, images=len(images), source=source,
                        embedding_cosine_min=float(cos.min()) if finite else float("nan"),
                        embedding_cosine_mean=float(cos.mean()) if finite else float("nan"),
                        embedding_max_rel_error=float(np.abs(a - b).max() / scale),
                        top1_agreement=top1)
    report.cosine_gate, report.top1_gate, report.reference = gate_for(metadata or {})
    report.passed = finite and report.embedding_cosine_min >= report.cosine_gate and all(
        v >= report.top1_gate for v in top1.values())
    return report


# -- the server backend ------------------------------------------------------------------------


class OpenVinoBackend:
    """The Backend interface (s4l.service.backend) on OpenVINO.

    Construction loads the file with onnxruntime first: the same file checks, metadata, input
    contract and model id as the onnxruntime backend, and the fp32 reference of the gate. Call
    :meth:`gate` (with the task heads) before serving; it releases that reference.
    """

    backend = "openvino"

    def __init__(self, path: str | os.PathLike, *, precision: str = "auto", threads: int = 0,
                 model_id: str | None = None, parity_images: str | os.PathLike | None = None):
        ov = import_openvino()  # a missing package is the first thing said
        self.path = Path(path)
        self._reference: OnnxBackend | None = OnnxBackend(path, provider="cpu", intra_op_threads=threads,
                                                          model_id=model_id)
        self.info = self._reference.info
        self.threads = self._reference.threads
        self.requested_precision = precision
        caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        self.bf16 = bf16_support(caps)
        self.precision = resolve_precision("openvino", precision, self.bf16)
        self.parity_images = parity_images
        self.model = OpenVinoModel(path, self.precision, threads=self.threads)
        self.provider = "openvino:CPU"
        self.parity: GateReport | None = None
        self.fallback: str | None = None
        log.info("openvino %s on %s: precision %s (asked %s; %s)", ov.__version__, self.path,
                 self.precision, precision, self.bf16.reason)

    def gate(self, heads: dict[str, Any] | None = None) -> GateReport:
        """The parity gate. Passing: keep this precision. Failing: with ``auto`` and bf16, say
        so loudly and fall back to fp32 (which must pass in turn); otherwise ModelLoadError."""
        if self._reference is None:
            assert self.parity is not None
            return self.parity
        source = "built-in" if self.parity_images is None else str(self.parity_images)
        images = gate_images(self.info.preprocess, self.parity_images)
        report = parity_gate(self.model.run, self._reference.run, images, precision=self.precision,
                             source=source, heads=heads, metadata=self.info.metadata)
        if not report.passed and self.precision == "bf16" and self.requested_precision == "auto":
            self.fallback = f"bf16 failed the parity gate ({report.summary()}); running fp32"
            log.warning("FALLBACK TO FP32: %s", self.fallback)
            self.model.close()
            self.precision = "fp32"
            self.model = OpenVinoModel(self.path, "fp32", threads=self.threads)
            report = parity_gate(self.model.run, self._reference.run, images, precision="fp32",
                                 source=source, heads=heads, metadata=self.info.metadata)
        if not report.passed:
            self.close()  # nothing of a refused backend stays loaded
            raise ModelLoadError(f"openvino {report.precision} failed the parity gate on "
                                 f"{self.path}: {report.summary()}")
        log.info("openvino %s parity gate passed: %s", report.precision, report.summary())
        self.parity = report
        self._reference.close()
        self._reference = None
        return report

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return self.model.run(images)

    def describe_backend(self) -> dict[str, Any]:
        return {"backend": self.backend, "precision": self.precision,
                "precision_requested": self.requested_precision,
                "bf16_native": self.bf16.native, "bf16_reason": self.bf16.reason,
                "fallback": self.fallback,
                "parity": self.parity.to_dict() if self.parity else None}

    def close(self) -> None:
        self.model.close()
        if self._reference is not None:
            self._reference.close()
            self._reference = None


def open_openvino_backend(settings, heads=None) -> OpenVinoBackend:
    """The server's OpenVINO backend from its Settings, gated; ``heads(backend)`` gives the task
    heads (name -> Head) whose top-1 the gate checks too."""
    if settings.provider == "cuda":
        raise ModelLoadError("provider 'cuda' is an onnxruntime provider; the openvino backend "
                             "runs on the CPU (use --provider cpu or --backend onnxruntime)")
    backend = OpenVinoBackend(settings.model, precision=settings.precision,
                              threads=settings.intra_op_threads, model_id=settings.model_id,
                              parity_images=settings.parity_images)
    try:
        backend.gate(heads(backend) if heads is not None else None)
    except BaseException:
        backend.close()
        raise
    return backend
