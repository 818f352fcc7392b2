"""GET /metrics: this app's Prometheus metrics in the text exposition format."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from s4l.service.deps import ApiKey, State
from s4l.service.errors import error_responses

router = APIRouter(tags=["metrics"], dependencies=[ApiKey])


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **error_responses(401)})
async def metrics(state: State):
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
