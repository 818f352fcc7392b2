"""Damaged and hostile TF-Hub modules (issue 26, with the conventions of the untrusted-artifacts
work): each is refused with one line naming what is wrong, and nothing is written. Modules are
built at test time from the TF-written fixture by rewriting its bundle in TensorFlow's format,
or its graph by splicing hand-encoded nodes into the real saved_model.pb (tests/support/tfhub.py);
a payload that would run touches a marker file, which must not appear.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from support.hostile import Payload, oversized_file
from support.tfhub import (
    attr,
    attr_func,
    field_bytes,
    field_varint,
    function_def,
    node_def,
    py_func_node,
    read_all,
    rewrite_module,
    saved_model,
    splice_graph,
    unpack_fixture,
)

from s4l.errors import UserError

V = "variables/variables"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    base = tmp_path_factory.mktemp("good")
    module = unpack_fixture("rotation", base)
    return module, read_all(module)


@pytest.fixture
def marker(tmp_path: Path):
    m = tmp_path / "PAYLOAD_RAN"
    yield m
    assert not m.exists(), "a hostile module's payload ran"


def _flip(path: Path, at: float) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0x40
    path.write_bytes(bytes(data))


def _cut(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def make_case(name: str, module: Path, tensors: dict, dest: Path) -> Path:
    t = dict(tensors)
    if name == "truncated_index":
        _cut(_copy(module, dest) / f"{V}.index", 0.6)
    elif name == "truncated_data":
        _cut(_copy(module, dest) / f"{V}.data-00000-of-00001", 0.7)
    elif name == "flipped_byte_data":
        _flip(_copy(module, dest) / f"{V}.data-00000-of-00001", 0.5)
    elif name == "flipped_byte_index":
        _flip(_copy(module, dest) / f"{V}.index", 0.1)
    elif name == "wrong_shape":
        t["block2/unit1/b/conv2d/kernel"] = np.zeros((3, 3, 32, 16), np.float32)
        rewrite_module(module, dest, t)
    elif name == "extra_variable":
        t["global_step"] = np.zeros((), np.int64)
        rewrite_module(module, dest, t)
    elif name == "missing_variable":
        del t["block3/unit2/b/conv2d/kernel"]
        rewrite_module(module, dest, t)
    elif name == "mixed_bn_scopes":
        for k in [k for k in t if k.startswith("block4/") and "batch_normalization" in k]:
            t[k.replace("batch_normalization", "batch_norm")] = t.pop(k)
        rewrite_module(module, dest, t)
    elif name == "not_a_resnet":
        rewrite_module(module, dest, {"dense/kernel": np.zeros((4, 4), np.float32)})
    elif name == "compressed":
        rewrite_module(module, dest, t, compression=1)
    elif name == "sliced":
        rewrite_module(module, dest, t, overrides={"classes/bias": {"sliced": True}})
    elif name == "unknown_dtype":
        rewrite_module(module, dest, t, overrides={"classes/bias": {"dtype": 14}})
    elif name == "oversized_declared_tensor":
        n = 1 << 40  # 4 TiB of float32 declared by a few hundred KiB module
        rewrite_module(module, dest, t, overrides={"classes/kernel": {"shape": (1, 1, n, 1),
                                                                      "size": 4 * n}})
    elif name == "size_disagrees_with_shape":
        rewrite_module(module, dest, t, overrides={"rotations/bias": {"size": 8}})
    elif name == "offset_beyond_data":
        rewrite_module(module, dest, t, overrides={"rotations/bias": {"offset": 1 << 33}})
    elif name == "missing_shard":
        rewrite_module(module, dest, t, num_shards=2)
        (dest / f"{V}.data-00001-of-00002").unlink()
    elif name == "checksum_absent":
        rewrite_module(module, dest, t, overrides={"rotations/bias": {"crc": None}})
    elif name == "nan_weights":
        t["block1/unit1/c/conv2d/kernel"] = t["block1/unit1/c/conv2d/kernel"].copy()
        t["block1/unit1/c/conv2d/kernel"][0, 0, 0, 0] = np.nan
        rewrite_module(module, dest, t)
    elif name == "float64_weights":
        t["rotations/bias"] = t["rotations/bias"].astype(np.float64)
        rewrite_module(module, dest, t)
    else:
        raise KeyError(name)
    return dest


CASES = {
    "truncated_index": "truncated",
    "truncated_data": "beyond its data file",
    "flipped_byte_data": "checksum mismatch in tensor",
    "flipped_byte_index": "checksum mismatch",
    "wrong_shape": "wrong shape",
    "extra_variable": "does not know: global_step",
    "missing_variable": "missing: block3/unit2/b/conv2d/kernel",
    "mixed_bn_scopes": "one batch-norm scope",
    "not_a_resnet": "not a ResNet50v2 module",
    "compressed": "compressed",
    "sliced": "sliced",
    "unknown_dtype": "unsupported dtype bfloat16",
    "oversized_declared_tensor": "beyond its data file",
    "size_disagrees_with_shape": "needs 16 bytes but the entry holds 8",
    "offset_beyond_data": "beyond its data file",
    "missing_shard": "1 of 2 data shard(s) missing",
    "checksum_absent": "no checksum",
    "nan_weights": "NaN",
    "float64_weights": "not float32",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_module_is_refused_and_nothing_written(tmp_path, good, case):
    from s4l.training.tfhub.importer import import_tfhub

    module = make_case(case, *good, tmp_path / case)
    out = tmp_path / "out.pt"
    with pytest.raises(UserError) as e:
        import_tfhub(module, out, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and CASES[case] in msg, msg
    assert not out.exists() and not list(tmp_path.glob(".out.pt*"))


def test_a_refusal_keeps_the_previous_checkpoint(tmp_path, good):
    from s4l.training.tfhub.importer import import_tfhub

    out = tmp_path / "model.pt"
    out.write_bytes(b"previous")
    module = make_case("flipped_byte_data", *good, tmp_path / "bad")
    with pytest.raises(UserError):
        import_tfhub(module, out, progress=False)
    assert out.read_bytes() == b"previous"


def assert_clean_refusal(r: subprocess.CompletedProcess, *fragments: str) -> None:
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, err[-2000:])
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "s4l import-tfhub: error:" in ln]
    assert len(lines) == 1, err
    for frag in fragments:
        assert frag in lines[0], lines[0]


@pytest.mark.parametrize("case", ["flipped_byte_data", "extra_variable", "oversized_declared_tensor"])
def test_cli_refuses_with_one_line(tmp_path, good, case):
    module = make_case(case, *good, tmp_path / case)
    out = tmp_path / "out.pt"
    r = subprocess.run([sys.executable, "-m", "s4l.cli", "import-tfhub", str(module), "--out",
                        str(out), "--no-progress"], capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert_clean_refusal(r, CASES[case])
    assert not out.exists()


# ----------------------------------------------------------------------------- the graph, archives


GRAPH = "saved_model.pb"
MODULE_DEF = "tfhub_module.pb"


def _graph_case(name: str, module: Path, dest: Path, marker: Path) -> Path:
    """A copy of the good module whose graph (or ModuleDef) is hostile or damaged in one way."""
    m = _copy(module, dest)
    pb = (m / GRAPH).read_bytes()
    payload = pickle.dumps(Payload(marker))
    if name == "pickle_graph":
        (m / GRAPH).write_bytes(payload)
    elif name == "py_func_node":  # a real PyFunc node in the release graph, a pickle as its token
        (m / GRAPH).write_bytes(splice_graph(pb, [py_func_node(token=payload)]))
    elif name == "py_func_stateless_node":
        (m / GRAPH).write_bytes(splice_graph(pb, [py_func_node(op="PyFuncStateless")]))
    elif name == "eager_py_func_in_a_function":
        fn = function_def("__inference_evil_7", py_func_node("inner", op="EagerPyFunc"))
        call = node_def("call", "StatefulPartitionedCall", "image",
                        attrs=attr("f", attr_func("__inference_evil_7")))
        (m / GRAPH).write_bytes(splice_graph(pb, [call], [fn]))
    elif name == "func_attr_names_the_op":  # PartitionedCall(f=PyFunc): no node of op PyFunc
        call = node_def("call", "PartitionedCall", "image", attrs=attr("f", attr_func("PyFunc")))
        (m / GRAPH).write_bytes(splice_graph(pb, [call]))
    elif name == "write_file_node":
        (m / GRAPH).write_bytes(splice_graph(pb, [node_def("w", "WriteFile", "a", "b")]))
    elif name == "versioned_reader_node":
        (m / GRAPH).write_bytes(splice_graph(pb, [node_def("r", "TFRecordReaderV2")]))
    elif name == "hand_built_graph_with_py_func":
        (m / GRAPH).write_bytes(saved_model([node_def("image", "Placeholder"), py_func_node()]))
    elif name == "truncated_graph":
        (m / GRAPH).write_bytes(pb[: len(pb) // 2])
    elif name == "garbage_graph":
        (m / GRAPH).write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8)))
    elif name == "empty_graph":
        (m / GRAPH).write_bytes(b"")
    elif name == "graph_without_meta_graph":
        (m / GRAPH).write_bytes(field_varint(1, 1))
    elif name == "oversized_graph":  # sparse: refused from its size, never read
        (m / GRAPH).unlink()
        oversized_file(m / GRAPH, (64 << 20) + 1)
    elif name == "graph_is_a_device":
        (m / GRAPH).unlink()
        (m / GRAPH).symlink_to("/dev/zero")
    elif name == "missing_graph":
        (m / GRAPH).unlink()
    elif name == "pickle_module_def":
        (m / MODULE_DEF).write_bytes(payload)
    elif name == "module_def_requires_a_feature":
        (m / MODULE_DEF).write_bytes(field_varint(1, 3) + field_bytes(2, b"future-feature"))
    else:
        raise KeyError(name)
    return m


GRAPH_CASES = {
    "pickle_graph": "saved_model.pb does not parse as a SavedModel",
    "py_func_node": "node 'evil' uses op 'PyFunc', which runs Python code when executed",
    "py_func_stateless_node": "uses op 'PyFuncStateless', which runs Python code",
    "eager_py_func_in_a_function": "node 'inner' in function '__inference_evil_7' uses op "
                                   "'EagerPyFunc'",
    "func_attr_names_the_op": "node 'call' calls 'PyFunc', which runs Python code",
    "write_file_node": "uses op 'WriteFile', which reads or writes files",
    "versioned_reader_node": "uses op 'TFRecordReaderV2', which reads or writes files",
    "hand_built_graph_with_py_func": "uses op 'PyFunc'",
    "truncated_graph": "saved_model.pb does not parse as a SavedModel",
    "garbage_graph": "saved_model.pb does not parse as a SavedModel",
    "empty_graph": "saved_model.pb is empty",
    "graph_without_meta_graph": "holds no MetaGraphDef",
    "oversized_graph": "saved_model.pb is 67108865 bytes, over the 64 MiB limit",
    "graph_is_a_device": "saved_model.pb is not a regular file",
    "missing_graph": "no saved_model.pb",
    "pickle_module_def": "tfhub_module.pb does not parse as a TF-Hub ModuleDef",
    "module_def_requires_a_feature": "requires features ['future-feature']",
}


@pytest.mark.parametrize("case", sorted(GRAPH_CASES))
def test_hostile_or_damaged_graph_is_refused(tmp_path, good, marker, case):
    """The graph is read as data, never run or unpickled: a module whose saved_model.pb is not
    a SavedModel, or uses an op that runs code or touches files, is refused with one line, and
    nothing is written; the pickle payloads never run (`marker`)."""
    from s4l.training.tfhub.importer import import_tfhub

    module = _graph_case(case, good[0], tmp_path / case, marker)
    out = tmp_path / "out.pt"
    with pytest.raises(UserError) as e:
        import_tfhub(module, out, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and GRAPH_CASES[case] in msg, msg
    assert str(module) in msg  # names the file
    assert not out.exists() and not list(tmp_path.glob(".out.pt*"))


@pytest.mark.parametrize("case", ["py_func_node", "pickle_graph"])
def test_cli_refuses_a_hostile_graph_with_one_line(tmp_path, good, marker, case):
    module = _graph_case(case, good[0], tmp_path / case, marker)
    out = tmp_path / "out.pt"
    r = subprocess.run([sys.executable, "-m", "s4l.cli", "import-tfhub", str(module), "--out",
                        str(out), "--no-progress"], capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert_clean_refusal(r, GRAPH_CASES[case], str(module / GRAPH))
    assert not out.exists() and not list(tmp_path.glob(".out.pt*"))


@pytest.mark.parametrize("case", ["py_func_node", "pickle_graph", "missing_graph"])
def test_archive_with_a_hostile_graph_is_refused_before_anything_is_extracted(
        tmp_path, good, marker, monkeypatch, case):
    """From a .tgz the graph is read into memory (never unpacked) and checked before any weight
    is extracted."""
    from s4l.training.tfhub.importer import import_tfhub

    module = _graph_case(case, good[0], tmp_path / case, marker)
    tgz = tmp_path / "trap.tgz"
    with tarfile.open(tgz, "w:gz", compresslevel=1) as tar:
        tar.add(module, arcname="trap")
    extracted = []
    real = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile",
                        lambda self, m, *a, **k: extracted.append(m.name) or real(self, m, *a, **k))
    with pytest.raises(UserError) as e:
        import_tfhub(tgz, tmp_path / "o.pt", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and str(tgz) in msg, msg
    fragment = "no trap/saved_model.pb" if case == "missing_graph" else GRAPH_CASES[case]
    assert fragment in msg, msg
    assert not any(n.startswith("trap/variables/") for n in extracted), extracted
    assert not (tmp_path / "o.pt").exists()


def test_archive_graph_over_the_limit_is_refused_from_its_header(tmp_path, good, monkeypatch):
    import s4l.training.tfhub.source as source
    from s4l.training.tfhub.importer import import_tfhub

    tgz = tmp_path / "m.tgz"
    with tarfile.open(tgz, "w:gz", compresslevel=1) as tar:
        tar.add(good[0], arcname="m")
    monkeypatch.setattr(source, "MAX_GRAPH_BYTES", 1 << 20)  # the fixture's graph is ~1.3 MB
    with pytest.raises(UserError, match=r"m/saved_model.pb declares \d+ bytes, over the 1 MiB"):
        import_tfhub(tgz, tmp_path / "o.pt", progress=False)
    assert not (tmp_path / "o.pt").exists()


def test_the_release_graphs_saver_and_print_ops_are_accepted(tmp_path, good):
    """Ops a real release graph holds (the saver's SaveV2/RestoreV2/MergeV2Checkpoints/
    ShardedFilename, Print) are not refused, nor is a node whose *name* merely contains a refused
    op's (which also makes the check walk every attr)."""
    from s4l.training.tfhub.importer import import_tfhub

    m = _copy(good[0], tmp_path / "saver")
    pb = (m / GRAPH).read_bytes()
    nodes = [node_def("save/filename", "PlaceholderWithDefault"),
             node_def("save/ShardedFilename", "ShardedFilename", "save/filename"),
             node_def("save/SaveV2", "SaveV2", "save/ShardedFilename"),
             node_def("save/MergeV2Checkpoints", "MergeV2Checkpoints", "save/ShardedFilename"),
             node_def("save/RestoreV2", "RestoreV2", "save/filename"),
             node_def("save/ReadFile_like_name", "Identity", "save/filename"),
             node_def("print", "Print", "image")]
    (m / GRAPH).write_bytes(splice_graph(pb, nodes))
    import_tfhub(m, tmp_path / "ok.pt", progress=False)
    from s4l.training.checkpoint import load_for_inference

    rec = load_for_inference(tmp_path / "ok.pt")
    assert rec.spec.heads["rotation"] == 4


