"""Writes to the fleet inventory: one transaction per agent row, or per batch of held status reports.

The feature apps hear about what concerns them through their `FleetExtension`
(fleet.extensions), inside the same transactions: a new agent, an agent whose labels
changed, the remote config statuses and the package statuses agents reported.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import transaction
from django.utils import timezone

from fleet import extensions
from fleet.audit import audit_record
from fleet.labels import merged_labels
from fleet.models import Agent, stored_remote_address, uint64_to_db
from fleet.reports import AgentReport


@dataclass(frozen=True)
class RemoteConfigAnswer:
    """What an agent reported about a config hash (RemoteConfigStatus), and when."""

    agent_id: int
    config_hash: str
    state: int
    error: str
    at: datetime


@dataclass(frozen=True)
class PackageStatusesReport:
    """What an agent reported about its packages (its PackageStatuses as stored,
    fleet.reports.package_statuses_to_dict), and when."""

    agent_id: int
    statuses: dict[str, Any]
    at: datetime


@dataclass
class AgentSnapshot:
    """What a server process keeps in memory about an agent between its messages."""

    agent_id: int
    instance_uid: uuid.UUID
    last_sequence_num: int
    capabilities: int
    description_received: bool
    identifying_attributes: dict[str, object]
    available_components_hash: str
    connected: bool
    remote_config_hash: str
    custom_capabilities: list[str]
    # The row's `reported_state_hash`: "" unless it holds exactly one full report.
    reported_state_hash: str = ""

    @classmethod
    def of(cls, agent: Agent) -> AgentSnapshot:
        return cls(
            agent_id=agent.pk,
            instance_uid=agent.instance_uid,
            last_sequence_num=agent.sequence_num,
            capabilities=agent.capabilities,
            description_received=agent.description_received,
            identifying_attributes=dict(agent.identifying_attributes or {}),
            available_components_hash=agent.available_components_hash,
            connected=agent.connected,
            remote_config_hash=agent.remote_config_hash,
            custom_capabilities=list(agent.custom_capabilities or []),
            reported_state_hash=agent.reported_state_hash,
        )


# The columns a snapshot needs: not the reported documents (an effective config may be a
# mebibyte of JSON that a reconnecting agent's snapshot would parse for nothing).
_SNAPSHOT_FIELDS = (
    "instance_uid",
    "last_sequence_num",
    "capabilities",
    "description_received",
    "identifying_attributes",
    "available_components_hash",
    "connected",
    "remote_config_hash",
    "custom_capabilities",
    "reported_state_hash",
)


def agent_snapshot(*, instance_uid: uuid.UUID) -> AgentSnapshot | None:
    return agent_snapshots([instance_uid]).get(instance_uid)


def agent_snapshots(instance_uids: list[uuid.UUID]) -> dict[uuid.UUID, AgentSnapshot]:
    """The snapshots of the agents of `instance_uids` that exist, in one query (the sessions
    of a reconnecting crowd read theirs together: fleet.batched_reads)."""
    agents = Agent.objects.filter(instance_uid__in=instance_uids).only(*_SNAPSHOT_FIELDS).order_by()
    return {agent.instance_uid: AgentSnapshot.of(agent) for agent in agents}


_REPORT_FIELDS = (
    "identifying_attributes",
    "non_identifying_attributes",
    "health",
    "effective_config",
    "effective_config_hash",
    "remote_config_hash",
    "remote_config_state",
    "remote_config_error",
    "package_statuses",
    "available_components",
    "available_components_hash",
    "custom_capabilities",
    "connection_settings_status",
)


@transaction.atomic
def agent_record_report(
    *,
    instance_uid: uuid.UUID,
    report: AgentReport,
    sequence_num: int,
    transport: str,
    remote_address: str,
    seen_at: datetime,
    state_hash: str = "",
) -> AgentSnapshot:
    """Store what the report carries; absent parts stay as they were.

    Creates the agent on its first message. Marks it connected, so a report is also the
    moment a (re)connection becomes visible in the inventory. `state_hash`: the report's
    `reported_state_hash` when it is a full report (the row then holds exactly it), else "".
    """
    agent = Agent.objects.select_for_update().filter(instance_uid=instance_uid).first()
    if agent is None:
        agent = Agent(instance_uid=instance_uid, first_seen=seen_at)
    for field in _REPORT_FIELDS:
        value = getattr(report, field)
        if value is not None:
            setattr(agent, field, value)
    if report.identifying_attributes is not None:
        agent.description_received = True
    created = agent.pk is None
    labels_before = agent.labels
    if report.identifying_attributes is not None or report.non_identifying_attributes is not None:
        agent.labels = merged_labels(
            identifying=agent.identifying_attributes,
            non_identifying=agent.non_identifying_attributes,
            operator=agent.operator_labels,
        )
    if report.health is not None:
        agent.healthy = bool(report.health.get("healthy"))
    agent.capabilities = report.capabilities
    agent.reported_state_hash = state_hash
    agent.last_sequence_num = uint64_to_db(sequence_num)
    agent.transport = transport
    agent.remote_address = stored_remote_address(remote_address)
    agent.last_seen = seen_at
    if not agent.connected:
        agent.connected = True
        agent.connected_at = seen_at
    agent.full_clean(validate_unique=False, validate_constraints=False)
    agent.save()
    if report.remote_config_hash is not None and report.remote_config_state is not None:
        answer = RemoteConfigAnswer(
            agent_id=agent.pk,
            config_hash=report.remote_config_hash,
            state=report.remote_config_state,
            error=report.remote_config_error or "",
            at=timezone.now(),
        )
        extensions.remote_config_answered([answer])
    if report.package_statuses is not None:
        extensions.package_statuses_reported([PackageStatusesReport(agent.pk, report.package_statuses, seen_at)])
    # Labels decide which configuration applies: a new or relabelled agent is resolved
    # now, in the same transaction, so the reply to this report can carry the offer.
    if created:
        extensions.agent_inventoried(agent=agent)
    elif agent.labels != labels_before:
        extensions.labels_changed(agent=agent)
    return AgentSnapshot.of(agent)


@dataclass(frozen=True)
class StatusWrite:
    """A status report's writes to one agent row, held for a batch (fleet.session)."""

    changes: dict[str, object]
    answers: dict[str, RemoteConfigAnswer]  # by config hash: the newest answer about each

    def merged(self, newer: StatusWrite) -> StatusWrite:
        """This write followed by `newer`: newer values win field by field."""
        return StatusWrite({**self.changes, **newer.changes}, {**self.answers, **newer.answers})


