"""Rollouts of packages through the one rollout engine: stages and cohorts put the candidate
in the desired package sets of started stages only, the gate counts Installed as a success
and InstallFailed as a failure, a breach rolls back (agents back on the stable version count
as reverted), success moves the assignments; the API creates and shows package rollouts."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone
from rest_framework.test import APIClient

from fleet.models import Agent
from fleet.services import agent_mark_disconnected
from rollouts import packages
from rollouts.models import Package, PackageAssignment, Rollout, RolloutState
from rollouts.package_assignments import desired_packages_for_agents
from rollouts.rollout_services import answers
from rollouts.rollout_services.creation import (
    PACKAGE_STABLE_AMBIGUOUS,
    StageSpec,
    package_rollout_create,
)
from rollouts.rollout_services.gate import rollout_tick
from rollouts.rollout_services.verbs import (
    PACKAGE_ROLLOUT_ACTIVE,
    rollout_abort,
    rollout_pause,
    rollout_promote,
    rollout_resume,
    rollout_retry,
    rollout_start,
)
from tests.rollouts.package_helpers import collector_fleet, make_version, package_dir, report, signing_key  # noqa: F401

pytestmark = pytest.mark.django_db

AGENTS = 40


@pytest.fixture
def fleet(package_dir) -> list[Agent]:  # noqa: F811
    return collector_fleet(AGENTS)


def versions_given(agents: list[Agent]) -> dict[int, str]:
    sets = desired_packages_for_agents([agent.pk for agent in agents])
    return {agent_id: desired.packages["collector"].version for agent_id, desired in sets.items()}


def two_stages(**overrides: Any) -> Rollout:
    package = Package.objects.get()
    candidate = package.versions.get(version="2.0.0")
    return package_rollout_create(
        package=package,
        candidate=candidate,
        stages=[StageSpec(percent=25), StageSpec(percent=100)],
        actor=None,
        salt="fixed",
        **overrides,
    )


def test_started_stages_get_the_candidate_and_installs_promote_to_success(fleet):
    rollout = two_stages()
    assert (rollout.stable_package_version.version, rollout.candidate_label) == ("1.0.0", "2.0.0")
    assert set(versions_given(fleet).values()) == {"1.0.0"}  # a draft changes nothing
    assert rollout_start(rollout=rollout, actor=None)
    given = versions_given(fleet)
    first = [agent for agent in fleet if given[agent.pk] == "2.0.0"]
    assert 0 < len(first) < AGENTS
    assert rollout.targets.count() == len(first)
    # No answers yet: the stage holds.
    assert rollout_tick(rollout_id=rollout.pk).startswith("holding")
    for agent in first:
        report(agent, "Installed", has="2.0.0", offered="2.0.0")
    counts = answers.cumulative_counts(rollout, through_stage=0)
    assert (counts.applied, counts.failed, counts.pending) == (len(first), 0, 0)
    assert rollout_tick(rollout_id=rollout.pk) == "stage 1 started"
    assert set(versions_given(fleet).values()) == {"2.0.0"}
    for agent in fleet:
        report(agent, "Installed", has="2.0.0", offered="2.0.0")
    assert rollout_tick(rollout_id=rollout.pk) == "succeeded"
    # The assignment now names the candidate: agents keep it without the rollout.
    assert PackageAssignment.objects.get().version.version == "2.0.0"
    assert set(versions_given(fleet).values()) == {"2.0.0"}


def test_a_package_stage_whose_agents_just_disconnected_does_not_succeed(fleet):
    """The gate's offline grace holds for package rollouts too (test_gate_offline.py has the
    configuration cases): the last stage's agents closed their sockets moments ago."""
    rollout = two_stages()
    assert rollout_start(rollout=rollout, actor=None)
    given = versions_given(fleet)
    first = [agent for agent in fleet if given[agent.pk] == "2.0.0"]
    for agent in first:
        report(agent, "Installed", has="2.0.0", offered="2.0.0")
    assert rollout_tick(rollout_id=rollout.pk) == "stage 1 started"
    rest = [agent for agent in fleet if agent not in first]
    for agent in rest:
        assert agent_mark_disconnected(instance_uid=agent.instance_uid, at=timezone.now(), sequence_num=None)
    assert rollout_tick(rollout_id=rollout.pk) == "holding: waiting for answers"
    later = timezone.now() + answers.offline_grace() + timedelta(seconds=1)
    assert rollout_tick(rollout_id=rollout.pk, now=later) == "holding: too many agents offline"
    rollout.refresh_from_db()
    assert rollout.state == RolloutState.RUNNING


