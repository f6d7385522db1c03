"""Desired configuration delivered over both transports, by hash, never in a loop."""

from __future__ import annotations

import uuid

import pytest
from channels.db import database_sync_to_async

from fleet import agent_labels
from fleet.models import Agent
from fleet.session_runtime import runtime
from opamp.identifiers import uuid7
from opamp.proto import opamp_pb2
from rollouts import services
from rollouts.models import AgentDesiredConfig, Configuration, RolloutTarget
from rollouts.session_contributor import RemoteConfigContributor
from tests.fleet.asgi_clients import WsAgent, http_exchange
from tests.fleet.messages import config_status as status
from tests.fleet.messages import full_report, heartbeat

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

APPLIED = opamp_pb2.RemoteConfigStatuses_APPLIED
FAILED = opamp_pb2.RemoteConfigStatuses_FAILED
COLLECTOR_YAML = {"collector.yaml": {"body": "receivers:\n  otlp: {}\n", "content_type": "text/yaml"}}


@database_sync_to_async
def publish(name: str = "edge", files: dict | None = None, selector: str = "service.name=checkout") -> str:
    configuration = Configuration.objects.filter(name=name).first() or services.configuration_create(
        name=name, selector=selector, actor=None
    )
    version, _ = services.configuration_publish(configuration=configuration, files=files or COLLECTOR_YAML, author=None)
    return version.config_hash


@database_sync_to_async
def rollback(name: str, to_number: int) -> str:
    configuration = Configuration.objects.get(name=name)
    return services.configuration_rollback(configuration=configuration, to_number=to_number, author=None).config_hash


async def test_a_matching_agent_gets_the_current_version_in_its_first_reply():
    config_hash = await publish()
    uid = uuid7().bytes
    async with WsAgent() as agent:
        reply = await agent.exchange(full_report(uid, 1, service="checkout"))
    assert reply.remote_config.config_hash.hex() == config_hash
    body = reply.remote_config.config.config_map["collector.yaml"]
    assert body.body == b"receivers:\n  otlp: {}\n"
    assert body.content_type == "text/yaml"


async def test_an_agent_outside_the_selector_gets_nothing():
    await publish()
    async with WsAgent() as agent:
        reply = await agent.exchange(full_report(uuid7().bytes, 1, service="payments"))
    assert not reply.HasField("remote_config")


async def test_an_agent_without_accepts_remote_config_gets_nothing():
    await publish()
    async with WsAgent() as agent:
        reply = await agent.exchange(full_report(uuid7().bytes, 1, service="checkout", capabilities=0x1 | 0x4 | 0x800))
    assert not reply.HasField("remote_config")


async def test_the_offer_is_not_repeated_while_the_agent_works_on_it_or_after_it_applied_it():
    config_hash = await publish()
    uid = uuid7().bytes
    async with WsAgent() as agent:
        assert (await agent.exchange(full_report(uid, 1, service="checkout"))).HasField("remote_config")
        assert not (await agent.exchange(heartbeat(uid, 2))).HasField("remote_config")
        assert not (await agent.exchange(status(uid, 3, config_hash, APPLIED))).HasField("remote_config")
        assert not (await agent.exchange(heartbeat(uid, 4))).HasField("remote_config")


async def test_a_failed_hash_is_not_resent_and_the_failure_is_visible():
    config_hash = await publish()
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1, service="checkout"))
        failed = await agent.exchange(status(uid, 2, config_hash, FAILED, "unknown receiver 'otlpx'"))
        later = await agent.exchange(heartbeat(uid, 3))
    assert not failed.HasField("remote_config") and not later.HasField("remote_config")
    row = await Agent.objects.aget(instance_uid=uuid.UUID(bytes=uid))
    assert (row.remote_config_state, row.remote_config_error) == (FAILED, "unknown receiver 'otlpx'")


async def test_a_new_version_is_pushed_to_a_connected_agent_at_once():
    first_hash = await publish()
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1, service="checkout"))
        await agent.exchange(status(uid, 2, first_hash, APPLIED))
        second_hash = await publish(files={"collector.yaml": {"body": "receivers: {}\n", "content_type": "text/yaml"}})
        pushed = await agent.receive(timeout=5)
    assert pushed.remote_config.config_hash.hex() == second_hash
    assert pushed.instance_uid == uid


async def test_a_rollback_offers_the_earlier_content_again():
    first_hash = await publish()
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1, service="checkout"))
        await agent.exchange(status(uid, 2, first_hash, APPLIED))
        broken_hash = await publish(files={"collector.yaml": {"body": "broken: true\n", "content_type": "text/yaml"}})
        await agent.receive()
        await agent.exchange(status(uid, 3, broken_hash, FAILED, "bad config"))
        restored_hash = await rollback("edge", 1)
        pushed = await agent.receive()
    assert restored_hash == first_hash
    assert pushed.remote_config.config_hash.hex() == first_hash


