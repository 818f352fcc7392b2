"""Open Inference Protocol v2 (KServe v2, Triton's HTTP API) over the service's pipeline: /v2/...

Models: ``s4l`` (the name of our Triton export, so one client works against either) with outputs
``embedding`` and, when the export has a class head, ``logits``; and ``s4l-<head>`` for each
served head (output ``logits``). Each takes ONE input: ``images``, UINT8 ``[N, H, W, 3]``
already cropped, exactly as the Triton config declares, or ``image_bytes``, BYTES ``[N]`` of
encoded JPEG/PNG/WebP files that go through the service's decode and eval crop. Requests share
the app's API key, body limit, admission, micro-batcher and metrics with /embed; errors are the
protocol's ``{"error": "<message>"}``. The wire format itself lives in oip.py.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

import s4l
from s4l.service import oip
from s4l.service.backend import EMBEDDING, INPUT_NAME, LOGITS
from s4l.service.deps import ApiKey, State
from s4l.service.errors import ApiError, protocol_route_class
from s4l.service.head_registry import HeadRegistry, head_logits
from s4l.service.inputs import RawImage
from s4l.service.pipeline import ServiceState, infer

PREFIX = "/v2"
MODEL = "s4l"
VERSION = "1"
BYTES_INPUT = "image_bytes"
EXTENSIONS = ["binary_tensor_data"]  # only what is implemented; no shared memory, no classification
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino"}
_LARGE_BODY = 1 << 16  # parse bodies above this off the event loop (JSON pixel data is slow)


def error_body(status: int, code: str, message: str) -> dict:
    return oip.error_body(message)


router = APIRouter(tags=["open inference protocol v2"], route_class=protocol_route_class(error_body))


# -- OpenAPI schemas --------------------------------------------------------------------------

class V2Error(BaseModel):
    error: str


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Tensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2Tensor]
    outputs: list[V2Tensor]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


def _errors(*statuses: int) -> dict:
    return {s: {"model": V2Error, "description": "the protocol's error object"} for s in statuses}


_TENSOR_IN = {
    "type": "object", "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string", "description": f"'{INPUT_NAME}' or '{BYTES_INPUT}'"},
        "datatype": {"type": "string", "enum": ["UINT8", "BYTES"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "parameters": {"type": "object", "properties": {
            "binary_data_size": {"type": "integer", "minimum": 0}}},
        "data": {"type": "array", "description": "row-major values (flat or nested); BYTES "
                                                  "elements as base64 text"}}}
_INFER_BODY = {
    "required": True,
    "description": "A JSON inference request, optionally followed by the binary tensor "
                   "extension's raw bytes (header Inference-Header-Content-Length gives the JSON "
                   "part's length). Any or no Content-Type is accepted.",
    "content": {
        "application/json": {"schema": {
            "type": "object", "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "parameters": {"type": "object", "properties": {
                    "binary_data_output": {"type": "boolean"}}},
                "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": _TENSOR_IN},
                "outputs": {"type": "array", "items": {
                    "type": "object", "required": ["name"],
                    "properties": {"name": {"type": "string"}, "parameters": {
                        "type": "object", "properties": {"binary_data": {"type": "boolean"}}}}}}}}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}
_INFER_RESPONSES = {
    200: {"description": "outputs as JSON `data`, or (binary tensor extension) a JSON header "
                         "followed by the raw little-endian outputs",
          "content": {"application/json": {"schema": {
              "type": "object", "required": ["model_name", "outputs"],
              "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"},
                             "id": {"type": "string"},
                             "outputs": {"type": "array", "items": {"type": "object"}}}}},
              "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    **_errors(400, 401, 404, 413, 500, 503, 504),
}

ModelName = Annotated[str, Path(description=f"'{MODEL}' or 's4l-<head>' (GET /heads)")]
ModelVersion = Annotated[str, Path(description=f"'{VERSION}', the only version")]


# -- the models this server offers over v2 ------------------------------------------------------

def _models(state: ServiceState, reg: HeadRegistry) -> dict[str, str | None]:
    """v2 model name -> the head it answers with (None: the model itself)."""
    return {MODEL: None, **{f"{MODEL}-{h}": h for h in reg.names}}


def _resolve(state: ServiceState, reg: HeadRegistry, name: str, version: str | None) -> str | None:
    models = _models(state, reg)
    if name not in models:
        raise ApiError(404, "unknown_model", f"unknown model {name[:100]!r}; models: "
                       f"{', '.join(models)}")
    if version not in (None, "", VERSION):
        raise ApiError(404, "unknown_version", f"model {name!r} has no version "
                       f"{version[:20]!r}; its only version is {VERSION}")
    return models[name]


def _inputs(state: ServiceState) -> list[oip.TensorSpec]:
    c = state.backend.info.image_size
    return [oip.TensorSpec(INPUT_NAME, "UINT8", (-1, c, c, 3)), oip.TensorSpec(BYTES_INPUT, "BYTES", (-1,))]


def _outputs(state: ServiceState, reg: HeadRegistry, head: str | None) -> list[oip.TensorSpec]:
    info = state.backend.info
    if head is None:
        outs = [oip.TensorSpec(EMBEDDING, "FP32", (-1, info.embedding_dim))]
        if info.num_classes:
            outs.append(oip.TensorSpec(LOGITS, "FP32", (-1, info.num_classes)))
        return outs
    classes = info.num_classes if head not in reg.heads else reg.heads[head].num_classes
    return [oip.TensorSpec(LOGITS, "FP32", (-1, classes))]


def _metadata(state: ServiceState, reg: HeadRegistry, name: str, head: str | None) -> dict:
    return {"name": name, "versions": [VERSION],
            # Triton's names: an ONNX model on onnxruntime is "onnxruntime_onnx", the OpenVINO
            # backend "openvino"; a head is backbone + head, an ensemble.
            "platform": (PLATFORMS.get(getattr(state.backend, "backend", ""), "onnxruntime_onnx")
                         if head is None else "ensemble"),
            "inputs": [t.to_json() for t in _inputs(state)],
            "outputs": [t.to_json() for t in _outputs(state, reg, head)]}


# -- server routes ------------------------------------------------------------------------------

@router.get(PREFIX, response_model=V2ServerMetadata, dependencies=[ApiKey], responses=_errors(401))
async def server_metadata():
    """Server metadata: name, version and the protocol extensions implemented."""
    return {"name": "s4l", "version": s4l.__version__, "extensions": EXTENSIONS}


@router.get(PREFIX + "/health/live", response_model=V2Live)
async def live():
    """The process answers (no API key, as /healthz)."""
    return {"live": True}


@router.get(PREFIX + "/health/ready", response_model=V2Ready, responses=_errors(503))
async def ready(state: State):
    """200 once the model loaded and a warm-up inference worked (as /readyz); no API key."""
    if not state.ready:
        return JSONResponse(error_body(503, "not_ready", f"not ready: {state.not_ready_reason}"), 503)
    return {"ready": True}


# -- model routes (with and without /versions/{version}) ---------------------------------------

async def _model_metadata(state: ServiceState, name: str, version: str | None) -> dict:
    reg = state.heads
    return _metadata(state, reg, name, _resolve(state, reg, name, version))


async def _model_ready(state: ServiceState, name: str, version: str | None):
    _resolve(state, state.heads, name, version)
    if not state.ready:
        raise ApiError(503, "not_ready", f"model {name} not ready: {state.not_ready_reason}")
    return {"ready": True}


@router.get(PREFIX + "/models/{name}", response_model=V2ModelMetadata, dependencies=[ApiKey],
            responses=_errors(401, 404))
async def model_metadata(state: State, name: ModelName):
    """A model's inputs and outputs (datatype, shape; -1 = variable)."""
    return await _model_metadata(state, name, None)


