"""Admission pacing: a token bucket per process; excess agents are told when to come back."""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import pytest

from fleet.admission import MAX_RETRY_AFTER_SECONDS, UNAVAILABLE_MESSAGE, TokenBucket
from fleet.models import Agent
from fleet.session_runtime import reset_runtime, runtime
from opamp.identifiers import uuid7
from opamp.proto import opamp_pb2
from tests.fleet.asgi_clients import WsAgent, http_post
from tests.fleet.messages import full_report, heartbeat


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def bucket(rate: float, burst: float) -> tuple[TokenBucket, Clock]:
    clock = Clock()
    return TokenBucket(rate=rate, burst=burst, clock=clock, rng=random.Random(5)), clock


def test_the_burst_is_admitted_then_one_per_token_refilled() -> None:
    gate, clock = bucket(rate=10, burst=3)
    assert [gate.take() for _ in range(3)] == [None, None, None]
    assert gate.take() is not None
    clock.now += 0.1
    assert gate.take() is None
    assert gate.take() is not None


def test_refused_agents_are_booked_one_after_another_with_jitter() -> None:
    gate, _ = bucket(rate=10, burst=1)
    assert gate.take() is None
    waits = [gate.take() for _ in range(50)]
    assert all(wait is not None for wait in waits)
    floors = [0.1 * (index + 1) for index in range(50)]  # each one's slot after those before it
    assert all(floor <= wait <= floor * 1.5 for floor, wait in zip(floors, waits, strict=True) if wait is not None)
    assert len({round(wait or 0, 6) for wait in waits}) == 50


def test_a_costly_admission_waits_for_its_whole_cost() -> None:
    gate, clock = bucket(rate=10, burst=4)
    assert gate.take(4) is None
    wait = gate.take(4)
    assert wait is not None and wait >= 0.4
    clock.now += 0.4
    assert gate.take(4) is None


def test_no_wait_is_longer_than_the_cap() -> None:
    gate, _ = bucket(rate=0.001, burst=1)
    gate.take()
    assert gate.take() == MAX_RETRY_AFTER_SECONDS


def test_a_zero_rate_admits_everything() -> None:
    gate, _ = bucket(rate=0, burst=0)
    assert all(gate.take(4) is None for _ in range(100))


# --- the transports -------------------------------------------------------------------


@pytest.fixture
def tiny_rate(settings: Any) -> None:
    """Two tokens saved, one more every ten seconds; a new agent costs two."""
    settings.OPAMP_ADMISSION_RATE = 0.1
    settings.OPAMP_ADMISSION_BURST = 2
    settings.OPAMP_ADMISSION_FULL_COST = 2
    reset_runtime()


async def known_only_to_the_database(*, tokens: float) -> tuple[bytes, TokenBucket]:
    """An agent inventoried, then a process holding nothing of it in memory (as after a
    restart), its bucket holding `tokens`."""
    known = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(known, 1))
    runtime().snapshots.clear()
    gate = runtime().admission
    gate._tokens = tokens
    return known, gate


