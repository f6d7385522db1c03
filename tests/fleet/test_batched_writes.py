"""The per-process write buffers: a failed batch is kept, and writers of the same rows take turns."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
from django.db import DataError

from fleet.batched_writes import BatchedWrites, RowWriters

# The buffers run their writes through fleet.db, which tidies database connections.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]


class Deadlock(Exception):
    pass


class FlakyStore:
    """A write function that fails on demand and records what it wrote."""

    def __init__(self) -> None:
        self.rows: dict[str, str] = {}
        self.fail_next = False

    def write(self, batch: dict[str, str]) -> int:
        if self.fail_next:
            self.fail_next = False
            raise Deadlock("deadlock detected")
        self.rows.update(batch)
        return len(batch)


def concatenate(held: str, newer: str) -> str:
    return f"{held}+{newer}"


async def test_a_failed_batch_is_put_back_under_what_arrived_since():
    store = FlakyStore()
    buffer = BatchedWrites[str, str](name="test", flush_seconds=60, write=store.write, merge=concatenate)
    buffer.note("a", "applying")
    buffer.note("b", "applying")
    store.fail_next = True
    with pytest.raises(Deadlock):
        await buffer.flush()
    buffer.note("a", "applied")  # newer than the failed batch's value

    assert await buffer.flush() == 2
    assert store.rows == {"a": "applying+applied", "b": "applying"}


async def test_without_merge_a_newer_value_replaces_the_failed_one():
    store = FlakyStore()
    buffer = BatchedWrites[str, str](name="test", flush_seconds=60, write=store.write)
    buffer.note("a", "seq 1")
    store.fail_next = True
    with pytest.raises(Deadlock):
        await buffer.flush()
    buffer.note("a", "seq 2")
    await buffer.flush()
    assert store.rows == {"a": "seq 2"}


async def test_buffers_sharing_row_writers_never_write_at_the_same_time():
    writers = RowWriters()
    inside = 0
    most_inside = 0
    lock = threading.Lock()

    def slow_write(batch: dict[str, str]) -> int:
        nonlocal inside, most_inside
        with lock:
            inside += 1
            most_inside = max(most_inside, inside)
        threading.Event().wait(0.05)
        with lock:
            inside -= 1
        return len(batch)

    first = BatchedWrites[str, str](name="first", flush_seconds=60, write=slow_write, writers=writers)
    second = BatchedWrites[str, str](name="second", flush_seconds=60, write=slow_write, writers=writers)
    first.note("a", "1")
    second.note("a", "2")
    await asyncio.gather(first.flush(), second.flush(), second.write_now("a"))
    assert most_inside == 1


async def test_write_now_comes_after_a_batch_already_taken():
    store = FlakyStore()
    order: list[dict[str, str]] = []

    def recording_write(batch: dict[str, str]) -> int:
        order.append(dict(batch))
        return store.write(batch)

    buffer = BatchedWrites[str, str](name="test", flush_seconds=60, write=recording_write, merge=concatenate)
    buffer.note("a", "old")
    flushing = asyncio.ensure_future(buffer.flush())
    await asyncio.sleep(0)  # the flush has taken its batch
    buffer.note("a", "new")
    await asyncio.gather(flushing, buffer.write_now("a"))
    assert order == [{"a": "old"}, {"a": "new"}]
    assert store.rows == {"a": "new"}


class ContentStore:
    """A write function whose database refuses one value, as PostgreSQL refuses a NUL."""

    def __init__(self, refused: str) -> None:
        self.refused = refused
        self.rows: dict[str, str] = {}
        self.statements = 0
        self.deadlock_on: str | None = None

    def write(self, batch: dict[str, str]) -> int:
        self.statements += 1
        if self.deadlock_on in batch and len(batch) <= 2:  # once the bisection reached it
            self.deadlock_on = None
            raise Deadlock("deadlock detected")
        if self.refused in batch.values():
            raise DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
        self.rows.update(batch)
        return len(batch)


async def test_a_value_the_database_refuses_is_isolated_and_dropped_with_a_log_line(caplog):
    store = ContentStore(refused="bad\x00")
    buffer = BatchedWrites[str, str](
        name="status", flush_seconds=60, write=store.write, describe=lambda key: f"agent {key}"
    )
    for index in range(64):
        buffer.note(f"a{index}", "bad\x00" if index == 41 else "ok")
    with caplog.at_level(logging.ERROR, logger="fleet.batched_writes"):
        assert await buffer.flush() == 63
    assert sorted(store.rows) == sorted(f"a{index}" for index in range(64) if index != 41)
    assert store.statements <= 2 * 6 + 1  # a bisection, not a statement per row
    assert [record.getMessage() for record in caplog.records] == [
        "status write for agent a41 dropped: the database refused it "
        "(PostgreSQL text fields cannot contain NUL (0x00) bytes)"
    ]
    assert buffer.pending_count == 0  # never retried
    buffer.note("a41", "ok")
    assert await buffer.flush() == 1


async def test_a_deadlock_while_isolating_keeps_what_is_not_written_yet():
    store = ContentStore(refused="bad")
    buffer = BatchedWrites[str, str](name="test", flush_seconds=60, write=store.write)
    for key in "abcd":
        buffer.note(key, "bad" if key == "a" else "ok")
    store.deadlock_on = "c"
    with pytest.raises(Deadlock):
        await buffer.flush()
    assert buffer.holds("c") and buffer.holds("d") and not buffer.holds("a")
    assert await buffer.flush() == 2
    assert sorted(store.rows) == ["b", "c", "d"]
