"""The server's one JSON error shape, ``{"error": {"code", "message"}}``, and its exception handlers."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from s4l.service.limits import BodyTooLarge


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class ApiError(Exception):
    """A whole-request failure with an HTTP status, a stable code and a human message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_json(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers=headers)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_json(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return error_json(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        return error_json(422, "invalid_request", "; ".join(parts) or "invalid request")


# OpenAPI `responses=` entries shared by the routers.
def error_responses(*statuses: int) -> dict[int | str, dict]:
    text = {401: "missing or wrong API key", 413: "body too large or too many images",
            415: "unsupported media type", 422: "malformed JSON, base64 or parameters",
            400: "not possible for this model", 503: "queue full (Retry-After) or not ready",
            504: "request timed out", 404: "unknown head", 403: "route disabled",
            409: "reload refused: a head file is bad; the old heads stay"}
    return {s: {"model": ErrorResponse, "description": text.get(s, "error")} for s in statuses}


# A protocol's error renderer: (status, code, message) -> its JSON error object.
ErrorShape = Callable[[int, str, str], dict]


def protocol_route_class(shape: ErrorShape) -> type[APIRoute]:
    """An APIRoute whose errors (ours, the API key's, body limit, validation) are written in a
    foreign protocol's shape: the v2 and OpenAI routers share the app's dependencies and
    limits, and their clients parse their own error objects, not ours."""

    class ProtocolRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def route(request: Request) -> Response:
                try:
                    return await handler(request)
                except ApiError as e:
                    return JSONResponse(shape(e.status, e.code, e.message), e.status, e.headers)
                except BodyTooLarge as e:
                    return JSONResponse(shape(413, "payload_too_large", str(e)), 413,
                                        {"Connection": "close"})
                except RequestValidationError as e:
                    msg = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()))}: "
                                    f"{err.get('msg', 'invalid')}" for err in e.errors()[:5])
                    return JSONResponse(shape(400, "invalid_request", msg or "invalid request"), 400)
                except StarletteHTTPException as e:
                    code = _HTTP_CODES.get(e.status_code, f"http_{e.status_code}")
                    return JSONResponse(shape(e.status_code, code, str(e.detail)), e.status_code,
                                        getattr(e, "headers", None))

            return route

    return ProtocolRoute
