"""Head artifacts (s4l.heads): probe -> file -> checked load; the kNN evaluation; bad files."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from test_probe import blobs, write_features

from s4l.errors import UserError
from s4l.evaluation.features import FeatureFile
from s4l.evaluation.probe import ArrayRows, ProbeSettings, Schedule, knn_evaluate
from s4l.heads import Head, check, load_head, parse_head_spec, save_head


def _head(c=3, d=4, **kw) -> Head:
    rng = np.random.default_rng(0)
    return Head(weight=rng.normal(size=(c, d)).astype(np.float32), bias=rng.normal(size=c).astype(np.float32),
                class_names=tuple(f"k{i}" for i in range(c)), model_hash=kw.pop("model_hash", "abc123"), **kw)


def test_probe_writes_heads_that_reproduce_its_scores(tmp_path):
    from s4l.evaluation.report import probe_files

    tx, ty = blobs(900, seed=1)
    vx, vy = blobs(300, seed=2)
    names = [f"c{i}" for i in range(6)]
    t = write_features(tmp_path / "t.h5", tx, ty, classes=names, model="hashA")
    v = write_features(tmp_path / "v.h5", vx, vy, classes=names, model="hashA")
    rep = probe_files([t], [v], tmp_path / "o", ProbeSettings(schedules={"short": Schedule(3, ())},
                      cs=(0.1,)), progress=False)
    r = rep["results"][0]
    assert set(r["heads"]) == {"sklearn", "sgd-short"}
    json.loads((tmp_path / "o" / "report.json").read_text())  # still plain JSON
    for solver, path in r["heads"].items():
        h = load_head(path)
        assert h.class_names == tuple(names) and h.model_hash == "hashA" and h.layer == "pre_logits"
        assert h.solver == solver and h.provenance["s4l_version"]
        # Applied to RAW validation features, the head gives the accuracy the probe reported.
        pred = h.apply(vx).argmax(1)
        top1 = 100 * (pred == vy).mean()
        want = r["sklearn"] if solver == "sklearn" else r["sgd"]["short"]
        assert top1 == pytest.approx(want["top1"], abs=0.34), solver  # one image of 300
        assert h.metrics["top1"] == want["top1"]
    # The sklearn head's probabilities equal scikit-learn's on standardised features.
    from sklearn.linear_model import LogisticRegression

    mean, std = tx.mean(0), tx.std(0)
    clf = LogisticRegression(C=0.1, max_iter=1000, tol=1e-6).fit((tx - mean) / std, ty)
    logits = load_head(r["heads"]["sklearn"]).apply(vx).astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(p, clf.predict_proba((vx - mean) / std), atol=2e-3)
    assert "knn" in r and 0 < r["knn"]["top1"] <= 100 and r["knn"]["k"] == 20


def test_knn_streamed_equals_brute_force():
    tx, ty = blobs(500, seed=3)
    vx, vy = blobs(120, seed=4)
    got = knn_evaluate(ArrayRows(tx, ty), ArrayRows(vx, vy), num_classes=6, k=20, temperature=0.07,
                       val_block=50)
    # Brute force over the full similarity matrix.
    tn = tx / np.linalg.norm(tx, axis=1, keepdims=True)
    vn = vx / np.linalg.norm(vx, axis=1, keepdims=True)
    sims = vn @ tn.T
    idx = np.argsort(-sims, 1)[:, :20]
    votes = np.zeros((len(vx), 6))
    for i in range(len(vx)):
        for j in idx[i]:
            votes[i, ty[j]] += np.exp(sims[i, j] / 0.07)
    top1 = 100 * (votes.argmax(1) == vy).mean()
    assert got["top1"] == pytest.approx(top1)
    assert 30 < got["top1"] < 100  # a real, imperfect classifier


def test_knn_blocks_smaller_than_k(tmp_path, monkeypatch):
    from s4l.evaluation import features as F
    from s4l.evaluation.probe import FileRows

    monkeypatch.setattr(F, "CHUNK_BYTES", 512)  # 16-row blocks, fewer than k = 20
    tx, ty = blobs(200, seed=5)
    vx, vy = blobs(60, seed=6)
    t = write_features(tmp_path / "t.h5", tx, ty)
    with FeatureFile(t) as tf:
        streamed = knn_evaluate(FileRows(tf), ArrayRows(vx, vy), num_classes=6)
    assert streamed["top1"] == knn_evaluate(ArrayRows(tx, ty), ArrayRows(vx, vy), num_classes=6)["top1"]


def test_head_round_trip_and_checks(tmp_path):
    h = _head(preprocess={"crop": 32}, metrics={"top1": 50.0})
    p = save_head(tmp_path / "h.npz", h)
    g = load_head(p)
    np.testing.assert_array_equal(g.weight, h.weight)
    np.testing.assert_array_equal(g.bias, h.bias)
    assert g.metrics == {"top1": 50.0} and g.class_names == h.class_names
    with np.load(p, allow_pickle=False) as z:  # no pickled objects anywhere
        assert {z[k].dtype.kind for k in z.files} <= {"f", "u"}
    check(g, model_dim=4, model_hash="abc123", layer="embedding")  # alias of pre_logits
    with pytest.raises(UserError, match="4-d features but the model's embedding is 8-d"):
        check(g, model_dim=8, model_hash="abc123")
    with pytest.raises(UserError, match="features of model"):
        check(g, model_dim=4, model_hash="other")
    with pytest.raises(UserError, match="layer"):
        check(g, model_dim=4, model_hash="abc123", layer="block3")
    assert parse_head_spec("places=/x/y.npz") == ("places", "/x/y.npz")
    for bad in ("noequals", "=p", "a b=p"):
        with pytest.raises(UserError):
            parse_head_spec(bad)


def test_bad_head_files_are_refused_with_one_line(tmp_path):
    p = save_head(tmp_path / "h.npz", _head())
    data = p.read_bytes()
    cases = {}
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    cases["trunc.npz"] = "not a valid .npz archive"
    (tmp_path / "empty.npz").write_bytes(b"")
    cases["empty.npz"] = "not a valid .npz archive"
    cases["missing.npz"] = "does not exist"
    # Hand-edited weights: same shape, one number changed, metadata untouched.
    with np.load(p) as z:
        w, b, m = z["weight"].copy(), z["bias"], z["meta"]
    w[0, 0] += 1
    np.savez(tmp_path / "edited.npz", weight=w, bias=b, meta=m)
    cases["edited.npz"] = "sha256"
    np.savez(tmp_path / "nometa.npz", weight=w, bias=b)
    cases["nometa.npz"] = "missing"
    np.savez(tmp_path / "badjson.npz", weight=w, bias=b, meta=np.frombuffer(b"{nope", np.uint8))
    cases["badjson.npz"] = "not valid JSON"
    with zipfile.ZipFile(tmp_path / "pickled.npz", "w") as z:
        import io

        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        z.writestr("weight.npy", buf.getvalue())
        z.writestr("bias.npy", buf.getvalue())
        z.writestr("meta.npy", buf.getvalue())
    cases["pickled.npz"] = "object array"
    for name, msg in cases.items():
        with pytest.raises(UserError, match=msg) as e:
            load_head(tmp_path / name)
        assert "\n" not in str(e.value), name
    with pytest.raises(UserError, match="limit"):
        load_head(p, max_bytes=100)


def test_heads_setting_from_environment(monkeypatch):
    from s4l.service.settings import Settings

    monkeypatch.setenv("S4L_HEADS", "a=/x/a.npz, b=/y/b.npz")
    assert Settings().heads == ("a=/x/a.npz", "b=/y/b.npz")
    monkeypatch.setenv("S4L_HEADS", '["a=/x,1.npz"]')  # JSON for paths with commas
    assert Settings().heads == ("a=/x,1.npz",)
    monkeypatch.delenv("S4L_HEADS")
    assert Settings().heads == ()
    assert Settings(heads=("c=p",)).heads == ("c=p",)


def test_registry_defaults_and_dummy_app(tmp_path):
    """In-process app on the dummy backend: default head rules and the multi-head shape."""
    from fastapi.testclient import TestClient

    from s4l.service.app import create_app
    from s4l.service.backend import DummyBackend
    from s4l.service.head_registry import model_hash
    from s4l.service.settings import Settings

    backend = DummyBackend(dim=4)
    h = _head(model_hash=model_hash(backend.info))
    p1, p2 = save_head(tmp_path / "1.npz", h), save_head(tmp_path / "2.npz", h)
    img = np.full((32, 32, 3), 9, np.uint8)
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    files = [("files", ("a.png", buf.getvalue(), "image/png"))]
    with TestClient(create_app(Settings(heads=(f"one={p1}",)), backend=DummyBackend(dim=4))) as c:
        r = c.post("/classify", files=files)  # the only head is the default
        assert r.status_code == 200 and r.json()["head"] == "one"
        emb = DummyBackend(dim=4).expected(img)["embedding"]
        z = h.apply(emb[None])[0].astype(np.float64)
        want = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        got = {t["index"]: t["score"] for t in r.json()["results"][0]["top_k"]}
        np.testing.assert_allclose([got[i] for i in range(3)], want, rtol=1e-5)
    with TestClient(create_app(Settings(heads=(f"one={p1}", f"two={p2}")),
                               backend=DummyBackend(dim=4))) as c:
        r = c.post("/classify", files=files)
        assert r.status_code == 400 and r.json()["error"]["code"] == "head_required"
        r = c.post("/classify?head=one&head=two&head=one", files=files)
        assert r.status_code == 200 and r.json()["heads"] == ["one", "two"]
        assert r.json()["results"][0]["heads"]["one"] == r.json()["results"][0]["heads"]["two"]
    with TestClient(create_app(Settings(), backend=DummyBackend(dim=4))) as c:
        r = c.post("/classify", files=files)
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_class_head"
        assert c.get("/heads").json()["heads"] == []
    with pytest.raises(UserError, match="reserved"):
        create_app(Settings(heads=(f"model={p1}",)), backend=DummyBackend(dim=4))
    with pytest.raises(UserError, match="twice"):
        create_app(Settings(heads=(f"a={p1}", f"a={p2}")), backend=DummyBackend(dim=4))


def test_knn_small_pieces_equal_one_piece():
    tx, ty = blobs(300, seed=8)
    vx, vy = blobs(90, seed=9)
    a = knn_evaluate(ArrayRows(tx, ty), ArrayRows(vx, vy), num_classes=6, train_block=7, val_block=13)
    b = knn_evaluate(ArrayRows(tx, ty), ArrayRows(vx, vy), num_classes=6)
    assert (a["top1"], a["top5"]) == (b["top1"], b["top5"])


def test_heads_module_and_server_import_no_torch_sklearn_h5py():
    import subprocess
    import sys

    code = ("import sys; import s4l.heads, s4l.service.head_registry, s4l.service.routes_heads, "
            "s4l.service.app; print(sorted(m for m in ('torch', 'sklearn', 'h5py') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_head_overflowing_to_infinity_is_a_per_image_error(tmp_path):
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from s4l.service.app import create_app
    from s4l.service.backend import DummyBackend
    from s4l.service.head_registry import model_hash

    backend = DummyBackend(dim=4)
    huge = Head(weight=np.full((2, 4), 3e38, np.float32), bias=np.zeros(2, np.float32),
                class_names=("a", "b"), model_hash=model_hash(backend.info))
    p = save_head(tmp_path / "huge.npz", huge)
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(buf, "PNG")
    from s4l.service.settings import Settings

    with TestClient(create_app(Settings(heads=(f"huge={p}",)), backend=backend)) as c:
        r = c.post("/classify", files=[("files", ("a.png", buf.getvalue(), "image/png"))])
        assert r.status_code == 200
        assert r.json()["results"][0]["error"]["code"] == "non_finite_output"
