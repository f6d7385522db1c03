"""Which agents something waits for (a command, a queued custom message), as one server
process knows it.

Asking the database on every message whether something waits for the agent would be one
query per heartbeat. Instead each process reads the set of agent ids with something
waiting (a small set, from a partial index) at most once per `check_seconds`, one read at a
time, and a hint naming the agent adds it at once. A session asks the database only for an
agent in the set, and the claim there (a conditional UPDATE) decides who delivers it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from django.db.models import Model, QuerySet

from fleet.db import db

M = TypeVar("M", bound=Model)

CHECK_SECONDS = 1.0


class PendingAgents:
    def __init__(self, read: Callable[[], set[int]], *, check_seconds: float = CHECK_SECONDS) -> None:
        self._read = read
        self.check_seconds = check_seconds
        self.agent_ids: set[int] = set()
        self.checked_at = float("-inf")
        self._reading: asyncio.Future[None] | None = None
        # Agents hinted while a read is under way: the read may have started before their
        # change committed, so they are kept over what it returns.
        self._hinted_meanwhile: set[int] | None = None

    def __contains__(self, agent_id: int) -> bool:
        return agent_id in self.agent_ids

    def add(self, agent_id: int) -> None:
        """A hint named the agent: something waits for it now."""
        self.agent_ids.add(agent_id)
        if self._hinted_meanwhile is not None:
            self._hinted_meanwhile.add(agent_id)

    def discard(self, agent_id: int) -> None:
        """A claim found nothing left for the agent."""
        self.agent_ids.discard(agent_id)

    def expire(self) -> None:
        """Read again on the next check (this process just queued something)."""
        self.checked_at = float("-inf")

    async def refresh_if_due(self) -> None:
        if time.monotonic() - self.checked_at <= self.check_seconds:
            return
        running = self._reading
        if running is not None and not running.done() and running.get_loop() is asyncio.get_running_loop():
            await asyncio.shield(running)
            return
        self._reading = asyncio.ensure_future(self._refresh())
        await asyncio.shield(self._reading)

    async def _refresh(self) -> None:
        started = time.monotonic()
        hinted: set[int] = set()
        self._hinted_meanwhile = hinted
        try:
            fresh = await db(self._read)()
        finally:
            self._hinted_meanwhile = None
        self.agent_ids = fresh | hinted
        self.checked_at = started


def claim_first(waiting: QuerySet[M], *, now: datetime, look_at: int = 5) -> M | None:
    """The first of `waiting` (rows with a `delivered_at`, in delivery order) this caller
    marks delivered: a conditional UPDATE, so of two sessions claiming at once one gets it."""
    model: Any = waiting.model
    for row in waiting[:look_at]:
        if model.objects.filter(pk=row.pk, delivered_at__isnull=True).update(delivered_at=now):
            row.delivered_at = now
            return row
    return None
