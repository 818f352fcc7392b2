"""Task heads end to end on real files: `s4l extract` -> `s4l probe` head -> a real `s4l serve`
on loopback (/classify?head=, /heads, reload under load, SIGHUP) and the baked-head ONNX."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from support.images import make_image_folder
from support.server import ServerProcess, export_tiny

from s4l.cli import main as cli_main
from s4l.evaluation.features import FeatureFile
from s4l.heads import Head, load_head, save_head
from s4l.imaging import decode_image, eval_crop

ADMIN = "admin-test-token"


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny exported model, features of a real JPEG folder extracted by `s4l extract` from
    the ONNX file, and a head fitted on them by `s4l probe`."""
    tmp = tmp_path_factory.mktemp("heads")
    model = export_tiny(tmp)
    data = make_image_folder(tmp / "imgs", splits=("train", "val"), classes=("x", "y", "z", "w"),
                             per_class=6, size=40)
    for split in ("train", "val"):
        assert cli_main(["extract", "--model", str(model), "--data", str(data), "--split", split,
                         "--out", str(tmp / f"{split}.h5"), "--batch-size", "8", "--workers", "0",
                         "--no-progress"]) == 0
    assert cli_main(["probe", "--train", str(tmp / "train.h5"), "--val", str(tmp / "val.h5"),
                     "--out", str(tmp / "probe"), "--solver", "sklearn", "--C", "1",
                     "--no-progress"]) == 0
    report = json.loads((tmp / "probe" / "report.json").read_text())
    head_path = Path(report["results"][0]["heads"]["sklearn"])
    return {"tmp": tmp, "model": model, "data": data, "head": head_path,
            "val": tmp / "val.h5", "train": tmp / "train.h5"}


@pytest.fixture(scope="module")
def server(files):
    env = {"S4L_HEADS": f"places={files['head']},copy={files['head']}", "S4L_ADMIN_TOKEN": ADMIN,
           "S4L_MAX_IMAGES_PER_REQUEST": "64"}
    with ServerProcess(files["model"], env=env) as srv:
        yield srv
        assert "Traceback" not in srv.output()


def _post(server, paths, params="", **kw):
    fl = [("files", (Path(p).name, Path(p).read_bytes(), "image/jpeg")) for p in paths]
    return httpx.post(f"{server.url}/classify{params}", files=fl, timeout=60, **kw)


def test_classify_head_equals_artifact_on_extracted_features(server, files):
    head = load_head(files["head"])
    with FeatureFile(files["val"]) as ff:
        feats, paths = ff.features[...], ff.paths
    data = files["data"]
    full = [str(data / p) if not Path(p).is_absolute() else p for p in paths]
    want = softmax(head.apply(feats))
    r = _post(server, full, f"?head=places&top_k={head.num_classes}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["head"] == "places" and body["num_classes"] == head.num_classes
    for res, p in zip(body["results"], want):
        got = np.zeros(head.num_classes)
        for t in res["top_k"]:
            got[t["index"]] = t["score"]
            assert t["label"] == head.class_names[t["index"]]
        np.testing.assert_allclose(got, p, rtol=1e-4, atol=1e-6)
    # Several heads in one call: per-head entries, the same numbers.
    r2 = _post(server, full[:3], f"?head=places&head=model&head=copy&top_k={head.num_classes}")
    assert r2.status_code == 200, r2.text
    b2 = r2.json()
    assert b2["heads"] == ["places", "model", "copy"]
    for res, p in zip(b2["results"], want[:3]):
        assert set(res["heads"]) == {"places", "model", "copy"}
        assert res["heads"]["places"] == res["heads"]["copy"]
        scores = {t["index"]: t["score"] for t in res["heads"]["places"]["top_k"]}
        np.testing.assert_allclose([scores[i] for i in range(head.num_classes)], p, rtol=1e-4, atol=1e-6)
        assert [t["label"] for t in res["heads"]["model"]["top_k"]][0] in ("apple", "banana", "cherry")
    # Without ?head= the model's own class head answers, shaped as before.
    r3 = _post(server, full[:1])
    assert r3.json()["head"] == "model" and r3.json()["num_classes"] == 3


def test_baked_head_onnx_equals_artifact(files):
    out = files["tmp"] / "baked.onnx"
    assert cli_main(["export", "--from-onnx", str(files["model"]), "--out", str(out),
                     "--head", f"places={files['head']}"]) == 0
    head = load_head(files["head"])
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta["s4l.class_names"]) == list(head.class_names)
    assert [o.name for o in sess.get_outputs()] == ["embedding", "logits"]
    with FeatureFile(files["val"]) as ff:
        feats, paths = ff.features[...], ff.paths
        from s4l.imaging import PreprocessSpec

        spec = PreprocessSpec.from_dict(json.loads(ff.attrs["preprocess"]))
    crops = np.stack([eval_crop(decode_image((files["data"] / p).read_bytes()), spec) for p in paths])
    emb, logits = sess.run(["embedding", "logits"], {"images": crops})
    np.testing.assert_allclose(emb, feats, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits, head.apply(feats), rtol=1e-4, atol=1e-4)
    # The baked model served alone answers with the head's classes as its own.
    with ServerProcess(out) as srv:
        r = _post(srv, [files["data"] / paths[0]], f"?top_k={head.num_classes}")
        assert r.status_code == 200
        got = {t["index"]: t["score"] for t in r.json()["results"][0]["top_k"]}
        np.testing.assert_allclose([got[i] for i in range(head.num_classes)],
                                   softmax(head.apply(feats[:1]))[0], rtol=1e-4, atol=1e-6)


