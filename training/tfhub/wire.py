"""The protobuf wire format, read by hand: shared by the tensor-bundle reader (BundleHeaderProto,
BundleEntryProto) and the graph check (SavedModel, ModuleDef). No protobuf package is needed at
run time, and nothing read here is ever executed or unpickled: a message is walked as
(field number, wire type, value) triples and every length is checked against its buffer.

`fields` yields length-delimited values as slices of the buffer it is given: pass a
`memoryview` to walk a large message without copying it, `bytes` to get `bytes`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

from s4l.errors import UserError

VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5


def varint(buf: bytes | memoryview, pos: int, end: int,
           what: Callable[[], str]) -> tuple[int, int]:
    """(value, position after it) of the base-128 varint at buf[pos:end]."""
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise UserError(f"{what()}: a malformed varint (truncated or corrupt)")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7


def fields(buf: bytes | memoryview,
           what: Callable[[], str]) -> Iterator[tuple[int, int, int | bytes | memoryview]]:
    """(field number, wire type, value) for each field of a serialised message.

    Varints and fixed-width fields come as ints, length-delimited ones as a slice of `buf`.
    Group wire types (3, 4; unused by proto3) and field number 0 are refused."""
    pos, end = 0, len(buf)
    while pos < end:
        key = buf[pos]
        if key < 0x80:  # the common one-byte key, without a call
            pos += 1
        else:
            key, pos = varint(buf, pos, end, what)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise UserError(f"{what()}: field number 0 (not a protobuf message)")
        if wire == VARINT:
            v, pos = varint(buf, pos, end, what)
        elif wire == FIXED64:
            if pos + 8 > end:
                raise UserError(f"{what()}: a truncated fixed64 field")
            v, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == LEN:
            n = buf[pos] if pos < end else 0x80
            if n < 0x80:
                pos += 1
            else:
                n, pos = varint(buf, pos, end, what)
            if pos + n > end:
                raise UserError(f"{what()}: a field runs past the end of its record")
            v, pos = buf[pos:pos + n], pos + n
        elif wire == FIXED32:
            if pos + 4 > end:
                raise UserError(f"{what()}: a truncated fixed32 field")
            v, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise UserError(f"{what()}: unsupported protobuf wire type {wire}")
        yield field, wire, v


def int64(v: int) -> int:
    """A varint read as two's-complement int64 (how protobuf encodes negative int64s)."""
    return v - (1 << 64) if v >= 1 << 63 else v


def text(v: bytes | memoryview, what: Callable[[], str]) -> str:
    """A protobuf `string` field (UTF-8, refused otherwise)."""
    try:
        return bytes(v).decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what()}: a string field that is not UTF-8 "
                        f"({bytes(v[:40])!r})") from None
