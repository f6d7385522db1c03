"""What agents report about a package, counted per version (the package API's summary).

Read from the PackageStatuses each agent last reported (`Agent.package_statuses`, stored by
fleet.reports). An installed package counts for the version the agent has; a pending,
downloading, installing or failed one for the version the server offered.
"""

from __future__ import annotations

from typing import Any

from fleet.models import Agent

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


def package_status_summary(package: str) -> dict[str, dict[str, int]]:
    """version -> {installed, pending, downloading, installing, failed}: agent counts."""
    summary: dict[str, dict[str, int]] = {}
    reports = (
        Agent.objects.filter(package_statuses__packages__has_key=package)
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
