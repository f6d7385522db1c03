"""Per-process buffers for high-rate per-agent writes, flushed in one statement per batch.

A server process answering thousands of agents must not spend a database round trip
(and a thread hop) on every heartbeat or every offer: each buffer keeps the newest value
per key in memory and one task per event loop writes them all every `flush_seconds`.
What a buffer holds may be lost in a crash; each user says why that is harmless.
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


class BatchedWrites(Generic[K, V]):
    def __init__(
        self,
        *,
        name: str,
        flush_seconds: float,
        write: Callable[[dict[K, V]], int],
        merge: Callable[[V, V], V] | None = None,
    ) -> None:
        """`merge(held, newer)` combines a held value with a newer one for the same key;
        without it the newer value replaces the held one."""
        self.name = name
        self.flush_seconds = flush_seconds
        self._write = write
        self._merge = merge
        self._pending: dict[K, V] = {}
        self._task: asyncio.Task[None] | None = None

    def note(self, key: K, value: V) -> None:
        held = self._pending.get(key)
        self._pending[key] = value if held is None or self._merge is None else self._merge(held, value)
        self._ensure_flusher()

    def forget(self, key: K) -> None:
        self._pending.pop(key, None)

    def take(self, key: K) -> V | None:
        """Remove and return what is held for `key`: its owner writes it now, itself."""
        return self._pending.pop(key, None)

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
                # A failed flush (database restarting) is dropped, never retried forever:
                # every user of a buffer re-sends or re-derives what it holds.
                logger.exception("%s flush failed", self.name)

    async def flush(self) -> int:
        batch, self._pending = self._pending, {}
        if not batch:
            return 0
        return int(await db(self._write)(batch))