def test_refused_ops_and_their_variants_and_the_saver_ops_that_are_not():
    from s4l.training.tfhub.graph import refusal

    for op in ("PyFunc", "PyFuncStateless", "EagerPyFunc", "PrintV2", "ExperimentalCSVDataset",
               "CSVDatasetV2", "DebugNumericSummaryV2", "WholeFileReaderV2", "DataServiceDatasetV4",
               "DatasetFromGraph", "ImmutableConst", "RpcCall", "InitializeTableFromTextFileV2"):
        assert refusal(op), op
    for op in ("SaveV2", "RestoreV2", "MergeV2Checkpoints", "ShardedFilename", "Save", "Restore",
               "Print", "Conv2D", "FusedBatchNorm", "FusedBatchNormV3", "VariableV2",
               "VarHandleOp", "StatefulPartitionedCall", "Const", "PyFuncX"):
        assert refusal(op) is None, op


def test_graph_check_accepts_every_fixture_and_bounds_nesting():
    from support.tfhub import FAMILIES, FIXTURES

    from s4l.training.tfhub.graph import check_module_def, check_saved_model

    for fam in FAMILIES:
        with tarfile.open(FIXTURES / f"{fam}.tgz") as tar:
            summary = check_saved_model(tar.extractfile(f"{fam}/saved_model.pb").read(), fam)
            check_module_def(tar.extractfile(f"{fam}/tfhub_module.pb").read(), fam)
        assert summary.meta_graphs == 2 and "Conv2D" in summary.ops
    func = field_bytes(1, b"f")
    for _ in range(40):  # NameAttrList -> attr -> AttrValue.func -> NameAttrList ...
        entry = field_bytes(1, b"k") + field_bytes(2, field_bytes(10, func))
        func = field_bytes(1, b"f") + field_bytes(2, entry)
    deep = node_def("ReadFile_named", "Identity", attrs=attr("f", field_bytes(10, func)))
    with pytest.raises(UserError, match="nest more than 32 levels"):
        check_saved_model(saved_model([deep]), "x/saved_model.pb")


