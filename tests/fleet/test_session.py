"""The session logic through the WebSocket and HTTP transports of the real ASGI app."""

from __future__ import annotations

import uuid

import channels.consumer
import pytest
from channels.db import database_sync_to_async as sync_to_async

from fleet.models import Agent
from fleet.session_runtime import BASE_SERVER_CAPABILITIES, reset_runtime, runtime
from opamp.capabilities import ServerToAgentFlags
from opamp.identifiers import uuid7
from rollouts.package_contributor import PACKAGES_CAPABILITIES
from rollouts.session_contributor import REMOTE_CONFIG_CAPABILITIES
from tests.fleet.asgi_clients import WsAgent, http_exchange
from tests.fleet.messages import full_report, heartbeat

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

SERVER_CAPABILITIES = BASE_SERVER_CAPABILITIES | REMOTE_CONFIG_CAPABILITIES | PACKAGES_CAPABILITIES


async def agent_row(uid: bytes) -> Agent:
    return await sync_to_async(Agent.objects.get)(instance_uid=uuid.UUID(bytes=uid))


async def test_every_reply_echoes_the_instance_uid_and_carries_capabilities():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        first = await agent.exchange(full_report(uid, 1))
        second = await agent.exchange(heartbeat(uid, 2))
    assert first.instance_uid == uid and second.instance_uid == uid
    assert first.capabilities == SERVER_CAPABILITIES


async def test_a_new_agent_whose_first_message_is_complete_is_not_asked_again():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        first = await agent.exchange(full_report(uid, 1))
    assert not first.flags & ServerToAgentFlags.REPORT_FULL_STATE


async def test_a_new_agent_with_an_incomplete_first_report_is_asked_for_its_full_state_once():
    uid = uuid7().bytes
    incomplete = full_report(uid, 1)
    incomplete.ClearField("health")  # it declares ReportsHealth
    async with WsAgent() as agent:
        first = await agent.exchange(incomplete)
        second = await agent.exchange(full_report(uid, 2))
        third = await agent.exchange(heartbeat(uid, 3))
    assert first.flags & ServerToAgentFlags.REPORT_FULL_STATE
    assert not second.flags & ServerToAgentFlags.REPORT_FULL_STATE
    assert not third.flags & ServerToAgentFlags.REPORT_FULL_STATE


async def test_a_sequence_gap_gets_report_full_state():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1))
        await agent.exchange(full_report(uid, 2))
        gap = await agent.exchange(heartbeat(uid, 5))
        after = await agent.exchange(heartbeat(uid, 6))
        full_after_gap = await agent.exchange(full_report(uid, 9))
    assert gap.flags & ServerToAgentFlags.REPORT_FULL_STATE
    assert not after.flags & ServerToAgentFlags.REPORT_FULL_STATE
    assert not full_after_gap.flags & ServerToAgentFlags.REPORT_FULL_STATE


async def test_the_inventory_holds_what_the_agent_reported():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1, service="checkout", extra_identifying={"replicas": 3}))
        row = await agent_row(uid)
    assert row.identifying_attributes["service.name"] == "checkout"
    assert row.identifying_attributes["replicas"] == 3
    assert row.non_identifying_attributes == {"host.name": "node-1"}
    assert row.healthy is True
    assert row.health["components"]["receiver/otlp"]["healthy"] is True
    assert row.effective_config[""]["body"] == "receivers: {}\n"
    assert len(row.effective_config_hash) == 64
    assert row.transport == "websocket"
    assert row.connected is True


async def test_an_absent_sub_message_leaves_the_stored_one_unchanged():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1))
        update = heartbeat(uid, 2)
        update.health.healthy = False
        update.health.last_error = "exporter down"
        await agent.exchange(update)
        await runtime().statuses.flush()  # status reports are written in batches
        row = await agent_row(uid)
    assert row.healthy is False
    assert row.health["last_error"] == "exporter down"
    assert row.identifying_attributes["service.name"] == "checkout"
    assert row.effective_config[""]["body"] == "receivers: {}\n"


async def test_request_instance_uid_gets_a_new_uuid7_and_rekeys_the_agent():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1))
        request = heartbeat(uid, 2)
        request.flags = 0x1
        reply = await agent.exchange(request)
        new_uid = reply.agent_identification.new_instance_uid
        assert uuid.UUID(bytes=new_uid).version == 7
        assert reply.instance_uid == uid
        follow_up = await agent.exchange(full_report(new_uid, 3))
    assert follow_up.instance_uid == new_uid
    row = await agent_row(new_uid)
    assert row.identifying_attributes["service.name"] == "checkout"
    assert not await sync_to_async(Agent.objects.filter(instance_uid=uuid.UUID(bytes=uid)).exists)()


