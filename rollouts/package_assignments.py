"""Who gets which package version: the assignments as the resolver reads them, per process.

The definitions (every assignment in precedence order, with its version's files) are few
and rarely change, so each process keeps them under the packages token of
`DesiredStateGeneration`; every write that changes them replaces the token in its own
transaction (`bump_packages`, as `resolver_cache.bump_definitions` does for
configurations). An agent's desired set is then computed in memory from its labels and
platform (rollouts.package_offers): a session that holds those recomputes it without the
database when the definitions change, and an agent whose set did not change keeps the
same `all_packages_hash`, so it is offered nothing.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction

from fleet.label_selectors.parsing import parse_selector
from fleet.models import Agent
from fleet.notify import notify_packages_changed
from fleet.selector_queries import selector_q
from opamp.proto import opamp_pb2
from rollouts.models import (
    ACTIVE_ROLLOUT_STATES,
    DesiredStateGeneration,
    PackageAssignment,
    PackageFile,
    PackageType,
    PackageVersion,
    Rollout,
)
from rollouts.package_offers import (
    AssignedVersion,
    DesiredPackages,
    OfferedFile,
    PackageRollout,
    PackageRule,
    ReportedPackages,
    desired_packages,
    platform_of,
)
from rollouts.rollout_plans import plan_of

WIRE_TYPES = {
    PackageType.TOP_LEVEL: opamp_pb2.PackageType_TopLevel,
    PackageType.ADDON: opamp_pb2.PackageType_Addon,
}


@dataclass(frozen=True)
class PackageDefinitions:
    token: str
    rules: tuple[PackageRule, ...]
    # Active package rollouts by package name (a rollout's transitions bump the token too).
    rollouts: Mapping[str, PackageRollout] = field(default_factory=dict)


_definitions: PackageDefinitions | None = None


def bump_packages() -> None:
    """Call in the transaction of any write the package resolver reads."""
    global _definitions
    token = secrets.token_hex(16)
    updated = DesiredStateGeneration.objects.filter(pk=1).update(packages=token)
    if not updated:
        _, created = DesiredStateGeneration.objects.get_or_create(pk=1, defaults={"packages": token})
        if not created:  # another transaction inserted the row meanwhile
            DesiredStateGeneration.objects.filter(pk=1).update(packages=token)
    _definitions = None


def hint_agents(agent_ids: Iterable[int] = (), *, selectors: Iterable[Any] = ()) -> None:
    """Once the caller's transaction commits: hint the live sessions of these agents, and
    of the agents `selectors` match, to look at their package sets again now."""
    ids, chosen = list(agent_ids), [parse_selector(selector) for selector in selectors]

    def send() -> None:
        uids = list(Agent.objects.filter(pk__in=ids).values_list("instance_uid", flat=True)) if ids else []
        for selector in chosen:
            uids += Agent.objects.filter(selector_q(selector)).values_list("instance_uid", flat=True)
        if uids:
            notify_packages_changed(set(uids))

    transaction.on_commit(send)


def packages_token() -> str:
    return DesiredStateGeneration.objects.filter(pk=1).values_list("packages", flat=True).first() or ""


def load_package_definitions(token: str) -> PackageDefinitions:
    assignments = list(
        PackageAssignment.objects.order_by("-priority", "name").values_list(
            "selector", "version_id", "version__version", "package__name", "package__type"
        )
    )
    rollouts = list(
        Rollout.objects.filter(state__in=ACTIVE_ROLLOUT_STATES, package__isnull=False)
        .select_related("package", "candidate_package_version")
        .prefetch_related("stages")
    )
    files: dict[int, dict[tuple[str, str], OfferedFile]] = {}
    version_ids = {row[1] for row in assignments} | {rollout.candidate_package_version_id for rollout in rollouts}
    for file in PackageFile.objects.filter(version_id__in=version_ids).values(
        "id", "version_id", "os", "arch", "sha256", "size", "signature"
    ):
        files.setdefault(file["version_id"], {})[(file["os"], file["arch"])] = OfferedFile(
            file_id=file["id"],
            os=file["os"],
            arch=file["arch"],
            sha256=file["sha256"],
            size=file["size"],
            signature=file["signature"],
        )
    rules = tuple(
        PackageRule(
            selector=parse_selector(selector),
            version=AssignedVersion(
                package=package,
                wire_type=WIRE_TYPES[PackageType(package_type)],
                version=version,
                version_id=version_id,
                files=files.get(version_id, {}),
            ),
        )
        for selector, version_id, version, package, package_type in assignments
    )
    package_rollouts = {}
    for rollout in rollouts:
        assert rollout.package is not None and rollout.candidate_package_version is not None
        candidate: PackageVersion = rollout.candidate_package_version
        package_rollouts[rollout.package.name] = PackageRollout(
            plan=plan_of(rollout),
            candidate=AssignedVersion(
                package=rollout.package.name,
                wire_type=WIRE_TYPES[PackageType(rollout.package.type)],
                version=candidate.version,
                version_id=candidate.pk,
                files=files.get(candidate.pk, {}),
            ),
        )
    return PackageDefinitions(token=token, rules=rules, rollouts=package_rollouts)


def package_definitions(token: str | None = None) -> PackageDefinitions:
    """The assignments: from this process's cache while the token is unchanged, else read
    again. `token`: already read by the caller. Without a token (nothing written since the
    database was created) nothing is cached."""
    global _definitions
    token = packages_token() if token is None else token
    cached = _definitions
    if token and cached is not None and cached.token == token:
        return cached
    fresh = load_package_definitions(token)
    if token:
        _definitions = fresh
    return fresh


@dataclass(frozen=True)
class AgentPackageFacts:
    """What an agent's package set depends on, and what it last reported about packages."""

    agent_id: int
    instance_uid: uuid.UUID
    labels: dict[str, str]
    os: str
    arch: str
    reported: ReportedPackages

    def desired(self, definitions: PackageDefinitions, *, with_rollouts: bool = True) -> DesiredPackages:
        """The set the assignments give, with the active rollouts' candidates unless
        `with_rollouts` is False (what the agent runs outside any rollout)."""
        return desired_packages(
            self.labels,
            self.os,
            self.arch,
            definitions.rules,
            instance_uid=self.instance_uid.bytes,
            rollouts=definitions.rollouts if with_rollouts else None,
        )


