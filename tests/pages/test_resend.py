"""The agent page's "re-send configuration": operators only, audited, and the agent is
offered its desired configuration again on its live connection or its next poll."""

from __future__ import annotations

import uuid

import pytest
from channels.db import database_sync_to_async
from django.test import Client

from fleet.models import AuditEvent
from fleet.roles import OPERATOR, VIEWER, grant_role
from opamp.identifiers import uuid7
from rollouts import services
from rollouts.resend import NOTHING_TO_RESEND
from tests.fleet.asgi_clients import WsAgent, http_exchange
from tests.fleet.factories import UserFactory
from tests.fleet.messages import full_report, heartbeat

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

FILES = {"collector.yaml": {"body": "receivers:\n  otlp: {}\n", "content_type": "text/yaml"}}


@database_sync_to_async
def publish() -> str:
    configuration = services.configuration_create(name="edge", selector="service.name=checkout", actor=None)
    version, _ = services.configuration_publish(configuration=configuration, files=FILES, author=None)
    return version.config_hash


@database_sync_to_async
def post_resend(role: str, uid: bytes) -> tuple[int, str]:
    user = UserFactory(username=role)
    grant_role(user=user, role=role)
    client = Client()
    client.force_login(user)
    response = client.post(f"/fleet/{uuid.UUID(bytes=uid)}/", {"action": "resend"})
    return response.status_code, response.content.decode()


@database_sync_to_async
def resend_audits(uid: bytes) -> list[AuditEvent]:
    events = AuditEvent.objects.filter(action="agent.config.resend", details__instance_uid=str(uuid.UUID(bytes=uid)))
    return list(events.select_related("actor"))


async def test_an_operator_re_sends_to_a_connected_agent_that_was_offered_already():
    config_hash = await publish()
    uid = uuid7().bytes
    async with WsAgent() as agent:
        assert (await agent.exchange(full_report(uid, 1, service="checkout"))).HasField("remote_config")
        assert not (await agent.exchange(heartbeat(uid, 2))).HasField("remote_config")
        assert await post_resend(OPERATOR, uid) == (302, "")
        pushed = await agent.receive(timeout=5)
        assert pushed.remote_config.config_hash.hex() == config_hash
        # Offered once again, not on every message from now on.
        assert not (await agent.exchange(heartbeat(uid, 3))).HasField("remote_config")
    (audit,) = await resend_audits(uid)
    assert audit.details["config_hash"] == config_hash and audit.actor.username == OPERATOR


async def test_a_polling_agent_is_offered_again_on_its_next_poll():
    config_hash = await publish()
    uid = uuid7().bytes
    assert (await http_exchange(full_report(uid, 1, service="checkout"))).HasField("remote_config")
    assert not (await http_exchange(heartbeat(uid, 2))).HasField("remote_config")
    assert await post_resend(OPERATOR, uid) == (302, "")
    again = await http_exchange(heartbeat(uid, 3))
    assert again.remote_config.config_hash.hex() == config_hash


async def test_a_viewer_is_refused_and_nothing_is_offered_again():
    await publish()
    uid = uuid7().bytes
    async with WsAgent() as agent:
        assert (await agent.exchange(full_report(uid, 1, service="checkout"))).HasField("remote_config")
        status, _ = await post_resend(VIEWER, uid)
        assert status == 403
        assert not (await agent.exchange(heartbeat(uid, 2))).HasField("remote_config")
    assert not await resend_audits(uid)


async def test_an_agent_without_a_desired_configuration_is_answered_on_the_page():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1, service="nobody-selects-me"))
    status, content = await post_resend(OPERATOR, uid)
    assert status == 200 and NOTHING_TO_RESEND in content
    assert not await resend_audits(uid)
