"""Our agent_client CLI, over WebSocket and over HTTP, against a real server process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.support.live_server import LiveOpampServer
from tests.support.processes import AgentProcess, agent_client_run

pytestmark = [pytest.mark.interop, pytest.mark.live_server]


def start_agent(server: LiveOpampServer, tmp_path: Path, *, transport: str, name: str) -> AgentProcess:
    url = server.ws_url if transport == "ws" else server.http_url
    command = agent_client_run(
        url,
        tmp_path / name / "state",
        "--attr",
        f"service.name={name}",
        "--label",
        "deployment.environment=interop",
        "--heartbeat",
        "1",
    )
    return AgentProcess(command, tmp_path / name, name=name, env=dict(os.environ))


def entry(server: LiveOpampServer, name: str) -> dict[str, Any] | None:
    agents = server.agents(attribute=f"service.name={name}")
    return server.api(f"agents/{agents[0]['instance_uid']}/") if agents else None


def registered(server: LiveOpampServer, name: str, transport: str) -> dict[str, Any]:
    agent = server.wait_for(
        lambda: (found := entry(server, name)) and found["health"] and found["effective_config"] is not None and found,
        what=f"{name} registered with its full report",
    )
    assert agent["transport"] == ("websocket" if transport == "ws" else "http")
    assert agent["non_identifying_attributes"]["deployment.environment"] == "interop"
    assert agent["healthy"] is True
    assert agent["status"] == "online"
    return agent


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_agent_client_registers_and_recovers_after_the_server_loses_its_state(
    transport: str, opamp_server: LiveOpampServer, tmp_path: Path
):
    name = f"agent-client-{transport}"
    agent = start_agent(opamp_server, tmp_path, transport=transport, name=name)
    try:
        before = registered(opamp_server, name, transport)
        opamp_server.restart(fresh_database=True)
        after = registered(opamp_server, name, transport)
        # The persistent instance_uid survives; the full report restored the inventory.
        assert after["instance_uid"] == before["instance_uid"]
        assert after["identifying_attributes"] == before["identifying_attributes"]
    finally:
        exit_code = agent.stop()
    assert exit_code == 0, agent.output()
    opamp_server.wait_for(
        lambda: (found := entry(opamp_server, name)) and not found["connected"],
        what="agent_disconnect on shutdown marking it disconnected",
    )
