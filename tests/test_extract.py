"""`s4l extract`: the HDF5 contract, kill-and-resume, torchrun, ONNX models, Places205 lists, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from support.images import make_image_folder
from support.net import free_port
from support.server import make_checkpoint as support_checkpoint

from s4l.cli import main as cli_main
from s4l.errors import UserError
from s4l.evaluation import features as F
from s4l.evaluation.extract import ExtractConfig, extract, parts_dir
from s4l.imaging import PreprocessSpec, decode_image, eval_crop
from s4l.provenance import file_sha256
from s4l.training.checkpoint import load_for_inference

ROOT = Path(__file__).resolve().parents[1]
SPEC = PreprocessSpec(resize=36, crop=32)


def make_checkpoint(path: Path, classes=3, seed=0, width=0.0625) -> Path:
    """A tiny random model saved in the contract's checkpoint format, preprocessing SPEC."""
    return support_checkpoint(path, classes=classes, seed=seed, width=width, preprocess=SPEC)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes x 10 images (train/val) of varied sizes, plus one corrupt and one empty file."""
    root = tmp_path_factory.mktemp("data") / "set"
    make_image_folder(root, splits=("val",), per_class=10, size=40)
    make_image_folder(root, splits=("val",), classes=("b",), per_class=3, size=70, seed=5, fmt="PNG")
    (root / "val" / "a" / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "val" / "c" / "zz_empty.jpg").write_bytes(b"")
    return root


def read_all(path) -> dict:
    with h5py.File(path, "r") as f:
        out = {k: f[k][...] for k in ("features", "labels", "paths") if k in f}
        if "logits" in f:
            out["logits"] = f["logits"][...]
        out["errors"] = F.read_errors(f)
    return out


def assert_same_file(a, b):
    ra, rb = read_all(a), read_all(b)
    assert ra.keys() == rb.keys()
    for k in ra:
        if isinstance(ra[k], np.ndarray):
            assert ra[k].dtype == rb[k].dtype, k
            np.testing.assert_array_equal(ra[k], rb[k], err_msg=k)
        else:
            assert ra[k] == rb[k], k
    assert F.stable_attrs(a) == F.stable_attrs(b)


def run_cli(*argv) -> int:
    return cli_main(["extract", *map(str, argv), "--no-progress"])


def test_extract_writes_the_contract(tmp_path, ckpt, folder):
    out = tmp_path / "f.h5"
    assert run_cli("--model", ckpt, "--data", folder, "--split", "val", "--out", out,
                   "--batch-size", 4, "--shard-size", 7, "--workers", 1) == 0
    assert not parts_dir(out).exists()  # the parts go once the file is complete
    with F.FeatureFile(out) as ff:
        assert ff.n == 33 and ff.dim == 128  # 2 bad files recorded, not rows
        assert ff.features.dtype == np.float32
        assert ff.features.chunks is not None and ff.features.chunks[1] == 128
        assert ff.attrs["schema_version"] == 1 and ff.layer == "pre_logits"
        assert ff.model_hash == load_for_inference(ckpt).sha256
        assert PreprocessSpec.from_dict(ff.attrs["preprocess"]) == SPEC
        assert ff.attrs["data_root"] == str(folder) and ff.attrs["split"] == "val"
        assert ff.class_names == ["a", "b", "c"]
        for key in ("created_at", "s4l_version"):
            assert ff.attrs[key]
        errors = dict(ff.errors)
        assert set(map(os.path.basename, errors)) == {"zz_corrupt.jpg", "zz_empty.jpg"}
        assert all(errors.values())
        paths, labels = ff.paths, ff.labels
        feats, logits = ff.features[...], ff.logits[...]
    assert [Path(p).parent.name for p in paths] == [["a", "b", "c"][i] for i in labels]
    assert np.bincount(labels).tolist() == [10, 13, 10]
    # The rows are the model's pre_logits of THE eval crop of each listed file.
    model = load_for_inference(ckpt).model
    crops = np.stack([eval_crop(decode_image(p), SPEC) for p in paths[:6]])
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        ref = model(x)
    np.testing.assert_allclose(feats[:6], ref["pre_logits"].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits[:6], ref["classes"].numpy(), rtol=1e-4, atol=1e-5)


def test_layers_and_float16(tmp_path, ckpt, folder):
    out = tmp_path / "s3.h5"
    extract(ExtractConfig(model=str(ckpt), data=str(folder), out=str(out), layer="stage3",
                          dtype="float16", workers=0, progress=False))
    with F.FeatureFile(out) as ff:
        assert ff.layer == "stage3" and ff.dim == 64  # stage3 = 16 x root (4) channels
        assert ff.features.dtype == np.float16
        s3 = ff.features[...].astype(np.float32)
        p = ff.paths[:2]
    model = load_for_inference(ckpt).model
    crops = np.stack([eval_crop(decode_image(q), SPEC) for q in p])
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        ref = model.backbone.forward_features(x)["stage3"].mean((2, 3)).numpy()
    np.testing.assert_allclose(s3[:2], ref, rtol=2e-3, atol=2e-3)
    with pytest.raises(UserError, match="no layer 'stage7'.*pre_logits, stage1"):
        extract(ExtractConfig(model=str(ckpt), data=str(folder), out=str(tmp_path / "x.h5"),
                              layer="stage7", workers=0, progress=False))


KILLER = textwrap.dedent("""
    import sys, time
    import s4l.evaluation.extract as E
    real = E._write_shard
    def slow(parts, k, rows):
        real(parts, k, rows)
        if k >= 2:
            time.sleep(600)  # the test SIGKILLs us here, mid-run
    E._write_shard = slow
    from s4l.cli import main
    sys.exit(main(["extract", *sys.argv[1:]]))
