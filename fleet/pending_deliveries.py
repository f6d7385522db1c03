"""Which agents something waits for (a command, a queued custom message), as one server
process knows it.

Asking the database on every message whether something waits for the agent would be one
query per heartbeat. Instead each process reads the set of agent ids with something
waiting (a small set, from a partial index) at most once per `check_seconds`, one read at a
time, and a hint naming the agent adds it at once. A session asks the database only for an
agent in the set, and the claim there (a conditional UPDATE) decides who delivers it.

Something not delivered within its time to live expires (`Delivery`): an agent that never
comes back must not keep a restart pending forever, which would refuse every later one, nor
a queue of messages that stays full. Expiry is derived from the request time, not stored:
a row is waiting while `delivered_at` is NULL and `requested_at` is after now minus the time
to live. The claim's UPDATE repeats that test, so a row read as waiting that expires before
the UPDATE is not delivered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar

from django.db.models import Case, CharField, Model, Q, QuerySet, Value, When
from django.utils import timezone

from fleet.db import db

M = TypeVar("M", bound=Model)

CHECK_SECONDS = 1.0


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    EXPIRED = "expired"


# For filters and the API schema (named DeliveryStateEnum there).
DELIVERY_STATE_CHOICES = [(state.value, state.value) for state in DeliveryState]


@dataclass(frozen=True)
class Delivery:
    """The delivery rule of rows with `requested_at` and `delivered_at`, for one time to live
    (read from the settings when used, so a changed setting holds at once)."""

    ttl_seconds: float

    def fresh_after(self, now: datetime | None = None) -> datetime:
        """Rows requested at or before this have expired unless delivered."""
        return (now or timezone.now()) - timedelta(seconds=self.ttl_seconds)

    def expires_at(self, requested_at: datetime) -> datetime:
        return requested_at + timedelta(seconds=self.ttl_seconds)

    def waiting_q(self, now: datetime | None = None) -> Q:
        return Q(delivered_at__isnull=True, requested_at__gt=self.fresh_after(now))

    def state_q(self, state: DeliveryState, now: datetime | None = None) -> Q:
        if state == DeliveryState.DELIVERED:
            return Q(delivered_at__isnull=False)
        if state == DeliveryState.PENDING:
            return self.waiting_q(now)
        return Q(delivered_at__isnull=True, requested_at__lte=self.fresh_after(now))

    def state(
        self, *, requested_at: datetime, delivered_at: datetime | None, now: datetime | None = None
    ) -> DeliveryState:
        if delivered_at is not None:
            return DeliveryState.DELIVERED
        if requested_at <= self.fresh_after(now):
            return DeliveryState.EXPIRED
        return DeliveryState.PENDING

    def with_state(self, queryset: QuerySet[M], now: datetime | None = None) -> QuerySet[M]:
        """`queryset` with each row's state as `delivery_state` (for pages and admin lists)."""
        return queryset.annotate(
            delivery_state=Case(
                *(When(self.state_q(state, now), then=Value(state.value)) for state in DeliveryState),
                output_field=CharField(),
            )
        )


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


def claim_first(waiting: QuerySet[M], *, now: datetime, fresh_after: datetime, look_at: int = 5) -> M | None:
    """The first of `waiting` (rows with a `delivered_at`, in delivery order) this caller
    marks delivered: a conditional UPDATE, so of two sessions claiming at once one gets it,
    and a row requested at or before `fresh_after` (expired) is never delivered."""
    model: Any = waiting.model
    for row in waiting[:look_at]:
        claimed = model.objects.filter(pk=row.pk, delivered_at__isnull=True, requested_at__gt=fresh_after)
        if claimed.update(delivered_at=now):
            row.delivered_at = now
            return row
    return None
