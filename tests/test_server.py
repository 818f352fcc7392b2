"""The server in-process on the deterministic dummy backend: batching, ordering, limits, auth, errors."""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image
from support.server import ROOT, jpeg_bytes

from s4l.imaging import decode_image, eval_crop
from s4l.service.app import create_app
from s4l.service.backend import DummyBackend, ModelLoadError, OnnxBackend, choose_providers
from s4l.service.settings import Settings


def run(coro):
    return asyncio.run(coro)


class Live:
    """The app with its lifespan running, and an httpx client over ASGI."""

    def __init__(self, backend: DummyBackend, **settings):
        self.backend = backend
        self.app = create_app(Settings(**settings), backend=backend)
        self.state = self.app.state.s4l

    async def __aenter__(self):
        self._ctx = self.app.router.lifespan_context(self.app)
        await self._ctx.__aenter__()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                        base_url="http://test")
        return self

    async def __aexit__(self, *exc):
        await self.client.aclose()
        await self._ctx.__aexit__(None, None, None)


def files(*blobs):
    return [("files", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)]


def expected_embedding(backend: DummyBackend, blob: bytes) -> np.ndarray:
    return backend.expected(eval_crop(decode_image(blob), backend.info.preprocess))["embedding"]


def test_concurrent_requests_are_batched_in_order():
    backend = DummyBackend(delay_s=0.05)
    blobs = [jpeg_bytes(seed=i, size=(40 + i, 36)) for i in range(12)]

    async def go():
        async with Live(backend, max_batch_size=8, max_wait_ms=50) as live:
            reqs = [live.client.post("/embed", files=files(blobs[i], b"junk", blobs[i + 1]))
                    for i in range(0, 12, 2)]
            return await asyncio.gather(*reqs)

    responses = run(go())
    for k, r in enumerate(responses):
        assert r.status_code == 200
        res = r.json()["results"]
        assert [("error" in x) for x in res] == [False, True, False]
        np.testing.assert_allclose(res[0]["embedding"], expected_embedding(backend, blobs[2 * k]), rtol=1e-6)
        np.testing.assert_allclose(res[2]["embedding"], expected_embedding(backend, blobs[2 * k + 1]), rtol=1e-6)
        assert res[1]["error"]["code"] == "undecodable"
    sizes = backend.batch_sizes[1:]  # [0] is the warm-up
    assert sum(sizes) == 12 and max(sizes) <= 8 and max(sizes) > 1
    assert backend.max_concurrent == 1  # one model call at a time


def test_a_lone_request_does_not_wait_for_the_batching_window():
    backend = DummyBackend()

    async def go():
        async with Live(backend, max_wait_ms=10_000, request_timeout_s=3) as live:
            return await live.client.post("/embed", files=files(jpeg_bytes(), jpeg_bytes(seed=2)))

    r = run(go())
    assert r.status_code == 200 and backend.batch_sizes[1:] == [2]


def test_event_loop_is_not_blocked_by_inference():
    backend = DummyBackend(delay_s=0.5)

    async def go():
        async with Live(backend, max_wait_ms=0) as live:
            order = []

            async def embed():
                await live.client.post("/embed", files=files(jpeg_bytes()))
                order.append("embed")

            async def health():
                while not backend.batch_sizes[1:]:  # the model call has started
                    await asyncio.sleep(0.01)
                r = await live.client.get("/healthz")
                order.append(("healthz", r.status_code))

            await asyncio.gather(embed(), health())
            return order

    assert run(go()) == [("healthz", 200), "embed"]


def test_queue_full_is_503_with_retry_after():
    backend = DummyBackend(delay_s=0.3)

    async def go():
        async with Live(backend, max_queue_images=2, max_wait_ms=0) as live:
            first = asyncio.create_task(live.client.post("/embed", files=files(jpeg_bytes(), jpeg_bytes(seed=1))))
            while live.state.batcher.admitted < 2:
                await asyncio.sleep(0.005)
            second = await live.client.post("/embed", files=files(jpeg_bytes()))
            return await first, second

    first, second = run(go())
    assert first.status_code == 200
    assert second.status_code == 503 and second.headers["retry-after"] == "1"
    assert second.json()["error"]["code"] == "queue_full"


