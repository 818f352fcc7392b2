"""ONNX export of an s4l checkpoint (uint8 NHWC in, embedding/logits out), its checks, int8 and Triton.

This is the one part of s4l.service that imports torch; the server only reads the file it writes.
The graph contract is in docs/contracts.md ("ONNX model").
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import s4l
from s4l.errors import UserError
from s4l.imaging import PreprocessSpec
from s4l.io import atomic_path
from s4l.training.checkpoint import config_hash, load_for_inference, read_checkpoint

log = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-4  # max relative error torch vs onnxruntime allowed for an fp32 export
OPSET = 17


@dataclass
class ExportReport:
    """What an export produced and how well it matches the torch model (written as JSON too)."""

    onnx_path: str
    checkpoint: str
    checkpoint_sha256: str
    embedding_dim: int
    num_classes: int | None
    used_ema: bool
    parity: dict[str, float]  # output name -> max relative error, torch vs onnxruntime (fp32)
    fp32_path: str | None = None  # the fp32 reference when onnx_path is the int8 model
    int8: dict[str, Any] | None = None
    triton_repo: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _OnnxGraph(torch.nn.Module):
    """uint8 [N, H, W, 3] -> (embedding, logits?): the [-1, 1] scaling lives in the graph."""

    def __init__(self, model: torch.nn.Module, with_logits: bool):
        super().__init__()
        self.model = model
        self.with_logits = with_logits

    def forward(self, images: torch.Tensor):
        x = images.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
        out = self.model(x, heads=("classes",) if self.with_logits else ())
        if self.with_logits:
            return out["pre_logits"], out["classes"]
        return out["pre_logits"]


def export_onnx(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike, *,
                use_ema: bool | None = None, int8_calibration: str | None = None,
                calibration_images: int = 64, heldout_images: int = 64,
                triton_repo: str | os.PathLike | None = None, triton_max_batch_size: int = 32,
                check_batch: int = 4, seed: int = 0) -> ExportReport:
    """Export ``checkpoint_path`` to ``out_path`` and check it (docs/service.md).

    fp32: torch and onnxruntime must agree on a batch within ``FP32_TOLERANCE`` (max relative
    error), else ``UserError``. With ``int8_calibration`` (an ``s4l.datasets.open_source`` spec)
    ``out_path`` gets the statically quantised model and the fp32 model stays beside it as
    ``<stem>.fp32.onnx``; the report holds top-1 agreement and embedding cosine similarity on
    held-out images. ``triton_repo`` also writes a Triton model repository from the final file.
    """
    out_path = Path(out_path)
    # -- setup: the model in eval mode, exactly as training's load_for_inference gives it ------
    inf = load_for_inference(checkpoint_path, use_ema=use_ema)
    raw = read_checkpoint(checkpoint_path)
    cfg_hash = raw.get("config_hash") or config_hash(inf.config)
    del raw
    model = inf.model.float().eval()
    n_classes = inf.spec.heads.get("classes")
    names = inf.class_names
    if names is not None and n_classes is not None and len(names) != n_classes:
        raise UserError(f"{checkpoint_path}: {len(names)} class names but a {n_classes}-way head")
    spec: PreprocessSpec = inf.preprocess
    metadata = {
        "s4l.preprocess": spec.to_json(),
        "s4l.embedding_dim": str(model.num_features),
        "s4l.checkpoint_sha256": inf.sha256,
        "s4l.config_hash": str(cfg_hash),
        "s4l.version": s4l.__version__,
        "s4l.model_spec": json.dumps(inf.spec.to_dict(), sort_keys=True),
        "s4l.used_ema": json.dumps(inf.used_ema),
        "s4l.quantization": "none",
    }
    if n_classes is not None:
        metadata["s4l.num_classes"] = str(n_classes)
        if names is not None:
            metadata["s4l.class_names"] = json.dumps(list(names))

    # -- fp32 export, written atomically ---------------------------------------------------------
    fp32_path = out_path.with_name(out_path.stem + ".fp32.onnx") if int8_calibration else out_path
    # eval() on the wrapper too: the exporter restores the wrapper's train/eval flag recursively
    # after exporting, so a wrapper left in train mode would flip BatchNorm back to batch stats.
    graph = _OnnxGraph(model, with_logits=n_classes is not None).eval()
    _export_graph(graph, spec.crop, fp32_path, metadata)

    # -- parity: onnxruntime vs torch on one batch ---------------------------------------------
    rng = np.random.default_rng(seed)
    batch = rng.integers(0, 256, (check_batch, spec.crop, spec.crop, 3), dtype=np.uint8)
    parity = check_parity(graph, fp32_path, batch)
    worst = max(parity.values())
    log.info("torch vs onnxruntime max relative error: %s", parity)
    if worst > FP32_TOLERANCE:
        fp32_path.unlink(missing_ok=True)
        raise UserError(f"exported model disagrees with torch: max relative error {worst:.2e} > "
                        f"{FP32_TOLERANCE:g} ({parity}); nothing written")

    report = ExportReport(onnx_path=str(out_path), checkpoint=str(checkpoint_path),
                          checkpoint_sha256=inf.sha256, embedding_dim=model.num_features,
                          num_classes=n_classes, used_ema=inf.used_ema, parity=parity,
                          metadata=metadata)

    # -- int8: static quantisation on calibration images, checked on held-out ones ----------------
    if int8_calibration:
        from s4l.service import quantize

        calib, heldout = quantize.load_calibration(int8_calibration, spec, calibration_images,
                                                   heldout_images, seed=seed)
        report.int8 = quantize.quantize_int8(fp32_path, out_path, calib, heldout,
                                             metadata={**metadata, "s4l.quantization": "int8-qdq"})
        report.fp32_path = str(fp32_path)
        report.metadata = {**metadata, "s4l.quantization": "int8-qdq"}

    # -- Triton model repository from the final file --------------------------------------------
    if triton_repo is not None:
        from s4l.service.triton import write_triton_repo

        write_triton_repo(out_path, triton_repo, max_batch_size=triton_max_batch_size)
        report.triton_repo = str(triton_repo)
    return report


def _export_graph(graph: torch.nn.Module, crop: int, path: Path, metadata: dict[str, str]) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros((2, crop, crop, 3), dtype=torch.uint8)
    outputs = ["embedding", "logits"] if graph.with_logits else ["embedding"]
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter: deterministic, fast and handles a plain dynamic batch
        # axis; the dynamo exporter takes ~20x longer for no gain on this static graph.
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example,), str(tmp), input_names=["images"],
                          output_names=outputs, opset_version=OPSET, dynamo=False,
                          dynamic_axes={n: {0: "N"} for n in ["images", *outputs]})
        proto = onnx.load(str(tmp))
        set_metadata(proto, metadata)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))


def set_metadata(proto, metadata: dict[str, str]) -> None:
    """Replace the s4l.* metadata_props of an onnx ModelProto with ``metadata``."""
    keep = [(p.key, p.value) for p in proto.metadata_props if not p.key.startswith("s4l.")]
    del proto.metadata_props[:]
    for k, v in [*keep, *sorted(metadata.items())]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def max_relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref|: relative to the output's scale, stable near zero entries."""
    scale = float(np.abs(ref).max())
    return float(np.abs(got.astype(np.float64) - ref).max() / (scale if scale > 0 else 1.0))


def check_parity(graph: torch.nn.Module, onnx_path: Path, batch: np.ndarray) -> dict[str, float]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(names, {"images": batch})))
    with torch.no_grad():
        ref = graph(torch.from_numpy(batch))
    ref = ref if isinstance(ref, tuple) else (ref,)
    return {n: max_relative_error(got[n], r.double().numpy()) for n, r in zip(names, ref)}

