"""Open Inference Protocol v2 and OpenAI-style embeddings, proven with their real client libraries
(tritonclient[http], openai) against a real `s4l serve` on loopback with a real exported model.
Every result is compared with /embed (or /classify) on the same images from the same server."""

from __future__ import annotations

import base64
import gzip
import io
import json
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnx
import pytest
from support.server import ROOT, ServerProcess, export_tiny, jpeg_bytes

from s4l.heads import Head, save_head
from s4l.imaging import PreprocessSpec, decode_image, eval_crop

tritonclient_http = pytest.importorskip("tritonclient.http")
openai = pytest.importorskip("openai")
from tritonclient.utils import InferenceServerException  # noqa: E402

KEY = "protocols-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_IMAGES = 8
MAX_BODY = 400_000
CROP = 32
DIM = 128
RTOL = 1e-5
SCRIPT = ROOT / "docs" / "examples" / "triton_client.py"
OPENAI_SCRIPT = ROOT / "docs" / "examples" / "openai_embeddings.py"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("protocols")
    model = export_tiny(tmp)
    meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    rng = np.random.default_rng(0)
    head = Head(weight=rng.normal(size=(4, DIM)).astype(np.float32),
                bias=rng.normal(size=4).astype(np.float32), class_names=("w", "x", "y", "z"),
                model_hash=meta["s4l.checkpoint_sha256"])
    images = []
    for i, size in enumerate([(48, 40), (70, 33), (32, 32)]):
        p = tmp / f"img{i}.jpg"
        p.write_bytes(jpeg_bytes(size=size, seed=20 + i))
        images.append(p)
    return {"model": model, "head": save_head(tmp / "probe.npz", head), "head_obj": head,
            "images": images}


@pytest.fixture(scope="module")
def server(files):
    env = {"S4L_API_KEY": KEY, "S4L_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES),
           "S4L_MAX_BODY_BYTES": str(MAX_BODY), "S4L_MAX_WAIT_MS": "5", "S4L_MAX_BATCH_SIZE": "16",
           "S4L_HEADS": f"probe={files['head']}"}
    with ServerProcess(files["model"], env=env) as srv:
        yield srv
        assert "Traceback" not in srv.output()


@pytest.fixture(scope="module")
def triton(server):
    client = tritonclient_http.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def embed(server, blobs: list[bytes], normalize: bool = False) -> np.ndarray:
    """What /embed answers for these files: the reference every protocol is compared with."""
    r = httpx.post(server.url + "/embed", params={"normalize": normalize}, headers=dict(AUTH), timeout=60,
                   files=[("files", (f"f{i}", b, "application/octet-stream")) for i, b in enumerate(blobs)])
    assert r.status_code == 200, r.text
    return np.array([x["embedding"] for x in r.json()["results"]], dtype=np.float32)


def crops(blobs: list[bytes]) -> np.ndarray:
    spec = PreprocessSpec.for_image_size(CROP)
    return np.stack([eval_crop(decode_image(b), spec) for b in blobs])


def blobs_of(files) -> list[bytes]:
    return [p.read_bytes() for p in files["images"]]


# -- the docs' script: THE tritonclient example, run as a user runs it ----------------------------