def test_unknown_head_and_listing(server, files):
    img = next((files["data"] / "val" / "x").iterdir())
    r = _post(server, [img], "?head=nope")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "unknown_head" and "places" in err["message"] and "model" in err["message"]
    h = httpx.get(server.url + "/heads", timeout=10).json()
    assert h["default"] == "model"
    by = {x["name"]: x for x in h["heads"]}
    assert set(by) == {"model", "places", "copy"}
    assert by["places"]["labels"] == list(load_head(files["head"]).class_names)
    assert sorted(by["places"]["labels"]) == ["w", "x", "y", "z"]
    assert by["places"]["solver"] == "sklearn" and "top1" in by["places"]["metrics"]
    assert by["places"]["provenance"]["train"].endswith("train.h5")
    info = httpx.get(server.url + "/info", timeout=10).json()
    assert info["heads"]["names"] == ["model", "places", "copy"]
    # Admin route: wrong or missing token.
    assert httpx.post(server.url + "/admin/reload-heads", timeout=10).status_code == 401
    assert httpx.post(server.url + "/admin/reload-heads", timeout=10,
                      headers={"Authorization": "Bearer wrong"}).status_code == 401


def _other_head(files, model_hash=None, prefix="o") -> Head:
    h = load_head(files["head"])
    rng = np.random.default_rng(7)
    return Head(weight=rng.normal(size=h.weight.shape).astype(np.float32),
                bias=np.zeros(h.num_classes, np.float32),
                class_names=tuple(f"{prefix}{i}" for i in range(h.num_classes)),
                model_hash=model_hash or h.model_hash, layer=h.layer)


