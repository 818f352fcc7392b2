"""OpenAI-style embeddings on the wire: the ``POST /v1/embeddings`` request read, the response
and error objects written. Pure data, no HTTP framework (routes_openai.py is the router).

Images travel as OpenAI's ``input`` strings: ``data:image/...;base64,`` URLs or bare base64
(as infinity serves image embeddings, with ``modality: "image"``). URLs are refused: the server
never fetches anything. Vectors are unit-normalised, as OpenAI's are; ``encoding_format``
``base64`` is the little-endian float32 bytes (what the official client asks for by default
and decodes with numpy), ``float`` a JSON list (the API's default when the field is absent).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import numpy as np

from s4l.service.inputs import decode_base64

_FIELDS = {"model", "input", "encoding_format", "dimensions", "user", "modality"}
_URL_PREFIXES = ("http://", "https://", "ftp://", "file:", "s3://", "gs://")


class OpenAIError(Exception):
    """A request OpenAI's API would refuse: status, message, the offending parameter, a code."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str
    images: list[bytes]
    encoding_format: str  # "float" | "base64"


def parse_request(payload, *, models: list[str], max_inputs: int, dim: int) -> EmbeddingsRequest:
    """Check an embeddings request against OpenAI's rules and this server (400 / 404 / 413)."""
    if not isinstance(payload, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    unknown = sorted(set(payload) - _FIELDS)
    if unknown:
        raise OpenAIError(400, f"Unrecognized request argument supplied: {unknown[0]}",
                          param=unknown[0], code="unknown_parameter")
    model = payload.get("model")
    if not isinstance(model, str):
        raise OpenAIError(400, "'model' is required (a string): one of " + ", ".join(models),
                          param="model")
    if model not in models:
        raise OpenAIError(404, f"The model '{model[:100]}' does not exist; this server has "
                          f"{', '.join(models)}", param="model", code="model_not_found")
    fmt = payload.get("encoding_format", "float")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise OpenAIError(400, f"encoding_format must be 'float' or 'base64', not "
                          f"{str(fmt)[:40]!r}", param="encoding_format")
    dims = payload.get("dimensions")
    if dims is not None and (type(dims) is not int or dims != dim):
        raise OpenAIError(400, f"dimensions {str(dims)[:20]} is not supported: this model's "
                          f"embeddings have {dim} dimensions (omit the field or send {dim})",
                          param="dimensions")
    modality = payload.get("modality", "image")
    if modality != "image":
        raise OpenAIError(400, f"modality {str(modality)[:20]!r} is not served: this is an image "
                          "model (modality 'image')", param="modality")
    user = payload.get("user")
    if user is not None and not isinstance(user, str):
        raise OpenAIError(400, "'user' must be a string", param="user")
    inputs = payload.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise OpenAIError(400, "'input' must be an image (a data URL or base64 string) or a "
                          "non-empty list of them", param="input")
    if len(inputs) > max_inputs:
        raise OpenAIError(413, f"{len(inputs)} inputs; at most {max_inputs} per request",
                          param="input", code="too_many_inputs")
    return EmbeddingsRequest(model=model, images=[_image(s, i) for i, s in enumerate(inputs)],
                             encoding_format=fmt)


def _image(s, i: int) -> bytes:
    if not isinstance(s, str):
        raise OpenAIError(400, f"input[{i}] is not a string: send each image as a "
                          "data:image/...;base64, URL or bare base64 (token arrays are text, "
                          "which this image model does not embed)", param="input")
    if s[:10].lower().startswith(_URL_PREFIXES):
        raise OpenAIError(400, f"input[{i}] is a URL; this server never fetches URLs: send the "
                          "image itself as a data:image/...;base64, URL", param="input",
                          code="url_not_supported")
    try:
        data = decode_base64(s)
    except (binascii.Error, ValueError) as e:
        raise OpenAIError(400, f"input[{i}] is not a base64 image or data URL ({e})",
                          param="input", code="invalid_base64") from None
    if not data:
        raise OpenAIError(400, f"input[{i}] is empty", param="input", code="invalid_image")
    return data


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Unit L2 rows (float32); an all-zero row stays zero."""
    v = np.asarray(vectors, dtype=np.float32)
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return (v / np.where(n > 0, n, 1)).astype(np.float32)


def response(vectors: np.ndarray, *, model: str, encoding_format: str) -> dict:
    """OpenAI's CreateEmbeddingResponse. Images carry no tokens, so usage counts zero."""
    v = np.ascontiguousarray(vectors, dtype="<f4")
    if encoding_format == "base64":
        items = [base64.b64encode(row.tobytes()).decode("ascii") for row in v]
    else:
        items = list(v)  # float32 rows: the JSON writer prints each value's shortest float32 repr
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(items)],
            "usage": {"prompt_tokens": 0, "total_tokens": 0}}


_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
          429: "rate_limit_error"}


def error_body(status: int, message: str, *, code: str | None = None,
               param: str | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