def heartbeat_status_write(
    *, sequence_num: int, seen_at: datetime, transport: str | None = None, remote_address: str | None = None
) -> StatusWrite:
    """A heartbeat's facts as a status write, for an agent with a status report held: the
    agent's facts then stay in one buffer, so its sequence number never reaches the
    database ahead of a report that came before it (after a crash, the gap makes the
    server ask for the agent's full state, and the lost report comes again). A cheap
    reconnect (fleet.session) adds the connection's transport and address."""
    changes: dict[str, object] = {
        "last_seen": seen_at,
        "last_sequence_num": uint64_to_db(sequence_num),
        "connected": True,
    }
    if transport is not None:
        changes["transport"] = transport
    if remote_address is not None:
        changes["remote_address"] = stored_remote_address(remote_address)
    return StatusWrite(changes, {})


def agent_status_write(
    *, snapshot: AgentSnapshot, report: AgentReport, sequence_num: int, seen_at: datetime
) -> StatusWrite:
    """The hot path for a report that leaves identity and labels alone (config status,
    health, effective config): what to write, with no database access. The session
    updates `snapshot` and leaves the write to a batch (`write_statuses`); the write
    carries the message's sequence number, for the reason `heartbeat_status_write` gives.

    Config rollouts make every agent send two such reports (APPLYING, APPLIED) within
    seconds; one UPDATE per report (and one for its rollout answer) made a stage of
    16,000 agents cost 32,000 round trips through the server's thread pool.
    """
    changes: dict[str, object] = {
        field: value for field in _REPORT_FIELDS if (value := getattr(report, field)) is not None
    }
    if report.health is not None:
        changes["healthy"] = bool(report.health.get("healthy"))
    changes.update(
        capabilities=report.capabilities,
        # The row no longer holds one full report: the next reconnect takes the full path.
        reported_state_hash="",
        updated_at=seen_at,
        **heartbeat_status_write(sequence_num=sequence_num, seen_at=seen_at).changes,
    )
    answers: dict[str, RemoteConfigAnswer] = {}
    if report.remote_config_hash is not None and report.remote_config_state is not None:
        answers[report.remote_config_hash] = RemoteConfigAnswer(
            agent_id=snapshot.agent_id,
            config_hash=report.remote_config_hash,
            state=report.remote_config_state,
            error=report.remote_config_error or "",
            at=seen_at,
        )
        snapshot.remote_config_hash = report.remote_config_hash
    if report.custom_capabilities is not None:
        snapshot.custom_capabilities = report.custom_capabilities
    snapshot.capabilities = report.capabilities
    snapshot.reported_state_hash = ""
    return StatusWrite(changes, answers)


