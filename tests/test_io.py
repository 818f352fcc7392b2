"""s4l.io: atomic writes (a killed writer leaves the old file; permissions follow the umask) and
the shared-data lookup; and that the library writes files through it."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from s4l import io as sio

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def visible(folder: Path) -> list[str]:
    """What a reader listing the folder sees (hidden names are the writers' business)."""
    return sorted(n for n in os.listdir(folder) if not n.startswith("."))


# -- a writer killed mid-write -------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, time
    from s4l.io import atomic_open

    path = sys.argv[1]
    chunk = b"n" * (1 << 20)
    with atomic_open(path, "wb") as f:
        for i in range(64):  # 64 MiB, then hang inside the write: the kill always lands mid-write
            f.write(chunk)
            f.flush()
            if i == 8:
                print("writing", flush=True)
        time.sleep(600)
""")


def test_a_writer_killed_mid_write_leaves_the_old_file_and_nothing_visible(tmp_path):
    target = tmp_path / "model.onnx"
    old = b"the old model\n" * 1000
    sio.atomic_write_bytes(target, old)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)],
                            stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == b"writing"
        temps = sio.temp_files(target)
        assert len(temps) == 1 and temps[0].stat().st_size >= 8 << 20  # it really was writing
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == old
    assert visible(tmp_path) == ["model.onnx"]
    leftover = sio.temp_files(target)
    assert [p.name.startswith(".model.onnx.") for p in leftover] == [True]
    # The next write of the same file clears what the dead writer left.
    sio.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert sio.temp_files(target) == [] and sorted(os.listdir(tmp_path)) == ["model.onnx"]


def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "a.json"
    sio.atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), sio.atomic_open(target, "w") as f:
        f.write('{"v": 2')
        raise RuntimeError("disk full")
    with pytest.raises(ValueError), sio.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise ValueError("parity check failed")
    with pytest.raises(TypeError):
        sio.atomic_write_json(target, {"v": object()})
    assert json.loads(target.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["a.json"]


def test_a_live_writers_temp_is_not_swept(tmp_path):
    target = tmp_path / "f.bin"
    with sio.atomic_open(target) as f:
        f.write(b"x")
        mine = sio.temp_files(target)
        sio.atomic_write_bytes(target, b"other writer")  # a second writer, same process
        assert sio.temp_files(target) == mine
    assert target.read_bytes() == b"x"


# -- permissions: those of a plain open() under the umask ----------------------------------------

def _writers():
    def by_path(p: Path) -> None:
        with sio.atomic_path(p) as tmp:
            # A writer that replaces the file rather than writing into it, with its own mode.
            tmp.unlink()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, b"x")
            os.close(fd)

    def by_file(p: Path) -> None:
        with sio.atomic_open(p, "wb") as f:
            f.write(b"x")

    return {
        "bytes": lambda p: sio.atomic_write_bytes(p, b"x"),
        "text": lambda p: sio.atomic_write_text(p, "x"),
        "json": lambda p: sio.atomic_write_json(p, {"x": 1}),
        "open": by_file,
        "path": by_path,
    }


@pytest.mark.parametrize("writer", sorted(_writers()))
@pytest.mark.parametrize(("mask", "want"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_permissions_of_a_plain_open(tmp_path, writer, mask, want):
    write = _writers()[writer]
    with umask(mask):
        with open(tmp_path / "plain", "w"):
            pass
        write(tmp_path / "new")
        # Replacing a file made 0600 by an older s4l gives it the umask's permissions too.
        old = tmp_path / "old"
        old.write_bytes(b"")
        old.chmod(0o600)
        write(old)
    assert mode(tmp_path / "plain") == want
    assert mode(tmp_path / "new") == want
    assert mode(old) == want


def test_converted_writers_follow_the_umask(tmp_path):
    """A torch-free sample of the library's writers (the export's is in tests/test_container_images.py)."""
    import numpy as np

    from s4l.datasets import write_label_map
    from s4l.heads import Head, save_head

    head = Head(weight=np.zeros((2, 4), np.float32), bias=np.zeros(2, np.float32),
                class_names=("a", "b"), model_hash="0" * 64, layer="pre_logits")
    with umask(0o022):
        a = save_head(tmp_path / "head.npz", head)
        b = write_label_map(tmp_path / "labels.json", ["a", "b"])
    assert mode(a) == mode(b) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["head.npz", "labels.json"]  # no temp left either


def test_json_keeps_each_callers_format(tmp_path):
    p = tmp_path / "c.json"
    sio.atomic_write_json(p, {"b": 1, "a": [1]}, indent=2, sort_keys=True, newline=True)
    assert p.read_text() == json.dumps({"b": 1, "a": [1]}, indent=2, sort_keys=True) + "\n"
    sio.atomic_write_json(p, {"b": 1, "a": [1]})
    assert p.read_text() == json.dumps({"b": 1, "a": [1]})


def test_atomic_open_refuses_append(tmp_path):
    with pytest.raises(ValueError, match="whole files"), sio.atomic_open(tmp_path / "x", "ab"):
        pass


# -- the shared data ------------------------------------------------------------------------------

def test_shared_data_dir_env_then_beside_the_checkout(monkeypatch, tmp_path):
    monkeypatch.delenv("S4L_SHARED_DATA", raising=False)
    assert sio.shared_data_dir() == ROOT.parent / "shared" / "data"
    monkeypatch.setenv("S4L_SHARED_DATA", str(tmp_path))
    assert sio.shared_data_dir() == tmp_path
    monkeypatch.setenv("S4L_TEST_CACHE", str(tmp_path / "cache"))
    assert sio.data_cache_dir() == tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match="S4L_SHARED_DATA"):
        sio.shared_dataset("nothing.tar.gz", "nothing")


def test_shared_dataset_unpacks_once(monkeypatch, tmp_path):
    import tarfile

    src = tmp_path / "src" / "tiny"
    src.mkdir(parents=True)
    (src / "a.txt").write_text("a")
    with tarfile.open(tmp_path / "tiny.tar.gz", "w:gz") as tf:
        tf.add(src, arcname="tiny")
    monkeypatch.setenv("S4L_SHARED_DATA", str(tmp_path))
    monkeypatch.setenv("S4L_TEST_CACHE", str(tmp_path / "cache"))
    root = sio.shared_dataset("tiny.tar.gz", "tiny")
    assert (root / "a.txt").read_text() == "a"
    (root / "a.txt").write_text("kept")  # a second call reuses the unpacked folder
    assert (sio.shared_dataset("tiny.tar.gz", "tiny") / "a.txt").read_text() == "kept"


# -- every file the library writes goes through s4l.io ------------------------------------------

# Files still writing on their own, each with the reason (issue 30 item 4).
OWN_WRITES = {
    "s4l/io.py": "the helper itself",
    # issue 26: its download is published with s4l.io.publish; what remains unpacks a module
    # archive into a TemporaryDirectory that is read and thrown away (scratch, not an artifact).
    "training/tfhub/source.py": "scratch unpacking into a TemporaryDirectory",
}
RENAMES = {("os", "replace"), ("os", "rename"), ("tempfile", "mkstemp"),
           ("tempfile", "NamedTemporaryFile"), ("shutil", "copyfile"), ("shutil", "copy"),
           ("shutil", "copy2")}
# A line may opt out with a comment saying why (a log stream is written as it runs).
OPT_OUT = "# not atomic:"


def _open_mode(node: ast.Call) -> str | None:
    if not (isinstance(node.func, ast.Name) and node.func.id == "open"):
        return None
    args = [*node.args[1:2], *(k.value for k in node.keywords if k.arg == "mode")]
    if args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
        return args[0].value
    return "r"


def _inside_atomic_blocks(tree: ast.AST) -> set[int]:
    """Lines inside ``with atomic_path(...)`` / ``with atomic_open(...)``: writes to the temp."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any(
                isinstance(i.context_expr, ast.Call)
                and getattr(i.context_expr.func, "id", getattr(i.context_expr.func, "attr", ""))
                in ("atomic_path", "atomic_open") for i in node.items):
            lines |= set(range(node.lineno, node.end_lineno + 1))
    return lines


