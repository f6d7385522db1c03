"""Reads of many agents' rows in one query, for the sessions that ask together."""

from __future__ import annotations

import asyncio

import pytest
from django.db import OperationalError

from fleet.batched_reads import BatchedRead
from fleet.session_runtime import reset_runtime, runtime
from opamp.identifiers import uuid7
from opamp.proto import opamp_pb2
from rollouts.session_contributor import RemoteConfigContributor
from tests.fleet.asgi_clients import WsAgent
from tests.fleet.messages import full_report

pytestmark = pytest.mark.asyncio


class Table:
    """A read function that records the keys of each call."""

    def __init__(self, rows: dict[int, str]) -> None:
        self.rows = rows
        self.calls: list[list[int]] = []

    def __call__(self, keys: list[int]) -> dict[int, str]:
        self.calls.append(list(keys))
        return {key: self.rows[key] for key in keys if key in self.rows}


async def test_keys_asked_together_are_read_in_one_call_and_a_missing_one_is_none() -> None:
    table = Table({1: "one", 2: "two", 3: "three"})
    reads = BatchedRead[int, str](table)
    assert await asyncio.gather(*(reads.get(key) for key in (1, 2, 3, 4, 2))) == ["one", "two", "three", None, "two"]
    assert table.calls == [[1, 2, 3, 4]]
    assert reads.queries == 1


async def test_keys_asked_while_a_read_is_in_flight_are_read_together_by_the_next() -> None:
    table = Table({key: str(key) for key in range(10)})
    reads = BatchedRead[int, str](table)
    first = asyncio.ensure_future(reads.get(0))
    await asyncio.sleep(0)  # the first read has started
    later = [asyncio.ensure_future(reads.get(key)) for key in range(1, 10)]
    assert await first == "0"
    assert [await future for future in later] == [str(key) for key in range(1, 10)]
    assert table.calls == [[0], list(range(1, 10))]


async def test_a_batch_is_no_larger_than_its_bound() -> None:
    table = Table({key: str(key) for key in range(5)})
    reads = BatchedRead[int, str](table, max_batch=2)
    assert await asyncio.gather(*(reads.get(key) for key in range(5))) == [str(key) for key in range(5)]
    assert table.calls == [[0, 1], [2, 3], [4]]


async def test_every_session_of_a_failed_read_meets_its_error_and_the_next_read_goes_ahead() -> None:
    def unreachable(keys: list[int]) -> dict[int, str]:
        raise OperationalError("couldn't get a connection after 10.00 sec")

    reads = BatchedRead[int, str](unreachable)
    results = await asyncio.gather(reads.get(1), reads.get(2), return_exceptions=True)
    assert all(isinstance(result, OperationalError) for result in results)
    reads.read = Table({1: "one"})
    assert await reads.get(1) == "one"


async def test_a_cancelled_session_leaves_the_others_of_its_batch_their_answer() -> None:
    table = Table({1: "one", 2: "two"})
    reads = BatchedRead[int, str](table)
    gone = asyncio.ensure_future(reads.get(1))
    kept = asyncio.ensure_future(reads.get(2))
    await asyncio.sleep(0)
    gone.cancel()
    assert await kept == "two"
    assert table.calls == [[1, 2]]


@pytest.mark.django_db(transaction=True)
async def test_known_agents_reconnecting_together_read_their_snapshots_and_desired_configs_in_batches() -> None:
    """After a restart, a crowd of known agents costs a query per batch, not one per agent."""
    uids = [uuid7().bytes for _ in range(8)]
    for uid in uids:
        async with WsAgent() as agent:
            await agent.exchange(full_report(uid, 1))
    reset_runtime()  # a restarted process: nothing in memory
    fleet = runtime()
    agents = [WsAgent() for _ in uids]
    try:
        for agent in agents:
            await agent.__aenter__()
        replies = await asyncio.gather(
            *(agent.exchange(full_report(uid, 2)) for agent, uid in zip(agents, uids, strict=True))
        )
    finally:
        for agent in agents:
            await agent.__aexit__(None)
    assert not any(reply.HasField("error_response") for reply in replies)
    assert not any(reply.flags & opamp_pb2.ServerToAgentFlags_ReportFullState for reply in replies)
    # The first query starts alone, the others join the next one (or it): never one each.
    assert fleet.snapshot_reads.queries <= 2
    assert fleet.contributor(RemoteConfigContributor).desired_reads.queries <= 2