def test_docs_triton_script_equals_embed(server, files, tmp_path):
    out = tmp_path / "out.npz"
    r = subprocess.run([sys.executable, str(SCRIPT), "--url", server.url.removeprefix("http://"),
                        "--api-key", KEY, "--out", str(out), *map(str, files["images"])],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert f"embedding: float32 [3, {DIM}]" in r.stdout
    got = np.load(out)
    np.testing.assert_allclose(got["embedding"], embed(server, blobs_of(files)), rtol=RTOL)
    scores = httpx.post(server.url + "/classify", params={"top_k": 3}, headers=dict(AUTH), files=[
        ("files", (f"f{i}", b, "image/jpeg")) for i, b in enumerate(blobs_of(files))]).json()
    for logits, res in zip(got["logits"], scores["results"]):
        p = np.exp(logits - logits.max())
        p /= p.sum()
        want = np.zeros(3)
        want[[t["index"] for t in res["top_k"]]] = [t["score"] for t in res["top_k"]]
        np.testing.assert_allclose(p, want, rtol=RTOL, atol=1e-7)


def test_docs_script_uses_only_calls_triton_answers():
    """The script must also run against a real Triton: no BYTES input, no s4l-only routes."""
    src = SCRIPT.read_text()
    assert "image_bytes" not in src.split('"""', 2)[2] and "BYTES" not in src.split('"""', 2)[2]
    for call in ("is_server_live", "is_server_ready", "is_model_ready", "get_model_metadata", "infer("):
        assert call in src
    assert "httpx" not in src and "/embed" not in src


# -- tritonclient: health, metadata, infer in every encoding ----------------------------------------

def test_health_ready_and_metadata(server, triton):
    assert triton.is_server_live() and triton.is_server_ready()  # probes need no key, as /readyz
    assert triton.is_model_ready("s4l", headers=dict(AUTH))
    assert triton.is_model_ready("s4l", "1", headers=dict(AUTH))
    assert triton.is_model_ready("s4l-probe", headers=dict(AUTH))
    assert not triton.is_model_ready("nope", headers=dict(AUTH))
    server_meta = triton.get_server_metadata(headers=dict(AUTH))
    assert server_meta["extensions"] == ["binary_tensor_data"] and server_meta["name"] == "s4l"
    meta = triton.get_model_metadata("s4l", headers=dict(AUTH))
    assert meta["name"] == "s4l" and meta["versions"] == ["1"]
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]} == {
        "images": ("UINT8", [-1, CROP, CROP, 3]), "image_bytes": ("BYTES", [-1])}
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]} == {
        "embedding": ("FP32", [-1, DIM]), "logits": ("FP32", [-1, 3])}
    assert triton.get_model_metadata("s4l", "1", headers=dict(AUTH)) == meta
    head = triton.get_model_metadata("s4l-probe", headers=dict(AUTH))
    assert head["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 4]}]
    heads = httpx.get(server.url + "/heads", headers=dict(AUTH)).json()["heads"]
    assert {h["name"] for h in heads} == {"model", "probe"}  # so models s4l-model, s4l-probe
    assert triton.is_model_ready("s4l-model", headers=dict(AUTH))


def test_metadata_matches_the_triton_export(files, tmp_path):
    """Model `s4l` declares `images` exactly as the Triton config of our export does."""
    from s4l.service.triton import write_triton_repo

    config = (write_triton_repo(files["model"], tmp_path / "repo") / "config.pbtxt").read_text()
    assert 'name: "s4l"' in config
    assert f'name: "images"\n    data_type: TYPE_UINT8\n    dims: [ {CROP}, {CROP}, 3 ]' in config
    assert f'name: "embedding"\n    data_type: TYPE_FP32\n    dims: [ {DIM} ]' in config


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_infer_uint8_every_encoding_equals_embed(server, files, triton, binary_in, binary_out):
    blobs = blobs_of(files)
    batch = crops(blobs)
    images = tritonclient_http.InferInput("images", list(batch.shape), "UINT8")
    images.set_data_from_numpy(batch, binary_data=binary_in)
    outputs = [tritonclient_http.InferRequestedOutput(n, binary_data=binary_out)
               for n in ("embedding", "logits")]
    result = triton.infer("s4l", [images], outputs=outputs, request_id=f"req-{binary_in}-{binary_out}",
                          headers=dict(AUTH))
    response = result.get_response()
    assert response["id"] == f"req-{binary_in}-{binary_out}" and response["model_name"] == "s4l"
    for out in response["outputs"]:
        assert ("parameters" in out) == binary_out and ("data" in out) == (not binary_out)
    np.testing.assert_allclose(result.as_numpy("embedding"), embed(server, blobs), rtol=RTOL)
    assert result.as_numpy("logits").shape == (3, 3)


def test_infer_without_outputs_returns_all_binary(server, files, triton):
    """tritonclient's default (no outputs named): binary_data_output, every output."""
    blobs = blobs_of(files)
    batch = crops(blobs)
    images = tritonclient_http.InferInput("images", list(batch.shape), "UINT8")
    images.set_data_from_numpy(batch)
    result = triton.infer("s4l", [images], model_version="1", headers=dict(AUTH))
    assert {o["name"] for o in result.get_response()["outputs"]} == {"embedding", "logits"}
    np.testing.assert_allclose(result.as_numpy("embedding"), embed(server, blobs), rtol=RTOL)


@pytest.mark.parametrize("binary_in", [True, False])
def test_infer_bytes_batch_of_jpegs_is_decoded_and_cropped_here(server, files, triton, binary_in):
    blobs = blobs_of(files) + [jpeg_bytes(size=(300, 200), seed=5), _encoded("PNG"), _encoded("WEBP")]
    # Binary: raw file bytes. JSON cannot carry raw bytes, so there each element is base64 text.
    arr = np.array(blobs if binary_in else [base64.b64encode(b).decode() for b in blobs], dtype=object)
    files_in = tritonclient_http.InferInput("image_bytes", [len(blobs)], "BYTES")
    files_in.set_data_from_numpy(arr, binary_data=binary_in)
    result = triton.infer("s4l", [files_in], headers=dict(AUTH),
                          outputs=[tritonclient_http.InferRequestedOutput("embedding")])
    np.testing.assert_allclose(result.as_numpy("embedding"), embed(server, blobs), rtol=RTOL)


@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_compressed_requests_are_inflated(server, files, triton, compression):
    blobs = blobs_of(files)
    files_in = tritonclient_http.InferInput("image_bytes", [len(blobs)], "BYTES")
    files_in.set_data_from_numpy(np.array(blobs, dtype=object))
    result = triton.infer("s4l", [files_in], headers=dict(AUTH),
                          request_compression_algorithm=compression,
                          response_compression_algorithm=compression)
    np.testing.assert_allclose(result.as_numpy("embedding"), embed(server, blobs), rtol=RTOL)


def _encoded(fmt: str) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(len(fmt))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def test_head_model_logits_equal_the_head_on_embed(server, files, triton):
    blobs = blobs_of(files)
    arr = np.array(blobs, dtype=object)
    files_in = tritonclient_http.InferInput("image_bytes", [len(blobs)], "BYTES")
    files_in.set_data_from_numpy(arr)
    result = triton.infer("s4l-probe", [files_in], headers=dict(AUTH))
    want = files["head_obj"].apply(embed(server, blobs))
    np.testing.assert_allclose(result.as_numpy("logits"), want, rtol=RTOL, atol=1e-6)


def test_wrong_model_version_input_and_auth_are_client_exceptions(server, files, triton):
    batch = crops(blobs_of(files)[:1])
    images = tritonclient_http.InferInput("images", list(batch.shape), "UINT8")
    images.set_data_from_numpy(batch)
    cases = [
        (lambda: triton.infer("nope", [images], headers=dict(AUTH)), "404", "unknown model 'nope'"),
        (lambda: triton.infer("s4l", [images], model_version="7", headers=dict(AUTH)), "404", "version"),
        (lambda: triton.get_model_metadata("nope", headers=dict(AUTH)), "404", "unknown model"),
        (lambda: triton.infer("s4l", [images]), "401", "API key"),
        (lambda: triton.infer("s4l", [images], headers={"Authorization": "Bearer wrong"}), "401", "API key"),
        (lambda: triton.get_server_metadata(), "401", "API key"),
    ]
    for call, status, text in cases:
        with pytest.raises(InferenceServerException) as e:
            call()
        assert e.value.status() == status and text in e.value.message(), e.value
    wrong = tritonclient_http.InferInput("images", [1, CROP + 1, CROP, 3], "UINT8")
    wrong.set_data_from_numpy(np.zeros((1, CROP + 1, CROP, 3), np.uint8))
    with pytest.raises(InferenceServerException, match=rf"\[N, {CROP}, {CROP}, 3\]") as e:
        triton.infer("s4l", [wrong], headers=dict(AUTH))
    assert e.value.status() == "400"


# -- the wire itself: any or no Content-Type, errors, limits ---------------------------------------

def _binary_request(batch: np.ndarray, **outputs) -> tuple[bytes, dict]:
    header = json.dumps({"id": "raw", "inputs": [{
        "name": "images", "datatype": "UINT8", "shape": list(batch.shape),
        "parameters": {"binary_data_size": batch.nbytes}}],
        "parameters": {"binary_data_output": True}, **outputs}).encode()
    return header + batch.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


@pytest.mark.parametrize("ctype", [None, "application/octet-stream", "text/plain", "application/json"])
def test_any_or_no_content_type_is_accepted(server, files, ctype):
    blobs = blobs_of(files)
    body, headers = _binary_request(crops(blobs))
    if ctype:
        headers["Content-Type"] = ctype
    r = httpx.post(server.url + "/v2/models/s4l/infer", content=body, headers={**AUTH, **headers})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    head = json.loads(r.content[:n])
    assert head["id"] == "raw"
    emb = head["outputs"][0]
    assert emb["name"] == "embedding" and emb["shape"] == [3, DIM]
    got = np.frombuffer(r.content[n: n + emb["parameters"]["binary_data_size"]], "<f4").reshape(3, DIM)
    np.testing.assert_allclose(got, embed(server, blobs), rtol=RTOL)


def test_json_uint8_data_nested_equals_embed(server, files):
    blobs = blobs_of(files)
    batch = crops(blobs)
    r = httpx.post(server.url + "/v2/models/s4l/infer", headers=dict(AUTH), json={
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": list(batch.shape),
                    "data": batch.tolist()}], "outputs": [{"name": "embedding"}]})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    out = r.json()["outputs"]
    assert [o["name"] for o in out] == ["embedding"]
    np.testing.assert_allclose(np.array(out[0]["data"], np.float32).reshape(out[0]["shape"]),
                               embed(server, blobs), rtol=RTOL)


