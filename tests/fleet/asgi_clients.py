"""Drive the real ASGI application in-process: WebSocket and HTTP OpAMP clients."""

from __future__ import annotations

import gzip
from typing import Any

from channels.testing import HttpCommunicator, WebsocketCommunicator

from opamp.codec import decode_server_ws_frame, encode_ws_frame
from opamp.proto import opamp_pb2
from opamp_site.asgi import application


def _from_peer(scope: dict[str, Any], client: str | None) -> None:
    # The communicators build scopes without a TCP peer. The application only starts with
    # the first event, so a peer set here is exactly what a server would have passed.
    if client is not None:
        scope["client"] = (client, 40000)


class WsAgent:
    def __init__(self, *, headers: list[tuple[bytes, bytes]] | None = None, client: str | None = None) -> None:
        self.communicator = WebsocketCommunicator(application, "/v1/opamp", headers=headers)
        _from_peer(self.communicator.scope, client)

    async def connect(self) -> tuple[bool, Any]:
        """(True, subprotocol) when accepted; (False, close code) when the handshake is refused."""
        return await self.communicator.connect()

    async def __aenter__(self) -> WsAgent:
        connected, _ = await self.connect()
        assert connected
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.communicator.disconnect()

    async def send_raw(self, data: bytes | None = None, text: str | None = None) -> None:
        await self.communicator.send_to(bytes_data=data, text_data=text)

    async def receive(self, timeout: float = 5) -> opamp_pb2.ServerToAgent:
        return decode_server_ws_frame(await self.communicator.receive_from(timeout))

    async def exchange(self, message: opamp_pb2.AgentToServer) -> opamp_pb2.ServerToAgent:
        await self.send_raw(encode_ws_frame(message))
        return await self.receive()

    async def receive_close(self, timeout: float = 5) -> dict[str, Any]:
        event = await self.communicator.receive_output(timeout)
        assert event["type"] == "websocket.close", event
        return event


async def http_post(
    body: bytes,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    method: str = "POST",
    client: str | None = None,
) -> dict[str, Any]:
    all_headers = [(b"content-type", b"application/x-protobuf"), *(headers or [])]
    communicator = HttpCommunicator(application, method, "/v1/opamp", body=body, headers=all_headers)
    _from_peer(communicator.scope, client)
    response = await communicator.get_response(timeout=10)
    response["headers_dict"] = {k.lower(): v for k, v in response["headers"]}
    return response


def decode_http_reply(response: dict[str, Any]) -> opamp_pb2.ServerToAgent:
    body = response["body"]
    if response["headers_dict"].get(b"content-encoding") == b"gzip":
        body = gzip.decompress(body)
    return opamp_pb2.ServerToAgent.FromString(body)


async def http_exchange(message: opamp_pb2.AgentToServer, **kwargs: Any) -> opamp_pb2.ServerToAgent:
    response = await http_post(message.SerializeToString(), **kwargs)
    assert response["status"] == 200, response
    assert response["headers_dict"][b"content-type"] == b"application/x-protobuf"
    return decode_http_reply(response)
