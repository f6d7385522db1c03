"""Read functions for configurations (the house split: `services` write, `selectors` read):
versions, per-version status counts, per-agent config state, drift, a selector's preview and
version diffs. Label selectors themselves are `fleet.label_selectors`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from django.db.models import Count, F, Q, QuerySet

from fleet.label_selectors.parsing import parse_selector
from fleet.models import Agent, RemoteConfigState
from fleet.selector_queries import selector_q
from fleet.selectors import agent_list, counts_by, presence_q
from rollouts.models import AgentDesiredConfig, Configuration, ConfigVersion


def configuration_list() -> QuerySet[Configuration]:
    return Configuration.objects.select_related("current_version").annotate(agent_count=Count("assignments"))


def version_list(configuration: Configuration) -> QuerySet[ConfigVersion]:
    return configuration.versions.select_related("author", "rolled_back_from").order_by("-number")


def version_status_counts(version: ConfigVersion) -> dict[str, int]:
    """How the agents that should run `version` are doing, in one aggregate query.

    applied / applying / failed: the agent reported that state for this version's hash.
    offline: no such report and the agent is offline. pending: everything else.
    """
    on_hash = Q(agent__remote_config_hash=version.config_hash)
    present = presence_q(prefix="agent__")
    reported = on_hash & Q(
        agent__remote_config_state__in=[
            RemoteConfigState.APPLIED,
            RemoteConfigState.APPLYING,
            RemoteConfigState.FAILED,
        ]
    )
    counts = AgentDesiredConfig.objects.filter(version=version).aggregate(
        total=Count("pk"),
        applied=Count("pk", filter=on_hash & Q(agent__remote_config_state=RemoteConfigState.APPLIED)),
        applying=Count("pk", filter=on_hash & Q(agent__remote_config_state=RemoteConfigState.APPLYING)),
        failed=Count("pk", filter=on_hash & Q(agent__remote_config_state=RemoteConfigState.FAILED)),
        offline=Count("pk", filter=~reported & ~present),
    )
    counts["pending"] = counts["total"] - sum(counts[s] for s in ("applied", "applying", "failed", "offline"))
    return counts


@dataclass(frozen=True)
class AgentConfigState:
    configuration: str | None
    desired_version: int | None
    desired_hash: str
    reported_hash: str
    state: str  # applied / applying / failed / pending / none
    error: str
    effective_hash: str
    drift: bool
    summary: str


def agent_config_state(agent: Agent) -> AgentConfigState:
    """The agent's remote-config picture, e.g. "failed on version 3: unknown receiver"."""
    desired = AgentDesiredConfig.objects.select_related("version", "configuration").filter(agent=agent).first()
    reported_state = RemoteConfigState(agent.remote_config_state)
    if desired is None:
        return AgentConfigState(
            configuration=None,
            desired_version=None,
            desired_hash="",
            reported_hash=agent.remote_config_hash,
            state="none",
            error=agent.remote_config_error,
            effective_hash=agent.effective_config_hash,
            drift=False,
            summary="no configuration selects this agent",
        )
    version = desired.version
    on_desired = agent.remote_config_hash == version.config_hash
    if on_desired and reported_state in (
        RemoteConfigState.APPLIED,
        RemoteConfigState.APPLYING,
        RemoteConfigState.FAILED,
    ):
        state = reported_state.label
    else:
        state = "pending"
    drift = bool(agent.effective_config_hash) and agent.effective_config_hash != version.config_hash
    summaries = {
        "applied": f"applied version {version.number}",
        "applying": f"applying version {version.number}",
        "failed": f"failed on version {version.number}: {agent.remote_config_error or 'no error given'}",
        "pending": f"version {version.number} not yet applied",
    }
    return AgentConfigState(
        configuration=desired.configuration.name,
        desired_version=version.number,
        desired_hash=version.config_hash,
        reported_hash=agent.remote_config_hash,
        state=state,
        error=agent.remote_config_error if state == "failed" else "",
        effective_hash=agent.effective_config_hash,
        drift=drift,
        summary=summaries[state] + (" (effective config differs)" if drift else ""),
    )


def selector_preview(selector: Any, *, limit: int = 100) -> dict[str, Any]:
    """Which agents a selector picks: total, by status, and the first `limit` of them."""
    parsed = parse_selector(selector)
    agents = agent_list().filter(selector_q(parsed))
    by_status = counts_by(agents, "status")
    sample = list(agents.order_by("-last_seen")[:limit])
    return {
        "selector": parsed.to_dict(),
        "selector_string": parsed.to_string(),
        "count": sum(by_status.values()),
        "by_status": by_status,
        "agents": sample,
    }


def version_diff(older: ConfigVersion, newer: ConfigVersion) -> dict[str, str]:
    """Unified diff per file name; files only in one version diff against nothing."""
    diffs: dict[str, str] = {}
    for name in sorted(set(older.files) | set(newer.files)):
        before = older.files.get(name, {}).get("body", "")
        after = newer.files.get(name, {}).get("body", "")
        if before == after and older.files.get(name) == newer.files.get(name):
            continue
        diffs[name] = "".join(
            difflib.unified_diff(
                before.splitlines(keepends=True),
                after.splitlines(keepends=True),
                fromfile=f"v{older.number}/{name}" if name in older.files else "/dev/null",
                tofile=f"v{newer.number}/{name}" if name in newer.files else "/dev/null",
            )
        )
    return diffs


def drifting_agents() -> QuerySet[Agent]:
    """Agents whose reported effective config differs from their desired version."""
    return (
        Agent.objects.exclude(effective_config_hash="")
        .filter(desired_config__isnull=False)
        .exclude(effective_config_hash=F("desired_config__version__config_hash"))
    )
