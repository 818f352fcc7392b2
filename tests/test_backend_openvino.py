"""The OpenVINO backend (issue 29): precision choice, the parity gate, both backends answering the
same image suite through a real `s4l serve`, extraction attributes, int8 on both, and the one-line
start-up errors (bad backend or precision, openvino not importable)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

try:  # the service test helpers (tests/support/ after the helpers' move)
    from support.server import ROOT, ServerProcess, export_tiny, jpeg_bytes, make_checkpoint
except ImportError:  # pragma: no cover - before it
    from test_server_support import ROOT, ServerProcess, export_tiny, jpeg_bytes, make_checkpoint

from s4l.service.backend import ModelLoadError
from s4l.service.backend_openvino import (
    COSINE_GATE,
    bf16_support,
    cpu_flags,
    gate_images,
    parity_gate,
    resolve_precision,
)

try:
    import openvino as ov
except ImportError:  # the rules and the missing-package paths are still tested
    ov = None
needs_ov = pytest.mark.skipif(ov is None, reason="the openvino extra is not installed "
                              "(pip install 's4l[openvino]'; the dev extra has it)")
BF16 = bf16_support(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") if ov else [])
needs_bf16 = pytest.mark.skipif(ov is None or not BF16.native, reason=f"no native bf16 here: {BF16.reason}")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("ov"))


# -- choosing the precision: bf16 only where it is native ----------------------------------------

@pytest.mark.parametrize("caps, flags, machine, native", [
    (["FP32", "BF16", "INT8"], {"avx512f", "avx512_bf16"}, "x86_64", True),  # Zen 4, Cooper Lake
    (["FP32", "BF16"], {"amx_bf16", "amx_tile"}, "x86_64", True),  # AMX
    (["FP32", "BF16"], {"avx512f", "avx512_vnni"}, "x86_64", False),  # BF16 would be emulated
    (["FP32", "INT8"], {"avx512_bf16"}, "x86_64", False),  # the plugin does not offer it
    (["FP32", "BF16"], {"bf16"}, "aarch64", False),
])
def test_native_bf16_needs_the_instruction_and_the_capability(caps, flags, machine, native):
    s = bf16_support(caps, flags, machine, isa_cap="")
    assert s.native is native and s.reason


def test_an_isa_cap_below_bf16_means_emulated():
    caps, flags = ["FP32", "BF16"], {"avx512_bf16", "amx_bf16"}
    assert not bf16_support(caps, flags, "x86_64", isa_cap="AVX512_CORE_VNNI").native
    assert bf16_support(caps, flags, "x86_64", isa_cap="avx512_core_amx").native
    assert bf16_support(caps, flags, "x86_64", isa_cap="ALL").native


@needs_bf16
def test_auto_is_fp32_where_bf16_would_be_emulated(model):
    """ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI makes this CPU look like one without bf16 to OpenVINO's
    kernels (which still list BF16): auto must pick fp32 and bf16 must refuse, in a real server."""
    env = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI", "S4L_BACKEND": "openvino"}
    with ServerProcess(model, env={**env, "S4L_PRECISION": "auto"}) as srv:
        info = httpx.get(srv.url + "/info", timeout=10).json()
    assert info["precision"] == "fp32" and "ONEDNN_MAX_CPU_ISA" in info["backend_detail"]["bf16_reason"]
    line = _serve_fails(model, {**env, "S4L_PRECISION": "bf16"})
    assert "precision 'bf16' refused" in line and "emulated" in line


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16\n\nprocessor\t: 1\n")
    assert {"avx512_bf16", "amx_bf16"} <= cpu_flags(f)
    assert cpu_flags(tmp_path / "absent") == set()


def test_precision_rules():
    native = bf16_support(["BF16"], {"avx512_bf16"}, "x86_64")
    emulated = bf16_support(["BF16"], {"avx512f"}, "x86_64")
    assert resolve_precision("openvino", "auto", native) == "bf16"
    assert resolve_precision("openvino", "auto", emulated) == "fp32"  # never emulated bf16
    assert resolve_precision("openvino", "fp32", native) == "fp32"
    assert resolve_precision("onnxruntime", "auto", None) == "fp32"
    with pytest.raises(ModelLoadError, match="emulated"):
        resolve_precision("openvino", "bf16", emulated)
    with pytest.raises(ModelLoadError, match="needs --backend openvino"):
        resolve_precision("onnxruntime", "bf16", None)
    with pytest.raises(ModelLoadError, match="unknown precision"):
        resolve_precision("openvino", "fp16", native)


# -- the parity gate -------------------------------------------------------------------------------

class _Head:
    def __init__(self, w):
        self.w = w

    def apply(self, emb):
        return emb @ self.w


def test_parity_gate_accepts_equal_and_refuses_drift_or_a_flipped_class():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(16, 8)).astype(np.float32)
    logits = rng.normal(size=(16, 3)).astype(np.float32)
    images = np.zeros((16, 4, 4, 3), np.uint8)

    def ref(x):
        return {"embedding": emb[: len(x)], "logits": logits[: len(x)]}

    def same(x):  # a float-rounding difference only
        return {"embedding": emb[: len(x)] * (1 + 1e-6), "logits": logits[: len(x)]}

    def drift(x):
        return {"embedding": emb[: len(x)] + 0.05, "logits": logits[: len(x)]}

    flipped = logits.copy()
    flipped[3] = -flipped[3]

    def flip(x):
        return {"embedding": emb[: len(x)], "logits": flipped[: len(x)]}

    head = _Head(rng.normal(size=(8, 5)))
    ok = parity_gate(same, ref, images, precision="bf16", source="t", heads={"h": head})
    assert ok.passed and ok.top1_agreement == {"model": 1.0, "h": 1.0}
    bad = parity_gate(drift, ref, images, precision="bf16", source="t")
    assert not bad.passed and bad.embedding_cosine_min < COSINE_GATE
    assert not parity_gate(flip, ref, images, precision="bf16", source="t").passed
    assert "top-1" in bad.summary() and str(COSINE_GATE) in bad.summary()


def test_gate_images_are_fixed_and_a_folder_is_read(model, tmp_path):
    from s4l.service.backend import OnnxBackend

    spec = OnnxBackend(model).info.preprocess
    a, b = gate_images(spec), gate_images(spec)
    assert a.shape == (32, spec.crop, spec.crop, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert a.std() > 20  # not a flat image
    (tmp_path / "x.jpg").write_bytes(jpeg_bytes(seed=1))
    (tmp_path / "notes.txt").write_text("not an image")
    assert gate_images(spec, tmp_path).shape == (1, spec.crop, spec.crop, 3)
    with pytest.raises(ModelLoadError, match="no readable image"):
        gate_images(spec, tmp_path / "notes.txt")


@needs_bf16
def test_bf16_passes_the_gate_on_this_cpu(model):
    from s4l.service.backend_openvino import OpenVinoBackend

    b = OpenVinoBackend(model, precision="bf16")
    report = b.gate()
    assert b.precision == "bf16" and report.passed
    assert report.embedding_cosine_min >= COSINE_GATE and report.top1_agreement["model"] == 1.0
    assert 0 < report.embedding_max_rel_error < 0.05  # really bf16: not bit-equal to fp32
    out = b.run(np.zeros((3, 32, 32, 3), np.uint8))
    assert out["embedding"].shape == (3, 128) and out["logits"].shape == (3, 3)
    assert out["embedding"].dtype == np.float32
    b.close()


@needs_bf16
def test_failed_gate_refuses_bf16_and_auto_falls_back_loudly(model, monkeypatch, caplog):
    from s4l.service import backend_openvino as bo

    real = bo.parity_gate

    def strict_on_bf16(*a, **kw):  # as if bf16 drifted on this model
        r = real(*a, **kw)
        if kw["precision"] == "bf16":
            r.passed = False
        return r
    monkeypatch.setattr(bo, "parity_gate", strict_on_bf16)
    with pytest.raises(ModelLoadError, match="bf16 failed the parity gate") as e:
        bo.OpenVinoBackend(model, precision="bf16").gate()
    assert "\n" not in str(e.value)
    b = bo.OpenVinoBackend(model, precision="auto")
    with caplog.at_level("WARNING"):
        report = b.gate()
    assert b.precision == "fp32" and report.passed and "bf16 failed" in b.fallback
    assert any("FALLBACK TO FP32" in r.message for r in caplog.records)
    assert b.describe_backend()["fallback"] == b.fallback
    b.close()


@needs_ov
def test_int8_export_runs_on_both_backends(tmp_path):
    from support.images import make_image_folder

    from s4l.service.backend import OnnxBackend
    from s4l.service.backend_openvino import OpenVinoBackend
    from s4l.service.export import export_onnx

    data = make_image_folder(tmp_path / "calib", splits=("train",), per_class=6, size=40)
    q = tmp_path / "q.onnx"
    export_onnx(make_checkpoint(tmp_path / "t.pt"), q, int8_calibration=str(data),
                calibration_images=10, heldout_images=8)
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    a = OnnxBackend(q).run(x)
    ovb = OpenVinoBackend(q, precision="auto")
    report = ovb.gate()
    assert report.passed and report.reference.startswith("onnxruntime on the same int8")
    b = ovb.run(x)
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    cos = (a["embedding"] * b["embedding"]).sum(1) / (
        np.linalg.norm(a["embedding"], axis=1) * np.linalg.norm(b["embedding"], axis=1))
    assert cos.min() > 0.99


# -- both backends behind a real server: the same image suite, the same answers -----------------

def _suite():
    import test_server_live as live  # the live tests' hostile/odd image suite

    return {"good": (jpeg_bytes(seed=7), None), **live._bad_images()}


@pytest.fixture(scope="module")
def servers(model):
    env = {"S4L_MAX_IMAGES_PER_REQUEST": "16", "S4L_LOG_LEVEL": "warning"}
    with ServerProcess(model, env={**env, "S4L_BACKEND": "onnxruntime"}) as a, \
            ServerProcess(model, env={**env, "S4L_BACKEND": "openvino", "S4L_PRECISION": "auto"}) as b:
        yield a, b
        for s in (a, b):
            assert "Traceback" not in s.output()


def _post(srv, blobs, path="/embed"):
    files = [("files", (f"f{i}", blob, "application/octet-stream")) for i, blob in enumerate(blobs)]
    r = httpx.post(srv.url + path, files=files, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@needs_ov
def test_both_backends_answer_the_image_suite_alike(servers):
    suite = _suite()
    blobs = [b for b, _ in suite.values()]
    ort_res, ov_res = (_post(s, blobs)["results"] for s in servers)
    assert len(ort_res) == len(ov_res) == len(blobs)
    for name, (x, y), (_, code) in zip(suite, zip(ort_res, ov_res), suite.values()):
        assert x.keys() == y.keys(), name
        if "error" in x:
            assert x["error"]["code"] == y["error"]["code"] == code, name
            continue
        assert code is None, name
        e1, e2 = np.array(x["embedding"]), np.array(y["embedding"])
        assert e1.shape == e2.shape == (128,)
        assert e1 @ e2 / (np.linalg.norm(e1) * np.linalg.norm(e2)) >= COSINE_GATE, name
    c1, c2 = (_post(s, blobs, "/classify")["results"] for s in servers)
    assert [r["top_k"][0]["label"] if "top_k" in r else r["error"]["code"] for r in c1] == \
        [r["top_k"][0]["label"] if "top_k" in r else r["error"]["code"] for r in c2]
    assert sum("top_k" in r for r in c1) >= 7  # most of the suite decodes


@needs_ov
def test_info_and_metrics_report_backend_and_precision(servers):
    expected = "bf16" if BF16.native else "fp32"
    for srv, backend, precision in zip(servers, ("onnxruntime", "openvino"), ("fp32", expected)):
        info = httpx.get(srv.url + "/info", timeout=10).json()
        assert (info["backend"], info["precision"]) == (backend, precision)
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text
        assert f's4l_backend_info{{backend="{backend}",precision="{precision}"' in metrics
        assert httpx.get(srv.url + "/readyz", timeout=10).status_code == 200
    detail = httpx.get(servers[1].url + "/info", timeout=10).json()["backend_detail"]
    assert detail["parity"]["passed"] and detail["parity"]["embedding_cosine_min"] >= COSINE_GATE
    assert detail["bf16_native"] is BF16.native
    # Open Inference Protocol metadata names the backend as Triton does.
    platforms = [httpx.get(s.url + "/v2/models/s4l", timeout=10).json()["platform"] for s in servers]
    assert platforms == ["onnxruntime_onnx", "openvino"]


# -- start-up errors: one line, no traceback ----------------------------------------------------

def _serve_fails(model: Path, env: dict[str, str], args=(), pythonpath: str | None = None) -> str:
    full = {k: v for k, v in os.environ.items() if not k.startswith("S4L_")}
    full.update({"S4L_MODEL": str(model), "S4L_PORT": "1", **env})
    if pythonpath:
        full["PYTHONPATH"] = pythonpath + os.pathsep + full.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "s4l.cli", "serve", *args], env=full, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("s4l serve: error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.parametrize("env, args, needle", [
    ({"S4L_BACKEND": "tensorrt"}, (), "backend: Input should be 'onnxruntime' or 'openvino'"),
    ({}, ("--precision", "fp8"), "precision: Input should be 'fp32', 'bf16' or 'auto'"),
    ({"S4L_PRECISION": "bf16"}, (), "precision 'bf16' needs --backend openvino"),
    ({"S4L_BACKEND": "openvino", "S4L_PROVIDER": "cuda"}, (), "openvino backend runs on the CPU"),
])
def test_bad_backend_or_precision_is_one_line(model, env, args, needle):
    assert needle in _serve_fails(model, env, args)


@pytest.fixture
def no_openvino(tmp_path) -> str:
    """A folder that, first on PYTHONPATH, makes `import openvino` fail as if it were absent."""
    pkg = tmp_path / "shadow" / "openvino"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'openvino'\", name='openvino')\n")
    return str(tmp_path / "shadow")


def test_missing_openvino_is_one_line_at_start_up(model, no_openvino):
    line = _serve_fails(model, {"S4L_BACKEND": "openvino"}, pythonpath=no_openvino)
    assert "pip install 's4l[openvino]'" in line and "No module named 'openvino'" in line


def test_missing_openvino_is_one_line_for_extract(model, no_openvino, tmp_path):
    from support.images import make_image_folder

    data = make_image_folder(tmp_path / "d", splits=("val",), per_class=1)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("S4L_")},
           "PYTHONPATH": no_openvino}
    r = subprocess.run([sys.executable, "-m", "s4l.cli", "extract", "--model", str(model), "--data",
                        str(data), "--out", str(tmp_path / "f.h5"), "--backend", "openvino"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("s4l extract: error:")]
    assert len(lines) == 1 and "pip install 's4l[openvino]'" in lines[0], r.stderr
    assert not (tmp_path / "f.h5").exists()


# -- extraction -----------------------------------------------------------------------------------

@needs_ov
def test_extract_records_backend_and_precision(model, tmp_path):
    import h5py
    from support.images import make_image_folder

    from s4l.cli import main as s4l_main

    data = make_image_folder(tmp_path / "d", splits=("val",), per_class=3)
    outs = {}
    for backend in ("onnxruntime", "openvino"):
        out = tmp_path / f"{backend}.h5"
        assert s4l_main(["extract", "--model", str(model), "--data", str(data), "--out", str(out),
                         "--workers", "0", "--no-progress", "--backend", backend]) == 0
        with h5py.File(out) as f:
            outs[backend] = (f["features"][:], dict(f.attrs))
    (a, attrs_a), (b, attrs_b) = outs["onnxruntime"], outs["openvino"]
    assert (attrs_a["backend"], attrs_a["precision"]) == ("onnxruntime", "fp32")
    assert (attrs_b["backend"], attrs_b["precision"]) == ("openvino", "bf16" if BF16.native else "fp32")
    assert json.loads(attrs_b["parity"])["passed"] and json.loads(attrs_a["parity"]) is None
    assert a.shape == b.shape
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= COSINE_GATE


def test_extract_refuses_openvino_for_a_checkpoint_and_bad_values(model, tmp_path):
    from s4l.cli import main as s4l_main
    from s4l.errors import UserError
    from s4l.evaluation.encoders import open_encoder

    with pytest.raises(UserError, match="apply to ONNX models"):
        open_encoder(model.with_suffix(".pt"), backend="openvino")
    with pytest.raises(UserError, match="needs --backend openvino"):
        open_encoder(model, precision="bf16")
    rc = s4l_main(["extract", "--model", str(model), "--data", str(tmp_path), "--out",
                   str(tmp_path / "x.h5"), "--precision", "fp8"])
    assert rc != 0


@needs_ov
def test_task_heads_are_part_of_the_gate(model, tmp_path):
    from s4l.heads import Head, save_head
    from s4l.service.app import load_backend
    from s4l.service.backend import OnnxBackend
    from s4l.service.head_registry import model_hash
    from s4l.service.settings import Settings

    info = OnnxBackend(model).info
    rng = np.random.default_rng(3)
    save_head(tmp_path / "h.npz", Head(weight=rng.normal(size=(4, info.embedding_dim)).astype(np.float32),
                                       bias=np.zeros(4, np.float32), class_names=("a", "b", "c", "d"),
                                       model_hash=model_hash(info)))
    b = load_backend(Settings(model=model, backend="openvino", precision="auto",
                              heads=(f"places={tmp_path / 'h.npz'}",)))
    try:
        assert set(b.parity.top1_agreement) == {"model", "places"} and b.parity.passed
    finally:
        b.close()
