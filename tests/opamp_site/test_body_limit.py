"""Bodies for the web application are refused past the limit before Django spools them."""

from __future__ import annotations

from typing import Any

import pytest
from channels.testing import HttpCommunicator

from opamp_site.asgi import application
from opamp_site.body_limit import TOO_LARGE, BodyLimit

pytestmark = pytest.mark.asyncio


class Recorder:
    """An application that reads the whole body and answers 200 with its length."""

    def __init__(self) -> None:
        self.read = 0
        self.called = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.called = True
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            self.read += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(self.read).encode()})


async def test_a_declared_length_over_the_limit_is_refused_without_the_application() -> None:
    inner = Recorder()
    communicator = HttpCommunicator(
        BodyLimit(inner, 100), "POST", "/x", body=b"", headers=[(b"content-length", b"101")]
    )
    response = await communicator.get_response()
    assert response["status"] == 413
    assert b"100 bytes" in response["body"]
    assert not inner.called


async def test_an_undeclared_body_is_refused_once_it_passes_the_limit() -> None:
    inner = Recorder()
    app = BodyLimit(inner, 100)
    sent: list[dict[str, Any]] = []
    chunks = [{"type": "http.request", "body": b"x" * 60, "more_body": True}] * 3

    async def receive() -> dict[str, Any]:
        return chunks.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "headers": []}, receive, send)
    assert sent[0]["status"] == 413 and len(sent) == 2  # only the refusal: the application answered nothing
    assert inner.read == 60


async def test_bodies_within_the_limit_pass_through() -> None:
    inner = Recorder()
    communicator = HttpCommunicator(BodyLimit(inner, 100), "POST", "/x", body=b"y" * 100)
    response = await communicator.get_response()
    assert (response["status"], response["body"]) == (200, b"100")


async def test_the_site_wraps_the_web_application() -> None:
    huge = str(10**12).encode()
    headers = [(b"content-length", huge), (b"content-type", b"application/octet-stream")]
    url = "/api/v1/packages/collector/versions/1.0.0/files/"
    response = await HttpCommunicator(application, "POST", url, body=b"", headers=headers).get_response()
    assert response["status"] == 413
    assert TOO_LARGE.split("{")[0].encode() in response["body"]
