"""Custom messages: agents' kept in a bounded history, operators' delivered once, one per reply."""

from __future__ import annotations

import uuid

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from fleet.custom_message_contributor import CustomMessageContributor
from fleet.custom_messages import custom_message_record, custom_message_send
from fleet.models import Agent, AgentCustomMessage, QueuedCustomMessage
from fleet.session import AgentSession
from fleet.session_contributor import ReplyPart
from fleet.session_runtime import runtime
from opamp.identifiers import uuid7
from opamp.proto import opamp_pb2
from tests.fleet.asgi_clients import WsAgent, http_exchange
from tests.fleet.factories import AgentFactory
from tests.fleet.messages import full_report, heartbeat

PING = "io.example.ping/v1"


def declaring(message: opamp_pb2.AgentToServer, *names: str) -> opamp_pb2.AgentToServer:
    message.custom_capabilities.capabilities.extend(names)
    return message


@pytest.mark.django_db
def test_an_agents_history_keeps_the_newest_messages_and_caps_their_data(settings):
    settings.OPAMP_CUSTOM_MESSAGE_HISTORY = 3
    settings.OPAMP_CUSTOM_MESSAGE_MAX_BYTES = 4
    agent = AgentFactory()
    for number in range(5):
        custom_message_record(agent_id=agent.pk, capability=PING, type=f"t{number}", data=b"123456", now=timezone.now())
    kept = list(AgentCustomMessage.objects.filter(agent=agent).order_by("id"))
    assert [message.type for message in kept] == ["t2", "t3", "t4"]
    assert (bytes(kept[0].data), kept[0].size, kept[0].truncated) == (b"1234", 6, True)


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_custom_message_an_agent_sends_is_kept():
    uid = uuid7().bytes
    message = declaring(full_report(uid, 1), PING)
    message.custom_message.capability, message.custom_message.type, message.custom_message.data = (
        PING,
        "pong",
        b"\x00\x01",
    )
    await http_exchange(message)
    kept = await AgentCustomMessage.objects.aget()
    assert (kept.capability, kept.type, bytes(kept.data)) == (PING, "pong", b"\x00\x01")


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_queued_messages_are_pushed_on_a_live_socket_once_each_one_per_message():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(declaring(full_report(uid, 1), PING))
        row = await Agent.objects.aget(instance_uid=uuid.UUID(bytes=uid))
        for number in range(2):
            await database_sync_to_async(custom_message_send)(
                agents=Agent.objects.filter(pk=row.pk), capability=PING, type=f"m{number}", data=b"x", actor=None
            )
        first = await agent.receive(timeout=5)
        assert (first.custom_message.capability, first.custom_message.type) == (PING, "m0")
        # One per message: the second waits for the next one (its own hint, or a reply).
        second = await agent.receive(timeout=5)
        assert second.custom_message.type == "m1"
        assert not (await agent.exchange(heartbeat(uid, 2))).HasField("custom_message")
    assert await QueuedCustomMessage.objects.filter(delivered_at__isnull=True).acount() == 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_polling_agent_gets_a_queued_message_on_its_next_poll():
    uid = uuid7().bytes
    await http_exchange(declaring(full_report(uid, 1), PING))
    row = await Agent.objects.aget(instance_uid=uuid.UUID(bytes=uid))
    await database_sync_to_async(custom_message_send)(
        agents=Agent.objects.filter(pk=row.pk), capability=PING, type="hello", data=b"", actor=None
    )
    runtime().contributor(CustomMessageContributor).pending.expire()
    assert (await http_exchange(heartbeat(uid, 2))).custom_message.type == "hello"
    assert not (await http_exchange(heartbeat(uid, 3))).HasField("custom_message")


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_the_servers_own_custom_message_goes_first_and_the_queued_one_waits():
    uid = uuid7().bytes
    session = AgentSession(transport="websocket", remote_address="127.0.0.1")
    await session.handle(declaring(full_report(uid, 1), PING))
    row = await Agent.objects.aget(instance_uid=uuid.UUID(bytes=uid))
    await database_sync_to_async(custom_message_send)(
        agents=Agent.objects.filter(pk=row.pk), capability=PING, type="queued", data=b"", actor=None
    )
    contributor = session.fleet.contributor(CustomMessageContributor)
    contributor.pending.expire()
    assert ReplyPart.CUSTOM_MESSAGE < ReplyPart.QUEUED_CUSTOM_MESSAGE < ReplyPart.COMMAND
    snapshot = session.fleet.snapshots[uuid.UUID(bytes=uid)]
    taken = opamp_pb2.ServerToAgent()
    taken.custom_message.capability, taken.custom_message.type = "io.opamp.certificate/v1", "renew"
    assert not await contributor.give_queued_message(session, taken, snapshot, timezone.now())
    assert taken.custom_message.type == "renew"
    assert (await session.handle(heartbeat(uid, 2))).custom_message.type == "queued"


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_an_agents_custom_message_with_a_nul_in_its_names_is_kept_with_it_replaced():
    # An agent's text is replaced, not refused (fleet.safe_text): PostgreSQL refuses U+0000.
    uid = uuid7().bytes
    message = declaring(full_report(uid, 1), PING)
    message.custom_message.capability, message.custom_message.type, message.custom_message.data = (
        PING + "\x00",
        "po\x00ng",
        b"\x00",
    )
    reply = await http_exchange(message)
    assert not reply.HasField("error_response")
    kept = await AgentCustomMessage.objects.aget()
    assert (kept.capability, kept.type, bytes(kept.data)) == (PING + "\ufffd", "po\ufffdng", b"\x00")