@router.get(PREFIX + "/models/{name}/versions/{version}", response_model=V2ModelMetadata,
            dependencies=[ApiKey], responses=_errors(401, 404))
async def model_version_metadata(state: State, name: ModelName, version: ModelVersion):
    return await _model_metadata(state, name, version)


@router.get(PREFIX + "/models/{name}/ready", response_model=V2Ready, dependencies=[ApiKey],
            responses=_errors(401, 404, 503))
async def model_ready(state: State, name: ModelName):
    return await _model_ready(state, name, None)


@router.get(PREFIX + "/models/{name}/versions/{version}/ready", response_model=V2Ready,
            dependencies=[ApiKey], responses=_errors(401, 404, 503))
async def model_version_ready(state: State, name: ModelName, version: ModelVersion):
    return await _model_ready(state, name, version)


@router.post(PREFIX + "/models/{name}/infer", dependencies=[ApiKey], response_class=Response,
             openapi_extra={"requestBody": _INFER_BODY}, responses=_INFER_RESPONSES)
async def model_infer(request: Request, state: State, name: ModelName):
    """Inference: one input, `images` (UINT8 [N,H,W,3], cropped) or `image_bytes` (BYTES [N],
    encoded files, decoded and cropped here); outputs `embedding` (and `logits`) or, for
    `s4l-<head>`, `logits`. JSON `data` or the binary tensor extension, both ways."""
    return await _infer(request, state, name, None)


