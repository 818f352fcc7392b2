"""GET /info: the loaded model's metadata, execution provider, dimensions, labels and the limits."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

import s4l
from s4l.service.backend import describe
from s4l.service.deps import ApiKey, State
from s4l.service.errors import error_responses

router = APIRouter(tags=["info"], dependencies=[ApiKey])


@router.get("/info", responses=error_responses(401))
async def info(state: State) -> dict[str, Any]:
    s = state.settings
    return {
        **describe(state.backend),
        "ready": state.ready,
        "not_ready_reason": None if state.ready else state.not_ready_reason,
        "metadata": state.backend.info.metadata,
        "s4l_version": s4l.__version__,
        "limits": {"max_body_bytes": s.max_body_bytes,
                   "max_images_per_request": s.max_images_per_request,
                   "max_pixels": s.max_pixels, "request_timeout_s": s.request_timeout_s,
                   "max_queue_images": s.max_queue_images},
        "batching": {"max_batch_size": state.batcher.max_batch_size, "max_wait_ms": s.max_wait_ms},
        "threads": {"intra_op": getattr(state.backend, "threads", None),
                    "decode": state.decode_threads},
        "auth": s.api_key is not None,
        "heads": {"names": state.heads.names, "default": state.heads.default,
                  "generation": state.heads.generation},
        "galleries": [g.describe() for g in state.galleries.values()],
        "backend_detail": state.backend.describe_backend()
        if hasattr(state.backend, "describe_backend") else None,
    }
