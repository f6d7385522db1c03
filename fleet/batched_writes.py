"""Per-process buffers for high-rate per-agent writes, flushed in one statement per batch.

A server process answering thousands of agents must not spend a database round trip
(and a thread hop) on every heartbeat or every offer: each buffer keeps the newest value
per key in memory and one task per event loop writes them all every `flush_seconds`.
What a buffer holds may be lost in a crash; each user says why that is harmless. A failed
flush (a deadlock, the database restarting) puts its batch back under what arrived since,
and the next flush tries again.

Buffers that write the same rows share a `RowWriters` lock: a process then writes those
rows in one transaction at a time. Two flushes updating many agent rows in different
orders deadlocked on PostgreSQL (and each lost its batch); and a batch is taken from the
buffer only under the lock, so whatever it holds is written before a newer value for the
same key can be (`write_now`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from fleet.db import db

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class RowWriters:
    """One lock per event loop, shared by the buffers that write the same rows."""

    def __init__(self) -> None:
        self._locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}

    def lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            self._locks = {known: held for known, held in self._locks.items() if not known.is_closed()}
            lock = self._locks[loop] = asyncio.Lock()
        return lock


class BatchedWrites(Generic[K, V]):
    def __init__(
        self,
        *,
        name: str,
        flush_seconds: float,
        write: Callable[[dict[K, V]], int],
        merge: Callable[[V, V], V] | None = None,
        writers: RowWriters | None = None,
    ) -> None:
        """`merge(held, newer)` combines a held value with a newer one for the same key;
        without it the newer value replaces the held one. `writers`: see the module doc."""
        self.name = name
        self.flush_seconds = flush_seconds
        self._write = write
        self._merge = merge
        self._writers = writers or RowWriters()
        self._pending: dict[K, V] = {}
        self._task: asyncio.Task[None] | None = None

    def note(self, key: K, value: V) -> None:
        held = self._pending.get(key)
        self._pending[key] = value if held is None or self._merge is None else self._merge(held, value)
        self._ensure_flusher()

    def holds(self, key: K) -> bool:
        """Whether a value for `key` waits for the next flush."""
        return key in self._pending

    def forget(self, key: K) -> None:
        self._pending.pop(key, None)

    async def write_now(self, key: K) -> None:
        """Write what is held for `key` now, after any batch already taken."""
        async with self._writers.lock():
            held = self._pending.pop(key, None)
            if held is not None:
                await self._write_batch({key: held})

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def _ensure_flusher(self) -> None:
        if self._task is None or self._task.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # called outside the server loop (tests): flush() runs on demand
            self._task = loop.create_task(self._run(), name=f"{self.name}-flush")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_seconds)
            try:
                await self.flush()
            except Exception:
                logger.exception("%s flush failed; its batch is kept for the next one", self.name)

    async def flush(self) -> int:
        async with self._writers.lock():
            batch, self._pending = self._pending, {}
            if not batch:
                return 0
            return await self._write_batch(batch)

    async def _write_batch(self, batch: dict[K, V]) -> int:
        try:
            return int(await db(self._write)(batch))
        except BaseException:
            self._put_back(batch)
            raise

    def _put_back(self, batch: dict[K, V]) -> None:
        """Return a failed batch under what arrived since (newer values win)."""
        for key, value in batch.items():
            newer = self._pending.get(key)
            if newer is None:
                self._pending[key] = value
            elif self._merge is not None:
                self._pending[key] = self._merge(value, newer)
