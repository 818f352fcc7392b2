"""GET /heads (the loaded task heads and their provenance) and POST /admin/reload-heads."""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from s4l.errors import UserError
from s4l.service.deps import ApiKey, State
from s4l.service.errors import ApiError, error_responses
from s4l.service.head_registry import reload_heads
from s4l.service.schemas import HeadsResponse

log = logging.getLogger(__name__)

router = APIRouter(tags=["heads"])
_admin_bearer = HTTPBearer(auto_error=False, description="S4L_ADMIN_TOKEN")


@router.get("/heads", response_model=HeadsResponse, dependencies=[ApiKey],
            responses=error_responses(401))
async def heads(state: State):
    """The heads /classify can answer with: classes, provenance, validation metrics."""
    return state.heads.describe(state.backend.info)


async def require_admin(state: State, creds: Annotated[HTTPAuthorizationCredentials | None,
                                                       Depends(_admin_bearer)]) -> None:
    token = state.settings.admin_token
    if token is None:
        raise ApiError(403, "admin_disabled",
                       "admin routes are disabled: start the server with S4L_ADMIN_TOKEN set")
    given = creds.credentials if creds is not None else ""
    if not secrets.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise ApiError(401, "unauthorized", "missing or wrong admin token (S4L_ADMIN_TOKEN)",
                       headers={"WWW-Authenticate": "Bearer"})


@router.post("/admin/reload-heads", response_model=HeadsResponse,
             dependencies=[Depends(require_admin)],
             responses={**error_responses(401, 403), 409: error_responses(409)[409]})
async def reload(state: State):
    """Re-read every head file and swap the set in at once; requests in flight keep the heads
    they started with. A bad file answers 409 with the reason and the old heads stay."""
    try:
        reg = await asyncio.get_running_loop().run_in_executor(None, reload_heads, state)
    except UserError as e:
        log.warning("head reload refused, old heads kept: %s", e)
        raise ApiError(409, "reload_failed", f"{e}; the previous heads stay loaded") from e
    log.info("heads reloaded (generation %d): %s", reg.generation, reg.names)
    return reg.describe(state.backend.info)
