"""The paper's kind of model, served: a TF-written release module -> `s4l import-tfhub` ->
`s4l export` -> a real `s4l serve` (uvicorn on loopback), whose /embed equals TensorFlow's
pre_logits and whose /classify answers with ImageNet class names in the release's order."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image
from support.server import ServerProcess
from support.tfhub import FIXTURES, fixture_images, tf_outputs

from s4l.imaging import PreprocessSpec, decode_image, eval_crop


def cli(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "s4l.cli", *args], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("tfhub-live")
    cli("import-tfhub", str(FIXTURES / "rotation.tgz"), "--out", str(base / "m.pt"), "--no-progress")
    cli("export", "--checkpoint", str(base / "m.pt"), "--out", str(base / "m.onnx"))
    with ServerProcess(base / "m.onnx") as srv:
        yield srv
        assert "Traceback" not in srv.output()


def framed_png(img: np.ndarray) -> bytes:
    """The 224 px fixture image centred in a 256 px PNG: the eval crop gives it back exactly."""
    canvas = np.full((256, 256, 3), 77, np.uint8)
    canvas[16:240, 16:240] = img
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def test_served_embedding_and_classes_match_tensorflow(served):
    images = fixture_images()
    ref = tf_outputs("rotation")
    blobs = [framed_png(im) for im in images]
    spec = PreprocessSpec(resize=256, crop=224, interpolation="area")
    for blob, im in zip(blobs, images):
        np.testing.assert_array_equal(eval_crop(decode_image(blob), spec), im)
    files = [("files", (f"f{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
    r = httpx.post(served.url + "/embed", files=files, timeout=120)
    assert r.status_code == 200, r.text
    emb = np.array([x["embedding"] for x in r.json()["results"]])
    err = np.abs(emb - ref["pre_logits"]).max() / np.abs(ref["pre_logits"]).max()
    assert err < 1e-4, err

    r = httpx.post(served.url + "/classify", files=files, params={"top_k": 3}, timeout=120)
    assert r.status_code == 200, r.text
    from s4l.training.tfhub.importer import imagenet_classes

    names = [n for _, n in imagenet_classes()]
    for res, logits in zip(r.json()["results"], ref["classes"]):
        top = res["top_k"]
        assert [t["index"] for t in top] == list(np.argsort(-logits)[:3])
        assert [t["label"] for t in top] == [names[i] for i in np.argsort(-logits)[:3]]

    info = httpx.get(served.url + "/info", timeout=30)
    assert info.status_code == 200 and "tench" in info.text and "n01440764" not in info.text
