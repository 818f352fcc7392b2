"""Damaged and hostile TF-Hub modules (issue 26, with the conventions of the untrusted-artifacts
work): each is refused with one line naming what is wrong, and nothing is written. Modules are
built at test time from the TF-written fixture by rewriting its bundle in TensorFlow's format
(tests/support/tfhub.py); a payload that would run touches a marker file, which must not appear.
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
from support.hostile import Payload
from support.tfhub import read_all, rewrite_module, unpack_fixture

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


def test_graph_that_would_run_code_is_never_read(tmp_path, good, marker):
    """The graph is not needed and never parsed or run: a booby-trapped saved_model.pb (and a
    pickle-bearing tfhub_module.pb) changes nothing; the weights import as data."""
    from s4l.training.tfhub.importer import import_tfhub

    module = _copy(good[0], tmp_path / "trap")
    (module / "saved_model.pb").write_bytes(pickle.dumps(Payload(marker)))
    (module / "tfhub_module.pb").write_bytes(pickle.dumps(Payload(marker)))
    import_tfhub(module, tmp_path / "ok.pt", progress=False)
    assert (tmp_path / "ok.pt").is_file()
    # ... and from an archive the graph is not even unpacked
    tgz = tmp_path / "trap.tgz"
    with tarfile.open(tgz, "w:gz", compresslevel=1) as tar:
        tar.add(module, arcname="trap")
    import_tfhub(tgz, tmp_path / "ok2.pt", progress=False)


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


def test_archive_with_a_linked_index_is_refused(tmp_path):
    from s4l.training.tfhub.importer import import_tfhub

    tgz = _tar(tmp_path / "link.tgz", {"m/variables/variables.index": ("sym", "/etc/passwd"),
                                       "m/variables/variables.data-00000-of-00001": b""})
    with pytest.raises(UserError, match="not a regular file"):
        import_tfhub(tgz, tmp_path / "o.pt", progress=False)
    assert not (tmp_path / "o.pt").exists()


def test_archive_members_outside_the_module_are_never_extracted(tmp_path, good):
    from s4l.training.tfhub.importer import import_tfhub

    module = good[0]
    members = {f"m/{V}.index": (module / f"{V}.index").read_bytes(),
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


def test_not_a_module_at_all(tmp_path):
    from s4l.training.tfhub.importer import import_tfhub

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a TF-Hub module directory"):
        import_tfhub(tmp_path / "empty", tmp_path / "o.pt", progress=False)
    (tmp_path / "junk.bin").write_bytes(b"\0" * 100)
    with pytest.raises(UserError, match="neither a module directory nor a readable tar"):
        import_tfhub(tmp_path / "junk.bin", tmp_path / "o.pt", progress=False)
