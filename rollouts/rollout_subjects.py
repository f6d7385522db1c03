"""What a rollout moves, and what differs between its two kinds of subject.

One rollout engine (rollouts.rollout_services: creation, verbs, gate, answers) moves agents
from a stable to a candidate version for either subject:

- a configuration (`Rollout.configuration`, versions `stable_version` / `candidate_version`):
  the resolver gives each agent its version (rollouts.desired_state, which also records the
  rollout targets), signed anew before agents are moved; an agent's answer is its remote
  config status for the candidate's hash; success makes the candidate the configuration's
  current version;
- a package (`Rollout.package`, `stable_package_version` / `candidate_package_version`):
  agents whose package assignment gives them the stable version are the population; the
  desired package sets put the candidate in the set of agents in started stages
  (rollouts.package_offers.PackageRollout), the targets are recorded here; an agent's answer
  is what its PackageStatus said of the candidate, recorded on its target
  (rollouts.package_answers): Installed a success, InstallFailed a failure; Installed with
  the stable version again is reverted; success moves the assignments that gave the stable
  version to the candidate.

The engine asks `subject_of(rollout)` and never looks at the subject's fields itself.
"""

from __future__ import annotations

import functools
import operator
from abc import ABC, abstractmethod
from datetime import datetime

from django.db.models import Case, F, Q, QuerySet, TextField, Value, When
from django.db.models.fields.json import KeyTextTransform, KeyTransform
from django.db.models.functions import Coalesce
from django.db.models.lookups import Exact
from django.utils import timezone

from fleet.label_selectors.parsing import parse_selector
from fleet.models import Agent, RemoteConfigState
from fleet.selector_queries import selector_q
from fleet.services import PackageStatusesReport
from rollouts import desired_state
from rollouts.config_signings import config_version_sign_for_delivery
from rollouts.models import (
    ACTIVE_ROLLOUT_STATES,
    Configuration,
    Package,
    PackageAssignment,
    Rollout,
    RolloutState,
    RolloutTarget,
)
from rollouts.package_answers import record_package_answers
from rollouts.package_assignments import agent_package_facts, bump_packages, hint_agents, package_definitions
from rollouts.package_offers import INSTALL_FAILED, INSTALLED
from rollouts.packages import package_assignment_update
from rollouts.resolver_cache import bump_definitions
from rollouts.rollout_plans import plan_of

# (id, instance uid bytes, labels) of an agent a rollout can move.
Member = tuple[int, bytes, dict[str, str]]

# The answers a package target records (rollouts.package_answers): "applying" is not one.
RECORDED = ("applied", "failed")


class RolloutSubject(ABC):
    """The subject-specific half of a rollout; `rollout` is the row the engine holds."""

    def __init__(self, rollout: Rollout) -> None:
        self.rollout = rollout

    @abstractmethod
    def lock(self) -> None:
        """The subject's row lock, taken first by every transition."""

    @abstractmethod
    def other_active(self) -> Rollout | None:
        """Another active rollout of the same subject (at most one may be active)."""

    @abstractmethod
    def population(self) -> list[Member]:
        """The agents the rollout moves, ordered by id."""

    def population_size(self) -> int:
        return len(self.population())

    @abstractmethod
    def bump(self) -> None:
        """Tell every process that the rollout's plan changed (its thresholds, its state)."""

    @abstractmethod
    def deliver(self, *, rolling_back: bool, kind: str) -> None:
        """After a transition: give every agent what the rollout now says it runs."""

    @abstractmethod
    def adopt_candidate(self) -> None:
        """The rollout succeeded: the candidate is what every matching agent runs from now on."""

    @abstractmethod
    def moved_on(self) -> bool:
        """The subject no longer runs the rollout's stable version (a retry would be stale)."""

    @abstractmethod
    def outcomes(self) -> tuple[Q, Q, Q]:
        """On a RolloutTarget: (healthy success, unhealthy success, failure) with the candidate."""

    @abstractmethod
    def reverted(self) -> Q:
        """On a RolloutTarget: the agent runs the stable version again."""

    @abstractmethod
    def failed_targets(self) -> QuerySet[RolloutTarget]:
        """The rollout's targets whose agent failed on the candidate, each annotated with
        `failure`: the error the agent gave."""

    def refresh_targets(self, now: datetime) -> list[int]:
        """Record the targets of agents in started stages that have none yet (the resolver
        records a configuration's); the ids of the agents in started stages."""
        return []