def retry_after_seconds(reply: opamp_pb2.ServerToAgent) -> float:
    assert reply.error_response.type == opamp_pb2.ServerErrorResponseType_Unavailable
    assert reply.error_response.error_message == UNAVAILABLE_MESSAGE
    assert reply.error_response.HasField("retry_info")
    return reply.error_response.retry_info.retry_after_nanoseconds / 1e9


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_an_excess_websocket_agent_gets_unavailable_with_retry_info_and_nothing_is_stored(
    tiny_rate: None,
) -> None:
    first, second = uuid7().bytes, uuid7().bytes
    async with WsAgent() as agent:
        assert not (await agent.exchange(full_report(first, 1))).HasField("error_response")
    async with WsAgent() as agent:
        reply = await agent.exchange(full_report(second, 1))
        assert 10 <= retry_after_seconds(reply) <= 30  # two tokens at one per ten seconds, plus jitter
        # Later messages on the same socket get the same answer, without any work.
        assert (await agent.exchange(heartbeat(second, 2))).error_response.type == (
            opamp_pb2.ServerErrorResponseType_Unavailable
        )
    assert not await Agent.objects.filter(instance_uid=uuid.UUID(bytes=second)).aexists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_the_refused_socket_is_closed_once_its_retry_info_has_passed(settings: Any) -> None:
    settings.OPAMP_ADMISSION_RATE = 2
    settings.OPAMP_ADMISSION_BURST = 1
    settings.OPAMP_ADMISSION_FULL_COST = 1
    reset_runtime()
    async with WsAgent() as agent:
        await agent.exchange(full_report(uuid7().bytes, 1))
        async with WsAgent() as refused:
            wait = retry_after_seconds(await refused.exchange(full_report(uuid7().bytes, 1)))
            assert wait <= 0.75
            closed = await refused.receive_close(timeout=wait + 2)
            assert closed["type"] == "websocket.close"


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_the_agent_admitted_later_is_stored_as_usual(settings: Any) -> None:
    settings.OPAMP_ADMISSION_RATE = 2
    settings.OPAMP_ADMISSION_BURST = 1
    settings.OPAMP_ADMISSION_FULL_COST = 1
    reset_runtime()
    late = uuid7().bytes
    async with WsAgent() as agent:
        await agent.exchange(full_report(uuid7().bytes, 1))
        async with WsAgent() as refused:
            wait = retry_after_seconds(await refused.exchange(full_report(late, 1)))
        await asyncio.sleep(wait)
        async with WsAgent() as again:
            assert not (await again.exchange(full_report(late, 1))).HasField("error_response")
    assert await Agent.objects.filter(instance_uid=uuid.UUID(bytes=late)).aexists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_known_agent_reconnecting_unchanged_costs_less_than_a_new_one(tiny_rate: None) -> None:
    known, gate = await known_only_to_the_database(tokens=2.0)
    async with WsAgent() as agent:
        assert not (await agent.exchange(full_report(known, 2))).HasField("error_response")
    assert gate._tokens == pytest.approx(1.0, abs=0.05)  # one token
    gate._tokens = 2.0
    async with WsAgent() as agent:
        assert not (await agent.exchange(full_report(uuid7().bytes, 1))).HasField("error_response")
    assert gate._tokens == pytest.approx(0.0, abs=0.05)  # a new agent: the full cost


def test_two_agents_arriving_together_cannot_each_take_part_and_both_be_refused() -> None:
    """The full cost is taken at once: of two agents that find exactly one admission's worth
    of tokens, one is admitted (taking it in two steps let both take half and fail)."""
    gate, _ = bucket(rate=1, burst=2)
    assert [gate.take(2), gate.take(2)].count(None) == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_an_excess_http_request_gets_503_with_retry_after(tiny_rate: None) -> None:
    first, second = uuid7().bytes, uuid7().bytes
    response = await http_post(full_report(first, 1).SerializeToString())
    assert response["status"] == 200
    response = await http_post(full_report(second, 1).SerializeToString())
    assert response["status"] == 503
    headers = dict(response["headers"])
    assert 10 <= int(headers[b"retry-after"]) <= 31
    assert UNAVAILABLE_MESSAGE in response["body"].decode()
    # A polling agent this process knows is past admission: its next poll is served.
    response = await http_post(
        heartbeat(first, 2).SerializeToString(), headers=[(b"opamp-instance-uid", str(uuid.UUID(bytes=first)).encode())]
    )
    assert response["status"] == 200


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_refused_known_agent_is_booked_at_the_reconnect_cost_and_a_new_one_at_the_full_cost(
    tiny_rate: None,
) -> None:
    """A restart's known agents are told to come back at the rate the bucket admits them,
    not at the rate of new agents (each refusal used to be booked at the full cost)."""
    known, gate = await known_only_to_the_database(tokens=0.0)
    async with WsAgent() as agent:
        wait = retry_after_seconds(await agent.exchange(full_report(known, 2)))
    assert 9.9 <= wait <= 11  # one token at one per ten seconds, plus at most a tenth
    reset_runtime()
    gate = runtime().admission
    gate._tokens = 0.0
    async with WsAgent() as agent:
        wait = retry_after_seconds(await agent.exchange(full_report(uuid7().bytes, 1)))
    assert 19.9 <= wait <= 22  # a new agent: two tokens


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_known_agent_whose_report_changed_pays_the_full_cost(tiny_rate: None) -> None:
    known, gate = await known_only_to_the_database(tokens=2.0)
    async with WsAgent() as agent:
        assert not (await agent.exchange(full_report(known, 2, healthy=False))).HasField("error_response")
    assert gate._tokens == pytest.approx(0.0, abs=0.05)


def test_a_refusal_adds_at_most_a_tenth_of_its_wait_at_random() -> None:
    gate, _ = bucket(rate=10, burst=1)
    assert gate.take() is None
    waits = [gate.take() or 0.0 for _ in range(200)]
    floors = [0.1 * (index + 1) for index in range(200)]
    assert all(floor <= wait <= floor * 1.1 + 1e-9 for floor, wait in zip(floors, waits, strict=True))
    # The turns stay in the order they were booked, give or take the jitter: the last of
    # 200 refused at 10 per second comes back after about 20 s, not 30.
    assert max(waits) <= 22.0
