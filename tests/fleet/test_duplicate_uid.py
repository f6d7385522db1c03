"""One instance_uid live on two server processes: the in-process duplicate rule, decided
from the agent's row (a second process is simulated by a fresh runtime on the same database)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async as sync_to_async
from django.utils import timezone

from fleet.models import Agent
from fleet.selectors import offline_after
from fleet.session_runtime import reset_runtime
from opamp.identifiers import uuid7
from tests.fleet.asgi_clients import WsAgent, http_exchange
from tests.fleet.messages import full_report, heartbeat

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]


async def agent_row(uid: bytes) -> Agent:
    return await sync_to_async(Agent.objects.get)(instance_uid=uuid.UUID(bytes=uid))


async def test_a_different_agent_on_a_uid_live_on_another_process_gets_a_new_one(caplog):
    uid = uuid7().bytes
    async with WsAgent() as first:
        await first.exchange(full_report(uid, 1, service="checkout"))
        reset_runtime()  # what follows is served by another process
        async with WsAgent() as impostor:
            reply = await impostor.exchange(full_report(uid, 1, service="payments"))
            new_uid = reply.agent_identification.new_instance_uid
            assert len(new_uid) == 16 and new_uid != uid
            row = await agent_row(uid)
            assert row.identifying_attributes["service.name"] == "checkout"
            assert row.last_sequence_num == 1
            assert "live on another server process" in caplog.text
            # The newcomer continues under its new uid, as a new agent.
            follow_up = await impostor.exchange(full_report(new_uid, 2, service="payments"))
            assert follow_up.instance_uid == new_uid
            assert (await agent_row(new_uid)).identifying_attributes["service.name"] == "payments"
        # The original keeps being served, its row untouched.
        assert (await first.exchange(heartbeat(uid, 2))).instance_uid == uid
        assert (await agent_row(uid)).identifying_attributes["service.name"] == "checkout"


async def test_the_same_agent_after_its_process_died_continues_under_its_uid():
    uid = uuid7().bytes
    async with WsAgent() as first:
        await first.exchange(full_report(uid, 1, service="checkout"))
        reset_runtime()  # its process is gone without closing; the row still says connected
        assert (await agent_row(uid)).connected is True
        async with WsAgent() as again:
            reply = await again.exchange(full_report(uid, 2, service="checkout"))
            assert not reply.HasField("agent_identification")
            assert (await again.exchange(heartbeat(uid, 3))).instance_uid == uid
            row = await agent_row(uid)
            assert row.connected is True and row.identifying_attributes["service.name"] == "checkout"


async def test_changed_attributes_after_the_row_went_stale_are_taken_as_the_same_agent():
    uid = uuid7().bytes
    async with WsAgent() as first:
        await first.exchange(full_report(uid, 1, service="checkout"))
        reset_runtime()
        long_ago = timezone.now() - offline_after() - timedelta(seconds=5)
        await sync_to_async(Agent.objects.filter(instance_uid=uuid.UUID(bytes=uid)).update)(last_seen=long_ago)
        async with WsAgent() as renamed:
            reply = await renamed.exchange(full_report(uid, 2, service="payments"))
            assert not reply.HasField("agent_identification")
            assert (await agent_row(uid)).identifying_attributes["service.name"] == "payments"


async def test_a_disconnected_row_takes_changed_attributes():
    uid = uuid7().bytes
    async with WsAgent() as first:
        await first.exchange(full_report(uid, 1, service="checkout"))
    reset_runtime()
    async with WsAgent() as renamed:
        reply = await renamed.exchange(full_report(uid, 2, service="payments"))
        assert not reply.HasField("agent_identification")
        assert (await agent_row(uid)).identifying_attributes["service.name"] == "payments"


async def test_an_http_agent_is_not_given_a_new_uid_as_in_process():
    uid = uuid7().bytes
    async with WsAgent() as first:
        await first.exchange(full_report(uid, 1, service="checkout"))
        reset_runtime()
        reply = await http_exchange(full_report(uid, 2, service="payments"))
        assert not reply.HasField("agent_identification")
