"""Helpers of the TF-Hub import tests: the committed TF-written fixtures, a TF tensor-bundle WRITER
(so damaged and hostile modules can be built at test time, in TensorFlow's own format, without
TensorFlow), hand-encoded SavedModel graphs (hostile nodes spliced into a fixture's real graph),
and a Cloud-Storage-like HTTP server on loopback (listing + ranged downloads).

The writer follows the same format as s4l.training.tfhub.bundle reads (LevelDB table, hand-encoded
BundleHeaderProto / BundleEntryProto); the reader is proven against TensorFlow's own files by the
fixtures, and the writer against the reader by a round trip (tests/test_tfhub.py).
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
import sys
import tarfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from s4l.training.tfhub import crc32c

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tfhub"
FAMILIES = ("supervised", "rotation", "exemplar", "rotation_vat")
DTYPE_ENUM = {np.dtype("<f4"): 1, np.dtype("<f8"): 2, np.dtype("<i4"): 3, np.dtype("<i8"): 9}


def unpack_fixture(family: str, dest: Path) -> Path:
    """The committed module of `family` (TF-written) unpacked under dest; its folder."""
    with tarfile.open(FIXTURES / f"{family}.tgz") as tar:
        tar.extractall(dest, filter="data")
    return dest / family


def tf_outputs(family: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{family}.outputs.npz") as z:
        return {k: z[k] for k in z.files}


def fixture_images() -> np.ndarray:
    with np.load(FIXTURES / "inputs.npz") as z:
        return z["images"]


# ----------------------------------------------------------------------------- protobuf / table


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field_varint(num: int, v: int) -> bytes:
    return varint(num << 3) + varint(v)


def field_bytes(num: int, b: bytes) -> bytes:
    return varint(num << 3 | 2) + varint(len(b)) + b


def field_fixed32(num: int, v: int) -> bytes:
    return varint(num << 3 | 5) + struct.pack("<I", v)


def shape_proto(shape) -> bytes:
    return b"".join(field_bytes(2, field_varint(1, int(d))) for d in shape)


def entry_proto(dtype: int, shape, shard: int, offset: int, size: int, crc: int | None,
                sliced: bool = False) -> bytes:
    out = field_varint(1, dtype) + field_bytes(2, shape_proto(shape))
    if shard:
        out += field_varint(3, shard)
    if offset:
        out += field_varint(4, offset)
    out += field_varint(5, size)
    if crc is not None:
        out += field_fixed32(6, crc)
    if sliced:
        out += field_bytes(7, field_bytes(1, field_varint(1, 0)))
    return out


def _block(entries: list[tuple[bytes, bytes]], restart_every: int = 16) -> bytes:
    out, restarts, last = bytearray(), [], b""
    for i, (k, v) in enumerate(entries):
        if i % restart_every == 0:
            restarts.append(len(out))
            shared = 0
        else:
            shared = 0
            while shared < min(len(k), len(last)) and k[shared] == last[shared]:
                shared += 1
        out += varint(shared) + varint(len(k) - shared) + varint(len(v)) + k[shared:] + v
        last = k
    for r in restarts or [0]:
        out += struct.pack("<I", r)
    out += struct.pack("<I", len(restarts) or 1)
    return bytes(out)


def write_table(path: Path, items: list[tuple[bytes, bytes]], *, block_entries: int = 32,
                compression: int = 0) -> None:
    """A LevelDB-format table of sorted items (TF's index writer's layout, uncompressed)."""
    data = bytearray()

    def put(block: bytes) -> bytes:
        off = len(data)
        trailer = bytes([compression])
        data.extend(block + trailer + struct.pack("<I", crc32c.mask(crc32c.value(block + trailer))))
        return varint(off) + varint(len(block))

    index = []
    for i in range(0, len(items), block_entries):
        chunk = items[i:i + block_entries]
        index.append((chunk[-1][0], put(_block(chunk))))
    meta = put(_block([]))
    idx = put(_block(index, restart_every=1))
    footer = meta + idx
    footer += b"\0" * (40 - len(footer)) + struct.pack("<Q", 0xDB4775248B80FB57)
    data.extend(footer)
    path.write_bytes(bytes(data))


def write_bundle(prefix: Path, tensors: dict[str, np.ndarray], *, num_shards: int = 1,
                 overrides: dict[str, dict] | None = None, compression: int = 0) -> None:
    """`{prefix}.index` + `.data-*` for `tensors`; `overrides[name]` changes one entry's fields
    (dtype, shape, offset, size, crc, sliced) after the data is laid out."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    shards = [bytearray() for _ in range(num_shards)]
    items = [(b"", field_varint(1, num_shards) + field_bytes(3, field_varint(1, 1)))]
    for i, name in enumerate(sorted(tensors)):
        a = np.ascontiguousarray(tensors[name])
        raw = a.tobytes()
        shard = i % num_shards
        fields = {"dtype": DTYPE_ENUM[a.dtype.newbyteorder("<")], "shape": a.shape,
                  "shard": shard, "offset": len(shards[shard]), "size": len(raw),
                  "crc": crc32c.mask(crc32c.value(raw)), "sliced": False}
        fields.update((overrides or {}).get(name, {}))
        shards[shard] += raw
        items.append((name.encode(), entry_proto(**fields)))
    write_table(Path(f"{prefix}.index"), items, compression=compression)
    for i, blob in enumerate(shards):
        Path(f"{prefix}.data-{i:05d}-of-{num_shards:05d}").write_bytes(bytes(blob))


