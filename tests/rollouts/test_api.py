"""The configurations API: roles, configurations, versions, selectors, labels and audit."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.management import call_command
from django.db.models import ProtectedError
from rest_framework.test import APIClient

from fleet.api.exceptions import STILL_REFERENCED
from fleet.errors import DomainError
from fleet.labels import merged_labels
from fleet.models import Agent, AuditEvent, RemoteConfigState
from fleet.roles import OPERATOR, READ_DENIED, VIEWER, WRITE_DENIED
from rollouts import desired_state, services
from rollouts.config_files import CONFIG_FILES_INVALID
from rollouts.errors import CONFIGURATION_NAME_TAKEN, NO_SUCH_VERSION
from rollouts.models import AgentDesiredConfig, Configuration, ConfigVersion
from tests.fleet.factories import AgentFactory, UserFactory
from tests.rollouts.conftest import token_client

pytestmark = pytest.mark.django_db

COLLECTOR_V1 = {"collector.yaml": {"body": "receivers:\n  otlp: {}\n", "content_type": "text/yaml"}}
COLLECTOR_V2 = {"collector.yaml": {"body": "receivers:\n  otlp: {}\n  prometheus: {}\n", "content_type": "text/yaml"}}


@pytest.fixture
def edge(operator: Any) -> Configuration:
    """A configuration for the checkout service with two published versions."""
    configuration = services.configuration_create(
        name="edge", selector="service.name=checkout", priority=10, description="", actor=operator
    )
    services.configuration_publish(configuration=configuration, files=COLLECTOR_V1, author=operator, note="first")
    services.configuration_publish(configuration=configuration, files=COLLECTOR_V2, author=operator, note="second")
    configuration.refresh_from_db()
    return configuration


def checkout_agent(**fields: Any) -> Agent:
    """An agent of the checkout service (or `service=`) whose labels are consistent with what it reports."""
    identifying = {"service.name": fields.pop("service", "checkout")}
    non_identifying = {"os.type": "linux"}
    labels = fields.pop(
        "labels",
        merged_labels(
            identifying=identifying, non_identifying=non_identifying, operator=fields.get("operator_labels", {})
        ),
    )
    return AgentFactory(
        identifying_attributes=identifying, non_identifying_attributes=non_identifying, labels=labels, **fields
    )


def resolve(agent: Agent) -> None:
    """What the server does when an agent reports: work out its desired configuration."""
    desired_state.resolve_agent(agent.pk)


def desired_version_number(agent: Agent) -> int | None:
    desired = AgentDesiredConfig.objects.select_related("version").filter(agent=agent).first()
    return None if desired is None else desired.version.number


# Roles


def test_the_viewer_and_operator_roles_exist_after_migrating():
    from django.contrib.auth.models import Group

    assert set(Group.objects.filter(name__in=[VIEWER, OPERATOR]).values_list("name", flat=True)) == {VIEWER, OPERATOR}


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("get", "/api/v1/configurations/"),
        ("post", "/api/v1/configurations/"),
        ("get", "/api/v1/configurations/edge/versions/"),
        ("post", "/api/v1/selectors/preview/"),
        ("get", "/api/v1/audit/"),
        ("get", "/api/v1/agents/0190f8f6-0000-7000-8000-000000000000/labels/"),
    ],
)
def test_anonymous_requests_are_refused_with_401(method, url):
    response = getattr(APIClient(), method)(url, {}, format="json")
    assert response.status_code == 401
    assert "WWW-Authenticate" in response.headers


def test_a_user_without_a_role_cannot_even_read():
    response = token_client(UserFactory(username="nobody")).get("/api/v1/configurations/")
    assert response.status_code == 403
    assert response.json()["detail"] == READ_DENIED


def test_a_viewer_can_read_everything(viewer_api, edge):
    agent = checkout_agent()
    for url in [
        "/api/v1/configurations/",
        "/api/v1/configurations/edge/",
        "/api/v1/configurations/edge/versions/",
        "/api/v1/configurations/edge/versions/1/",
        "/api/v1/configurations/edge/versions/1/status/",
        "/api/v1/configurations/edge/diff/?from=1&to=2",
        f"/api/v1/agents/{agent.instance_uid}/labels/",
        f"/api/v1/agents/{agent.instance_uid}/config/",
        "/api/v1/audit/",
    ]:
        assert viewer_api.get(url).status_code == 200, url


def test_a_viewer_may_preview_a_selector(viewer_api):
    assert viewer_api.post("/api/v1/selectors/preview/", {"selector": "env=prod"}, format="json").status_code == 200


def test_a_viewer_gets_403_on_every_write_and_nothing_changes(viewer_api, edge):
    agent = checkout_agent()
    writes = [
        ("post", "/api/v1/configurations/", {"name": "new"}),
        ("patch", "/api/v1/configurations/edge/", {"priority": 1}),
        ("put", "/api/v1/configurations/edge/", {"name": "edge"}),
        ("delete", "/api/v1/configurations/edge/", None),
        ("post", "/api/v1/configurations/edge/versions/", {"files": COLLECTOR_V1}),
        ("post", "/api/v1/configurations/edge/rollback/", {"version": 1}),
        ("put", f"/api/v1/agents/{agent.instance_uid}/labels/", {"labels": {"env": "prod"}}),
        ("patch", f"/api/v1/agents/{agent.instance_uid}/labels/", {"labels": {"env": "prod"}}),
    ]
    events_before = AuditEvent.objects.count()
    for method, url, body in writes:
        response = getattr(viewer_api, method)(url, body, format="json")
        assert response.status_code == 403, (method, url)
        assert response.json()["detail"] == WRITE_DENIED
    assert AuditEvent.objects.count() == events_before
    assert Configuration.objects.get(name="edge").versions.count() == 2


def test_staff_may_read_and_a_superuser_may_write(db):
    staff = token_client(UserFactory(username="sam", is_staff=True))
    root = token_client(UserFactory(username="root", is_staff=True, is_superuser=True))
    assert staff.get("/api/v1/configurations/").status_code == 200
    assert staff.post("/api/v1/configurations/", {"name": "x"}, format="json").status_code == 403
    assert root.post("/api/v1/configurations/", {"name": "x"}, format="json").status_code == 201


def test_create_roles_is_idempotent_and_grants_a_role(capsys):
    user = UserFactory(username="dora")
    call_command("create_roles")
    call_command("create_roles", "--add-user", "dora", "--role", "operator")
    call_command("create_roles", "--add-user", "dora", "--role", "operator")
    assert list(user.groups.values_list("name", flat=True)) == [OPERATOR]
    assert "already has the operator role" in capsys.readouterr().out


# Configurations


def test_creating_a_configuration_takes_the_short_selector_form_and_shows_both_forms(api):
    response = api.post(
        "/api/v1/configurations/",
        {"name": "edge", "selector": "tier in (edge,core),env=prod", "priority": 5},
        format="json",
    )
    assert response.status_code == 201
    body = response.json()
    assert body["selector"] == {
        "matchLabels": {"env": "prod"},
        "matchExpressions": [{"key": "tier", "operator": "In", "values": ["core", "edge"]}],
    }
    assert body["selector_string"] == "env=prod,tier in (core,edge)"
    assert body["priority"] == 5
    assert body["current_version"] is None
    assert body["agent_count"] == 0


def test_creating_a_configuration_takes_the_dict_selector_form(api):
    selector = {"matchExpressions": [{"key": "legacy", "operator": "DoesNotExist"}]}
    response = api.post("/api/v1/configurations/", {"name": "edge", "selector": selector}, format="json")
    assert response.status_code == 201
    assert response.json()["selector_string"] == "!legacy"


def test_creating_a_configuration_is_audited_with_who_and_what(api, operator):
    api.post("/api/v1/configurations/", {"name": "edge", "selector": "env=prod"}, format="json")
    event = AuditEvent.objects.get(action="configuration.create")
    assert event.actor == operator
    assert event.details["name"] == "edge"
    assert event.details["selector"] == {"matchLabels": {"env": "prod"}}


def test_the_configuration_list_shows_the_current_version_and_agent_count(api, edge):
    resolve(checkout_agent())
    response = api.get("/api/v1/configurations/")
    assert response.status_code == 200
    (item,) = response.json()["results"]
    assert item["name"] == "edge"
    assert item["current_version"] == {
        "number": 2,
        "config_hash": ConfigVersion.objects.get(configuration=edge, number=2).config_hash,
    }
    assert item["agent_count"] == 1


def test_a_taken_name_is_a_400_naming_the_field(api, edge):
    response = api.post("/api/v1/configurations/", {"name": "edge"}, format="json")
    assert response.status_code == 400
    assert response.json() == {
        "detail": CONFIGURATION_NAME_TAKEN.format(name="edge"),
        "field": "name",
        "problems": [CONFIGURATION_NAME_TAKEN.format(name="edge")],
    }


def test_a_malformed_selector_is_a_400_with_the_parser_message(api):
    response = api.post("/api/v1/configurations/", {"name": "edge", "selector": "tier in (edge"}, format="json")
    assert response.status_code == 400
    assert response.json()["field"] == "selector"
    assert "unclosed parenthesis" in response.json()["detail"]


def test_an_invalid_selector_operator_is_a_400_with_the_parser_message(api):
    selector = {"matchExpressions": [{"key": "env", "operator": "Near", "values": ["x"]}]}
    response = api.post("/api/v1/configurations/", {"name": "edge", "selector": selector}, format="json")
    assert response.status_code == 400
    assert 'operator "Near" is not one of In, NotIn, Exists, DoesNotExist' in response.json()["detail"]


def test_a_selector_of_the_wrong_type_is_a_400(api):
    response = api.post("/api/v1/configurations/", {"name": "edge", "selector": ["env=prod"]}, format="json")
    assert response.status_code == 400
    assert "selector" in response.json()


def test_a_name_with_a_slash_is_refused(api):
    response = api.post("/api/v1/configurations/", {"name": "a/b"}, format="json")
    assert response.status_code == 400
    assert "name" in response.json()


def test_retrieving_an_unknown_configuration_is_a_404(api):
    assert api.get("/api/v1/configurations/nope/").status_code == 404


def test_patch_changes_only_the_given_fields_and_is_audited(api, edge, operator):
    response = api.patch("/api/v1/configurations/edge/", {"priority": 3}, format="json")
    assert response.status_code == 200
    assert response.json()["priority"] == 3
    assert response.json()["selector_string"] == "service.name=checkout"
    event = AuditEvent.objects.get(action="configuration.update")
    assert (event.actor, event.details) == (operator, {"priority": 3})


def test_put_replaces_every_field_and_a_new_selector_moves_agents(api, edge):
    checkout_agent(service="payments")
    response = api.put(
        "/api/v1/configurations/edge/", {"name": "edge", "selector": "service.name=payments"}, format="json"
    )
    assert response.status_code == 200
    assert response.json()["priority"] == 0
    assert response.json()["agent_count"] == 1


def test_renaming_a_configuration_moves_its_url(api, edge):
    assert api.patch("/api/v1/configurations/edge/", {"name": "edge-eu"}, format="json").status_code == 200
    assert api.get("/api/v1/configurations/edge-eu/").status_code == 200
    assert api.get("/api/v1/configurations/edge/").status_code == 404


def test_deleting_a_configuration_releases_its_agents_and_is_audited(api, edge, operator):
    agent = checkout_agent()
    resolve(agent)
    assert desired_version_number(agent) == 2
    assert api.delete("/api/v1/configurations/edge/").status_code == 204
    assert not Configuration.objects.filter(name="edge").exists()
    assert desired_version_number(agent) is None
    event = AuditEvent.objects.get(action="configuration.delete")
    assert (event.actor, event.details) == (operator, {"name": "edge"})


def test_a_delete_blocked_by_a_protecting_reference_is_a_409_not_a_500(api, edge, monkeypatch):
    def blocked(**kwargs: Any) -> None:
        raise ProtectedError("protected", {edge.current_version})

    monkeypatch.setattr(services, "configuration_delete", blocked)
    response = api.delete("/api/v1/configurations/edge/")
    assert response.status_code == 409
    assert response.json() == {"detail": STILL_REFERENCED, "field": None, "problems": ["edge v2"]}


def test_a_domain_error_keeps_the_status_it_carries(api, edge, monkeypatch):
    def refused(**kwargs: Any) -> None:
        raise DomainError("configuration 'edge' has an active rollout", field="configuration", status=409)

    monkeypatch.setattr(services, "configuration_publish", refused)
    response = api.post("/api/v1/configurations/edge/versions/", {"files": COLLECTOR_V1}, format="json")
    assert response.status_code == 409
    assert response.json()["field"] == "configuration"


def test_the_configuration_api_takes_json_only(api):
    response = api.post("/api/v1/configurations/", {"name": "edge"})  # multipart
    assert response.status_code == 415


# Versions


def test_publishing_creates_the_next_version_and_delivers_it(api, operator):
    services.configuration_create(name="edge", selector="service.name=checkout", actor=operator)
    agent = checkout_agent()
    response = api.post(
        "/api/v1/configurations/edge/versions/", {"files": COLLECTOR_V1, "note": "otlp only"}, format="json"
    )
    assert response.status_code == 201
    body = response.json()
    assert (body["number"], body["author"], body["note"], body["rolled_back_from"]) == (1, "olivia", "otlp only", None)
    assert body["size_bytes"] == len(COLLECTOR_V1["collector.yaml"]["body"])
    assert len(body["config_hash"]) == 64
    assert desired_version_number(agent) == 1
    event = AuditEvent.objects.get(action="configuration.publish")
    assert (event.actor, event.details["number"], event.details["configuration"]) == (operator, 1, "edge")


def test_publishing_identical_content_answers_200_with_the_current_version(api, edge):
    response = api.post("/api/v1/configurations/edge/versions/", {"files": COLLECTOR_V2}, format="json")
    assert response.status_code == 200
    assert response.json()["number"] == 2
    assert edge.versions.count() == 2


INVALID_FILES = [
    pytest.param(
        {"c.yaml": {"body": "receivers: [otlp", "content_type": "text/yaml"}}, "file 'c.yaml': invalid YAML", id="yaml"
    ),
    pytest.param(
        {"c.json": {"body": '{"receivers": ', "content_type": "application/json"}},
        "file 'c.json': invalid JSON",
        id="json",
    ),
    pytest.param(
        {"c.toml": {"body": "a = 1", "content_type": "application/toml"}},
        "file 'c.toml': content type 'application/toml' is not one of",
        id="content-type",
    ),
    pytest.param(
        {"c.yaml": {"body": "a: " + "x" * 2000, "content_type": "text/yaml"}},
        "file 'c.yaml': 2003 bytes is over the per-file limit of 1000",
        id="oversized",
    ),
    pytest.param({"c.yaml": "receivers: {}"}, "file 'c.yaml': expected an object", id="shape"),
]


@pytest.mark.parametrize(("files", "problem"), INVALID_FILES)
def test_invalid_files_are_a_400_listing_the_problem(api, edge, settings, files, problem):
    settings.OPAMP_CONFIG_MAX_FILE_BYTES = 1000
    response = api.post("/api/v1/configurations/edge/versions/", {"files": files}, format="json")
    assert response.status_code == 400
    body = response.json()
    assert (body["detail"], body["field"]) == (CONFIG_FILES_INVALID, "files")
    assert any(p.startswith(problem) for p in body["problems"]), body["problems"]
    assert edge.versions.count() == 2


def test_every_problem_of_a_config_map_is_listed(api, edge):
    files = {
        "a.yaml": {"body": "a: [", "content_type": "text/yaml"},
        "b.json": {"body": "{", "content_type": "application/json"},
    }
    response = api.post("/api/v1/configurations/edge/versions/", {"files": files}, format="json")
    assert len(response.json()["problems"]) == 2


def test_publishing_to_an_unknown_configuration_is_a_404(api):
    response = api.post("/api/v1/configurations/nope/versions/", {"files": COLLECTOR_V1}, format="json")
    assert response.status_code == 404


def test_the_version_list_is_newest_first_with_author_and_size(api, edge):
    response = api.get("/api/v1/configurations/edge/versions/")
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 2
    assert [v["number"] for v in body["results"]] == [2, 1]
    assert [v["note"] for v in body["results"]] == ["second", "first"]
    assert {v["author"] for v in body["results"]} == {"olivia"}
    assert "files" not in body["results"][0]


def test_a_version_shows_its_files(api, edge):
    response = api.get("/api/v1/configurations/edge/versions/1/")
    assert response.status_code == 200
    assert response.json()["files"] == COLLECTOR_V1


def test_an_unknown_version_is_a_404(api, edge):
    assert api.get("/api/v1/configurations/edge/versions/9/").status_code == 404
    assert api.get("/api/v1/configurations/edge/versions/9/status/").status_code == 404


def test_version_status_counts_how_its_agents_are_doing(api, edge):
    version = edge.current_version
    applied = checkout_agent(remote_config_hash=version.config_hash, remote_config_state=RemoteConfigState.APPLIED)
    failed = checkout_agent(remote_config_hash=version.config_hash, remote_config_state=RemoteConfigState.FAILED)
    pending = checkout_agent()
    offline = checkout_agent(connected=False)
    for agent in (applied, failed, pending, offline):
        resolve(agent)
    response = api.get("/api/v1/configurations/edge/versions/2/status/")
    assert response.status_code == 200
    assert response.json() == {"total": 4, "applied": 1, "applying": 0, "failed": 1, "pending": 1, "offline": 1}


def test_diff_shows_a_unified_diff_per_changed_file(api, edge):
    response = api.get("/api/v1/configurations/edge/diff/", {"from": 1, "to": 2})
    assert response.status_code == 200
    body = response.json()
    assert (body["from"], body["to"]) == (1, 2)
    diff = body["files"]["collector.yaml"]
    assert diff.startswith("--- v1/collector.yaml\n+++ v2/collector.yaml\n@@")
    assert "+  prometheus: {}\n" in diff


def test_diff_without_both_numbers_is_a_400(api, edge):
    response = api.get("/api/v1/configurations/edge/diff/", {"from": 1})
    assert response.status_code == 400
    assert "to" in response.json()


def test_diff_with_an_unknown_number_is_a_400_naming_it(api, edge):
    response = api.get("/api/v1/configurations/edge/diff/", {"from": 1, "to": 7})
    assert response.status_code == 400
    assert response.json()["detail"] == NO_SUCH_VERSION.format(name="edge", number=7)
    assert response.json()["field"] == "to"


def test_rollback_creates_a_higher_numbered_version_with_the_old_hash(api, edge, operator):
    agent = checkout_agent()
    resolve(agent)
    response = api.post("/api/v1/configurations/edge/rollback/", {"version": 1, "note": "bad scrape"}, format="json")
    assert response.status_code == 201
    body = response.json()
    v1 = edge.versions.get(number=1)
    assert (body["number"], body["config_hash"], body["rolled_back_from"]) == (3, v1.config_hash, 1)
    assert body["note"] == "bad scrape"
    assert desired_version_number(agent) == 3
    event = AuditEvent.objects.get(action="configuration.rollback")
    assert (event.actor, event.details["restores"]) == (operator, 1)


def test_rollback_to_an_unknown_version_is_a_400(api, edge):
    response = api.post("/api/v1/configurations/edge/rollback/", {"version": 9}, format="json")
    assert response.status_code == 400
    assert response.json()["detail"] == NO_SUCH_VERSION.format(name="edge", number=9)


# Selectors


def test_the_preview_counts_the_matching_agents_by_status(api):
    checkout_agent(labels={"env": "prod", "tier": "edge"})
    checkout_agent(labels={"env": "prod", "tier": "core"}, healthy=False)
    checkout_agent(labels={"env": "prod", "tier": "edge"}, connected=False)
    checkout_agent(labels={"env": "dev", "tier": "edge"})
    response = api.post("/api/v1/selectors/preview/", {"selector": "env=prod,tier in (edge,core)"}, format="json")
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 3
    assert body["by_status"] == {"online": 1, "unhealthy": 1, "offline": 1}
    assert body["selector_string"] == "env=prod,tier in (core,edge)"
    assert body["selector"]["matchLabels"] == {"env": "prod"}
    assert len(body["agents"]) == 3
    assert {"instance_uid", "status", "identifying_attributes"} <= set(body["agents"][0])


def test_the_preview_lists_at_most_100_agents(api):
    AgentFactory.create_batch(101, labels={"env": "prod"})
    body = api.post("/api/v1/selectors/preview/", {"selector": {"matchLabels": {"env": "prod"}}}, format="json").json()
    assert (body["count"], len(body["agents"])) == (101, 100)


def test_a_bad_selector_preview_is_a_400_with_the_message(api):
    response = api.post("/api/v1/selectors/preview/", {"selector": "env in ()"}, format="json")
    assert response.status_code == 400
    assert response.json()["field"] == "selector"
    assert response.json()["detail"]


# Agents


def test_an_agents_labels_show_operator_labels_and_the_merged_result(api):
    agent = checkout_agent(operator_labels={"env": "prod"})
    response = api.get(f"/api/v1/agents/{agent.instance_uid}/labels/")
    assert response.json() == {
        "operator_labels": {"env": "prod"},
        "labels": {"service.name": "checkout", "os.type": "linux", "env": "prod"},
    }


def test_put_labels_replaces_them_and_moves_the_desired_config(api, edge, operator):
    services.configuration_create(name="prod", selector="env=prod", priority=20, actor=operator)
    services.configuration_publish(
        configuration=Configuration.objects.get(name="prod"), files=COLLECTOR_V1, author=None
    )
    agent = checkout_agent(operator_labels={"team": "a"})
    response = api.put(f"/api/v1/agents/{agent.instance_uid}/labels/", {"labels": {"env": "prod"}}, format="json")
    assert response.status_code == 200
    assert response.json() == {
        "operator_labels": {"env": "prod"},
        "labels": {"service.name": "checkout", "os.type": "linux", "env": "prod"},
    }
    assert AgentDesiredConfig.objects.get(agent=agent).configuration.name == "prod"
    event = AuditEvent.objects.get(action="agent.labels.set")
    assert (event.actor, event.details["before"], event.details["after"]) == (operator, {"team": "a"}, {"env": "prod"})


def test_patch_labels_merges_them_and_moves_the_desired_config(api, edge):
    agent = checkout_agent(operator_labels={"team": "a"})
    response = api.patch(
        f"/api/v1/agents/{agent.instance_uid}/labels/", {"labels": {"service.name": "payments"}}, format="json"
    )
    assert response.status_code == 200
    assert response.json()["operator_labels"] == {"team": "a", "service.name": "payments"}
    assert response.json()["labels"]["service.name"] == "payments"
    assert not AgentDesiredConfig.objects.filter(agent=agent).exists()
    response = api.patch(
        f"/api/v1/agents/{agent.instance_uid}/labels/", {"labels": {"service.name": "checkout"}}, format="json"
    )
    assert AgentDesiredConfig.objects.get(agent=agent).version.number == 2


def test_a_label_value_that_is_not_a_string_is_a_400(api):
    agent = checkout_agent()
    response = api.put(f"/api/v1/agents/{agent.instance_uid}/labels/", {"labels": {"env": 1}}, format="json")
    assert response.status_code == 400
    assert response.json()["field"] == "labels"


def test_labels_of_an_unknown_agent_are_a_404(api):
    response = api.put(
        "/api/v1/agents/0190f8f6-0000-7000-8000-000000000000/labels/", {"labels": {"env": "x"}}, format="json"
    )
    assert response.status_code == 404


def test_the_agent_config_state_says_what_it_runs_and_whether_it_drifts(api, edge):
    version = edge.current_version
    agent = checkout_agent(
        remote_config_hash=version.config_hash,
        remote_config_state=RemoteConfigState.FAILED,
        remote_config_error="unknown receiver",
        effective_config_hash="ab" * 32,
    )
    resolve(agent)
    response = api.get(f"/api/v1/agents/{agent.instance_uid}/config/")
    assert response.status_code == 200
    assert response.json() == {
        "configuration": "edge",
        "desired_version": 2,
        "desired_hash": version.config_hash,
        "reported_hash": version.config_hash,
        "state": "failed",
        "error": "unknown receiver",
        "effective_hash": "ab" * 32,
        "drift": True,
        "summary": "failed on version 2: unknown receiver (effective config differs)",
    }


def test_the_agents_list_of_the_fleet_api_still_answers(api):
    agent = checkout_agent()
    assert api.get("/api/v1/agents/").status_code == 200
    assert api.get(f"/api/v1/agents/{agent.instance_uid}/").status_code == 200


# Audit


def test_the_audit_list_is_newest_first_and_says_who(api, edge):
    response = api.get("/api/v1/audit/")
    assert response.status_code == 200
    actions = [(e["action"], e["actor"]) for e in response.json()["results"]]
    assert actions == [
        ("configuration.publish", "olivia"),
        ("configuration.publish", "olivia"),
        ("configuration.create", "olivia"),
    ]
    assert response.json()["results"][0]["details"]["number"] == 2


def test_the_audit_list_filters_by_action_and_target_type(api, edge):
    agent = checkout_agent()
    api.put(f"/api/v1/agents/{agent.instance_uid}/labels/", {"labels": {"env": "prod"}}, format="json")
    by_action = api.get("/api/v1/audit/", {"action": "configuration.create"}).json()["results"]
    by_type = api.get("/api/v1/audit/", {"target_type": "Agent"}).json()["results"]
    assert [e["target_id"] for e in by_action] == [str(edge.pk)]
    assert [e["action"] for e in by_type] == ["agent.labels.set"]


# Schema


def test_the_schema_lists_the_configuration_endpoints(api):
    response = api.get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert {
        "/api/v1/configurations/",
        "/api/v1/configurations/{name}/",
        "/api/v1/configurations/{name}/versions/",
        "/api/v1/configurations/{name}/versions/{number}/",
        "/api/v1/configurations/{name}/versions/{number}/status/",
        "/api/v1/configurations/{name}/diff/",
        "/api/v1/configurations/{name}/rollback/",
        "/api/v1/selectors/preview/",
        "/api/v1/agents/{instance_uid}/labels/",
        "/api/v1/agents/{instance_uid}/config/",
        "/api/v1/audit/",
        "/api/v1/agents/",
    } <= set(paths)
    assert set(paths["/api/v1/agents/{instance_uid}/labels/"]) == {"get", "put", "patch"}
    assert {p["name"] for p in paths["/api/v1/configurations/{name}/diff/"]["get"]["parameters"]} >= {"from", "to"}


def test_the_schema_is_generated_without_warnings(tmp_path):
    # --fail-on-warn turns every drf-spectacular warning (an untyped field, a view
    # without a serializer) into an error.
    call_command("spectacular", "--fail-on-warn", "--validate", "--file", str(tmp_path / "schema.yaml"))
