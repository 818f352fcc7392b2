"""POST /embed: the model's embedding (pre_logits) of each image."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from s4l.service.deps import ApiKey, State
from s4l.service.errors import error_responses
from s4l.service.inputs import REQUEST_BODY, read_images
from s4l.service.pipeline import JSONBody, embed_entry, error_entry, infer
from s4l.service.schemas import EmbedResponse

router = APIRouter(tags=["inference"], dependencies=[ApiKey])


@router.post("/embed", response_model=EmbedResponse, openapi_extra={"requestBody": REQUEST_BODY},
             responses=error_responses(401, 413, 415, 422, 503, 504))
async def embed(request: Request, state: State,
                normalize: Annotated[bool, Query(description="L2-normalise each embedding")] = False):
    """Embed images sent as multipart parts named `files` or JSON `{"images": [base64]}`.
    A bad image gets its own error entry; the others are answered normally."""
    raws = await read_images(request, max_images=state.settings.max_images_per_request)
    outs = await infer(raws, state, "/embed")
    info = state.backend.info
    results = [error_entry(o) if isinstance(o, tuple) else embed_entry(o, normalize) for o in outs]
    return JSONBody({"model": info.model_id, "dim": info.embedding_dim,
                     "normalized": normalize, "results": results})
