"""Static int8 quantisation of an exported model with onnxruntime's tools, checked against fp32."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from s4l.errors import UserError
from s4l.imaging import PreprocessSpec, eval_crop
from s4l.io import atomic_path

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
    # Scratch beside the output (same file system), hidden from readers of the folder.
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.", dir=out_path.parent) as tmp:
        prep = Path(tmp) / "prep.onnx"
        quant_pre_process(str(fp32_path), str(prep), skip_symbolic_shape=True)
        proto = onnx.load(str(prep))
        n_bn = batchnorm_to_depthwise(proto)
        onnx.save(proto, str(prep))
        qpath = Path(tmp) / "int8.onnx"
        with _quiet_root_logger():  # the quantiser logs every tensor it touches at INFO on root
            quantize_static(str(prep), str(qpath), _Reader(calib), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            per_channel=True, calibrate_method=CalibrationMethod.MinMax)
        proto = onnx.load(str(qpath))
        n_pad = pad_in_uint8(proto)
        onnx.save(proto, str(qpath))
        report = compare(fp32_path, qpath, heldout)
        report.update(calibration_images=len(calib), heldout_images=len(heldout),
                      format="QDQ", weights="int8 per-channel", activations="uint8",
                      rewrites={"batchnorm_to_depthwise_conv": n_bn, "pad_in_uint8": n_pad})
        set_metadata(proto, {**metadata, "s4l.int8_report": _json(report)})
        with atomic_path(out_path) as final:
            onnx.save(proto, str(final))
    log.info("int8: %s", report)
    return report


# -- graph rewrites that keep the int8 graph int8 ---------------------------------------------
# ResNet v2 is pre-activation: the BatchNorm after each residual Add cannot be folded into a conv,
# and onnxruntime's quantiser leaves a standalone BatchNormalization in float. The int8 graph then
# leaves onnxruntime's NHWC int8 kernels around every such BN (DequantizeLinear, a Transpose each
# way, float BN, QuantizeLinear), and the stem's zero Pad before the max-pool runs in float too.
# On ResNet50v2 at 224 px, batch 16, 2 CPU cores, those took ~40% of the int8 model's time
# (onnxruntime's profiler: 369 ms per batch, 225 ms after the first rewrite, 219 after both;
# benchmarks/serve.py --int8 measures the effect on throughput).


def batchnorm_to_depthwise(model) -> int:
    """Replace each inference-mode BatchNormalization on a 4-D tensor whose parameters are
    constants by the same per-channel affine map as a 1x1 depthwise Conv (group = channels),
    which the quantiser quantises like any conv. In place; returns the number replaced."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    constant = _constants(graph)
    ranks = _ranks(model)
    nodes, replaced = [], 0
    for node in graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        params = [constant(x) for x in node.input[1:5]]
        if (len(node.output) != 1 or attrs.get("training_mode", 0)
                or ranks.get(node.input[0]) != 4 or any(p is None for p in params)):
            nodes.append(node)
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        scale = gamma / np.sqrt(var + attrs.get("epsilon", 1e-5))
        shift = beta - mean * scale
        w_name, b_name = f"{node.output[0]}__dw_weight", f"{node.output[0]}__dw_bias"
        graph.initializer.extend([
            numpy_helper.from_array(scale.reshape(-1, 1, 1, 1).astype(np.float32), w_name),
            numpy_helper.from_array(shift.astype(np.float32), b_name)])
        nodes.append(helper.make_node("Conv", [node.input[0], w_name, b_name], list(node.output),
                                      name=f"{node.name or node.output[0]}__depthwise",
                                      group=len(scale), kernel_shape=[1, 1]))
        replaced += 1
    del graph.node[:]
    graph.node.extend(nodes)
    if replaced:
        onnx.checker.check_model(model)
    return replaced


def pad_in_uint8(model) -> int:
    """Rewrite DequantizeLinear -> Pad(constant 0) -> QuantizeLinear with one scale and zero
    point as a Pad of the quantised tensor with the zero point: exactly the same values, since
    quantize(0) is the zero point and quantize(dequantize(q)) is q. In place; returns the count."""
    from onnx import helper

    graph = model.graph
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for x in n.input:
            consumers.setdefault(x, []).append(i)
    outputs = {o.name for o in graph.output}

    const = _constants(graph)

    def qparams(node):  # (scale, zero point) of a Q/DQ node, when both are constants
        scale = const(node.input[1])
        zp = const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
        return scale, zp

    replace: dict[int, Any] = {}
    drop: set[int] = set()
    for k, pad in enumerate(nodes):
        if pad.op_type != "Pad" or pad.domain not in ("", "ai.onnx"):
            continue
        mode = next((helper.get_attribute_value(a) for a in pad.attribute if a.name == "mode"), b"constant")
        if mode not in (b"constant", "constant"):
            continue
        if len(pad.input) > 2 and pad.input[2]:
            value = const(pad.input[2])
            if value is None or value.size != 1 or float(value.reshape(())) != 0.0:
                continue
        i_dq, after = producer.get(pad.input[0]), consumers.get(pad.output[0], [])
        if i_dq is None or len(after) != 1 or pad.output[0] in outputs:
            continue
        dq, q = nodes[i_dq], nodes[after[0]]
        if (dq.op_type != "DequantizeLinear" or q.op_type != "QuantizeLinear"
                or dq.output[0] in outputs or len(consumers.get(dq.output[0], [])) != 1):
            continue
        (s_dq, z_dq), (s_q, z_q) = qparams(dq), qparams(q)
        if (s_dq is None or s_q is None or z_dq is None or z_q is None or s_dq.size != 1
                or not np.array_equal(s_dq, s_q) or z_dq.dtype != z_q.dtype or not np.array_equal(z_dq, z_q)):
            continue
        inputs = [dq.input[0], pad.input[1], dq.input[2] if len(dq.input) > 2 else ""]
        inputs += list(pad.input[3:4])  # opset >= 18: axes
        replace[after[0]] = helper.make_node("Pad", inputs, list(q.output), mode="constant",
                                             name=f"{pad.name or pad.output[0]}__uint8")
        drop |= {i_dq, k}
    kept = [replace.get(i, n) for i, n in enumerate(nodes) if i not in drop]
    del graph.node[:]
    graph.node.extend(kept)
    return len(replace)


def _constants(graph):
    """name -> numpy value when the tensor is a constant: an initializer, a Constant node, or
    either behind Identity nodes (torch's exporter and onnxruntime 1.30's pre-processing route
    de-duplicated weights through Identity); None otherwise."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def value(name: str, depth: int = 0):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = producer.get(name)
        if node is None or depth > 16:
            return None
        if node.op_type == "Identity":
            return value(node.input[0], depth + 1)
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(helper.get_attribute_value(a))
        return None
    return value


def _ranks(model) -> dict[str, int]:
    """Tensor name -> rank, from ONNX shape inference (names it cannot infer are absent)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = len(t.shape.dim)
    return out


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
