"""Where a TF-Hub module comes from: a directory, a .tar/.tar.gz/.tgz of one, or the public bucket.

`open_module(src)` yields a `ModuleFiles` whose `variables` prefix can be handed to
`TensorBundle`. Only the weights are converted; the graph (`saved_model.pb`, required) and
`tfhub_module.pb` (when present) are checked as data first and the module is refused unless they
parse and the graph uses no code-running op (s4l.training.tfhub.graph). They are never run or
unpickled; from an archive they are read into memory, never unpacked; a download fetches them
(verified like the weights) before the weights, so a refused graph costs no weight download.

Downloads (`https://...`, or `gs://bucket/path`, fetched from https://storage.googleapis.com):
- a bucket module is listed with the Cloud Storage JSON API, which gives each object's size and
  CRC-32C; each file is fetched over HTTPS into a cache (`$S4L_CACHE_DIR` or
  `~/.cache/s4l/tfhub/<host>/<path>`), through a `.partial` file that a later run resumes with
  an HTTP `Range` request; a file is moved into place only once its size and CRC-32C match;
- a plain https URL of a module directory: `saved_model.pb` and `tfhub_module.pb` (a 404 for
  the latter means none), then `variables/variables.index`, then the data shards it names;
  sizes are checked against `Content-Length` (and the graph's cap), the weights by the bundle's
  own checksums (every index block and every tensor carries one), the graph by its check;
- plain `http://` is refused except on loopback (tests run a real server there).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import http.client
import io
import json
import logging
import os
import re
import struct
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from s4l.errors import UserError
from s4l.io import publish
from s4l.training.tfhub import crc32c
from s4l.training.tfhub import graph as graph_check
from s4l.training.tfhub.graph import (
    GRAPH_FILE,
    MAX_GRAPH_BYTES,
    MAX_MODULE_DEF_BYTES,
    MODULE_DEF_FILE,
    GraphSummary,
    human_size,
)

log = logging.getLogger(__name__)

GCS = "https://storage.googleapis.com"
VARS = "variables/variables"
INDEX = f"{VARS}.index"
MAX_ARCHIVE_MEMBER = 16 << 30  # the 4x-wide MOAM module is ~1.5 GB
TIMEOUT_S = 60
RETRIES = 5
_SHARD = re.compile(r"^variables/variables\.data-(\d{5})-of-(\d{5})$")
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


@dataclasses.dataclass
class ModuleFiles:
    source: str  # as the user gave it
    root: Path  # a local folder holding variables/variables.{index,data-*}
    kind: str  # "directory", "archive", "download"
    url: str | None = None
    graph: GraphSummary | None = None  # what the check of saved_model.pb saw
    graph_sha256: str | None = None

    @property
    def variables(self) -> Path:
        return self.root / VARS

    def variable_files(self) -> list[Path]:
        """The bundle's files (index + data shards), nothing else that lies beside them."""
        return sorted(p for p in self.root.glob("variables/variables.*")
                      if f"variables/{p.name}" == INDEX or _SHARD.match(f"variables/{p.name}"))


def cache_dir() -> Path:
    if os.environ.get("S4L_CACHE_DIR"):
        return Path(os.environ["S4L_CACHE_DIR"]) / "tfhub"
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "s4l" / "tfhub"


@contextlib.contextmanager
def open_module(src: str | os.PathLike, cache: Path | None = None,
                progress: bool = True) -> Iterator[ModuleFiles]:
    """The module at `src`, its graph checked (`check_graph`) before any weights are taken."""
    s = str(src)
    if s.startswith(("gs://", "https://", "http://")):
        yield download(s, cache or cache_dir(), progress=progress)
        return
    p = Path(s)
    if p.is_dir():
        if not (p / INDEX).is_file():
            raise UserError(f"{p} is not a TF-Hub module directory: no {INDEX} in it (a module "
                            "holds saved_model.pb, tfhub_module.pb and variables/)")
        module = ModuleFiles(s, p, "directory")
        _check_folder(module, f"TF-Hub module directory {p}")
        yield module
        return
    if p.is_file():
        with tempfile.TemporaryDirectory(prefix=".s4l-tfhub-") as tmp:
            module = ModuleFiles(s, Path(tmp), "archive")
            _unpack(p, module)
            yield module
        return
    raise UserError(f"{s} does not exist (expected a module directory, a .tar/.tgz of one, or "
                    "an https:// or gs:// location)")


