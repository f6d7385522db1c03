"""A real server with a tiny admission rate: agent_client agents are told to come back later,
wait as told, and all get in."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from agent_client.agent import Agent, AgentObserver
from agent_client.agent_settings import AgentSettings
from agent_client.state import MemoryState
from agent_client.transport import TransportError, transport_for_url
from opamp.proto import opamp_pb2 as pb
from tests.support.live_server import LiveOpampServer

pytestmark = pytest.mark.live_server

AGENTS = 8
RATE = 4.0  # tokens per second; a new agent costs two, so two new agents per second


class Recorder(AgentObserver):
    def __init__(self) -> None:
        self.unavailable_replies = 0
        # (what the server said: retry_info or Retry-After, how long the agent waited)
        self.waits: list[tuple[float, float]] = []
        self.admitted: set[Agent] = set()
        self.all_admitted = asyncio.Event()

    def on_reply(self, agent: Agent, reply: pb.ServerToAgent, round_trip: float | None) -> None:
        if reply.HasField("error_response"):
            assert reply.error_response.type == pb.ServerErrorResponseType_Unavailable
            assert reply.error_response.HasField("retry_info")
            self.unavailable_replies += 1
            return
        self.admitted.add(agent)
        if len(self.admitted) == AGENTS:
            self.all_admitted.set()

    def on_disconnected(self, agent: Agent, error: Exception, retry_in: float) -> None:
        if agent not in self.admitted and isinstance(error, TransportError) and error.retry_after is not None:
            self.waits.append((error.retry_after, retry_in))


@pytest.fixture(scope="module")
def paced_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveOpampServer]:
    server = LiveOpampServer(
        tmp_path_factory.mktemp("paced") / "server",
        extra_env={
            "OPAMP_ADMISSION_RATE": str(RATE),
            "OPAMP_ADMISSION_BURST": "2",
            "OPAMP_ADMISSION_FULL_COST": "2",
        },
    )
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize("kind", ["ws", "http"])
async def test_agents_refused_at_admission_come_back_when_told_and_all_get_in(
    paced_server: LiveOpampServer, kind: str
) -> None:
    recorder = Recorder()
    settings = AgentSettings(heartbeat_interval=1.0, backoff_initial=0.01, backoff_max=0.05, shutdown_timeout=2.0)
    agents = [
        Agent(
            transport=transport_for_url(paced_server.ws_url, kind=kind, trust_env=False),  # type: ignore[arg-type]
            state=MemoryState(),
            settings=settings,
            observer=recorder,
            name=f"paced-{index}",
        )
        for index in range(AGENTS)
    ]
    tasks = [asyncio.create_task(agent.run()) for agent in agents]
    try:
        async with asyncio.timeout(25):
            await recorder.all_admitted.wait()
    finally:
        for agent in agents:
            agent.stop()
        await asyncio.wait(tasks, timeout=10)
    # Eight new agents at once against a burst of one: most were refused at least once,
    # and each waited at least what it was told (its own backoff is at most 0.05 s).
    assert len(recorder.waits) >= AGENTS // 2
    assert all(waited >= told for told, waited in recorder.waits)
    assert all(told > 0.05 for told, _ in recorder.waits)
    # WebSocket: error_response UNAVAILABLE with retry_info; HTTP: 503 with Retry-After.
    assert (recorder.unavailable_replies > 0) == (kind == "ws")
    uids = {str(uuid.UUID(bytes=agent.instance_uid)) for agent in agents}
    stored = {row["instance_uid"] for row in paced_server.api("agents/", page_size=100)["results"]}
    assert uids <= stored
