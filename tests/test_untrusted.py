"""Untrusted artifacts (issue 14): every loader and every command that reads a user's file treats
it as data. Hostile files come from tests/support/hostile.py; their payloads touch a marker file, which
must never appear. Commands run as a user runs them (a subprocess of `python -m s4l.cli`): they
exit 2 with one `s4l CMD: error:` line, no traceback, and write nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import hostile

from s4l.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    m = tmp_path / "PAYLOAD_RAN"
    yield m
    assert not m.exists(), "a hostile file's payload ran"


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory) -> Path:
    from test_extract import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("good") / "good.pt")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "s4l.cli", *args], capture_output=True, text=True,
                          timeout=240, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def assert_clean_refusal(r: subprocess.CompletedProcess, command: str, *fragments: str) -> None:
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], err[-2000:])
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if f"s4l {command}: error:" in ln]
    assert len(lines) == 1, err
    for frag in fragments:
        assert frag in lines[0], lines[0]


# ===================================================================== checkpoints: the loader


@pytest.mark.parametrize("kind", sorted(hostile.CHECKPOINT_MAKERS))
def test_read_checkpoint_refuses_pickled_code(tmp_path, marker, kind):
    from s4l.training.checkpoint import read_checkpoint

    bad = hostile.CHECKPOINT_MAKERS[kind](tmp_path / "bad.pt", marker)
    with pytest.raises(UserError) as e:
        read_checkpoint(bad)
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg
    assert "not a valid s4l checkpoint or carries forbidden objects" in msg
    assert "weights_only=False" not in msg  # torch's advice to disable the check is not passed on


def test_real_checkpoint_with_one_payload_is_refused(tmp_path, marker, good_ckpt):
    from s4l.training.checkpoint import load_for_inference, read_checkpoint

    bad = hostile.checkpoint_real_with_payload(good_ckpt, tmp_path / "bad.pt", marker)
    for load in (read_checkpoint, load_for_inference):
        with pytest.raises(UserError, match="forbidden objects"):
            load(bad)


def test_checkpoint_of_the_previous_release_still_loads(tmp_path):
    """Before this change the RNG state held numpy arrays and torch's TorchVersion: still read."""
    import random

    import torch

    from s4l.training.checkpoint import read_checkpoint, save_checkpoint, set_rng_state

    old_rng = {"python": random.getstate(), "numpy": np.random.get_state(),
               "torch": torch.get_rng_state()}
    save_checkpoint(tmp_path / "old.pt", {"rng": [old_rng],
                                          "provenance": {"versions": {"torch": torch.__version__}}})
    want = np.random.rand(3)
    ck = read_checkpoint(tmp_path / "old.pt")
    set_rng_state(ck["rng"][0])
    assert np.array_equal(np.random.rand(3), want)


def test_new_rng_state_is_tensors_and_plain_data(tmp_path):
    import torch

    from s4l.training.checkpoint import rng_state, save_checkpoint, set_rng_state

    save_checkpoint(tmp_path / "c.pt", {"rng": [rng_state()]})
    want = (np.random.rand(3), torch.rand(3))
    # No allowlist at all: plain torch.load(weights_only=True) reads what s4l writes now.
    ck = torch.load(tmp_path / "c.pt", weights_only=True)
    set_rng_state(ck["rng"][0])
    assert np.array_equal(np.random.rand(3), want[0]) and torch.equal(torch.rand(3), want[1])


# ===================================================================== checkpoints: every command


@pytest.fixture(scope="module")
def cmd_env(tmp_path_factory):
    from support.images import make_image_folder

    base = tmp_path_factory.mktemp("cmd")
    data = make_image_folder(base / "data", splits=("train", "val"), per_class=3, size=32)
    return base, data


def _no_files(folder: Path) -> bool:
    return not folder.exists() or not [p for p in folder.rglob("*") if p.is_file()]


@pytest.mark.parametrize("command", ["export", "extract", "pseudo-label", "val-study",
                                     "train-init", "train-resume"])
