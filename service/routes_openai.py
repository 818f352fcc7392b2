"""OpenAI-style embeddings over the service's pipeline: POST /v1/embeddings and GET /v1/models.

The same API key (``Authorization: Bearer``, which is how the OpenAI client sends its key), body
limit, admission, micro-batcher and metrics as /embed; errors in OpenAI's shape. The model is
``s4l`` (as over v2). The wire format lives in openai_embeddings.py.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel

from s4l.service import openai_embeddings as oai
from s4l.service.backend import EMBEDDING
from s4l.service.deps import ApiKey, State
from s4l.service.errors import protocol_route_class
from s4l.service.inputs import RawImage
from s4l.service.pipeline import JSONBody, infer

PREFIX = "/v1"
MODEL = "s4l"
_LARGE_BODY = 1 << 16  # bodies above this are parsed in the decode pool
_STARTED = int(time.time())  # GET /v1/models' `created`: when this server process started


_CODES = {"unauthorized": "invalid_api_key"}  # our code -> the one OpenAI's API uses


def error_body(status: int, code: str, message: str) -> dict:
    return oai.error_body(status, message, code=_CODES.get(code, code))


router = APIRouter(tags=["openai embeddings"], route_class=protocol_route_class(error_body))


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorBody


class OpenAIEmbedding(BaseModel):
    object: str
    index: int
    embedding: list[float] | str


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingsResponse(BaseModel):
    object: str
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class OpenAIModel(BaseModel):
    id: str
    object: str
    created: int
    owned_by: str


class OpenAIModelList(BaseModel):
    object: str
    data: list[OpenAIModel]


_IMAGE = {"type": "string", "description": "a data:image/...;base64, URL or bare base64 of an "
                                           "image file (URLs are refused: nothing is fetched)"}
_BODY = {
    "required": True,
    "content": {"application/json": {"schema": {
        "type": "object", "required": ["model", "input"], "additionalProperties": False,
        "properties": {
            "model": {"type": "string", "enum": [MODEL]},
            "input": {"oneOf": [_IMAGE, {"type": "array", "minItems": 1, "items": _IMAGE}]},
            "encoding_format": {"type": "string", "enum": ["float", "base64"], "default": "float"},
            "dimensions": {"type": "integer", "description": "refused unless the model's own"},
            "modality": {"type": "string", "enum": ["image"]},
            "user": {"type": "string"}}}}},
}


def _errors(*statuses: int) -> dict:
    return {s: {"model": OpenAIErrorResponse, "description": "OpenAI's error object"} for s in statuses}


@router.post(PREFIX + "/embeddings", response_model=OpenAIEmbeddingsResponse, dependencies=[ApiKey],
             openapi_extra={"requestBody": _BODY},
             responses=_errors(400, 401, 404, 413, 500, 503, 504))
async def embeddings(request: Request, state: State):
    """Unit-normalised image embeddings in OpenAI's shape (`encoding_format` float or base64,
    little-endian float32). A bad image fails the request (400, naming its index)."""
    body = await request.body()
    info = state.backend.info

    def parse() -> oai.EmbeddingsRequest:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise oai.OpenAIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        return oai.parse_request(payload, models=[MODEL], dim=info.embedding_dim,
                                 max_inputs=state.settings.max_images_per_request)

    try:
        # Megabytes of base64 are read off the event loop, as /embed's JSON images are.
        req = await asyncio.get_running_loop().run_in_executor(state.decode_pool, parse) \
            if len(body) > _LARGE_BODY else parse()
    except oai.OpenAIError as e:
        return JSONBody(oai.error_body(e.status, e.message, code=e.code, param=e.param), e.status)
    outs = await infer([RawImage(data=b) for b in req.images], state, PREFIX + "/embeddings")
    for i, o in enumerate(outs):
        if isinstance(o, tuple):
            status = 500 if o[0] in ("inference_failed", "non_finite_output") else 400
            return JSONBody(oai.error_body(status, f"input[{i}]: {o[1]}", code=o[0], param="input"),
                            status)
    vectors = oai.normalize(np.stack([o[EMBEDDING] for o in outs]))
    return JSONBody(oai.response(vectors, model=req.model, encoding_format=req.encoding_format))


@router.get(PREFIX + "/models", response_model=OpenAIModelList, dependencies=[ApiKey],
            responses=_errors(401))
async def models():
    """The models /v1/embeddings serves."""
    return {"object": "list",
            "data": [{"id": MODEL, "object": "model", "created": _STARTED, "owned_by": "s4l"}]}

