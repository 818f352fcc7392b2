"""`s4l import-tfhub` (issue 26): modules written by REAL TensorFlow running the S4L release's own
model code (tests/fixtures/tfhub, made by dev/make_tfhub_fixtures.py) are imported without
TensorFlow, and the imported model reproduces TensorFlow's outputs through torch and through
our ONNX export + onnxruntime, for each family's naming (supervised, rotation, exemplar, and
MOAM's `rotation_vat` with its `batch_norm` scope)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support.tfhub import (
    FAMILIES,
    FIXTURES,
    fixture_images,
    read_all,
    tf_outputs,
    unpack_fixture,
    write_bundle,
)

from s4l.errors import UserError
from s4l.training.tfhub import crc32c

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4  # max |ours - TF| / max |TF|, per output
HEADS = {"supervised": {"classes": 1000}, "rotation": {"classes": 1000, "rotation": 4},
         "exemplar": {"classes": 1000, "embedding": 1000},
         "rotation_vat": {"classes": 1000, "rotation": 4}}
TF_NAME = {"pre_logits": "pre_logits", "classes": "classes", "rotation": "rotations",
           "embedding": "embeddings"}


def rel_err(got, ref) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """family -> (module dir, checkpoint) imported once per test module."""
    from s4l.training.tfhub.importer import import_tfhub

    base = tmp_path_factory.mktemp("tfhub")
    out = {}
    for family in FAMILIES:
        module = unpack_fixture(family, base / "modules")
        ckpt = base / f"{family}.pt"
        import_tfhub(module, ckpt, progress=False)
        out[family] = (module, ckpt)
    return out


# ----------------------------------------------------------------------------- the fixtures


def test_fixtures_are_small_and_from_tensorflow():
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    assert manifest["release_commit"].startswith("8f1cf05")
    assert manifest["tensorflow"].startswith("2.")
    assert set(manifest["families"]) == set(FAMILIES)
    total = sum(p.stat().st_size for p in FIXTURES.iterdir())
    assert total < 5 << 20, total


@pytest.mark.parametrize("family", FAMILIES)
def test_reader_parses_tensorflow_bundles(tmp_path, family):
    from s4l.training.tfhub.bundle import TensorBundle

    module = unpack_fixture(family, tmp_path)
    b = TensorBundle(module / "variables" / "variables")
    n_heads = len(HEADS[family])
    assert len(b) == 249 + 2 * n_heads  # 253 for rotation/exemplar, 251 for supervised
    assert b.entries["root_block/conv2d/kernel"].shape == (7, 7, 3, 16)
    bn = "batch_norm" if family == "rotation_vat" else "batch_normalization"
    assert b.entries[f"block1/unit1/{bn}/moving_variance"].shape == (16,)
    assert b.read("classes/kernel").shape == (1, 1, 512, 1000)


def test_writer_round_trips_through_the_reader(tmp_path):
    """The test-side bundle writer (used to build damaged modules) agrees with TF's files."""
    tensors = read_all(unpack_fixture("rotation", tmp_path / "a"))
    write_bundle(tmp_path / "b" / "variables", tensors, num_shards=3)
    from s4l.training.tfhub.bundle import TensorBundle

    b = TensorBundle(tmp_path / "b" / "variables")
    assert b.num_shards == 3 and b.names() == sorted(tensors)
    for n in tensors:
        np.testing.assert_array_equal(b.read(n), tensors[n])


# ----------------------------------------------------------------------------- parity with TF


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_outputs_match_tensorflow(imported, family):
    import torch

    from s4l.training.checkpoint import load_for_inference

    _, ckpt = imported[family]
    inf = load_for_inference(ckpt)
    assert inf.spec.width == 0.25 and dict(inf.spec.heads) == HEADS[family]
    assert not inf.used_ema
    ref = tf_outputs(family)
    x = torch.from_numpy(fixture_images()).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        out = inf.model(x, heads=tuple(HEADS[family]))
    for name in ("pre_logits", *HEADS[family]):
        err = rel_err(out[name].numpy(), ref[TF_NAME[name]])
        assert err < TOL, (family, name, err)
    np.testing.assert_array_equal(ref["default"], ref["classes"])  # `default` = class logits


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_outputs_match_tensorflow(imported, tmp_path, family):
    """checkpoint -> `s4l export` -> onnxruntime on uint8 images == TF on the same images."""
    import onnxruntime as ort

    from s4l.service.export import export_onnx
    from s4l.training.checkpoint import read_checkpoint

    _, ckpt = imported[family]
    onnx_path = tmp_path / "m.onnx"
    export_onnx(ckpt, onnx_path)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    emb, logits = sess.run(["embedding", "logits"], {"images": fixture_images()})
    ref = tf_outputs(family)
    assert rel_err(emb, ref["pre_logits"]) < TOL
    assert rel_err(logits, ref["classes"]) < TOL
    # the second head through the same ONNX embedding (its weights applied in numpy)
    for head in set(HEADS[family]) - {"classes"}:
        state = read_checkpoint(ckpt)["model"]
        w, b = state[f"heads.{head}.weight"].numpy(), state[f"heads.{head}.bias"].numpy()
        assert rel_err(emb @ w.T + b, ref[TF_NAME[head]]) < TOL
    meta = sess.get_modelmeta().custom_metadata_map
    names = json.loads(meta["s4l.class_names"])
    assert names[0] == "tench" and len(names) == 1000
    assert json.loads(meta["s4l.preprocess"]) == {"resize": 256, "crop": 224, "interpolation": "area"}