def test_every_command_refuses_a_hostile_checkpoint(tmp_path, marker, cmd_env, command):
    _, data = cmd_env
    bad = hostile.checkpoint_torch_zip(tmp_path / "model.pt", marker)
    before = bad.read_bytes()
    out = tmp_path / "out"
    if command in ("export", "extract", "pseudo-label"):
        out.mkdir()  # an existing, empty output folder: it must stay empty
    name = command.split("-")[0] if command.startswith("train") else command
    if command == "export":
        r = run_cli("export", "--checkpoint", str(bad), "--out", str(out / "m.onnx"))
    elif command == "extract":
        r = run_cli("extract", "--model", str(bad), "--data", str(data), "--split", "val",
                    "--out", str(out / "f.h5"), "--workers", "0", "--no-progress")
    elif command == "pseudo-label":
        r = run_cli("pseudo-label", "--checkpoint", str(bad), "--data", str(data),
                    "--out", str(out / "p.json"), "--workers", "0", "--no-progress")
    elif command == "val-study":
        bad2 = hostile.checkpoint_legacy_pickle(tmp_path / "model2.pt", marker)
        r = run_cli("val-study", "--models", str(bad2), str(bad), "--data", str(data), "--split", "val",
                    "--out", str(out), "--per-class", "1", "--workers", "0", "--no-progress")
    elif command == "train-init":
        r = run_cli("train", "--preset", "supervised-10pct-smoke", "--data", "builtin:digits",
                    "--workdir", str(out), "--no-progress", "--set", f"init.checkpoint={bad}")
    else:  # a workdir whose checkpoint.pt was replaced by a hostile one
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(before)
        r = run_cli("train", "--preset", "supervised-10pct-smoke", "--data", "builtin:digits",
                    "--workdir", str(out), "--no-progress")
    assert_clean_refusal(r, name, "forbidden objects")
    assert bad.read_bytes() == before
    if command == "train-resume":
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]
        assert (out / "checkpoint.pt").read_bytes() == before
    else:
        assert _no_files(out), list(out.rglob("*"))


# ===================================================================== npz


def test_npz_object_array_is_refused_and_never_unpickled(tmp_path, marker):
    from s4l.safeload import load_npz_safely

    bad = hostile.npz_object_array(tmp_path / "head.npz", marker)
    with pytest.raises(UserError, match="object array"):
        load_npz_safely(bad, 1 << 20)


def test_npz_zip_bomb_is_refused_before_inflating(tmp_path):
    from s4l.safeload import load_npz_safely

    bomb = hostile.npz_zip_bomb(tmp_path / "bomb.npz")
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(UserError, match="inflates to 64.0 MiB"):
        load_npz_safely(bomb, 8 << 20)


def test_npz_good_file_loads(tmp_path):
    from s4l.safeload import load_npz_safely

    np.savez(tmp_path / "ok.npz", w=np.eye(3, dtype=np.float32), names=np.array(["a", "b"]))
    got = load_npz_safely(tmp_path / "ok.npz", 1 << 20)
    assert np.array_equal(got["w"], np.eye(3)) and list(got["names"]) == ["a", "b"]
    (tmp_path / "junk.npz").write_bytes(b"PK not a zip")
    with pytest.raises(UserError, match="not a valid .npz"):
        load_npz_safely(tmp_path / "junk.npz", 1 << 20)


# ===================================================================== HDF5 feature files


@pytest.mark.parametrize("kind", sorted(hostile.H5_MAKERS))
def test_feature_file_refuses_hostile_layouts(tmp_path, kind):
    from s4l.evaluation.features import FeatureFile

    make, fragment = hostile.H5_MAKERS[kind]
    bad = make(tmp_path / "bad.h5", tmp_path / "other.bin")
    with pytest.raises(UserError) as e:
        FeatureFile(bad)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_nan_features_are_refused_when_read(tmp_path):
    from s4l.evaluation.features import FeatureFile

    with FeatureFile(hostile.h5_nan_features(tmp_path / "nan.h5", tmp_path / "x")) as ff:
        with pytest.raises(UserError, match="NaN or infinite"):
            list(ff.iter_blocks())


