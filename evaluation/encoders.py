"""Frozen feature extractors behind one interface: a training checkpoint (torch) or an ONNX model.

Both take the uint8 eval crops of :func:`s4l.imaging.eval_crop` (``[N, H, W, 3]``) and return
the requested layer plus the class logits when the model has a class head. Checkpoints offer
``pre_logits`` (THE representation, S4L_REFERENCE.md section 3/4) and the globally
average-pooled stage outputs ``stage1``..``stage4``; ONNX models (docs/contracts.md "ONNX model")
offer ``embedding`` (= ``pre_logits``) and ``logits``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from s4l.errors import UserError
from s4l.imaging import PreprocessSpec
from s4l.provenance import file_sha256

log = logging.getLogger(__name__)

CHECKPOINT_LAYERS = ("pre_logits", "stage1", "stage2", "stage3", "stage4")
ONNX_LAYERS = ("embedding", "logits")


class Encoder:
    """What extraction needs from a model."""

    format: str
    path: Path
    layers: tuple[str, ...]
    preprocess: PreprocessSpec
    model_hash: str  # identifies the weights: the checkpoint's sha256 (ONNX: its source's)
    file_sha256: str  # the file itself
    has_logits: bool
    backend: str = "torch"  # what runs the model: torch, onnxruntime or openvino
    precision: str = "fp32"
    parity: dict | None = None  # openvino: the parity gate's figures (s4l.service.backend_openvino)

    def check_layer(self, layer: str) -> str:
        aliases = {"embedding": "pre_logits"} if self.format == "checkpoint" else {"pre_logits": "embedding"}
        name = aliases.get(layer, layer)
        if name not in self.layers:
            raise UserError(
                f"{self.path} has no layer {layer!r}; it offers: {', '.join(self.layers)}"
            )
        return name

    def __call__(self, images: np.ndarray, layer: str) -> tuple[np.ndarray, np.ndarray | None]:
        """``images`` uint8 [N, H, W, 3] -> (features [N, D] float32, logits [N, C] or None)."""
        raise NotImplementedError


class CheckpointEncoder(Encoder):
    """A checkpoint's model (EMA weights when present, as the release evaluates MOAM)."""

    format = "checkpoint"

    def __init__(self, path: str | os.PathLike, device: str | None = None, use_ema: bool | None = None):
        import torch

        from s4l.training.checkpoint import load_for_inference

        self.path = Path(path)
        inf = load_for_inference(self.path, use_ema=use_ema)
        self.device = torch.device(device or "cpu")
        # channels_last: oneDNN (CPU) and cuDNN run these convs faster in NHWC (1.4x measured on
        # the standard ResNet50v2 on 2 CPU cores); the values agree with NCHW to float rounding.
        self.model = inf.model.to(self.device, memory_format=torch.channels_last).eval()
        self.preprocess = inf.preprocess
        self.model_hash = inf.sha256
        self.file_sha256 = inf.sha256
        self.has_logits = "classes" in self.model.heads
        self.layers = CHECKPOINT_LAYERS + (("logits",) if self.has_logits else ())
        self.used_ema = inf.used_ema

    def __call__(self, images: np.ndarray, layer: str) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        from s4l.training.transforms import to_model_input

        with torch.inference_mode():
            x = to_model_input(torch.from_numpy(np.ascontiguousarray(images)).to(self.device))
            x = x.contiguous(memory_format=torch.channels_last)
            feats = self.model.backbone.forward_features(x)
            pre = feats["pre_logits"]
            logits = self.model.heads["classes"](pre) if self.has_logits else None
            if layer == "pre_logits":
                out = pre
            elif layer == "logits":
                out = logits
            else:
                out = feats[layer].mean(dim=(2, 3))
            return (out.float().cpu().numpy(),
                    None if logits is None else logits.float().cpu().numpy())


