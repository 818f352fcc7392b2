"""A reader of TensorFlow "tensor bundles" (`variables/variables.index` + `.data-NNNNN-of-NNNNN`),
numpy only: no TensorFlow, no protobuf package, and nothing in the module's graph is ever run.

The format, as TensorFlow writes it (tensorflow/core/util/tensor_bundle, core/lib/io/table):

- the index is an SSTable (LevelDB's table format): data blocks of prefix-compressed key/value
  entries with a restart array, an index block pointing at them, a metaindex block and a 48-byte
  footer (two block handles, padding, magic 0xdb4775248b80fb57). Every block is followed by a
  compression byte and the masked CRC-32C of block + byte. TF writes them uncompressed;
- key "" holds a BundleHeaderProto (num_shards, endianness, version), every other key is a
  tensor name whose value is a BundleEntryProto (dtype, shape, shard_id, offset, size, crc32c,
  slices);
- a tensor is `size` raw little-endian bytes at `offset` of its shard, with the masked CRC-32C
  of those bytes in its entry.

Both protos are parsed by hand (a dozen fields). Anything this reader does not understand or
cannot check is refused with one `UserError` line naming the file: a compressed block, a sliced
or string tensor, an unknown dtype, a big-endian bundle, a shape or offset beyond the data, a
checksum mismatch, a truncated file, a missing shard. Tensors are read one at a time into their
own buffer (`read`), so memory holds at most the tensors the caller keeps plus one.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from s4l.errors import UserError
from s4l.training.tfhub import crc32c
from s4l.training.tfhub.wire import fields as _fields
from s4l.training.tfhub.wire import int64 as _int64
from s4l.training.tfhub.wire import varint as _varint

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_LEN = 48
BLOCK_TRAILER = 5
MAX_INDEX_BYTES = 64 << 20  # an index of a few thousand variables is a few hundred KiB
MAX_DIMS = 8
READ_SLAB = 1 << 24

# tensorflow/core/framework/types.proto -> numpy (little-endian). Anything else is refused:
# DT_STRING (7) is stored in another layout, bfloat16 (14) and quantised types have no numpy
# equivalent, and a module's weights never use them.
DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"), 2: np.dtype("<f8"), 3: np.dtype("<i4"), 4: np.dtype("u1"),
    5: np.dtype("<i2"), 6: np.dtype("i1"), 9: np.dtype("<i8"), 10: np.dtype("?"),
    17: np.dtype("<u2"), 19: np.dtype("<f2"), 22: np.dtype("<u4"), 23: np.dtype("<u8"),
}
DTYPE_NAMES = {7: "string", 8: "complex64", 14: "bfloat16", 18: "complex128", 20: "resource",
               21: "variant", 11: "qint8", 12: "quint8", 13: "qint32"}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor's BundleEntryProto, checked against the data files."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int  # masked, as stored

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


# ----------------------------------------------------------------------------- protobuf wire
# (shared with the graph check: s4l.training.tfhub.wire)


def _parse_shape(buf: bytes, what: Callable[[], str]) -> tuple[int, ...]:
    dims: list[int] = []
    for field, wire, v in _fields(buf, what):
        if field == 2 and wire == 2:
            size = 0
            for f2, w2, v2 in _fields(v, what):  # type: ignore[arg-type]
                if f2 == 1 and w2 == 0:
                    size = _int64(v2)  # type: ignore[arg-type]
            if size < 0:
                raise UserError(f"{what()}: a dimension of unknown or negative size ({size})")
            dims.append(size)
        elif field == 3 and v:
            raise UserError(f"{what()}: a shape of unknown rank")
    if len(dims) > MAX_DIMS:
        raise UserError(f"{what()}: {len(dims)} dimensions (at most {MAX_DIMS} expected)")
    return tuple(dims)


# ----------------------------------------------------------------------------- the SSTable


class _Table:
    """The key/value pairs of an uncompressed LevelDB-format table held in memory, in order."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.path = data, path

    def what(self, detail: str = "") -> str:
        return f"TF bundle index {self.path}" + (f" ({detail})" if detail else "")

    def _handle(self, pos: int, end: int) -> tuple[tuple[int, int], int]:
        w = lambda: self.what("block handle")  # noqa: E731
        off, pos = _varint(self.data, pos, end, w)
        size, pos = _varint(self.data, pos, end, w)
        return (off, size), pos

    def _block(self, handle: tuple[int, int], kind: str) -> bytes:
        off, size = handle
        if off + size + BLOCK_TRAILER > len(self.data) - FOOTER_LEN:
            raise UserError(f"{self.what()}: its {kind} block lies beyond the end of the file "
                            "(truncated?)")
        body = self.data[off:off + size]
        ctype = self.data[off + size]
        stored = struct.unpack_from("<I", self.data, off + size + 1)[0]
        if crc32c.mask(crc32c.value(self.data[off:off + size + 1])) != stored:
            raise UserError(f"{self.what()}: checksum mismatch in its {kind} block at byte {off} "
                            "(corrupt file)")
        if ctype != 0:
            raise UserError(f"{self.what()}: its {kind} block is compressed (type {ctype}); only "
                            "uncompressed bundles, as TensorFlow writes them, are read")
        return body

    def _entries(self, block: bytes, kind: str) -> Iterator[tuple[bytes, bytes]]:
        w = lambda: self.what(f"{kind} block")  # noqa: E731
        if len(block) < 4:
            raise UserError(f"{w()}: too short to hold its restart array")
        n_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
        limit = len(block) - 4 - 4 * n_restarts
        if n_restarts == 0 or limit < 0:
            raise UserError(f"{w()}: a bad restart array ({n_restarts} restarts)")
        pos, key = 0, b""
        while pos < limit:
            shared, pos = _varint(block, pos, limit, w)
            unshared, pos = _varint(block, pos, limit, w)
            vlen, pos = _varint(block, pos, limit, w)
            if shared > len(key) or pos + unshared + vlen > limit:
                raise UserError(f"{w()}: an entry runs past its block")
            key = key[:shared] + block[pos:pos + unshared]
            pos += unshared
            yield key, block[pos:pos + vlen]
            pos += vlen

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        if len(self.data) < FOOTER_LEN:
            raise UserError(f"{self.what()}: {len(self.data)} bytes, too short for a table "
                            "footer (truncated or not a TF bundle index)")
        foot = len(self.data) - FOOTER_LEN
        if struct.unpack_from("<Q", self.data, len(self.data) - 8)[0] != TABLE_MAGIC:
            raise UserError(f"{self.what()}: no table magic number at its end (truncated or not "
                            "a TF bundle index)")
        _meta, pos = self._handle(foot, len(self.data) - 8)
        index, _ = self._handle(pos, len(self.data) - 8)
        last = None
        for _sep, value in self._entries(self._block(index, "index"), "index"):
            handle, _ = self._handle_in(value)
            for key, val in self._entries(self._block(handle, "data"), "data"):
                if last is not None and key <= last:
                    raise UserError(f"{self.what()}: keys out of order ({key!r} after {last!r})")
                last = key
                yield key, val

    def _handle_in(self, value: bytes) -> tuple[tuple[int, int], int]:
        w = lambda: self.what("block handle")  # noqa: E731
        off, pos = _varint(value, 0, len(value), w)
        size, pos = _varint(value, pos, len(value), w)
        return (off, size), pos