@pytest.mark.parametrize("case", ["other_model", "truncated", "edited", "wrong_dim", "missing"])
def test_bad_head_refuses_to_start(files, case):
    tmp = files["tmp"]
    bad = tmp / f"bad-{case}.npz"
    if case == "other_model":
        save_head(bad, _other_head(files, model_hash="f" * 64))
        msg = "features of model"
    elif case == "truncated":
        data = files["head"].read_bytes()
        bad.write_bytes(data[: len(data) - 40])
        msg = "not a valid .npz archive"
    elif case == "edited":
        with np.load(files["head"]) as z:
            w, b, m = z["weight"].copy(), z["bias"], z["meta"]
        w[0, 0] *= 2
        np.savez(bad, weight=w, bias=b, meta=m)
        msg = "sha256"
    elif case == "wrong_dim":
        h = load_head(files["head"])
        save_head(bad, Head(weight=np.zeros((2, h.dim + 1), np.float32), bias=np.zeros(2, np.float32),
                            class_names=("a", "b"), model_hash=h.model_hash))
        msg = "embedding is"
    else:
        msg = "does not exist"
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("S4L_")}
    p = subprocess.run([sys.executable, "-m", "s4l.cli", "serve", "--model", str(files["model"]),
                        "--port", "0", "--head", f"bad={bad}"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0
    assert msg in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len([ln for ln in p.stderr.strip().splitlines() if "error" in ln.lower()]) == 1, p.stderr


def test_reload_under_load_swaps_atomically(files):
    tmp = files["tmp"]
    live = tmp / "live.npz"
    a = load_head(files["head"])
    b = _other_head(files, prefix="b")
    save_head(live, a)
    imgs = sorted((files["data"] / "val").rglob("*.jpg"))[:8]
    env = {"S4L_HEADS": f"live={live}", "S4L_ADMIN_TOKEN": ADMIN, "S4L_MAX_WAIT_MS": "2"}
    names_a, names_b = set(a.class_names), set(b.class_names)
    seen, failures = [], []
    stop = threading.Event()
    with ServerProcess(files["model"], env=env) as srv:
        def client():
            with httpx.Client(timeout=60) as c:
                fl = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in imgs]
                while not stop.is_set():
                    r = c.post(f"{srv.url}/classify?head=live&top_k=2", files=fl)
                    if r.status_code != 200:
                        failures.append(r.status_code)
                        continue
                    labels = {t["label"] for res in r.json()["results"] for t in res["top_k"]}
                    # One request, one head set: never labels of both heads in one response.
                    if labels <= names_a:
                        seen.append("a")
                    elif labels <= names_b:
                        seen.append("b")
                    else:
                        failures.append(f"mixed {labels}")

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            save_head(live, b)
            r = httpx.post(srv.url + "/admin/reload-heads", timeout=30,
                           headers={"Authorization": f"Bearer {ADMIN}"})
            assert r.status_code == 200 and r.json()["generation"] == 1
            n_at_swap = len(seen)
            time.sleep(1.0)
            # A bad file: 409 with the reason, the previous heads keep answering.
            live.write_bytes(live.read_bytes()[:100])
            r = httpx.post(srv.url + "/admin/reload-heads", timeout=30,
                           headers={"Authorization": f"Bearer {ADMIN}"})
            assert r.status_code == 409 and "not a valid .npz archive" in r.json()["error"]["message"]
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not failures, failures[:5]
        assert "a" in seen[:n_at_swap] and seen[-1] == "b"
        assert "a" not in seen[n_at_swap + 8:]  # after the swap (and the in-flight ones), only b
        # SIGHUP re-reads the files too.
        save_head(live, a)
        srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if httpx.get(srv.url + "/heads", timeout=10).json()["generation"] == 2:
                break
            time.sleep(0.1)
        h = httpx.get(srv.url + "/heads", timeout=10).json()
        assert h["generation"] == 2 and set(h["heads"][-1]["labels"]) == names_a
        assert "Traceback" not in srv.output()


def test_admin_route_disabled_without_token(files):
    with ServerProcess(files["model"], env={"S4L_HEADS": f"p={files['head']}"}) as srv:
        r = httpx.post(srv.url + "/admin/reload-heads", timeout=10,
                       headers={"Authorization": "Bearer anything"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"


def test_export_from_checkpoint_with_head_and_bad_bakes(files, tmp_path, capsys):
    ckpt = files["model"].with_suffix(".pt")  # export_tiny's checkpoint beside its ONNX file
    assert ckpt.exists()
    out = tmp_path / "ck-baked.onnx"
    assert cli_main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--head",
                     f"places={files['head']}", "--triton-repo", str(tmp_path / "triton")]) == 0
    head = load_head(files["head"])
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    outs = {o.name: o.shape for o in sess.get_outputs()}
    assert list(outs) == ["embedding", "logits"] and outs["logits"][1] == head.num_classes
    import onnx

    proto = onnx.load(str(out))
    # The replaced 3-class head left nothing behind: no initializer of 3 rows remains.
    assert not [i for i in proto.graph.initializer if i.dims and i.dims[0] == 3]
    assert (tmp_path / "triton" / "s4l" / "1" / "model.onnx").exists()
    x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    emb, logits = sess.run(["embedding", "logits"], {"images": x})
    np.testing.assert_allclose(logits, head.apply(emb), rtol=1e-5, atol=1e-5)
    # A head from another model, or --from-onnx without --head: one-line refusals, nothing written.
    other = save_head(tmp_path / "other.npz", _other_head(files, model_hash="e" * 64))
    p = subprocess.run([sys.executable, "-m", "s4l.cli", "export", "--from-onnx", str(files["model"]),
                        "--out", str(tmp_path / "no.onnx"), "--head", f"o={other}"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "features of model" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "no.onnx").exists()
    capsys.readouterr()
    assert cli_main(["export", "--from-onnx", str(files["model"]), "--out", str(tmp_path / "n2.onnx")]) != 0
    assert "needs --head" in capsys.readouterr().err
