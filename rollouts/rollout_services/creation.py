"""Creating a rollout: the stage rules, `rollout_create` (a configuration's) and
`package_rollout_create` (a package's), and the dry run that previews which agents each
stage would take (cohort thresholds from the population).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction

from fleet.audit import Actor, actor_user, audit_record
from fleet.errors import DomainError
from fleet.label_selectors.parsing import parse_selector
from fleet.label_selectors.selector import SelectorError
from rollouts.cohorts import BUCKETS, StagePlan, bucket_of, cohort_of, count_threshold, percent_threshold
from rollouts.models import (
    Configuration,
    ConfigVersion,
    Package,
    PackageAssignment,
    PackageVersion,
    Rollout,
    RolloutEvent,
    RolloutStage,
    RolloutState,
)
from rollouts.rollout_subjects import subject_of

Kind = RolloutEvent.Kind

# Error messages (tests assert on these).
CANDIDATE_NOT_OF_CONFIGURATION = "version {number} does not belong to configuration {name!r}"
CANDIDATE_IS_STABLE = "version {number} is already the current version of {name!r}"
NO_STABLE_VERSION = "configuration {name!r} has no current version to roll out from"
NO_STAGES = "a rollout needs at least one stage"
STAGE_SIZE = "stage {index}: give exactly one of percent (0-100] or count (>= 1)"
STAGES_NOT_NESTED = "stage {index}: stages are cumulative, so each must be at least as large as the one before"
BAD_FAILURE_RATE = "max_failure_rate must be between 0 and 1"
BAD_APPLY_TIMEOUT = "apply_timeout_seconds must be at least 1"
BAD_MIN_REPORTING = "min_reporting must be at least 1"
CANDIDATE_NOT_OF_PACKAGE = "version {version!r} does not belong to package {name!r}"
PACKAGE_NOT_ASSIGNED = "package {name!r} is not assigned to any agent: nothing to roll out from"
PACKAGE_STABLE_AMBIGUOUS = (
    "package {name!r} is assigned at several versions ({versions}): a rollout moves agents from one version"
)
PACKAGE_CANDIDATE_IS_STABLE = "version {version!r} is already the version package {name!r} is assigned at"
PACKAGE_CANDIDATE_NO_FILE = "version {version!r} of package {name!r} has no file to install"


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


def _create(
    *,
    subject: dict[str, Any],
    stages: Sequence[StageSpec],
    actor: Actor,
    max_failure_rate: float,
    apply_timeout_seconds: float,
    min_reporting: int,
    auto_rollback: bool,
    salt: str | None,
    note: str,
) -> Rollout:
    """The draft rollout of either subject (`subject`: its Rollout fields)."""
    # The gate's settings, refused here so that every way in (API, admin, dashboard) refuses alike.
    if not 0 <= max_failure_rate <= 1:
        raise DomainError(BAD_FAILURE_RATE, field="max_failure_rate")
    if not apply_timeout_seconds >= 1:
        raise DomainError(BAD_APPLY_TIMEOUT, field="apply_timeout_seconds")
    if min_reporting < 1:
        raise DomainError(BAD_MIN_REPORTING, field="min_reporting")
    checked = _check_stages(stages)
    rollout = Rollout.objects.create(
        **subject,
        max_failure_rate=max_failure_rate,
        apply_timeout_seconds=apply_timeout_seconds,
        min_reporting=min_reporting,
        auto_rollback=auto_rollback,
        salt=salt or secrets.token_hex(16),
        note=note,
        created_by=actor_user(actor),
    )
    RolloutStage.objects.bulk_create([RolloutStage(rollout=rollout, **stage) for stage in checked])
    subject_of(rollout).bump()
    RolloutEvent.objects.create(
        rollout=rollout, kind=Kind.CREATED, to_state=RolloutState.DRAFT, actor=actor_user(actor)
    )
    named = {"package": rollout.subject_name} if rollout.is_package else {"configuration": rollout.subject_name}
    candidate: Any = (
        rollout.candidate_package_version.version if rollout.is_package else rollout.candidate_version.number
    )
    audit_record(
        actor=actor,
        action="rollout.create",
        target=rollout,
        details={**named, "candidate": candidate, "stages": checked},
    )
    return rollout


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
    return _create(
        subject={
            "configuration": configuration,
            "stable_version": configuration.current_version,
            "candidate_version": candidate,
        },
        stages=stages,
        actor=actor,
        max_failure_rate=max_failure_rate,
        apply_timeout_seconds=apply_timeout_seconds,
        min_reporting=min_reporting,
        auto_rollback=auto_rollback,
        salt=salt,
        note=note,
    )


def package_stable_version(package: Package) -> PackageVersion:
    """The version the package's assignments give: the one a rollout moves agents from."""
    versions = list(
        PackageVersion.objects.filter(
            pk__in=PackageAssignment.objects.filter(package=package).values("version_id")
        ).order_by("version")
    )
    if not versions:
        raise DomainError(PACKAGE_NOT_ASSIGNED.format(name=package.name), field="package")
    if len(versions) > 1:
        listed = ", ".join(version.version for version in versions)
        raise DomainError(PACKAGE_STABLE_AMBIGUOUS.format(name=package.name, versions=listed), field="package")
    return versions[0]


@transaction.atomic
def package_rollout_create(
    *,
    package: Package,
    candidate: PackageVersion,
    stages: Sequence[StageSpec],
    actor: Actor,
    max_failure_rate: float = 0.001,
    apply_timeout_seconds: float = 300.0,
    min_reporting: int = 1,
    auto_rollback: bool = True,
    salt: str | None = None,
    note: str = "",
) -> Rollout:
    """A draft rollout of a package from the version its assignments give to `candidate`."""
    package = Package.objects.select_for_update().get(pk=package.pk)
    if candidate.package_id != package.pk:
        raise DomainError(CANDIDATE_NOT_OF_PACKAGE.format(version=candidate.version, name=package.name))
    stable = package_stable_version(package)
    if stable.pk == candidate.pk:
        raise DomainError(PACKAGE_CANDIDATE_IS_STABLE.format(version=candidate.version, name=package.name))
    if not candidate.files.exists():
        raise DomainError(PACKAGE_CANDIDATE_NO_FILE.format(version=candidate.version, name=package.name))
    return _create(
        subject={"package": package, "stable_package_version": stable, "candidate_package_version": candidate},
        stages=stages,
        actor=actor,
        max_failure_rate=max_failure_rate,
        apply_timeout_seconds=apply_timeout_seconds,
        min_reporting=min_reporting,
        auto_rollback=auto_rollback,
        salt=salt,
        note=note,
    )


# --- cohorts -------------------------------------------------------------------------------


def stage_thresholds(
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
    *,
    configuration: Configuration | None = None,
    package: Package | None = None,
    stages: Sequence[StageSpec],
    salt: str | None = None,
    sample: int = 20,
) -> DryRun:
    """Which agents each stage would take if the rollout of the configuration or the
    package started now (nothing is saved)."""
    checked = _check_stages(stages)
    salt = salt or secrets.token_hex(16)
    unsaved = [RolloutStage(**{k: v for k, v in stage.items()}) for stage in checked]
    if package is not None:
        subject = Rollout(package=package, stable_package_version=package_stable_version(package))
    else:
        subject = Rollout(configuration=configuration)
    population = subject_of(subject).population()
    plans = _stage_plans(unsaved, stage_thresholds(unsaved, salt, population))
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
