"""Telemetry connection settings on the agent: declared, applied, written out, reported."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent_client import Agent, FileState, transport_for_url
from agent_client.agent_connection_settings import SETTINGS_FILE
from agent_client.credentials import CredentialStore, build_csr, generate_key
from agent_client.enrollment import EnrollmentSettings
from agent_client.testing import FakeWebSocketServer
from opamp.capabilities import AgentCapabilities
from opamp.proto import opamp_pb2 as pb
from tests.agent_client.helpers import QUIET, make_agent, running
from tests.agent_client.pki import TOKEN, EnrollingServer, issue, new_ca, offer_for

ACCEPTING = replace(QUIET, accept_connection_settings=True)


def offer(endpoint: str = "https://otlp.example/v1/metrics", heartbeat: int = 0) -> pb.ServerToAgent:
    reply = pb.ServerToAgent()
    settings = reply.connection_settings
    settings.own_metrics.destination_endpoint = endpoint
    settings.own_metrics.headers.headers.add(key="Authorization", value="Bearer m")
    settings.other_connections["db"].destination_endpoint = "https://db.example"
    if heartbeat:
        settings.opamp.destination_endpoint = "/v1/opamp"
        settings.opamp.heartbeat_interval_seconds = heartbeat
    settings.hash = bytes([len(endpoint), heartbeat]) * 16
    return reply


async def next_status(server: FakeWebSocketServer) -> pb.ConnectionSettingsStatus:
    while True:
        message = await server.next_message()
        if message.HasField("connection_settings_status"):
            return message.connection_settings_status


async def test_the_capabilities_are_declared_only_when_configured(ws_server: FakeWebSocketServer, state_dir: Path):
    agent = make_agent(ws_server.url, state_dir, ACCEPTING)
    wanted = AgentCapabilities.REPORTS_OWN_METRICS | AgentCapabilities.ACCEPTS_OTHER_CONNECTION_SETTINGS
    assert agent.capabilities & wanted == wanted
    assert agent.capabilities & AgentCapabilities.ACCEPTS_OPAMP_CONNECTION_SETTINGS
    assert not make_agent(ws_server.url, state_dir / "other", QUIET).capabilities & wanted


async def test_offered_settings_are_written_applied_and_reported_with_the_hash(
    ws_server: FakeWebSocketServer, state_dir: Path
):
    agent = make_agent(ws_server.url, state_dir, ACCEPTING)
    async with running(agent):
        await ws_server.next_message()
        sent = offer(heartbeat=7)
        await ws_server.push(sent)
        applying = await next_status(ws_server)
        assert applying.status == pb.ConnectionSettingsStatuses_APPLYING
        applied = await next_status(ws_server)
        assert applied.status == pb.ConnectionSettingsStatuses_APPLIED
        assert applied.last_connection_settings_hash == sent.connection_settings.hash
        assert agent.heartbeat_interval == 7.0  # adopted from the offer, without a certificate
    written = json.loads((state_dir / SETTINGS_FILE).read_text())
    assert written["hash"] == sent.connection_settings.hash.hex()
    assert written["settings"]["own_metrics"] == {
        "destination_endpoint": "https://otlp.example/v1/metrics",
        "headers": {"Authorization": "Bearer m"},
    }
    assert written["settings"]["other_connections"]["db"]["destination_endpoint"] == "https://db.example"
    # A restarted agent reports what it applied in its first (full) report.
    again = make_agent(ws_server.url, state_dir, ACCEPTING)
    async with running(again):
        first = await ws_server.next_message()
        while not first.HasField("agent_description"):  # the first agent's last messages
            first = await ws_server.next_message()
    assert first.connection_settings_status.last_connection_settings_hash == sent.connection_settings.hash
    assert first.connection_settings_status.status == pb.ConnectionSettingsStatuses_APPLIED


async def test_settings_that_cannot_be_written_are_reported_failed(ws_server: FakeWebSocketServer, state_dir: Path):
    agent = make_agent(ws_server.url, state_dir, ACCEPTING)
    (state_dir / SETTINGS_FILE).mkdir(parents=True)  # where the file should go: not writable as one
    async with running(agent):
        await ws_server.next_message()
        sent = offer()
        await ws_server.push(sent)
        assert (await next_status(ws_server)).status == pb.ConnectionSettingsStatuses_APPLYING
        failed = await next_status(ws_server)
    assert failed.status == pb.ConnectionSettingsStatuses_FAILED
    assert failed.last_connection_settings_hash == sent.connection_settings.hash
    assert "could not write the connection settings" in failed.error_message


async def test_an_agent_that_does_not_accept_them_ignores_the_offer(ws_server: FakeWebSocketServer, state_dir: Path):
    agent = make_agent(ws_server.url, state_dir, QUIET)
    async with running(agent):
        await ws_server.next_message()
        await ws_server.push(offer())
        await ws_server.push(pb.ServerToAgent(flags=1))  # ask for a full report to see its status
        report = await ws_server.next_message()
    assert not report.HasField("connection_settings_status")
    assert not (state_dir / SETTINGS_FILE).exists()


async def test_a_refused_certificate_in_the_same_offer_is_what_the_status_says(
    ws_server: FakeWebSocketServer, state_dir: Path
):
    ca = new_ca(now=datetime.now(UTC) - timedelta(days=10))
    ws_server.responder = EnrollingServer(ca, auto_approve=False)
    agent = Agent(
        transport=transport_for_url(ws_server.url, trust_env=False),
        state=FileState(state_dir),
        settings=replace(ACCEPTING, enrollment=EnrollmentSettings(token=TOKEN)),
        credentials=CredentialStore(state_dir),
    )
    async with running(agent):
        while True:
            message = await ws_server.next_message()
            if message.HasField("connection_settings_request"):
                break
        other_key = build_csr(generate_key(), agent.instance_uid)
        merged = offer_for(issue(ca, other_key, agent.instance_uid), ca)  # not the pending key's
        merged.own_metrics.destination_endpoint = "https://otlp.example/v1/metrics"
        await ws_server.push(pb.ServerToAgent(instance_uid=agent.instance_uid, connection_settings=merged))
        statuses = [await next_status(ws_server) for _ in range(3)]
    # The settings were applied, the certificate refused: the offer as a whole failed.
    assert [status.status for status in statuses[:2]] == [
        pb.ConnectionSettingsStatuses_APPLYING,
        pb.ConnectionSettingsStatuses_APPLIED,
    ]
    assert statuses[2].status == pb.ConnectionSettingsStatuses_FAILED
    assert statuses[2].last_connection_settings_hash == merged.hash
    assert "public key" in statuses[2].error_message
