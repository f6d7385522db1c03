"""A closed WebSocket session is freed by reference counting, not left to the collector.

At 18,000 agents a fleet's closed sessions made collections of seconds (BENCHMARKS.md):
each one left its consumer, session and connection object in reference cycles. What a
closed session may still leave is Django's, not ours: the recursive closure
`SQLCompiler.get_select` builds for a query with select_related (a function, its cell and
its closure tuple: 3 objects per such query; the first message's snapshot read is one).
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db.backends.base.base import BaseDatabaseWrapper

from fleet.consumers import OpampConsumer
from fleet.credentials import CredentialRefused
from fleet.session import AgentSession
from opamp.identifiers import uuid7
from tests.fleet.asgi_clients import WsAgent
from tests.fleet.messages import full_report, heartbeat
from tests.support.garbage import Garbage

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

SESSIONS = 40
# Django's select_related closure (see above), per session.
ALLOWED_PER_SESSION = 3
# Once per run, not per session: what the process's Redis connection for hints leaves when
# it is set up or re-established (measured: 28 objects, a publish task and its traceback).
ALLOWED_ONCE = 60
# A session's own objects; the database wrapper is one Django made per socket's task.
SESSION_TYPES = (OpampConsumer, AgentSession, BaseDatabaseWrapper)


async def open_and_close(uid: bytes) -> None:
    async with WsAgent() as agent:
        await agent.exchange(full_report(uid, 1))
        await agent.exchange(heartbeat(uid, 2))


async def test_closed_sessions_leave_no_cycles(garbage: Garbage) -> None:
    await open_and_close(uuid7().bytes)
    garbage.start()
    for _ in range(SESSIONS):
        await open_and_close(uuid7().bytes)
    by_type = garbage.collect()
    assert garbage.of_types(*SESSION_TYPES) == [], by_type.most_common(10)
    assert len(garbage.found) <= ALLOWED_PER_SESSION * SESSIONS + ALLOWED_ONCE, by_type.most_common(10)


async def test_a_superseded_session_leaves_no_cycles(garbage: Garbage) -> None:
    await open_and_close(uuid7().bytes)
    garbage.start()
    for _ in range(SESSIONS // 4):
        uid = uuid7().bytes
        async with WsAgent() as older:
            await older.exchange(full_report(uid, 1))
            async with WsAgent() as newer:
                await newer.exchange(full_report(uid, 2))
                await older.receive_close()
    by_type = garbage.collect()
    assert garbage.of_types(*SESSION_TYPES) == [], by_type.most_common(10)


async def test_a_refused_handshake_leaves_no_cycles(garbage: Garbage, settings: Any) -> None:
    settings.OPAMP_AGENT_AUTH = "required"
    refused = [(b"authorization", b"Bearer not-a-token")]
    garbage.start()
    for _ in range(SESSIONS // 4):
        connected, _ = await WsAgent(headers=refused).connect()
        assert not connected
    by_type = garbage.collect()
    assert garbage.of_types(*SESSION_TYPES, CredentialRefused) == [], by_type.most_common(10)
