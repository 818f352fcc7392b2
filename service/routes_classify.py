"""POST /classify: top-k labels and softmax scores of one or several task heads for each image."""

from __future__ import annotations

import asyncio
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request

from s4l.service.deps import ApiKey, State
from s4l.service.errors import ApiError, error_responses
from s4l.service.head_registry import MODEL_HEAD, head_logits
from s4l.service.inputs import REQUEST_BODY, read_images
from s4l.service.pipeline import JSONBody, error_entry, infer, topk_entry
from s4l.service.schemas import ClassifyResponse, MultiHeadClassifyResponse

router = APIRouter(tags=["inference"], dependencies=[ApiKey])

MAX_HEADS_PER_REQUEST = 16


@router.post("/classify", response_model=ClassifyResponse | MultiHeadClassifyResponse,
             openapi_extra={"requestBody": REQUEST_BODY},
             responses=error_responses(400, 401, 404, 413, 415, 422, 503, 504))
async def classify(request: Request, state: State,
                   top_k: Annotated[int, Query(ge=1, le=1000, description="labels per image")] = 5,
                   head: Annotated[list[str] | None, Query(
                       max_length=MAX_HEADS_PER_REQUEST,
                       description="head(s) to answer with (GET /heads); repeat for several, which "
                                   "share one backbone run per image. Default: the model's own "
                                   "class head, else the only loaded head")] = None):
    """Classify images (same inputs as /embed). With one head the response is
    ``{model, head, num_classes, results: [{top_k}]}``; with several,
    ``{model, heads, results: [{heads: {name: {top_k}}}]}``. No head to answer with: 400;
    an unknown head: 404 listing the loaded ones."""
    reg = state.heads  # this request's heads, whatever a reload does meanwhile
    info = state.backend.info
    names = list(dict.fromkeys(head)) if head else []
    if not names:
        if reg.default is None:
            if not reg.names:
                raise ApiError(400, "no_class_head",
                               f"model {info.model_id} has no class head and no head is loaded; "
                               "use /embed, or serve a probe head with --head NAME=PATH")
            raise ApiError(400, "head_required",
                           f"several heads are loaded; choose with ?head= (one of {reg.names})")
        names = [reg.default]
    unknown = [n for n in names if n not in reg.names]
    if unknown:
        raise ApiError(404, "unknown_head",
                       f"unknown head(s) {unknown}; loaded heads: {reg.names or 'none'}")
    raws = await read_images(request, max_images=state.settings.max_images_per_request)
    outs = await infer(raws, state, "/classify")
    good = [i for i, o in enumerate(outs) if not isinstance(o, tuple)]
    # The heads' matmuls run in the decode pool, never on the event loop.
    logits = await asyncio.get_running_loop().run_in_executor(
        state.decode_pool, head_logits, reg, names, [outs[i] for i in good])
    labels = {n: (list(reg.model_labels) if reg.model_labels else None) if n == MODEL_HEAD
              else list(reg.heads[n].class_names) for n in names}
    row = {i: j for j, i in enumerate(good)}
    finite = np.logical_and.reduce([np.isfinite(z).all(1) for z in logits.values()]) if good else []
    results = []
    for i, o in enumerate(outs):
        if isinstance(o, tuple):
            results.append(error_entry(o))
        elif not finite[row[i]]:
            results.append(error_entry(("non_finite_output",
                                        "a head produced NaN or infinite scores for this image")))
        elif len(names) == 1:
            results.append(topk_entry(logits[names[0]][row[i]], top_k, labels[names[0]]))
        else:
            results.append({"heads": {n: topk_entry(logits[n][row[i]], top_k, labels[n])
                                      for n in names}})
    if len(names) == 1:
        n = names[0]
        num = info.num_classes if n == MODEL_HEAD else reg.heads[n].num_classes
        return JSONBody({"model": info.model_id, "head": n, "num_classes": num, "results": results})
    return JSONBody({"model": info.model_id, "heads": names, "results": results})