def _bytes_tensor(blobs: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in blobs)


@pytest.mark.parametrize("case, status, text", [
    ("bad_image", 400, "image_bytes[1]: undecodable"),
    ("too_many_images", 413, f"at most {MAX_IMAGES}"),
    ("body_over_limit", 413, "exceeds"),
    ("two_inputs", 400, "exactly one input"),
    ("size_mismatch", 400, "binary_data_size add up to"),
    ("bad_header_length", 400, "Inference-Header-Content-Length"),
    ("float_pixels", 400, "must be integers"),
    ("pixel_over_255", 400, "outside UINT8"),
    ("shared_memory", 400, "shared memory"),
    ("classification", 400, "classification"),
    ("unknown_output", 400, "unknown output"),
    ("not_json", 400, "not valid JSON"),
    ("brotli", 400, "Content-Encoding 'br'"),
    ("gzip_bomb", 413, "once decompressed"),
    ("sequence", 400, "sequence_id"),
])
def test_bad_v2_requests_get_the_protocol_error(server, files, case, status, text):
    good = jpeg_bytes(seed=3)
    url = server.url + "/v2/models/s4l/infer"
    one = {"name": "image_bytes", "datatype": "BYTES", "shape": [1]}
    headers = dict(AUTH)

    def binary(inputs, blob, **extra):
        head = json.dumps({"inputs": inputs, **extra}).encode()
        headers["Inference-Header-Content-Length"] = str(len(head))
        return head + blob

    if case == "bad_image":
        blobs = [good, b"\x00not an image", good]
        body = binary([{**one, "shape": [3], "parameters": {"binary_data_size": len(_bytes_tensor(blobs))}}],
                      _bytes_tensor(blobs))
    elif case == "too_many_images":
        blobs = [good] * (MAX_IMAGES + 1)
        body = binary([{**one, "shape": [len(blobs)],
                        "parameters": {"binary_data_size": len(_bytes_tensor(blobs))}}], _bytes_tensor(blobs))
    elif case == "body_over_limit":
        body = bytes(MAX_BODY + 10)
    elif case == "two_inputs":
        body = json.dumps({"inputs": [{**one, "data": [base64.b64encode(good).decode()]},
                                      {"name": "images", "datatype": "UINT8", "shape": [1],
                                       "data": [1]}]}).encode()
    elif case == "size_mismatch":
        blob = _bytes_tensor([good])
        body = binary([{**one, "parameters": {"binary_data_size": len(blob)}}], blob + b"extra")
    elif case == "bad_header_length":
        body = json.dumps({"inputs": [one]}).encode()
        headers["Inference-Header-Content-Length"] = "999999"
    elif case in ("float_pixels", "pixel_over_255"):
        v = 1.5 if case == "float_pixels" else 256
        body = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, CROP, CROP, 3],
                                       "data": [v] * (CROP * CROP * 3)}]}).encode()
    elif case == "shared_memory":
        body = json.dumps({"inputs": [{**one, "parameters": {"shared_memory_region": "r"}}]}).encode()
    elif case in ("classification", "unknown_output"):
        out = {"name": "logits", "parameters": {"classification": 2}} if case == "classification" \
            else {"name": "probs"}
        body = json.dumps({"inputs": [{**one, "data": [base64.b64encode(good).decode()]}],
                           "outputs": [out]}).encode()
    elif case == "not_json":
        body = b"{not json"
    elif case == "brotli":
        body = b"\x1f\x8b whatever"
        headers["Content-Encoding"] = "br"
    elif case == "gzip_bomb":  # 20 KB on the wire, 10 MB inflated: the limit counts the latter
        body = gzip.compress(bytes(10_000_000))
        headers["Content-Encoding"] = "gzip"
    else:
        body = json.dumps({"inputs": [{**one, "data": [base64.b64encode(good).decode()]}],
                           "parameters": {"sequence_id": 7}}).encode()
    r = httpx.post(url, content=body, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)
    assert text in r.json()["error"], r.json()
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200