def write_statuses(batch: dict[int, StatusWrite]) -> int:
    """Write held status reports (by agent id) in one transaction: one UPDATE per set of
    changed fields for the agent rows, then the extensions note the remote config answers
    and the package statuses (rollouts: one UPDATE for each kind of rollout answer). The
    number of agents. An agent's held write keeps its newest package statuses, as its row
    does."""
    if not batch:
        return 0
    by_fields: dict[tuple[str, ...], list[Agent]] = defaultdict(list)
    for agent_id, write in batch.items():
        by_fields[tuple(sorted(write.changes))].append(Agent(pk=agent_id, **write.changes))
    with transaction.atomic():
        for fields, agents in by_fields.items():
            Agent.objects.bulk_update(agents, fields, batch_size=500)
        extensions.remote_config_answered([answer for write in batch.values() for answer in write.answers.values()])
        extensions.package_statuses_reported(_package_reports(batch))
    return len(batch)


def _package_reports(batch: dict[int, StatusWrite]) -> list[PackageStatusesReport]:
    reports = []
    for agent_id, write in batch.items():
        statuses, seen = write.changes.get("package_statuses"), write.changes.get("last_seen")
        # Every status write carries `last_seen` (heartbeat_status_write's facts).
        if isinstance(statuses, dict) and isinstance(seen, datetime):
            reports.append(PackageStatusesReport(agent_id, statuses, seen))
    return reports


def agent_mark_disconnected(*, instance_uid: uuid.UUID, at: datetime, sequence_num: int | None) -> bool:
    """Conditional update: only a connected agent becomes disconnected (and only once)."""
    changes: dict[str, object] = {"connected": False, "disconnected_at": at, "last_seen": at}
    if sequence_num is not None:
        changes["last_sequence_num"] = uint64_to_db(sequence_num)
    return bool(Agent.objects.filter(instance_uid=instance_uid, connected=True).update(**changes))


def agent_change_instance_uid(*, old: uuid.UUID, new: uuid.UUID) -> bool:
    """Re-key an agent that asked the server for a new instance_uid; history stays with it."""
    return bool(Agent.objects.filter(instance_uid=old).update(instance_uid=new))


@transaction.atomic
def agent_instance_uid_move(*, old: uuid.UUID, new: uuid.UUID, details: Mapping[str, object] | None = None) -> bool:
    """Re-key the agent row of `old` to `new`, audited as `agent.instance_uid_change` (with
    `details` added); False when there was no such row."""
    agent = Agent.objects.filter(instance_uid=old).first()
    if agent is None or not agent_change_instance_uid(old=old, new=new):
        return False
    audit_record(
        actor=None,
        action="agent.instance_uid_change",
        target=agent,
        details={"old": str(old), "new": str(new), **(details or {})},
    )
    return True


def agents_mark_stale_disconnected(*, seen_before: datetime, at: datetime) -> int:
    """Agents still flagged connected that have not been heard from since `seen_before`.

    Covers a server process that died without closing its sessions.
    """
    return Agent.objects.filter(connected=True, last_seen__lt=seen_before).update(connected=False, disconnected_at=at)