class OnnxEncoder(Encoder):
    """An exported ONNX model run by ONNX Runtime (uint8 NHWC in, scaling inside the graph)."""

    format = "onnx"

    def __init__(self, path: str | os.PathLike, threads: int | None = None, device: str | None = None,
                 backend: str = "onnxruntime", precision: str = "auto",
                 parity_images: str | os.PathLike | None = None):
        import onnxruntime as ort

        from s4l.service.backend import ModelLoadError
        from s4l.service.backend_openvino import import_openvino, resolve_precision

        if backend == "openvino":
            if device and device.startswith("cuda"):
                raise UserError("--backend openvino runs on the CPU; leave out --device cuda")
            try:
                import_openvino()  # a missing package is said before anything is loaded
            except ModelLoadError as e:
                raise UserError(str(e)) from None
        elif backend != "onnxruntime":
            raise UserError(f"unknown backend {backend!r} (onnxruntime or openvino)")

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"ONNX model {self.path} does not exist")
        from s4l.onnxcheck import check_onnx_file

        check_onnx_file(self.path)  # external data outside its folder, custom-op domains
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        # No busy-waiting between ops: spinning intra-op threads would take the CPU the decode
        # workers need (extraction overlaps the two); for big batched convs it gains nothing.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device and device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated types
            raise UserError(f"{self.path} is not a loadable ONNX model: {e}") from e
        meta = self.session.get_modelmeta().custom_metadata_map
        self._meta = dict(meta)
        if "s4l.preprocess" not in meta:
            raise UserError(f"{self.path} lacks s4l metadata (s4l.preprocess): export it with `s4l export`")
        try:
            self.preprocess = PreprocessSpec.from_dict(json.loads(meta["s4l.preprocess"]))
        except (ValueError, TypeError, KeyError) as e:
            raise UserError(f"{self.path}: unreadable s4l.preprocess metadata ({e})") from None
        self.file_sha256 = file_sha256(self.path)
        self.model_hash = meta.get("s4l.checkpoint_sha256") or self.file_sha256
        outputs = [o.name for o in self.session.get_outputs()]
        self.layers = tuple(n for n in ONNX_LAYERS if n in outputs)
        self.has_logits = "logits" in outputs
        self.input_name = self.session.get_inputs()[0].name
        self.backend = backend
        self._run = self._run_onnxruntime
        try:
            if backend == "openvino":
                self._open_openvino(precision, threads, parity_images)
            else:
                self.precision = resolve_precision("onnxruntime", precision, None)
        except ModelLoadError as e:
            raise UserError(str(e)) from None

    def _open_openvino(self, precision: str, threads: int | None, parity_images) -> None:
        """Compile for OpenVINO and pass the same parity gate as the server (against this
        onnxruntime session in fp32), then drop the onnxruntime session."""
        import openvino as ov

        from s4l.service.backend import available_cpus
        from s4l.service.backend_openvino import (
            OpenVinoModel,
            bf16_support,
            gate_images,
            parity_gate,
            resolve_precision,
        )

        support = bf16_support(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        chosen = resolve_precision("openvino", precision, support)
        images = gate_images(self.preprocess, parity_images)
        source = "built-in" if parity_images is None else str(parity_images)
        threads = threads or available_cpus()
        model = OpenVinoModel(self.path, chosen, threads=threads)
        report = parity_gate(model.run, self._run_onnxruntime, images, precision=chosen,
                             source=source, metadata=self._meta)
        if not report.passed and chosen == "bf16" and precision == "auto":
            log.warning("FALLBACK TO FP32: openvino bf16 failed the parity gate (%s)", report.summary())
            model.close()
            chosen = "fp32"
            model = OpenVinoModel(self.path, chosen, threads=threads)
            report = parity_gate(model.run, self._run_onnxruntime, images, precision=chosen,
                             source=source, metadata=self._meta)
        if not report.passed:
            model.close()
            raise UserError(f"openvino {chosen} failed the parity gate on {self.path}: "
                            f"{report.summary()}")
        log.info("openvino %s (%s) passed the parity gate: %s", chosen, support.reason, report.summary())
        self.precision, self.parity = chosen, report.to_dict()
        self._ov = model
        self._run = model.run
        self.session = None

    def _run_onnxruntime(self, images: np.ndarray) -> dict[str, np.ndarray]:
        names = ["embedding", "logits"] if self.has_logits else ["embedding"]
        return dict(zip(names, self.session.run(names, {self.input_name: np.ascontiguousarray(images)})))

    def __call__(self, images: np.ndarray, layer: str) -> tuple[np.ndarray, np.ndarray | None]:
        outs = self._run(images)
        return outs[layer].astype(np.float32, copy=False), outs.get("logits")


def open_encoder(path: str | os.PathLike, device: str | None = None, backend: str = "onnxruntime",
                 precision: str = "auto", parity_images: str | os.PathLike | None = None) -> Encoder:
    """A checkpoint (``*.pt`` or anything torch can read) or an ONNX model (``*.onnx``); an ONNX
    model runs on ``backend`` (onnxruntime or openvino) at ``precision`` (fp32, bf16, auto)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"model {p} does not exist")
    if p.suffix.lower() == ".onnx":
        return OnnxEncoder(p, device=device, backend=backend, precision=precision,
                           parity_images=parity_images)
    if backend != "onnxruntime" or precision == "bf16":
        raise UserError(f"--backend {backend} / --precision {precision} apply to ONNX models; "
                        f"{p} is a checkpoint (torch, fp32): export it with `s4l export` first")
    return CheckpointEncoder(p, device=device)