def test_graph_check_records_what_it_saw(tmp_path, good):
    import torch

    from s4l.training.tfhub.importer import import_tfhub

    import_tfhub(good[0], tmp_path / "ok.pt", progress=False)
    ck = torch.load(tmp_path / "ok.pt", weights_only=True)
    g = ck["provenance"]["tfhub"]["graph"]
    assert g["meta_graphs"] == 2 and g["nodes"] > 5000 and "Conv2D" in g["ops"]
    assert len(g["saved_model_sha256"]) == 64


def test_module_without_tfhub_module_pb_is_accepted(tmp_path, good):
    """tfhub_module.pb is checked when present; a SavedModel without one (tf.saved_model.load
    reads it fine) imports."""
    from s4l.training.tfhub.importer import import_tfhub

    m = _copy(good[0], tmp_path / "nomdef")
    (m / MODULE_DEF).unlink()
    import_tfhub(m, tmp_path / "ok.pt", progress=False)


def _tar(path: Path, members: dict[str, bytes | tuple[str, str]]) -> Path:
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, tuple):  # a link
                info.type = tarfile.SYMTYPE if content[0] == "sym" else tarfile.LNKTYPE
                info.linkname = content[1]
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return path


def test_archive_with_a_linked_index_is_refused(tmp_path, good):
    from s4l.training.tfhub.importer import import_tfhub

    tgz = _tar(tmp_path / "link.tgz", {"m/saved_model.pb": (good[0] / GRAPH).read_bytes(),
                                       "m/variables/variables.index": ("sym", "/etc/passwd"),
                                       "m/variables/variables.data-00000-of-00001": b""})
    with pytest.raises(UserError, match="not a regular file"):
        import_tfhub(tgz, tmp_path / "o.pt", progress=False)
    assert not (tmp_path / "o.pt").exists()