# ----------------------------------------------------------------------------- the graph


def check_graph(module: ModuleFiles, graph: bytes, graph_where: str, module_def: bytes | None,
                module_def_where: str) -> None:
    """Refuse the module unless saved_model.pb parses as a SavedModel free of code-running ops
    and tfhub_module.pb, when there is one, as a ModuleDef (see s4l.training.tfhub.graph)."""
    module.graph = graph_check.check_saved_model(graph, graph_where)
    module.graph_sha256 = hashlib.sha256(graph).hexdigest()
    if module_def is not None:
        graph_check.check_module_def(module_def, module_def_where)


def _check_folder(module: ModuleFiles, what: str) -> None:
    """check_graph on the files of a folder (a module directory or a download's cache)."""
    graph = graph_check.read_capped(module.root / GRAPH_FILE, MAX_GRAPH_BYTES, what)
    mdef_path = module.root / MODULE_DEF_FILE
    mdef = (graph_check.read_capped(mdef_path, MAX_MODULE_DEF_BYTES, what)
            if mdef_path.exists() or mdef_path.is_symlink() else None)
    check_graph(module, graph, str(module.root / GRAPH_FILE), mdef, str(mdef_path))


# ----------------------------------------------------------------------------- archives


# What reading a damaged or truncated archive raises, from tar's headers, gzip/bz2/xz or zlib.
_DAMAGED = (tarfile.TarError, OSError, EOFError, zlib.error)


def _check_member(archive: Path, m: tarfile.TarInfo, cap: int) -> None:
    """Refuse a member that is not a regular file or declares more than `cap` bytes, before
    anything of it is read."""
    if not m.isfile():
        raise UserError(f"archive {archive}: {m.name} is not a regular file (a link or device); "
                        "refusing it")
    if m.size > cap:
        raise UserError(f"archive {archive}: {m.name} declares {m.size} bytes, over the "
                        f"{human_size(cap)} limit; refusing it")


def _copy_member(tar: tarfile.TarFile, archive: Path, m: tarfile.TarInfo, out: IO[bytes]) -> None:
    """Copy a checked member's bytes to `out` in 1 MiB pieces, at most its declared size; a
    damaged or short archive is one clear error (an error writing `out` is not blamed on it)."""
    left = m.size
    try:
        f = tar.extractfile(m)
    except _DAMAGED as e:
        raise UserError(f"archive {archive} is damaged or truncated at {m.name} ({e})") from None
    with f:
        while left:
            try:
                chunk = f.read(min(left, 1 << 20))
            except _DAMAGED as e:
                raise UserError(f"archive {archive} is damaged or truncated at {m.name} "
                                f"({e})") from None
            if not chunk:
                raise UserError(f"archive {archive} is truncated: {m.name} is cut short")
            out.write(chunk)
            left -= len(chunk)


def _read_member(tar: tarfile.TarFile, archive: Path, members: list[tarfile.TarInfo],
                 cap: int) -> bytes | None:
    """The bytes of the one regular-file member in `members` (None when there is none), read
    into memory, never onto disk; its declared size checked against `cap` before reading."""
    if not members:
        return None
    if len(members) > 1:
        raise UserError(f"archive {archive} holds {len(members)} copies of {members[0].name}; "
                        "refusing an ambiguous module")
    _check_member(archive, members[0], cap)
    buf = io.BytesIO()
    _copy_member(tar, archive, members[0], buf)
    return buf.getvalue()


def _check_end(tar: tarfile.TarFile, archive: Path, members: list[tarfile.TarInfo]) -> None:
    """tarfile ends its member list without a word at the first unreadable header after the
    first one, so a damaged archive would read as a whole one with members missing (and be
    refused as "0 modules"). A whole archive has its end marker, a zero block, or nothing where
    the list stopped."""
    try:
        tar.fileobj.seek(tar.offset)  # a gzip stream rewinds: one more decompression pass
        block = tar.fileobj.read(tarfile.BLOCKSIZE)
    except _DAMAGED as e:
        raise UserError(f"archive {archive} is damaged or truncated ({e})") from None
    if block.strip(b"\0"):
        after = f"after {members[-1].name}" if members else "at its start"
        raise UserError(f"archive {archive} is damaged: an unreadable entry {after} (byte "
                        f"{tar.offset:,} of its tar stream); download it again")


