"""Static int8 quantisation of an exported model with onnxruntime's tools, checked against fp32."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from s4l.errors import UserError
from s4l.imaging import PreprocessSpec, eval_crop

log = logging.getLogger(__name__)


def load_calibration(spec_str: str, pre: PreprocessSpec, n_calib: int, n_heldout: int,
                     *, seed: int = 0, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint sets of eval crops from one data source: calibration and held-out images."""
    from s4l.datasets import open_source

    try:
        source = open_source(spec_str, split)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UserError(f"calibration data {spec_str!r}: {e}") from e
    n = len(source.samples)
    if n < n_calib + n_heldout:
        raise UserError(f"calibration data {spec_str!r} ({split}) has {n} images; need "
                        f"{n_calib} for calibration + {n_heldout} held out")
    order = np.random.default_rng(seed).permutation(n)
    crops = np.stack([eval_crop(source.load(int(i)), pre) for i in order[: n_calib + n_heldout]])
    return crops[:n_calib], crops[n_calib:]


class _Reader:
    """onnxruntime CalibrationDataReader over uint8 crops, in small batches."""

    def __init__(self, crops: np.ndarray, batch: int = 8):
        self._it = iter([crops[i:i + batch] for i in range(0, len(crops), batch)])

    def get_next(self):
        b = next(self._it, None)
        return None if b is None else {"images": b}


def quantize_int8(fp32_path: Path, out_path: Path, calib: np.ndarray, heldout: np.ndarray,
                  *, metadata: dict[str, str]) -> dict[str, Any]:
    """QDQ static quantisation (per-channel int8 weights, uint8 activations, MinMax calibration)
    of ``fp32_path`` into ``out_path`` (atomic); returns agreement with fp32 on ``heldout``."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from s4l.service.export import set_metadata

    out_path = Path(out_path)
    log.info("int8: calibrating on %d images, then comparing with fp32 on %d held-out images",
             len(calib), len(heldout))
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        prep = Path(tmp) / "prep.onnx"
        quant_pre_process(str(fp32_path), str(prep), skip_symbolic_shape=True)
        qpath = Path(tmp) / "int8.onnx"
        with _quiet_root_logger():  # the quantiser logs every tensor it touches at INFO on root
            quantize_static(str(prep), str(qpath), _Reader(calib), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            per_channel=True, calibrate_method=CalibrationMethod.MinMax)
        report = compare(fp32_path, qpath, heldout)
        report.update(calibration_images=len(calib), heldout_images=len(heldout),
                      format="QDQ", weights="int8 per-channel", activations="uint8")
        proto = onnx.load(str(qpath))
        set_metadata(proto, {**metadata, "s4l.int8_report": _json(report)})
        fd, final = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
        os.close(fd)
        try:
            onnx.save(proto, final)
            os.replace(final, out_path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(final)
            raise
    log.info("int8: %s", report)
    return report


def compare(fp32_path: Path, int8_path: Path, images: np.ndarray, batch: int = 16) -> dict[str, Any]:
    """Top-1 agreement (when there are logits) and embedding cosine similarity, int8 vs fp32."""
    import onnxruntime as ort

    a = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in a.get_outputs()]
    outs_a = {n: [] for n in names}
    outs_b = {n: [] for n in names}
    for i in range(0, len(images), batch):
        feed = {"images": images[i:i + batch]}
        for n, v in zip(names, a.run(names, feed)):
            outs_a[n].append(v)
        for n, v in zip(names, b.run(names, feed)):
            outs_b[n].append(v)
    ea, eb = np.concatenate(outs_a["embedding"]), np.concatenate(outs_b["embedding"])
    cos = (ea * eb).sum(1) / np.maximum(np.linalg.norm(ea, axis=1) * np.linalg.norm(eb, axis=1), 1e-12)
    report: dict[str, Any] = {"embedding_cosine_mean": float(cos.mean()),
                              "embedding_cosine_min": float(cos.min())}
    if "logits" in names:
        la, lb = np.concatenate(outs_a["logits"]), np.concatenate(outs_b["logits"])
        report["top1_agreement"] = float((la.argmax(1) == lb.argmax(1)).mean())
    return report


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def _json(d: dict) -> str:
    import json

    return json.dumps(d, sort_keys=True)
