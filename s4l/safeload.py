"""Reading files users hand each other as data, never code: capped JSON, pickle-free npz, names.

Torch-free (the server imports it). Every reader here refuses with a one-line `UserError` that
names the file: oversized files before they are read, JSON with repeated keys or NaN/Infinity,
npz members that are object arrays (which only a pickle can rebuild) or that inflate past the
cap, and names that would step out of a data root (`../x`, `/etc/x`).
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from s4l.errors import UserError

MiB = 1 << 20


def check_size(path: str | os.PathLike, what: str, max_bytes: int) -> Path:
    """The path, after checking that it is a regular file of at most `max_bytes`."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {str(p)!r} does not exist or is not a regular file")
    size = p.stat().st_size
    if size > max_bytes:
        raise UserError(f"{what} {str(p)!r} is {size / MiB:.1f} MiB, over the "
                        f"{max_bytes / MiB:.0f} MiB limit for such a file; refusing to read it")
    return p


def read_text_capped(path: str | os.PathLike, what: str, max_bytes: int) -> str:
    p = check_size(path, what, max_bytes)
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {what} {str(p)!r}: {e}") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice in one object")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(text: str, what: str) -> Any:
    """json.loads refusing repeated keys and NaN/Infinity, with a one-line error."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"{what} is not valid JSON: {str(e).splitlines()[0][:200]}") from None


def load_json_file(path: str | os.PathLike, what: str, max_bytes: int) -> Any:
    """A JSON file of at most `max_bytes`, parsed strictly (see `parse_json`)."""
    text = read_text_capped(path, what, max_bytes)
    return parse_json(text, f"{what} {str(path)!r}")


def load_npz_safely(path: str | os.PathLike, max_bytes: int, what: str = "npz file") -> dict[str, np.ndarray]:
    """Every array of an .npz file, without pickle: object arrays and zip bombs are refused.

    `max_bytes` caps both the file and the sum of its members' uncompressed sizes, which the
    zip directory declares before anything is inflated.
    """
    p = check_size(path, what, max_bytes)
    try:
        with zipfile.ZipFile(p) as z:
            declared = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{what} {str(p)!r} is not a valid .npz archive: {e}") from None
    if declared > max_bytes:
        raise UserError(f"{what} {str(p)!r} inflates to {declared / MiB:.1f} MiB, over the "
                        f"{max_bytes / MiB:.0f} MiB limit; refusing to read it")
    out: dict[str, np.ndarray] = {}
    try:
        with np.load(p, allow_pickle=False) as z:
            for name in z.files:
                out[name] = z[name]
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise UserError(f"{what} {str(p)!r} holds an object array (only a pickle can build "
                            "one); arrays of numbers or fixed-width strings only") from None
        raise UserError(f"{what} {str(p)!r} is not a valid .npz archive: {e}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{what} {str(p)!r} is not a valid .npz archive: {e}") from None
    for name, a in out.items():
        if a.dtype.hasobject:
            raise UserError(f"{what} {str(p)!r}: member {name!r} is an object array")
    return out


def check_relative_name(name: Any, what: str) -> str:
    """A relative name that stays inside whatever root it is joined to (no `..`, no `/x`)."""
    if not isinstance(name, str) or not name:
        raise UserError(f"{what}: expected a non-empty file name, got {name!r}")
    if "\x00" in name or "\\" in name or name.startswith("/") or os.path.isabs(name):
        raise UserError(f"{what}: name {name!r} is not a relative path inside the data root")
    if any(part == ".." for part in name.split("/")):
        raise UserError(f"{what}: name {name!r} escapes the data root ('..')")
    return name


def finite_number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise UserError(f"{what}: expected a finite number, got {v!r}")
    return float(v)