def test_archive_with_a_linked_graph_is_refused(tmp_path, good):
    from s4l.training.tfhub.importer import import_tfhub

    module = good[0]
    tgz = _tar(tmp_path / "link.tgz", {
        "m/saved_model.pb": ("sym", "/dev/zero"),
        f"m/{V}.index": (module / f"{V}.index").read_bytes(),
        f"m/{V}.data-00000-of-00001": (module / f"{V}.data-00000-of-00001").read_bytes()})
    with pytest.raises(UserError, match="m/saved_model.pb is not a regular file"):
        import_tfhub(tgz, tmp_path / "o.pt", progress=False)
    assert not (tmp_path / "o.pt").exists()


def test_archive_members_outside_the_module_are_never_extracted(tmp_path, good):
    from s4l.training.tfhub.importer import import_tfhub

    module = good[0]
    members = {"m/saved_model.pb": (module / GRAPH).read_bytes(),
               f"m/{V}.index": (module / f"{V}.index").read_bytes(),
               f"m/{V}.data-00000-of-00001": (module / f"{V}.data-00000-of-00001").read_bytes(),
               "../escaped.txt": b"x", "/tmp/abs-escaped.txt": b"x"}
    tgz = _tar(tmp_path / "evil.tgz", members)
    import_tfhub(tgz, tmp_path / "o.pt", progress=False)
    assert not (tmp_path.parent / "escaped.txt").exists()


