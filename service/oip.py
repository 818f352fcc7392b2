"""The Open Inference Protocol v2 (KServe v2 / Triton) wire format: inference requests in, responses out.

Pure data, no HTTP framework: ``parse_infer_request`` reads a request body (JSON, or JSON followed
by the binary tensor extension's raw bytes, split at ``Inference-Header-Content-Length``) into
numpy tensors; ``encode_infer_response`` writes outputs back, each as JSON ``data`` or as raw
bytes after the JSON header. The router (routes_v2.py) maps tensors to the service's images.

Wire rules implemented here (KServe "Open Inference Protocol" REST, Triton's
binary_tensor_data extension):
- ``inputs[i]``: ``name``, ``datatype``, ``shape`` (non-negative ints), then either ``data`` (a
  flat or nested JSON list, row-major) or ``parameters.binary_data_size`` (that many bytes of
  the binary tail, in input order). BYTES elements in binary are a 4-byte little-endian length
  then the bytes; in JSON (where raw bytes cannot travel) each element is base64 text.
- Outputs: each requested output's ``parameters.binary_data`` decides, else the request's
  ``parameters.binary_data_output``, else JSON. Binary outputs are appended after the JSON
  header in output order, each announced by its ``binary_data_size``.
"""

from __future__ import annotations

import binascii
import math
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import orjson

from s4l.service.inputs import decode_base64

HEADER_LENGTH = "inference-header-content-length"

# Datatypes the service reads or writes; the others of the protocol are refused by name.
NUMPY_DTYPES = {"UINT8": np.dtype(np.uint8), "FP32": np.dtype("<f4")}
KNOWN_DATATYPES = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                   "INT64", "FP16", "FP32", "FP64", "BF16", "BYTES"}
_SHM_KEYS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


