"""A package rollout's answers are recorded on its targets from the agents' status reports,
in one statement per batch, and outlive the statuses: after a rollback has reinstalled the
stable version, the rollout still counts and lists the agents that failed, with their error."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from fleet.models import Agent
from fleet.reports import AgentReport
from fleet.services import AgentSnapshot, agent_record_report, agent_status_write, write_statuses
from rollouts.dashboard.progress import rollout_progress
from rollouts.models import Rollout, RolloutState, RolloutTarget
from rollouts.package_assignments import desired_packages_for_agents
from rollouts.rollout_services import answers
from rollouts.rollout_services.creation import StageSpec
from rollouts.rollout_services.gate import rollout_tick
from tests.rollouts.package_helpers import (  # noqa: F401
    collector_fleet,
    package_dir,
    package_statuses,
    report,
    started_package_rollout,
)

pytestmark = pytest.mark.django_db

AGENTS = 40
HASH_MISMATCH = "sha256 of the download does not match the offer"


@pytest.fixture
def fleet(package_dir) -> list[Agent]:  # noqa: F811
    return collector_fleet(AGENTS)


def started_rollout(fleet: list[Agent]) -> tuple[Rollout, list[Agent]]:
    """A running two-stage rollout of 2.0.0 (budget 5%) and the agents of its first stage."""
    rollout = started_package_rollout([StageSpec(percent=25), StageSpec(percent=100)], max_failure_rate=0.05)
    sets = desired_packages_for_agents([agent.pk for agent in fleet])
    first = [agent for agent in fleet if sets[agent.pk].packages["collector"].version == "2.0.0"]
    assert 1 < len(first) < AGENTS
    return rollout, first


def report_in_batch(reported: dict[Agent, dict[str, Any]]) -> None:
    """The agents' status reports through the session's batched path (one write_statuses)."""
    now = timezone.now()
    batch = {
        agent.pk: agent_status_write(
            snapshot=AgentSnapshot.of(agent),
            report=AgentReport(capabilities=agent.capabilities, package_statuses=document),
            sequence_num=1,
            seen_at=now,
        )
        for agent, document in reported.items()
    }
    assert write_statuses(batch) == len(reported)


def report_in_full(agent: Agent, document: dict[str, Any]) -> None:
    """One report through the full path (fleet.services.agent_record_report)."""
    agent_record_report(
        instance_uid=agent.instance_uid,
        report=AgentReport(capabilities=agent.capabilities, package_statuses=document),
        sequence_num=1,
        transport="websocket",
        remote_address="127.0.0.1",
        seen_at=timezone.now(),
    )


def test_a_rolled_back_package_rollout_still_lists_the_agent_that_failed_and_why(fleet):
    rollout, first = started_rollout(fleet)
    failing, rest = first[0], first[1:]
    report_in_full(failing, package_statuses("InstallFailed", has="1.0.0", offered="2.0.0", error=HASH_MISMATCH))
    report_in_batch({agent: package_statuses("Installed", has="2.0.0", offered="2.0.0") for agent in rest})
    assert rollout_tick(rollout_id=rollout.pk) == "rolling back"
    # The rollback reinstalls 1.0.0 everywhere; the failing agent's status no longer names 2.0.0.
    report_in_batch({agent: package_statuses("Installed", has="1.0.0", offered="1.0.0") for agent in first})
    assert rollout_tick(rollout_id=rollout.pk) == "rolled back"
    rollout.refresh_from_db()
    assert rollout.state == RolloutState.ROLLED_BACK

    progress = rollout_progress(rollout.pk)
    assert [(f.agent_id, f.error) for f in progress.failed_agents] == [(failing.pk, HASH_MISMATCH)]
    assert progress.failed_total == 1
    assert progress.stages[0].failed_answers == 1
    assert (progress.cumulative.failed, progress.cumulative.applied) == (1, len(rest))
    assert progress.failure_rate > progress.budget
    assert progress.rollback is not None and progress.rollback["reverted"] == len(first)


def test_the_answers_of_a_batch_of_package_reports_are_recorded_in_one_update(fleet):
    rollout, first = started_rollout(fleet)
    failing, rest = first[0], first[1:]
    reported = {agent: package_statuses("Installed", has="2.0.0", offered="2.0.0") for agent in rest}
    reported[failing] = package_statuses("InstallFailed", has="1.0.0", offered="2.0.0", error=HASH_MISMATCH)
    # Agents outside the rollout report the stable version: not an answer to it.
    outside = [agent for agent in fleet if agent not in first][:5]
    reported.update({agent: package_statuses("Installed", has="1.0.0", offered="1.0.0") for agent in outside})
    targets = RolloutTarget._meta.db_table
    with CaptureQueriesContext(connection) as queries:
        report_in_batch(reported)
    updates = [q["sql"] for q in queries.captured_queries if q["sql"].lstrip().upper().startswith("UPDATE")]
    # One statement on PostgreSQL; SQLite, with no arrays, takes the ORM fallback (one per report).
    expected = 1 if connection.vendor == "postgresql" else len(reported)
    assert len([sql for sql in updates if f'"{targets}"' in sql or f" {targets} " in sql]) == expected
    recorded = dict(RolloutTarget.objects.filter(rollout=rollout).values_list("agent_id", "answer"))
    assert recorded == {failing.pk: "failed", **{agent.pk: "applied" for agent in rest}}
    assert RolloutTarget.objects.get(rollout=rollout, agent=failing).error == HASH_MISMATCH
    # The same statuses again change no row (a changed one would take the new time).
    answered = dict(RolloutTarget.objects.filter(rollout=rollout).values_list("agent_id", "answered_at"))
    report_in_batch(reported)
    assert dict(RolloutTarget.objects.filter(rollout=rollout).values_list("agent_id", "answered_at")) == answered


def test_a_failure_stored_without_its_answer_counts_once_and_is_recorded_by_the_gate(fleet):
    """A status on the agent row with no answer on its target (the agent reported before the
    tick recorded its target) is counted from the status, then recorded by the next tick;
    the same failure reported again through the batch is still one failure."""
    rollout, first = started_rollout(fleet)
    failing = first[0]
    report(failing, "InstallFailed", has="1.0.0", offered="2.0.0", error=HASH_MISMATCH)
    assert RolloutTarget.objects.get(rollout=rollout, agent=failing).answer == ""
    assert answers.cumulative_counts(rollout, through_stage=0).failed == 1
    assert rollout_tick(rollout_id=rollout.pk) == "rolling back"
    target = RolloutTarget.objects.get(rollout=rollout, agent=failing)
    assert (target.answer, target.error) == ("failed", HASH_MISMATCH)
    report_in_batch({failing: package_statuses("InstallFailed", has="1.0.0", offered="2.0.0", error=HASH_MISMATCH)})
    assert answers.cumulative_counts(rollout, through_stage=0).failed == 1
    assert rollout_progress(rollout.pk).failed_total == 1
