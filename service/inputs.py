"""Reads the images of an /embed, /classify or /search request (multipart ``files`` parts or JSON
base64) and the raw query vectors /search also takes (JSON ``{"embeddings": [[...], ...]}``)."""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass

import numpy as np
from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from s4l.service.errors import ApiError

MULTIPART = "multipart/form-data"
JSON = "application/json"

# The request body schema for OpenAPI (parsed by hand below, so both media types share a route).
REQUEST_BODY = {
    "required": True,
    "content": {
        MULTIPART: {"schema": {
            "type": "object", "required": ["files"],
            "properties": {"files": {"type": "array", "minItems": 1,
                                     "items": {"type": "string", "format": "binary"}}}}},
        JSON: {"schema": {
            "type": "object", "required": ["images"], "additionalProperties": False,
            "properties": {"images": {"type": "array", "minItems": 1,
                                      "items": {"type": "string", "format": "byte",
                                                "description": "base64 image file bytes"}}}}},
    },
}


_IMAGES_JSON = REQUEST_BODY["content"][JSON]["schema"]
_EMBEDDINGS_JSON = {
    "type": "object", "required": ["embeddings"], "additionalProperties": False,
    "properties": {"embeddings": {
        "type": "array", "minItems": 1, "description": "query vectors, each of the model's dimension",
        "items": {"type": "array", "minItems": 1, "items": {"type": "number"}}}}}
# /search: images as for /embed, or raw query vectors (a client that has an embedding keeps it).
SEARCH_BODY = {
    "required": True,
    "content": {MULTIPART: REQUEST_BODY["content"][MULTIPART],
                JSON: {"schema": {"oneOf": [_IMAGES_JSON, _EMBEDDINGS_JSON]}}},
}


@dataclass
class RawImage:
    """One input image's bytes, or the reason it could not even be read."""

    data: bytes | None = None
    error: tuple[str, str] | None = None
    pixels: np.ndarray | None = None  # an already-cropped uint8 [crop, crop, 3] (v2 UINT8 input)


async def read_images(request: Request, *, max_images: int) -> list[RawImage]:
    ctype = content_type(request)
    if ctype == MULTIPART:
        return await _read_multipart(request, max_images)
    if is_json(ctype):
        return await _read_json(request, max_images)
    raise ApiError(415, "unsupported_media_type",
                   f"content type {ctype or '(none)'!r} not supported; send {MULTIPART} with "
                   f"parts named 'files', or {JSON} {{\"images\": [base64, ...]}}")


async def _read_multipart(request: Request, max_images: int) -> list[RawImage]:
    try:
        form = await request.form(max_files=max_images, max_fields=max_images)
    except StarletteHTTPException as e:
        if "Too many files" in str(e.detail) or "Too many fields" in str(e.detail):
            raise ApiError(413, "too_many_images",
                           f"at most {max_images} images per request") from e
        raise ApiError(422, "malformed_multipart", f"unreadable multipart body: {e.detail}") from e
    try:
        parts = form.getlist("files")
        if not parts:
            raise ApiError(422, "no_images", "no form parts named 'files' in the multipart body")
        out = []
        for part in parts:
            if isinstance(part, UploadFile):
                out.append(RawImage(data=await part.read()))
            else:  # a plain field: the client sent no filename, so it is text, not a file
                out.append(RawImage(error=("not_a_file", "form part 'files' must be a file upload "
                                           "(Content-Disposition with a filename)")))
        return out
    finally:
        await form.close()


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def is_json(ctype: str) -> bool:
    return ctype == JSON or ctype.endswith("+json")


async def read_json(request: Request):
    body = await request.body()
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(422, "malformed_json", f"body is not valid JSON: {e}") from e


async def _read_json(request: Request, max_images: int) -> list[RawImage]:
    return await images_from_json(await read_json(request), max_images)


async def images_from_json(payload, max_images: int) -> list[RawImage]:
    if not isinstance(payload, dict) or not isinstance(payload.get("images"), list):
        raise ApiError(422, "malformed_json", 'expected a JSON object {"images": [base64, ...]}')
    extra = set(payload) - {"images"}
    if extra:
        raise ApiError(422, "malformed_json", f"unknown fields {sorted(extra)}; options are "
                       "query parameters")
    images = payload["images"]
    if not images:
        raise ApiError(422, "no_images", '"images" is empty')
    if len(images) > max_images:
        raise ApiError(413, "too_many_images", f"{len(images)} images; at most {max_images} per request")
    for i, s in enumerate(images):
        if not isinstance(s, str):
            raise ApiError(422, "malformed_json", f"images[{i}] is not a string")
    # Up to max_body_bytes of base64: decode off the event loop.
    datas = await run_in_threadpool(lambda: [_b64(s, i) for i, s in enumerate(images)])
    return [RawImage(data=d) for d in datas]


def _b64(s: str, i: int) -> bytes:
    try:
        return decode_base64(s)
    except (binascii.Error, ValueError) as e:
        raise ApiError(422, "malformed_base64", f"images[{i}] is not valid base64: {e}") from e


def decode_base64(s: str) -> bytes:
    """Base64 file bytes, bare or as a ``data:image/...;base64,`` URL (binascii.Error if not)."""
    if s.startswith("data:") and "," in s[:256]:  # data URL: data:image/jpeg;base64,....
        s = s.split(",", 1)[1]
    return base64.b64decode("".join(s.split()), validate=True)


def embeddings_from_json(payload: dict, max_vectors: int) -> list[list[float]]:
    """``{"embeddings": [[x, ...], ...]}`` -> the vectors, checked: numbers only (no booleans,
    no strings), finite (Python's JSON reader accepts NaN and Infinity), equal lengths."""
    extra = set(payload) - {"embeddings"}
    if extra:
        raise ApiError(422, "malformed_json", f"unknown fields {sorted(extra)}; options are "
                       "query parameters")
    vecs = payload["embeddings"]
    if not isinstance(vecs, list) or not vecs:
        raise ApiError(422, "malformed_json", '"embeddings" must be a non-empty list of vectors')
    if len(vecs) > max_vectors:
        raise ApiError(413, "too_many_images", f"{len(vecs)} vectors; at most {max_vectors} per request")
    dim = None
    for i, v in enumerate(vecs):
        if not isinstance(v, list) or not v:
            raise ApiError(422, "malformed_json", f"embeddings[{i}] is not a non-empty list of numbers")
        if dim is None:
            dim = len(v)
        elif len(v) != dim:
            raise ApiError(422, "wrong_dimension", f"embeddings[{i}] has {len(v)} values, "
                           f"embeddings[0] has {dim}")
        for x in v:
            if type(x) not in (int, float):
                raise ApiError(422, "malformed_json", f"embeddings[{i}] holds {type(x).__name__} "
                               f"{str(x)[:40]!r}, not a number")
            try:
                finite = math.isfinite(x)
            except OverflowError:  # an integer too large for a float
                finite = False
            if not finite:
                raise ApiError(422, "non_finite_embedding", f"embeddings[{i}] holds a value that "
                               "is NaN, infinite or too large")
    return vecs
