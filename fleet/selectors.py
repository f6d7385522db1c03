"""Reads of the fleet inventory, with the derived status as a database expression."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Case, CharField, Count, F, Q, QuerySet, Value, When
from django.utils import timezone

from fleet.models import Agent, AuditEvent, Transport
from opamp.capabilities import AgentCapabilities


class AgentStatus:
    ONLINE = "online"
    UNHEALTHY = "unhealthy"
    OFFLINE = "offline"
    CHOICES = [(ONLINE, "online"), (UNHEALTHY, "unhealthy"), (OFFLINE, "offline")]


def offline_after() -> timedelta:
    """Silence longer than this many heartbeat intervals makes an agent offline.

    The batched last_seen trails by at most one flush interval, which is added so a
    flush delay never flips an agent offline.
    """
    return timedelta(
        seconds=settings.OPAMP_HEARTBEAT_INTERVAL_SECONDS * settings.OPAMP_OFFLINE_AFTER_MISSED_HEARTBEATS
        + settings.OPAMP_HEARTBEAT_FLUSH_SECONDS
    )


def presence_q(now: datetime | None = None, *, prefix: str = "") -> Q:
    """Connected and heard from recently; `prefix` (e.g. "agent__") filters a related model."""
    cutoff = (now or timezone.now()) - offline_after()
    return Q(**{f"{prefix}connected": True, f"{prefix}last_seen__gte": cutoff})


def agent_live_on_websocket(*, instance_uid: uuid.UUID, now: datetime | None = None) -> bool:
    """Whether the agent's row says a WebSocket session, on any server process, holds it:
    connected over WebSocket and heard from within the offline timeout."""
    return Agent.objects.filter(presence_q(now), instance_uid=instance_uid, transport=Transport.WEBSOCKET).exists()


def status_q(status: str, now: datetime | None = None) -> Q:
    present = presence_q(now)
    if status == AgentStatus.OFFLINE:
        return ~present
    if status == AgentStatus.UNHEALTHY:
        return present & Q(healthy=False)
    if status == AgentStatus.ONLINE:
        return present & ~Q(healthy=False)
    raise ValueError(f"unknown status {status!r}")


def agent_list(*, now: datetime | None = None) -> QuerySet[Agent]:
    """All agents with `status` annotated (online / unhealthy / offline)."""
    present = presence_q(now)
    return Agent.objects.annotate(
        status=Case(
            When(present & Q(healthy=False), then=Value(AgentStatus.UNHEALTHY)),
            When(present, then=Value(AgentStatus.ONLINE)),
            default=Value(AgentStatus.OFFLINE),
            output_field=CharField(),
        )
    )


def counts_by(queryset: QuerySet[Agent], field: str) -> dict[Any, int]:
    """{value of `field`: number of agents} in one grouped query (annotations allowed)."""
    rows = queryset.order_by().values_list(field).annotate(n=Count("pk")).values_list(field, "n")
    return dict(rows)


def with_capability(queryset: QuerySet[Agent], name: str) -> QuerySet[Agent]:
    try:
        bit = int(AgentCapabilities[name.upper()])
    except KeyError:
        raise ValueError(f"unknown capability {name!r}") from None
    return queryset.annotate(capability_bit=F("capabilities").bitand(bit)).filter(capability_bit=bit)


def attribute_q(key: str, value: Any) -> Q:
    """Identifying or non-identifying attribute `key` equals `value` (compared as text)."""
    return Q(**{f"identifying_attributes__{key}": value}) | Q(**{f"non_identifying_attributes__{key}": value})


def with_attribute(queryset: QuerySet[Agent], key: str, value: str) -> QuerySet[Agent]:
    if "__" in key:
        raise ValueError("attribute keys may not contain '__'")
    return queryset.filter(attribute_q(key, value))


def attribute_values(key: str, *, limit: int = 50) -> list[str]:
    """Distinct values of an attribute across the fleet, for filter menus."""
    values: set[str] = set()
    for source in ("identifying_attributes", "non_identifying_attributes"):
        rows = (
            Agent.objects.exclude(**{f"{source}__{key}": None})
            .values_list(f"{source}__{key}", flat=True)
            .distinct()[:limit]
        )
        values.update(str(v) for v in rows if v is not None)
    return sorted(values)[:limit]


def audit_list() -> QuerySet[AuditEvent]:
    return AuditEvent.objects.select_related("actor")
