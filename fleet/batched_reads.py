"""Per-process reads of many agents' rows in one query, for sessions that ask together.

After a restart a process's whole share of the fleet reconnects within seconds, and each
agent's first message reads its rows: its snapshot, its desired config, its package facts.
One query per agent and read (a hop to a worker thread, the ORM building the same SELECT,
psycopg, a hop back) was a third of the CPU of a known agent's reconnect, more than the
session's own code. A `BatchedRead` reads the keys asked for while its previous read was
in flight with one query: a lone agent waits for its own query only, a crowd shares one
query per round trip (a group commit, for reads).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Mapping
from typing import Generic, TypeVar

from fleet.db import db

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Keys per query: an IN list or an array this long is still one cheap index scan, and a
# batch this large waits no longer than its own read.
MAX_BATCH = 2000


class BatchedRead(Generic[K, V]):
    """`await reads.get(key)`: `read(keys)` answers for many keys at once (a missing key: None)."""

    def __init__(self, read: Callable[[list[K]], Mapping[K, V]], *, max_batch: int = MAX_BATCH) -> None:
        self.read = read
        self._max_batch = max_batch
        self._waiting: dict[K, list[asyncio.Future[V | None]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.queries = 0  # reads made (tests and benchmarks compare it with the keys asked)

    async def get(self, key: K) -> V | None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A runtime outlives an event loop in tests: what waited on another is gone.
            self._loop, self._waiting, self._reader = loop, {}, None
        future: asyncio.Future[V | None] = loop.create_future()
        self._waiting.setdefault(key, []).append(future)
        if self._reader is None or self._reader.done():
            # Started on the next turn of the loop: every session reaching this point in
            # the same turn joins the first query.
            self._reader = loop.create_task(self._read_all())
        return await future

    async def _read_all(self) -> None:
        while self._waiting:
            keys = list(self._waiting)[: self._max_batch]
            batch = {key: self._waiting.pop(key) for key in keys}
            try:
                self.queries += 1
                found = await db(self.read)(keys)
            except Exception as error:
                # Every session of the batch meets the error its own read would have met
                # (an unreachable database is answered UNAVAILABLE by each).
                for futures in batch.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(error)
                continue
            except BaseException:
                # The reader itself was cancelled (the loop is shutting down): nobody is left
                # waiting on a read that will not come.
                for futures in (*batch.values(), *self._waiting.values()):
                    for future in futures:
                        future.cancel()
                self._waiting = {}
                raise
            for key, futures in batch.items():
                value = found.get(key)
                for future in futures:
                    if not future.done():  # its session may have been cancelled meanwhile
                        future.set_result(value)
