"""The Open Inference Protocol v2 and OpenAI wire formats as pure functions, and the protocol routes
in-process on the dummy backend for what a real model cannot be made to do on demand (not ready,
queue full, timeout, a failing model call, a body that grows past the limit while it is read).
tests/test_protocols_live.py proves the routes with the real client libraries."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import struct
import zlib

import numpy as np
import orjson
import pytest
from PIL import Image
from support.server import jpeg_bytes
from test_server import Live, run

from s4l.service import oip
from s4l.service import openai_embeddings as oai
from s4l.service.backend import DummyBackend

# -- oip: requests ---------------------------------------------------------------------------------


def _req(doc: dict, tail: bytes = b"", **kw) -> oip.InferRequest:
    head = json.dumps(doc).encode()
    return oip.parse_infer_request(head + tail, str(len(head)) if tail else None,
                                   max_elements=kw.get("max_elements", 10**7))


def _status(fn) -> tuple[int, str]:
    with pytest.raises(oip.ProtocolError) as e:
        fn()
    return e.value.status, e.value.message


def test_json_data_flat_and_nested_read_the_same_tensor():
    x = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
    flat = _req({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [2, 2, 2, 3],
                             "data": x.ravel().tolist()}]})
    nested = _req({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [2, 2, 2, 3],
                               "data": x.tolist()}]})
    np.testing.assert_array_equal(flat.inputs[0].value, x)
    np.testing.assert_array_equal(nested.inputs[0].value, x)
    assert flat.outputs is None and flat.binary_output is False


def test_binary_inputs_in_order_and_bytes_elements():
    pixels = np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3)
    files = [b"abc", b"", b"\x00\xff" * 5]
    blob = b"".join(struct.pack("<I", len(f)) + f for f in files)
    req = _req({"id": "7", "inputs": [
        {"name": "images", "datatype": "UINT8", "shape": [1, 2, 2, 3],
         "parameters": {"binary_data_size": pixels.nbytes}},
        {"name": "image_bytes", "datatype": "BYTES", "shape": [3],
         "parameters": {"binary_data_size": len(blob)}}]}, pixels.tobytes() + blob)
    assert req.id == "7"
    np.testing.assert_array_equal(req.inputs[0].value, pixels)
    assert req.inputs[1].value == files


@pytest.mark.parametrize("doc, tail, status, text", [
    ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}]},
     struct.pack("<I", 9) + b"ab", 400, "claims 9 bytes"),
    ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 2}}]},
     b"\x01\x00", 400, "cut length prefix"),
    ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 5}}]},
     struct.pack("<I", 1) + b"a", 400, "1 BYTES elements for shape [2]"),
    ({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [2, 3], "parameters": {"binary_data_size": 5}}]},
     b"12345", 400, "needs 6"),
    ({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "parameters": {"binary_data_size": 9}}]},
     b"1", 400, "runs past the end"),
    ({"inputs": [{"name": "x", "datatype": "FP64", "shape": [1], "parameters": {"binary_data_size": 8}}]},
     bytes(8), 400, "not used by this server"),
    ({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "parameters": {"binary_data_size": 1},
                  "data": [1]}]}, b"1", 400, "both 'data' and binary_data_size"),
])
def test_bad_binary_tensors(doc, tail, status, text):
    got = _status(lambda: _req(doc, tail))
    assert got[0] == status and text in got[1], got


@pytest.mark.parametrize("tensor, status, text", [
    ({"name": "x", "datatype": "UINT8", "shape": [2], "data": [True, False]}, 400, "integers"),
    ({"name": "x", "datatype": "UINT8", "shape": [2], "data": [1, "2"]}, 400, "integers"),
    ({"name": "x", "datatype": "UINT8", "shape": [2], "data": [[1], [2, 3]]}, 400, "ragged"),
    ({"name": "x", "datatype": "UINT8", "shape": [3], "data": [1, 2]}, 400, "2 values for shape [3]"),
    ({"name": "x", "datatype": "UINT8", "shape": [1], "data": [-1]}, 400, "outside UINT8"),
    ({"name": "x", "datatype": "UINT8", "shape": [1], "data": [10**30]}, 400, "integers"),
    ({"name": "x", "datatype": "BYTES", "shape": [1], "data": [3]}, 400, "not a string"),
    ({"name": "x", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}, 400, "not base64"),
    ({"name": "x", "datatype": "COMPLEX", "shape": [1], "data": [1]}, 400, "unknown datatype"),
    ({"name": "x", "datatype": "UINT8", "shape": [-1], "data": [1]}, 400, "non-negative"),
    ({"name": "x", "datatype": "UINT8", "shape": [True], "data": [1]}, 400, "non-negative"),
    ({"name": "x", "datatype": "UINT8", "shape": [2**40, 2**40], "data": []}, 413, "elements"),
    ({"name": "x", "datatype": "UINT8", "shape": [1]}, 400, "neither 'data'"),
    ({"datatype": "UINT8", "shape": [1], "data": [1]}, 400, "'name'"),
])
def test_bad_json_tensors(tensor, status, text):
    got = _status(lambda: _req({"inputs": [tensor]}))
    assert got[0] == status and text in got[1], got


@pytest.mark.parametrize("body, header, text", [
    (b"[1, 2]", None, "JSON object"),
    (b'{"inputs": []}', None, "non-empty list"),
    (b'{"inputs": [], "extra": 1}', None, "unknown request fields"),
    (b'{"id": 3, "inputs": []}', None, "'id' must be a string"),
    (b'{"inputs": [1]}', "0", "outside the body"),
    (b'{"inputs": [1]}', "x", "not an integer"),
    (b'{"inputs": [], "parameters": {"binary_data_output": "yes"}}', None, "true or false"),
    (b'{"inputs": [], "parameters": {"sequence_id": 3}}', None, "sequence"),
])
def test_bad_requests(body, header, text):
    status, msg = _status(lambda: oip.parse_infer_request(body, header, max_elements=100))
    assert status == 400 and text in msg, msg


def test_requested_outputs_and_their_encoding():
    one = {"name": "x", "datatype": "UINT8", "shape": [1], "data": [1]}
    specs = [oip.TensorSpec("embedding", "FP32", (-1, 4)), oip.TensorSpec("logits", "FP32", (-1, 2))]
    every = oip.select_outputs(_req({"inputs": [one], "parameters": {"binary_data_output": True}}), specs)
    assert [(o.name, o.binary) for o in every] == [("embedding", True), ("logits", True)]
    some = oip.select_outputs(_req({"inputs": [one], "parameters": {"binary_data_output": True},
                                    "outputs": [{"name": "logits", "parameters": {"binary_data": False}}]}), specs)
    assert [(o.name, o.binary) for o in some] == [("logits", False)]
    status, msg = _status(lambda: oip.select_outputs(_req({"inputs": [one], "outputs": [{"name": "p"}]}), specs))
    assert status == 400 and "['embedding', 'logits']" in msg


def test_response_binary_outputs_follow_the_header_in_order_and_json_round_trips_float32():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3, 4)).astype(np.float32)
    logits = rng.normal(size=(3, 2)).astype(np.float32)
    body, headers = oip.encode_infer_response(
        model_name="s4l", model_version="1", request_id="r",
        outputs=[(oip.RequestedOutput("embedding", True), "FP32", emb),
                 (oip.RequestedOutput("logits", False), "FP32", logits)])
    n = int(headers["inference-header-content-length"])
    head = json.loads(body[:n])
    assert head["id"] == "r" and head["model_name"] == "s4l"
    assert head["outputs"][0]["parameters"]["binary_data_size"] == emb.nbytes
    np.testing.assert_array_equal(np.frombuffer(body[n:], "<f4").reshape(3, 4), emb)
    # JSON floats are float32's shortest repr: float32(value) gives back the very same bits.
    np.testing.assert_array_equal(np.array(head["outputs"][1]["data"], np.float32).reshape(3, 2), logits)
    body, headers = oip.encode_infer_response(model_name="s4l", model_version="1", request_id=None,
                                              outputs=[(oip.RequestedOutput("logits", False), "FP32", logits)])
    assert headers == {"content-type": "application/json"} and "id" not in json.loads(body)


def test_decompress_is_bounded_by_the_limit():
    raw = b"x" * 1000
    assert oip.decompress(gzip.compress(raw), "gzip", limit=1000) == raw
    assert oip.decompress(zlib.compress(raw), "deflate", limit=1000) == raw
    assert oip.decompress(raw, "", limit=10) == raw  # not compressed: the body limit already ran
    assert _status(lambda: oip.decompress(gzip.compress(raw), "gzip", limit=999))[0] == 413
    assert _status(lambda: oip.decompress(gzip.compress(raw)[:20], "gzip", limit=1000))[1].endswith("truncated")
    assert _status(lambda: oip.decompress(b"junk", "deflate", limit=1000))[0] == 400
    assert "not supported" in _status(lambda: oip.decompress(raw, "br", limit=1000))[1]


# -- openai_embeddings ----------------------------------------------------------------------------

def _parse(payload, **kw):
    return oai.parse_request(payload, **{"models": ["s4l"], "max_inputs": 4, "dim": 8, **kw})


def test_openai_request_forms():
    blob = jpeg_bytes()
    b64 = base64.b64encode(blob).decode()
    one = _parse({"model": "s4l", "input": f"data:image/jpeg;base64,{b64}"})
    assert one.images == [blob] and one.encoding_format == "float"
    many = _parse({"model": "s4l", "input": [b64, b64], "encoding_format": "base64", "dimensions": 8,
                   "modality": "image", "user": "u"})
    assert many.images == [blob, blob] and many.encoding_format == "base64"


@pytest.mark.parametrize("payload, status, param, code", [
    ({"model": "s4l", "input": "eA==", "temperature": 1}, 400, "temperature", "unknown_parameter"),
    ({"model": "gpt", "input": "eA=="}, 404, "model", "model_not_found"),
    ({"input": "eA=="}, 400, "model", None),
    ({"model": "s4l", "input": "eA==", "dimensions": 4}, 400, "dimensions", None),
    ({"model": "s4l", "input": "eA==", "dimensions": True}, 400, "dimensions", None),
    ({"model": "s4l", "input": "eA==", "encoding_format": "int8"}, 400, "encoding_format", None),
    ({"model": "s4l", "input": "eA==", "modality": "text"}, 400, "modality", None),
    ({"model": "s4l", "input": [[1, 2, 3]]}, 400, "input", None),
    ({"model": "s4l", "input": []}, 400, "input", None),
    ({"model": "s4l", "input": ["eA=="] * 5}, 413, "input", "too_many_inputs"),
    ({"model": "s4l", "input": "HTTPS://example.com/x.jpg"}, 400, "input", "url_not_supported"),
    ({"model": "s4l", "input": "not base64!"}, 400, "input", "invalid_base64"),
    ({"model": "s4l", "input": ""}, 400, "input", "invalid_image"),
    ([1], 400, None, None),
])
def test_openai_request_refusals(payload, status, param, code):
    with pytest.raises(oai.OpenAIError) as e:
        _parse(payload)
    assert (e.value.status, e.value.param, e.value.code) == (status, param, code)
    body = oai.error_body(e.value.status, e.value.message, code=e.value.code, param=e.value.param)
    assert body["error"]["type"] == "invalid_request_error"


def test_openai_response_encodings_and_normalisation():
    v = oai.normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(v, [[0.6, 0.8], [0.0, 0.0]])
    as_b64 = oai.response(v, model="s4l", encoding_format="base64")
    raw = base64.b64decode(as_b64["data"][0]["embedding"])
    assert raw == struct.pack("<2f", *v[0])  # little-endian float32, whatever the host's order
    as_float = orjson.loads(orjson.dumps(oai.response(v, model="s4l", encoding_format="float"),
                                         option=orjson.OPT_SERIALIZE_NUMPY))
    assert as_float["data"][1] == {"object": "embedding", "index": 1, "embedding": [0.0, 0.0]}
    assert oai.error_body(503, "busy")["error"]["type"] == "server_error"
    assert oai.error_body(401, "key")["error"]["type"] == "authentication_error"


# -- the routes in-process: states a real model cannot be put in on demand ------------------------

V2_INFER = "/v2/models/s4l/infer"


def _v2_body(*blobs: bytes) -> dict:
    return {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [len(blobs)],
                        "data": [base64.b64encode(b).decode() for b in blobs]}]}


def _v1_body(*blobs: bytes) -> dict:
    return {"model": "s4l", "input": [base64.b64encode(b).decode() for b in blobs]}


def test_not_ready_is_503_in_each_protocol_s_shape():
    async def go():
        async with Live(DummyBackend(fail_on_value=0)) as live:  # the warm-up batch is all zeros
            c = live.client
            return (await c.get("/v2/health/live"), await c.get("/v2/health/ready"),
                    await c.get("/v2/models/s4l/ready"), await c.post(V2_INFER, json=_v2_body(jpeg_bytes())),
                    await c.post("/v1/embeddings", json=_v1_body(jpeg_bytes())))

    live_, ready, model_ready, v2, v1 = run(go())
    assert live_.status_code == 200
    for r in (ready, model_ready, v2):
        assert r.status_code == 503 and "warm-up" in r.json()["error"], r.text
    assert v2.headers["retry-after"] == "5"
    assert v1.status_code == 503 and v1.json()["error"]["type"] == "server_error"


def test_queue_full_timeout_and_model_failure_in_each_protocol_s_shape():
    backend = DummyBackend(delay_s=0.3, class_names=["a", "b"])
    bad = io.BytesIO()
    Image.new("RGB", (32, 32), (7, 7, 7)).save(bad, "PNG")

    async def go():
        async with Live(backend, max_queue_images=2, max_wait_ms=0) as live:
            c = live.client
            first = asyncio.create_task(c.post("/embed", files=[
                ("files", ("a.jpg", jpeg_bytes(), "image/jpeg")), ("files", ("b.jpg", jpeg_bytes(seed=1), "image/jpeg"))]))
            while live.state.batcher.admitted < 2:
                await asyncio.sleep(0.005)
            full = (await c.post(V2_INFER, json=_v2_body(jpeg_bytes())),
                    await c.post("/v1/embeddings", json=_v1_body(jpeg_bytes())))
            await first
            backend.delay_s, backend.fail_on_value = 0.0, 7
            failed = (await c.post(V2_INFER, json=_v2_body(jpeg_bytes(), bad.getvalue())),
                      await c.post("/v1/embeddings", json=_v1_body(bad.getvalue())))
        backend.fail_on_value, backend.delay_s = None, 0.6
        async with Live(backend, request_timeout_s=0.1, max_wait_ms=0) as live:
            slow = await live.client.post(V2_INFER, json=_v2_body(jpeg_bytes()))
            while backend.concurrent:
                await asyncio.sleep(0.01)
        return full, failed, slow

    (v2_full, v1_full), (v2_failed, v1_failed), slow = run(go())
    assert v2_full.status_code == 503 and v2_full.headers["retry-after"] == "1"
    assert "busy" in v2_full.json()["error"]
    assert v1_full.status_code == 503 and v1_full.json()["error"]["code"] == "queue_full"
    assert v2_failed.status_code == 500 and v2_failed.json()["error"].startswith("image_bytes[1]: inference_failed")
    assert v1_failed.status_code == 500 and v1_failed.json()["error"]["param"] == "input"
    assert slow.status_code == 504 and isinstance(slow.json()["error"], str)


def test_a_body_growing_past_the_limit_is_413_in_each_protocol_s_shape():
    async def chunks():
        for _ in range(10):
            yield b"x" * 1000

    async def go():
        async with Live(DummyBackend(), max_body_bytes=4096) as live:
            return (await live.client.post(V2_INFER, content=chunks()),
                    await live.client.post("/v1/embeddings", content=chunks()))

    v2, v1 = run(go())
    assert v2.status_code == 413 and v2.json() == {"error": "request body exceeds 4096 bytes"}
    assert v1.status_code == 413 and v1.json()["error"]["type"] == "invalid_request_error"


def test_head_models_follow_the_registry():
    """`s4l-<head>` exists for each head the server has, the model's own class head included."""
    async def go():
        async with Live(DummyBackend(class_names=["a", "b", "c"])) as live:
            c = live.client
            meta = await c.get("/v2/models/s4l-model")
            infer = await c.post("/v2/models/s4l-model/infer", json=_v2_body(jpeg_bytes()))
            return meta, infer, await c.get("/v2/models/s4l-places")

    meta, infer, unknown = run(go())
    assert meta.json()["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]
    assert meta.json()["platform"] == "ensemble"
    assert [o["name"] for o in infer.json()["outputs"]] == ["logits"]
    assert unknown.status_code == 404 and "s4l, s4l-model" in unknown.json()["error"]
