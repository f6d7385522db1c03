"""Rollouts: creation, the verbs, and the timed stage gate that Celery beat drives.

Every transition is one conditional UPDATE on (state, stage_index) inside a transaction
that also writes its RolloutEvent, signs anew the version it makes desired when another
signing is newer (signed agents refuse older sequences), and re-resolves the
configuration's agents, so a duplicated, stale or concurrent call changes nothing
(`False` is returned). Counts are
read outside any lock; the conditional UPDATE is what makes a decision stick once.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Count, Q
from django.utils import timezone

from fleet.audit import Actor, actor_user, audit_record
from fleet.db import bulk_update_from_unnest
from fleet.errors import DomainError
from fleet.label_selectors import SelectorError, parse_selector
from fleet.models import Agent, RemoteConfigState
from fleet.selectors import presence_q
from rollouts import desired_state, rollout_samples
from rollouts.cohorts import BUCKETS, StagePlan, bucket_of, cohort_of, count_threshold, percent_threshold
from rollouts.config_signings import config_version_sign_for_delivery
from rollouts.models import (
    ACTIVE_ROLLOUT_STATES,
    Configuration,
    ConfigVersion,
    Rollout,
    RolloutEvent,
    RolloutStage,
    RolloutState,
    RolloutTarget,
)
from rollouts.resolver_cache import bump_definitions

Kind = RolloutEvent.Kind
ANSWERS = {
    RemoteConfigState.APPLYING: "applying",
    RemoteConfigState.APPLIED: "applied",
    RemoteConfigState.FAILED: "failed",
}

# Error messages (tests assert on these).
ROLLOUT_ACTIVE = "configuration {name!r} already has an active rollout ({rollout_id})"
CANDIDATE_NOT_OF_CONFIGURATION = "version {number} does not belong to configuration {name!r}"
CANDIDATE_IS_STABLE = "version {number} is already the current version of {name!r}"
NO_STABLE_VERSION = "configuration {name!r} has no current version to roll out from"
NO_STAGES = "a rollout needs at least one stage"
STAGE_SIZE = "stage {index}: give exactly one of percent (0-100] or count (>= 1)"
STAGES_NOT_NESTED = "stage {index}: stages are cumulative, so each must be at least as large as the one before"
BAD_FAILURE_RATE = "max_failure_rate must be between 0 and 1"
NOT_IN_STATE = "rollout {rollout_id} is {state}; {verb} needs it {wanted}"
NO_SUCH_STAGE = "rollout {rollout_id} has no stage {index}"
STAGE_NEEDS_NO_APPROVAL = "stage {index} does not require approval"
LOST_RACE = "rollout {rollout_id} was changed by another request at the same time; nothing was done"


@dataclass(frozen=True)
class StageSpec:
    percent: float | None = None
    count: int | None = None
    selector: Any = None
    hold_seconds: float = 0.0
    requires_approval: bool = False


def _check_stages(stages: Sequence[StageSpec]) -> list[dict[str, Any]]:
    if not stages:
        raise DomainError(NO_STAGES, field="stages")
    checked = []
    last_percent, last_count = 0.0, 0
    for index, stage in enumerate(stages):
        has_percent, has_count = stage.percent is not None, stage.count is not None
        if has_percent == has_count:
            raise DomainError(STAGE_SIZE.format(index=index), field="stages")
        if has_percent and not (0 < float(stage.percent or 0) <= 100):
            raise DomainError(STAGE_SIZE.format(index=index), field="stages")
        if has_count and int(stage.count or 0) < 1:
            raise DomainError(STAGE_SIZE.format(index=index), field="stages")
        if (has_percent and float(stage.percent or 0) < last_percent) or (
            has_count and int(stage.count or 0) < last_count
        ):
            raise DomainError(STAGES_NOT_NESTED.format(index=index), field="stages")
        last_percent = float(stage.percent) if has_percent else last_percent
        last_count = int(stage.count) if has_count else last_count
        try:
            selector = parse_selector(stage.selector).to_dict() if stage.selector is not None else {}
        except SelectorError as error:
            raise DomainError(f"stage {index}: {error}", field="stages") from None
        checked.append(
            {
                "index": index,
                "percent": stage.percent,
                "count": stage.count,
                "selector": selector,
                "hold_seconds": max(0.0, float(stage.hold_seconds)),
                "requires_approval": bool(stage.requires_approval),
            }
        )
    return checked


@transaction.atomic
def rollout_create(
    *,
    configuration: Configuration,
    candidate: ConfigVersion,
    stages: Sequence[StageSpec],
    actor: Actor,
    max_failure_rate: float = 0.001,
    apply_timeout_seconds: float = 300.0,
    min_reporting: int = 1,
    auto_rollback: bool = True,
    salt: str | None = None,
    note: str = "",
) -> Rollout:
    """A draft rollout from the configuration's current version to `candidate`."""
    configuration = Configuration.objects.select_for_update().get(pk=configuration.pk)
    if candidate.configuration_id != configuration.pk:
        raise DomainError(CANDIDATE_NOT_OF_CONFIGURATION.format(number=candidate.number, name=configuration.name))
    if configuration.current_version is None:
        raise DomainError(NO_STABLE_VERSION.format(name=configuration.name))
    if configuration.current_version.config_hash == candidate.config_hash:
        raise DomainError(CANDIDATE_IS_STABLE.format(number=candidate.number, name=configuration.name))
    if not 0 <= max_failure_rate <= 1:
        raise DomainError(BAD_FAILURE_RATE, field="max_failure_rate")
    checked = _check_stages(stages)
    rollout = Rollout.objects.create(
        configuration=configuration,
        stable_version=configuration.current_version,
        candidate_version=candidate,
        max_failure_rate=max_failure_rate,
        apply_timeout_seconds=apply_timeout_seconds,
        min_reporting=min_reporting,
        auto_rollback=auto_rollback,
        salt=salt or secrets.token_hex(16),
        note=note,
        created_by=actor_user(actor),
    )
    RolloutStage.objects.bulk_create([RolloutStage(rollout=rollout, **stage) for stage in checked])
    bump_definitions()
    RolloutEvent.objects.create(
        rollout=rollout, kind=Kind.CREATED, to_state=RolloutState.DRAFT, actor=actor_user(actor)
    )
    audit_record(
        actor=actor,
        action="rollout.create",
        target=rollout,
        details={"configuration": configuration.name, "candidate": candidate.number, "stages": checked},
    )
    return rollout


