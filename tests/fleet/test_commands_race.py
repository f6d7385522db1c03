"""Concurrency on PostgreSQL, in real transactions: sessions of several processes claiming the
same command or message at once deliver it once, and restart requests for the same agent
made at once (two API calls) ask it once.

Each thread has a database connection of its own, so these are concurrent transactions as
two server processes (or a server process's database threads) would run them; a barrier
lines them up so they reach the database together.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
from django.db import connection, connections
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from fleet.commands import command_claim, restart_request
from fleet.custom_messages import custom_message_claim, custom_message_send
from fleet.models import Agent, AgentCommand, AuditEvent, QueuedCustomMessage
from fleet.roles import OPERATOR, grant_role
from tests.fleet.factories import AgentFactory, UserFactory
from tests.fleet.messages import BASE_CAPABILITIES

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="row locks and concurrent transactions: PostgreSQL"),
]

RESTARTABLE = BASE_CAPABILITIES | 0x400
PING = "io.example.ping/v1"
THREADS = 8
ROUNDS = 5

T = TypeVar("T")


def at_once(work: Callable[[int], T], threads: int = THREADS) -> list[T]:
    """`work(index)` in `threads` threads released together; each closes its connection."""
    barrier = threading.Barrier(threads)

    def run(index: int) -> T:
        try:
            connections["default"].ensure_connection()  # connected before the start line
            barrier.wait(timeout=30)
            return work(index)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(run, range(threads)))


def test_a_pending_command_claimed_by_many_sessions_at_once_is_delivered_once():
    for _ in range(ROUNDS):
        agent = AgentFactory(capabilities=RESTARTABLE)
        [command] = restart_request(agents=Agent.objects.filter(pk=agent.pk), actor=None).requested
        claims = at_once(lambda _, agent_id=agent.pk: command_claim(agent_id=agent_id, now=timezone.now()))
        delivered = [claim for claim in claims if claim is not None]
        assert [claim.pk for claim in delivered] == [command.pk]
        stored = AgentCommand.objects.get(pk=command.pk)
        assert stored.delivered_at == delivered[0].delivered_at


def test_a_queued_custom_message_claimed_by_many_sessions_at_once_is_delivered_once():
    agent = AgentFactory(custom_capabilities=[PING])
    for number in range(ROUNDS):
        custom_message_send(
            agents=Agent.objects.filter(pk=agent.pk), capability=PING, type=f"m{number}", data=b"", actor=None
        )
    # More sessions than messages claim together: each message goes to exactly one of them.
    claims = at_once(lambda _: custom_message_claim(agent_id=agent.pk, capabilities=[PING], now=timezone.now()))
    delivered = sorted(claim.type for claim in claims if claim is not None)
    assert delivered == [f"m{number}" for number in range(ROUNDS)]
    assert not QueuedCustomMessage.objects.filter(delivered_at__isnull=True).exists()


def operator_client() -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get(user__username='operator').key}")
    return client


def test_restarts_asked_at_once_through_the_api_create_one_pending_command():
    user = UserFactory(username="operator")
    grant_role(user=user, role=OPERATOR)
    Token.objects.create(user=user)
    for _ in range(ROUNDS):
        AgentCommand.objects.all().delete()
        agent = AgentFactory(capabilities=RESTARTABLE)

        def ask(_: int, uid: Any = agent.instance_uid) -> tuple[int, dict[str, Any]]:
            response = operator_client().post(f"/api/v1/agents/{uid}/restart/", {}, format="json")
            return response.status_code, response.json()

        answers = at_once(ask)
        assert sorted(status for status, _ in answers) == [200] * (THREADS - 1) + [202], answers
        assert sum(body["requested"] for _, body in answers) == 1
        assert sum(body["rate_limited"] for _, body in answers) == THREADS - 1
        assert AgentCommand.objects.filter(agent=agent).count() == 1
    assert AuditEvent.objects.filter(action="agent.restart").count() == ROUNDS


def test_selector_restarts_asked_at_once_ask_each_agent_once():
    user = UserFactory(username="operator")
    grant_role(user=user, role=OPERATOR)
    Token.objects.create(user=user)
    agents = [AgentFactory(capabilities=RESTARTABLE, labels={"env": "prod", "n": str(n)}) for n in range(6)]
    # Overlapping selectors, so the requests lock overlapping sets of rows.
    selectors = ["env=prod", "n in (0,1,2,3)", "n in (2,3,4,5)", "env=prod,n notin (5)"]

    def ask(index: int) -> int:
        selector = selectors[index % len(selectors)]
        response = operator_client().post("/api/v1/commands/restart/", {"selector": selector}, format="json")
        assert response.status_code in (200, 202), response.content
        return int(response.json()["requested"])

    assert sum(at_once(ask)) == len(agents)
    assert sorted(AgentCommand.objects.values_list("agent_id", flat=True)) == sorted(agent.pk for agent in agents)
