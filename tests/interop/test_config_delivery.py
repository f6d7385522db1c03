"""A published configuration reaches every kind of client; failures show; rollback restores.

Four agents at once against one real server process: agent_client over WebSocket and over
HTTP, the npm client and the PyPI client (both HTTP). Everything is driven and observed
through the REST API, as an operator's automation would.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.live_server import LiveOpampServer
from tests.support.processes import AgentProcess

pytestmark = [pytest.mark.interop, pytest.mark.live_server]

MARKER = "BROKEN-FOR-INTEROP"
GOOD = {"collector.yaml": {"body": "receivers:\n  otlp: {}\n", "content_type": "text/yaml"}}
BAD = {"collector.yaml": {"body": f"# {MARKER}\nreceivers: {{}}\n", "content_type": "text/yaml"}}


def start_agents(
    server: LiveOpampServer, tmp_path: Path, node_command: list[str], python_command: list[str]
) -> dict[str, AgentProcess]:
    env = dict(os.environ)
    agents = {}
    for transport in ("ws", "http"):
        name = f"deliver-agent-client-{transport}"
        agents[name] = AgentProcess(
            [
                sys.executable,
                "-m",
                "agent_client",
                "run",
                "--server",
                server.ws_url if transport == "ws" else server.http_url,
                "--state-dir",
                str(tmp_path / name),
                "--attr",
                f"service.name={name}",
                "--heartbeat",
                "1",
                "--fail-if-contains",
                MARKER,
            ],
            tmp_path / "logs",
            name=name,
            env=env,
        )
    for client, command in (("node", node_command), ("python", python_command)):
        name = f"deliver-{client}"
        agents[name] = AgentProcess(
            [
                *command,
                "--endpoint",
                server.http_url,
                "--service-name",
                name,
                "--instance-id",
                f"{name}-1",
                "--heartbeat-seconds",
                "1",
                "--fail-if-contains",
                MARKER,
            ],
            tmp_path / "logs",
            name=name,
            env=env,
        )
    return agents


def config_states(server: LiveOpampServer, names: list[str]) -> dict[str, dict[str, Any]]:
    states = {}
    for name in names:
        agents = server.agents(attribute=f"service.name={name}")
        if agents:
            states[name] = server.api(f"agents/{agents[0]['instance_uid']}/config/")
    return states


def wait_for_state(server: LiveOpampServer, names: list[str], *, version: int, state: str) -> dict[str, dict[str, Any]]:
    last_seen: dict[str, dict[str, Any]] = {}

    def reached() -> dict[str, dict[str, Any]] | None:
        states = config_states(server, names)
        last_seen.clear()
        last_seen.update(states)
        done = len(states) == len(names) and all(
            s["desired_version"] == version and s["state"] == state for s in states.values()
        )
        return states if done else None

    try:
        return server.wait_for(reached, timeout=90, what=f"every agent {state} on version {version}")
    except AssertionError as timeout:
        # Which agent lagged, and where it stood, is what a failure here needs to show.
        lagging = {name: last_seen.get(name) for name in names}
        raise AssertionError(f"{timeout}\n--- last states ---\n{lagging}") from None


def test_every_client_applies_fails_and_rolls_back_a_configuration(
    opamp_server: LiveOpampServer, tmp_path: Path, node_client_command: list[str], python_client_command: list[str]
):
    agents = start_agents(opamp_server, tmp_path, node_client_command, python_client_command)
    names = sorted(agents)
    try:
        opamp_server.wait_for(
            lambda: all(opamp_server.agents(attribute=f"service.name={n}") for n in names),
            what="all four agents in the inventory",
        )
        selector = {"matchExpressions": [{"key": "service.name", "operator": "In", "values": names}]}
        opamp_server.api_post("configurations/", {"name": "interop", "selector": selector})

        good = opamp_server.api_post("configurations/interop/versions/", {"files": GOOD})
        applied = wait_for_state(opamp_server, names, version=good["number"], state="applied")
        assert {s["reported_hash"] for s in applied.values()} == {good["config_hash"]}
        status = opamp_server.api(f"configurations/interop/versions/{good['number']}/status/")
        assert status["applied"] == 4

        bad = opamp_server.api_post("configurations/interop/versions/", {"files": BAD})
        failed = wait_for_state(opamp_server, names, version=bad["number"], state="failed")
        for name, state in failed.items():
            assert state["reported_hash"] == bad["config_hash"], name
            assert state["error"], f"{name} reported no error"
            assert state["summary"].startswith(f"failed on version {bad['number']}: ")
        assert opamp_server.api(f"configurations/interop/versions/{bad['number']}/status/")["failed"] == 4

        restored = opamp_server.api_post("configurations/interop/rollback/", {"version": good["number"]})
        assert restored["config_hash"] == good["config_hash"]
        back = wait_for_state(opamp_server, names, version=restored["number"], state="applied")
        assert {s["reported_hash"] for s in back.values()} == {good["config_hash"]}
    finally:
        for agent in agents.values():
            agent.stop()
