"""The operator pages through Django's test client: data on every page, roles, the actions."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from fleet.models import Agent, AuditEvent, RemoteConfigState
from fleet.roles import OPERATOR, VIEWER, grant_role
from rollouts import services
from rollouts.dashboard.views.fleet import BAD_CURSOR, PAGE_SIZE
from rollouts.models import Configuration, Rollout, RolloutState
from rollouts.rollout_services import creation, verbs
from signing.models import CertificateRequest
from tests.fleet.factories import AgentFactory, UserFactory

pytestmark = pytest.mark.django_db

BODY = "receivers:\n  otlp: {}\n"


def client_for(role: str | None) -> Client:
    user = UserFactory(username=role or "nobody")
    if role:
        grant_role(user=user, role=role)
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def operator() -> Client:
    return client_for(OPERATOR)


@pytest.fixture
def viewer() -> Client:
    return client_for(VIEWER)


def agent(name: str, **fields: Any) -> Agent:
    labels = {"service.name": name, **fields.pop("labels", {})}
    return AgentFactory(identifying_attributes={"service.name": name}, labels=labels, **fields)


@pytest.fixture
def configured() -> tuple[Configuration, list[Agent]]:
    agents = [agent("demo", labels={"env": "prod" if i % 2 else "dev"}) for i in range(10)]
    configuration = services.configuration_create(name="demo", selector="service.name=demo", actor=None)
    services.configuration_publish(
        configuration=configuration, files={"collector.yaml": {"body": BODY, "content_type": "text/yaml"}}, author=None
    )
    services.configuration_publish(
        configuration=configuration,
        files={"collector.yaml": {"body": BODY + "exporters: {}\n", "content_type": "text/yaml"}},
        author=None,
        activate=False,
    )
    configuration.refresh_from_db()
    return configuration, agents


def create_rollout(configuration: Configuration) -> Rollout:
    candidate = configuration.versions.get(number=2)
    return creation.rollout_create(
        configuration=configuration,
        candidate=candidate,
        stages=[creation.StageSpec(percent=10), creation.StageSpec(percent=100)],
        actor=None,
        salt="s",
    )


def test_pages_send_anonymous_users_to_the_login_page():
    for url in ["/fleet/", "/configurations/", "/rollouts/", "/rollouts/new/", "/certificate-requests/"]:
        response = Client().get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/login/?next=")


def test_a_user_without_a_role_is_refused():
    assert client_for(None).get("/fleet/").status_code == 403


def test_the_fleet_list_filters_searches_counts_and_pages_by_keyset(operator, configured):
    now = timezone.now()
    for index in range(PAGE_SIZE + 5):
        agent(f"bulk-{index}", last_seen=now - timedelta(seconds=index))
    page = operator.get("/fleet/", {"sort": "-last_seen"})
    assert page.status_code == 200
    assert len(page.context["agents"]) == PAGE_SIZE
    assert page.context["total"] == PAGE_SIZE + 15
    seen = {a.pk for a in page.context["agents"]}
    following = operator.get("/fleet/?" + page.context["next_query"])
    rest = {a.pk for a in following.context["agents"]}
    assert not seen & rest and len(seen | rest) == PAGE_SIZE + 15
    assert not following.context["next_query"]
    selected = operator.get("/fleet/", {"selector": "service.name=demo,env=prod"})
    assert {a.labels["env"] for a in selected.context["agents"]} == {"prod"}
    assert len(selected.context["agents"]) == 5
    assert len(operator.get("/fleet/", {"q": "bulk-1"}).context["agents"]) == 11  # bulk-1, bulk-10..19
    assert len(operator.get("/fleet/", {"configuration": "demo", "version": "1"}).context["agents"]) == 10
    drifting = configured[1][0]
    Agent.objects.filter(pk=drifting.pk).update(effective_config_hash="0" * 64)
    assert [a.pk for a in operator.get("/fleet/", {"drift": "yes"}).context["agents"]] == [drifting.pk]
    bad = operator.get("/fleet/", {"selector": "env in (("})
    assert bad.status_code == 200 and bad.context["problem"]


def test_the_agent_page_shows_health_as_a_tree_and_the_config_diff_and_operators_edit_labels(operator, configured):
    _, agents = configured
    target = agents[0]
    Agent.objects.filter(pk=target.pk).update(
        health={
            "healthy": False,
            "status": "degraded",
            "components": {"receiver/otlp": {"healthy": False, "last_error": "port busy"}},
        },
        effective_config={"collector.yaml": {"body": "receivers: {}\n"}},
        remote_config_state=RemoteConfigState.FAILED,
    )
    page = operator.get(f"/fleet/{target.instance_uid}/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "receiver/otlp" in html and "port busy" in html
    assert page.context["diff"][0]["changed"]
    assert "save labels" in html
    response = operator.post(f"/fleet/{target.instance_uid}/", {"action": "labels", "labels": "team=edge\n"})
    assert response.status_code == 302
    target.refresh_from_db()
    assert target.operator_labels == {"team": "edge"} and target.labels["team"] == "edge"
    changes = [event.action for event in operator.get(f"/fleet/{target.instance_uid}/").context["audit"]]
    assert changes == ["agent.labels.set"]  # not the configuration's events that share a primary key
    refused = operator.post(f"/fleet/{target.instance_uid}/", {"action": "labels", "labels": "no equals sign"})
    assert refused.status_code == 200 and refused.context["errors"]


def test_the_configuration_page_diffs_any_two_versions_publishes_with_inline_errors_and_rolls_back(
    operator, configured
):
    configuration, _ = configured
    page = operator.get("/configurations/demo/", {"from": "1", "to": "2"})
    assert page.status_code == 200
    rows = page.context["diff"][0]["rows"]
    assert ("", "exporters: {}", "added") in rows
    assert [counts["pending"] for _, counts in page.context["versions"]][-1] == 10
    invalid = operator.post(
        "/configurations/demo/",
        {"action": "publish", "file_name": "c.yaml", "content_type": "image/png", "body": "a: 1"},
    )
    assert invalid.status_code == 200
    assert invalid.context["errors"] and "publish-errors" in invalid.content.decode()
    published = operator.post(
        "/configurations/demo/",
        {"action": "publish", "file_name": "collector.yaml", "body": "a: 2\n", "activate": "on"},
    )
    assert published.status_code == 302
    configuration.refresh_from_db()
    assert configuration.current_version.number == 3
    rolled = operator.post("/configurations/demo/", {"action": "rollback", "version": "1"})
    assert rolled.status_code == 302
    configuration.refresh_from_db()
    assert configuration.current_version.number == 4
    assert configuration.current_version.rolled_back_from.number == 1


def test_the_rollout_form_previews_with_a_salt_and_saves_the_same_cohorts(operator, configured):
    form = operator.get("/rollouts/new/", {"configuration": "demo"})
    assert [row["size"] for row in form.context["rows"]] == ["1", "10", "100"]
    data = {
        "configuration": "demo",
        "candidate": "2",
        "stage_size": ["30", "100"],
        "stage_unit": ["percent", "percent"],
        "stage_hold": ["0", "0"],
        "max_failure_percent": "0.1",
        "apply_timeout": "300",
        "action": "preview",
    }
    preview = operator.post("/rollouts/new/", data)
    assert preview.status_code == 200
    dry = preview.context["preview"]
    assert dry.salt and f'value="{dry.salt}"' in preview.content.decode()
    assert not Rollout.objects.exists()
    created = operator.post("/rollouts/new/", {**data, "salt": dry.salt, "action": "create"})
    assert created.status_code == 302
    rollout = Rollout.objects.get()
    assert rollout.salt == dry.salt and rollout.max_failure_rate == pytest.approx(0.001)
    assert verbs.rollout_start(rollout=rollout, actor=None)
    assert rollout.targets.count() == dry.stages[0].cohort_size
    bad = operator.post("/rollouts/new/", {**data, "stage_size": ["50", "10"]})
    assert bad.context["errors"] == [creation.STAGES_NOT_NESTED.format(index=1)]


def test_the_rollout_page_shows_stages_and_runs_verbs_and_its_fragment_is_live(operator, configured):
    configuration, _ = configured
    rollout = create_rollout(configuration)
    page = operator.get(f"/rollouts/{rollout.pk}/")
    assert page.status_code == 200
    assert f'data-live-url="/rollouts/{rollout.pk}/?fragment=1"' in page.content.decode()
    assert operator.post(f"/rollouts/{rollout.pk}/", {"verb": "start"}).status_code == 302
    rollout.refresh_from_db()
    assert rollout.state == RolloutState.RUNNING
    fragment = operator.get(f"/rollouts/{rollout.pk}/", {"fragment": "1"})
    assert b"<html" not in fragment.content and b'id="stages"' in fragment.content
    assert fragment.context["progress"].stages[0].counts.targeted == rollout.targets.count()
    stale = operator.post(f"/rollouts/{rollout.pk}/", {"verb": "start"})
    assert stale.status_code == 200 and stale.context["errors"]
    assert AuditEvent.objects.filter(action="rollout.start").exists() or rollout.events.filter(kind="started").exists()


def test_a_viewer_sees_no_action_and_every_action_is_refused(viewer, configured):
    configuration, agents = configured
    rollout = create_rollout(configuration)
    request = CertificateRequest.objects.create(instance_uid=agents[0].instance_uid, csr_pem="x")
    pages = [
        f"/fleet/{agents[0].instance_uid}/",
        "/configurations/",
        "/configurations/demo/",
        f"/rollouts/{rollout.pk}/",
        "/rollouts/new/",
        "/certificate-requests/",
    ]
    for url in pages:
        page = viewer.get(url)
        assert page.status_code == 200, url
        # The only form that changes anything is logging out; reading forms (filters) use GET.
        assert page.content.count(b'method="post"') == 1, url
        assert viewer.post(url, {"verb": "start", "action": "publish", "decision": "approve"}).status_code == 403, url
    rollout.refresh_from_db()
    request.refresh_from_db()
    assert rollout.state == RolloutState.DRAFT and request.state == CertificateRequest.State.PENDING


def test_the_certificate_queue_rejects_with_a_reason(operator, configured):
    _, agents = configured
    request = CertificateRequest.objects.create(instance_uid=agents[0].instance_uid, csr_pem="x")
    page = operator.get("/certificate-requests/")
    assert list(page.context["pending"]) == [request]
    answer = operator.post("/certificate-requests/", {"request": request.pk, "decision": "reject", "reason": "unknown"})
    assert answer.status_code == 302
    request.refresh_from_db()
    assert (request.state, request.reason) == (CertificateRequest.State.REJECTED, "unknown")


def test_fleet_pages_seek_by_keyset_never_by_offset_and_ties_on_last_seen_do_not_lose_agents(operator):
    same_moment = timezone.now()
    for index in range(PAGE_SIZE * 2 + 3):
        agent(f"tie-{index}", last_seen=same_moment)
    seen: list[int] = []
    query = "sort=-last_seen"
    with CaptureQueriesContext(connection) as queries:
        while True:
            page = operator.get("/fleet/?" + query)
            seen += [a.pk for a in page.context["agents"]]
            query = page.context["next_query"]
            if not query:
                break
    assert len(seen) == len(set(seen)) == PAGE_SIZE * 2 + 3
    assert not [q["sql"] for q in queries.captured_queries if "OFFSET" in q["sql"].upper()]
    stale = operator.get("/fleet/", {"after": "not-a-cursor"})
    assert stale.context["problem"] == BAD_CURSOR and not stale.context["agents"]


def test_malformed_action_fields_are_answered_not_crashed_on(operator, configured):
    configuration, agents = configured
    rollout = create_rollout(configuration)
    assert operator.post("/configurations/demo/", {"action": "rollback", "version": "x"}).status_code == 200
    assert operator.post(f"/rollouts/{rollout.pk}/", {"verb": "approve", "stage": "x"}).status_code == 200
    assert operator.post("/certificate-requests/", {"request": "x", "decision": "approve"}).status_code == 404
    revoke = {"action": "revoke", "certificate": "x"}
    assert operator.post(f"/fleet/{agents[0].instance_uid}/", revoke).status_code == 404
