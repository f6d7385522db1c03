"""The agent page's restart button: shown to operators for agents that accept restarts,
refused to viewers, audited, and the agent is asked on its live connection."""

from __future__ import annotations

import uuid

import pytest
from channels.db import database_sync_to_async
from django.test import Client

from fleet.models import AgentCommand, AuditEvent
from fleet.roles import OPERATOR, VIEWER, grant_role
from opamp.identifiers import uuid7
from tests.fleet.asgi_clients import WsAgent
from tests.fleet.factories import UserFactory
from tests.fleet.messages import BASE_CAPABILITIES, full_report

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

RESTARTABLE = BASE_CAPABILITIES | 0x400


@database_sync_to_async
def page(role: str, uid: bytes, *, post: bool = False) -> tuple[int, str]:
    user = UserFactory(username=role)
    grant_role(user=user, role=role)
    client = Client()
    client.force_login(user)
    url = f"/fleet/{uuid.UUID(bytes=uid)}/"
    response = client.post(url, {"action": "restart"}) if post else client.get(url)
    return response.status_code, response.content.decode()


async def test_an_operator_restarts_a_connected_agent_from_its_page():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1, capabilities=RESTARTABLE))
        status, content = await page(OPERATOR, uid)
        assert status == 200 and 'id="restart"' in content
        assert (await page(OPERATOR, uid, post=True))[0] == 302
        pushed = await agent.receive(timeout=5)
        assert pushed.HasField("command")
        status, content = await page(OPERATOR, uid, post=True)  # again at once: refused as too soon
        assert status == 200 and "OPAMP_RESTART_MIN_INTERVAL_SECONDS" in content
    assert await AgentCommand.objects.acount() == 1
    assert await AuditEvent.objects.filter(action="agent.restart", actor__username=OPERATOR).acount() == 1


async def test_viewers_see_no_button_and_their_post_is_refused():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1, capabilities=RESTARTABLE))
    status, content = await page(VIEWER, uid)
    assert status == 200 and 'id="restart"' not in content
    assert (await page(VIEWER, uid, post=True))[0] == 403
    assert not await AgentCommand.objects.aexists()


async def test_no_button_for_an_agent_that_does_not_accept_restarts():
    uid = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1))
    status, content = await page(OPERATOR, uid)
    assert status == 200 and 'id="restart"' not in content