async def test_a_second_agent_claiming_a_live_uid_gets_a_new_one():
    uid = uuid7().bytes
    async with WsAgent() as first, WsAgent() as impostor:
        await first.exchange(full_report(uid, 1, service="checkout"))
        reply = await impostor.exchange(full_report(uid, 1, service="payments"))
        assert len(reply.agent_identification.new_instance_uid) == 16
        assert reply.agent_identification.new_instance_uid != uid
        # The original keeps being served.
        assert (await first.exchange(heartbeat(uid, 2))).instance_uid == uid


async def test_the_same_agent_reconnecting_takes_over_its_old_socket():
    uid = uuid7().bytes
    async with WsAgent() as old, WsAgent() as new:
        await old.exchange(full_report(uid, 1))
        reply = await new.exchange(full_report(uid, 2))
        assert not reply.HasField("agent_identification")
        closed = await old.receive_close()
        assert closed["code"] == 1000
        # The old socket's close must not mark the agent disconnected: the new one holds it.
        assert (await agent_row(uid)).connected is True
        assert (await new.exchange(heartbeat(uid, 3))).instance_uid == uid


async def test_agent_disconnect_marks_the_agent_disconnected():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1))
        goodbye = heartbeat(uid, 2)
        goodbye.agent_disconnect.SetInParent()
        await agent.exchange(goodbye)
        row = await agent_row(uid)
        assert row.connected is False
        assert row.disconnected_at is not None
        assert row.sequence_num == 2


async def test_closing_the_socket_marks_the_agent_disconnected():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1))
        assert (await agent_row(uid)).connected is True
    assert (await agent_row(uid)).connected is False


async def test_after_a_server_restart_a_known_agent_continuing_its_sequence_is_not_asked_again():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1))
        await agent.exchange(full_report(uid, 2))
    reset_runtime()  # the process restarts; the database keeps the reports
    async with WsAgent() as agent:
        reply = await agent.exchange(heartbeat(uid, 3))
    assert not reply.flags & ServerToAgentFlags.REPORT_FULL_STATE


async def test_after_a_server_restart_a_stale_database_gets_report_full_state():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1))
        await agent.exchange(heartbeat(uid, 2))  # buffered, never flushed
    reset_runtime()
    async with WsAgent() as agent:
        reply = await agent.exchange(heartbeat(uid, 40))
    assert reply.flags & ServerToAgentFlags.REPORT_FULL_STATE


async def test_a_heartbeat_only_agent_without_description_is_asked_for_full_state():
    uid = uuid7().bytes
    reply = await http_exchange(heartbeat(uid, 1))
    assert reply.flags & ServerToAgentFlags.REPORT_FULL_STATE
    reply = await http_exchange(heartbeat(uid, 2))
    assert reply.flags & ServerToAgentFlags.REPORT_FULL_STATE
    reply = await http_exchange(full_report(uid, 3))
    assert not reply.flags & ServerToAgentFlags.REPORT_FULL_STATE


async def test_http_agents_are_inventoried_like_websocket_agents():
    uid = uuid7().bytes
    reply = await http_exchange(full_report(uid, 1, service="edge"))
    assert reply.instance_uid == uid
    assert reply.capabilities == SERVER_CAPABILITIES
    row = await agent_row(uid)
    assert row.transport == "http"
    assert row.identifying_attributes["service.name"] == "edge"
    assert row.connected is True


async def test_undefined_capability_bits_are_not_stored():
    uid = uuid7().bytes
    await http_exchange(full_report(uid, 1, capabilities=(1 << 63) | (1 << 20) | 0x3))
    assert (await agent_row(uid)).capabilities == 0x3


async def test_available_components_hash_without_details_asks_for_them():
    uid = uuid7().bytes
    message = full_report(uid, 1, capabilities=0x1 | 0x4000)
    message.available_components.hash = b"\x01\x02"
    reply = await http_exchange(message)
    assert reply.flags & ServerToAgentFlags.REPORT_AVAILABLE_COMPONENTS


async def test_the_components_flag_is_not_sent_to_agents_without_the_capability():
    uid = uuid7().bytes
    message = full_report(uid, 1, capabilities=0x1)
    message.available_components.hash = b"\x01\x02"
    reply = await http_exchange(message)
    assert not reply.flags & ServerToAgentFlags.REPORT_AVAILABLE_COMPONENTS


async def test_frames_and_hints_cost_no_hop_to_the_shared_sync_thread(monkeypatch):
    """Channels' dispatch runs close_old_connections in its one sync thread before every
    handler; the OpAMP consumer's handlers reach the database only through fleet.db."""
    hops = 0

    async def counting_close_old_connections() -> None:
        nonlocal hops
        hops += 1

    monkeypatch.setattr(channels.consumer, "aclose_old_connections", counting_close_old_connections)
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1))
        await agent.exchange(heartbeat(uid, 2))
        await agent.exchange(heartbeat(uid, 3))
    assert hops == 0
