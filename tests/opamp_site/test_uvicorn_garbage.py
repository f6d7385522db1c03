"""The HTTP protocol a WebSocket upgrade leaves behind is freed by reference counting.

uvicorn drops an HTTP protocol's parser (which points back at the protocol) when the
connection is lost; a protocol that handed its socket to the WebSocket protocol is never
told, so each WebSocket left it (transport, parser, flow control: ~28 objects) as a cycle
for the collector.
"""

from __future__ import annotations

import asyncio

import httptools
import pytest
import uvicorn
from websockets.asyncio.client import connect

from opamp_site.uvicorn_server import BoundedHttpProtocol, build_config, build_parser
from tests.support.garbage import Garbage
from tests.support.live_server import free_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

SOCKETS = 20


async def test_an_upgraded_connection_leaves_no_http_protocol_to_collect(garbage: Garbage) -> None:
    port = free_port()
    options = build_parser().parse_args(["-b", "127.0.0.1", "-p", str(port), "opamp_site.asgi:application"])
    server = uvicorn.Server(build_config(options))
    serving = asyncio.ensure_future(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        url = f"ws://127.0.0.1:{port}/v1/opamp"
        async with connect(url, compression=None):
            pass
        garbage.start()
        for _ in range(SOCKETS):
            async with connect(url, compression=None):
                pass
        await asyncio.sleep(0.2)  # the server handles the closes
        by_type = garbage.collect()
    finally:
        server.should_exit = True
        await serving
    assert garbage.of_types(BoundedHttpProtocol, httptools.HttpRequestParser) == [], by_type.most_common(10)
