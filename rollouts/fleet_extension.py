"""What rollouts plug into the fleet (registered in `RolloutsConfig.ready`): an agent's
labels decide its desired configuration, its remote config and package statuses answer
rollouts, the agent API filters by drift from it, and the OpAMP session offers it
(rollouts.session_contributor)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from django.db.models import QuerySet

from fleet.extensions import AgentQueryFilter, FleetExtension
from fleet.models import Agent
from fleet.services import PackageStatusesReport, RemoteConfigAnswer
from fleet.session_contributor import SessionContributor
from fleet.session_runtime import FleetRuntime
from rollouts import desired_state, selectors
from rollouts.config_signings import config_version_sign_for_delivery
from rollouts.models import AgentDesiredConfig
from rollouts.package_answers import record_package_answers
from rollouts.package_contributor import PackagesContributor
from rollouts.resolver_cache import resolver_definitions
from rollouts.rollout_services.answers import record_answers
from rollouts.session_contributor import RemoteConfigContributor


def _sign_for_label_move(*, agent: Agent, new_labels: Mapping[str, str]) -> None:
    """When new labels move an agent to another version of a configuration (out of a
    rollout's first stage, say), that version's delivered signing must be the newest of the
    configuration, or an agent that verifies signatures refuses it as a replay.

    Done before the agent's row is locked, so the configuration's lock comes first, as in
    publishing and every rollout transition. A concurrent change that moves the agent
    differently signs for its own move.
    """
    definitions = resolver_definitions()
    labels = dict(new_labels)
    configuration = desired_state.choose_configuration(labels, definitions.candidates)
    if configuration is None:
        return
    version_id, _ = desired_state.version_for_agent(
        configuration, agent_id=agent.pk, instance_uid=agent.instance_uid, labels=labels, plans=definitions.plans
    )
    current = AgentDesiredConfig.objects.filter(agent_id=agent.pk).values_list("version_id", flat=True).first()
    if current is None or current == version_id:
        return  # not moved (a first assignment has no signing to be newer than)
    config_version_sign_for_delivery(version_id=version_id, detail=f"agent {agent.instance_uid}: labels changed")


def _drift(queryset: QuerySet[Agent], value: bool) -> QuerySet[Agent]:
    drifting = selectors.drifting_agents().values("pk")
    return queryset.filter(pk__in=drifting) if value else queryset.exclude(pk__in=drifting)


class RolloutsFleetExtension(FleetExtension):
    name = "rollouts"

    def before_labels_change(self, *, agent: Agent, new_labels: Mapping[str, str]) -> None:
        _sign_for_label_move(agent=agent, new_labels=new_labels)

    def labels_changed(self, *, agent: Agent) -> None:
        desired_state.resolve_agent(agent.pk)

    def agent_inventoried(self, *, agent: Agent) -> None:
        desired_state.resolve_new_agent(agent_id=agent.pk, instance_uid=agent.instance_uid, labels=agent.labels)

    def remote_config_answered(self, answers: Sequence[RemoteConfigAnswer]) -> None:
        record_answers(answers)

    def session_contributor(self, runtime: FleetRuntime) -> SessionContributor:
        return RemoteConfigContributor(runtime)

    def agent_filters(self) -> Mapping[str, AgentQueryFilter]:
        return {"drift": _drift}


class PackagesFleetExtension(FleetExtension):
    """Packages in the session (rollouts.package_contributor). An agent's package set
    follows its labels: a change of them is logged on the desired-state change log, which
    every process follows to forget that agent's facts (a label set by an operator is
    written by another process than the one serving the agent)."""

    name = "packages"

    def package_statuses_reported(self, reports: Sequence[PackageStatusesReport]) -> None:
        record_package_answers(reports)

    def labels_changed(self, *, agent: Agent) -> None:
        desired_state.log_changes([agent.pk])

    def session_contributor(self, runtime: FleetRuntime) -> SessionContributor:
        return PackagesContributor(runtime)
