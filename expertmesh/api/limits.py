"""Request size limit: an ASGI middleware that answers 413 before the app parses a big body.

It trusts neither side alone: a declared ``Content-Length`` over the limit is refused at once,
and the bytes that actually arrive (chunked uploads, or a lying header) are counted too.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from expertmesh.api.errors import error_body


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with a 413 JSON error."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: int | None) -> dict[str, Any]:
        got = f" ({size} bytes)" if size is not None else ""
        return error_body(
            413,
            f"request body too large{got}: the limit is {self.max_bytes} bytes; send fewer or "
            "shorter prompts per request",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _send_json(send, 400, error_body(400, "Content-Length is not an integer"))
                return
            if size > self.max_bytes:
                await _send_json(send, 413, self._too_large(size))
                return
        # read the body now (it is small by construction) and replay it to the app
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            received += len(body)
            if received > self.max_bytes:
                await _send_json(send, 413, self._too_large(None))
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
