"""GET /healthz (the process answers) and GET /readyz (model loaded and warmed up); no API key."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from s4l.service.deps import State
from s4l.service.schemas import Health, Ready

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz():
    return {"status": "ok"}


@router.get("/readyz", response_model=Ready, responses={503: {"model": Ready}})
async def readyz(state: State):
    if state.ready:
        return {"status": "ready", "provider": state.backend.provider}
    return JSONResponse({"status": "not_ready", "provider": state.backend.provider,
                         "reason": state.not_ready_reason}, status_code=503)
