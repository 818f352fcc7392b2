"""Checking an ONNX file as untrusted data before onnxruntime opens it (torch- and onnx-free).

An ONNX model can point initializers at external data files by relative path, and name
operator domains whose kernels come from custom-op libraries. Before a session is created we
walk the protobuf wire format ourselves (the server does not ship the `onnx` package) and refuse
external-data locations that leave the model's folder and operator domains onnxruntime does not
build in. Newer onnxruntime releases check paths too; this does not depend on that.
"""

from __future__ import annotations

import os
from pathlib import Path

from s4l.errors import UserError

# Domains whose operators onnxruntime implements itself; anything else needs a custom-op library.
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview", "ai.onnx.preview.training",
                           "ai.onnx.training", "com.microsoft", "com.microsoft.nchwc",
                           "com.microsoft.experimental"})

# Field numbers from onnx.proto3.
# Only the domains nodes use matter: exporters and quantizers import unused ones.
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INIT, _GRAPH_SPARSE_INIT = 1, 5, 15
_NODE_DOMAIN, _NODE_ATTR = 7, 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE = 5, 6, 10, 11, 22
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL = 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_FUNC_NODE, _FUNC_DOMAIN = 7, 10


class OnnxCheckError(UserError):
    """The file is not an ONNX model we are willing to open."""


def _varint(b: memoryview, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(b) or shift > 63:
            raise OnnxCheckError("truncated or malformed protobuf")
        c = b[i]
        i += 1
        result |= (c & 0x7F) << shift
        if not c & 0x80:
            return result, i
        shift += 7


def _fields(b: memoryview):
    """(field number, wire type, value) for each field; value is a memoryview for wire type 2."""
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(b, i)
        elif wt == 1:
            v, i = None, i + 8
        elif wt == 5:
            v, i = None, i + 4
        elif wt == 2:
            n, i = _varint(b, i)
            if i + n > len(b):
                raise OnnxCheckError("truncated or malformed protobuf")
            v, i = b[i:i + n], i + n
        else:
            raise OnnxCheckError(f"unsupported protobuf wire type {wt}")
        yield num, wt, v


def _text(v) -> str:
    return bytes(v).decode("utf-8", "replace")


class _Walk:
    def __init__(self, folder: Path):
        self.folder = folder.resolve()
        self.domains: set[str] = set()
        self.local_domains: set[str] = set()  # model-local functions: their code is ONNX nodes
        self.locations: list[str] = []

    def tensor(self, b):
        for num, wt, v in _fields(b):
            if num == _TENSOR_EXTERNAL and wt == 2:
                key = val = None
                for n, w, x in _fields(v):
                    if n == _ENTRY_KEY and w == 2:
                        key = _text(x)
                    elif n == _ENTRY_VALUE and w == 2:
                        val = _text(x)
                if key == "location" and val is not None:
                    self.locations.append(val)

    def sparse(self, b):
        for num, wt, v in _fields(b):
            if num in (_SPARSE_VALUES, _SPARSE_INDICES) and wt == 2:
                self.tensor(v)

    def node(self, b, domain_field=_NODE_DOMAIN):
        for num, wt, v in _fields(b):
            if num == domain_field and wt == 2:
                self.domains.add(_text(v))
            elif num == _NODE_ATTR and wt == 2:
                for an, aw, av in _fields(v):
                    if aw != 2:
                        continue
                    if an in (_ATTR_T, _ATTR_TENSORS):
                        self.tensor(av)
                    elif an in (_ATTR_G, _ATTR_GRAPHS):
                        self.graph(av)
                    elif an == _ATTR_SPARSE:
                        self.sparse(av)

    def graph(self, b):
        for num, wt, v in _fields(b):
            if wt != 2:
                continue
            if num == _GRAPH_NODE:
                self.node(v)
            elif num == _GRAPH_INIT:
                self.tensor(v)
            elif num == _GRAPH_SPARSE_INIT:
                self.sparse(v)

    def model(self, b):
        for num, wt, v in _fields(b):
            if wt != 2:
                continue
            if num == _MODEL_GRAPH:
                self.graph(v)
            elif num == _MODEL_FUNCTIONS:
                for n, w, x in _fields(v):
                    if n == _FUNC_NODE and w == 2:
                        self.node(x)
                    elif n == _FUNC_DOMAIN and w == 2:
                        self.local_domains.add(_text(x))


def check_onnx_file(path: str | os.PathLike) -> None:
    """Refuse an ONNX file whose external data leaves its folder or that needs unknown op domains.

    Raises OnnxCheckError (a UserError) with one line naming the file and the problem.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise OnnxCheckError(f"cannot read ONNX model {path}: {e}") from None
    w = _Walk(path.parent)
    try:
        w.model(memoryview(data))
    except OnnxCheckError as e:
        raise OnnxCheckError(f"cannot load {path}: not a valid ONNX model ({e})") from None
    unknown = sorted(w.domains - KNOWN_DOMAINS - w.local_domains)
    if unknown:
        raise OnnxCheckError(f"{path} uses operator domain(s) {unknown} that onnxruntime does not "
                             f"implement (known: {sorted(KNOWN_DOMAINS - {''})}); "
                             "refusing a model that needs custom-op code")
    for loc in w.locations:
        target = (w.folder / loc).resolve()
        if os.path.isabs(loc) or "\x00" in loc or not target.is_relative_to(w.folder):
            raise OnnxCheckError(f"{path}: an initializer's external data location {loc!r} is "
                                 "outside the model's folder; refusing to read it")
