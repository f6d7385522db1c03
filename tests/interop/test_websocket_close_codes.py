"""Close codes on a real daphne: the ASGI test client accepts any code, daphne does not.

daphne (autobahn) refuses to send a server close code other than 1000 or 3000-4999 and
kills the connection with 1011 instead, so each close the consumer makes is checked here
as an agent sees it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import websockets

from fleet.consumers import CLOSE_MESSAGE_TOO_BIG, CLOSE_UNSUPPORTED_DATA
from tests.support.live_server import LiveOpampServer

pytestmark = [pytest.mark.live_server]


async def close_code_after(url: str, frame: str | bytes) -> int | None:
    async with websockets.connect(url, max_size=None) as socket:
        await socket.send(frame)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(socket.recv(), timeout=10)
    return closed.value.rcvd.code if closed.value.rcvd is not None else None


def test_a_text_frame_and_an_oversized_frame_close_with_their_codes(tmp_path: Path) -> None:
    server = LiveOpampServer(tmp_path / "server", extra_env={"OPAMP_MAX_MESSAGE_BYTES": "4096"})
    server.start()
    try:
        assert asyncio.run(close_code_after(server.ws_url, "hello")) == CLOSE_UNSUPPORTED_DATA
        assert asyncio.run(close_code_after(server.ws_url, b"\x00" + b"x" * 8192)) == CLOSE_MESSAGE_TOO_BIG
    finally:
        server.close()