""")


def test_killed_run_resumes_to_an_identical_file(tmp_path, ckpt, folder):
    args = ["--model", ckpt, "--data", folder, "--split", "val", "--batch-size", 3,
            "--shard-size", 5, "--workers", 1]
    ref = tmp_path / "ref.h5"
    assert run_cli(*args, "--out", ref) == 0
    out = tmp_path / "resumed.h5"
    out.write_bytes(b"a previous finished result")  # replaced with --overwrite, never half-way
    parts = parts_dir(out)
    proc = subprocess.Popen([sys.executable, "-c", KILLER, *map(str, args), "--out", str(out),
                             "--overwrite", "--no-progress"], cwd=ROOT, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while len(list(parts.glob("shard-*.h5"))) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the extraction never got going"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert out.read_bytes() == b"a previous finished result"
    done_before = sorted(p.name for p in parts.glob("shard-*.h5"))
    assert len(done_before) == 3  # shards 0-2 finished; shard 3 never started
    # Same command again: finished shards are reused, the rest computed, the file identical.
    summary = extract(ExtractConfig(model=str(ckpt), data=str(folder), out=str(out), split="val",
                                    batch_size=3, shard_size=5, workers=1, overwrite=True,
                                    progress=False))
    assert summary["shards_skipped"] == 3 and summary["shards"] == 7
    assert summary["images_this_run"] == 35 - 15
    assert_same_file(ref, out)
    assert not parts.exists()


def test_parts_of_another_extraction_are_not_mixed_in(tmp_path, ckpt, folder):
    out = tmp_path / "o.h5"
    parts = parts_dir(out)
    parts.mkdir()
    (parts / "manifest.json").write_text('{"layer": "stage1"}')
    cfg = ExtractConfig(model=str(ckpt), data=str(folder), out=str(out), workers=0, progress=False)
    with pytest.raises(UserError, match="parts of a different extraction"):
        extract(cfg)
    extract(ExtractConfig(**{**cfg.__dict__, "overwrite": True}))
    assert F.FeatureFile(out).n == 33


def test_torchrun_two_gloo_processes_match_one(tmp_path, ckpt, folder):
    common = ["--model", ckpt, "--data", folder, "--split", "val", "--batch-size", 4,
              "--shard-size", 6, "--workers", 0]
    single = tmp_path / "single.h5"
    assert run_cli(*common, "--out", single) == 0
    multi = tmp_path / "multi.h5"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
         "-m", "s4l.evaluation.cmd_extract", *map(str, common), "--out", str(multi), "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_file(single, multi)


def test_onnx_model_gives_the_checkpoint_features(tmp_path, ckpt, folder):
    from s4l.service.export import export_onnx

    onnx_path = tmp_path / "tiny.onnx"
    export_onnx(ckpt, onnx_path)
    a, b = tmp_path / "onnx.h5", tmp_path / "ckpt.h5"
    assert run_cli("--model", onnx_path, "--data", folder, "--out", a, "--layer", "embedding") == 0
    assert run_cli("--model", ckpt, "--data", folder, "--out", b) == 0
    ra, rb = read_all(a), read_all(b)
    assert ra["paths"].tolist() == rb["paths"].tolist()
    np.testing.assert_allclose(ra["features"], rb["features"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ra["logits"], rb["logits"], rtol=1e-4, atol=1e-4)
    with F.FeatureFile(a) as fa, F.FeatureFile(b) as fb:
        assert fa.attrs["model_format"] == "onnx"
        # The ONNX model remembers its checkpoint: the two files form a valid probe pair.
        F.check_pair(fa, fb)
    assert run_cli("--model", onnx_path, "--data", folder, "--out", tmp_path / "l.h5",
                   "--layer", "logits") == 0
    np.testing.assert_allclose(read_all(tmp_path / "l.h5")["features"], rb["logits"], rtol=1e-4, atol=1e-4)
    assert run_cli("--model", onnx_path, "--data", folder, "--out", tmp_path / "x.h5",
                   "--layer", "stage2") == 2


def write_places_list(root: Path, src_paths, labels, name="val_places205.csv") -> Path:
    """Lay images out in Places205's own format: IMAGES_ROOT/a/<class>/<n>.jpg + a list file."""
    lines = []
    for i, (p, lab) in enumerate(zip(src_paths, labels)):
        rel = f"a/class{lab}/{i:08d}.jpg"
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "images" / rel).write_bytes(Path(p).read_bytes())
        lines.append(f"{rel} {lab}")
    lst = root / "lists" / name
    lst.parent.mkdir(parents=True, exist_ok=True)
    lst.write_text("\n".join(lines) + "\n")
    return lst