def test_request_timeout_is_504_and_server_recovers():
    backend = DummyBackend(delay_s=0.6)

    async def go():
        async with Live(backend, request_timeout_s=0.1, max_wait_ms=0) as live:
            slow = await live.client.post("/embed", files=files(jpeg_bytes()))
            backend.delay_s = 0.0
            while backend.concurrent:  # the abandoned model call still runs to its end
                await asyncio.sleep(0.01)
            ok = await live.client.post("/embed", files=files(jpeg_bytes()))
            return slow, ok, live.state.batcher.admitted

    slow, ok, admitted = run(go())
    assert slow.status_code == 504 and slow.json()["error"]["code"] == "timeout"
    assert ok.status_code == 200 and admitted == 0


def test_a_failing_image_does_not_fail_its_batch_mates():
    backend = DummyBackend(fail_on_value=7)
    bad = io.BytesIO()
    Image.new("RGB", (32, 32), (7, 7, 7)).save(bad, "PNG")

    async def go():
        async with Live(backend, max_wait_ms=20) as live:
            return await live.client.post("/embed", files=files(jpeg_bytes(), bad.getvalue(), jpeg_bytes(seed=3)))

    res = run(go()).json()["results"]
    assert res[1]["error"]["code"] == "inference_failed"
    np.testing.assert_allclose(res[0]["embedding"], expected_embedding(backend, jpeg_bytes()), rtol=1e-6)
    assert "embedding" in res[2]


def test_warm_up_failure_means_not_ready():
    backend = DummyBackend(fail_on_value=0)  # the warm-up batch is all zeros

    async def go():
        async with Live(backend) as live:
            return (await live.client.get("/readyz"), await live.client.get("/healthz"),
                    await live.client.get("/info"),
                    await live.client.post("/embed", files=files(jpeg_bytes())))

    ready, health, info, embed = run(go())
    assert embed.status_code == 503 and embed.json()["error"]["code"] == "not_ready"
    assert ready.status_code == 503 and "warm-up" in ready.json()["reason"]
    assert health.status_code == 200
    assert info.json()["ready"] is False


def test_json_input_normalize_and_classify():
    backend = DummyBackend(class_names=["x", "y", "z"])
    blob = jpeg_bytes(seed=5)

    async def go():
        async with Live(backend) as live:
            b64 = base64.b64encode(blob).decode()
            e = await live.client.post("/embed?normalize=true", json={"images": [b64, "data:image/jpeg;base64," + b64]})
            c = await live.client.post("/classify?top_k=2", json={"images": [b64]})
            return e, c

    e, c = run(go())
    r = e.json()
    assert r["dim"] == 8 and r["normalized"] is True
    v = np.array(r["results"][0]["embedding"])
    assert abs(np.linalg.norm(v) - 1) < 1e-5 and r["results"][1]["embedding"] == r["results"][0]["embedding"]
    ref = expected_embedding(backend, blob)
    np.testing.assert_allclose(v, ref / np.linalg.norm(ref), rtol=1e-5)
    top = c.json()["results"][0]["top_k"]
    assert len(top) == 2 and top[0]["score"] >= top[1]["score"]
    assert top[0]["label"] == ["x", "y", "z"][top[0]["index"]]