@router.post(PREFIX + "/models/{name}/versions/{version}/infer", dependencies=[ApiKey],
             response_class=Response, openapi_extra={"requestBody": _INFER_BODY},
             responses=_INFER_RESPONSES)
async def model_version_infer(request: Request, state: State, name: ModelName,
                              version: ModelVersion):
    return await _infer(request, state, name, version)


async def _infer(request: Request, state: ServiceState, name: str, version: str | None) -> Response:
    reg = state.heads  # this request's heads, whatever a reload does meanwhile
    head = _resolve(state, reg, name, version)
    encoding = request.headers.get("content-encoding", "").strip().lower()
    body = await request.body()
    parse = _parser(request.headers.get(oip.HEADER_LENGTH), encoding, state.settings.max_body_bytes)
    try:
        req = await asyncio.get_running_loop().run_in_executor(state.decode_pool, parse, body) \
            if len(body) > _LARGE_BODY or encoding else parse(body)
        wanted = oip.select_outputs(req, _outputs(state, reg, head))
    except oip.ProtocolError as e:
        raise ApiError(e.status, "invalid_request", e.message) from None
    raws, label = _images(req, state)
    outs = await infer(raws, state, request.scope["route"].path)
    bad = [(i, o) for i, o in enumerate(outs) if isinstance(o, tuple)]
    if bad:
        i, (code, msg) = bad[0]
        status = 500 if code in ("inference_failed", "non_finite_output") else 400
        more = f" ({len(bad) - 1} more image(s) failed too)" if len(bad) > 1 else ""
        raise ApiError(status, code, f"{label}[{i}]: {code}: {msg}{more}")
    if head is None:
        arrays = {EMBEDDING: np.stack([o[EMBEDDING] for o in outs])}
        if LOGITS in outs[0]:
            arrays[LOGITS] = np.stack([o[LOGITS] for o in outs])
    else:
        logits = await asyncio.get_running_loop().run_in_executor(
            state.decode_pool, head_logits, reg, [head], outs)
        if not np.isfinite(logits[head]).all():
            raise ApiError(500, "non_finite_output", f"head {head} produced NaN or infinite scores")
        arrays = {LOGITS: logits[head]}
    body, headers = oip.encode_infer_response(
        model_name=name, model_version=VERSION, request_id=req.id,
        outputs=[(w, "FP32", arrays[w.name]) for w in wanted])
    return Response(body, headers=headers)


def _parser(header_length: str | None, encoding: str, max_body_bytes: int):
    def parse(body: bytes) -> oip.InferRequest:
        body = oip.decompress(body, encoding, limit=max_body_bytes)
        # No valid tensor holds more elements than the body has bytes (binary: >= 1 byte each).
        return oip.parse_infer_request(body, header_length, max_elements=max_body_bytes)

    return parse


def _images(req: oip.InferRequest, state: ServiceState) -> tuple[list[RawImage], str]:
    """The request's one input as the pipeline's images (413 past the per-request limit)."""
    if len(req.inputs) != 1 or req.inputs[0].name not in (INPUT_NAME, BYTES_INPUT):
        raise ApiError(400, "invalid_request", f"send exactly one input: {INPUT_NAME!r} (UINT8 "
                       f"[N,H,W,3], cropped) or {BYTES_INPUT!r} (BYTES [N], encoded files); got "
                       f"{[t.name[:64] for t in req.inputs]}")
    t = req.inputs[0]
    crop = state.backend.info.image_size
    limit = state.settings.max_images_per_request
    n = t.shape[0] if t.shape else 0
    if t.name == INPUT_NAME:
        if t.datatype != "UINT8" or len(t.shape) != 4 or t.shape[1:] != (crop, crop, 3):
            raise ApiError(400, "invalid_request", f"input {INPUT_NAME!r} must be UINT8 "
                           f"[N, {crop}, {crop}, 3] (cropped pixels); got {t.datatype} "
                           f"{list(t.shape)}. Encoded files go in {BYTES_INPUT!r} (BYTES [N])")
    elif t.datatype != "BYTES" or len(t.shape) != 1:
        raise ApiError(400, "invalid_request", f"input {BYTES_INPUT!r} must be BYTES [N] (one "
                       f"encoded file per element); got {t.datatype} {list(t.shape)}")
    if n == 0:
        raise ApiError(400, "no_images", f"input {t.name!r} holds no images")
    if n > limit:
        raise ApiError(413, "too_many_images", f"{n} images; at most {limit} per request")
    if t.name == INPUT_NAME:
        return [RawImage(pixels=t.value[i]) for i in range(n)], t.name
    return [RawImage(data=b) for b in t.value], t.name
