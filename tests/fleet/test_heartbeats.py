from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from fleet.heartbeats import Heartbeat, HeartbeatBuffer, write_heartbeats
from fleet.models import Agent
from fleet.session_runtime import runtime
from opamp.identifiers import uuid7
from tests.fleet.asgi_clients import WsAgent
from tests.fleet.factories import AgentFactory
from tests.fleet.messages import full_report, heartbeat


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_heartbeats_write_no_row_until_the_flush():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1))
        before = await Agent.objects.aget(instance_uid=uuid.UUID(bytes=uid))
        for seq in range(2, 12):
            await agent.exchange(heartbeat(uid, seq))
        unchanged = await Agent.objects.aget(pk=before.pk)
        assert (unchanged.updated_at, unchanged.sequence_num) == (before.updated_at, 1)
        assert runtime().heartbeats.pending_count == 1
        assert await runtime().heartbeats.flush() == 1
        flushed = await Agent.objects.aget(pk=before.pk)
        assert flushed.sequence_num == 11
        assert flushed.last_seen > before.last_seen


@pytest.mark.django_db
def test_one_flush_updates_many_agents_with_a_bounded_number_of_queries():
    agents = AgentFactory.create_batch(300, last_seen=timezone.now() - timedelta(minutes=5))
    seen = timezone.now()
    beats = {agent.instance_uid: Heartbeat(seen, 2**64 - 2) for agent in agents}
    with CaptureQueriesContext(connection) as queries:
        assert write_heartbeats(beats) == 300
    writes = [q for q in queries.captured_queries if q["sql"].lstrip().upper().startswith("UPDATE")]
    # PostgreSQL: one UPDATE ... FROM unnest; SQLite: bulk_update, split by its variable limit.
    if connection.vendor == "postgresql":
        assert len(writes) == 1
    else:
        assert len(writes) <= 5
    assert Agent.objects.filter(last_seen=seen).count() == 300
    assert {agent.sequence_num for agent in Agent.objects.all()} == {2**64 - 2}


@pytest.mark.django_db
def test_a_flush_never_moves_last_seen_backwards():
    newer = timezone.now()
    agent = AgentFactory(last_seen=newer)
    write_heartbeats({agent.instance_uid: Heartbeat(newer - timedelta(seconds=30), 5)})
    agent.refresh_from_db()
    assert agent.last_seen == newer
    assert agent.sequence_num == 5


@pytest.mark.django_db
def test_a_heartbeat_marks_a_swept_agent_connected_again():
    agent = AgentFactory(connected=False, last_seen=timezone.now() - timedelta(minutes=10))
    seen = timezone.now()
    write_heartbeats({agent.instance_uid: Heartbeat(seen, 9)})
    agent.refresh_from_db()
    assert agent.connected is True
    assert agent.connected_at == seen


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_the_buffer_flushes_by_itself():
    buffer = HeartbeatBuffer(flush_seconds=0.05)
    agent = await AgentFactory._meta.model.objects.acreate(
        instance_uid=uuid7(), last_seen=timezone.now() - timedelta(minutes=1)
    )
    seen = timezone.now()
    buffer.note(agent.instance_uid, seen, 3)
    for _ in range(100):
        await asyncio.sleep(0.02)
        if buffer.pending_count == 0:
            break
    await asyncio.sleep(0.1)
    refreshed = await Agent.objects.aget(pk=agent.pk)
    assert refreshed.sequence_num == 3
    assert refreshed.last_seen == seen
