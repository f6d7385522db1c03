"""While the database cannot be reached (PostgreSQL restarting, the pool giving up after its
timeout), an agent's message is answered UNAVAILABLE with retry_info (503 with Retry-After
over HTTP): the agent comes back later with a full report. Found by the PostgreSQL fault
drill (RELIABILITY.md): with PostgreSQL down for 15 s, the error escaped the session, daphne
logged "Exception inside application" with a traceback for 1,828 of 2,000 agents and
dropped their sockets at once.
"""

from __future__ import annotations

import uuid
from typing import Any
from unittest.mock import patch

import pytest
from django.db import OperationalError

from fleet.models import Agent
from fleet.session_runtime import runtime
from opamp.identifiers import uuid7
from opamp.proto import opamp_pb2
from tests.fleet.asgi_clients import WsAgent, http_exchange, http_post
from tests.fleet.messages import full_report

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]


def unreachable(*args: Any, **kwargs: Any) -> Any:
    raise OperationalError("couldn't get a connection after 10.00 sec")


async def test_a_websocket_message_meeting_an_unreachable_database_is_answered_unavailable() -> None:
    uid = uuid7().bytes
    async with WsAgent(client="10.0.0.1") as agent:
        with patch.object(runtime().snapshot_reads, "read", unreachable):
            reply = await agent.exchange(full_report(uid, 1))
        assert reply.HasField("error_response")
        assert reply.error_response.type == opamp_pb2.ServerErrorResponseType_Unavailable
        assert reply.error_response.retry_info.retry_after_nanoseconds > 0
        assert reply.instance_uid == uid
    # The database back, the agent's next connection is served and its report stored.
    async with WsAgent(client="10.0.0.1") as agent:
        reply = await agent.exchange(full_report(uid, 1))
        assert not reply.HasField("error_response")
    assert await Agent.objects.filter(instance_uid=uuid.UUID(bytes=uid)).aexists()


async def test_an_http_poll_meeting_an_unreachable_database_gets_503_with_retry_after() -> None:
    uid = uuid7().bytes
    with patch.object(runtime().snapshot_reads, "read", unreachable):
        response = await http_post(full_report(uid, 1).SerializeToString())
    assert response["status"] == 503
    assert int(response["headers_dict"][b"retry-after"]) >= 1
    reply = await http_exchange(full_report(uid, 1))
    assert not reply.HasField("error_response")
