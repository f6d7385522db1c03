"""The agent over WebSocket: framing, full reports, heartbeats, sequence numbers, shutdown."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from agent_client import AgentSettings
from agent_client.testing import FakeWebSocketServer, echo_reply
from agent_client.version import __version__
from opamp.capabilities import AgentCapabilities
from opamp.proto import opamp_pb2 as pb
from tests.agent_client.helpers import (
    FAST,
    HEARTBEAT_FIELDS,
    QUIET,
    attributes,
    field_names,
    full_state_request,
    is_full_report,
    make_agent,
    running,
)

EXPECTED_CAPABILITIES = (
    AgentCapabilities.REPORTS_STATUS
    | AgentCapabilities.ACCEPTS_REMOTE_CONFIG
    | AgentCapabilities.REPORTS_EFFECTIVE_CONFIG
    | AgentCapabilities.REPORTS_HEALTH
    | AgentCapabilities.REPORTS_REMOTE_CONFIG
    | AgentCapabilities.REPORTS_HEARTBEAT
    | AgentCapabilities.ACCEPTS_RESTART_COMMAND
)


async def test_every_websocket_frame_starts_with_the_zero_header_byte(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    async with running(make_agent(ws_server.url, state_dir, FAST)):
        for _ in range(3):
            await ws_server.next_message()
    assert len(ws_server.frames) >= 4  # three reports and the disconnect
    assert all(frame[:1] == b"\x00" for frame in ws_server.frames)


async def test_the_first_message_is_a_full_report_of_who_the_agent_is(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    settings = replace(
        QUIET,
        identifying_attributes={"service.name": "edge", "region": "eu"},
        non_identifying_attributes={"deployment.environment": "dev"},
    )
    agent = make_agent(ws_server.url, state_dir, settings)
    async with running(agent):
        first = await ws_server.next_message()

    assert is_full_report(first)
    assert first.sequence_num == 1
    assert first.capabilities == EXPECTED_CAPABILITIES
    identifying = attributes(first.agent_description.identifying_attributes)
    assert identifying == {
        "service.name": "edge",
        "service.instance.id": str(uuid.UUID(bytes=first.instance_uid)),
        "service.version": __version__,
        "region": "eu",
    }
    non_identifying = attributes(first.agent_description.non_identifying_attributes)
    assert {"host.name", "os.type"} <= set(non_identifying)
    assert non_identifying["deployment.environment"] == "dev"
    assert first.health.healthy is True
    assert first.health.status == "running"
    assert first.health.start_time_unix_nano > 0
    assert first.remote_config_status.status == pb.RemoteConfigStatuses_UNSET
    assert len(first.effective_config.config_map.config_map) == 0


async def test_heartbeats_carry_only_instance_uid_sequence_num_and_capabilities(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    async with running(make_agent(ws_server.url, state_dir, FAST)):
        await ws_server.next_message()
        heartbeats = [await ws_server.next_message() for _ in range(2)]
    for heartbeat in heartbeats:
        assert field_names(heartbeat) == HEARTBEAT_FIELDS
        assert heartbeat.capabilities == EXPECTED_CAPABILITIES


async def test_sequence_numbers_increase_by_one_per_message(ws_server: FakeWebSocketServer, state_dir: Path) -> None:
    async with running(make_agent(ws_server.url, state_dir, FAST)):
        messages = [await ws_server.next_message() for _ in range(5)]
    assert [message.sequence_num for message in messages] == [1, 2, 3, 4, 5]


async def test_a_report_full_state_flag_is_answered_with_a_full_report(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    async with running(make_agent(ws_server.url, state_dir, QUIET)):
        await ws_server.next_message()
        await ws_server.push(full_state_request())
        answer = await ws_server.next_message()
    assert is_full_report(answer)
    assert answer.sequence_num == 2


async def test_accepts_remote_config_is_not_declared_when_switched_off(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    settings = replace(QUIET, accept_remote_config=False)
    async with running(make_agent(ws_server.url, state_dir, settings)):
        first = await ws_server.next_message()
    assert not first.capabilities & AgentCapabilities.ACCEPTS_REMOTE_CONFIG
    assert first.capabilities & AgentCapabilities.REPORTS_REMOTE_CONFIG


async def test_shutdown_sends_agent_disconnect_and_closes_the_websocket(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    agent = make_agent(ws_server.url, state_dir, QUIET)
    async with running(agent):
        await ws_server.next_message()
    last = await ws_server.next_message()
    assert last.HasField("agent_disconnect")
    assert last.sequence_num == 2
    async with asyncio.timeout(1):
        await ws_server.closed.wait()
    assert not agent.connected


async def test_after_the_server_drops_the_connection_the_agent_reconnects_with_a_full_report(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    async with running(make_agent(ws_server.url, state_dir, QUIET)):
        first = await ws_server.next_message()
        await ws_server.drop_connection()
        again = await ws_server.next_message()
    assert len(ws_server.connection_times) == 2
    assert is_full_report(again)
    assert again.instance_uid == first.instance_uid
    assert again.sequence_num == first.sequence_num + 1


async def test_user_headers_are_sent_with_the_websocket_upgrade(state_dir: Path) -> None:
    async with FakeWebSocketServer() as server:
        agent = make_agent(server.url, state_dir, QUIET, headers={"Authorization": "Bearer s3cret"})
        async with running(agent):
            await server.next_message()
    assert server.request_headers[0]["Authorization"] == "Bearer s3cret"


async def test_a_heartbeat_interval_offered_by_the_server_replaces_the_configured_one(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    def offer_slow_heartbeats(message: pb.AgentToServer) -> pb.ServerToAgent:
        reply = echo_reply(message)
        reply.connection_settings.opamp.heartbeat_interval_seconds = 5
        return reply

    ws_server.responder = offer_slow_heartbeats
    agent = make_agent(ws_server.url, state_dir, FAST)
    async with running(agent):
        await ws_server.next_message()
        # At the configured 0.05 s several heartbeats would arrive in this time.
        await asyncio.sleep(0.3)
        assert agent.heartbeat_interval == 5.0
    assert [message.sequence_num for message in ws_server.messages] == [1, 2]  # report, disconnect


async def test_a_zero_heartbeat_interval_from_the_server_disables_websocket_heartbeats(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    def disable_heartbeats(message: pb.AgentToServer) -> pb.ServerToAgent:
        reply = echo_reply(message)
        reply.connection_settings.opamp.heartbeat_interval_seconds = 0
        return reply

    ws_server.responder = disable_heartbeats
    agent = make_agent(ws_server.url, state_dir, FAST)
    async with running(agent):
        await ws_server.next_message()
        await asyncio.sleep(0.3)
        assert agent.heartbeat_interval is None
    assert len(ws_server.messages) == 2


def test_a_heartbeat_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="heartbeat_interval"):
        AgentSettings(heartbeat_interval=0)


async def test_a_stop_during_a_hanging_connect_returns_without_waiting_for_the_open_timeout(state_dir: Path) -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accept the TCP connection, never answer the upgrade
        writer.close()

    silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    agent = make_agent(f"ws://127.0.0.1:{port}/v1/opamp", state_dir, QUIET)
    try:
        task = asyncio.create_task(agent.run())
        await asyncio.sleep(0.1)
        agent.stop()
        async with asyncio.timeout(1):  # the open timeout is 10 s
            await task
        assert agent.sequence_num == 0
    finally:
        silent.close()
