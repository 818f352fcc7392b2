"""A real `s4l serve` (uvicorn on loopback) on a real exported ONNX model: parity, bad inputs,
concurrency, auth, metrics, the committed OpenAPI schema, schemathesis and graceful shutdown."""

from __future__ import annotations

import base64
import io
import json
import random
import signal
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image, ImageOps
from support.server import CLASSES, ServerProcess, export_tiny, jpeg_bytes

from s4l.imaging import decode_image, eval_crop

KEY = "live-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_IMAGES = 8
MAX_BODY = 400_000


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("live"))


@pytest.fixture(scope="module")
def server(model):
    env = {"S4L_API_KEY": KEY, "S4L_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES),
           "S4L_MAX_BODY_BYTES": str(MAX_BODY), "S4L_MAX_WAIT_MS": "5", "S4L_MAX_BATCH_SIZE": "16"}
    with ServerProcess(model, env=env) as srv:
        yield srv
        assert "Traceback" not in srv.output()


@pytest.fixture(scope="module")
def reference(model):
    """The same ONNX file run directly: what the server must answer for a given crop."""
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    from s4l.service.backend import parse_metadata

    spec, _, _ = parse_metadata(dict(sess.get_modelmeta().custom_metadata_map), source="t")

    def embed_crop(crop: np.ndarray) -> np.ndarray:
        return sess.run(["embedding"], {"images": crop[None]})[0][0]

    embed_crop.spec = spec
    embed_crop.bytes = lambda b: embed_crop(eval_crop(decode_image(b), spec))
    return embed_crop


def post(server, files=None, path="/embed", headers=AUTH, **kw):
    if files is not None:
        kw["files"] = [("files", (f"f{i}", b, "application/octet-stream")) for i, b in enumerate(files)]
    return httpx.post(server.url + path, headers=headers, timeout=60, **kw)


def assert_healthy(server, reference):
    assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
    good = jpeg_bytes(seed=99)
    r = post(server, [good])
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()["results"][0]["embedding"], reference.bytes(good), rtol=1e-4, atol=1e-5)


# -- parity with the torch model through the training eval transform -----------------------------

def test_embedding_equals_torch_eval_path(server, model, tmp_path):
    import torch

    from s4l.training.checkpoint import load_for_inference
    from s4l.training.transforms import EvalTransform

    inf = load_for_inference(model.with_suffix(".pt"))
    files = []
    for i, size in enumerate([(300, 200), (64, 96), (37, 37)]):
        p = tmp_path / f"img{i}.jpg"
        p.write_bytes(jpeg_bytes(size=size, seed=10 + i))
        files.append(p)
    r = post(server, [p.read_bytes() for p in files])
    assert r.status_code == 200
    got = np.array([x["embedding"] for x in r.json()["results"]])
    # The training eval transform: s4l.imaging.eval_crop, then x / 127.5 - 1 (to_model_input).
    transform = EvalTransform(inf.preprocess)
    x = torch.cat([transform(decode_image(p)) for p in files])
    with torch.no_grad():
        ref = inf.model(x, heads=())["pre_logits"].numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert r.json()["dim"] == ref.shape[1]


def test_embedding_parity_on_imagenette_photos(server, model, imagenette_root, reference):
    files = sorted((imagenette_root / "val").rglob("*.JPEG"))[:4]
    r = post(server, [p.read_bytes() for p in files])
    for res, p in zip(r.json()["results"], files):
        np.testing.assert_allclose(res["embedding"], reference.bytes(p.read_bytes()), rtol=1e-4, atol=1e-5)


def test_classify_labels_and_scores(server, model):
    import torch

    from s4l.training.checkpoint import load_for_inference
    from s4l.training.transforms import EvalTransform

    inf = load_for_inference(model.with_suffix(".pt"))
    blob = jpeg_bytes(seed=4, size=(80, 60))
    r = post(server, [blob], path="/classify", params={"top_k": 3})
    top = r.json()["results"][0]["top_k"]
    x = EvalTransform(inf.preprocess)(decode_image(blob))
    with torch.no_grad():
        p = torch.softmax(inf.model(x)["classes"], 1)[0].numpy()
    assert [t["index"] for t in top] == list(np.argsort(-p))
    assert [t["label"] for t in top] == [CLASSES[i] for i in np.argsort(-p)]
    np.testing.assert_allclose([t["score"] for t in top], np.sort(p)[::-1], rtol=1e-4)


# -- bad inputs: every one gets its own answer, the server stays healthy ------------------------

def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _gif(frames) -> bytes:
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=len(frames) > 1, append_images=frames[1:], duration=50)
    return buf.getvalue()


