"""Agents' answers on their rollout targets and the counts read from them: per stage,
cumulative, and a rollback's progress.

An answer is recorded on the agent's target row of an active rollout, in one statement per
batch of reports (fleet.services.write_statuses): a configuration's from the remote config
statuses (`record_answers`: the state reported for the candidate's hash), a package's from
the package statuses (rollouts.package_answers: Installed with the candidate version
"applied", InstallFailed for it "failed", with the agent's error). The row keeps the answer
after a rollback has moved the agent back to the stable version, which is how a rolled-back
rollout still names the agents that failed and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count, Q
from django.utils import timezone

from fleet.db import bulk_update_from_unnest
from fleet.models import RemoteConfigState
from fleet.selectors import presence_q
from fleet.services import RemoteConfigAnswer
from rollouts.models import ACTIVE_ROLLOUT_STATES, Rollout, RolloutTarget
from rollouts.rollout_subjects import subject_of

ANSWERS = {
    RemoteConfigState.APPLYING: "applying",
    RemoteConfigState.APPLIED: "applied",
    RemoteConfigState.FAILED: "failed",
}


def record_answer(*, agent_id: int, config_hash: str, state: int, error: str) -> None:
    """Note an agent's answer on its target row of an active rollout (one UPDATE)."""
    record_answers([RemoteConfigAnswer(agent_id, config_hash, state, error, timezone.now())])


_ANSWERS_SQL = """
    UPDATE {targets} AS t SET answer = v.answer, answered_at = v.at, error = v.error
    FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::timestamptz[], %s::text[])
        AS v(agent_id, hash, answer, at, error),
        {rollouts} AS r
    WHERE t.agent_id = v.agent_id AND t.offered_hash = v.hash AND r.id = t.rollout_id
        AND r.state = ANY(%s::text[]) AND t.answer IS DISTINCT FROM v.answer
"""


def record_answers(answers: Sequence[RemoteConfigAnswer]) -> int:
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


def _record_answers_orm(rows: Sequence[tuple[RemoteConfigAnswer, str]]) -> int:
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


def offline_grace() -> timedelta:
    """How long an agent that went away still counts as reachable for the gate.

    A closed socket marks the row disconnected at once, and an agent refused while the
    server cannot reach its database stays away its retry_info (5 to 10 s): leaving it out
    of the denominator at once let a stage succeed on the few agents that stayed. The
    setting defaults to the fleet's offline timeout, after which a silent connected agent
    is offline as well.
    """
    return timedelta(seconds=settings.OPAMP_ROLLOUT_OFFLINE_GRACE_SECONDS)


def reachable_q(now: datetime, *, prefix: str = "agent__") -> Q:
    """Heard from within the offline grace, connected or not: `last_seen` is the last
    message or the disconnect (agent_mark_disconnected writes both)."""
    return Q(**{f"{prefix}last_seen__gte": now - offline_grace()})


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

    def too_many_offline(self, max_share: float) -> bool:
        """More than `max_share` of the targets offline: what answered is too small a part
        of the stage to promote on ("No data -> hold, never promote")."""
        return self.targeted > 0 and self.offline > max_share * self.targeted

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

    Agents that have not answered count as pending while reachable (heard from within
    the offline grace, even if their socket closed since), as offline after it: offline
    agents are in no denominator.
    """
    now = now or timezone.now()
    # What a success and a failure are depends on the subject (a config's remote config
    # status, a package's PackageStatus).
    healthy_applied, unhealthy_applied, failed = subject_of(rollout).outcomes()
    answered = healthy_applied | unhealthy_applied | failed
    present = reachable_q(now)
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
    return counts_through(stage_counts(rollout, now=now), through_stage)


def counts_through(by_stage: dict[int, StageCounts], through_stage: int) -> StageCounts:
    total = StageCounts()
    for index, counts in by_stage.items():
        if index <= through_stage:
            total = total + counts
    return total


def rollback_progress(rollout: Rollout, *, now: datetime | None = None) -> dict[str, int]:
    """During a rollback: of the agents that got the candidate, how many run stable again."""
    now = now or timezone.now()
    stable = subject_of(rollout).reverted()
    present = presence_q(now, prefix="agent__")
    overdue = Q(reverted_at__lt=now - timedelta(seconds=rollout.apply_timeout_seconds))
    return RolloutTarget.objects.filter(rollout=rollout).aggregate(
        targeted=Count("pk"),
        reverted=Count("pk", filter=stable),
        offline=Count("pk", filter=~stable & ~present),
        timed_out=Count("pk", filter=~stable & present & overdue),
        waiting=Count("pk", filter=~stable & present & ~overdue),
    )
