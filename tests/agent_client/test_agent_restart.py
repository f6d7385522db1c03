"""A Restart command: the agent comes back once per command as a new process would."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from agent_client import AgentSettings
from agent_client.agent import AgentObserver
from agent_client.simulator import FleetStats
from agent_client.testing import FakeHttpServer, FakeWebSocketServer, echo_reply
from opamp.capabilities import AgentCapabilities
from opamp.proto import opamp_pb2 as pb
from tests.agent_client.helpers import FAST, QUIET, is_full_report, make_agent, running


def restart() -> pb.ServerToAgent:
    reply = pb.ServerToAgent()
    reply.command.SetInParent()
    reply.command.type = pb.CommandType_Restart
    return reply


class Restarts(AgentObserver):
    def __init__(self) -> None:
        self.count = 0

    def on_restart(self, agent) -> None:  # type: ignore[no-untyped-def]
        self.count += 1


async def test_a_restart_over_websocket_reconnects_once_as_a_new_process(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    observer = Restarts()
    agent = make_agent(ws_server.url, state_dir, QUIET, observer=observer)
    async with running(agent):
        first = await ws_server.next_message()
        assert first.capabilities & AgentCapabilities.ACCEPTS_RESTART_COMMAND
        await ws_server.push(restart())
        goodbye = await ws_server.next_message()
        assert goodbye.HasField("agent_disconnect")
        again = await ws_server.next_message()
        assert is_full_report(again) and again.sequence_num == 1
        assert again.health.start_time_unix_nano > first.health.start_time_unix_nano
        assert len(ws_server.connection_times) == 2
        await asyncio.sleep(0.1)
    assert observer.count == 1 and agent.restarts == 1


async def test_a_polling_agent_restarts_once_per_command(state_dir: Path) -> None:
    answered: list[bool] = []

    def responder(message: pb.AgentToServer) -> pb.ServerToAgent:
        # One restart, in the reply to the second poll.
        if len(answered) == 1:
            answered.append(True)
            return restart()
        answered.append(False)
        return echo_reply(message)

    async with FakeHttpServer(responder) as server:
        agent = make_agent(server.url, state_dir, FAST)
        async with running(agent):
            first = await server.next_message()
            await server.next_message()  # answered with the restart
            after = await server.next_matching(lambda message: not message.HasField("agent_disconnect"))
            assert is_full_report(after) and after.sequence_num == 1
            later = [await server.next_message() for _ in range(3)]
        assert [message.sequence_num for message in later] == [2, 3, 4]
        assert agent.restarts == 1
        assert after.health.start_time_unix_nano > first.health.start_time_unix_nano


async def test_an_agent_that_does_not_accept_restarts_ignores_the_command(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    settings: AgentSettings = replace(QUIET, accept_restart=False)
    agent = make_agent(ws_server.url, state_dir, settings)
    async with running(agent):
        first = await ws_server.next_message()
        assert not first.capabilities & AgentCapabilities.ACCEPTS_RESTART_COMMAND
        await ws_server.push(restart())
        await asyncio.sleep(0.2)
    assert agent.restarts == 0 and len(ws_server.connection_times) == 1


def test_the_simulator_counts_restarts() -> None:
    stats = FleetStats(1)
    stats.on_restart(object())  # type: ignore[arg-type]
    assert stats.restarts == 1
