"""The floor for the ASGI server comparison: a bare `websockets` server answering OpAMP frames.

    python bench/floor_server.py --port 4349

Each WebSocket message is decoded as an AgentToServer frame and answered with a
ServerToAgent frame carrying the agent's instance_uid and the server's capabilities: the
protobuf work of a real answer, without Django, Channels, a database or an ASGI server. What
`bench/agents_connect.py --server-pid` measures against it is the cost of the socket, the
WebSocket framing and the event loop alone (BENCHMARKS.md, "The ASGI server, by
measurement"). Same ping interval as the production unit (60 s) and the same message
limit as the server (OPAMP_MAX_MESSAGE_BYTES' default). Loopback only: a benchmark target.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from opamp.codec import FrameError, decode_agent_ws_frame, encode_ws_frame  # noqa: E402
from opamp.proto import opamp_pb2 as pb  # noqa: E402

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CAPABILITIES = pb.ServerCapabilities_AcceptsStatus | pb.ServerCapabilities_OffersRemoteConfig


async def answer(connection: ServerConnection) -> None:
    try:
        async for frame in connection:
            if isinstance(frame, str):
                continue
            try:
                message = decode_agent_ws_frame(frame)
            except FrameError:
                await connection.close(code=1003)
                return
            if message.HasField("agent_disconnect"):
                continue
            reply = pb.ServerToAgent(instance_uid=message.instance_uid, capabilities=CAPABILITIES)
            await connection.send(encode_ws_frame(reply))
    except ConnectionClosed:
        pass


async def serve_forever(host: str, port: int) -> None:
    async with serve(
        answer, host, port, max_size=MAX_MESSAGE_BYTES, ping_interval=60, ping_timeout=60, compression=None
    ) as server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", choices=("127.0.0.1", "localhost"))
    parser.add_argument("--port", type=int, default=4349)
    options = parser.parse_args()
    asyncio.run(serve_forever(options.host, options.port))


if __name__ == "__main__":
    main()
