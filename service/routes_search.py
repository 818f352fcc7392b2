"""POST /search: the nearest rows of a gallery (an `s4l extract` feature file) to each image or vector."""

from __future__ import annotations

import asyncio
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request

from s4l.service.backend import EMBEDDING
from s4l.service.deps import ApiKey, State
from s4l.service.errors import ApiError, error_responses
from s4l.service.gallery import MAX_TOP_K, Gallery
from s4l.service.inputs import (
    SEARCH_BODY,
    content_type,
    embeddings_from_json,
    images_from_json,
    is_json,
    read_images,
    read_json,
)
from s4l.service.pipeline import JSONBody, ServiceState, error_entry, infer
from s4l.service.schemas import SearchResponse

router = APIRouter(tags=["search"], dependencies=[ApiKey])


@router.post("/search", response_model=SearchResponse, openapi_extra={"requestBody": SEARCH_BODY},
             responses=error_responses(400, 401, 404, 413, 415, 422, 503, 504))
async def search(request: Request, state: State,
                 top_k: Annotated[int, Query(ge=1, le=MAX_TOP_K, description="matches per query")] = 10,
                 gallery: Annotated[str | None, Query(
                     description="gallery name (see /info); default: the only one")] = None):
    """Exact cosine search of a gallery. Send images as for /embed (multipart `files` parts or
    JSON `{"images": [base64]}`), or query vectors as JSON `{"embeddings": [[...], ...]}`, each
    of the model's embedding dimension. A bad image gets its own error entry."""
    g = pick_gallery(state, gallery)
    limit = state.settings.max_images_per_request
    ctype = content_type(request)
    if is_json(ctype):
        payload = await read_json(request)
        if isinstance(payload, dict) and "embeddings" in payload:
            vecs = embeddings_from_json(payload, limit)
            if len(vecs[0]) != g.dim:
                raise ApiError(422, "wrong_dimension", f"query vectors have {len(vecs[0])} values; "
                               f"gallery {g.name} has dimension {g.dim}")
            results = await _search(state, g, np.asarray(vecs, dtype=np.float64), top_k)
            return _response(state, g, results)
        raws = await images_from_json(payload, limit)
    else:
        raws = await read_images(request, max_images=limit)
    outs = await infer(raws, state, "/search")
    good = [i for i, o in enumerate(outs) if not isinstance(o, tuple)]
    results: list = [error_entry(o) if isinstance(o, tuple) else None for o in outs]
    if good:
        queries = np.stack([outs[i][EMBEDDING] for i in good])
        for i, r in zip(good, await _search(state, g, queries, top_k)):
            results[i] = r
    return _response(state, g, results)


def pick_gallery(state: ServiceState, name: str | None) -> Gallery:
    galleries = state.galleries
    if not galleries:
        raise ApiError(400, "no_gallery", "this server has no gallery; start it with "
                       "--gallery NAME=features.h5 (features from `s4l extract` with this model)")
    if name is None:
        if len(galleries) > 1:
            raise ApiError(422, "gallery_required",
                           f"several galleries; name one with ?gallery=: {', '.join(galleries)}")
        return next(iter(galleries.values()))
    if name not in galleries:
        raise ApiError(404, "unknown_gallery",
                       f"no gallery {name[:100]!r}; galleries: {', '.join(galleries)}")
    return galleries[name]


async def _search(state: ServiceState, g: Gallery, queries: np.ndarray, top_k: int) -> list[dict]:
    hits = await asyncio.get_running_loop().run_in_executor(state.search_pool, g.search, queries, top_k)
    return [{"matches": g.matches(hits, i)} for i in range(len(queries))]


def _response(state: ServiceState, g: Gallery, results: list) -> JSONBody:
    return JSONBody({"model": state.backend.info.model_id, "gallery": g.name, "rows": g.rows,
                     "results": results})
