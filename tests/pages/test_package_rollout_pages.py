"""Package rollouts on the operator pages and in the admin: the rollout page lists the agents
whose install of the candidate failed, with their error, and counts the package statuses of
the agents given the candidate; the dashboard form and the admin add form create a package
rollout through the service the API calls, and refuse what the API refuses with its message."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.messages import get_messages
from django.test import Client
from django.utils.html import escape
from rest_framework.test import APIClient

from fleet.models import Agent
from rollouts import packages
from rollouts.admin.rollouts import PACKAGE_STATUS_COLUMNS
from rollouts.api.rollout_serializers import ONE_SUBJECT
from rollouts.dashboard.progress import rollout_progress
from rollouts.dashboard.views.rollouts import BAD_POLICY, BAD_STAGE_ROW
from rollouts.models import Package, Rollout, RolloutState
from rollouts.packages import NO_SUCH_PACKAGE_VERSION
from rollouts.rollout_services import creation
from rollouts.rollout_services.creation import StageSpec
from rollouts.rollout_services.verbs import rollout_start
from rollouts.rollout_subjects import subject_of
from tests.fleet.factories import UserFactory
from tests.rollouts.package_helpers import make_version, package_dir, report, started_package_rollout  # noqa: F401
from tests.rollouts.rollout_helpers import answer_all, configuration_with_candidate, make_fleet, standard_rollout

pytestmark = pytest.mark.django_db

AGENTS = 20
INSTALL_ERROR = "sha256 of the download does not match the offer"


@pytest.fixture
def fleet(package_dir) -> list[Agent]:  # noqa: F811
    """Agents given collector 1.0.0 by an assignment; 2.0.0 is the candidate, 3.0.0 has no file."""
    make_version(version="1.0.0")
    make_version(version="2.0.0")
    make_version(version="3.0.0", files={})
    packages.package_assignment_create(
        name="all", package=Package.objects.get(), version="1.0.0", selector="env=prod", actor=None
    )
    return make_fleet(AGENTS)


@pytest.fixture
def staff() -> Client:
    """A superuser: the dashboard (operator) and the admin."""
    client = Client()
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    return client


def running_rollout() -> tuple[Rollout, list[Agent]]:
    """A started package rollout whose first stage has 10 of the agents: those agents."""
    rollout = started_package_rollout([StageSpec(count=10), StageSpec(percent=100)])
    first = list(Agent.objects.filter(rollout_targets__rollout=rollout).order_by("pk"))
    assert len(first) == 10
    return rollout, first


# The rollout page: failed agents and package statuses


def test_the_failed_agents_of_a_package_rollout_are_listed_with_their_error(staff, fleet):
    rollout, first = running_rollout()
    failing = first[0]
    report(failing, "InstallFailed", has="1.0.0", offered="2.0.0", error=INSTALL_ERROR)
    report(first[1], "Installed", has="2.0.0", offered="2.0.0")
    # A failure of another version is not this rollout's.
    report(first[2], "InstallFailed", has="", offered="1.0.0", error="disk full")
    page = staff.get(f"/rollouts/{rollout.pk}/", {"fragment": "1"})
    assert page.status_code == 200
    progress = page.context["progress"]
    assert [(f.agent_id, f.error) for f in progress.failed_agents] == [(failing.pk, INSTALL_ERROR)]
    assert progress.failed_total == 1
    assert progress.stages[0].failed_answers == 1
    html = page.content.decode()
    assert "Failed agents (1)" in html and INSTALL_ERROR in html and "disk full" not in html
    assert "No agent has failed." not in html


def test_both_subjects_list_failed_agents_through_the_subjects_selector():
    make_fleet(20)
    configuration, _, candidate = configuration_with_candidate()
    rollout = creation.rollout_create(
        configuration=configuration,
        candidate=candidate,
        stages=[StageSpec(count=5), StageSpec(percent=100)],
        actor=None,
    )
    assert rollout_start(rollout=rollout, actor=None)
    target = rollout.targets.order_by("pk").first()
    assert target is not None
    answer_all(failing={target.agent_id})
    failed = subject_of(rollout).failed_targets()
    assert [(t.agent_id, t.failure) for t in failed] == [(target.agent_id, "rejected")]
    assert [(f.agent_id, f.error) for f in rollout_progress(rollout.pk).failed_agents] == [
        (target.agent_id, "rejected")
    ]


def test_the_rollout_page_counts_the_package_statuses_of_the_agents_given_the_candidate(staff, fleet):
    rollout, first = running_rollout()
    report(first[0], "Installed", has="2.0.0", offered="2.0.0")
    report(first[1], "Installed", has="2.0.0", offered="2.0.0")
    report(first[2], "Installing", has="1.0.0", offered="2.0.0")
    report(first[3], "Downloading", has="1.0.0", offered="2.0.0")
    report(first[4], "InstallFailed", has="1.0.0", offered="2.0.0", error=INSTALL_ERROR)
    expected = {"installed": 2, "installing": 1, "downloading": 1, "pending": 0, "failed": 1}
    page = staff.get(f"/rollouts/{rollout.pk}/")
    assert page.context["progress"].package_statuses["2.0.0"] == expected
    html = page.content.decode()
    row = html[html.index('<tr data-version="2.0.0">') :].split("</tr>")[0]
    for name, count in expected.items():
        assert f'class="{name}{" bad" if name == "failed" else ""}">{count}</td>' in row, name
    change = staff.get(f"/admin/rollouts/rollout/{rollout.pk}/change/")
    admin_html = change.content.decode()
    table = admin_html[admin_html.index('id="package-statuses"') :].split("</table>")[0]
    cells = "".join(f"<th>{name}</th>" for name in PACKAGE_STATUS_COLUMNS)
    assert cells in table
    assert "<tr><td>2.0.0</td><td>2</td><td>1</td><td>1</td><td>0</td><td>1</td></tr>" in table


def test_a_configuration_rollout_page_shows_no_package_statuses(staff):
    make_fleet(10)
    configuration, _, candidate = configuration_with_candidate()
    rollout = standard_rollout(configuration, candidate)
    page = staff.get(f"/rollouts/{rollout.pk}/")
    assert page.context["progress"].package_statuses is None
    assert b"package-statuses" not in page.content
    assert b"package-statuses" not in staff.get(f"/admin/rollouts/rollout/{rollout.pk}/change/").content


# The dashboard form

FORM = {
    "kind": "package",
    "package": "collector",
    "candidate": "2.0.0",
    "stage_size": ["25", "100"],
    "stage_unit": ["percent", "percent"],
    "stage_hold": ["30", "0"],
    "stage_approval": ["1"],
    "max_failure_percent": "5",
    "apply_timeout": "120",
    "min_reporting": "3",
    "on_breach": "pause",
    "note": "from the form",
}


def test_the_form_offers_the_packages_versions_and_previews_the_cohorts(staff, fleet):
    form = staff.get("/rollouts/new/", {"kind": "package"})
    assert form.status_code == 200
    subject = form.context["subject"]
    assert (subject.kind, subject.names, subject.stable) == ("package", ["collector"], "1.0.0")
    assert [value for value, _ in subject.candidates] == ["3.0.0", "2.0.0"]
    html = form.content.decode()
    assert '<select name="package"' in html and 'value="2.0.0"' in html and "rolling out from 1.0.0" in html
    preview = staff.post("/rollouts/new/", {**FORM, "action": "preview"})
    assert preview.status_code == 200 and not preview.context["errors"]
    assert preview.context["preview"].stages[-1].cumulative == AGENTS
    assert not Rollout.objects.exists()


def test_the_form_creates_a_package_rollout_with_its_stages_and_gate(staff, fleet):
    created = staff.post("/rollouts/new/", {**FORM, "salt": "chosen", "action": "create"})
    assert created.status_code == 302
    rollout = Rollout.objects.get()
    assert created["Location"] == f"/rollouts/{rollout.pk}/"
    assert (rollout.package.name, rollout.stable_label, rollout.candidate_label) == ("collector", "1.0.0", "2.0.0")
    assert rollout.state == RolloutState.DRAFT and rollout.salt == "chosen" and rollout.note == "from the form"
    assert (rollout.max_failure_rate, rollout.apply_timeout_seconds) == (pytest.approx(0.05), 120.0)
    assert (rollout.min_reporting, rollout.auto_rollback) == (3, False)
    stages = list(rollout.stages.values_list("percent", "hold_seconds", "requires_approval"))
    assert stages == [(25.0, 30.0, False), (100.0, 0.0, True)]


REFUSED = [
    ({"candidate": "1.0.0"}, {}, creation.PACKAGE_CANDIDATE_IS_STABLE.format(version="1.0.0", name="collector")),
    ({"candidate": "3.0.0"}, {}, creation.PACKAGE_CANDIDATE_NO_FILE.format(version="3.0.0", name="collector")),
    ({"candidate": "9.9"}, {}, NO_SUCH_PACKAGE_VERSION.format(name="collector", version="9.9")),
    ({"stage_size": ["50", "10"]}, {}, creation.STAGES_NOT_NESTED.format(index=1)),
    ({"max_failure_percent": "150"}, {"max_failure_rate": 1.5}, creation.BAD_FAILURE_RATE),
    ({"min_reporting": "0"}, {"min_reporting": 0}, creation.BAD_MIN_REPORTING),
    ({"apply_timeout": "0.5"}, {"apply_timeout_seconds": 0.5}, creation.BAD_APPLY_TIMEOUT),
]
REFUSED_IDS = ["stable", "no file", "unknown", "not nested", "budget", "min reporting", "apply timeout"]


def api_body(form: dict[str, Any], api: dict[str, Any]) -> dict[str, Any]:
    """The API's body for the same rollout as the form."""
    sizes = form["stage_size"]
    return {
        "package": form["package"],
        "candidate_version": form["candidate"],
        "stages": [{"percent": float(size)} for size in sizes],
        **api,
    }