# -- OpenAI: the official client, both encodings ----------------------------------------------------

def _data_urls(blobs: list[bytes]) -> list[str]:
    return [f"data:image/jpeg;base64,{base64.b64encode(b).decode()}" for b in blobs]


@pytest.mark.parametrize("encoding", ["default (base64)", "float"])
def test_openai_client_embeddings_equal_normalised_embed(server, files, oai, encoding):
    blobs = blobs_of(files)
    kw = {} if encoding.startswith("default") else {"encoding_format": "float"}
    inputs = _data_urls(blobs)
    inputs[1] = base64.b64encode(blobs[1]).decode()  # bare base64 too
    res = oai.embeddings.create(model="s4l", input=inputs, extra_body={"modality": "image"}, **kw)
    assert res.model == "s4l" and [d.index for d in res.data] == [0, 1, 2]
    got = np.array([d.embedding for d in res.data], dtype=np.float32)
    np.testing.assert_allclose(got, embed(server, blobs, normalize=True), rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)
    one = oai.embeddings.create(model="s4l", input=inputs[0], dimensions=DIM)
    np.testing.assert_allclose(one.data[0].embedding, got[0], rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("flag", [[], ["--float"]])
def test_docs_openai_script_equals_normalised_embed(server, files, tmp_path, flag):
    out = tmp_path / "out.npy"
    r = subprocess.run([sys.executable, str(OPENAI_SCRIPT), "--base-url", server.url + "/v1",
                        "--api-key", KEY, "--out", str(out), *flag, *map(str, files["images"])],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "models: ['s4l']" in r.stdout and f"embeddings: [3, {DIM}]" in r.stdout
    np.testing.assert_allclose(np.load(out), embed(server, blobs_of(files), normalize=True),
                               rtol=RTOL, atol=1e-7)


def test_openai_wire_default_is_float_and_base64_is_little_endian(server, files):
    blobs = blobs_of(files)[:1]
    want = embed(server, blobs, normalize=True)[0]
    r = httpx.post(server.url + "/v1/embeddings", headers=dict(AUTH),
                   json={"model": "s4l", "input": _data_urls(blobs)})
    body = r.json()
    assert body["object"] == "list" and body["usage"] == {"prompt_tokens": 0, "total_tokens": 0}
    assert body["data"][0]["object"] == "embedding"
    np.testing.assert_allclose(body["data"][0]["embedding"], want, rtol=RTOL, atol=1e-7)
    r = httpx.post(server.url + "/v1/embeddings", headers=dict(AUTH),
                   json={"model": "s4l", "input": _data_urls(blobs), "encoding_format": "base64"})
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    np.testing.assert_allclose(np.frombuffer(raw, "<f4"), want, rtol=RTOL, atol=1e-7)


def test_openai_models_and_errors(server, files, oai):
    assert [m.id for m in oai.models.list()] == ["s4l"]
    url = _data_urls(blobs_of(files)[:1])
    cases = [
        (openai.BadRequestError, dict(model="s4l", input=url, dimensions=64), "dimensions"),
        (openai.BadRequestError, dict(model="s4l", input=["https://example.com/a.jpg"]), "never fetches"),
        (openai.BadRequestError, dict(model="s4l", input=["bm90IGFuIGltYWdl"]), "input[0]"),
        (openai.BadRequestError, dict(model="s4l", input=url, extra_body={"modality": "text"}), "modality"),
        (openai.NotFoundError, dict(model="text-embedding-3-small", input=url), "does not exist"),
    ]
    for exc, kw, text in cases:
        with pytest.raises(exc) as e:
            oai.embeddings.create(**kw)
        err = e.value.body
        assert set(err) == {"message", "type", "param", "code"} and text in err["message"], err
    bad_key = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad_key.embeddings.create(model="s4l", input=url)
    assert e.value.code == "invalid_api_key" and e.value.type == "authentication_error"
    r = httpx.post(server.url + "/v1/embeddings", headers=dict(AUTH), content=bytes(MAX_BODY + 10))
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/v1/embeddings", headers=dict(AUTH),
                   json={"model": "s4l", "input": url * (MAX_IMAGES + 1)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_inputs"


# -- one batcher, one set of metrics ------------------------------------------------------------

def test_protocols_share_the_batcher_and_metrics(server, files, triton, oai):
    blobs = blobs_of(files)
    before = _batches(server)

    def v2(_):
        arr = np.array(blobs[:1], dtype=object)
        t = tritonclient_http.InferInput("image_bytes", [1], "BYTES")
        t.set_data_from_numpy(arr)
        return tritonclient_http.InferenceServerClient(url=server.url.removeprefix("http://")).infer(
            "s4l", [t], headers=dict(AUTH)).as_numpy("embedding")

    def v1(_):
        return oai.embeddings.create(model="s4l", input=_data_urls(blobs[:1])).data[0].embedding

    def ours(_):
        return embed(server, blobs[:1])[0]

    with ThreadPoolExecutor(12) as pool:
        jobs = [pool.submit(f, i) for i in range(8) for f in (v2, v1, ours)]
        results = [j.result() for j in jobs]
    assert len(results) == 24
    count, images = (a - b for a, b in zip(_batches(server), before))
    assert images == 24 and count < 24  # some model calls carried images of several protocols
    assert httpx.post(server.url + "/v2/models/nope/infer", headers=dict(AUTH), content=b"{}").status_code == 404
    text = httpx.get(server.url + "/metrics", headers=dict(AUTH)).text
    for line in ('s4l_requests_total{route="/v2/models/{name}/infer",status="200"}',
                 's4l_requests_total{route="/v1/embeddings",status="200"}',
                 's4l_images_total{outcome="ok",route="/v2/models/{name}/infer"}',
                 's4l_images_total{outcome="ok",route="/v1/embeddings"}',
                 's4l_requests_total{route="/v2/models/{name}/infer",status="404"}'):
        assert line in text, line


def _batches(server) -> tuple[float, float]:
    text = httpx.get(server.url + "/metrics", headers=dict(AUTH)).text
    values = {line.split()[0]: float(line.split()[-1]) for line in text.splitlines()
              if line.startswith(("s4l_batch_size_count", "s4l_batch_size_sum"))}
    return values["s4l_batch_size_count"], values["s4l_batch_size_sum"]


def test_server_never_imports_the_clients():
    """The clients are dev/test dependencies: the server's modules must not need them."""
    code = ("import sys; import s4l.service.app, s4l.service.routes_v2, s4l.service.routes_openai; "
            "print(sorted(m for m in ('tritonclient', 'openai', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

