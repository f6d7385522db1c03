"""The session asks the registered contributors (fleet.session_contributor), in a fixed
order; a fleet without extensions serves anonymous agents; hints go to the contributor
whose kind they name."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import pytest
from channels.db import database_sync_to_async

import fleet.notify
from fleet import extensions
from fleet.credentials import NO_AUTHORITY
from fleet.extensions import FleetExtension
from fleet.hint_messages import HintKind
from fleet.models import Agent
from fleet.notify import notify_desired_config_changed
from fleet.services import AgentSnapshot
from fleet.session import AgentSession
from fleet.session_contributor import ReplyFiller, ReplyPart, ReportStep, SessionContributor
from fleet.session_runtime import BASE_SERVER_CAPABILITIES, FleetRuntime, reset_runtime, runtime
from opamp.capabilities import ServerCapabilities
from opamp.identifiers import uuid7
from opamp.proto import opamp_pb2
from rollouts import services
from rollouts.session_contributor import RemoteConfigContributor
from tests.fleet.messages import full_report, heartbeat

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]


class Recording(SessionContributor):
    """Declares its reply parts out of order and records what the session asks."""

    name = "recording"
    capabilities = int(ServerCapabilities.OFFERS_PACKAGES)

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def report_steps(self) -> Sequence[tuple[str, ReportStep]]:
        return (("custom_message", self.custom_message_step),)

    def reply_fillers(self) -> Sequence[tuple[ReplyPart, ReplyFiller]]:
        return ((ReplyPart.CUSTOM_MESSAGE, self.fill_custom_message), (ReplyPart.REMOTE_CONFIG, self.fill_config))

    async def custom_message_step(
        self, session: AgentSession, message: opamp_pb2.AgentToServer, snapshot: AgentSnapshot
    ) -> None:
        self.calls.append(f"step {message.custom_message.type}")

    async def fill_config(
        self, session: AgentSession, reply: opamp_pb2.ServerToAgent, snapshot: AgentSnapshot, now: datetime | None
    ) -> bool:
        self.calls.append("remote config")
        return False

    async def fill_custom_message(
        self, session: AgentSession, reply: opamp_pb2.ServerToAgent, snapshot: AgentSnapshot, now: datetime | None
    ) -> bool:
        self.calls.append("custom message" if now is not None else "custom message (push)")
        return False


class RecordingExtension(FleetExtension):
    name = "recording"

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def session_contributor(self, runtime: FleetRuntime) -> SessionContributor:
        return Recording(self.calls)


def only_extensions(monkeypatch: pytest.MonkeyPatch, *registered: FleetExtension) -> None:
    monkeypatch.setattr(extensions, "_registered", list(registered))
    reset_runtime()


async def test_a_fleet_without_extensions_serves_anonymous_agents_with_its_own_capabilities(monkeypatch):
    only_extensions(monkeypatch)
    uid = uuid7().bytes
    session = AgentSession(transport="websocket", remote_address="127.0.0.1")
    reply = await session.handle(full_report(uid, 1))
    assert reply.capabilities == BASE_SERVER_CAPABILITIES
    assert not reply.HasField("remote_config") and not reply.HasField("error_response")
    assert session.fleet.credentials is NO_AUTHORITY and session.fleet.contributors == ()
    assert await Agent.objects.filter(instance_uid=uuid.UUID(bytes=uid), connected=True).aexists()


async def test_the_reply_is_composed_in_part_order_after_the_steps_on_the_report(monkeypatch):
    calls: list[str] = []
    only_extensions(monkeypatch, RecordingExtension(calls))
    uid = uuid7().bytes
    session = AgentSession(transport="websocket", remote_address="127.0.0.1")
    message = full_report(uid, 1)
    message.custom_message.capability, message.custom_message.type = "io.example/v1", "hello"
    reply = await session.handle(message)
    assert reply.capabilities == BASE_SERVER_CAPABILITIES | ServerCapabilities.OFFERS_PACKAGES
    assert calls == ["step hello", "remote config", "custom message"]

    calls.clear()
    await session.handle(heartbeat(uid, 2))  # no custom message: no step
    assert await session.push_on_hint(HintKind.CONFIG) is None  # a kind nobody here handles
    assert calls == ["remote config", "custom message", "remote config", "custom message (push)"]


async def test_a_certificate_hint_leaves_the_desired_config_alone_and_a_config_hint_reads_it(monkeypatch):
    configuration = await database_sync_to_async(services.configuration_create)(
        name="edge", selector="service.name=checkout", actor=None
    )
    files = {"collector.yaml": {"body": "receivers: {}\n", "content_type": "text/yaml"}}
    await database_sync_to_async(services.configuration_publish)(configuration=configuration, files=files, author=None)
    uid = uuid7().bytes
    session = AgentSession(transport="websocket", remote_address="127.0.0.1")
    assert (await session.handle(full_report(uid, 1))).HasField("remote_config")
    await session.fleet.contributor(RemoteConfigContributor).offers.flush()  # the offer is on record

    reads: list[int] = []
    desired_reads = session.fleet.contributor(RemoteConfigContributor).desired_reads
    read = desired_reads.read

    def counting(agent_ids: list[int]) -> Any:
        reads.extend(agent_ids)
        return read(agent_ids)

    monkeypatch.setattr(desired_reads, "read", counting)
    assert await session.push_on_hint(HintKind.CERTIFICATE) is None
    assert reads == []
    assert await session.push_on_hint(HintKind.CONFIG) is None  # offered on this connection already
    assert len(reads) == 1


async def test_a_serving_process_learns_of_its_own_desired_config_change_at_once(monkeypatch):
    monkeypatch.setattr(fleet.notify, "_dispatch", lambda messages: None)
    cache = runtime().contributor(RemoteConfigContributor).desired
    cache.start_check()
    assert not cache.check_due()
    notify_desired_config_changed([uuid.uuid4()], generation=1)
    assert cache.check_due()
