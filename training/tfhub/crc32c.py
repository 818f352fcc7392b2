"""CRC-32C (Castagnoli), as TensorFlow's tensor bundles use it: a C library when one is installed,
else a numpy fallback that runs thousands of independent chunks side by side and joins them.

TF stores every checksum "masked" (`mask`), so that a CRC of data holding CRCs stays well spread.
Backends, best first: `google-crc32c` (its C build), `crc32c` (hardware-accelerated), numpy.
`backend_name()` says which one this process uses; `S4L_CRC32C=numpy` forces the fallback (tests).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import numpy as np

POLY = 0x82F63B78  # CRC-32C, reflected
_MASK_DELTA = 0xA282EAD8
_CHUNK = 4096  # bytes per lane in the numpy fallback; 4096 lanes make a 16 MiB slab
_SLAB = 1 << 24


def mask(crc: int) -> int:
    """TF's masked CRC (tensorflow/core/lib/hash/crc32c.h: rotate right by 15, add a constant)."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def unmask(masked: int) -> int:
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ----------------------------------------------------------------------------- numpy fallback


@functools.cache
def _table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(POLY), t >> 1).astype(np.uint32)
    return t


def _apply(op: np.ndarray, x: int) -> int:
    """Apply a GF(2)-linear map on 32-bit registers, given as the images of the 32 unit bits."""
    out = 0
    i = 0
    while x:
        if x & 1:
            out ^= int(op[i])
        x >>= 1
        i += 1
    return out


def _compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a after b."""
    return np.array([_apply(a, int(v)) for v in b], dtype=np.uint32)


@functools.cache
def _shift_op(log2_bytes: int) -> np.ndarray:
    """The map register -> register after 2**log2_bytes zero bytes (no init/xor-out)."""
    if log2_bytes == 0:
        t = _table()
        # one zero byte: r -> T[r & 0xff] ^ (r >> 8), linear in r
        return np.array([int(t[(1 << i) & 0xFF]) ^ ((1 << i) >> 8) for i in range(32)], np.uint32)
    half = _shift_op(log2_bytes - 1)
    return _compose(half, half)


def _shift(reg: int, nbytes: int) -> int:
    k = 0
    while nbytes:
        if nbytes & 1:
            reg = _apply(_shift_op(k), reg)
        nbytes >>= 1
        k += 1
    return reg


@functools.cache
def _byte_tables(log2_bytes: int) -> np.ndarray:
    """[4, 256] lookup tables applying `_shift_op(log2_bytes)` a byte of the register at a time."""
    op = _shift_op(log2_bytes)
    v = np.arange(256, dtype=np.uint32)
    out = np.zeros((4, 256), np.uint32)
    for b in range(4):
        for bit in range(8):
            out[b] ^= np.where((v >> bit) & 1, op[8 * b + bit], 0).astype(np.uint32)
    return out


def _raw_lanes(block: np.ndarray) -> np.ndarray:
    """Registers (from 0) of each row of a [lanes, chunk] uint8 block, all rows at once."""
    t = _table()
    cols = np.ascontiguousarray(block.T)  # [chunk, lanes]: each step reads one contiguous row
    reg = np.zeros(block.shape[0], np.uint32)
    for row in cols:
        reg = t[(reg ^ row) & 0xFF] ^ (reg >> 8)
    return reg


def _raw(data: np.ndarray) -> int:
    """Register (from 0, no init/xor-out) after `data` (uint8, any length)."""
    n = data.size
    lanes = n // _CHUNK
    reg = 0
    if lanes:
        regs = _raw_lanes(data[: lanes * _CHUNK].reshape(lanes, _CHUNK))
        # Join neighbouring lanes pairwise: reg(A||B) = shift(reg(A), len B) ^ reg(B). Leading
        # zero registers are neutral (zero bytes from a zero register stay zero), so pad the
        # front to a power of two and halve the count each level, vectorised.
        size = 1 << (lanes - 1).bit_length()
        regs = np.concatenate([np.zeros(size - lanes, np.uint32), regs])
        level = (_CHUNK - 1).bit_length()  # log2(_CHUNK)
        while regs.size > 1:
            left, right = regs[0::2], regs[1::2]
            tb = _byte_tables(level)
            regs = (tb[0][left & 0xFF] ^ tb[1][(left >> 8) & 0xFF] ^ tb[2][(left >> 16) & 0xFF]
                    ^ tb[3][left >> 24] ^ right)
            level += 1
        reg = int(regs[0])
    tail = data[lanes * _CHUNK:]
    if tail.size:
        reg = _shift(reg, tail.size) ^ int(_raw_lanes(tail.reshape(1, -1))[0])
    return reg


def _numpy_extend(crc: int, data) -> int:
    buf = np.frombuffer(data, dtype=np.uint8)
    reg = crc ^ 0xFFFFFFFF
    for start in range(0, max(buf.size, 1), _SLAB):
        part = buf[start:start + _SLAB]
        if part.size:
            reg = _shift(reg, part.size) ^ _raw(part)
    return reg ^ 0xFFFFFFFF


# ----------------------------------------------------------------------------- backends


def _google() -> Callable[[int, object], int] | None:
    try:
        import google_crc32c
    except ImportError:
        return None
    if getattr(google_crc32c, "implementation", "c") != "c":
        return None  # its pure-python build is slower than the numpy fallback
    def extend(crc: int, data) -> int:
        # its C entry point takes bytes only (a 16 MiB slab at most: the copy is cheap)
        return google_crc32c.extend(crc, data if isinstance(data, bytes) else bytes(data))

    return extend


def _crc32c_pkg() -> Callable[[int, object], int] | None:
    try:
        import crc32c
    except ImportError:
        return None
    fn = getattr(crc32c, "crc32c", None)
    return None if fn is None else (lambda crc, data: fn(data, crc))


@functools.cache
def _backend() -> tuple[str, Callable[[int, object], int]]:
    if os.environ.get("S4L_CRC32C", "").lower() != "numpy":
        for name, make in (("google-crc32c", _google), ("crc32c", _crc32c_pkg)):
            fn = make()
            if fn is not None:
                return name, fn
    return "numpy", _numpy_extend


def backend_name() -> str:
    return _backend()[0]


def extend(crc: int, data) -> int:
    """CRC-32C of (whatever gave `crc`) followed by `data` (bytes-like); start from crc=0."""
    return int(_backend()[1](crc, data))


def value(data) -> int:
    return extend(0, data)
