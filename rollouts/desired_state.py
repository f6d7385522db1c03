"""The desired-state resolver: which configuration version each agent should run.

One function decides, for any set of agents, in bulk: the configurations are read once,
their selectors are evaluated in memory against each agent's labels, and only the
assignments that change are written (a handful of statements for 20,000 agents). After
commit the affected agents are notified; the notification is a hint, the generation
counter and its change log (DesiredStateGeneration, DesiredStateChange) make every server
process converge without it, re-reading only the agents that changed.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from django.db import connection, transaction
from django.db.models import F, Max, Q, QuerySet
from django.utils import timezone

from fleet.db import bulk_update_from_unnest
from fleet.label_selectors.parsing import parse_selector
from fleet.models import Agent
from fleet.notify import notify_desired_config_changed
from fleet.selector_queries import selector_q
from rollouts.models import (
    AgentDesiredConfig,
    Configuration,
    DesiredStateChange,
    DesiredStateGeneration,
    RolloutTarget,
)
from rollouts.resolver_cache import (
    CandidateConfiguration,
    config_files,
    definitions_token,
    resolver_definitions,
)
from rollouts.rollout_plans import RolloutPlan

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


def bump_generation() -> int:
    """Move the generation by one in the caller's transaction; the new value.

    The UPDATE holds the row's lock until the caller commits, so concurrent writers
    commit their values in order and a reader never sees N before N - 1.
    """
    updated = DesiredStateGeneration.objects.filter(pk=1).update(value=F("value") + 1)
    if not updated:
        _, created = DesiredStateGeneration.objects.get_or_create(pk=1, defaults={"value": 1})
        if not created:  # another transaction inserted the row meanwhile
            DesiredStateGeneration.objects.filter(pk=1).update(value=F("value") + 1)
    return current_generation()


def current_generation() -> int:
    return DesiredStateGeneration.objects.filter(pk=1).values_list("value", flat=True).first() or 0


def log_changes(agent_ids: Sequence[int]) -> int:
    """Record in the caller's transaction that `agent_ids` have a new desired state; the
    generation they were logged under (see DesiredStateGeneration)."""
    generation = bump_generation()
    DesiredStateChange.objects.create(generation=generation, agent_ids=sorted(set(agent_ids)))
    return generation


@dataclass(frozen=True)
class DesiredStateChanges:
    """What a server process must forget to catch up with `generation`."""

    generation: int
    # The agents whose desired state changed; None when the log no longer reaches back to
    # the caller's generation (or it has none yet): forget everything.
    agent_ids: frozenset[int] | None


def changes_since(generation: int) -> DesiredStateChanges:
    """The agents whose desired state changed after `generation` (two small queries when
    the generation moved, one when it did not)."""
    row = DesiredStateGeneration.objects.filter(pk=1).values_list("value", "pruned_through").first()
    current, pruned_through = row or (0, 0)
    if current == generation:
        return DesiredStateChanges(current, frozenset())
    if generation < pruned_through or current < generation:
        # Too far behind, or the counter went back (a restored database): start over.
        return DesiredStateChanges(current, None)
    logged = DesiredStateChange.objects.filter(generation__gt=generation, generation__lte=current).values_list(
        "agent_ids", flat=True
    )
    return DesiredStateChanges(current, frozenset(agent_id for ids in logged for agent_id in ids))


@transaction.atomic
def prune_changes(*, older_than: datetime) -> int:
    """Drop log rows written before `older_than`; the number dropped."""
    through = DesiredStateChange.objects.filter(created_at__lt=older_than).aggregate(through=Max("generation"))[
        "through"
    ]
    if through is None:
        return 0
    # Lock the generation row first: writers log under it, so no row at or below
    # `through` can be added once this holds.
    DesiredStateGeneration.objects.select_for_update().filter(pk=1).first()
    DesiredStateGeneration.objects.filter(pk=1, pruned_through__lt=through).update(pruned_through=through)
    deleted, _ = DesiredStateChange.objects.filter(generation__lte=through).delete()
    return deleted


def _chunks(items: Sequence[int], size: int = BATCH) -> Iterable[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def stored_assignments(agent_ids: Sequence[int]) -> dict[int, tuple[int, int]]:
    """The stored (configuration id, version id) of each of `agent_ids` that has one."""
    return {
        agent_id: (configuration_id, version_id)
        for agent_id, configuration_id, version_id in AgentDesiredConfig.objects.filter(
            agent_id__in=agent_ids
        ).values_list("agent_id", "configuration_id", "version_id")
    }


def computed_assignments(
    rows: Iterable[tuple[int, uuid.UUID, dict[str, str] | None]],
) -> dict[int, tuple[int, int] | None]:
    """What the resolver gives each agent of `rows` (id, instance uid, labels) now:
    (configuration id, version id), or None for no configuration. Reads only the
    definitions, writes nothing."""
    definitions = resolver_definitions()
    computed: dict[int, tuple[int, int] | None] = {}
    for agent_id, instance_uid, labels in rows:
        configuration = choose_configuration(labels or {}, definitions.candidates)
        if configuration is None:
            computed[agent_id] = None
            continue
        version_id, _ = version_for_agent(
            configuration, agent_id=agent_id, instance_uid=instance_uid, labels=labels or {}, plans=definitions.plans
        )
        computed[agent_id] = (configuration.configuration_id, version_id)
    return computed


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
        current = stored_assignments([row[0] for row in chunk])
        for agent_id, instance_uid, labels in chunk:
            configuration = choose_configuration(labels or {}, candidates)
            if configuration is None:
                if agent_id in current:
                    cleared.append(agent_id)
                continue
            version_id, target = version_for_agent(
                configuration, agent_id=agent_id, instance_uid=instance_uid, labels=labels or {}, plans=plans
            )
            # The configuration is compared too: a row whose version is right but whose
            # configuration is not (written by other means) is rewritten, not kept.
            if current.get(agent_id) != (configuration.configuration_id, version_id):
                if target is not None:
                    targets.append(target)
                changed_to[(configuration.configuration_id, version_id)].append(agent_id)

    now = timezone.now()
    for (configuration_id, version_id), agent_ids in changed_to.items():
        for ids in _chunks(agent_ids):
            AgentDesiredConfig.objects.bulk_create(
                [
                    # A new desired version is a new offer: the record of the previous
                    # version's offer does not carry over (a rollback to the same content
                    # would otherwise wait out the re-offer delay of a polling agent).
                    AgentDesiredConfig(
                        agent_id=i,
                        configuration_id=configuration_id,
                        version_id=version_id,
                        updated_at=now,
                        offered_hash="",
                        offered_at=None,
                    )
                    for i in ids
                ],
                update_conflicts=True,
                unique_fields=["agent"],
                update_fields=["configuration", "version", "updated_at", "offered_hash", "offered_at"],
            )
    for ids in _chunks(cleared):
        AgentDesiredConfig.objects.filter(agent_id__in=ids).delete()
    record_targets(targets, now)

    changed = [i for ids in changed_to.values() for i in ids] + cleared
    if changed:
        generation = log_changes(changed)
        transaction.on_commit(lambda: notify_agents(changed, generation=generation))
    return changed


def record_targets(targets: list[TargetRow], now: datetime) -> None:
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
    Call it last in that transaction (see the end of this docstring).

    The path of every new agent's first report, so it does only what such an agent needs:
    it has no assignment to read or compare (it did not exist), the report being answered
    carries the offer, and no process can hold a cached desired config for it. So nothing
    is read but the cached definitions, and neither a hint nor a generation bump is sent:
    with 18,000 agents connecting, the hint alone (a thread and a Redis round trip per
    agent) cost more server CPU than the rest of the report, and every bump made every
    process re-read the desired config of every agent it serves.

    A change of the definitions committed meanwhile must not be missed: its own resolution
    selects agents by a query that cannot see this uncommitted agent. So the definitions
    token is read again at the end, under a share lock on the row every such change
    updates (and holds until it commits) before its resolution runs: a change in flight is
    waited for and shows as a new token; one not yet begun must wait for this commit, and
    its resolution then sees the agent. A new token means the agent is resolved again
    after commit, by the full path (logged and hinted): only agents that raced a change
    pay for it.
    """
    definitions = resolver_definitions()
    configuration = choose_configuration(labels or {}, definitions.candidates)
    version_id: int | None = None
    if configuration is not None:
        version_id, target = version_for_agent(
            configuration, agent_id=agent_id, instance_uid=instance_uid, labels=labels or {}, plans=definitions.plans
        )
        now = timezone.now()
        AgentDesiredConfig.objects.create(
            agent_id=agent_id, configuration_id=configuration.configuration_id, version_id=version_id, updated_at=now
        )
        if target is not None:
            record_targets([target], now)
    if locked_definitions_token() != definitions.token:
        transaction.on_commit(lambda: resolve_agents_in_lock_order([agent_id]))
    return version_id