def _bomb_png(w=50_000, h=50_000) -> bytes:
    """A tiny PNG whose header claims w x h pixels (a decompression bomb's shape)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _exif_rotated() -> tuple[bytes, Image.Image]:
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).convert("RGB")
    return buf.getvalue(), shown


def _bad_images():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)
    rgb = Image.fromarray(arr)
    big = jpeg_bytes(size=(300, 300), seed=1)
    frames = [Image.fromarray(np.full((30, 30, 3), v, np.uint8)).convert("P") for v in (10, 120, 240)]
    return {
        "truncated_jpeg": (big[: len(big) // 2], "truncated"),
        "cmyk_jpeg": (_jpeg(rgb.convert("CMYK")), None),
        "png_16bit": (_png(Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16))), None),
        "rgba_png": (_png(rgb.convert("RGBA")), None),
        "palette_gif": (_gif([rgb.convert("P")]), None),
        "animated_gif": (_gif(frames), None),
        "one_pixel": (_png(Image.new("RGB", (1, 1), (200, 10, 10))), None),
        "bomb_50k_x_50k": (_bomb_png(), "too_many_pixels"),
        "random_bytes": (bytes(rng.integers(0, 256, 2000, dtype=np.uint8)), "undecodable"),
        "empty_file": (b"", "empty"),
    }


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("name", list(_bad_images()))
def test_bad_image_gets_its_own_answer(server, reference, name):
    blob, code = _bad_images()[name]
    good = jpeg_bytes(seed=7)
    r = post(server, [good, blob, good])
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 3
    for i in (0, 2):
        np.testing.assert_allclose(res[i]["embedding"], reference.bytes(good), rtol=1e-4, atol=1e-5)
    if code is None:
        np.testing.assert_allclose(res[1]["embedding"], reference.bytes(blob), rtol=1e-4, atol=1e-5)
    else:
        assert res[1]["error"]["code"] == code and res[1]["error"]["message"]
    assert_healthy(server, reference)


def test_exif_rotation_is_applied(server, reference):
    blob, shown = _exif_rotated()
    assert shown.size == (40, 70)  # portrait once rotated
    r = post(server, [blob])
    want = reference(eval_crop(shown, reference.spec))
    np.testing.assert_allclose(r.json()["results"][0]["embedding"], want, rtol=1e-4, atol=1e-5)
    unrotated = reference(eval_crop(Image.open(io.BytesIO(blob)).convert("RGB"), reference.spec))
    assert not np.allclose(want, unrotated, rtol=1e-3)


@pytest.mark.parametrize("case, status, code", [
    ("wrong_content_type", 415, "unsupported_media_type"),
    ("body_over_limit", 413, "payload_too_large"),
    ("too_many_files", 413, "too_many_images"),
    ("broken_base64", 422, "malformed_base64"),
    ("malformed_json", 422, "malformed_json"),
    ("wrong_api_key", 401, "unauthorized"),
    ("no_api_key", 401, "unauthorized"),
])
def test_bad_requests(server, reference, case, status, code):
    good = jpeg_bytes()
    if case == "wrong_content_type":
        r = post(server, content=good, headers={**AUTH, "Content-Type": "image/jpeg"})
    elif case == "body_over_limit":
        r = post(server, [bytes(MAX_BODY + 10)])
    elif case == "too_many_files":
        r = post(server, [good] * (MAX_IMAGES + 1))
    elif case == "broken_base64":
        r = post(server, json={"images": [base64.b64encode(good).decode(), "!!not*base64"]})
    elif case == "malformed_json":
        r = post(server, content=b'{"images": [', headers={**AUTH, "Content-Type": "application/json"})
    elif case == "wrong_api_key":
        r = post(server, [good], headers={"Authorization": "Bearer wrong"})
    else:
        r = post(server, [good], headers={})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    assert_healthy(server, reference)


# -- concurrency: many clients, mixed good and bad, right answers in the right order ------------

def test_many_concurrent_clients_get_their_own_answers(server, reference):
    goods = [jpeg_bytes(seed=100 + i, size=(40 + 3 * i, 50)) for i in range(10)]
    refs = [reference.bytes(g) for g in goods]
    bads = [(b"", "empty"), (b"\x00garbage", "undecodable"), (_bomb_png(), "too_many_pixels")]

    def client(k: int):
        rnd = random.Random(k)
        plan = [("good", rnd.randrange(10)) if rnd.random() < 0.7 else ("bad", rnd.randrange(3))
                for _ in range(rnd.randint(1, MAX_IMAGES))]
        blobs = [goods[i] if kind == "good" else bads[i][0] for kind, i in plan]
        if k % 2:
            r = post(server, json={"images": [base64.b64encode(b).decode() for b in blobs]})
        else:
            r = post(server, blobs)
        return plan, r

    with ThreadPoolExecutor(24) as pool:
        outcomes = list(pool.map(client, range(48)))
    for plan, r in outcomes:
        assert r.status_code == 200, r.text
        res = r.json()["results"]
        assert len(res) == len(plan)
        for (kind, i), got in zip(plan, res):
            if kind == "good":
                np.testing.assert_allclose(got["embedding"], refs[i], rtol=1e-4, atol=1e-5)
            else:
                assert got["error"]["code"] == bads[i][1]
    metrics = httpx.get(server.url + "/metrics", headers=AUTH).text
    counts = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("s4l_batch_size_count")]
    sums = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("s4l_batch_size_sum")]
    assert sums[0] > counts[0]  # some model calls carried more than one image


# -- health, info, metrics, schema ----------------------------------------------------------------

def test_health_ready_info(server, model):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz").json()
    assert ready["status"] == "ready" and ready["provider"] == "CPUExecutionProvider"
    info = httpx.get(server.url + "/info", headers=AUTH).json()
    assert info["provider"] == "CPUExecutionProvider" and info["embedding_dim"] == 128
    assert info["labels"] == list(CLASSES) and info["num_classes"] == 3
    assert info["limits"]["max_images_per_request"] == MAX_IMAGES
    assert info["limits"]["max_body_bytes"] == MAX_BODY
    assert info["metadata"]["s4l.checkpoint_sha256"]
    assert info["input"]["shape"][1:] == [32, 32, 3]
    assert httpx.get(server.url + "/info").status_code == 401


def test_metrics_exposition(server):
    post(server, [jpeg_bytes()])
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    for name in ("s4l_requests_total", "s4l_request_seconds_bucket", "s4l_batch_size_bucket",
                 "s4l_queue_depth", "s4l_images_total"):
        assert name in text
    assert 's4l_requests_total{route="/embed",status="200"}' in text


def test_live_openapi_equals_committed(server):
    from s4l.service.openapi_doc import COMMITTED

    live = httpx.get(server.url + "/openapi.json", headers=AUTH).json()
    assert live == json.loads(COMMITTED.read_text()), "run `python -m s4l.service.openapi_doc`"


def test_schemathesis_finds_no_server_errors(server, reference):
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode, openapi

    schema = openapi.from_dict(httpx.get(server.url + "/openapi.json", headers=AUTH).json())
    seen: dict[str, set[int]] = {}
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=12, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                r = case.call(base_url=server.url, headers=dict(AUTH))
                seen.setdefault(f"{case.method} {case.path}", set()).add(r.status_code)
                assert r.status_code < 500, (case.method, case.path, r.status_code, r.text[:300])
                if r.status_code >= 400 and case.path != "/metrics":
                    assert set(r.json()) == {"error"}

            try:
                check()
            except Unsatisfiable:
                # Nothing to get wrong (no parameters or body): no negative cases exist.
                assert mode == GenerationMode.NEGATIVE, op.label
    # 6 routes + GET /heads, POST /admin/reload-heads, POST /search; Open Inference Protocol v2:
    # 7 GET + 2 POST (with and without /versions/{version}); OpenAI: POST /v1/embeddings, GET /v1/models
    assert len(seen) == 20 and all(seen.values())
    assert_healthy(server, reference)


# -- graceful shutdown ----------------------------------------------------------------------------

def test_sigterm_finishes_in_flight_requests(model, reference):
    # A long batching window keeps the request in the queue when SIGTERM arrives.
    srv = ServerProcess(model, env={"S4L_MAX_WAIT_MS": "1500", "S4L_MAX_BATCH_SIZE": "64"})
    with srv:
        blob = jpeg_bytes(seed=5)
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("r", post(srv, [blob], headers={})))
        t.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            m = httpx.get(srv.url + "/metrics").text
            if "s4l_queue_depth 1.0" in m:
                break
            time.sleep(0.02)
        code = srv.stop()
        t.join(30)
    r = out["r"]
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()["results"][0]["embedding"], reference.bytes(blob), rtol=1e-4, atol=1e-5)
    # uvicorn re-raises the signal after its graceful shutdown, so the exit status is SIGTERM's.
    assert code in (0, -signal.SIGTERM), srv.output()
    assert "Application shutdown complete" in srv.output()


# -- CUDA (only where onnxruntime-gpu and a GPU exist) -------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="onnxruntime has no CUDA provider here")
def test_cuda_provider_when_asked(model, reference):
    with ServerProcess(model, env={"S4L_PROVIDER": "cuda"}) as srv:
        assert httpx.get(srv.url + "/readyz").json()["provider"] == "CUDAExecutionProvider"
        blob = jpeg_bytes(seed=8)
        r = post(srv, [blob], headers={})
        np.testing.assert_allclose(r.json()["results"][0]["embedding"], reference.bytes(blob), rtol=1e-3, atol=1e-4)
