"""Per-process buffers for high-rate per-agent writes, flushed in one statement per batch.

A server process answering thousands of agents must not spend a database round trip
(and a thread hop) on every heartbeat or every offer: each buffer keeps the newest value
per key in memory and one task per event loop writes them all every `flush_seconds`.
What a buffer holds may be lost in a crash; each user says why that is harmless. A failed
flush (a deadlock, the database restarting) puts its batch back under what arrived since,
and the next flush tries again.

A batch that fails because of its content (a DataError or IntegrityError: a value the
database refuses) would fail again on every retry, and take every other key's value
with it: one NUL byte in one agent's report once stopped every status write of a server
process. Such a batch is bisected instead: the halves are written on their own, down to
the single offending value, which is dropped with one log line naming its key. Every
other value is written; nothing is retried forever.

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

from django.db import DataError, IntegrityError

from fleet.db import db

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Failures caused by what a batch holds, not by the database's state: retrying the same
# batch cannot succeed. (psycopg refuses a lone surrogate with UnicodeEncodeError before
# the statement is sent.)
CONTENT_ERRORS = (DataError, IntegrityError, UnicodeError)
DROPPED_LOG = "%s write for %s dropped: the database refused it (%s)"


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
        describe: Callable[[K], str] | None = None,
    ) -> None:
        """`merge(held, newer)` combines a held value with a newer one for the same key;
        without it the newer value replaces the held one. `writers`: see the module doc.
        `describe(key)` names a key in the log line of a dropped value (e.g. "agent 42")."""
        self.name = name
        self._describe = describe or repr
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
        """Write `batch`, isolating values the database refuses (see the module doc)."""
        parts = [batch]
        written = 0
        while parts:
            part = parts.pop()
            try:
                written += int(await db(self._write)(part))
            except CONTENT_ERRORS as error:
                if len(part) == 1:
                    (key,) = part
                    reason = (str(error).splitlines() or [type(error).__name__])[0]
                    logger.error(DROPPED_LOG, self.name, self._describe(key), reason)
                    continue
                items = list(part.items())
                middle = len(items) // 2
                parts += [dict(items[middle:]), dict(items[:middle])]
            except BaseException:
                # Not the content's fault (a deadlock, the database restarting): whatever
                # is not written yet waits for the next flush.
                for unwritten in (part, *parts):
                    self._put_back(unwritten)
                raise
        return written

    def _put_back(self, batch: dict[K, V]) -> None:
        """Return a failed batch under what arrived since (newer values win)."""
        for key, value in batch.items():
            newer = self._pending.get(key)
            if newer is None:
                self._pending[key] = value
            elif self._merge is not None:
                self._pending[key] = self._merge(value, newer)
