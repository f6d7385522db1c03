"""Status reports of known agents are held per process and written in batches."""

from __future__ import annotations

import logging
import uuid

import pytest
from channels.db import database_sync_to_async
from django.db import connection

from fleet.agent_labels import agent_labels_set
from fleet.models import Agent, RemoteConfigState
from fleet.services import StatusWrite
from fleet.session_runtime import runtime
from opamp.identifiers import uuid7
from opamp.proto import opamp_pb2
from rollouts import services
from rollouts.models import RolloutTarget
from rollouts.rollout_services.verbs import rollout_start
from tests.fleet.asgi_clients import WsAgent
from tests.fleet.messages import config_status, full_report, heartbeat
from tests.rollouts.rollout_helpers import CANDIDATE, STABLE, standard_rollout

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]


def health(uid: bytes, seq: int, *, healthy: bool) -> opamp_pb2.AgentToServer:
    message = heartbeat(uid, seq)
    message.health.healthy = healthy
    message.health.status = "running" if healthy else "degraded"
    return message


async def agent_row(uid: bytes) -> Agent:
    return await Agent.objects.aget(instance_uid=uuid.UUID(bytes=uid))


@database_sync_to_async
def running_rollout() -> tuple[str, list[int]]:
    """A rollout in its first stage over the agents inventoried so far: the candidate's
    hash and the canaries' ids (one agent is labelled a canary, so there is one)."""
    canary = Agent.objects.order_by("pk").first()
    assert canary is not None
    agent_labels_set(instance_uid=canary.instance_uid, labels={"deployment.canary": "true"}, actor=None, replace=False)
    configuration = services.configuration_create(name="fleet", selector="service.name=checkout", actor=None)
    services.configuration_publish(configuration=configuration, files=STABLE, author=None)
    candidate, _ = services.configuration_publish(
        configuration=configuration, files=CANDIDATE, author=None, activate=False
    )
    rollout = standard_rollout(configuration, candidate)
    assert rollout_start(rollout=rollout, actor=None)
    return candidate.config_hash, list(RolloutTarget.objects.values_list("agent_id", flat=True))


async def test_status_reports_are_written_together_at_the_flush():
    uids = [uuid7().bytes for _ in range(3)]
    async with WsAgent() as agent:
        for uid in uids:
            await agent.exchange(full_report(uid, 1, service="other"))
            await agent.exchange(health(uid, 2, healthy=False))
        assert [(await agent_row(uid)).healthy for uid in uids] == [True, True, True]
        assert runtime().statuses.pending_count == 3
        assert await runtime().statuses.flush() == 3
    assert [(await agent_row(uid)).healthy for uid in uids] == [False, False, False]


async def test_reports_held_together_keep_the_newest_value_of_each_field_and_each_answer():
    uids = [uuid7().bytes for _ in range(20)]
    async with WsAgent() as agent:
        for uid in uids:
            await agent.exchange(full_report(uid, 1, service="checkout"))
    candidate_hash, canaries = await running_rollout()
    canary = await Agent.objects.aget(pk=canaries[0])
    uid = canary.instance_uid.bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 10, service="checkout"))
        await agent.exchange(config_status(uid, 11, candidate_hash, opamp_pb2.RemoteConfigStatuses_APPLYING))
        await agent.exchange(health(uid, 12, healthy=False))
        await agent.exchange(config_status(uid, 13, candidate_hash, opamp_pb2.RemoteConfigStatuses_APPLIED))
        assert await runtime().statuses.flush() == 1
    row = await agent_row(uid)
    assert (row.remote_config_hash, row.remote_config_state, row.healthy) == (
        candidate_hash,
        RemoteConfigState.APPLIED,
        False,
    )
    target = await RolloutTarget.objects.aget(agent_id=canary.pk)
    assert target.answer == "applied" and target.answered_at is not None


async def test_a_full_report_after_a_held_status_is_not_overwritten_by_it():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1, service="checkout"))
        await agent.exchange(health(uid, 2, healthy=False))
        # A changed description takes the full path: the held status is written first.
        await agent.exchange(full_report(uid, 3, service="checkout", extra_identifying={"zone": "b"}))
        assert runtime().statuses.pending_count == 0
        assert await runtime().statuses.flush() == 0
    row = await agent_row(uid)
    assert row.healthy is True
    assert row.identifying_attributes["zone"] == "b"


async def test_a_closing_connection_writes_its_agents_held_status():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1, service="checkout"))
        await agent.exchange(health(uid, 2, healthy=False))
    assert runtime().statuses.pending_count == 0
    row = await agent_row(uid)
    assert (row.healthy, row.connected) == (False, False)


async def test_heartbeats_of_an_agent_with_a_held_status_wait_with_it():
    """Its sequence number must not reach the database ahead of the held report: after a
    crash the gap is what makes the server ask for the lost report again."""
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1, service="checkout"))
        await agent.exchange(health(uid, 2, healthy=False))
        await agent.exchange(heartbeat(uid, 3))
        assert runtime().heartbeats.pending_count == 0
        assert await runtime().heartbeats.flush() == 0
        assert (await agent_row(uid)).last_sequence_num == 1
        assert await runtime().statuses.flush() == 1
        row = await agent_row(uid)
        assert (row.last_sequence_num, row.healthy) == (3, False)
        await agent.exchange(heartbeat(uid, 4))  # nothing held now: the heartbeat buffer again
        assert runtime().heartbeats.pending_count == 1


def poison() -> dict[str, object]:
    """A change the database refuses. The observed one on PostgreSQL, a NUL in the health
    document; SQLite stores NUL, but no database can encode a lone surrogate."""
    if connection.vendor == "postgresql":
        return {"health": {"healthy": False, "last_error": "boom\x00boom"}, "healthy": False}
    return {"remote_config_error": "boom\ud800boom"}


async def test_one_poisoned_status_among_many_is_dropped_and_every_other_is_written(caplog, settings):
    settings.OPAMP_STATUS_FLUSH_SECONDS = 3600  # one batch: flushed by the test, not the timer
    uids = [uuid7().bytes for _ in range(40)]
    async with WsAgent() as agent:
        for uid in uids:
            await agent.exchange(full_report(uid, 1, service="other"))
            await agent.exchange(health(uid, 2, healthy=False))
        assert runtime().statuses.pending_count == 40
        victim = await agent_row(uids[17])
        # Past the boundary (fleet.reports would have replaced it): this tests the writer.
        runtime().statuses.note(victim.pk, StatusWrite(poison(), {}))
        with caplog.at_level(logging.ERROR, logger="fleet.batched_writes"):
            assert await runtime().statuses.flush() == 39
        assert runtime().statuses.pending_count == 0
        rows = {row.instance_uid.bytes: row for row in [await agent_row(uid) for uid in uids]}
        assert [uid for uid in uids if rows[uid].healthy is not False] == [uids[17]]
        assert rows[uids[17]].health["healthy"] is True  # nothing of the poisoned write landed
        dropped = [record.getMessage() for record in caplog.records]
        assert len(dropped) == 1
        assert f"status write for agent {victim.instance_uid} (id {victim.pk}) dropped" in dropped[0]

        # The next flush is clean, the poisoned agent's next status written.
        await agent.exchange(health(uids[17], 3, healthy=False))
        assert await runtime().statuses.flush() == 1
    assert (await agent_row(uids[17])).healthy is False