def test_install_failures_over_the_budget_roll_every_agent_back(fleet):
    rollout = two_stages(max_failure_rate=0.05)
    rollout_start(rollout=rollout, actor=None)
    given = versions_given(fleet)
    first = [agent for agent in fleet if given[agent.pk] == "2.0.0"]
    for agent in first[:-1]:
        report(agent, "Installed", has="2.0.0", offered="2.0.0")
    report(first[-1], "InstallFailed", has="1.0.0", offered="2.0.0", error="hash mismatch")
    assert rollout_tick(rollout_id=rollout.pk) == "rolling back"
    rollout.refresh_from_db()
    assert rollout.state == RolloutState.ROLLING_BACK
    assert set(versions_given(fleet).values()) == {"1.0.0"}
    assert rollout_tick(rollout_id=rollout.pk).startswith("rolling back:")
    for agent in first:
        report(agent, "Installed", has="1.0.0", offered="1.0.0")
    progress = answers.rollback_progress(rollout)
    assert (progress["reverted"], progress["waiting"]) == (len(first), 0)
    assert rollout_tick(rollout_id=rollout.pk) == "rolled back"
    assert PackageAssignment.objects.get().version.version == "1.0.0"
    # Retried: the same cohorts get the candidate again.
    assert rollout_retry(rollout=rollout, actor=None)
    assert {a.pk for a in fleet if versions_given(fleet)[a.pk] == "2.0.0"} == {a.pk for a in first}


def test_one_active_rollout_per_package_and_one_stable_version(fleet):
    first = two_stages()
    rollout_start(rollout=first, actor=None)
    second = two_stages()
    with pytest.raises(Exception) as refused:
        rollout_start(rollout=second, actor=None)
    assert str(refused.value) == PACKAGE_ROLLOUT_ACTIVE.format(name="collector", rollout_id=first.pk)
    rollout_abort(rollout=first, actor=None)
    package = Package.objects.get()
    packages.package_assignment_create(name="canary", package=package, version="2.0.0", selector="x=y", actor=None)
    make_version(version="3.0.0")
    with pytest.raises(Exception) as ambiguous:
        package_rollout_create(
            package=package,
            candidate=package.versions.get(version="3.0.0"),
            stages=[StageSpec(percent=100)],
            actor=None,
        )
    assert str(ambiguous.value) == PACKAGE_STABLE_AMBIGUOUS.format(name="collector", versions="1.0.0, 2.0.0")


def test_the_api_creates_and_shows_a_package_rollout(fleet):
    user = get_user_model().objects.create_superuser("admin", "a@example.com", "pw")
    api = APIClient()
    api.force_authenticate(user)
    body = {"package": "collector", "candidate_version": "2.0.0", "stages": [{"percent": 50}, {"percent": 100}]}
    preview = api.post("/api/v1/rollouts/", {**body, "dry_run": True}, format="json")
    assert preview.status_code == 200, preview.content
    assert preview.json()["stages"][-1]["cumulative"] == AGENTS
    created = api.post("/api/v1/rollouts/", body, format="json")
    assert created.status_code == 201, created.content
    shown = created.json()
    assert (shown["kind"], shown["package"], shown["configuration"]) == ("package", "collector", None)
    assert (shown["stable_version"], shown["candidate_version"]) == ("1.0.0", "2.0.0")
    started = api.post(f"/api/v1/rollouts/{shown['id']}/start/", {}, format="json")
    assert started.status_code == 200, started.content
    assert started.json()["state"] == "running"
    assert started.json()["stages"][0]["counts"]["targeted"] > 0
    both = api.post("/api/v1/rollouts/", {**body, "configuration": "fleet"}, format="json")
    assert both.status_code == 400
    missing = api.post("/api/v1/rollouts/", {**body, "candidate_version": "9.9"}, format="json")
    assert (missing.status_code, missing.json()["field"]) == (400, "candidate_version")
    # The dashboard's pages show it.
    client = api
    client.force_login(user)
    page = client.get(f"/rollouts/{shown['id']}/")
    assert page.status_code == 200 and b"package collector" in page.content and b"1.0.0" in page.content
    listing = client.get("/admin/rollouts/rollout/")
    assert listing.status_code == 200 and "1.0.0 → 2.0.0" in listing.content.decode()


def test_pause_keeps_the_cohorts_and_promote_gives_every_agent_the_candidate(fleet):
    rollout = two_stages()
    rollout_start(rollout=rollout, actor=None)
    started = versions_given(fleet)
    assert rollout_pause(rollout=rollout, actor=None)
    assert versions_given(fleet) == started
    assert rollout_tick(rollout_id=rollout.pk) == "idle (paused)"
    assert rollout_resume(rollout=rollout, actor=None)
    assert rollout_promote(rollout=rollout, actor=None)
    assert set(versions_given(fleet).values()) == {"2.0.0"}
    assert rollout.targets.count() == AGENTS


def test_the_admin_and_the_dashboard_list_show_a_package_rollout(fleet):
    user = get_user_model().objects.create_superuser("admin", "a@example.com", "pw")
    rollout = two_stages()
    rollout_start(rollout=rollout, actor=None)
    client = APIClient()
    client.force_login(user)
    change = client.get(f"/admin/rollouts/rollout/{rollout.pk}/change/")
    assert change.status_code == 200 and "collector" in change.content.decode()
    listing = client.get("/rollouts/")
    assert listing.status_code == 200 and "package collector" in listing.content.decode()
