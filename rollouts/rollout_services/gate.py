"""The timed stage gate Celery beat drives: each tick advances a running rollout when its
counts allow, rolls it back (or pauses it) when the failure budget is exceeded, marks it
succeeded after the last stage, and finishes a rollback once its agents are back on stable.
Counts are read outside any lock; the conditional UPDATE of the transition is what makes a
decision stick once.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from rollouts import rollout_samples
from rollouts.models import ROLLOUT_SUBJECT_RELATIONS, Rollout, RolloutEvent, RolloutState
from rollouts.rollout_services.answers import StageCounts, counts_through, rollback_progress, stage_counts
from rollouts.rollout_services.verbs import start_rollback, transition
from rollouts.rollout_subjects import subject_of

Kind = RolloutEvent.Kind


def running_rollout_ids() -> list[int]:
    return list(
        Rollout.objects.filter(state__in=[RolloutState.RUNNING, RolloutState.ROLLING_BACK]).values_list("pk", flat=True)
    )


def gate_stale(rollout: Rollout, now: datetime | None = None) -> bool:
    """A running or rolling back rollout the gate has not checked for
    OPAMP_ROLLOUT_GATE_STALE_TICKS tick intervals (since it started, if never)."""
    if rollout.state not in (RolloutState.RUNNING, RolloutState.ROLLING_BACK):
        return False
    last = rollout.gate_checked_at or rollout.started_at
    if last is None:
        return False
    limit = timedelta(seconds=settings.OPAMP_ROLLOUT_TICK_SECONDS * settings.OPAMP_ROLLOUT_GATE_STALE_TICKS)
    return (now or timezone.now()) - last > limit


def rollout_tick(*, rollout_id: int, now: datetime | None = None) -> str:
    """Advance one rollout if its gate allows; safe to call any number of times, concurrently."""
    rollout = Rollout.objects.select_related(*ROLLOUT_SUBJECT_RELATIONS).filter(pk=rollout_id).first()
    if rollout is None:
        return "gone"
    now = now or timezone.now()
    if rollout.state in (RolloutState.RUNNING, RolloutState.ROLLING_BACK):
        # Outside the transition's guarded UPDATE, which changes no column this writes.
        Rollout.objects.filter(pk=rollout.pk).update(gate_checked_at=now)
    if rollout.state == RolloutState.ROLLING_BACK:
        return _tick_rollback(rollout, now)
    if rollout.state != RolloutState.RUNNING:
        return f"idle ({rollout.state})"
    return _tick_running(rollout, now)


def _tick_running(rollout: Rollout, now: datetime) -> str:
    stages = list(rollout.stages.all())
    index = rollout.stage_index
    # Agents that joined the started stages since the last transition (package rollouts).
    subject_of(rollout).refresh_targets(now)
    by_stage = stage_counts(rollout, now=now)
    counts = counts_through(by_stage, index)
    rollout_samples.rollout_sample_record(rollout=rollout, stage=index, counts=counts, now=now)
    snapshot = {"stage": index, **counts.as_dict()}
    if counts.bad and counts.failure_rate > rollout.max_failure_rate:
        message = (
            f"failure rate {counts.failure_rate:.4%} ({counts.bad} of {counts.reachable}) "
            f"exceeds the budget of {rollout.max_failure_rate:.4%}"
        )
        if rollout.auto_rollback:
            done = start_rollback(
                rollout,
                from_states=[RolloutState.RUNNING],
                kind=Kind.BUDGET_EXCEEDED,
                actor=None,
                message=message + "; rolling back",
                counts=snapshot,
                from_stage=index,
            )
            return "rolling back" if done else "raced"
        done = transition(
            rollout,
            from_states=[RolloutState.RUNNING],
            to_state=RolloutState.PAUSED,
            kind=Kind.BUDGET_EXCEEDED,
            message=message + "; paused (auto_rollback is off)",
            counts=snapshot,
            from_stage=index,
            resolve=False,
        )
        return "paused" if done else "raced"
    if counts.targeted and counts.reported == 0:
        return "holding: no data"
    if counts.targeted and counts.reported < min(rollout.min_reporting, counts.targeted):
        return "holding: not enough reports"
    if counts.pending:
        return "holding: waiting for answers"
    # Offline agents leave the denominator, but a stage (or the stages so far) answered by
    # a minority of its agents has not been seen to work: hold until they return (or an
    # operator promotes or aborts) rather than promote on what little answered.
    max_share = settings.OPAMP_ROLLOUT_MAX_OFFLINE_SHARE
    if counts.too_many_offline(max_share) or by_stage.get(index, StageCounts()).too_many_offline(max_share):
        return "holding: too many agents offline"
    assert rollout.stage_started_at is not None
    if (now - rollout.stage_started_at).total_seconds() < stages[index].hold_seconds:
        return "holding: hold time"
    if index == len(stages) - 1:
        return _succeed(rollout, snapshot)
    following = stages[index + 1]
    if following.requires_approval and following.approved_at is None:
        if not rollout.events.filter(kind=Kind.AWAITING_APPROVAL, stage_index=index + 1).exists():
            RolloutEvent.objects.create(
                rollout=rollout,
                kind=Kind.AWAITING_APPROVAL,
                stage_index=index + 1,
                from_state=rollout.state,
                to_state=rollout.state,
                counts=snapshot,
            )
        return "holding: awaiting approval"
    done = transition(
        rollout,
        from_states=[RolloutState.RUNNING],
        to_state=RolloutState.RUNNING,
        kind=Kind.STAGE_STARTED,
        from_stage=index,
        changes={"stage_index": index + 1, "stage_started_at": now},
        counts=snapshot,
        message="" if counts.targeted else "the previous stage had no agents",
    )
    return f"stage {index + 1} started" if done else "raced"


def _succeed(rollout: Rollout, snapshot: Mapping[str, Any]) -> str:
    with transaction.atomic():
        done = transition(
            rollout,
            from_states=[RolloutState.RUNNING],
            to_state=RolloutState.SUCCEEDED,
            kind=Kind.SUCCEEDED,
            from_stage=rollout.stage_index,
            changes={"finished_at": timezone.now()},
            counts=snapshot,
            resolve=False,
        )
        if done:
            # The candidate becomes what every matching agent runs from now on.
            subject_of(rollout).adopt_candidate()
    return "succeeded" if done else "raced"


def _tick_rollback(rollout: Rollout, now: datetime) -> str:
    progress = rollback_progress(rollout, now=now)
    if progress["waiting"]:
        return f"rolling back: {progress['waiting']} agents still on the candidate"
    done = transition(
        rollout,
        from_states=[RolloutState.ROLLING_BACK],
        to_state=RolloutState.ROLLED_BACK,
        kind=Kind.ROLLED_BACK,
        changes={"finished_at": now},
        counts=progress,
        resolve=False,
    )
    return "rolled back" if done else "raced"