def own_writes(path: Path, root: Path = ROOT) -> list[str]:
    """Writes in ``path`` that bypass s4l.io: renames and temp files, copies, ``open(.., "w")``,
    ``write_text``/``write_bytes`` (appends are streams and pass)."""
    text = path.read_text()
    src = text.splitlines()
    tree = ast.parse(text)
    allowed = _inside_atomic_blocks(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or node.lineno in allowed \
                or OPT_OUT in src[node.lineno - 1]:
            continue
        f = node.func
        what = None
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) \
                and (f.value.id, f.attr) in RENAMES:
            what = f"{f.value.id}.{f.attr}"
        elif isinstance(f, ast.Attribute) and f.attr in ("write_text", "write_bytes"):
            what = f.attr
        elif (mode := _open_mode(node)) is not None and ("w" in mode or "x" in mode):
            what = f"open(..., {mode!r})"
        if what:
            found.append((node.lineno, f"{path.relative_to(root)}:{node.lineno} {what}"))
    return [msg for _, msg in sorted(found)]


def test_the_library_writes_files_only_through_s4l_io():
    found = []
    for folder in ("s4l", "training", "evaluation", "service", "study"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if str(path.relative_to(ROOT)) not in OWN_WRITES:
                found += own_writes(path)
    assert not found, ("write through s4l.io (atomic_write_*, atomic_open, atomic_path), or mark "
                       f"a stream with '{OPT_OUT} <why>':\n" + "\n".join(found))
    for listed in OWN_WRITES:
        assert (ROOT / listed).exists(), f"{listed} is gone: drop it from OWN_WRITES"


def test_the_write_check_sees_each_kind(tmp_path):
    src = tmp_path / "probe.py"
    src.write_text(
        "import os, shutil\nfrom s4l.io import atomic_path\n"
        "def f(p, q):\n"
        "    os.replace(p, q)\n"
        "    open(p, 'w').close()\n"
        "    p.write_text('x')\n"
        "    shutil.copyfile(p, q)\n"
        "    open(p, 'a').close()\n"
        "    open(p).close()\n"
        "    open(p, 'wb').close()  # not atomic: a log\n"
        "    with atomic_path(q) as tmp:\n"
        "        shutil.copyfile(p, tmp)\n")
    found = [ln.split(" ", 1)[1] for ln in own_writes(src, root=tmp_path)]
    assert found == ["os.replace", "open(..., 'w')", "write_text", "shutil.copyfile"], found


def test_publish_renames_a_finished_file_over_the_target(tmp_path):
    part, dest = tmp_path / "w.bin.partial", tmp_path / "w.bin"
    dest.write_bytes(b"old")
    part.write_bytes(b"new")
    assert sio.publish(part, dest) == dest
    assert dest.read_bytes() == b"new" and not part.exists()


def test_hidden_temp_names_do_not_leak_into_readers_globs(tmp_path):
    target = tmp_path / "features.h5"
    with sio.atomic_path(target) as tmp:
        tmp.write_bytes(b"x")
        assert tmp.name.startswith(".") and not tmp.name.endswith(".h5")
        assert list(tmp_path.glob("*.h5")) == []
    assert list(tmp_path.glob("*.h5")) == [target]
    assert sio.temp_files(target) == []