@pytest.mark.parametrize("kind", ["external_link", "huge_declared_shape", "nan"])
def test_probe_command_refuses_hostile_feature_files(tmp_path, kind):
    maker = hostile.h5_nan_features if kind == "nan" else hostile.H5_MAKERS[kind][0]
    bad = maker(tmp_path / "train.h5", tmp_path / "other.bin")
    out = tmp_path / "probe"
    r = run_cli("probe", "--train", str(bad), "--val", str(bad), "--out", str(out),
                "--solver", "sgd", "--no-progress")
    assert_clean_refusal(r, "probe")
    assert _no_files(out)


# ===================================================================== ONNX models


@pytest.mark.parametrize("kind", ["escape", "absolute", "domain"])
def test_onnx_check_refuses_escapes_and_custom_domains(tmp_path, kind):
    from s4l.onnxcheck import check_onnx_file

    (tmp_path / "secret.bin").write_bytes(b"\0" * 48)
    (tmp_path / "m").mkdir()
    loc = {"escape": "../secret.bin", "absolute": str(tmp_path / "secret.bin")}.get(kind)
    m = hostile.onnx_model(tmp_path / "m" / "model.onnx", external_location=loc,
                           domain="com.evil" if kind == "domain" else None)
    with pytest.raises(UserError, match="com.evil" if kind == "domain" else "outside the model's folder"):
        check_onnx_file(m)


def test_onnx_check_accepts_clean_and_inside_folder_models(tmp_path):
    import onnxruntime as ort

    from s4l.onnxcheck import check_onnx_file

    check_onnx_file(hostile.onnx_model(tmp_path / "plain.onnx"))
    (tmp_path / "w.bin").write_bytes(np.ones(12, np.float32).tobytes())
    inside = hostile.onnx_model(tmp_path / "inside.onnx", external_location="w.bin")
    check_onnx_file(inside)
    out = ort.InferenceSession(str(inside), providers=["CPUExecutionProvider"]).run(
        None, {"images": np.zeros((1, 8, 8, 3), np.uint8)})
    assert out[0].shape == (1, 4)


def test_onnx_check_passes_a_real_export(tmp_path, good_ckpt):
    from s4l.onnxcheck import check_onnx_file
    from s4l.service.export import export_onnx

    out = tmp_path / "m.onnx"
    export_onnx(good_ckpt, out)
    check_onnx_file(out)


@pytest.mark.parametrize("kind", ["escape", "domain", "no_metadata"])
def test_server_backend_refuses_hostile_models(tmp_path, kind):
    from s4l.service.backend import ModelLoadError, OnnxBackend

    (tmp_path / "secret.bin").write_bytes(b"\0" * 48)
    (tmp_path / "m").mkdir()
    m = hostile.onnx_model(tmp_path / "m" / "model.onnx",
                           external_location="../secret.bin" if kind == "escape" else None,
                           domain="com.evil" if kind == "domain" else None,
                           metadata=kind != "no_metadata")
    want = {"escape": "outside the model's folder", "domain": "com.evil",
            "no_metadata": "not an s4l export"}[kind]
    with pytest.raises(ModelLoadError, match=want):
        OnnxBackend(m)


@pytest.mark.parametrize("command", ["serve", "extract"])
def test_commands_refuse_an_onnx_model_reading_outside_its_folder(tmp_path, cmd_env, command):
    _, data = cmd_env
    (tmp_path / "secret.bin").write_bytes(b"\0" * 48)
    (tmp_path / "m").mkdir()
    m = hostile.onnx_model(tmp_path / "m" / "model.onnx", external_location="../secret.bin")
    out = tmp_path / "out"
    out.mkdir()
    if command == "serve":
        r = run_cli("serve", "--model", str(m), "--port", "0")
    else:
        r = run_cli("extract", "--model", str(m), "--data", str(data), "--split", "val",
                    "--out", str(out / "f.h5"), "--workers", "0", "--no-progress")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "outside the model's folder" in r.stderr
    assert _no_files(out)