# ----------------------------------------------------------------------------- the bundle


class TensorBundle:
    """The tensors of a bundle whose files are `{prefix}.index` and `{prefix}.data-*`.

    Opening parses and checks the whole index (header, every entry against its shard's size);
    `read(name)` reads one tensor and verifies its checksum.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = Path(prefix)
        self.index_path = Path(f"{self.prefix}.index")
        if not self.index_path.is_file():
            raise UserError(f"TF bundle index {self.index_path} does not exist")
        size = self.index_path.stat().st_size
        if size > MAX_INDEX_BYTES:
            raise UserError(f"TF bundle index {self.index_path} is {size >> 20} MiB, over the "
                            f"{MAX_INDEX_BYTES >> 20} MiB a module's index needs; refusing it")
        table = _Table(self.index_path.read_bytes(), self.index_path)
        self.num_shards = 1
        entries: dict[str, Entry] = {}
        header_seen = False
        raw: list[tuple[str, bytes]] = []
        for key, value in table.items():
            if key == b"":
                header_seen = True
                self._parse_header(value)
                continue
            try:
                name = key.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{table.what()}: a tensor name that is not UTF-8 "
                                f"({key[:40]!r})") from None
            raw.append((name, value))
        if not header_seen:
            raise UserError(f"{table.what()}: no bundle header (the empty key); not a TF "
                            "tensor bundle")
        self.shard_paths = [Path(f"{self.prefix}.data-{i:05d}-of-{self.num_shards:05d}")
                            for i in range(self.num_shards)]
        missing = [p.name for p in self.shard_paths if not p.is_file()]
        if missing:
            raise UserError(f"TF bundle {self.prefix}: {len(missing)} of {self.num_shards} data "
                            f"shard(s) missing ({', '.join(missing[:3])})")
        self.shard_sizes = [p.stat().st_size for p in self.shard_paths]
        for name, value in raw:
            entries[name] = self._parse_entry(name, value, table)
        self.entries = entries

    def _parse_header(self, value: bytes) -> None:
        w = lambda: f"TF bundle index {self.index_path} (header)"  # noqa: E731
        for field, wire, v in _fields(value, w):
            if field == 1 and wire == 0:
                self.num_shards = int(v)  # type: ignore[arg-type]
            elif field == 2 and wire == 0 and v != 0:
                raise UserError(f"{w()}: a big-endian bundle; only little-endian ones are read")
        if not 1 <= self.num_shards <= 10_000:
            raise UserError(f"{w()}: {self.num_shards} shards declared")

    def _parse_entry(self, name: str, value: bytes, table: _Table) -> Entry:
        w = lambda: f"TF bundle index {self.index_path} (tensor {name!r})"  # noqa: E731
        dtype = shard = offset = size = 0
        crc = None
        shape: tuple[int, ...] = ()
        for field, wire, v in _fields(value, w):
            if field == 1 and wire == 0:
                dtype = int(v)  # type: ignore[arg-type]
            elif field == 2 and wire == 2:
                shape = _parse_shape(v, w)  # type: ignore[arg-type]
            elif field == 3 and wire == 0:
                shard = int(v)  # type: ignore[arg-type]
            elif field == 4 and wire == 0:
                offset = _int64(int(v))  # type: ignore[arg-type]
            elif field == 5 and wire == 0:
                size = _int64(int(v))  # type: ignore[arg-type]
            elif field == 6 and wire == 5:
                crc = int(v)  # type: ignore[arg-type]
            elif field == 7:
                raise UserError(f"{w()}: a sliced (partitioned) tensor; only whole tensors are "
                                "read")
        if dtype not in DTYPES:
            label = DTYPE_NAMES.get(dtype, f"enum {dtype}")
            raise UserError(f"{w()}: unsupported dtype {label}")
        np_dtype = DTYPES[dtype]
        if not 0 <= shard < self.num_shards:
            raise UserError(f"{w()}: shard {shard} of a {self.num_shards}-shard bundle")
        entry = Entry(name, np_dtype, shape, shard, offset, size, crc if crc is not None else -1)
        if crc is None:
            raise UserError(f"{w()}: no checksum stored; refusing an unverifiable tensor")
        if size != entry.numel * np_dtype.itemsize:
            raise UserError(f"{w()}: shape {list(shape)} of {np_dtype} needs "
                            f"{entry.numel * np_dtype.itemsize} bytes but the entry holds {size}")
        end = self.shard_sizes[shard]
        if offset < 0 or offset + size > end:
            raise UserError(f"{w()}: bytes {offset}..{offset + size} lie beyond its data file "
                            f"{self.shard_paths[shard].name} ({end} bytes; truncated?)")
        return entry

    # -- reading ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.entries)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def nbytes(self) -> int:
        return sum(e.size for e in self.entries.values())

    def read(self, name: str) -> np.ndarray:
        """One tensor as a fresh numpy array, after checking its CRC-32C."""
        e = self.entries[name]
        out = np.empty(e.size, np.uint8)
        crc = 0
        with open(self.shard_paths[e.shard], "rb") as f:
            f.seek(e.offset)
            view = memoryview(out)
            for start in range(0, e.size, READ_SLAB):
                part = view[start:start + READ_SLAB]
                n = f.readinto(part)
                if n != len(part):
                    raise UserError(f"TF bundle {self.prefix}: tensor {name!r} is cut short in "
                                    f"{self.shard_paths[e.shard].name} (truncated file)")
                crc = crc32c.extend(crc, part)
        if crc32c.mask(crc) != e.crc32c:
            raise UserError(f"TF bundle {self.prefix}: checksum mismatch in tensor {name!r} "
                            f"(stored {e.crc32c:#010x}, computed {crc32c.mask(crc):#010x}); the "
                            "data file is corrupt")
        return out.view(e.dtype).reshape(e.shape)
