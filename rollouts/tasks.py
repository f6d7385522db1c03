"""Thin Celery tasks for rollouts. Each re-reads the database and is safe to run twice."""

from __future__ import annotations

from celery import shared_task

from rollouts.rollout_engine import rollout_tick, running_rollout_ids


@shared_task(acks_late=True, ignore_result=True)
def advance_rollouts() -> dict[int, str]:
    """Beat's periodic tick: give every running (or rolling-back) rollout one gate check."""
    return {rollout_id: rollout_tick(rollout_id=rollout_id) for rollout_id in running_rollout_ids()}


@shared_task(acks_late=True, ignore_result=True)
def advance_rollout(rollout_id: int) -> str:
    """One rollout now (enqueued on commit after a verb); a stale id simply does nothing."""
    return rollout_tick(rollout_id=rollout_id)
