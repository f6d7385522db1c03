"""Hints travel per server process: one subscription, one message for many agents, and
agent sockets without a channel-layer channel of their own (fleet.hints)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

import fleet.session_runtime
from fleet.hint_messages import HINT_GROUP, HintKind, hint_messages, publish, unpack_uids
from fleet.hints import hint_stream
from fleet.models import Agent
from fleet.notify import notify_desired_config_changed
from opamp.identifiers import uuid7
from rollouts import services
from rollouts.models import Configuration
from tests.fleet.asgi_clients import WsAgent
from tests.fleet.messages import full_report

pytestmark = [pytest.mark.django_db(transaction=True)]

COLLECTOR_YAML = {"collector.yaml": {"body": "receivers:\n  otlp: {}\n", "content_type": "text/yaml"}}


@database_sync_to_async
def publish_config(body: str) -> str:
    configuration = Configuration.objects.filter(name="edge").first() or services.configuration_create(
        name="edge", selector="service.name=checkout", actor=None
    )
    files = {"collector.yaml": {"body": body, "content_type": "text/yaml"}}
    version, _ = services.configuration_publish(configuration=configuration, files=files, author=None)
    return version.config_hash


class CountingLayer:
    """Counts the channel layer calls that cost a Redis round trip on the PubSub layer."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.new_channels = 0
        self.group_adds: list[str] = []
        self.group_sends: list[tuple[str, dict[str, Any]]] = []
        layer = get_channel_layer()
        new_channel, group_add, group_send = layer.new_channel, layer.group_add, layer.group_send

        async def counting_new_channel(*args: Any, **kwargs: Any) -> str:
            self.new_channels += 1
            return await new_channel(*args, **kwargs)

        async def counting_group_add(group: str, channel: str) -> None:
            self.group_adds.append(group)
            await group_add(group, channel)

        async def counting_group_send(group: str, message: dict[str, Any]) -> None:
            self.group_sends.append((group, message))
            await group_send(group, message)

        monkeypatch.setattr(layer, "new_channel", counting_new_channel, raising=False)
        monkeypatch.setattr(layer, "group_add", counting_group_add, raising=False)
        monkeypatch.setattr(layer, "group_send", counting_group_send, raising=False)


async def test_agent_sockets_hold_no_channel_layer_channel_of_their_own(monkeypatch):
    counting = CountingLayer(monkeypatch)
    agents = [WsAgent() for _ in range(3)]
    try:
        for agent in agents:
            await agent.__aenter__()
            await agent.exchange(full_report(uuid7().bytes, 1))
    finally:
        for agent in agents:
            await agent.__aexit__(None)
    # At most the process's own channel, joined to the one hint group (none if an earlier
    # test on this event loop already subscribed the process).
    assert counting.new_channels <= 1
    assert set(counting.group_adds) <= {HINT_GROUP}
    assert hint_stream().listening


async def test_a_change_for_many_agents_is_one_hint_message_and_reaches_each_live_session(monkeypatch):
    await publish_config("receivers: {}\n")
    uids = [uuid7().bytes for _ in range(4)]
    agents = [WsAgent() for _ in uids]
    try:
        for agent, uid in zip(agents, uids, strict=True):
            await agent.__aenter__()
            await agent.exchange(full_report(uid, 1))
        counting = CountingLayer(monkeypatch)
        second_hash = await publish_config("receivers: {otlp: {}}\n")
        pushed = [await agent.receive(timeout=5) for agent in agents]
    finally:
        for agent in agents:
            await agent.__aexit__(None)
    assert [reply.remote_config.config_hash.hex() for reply in pushed] == [second_hash] * 4
    desired_hints = [message for group, message in counting.group_sends if message.get("kind") == HintKind.CONFIG]
    assert len(desired_hints) == 1
    assert set(unpack_uids(desired_hints[0]["uids"])) == {uuid.UUID(bytes=uid) for uid in uids}


def test_a_hint_for_thousands_of_agents_is_a_handful_of_messages():
    uids = [uuid.uuid4() for _ in range(12_000)]
    messages = hint_messages(HintKind.CONFIG, uids, generation=7)
    assert len(messages) == 3
    assert [uid for message in messages for uid in unpack_uids(message["uids"])] == uids
    assert all(message["generation"] == 7 for message in messages)


async def test_a_hint_naming_agents_this_process_does_not_hold_is_ignored():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1))
        others = [uuid.uuid4() for _ in range(50)]
        assert hint_stream().deliver(hint_messages(HintKind.CONFIG, others)[0]) == 0
        assert hint_stream().deliver(hint_messages(HintKind.CONFIG, [*others, uuid.UUID(bytes=uid)])[0]) == 1
        await hint_stream().drain()


async def takeover_from_another_process(uid: bytes, *, claimed_at: float) -> None:
    messages = hint_messages(
        HintKind.TAKEOVER, [uuid.UUID(bytes=uid)], origin="another-process", claimed_at=[claimed_at]
    )
    assert await publish(messages) == 1


async def test_a_newer_session_on_another_process_closes_this_one_and_the_agent_stays_connected():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1))
        await takeover_from_another_process(uid, claimed_at=time.time() + 1)
        closed = await agent.receive_close(timeout=5)
    assert closed["code"] == 1000
    await asyncio.sleep(0.2)  # the consumer's disconnect has run
    row = await Agent.objects.aget(instance_uid=uuid.UUID(bytes=uid))
    assert row.connected is True  # the agent is live on the other process
    assert uuid.UUID(bytes=uid) not in fleet.session_runtime.runtime().live.by_uid


async def test_an_older_session_on_another_process_leaves_this_one_open():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1))
        await takeover_from_another_process(uid, claimed_at=time.time() - 60)
        await asyncio.sleep(0.3)
        assert await agent.communicator.receive_nothing(timeout=0.2)
        reply = await agent.exchange(full_report(uid, 2))
    assert reply.instance_uid == uid


async def test_a_new_session_is_announced_once_to_the_other_processes(monkeypatch):
    uid = uuid7().bytes
    async with WsAgent():
        pass  # the process is subscribed
    counting = CountingLayer(monkeypatch)
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1))
        await agent.exchange(full_report(uid, 2))
        await asyncio.sleep(0.3)
        await hint_stream().drain()
    takeovers = [message for _, message in counting.group_sends if message.get("kind") == HintKind.TAKEOVER]
    assert len(takeovers) == 1
    assert unpack_uids(takeovers[0]["uids"]) == [uuid.UUID(bytes=uid)]
    assert takeovers[0]["origin"] == hint_stream().origin


@pytest.mark.django_db(transaction=False)
def test_a_process_that_serves_no_agent_sends_hints_without_building_a_fleet_runtime(monkeypatch):
    """A Celery worker or an API-only process: nothing of the session runtime is built."""
    import fleet.notify

    sent: list[list[dict[str, Any]]] = []
    monkeypatch.setattr(fleet.notify, "_dispatch", sent.append)
    fleet.session_runtime.reset_runtime()
    notify_desired_config_changed([uuid.uuid4(), uuid.uuid4()], generation=3)
    assert fleet.session_runtime._runtime is None
    assert len(sent) == 1 and len(sent[0]) == 1 and sent[0][0]["generation"] == 3