_CONFIGURATIONS_KEY_SHARE_SQL = "SELECT id FROM {table} ORDER BY id FOR KEY SHARE"


@transaction.atomic
def resolve_agents_in_lock_order(agent_ids: Sequence[int]) -> list[int]:
    """Re-resolve `agent_ids` outside any writer's transaction (a new agent that raced a
    change, the reconciler's repairs); the ids whose assignment changed.

    A plain resolve writes assignments first and the generation row last, while a writer
    of definitions holds its configuration row (FOR UPDATE), then the generation row,
    then writes assignments: run side by side on the same agent, each waits for the other.
    Here locks are taken in the writers' order instead, so each waits at most for writers
    to finish: the configurations (key share: what an assignment's foreign key, checked
    at commit, needs; a writer holding one is waited for), the agents' rows (no key
    update: a relabel, which holds its agent, is waited for; a writer's inserts only
    key-share them), then the generation row, which makes a change of the definitions in
    flight finish first and keeps the next one from starting until this one commits.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(_CONFIGURATIONS_KEY_SHARE_SQL.format(table=Configuration._meta.db_table))
    ids = sorted(set(agent_ids))
    list(Agent.objects.select_for_update(no_key=True).filter(pk__in=ids).order_by("pk").values_list("pk"))
    DesiredStateGeneration.objects.select_for_update().filter(pk=1).first()
    return resolve_agents(Agent.objects.filter(pk__in=ids))


_TOKEN_FOR_SHARE_SQL = "SELECT definitions FROM {table} WHERE id = 1 FOR SHARE"


def locked_definitions_token() -> str:
    """The definitions token, read under a share lock held until the caller's commit: a
    writer of definitions that holds the row is waited for, one that comes later waits.

    The caller's foreign keys are checked first: they are deferred to commit, and the
    check key-shares the configuration row an assignment names, which a writer of
    definitions holds (FOR UPDATE) while it waits for the generation row. Checked after
    the share lock was taken, each would wait for the other; checked before, the caller
    takes the two locks in the writer's order.

    Elsewhere than on PostgreSQL, writing transactions are serialised by the database
    (SQLite's single writer), so a plain read is enough.
    """
    if connection.vendor != "postgresql":
        return definitions_token()
    sql = _TOKEN_FOR_SHARE_SQL.format(table=DesiredStateGeneration._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cursor.execute(sql)
        row = cursor.fetchone()
        if row is None:
            # No row yet (a new database): inserting it waits for a first writer that is
            # inserting it right now, then the lock is taken as above.
            DesiredStateGeneration.objects.get_or_create(pk=1)
            cursor.execute(sql)
            row = cursor.fetchone()
    return str(row[0]) if row else ""


_DESIRED_COLUMNS = (
    "agent_id",
    "offered_hash",
    "offered_at",
    "configuration_id",
    "configuration__name",
    "version_id",
    "version__number",
    "version__config_hash",
    "version__signature",
)


def desired_configs_for_agents(agent_ids: Iterable[int]) -> dict[int, DesiredConfig | None]:
    """The desired version of each agent (None: no assignment), one query per 2,000 agents;
    the files come from the per-process cache by config hash (content-addressed, so never
    stale)."""
    ids = list(agent_ids)
    found: dict[int, DesiredConfig | None] = dict.fromkeys(ids)
    for chunk in _chunks(ids):
        for row in AgentDesiredConfig.objects.filter(agent_id__in=chunk).values_list(*_DESIRED_COLUMNS):
            agent_id, offered_hash, offered_at, configuration_id, name, version_id, number, config_hash, signature = row
            found[agent_id] = DesiredConfig(
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
    return found


def desired_config_for_agent(agent_id: int) -> DesiredConfig | None:
    return desired_configs_for_agents([agent_id])[agent_id]


@dataclass(frozen=True)
class Offer:
    """What was offered to an agent, when, and as which desired version.

    The record belongs to that version: one that reaches the row after the agent's desired
    version changed (offers are written in batches, seconds later) is dropped, or a rollback
    to the same content would pass for offered and wait out the re-offer delay."""

    config_hash: str
    at: datetime
    version_id: int


_OFFERS_SQL = """
    UPDATE {desired} AS d SET offered_hash = v.hash, offered_at = v.at
    FROM unnest(%s::bigint[], %s::text[], %s::timestamptz[], %s::bigint[]) AS v(agent_id, hash, at, version_id)
    WHERE d.agent_id = v.agent_id AND d.version_id = v.version_id
"""
# A rollout target notes when its candidate actually went out (first offer only).
_TARGETS_OFFERED_SQL = """
    UPDATE {targets} AS t SET offered_at = v.at
    FROM unnest(%s::bigint[], %s::text[], %s::timestamptz[], %s::bigint[]) AS v(agent_id, hash, at, version_id)
    WHERE t.agent_id = v.agent_id AND t.offered_hash = v.hash AND t.offered_at IS NULL
"""


def record_offers(offers: dict[int, Offer]) -> int:
    """Note what was offered to each agent (by id) and when: two statements on PostgreSQL
    for any number of agents; a batch in one transaction elsewhere. The number noted."""
    if not offers:
        return 0
    ids = list(offers)
    columns = [
        ids,
        [offers[i].config_hash for i in ids],
        [offers[i].at for i in ids],
        [offers[i].version_id for i in ids],
    ]
    statements = [
        _OFFERS_SQL.format(desired=AgentDesiredConfig._meta.db_table),
        _TARGETS_OFFERED_SQL.format(targets=RolloutTarget._meta.db_table),
    ]
    return bulk_update_from_unnest(statements, columns, fallback=lambda: _record_offers_orm(offers))


def _record_offers_orm(offers: dict[int, Offer]) -> int:
    noted = 0
    for agent_id, offer in offers.items():
        noted += AgentDesiredConfig.objects.filter(agent_id=agent_id, version_id=offer.version_id).update(
            offered_hash=offer.config_hash, offered_at=offer.at
        )
        RolloutTarget.objects.filter(agent_id=agent_id, offered_hash=offer.config_hash, offered_at__isnull=True).update(
            offered_at=offer.at
        )
    return noted


def notify_agents(agent_ids: Sequence[int], *, generation: int | None = None) -> None:
    """Hint the agents' server processes to re-check their desired state now."""
    uids = []
    for ids in _chunks(list(agent_ids)):
        uids.extend(Agent.objects.filter(pk__in=ids).values_list("instance_uid", flat=True))
    notify_desired_config_changed(uids, generation=generation)