def _unpack(archive: Path, module: ModuleFiles) -> None:
    """Extract only variables/variables.* of a module archive (one top folder or none) into
    module.root, after reading saved_model.pb and tfhub_module.pb into memory (never onto disk)
    and checking them: a refused graph leaves nothing extracted."""
    dest = module.root
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"{archive} is neither a module directory nor a readable tar archive "
                        f"({e})") from None
    with tar:
        try:
            members = tar.getmembers()
        except _DAMAGED as e:
            raise UserError(f"archive {archive} is damaged or truncated ({e})") from None
        _check_end(tar, archive, members)
        roots = [m.name[: -len(INDEX)] for m in members
                 if m.name == INDEX or m.name.endswith("/" + INDEX)]
        if len(roots) != 1:
            raise UserError(f"archive {archive} holds {len(roots)} TF-Hub modules (files ending "
                            f"in {INDEX}); expected exactly one")
        prefix = roots[0]
        graph = _read_member(tar, archive, [m for m in members if m.name == prefix + GRAPH_FILE],
                             MAX_GRAPH_BYTES)
        if graph is None:
            raise UserError(f"archive {archive}: no {prefix}{GRAPH_FILE} beside its variables "
                            "(every TF-Hub module holds its graph; a module without one cannot "
                            "be checked)")
        module_def = _read_member(tar, archive,
                                  [m for m in members if m.name == prefix + MODULE_DEF_FILE],
                                  MAX_MODULE_DEF_BYTES)
        check_graph(module, graph, f"{archive}:{prefix}{GRAPH_FILE}", module_def,
                    f"{archive}:{prefix}{MODULE_DEF_FILE}")
        wanted = []
        for m in members:
            rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
            if rel is None or not (rel == INDEX or _SHARD.match(rel)):
                continue  # the graph is read as bytes above; assets are never unpacked
            _check_member(archive, m, MAX_ARCHIVE_MEMBER)
            wanted.append((m, rel))
        (dest / "variables").mkdir(parents=True)
        for m, rel in wanted:
            with open(dest / rel, "wb") as out:
                _copy_member(tar, archive, m, out)


# ----------------------------------------------------------------------------- downloads


def _check_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and parts.hostname in LOOPBACK:
        return
    raise UserError(f"{url}: only https:// (or http:// on loopback) downloads are allowed")


def _gcs_endpoint() -> str:
    # Tests point this at a Cloud-Storage-like server on loopback; users never need to.
    return os.environ.get("S4L_GCS_ENDPOINT", GCS).rstrip("/")


def _split_gcs(url: str) -> tuple[str, str] | None:
    """(bucket, object prefix) for gs://b/p and https://storage.googleapis.com/b/p URLs."""
    if url.startswith("gs://"):
        rest = url[5:]
    else:
        base = _gcs_endpoint() + "/"
        if not url.startswith(base) or "/storage/v1/" in url:
            return None
        rest = url[len(base):]
    bucket, _, path = rest.partition("/")
    if not bucket or not path.strip("/"):
        raise UserError(f"{url}: expected gs://BUCKET/MODULE (e.g. gs://s4l-models/supervised_10p)")
    return bucket, path.strip("/")


def _cache_folder(cache: Path, *parts: str) -> Path:
    """cache/parts..., refusing a location whose path would step out of the cache ('..')."""
    segs = [seg for part in parts for seg in part.split("/") if seg]
    if not segs or any(seg in (".", "..") or "\\" in seg or "\0" in seg for seg in segs):
        raise UserError(f"{'/'.join(parts)}: not a plain module location (no '.', '..' or "
                        "backslashes in its path)")
    return cache.joinpath(*segs)


