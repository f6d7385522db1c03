"""How feature apps plug into the fleet without the fleet importing them.

`fleet` sits below every feature app (signing, rollouts, packages): it may not import
them, yet some of its writes concern them (an agent's labels decide its desired
configuration; the agent API filters by what rollouts know), and the OpAMP session
answers agents with what they hold (a remote config, a certificate). Each feature app
registers a `FleetExtension` in its `AppConfig.ready()`; fleet calls every registered
extension, in registration order (the order of INSTALLED_APPS), at the points named by the
hooks. A hook runs inside the caller's transaction unless it says otherwise.

Two of the hooks hand the fleet objects rather than being called at a point:
`session_contributor` (the extension's part in each server process's OpAMP sessions,
fleet.session_contributor) and `credential_authority` (who checks agent credentials,
fleet.credentials; at most one extension gives one).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from django.db.models import QuerySet

    from fleet.credentials import CredentialAuthority
    from fleet.models import Agent
    from fleet.services import PackageStatusesReport, RemoteConfigAnswer
    from fleet.session_contributor import SessionContributor
    from fleet.session_runtime import FleetRuntime

# An agent-list filter an extension adds to the API: (queryset, value) -> queryset.
AgentQueryFilter = Callable[["QuerySet[Agent]", bool], "QuerySet[Agent]"]


class FleetExtension:
    """Override the hooks that apply; every default does nothing."""

    name = "extension"

    def before_labels_change(self, *, agent: Agent, new_labels: Mapping[str, str]) -> None:
        """An agent's merged labels are about to become `new_labels`; called before the
        agent's row is locked (an extension may need its own locks taken first)."""

    def labels_changed(self, *, agent: Agent) -> None:
        """An agent's labels changed (the row is saved, the transaction still open): set by
        an operator, or by a report that changed the attributes labels are made of."""

    def agent_inventoried(self, *, agent: Agent) -> None:
        """A new agent's first report created its row; called last in that transaction, so
        the reply to the report can carry what the agent should get."""

    def remote_config_answered(self, answers: Sequence[RemoteConfigAnswer]) -> None:
        """Agents' remote config statuses were stored (one report's, or a batch's)."""

    def package_statuses_reported(self, reports: Sequence[PackageStatusesReport]) -> None:
        """Agents' package statuses were stored (one report's, or a batch's; possibly none)."""

    def session_contributor(self, runtime: FleetRuntime) -> SessionContributor | None:
        """This extension's part in the OpAMP sessions of a server process: called once per
        `FleetRuntime` (fleet.session_runtime), whose per-process state it may keep."""
        return None

    def credential_authority(self) -> CredentialAuthority | None:
        """Who checks agent credentials, if this extension issues them."""
        return None

    def agent_filters(self) -> Mapping[str, AgentQueryFilter]:
        """Boolean filters of the agent API this extension answers, by query parameter."""
        return {}


_registered: list[FleetExtension] = []


def register(extension: FleetExtension) -> None:
    """Called from an AppConfig.ready(); registering the same extension twice is a no-op."""
    if not any(type(existing) is type(extension) for existing in _registered):
        _registered.append(extension)


def registered() -> tuple[FleetExtension, ...]:
    return tuple(_registered)


def agent_filter(name: str) -> AgentQueryFilter | None:
    for extension in _registered:
        found = extension.agent_filters().get(name)
        if found is not None:
            return found
    return None


def labels_changing(*, agent: Agent, new_labels: Mapping[str, str]) -> None:
    for extension in _registered:
        extension.before_labels_change(agent=agent, new_labels=new_labels)


def labels_changed(*, agent: Agent) -> None:
    for extension in _registered:
        extension.labels_changed(agent=agent)


def agent_inventoried(*, agent: Agent) -> None:
    for extension in _registered:
        extension.agent_inventoried(agent=agent)


def remote_config_answered(answers: Sequence[RemoteConfigAnswer]) -> None:
    for extension in _registered:
        extension.remote_config_answered(answers)


def package_statuses_reported(reports: Sequence[PackageStatusesReport]) -> None:
    for extension in _registered:
        extension.package_statuses_reported(reports)


def session_contributors(runtime: FleetRuntime) -> tuple[SessionContributor, ...]:
    """The contributors of a new FleetRuntime, in registration order."""
    made = (extension.session_contributor(runtime) for extension in _registered)
    return tuple(contributor for contributor in made if contributor is not None)


def credential_authority() -> CredentialAuthority | None:
    """The registered authority, or None (fleet.credentials: agents are then anonymous)."""
    for extension in _registered:
        authority = extension.credential_authority()
        if authority is not None:
            return authority
    return None
