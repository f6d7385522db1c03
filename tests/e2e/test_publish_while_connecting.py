"""Agents connecting while their configuration's first version is published, end to end: a
real server process, a few hundred simulated agent_client agents over WebSocket. Every
agent must end up running the version, including those whose first report was resolved
while the publish was in flight; no Celery runs here, so no reconciler can help.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_client.agent_settings import AgentSettings
from agent_client.simulator import Fleet
from tests.support.live_server import LiveOpampServer

pytestmark = [pytest.mark.live_server, pytest.mark.asyncio]

AGENTS = 300
CONNECT_RATE = 300  # agents started per second: the publish lands among first reports
HEARTBEAT = 10
FILES = {"collector.yaml": {"body": "receivers:\n  otlp: {}\n", "content_type": "text/yaml"}}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveOpampServer]:
    # Heartbeats re-check the desired state, so an agent whose hint was lost still converges
    # within the wait; an agent the resolver never assigned does not, however often it
    # heartbeats.
    live = LiveOpampServer(tmp_path / "server", extra_env={"OPAMP_HEARTBEAT_INTERVAL_SECONDS": str(HEARTBEAT)})
    live.start()
    try:
        yield live
    finally:
        live.close()


async def test_agents_connecting_while_a_version_is_published_all_apply_it(server: LiveOpampServer) -> None:
    service = f"converge-{secrets.token_hex(3)}"
    name = f"converge-{service}"
    await asyncio.to_thread(server.api_post, "configurations/", {"name": name, "selector": f"service.name={service}"})
    fleet = Fleet(
        server=server.ws_url,
        count=AGENTS,
        settings=AgentSettings(identifying_attributes={"service.name": service}, heartbeat_interval=HEARTBEAT),
        connect_rate=CONNECT_RATE,
    )
    starting = asyncio.create_task(fleet.start())
    try:
        # Publish once about a third of the agents have had their first reply.
        deadline = time.monotonic() + 60
        while len(fleet.stats.first_reply_at) < AGENTS // 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        version = await asyncio.to_thread(server.api_post, f"configurations/{name}/versions/", {"files": FILES})
        await starting
        assert await fleet.wait_connected(60), f"{len(fleet.stats.first_reply_at)} of {AGENTS} connected"
        expected = version["config_hash"]

        status = f"configurations/{name}/versions/{version['number']}/status/"
        stale: list[str] = []
        counts: dict[str, int] = {}
        deadline = time.monotonic() + 3 * HEARTBEAT
        while time.monotonic() < deadline:
            stale = [a.name for a in fleet.agents if a.remote_config.applied_hash.hex() != expected]
            counts = await asyncio.to_thread(server.api, status)
            if not stale and counts["applied"] == AGENTS:
                break
            await asyncio.sleep(0.5)
        assert stale == [], f"{len(stale)} of {AGENTS} agents never applied the version\n{server.log()[-2000:]}"
        assert (counts["total"], counts["applied"]) == (AGENTS, AGENTS), counts
    finally:
        starting.cancel()
        await fleet.stop()
