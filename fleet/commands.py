"""Commands to agents (the protocol has one: Restart): asked by operators, delivered once.

An operator asks a restart of one agent or of the agents a label selector picks
(`restart_request`). Only agents that declare AcceptsRestartCommand get one; the others are
counted as not capable. An agent with a restart still waiting, or asked within
OPAMP_RESTART_MIN_INTERVAL_SECONDS, is not asked again (counted as rate limited). A restart
not delivered within OPAMP_COMMAND_TTL_SECONDS expires: it is never delivered and no longer
counts as waiting (fleet.pending_deliveries), so an agent that never came back can be asked
again once the minimum interval has passed. Each
request is an `AgentCommand` row and an audit row naming who asked; after commit a
`command` hint makes a live WebSocket session push it at once, and a polling agent gets it
with the reply to its next message (fleet.command_contributor). `command_claim` marks a
command delivered with a conditional UPDATE, so it goes out once, whichever process or
connection claims it first.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from fleet.audit import Actor, actor_user, audit_records
from fleet.models import Agent, AgentCommand, CommandKind
from fleet.notify import notify_command_waiting
from fleet.pending_deliveries import Delivery, claim_first
from opamp.capabilities import AgentCapabilities, has_capability

RESTART_ACTION = "agent.restart"


def command_delivery() -> Delivery:
    return Delivery(settings.OPAMP_COMMAND_TTL_SECONDS)


@dataclass
class RestartOutcome:
    """What a restart request did, agent by agent."""

    requested: list[AgentCommand] = field(default_factory=list)
    # Agents that do not declare AcceptsRestartCommand.
    not_capable: list[uuid.UUID] = field(default_factory=list)
    # Agents with a restart waiting or asked within OPAMP_RESTART_MIN_INTERVAL_SECONDS.
    rate_limited: list[uuid.UUID] = field(default_factory=list)


def started_at(agent: Agent) -> datetime | None:
    """When the agent says it started (its health's start time), if it reported one."""
    health = agent.health if isinstance(agent.health, dict) else {}
    nanos = health.get("start_time_unix_nano")
    if not isinstance(nanos, int) or nanos <= 0:
        return None
    return datetime.fromtimestamp(nanos / 1e9, tz=UTC)


def restart_request(
    *, agents: QuerySet[Agent], actor: Actor, selector: str = "", now: datetime | None = None
) -> RestartOutcome:
    """Ask each of `agents` that can restart, and was not asked recently, to restart."""
    now = now or timezone.now()
    since = now - timedelta(seconds=settings.OPAMP_RESTART_MIN_INTERVAL_SECONDS)
    outcome = RestartOutcome()
    with transaction.atomic():
        # The rows locked in id order: two requests for the same agents queue, and the
        # second sees the first's command (the rate limit holds under concurrency).
        locked = list(Agent.objects.filter(pk__in=agents.order_by().values("pk")).select_for_update().order_by("id"))
        recent = set(
            AgentCommand.objects.filter(agent_id__in=[agent.pk for agent in locked], kind=CommandKind.RESTART)
            .filter(command_delivery().waiting_q(now) | Q(requested_at__gte=since))
            .values_list("agent_id", flat=True)
        )
        for agent in locked:
            if not has_capability(agent.capabilities, AgentCapabilities.ACCEPTS_RESTART_COMMAND):
                outcome.not_capable.append(agent.instance_uid)
            elif agent.pk in recent:
                outcome.rate_limited.append(agent.instance_uid)
            else:
                outcome.requested.append(
                    AgentCommand(
                        agent=agent,
                        kind=CommandKind.RESTART,
                        requested_by=actor_user(actor),
                        requested_at=now,
                        connected_at_before=agent.connected_at,
                        started_at_before=started_at(agent),
                    )
                )
        AgentCommand.objects.bulk_create(outcome.requested)
        _audit(outcome.requested, actor=actor, selector=selector)
        uids = [command.agent.instance_uid for command in outcome.requested]
        if uids:
            transaction.on_commit(lambda: notify_command_waiting(uids))
    return outcome


def _audit(commands: Iterable[AgentCommand], *, actor: Actor, selector: str) -> None:
    """One audit row per agent asked (the agent page lists its own)."""
    audit_records(
        actor=actor,
        action=RESTART_ACTION,
        targets=(
            (command.agent, {"instance_uid": str(command.agent.instance_uid), "selector": selector})
            for command in commands
        ),
    )


def agents_with_pending_commands() -> set[int]:
    """The ids of agents a command waits for, expired ones left out (a partial index answers it)."""
    waiting = AgentCommand.objects.filter(command_delivery().waiting_q())
    return set(waiting.values_list("agent_id", flat=True))


def command_claim(*, agent_id: int, now: datetime) -> AgentCommand | None:
    """The agent's oldest waiting command, now marked delivered; None when there is none,
    it expired, or another session claimed it first."""
    delivery = command_delivery()
    waiting = AgentCommand.objects.filter(delivery.waiting_q(now), agent_id=agent_id)
    return claim_first(waiting.order_by("requested_at", "id"), now=now, fresh_after=delivery.fresh_after(now))


def command_list() -> QuerySet[AgentCommand]:
    """Commands newest first, each with its `delivery_state` (pending, delivered, expired)."""
    commands = AgentCommand.objects.select_related("agent", "requested_by").order_by("-requested_at", "-id")
    return command_delivery().with_state(commands)