@pytest.mark.parametrize("members,fragment", [
    ({}, "holds 0 TF-Hub modules"),
    ({"a/variables/variables.index": b"", "b/variables/variables.index": b""}, "holds 2"),
])
def test_archive_without_exactly_one_module_is_refused(tmp_path, members, fragment):
    from s4l.training.tfhub.importer import import_tfhub

    tgz = _tar(tmp_path / "x.tgz", {"readme": b"hi", **members})
    with pytest.raises(UserError, match=fragment):
        import_tfhub(tgz, tmp_path / "o.pt", progress=False)


def test_truncated_archive_is_refused(tmp_path, good):
    from s4l.training.tfhub.importer import import_tfhub

    tgz = tmp_path / "m.tgz"
    with tarfile.open(tgz, "w:gz", compresslevel=1) as tar:
        tar.add(good[0], arcname="m")
    _cut(tgz, 0.5)
    with pytest.raises(UserError, match="damaged or truncated|truncated"):
        import_tfhub(tgz, tmp_path / "o.pt", progress=False)
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("where", [0.2, 0.5, 0.8])
def test_an_archive_with_corrupted_compressed_bytes_is_refused_and_writes_nothing(
        tmp_path, good, where):
    """Bytes flipped inside the gzip stream (not cut short). tarfile stops listing members at
    the first header it cannot read, without an error, so this read as "0 TF-Hub modules";
    it must say the archive is damaged, and leave no output."""
    from s4l.training.tfhub.importer import import_tfhub

    tgz = tmp_path / "m.tgz"
    with tarfile.open(tgz, "w:gz", compresslevel=1) as tar:
        tar.add(good[0], arcname="m")
    data = bytearray(tgz.read_bytes())
    at = int(len(data) * where)
    data[at:at + 64] = bytes(b ^ 0x5A for b in data[at:at + 64])
    tgz.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"archive .*m\.tgz is damaged"):
        import_tfhub(tgz, tmp_path / "o.pt", progress=False, cache=tmp_path / "cache")
    assert not (tmp_path / "o.pt").exists()


def test_not_a_module_at_all(tmp_path):
    from s4l.training.tfhub.importer import import_tfhub

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a TF-Hub module directory"):
        import_tfhub(tmp_path / "empty", tmp_path / "o.pt", progress=False)
    (tmp_path / "junk.bin").write_bytes(b"\0" * 100)
    with pytest.raises(UserError, match="neither a module directory nor a readable tar"):
        import_tfhub(tmp_path / "junk.bin", tmp_path / "o.pt", progress=False)