@pytest.mark.parametrize(("form", "api", "problem"), REFUSED, ids=REFUSED_IDS)
def test_the_form_refuses_what_the_api_refuses_with_the_services_message(staff, fleet, form, api, problem):
    given = {**FORM, **form}
    refused = staff.post("/rollouts/new/", {**given, "action": "create"})
    assert refused.status_code == 200
    assert refused.context["errors"] == [problem]
    assert escape(problem) in refused.content.decode()
    assert not Rollout.objects.exists()
    client = APIClient()
    client.force_authenticate(refused.wsgi_request.user)
    answer = client.post("/api/v1/rollouts/", api_body(given, api), format="json")
    assert answer.status_code == 400, answer.content
    assert not Rollout.objects.exists()


def test_the_form_shows_why_a_package_without_one_stable_version_cannot_roll_out(staff, fleet):
    packages.package_assignment_create(
        name="canary", package=Package.objects.get(), version="2.0.0", selector="x=y", actor=None
    )
    form = staff.get("/rollouts/new/", {"kind": "package"})
    assert form.context["subject"].stable == "1.0.0, 2.0.0"
    refused = staff.post("/rollouts/new/", {**FORM, "candidate": "2.0.0", "action": "preview"})
    assert refused.context["errors"] == [
        creation.PACKAGE_STABLE_AMBIGUOUS.format(name="collector", versions="1.0.0, 2.0.0")
    ]


