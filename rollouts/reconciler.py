"""The desired-state reconciler: every agent's stored assignment against the resolver's answer.

The resolver writes assignments as changes happen; nothing else re-checks them. A race
the resolver does not foresee, a row written or deleted by other means, a bug: any of
them would leave an agent running the wrong thing (or nothing) for good, unnoticed. So a
periodic task walks the fleet in batches by agent id (keyset paging, bounded work per
run, resuming where the last run stopped and wrapping around), compares, and repairs
what differs through the resolver's own write path: the change is logged under a new
generation and the agent is hinted, exactly as for any other change. Each repair is
logged and counted; in a healthy system the count stays 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone

from fleet.models import Agent
from rollouts.desired_state import (
    computed_assignments,
    resolve_agents_in_lock_order,
    stored_assignments,
)
from rollouts.models import ReconcilerState

logger = logging.getLogger(__name__)

REPAIR_LOG = "desired state repaired: agent %s (%s) was %s, the resolver gives %s"
RUN_BUSY = "busy"
BATCH_TOO_SMALL = "the reconciler batch size must be at least 1, not {batch_size}"


@dataclass(frozen=True)
class Repair:
    agent_id: int
    before: tuple[int, int] | None  # (configuration id, version id); None: no assignment
    after: tuple[int, int] | None


@dataclass(frozen=True)
class ReconcileRun:
    checked: int
    repairs: tuple[Repair, ...]
    cursor_agent_id: int  # where the next run starts (after this id); 0 after a wrap
    wrapped: bool


def _describe(assignment: tuple[int, int] | None) -> str:
    if assignment is None:
        return "unassigned"
    return f"configuration {assignment[0]} version {assignment[1]}"


def _repair(agent_ids: list[int]) -> list[Repair]:
    """Re-resolve `agent_ids` through the resolver, in the writers' lock order (see
    resolve_agents_in_lock_order); the assignments it actually changed."""
    before = stored_assignments(agent_ids)
    changed = resolve_agents_in_lock_order(agent_ids)
    after = stored_assignments(changed)
    return [Repair(agent_id, before.get(agent_id), after.get(agent_id)) for agent_id in sorted(changed)]


def desired_state_reconcile(*, batch_size: int) -> ReconcileRun | str:
    """Check the next `batch_size` agents and repair those whose assignment differs.

    Runs are serialised on the state row; a run that finds another one in progress does
    nothing and says RUN_BUSY.
    """
    if batch_size < 1:
        raise ValueError(BATCH_TOO_SMALL.format(batch_size=batch_size))
    ReconcilerState.objects.get_or_create(pk=1)
    with transaction.atomic():
        state = ReconcilerState.objects.select_for_update(skip_locked=True).filter(pk=1).first()
        if state is None:
            return RUN_BUSY
        rows = list(
            Agent.objects.filter(pk__gt=state.cursor_agent_id)
            .order_by("pk")
            .values_list("pk", "instance_uid", "labels")[:batch_size]
        )
        ids = [row[0] for row in rows]
        # A first, read-only pass: nearly always nothing differs, and nothing is locked.
        computed = computed_assignments(rows)
        stored = stored_assignments(ids)
        differing = [agent_id for agent_id in ids if stored.get(agent_id) != computed[agent_id]]
        repairs = _repair(differing) if differing else []
        uids = dict(Agent.objects.filter(pk__in=[r.agent_id for r in repairs]).values_list("pk", "instance_uid"))
        for repair in repairs:
            uid = uids.get(repair.agent_id)
            logger.warning(REPAIR_LOG, repair.agent_id, uid, _describe(repair.before), _describe(repair.after))
        wrapped = len(rows) < batch_size
        now = timezone.now()
        state.cursor_agent_id = 0 if wrapped else ids[-1]
        state.runs += 1
        state.passes_completed += int(wrapped)
        state.last_run_at = now
        state.last_run_checked = len(rows)
        state.last_run_repaired = len(repairs)
        state.repairs_total += len(repairs)
        if repairs:
            state.last_repair_at = now
        state.save()
    return ReconcileRun(
        checked=len(rows), repairs=tuple(repairs), cursor_agent_id=state.cursor_agent_id, wrapped=wrapped
    )


def reconciler_state() -> ReconcilerState:
    """The reconciler's state (an unsaved, zeroed row before its first run)."""
    return ReconcilerState.objects.filter(pk=1).first() or ReconcilerState(pk=1)
