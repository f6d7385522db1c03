"""One rollout's progress as the rollout page and `manage.py rollout_watch` show it.

A read model only: the counts come from the grouped queries of `rollout_services.answers`
(`stage_counts`, `rollback_progress`), the failed agents from the subject's
`failed_targets` (for both subjects the answers recorded on the targets, with the agent's
error, which stay after an automatic rollback has moved those agents back), a package
rollout's targets' PackageStatuses counted per version
(`package_statuses.rollout_package_statuses`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.utils import timezone

from rollouts.models import ROLLOUT_SUBJECT_RELATIONS, Rollout, RolloutEvent, RolloutSample, RolloutState
from rollouts.package_statuses import rollout_package_statuses
from rollouts.rollout_services import answers
from rollouts.rollout_services.gate import gate_stale
from rollouts.rollout_subjects import subject_of

FINAL_STATES = (RolloutState.SUCCEEDED, RolloutState.ROLLED_BACK, RolloutState.ABORTED)
FAILED_AGENTS_SHOWN = 50
EVENTS_SHOWN = 100


@dataclass(frozen=True)
class StageProgress:
    index: int
    size: str  # "1%" or "50 agents"
    hold_seconds: float
    requires_approval: bool
    approved: bool
    counts: answers.StageCounts
    failed_answers: int  # targets of this stage that answered "failed", even if since reverted
    current: bool
    reached: bool

    @property
    def done_percent(self) -> float:
        """Applied share of the stage's agents, for the bar (0 before the stage starts)."""
        targeted = self.counts.targeted
        return 100.0 * self.counts.applied / targeted if targeted else 0.0

    @property
    def failed_percent(self) -> float:
        targeted = self.counts.targeted
        return 100.0 * min(targeted, max(self.counts.bad, self.failed_answers)) / targeted if targeted else 0.0


@dataclass(frozen=True)
class FailedAgent:
    agent_id: int
    instance_uid: str
    name: str
    stage_index: int
    error: str
    answered_at: datetime | None


@dataclass(frozen=True)
class RolloutProgress:
    rollout: Rollout
    stages: list[StageProgress]
    cumulative: answers.StageCounts
    population: int
    rollback: dict[str, int] | None
    failed_agents: list[FailedAgent]
    failed_total: int
    events: list[RolloutEvent] = field(default_factory=list)
    samples: list[RolloutSample] = field(default_factory=list)
    gate_stale: bool = False
    # A package rollout's targets: version -> {installed, pending, downloading, installing, failed}.
    package_statuses: dict[str, dict[str, int]] | None = None

    @property
    def state(self) -> str:
        return str(self.rollout.state)

    @property
    def ended(self) -> bool:
        return self.rollout.state in FINAL_STATES

    @property
    def failure_rate(self) -> float:
        return self.cumulative.failure_rate

    @property
    def budget(self) -> float:
        return float(self.rollout.max_failure_rate)

    @property
    def budget_percent(self) -> float:
        return 100.0 * self.budget

    @property
    def failure_percent(self) -> float:
        return 100.0 * self.failure_rate

    @property
    def over_budget(self) -> bool:
        return self.cumulative.bad > 0 and self.failure_rate > self.budget

    @property
    def budget_series(self) -> list[dict[str, Any]]:
        """The failure rate over time: the counts sampled on each rollout tick
        (rollouts.rollout_samples) and the rate each recorded decision saw, in time order."""
        points = [{"at": sample.at, "rate": sample.failure_rate, "kind": "sample"} for sample in self.samples]
        for event in self.events:
            rate = (event.counts or {}).get("failure_rate")
            if rate is not None:
                points.append({"at": event.at, "rate": float(rate), "kind": event.kind})
        return sorted(points, key=lambda point: point["at"])


def rollout_progress(rollout_id: int, *, now: datetime | None = None, events: int = EVENTS_SHOWN) -> RolloutProgress:
    """Everything the progress views show, in a fixed handful of queries (raises DoesNotExist)."""
    now = now or timezone.now()
    rollout = Rollout.objects.select_related(*ROLLOUT_SUBJECT_RELATIONS, "created_by").get(pk=rollout_id)
    counts = answers.stage_counts(rollout, now=now)
    subject = subject_of(rollout)
    failed = subject.failed_targets()
    failed_by_stage: dict[int, int] = {}
    for index in failed.values_list("stage_index", flat=True):
        failed_by_stage[index] = failed_by_stage.get(index, 0) + 1
    started = rollout.state != RolloutState.DRAFT and rollout.started_at is not None
    stages = [
        StageProgress(
            index=stage.index,
            size=stage.size_display,
            hold_seconds=stage.hold_seconds,
            requires_approval=stage.requires_approval,
            approved=stage.approved_at is not None,
            counts=counts.get(stage.index, answers.StageCounts()),
            failed_answers=failed_by_stage.get(stage.index, 0),
            current=started and stage.index == rollout.stage_index and rollout.state not in FINAL_STATES,
            reached=started and stage.index <= rollout.stage_index,
        )
        for stage in rollout.stages.all()
    ]
    cumulative = answers.StageCounts()
    for stage_counts in counts.values():
        cumulative = cumulative + stage_counts
    rollback = None
    if rollout.state in (RolloutState.ROLLING_BACK, RolloutState.ROLLED_BACK):
        rollback = answers.rollback_progress(rollout, now=now)
    failed_agents = [
        FailedAgent(
            agent_id=target.agent_id,
            instance_uid=str(target.agent.instance_uid),
            name=target.agent.display_name,
            stage_index=target.stage_index,
            error=target.failure,
            answered_at=target.answered_at,
        )
        for target in failed.select_related("agent").order_by("stage_index", "answered_at", "pk")[:FAILED_AGENTS_SHOWN]
    ]
    recent = list(rollout.events.select_related("actor").order_by("-at", "-id")[:events])
    recent.reverse()
    return RolloutProgress(
        rollout=rollout,
        stages=stages,
        cumulative=cumulative,
        population=subject.population_size(),
        rollback=rollback,
        failed_agents=failed_agents,
        failed_total=sum(failed_by_stage.values()),
        events=recent,
        samples=list(rollout.samples.order_by("at", "id")),
        gate_stale=gate_stale(rollout, now),
        package_statuses=rollout_package_statuses(rollout) if rollout.is_package else None,
    )