def download(url: str, cache: Path, progress: bool = True) -> ModuleFiles:
    if url.endswith((".tar", ".tgz", ".tar.gz")):
        raise UserError(f"{url}: download the archive and pass the file; remote archives are "
                        "not fetched (a bucket module is a folder: pass its gs:// path)")
    gcs = _split_gcs(url)
    if gcs is not None:
        bucket, prefix = gcs
        root = _cache_folder(cache, "gs", bucket, prefix)
        objects = _gcs_list(bucket, prefix)
        if INDEX not in objects:
            raise UserError(f"gs://{bucket}/{prefix} holds no {INDEX}; not a TF-Hub module "
                            f"(listed {len(objects)} objects)")
        if GRAPH_FILE not in objects:
            raise UserError(f"gs://{bucket}/{prefix} holds no {GRAPH_FILE} (every TF-Hub module "
                            "holds its graph; a module without one cannot be checked)")
        module = ModuleFiles(url, root, "download", url=f"gs://{bucket}/{prefix}")
        # the graph first: a refused module costs no weight download
        for rel, cap in ((GRAPH_FILE, MAX_GRAPH_BYTES), (MODULE_DEF_FILE, MAX_MODULE_DEF_BYTES)):
            if rel in objects:
                size, crc = objects[rel]
                if size > cap:
                    raise UserError(f"gs://{bucket}/{prefix}/{rel} is {size} bytes, over the "
                                    f"{human_size(cap)} limit; refusing the module")
                _fetch(f"{_gcs_endpoint()}/{bucket}/{urllib.parse.quote(prefix + '/' + rel)}",
                       root / rel, size, crc, progress, max_size=cap)
        _check_folder(module, f"gs://{bucket}/{prefix}")
        for rel, (size, crc) in sorted(objects.items()):
            if rel == INDEX or _SHARD.match(rel):
                _fetch(f"{_gcs_endpoint()}/{bucket}/{urllib.parse.quote(prefix + '/' + rel)}",
                       root / rel, size, crc, progress)
        return module
    _check_url(url)
    parts = urllib.parse.urlsplit(url.rstrip("/"))
    root = _cache_folder(cache, parts.netloc.replace(":", "_"), parts.path)
    base = url.rstrip("/")
    module = ModuleFiles(url, root, "download", url=base)
    _fetch(f"{base}/{GRAPH_FILE}", root / GRAPH_FILE, None, None, progress,
           max_size=MAX_GRAPH_BYTES)
    if not _fetch(f"{base}/{MODULE_DEF_FILE}", root / MODULE_DEF_FILE, None, None, progress,
                  max_size=MAX_MODULE_DEF_BYTES, optional=True):
        (root / MODULE_DEF_FILE).unlink(missing_ok=True)
    _check_folder(module, base)
    _fetch(f"{base}/{INDEX}", root / INDEX, None, None, progress)
    from s4l.training.tfhub.bundle import TensorBundle

    n = _num_shards(root / INDEX)
    for i in range(n):
        rel = f"{VARS}.data-{i:05d}-of-{n:05d}"
        _fetch(f"{base}/{rel}", root / rel, None, None, progress)
    TensorBundle(root / VARS)  # parses and checks the index against the shards now
    return module


def _num_shards(index: Path) -> int:
    from s4l.training.tfhub.bundle import _Table
    from s4l.training.tfhub.wire import fields as _fields

    for key, value in _Table(index.read_bytes(), index).items():
        if key == b"":
            for field, wire, v in _fields(value, lambda: f"TF bundle index {index} (header)"):
                if field == 1 and wire == 0:
                    if not 1 <= int(v) <= 10_000:  # type: ignore[arg-type]
                        raise UserError(f"TF bundle index {index}: {v} shards declared")
                    return int(v)  # type: ignore[arg-type]
            return 1
    raise UserError(f"TF bundle index {index}: no bundle header; not a TF tensor bundle")


class _Missing(Exception):
    """An optional file the server does not have (HTTP 404)."""


def _open(url: str, headers: dict[str, str] | None = None, optional: bool = False):
    _check_url(url)
    req = urllib.request.Request(url, headers={"User-Agent": "s4l-import-tfhub",
                                               **(headers or {})})
    try:
        return urllib.request.urlopen(req, timeout=TIMEOUT_S)  # noqa: S310 - scheme checked
    except urllib.error.HTTPError as e:
        if e.code == 416:
            return e
        if e.code == 404 and optional:
            raise _Missing(url) from None
        raise UserError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise ConnectionError(f"{url}: {getattr(e, 'reason', e)!r}") from e


def _gcs_list(bucket: str, prefix: str) -> dict[str, tuple[int, int | None]]:
    """rel path -> (size, crc32c) of every object under prefix/, via the JSON API (paged)."""
    out: dict[str, tuple[int, int | None]] = {}
    token = None
    while True:
        q = {"prefix": prefix + "/", "fields": "items(name,size,crc32c),nextPageToken"}
        if token:
            q["pageToken"] = token
        url = (f"{_gcs_endpoint()}/storage/v1/b/{urllib.parse.quote(bucket)}/o?"
               + urllib.parse.urlencode(q))
        try:
            with _open(url) as r:
                doc = json.loads(r.read(8 << 20))
        except (ConnectionError, ValueError) as e:
            raise UserError(f"cannot list gs://{bucket}/{prefix}: {e}") from None
        for item in doc.get("items", []):
            rel = item["name"][len(prefix) + 1:]
            crc = item.get("crc32c")
            out[rel] = (int(item["size"]),
                        struct.unpack(">I", base64.b64decode(crc))[0] if crc else None)
        token = doc.get("nextPageToken")
        if not token:
            return out


