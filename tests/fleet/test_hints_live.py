"""The hint stream on real daphne processes sharing Redis (production profile).

What the Redis server shows is filtered by a channel prefix of the test's own: other
servers and test runs use the same Redis server, and pub/sub channels span its databases.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
import uuid
from pathlib import Path

import pytest
import redis
import websockets

from fleet.hint_messages import HINT_GROUP
from opamp.codec import decode_server_ws_frame, encode_ws_frame
from opamp.identifiers import uuid7
from opamp.proto import opamp_pb2
from tests.fleet.messages import full_report, heartbeat
from tests.support.live_server import LiveOpampServer, production_profile

pytestmark = [
    pytest.mark.live_server,
    pytest.mark.skipif(
        not production_profile(),
        reason="hints between server processes travel through Redis: needs OPAMP_TEST_PROFILE=production",
    ),
]

COLLECTOR_YAML = {"collector.yaml": {"body": "receivers: {}\n", "content_type": "text/yaml"}}
SERVER_LOG_ERRORS = ("Unexpected exception", "took too long to shut down", "Traceback")


def redis_client() -> redis.Redis:
    return redis.Redis.from_url(os.environ["REDIS_URL"])


def subscriptions(prefix: str) -> dict[str, int]:
    """Every channel with the prefix that some connection subscribes to, with its count."""
    client = redis_client()
    try:
        names = [name.decode() for name in client.pubsub_channels(f"{prefix}*")]
        return {name.decode(): count for name, count in client.pubsub_numsub(*names)} if names else {}
    finally:
        client.close()


def start_server(tmp_path: Path, *, processes: int = 1) -> tuple[LiveOpampServer, str]:
    prefix = f"opamp-test-{secrets.token_hex(4)}."
    server = LiveOpampServer(tmp_path / "server", processes=processes, extra_env={"OPAMP_CHANNEL_PREFIX": prefix})
    server.start()
    return server, prefix


async def exchange(socket: websockets.ClientConnection, message: opamp_pb2.AgentToServer) -> opamp_pb2.ServerToAgent:
    await socket.send(encode_ws_frame(message))
    return decode_server_ws_frame(await asyncio.wait_for(socket.recv(), timeout=30))


def server_logs(server: LiveOpampServer) -> str:
    return "".join(path.read_text(errors="replace") for path in sorted(server.workdir.glob("server*.log")))


async def the_same_agent_on_both_processes(server: LiveOpampServer, prefix: str) -> None:
    uid = uuid7().bytes
    async with websockets.connect(server.ws_urls[0]) as older:
        await exchange(older, full_report(uid, 1))
        async with websockets.connect(server.ws_urls[1]) as newer:
            # The agent reconnected through the other process (its old socket not yet gone).
            await exchange(newer, full_report(uid, 2))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(older.recv(), timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
            reply = await exchange(newer, heartbeat(uid, 3))
            assert reply.instance_uid == uid
            await asyncio.sleep(1.0)  # the older session's close has been handled
            (agent,) = server.agents()
            assert agent["instance_uid"] == str(uuid.UUID(bytes=uid))
            assert agent["connected"] is True  # the older session's close did not mark it gone
            # Each process holds exactly one subscription to the hint group.
            assert subscriptions(prefix)[f"{prefix}__group__{HINT_GROUP}"] == 2
            # A change made through the other process reaches the session on the same stream.
            server.api_post("configurations/", {"name": "edge", "selector": "service.name=checkout"})
            version = server.api_post("configurations/edge/versions/", {"files": COLLECTOR_YAML})
            pushed = decode_server_ws_frame(await asyncio.wait_for(newer.recv(), timeout=10))
            assert pushed.remote_config.config_hash.hex() == version["config_hash"]


def test_the_same_agent_on_two_server_processes_keeps_only_its_newer_session(tmp_path: Path) -> None:
    server, prefix = start_server(tmp_path, processes=2)
    try:
        asyncio.run(the_same_agent_on_both_processes(server, prefix))
        assert not any(error in server_logs(server) for error in SERVER_LOG_ERRORS), server_logs(server)[-4000:]
    finally:
        server.close()


AGENTS = 300


async def connect_agents(url: str, uids: list[bytes]) -> list[websockets.ClientConnection]:
    async def one(uid: bytes) -> websockets.ClientConnection:
        socket = await websockets.connect(url, open_timeout=30)
        await exchange(socket, full_report(uid, 1))
        return socket

    return list(await asyncio.gather(*(one(uid) for uid in uids)))


async def mass_disconnect(server: LiveOpampServer, prefix: str) -> None:
    async with websockets.connect(server.ws_url) as first:
        await exchange(first, full_report(uuid7().bytes, 1))
        baseline = subscriptions(prefix)
    # The process's own channel and its membership of the hint group, nothing per socket.
    assert len(baseline) == 2 and set(baseline.values()) == {1}, baseline
    assert f"{prefix}__group__{HINT_GROUP}" in baseline

    sockets = await connect_agents(server.ws_url, [uuid7().bytes for _ in range(AGENTS)])
    assert subscriptions(prefix) == baseline

    # Every agent goes at once: half close cleanly, half drop the TCP connection.
    half = len(sockets) // 2
    for socket in sockets[half:]:
        socket.transport.abort()
    await asyncio.gather(*(socket.close() for socket in sockets[:half]))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.api("agents/", connected="true", limit=1)["count"]:
        await asyncio.sleep(0.5)
    assert server.api("agents/", connected="true", limit=1)["count"] == 0
    assert subscriptions(prefix) == baseline


def test_a_mass_disconnect_is_quiet_and_leaves_no_subscription_behind(tmp_path: Path) -> None:
    server, prefix = start_server(tmp_path)
    try:
        asyncio.run(mass_disconnect(server, prefix))
        log = server_logs(server)
        assert not any(error in log for error in SERVER_LOG_ERRORS), log[-4000:]
    finally:
        server.close()
    assert subscriptions(prefix) == {}  # the stopped process left nothing subscribed