def test_places205_list_of_real_photos(tmp_path, imagenette_root):
    """Real Imagenette JPEGs laid out as a Places205 list feed extraction (and a probe pair)."""
    ck = make_checkpoint(tmp_path / "m.pt", classes=10)
    src = sorted((imagenette_root / "val").glob("*/*.JPEG"))
    by_class = {}
    for p in src:
        by_class.setdefault(p.parent.name, []).append(p)
    wnids = sorted(by_class)[:4]
    picks = [(p, c) for c, w in enumerate(wnids) for p in by_class[w][:6]]
    lst = write_places_list(tmp_path, [p for p, _ in picks], [c for _, c in picks])
    out = tmp_path / "places.h5"
    spec = f"places205:{lst}@{tmp_path / 'images'}"
    assert run_cli("--model", ck, "--data", spec, "--out", out, "--batch-size", 8) == 0
    with F.FeatureFile(out) as ff:
        assert ff.n == 24 and ff.labels.tolist() == [c for _, c in picks]
        assert ff.paths[0].endswith("a/class0/00000000.jpg")
        assert np.isfinite(ff.features[...]).all()
    # A list pointing at missing images is refused up front with a count and the first few.
    (tmp_path / "images" / "a" / "class1" / "00000007.jpg").unlink()
    with pytest.raises(UserError, match=r"1 of 24 images .* missing.*00000007"):
        extract(ExtractConfig(model=str(ck), data=spec, out=str(tmp_path / "p2.h5"), progress=False))


def test_bad_input_is_refused_and_nothing_is_lost(tmp_path, ckpt, folder):
    out = tmp_path / "keep.h5"
    assert run_cli("--model", ckpt, "--data", folder, "--out", out) == 0
    before = file_sha256(out)
    # An existing output is never clobbered without --overwrite.
    assert run_cli("--model", ckpt, "--data", folder, "--out", out, "--layer", "stage1") == 2
    assert file_sha256(out) == before
    # With --overwrite, a failing run (bad layer) leaves the old file untouched as well.
    assert run_cli("--model", ckpt, "--data", folder, "--out", out, "--layer", "nope",
                   "--overwrite") == 2
    assert file_sha256(out) == before
    assert run_cli("--model", ckpt, "--data", folder, "--out", out, "--layer", "stage1",
                   "--overwrite") == 0
    assert F.FeatureFile(out).layer == "stage1"
    # An empty split, a missing model, a missing data root.
    empty = tmp_path / "empty"
    (empty / "val" / "a").mkdir(parents=True)
    for argv, words in [
        (["--data", empty], "no images|no image"),
        (["--data", tmp_path / "nowhere"], "does not exist"),
    ]:
        with pytest.raises(UserError, match=words):
            cfg = dict(model=str(ckpt), data=str(argv[1]), out=str(tmp_path / "e.h5"), progress=False)
            extract(ExtractConfig(**cfg))
    with pytest.raises(UserError, match="does not exist"):
        extract(ExtractConfig(model=str(tmp_path / "no.pt"), data=str(folder),
                              out=str(tmp_path / "e.h5"), progress=False))
    assert not (tmp_path / "e.h5").exists()


def test_probe_refuses_features_of_another_model(tmp_path, ckpt, folder):
    other = make_checkpoint(tmp_path / "other.pt", seed=1)
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    extract(ExtractConfig(model=str(ckpt), data=str(folder), out=str(a), workers=0, progress=False))
    extract(ExtractConfig(model=str(other), data=str(folder), out=str(b), workers=0, progress=False))
    code = cli_main(["probe", "--train", str(a), "--val", str(b), "--out", str(tmp_path / "p"),
                     "--no-progress"])
    assert code == 2
    assert not (tmp_path / "p" / "report.json").exists()


def test_shards_whose_images_all_fail_merge_cleanly(tmp_path, ckpt, folder):
    """One image per shard: the corrupt and the empty file each make a shard with no rows."""
    a, b = tmp_path / "one.h5", tmp_path / "many.h5"
    s = extract(ExtractConfig(model=str(ckpt), data=str(folder), out=str(a), batch_size=1,
                              shard_size=1, workers=0, progress=False))
    assert s["shards"] == 35 and s["rows"] == 33 and s["errors"] == 2
    extract(ExtractConfig(model=str(ckpt), data=str(folder), out=str(b), batch_size=8,
                          shard_size=16, workers=0, progress=False))
    ra, rb = read_all(a), read_all(b)
    assert ra["paths"].tolist() == rb["paths"].tolist() and ra["errors"] == rb["errors"]
    # Eval-mode BN: a row does not depend on its batch-mates (up to float rounding).
    np.testing.assert_allclose(ra["features"], rb["features"], rtol=1e-4, atol=1e-5)
