"""End to end: the server signs each version with its Ed25519 key; agent_client, trusting the
public key, verifies before applying and reports APPLIED with the version hash."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from signing.config_signing import generate_signing_key
from tests.support.live_server import LiveOpampServer
from tests.support.processes import AgentProcess, agent_client_run

pytestmark = [pytest.mark.interop, pytest.mark.live_server]

FILES = {"collector.yaml": {"body": "receivers:\n  otlp: {}\n", "content_type": "text/yaml"}}


def test_agent_client_verifies_and_applies_a_signed_configuration(tmp_path: Path):
    pair = generate_signing_key(tmp_path / "signing-key.pem")
    public_key = tmp_path / "trusted.pem"
    public_key.write_text(pair.public_key_pem)
    server = LiveOpampServer(
        tmp_path / "server", extra_env={"OPAMP_SIGNING_KEY_FILE": str(tmp_path / "signing-key.pem")}
    )
    server.start()
    agent = AgentProcess(
        agent_client_run(
            server.ws_url,
            tmp_path / "agent",
            "--attr",
            "service.name=signed-agent",
            "--heartbeat",
            "1",
            "--trusted-key",
            str(public_key),
        ),
        tmp_path / "logs",
        name="signed-agent",
        env=dict(os.environ),
    )
    try:
        server.wait_for(lambda: server.agents(attribute="service.name=signed-agent"), what="the agent registered")
        server.api_post("configurations/", {"name": "signed", "selector": "service.name=signed-agent"})
        version = server.api_post("configurations/signed/versions/", {"files": FILES})
        uid = server.agents(attribute="service.name=signed-agent")[0]["instance_uid"]
        state = server.wait_for(
            lambda: (s := server.api(f"agents/{uid}/config/"))["state"] == "applied" and s,
            what="the signed version applied",
        )
        assert state["reported_hash"] == version["config_hash"]
        assert state["drift"] is False  # the signature file is not part of the effective config
        applied = sorted(p.name for p in (tmp_path / "agent" / "config").iterdir())
        assert applied == ["collector.yaml"]
    finally:
        agent.stop()
        server.close()
