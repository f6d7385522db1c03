"""The operator's verbs on a rollout (start, pause, resume, promote, abort, retry, approve) and
the transition machinery they and the gate share.

Every transition is one conditional UPDATE on (state, stage_index) inside a transaction
that also writes its RolloutEvent, signs anew the version it makes desired when another
signing is newer (signed agents refuse older sequences), and re-resolves the
configuration's agents, so a duplicated, stale or concurrent call changes nothing
(`False` is returned). What depends on the subject (a configuration or a package) is
asked of rollouts.rollout_subjects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from fleet.audit import Actor, actor_user, audit_record
from fleet.errors import DomainError
from rollouts.models import (
    Rollout,
    RolloutEvent,
    RolloutStage,
    RolloutState,
    RolloutTarget,
)
from rollouts.rollout_services.creation import stage_thresholds
from rollouts.rollout_subjects import subject_of

Kind = RolloutEvent.Kind

# Error messages (tests assert on these).
ROLLOUT_ACTIVE = "configuration {name!r} already has an active rollout ({rollout_id})"
PACKAGE_ROLLOUT_ACTIVE = "package {name!r} already has an active rollout ({rollout_id})"
NOT_IN_STATE = "rollout {rollout_id} is {state}; {verb} needs it {wanted}"
NO_SUCH_STAGE = "rollout {rollout_id} has no stage {index}"
STAGE_NEEDS_NO_APPROVAL = "stage {index} does not require approval"
LOST_RACE = "rollout {rollout_id} was changed by another request at the same time; nothing was done"


def transition(
    rollout: Rollout,
    *,
    from_states: Sequence[str],
    to_state: str,
    kind: str,
    actor: Actor = None,
    from_stage: int | None = None,
    changes: Mapping[str, Any] | None = None,
    message: str = "",
    counts: Mapping[str, Any] | None = None,
    resolve: bool = True,
    audit: str | None = None,
) -> bool:
    """The one place a rollout changes state. False when another caller got there first.

    `audit` names the audit action of an operator's verb; it is written in the same
    transaction as the transition, and only when the transition happened.
    """
    subject = subject_of(rollout)
    with transaction.atomic():
        subject.lock()
        guard = Rollout.objects.filter(pk=rollout.pk, state__in=list(from_states))
        if from_stage is not None:
            guard = guard.filter(stage_index=from_stage)
        current = guard.values_list("state", "stage_index").first()
        if current is None:
            return False
        updates = {"state": to_state, **(changes or {})}
        try:
            with transaction.atomic():
                moved = guard.update(**updates)
        except IntegrityError:
            return False  # another rollout of the configuration became active meanwhile
        if not moved:
            return False
        # The resolvers cache active rollouts' plans (state, stage) under this token.
        subject.bump()
        RolloutEvent.objects.create(
            rollout=rollout,
            kind=kind,
            from_state=current[0],
            to_state=to_state,
            stage_index=updates.get("stage_index", current[1]),
            actor=actor_user(actor),
            message=message,
            counts=dict(counts or {}),
        )
        if audit:
            audit_record(actor=actor, action=audit, target=rollout)
        if resolve:
            subject.deliver(rolling_back=to_state == RolloutState.ROLLING_BACK, kind=kind)
    return True


def _require(rollout: Rollout, verb: str, states: Sequence[str]) -> None:
    rollout.refresh_from_db(fields=["state", "stage_index"])
    if rollout.state not in states:
        raise DomainError(
            NOT_IN_STATE.format(rollout_id=rollout.pk, state=rollout.state, verb=verb, wanted=" or ".join(states)),
            status=409,
        )


def _fix_thresholds(rollout: Rollout) -> None:
    """Cohort thresholds from the population now (count stages depend on it)."""
    stages = list(rollout.stages.all())
    subject = subject_of(rollout)
    thresholds = stage_thresholds(stages, rollout.salt, subject.population())
    for stage, threshold in zip(stages, thresholds, strict=True):
        RolloutStage.objects.filter(pk=stage.pk).update(bucket_threshold=threshold)
    subject.bump()


def rollout_start(*, rollout: Rollout, actor: Actor) -> bool:
    """draft -> running at stage 0; cohort thresholds are fixed from the population now."""
    _require(rollout, "start", [RolloutState.DRAFT])
    other = subject_of(rollout).other_active()
    if other is not None:
        message = PACKAGE_ROLLOUT_ACTIVE if rollout.is_package else ROLLOUT_ACTIVE
        raise DomainError(message.format(name=rollout.subject_name, rollout_id=other.pk), status=409)
    return _run_from_first_stage(rollout, actor=actor, retry=False)


def _run_from_first_stage(rollout: Rollout, *, actor: Actor, retry: bool) -> bool:
    """-> running at stage 0 with cohort thresholds fixed from the population now: a draft's
    start, or a retry of a rolled-back or aborted rollout (its targets dropped first). All of
    it is undone when another request moved the rollout first."""
    with transaction.atomic():
        subject_of(rollout).lock()
        if retry:
            RolloutTarget.objects.filter(rollout=rollout).delete()
        # A draft aborted before it started never had its thresholds fixed, so a retry fixes them too.
        _fix_thresholds(rollout)
        now = timezone.now()
        moved = transition(
            rollout,
            from_states=[RolloutState.ROLLED_BACK, RolloutState.ABORTED] if retry else [RolloutState.DRAFT],
            to_state=RolloutState.RUNNING,
            kind=Kind.RETRIED if retry else Kind.STARTED,
            actor=actor,
            changes={
                "stage_index": 0,
                "stage_started_at": now,
                **({"finished_at": None} if retry else {"started_at": now}),
            },
            audit="rollout.retry" if retry else "rollout.start",
        )
        if not moved:
            transaction.set_rollback(True)
    return moved


def rollout_pause(*, rollout: Rollout, actor: Actor, message: str = "") -> bool:
    _require(rollout, "pause", [RolloutState.RUNNING])
    return transition(
        rollout,
        from_states=[RolloutState.RUNNING],
        to_state=RolloutState.PAUSED,
        kind=Kind.PAUSED,
        actor=actor,
        message=message,
        resolve=False,
        audit="rollout.pause",
    )


def rollout_resume(*, rollout: Rollout, actor: Actor) -> bool:
    _require(rollout, "resume", [RolloutState.PAUSED])
    return transition(
        rollout,
        from_states=[RolloutState.PAUSED],
        to_state=RolloutState.RUNNING,
        kind=Kind.RESUMED,
        actor=actor,
        resolve=False,
        audit="rollout.resume",
    )


def rollout_promote(*, rollout: Rollout, actor: Actor) -> bool:
    """Skip to the last stage: every agent gets the candidate; the gate then finishes it."""
    _require(rollout, "promote", [RolloutState.RUNNING, RolloutState.PAUSED])
    last = rollout.stages.count() - 1
    return transition(
        rollout,
        from_states=[RolloutState.RUNNING, RolloutState.PAUSED],
        to_state=RolloutState.RUNNING,
        kind=Kind.PROMOTED,
        actor=actor,
        changes={"stage_index": last, "stage_started_at": timezone.now()},
        audit="rollout.promote",
    )


def start_rollback(
    rollout: Rollout,
    *,
    from_states: Sequence[str],
    kind: str,
    actor: Actor,
    message: str,
    counts: Mapping[str, Any] | None = None,
    from_stage: int | None = None,
    audit: str | None = None,
) -> bool:
    with transaction.atomic():
        done = transition(
            rollout,
            from_states=from_states,
            to_state=RolloutState.ROLLING_BACK,
            kind=kind,
            actor=actor,
            message=message,
            counts=counts,
            from_stage=from_stage,
            changes={"stage_started_at": timezone.now()},
            audit=audit,
        )
        if done:
            RolloutTarget.objects.filter(rollout=rollout, reverted_at__isnull=True).update(reverted_at=timezone.now())
    return done


def rollout_abort(*, rollout: Rollout, actor: Actor, message: str = "") -> bool:
    """Roll back: every agent that got the candidate is offered the stable version again."""
    _require(rollout, "abort", [RolloutState.DRAFT, RolloutState.RUNNING, RolloutState.PAUSED])
    if rollout.state == RolloutState.DRAFT:
        return transition(
            rollout,
            from_states=[RolloutState.DRAFT],
            to_state=RolloutState.ABORTED,
            kind=Kind.ABORTED,
            actor=actor,
            message=message,
            changes={"finished_at": timezone.now()},
            resolve=False,
            audit="rollout.abort",
        )
    return start_rollback(
        rollout,
        from_states=[RolloutState.RUNNING, RolloutState.PAUSED],
        kind=Kind.ROLLBACK_STARTED,
        actor=actor,
        message=message or "aborted by operator",
        audit="rollout.abort",
    )


def rollout_retry(*, rollout: Rollout, actor: Actor) -> bool:
    """Start a rolled-back or aborted rollout again from its first stage, with fresh targets."""
    _require(rollout, "retry", [RolloutState.ROLLED_BACK, RolloutState.ABORTED])
    if subject_of(rollout).moved_on():
        kind = "package" if rollout.is_package else "configuration"
        raise DomainError(f"{kind} {rollout.subject_name!r} moved on since this rollout; create a new one", status=409)
    return _run_from_first_stage(rollout, actor=actor, retry=True)


def rollout_approve_stage(*, rollout: Rollout, stage_index: int, actor: Actor) -> bool:
    """Approve a stage that requires it; the next tick may then start it."""
    _require(rollout, "approve", [RolloutState.DRAFT, RolloutState.RUNNING, RolloutState.PAUSED])
    stage = rollout.stages.filter(index=stage_index).first()
    if stage is None:
        raise DomainError(NO_SUCH_STAGE.format(rollout_id=rollout.pk, index=stage_index), field="stage")
    if not stage.requires_approval:
        raise DomainError(STAGE_NEEDS_NO_APPROVAL.format(index=stage_index), field="stage")
    approved = RolloutStage.objects.filter(pk=stage.pk, approved_at__isnull=True).update(
        approved_by=actor_user(actor), approved_at=timezone.now()
    )
    if approved:
        RolloutEvent.objects.create(
            rollout=rollout,
            kind=Kind.APPROVED,
            stage_index=stage_index,
            from_state=rollout.state,
            to_state=rollout.state,
            actor=actor_user(actor),
        )
        audit_record(actor=actor, action="rollout.approve", target=rollout, details={"stage": stage_index})
    return bool(approved)