def test_a_name_that_is_not_there_is_never_another_subjects_rollout_and_odd_sizes_are_answered(staff, fleet):
    answer = staff.post("/rollouts/new/", {**FORM, "package": "nope", "action": "create"})
    assert answer.status_code == 200 and answer.context["subject"].chosen is None
    odd = staff.post("/rollouts/new/", {**FORM, "stage_unit": ["count", "count"], "stage_size": ["inf", "20"]})
    assert odd.context["errors"] == [BAD_STAGE_ROW.format(index=0)]
    policy = staff.post("/rollouts/new/", {**FORM, "min_reporting": "two", "action": "create"})
    assert policy.context["errors"] == [BAD_POLICY]
    assert not Rollout.objects.exists()


# The admin's add form

ADMIN_ADD = "/admin/rollouts/rollout/add/"


def admin_form(**overrides: Any) -> dict[str, Any]:
    return {
        "candidate_version": "2.0.0",
        "stages": json.dumps([{"percent": 10}, {"percent": 100}]),
        "max_failure_rate": "0.02",
        "apply_timeout_seconds": "300",
        "min_reporting": "2",
        "auto_rollback": "on",
        "note": "from the admin",
        **overrides,
    }


def test_the_admin_adds_a_package_rollout(staff, fleet):
    response = staff.post(ADMIN_ADD, admin_form(package=Package.objects.get().pk))
    assert response.status_code == 302, response.content.decode()[-3000:]
    rollout = Rollout.objects.get()
    assert (rollout.package.name, rollout.stable_label, rollout.candidate_label) == ("collector", "1.0.0", "2.0.0")
    assert rollout.configuration is None and rollout.min_reporting == 2 and rollout.note == "from the admin"
    change = staff.get(f"/admin/rollouts/rollout/{rollout.pk}/change/").content.decode()
    assert "Package statuses" in change and "candidate package version" in change.lower()


def test_the_admin_refuses_a_package_rollout_the_api_refuses(staff, fleet):
    package = Package.objects.get()
    stable = staff.post(ADMIN_ADD, admin_form(package=package.pk, candidate_version="1.0.0"), follow=True)
    problem = creation.PACKAGE_CANDIDATE_IS_STABLE.format(version="1.0.0", name="collector")
    assert problem in [str(message) for message in get_messages(stable.wsgi_request)]
    unknown = staff.post(ADMIN_ADD, admin_form(package=package.pk, candidate_version="9.9"))
    assert escape(NO_SUCH_PACKAGE_VERSION.format(name="collector", version="9.9")) in unknown.content.decode()
    neither = staff.post(ADMIN_ADD, admin_form())
    assert escape(ONE_SUBJECT) in neither.content.decode()
    assert not Rollout.objects.exists()
