"""A package rollout's answers: what agents report in their PackageStatuses about the
candidate version, recorded on their target rows of the active package rollout, as a
configuration rollout's answers are (rollout_services.answers.record_answers).

Recorded from every batch of status reports in one statement (fleet.services.write_statuses
calls the packages fleet extension in the transaction that stores the statuses), so the
answer outlives the status: a rollback reinstalls the stable version, the agent's
PackageStatus then says Installed 1.0, and its target still says it failed 2.0, and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from fleet.db import bulk_update_from_unnest
from fleet.services import PackageStatusesReport
from rollouts.models import ACTIVE_ROLLOUT_STATES, Package, PackageVersion, Rollout, RolloutTarget
from rollouts.package_offers import INSTALL_FAILED, INSTALLED

# A package status that answers an offer: the version field it is about, and the answer.
# (Pending, downloading and installing answer nothing yet; a failure stays recorded until
# the agent reports the candidate installed.)
PACKAGE_ANSWERS = {
    INSTALLED: ("agent_has_version", "applied"),
    INSTALL_FAILED: ("server_offered_version", "failed"),
}


@dataclass(frozen=True)
class PackageAnswer:
    agent_id: int
    package: str
    version: str
    answer: str
    error: str
    at: datetime


def package_answers(reports: Sequence[PackageStatusesReport]) -> list[PackageAnswer]:
    """Every package an agent reported installed or failed, with the version it is about."""
    found = []
    for report in reports:
        packages = report.statuses.get("packages")
        for name, entry in (packages if isinstance(packages, dict) else {}).items():
            known = PACKAGE_ANSWERS.get(str(entry.get("status", ""))) if isinstance(entry, dict) else None
            if known is None:
                continue
            version_field, answer = known
            error = str(entry.get("error_message") or "") if answer == "failed" else ""
            version = str(entry.get(version_field) or "")
            found.append(PackageAnswer(report.agent_id, str(name), version, answer, error[:2000], report.at))
    return found


_PACKAGE_ANSWERS_SQL = """
    UPDATE {targets} AS t SET answer = v.answer, answered_at = v.at, error = v.error
    FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::text[])
        AS v(agent_id, package, version, answer, at, error),
        {rollouts} AS r, {packages} AS p, {versions} AS pv
    WHERE t.agent_id = v.agent_id AND r.id = t.rollout_id AND r.state = ANY(%s::text[])
        AND p.id = r.package_id AND p.name = v.package
        AND pv.id = r.candidate_package_version_id AND pv.version = v.version
        AND t.answer IS DISTINCT FROM v.answer
"""


def record_package_answers(reports: Sequence[PackageStatusesReport]) -> int:
    """Note what agents reported about an active package rollout's candidate on their target
    rows: one statement on PostgreSQL for any number of reports. Statuses about another
    version (the stable one a rollback reinstalls) or package, or that repeat the recorded
    answer, change nothing."""
    rows = package_answers(reports)
    if not rows:
        return 0
    columns = [
        [row.agent_id for row in rows],
        [row.package for row in rows],
        [row.version for row in rows],
        [row.answer for row in rows],
        [row.at for row in rows],
        [row.error for row in rows],
        [str(state) for state in ACTIVE_ROLLOUT_STATES],
    ]
    sql = _PACKAGE_ANSWERS_SQL.format(
        targets=RolloutTarget._meta.db_table,
        rollouts=Rollout._meta.db_table,
        packages=Package._meta.db_table,
        versions=PackageVersion._meta.db_table,
    )
    return bulk_update_from_unnest([sql], columns, fallback=lambda: _record_package_answers_orm(rows))


def _record_package_answers_orm(rows: Sequence[PackageAnswer]) -> int:
    noted = 0
    for row in rows:
        noted += (
            RolloutTarget.objects.filter(
                agent_id=row.agent_id,
                rollout__state__in=ACTIVE_ROLLOUT_STATES,
                rollout__package__name=row.package,
                rollout__candidate_package_version__version=row.version,
            )
            .exclude(answer=row.answer)
            .update(answer=row.answer, answered_at=row.at, error=row.error)
        )
    return noted
