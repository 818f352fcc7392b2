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

    def __init__(self, path: str | os.PathLike, threads: int | None = None, device: str | None = None):
        import onnxruntime as ort

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

    def __call__(self, images: np.ndarray, layer: str) -> tuple[np.ndarray, np.ndarray | None]:
        names = ["embedding", "logits"] if self.has_logits else ["embedding"]
        outs = dict(zip(names, self.session.run(names, {self.input_name: np.ascontiguousarray(images)})))
        return outs[layer].astype(np.float32, copy=False), outs.get("logits")


def open_encoder(path: str | os.PathLike, device: str | None = None) -> Encoder:
    """A checkpoint (``*.pt`` or anything torch can read) or an ONNX model (``*.onnx``)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"model {p} does not exist")
    if p.suffix.lower() == ".onnx":
        return OnnxEncoder(p, device=device)
    return CheckpointEncoder(p, device=device)