class ConfigurationSubject(RolloutSubject):
    def lock(self) -> None:
        # The signing sequence is allocated under this lock; taking it before anything else
        # keeps the lock order of configuration_publish (configuration, then the generation).
        Configuration.objects.select_for_update().filter(pk=self.rollout.configuration_id).values_list("pk").first()

    def other_active(self) -> Rollout | None:
        return (
            Rollout.objects.filter(configuration_id=self.rollout.configuration_id, state__in=ACTIVE_ROLLOUT_STATES)
            .exclude(pk=self.rollout.pk)
            .first()
        )

    def population(self) -> list[Member]:
        rows = (
            Agent.objects.filter(desired_config__configuration_id=self.rollout.configuration_id)
            .values_list("id", "instance_uid", "labels")
            .order_by("id")
        )
        return [(agent_id, uid.bytes, labels or {}) for agent_id, uid, labels in rows]

    def population_size(self) -> int:
        return Agent.objects.filter(desired_config__configuration_id=self.rollout.configuration_id).count()

    def bump(self) -> None:
        bump_definitions()

    def deliver(self, *, rolling_back: bool, kind: str) -> None:
        rollout = self.rollout
        version_id = rollout.stable_version_id if rolling_back else rollout.candidate_version_id
        assert version_id is not None and rollout.configuration is not None
        # Its delivered signing must be newer than any the agents run, or signing agents
        # refuse going back to the stable content as a replay.
        config_version_sign_for_delivery(version_id=version_id, detail=f"rollout {rollout.pk}: {kind}")
        desired_state.resolve_for_configuration(rollout.configuration)

    def adopt_candidate(self) -> None:
        rollout = self.rollout
        assert rollout.candidate_version_id is not None and rollout.configuration is not None
        config_version_sign_for_delivery(
            version_id=rollout.candidate_version_id, detail=f"rollout {rollout.pk}: succeeded"
        )
        Configuration.objects.filter(pk=rollout.configuration_id).update(
            current_version=rollout.candidate_version_id, updated_at=timezone.now()
        )
        bump_definitions()
        desired_state.resolve_for_configuration(rollout.configuration)

    def moved_on(self) -> bool:
        current = Configuration.objects.filter(pk=self.rollout.configuration_id).values_list(
            "current_version_id", flat=True
        )
        return current.first() != self.rollout.stable_version_id

    def outcomes(self) -> tuple[Q, Q, Q]:
        rollout = self.rollout
        assert rollout.candidate_version is not None
        on_candidate = Q(agent__remote_config_hash=rollout.candidate_version.config_hash)
        applied = on_candidate & Q(agent__remote_config_state=RemoteConfigState.APPLIED)
        failed = on_candidate & Q(agent__remote_config_state=RemoteConfigState.FAILED)
        return applied & ~Q(agent__healthy=False), applied & Q(agent__healthy=False), failed

    def reverted(self) -> Q:
        assert self.rollout.stable_version is not None
        return Q(agent__remote_config_hash=self.rollout.stable_version.config_hash) & Q(
            agent__remote_config_state=RemoteConfigState.APPLIED
        )

    def failed_targets(self) -> QuerySet[RolloutTarget]:
        # The answer recorded on the target, not the agent's current state: it stays after
        # an automatic rollback has moved the agent back to the stable version.
        return RolloutTarget.objects.filter(rollout=self.rollout, answer="failed").annotate(failure=F("error"))


def _reported(name: str, field: str, prefix: str) -> Coalesce:
    """The text of `field` in the agent's last PackageStatus for package `name` (any name:
    a key transform, never a lookup path split on '__'), '' when the agent reported none:
    a NULL would make both a condition and its negation false, so the gate would count an
    agent with no status neither answered nor pending."""
    return Coalesce(
        KeyTextTransform(field, KeyTransform(name, KeyTransform("packages", f"{prefix}package_statuses"))),
        Value(""),
        output_field=TextField(),
    )