# --- cohorts -------------------------------------------------------------------------------


def _population(configuration: Configuration) -> list[tuple[int, bytes, dict[str, str]]]:
    """(id, uid bytes, labels) of the agents the configuration selects now."""
    rows = (
        Agent.objects.filter(desired_config__configuration=configuration)
        .values_list("id", "instance_uid", "labels")
        .order_by("id")
    )
    return [(agent_id, uid.bytes, labels or {}) for agent_id, uid, labels in rows]


def _thresholds(
    stages: Sequence[RolloutStage], salt: str, population: Sequence[tuple[int, bytes, dict[str, str]]]
) -> list[int]:
    """Bucket thresholds per stage; the last stage always takes every bucket."""
    buckets = sorted(bucket_of(salt, uid) for _, uid, _ in population)
    thresholds = []
    for stage in stages:
        if stage.percent is not None:
            thresholds.append(percent_threshold(stage.percent))
        else:
            thresholds.append(count_threshold(buckets, int(stage.count or 0)))
    thresholds[-1] = BUCKETS
    # Nested by construction: a later stage never takes fewer buckets than an earlier one.
    for index in range(1, len(thresholds)):
        thresholds[index] = max(thresholds[index], thresholds[index - 1])
    return thresholds


def _stage_plans(stages: Sequence[RolloutStage], thresholds: Sequence[int]) -> list[StagePlan]:
    return [
        StagePlan(threshold=t, selector=parse_selector(s.selector) if s.selector else None)
        for s, t in zip(stages, thresholds, strict=True)
    ]


@dataclass
class DryRunStage:
    index: int
    percent: float | None
    count: int | None
    cohort_size: int
    cumulative: int
    sample: list[str] = field(default_factory=list)


@dataclass
class DryRun:
    """The preview and the salt that drew it: create with this salt for the same cohorts."""

    salt: str
    stages: list[DryRunStage]


def rollout_dry_run(
    *, configuration: Configuration, stages: Sequence[StageSpec], salt: str | None = None, sample: int = 20
) -> DryRun:
    """Which agents each stage would take if the rollout started now (nothing is saved)."""
    checked = _check_stages(stages)
    salt = salt or secrets.token_hex(16)
    unsaved = [RolloutStage(**{k: v for k, v in stage.items()}) for stage in checked]
    population = _population(configuration)
    plans = _stage_plans(unsaved, _thresholds(unsaved, salt, population))
    members: list[list[str]] = [[] for _ in unsaved]
    for _, uid, labels in population:
        members[cohort_of(bucket=bucket_of(salt, uid), labels=labels, stages=plans)].append(str(uuid.UUID(bytes=uid)))
    result, cumulative = [], 0
    for stage, cohort in zip(unsaved, members, strict=True):
        cumulative += len(cohort)
        result.append(
            DryRunStage(stage.index, stage.percent, stage.count, len(cohort), cumulative, sorted(cohort)[:sample])
        )
    return DryRun(salt=salt, stages=result)


