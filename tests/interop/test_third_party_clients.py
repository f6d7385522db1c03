"""The npm and PyPI OpAMP clients against a real server process (daphne on a free port)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests.support.live_server import LiveOpampServer
from tests.support.processes import AgentProcess

pytestmark = [pytest.mark.interop, pytest.mark.live_server]

REPORT_FULL_STATE = 0x1


def start_client(command: list[str], server: LiveOpampServer, tmp_path: Path, *, name: str) -> AgentProcess:
    args = [
        *command,
        "--endpoint",
        server.http_url,
        "--service-name",
        name,
        "--instance-id",
        f"{name}-1",
        "--heartbeat-seconds",
        "1",
    ]
    return AgentProcess(args, tmp_path / name, name=name, env=dict(os.environ))


def inventory_entry(server: LiveOpampServer, service_name: str) -> dict[str, Any] | None:
    agents = server.agents(attribute=f"service.name={service_name}")
    return agents[0] if agents else None


def assert_registered_with_attributes(server: LiveOpampServer, service_name: str) -> dict[str, Any]:
    agent = server.wait_for(
        lambda: (
            (entry := inventory_entry(server, service_name))
            and entry["non_identifying_attributes"].get("host.name")
            and entry
        ),
        what=f"{service_name} in the inventory with its attributes",
    )
    assert agent["identifying_attributes"]["service.instance.id"] == f"{service_name}-1"
    assert agent["transport"] == "http"
    assert agent["status"] == "online"
    return agent


@pytest.mark.parametrize("client", ["node", "python"])
def test_a_third_party_client_registers_and_recovers_after_the_server_loses_its_state(
    client: str, request: pytest.FixtureRequest, opamp_server: LiveOpampServer, tmp_path: Path
):
    command = request.getfixturevalue(f"{client}_client_command")
    name = f"interop-{client}"
    agent = start_client(command, opamp_server, tmp_path, name=name)
    try:
        registered = assert_registered_with_attributes(opamp_server, name)

        # Restart with an empty database: the server knows nothing about the agent any more.
        seen = len(agent.events())
        opamp_server.restart(fresh_database=True)
        # No "not in the inventory" check here: with 1 s heartbeats the client may already
        # be back by the time one could look. ReportFullState is the proof that the server
        # held nothing about it.
        agent.wait_for_event(
            lambda e: e["event"] == "message" and e["flags"] & REPORT_FULL_STATE,
            after=seen,
            timeout=90,
            what="ReportFullState after the restart",
        )
        agent.wait_for_event(
            lambda e: e["event"] == "sent" and e["has_agent_description"],
            after=seen,
            timeout=30,
            what="a full report after the restart",
        )
        recovered = assert_registered_with_attributes(opamp_server, name)
        assert recovered["instance_uid"] == registered["instance_uid"]
        assert recovered["identifying_attributes"] == registered["identifying_attributes"]
    finally:
        exit_code = agent.stop()
    assert exit_code == 0, agent.output()


@pytest.mark.parametrize("client", ["node", "python"])
def test_a_third_party_client_survives_a_plain_server_restart(
    client: str, request: pytest.FixtureRequest, opamp_server: LiveOpampServer, tmp_path: Path
):
    command = request.getfixturevalue(f"{client}_client_command")
    name = f"restart-{client}"
    agent = start_client(command, opamp_server, tmp_path, name=name)
    try:
        before = assert_registered_with_attributes(opamp_server, name)
        opamp_server.restart()
        seen = len(agent.events())
        agent.wait_for_event(
            lambda e: e["event"] == "message" and not e["has_error_response"],
            after=seen,
            timeout=90,
            what="a reply from the restarted server",
        )
        after = opamp_server.wait_for(
            lambda: (
                (entry := inventory_entry(opamp_server, name)) and entry["last_seen"] > before["last_seen"] and entry
            ),
            what="last_seen advancing after the restart",
        )
        assert after["identifying_attributes"] == before["identifying_attributes"]
        assert after["status"] == "online"
    finally:
        agent.stop()


def test_the_python_client_disconnect_marks_the_agent_disconnected(
    python_client_command: list[str], opamp_server: LiveOpampServer, tmp_path: Path
):
    agent = start_client(python_client_command, opamp_server, tmp_path, name="bye-python")
    assert_registered_with_attributes(opamp_server, "bye-python")
    assert agent.stop() == 0
    stopped = [e for e in agent.events() if e["event"] == "stopped"]
    assert stopped and stopped[0]["disconnect_sent"]
    opamp_server.wait_for(
        lambda: (entry := inventory_entry(opamp_server, "bye-python")) and not entry["connected"],
        what="the agent marked disconnected",
    )


@pytest.mark.parametrize("client", ["node", "python"])
def test_a_third_party_client_needs_a_token_where_credentials_are_required(
    client: str, request: pytest.FixtureRequest, tmp_path: Path
):
    """The production setting, with clients that know nothing of this server: a bearer token
    in a plain extra header is all they need, and without one they are kept out."""
    command = request.getfixturevalue(f"{client}_client_command")
    server = LiveOpampServer(tmp_path / "server", extra_env={"OPAMP_AGENT_AUTH": "required"})
    server.start()
    outsider = enrolled = None
    try:
        token = server.api_post(
            "enrollment-tokens/",
            {"name": f"interop {client}", "expires_in_seconds": 600, "max_uses": 1, "labels": {"enrolled": "yes"}},
        )
        outsider = start_client(command, server, tmp_path, name=f"outsider-{client}")
        enrolled = start_client(
            [*command, "--header", f"Authorization: Bearer {token['secret']}"],
            server,
            tmp_path,
            name=f"enrolled-{client}",
        )
        agent = assert_registered_with_attributes(server, f"enrolled-{client}")
        labels = server.api(f"agents/{agent['instance_uid']}/labels/")
        assert labels["operator_labels"] == {"enrolled": "yes"}
        # By now the outsider has tried several times (1 s heartbeats), each refused with 401.
        assert inventory_entry(server, f"outsider-{client}") is None
        # The access line: daphne writes `"POST /v1/opamp" 401`, uvicorn `"POST /v1/opamp HTTP/1.1" 401`.
        assert re.search(r'"POST /v1/opamp( HTTP/1\.1)?" 401', server.log())
    finally:
        for process in (outsider, enrolled):
            if process is not None:
                process.stop()
        server.close()
