"""The desired-state resolver: which configuration version each agent should run.

One function decides, for any set of agents, in bulk: the configurations are read once,
their selectors are evaluated in memory against each agent's labels, and only the
assignments that change are written (a handful of statements for 20,000 agents). After
commit the affected agents are notified; the notification is a hint, the generation
counter (DesiredStateGeneration) makes every server process converge without it.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from django.db import transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from fleet.models import Agent
from rollouts.label_selectors import parse_selector
from rollouts.models import AgentDesiredConfig, Configuration, DesiredStateGeneration, RolloutTarget
from rollouts.resolver_cache import CandidateConfiguration, config_files, resolver_definitions
from rollouts.rollout_plans import RolloutPlan
from rollouts.selector_queries import selector_q

# Rows read and written per statement; keeps parameter lists within every database's limits.
BATCH = 2000


@dataclass(frozen=True)
class DesiredConfig:
    """What the session needs to offer a version, without touching the ORM again."""

    configuration_id: int
    configuration_name: str
    version_id: int
    version_number: int
    config_hash: str
    files: dict[str, dict[str, str]]
    signature: str
    offered_hash: str
    offered_at_timestamp: float | None


def choose_configuration(
    labels: dict[str, str], candidates: Sequence[CandidateConfiguration]
) -> CandidateConfiguration | None:
    for candidate in candidates:
        if candidate.selector.matches(labels):
            return candidate
    return None


@dataclass(frozen=True)
class TargetRow:
    """An agent a rollout gives its candidate, to be recorded as a RolloutTarget."""

    rollout_id: int
    agent_id: int
    stage_index: int
    bucket: int
    offered_hash: str


def version_for_agent(
    configuration: CandidateConfiguration,
    *,
    agent_id: int,
    instance_uid: uuid.UUID,
    labels: dict[str, str],
    plans: dict[int, RolloutPlan],
) -> tuple[int, TargetRow | None]:
    """The version id an agent matched by `configuration` runs: the current version, or
    what its cohort of an active rollout gives it (with the target row to record)."""
    plan = plans.get(configuration.configuration_id)
    if plan is None:
        return configuration.current_version_id, None
    version_id, cohort, bucket = plan.version_for(instance_uid.bytes, labels)
    if cohort is None:
        return version_id, None
    return version_id, TargetRow(plan.rollout_id, agent_id, cohort, bucket, plan.candidate_hash)


def bump_generation() -> None:
    updated = DesiredStateGeneration.objects.filter(pk=1).update(value=F("value") + 1)
    if not updated:
        DesiredStateGeneration.objects.get_or_create(pk=1, defaults={"value": 1})


def current_generation() -> int:
    return DesiredStateGeneration.objects.filter(pk=1).values_list("value", flat=True).first() or 0


def _chunks(items: Sequence[int], size: int = BATCH) -> Iterable[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@transaction.atomic
def resolve_agents(agents: QuerySet[Agent]) -> list[int]:
    """Recompute the desired version of `agents`; return the ids whose assignment changed."""
    # Cached per process until a configuration, version or rollout write changes them
    # (rollouts.resolver_cache): a new agent's resolve then reads only its own rows.
    definitions = resolver_definitions()
    candidates, plans = definitions.candidates, definitions.plans
    targets: list[TargetRow] = []
    changed_to: dict[tuple[int, int], list[int]] = defaultdict(list)  # (configuration, version) -> agent ids
    cleared: list[int] = []
    rows = list(agents.values_list("id", "instance_uid", "labels"))
    for chunk_start in range(0, len(rows), BATCH):
        chunk = rows[chunk_start : chunk_start + BATCH]
        current = dict(
            AgentDesiredConfig.objects.filter(agent_id__in=[row[0] for row in chunk]).values_list(
                "agent_id", "version_id"
            )
        )
        for agent_id, instance_uid, labels in chunk:
            configuration = choose_configuration(labels or {}, candidates)
            if configuration is None:
                if agent_id in current:
                    cleared.append(agent_id)
                continue
            version_id, target = version_for_agent(
                configuration, agent_id=agent_id, instance_uid=instance_uid, labels=labels or {}, plans=plans
            )
            if current.get(agent_id) != version_id:
                if target is not None:
                    targets.append(target)
                changed_to[(configuration.configuration_id, version_id)].append(agent_id)

    now = timezone.now()
    for (configuration_id, version_id), agent_ids in changed_to.items():
        for ids in _chunks(agent_ids):
            AgentDesiredConfig.objects.bulk_create(
                [
                    AgentDesiredConfig(
                        agent_id=i, configuration_id=configuration_id, version_id=version_id, updated_at=now
                    )
                    for i in ids
                ],
                update_conflicts=True,
                unique_fields=["agent"],
                update_fields=["configuration", "version", "updated_at"],
            )
    for ids in _chunks(cleared):
        AgentDesiredConfig.objects.filter(agent_id__in=ids).delete()
    _record_targets(targets, now)

    changed = [i for ids in changed_to.values() for i in ids] + cleared
    if changed:
        bump_generation()
        transaction.on_commit(lambda: notify_agents(changed))
    return changed


def _record_targets(targets: list[TargetRow], now: datetime) -> None:
    """Insert the rollout targets not yet recorded (an agent keeps its first assignment)."""
    for start in range(0, len(targets), BATCH):
        RolloutTarget.objects.bulk_create(
            [
                RolloutTarget(
                    rollout_id=t.rollout_id,
                    agent_id=t.agent_id,
                    stage_index=t.stage_index,
                    bucket=t.bucket,
                    offered_hash=t.offered_hash,
                    assigned_at=now,
                )
                for t in targets[start : start + BATCH]
            ],
            ignore_conflicts=True,
        )


def resolve_for_configuration(configuration: Configuration, *, previous_selector: dict | None = None) -> list[int]:
    """Re-resolve every agent a change of `configuration` can affect.

    Those are the agents its selector matches now, those it matched before the change,
    and those currently assigned to it.
    """
    affected = Q(desired_config__configuration=configuration) | selector_q(parse_selector(configuration.selector))
    if previous_selector is not None:
        affected |= selector_q(parse_selector(previous_selector))
    return resolve_agents(Agent.objects.filter(affected).distinct())


def resolve_agent(agent_id: int) -> list[int]:
    return resolve_agents(Agent.objects.filter(pk=agent_id))


def resolve_new_agent(*, agent_id: int, instance_uid: uuid.UUID, labels: dict[str, str]) -> int | None:
    """Assign a version to an agent created in the caller's transaction; its id or None.

    The path of every new agent's first report, so it does only what such an agent needs:
    it has no assignment to read or compare (it did not exist), the report being answered
    carries the offer, and no process can hold a cached desired config for it. So nothing
    is read but the cached definitions, and neither a hint nor a generation bump is sent:
    with 18,000 agents connecting, the hint alone (a thread and a Redis round trip per
    agent) cost more server CPU than the rest of the report, and every bump made every
    process re-read the desired config of every agent it serves.
    """
    definitions = resolver_definitions()
    configuration = choose_configuration(labels or {}, definitions.candidates)
    if configuration is None:
        return None
    version_id, target = version_for_agent(
        configuration, agent_id=agent_id, instance_uid=instance_uid, labels=labels or {}, plans=definitions.plans
    )
    now = timezone.now()
    AgentDesiredConfig.objects.create(
        agent_id=agent_id, configuration_id=configuration.configuration_id, version_id=version_id, updated_at=now
    )
    if target is not None:
        _record_targets([target], now)
    return version_id


def desired_config_for_agent(agent_id: int) -> DesiredConfig | None:
    """One query for the agent's desired version; the files come from the per-process
    cache by config hash (content-addressed, so never stale)."""
    row = (
        AgentDesiredConfig.objects.filter(agent_id=agent_id)
        .values_list(
            "offered_hash",
            "offered_at",
            "configuration_id",
            "configuration__name",
            "version_id",
            "version__number",
            "version__config_hash",
            "version__signature",
        )
        .first()
    )
    if row is None:
        return None
    offered_hash, offered_at, configuration_id, name, version_id, number, config_hash, signature = row
    return DesiredConfig(
        configuration_id=configuration_id,
        configuration_name=name,
        version_id=version_id,
        version_number=number,
        config_hash=config_hash,
        files=config_files(config_hash, version_id=version_id),
        signature=signature,
        offered_hash=offered_hash,
        offered_at_timestamp=offered_at.timestamp() if offered_at else None,
    )


def record_offer(*, agent_id: int, config_hash: str) -> None:
    now = timezone.now()
    AgentDesiredConfig.objects.filter(agent_id=agent_id).update(offered_hash=config_hash, offered_at=now)
    # A rollout target notes when its candidate actually went out (first offer only).
    RolloutTarget.objects.filter(agent_id=agent_id, offered_hash=config_hash, offered_at__isnull=True).update(
        offered_at=now
    )


def notify_agents(agent_ids: Sequence[int]) -> None:
    """Hint the agents' server processes to re-check their desired state now."""
    from fleet.notify import notify_desired_state_changed

    uids = []
    for ids in _chunks(list(agent_ids)):
        uids.extend(Agent.objects.filter(pk__in=ids).values_list("instance_uid", flat=True))
    notify_desired_state_changed(uids)
