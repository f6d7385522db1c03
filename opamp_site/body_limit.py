"""The largest request body the web application (Django) is handed: 413 past it, at once.

Django's ASGI handler writes a whole request body to a temporary file before any view
runs, so a view's own limit (a package upload's OPAMP_PACKAGE_MAX_BYTES) would only be
checked once an arbitrarily large body sat on disk. This wrapper refuses a body whose
declared length is over the limit before reading it, and one without a declared length
(chunked) as soon as the bytes received pass it. The limit is above every endpoint's own
(`web_body_limit`), so the views still answer their precise refusals.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Room for what surrounds a file in a form upload (the admin's multipart fields).
FORM_OVERHEAD_BYTES = 1024 * 1024
TOO_LARGE = "the request body is larger than the {limit} bytes this server accepts"


def web_body_limit(*, package_max_bytes: int, api_max_body_bytes: int) -> int:
    return max(package_max_bytes, api_max_body_bytes) + FORM_OVERHEAD_BYTES


def _declared_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _refuse(send: Send, limit: int) -> None:
    detail = TOO_LARGE.format(limit=limit)
    body = json.dumps({"detail": detail, "field": None, "problems": [detail]}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > self.limit:
            await _refuse(send, self.limit)
            return
        received = 0
        refused = False

        async def counted() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    refused = True
                    await _refuse(send, self.limit)
                    # The application sees the client go: it reads no more and answers nothing.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counted, guarded_send)
