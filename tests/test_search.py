"""/search end to end: images through `s4l extract` into an HDF5 file, served as a gallery by a
real `s4l serve` on loopback; the start-up refusals; the exact blocked search against brute force."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import httpx
import numpy as np
import pytest
from support.images import make_image_folder
from support.server import ROOT, ServerProcess, export_tiny, make_checkpoint

from s4l.service.gallery import Gallery, GalleryError, load_gallery

CLASSES = ("red", "green", "blue", "grey")


def _extract_cli(model: Path, data: Path, out: Path, *extra: str) -> None:
    p = subprocess.run([sys.executable, "-m", "s4l.cli", "extract", "--model", str(model),
                        "--data", str(data), "--split", "val", "--out", str(out), "--workers", "0",
                        "--no-progress", *extra], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    model = export_tiny(tmp)  # tiny.pt and its export tiny.onnx
    data = make_image_folder(tmp / "images", splits=("val",), classes=CLASSES, per_class=3,
                             size=40, seed=3)
    feats = tmp / "features.h5"
    # From the checkpoint: the file's model hash must still match the served ONNX export.
    _extract_cli(model.with_suffix(".pt"), data, feats)
    return {"tmp": tmp, "model": model, "data": data, "features": feats}


@pytest.fixture(scope="module")
def server(files):
    env = {"S4L_GALLERIES": f"imgs={files['features']}", "S4L_MAX_IMAGES_PER_REQUEST": "8"}
    with ServerProcess(files["model"], env=env) as srv:
        yield srv
        assert "Traceback" not in srv.output()


def _gallery_rows(path: Path):
    with h5py.File(path, "r") as f:
        return (f["features"][...].astype(np.float64), [p.decode() for p in f["paths"][...]],
                f["labels"][...], json.loads(f.attrs["class_names"]))


def _post_files(srv, blobs, path="/search", **params):
    return httpx.post(srv.url + path, params=params, timeout=60,
                      files=[("files", (f"q{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)])


def test_a_gallery_image_finds_itself_first(server, files):
    feats, paths, labels, names = _gallery_rows(files["features"])
    assert len(paths) == 12
    blobs = [(files["data"] / "val" / p).read_bytes() for p in paths[:8]]
    r = _post_files(server, blobs, top_k=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["gallery"] == "imgs" and body["rows"] == 12
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    for i, res in enumerate(body["results"]):
        first = res["matches"][0]
        assert first["path"] == paths[i] and first["row"] == i
        assert first["score"] == pytest.approx(1.0, abs=1e-4)
        assert first["label"] == labels[i] and first["class_name"] == names[labels[i]]
        # The other matches are the true next-nearest rows, with their cosine scores.
        cos = unit @ unit[i]
        want = np.argsort(-cos, kind="stable")[:3]
        assert [m["row"] for m in res["matches"]] == want.tolist()
        np.testing.assert_allclose([m["score"] for m in res["matches"]], cos[want], atol=1e-4)


def test_embedding_query_answers_as_the_image_query(server, files):
    _, paths, _, _ = _gallery_rows(files["features"])
    blob = (files["data"] / "val" / paths[5]).read_bytes()
    by_image = _post_files(server, [blob], top_k=5).json()["results"][0]["matches"]
    emb = _post_files(server, [blob], path="/embed").json()["results"][0]["embedding"]
    r = httpx.post(server.url + "/search", params={"top_k": 5, "gallery": "imgs"},
                   json={"embeddings": [emb, [2 * x for x in emb]]}, timeout=60)
    assert r.status_code == 200, r.text
    for res in r.json()["results"]:  # a scaled vector has the same cosines
        assert [m["row"] for m in res["matches"]] == [m["row"] for m in by_image]
        np.testing.assert_allclose([m["score"] for m in res["matches"]],
                                   [m["score"] for m in by_image], rtol=1e-6, atol=1e-6)


def test_info_lists_the_gallery(server, files):
    g = httpx.get(server.url + "/info", timeout=10).json()["galleries"]
    assert len(g) == 1 and g[0]["name"] == "imgs" and g[0]["rows"] == 12
    assert g[0]["dim"] == 128 and g[0]["dtype"] == "float32"
    _, paths, _, _ = _gallery_rows(files["features"])
    per_row = 4 * 128 + 4 + 8 + (8 + sum(len(p.encode()) for p in paths)) / 12  # vector, label, path
    assert g[0]["bytes_per_row"] == pytest.approx(per_row, abs=0.1)
    assert g[0]["source"] == str(files["features"].resolve())


@pytest.mark.parametrize("params,body,status,code", [
    ({"top_k": 0}, {"embeddings": [[1.0] * 128]}, 422, "invalid_request"),
    ({"top_k": 1001}, {"embeddings": [[1.0] * 128]}, 422, "invalid_request"),
    ({"gallery": "nope"}, {"embeddings": [[1.0] * 128]}, 404, "unknown_gallery"),
    ({}, {"embeddings": [[1.0] * 127]}, 422, "wrong_dimension"),
    ({}, {"embeddings": [[1.0] * 128, [1.0] * 64]}, 422, "wrong_dimension"),
    ({}, {"embeddings": [["1.0"] * 128]}, 422, "malformed_json"),
    ({}, {"embeddings": [[True] * 128]}, 422, "malformed_json"),
    ({}, {"embeddings": []}, 422, "malformed_json"),
    ({}, {"embeddings": [[1.0] * 128] * 9}, 413, "too_many_images"),
    ({}, {"embeddings": [[1.0] * 128], "top_k": 3}, 422, "malformed_json"),
    ({}, {"images": []}, 422, "no_images"),
])
def test_bad_search_requests_get_a_clear_4xx(server, params, body, status, code):
    r = httpx.post(server.url + "/search", params=params, json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    if code == "unknown_gallery":
        assert "imgs" in r.json()["error"]["message"]


def test_non_finite_query_values_are_refused(server):
    for bad in ("NaN", "Infinity", "-Infinity", "1" + "0" * 400):
        text = '{"embeddings": [[' + ", ".join(["0.5"] * 127 + [bad]) + "]]}"
        r = httpx.post(server.url + "/search", content=text, timeout=30,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "non_finite_embedding", r.text
    # Huge but finite values and the zero vector are answered (cosine of zero: score 0).
    for vec in ([1e300] * 128, [0.0] * 128):
        r = httpx.post(server.url + "/search", json={"embeddings": [vec]}, timeout=30)
        assert r.status_code == 200, r.text
        assert all(np.isfinite(m["score"]) for m in r.json()["results"][0]["matches"])


def test_a_bad_image_is_its_own_error(server, files):
    _, paths, _, _ = _gallery_rows(files["features"])
    good = (files["data"] / "val" / paths[0]).read_bytes()
    r = _post_files(server, [b"not an image", good])
    res = r.json()["results"]
    assert r.status_code == 200 and res[0]["error"]["code"] == "undecodable"
    assert res[1]["matches"][0]["row"] == 0


def test_schemathesis_finds_no_server_error_on_search(server):
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode, openapi

    schema = openapi.from_dict(httpx.get(server.url + "/openapi.json").json())
    ops = [r.ok() for r in schema.get_all_operations()]
    op = next(o for o in ops if o.path == "/search")
    seen = set()
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def check(case):
            r = case.call(base_url=server.url)
            seen.add(r.status_code)
            assert r.status_code < 500, (case.query, r.status_code, r.text[:300])
            if r.status_code >= 400:
                assert set(r.json()) == {"error"}

        check()
    assert seen and max(seen) < 500
    assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200


# -- start-up refusals ----------------------------------------------------------------------------

def _serve_refuses(model: Path, *gallery_args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "s4l.cli", "serve", "--model", str(model), "--port", "0",
                        *gallery_args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("s4l serve: error:")]
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_a_gallery_from_another_model_refuses_to_start(files):
    from s4l.evaluation.extract import ExtractConfig, extract

    other = make_checkpoint(files["tmp"] / "other.pt", seed=1)
    feats = files["tmp"] / "other.h5"
    extract(ExtractConfig(model=str(other), data=str(files["data"]), out=str(feats), split="val",
                          workers=0, progress=False))
    line = _serve_refuses(files["model"], "--gallery", f"x={feats}")
    assert "extracted with model" in line and "re-extract" in line


def _edited_copy(files, name: str, edit) -> Path:
    out = files["tmp"] / f"{name}.h5"
    out.write_bytes(files["features"].read_bytes())
    with h5py.File(out, "r+") as f:
        edit(f)
    return out


def test_bad_gallery_files_are_refused_with_the_reason(files):
    from s4l.service.backend import OnnxBackend

    info = OnnxBackend(files["model"]).info

    def nan_row(f):
        f["features"][3, 5] = np.nan

    def empty(f):
        for k in ("features", "labels", "paths", "logits"):
            if k not in f:
                continue
            data, dt = f[k][:0], f[k].dtype
            del f[k]
            f.create_dataset(k, data=data, dtype=dt)

    def logits_layer(f):
        f.attrs["layer"] = "logits"

    def old_schema(f):
        f.attrs["schema_version"] = 0

    def narrow(f):
        data = f["features"][:, :64]
        del f["features"]
        f.create_dataset("features", data=data)

    cases = {"nan": (nan_row, "row 3 has NaN"), "empty": (empty, "no rows"),
             "layer": (logits_layer, "not the embedding"), "schema": (old_schema, "schema version 0"),
             "dim": (narrow, "dimension 64")}
    for name, (edit, reason) in cases.items():
        with pytest.raises(GalleryError, match=reason):
            load_gallery("g", _edited_copy(files, name, edit), info)
    with pytest.raises(GalleryError, match="does not exist"):
        load_gallery("g", files["tmp"] / "absent.h5", info)
    # Through the command: exit 2 with the one-line reason, for the empty file and a bad spec.
    assert "no rows" in _serve_refuses(files["model"], "--gallery", f"e={files['tmp'] / 'empty.h5'}")
    assert "NAME=PATH" in _serve_refuses(files["model"], "--gallery", "justapath.h5")


# -- the search itself ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_blocked_search_equals_brute_force(dtype):
    rng = np.random.default_rng(0)
    n, d = 1000, 24
    x = rng.standard_normal((n, d))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    paths = [f"img/{i}.jpg" for i in range(n)]
    blob = "".join(paths).encode()
    offsets = np.cumsum([0] + [len(p) for p in paths])
    g = Gallery("t", unit.astype(dtype), np.arange(n) % 7, blob, offsets, class_names=list("abcdefg"))
    q = rng.standard_normal((5, d))
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ unit.T
    tol = 1e-5 if dtype == "float32" else 2e-3
    for k, block in [(1, 64), (10, 64), (100, 64), (10, 7), (5, 4096), (2000, 300)]:
        hits = g.search(q, k, block_rows=block)
        kk = min(k, n)
        assert hits.rows.shape == (5, kk)
        want = np.sort(cos, axis=1)[:, ::-1][:, :kk]
        np.testing.assert_allclose(hits.scores, want, atol=tol)
        np.testing.assert_allclose(np.take_along_axis(cos, hits.rows, 1), hits.scores, atol=tol)
        assert all(len(set(r)) == kk for r in hits.rows.tolist())
    m = g.matches(g.search(q[:1], 2), 0)
    assert m[0]["path"] == paths[m[0]["row"]] and m[0]["class_name"] == "abcdefg"[m[0]["row"] % 7]
    assert g.bytes_per_row == pytest.approx(np.dtype(dtype).itemsize * d + 8 + 8 + len(blob) / n, rel=1e-3)


def test_search_with_tied_and_zero_rows():
    # Identical rows all tie at score 1: k distinct rows come back, ties ordered by row.
    n, d = 50, 6
    vecs = np.zeros((n, d), np.float32)
    vecs[:40, 0] = 1.0  # 40 identical unit rows, 10 zero rows (score 0)
    offsets = np.arange(n + 1)
    g = Gallery("t", vecs, np.full(n, -1), b"x" * n, offsets)
    hits = g.search(np.eye(d)[:1] * 3.0, 45, block_rows=16)
    assert hits.rows[0, :40].tolist() == list(range(40))
    np.testing.assert_allclose(hits.scores[0, :40], 1.0)
    np.testing.assert_allclose(hits.scores[0, 40:], 0.0)
    # Which of the tied zero rows fill the last places is not specified; they are distinct.
    tail = hits.rows[0, 40:].tolist()
    assert len(set(tail)) == 5 and set(tail) <= set(range(40, 50)) and tail == sorted(tail)
    assert g.matches(hits, 0)[0] == {"row": 0, "path": "x", "label": None, "class_name": None, "score": 1.0}


def test_gallery_choice_with_several_galleries_and_none():
    import asyncio

    from s4l.service.app import create_app
    from s4l.service.backend import DummyBackend
    from s4l.service.settings import Settings

    def gallery(name, rows):
        v = np.eye(8, dtype=np.float32)[:rows]
        return Gallery(name, v, np.arange(rows), b"p" * rows, np.arange(rows + 1))

    async def go(galleries):
        app = create_app(Settings(), backend=DummyBackend(dim=8), galleries=galleries)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://t") as c:
                body = {"embeddings": [[0, 0, 1, 0, 0, 0, 0, 0]]}
                return [await c.post("/search", json=body, params=p)
                        for p in ({}, {"gallery": "small", "top_k": 50}, {"gallery": "big"})]

    none, _, _ = asyncio.run(go({}))
    assert none.status_code == 400 and none.json()["error"]["code"] == "no_gallery"
    several, small, big = asyncio.run(go({"small": gallery("small", 4), "big": gallery("big", 8)}))
    assert several.status_code == 422 and several.json()["error"]["code"] == "gallery_required"
    assert "small, big" in several.json()["error"]["message"]
    assert small.json()["gallery"] == "small" and len(small.json()["results"][0]["matches"]) == 4
    assert big.json()["results"][0]["matches"][0] == {"row": 2, "path": "p", "label": 2,
                                                      "class_name": None, "score": 1.0}
