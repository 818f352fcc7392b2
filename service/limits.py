"""Request body size limit, enforced before and while the body is read (chunked uploads too)."""

from __future__ import annotations

import json


class BodyTooLarge(Exception):
    """The request body grew past ``max_body_bytes`` while it was being read."""

    def __init__(self, limit: int):
        super().__init__(f"request body exceeds {limit} bytes")
        self.limit = limit


class BodyLimitMiddleware:
    """Refuses a declared Content-Length over the limit at once (413, nothing read) and stops
    reading a body that grows past it (the route's read raises ``BodyTooLarge`` -> 413)."""

    def __init__(self, app, max_body_bytes: int, error_shapes: dict | None = None):
        self.app, self.limit = app, max_body_bytes
        # path prefix -> (status, code, message) -> error object, for routers that speak
        # another protocol's error shape (/v2, /v1); ours otherwise.
        self.error_shapes = error_shapes or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.limit:
                    return await _reject(send, self.limit, self._shape(scope.get("path", "")))
        seen = 0

        async def _receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, _receive, send)

    def _shape(self, path: str):
        for prefix, shape in self.error_shapes.items():
            if path == prefix or path.startswith(prefix + "/"):
                return shape
        return _ours


def _ours(status: int, code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


async def _reject(send, limit: int, shape=_ours) -> None:
    body = json.dumps(shape(413, "payload_too_large", f"request body exceeds {limit} bytes")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