@pytest.mark.parametrize("request_kw, status, code", [
    (dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
    (dict(content=b"{not json", headers={"content-type": "application/json"}), 422, "malformed_json"),
    (dict(json={"images": ["%%%notbase64"]}), 422, "malformed_base64"),
    (dict(json={"images": []}), 422, "no_images"),
    (dict(json={"pictures": ["aGk="]}), 422, "malformed_json"),
    (dict(json={"images": ["aGk="] * 5}), 413, "too_many_images"),
    (dict(files=files(*[b"x"] * 5)), 413, "too_many_images"),
    (dict(data={"other": "1"}, files=[("nope", ("a.jpg", b"x", "image/jpeg"))]), 422, "no_images"),
    (dict(content=b"x" * 5000, headers={"content-type": "application/json"}), 413, "payload_too_large"),
])
def test_request_errors(request_kw, status, code):
    backend = DummyBackend()

    async def go():
        async with Live(backend, max_images_per_request=4, max_body_bytes=4096) as live:
            r = await live.client.post("/embed", **request_kw)
            ok = await live.client.post("/embed", files=files(jpeg_bytes()))
            return r, ok

    r, ok = run(go())
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert r.json()["error"]["message"]
    assert ok.status_code == 200


def test_chunked_body_over_the_limit_is_413():
    async def body():
        for _ in range(10):
            yield b"x" * 1000

    async def go():
        async with Live(DummyBackend(), max_body_bytes=4096) as live:
            return await live.client.post("/embed", content=body(), headers={"content-type": "application/json"})

    r = run(go())
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_extreme_aspect_ratio_and_filename_less_parts():
    buf = io.BytesIO()
    Image.new("RGB", (20_000, 1), (9, 9, 9)).save(buf, "PNG")  # 20k px; resized: 640k x 32

    async def go():
        async with Live(DummyBackend(), max_pixels=1_000_000) as live:
            a = await live.client.post("/embed", files=files(buf.getvalue(), jpeg_bytes()))
            b = await live.client.post("/embed", files=[("files", (None, b"plain field"))] + files(jpeg_bytes()))
            return a, b

    a, b = run(go())
    assert [r.get("error", {}).get("code") for r in a.json()["results"]] == ["too_many_pixels", None]
    assert [r.get("error", {}).get("code") for r in b.json()["results"]] == ["not_a_file", None]


def test_classify_without_class_head_is_400():
    async def go():
        async with Live(DummyBackend()) as live:
            return await live.client.post("/classify", files=files(jpeg_bytes()))

    r = run(go())
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_class_head"


def test_api_key_on_every_route_but_health():
    async def go():
        async with Live(DummyBackend(), api_key="s3cret") as live:
            c = live.client
            out = {}
            for path in ("/info", "/metrics", "/openapi.json", "/docs"):
                out[path] = (await c.get(path)).status_code, (await c.get(path, headers={"Authorization": "Bearer s3cret"})).status_code
            out["/embed"] = ((await c.post("/embed", files=files(jpeg_bytes()), headers={"Authorization": "Bearer nope"})).status_code,
                             (await c.post("/embed", files=files(jpeg_bytes()), headers={"Authorization": "Bearer s3cret"})).status_code)
            out["/healthz"] = (await c.get("/healthz")).status_code, 200
            out["/readyz"] = (await c.get("/readyz")).status_code, 200
            r = await c.get("/info")
            return out, r

    out, r = run(go())
    for path, (without, with_key) in out.items():
        expected = 200 if path in ("/healthz", "/readyz") else 401
        assert (without, with_key) == (expected, 200), path
    assert r.headers["www-authenticate"] == "Bearer" and r.json()["error"]["code"] == "unauthorized"


def test_metrics_count_requests_batches_and_images():
    async def go():
        async with Live(DummyBackend()) as live:
            await live.client.post("/embed", files=files(jpeg_bytes(), b""))
            await live.client.post("/embed", content=b"x", headers={"content-type": "text/plain"})
            return (await live.client.get("/metrics")).text

    text = run(go())
    assert 's4l_requests_total{route="/embed",status="200"} 1.0' in text
    assert 's4l_requests_total{route="/embed",status="415"} 1.0' in text
    assert 's4l_images_total{outcome="ok",route="/embed"} 1.0' in text
    assert 's4l_images_total{outcome="error",route="/embed"} 1.0' in text
    assert "s4l_batch_size_count 1.0" in text and "s4l_queue_depth 0.0" in text
    assert 's4l_request_seconds_count{route="/embed"} 2.0' in text


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("S4L_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("S4L_API_KEY", "k")
    monkeypatch.setenv("S4L_PROVIDER", "auto")
    s = Settings()
    assert s.max_batch_size == 7 and s.api_key.get_secret_value() == "k" and s.provider == "auto"
    monkeypatch.setenv("S4L_MAX_BATCH_SIZE", "-1")
    with pytest.raises(ValueError):
        Settings()


def test_max_batch_size_auto_and_explicit():
    from s4l.service.app import effective_max_batch_size
    from s4l.service.backend import available_cpus

    class Cpu:
        provider = "CPUExecutionProvider"

    class Cuda:
        provider = "CUDAExecutionProvider"

    assert effective_max_batch_size(Settings(max_batch_size=0), Cpu()) == 2 * available_cpus()
    assert effective_max_batch_size(Settings(max_batch_size=0), Cuda()) == 32
    assert effective_max_batch_size(Settings(max_batch_size=7), Cpu()) == 7


def test_cuda_requested_but_missing_refuses():
    with pytest.raises(ModelLoadError, match="cuda"):
        choose_providers("cuda", ["CPUExecutionProvider"])
    assert choose_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"])[0] == "CUDAExecutionProvider"


def test_bad_model_files_are_clear_errors(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"definitely not onnx")
    with pytest.raises(ModelLoadError, match="cannot load"):
        OnnxBackend(junk)
    with pytest.raises(ModelLoadError, match="does not exist"):
        OnnxBackend(tmp_path / "missing.onnx")
    # An ONNX model that is not an s4l export (no metadata) is refused with the reason.
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Cast", ["images"], ["embedding"], to=TensorProto.FLOAT)], "g",
                          [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 4, 4, 3])],
                          [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 4, 4, 3])])
    plain = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), plain)
    with pytest.raises(ModelLoadError, match="not an s4l export"):
        OnnxBackend(plain)
    # The command says so and exits 2, without a traceback.
    p = subprocess.run([sys.executable, "-m", "s4l.cli", "serve", "--model", str(plain)],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2 and "not an s4l export" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "s4l.cli", "serve", "--model", str(plain), "--provider", "cuda"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2 and "cuda" in p.stderr


def test_server_modules_do_not_import_torch():
    code = ("import sys; import s4l.service.app, s4l.service.cmd_serve, s4l.service.cmd_export, "
            "s4l.service.openapi_doc, s4l.service.gallery, s4l.evaluation.features; "
            "from s4l.cli import build_parser; build_parser(); "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
            "assert not bad, bad")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr


def test_committed_openapi_matches_the_app():
    from s4l.service.openapi_doc import COMMITTED, build_schema, dumps

    assert COMMITTED.read_text() == dumps(build_schema()), \
        "service/openapi.json is stale: run `python -m s4l.service.openapi_doc`"


def test_embedding_json_round_trips_float32_exactly():
    # The JSON writer prints each float32 by its shortest repr: parsing it back as a Python
    # float and casting to float32 gives the very bits the backend produced.
    backend = DummyBackend()
    blob = jpeg_bytes(seed=11)

    async def go():
        async with Live(backend) as live:
            return await live.client.post("/embed", files=files(blob))

    r = run(go())
    assert r.headers["content-type"] == "application/json"
    got = np.array(r.json()["results"][0]["embedding"], dtype=np.float64).astype(np.float32)
    np.testing.assert_array_equal(got, np.asarray(expected_embedding(backend, blob), dtype=np.float32))


def test_non_finite_model_output_is_that_image_s_error():
    # orjson would write NaN as null; the server reports the image instead of sending nulls.
    class NaNOnWhite(DummyBackend):
        def _compute(self, images):
            out = super()._compute(images)
            white = images.reshape(len(images), -1).min(1) == 255
            out["embedding"][white] = np.nan
            return out

    backend = NaNOnWhite()
    white = io.BytesIO()
    Image.new("RGB", (32, 32), (255, 255, 255)).save(white, "PNG")

    async def go():
        async with Live(backend) as live:
            r = await live.client.post("/embed", files=files(jpeg_bytes(), white.getvalue()))
            return r, await live.client.get("/healthz")

    r, health = run(go())
    res = r.json()["results"]
    assert r.status_code == 200 and health.status_code == 200
    np.testing.assert_allclose(res[0]["embedding"], expected_embedding(backend, jpeg_bytes()), rtol=1e-6)
    assert res[1]["error"]["code"] == "non_finite_output"
