"""Every file s4l writes, and where the shared data sets live (torch-free).

Writes are atomic (docs/contracts.md, "Every file we write"): the bytes go to a hidden temp file
in the target's folder, which is fsync'ed, renamed over the target (``os.replace``), and the folder
is fsync'ed, so a reader sees the old file or the new one, never half of one, and a power cut
after the call returns cannot leave an empty file behind. The result gets the permissions a plain
``open()`` would give a new file under the user's umask (0644 under the usual 022), not
``tempfile.mkstemp``'s 0600: an exported model must be readable by the non-root user of the serve
image (docker/compose.yaml mounts the folder read-only into a container running as uid 999).

A writer killed mid-write leaves the target untouched and its temp file behind under a hidden name
(``.NAME.PID-RANDOM.tmp``); the next write of the same target removes the temps of writers that
are no longer running.

- :func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_write_json`: whole contents.
- :func:`atomic_open`: a file object, for writers that stream (``torch.save(obj, f)``).
- :func:`atomic_path`: a temp path, for writers that want a file name (``onnx.save``,
  ``torch.onnx.export``, ``h5py.File(path, "w")``, ``savefig``).
- :func:`publish`: the rename alone, for a file that keeps a stable name while it grows (a
  resumable download's ``.partial``).
- :func:`shared_data_dir`, :func:`data_cache_dir`, :func:`shared_dataset`, :func:`unpack_once`:
  the data sets in ``../shared/data`` (``$S4L_SHARED_DATA``), unpacked once into a cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

# The checkout this package sits in: ../shared/data is looked up beside it.
CHECKOUT = Path(__file__).resolve().parents[1]

_TMP_SUFFIX = ".tmp"


# ----------------------------------------------------------------------------------------------
# Atomic writes


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically (see the module docstring); returns the path."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Replace ``path`` with ``text`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, newline: bool = False,
                      **dumps: Any) -> Path:
    """Replace ``path`` with ``json.dumps(obj, **dumps)`` (plus ``"\\n"`` when ``newline``)
    atomically. The serialisation happens before the temp file exists, so an object that cannot
    be serialised leaves nothing behind."""
    text = json.dumps(obj, **dumps)
    return atomic_write_text(path, text + "\n" if newline else text)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *,
                encoding: str | None = None) -> Iterator[IO[Any]]:
    """A file object on a temp file that replaces ``path`` when the block exits cleanly.

    On an exception the temp file is removed and ``path`` is left as it was. ``mode`` is "wb"
    or "w" (text, ``encoding`` defaulting to UTF-8).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode 'wb' or 'w', not {mode!r}")
    path = Path(path)
    tmp, fd, _ = _create_temp(path)
    try:
        if mode == "w":
            f: IO[Any] = open(fd, "w", encoding=encoding or "utf-8")
        else:
            f = open(fd, "wb")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, path)
    except BaseException:
        _discard(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path (an empty file in ``path``'s folder) for writers that want a file name;
    it replaces ``path`` when the block exits cleanly, and is removed on an exception.

    The temp name ends in ``.tmp``, not in ``path``'s suffix: pass writers that infer the format
    from the name the format explicitly (``savefig(tmp, format="png")``).
    """
    path = Path(path)
    tmp, fd, mode = _create_temp(path)
    os.close(fd)
    try:
        yield tmp
        # The writer may have replaced the file rather than written into it: give the result
        # the umask permissions all the same.
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            os.chmod(tmp, mode)
        _fsync_file(tmp)
        _commit(tmp, path)
    except BaseException:
        _discard(tmp)
        raise


def publish(finished: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Rename a finished file over ``path`` durably (fsync it, ``os.replace``, fsync the folder).

    For files that must keep a stable name while they grow, such as a resumable download's
    ``NAME.partial``; everything else uses the helpers above, which choose the temp name.
    """
    _fsync_file(Path(finished))
    _commit(Path(finished), Path(path))
    return Path(path)


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder, so a rename in it survives a power cut (a no-op where folders cannot be
    opened or synced, e.g. on Windows or some network file systems)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_files(path: str | os.PathLike) -> list[Path]:
    """The temp files of writes to ``path`` that are in flight or were cut short."""
    path = Path(path)
    pattern = _temp_pattern(path.name)
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    return sorted(path.parent / n for n in names if pattern.match(n))


def _temp_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.(\d+)-[0-9a-f]{{8}}{re.escape(_TMP_SUFFIX)}$")


def _create_temp(path: Path) -> tuple[Path, int, int]:
    """A new empty temp file beside ``path``: (its path, an fd open for writing, its mode).

    Created with mode 0o666 like ``open()``, so the kernel applies the umask; O_EXCL with a random
    name, so two writers never share a temp file.
    """
    _remove_stale_temps(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{_TMP_SUFFIX}")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        return tmp, fd, stat.S_IMODE(os.fstat(fd).st_mode)


def _remove_stale_temps(path: Path) -> None:
    """Remove the temp files of earlier writes to ``path`` whose writer is no longer running
    (killed mid-write): they are invisible to readers but would hold the disk space forever."""
    pattern = _temp_pattern(path.name)
    for tmp in temp_files(path):
        pid = int(pattern.match(tmp.name).group(1))
        if pid != os.getpid() and not _pid_alive(pid):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or we cannot tell: keep its file
    return True


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _discard(tmp: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()


# ----------------------------------------------------------------------------------------------
# The shared data sets


def shared_data_dir() -> Path:
    """The shared data sets: ``$S4L_SHARED_DATA``, else ``../shared/data`` beside the checkout."""
    env = os.environ.get("S4L_SHARED_DATA")
    return Path(env) if env else CHECKOUT.parent / "shared" / "data"


def data_cache_dir() -> Path:
    """Where shared archives are unpacked: ``$S4L_TEST_CACHE``, else ``~/.cache/s4l-test-data``."""
    env = os.environ.get("S4L_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "s4l-test-data"


def shared_dataset(archive: str, top: str) -> Path:
    """The shared data set ``archive`` (e.g. "imagenette-224.tar.gz", top folder
    "imagenette-224"), unpacked once into :func:`data_cache_dir`; FileNotFoundError when the
    archive is absent (no ../shared/data beside the checkout)."""
    src = shared_data_dir() / archive
    if not src.exists():
        raise FileNotFoundError(f"{src} is absent (../shared/data not beside the checkout; "
                                "set S4L_SHARED_DATA)")
    return unpack_once(src, top, data_cache_dir())


def unpack_once(archive: str | os.PathLike, top: str, cache: str | os.PathLike) -> Path:
    """Unpack ``archive`` (whose single top folder is ``top``) into ``cache`` once; return cache/top.

    Used for the real datasets in ../shared/data, which are read-only: a marker file says the
    unpacking finished, and a half-unpacked folder from a killed run is replaced, never used.
    """
    cache = Path(cache)
    dest, done = cache / top, cache / f".{top}.done"
    if done.exists() and dest.exists():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{top}.partial-{os.getpid()}"
    with tarfile.open(archive) as tf:
        tf.extractall(tmp, filter="data")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp / top, dest)
    tmp.rmdir()
    fsync_dir(cache)
    done.touch()
    return dest
