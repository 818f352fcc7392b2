"""`s4l export` / export_onnx: the ONNX contract, torch parity, EMA, int8, Triton repo, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from support.images import make_image_folder
from support.server import CLASSES, jpeg_bytes, make_checkpoint

from s4l.cli import main as s4l_main
from s4l.errors import UserError
from s4l.imaging import PreprocessSpec, decode_image, eval_crop
from s4l.service import export as export_mod
from s4l.service.export import FP32_TOLERANCE, export_onnx
from s4l.training.checkpoint import load_for_inference


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def _meta(path):
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_onnx_contract_and_parity(ckpt, tmp_path):
    out = tmp_path / "m.onnx"
    report = export_onnx(ckpt, out)
    assert max(report.parity.values()) < FP32_TOLERANCE
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("images", "tensor(uint8)", [32, 32, 3])
    assert isinstance(inp.shape[0], str)  # dynamic batch
    assert [o.name for o in sess.get_outputs()] == ["embedding", "logits"]

    meta = _meta(out)
    inf = load_for_inference(ckpt)
    assert PreprocessSpec.from_dict(meta["s4l.preprocess"]) == inf.preprocess
    assert json.loads(meta["s4l.class_names"]) == list(CLASSES)
    assert int(meta["s4l.embedding_dim"]) == inf.model.num_features == 128
    assert meta["s4l.checkpoint_sha256"] == inf.sha256
    assert meta["s4l.config_hash"] == torch.load(ckpt, weights_only=False)["config_hash"]
    assert meta["s4l.version"]

    # Any batch size; the [-1, 1] scaling is inside the graph: compare with torch on real JPEG crops.
    crops = np.stack([eval_crop(decode_image(jpeg_bytes(seed=i)), inf.preprocess) for i in range(5)])
    emb, logits = sess.run(None, {"images": crops})
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        ref = inf.model(x, heads=("classes",))
    np.testing.assert_allclose(emb, ref["pre_logits"].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits, ref["classes"].numpy(), rtol=1e-4, atol=1e-5)
    assert sess.run(None, {"images": crops[:1]})[0].shape == (1, 128)


def test_model_without_class_head(tmp_path):
    ck = make_checkpoint(tmp_path / "nohead.pt", classes=())
    out = tmp_path / "nohead.onnx"
    report = export_onnx(ck, out)
    assert report.num_classes is None
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["embedding"]
    assert "s4l.class_names" not in _meta(out)


def test_ema_weights_are_exported_when_asked(tmp_path, ckpt):
    ck = make_checkpoint(tmp_path / "ema.pt", with_ema=True)
    export_onnx(ck, tmp_path / "ema.onnx", use_ema=True)
    export_onnx(ck, tmp_path / "raw.onnx", use_ema=False)
    assert _meta(tmp_path / "ema.onnx")["s4l.used_ema"] == "true"
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    a = ort.InferenceSession(str(tmp_path / "ema.onnx")).run(None, {"images": x})[0]
    b = ort.InferenceSession(str(tmp_path / "raw.onnx")).run(None, {"images": x})[0]
    assert not np.allclose(a, b)
    with pytest.raises(UserError, match="no EMA"):
        export_onnx(ckpt, tmp_path / "x.onnx", use_ema=True)


def test_parity_failure_writes_nothing(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "FP32_TOLERANCE", 0.0)  # no real export is that exact
    out = tmp_path / "m.onnx"
    with pytest.raises(UserError, match="disagrees with torch"):
        export_onnx(ckpt, out)
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="cannot be read|not an s4l checkpoint"):
        export_onnx(bad, tmp_path / "m.onnx")
    assert s4l_main(["export", "--checkpoint", str(tmp_path / "missing.pt"),
                     "--out", str(tmp_path / "m.onnx")]) == 2
    assert not (tmp_path / "m.onnx").exists()


def test_cli_with_triton_repo(ckpt, tmp_path):
    out, repo, rep = tmp_path / "m.onnx", tmp_path / "triton", tmp_path / "report.json"
    assert s4l_main(["export", "--checkpoint", str(ckpt), "--out", str(out),
                     "--triton-repo", str(repo), "--triton-max-batch", "16",
                     "--report", str(rep)]) == 0
    assert json.loads(rep.read_text())["parity"]["embedding"] < FP32_TOLERANCE
    model_dir = repo / "s4l"
    assert (model_dir / "1" / "model.onnx").read_bytes() == out.read_bytes()
    assert (model_dir / "labels.txt").read_text().split() == list(CLASSES)
    cfg = (model_dir / "config.pbtxt").read_text()
    for needle in ['backend: "onnxruntime"', "max_batch_size: 16", "dynamic_batching {",
                   'name: "images"', "data_type: TYPE_UINT8", "dims: [ 32, 32, 3 ]",
                   'name: "embedding"', "dims: [ 128 ]", 'name: "logits"', "dims: [ 3 ]",
                   'label_filename: "labels.txt"']:
        assert needle in cfg, needle
    assert cfg.count("{") == cfg.count("}") and cfg.count("[") == cfg.count("]")


def test_cli_int8_needs_calibration(ckpt, tmp_path):
    assert s4l_main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx"),
                     "--int8"]) == 2
    assert not (tmp_path / "m.onnx").exists()


def test_int8_static_quantisation(ckpt, tmp_path):
    data = make_image_folder(tmp_path / "calib", splits=("train",), per_class=6, size=40)
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    assert s4l_main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--int8",
                     "--calibration", str(data), "--calibration-images", "10",
                     "--heldout-images", "8", "--report", str(rep)]) == 0
    report = json.loads(rep.read_text())["int8"]
    assert report["heldout_images"] == 8 and report["calibration_images"] == 10
    assert 0.0 <= report["top1_agreement"] <= 1.0
    assert 0.5 < report["embedding_cosine_mean"] <= 1.0 + 1e-6
    proto = onnx.load(str(out))
    assert any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    # The pre-activation BNs became quantised depthwise convs: no float BN is left.
    assert report["rewrites"]["batchnorm_to_depthwise_conv"] > 0
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["s4l.quantization"] == "int8-qdq" and "s4l.preprocess" in meta
    fp32 = tmp_path / "q.fp32.onnx"
    assert fp32.exists() and _meta(fp32)["s4l.quantization"] == "none"
    # The int8 file is a servable model: same contract as fp32.
    from s4l.service.backend import OnnxBackend

    backend = OnnxBackend(out)
    res = backend.run(np.zeros((3, 32, 32, 3), np.uint8))
    assert res["embedding"].shape == (3, 128) and res["logits"].shape == (3, 3)


def test_int8_with_too_few_calibration_images(ckpt, tmp_path):
    data = make_image_folder(tmp_path / "calib", splits=("train",), per_class=1)
    with pytest.raises(UserError, match="need"):
        export_onnx(ckpt, tmp_path / "q.onnx", int8_calibration=str(data),
                    calibration_images=8, heldout_images=8)


def test_batchnorm_to_depthwise_keeps_the_function(ckpt, tmp_path):
    from s4l.service.quantize import batchnorm_to_depthwise

    out = tmp_path / "m.onnx"
    export_onnx(ckpt, out)
    proto = onnx.load(str(out))
    n_bn = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    assert n_bn > 0  # ResNet v2's pre-activation BNs cannot fold into a conv
    assert batchnorm_to_depthwise(proto) == n_bn
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    x = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    before = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": x})
    after = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"images": x})
    for a, b in zip(before, after):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def _qdq_pad_graph(pad_value: float | None, q_scale: float = 0.05):
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(q_scale, np.float32), "s2"),
             numpy_helper.from_array(np.array(37, np.uint8), "zp"),
             numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "pads")]
    pad_in = ["dq", "pads"]
    if pad_value is not None:
        inits.append(numpy_helper.from_array(np.array(pad_value, np.float32), "v"))
        pad_in.append("v")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"]),
             helper.make_node("Pad", pad_in, ["p"], mode="constant"),
             helper.make_node("QuantizeLinear", ["p", "s2", "zp"], ["q2"]),
             helper.make_node("DequantizeLinear", ["q2", "s2", "zp"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 6])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("pad_value, q_scale, rewritten", [(None, 0.05, 1), (0.0, 0.05, 1),
                                                           (1.0, 0.05, 0), (None, 0.1, 0)])
def test_pad_in_uint8_is_exact_and_only_where_it_may(pad_value, q_scale, rewritten):
    from s4l.service.quantize import pad_in_uint8

    model = _qdq_pad_graph(pad_value, q_scale)
    x = np.random.default_rng(0).normal(0, 1, (1, 2, 3, 3)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert pad_in_uint8(model) == rewritten
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("DequantizeLinear") == (1 if rewritten else 2)
    onnx.checker.check_model(model)
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(after[0], before[0])
    assert after[0].shape == (1, 2, 6, 6)


def test_batchnorm_to_depthwise_finds_parameters_behind_identity_and_constant_nodes():
    # torch's exporter and onnxruntime 1.30's pre-processing hand de-duplicated weights to a BN
    # through Identity nodes; a Constant node is the other way a constant can arrive.
    from onnx import TensorProto, helper, numpy_helper

    from s4l.service.quantize import batchnorm_to_depthwise

    rng = np.random.default_rng(0)
    c = 3
    gamma, beta = rng.uniform(0.5, 1.5, c).astype(np.float32), rng.normal(0, 0.2, c).astype(np.float32)
    mean, var = rng.normal(0, 0.2, c).astype(np.float32), rng.uniform(0.5, 1.5, c).astype(np.float32)
    nodes = [helper.make_node("Identity", ["g0"], ["g"]),
             helper.make_node("Identity", ["b0"], ["b1"]), helper.make_node("Identity", ["b1"], ["b"]),
             helper.make_node("Constant", [], ["m"], value=numpy_helper.from_array(mean)),
             helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], epsilon=1e-3)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, c, 4, 4])],
                          [numpy_helper.from_array(gamma, "g0"), numpy_helper.from_array(beta, "b0"),
                           numpy_helper.from_array(var, "v")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(0, 1, (2, c, 4, 4)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert batchnorm_to_depthwise(model) == 1
    assert "BatchNormalization" not in [n.op_type for n in model.graph.node]
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(after[0], before[0], rtol=1e-5, atol=1e-6)
