"""How feature apps plug into the fleet without the fleet importing them.

`fleet` sits below every feature app (signing, rollouts, packages): it may not import
them, yet some of its writes concern them (an agent's labels decide its desired
configuration; the agent API filters by what rollouts know). Each feature app registers a
`FleetExtension` in its `AppConfig.ready()`; fleet calls every registered extension, in
registration order (the order of INSTALLED_APPS), at the points named by the hooks.
A hook runs inside the caller's transaction unless it says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from django.db.models import QuerySet

    from fleet.models import Agent

# An agent-list filter an extension adds to the API: (queryset, value) -> queryset.
AgentQueryFilter = Callable[["QuerySet[Agent]", bool], "QuerySet[Agent]"]


class FleetExtension:
    """Override the hooks that apply; every default does nothing."""

    name = "extension"

    def before_labels_change(self, *, agent: Agent, new_labels: Mapping[str, str]) -> None:
        """An agent's merged labels are about to become `new_labels`; called before the
        agent's row is locked (an extension may need its own locks taken first)."""

    def labels_changed(self, *, agent: Agent) -> None:
        """An agent's labels changed (the row is saved, the transaction still open)."""

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