def _facts(row: dict[str, Any]) -> AgentPackageFacts:
    os, arch = platform_of(row["identifying_attributes"] or {}, row["non_identifying_attributes"] or {})
    return AgentPackageFacts(
        agent_id=row["id"],
        instance_uid=row["instance_uid"],
        labels=dict(row["labels"] or {}),
        os=os,
        arch=arch,
        reported=ReportedPackages.from_document(row["package_statuses"]),
    )


_FACT_FIELDS = (
    "id",
    "instance_uid",
    "labels",
    "identifying_attributes",
    "non_identifying_attributes",
    "package_statuses",
)


def agent_package_facts(agent_ids: Iterable[int]) -> dict[int, AgentPackageFacts]:
    """In one query, for every agent of `agent_ids` that exists."""
    rows = Agent.objects.filter(pk__in=list(agent_ids)).values(*_FACT_FIELDS)
    return {row["id"]: _facts(row) for row in rows}


def agent_package_facts_by_uid(instance_uid: uuid.UUID) -> AgentPackageFacts | None:
    row = Agent.objects.filter(instance_uid=instance_uid).values(*_FACT_FIELDS).first()
    return _facts(row) if row is not None else None


def desired_packages_for_agents(agent_ids: Iterable[int]) -> dict[int, DesiredPackages]:
    """Each agent's desired package set, in bulk: one query for the agents, the definitions
    from the process's cache."""
    definitions = package_definitions()
    return {agent_id: facts.desired(definitions) for agent_id, facts in agent_package_facts(agent_ids).items()}