async def test_a_rollback_reaches_a_polling_agent_offered_that_content_moments_ago():
    """A rollback's version is a new offer even when its content was offered recently: the
    record of the earlier version's offer must not hold it back for the re-offer delay."""
    first_hash = await publish()
    uid = uuid7().bytes
    offers = runtime().contributor(RemoteConfigContributor).offers
    first = await http_exchange(full_report(uid, 1, service="checkout"))
    assert first.remote_config.config_hash.hex() == first_hash
    await offers.flush()  # the first version's offer is on record
    await http_exchange(status(uid, 2, first_hash, APPLIED))
    broken_hash = await publish(files={"collector.yaml": {"body": "broken: true\n", "content_type": "text/yaml"}})
    broken = await http_exchange(heartbeat(uid, 3))
    assert broken.remote_config.config_hash.hex() == broken_hash
    assert offers.pending_count == 1  # that offer's record is still on its way to the row
    await http_exchange(status(uid, 4, broken_hash, FAILED, "bad config"))
    assert await rollback("edge", 1) == first_hash
    restored = await http_exchange(heartbeat(uid, 5))
    assert restored.remote_config.config_hash.hex() == first_hash
    await offers.flush()  # the broken version's late record does not pass for the rollback's
    desired = await AgentDesiredConfig.objects.select_related("version").aget(agent__instance_uid=uuid.UUID(bytes=uid))
    assert desired.version.number == 3 and desired.offered_hash == first_hash


async def test_a_polling_agent_gets_the_offer_on_its_next_poll_and_not_on_every_poll():
    uid = uuid7().bytes
    first = await http_exchange(full_report(uid, 1, service="checkout"))
    assert not first.HasField("remote_config")
    config_hash = await publish()
    offered = await http_exchange(heartbeat(uid, 2))
    again = await http_exchange(heartbeat(uid, 3))
    assert offered.remote_config.config_hash.hex() == config_hash
    assert not again.HasField("remote_config")


async def test_relabelling_an_agent_moves_it_to_the_matching_configuration():
    await publish(
        name="payments", selector="team=payments", files={"p.yaml": {"body": "p: 1\n", "content_type": "text/yaml"}}
    )
    uid = uuid7().bytes
    async with WsAgent() as agent:
        reply = await agent.exchange(full_report(uid, 1, service="other"))
        assert not reply.HasField("remote_config")
        await database_sync_to_async(agent_labels.agent_labels_set)(
            instance_uid=uuid.UUID(bytes=uid), labels={"team": "payments"}, actor=None
        )
        pushed = await agent.receive()
    assert "p.yaml" in pushed.remote_config.config.config_map
    desired = await AgentDesiredConfig.objects.select_related("configuration").aget(
        agent__instance_uid=uuid.UUID(bytes=uid)
    )
    assert desired.configuration.name == "payments"


async def test_offers_are_recorded_in_one_batch_per_flush():
    config_hash = await publish()
    uids = [uuid7().bytes for _ in range(3)]
    for uid in uids:
        async with WsAgent() as agent:
            reply = await agent.exchange(full_report(uid, 1, service="checkout"))
        assert reply.remote_config.config_hash.hex() == config_hash
    offers = runtime().contributor(RemoteConfigContributor).offers
    assert offers.pending_count == 3
    assert await offers.flush() == 3
    rows = [row async for row in AgentDesiredConfig.objects.values_list("offered_hash", "offered_at")]
    assert len(rows) == 3
    assert all(offered_hash == config_hash and offered_at is not None for offered_hash, offered_at in rows)
    assert not await RolloutTarget.objects.aexists()  # no rollout: nothing else to note


async def test_a_hinted_change_reads_the_desired_configs_of_the_process_in_one_batch(monkeypatch):
    """A publish hints every affected agent; their process catches up with the log once
    and reads their new desired configs together, not one query per agent."""
    import rollouts.session_contributor

    batch_reads: list[list[int]] = []
    read_many = rollouts.session_contributor.desired_configs_for_agents

    def counting_many(agent_ids):
        batch_reads.append(list(agent_ids))
        return read_many(agent_ids)

    first_hash = await publish()
    uids = [uuid7().bytes for _ in range(4)]
    agents = [WsAgent() for _ in uids]
    for agent, uid in zip(agents, uids, strict=True):
        await agent.__aenter__()
        await agent.exchange(full_report(uid, 1, service="checkout"))
        await agent.exchange(status(uid, 2, first_hash, APPLIED))
    # The reads a session makes of its own agent's desired config, outside the catch-up.
    own_reads = runtime().contributor(RemoteConfigContributor).desired_reads
    own_reads_before = own_reads.queries
    monkeypatch.setattr(rollouts.session_contributor, "desired_configs_for_agents", counting_many)
    try:
        second_hash = await publish(files={"collector.yaml": {"body": "receivers: {}\n", "content_type": "text/yaml"}})
        pushed = [await agent.receive(timeout=5) for agent in agents]
    finally:
        for agent in agents:
            await agent.__aexit__(None)
    assert [reply.remote_config.config_hash.hex() for reply in pushed] == [second_hash] * 4
    assert own_reads.queries == own_reads_before
    assert len(batch_reads) == 1 and len(batch_reads[0]) == 4
