"""Restart commands: who may be asked, how often, and that each goes out once, alone."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from fleet.command_contributor import CommandContributor
from fleet.commands import RESTART_ACTION, command_claim, restart_request
from fleet.label_selectors.parsing import parse_selector
from fleet.models import Agent, AgentCommand, AuditEvent
from fleet.selector_queries import agents_matching
from fleet.session import AgentSession
from fleet.session_runtime import runtime
from opamp.identifiers import uuid7
from opamp.proto import opamp_pb2
from tests.fleet.asgi_clients import WsAgent, http_exchange
from tests.fleet.factories import AgentFactory, UserFactory
from tests.fleet.messages import BASE_CAPABILITIES, full_report, heartbeat

RESTARTABLE = BASE_CAPABILITIES | 0x400


def one(agent: Agent):
    return Agent.objects.filter(pk=agent.pk)


@pytest.mark.django_db
def test_a_restart_is_recorded_and_audited_with_who_asked():
    user = UserFactory(username="alice")
    agent = AgentFactory(
        capabilities=RESTARTABLE, health={"healthy": True, "start_time_unix_nano": 1_700_000_000 * 10**9}
    )
    outcome = restart_request(agents=one(agent), actor=user)
    [command] = outcome.requested
    assert (command.requested_by, command.delivered_at) == (user, None)
    assert command.connected_at_before == agent.connected_at
    assert command.started_at_before is not None and command.started_at_before.year == 2023
    audit = AuditEvent.objects.get(action=RESTART_ACTION)
    assert (audit.actor, audit.target_id, audit.details["instance_uid"]) == (
        user,
        str(agent.pk),
        str(agent.instance_uid),
    )


@pytest.mark.django_db
def test_agents_that_do_not_accept_restarts_are_skipped_and_counted():
    agent = AgentFactory(capabilities=BASE_CAPABILITIES)
    outcome = restart_request(agents=one(agent), actor=None)
    assert outcome.requested == [] and outcome.not_capable == [agent.instance_uid]
    assert not AgentCommand.objects.exists() and not AuditEvent.objects.exists()


@pytest.mark.django_db
def test_a_restart_is_not_asked_again_while_pending_or_within_the_minimum_interval(settings):
    settings.OPAMP_RESTART_MIN_INTERVAL_SECONDS = 300
    settings.OPAMP_COMMAND_TTL_SECONDS = 2 * 3600
    agent = AgentFactory(capabilities=RESTARTABLE)
    now = timezone.now()
    assert len(restart_request(agents=one(agent), actor=None, now=now).requested) == 1
    # Pending (never delivered): not asked again, however late within its time to live
    # (test_commands_expiry: after it, an expired restart no longer holds a new one).
    later = restart_request(agents=one(agent), actor=None, now=now + timedelta(hours=1))
    assert later.rate_limited == [agent.instance_uid] and later.requested == []
    assert command_claim(agent_id=agent.pk, now=now + timedelta(seconds=10)) is not None
    # Delivered, but asked within the interval.
    soon = restart_request(agents=one(agent), actor=None, now=now + timedelta(seconds=200))
    assert soon.rate_limited == [agent.instance_uid]
    assert len(restart_request(agents=one(agent), actor=None, now=now + timedelta(seconds=301)).requested) == 1


@pytest.mark.django_db
def test_a_selector_picks_the_agents_to_restart():
    prod = [AgentFactory(capabilities=RESTARTABLE, labels={"env": "prod"}) for _ in range(3)]
    AgentFactory(capabilities=RESTARTABLE, labels={"env": "dev"})
    old = AgentFactory(capabilities=BASE_CAPABILITIES, labels={"env": "prod"})
    outcome = restart_request(agents=agents_matching(parse_selector("env=prod")), actor=None, selector="env=prod")
    assert {command.agent_id for command in outcome.requested} == {agent.pk for agent in prod}
    assert outcome.not_capable == [old.instance_uid]
    assert AuditEvent.objects.filter(action=RESTART_ACTION, details__selector="env=prod").count() == 3


@pytest.mark.django_db
def test_a_command_is_claimed_once():
    agent = AgentFactory(capabilities=RESTARTABLE)
    restart_request(agents=one(agent), actor=None)
    now = timezone.now()
    assert command_claim(agent_id=agent.pk, now=now) is not None
    assert command_claim(agent_id=agent.pk, now=now) is None
    assert AgentCommand.objects.get().delivered_at == now


def only_the_command(reply: opamp_pb2.ServerToAgent) -> bool:
    fields = {descriptor.name for descriptor, _ in reply.ListFields()}
    return reply.HasField("command") and fields <= {"instance_uid", "capabilities", "command"}


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_live_websocket_session_is_pushed_the_restart_once_and_alone():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1, capabilities=RESTARTABLE))
        row = await Agent.objects.aget(instance_uid=uuid.UUID(bytes=uid))
        await database_sync_to_async(restart_request)(agents=one(row), actor=None)
        pushed = await agent.receive(timeout=5)
        assert only_the_command(pushed) and pushed.command.type == opamp_pb2.CommandType_Restart
        assert b"\x4a\x00" in pushed.SerializeToString()  # field 9 on the wire, empty
        assert not (await agent.exchange(heartbeat(uid, 2, capabilities=RESTARTABLE))).HasField("command")
    command = await AgentCommand.objects.aget()
    assert command.delivered_at is not None


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_polling_agent_gets_the_restart_on_its_next_poll_once():
    uid = uuid7().bytes
    await http_exchange(full_report(uid, 1, capabilities=RESTARTABLE))
    row = await Agent.objects.aget(instance_uid=uuid.UUID(bytes=uid))
    await database_sync_to_async(restart_request)(agents=one(row), actor=None)
    runtime().contributor(CommandContributor).pending.expire()  # as if the check were due
    reply = await http_exchange(heartbeat(uid, 2, capabilities=RESTARTABLE))
    assert only_the_command(reply)
    assert not (await http_exchange(heartbeat(uid, 3, capabilities=RESTARTABLE))).HasField("command")


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_the_command_waits_for_a_reply_that_carries_nothing_else():
    uid = uuid7().bytes
    session = AgentSession(transport="websocket", remote_address="127.0.0.1")
    await session.handle(full_report(uid, 1, capabilities=RESTARTABLE))
    row = await Agent.objects.aget(instance_uid=uuid.UUID(bytes=uid))
    await database_sync_to_async(restart_request)(agents=one(row), actor=None)
    session.fleet.contributor(CommandContributor).pending.expire()
    # A sequence gap asks for the full state: that reply carries a flag, so no command yet.
    asked = await session.handle(heartbeat(uid, 5, capabilities=RESTARTABLE))
    assert asked.flags and not asked.HasField("command")
    assert only_the_command(await session.handle(full_report(uid, 6, capabilities=RESTARTABLE)))