# ===================================================================== label maps, pseudo labels, config


@pytest.mark.parametrize("case", sorted(hostile.LABEL_MAP_CASES))
def test_label_map_refusals(tmp_path, case):
    from s4l.datasets import read_label_map

    path, fragment = hostile.label_maps(tmp_path)[case]
    with pytest.raises(UserError) as e:
        read_label_map(path)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_oversized_json_files_are_refused_unread(tmp_path):
    from s4l.datasets import LABEL_MAP_MAX_BYTES, read_label_map
    from s4l.training import config as C
    from s4l.training.teacher_labels import PSEUDO_LABEL_MAX_BYTES, load_pseudo_label_file

    big = hostile.oversized_file(tmp_path / "big.json", LABEL_MAP_MAX_BYTES + 1)
    with pytest.raises(UserError, match="limit"):
        read_label_map(big)
    big2 = hostile.oversized_file(tmp_path / "big2.json", PSEUDO_LABEL_MAX_BYTES + 1)
    with pytest.raises(UserError, match="limit"):
        load_pseudo_label_file(big2)
    big3 = hostile.oversized_file(tmp_path / "big3.json", C.CONFIG_MAX_BYTES + 1)
    with pytest.raises(UserError, match="limit"):
        C.load_json(big3)
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(UserError, match="expected a JSON object"):
        C.load_json(tmp_path / "list.json")


@pytest.mark.parametrize("case", sorted(hostile.pseudo_label_docs()))
def test_pseudo_label_file_refusals(tmp_path, case):
    from s4l.training.teacher_labels import load_pseudo_label_file

    doc, fragment = hostile.pseudo_label_docs()[case]
    p = tmp_path / "p.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(UserError, match=re.escape(fragment)):
        load_pseudo_label_file(p)


def test_train_command_refuses_an_escaping_label_map(tmp_path, cmd_env):
    _, data = cmd_env
    lm = hostile.label_maps(tmp_path / "maps")["escapes_root"][0]
    out = tmp_path / "run"
    r = run_cli("train", "--preset", "supervised-10pct-smoke", "--data", str(data), "--labels", str(lm),
                "--workdir", str(out), "--no-progress")
    assert_clean_refusal(r, "train", "escapes the data root")
    assert _no_files(out)


# ===================================================================== the grep


UNSAFE = re.compile(r"weights_only\s*=\s*False|allow_pickle\s*=\s*True|pickle\.loads?\(|"
                    r"torch\.load\((?![^)]*weights_only\s*=\s*True)")


def test_no_unsafe_deserialisation_remains_in_the_package():
    """The package never unpickles user input: no weights_only=False, allow_pickle=True,
    pickle.load(s), or torch.load without weights_only=True."""
    hits = []
    for folder in ("s4l", "training", "evaluation", "service", "experiments"):
        for p in (REPO / folder).rglob("*.py"):
            for i, line in enumerate(p.read_text().splitlines(), 1):
                if UNSAFE.search(line):
                    hits.append(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
    assert hits == [], hits
    # The pattern itself works: it catches each form it is meant to.
    for bad in ("torch.load(p, weights_only=False)", "np.load(p, allow_pickle=True)",
                "pickle.load(f)", "pickle.loads(b)", "torch.load(p, map_location='cpu')"):
        assert UNSAFE.search(bad), bad
    assert not UNSAFE.search("torch.load(path, map_location=m, weights_only=True)")


def test_safe_loaders_are_torch_free():
    """The server (which must not import torch) uses these modules."""
    code = ("import sys, s4l.safeload, s4l.onnxcheck, s4l.service.backend; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