def read_all(module: Path) -> dict[str, np.ndarray]:
    from s4l.training.tfhub.bundle import TensorBundle

    b = TensorBundle(module / "variables" / "variables")
    return {n: b.read(n) for n in b.names()}


def rewrite_module(src: Path, dest: Path, tensors: dict[str, np.ndarray], **kw) -> Path:
    """A copy of module `src` at `dest` (graph files kept) whose variables are `tensors`."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("variables"))
    write_bundle(dest / "variables" / "variables", tensors, **kw)
    return dest


# ----------------------------------------------------------------------------- graphs (SavedModel)
# Hand-encoded messages of tensorflow/core/{protobuf/saved_model,protobuf/meta_graph,framework/
# graph,node_def,function,attr_value}.proto, to build hostile graphs without TensorFlow.


def attr(key: str, value: bytes) -> bytes:
    """One entry of NodeDef.attr (map<string, AttrValue>): 1 key, 2 value."""
    return field_bytes(5, field_bytes(1, key.encode()) + field_bytes(2, value))


def attr_s(s: bytes) -> bytes:
    return field_bytes(2, s)  # AttrValue.s


def attr_types(*types: int) -> bytes:
    return field_bytes(1, field_bytes(6, b"".join(varint(t) for t in types)))  # list(type)


def attr_func(name: str) -> bytes:
    return field_bytes(10, field_bytes(1, name.encode()))  # AttrValue.func = NameAttrList


def node_def(name: str, op: str, *inputs: str, attrs: bytes = b"") -> bytes:
    """A NodeDef: 1 name, 2 op, 3 input, 5 attr (already encoded with `attr`)."""
    return (field_bytes(1, name.encode()) + field_bytes(2, op.encode())
            + b"".join(field_bytes(3, i.encode()) for i in inputs) + attrs)


def py_func_node(name: str = "evil", op: str = "PyFunc", token: bytes = b"pyfunc_0") -> bytes:
    """A real PyFunc node as tf.py_func writes it (token, Tin, Tout)."""
    return node_def(name, op, "image", attrs=attr("token", attr_s(token))
                    + attr("Tin", attr_types(1)) + attr("Tout", attr_types(1)))


def function_def(name: str, *nodes: bytes) -> bytes:
    """A FunctionDef: 1 signature (OpDef: 1 name), 3 node_def."""
    return field_bytes(1, field_bytes(1, name.encode())) + b"".join(field_bytes(3, n)
                                                                     for n in nodes)


def saved_model(nodes: list[bytes], functions: list[bytes] = ()) -> bytes:
    """SavedModel{1: version 1, 2: MetaGraphDef{2: GraphDef{1: nodes, 2: library}}}."""
    graph = b"".join(field_bytes(1, n) for n in nodes)
    if functions:
        graph += field_bytes(2, b"".join(field_bytes(1, f) for f in functions))
    return field_varint(1, 1) + field_bytes(2, field_bytes(2, graph))


def splice_graph(pb: bytes, nodes: list[bytes] = (), functions: list[bytes] = ()) -> bytes:
    """A copy of the TF-written SavedModel `pb` whose first meta graph's GraphDef also holds
    `nodes` and, in its library, `functions` (everything else kept byte for byte)."""
    from s4l.training.tfhub.wire import fields

    def raw(field: int, wire: int, v) -> bytes:
        return field_varint(field, v) if wire == 0 else field_bytes(field, bytes(v))

    what = lambda: "fixture graph"  # noqa: E731
    out, done = b"", False
    for f, w, v in fields(pb, what):
        if f == 2 and not done:
            meta = b""
            for f2, w2, v2 in fields(v, what):
                if f2 == 2:
                    v2 = bytes(v2) + b"".join(field_bytes(1, n) for n in nodes)
                    if functions:
                        v2 += field_bytes(2, b"".join(field_bytes(1, fn) for fn in functions))
                meta += raw(f2, w2, v2)
            out += field_bytes(2, meta)
            done = True
        else:
            out += raw(f, w, v)
    return out


# ----------------------------------------------------------------------------- a GCS-like server


class FakeGCS:
    """Cloud Storage's JSON listing and ranged object GETs for the files under `root`, on loopback.

    `root/<bucket>/<object name>`. `cut_after` makes the next full-body responses of an object
    stop half way (a dropped connection); `requests` records (path, Range header) of each GET.
    """

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[tuple[str, str | None]] = []
        self.cut_next: dict[str, int] = {}  # object name -> how many responses to cut
        self.crc_override: dict[str, int] = {}
        gcs = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                parts = urllib.parse.urlsplit(self.path)
                gcs.requests.append((parts.path, self.headers.get("Range")))
                if parts.path.startswith("/storage/v1/b/"):
                    return self._list(parts)
                bucket, _, name = parts.path.lstrip("/").partition("/")
                f = gcs.root / bucket / urllib.parse.unquote(name)
                if not f.is_file():
                    self.send_error(404)
                    return
                data = f.read_bytes()
                start, status = 0, 200
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.end_headers()
                        return
                    status = 206
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                key = urllib.parse.unquote(name)
                if gcs.cut_next.get(key, 0) > 0:
                    gcs.cut_next[key] -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

            def _list(self, parts):
                bucket = parts.path.split("/")[4]
                prefix = urllib.parse.parse_qs(parts.query)["prefix"][0]
                base = gcs.root / bucket
                items = []
                for f in sorted(base.rglob("*")):
                    name = str(f.relative_to(base))
                    if f.is_file() and name.startswith(prefix):
                        crc = gcs.crc_override.get(name, crc32c.value(f.read_bytes()))
                        items.append({"name": name, "size": str(f.stat().st_size),
                                      "crc32c": base64.b64encode(struct.pack(">I", crc)).decode()})
                body = json.dumps({"items": items}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                # a client that refuses a body after its headers (a size over a limit) hangs up
                if not isinstance(sys.exc_info()[1], ConnectionError):
                    super().handle_error(request, client_address)

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeGCS:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def data_gets(self) -> list[tuple[str, str | None]]:
        return [r for r in self.requests if not r[0].startswith("/storage/")]
