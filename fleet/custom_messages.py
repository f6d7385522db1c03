"""Custom messages (the protocol's CustomMessage): what agents send, and what operators send them.

Agents' messages are kept per agent, the newest OPAMP_CUSTOM_MESSAGE_HISTORY of them
(older ones pruned on each write), each with at most OPAMP_CUSTOM_MESSAGE_MAX_BYTES of its
data and the size it had. An operator sends a message to one agent or to the agents a
label selector picks (`custom_message_send`); only agents that declared the message's
capability in their CustomCapabilities get it (the others are counted), and at most
OPAMP_CUSTOM_MESSAGE_QUEUE wait per agent (more are counted as refused). Queued messages go
out one per reply, oldest first, after any custom message the server itself sends on the
same reply (signing's renewal request): a ServerToAgent holds one custom message
(fleet.custom_message_contributor). `custom_message_claim` marks one delivered with a
conditional UPDATE, so it goes out once. A message not delivered within
OPAMP_CUSTOM_MESSAGE_TTL_SECONDS expires: never delivered, and no longer taking a place in
the agent's queue (fleet.pending_deliveries).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

from django.conf import settings
from django.db import connections, transaction
from django.db.models import Count, QuerySet
from django.utils import timezone

from fleet.audit import Actor, actor_user, audit_records
from fleet.models import Agent, AgentCustomMessage, QueuedCustomMessage
from fleet.notify import notify_custom_message_waiting
from fleet.pending_deliveries import Delivery, claim_first
from fleet.safe_text import safe_text

SEND_ACTION = "agent.custom_message.send"
NAME_MAX_CHARS = 256


def custom_message_delivery() -> Delivery:
    return Delivery(settings.OPAMP_CUSTOM_MESSAGE_TTL_SECONDS)


def with_custom_capability(queryset: QuerySet[Agent], name: str) -> QuerySet[Agent]:
    """The agents that declared the custom capability `name`."""
    if connections[queryset.db].vendor == "postgresql":
        return queryset.filter(custom_capabilities__contains=[name])
    # Other databases have no JSON containment: a text prefilter, then the exact test.
    candidates = queryset.filter(custom_capabilities__icontains=name).values_list("pk", "custom_capabilities")
    return queryset.filter(pk__in=[pk for pk, names in candidates if isinstance(names, list) and name in names])


def custom_message_record(*, agent_id: int, capability: str, type: str, data: bytes, now: datetime) -> None:
    """Keep a message an agent sent; its history keeps the newest OPAMP_CUSTOM_MESSAGE_HISTORY."""
    keep = max(1, settings.OPAMP_CUSTOM_MESSAGE_HISTORY)
    with transaction.atomic():
        AgentCustomMessage.objects.create(
            agent_id=agent_id,
            capability=safe_text(capability[:NAME_MAX_CHARS]),
            type=safe_text(type[:NAME_MAX_CHARS]),
            data=bytes(data[: settings.OPAMP_CUSTOM_MESSAGE_MAX_BYTES]),
            size=len(data),
            received_at=now,
        )
        kept = AgentCustomMessage.objects.filter(agent_id=agent_id).order_by("-id").values_list("id", flat=True)
        oldest_kept = list(kept[keep - 1 : keep])
        if oldest_kept:
            AgentCustomMessage.objects.filter(agent_id=agent_id, id__lt=oldest_kept[0]).delete()


def custom_messages_of(agent: Agent) -> QuerySet[AgentCustomMessage]:
    return AgentCustomMessage.objects.filter(agent=agent).order_by("-id")


@dataclass
class SendOutcome:
    queued: list[QueuedCustomMessage] = field(default_factory=list)
    # Agents that did not declare the capability.
    not_capable: list[uuid.UUID] = field(default_factory=list)
    # Agents with OPAMP_CUSTOM_MESSAGE_QUEUE messages already waiting.
    queue_full: list[uuid.UUID] = field(default_factory=list)


def custom_message_send(
    *,
    agents: QuerySet[Agent],
    capability: str,
    type: str,
    data: bytes,
    actor: Actor,
    selector: str = "",
    now: datetime | None = None,
) -> SendOutcome:
    """Queue the message for each of `agents` that declared `capability`."""
    now = now or timezone.now()
    outcome = SendOutcome()
    with transaction.atomic():
        locked = list(Agent.objects.filter(pk__in=agents.order_by().values("pk")).select_for_update().order_by("id"))
        waiting = dict(
            QueuedCustomMessage.objects.filter(
                custom_message_delivery().waiting_q(now), agent_id__in=[agent.pk for agent in locked]
            )
            .values("agent_id")
            .annotate(count=Count("id"))
            .values_list("agent_id", "count")
        )
        for agent in locked:
            if capability not in (agent.custom_capabilities or []):
                outcome.not_capable.append(agent.instance_uid)
            elif waiting.get(agent.pk, 0) >= settings.OPAMP_CUSTOM_MESSAGE_QUEUE:
                outcome.queue_full.append(agent.instance_uid)
            else:
                outcome.queued.append(
                    QueuedCustomMessage(
                        agent=agent,
                        capability=capability,
                        type=type,
                        data=data,
                        requested_by=actor_user(actor),
                        requested_at=now,
                    )
                )
        QueuedCustomMessage.objects.bulk_create(outcome.queued)
        audit_records(
            actor=actor,
            action=SEND_ACTION,
            targets=(
                (
                    message.agent,
                    {
                        "instance_uid": str(message.agent.instance_uid),
                        "capability": capability,
                        "type": type,
                        "size": len(data),
                        "selector": selector,
                    },
                )
                for message in outcome.queued
            ),
        )
        uids = [message.agent.instance_uid for message in outcome.queued]
        if uids:
            transaction.on_commit(lambda: notify_custom_message_waiting(uids))
    return outcome


def agents_with_queued_custom_messages() -> set[int]:
    """The ids of agents a message waits for, expired ones left out."""
    waiting = QueuedCustomMessage.objects.filter(custom_message_delivery().waiting_q())
    return set(waiting.values_list("agent_id", flat=True).distinct())


def custom_message_claim(*, agent_id: int, capabilities: list[str], now: datetime) -> QueuedCustomMessage | None:
    """The agent's oldest waiting message for a capability it still declares, now marked
    delivered; None when there is none (expired ones are not), or another session claimed
    it first."""
    delivery = custom_message_delivery()
    waiting = QueuedCustomMessage.objects.filter(
        delivery.waiting_q(now), agent_id=agent_id, capability__in=capabilities
    ).order_by("id")
    return claim_first(waiting, now=now, fresh_after=delivery.fresh_after(now))


def queued_custom_messages() -> QuerySet[QueuedCustomMessage]:
    """Operators' messages newest first, each with its `delivery_state`."""
    queued = QueuedCustomMessage.objects.select_related("agent", "requested_by").order_by("-id")
    return custom_message_delivery().with_state(queued)