def _file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = crc32c.extend(crc, chunk)
    return crc


def _verified(path: Path, size: int | None, crc: int | None) -> bool:
    if not path.is_file() or (size is not None and path.stat().st_size != size):
        return False
    return crc is None or _file_crc(path) == crc


def _fetch(url: str, dest: Path, size: int | None, crc: int | None, progress: bool, *,
           max_size: int | None = None, optional: bool = False) -> bool:
    """dest <- url, resumable through dest.partial; a no-op when a verified copy is cached.
    More than `max_size` bytes are refused, before or while downloading. With `optional`, a
    404 returns False (nothing fetched); else True."""
    if _verified(dest, size, crc) and (size is not None or dest.stat().st_size > 0):
        log.info("cached: %s", dest)
        return True
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".partial")
    last_error = None
    for attempt in range(RETRIES):
        if attempt:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))  # a short back-off before resuming
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have > size:
            part.unlink()
            have = 0
        try:
            total = _fetch_once(url, part, have, size, progress, max_size, optional)
        except _Missing:
            part.unlink(missing_ok=True)
            return False
        except ConnectionError as e:
            last_error = e
            log.warning("download interrupted (%s); resuming", e)
            continue
        got = part.stat().st_size
        if total is not None and got < total:
            last_error = ConnectionError(f"{url}: connection closed at {got} of {total} bytes")
            log.warning("%s; resuming", last_error)
            continue
        if size is not None and got != size:
            part.unlink()
            raise UserError(f"{url}: downloaded {got} bytes, the listing says {size}; removed")
        if crc is not None and _file_crc(part) != crc:
            part.unlink()
            raise UserError(f"{url}: CRC-32C of the download differs from the bucket's; removed "
                            "(corrupt transfer)")
        publish(part, dest)  # fsync'ed rename: a cached file is always a whole, verified one
        return True
    raise UserError(f"{url}: download failed after {RETRIES} attempts ({last_error}); run the "
                    f"command again to resume from {part.stat().st_size if part.exists() else 0} "
                    "bytes")


def _fetch_once(url: str, part: Path, have: int, size: int | None, progress: bool,
                max_size: int | None = None, optional: bool = False) -> int | None:
    headers = {"Range": f"bytes={have}-"} if have else {}
    r = _open(url, headers, optional)
    with r:
        status = getattr(r, "status", None) or r.getcode()
        if status == 416:  # nothing left to fetch
            return have
        if status == 206:
            m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", r.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                raise UserError(f"{url}: the server answered a resume with a bad Content-Range "
                                f"({r.headers.get('Content-Range')!r})")
            total = int(m.group(2)) if m.group(2) != "*" else None
            mode = "ab"
        else:
            length = r.headers.get("Content-Length")
            total = int(length) if length else None
            have, mode = 0, "wb"
        if size is not None and total is not None and total != size:
            raise UserError(f"{url}: the server offers {total} bytes, the listing says {size}")
        if max_size is not None and total is not None and total > max_size:
            raise UserError(f"{url}: the server offers {total} bytes, over the "
                            f"{human_size(max_size)} limit; refusing the module")
        bar = _bar(total, have, part.name[: -len(".partial")], progress)
        try:
            with open(part, mode) as f:
                while True:
                    try:
                        chunk = r.read(1 << 20)
                    except (OSError, ValueError, http.client.HTTPException) as e:
                        raise ConnectionError(f"{url}: {e!r}") from e
                    if not chunk:
                        break
                    f.write(chunk)
                    if max_size is not None and f.tell() > max_size:
                        f.close()
                        part.unlink()
                        raise UserError(f"{url}: more than {human_size(max_size)} sent; refusing "
                                        "the module")
                    bar.update(len(chunk))
        finally:
            bar.close()
    return total


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int | None, initial: int, name: str, progress: bool):
    if not progress:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=f"download {name}", disable=None, leave=False)
