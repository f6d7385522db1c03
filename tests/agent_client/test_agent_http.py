"""The agent over plain HTTP: raw protobuf POSTs, the instance header, gzip replies, polling."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from agent_client import ConfigFile, HttpTransport, TransportError, WebSocketTransport, transport_for_url
from agent_client.testing import FakeHttpServer, echo_reply
from opamp.proto import opamp_pb2 as pb
from tests.agent_client.helpers import (
    FAST,
    HEARTBEAT_FIELDS,
    field_names,
    full_state_request,
    is_full_report,
    make_agent,
    remote_config,
    running,
)


async def test_each_poll_posts_the_raw_protobuf_with_the_instance_uid_header(
    http_server: FakeHttpServer, state_dir: Path
) -> None:
    agent = make_agent(http_server.url, state_dir)
    async with running(agent):
        first = await http_server.next_message()

    request = http_server.requests[0]
    assert request.method == "POST"
    assert request.path == "/v1/opamp"
    assert request.headers["content-type"] == "application/x-protobuf"
    assert request.headers["opamp-instance-uid"] == str(uuid.UUID(bytes=agent.instance_uid))
    assert request.body[:1] != b"\x00"  # no WebSocket header byte over HTTP
    assert pb.AgentToServer.FromString(request.body) == first
    assert is_full_report(first)


async def test_gzip_compressed_replies_are_accepted_and_decoded(http_server: FakeHttpServer, state_dir: Path) -> None:
    def ask_for_full_state_once(message: pb.AgentToServer) -> pb.ServerToAgent:
        if message.sequence_num == 1:
            return full_state_request()
        return echo_reply(message)

    http_server.responder = ask_for_full_state_once
    async with running(make_agent(http_server.url, state_dir)):
        await http_server.next_message()
        second = await http_server.next_message()

    assert "gzip" in http_server.requests[0].headers["accept-encoding"]
    # Only a decoded reply could have asked for this second full report.
    assert is_full_report(second)


async def test_the_agent_polls_every_heartbeat_interval_with_bare_heartbeats(
    http_server: FakeHttpServer, state_dir: Path
) -> None:
    agent = make_agent(http_server.url, state_dir, replace(FAST, heartbeat_interval=0.1))
    # When the agent hands each poll to its transport: the schedule under test. (The times
    # the server sees add the loopback's jitter, which on a loaded machine let one poll
    # arrive less than an interval after a delayed one.)
    loop = asyncio.get_running_loop()
    handed: list[float] = []
    send = agent.transport.send

    async def timed_send(message: pb.AgentToServer) -> None:
        handed.append(loop.time())
        await send(message)

    agent.transport.send = timed_send  # type: ignore[method-assign]
    async with running(agent):
        for _ in range(4):
            await http_server.next_message()
    gaps = [later - earlier for earlier, later in itertools.pairwise(handed[:4])]
    assert len(gaps) == 3 and all(gap >= 0.08 for gap in gaps), gaps
    assert all(field_names(message) == HEARTBEAT_FIELDS for message in http_server.messages[1:4])


async def test_a_remote_config_in_a_poll_reply_is_applied_and_reported(
    http_server: FakeHttpServer, state_dir: Path
) -> None:
    remote = remote_config({"collector.yaml": ConfigFile(b"exporters: {}\n", "text/yaml")})
    config_hash = remote.config_hash

    def offer_config_until_applied(message: pb.AgentToServer) -> pb.ServerToAgent:
        reply = echo_reply(message)
        # As a real server does: offer while the agent's reported hash differs.
        if message.remote_config_status.last_remote_config_hash != config_hash:
            reply.remote_config.CopyFrom(remote)
        return reply

    http_server.responder = offer_config_until_applied
    async with running(make_agent(http_server.url, state_dir)):
        await http_server.next_message()
        applying = await http_server.next_message()
        applied = await http_server.next_message()

    assert applying.remote_config_status.status == pb.RemoteConfigStatuses_APPLYING
    assert applied.remote_config_status.status == pb.RemoteConfigStatuses_APPLIED
    assert applied.remote_config_status.last_remote_config_hash == config_hash
    assert (state_dir / "config" / "collector.yaml").read_bytes() == b"exporters: {}\n"


async def test_shutdown_posts_agent_disconnect(http_server: FakeHttpServer, state_dir: Path) -> None:
    async with running(make_agent(http_server.url, state_dir)):
        await http_server.next_message()
    last = await http_server.next_message()
    assert last.HasField("agent_disconnect")


async def test_a_reply_over_the_size_limit_is_refused() -> None:
    async with FakeHttpServer(gzip_responses=False) as server:
        server.responder = lambda message: pb.ServerToAgent(instance_uid=message.instance_uid, capabilities=7)
        transport = HttpTransport(server.url, max_message_bytes=10, trust_env=False)
        await transport.connect()
        try:
            with pytest.raises(TransportError, match="larger than 10 bytes"):
                await transport.send(pb.AgentToServer(instance_uid=uuid.uuid4().bytes))
        finally:
            await transport.close()


def test_the_transport_follows_the_url_scheme_unless_one_is_named() -> None:
    assert isinstance(transport_for_url("ws://127.0.0.1:4320/v1/opamp"), WebSocketTransport)
    assert isinstance(transport_for_url("https://example.test/v1/opamp"), HttpTransport)
    polling = transport_for_url("wss://example.test/v1/opamp", kind="http")
    assert polling.url == "https://example.test/v1/opamp"
    streaming = transport_for_url("http://example.test/v1/opamp", kind="ws")
    assert streaming.url == "ws://example.test/v1/opamp"