class ProtocolError(Exception):
    """A request the protocol (or this server) cannot accept: HTTP ``status`` and a message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model's metadata; -1 marks a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    value: np.ndarray | list[bytes]  # numeric: an array of `shape`; BYTES: the elements, row-major


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    id: str | None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None  # None: every output of the model
    binary_output: bool  # the request-level default (parameters.binary_data_output)
    parameters: dict = field(default_factory=dict)


def parse_infer_request(body: bytes, header_length: str | None, *,
                        max_elements: int) -> InferRequest:
    """Read a v2 inference request. ``header_length``: the Inference-Header-Content-Length
    header (None: the whole body is JSON). ``max_elements`` bounds each tensor's declared size
    before any array is built (a shape of [2**40] must not allocate)."""
    json_part, tail = _split(body, header_length)
    try:
        doc = orjson.loads(json_part)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(400, f"the inference request is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ProtocolError(400, "the inference request must be a JSON object")
    unknown = set(doc) - {"id", "parameters", "inputs", "outputs"}
    if unknown:
        raise ProtocolError(400, f"unknown request fields {sorted(unknown)}")
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise ProtocolError(400, "'id' must be a string")
    params = _parameters(doc.get("parameters"), "request")
    if params.get("sequence_id") not in (None, 0, ""):
        raise ProtocolError(400, "the request names a sequence (sequence_id); these models are "
                                 "stateless: send it without one")
    binary_output = params.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise ProtocolError(400, "parameters.binary_data_output must be true or false")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError(400, "'inputs' must be a non-empty list of tensors")
    inputs, offset = [], 0
    for i, t in enumerate(raw_inputs):
        tensor, used = _input(t, i, tail, offset, max_elements)
        inputs.append(tensor)
        offset += used
    if offset != len(tail):
        raise ProtocolError(400, f"the binary data holds {len(tail)} bytes but the inputs' "
                                 f"binary_data_size add up to {offset}")
    names = [t.name for t in inputs]
    if len(set(names)) != len(names):
        raise ProtocolError(400, f"input names repeat: {names}")
    outputs = None
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list):
            raise ProtocolError(400, "'outputs' must be a list")
        outputs = [_requested_output(o, i, binary_output) for i, o in enumerate(doc["outputs"])]
    return InferRequest(id=rid, inputs=inputs, outputs=outputs, binary_output=binary_output,
                        parameters=params)


def decompress(body: bytes, encoding: str, *, limit: int) -> bytes:
    """A request body sent with ``Content-Encoding`` gzip or deflate (tritonclient's
    ``request_compression_algorithm``), inflated to at most ``limit`` bytes (413 beyond: the
    body limit applies to what the request really holds, not to its compressed size)."""
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ProtocolError(400, f"Content-Encoding {encoding[:20]!r} is not supported (gzip, "
                                 "deflate or none)")
    d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise ProtocolError(400, f"the body is not valid {encoding} data: {e}") from None
    if len(out) > limit:
        raise ProtocolError(413, f"request body exceeds {limit} bytes once decompressed")
    if not d.eof:
        raise ProtocolError(400, f"the {encoding} body is truncated")
    return out


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        n = int(header_length.strip())
    except ValueError:
        raise ProtocolError(400, f"Inference-Header-Content-Length {header_length[:40]!r} is not "
                                 "an integer") from None
    if not 0 < n <= len(body):
        raise ProtocolError(400, f"Inference-Header-Content-Length {n} is outside the body's "
                                 f"{len(body)} bytes")
    return body[:n], body[n:]


def _parameters(p, where: str) -> dict:
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise ProtocolError(400, f"{where} 'parameters' must be a JSON object")
    shm = [k for k in _SHM_KEYS if k in p]
    if shm:
        raise ProtocolError(400, f"{where} uses shared memory ({shm[0]}); this server implements "
                                 "no shared-memory extension: send the data in the request")
    return p


def _shape(t: dict, where: str) -> tuple[int, ...]:
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError(400, f"{where}: 'shape' must be a list of non-negative integers")
    return tuple(shape)


def _input(t, i: int, tail: bytes, offset: int, max_elements: int) -> tuple[InputTensor, int]:
    if not isinstance(t, dict):
        raise ProtocolError(400, f"inputs[{i}] must be a JSON object")
    name, datatype = t.get("name"), t.get("datatype")
    if not isinstance(name, str) or not name:
        raise ProtocolError(400, f"inputs[{i}]: 'name' must be a non-empty string")
    where = f"input {name[:64]!r}"
    if datatype not in KNOWN_DATATYPES:
        raise ProtocolError(400, f"{where}: unknown datatype {str(datatype)[:32]!r}")
    shape = _shape(t, where)
    count = math.prod(shape)
    if count > max_elements:
        raise ProtocolError(413, f"{where}: shape {list(shape)} holds {count:,} elements; at "
                                 f"most {max_elements:,} fit this server's body limit")
    params = _parameters(t.get("parameters"), where)
    size = params.get("binary_data_size")
    if size is not None:
        if type(size) is not int or size < 0:
            raise ProtocolError(400, f"{where}: binary_data_size must be a non-negative integer")
        if "data" in t:
            raise ProtocolError(400, f"{where} has both 'data' and binary_data_size")
        if offset + size > len(tail):
            raise ProtocolError(400, f"{where}: binary_data_size {size} runs past the end of the "
                                     f"binary data ({len(tail) - offset} bytes left)")
        chunk = tail[offset: offset + size]
        return InputTensor(name, datatype, shape, _from_binary(chunk, datatype, shape, where)), size
    if "data" not in t:
        raise ProtocolError(400, f"{where} has neither 'data' nor parameters.binary_data_size")
    return InputTensor(name, datatype, shape, _from_json(t["data"], datatype, shape, where)), 0


def _from_binary(chunk: bytes, datatype: str, shape: tuple[int, ...], where: str):
    count = math.prod(shape)
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(chunk):
            if pos + 4 > len(chunk):
                raise ProtocolError(400, f"{where}: BYTES element {len(items)} has a cut length prefix")
            (n,) = struct.unpack_from("<I", chunk, pos)
            pos += 4
            if pos + n > len(chunk):
                raise ProtocolError(400, f"{where}: BYTES element {len(items)} claims {n} bytes, "
                                         f"{len(chunk) - pos} are left")
            items.append(chunk[pos: pos + n])
            pos += n
        if len(items) != count:
            raise ProtocolError(400, f"{where}: {len(items)} BYTES elements for shape {list(shape)}")
        return items
    dtype = _numpy_dtype(datatype, where)
    if len(chunk) != count * dtype.itemsize:
        raise ProtocolError(400, f"{where}: {len(chunk)} bytes of binary data; shape {list(shape)} "
                                 f"of {datatype} needs {count * dtype.itemsize}")
    return np.frombuffer(chunk, dtype=dtype).reshape(shape)


def _from_json(data, datatype: str, shape: tuple[int, ...], where: str):
    count = math.prod(shape)
    if not isinstance(data, list):
        raise ProtocolError(400, f"{where}: 'data' must be a JSON list")
    if datatype == "BYTES":
        flat = _flatten(data, where)
        if len(flat) != count:
            raise ProtocolError(400, f"{where}: {len(flat)} elements for shape {list(shape)}")
        out = []
        for k, s in enumerate(flat):
            if not isinstance(s, str):
                raise ProtocolError(400, f"{where}: BYTES element {k} is not a string (in JSON, "
                                         "each element is the file's bytes in base64)")
            try:
                out.append(decode_base64(s))
            except (binascii.Error, ValueError) as e:
                raise ProtocolError(400, f"{where}: BYTES element {k} is not base64 ({e}); raw "
                                         "bytes travel with the binary tensor extension") from None
        return out
    dtype = _numpy_dtype(datatype, where)
    try:
        arr = np.array(data)
    except (ValueError, TypeError, OverflowError):
        raise ProtocolError(400, f"{where}: 'data' is ragged or holds non-numbers") from None
    if arr.size != count:
        raise ProtocolError(400, f"{where}: {arr.size} values for shape {list(shape)}")
    if dtype.kind == "u":
        if arr.size and arr.dtype.kind not in "iu":  # bool, float or str is not a UINT8 value
            raise ProtocolError(400, f"{where}: {datatype} data must be integers")
        info = np.iinfo(dtype)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise ProtocolError(400, f"{where}: values outside {datatype}'s {info.min}..{info.max}")
    elif arr.size and arr.dtype.kind not in "iuf":
        raise ProtocolError(400, f"{where}: {datatype} data must be numbers")
    return arr.astype(dtype).reshape(shape)


def _flatten(data: list, where: str, depth: int = 0) -> list:
    if depth > 32:
        raise ProtocolError(400, f"{where}: 'data' is nested too deeply")
    if not any(isinstance(x, list) for x in data):
        return data
    out = []
    for x in data:
        out.extend(_flatten(x, where, depth + 1) if isinstance(x, list) else [x])
    return out


def _numpy_dtype(datatype: str, where: str) -> np.dtype:
    if datatype not in NUMPY_DTYPES:
        raise ProtocolError(400, f"{where}: datatype {datatype} is not used by this server "
                                 f"(inputs: UINT8 pixels or BYTES files)")
    return NUMPY_DTYPES[datatype]


def _requested_output(o, i: int, default_binary: bool) -> RequestedOutput:
    if not isinstance(o, dict) or not isinstance(o.get("name"), str):
        raise ProtocolError(400, f"outputs[{i}] must be an object with a string 'name'")
    params = _parameters(o.get("parameters"), f"output {o['name'][:64]!r}")
    if params.get("classification"):
        raise ProtocolError(400, f"output {o['name'][:64]!r} asks for classification; this server "
                                 "does not implement that extension (read the logits output)")
    binary = params.get("binary_data", default_binary)
    if not isinstance(binary, bool):
        raise ProtocolError(400, f"output {o['name'][:64]!r}: binary_data must be true or false")
    return RequestedOutput(o["name"], binary)


def select_outputs(req: InferRequest, available: list[TensorSpec]) -> list[RequestedOutput]:
    """The outputs to send, in order: those asked for (each a known name), else all."""
    names = [s.name for s in available]
    if req.outputs is None:
        return [RequestedOutput(n, req.binary_output) for n in names]
    unknown = [o.name for o in req.outputs if o.name not in names]
    if unknown:
        raise ProtocolError(400, f"unknown output(s) {unknown}; this model has {names}")
    return req.outputs


def encode_infer_response(*, model_name: str, model_version: str, request_id: str | None,
                          outputs: list[tuple[RequestedOutput, str, np.ndarray]],
                          ) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of an inference response. ``outputs``: (requested, datatype, array)."""
    header: dict = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        header["id"] = request_id
    tensors, blobs = [], []
    for req, datatype, arr in outputs:
        arr = np.ascontiguousarray(arr, dtype=NUMPY_DTYPES[datatype])
        t = {"name": req.name, "datatype": datatype, "shape": list(arr.shape)}
        if req.binary:
            blob = arr.tobytes()
            t["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            t["data"] = arr.ravel()  # orjson writes float32 as its shortest round-trip repr
        tensors.append(t)
    header["outputs"] = tensors
    head = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, {"content-type": "application/json"}
    return b"".join([head, *blobs]), {"content-type": "application/octet-stream",
                                      "inference-header-content-length": str(len(head))}


def error_body(message: str) -> dict:
    """The protocol's error object: ``{"error": "<message>"}``."""
    return {"error": message}
