"""Annotated dependencies of the routes: the shared state and the optional API key check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from s4l.service.errors import ApiError
from s4l.service.pipeline import ServiceState

_bearer = HTTPBearer(auto_error=False, description="the server's API key (S4L_API_KEY), when set")


async def get_state(request: Request) -> ServiceState:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per request.
    return request.app.state.s4l


State = Annotated[ServiceState, Depends(get_state)]


async def require_api_key(state: State,
                          creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    key = state.settings.api_key
    if key is None:
        return
    given = creds.credentials if creds is not None else ""
    if not secrets.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise ApiError(401, "unauthorized",
                       "missing or wrong API key: send 'Authorization: Bearer <key>'",
                       headers={"WWW-Authenticate": "Bearer"})


ApiKey = Depends(require_api_key)
