"""Thin Celery tasks for rollouts. Each re-reads the database and is safe to run twice."""

from __future__ import annotations

from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from rollouts.desired_state import prune_changes
from rollouts.reconciler import desired_state_reconcile
from rollouts.rollout_services.gate import rollout_tick, running_rollout_ids


@shared_task(acks_late=True, ignore_result=True)
def advance_rollouts() -> dict[int, str]:
    """Beat's periodic tick: give every running (or rolling-back) rollout one gate check."""
    return {rollout_id: rollout_tick(rollout_id=rollout_id) for rollout_id in running_rollout_ids()}


@shared_task(acks_late=True, ignore_result=True)
def prune_desired_state_log() -> int:
    """Drop change-log rows older than the retention; a process further behind starts over."""
    retention = timedelta(seconds=settings.OPAMP_DESIRED_STATE_LOG_RETENTION_SECONDS)
    return prune_changes(older_than=timezone.now() - retention)


@shared_task(acks_late=True, ignore_result=True)
def reconcile_desired_state() -> dict[str, int] | str:
    """Beat's periodic check of the next batch of agents' assignments (rollouts.reconciler)."""
    run = desired_state_reconcile(batch_size=settings.OPAMP_RECONCILE_BATCH_SIZE)
    if isinstance(run, str):
        return run
    return {"checked": run.checked, "repaired": len(run.repairs), "cursor": run.cursor_agent_id}
