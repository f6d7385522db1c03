"""A restart or a queued custom message not delivered within its time to live expires: it is
never delivered, no longer blocks a new one, and is shown as expired (API, admin, agent page).

Expiry is derived from the request time (requested_at + OPAMP_COMMAND_TTL_SECONDS, or
OPAMP_CUSTOM_MESSAGE_TTL_SECONDS), so an agent that never comes back does not block every
later restart of itself, nor collect a queue that fills up for good.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.test import Client
from django.utils import timezone

from fleet.command_contributor import CommandContributor
from fleet.commands import agents_with_pending_commands, command_claim, restart_request
from fleet.custom_messages import agents_with_queued_custom_messages, custom_message_claim, custom_message_send
from fleet.models import Agent, AgentCommand, QueuedCustomMessage
from fleet.pending_deliveries import claim_first
from fleet.roles import OPERATOR, grant_role
from fleet.session_runtime import runtime
from opamp.identifiers import uuid7
from tests.fleet.asgi_clients import http_exchange
from tests.fleet.factories import AgentFactory, UserFactory
from tests.fleet.messages import BASE_CAPABILITIES, full_report, heartbeat

pytestmark = pytest.mark.django_db

RESTARTABLE = BASE_CAPABILITIES | 0x400
PING = "io.example.ping/v1"
TTL = 60


@pytest.fixture(autouse=True)
def short_lives(settings):
    settings.OPAMP_COMMAND_TTL_SECONDS = TTL
    settings.OPAMP_CUSTOM_MESSAGE_TTL_SECONDS = TTL
    settings.OPAMP_RESTART_MIN_INTERVAL_SECONDS = 30


def one(agent: Agent):
    return Agent.objects.filter(pk=agent.pk)


def restart_asked_ago(agent: Agent, seconds: float) -> AgentCommand:
    [command] = restart_request(
        agents=one(agent), actor=None, now=timezone.now() - timedelta(seconds=seconds)
    ).requested
    return command


def message_queued_ago(agent: Agent, seconds: float, type: str = "old") -> QueuedCustomMessage:
    [message] = custom_message_send(
        agents=one(agent),
        capability=PING,
        type=type,
        data=b"",
        actor=None,
        now=timezone.now() - timedelta(seconds=seconds),
    ).queued
    return message


def test_an_expired_restart_is_not_delivered_nor_waited_for():
    agent = AgentFactory(capabilities=RESTARTABLE)
    restart_asked_ago(agent, TTL + 1)
    assert agents_with_pending_commands() == set()
    assert command_claim(agent_id=agent.pk, now=timezone.now()) is None
    assert AgentCommand.objects.get().delivered_at is None


def test_a_restart_within_its_time_to_live_is_still_delivered():
    agent = AgentFactory(capabilities=RESTARTABLE)
    restart_asked_ago(agent, TTL - 5)
    assert agents_with_pending_commands() == {agent.pk}
    assert command_claim(agent_id=agent.pk, now=timezone.now()) is not None


def test_the_claims_conditional_update_refuses_an_expired_row_it_was_handed():
    # The row was read as waiting; by the time of the UPDATE it has expired.
    agent = AgentFactory(capabilities=RESTARTABLE)
    command = restart_asked_ago(agent, TTL + 1)
    now = timezone.now()
    read_earlier = AgentCommand.objects.filter(pk=command.pk, delivered_at__isnull=True)
    assert claim_first(read_earlier, now=now, fresh_after=now - timedelta(seconds=TTL)) is None
    assert AgentCommand.objects.get().delivered_at is None


def test_an_expired_restart_no_longer_blocks_a_new_one():
    agent = AgentFactory(capabilities=RESTARTABLE)
    restart_asked_ago(agent, TTL + 1)
    outcome = restart_request(agents=one(agent), actor=None)
    assert len(outcome.requested) == 1 and outcome.rate_limited == []
    assert command_claim(agent_id=agent.pk, now=timezone.now()) == outcome.requested[0]


def test_an_expired_restart_within_the_minimum_interval_still_holds_it(settings):
    settings.OPAMP_RESTART_MIN_INTERVAL_SECONDS = 600
    agent = AgentFactory(capabilities=RESTARTABLE)
    restart_asked_ago(agent, TTL + 1)
    assert restart_request(agents=one(agent), actor=None).rate_limited == [agent.instance_uid]


def test_an_expired_custom_message_is_not_delivered_and_frees_its_place_in_the_queue(settings):
    settings.OPAMP_CUSTOM_MESSAGE_QUEUE = 1
    agent = AgentFactory(custom_capabilities=[PING])
    message_queued_ago(agent, TTL + 1)
    assert agents_with_queued_custom_messages() == set()
    assert custom_message_claim(agent_id=agent.pk, capabilities=[PING], now=timezone.now()) is None
    fresh = custom_message_send(agents=one(agent), capability=PING, type="new", data=b"", actor=None)
    assert len(fresh.queued) == 1 and fresh.queue_full == []
    claimed = custom_message_claim(agent_id=agent.pk, capabilities=[PING], now=timezone.now())
    assert claimed is not None and claimed.type == "new"
    assert QueuedCustomMessage.objects.get(type="old").delivered_at is None


def test_the_api_shows_expired_commands_and_messages_and_filters_them(api_client):
    agent = AgentFactory(capabilities=RESTARTABLE, custom_capabilities=[PING])
    expired = restart_asked_ago(agent, TTL + 1)
    message_queued_ago(agent, TTL + 1)
    rows = api_client.get("/api/v1/commands/").json()["results"]
    assert [(row["id"], row["state"]) for row in rows] == [(expired.pk, "expired")]
    assert rows[0]["expires_at"] is not None
    assert api_client.get("/api/v1/commands/?pending=true").json()["count"] == 0
    assert api_client.get("/api/v1/commands/?state=expired").json()["count"] == 1
    fresh = api_client.post(f"/api/v1/agents/{agent.instance_uid}/restart/", {}, format="json")
    assert fresh.status_code == 202 and fresh.data["commands"][0]["state"] == "pending"
    states = [row["state"] for row in api_client.get("/api/v1/commands/").json()["results"]]
    assert states == ["pending", "expired"]
    assert api_client.get("/api/v1/commands/?pending=true").json()["count"] == 1
    command_claim(agent_id=agent.pk, now=timezone.now())
    assert api_client.get("/api/v1/commands/?state=delivered").json()["count"] == 1

    messages = api_client.get("/api/v1/custom-messages/").json()["results"]
    assert [row["state"] for row in messages] == ["expired"]
    assert api_client.get("/api/v1/custom-messages/?pending=true").json()["count"] == 0
    assert api_client.get("/api/v1/custom-messages/?state=expired").json()["count"] == 1


def test_the_admin_lists_commands_and_messages_with_their_state():
    user = UserFactory(username="root", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(user)
    agent = AgentFactory(capabilities=RESTARTABLE, custom_capabilities=[PING])
    restart_asked_ago(agent, TTL + 1)
    message_queued_ago(agent, TTL + 1)
    commands = client.get("/admin/fleet/agentcommand/")
    assert commands.status_code == 200 and b"expired" in commands.content
    assert client.get("/admin/fleet/agentcommand/", {"state": "expired"}).context["cl"].result_count == 1
    assert client.get("/admin/fleet/agentcommand/", {"state": "pending"}).context["cl"].result_count == 0
    messages = client.get("/admin/fleet/queuedcustommessage/")
    assert messages.status_code == 200 and b"expired" in messages.content


def test_the_agent_page_shows_an_expired_restart_as_expired():
    user = UserFactory(username="op")
    grant_role(user=user, role=OPERATOR)
    client = Client()
    client.force_login(user)
    agent = AgentFactory(capabilities=RESTARTABLE)
    restart_asked_ago(agent, TTL + 1)
    page = client.get(f"/fleet/{agent.instance_uid}/").content.decode()
    row = page.split('id="commands"')[1].split("</table>")[0]
    assert "expired" in row and "waiting" not in row


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_session_neither_gives_an_expired_restart_nor_keeps_asking_for_it():
    uid = uuid7().bytes
    await http_exchange(full_report(uid, 1, capabilities=RESTARTABLE))
    row = await Agent.objects.aget(instance_uid=uuid.UUID(bytes=uid))
    await database_sync_to_async(restart_asked_ago)(row, TTL + 1)
    contributor = runtime().contributor(CommandContributor)
    contributor.pending.add(row.pk)  # as a hint would: the claim decides
    reply = await http_exchange(heartbeat(uid, 2, capabilities=RESTARTABLE))
    assert not reply.HasField("command")
    assert row.pk not in contributor.pending
    contributor.pending.expire()
    await contributor.pending.refresh_if_due()
    assert row.pk not in contributor.pending