class PackageSubject(RolloutSubject):
    @property
    def package(self) -> Package:
        package = self.rollout.package
        assert package is not None
        return package

    def lock(self) -> None:
        Package.objects.select_for_update().filter(pk=self.rollout.package_id).values_list("pk").first()

    def other_active(self) -> Rollout | None:
        return (
            Rollout.objects.filter(package_id=self.rollout.package_id, state__in=ACTIVE_ROLLOUT_STATES)
            .exclude(pk=self.rollout.pk)
            .first()
        )

    def population(self) -> list[Member]:
        """Agents an assignment gives the stable version of the package (outside any rollout)."""
        stable_id = self.rollout.stable_package_version_id
        selectors = [
            selector_q(parse_selector(selector))
            for selector in PackageAssignment.objects.filter(package_id=self.rollout.package_id).values_list(
                "selector", flat=True
            )
        ]
        if not selectors:
            return []
        ids = list(Agent.objects.filter(functools.reduce(operator.or_, selectors)).values_list("id", flat=True))
        definitions = package_definitions()
        name = self.package.name
        members = []
        for agent_id, facts in sorted(agent_package_facts(ids).items()):
            wanted = facts.desired(definitions, with_rollouts=False).packages.get(name)
            if wanted is not None and wanted.version_id == stable_id:
                members.append((agent_id, facts.instance_uid.bytes, facts.labels))
        return members

    def bump(self) -> None:
        bump_packages()

    def deliver(self, *, rolling_back: bool, kind: str) -> None:
        # Every process recomputes the sets from the rollout's plan when the token moves;
        # the agents it moves are hinted to look now.
        bump_packages()
        if rolling_back:
            hint_agents(self.rollout.targets.values_list("agent_id", flat=True))
        else:
            hint_agents(self.refresh_targets(timezone.now()))

    def refresh_targets(self, now: datetime) -> list[int]:
        """Record the targets of agents in started stages that have none; every target's id."""
        rollout = Rollout.objects.prefetch_related("stages").get(pk=self.rollout.pk)
        if rollout.state not in (RolloutState.RUNNING, RolloutState.PAUSED):
            return []
        plan = plan_of(rollout)
        targets = []
        for agent_id, uid, labels in self.population():
            _, cohort, bucket = plan.version_for(uid, labels)
            if cohort is not None:
                targets.append(desired_state.TargetRow(rollout.pk, agent_id, cohort, bucket, ""))
        desired_state.record_targets(targets, now)
        self._record_missed_answers(now)
        return [target.agent_id for target in targets]

    def _record_missed_answers(self, now: datetime) -> None:
        """Record the answers the reports could not: an agent that joined a started stage
        (new, or relabelled) is offered the candidate as soon as its process recomputes its
        set, and may report before the tick records its target. Read from the statuses
        stored on the agents, for targets with no answer of their own (normally none)."""
        installed, failed = self._reported_outcomes()
        missed = (
            RolloutTarget.objects.filter(installed | failed, rollout=self.rollout)
            .exclude(answer__in=RECORDED)
            .values_list("agent_id", "agent__package_statuses")
        )
        record_package_answers([PackageStatusesReport(agent_id, statuses, now) for agent_id, statuses in missed])

    def adopt_candidate(self) -> None:
        rollout = self.rollout
        assert rollout.candidate_package_version is not None
        for assignment in PackageAssignment.objects.filter(
            package_id=rollout.package_id, version_id=rollout.stable_package_version_id
        ):
            package_assignment_update(
                assignment=assignment, actor=None, version=rollout.candidate_package_version.version
            )
        bump_packages()

    def moved_on(self) -> bool:
        return not PackageAssignment.objects.filter(
            package_id=self.rollout.package_id, version_id=self.rollout.stable_package_version_id
        ).exists()

    def _status(self, status: str, version_field: str, version: str) -> Q:
        name, prefix = self.package.name, "agent__"
        return Q(Exact(_reported(name, "status", prefix), status)) & Q(
            Exact(_reported(name, version_field, prefix), version)
        )

    def _reported_outcomes(self) -> tuple[Q, Q]:
        """(installed, failed) with the candidate, as the agent's last PackageStatus says."""
        candidate = self.rollout.candidate_package_version
        assert candidate is not None
        installed = self._status(INSTALLED, "agent_has_version", candidate.version)
        failed = self._status(INSTALL_FAILED, "server_offered_version", candidate.version)
        return installed, failed

    def outcomes(self) -> tuple[Q, Q, Q]:
        # The answer recorded on the target, which a rollback does not erase; for a target
        # with none yet (its agent reported before the target was recorded), the agent's
        # last PackageStatus. A row matches one of the two sources, so nothing counts twice.
        reported_installed, reported_failed = self._reported_outcomes()
        unrecorded = ~Q(answer__in=RECORDED)
        installed = Q(answer="applied") | (unrecorded & reported_installed)
        failed = Q(answer="failed") | (unrecorded & reported_failed)
        return installed & ~Q(agent__healthy=False), installed & Q(agent__healthy=False), failed

    def reverted(self) -> Q:
        stable = self.rollout.stable_package_version
        assert stable is not None
        return self._status(INSTALLED, "agent_has_version", stable.version)

    def failed_targets(self) -> QuerySet[RolloutTarget]:
        # The failures `outcomes` counts, with the error recorded with the answer (or, not
        # yet recorded, the one in the agent's status): still listed after a rollback has
        # reinstalled the stable version on those agents.
        _, _, failed = self.outcomes()
        error = Case(
            When(answer="failed", then=F("error")),
            default=_reported(self.package.name, "error_message", "agent__"),
            output_field=TextField(),
        )
        return RolloutTarget.objects.filter(failed, rollout=self.rollout).annotate(failure=error)


def subject_of(rollout: Rollout) -> RolloutSubject:
    return PackageSubject(rollout) if rollout.package_id is not None else ConfigurationSubject(rollout)
