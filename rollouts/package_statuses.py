"""What agents report about a package, counted per version (the package API's summary, and
a package rollout's page and admin).

Read from the PackageStatuses each agent last reported (`Agent.package_statuses`, stored by
fleet.reports). An installed package counts for the version the agent has; a pending,
downloading, installing or failed one for the version the server offered.
"""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from fleet.models import Agent
from rollouts.models import Rollout

STATES = {
    "Installed": "installed",
    "InstallPending": "pending",
    "Downloading": "downloading",
    "Installing": "installing",
    "InstallFailed": "failed",
}
COUNTED = tuple(STATES.values())


def _empty() -> dict[str, int]:
    return dict.fromkeys(COUNTED, 0)


def package_status_summary(package: str, agents: QuerySet[Agent] | None = None) -> dict[str, dict[str, int]]:
    """version -> {installed, pending, downloading, installing, failed}: counts of `agents`
    (every agent by default)."""
    summary: dict[str, dict[str, int]] = {}
    reports = (
        (Agent.objects.all() if agents is None else agents)
        .filter(package_statuses__packages__has_key=package)
        .values_list("package_statuses", flat=True)
        .iterator(chunk_size=2000)
    )
    for document in reports:
        entry: Any = ((document or {}).get("packages") or {}).get(package)
        if not isinstance(entry, dict):
            continue
        state = STATES.get(str(entry.get("status", "")))
        if state is None:
            continue
        version_key = "agent_has_version" if state == "installed" else "server_offered_version"
        version = str(entry.get(version_key) or "")
        summary.setdefault(version, _empty())[state] += 1
    return summary


def rollout_package_statuses(rollout: Rollout) -> dict[str, dict[str, int]]:
    """Of the agents a package rollout gave the candidate (its targets): the counts of the
    candidate version, then of the stable one (where a rollback brings them back)."""
    assert rollout.package is not None
    assert rollout.candidate_package_version is not None and rollout.stable_package_version is not None
    summary = package_status_summary(rollout.package.name, Agent.objects.filter(rollout_targets__rollout=rollout))
    versions = (rollout.candidate_package_version.version, rollout.stable_package_version.version)
    return {version: summary.get(version, _empty()) for version in versions}