# --- transitions --------------------------------------------------------------------------


def _transition(
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
    with transaction.atomic():
        _lock_configuration(rollout)
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
        # The resolver caches active rollouts' plans (state, stage) under this token.
        bump_definitions()
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
            rolling_back = to_state == RolloutState.ROLLING_BACK
            _sign_for_delivery(
                rollout, rollout.stable_version_id if rolling_back else rollout.candidate_version_id, kind
            )
            desired_state.resolve_for_configuration(rollout.configuration)
    return True


def _lock_configuration(rollout: Rollout) -> None:
    """The configuration's row lock, taken first by every transition: the signing sequence
    is allocated under it, and taking it before anything else keeps the lock order of
    configuration_publish (configuration, then the desired-state generation)."""
    Configuration.objects.select_for_update().filter(pk=rollout.configuration_id).values_list("pk").first()


def _sign_for_delivery(rollout: Rollout, version_id: int, kind: str) -> None:
    """Before agents are moved to `version_id`: its delivered signing must be newer than any
    they run, or signing agents refuse going back to the stable content as a replay."""
    config_version_sign_for_delivery(version_id=version_id, detail=f"rollout {rollout.pk}: {kind}")


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
    thresholds = _thresholds(stages, rollout.salt, _population(rollout.configuration))
    for stage, threshold in zip(stages, thresholds, strict=True):
        RolloutStage.objects.filter(pk=stage.pk).update(bucket_threshold=threshold)
    bump_definitions()


def rollout_start(*, rollout: Rollout, actor: Actor) -> bool:
    """draft -> running at stage 0; cohort thresholds are fixed from the population now."""
    _require(rollout, "start", [RolloutState.DRAFT])
    other = (
        Rollout.objects.filter(configuration_id=rollout.configuration_id, state__in=ACTIVE_ROLLOUT_STATES)
        .exclude(pk=rollout.pk)
        .first()
    )
    if other is not None:
        raise DomainError(ROLLOUT_ACTIVE.format(name=rollout.configuration.name, rollout_id=other.pk), status=409)
    with transaction.atomic():
        _lock_configuration(rollout)
        _fix_thresholds(rollout)
        now = timezone.now()
        started = _transition(
            rollout,
            from_states=[RolloutState.DRAFT],
            to_state=RolloutState.RUNNING,
            kind=Kind.STARTED,
            actor=actor,
            changes={"stage_index": 0, "stage_started_at": now, "started_at": now},
            audit="rollout.start",
        )
        if not started:
            transaction.set_rollback(True)
    return started


def rollout_pause(*, rollout: Rollout, actor: Actor, message: str = "") -> bool:
    _require(rollout, "pause", [RolloutState.RUNNING])
    return _transition(
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
    return _transition(
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
    return _transition(
        rollout,
        from_states=[RolloutState.RUNNING, RolloutState.PAUSED],
        to_state=RolloutState.RUNNING,
        kind=Kind.PROMOTED,
        actor=actor,
        changes={"stage_index": last, "stage_started_at": timezone.now()},
        audit="rollout.promote",
    )


def _start_rollback(
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
        done = _transition(
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
        return _transition(
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
    return _start_rollback(
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
    configuration = rollout.configuration
    if configuration.current_version_id != rollout.stable_version_id:
        raise DomainError(
            f"configuration {configuration.name!r} moved on since this rollout; create a new one", status=409
        )
    with transaction.atomic():
        _lock_configuration(rollout)
        RolloutTarget.objects.filter(rollout=rollout).delete()
        # A draft aborted before it started never had its thresholds fixed.
        _fix_thresholds(rollout)
        now = timezone.now()
        done = _transition(
            rollout,
            from_states=[RolloutState.ROLLED_BACK, RolloutState.ABORTED],
            to_state=RolloutState.RUNNING,
            kind=Kind.RETRIED,
            actor=actor,
            changes={"stage_index": 0, "stage_started_at": now, "finished_at": None},
            audit="rollout.retry",
        )
        if not done:
            transaction.set_rollback(True)
    return done


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


# --- answers and counts -------------------------------------------------------------------


def record_answer(*, agent_id: int, config_hash: str, state: int, error: str) -> None:
    """Note an agent's answer on its target row of an active rollout (one UPDATE)."""
    record_answers([AnswerRecord(agent_id, config_hash, state, error, timezone.now())])


@dataclass(frozen=True)
class AnswerRecord:
    """What an agent reported about a config hash (RemoteConfigStatus), and when."""

    agent_id: int
    config_hash: str
    state: int
    error: str
    at: datetime


_ANSWERS_SQL = """
    UPDATE {targets} AS t SET answer = v.answer, answered_at = v.at, error = v.error
    FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::timestamptz[], %s::text[])
        AS v(agent_id, hash, answer, at, error),
        {rollouts} AS r
    WHERE t.agent_id = v.agent_id AND t.offered_hash = v.hash AND r.id = t.rollout_id
        AND r.state = ANY(%s::text[]) AND t.answer IS DISTINCT FROM v.answer
"""


def record_answers(answers: Sequence[AnswerRecord]) -> int:
    """Note answers on the agents' target rows of active rollouts: one statement on
    PostgreSQL for any number of answers. Answers that are not about a rollout's offer
    (another hash, no active rollout) or that repeat the recorded one change nothing."""
    rows = [
        (record, answer)
        for record in answers
        if record.config_hash
        and record.state in RemoteConfigState.values
        and (answer := ANSWERS.get(RemoteConfigState(record.state))) is not None
    ]
    if not rows:
        return 0
    columns = [
        [record.agent_id for record, _ in rows],
        [record.config_hash for record, _ in rows],
        [str(answer) for _, answer in rows],
        [record.at for record, _ in rows],
        [record.error[:2000] for record, _ in rows],
        [state.value for state in ACTIVE_ROLLOUT_STATES],
    ]
    sql = _ANSWERS_SQL.format(targets=RolloutTarget._meta.db_table, rollouts=Rollout._meta.db_table)
    return bulk_update_from_unnest([sql], columns, fallback=lambda: _record_answers_orm(rows))


def _record_answers_orm(rows: Sequence[tuple[AnswerRecord, str]]) -> int:
    noted = 0
    for record, answer in rows:
        noted += (
            RolloutTarget.objects.filter(
                agent_id=record.agent_id,
                offered_hash=record.config_hash,
                rollout__state__in=ACTIVE_ROLLOUT_STATES,
            )
            .exclude(answer=answer)
            .update(answer=answer, answered_at=record.at, error=record.error[:2000])
        )
    return noted


@dataclass(frozen=True)
class StageCounts:
    targeted: int = 0
    applied: int = 0
    unhealthy: int = 0
    failed: int = 0
    pending: int = 0
    timed_out: int = 0
    offline: int = 0

    @property
    def reported(self) -> int:
        return self.applied + self.unhealthy + self.failed

    @property
    def bad(self) -> int:
        return self.failed + self.unhealthy

    @property
    def reachable(self) -> int:
        """Agents that count: offline and timed-out agents are left out of the denominator."""
        return self.targeted - self.offline - self.timed_out

    @property
    def failure_rate(self) -> float:
        """Failures over every reachable agent, answered or not.

        While answers are still coming in this is a floor of the final rate, so exceeding
        the budget with it is a breach that no later answer can undo: the gate acts at
        once instead of waiting (judging on the answers so far would roll back whenever an
        early reporter fails, e.g. 1 of the first 300 of 2,000 agents).
        """
        return self.bad / self.reachable if self.reachable > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "reported": self.reported,
            "reachable": self.reachable,
            "failure_rate": round(self.failure_rate, 6),
        }

    def __add__(self, other: StageCounts) -> StageCounts:
        return StageCounts(**{k: getattr(self, k) + getattr(other, k) for k in self.__dict__})


def stage_counts(rollout: Rollout, *, now: datetime | None = None) -> dict[int, StageCounts]:
    """Per stage: how the agents that got the candidate are doing, in one grouped query.

    Offline agents that have not answered count as offline, not in any denominator.
    """
    now = now or timezone.now()
    candidate_hash = rollout.candidate_version.config_hash
    on_candidate = Q(agent__remote_config_hash=candidate_hash)
    applied = on_candidate & Q(agent__remote_config_state=RemoteConfigState.APPLIED)
    healthy_applied = applied & ~Q(agent__healthy=False)
    unhealthy_applied = applied & Q(agent__healthy=False)
    failed = on_candidate & Q(agent__remote_config_state=RemoteConfigState.FAILED)
    answered = healthy_applied | unhealthy_applied | failed
    present = presence_q(now, prefix="agent__")
    overdue = Q(assigned_at__lt=now - timedelta(seconds=rollout.apply_timeout_seconds))
    rows = (
        RolloutTarget.objects.filter(rollout=rollout)
        .values("stage_index")
        .annotate(
            targeted=Count("pk"),
            applied=Count("pk", filter=healthy_applied),
            unhealthy=Count("pk", filter=unhealthy_applied),
            failed=Count("pk", filter=failed),
            offline=Count("pk", filter=~answered & ~present),
            timed_out=Count("pk", filter=~answered & present & overdue),
            pending=Count("pk", filter=~answered & present & ~overdue),
        )
        .order_by("stage_index")
    )
    return {row.pop("stage_index"): StageCounts(**row) for row in rows}


def cumulative_counts(rollout: Rollout, *, through_stage: int, now: datetime | None = None) -> StageCounts:
    total = StageCounts()
    for index, counts in stage_counts(rollout, now=now).items():
        if index <= through_stage:
            total = total + counts
    return total


def rollback_progress(rollout: Rollout, *, now: datetime | None = None) -> dict[str, int]:
    """During a rollback: of the agents that got the candidate, how many run stable again."""
    now = now or timezone.now()
    stable = Q(agent__remote_config_hash=rollout.stable_version.config_hash) & Q(
        agent__remote_config_state=RemoteConfigState.APPLIED
    )
    present = presence_q(now, prefix="agent__")
    overdue = Q(reverted_at__lt=now - timedelta(seconds=rollout.apply_timeout_seconds))
    return RolloutTarget.objects.filter(rollout=rollout).aggregate(
        targeted=Count("pk"),
        reverted=Count("pk", filter=stable),
        offline=Count("pk", filter=~stable & ~present),
        timed_out=Count("pk", filter=~stable & present & overdue),
        waiting=Count("pk", filter=~stable & present & ~overdue),
    )


# --- the gate ------------------------------------------------------------------------------


def running_rollout_ids() -> list[int]:
    return list(
        Rollout.objects.filter(state__in=[RolloutState.RUNNING, RolloutState.ROLLING_BACK]).values_list("pk", flat=True)
    )


def rollout_tick(*, rollout_id: int, now: datetime | None = None) -> str:
    """Advance one rollout if its gate allows; safe to call any number of times, concurrently."""
    rollout = (
        Rollout.objects.select_related("configuration", "candidate_version", "stable_version")
        .filter(pk=rollout_id)
        .first()
    )
    if rollout is None:
        return "gone"
    now = now or timezone.now()
    if rollout.state == RolloutState.ROLLING_BACK:
        return _tick_rollback(rollout, now)
    if rollout.state != RolloutState.RUNNING:
        return f"idle ({rollout.state})"
    return _tick_running(rollout, now)


def _tick_running(rollout: Rollout, now: datetime) -> str:
    stages = list(rollout.stages.all())
    index = rollout.stage_index
    counts = cumulative_counts(rollout, through_stage=index, now=now)
    rollout_samples.rollout_sample_record(rollout=rollout, stage=index, counts=counts, now=now)
    snapshot = {"stage": index, **counts.as_dict()}
    if counts.bad and counts.failure_rate > rollout.max_failure_rate:
        message = (
            f"failure rate {counts.failure_rate:.4%} ({counts.bad} of {counts.reachable}) "
            f"exceeds the budget of {rollout.max_failure_rate:.4%}"
        )
        if rollout.auto_rollback:
            done = _start_rollback(
                rollout,
                from_states=[RolloutState.RUNNING],
                kind=Kind.BUDGET_EXCEEDED,
                actor=None,
                message=message + "; rolling back",
                counts=snapshot,
                from_stage=index,
            )
            return "rolling back" if done else "raced"
        done = _transition(
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
    done = _transition(
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
        done = _transition(
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
            _sign_for_delivery(rollout, rollout.candidate_version_id, Kind.SUCCEEDED)
            Configuration.objects.filter(pk=rollout.configuration_id).update(
                current_version=rollout.candidate_version_id, updated_at=timezone.now()
            )
            bump_definitions()
            desired_state.resolve_for_configuration(rollout.configuration)
    return "succeeded" if done else "raced"


def _tick_rollback(rollout: Rollout, now: datetime) -> str:
    progress = rollback_progress(rollout, now=now)
    if progress["waiting"]:
        return f"rolling back: {progress['waiting']} agents still on the candidate"
    done = _transition(
        rollout,
        from_states=[RolloutState.ROLLING_BACK],
        to_state=RolloutState.ROLLED_BACK,
        kind=Kind.ROLLED_BACK,
        changes={"finished_at": now},
        counts=progress,
        resolve=False,
    )
    return "rolled back" if done else "raced"
