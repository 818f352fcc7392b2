"""POST /classify: the class head's top-k labels and softmax scores for each image."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from s4l.service.deps import ApiKey, State
from s4l.service.errors import ApiError, error_responses
from s4l.service.inputs import REQUEST_BODY, read_images
from s4l.service.models import ClassifyResponse
from s4l.service.pipeline import JSONBody, classify_entry, error_entry, infer

router = APIRouter(tags=["inference"], dependencies=[ApiKey])


@router.post("/classify", response_model=ClassifyResponse,
             openapi_extra={"requestBody": REQUEST_BODY},
             responses=error_responses(400, 401, 413, 415, 422, 503, 504))
async def classify(request: Request, state: State,
                   top_k: Annotated[int, Query(ge=1, le=1000, description="labels per image")] = 5):
    """Classify images (same inputs as /embed). A model exported without a class head answers 400."""
    info = state.backend.info
    if not info.num_classes:
        raise ApiError(400, "no_class_head",
                       f"model {info.model_id} has no class head; use /embed for embeddings")
    raws = await read_images(request, max_images=state.settings.max_images_per_request)
    outs = await infer(raws, state, "/classify")
    results = [error_entry(o) if isinstance(o, tuple) else classify_entry(o, top_k, info.class_names)
               for o in outs]
    return JSONBody({"model": info.model_id, "num_classes": info.num_classes,
                     "results": results})