# ----------------------------------------------------------------------------- the checkpoint


def test_cli_imports_a_tgz_with_provenance(tmp_path):
    """As a user runs it: the MOAM-named (`batch_norm`) module straight from its .tgz."""
    from s4l.provenance import file_sha256
    from s4l.training.checkpoint import read_checkpoint

    out = tmp_path / "moam.pt"
    r = subprocess.run([sys.executable, "-m", "s4l.cli", "import-tfhub",
                        str(FIXTURES / "rotation_vat.tgz"), "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "batch_norm" in r.stderr and "253 variables" in r.stderr
    ck = read_checkpoint(out)
    assert ck["ema"] is None and ck["step"] == 0
    assert ck["preprocess"] == {"resize": 256, "crop": 224, "interpolation": "area"}
    assert len(ck["class_names"]) == 1000 and ck["class_names"][:2] == ["tench", "goldfish"]
    rec = ck["provenance"]["tfhub"]
    assert rec["bn_scope"] == "batch_norm" and rec["release_commit"].startswith("8f1cf05")
    assert rec["source"] == str(FIXTURES / "rotation_vat.tgz") and rec["source_kind"] == "archive"
    assert rec["class_wnids"][0] == "n01440764" and len(rec["class_wnids"]) == 1000
    assert rec["family"].startswith("S4L-Rotation or MOAM")
    module = unpack_fixture("rotation_vat", tmp_path / "m")
    for name, digest in rec["variables_sha256"].items():
        assert file_sha256(module / "variables" / name) == digest
    assert set(rec["variables_sha256"]) == {"variables.index", "variables.data-00000-of-00001"}


def test_imagenet_class_names_follow_the_release_order():
    from s4l.training.tfhub.importer import imagenet_classes

    rows = imagenet_classes()
    wnids = [w for w, _ in rows]
    assert wnids == sorted(wnids) and len(set(wnids)) == 1000
    names = dict(rows)
    # Imagenette's ten classes (../shared/data/README.md) by wnid
    assert names["n01440764"] == "tench" and names["n03888257"] == "parachute"
    assert names["n02102040"] == "English springer" and names["n03417042"] == "garbage truck"
    maps = REPO.parent / "shared" / "data" / "s4l-label-maps"
    if maps.is_dir():  # the wnids were derived from the release's label maps: still equal
        values = json.loads((maps / "label_map_count_128000_index_0").read_text())["values"]
        assert sorted({v.split("_")[0] for v in values}) == wnids


# ----------------------------------------------------------------------------- CRC-32C


@pytest.mark.parametrize("force_numpy", [False, True])
def test_crc32c_known_values_and_backends_agree(monkeypatch, force_numpy):
    if force_numpy:
        monkeypatch.setenv("S4L_CRC32C", "numpy")
    crc32c._backend.cache_clear()
    try:
        assert crc32c.value(b"123456789") == 0xE3069283  # the CRC-32C check value
        assert crc32c.value(b"") == 0
        assert crc32c.value(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
        rng = np.random.default_rng(0)
        for n in (1, 4095, 4096, 4097, 3 * 4096 + 5, 70_000):
            data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            assert crc32c.extend(crc32c.value(data[:n // 3]), data[n // 3:]) == crc32c.value(data)
            assert crc32c.value(data) == crc32c._numpy_extend(0, data)
        assert crc32c.unmask(crc32c.mask(0xDEADBEEF)) == 0xDEADBEEF
    finally:
        crc32c._backend.cache_clear()


def test_pseudo_label_accepts_an_imagenet_folder_named_by_wnid(tmp_path, imported, monkeypatch):
    """An imported teacher names its classes "tench", ...; an ImageNet folder names them by
    wnid: `s4l pseudo-label` matches them through the wnids the import records."""
    from PIL import Image

    import s4l.training.teacher_labels as pl
    from s4l.training.tfhub.importer import imagenet_classes

    for w, _ in imagenet_classes():
        (tmp_path / "inet" / "train" / w).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "inet" / "train" / w / f"{w}_1.JPEG")
    (tmp_path / "lm.json").write_text('{"values": ["n01440764_1.JPEG"]}')

    class Reached(Exception):
        pass

    def stop(*a, **k):
        raise Reached

    monkeypatch.setattr(pl, "label_images", stop)  # the gate is what is tested, not labelling
    with pytest.raises(Reached):
        pl.pseudo_label(imported["rotation"][1], str(tmp_path / "inet"), tmp_path / "pl.json",
                        labels=str(tmp_path / "lm.json"), progress=False)
    (tmp_path / "inet" / "train" / "n01440764").rename(tmp_path / "inet" / "train" / "x_other")
    with pytest.raises(UserError, match="the teacher was trained on classes"):
        pl.pseudo_label(imported["rotation"][1], str(tmp_path / "inet"), tmp_path / "pl.json",
                        labels=str(tmp_path / "lm.json"), progress=False)
