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

    def __init__(self, app, max_body_bytes: int):
        self.app, self.limit = app, max_body_bytes

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
                    return await _reject(send, self.limit)
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


async def _reject(send, limit: int) -> None:
    body = json.dumps({"error": {"code": "payload_too_large",
                                 "message": f"request body exceeds {limit} bytes"}}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
