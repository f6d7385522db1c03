"""Package assignments through the API (operator writes, audited), the desired sets they
give in bulk, and per version what agents report (the package status summary)."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from fleet.models import Agent, AuditEvent
from rollouts.models import Package, PackageAssignment
from rollouts.package_assignments import desired_packages_for_agents, package_definitions
from tests.fleet import factories
from tests.rollouts.package_helpers import make_version, package_dir  # noqa: F401

pytestmark = pytest.mark.django_db

API = "/api/v1"


@pytest.fixture
def versions(package_dir: Any) -> None:  # noqa: F811
    make_version(version="1.0.0")
    make_version(version="2.0.0")


def agent(**labels: str) -> Agent:
    return factories.AgentFactory(labels=labels)


def test_an_assignment_is_created_updated_and_deleted_by_operators_only(api, viewer_api, versions) -> None:
    body = {"name": "prod", "package": "collector", "version": "1.0.0", "selector": "env=prod", "priority": 5}
    assert viewer_api.post(f"{API}/package-assignments/", body, format="json").status_code == 403
    created = api.post(f"{API}/package-assignments/", body, format="json")
    assert created.status_code == 201, created.content
    assert (created.json()["version"], created.json()["selector_string"]) == ("1.0.0", "env=prod")
    assert api.post(f"{API}/package-assignments/", body, format="json").status_code == 409
    updated = api.patch(f"{API}/package-assignments/prod/", {"version": "2.0.0"}, format="json")
    assert updated.json()["version"] == "2.0.0"
    assert viewer_api.get(f"{API}/package-assignments/").json()["results"][0]["name"] == "prod"
    assert api.delete(f"{API}/package-assignments/prod/").status_code == 204
    actions = AuditEvent.objects.filter(action__startswith="package.assignment").values_list("action", flat=True)
    assert sorted(actions) == [
        "package.assignment.create",
        "package.assignment.delete",
        "package.assignment.update",
    ]


def test_an_unknown_version_or_a_version_without_files_is_refused(api, versions) -> None:
    body = {"name": "a", "package": "collector", "version": "9.9"}
    assert api.post(f"{API}/package-assignments/", body, format="json").status_code == 400
    Package.objects.get().versions.create(version="3.0.0")
    response = api.post(f"{API}/package-assignments/", {**body, "version": "3.0.0"}, format="json")
    assert response.status_code == 400
    assert "no file yet" in response.json()["detail"]
    assert api.post(f"{API}/package-assignments/", {**body, "package": "nope"}, format="json").status_code == 400


def test_desired_sets_are_resolved_in_bulk_by_priority(api, versions) -> None:
    api.post(
        f"{API}/package-assignments/",
        {"name": "prod", "package": "collector", "version": "2.0.0", "selector": "env=prod", "priority": 10},
        format="json",
    )
    api.post(
        f"{API}/package-assignments/",
        {"name": "all", "package": "collector", "version": "1.0.0", "selector": "", "priority": 0},
        format="json",
    )
    agents = [agent(env="prod") for _ in range(20)] + [agent(env="dev") for _ in range(20)]
    package_definitions()  # the process's cache, as a serving process has it
    with CaptureQueriesContext(connection) as queries:
        sets = desired_packages_for_agents([a.pk for a in agents])
    assert len(queries) <= 2  # the token and the agents, whatever their number
    versions_given = [sets[a.pk].packages["collector"].version for a in agents]
    assert versions_given == ["2.0.0"] * 20 + ["1.0.0"] * 20
    assert len({sets[a.pk].all_packages_hash for a in agents}) == 2


def status_document(**packages: dict[str, str]) -> dict[str, Any]:
    return {"packages": packages, "server_provided_all_packages_hash": "", "error_message": ""}


def test_the_status_summary_counts_agents_per_version(api, viewer_api, versions) -> None:
    reports = [
        {"status": "Installed", "agent_has_version": "1.0.0", "server_offered_version": "1.0.0"},
        {"status": "Installed", "agent_has_version": "1.0.0", "server_offered_version": "1.0.0"},
        {"status": "Downloading", "agent_has_version": "1.0.0", "server_offered_version": "2.0.0"},
        {"status": "Installing", "agent_has_version": "1.0.0", "server_offered_version": "2.0.0"},
        {"status": "InstallFailed", "agent_has_version": "1.0.0", "server_offered_version": "2.0.0"},
        {"status": "InstallPending", "agent_has_version": "", "server_offered_version": "2.0.0"},
    ]
    for entry in reports:
        factories.AgentFactory(package_statuses=status_document(collector=entry))
    factories.AgentFactory(package_statuses=status_document(other={"status": "Installed"}))
    factories.AgentFactory(package_statuses=None)
    summary = viewer_api.get(f"{API}/packages/collector/status/").json()
    zero = {"installed": 0, "pending": 0, "downloading": 0, "installing": 0, "failed": 0}
    assert summary == {
        "package": "collector",
        "versions": {
            "1.0.0": {**zero, "installed": 2},
            "2.0.0": {**zero, "downloading": 1, "installing": 1, "failed": 1, "pending": 1},
        },
    }
    assert api.get(f"{API}/packages/nothing/status/").status_code == 404


def test_the_agent_api_shows_the_reported_package_statuses(viewer_api, versions) -> None:
    entry = {"status": "Installed", "agent_has_version": "1.0.0"}
    row = factories.AgentFactory(package_statuses=status_document(collector=entry))
    detail = viewer_api.get(f"{API}/agents/{row.instance_uid}/").json()
    assert detail["package_statuses"]["packages"]["collector"]["agent_has_version"] == "1.0.0"


def test_the_admin_creates_and_moves_an_assignment_through_the_services(admin_client, versions) -> None:
    package = Package.objects.get()
    first, second = package.versions.order_by("id")
    form = {"name": "edge", "package": package.pk, "version": first.pk, "selector": "env=edge", "priority": 3}
    response = admin_client.post(reverse("admin:rollouts_packageassignment_add"), form)
    assert response.status_code == 302, response.content[:2000]
    assignment = PackageAssignment.objects.get()
    assert (assignment.version_id, assignment.selector) == (first.pk, {"matchLabels": {"env": "edge"}})
    change = reverse("admin:rollouts_packageassignment_change", args=[assignment.pk])
    moved = admin_client.post(change, {"version": second.pk, "selector": "env=edge", "priority": 3})
    assert moved.status_code == 302, moved.content[:2000]
    assert PackageAssignment.objects.get().version_id == second.pk
    actions = AuditEvent.objects.filter(action__startswith="package.assignment").values_list("action", flat=True)
    assert sorted(actions) == ["package.assignment.create", "package.assignment.update"]
    for model in ("package", "packageversion", "packagefile", "packageassignment"):
        assert admin_client.get(reverse(f"admin:rollouts_{model}_changelist")).status_code == 200
    assert admin_client.get(reverse("admin:rollouts_packageversion_change", args=[first.pk])).status_code == 200
