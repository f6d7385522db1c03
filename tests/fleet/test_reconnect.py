"""A known agent reconnecting with the state its row holds is admitted like a heartbeat."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest.mock import patch

import pytest
from django.db.models import QuerySet

from fleet.models import Agent
from fleet.reported_state import reported_state_hash
from fleet.session_runtime import reset_runtime, runtime
from opamp.identifiers import uuid7
from opamp.proto import opamp_pb2
from tests.fleet.asgi_clients import WsAgent
from tests.fleet.messages import BASE_CAPABILITIES, full_report, heartbeat

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]


async def agent_row(uid: bytes) -> Agent:
    return await Agent.objects.aget(instance_uid=uuid.UUID(bytes=uid))


@contextmanager
def agent_row_writes() -> Iterator[list[str]]:
    """Each locked read, validation and save of an Agent row meanwhile, in any thread (the
    session reaches the database through a thread pool, so a per-connection query capture
    would see nothing)."""
    calls: list[str] = []
    select_for_update = QuerySet.select_for_update
    full_clean = Agent.full_clean
    save = Agent.save

    def locked(queryset: QuerySet[Any], *args: Any, **kwargs: Any) -> QuerySet[Any]:
        if queryset.model is Agent:
            calls.append("select_for_update")
        return select_for_update(queryset, *args, **kwargs)

    def validated(agent: Agent, *args: Any, **kwargs: Any) -> None:
        calls.append("full_clean")
        full_clean(agent, *args, **kwargs)

    def saved(agent: Agent, *args: Any, **kwargs: Any) -> None:
        calls.append("save")
        save(agent, *args, **kwargs)

    with (
        patch.object(QuerySet, "select_for_update", locked),
        patch.object(Agent, "full_clean", validated),
        patch.object(Agent, "save", saved),
    ):
        yield calls


async def first_connection(uid: bytes) -> None:
    async with WsAgent(client="10.0.0.1") as agent:
        reply = await agent.exchange(full_report(uid, 1))
        assert not reply.flags & opamp_pb2.ServerToAgentFlags_ReportFullState


async def test_a_full_report_stores_its_hash_in_the_row():
    uid = uuid7().bytes
    await first_connection(uid)
    row = await agent_row(uid)
    assert row.reported_state_hash == reported_state_hash(full_report(uid, 1), BASE_CAPABILITIES)


async def test_an_unchanged_reconnect_writes_nothing_until_the_flush_and_then_its_facts():
    uid = uuid7().bytes
    await first_connection(uid)
    reset_runtime()  # a restarted process: nothing in memory
    before = await agent_row(uid)
    async with WsAgent(client="10.0.0.2") as agent:
        with agent_row_writes() as writes:
            reply = await agent.exchange(full_report(uid, 2))
        assert not reply.HasField("error_response")
        assert not reply.flags & opamp_pb2.ServerToAgentFlags_ReportFullState
        assert writes == []  # no locked read, no save of the row
        unchanged = await agent_row(uid)
        assert (unchanged.last_sequence_num, unchanged.remote_address) == (1, "10.0.0.1")
        assert await runtime().heartbeats.flush() == 1
        row = await agent_row(uid)
        assert (row.last_sequence_num, row.remote_address, row.transport, row.connected) == (
            2,
            "10.0.0.2",
            "websocket",
            True,
        )
        assert row.last_seen > before.last_seen
        assert row.updated_at == before.updated_at  # the reported documents were not rewritten
        # The connection goes on like any other: a heartbeat continues the sequence.
        reply = await agent.exchange(heartbeat(uid, 3))
        assert not reply.flags & opamp_pb2.ServerToAgentFlags_ReportFullState


async def test_a_heartbeat_after_the_reconnect_keeps_the_connection_facts_for_the_flush():
    uid = uuid7().bytes
    await first_connection(uid)
    reset_runtime()
    async with WsAgent(client="10.0.0.3") as agent:
        await agent.exchange(full_report(uid, 2))
        await agent.exchange(heartbeat(uid, 3))
        assert await runtime().heartbeats.flush() == 1
    row = await agent_row(uid)
    assert (row.last_sequence_num, row.remote_address) == (3, "10.0.0.3")


async def test_a_disconnected_agent_reconnecting_unchanged_is_marked_connected_at_the_flush():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1))
    assert not (await agent_row(uid)).connected  # the socket closed: disconnected
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 2))
        assert await runtime().heartbeats.flush() == 1
        assert (await agent_row(uid)).connected


async def test_a_changed_report_takes_the_full_path_and_stores_the_new_hash():
    uid = uuid7().bytes
    await first_connection(uid)
    reset_runtime()
    changed = full_report(uid, 2, healthy=False)
    async with WsAgent() as agent:
        with agent_row_writes() as writes:
            await agent.exchange(changed)
        assert writes == ["select_for_update", "full_clean", "save"]
    row = await agent_row(uid)
    assert row.healthy is False
    assert row.reported_state_hash == reported_state_hash(changed, BASE_CAPABILITIES)


async def test_a_partial_report_since_the_full_one_sends_the_next_reconnect_down_the_full_path():
    """The row no longer holds what the hash says after a status report changed it: an
    agent that went back to its old state must have that state written again."""
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1))
        degraded = heartbeat(uid, 2)
        degraded.health.healthy = False
        await agent.exchange(degraded)
        assert await runtime().statuses.flush() == 1
    row = await agent_row(uid)
    assert (row.healthy, row.reported_state_hash) == (False, "")
    reset_runtime()
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 3))  # healthy again: the first report's state
    row = await agent_row(uid)
    assert row.healthy is True
    assert row.reported_state_hash == reported_state_hash(full_report(uid, 3), BASE_CAPABILITIES)


async def test_a_full_report_after_a_held_status_is_written_after_it():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1))
        degraded = heartbeat(uid, 2)
        degraded.health.healthy = False
        await agent.exchange(degraded)  # held, not written yet
        agent_id = (await agent_row(uid)).pk
        assert runtime().statuses.holds(agent_id)
        # The held report cleared the snapshot's hash, so a full report of the first state
        # is not mistaken for what the row holds.
        await agent.exchange(full_report(uid, 3))
        assert runtime().heartbeats.pending_count == 0
    row = await agent_row(uid)
    assert (row.healthy, row.last_sequence_num) == (True, 3)


async def test_an_agent_that_never_sent_a_full_report_is_not_admitted_as_unchanged():
    uid = uuid7().bytes
    partial = full_report(uid, 1)
    partial.ClearField("effective_config")  # its capabilities promise one
    async with WsAgent() as agent:
        reply = await agent.exchange(partial)
        assert reply.flags & opamp_pb2.ServerToAgentFlags_ReportFullState
    assert (await agent_row(uid)).reported_state_hash == ""
