"""The admin for configurations: pages render, and every change goes through the services."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.messages import get_messages
from django.test import Client

from fleet.models import AuditEvent
from fleet.roles import OPERATOR, VIEWER, grant_role
from rollouts import desired_state, services
from rollouts.models import AgentDesiredConfig, Configuration, ConfigVersion
from tests.fleet.factories import AgentFactory, UserFactory

pytestmark = pytest.mark.django_db

COLLECTOR_V1 = {"collector.yaml": {"body": "receivers:\n  otlp: {}\n", "content_type": "text/yaml"}}
COLLECTOR_V2 = {"collector.yaml": {"body": "receivers:\n  otlp: {}\n  prometheus: {}\n", "content_type": "text/yaml"}}


@pytest.fixture
def edge(root: Any) -> Configuration:
    configuration = services.configuration_create(name="edge", selector="service.name=checkout", actor=root)
    services.configuration_publish(configuration=configuration, files=COLLECTOR_V1, author=root, note="first")
    services.configuration_publish(configuration=configuration, files=COLLECTOR_V2, author=root, note="second")
    configuration.refresh_from_db()
    return configuration


@pytest.fixture
def checkout_agent(edge: Configuration) -> Any:
    agent = AgentFactory(identifying_attributes={"service.name": "checkout"}, labels={"service.name": "checkout"})
    desired_state.resolve_agent(agent.pk)
    return agent


def staff_client(username: str, role: str) -> Client:
    user = UserFactory(username=username, is_staff=True)
    grant_role(user=user, role=role)
    client = Client()
    client.force_login(user)
    return client


def messages_of(response: Any) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


# Pages


def test_the_configuration_list_shows_selector_current_version_and_agent_count(admin_client, checkout_agent):
    page = admin_client.get("/admin/rollouts/configuration/")
    assert page.status_code == 200
    assert b"service.name=checkout" in page.content
    assert b">v2</a>" in page.content
    (row,) = page.context["cl"].result_list
    assert row.agent_count == 1


def test_the_configuration_page_shows_its_versions_read_only(admin_client, edge):
    page = admin_client.get(f"/admin/rollouts/configuration/{edge.pk}/change/")
    assert page.status_code == 200
    assert page.context["adminform"].form.initial["selector"] == "service.name=checkout"
    assert b"second" in page.content and b"first" in page.content
    assert b"Publish a new version" in page.content
    assert b'name="versions-0-note"' not in page.content


@pytest.mark.parametrize(
    "url",
    [
        "/admin/rollouts/configversion/",
        "/admin/rollouts/agentdesiredconfig/",
        "/admin/fleet/auditevent/",
        "/admin/fleet/auditevent/?action__exact=configuration.publish",
        "/admin/rollouts/configuration/add/",
        "/admin/rollouts/configversion/add/",
    ],
)
def test_the_other_pages_render(admin_client, checkout_agent, url):
    assert admin_client.get(url).status_code == 200


def test_the_desired_config_and_audit_pages_are_read_only(admin_client, checkout_agent):
    desired = AgentDesiredConfig.objects.get(agent=checkout_agent)
    event = AuditEvent.objects.first()
    for url in [
        f"/admin/rollouts/agentdesiredconfig/{desired.pk}/change/",
        f"/admin/fleet/auditevent/{event.pk}/change/",
    ]:
        page = admin_client.get(url)
        assert page.status_code == 200
        assert b'name="_save"' not in page.content
    assert admin_client.get("/admin/fleet/auditevent/add/").status_code == 403


def test_a_version_page_shows_escaped_files_status_counts_and_the_diff(admin_client, root):
    configuration = services.configuration_create(name="edge", actor=root)
    services.configuration_publish(configuration=configuration, files=COLLECTOR_V1, author=root)
    html = {"index.txt": {"body": "<script>alert(1)</script>\n", "content_type": "text/plain"}}
    version, _ = services.configuration_publish(configuration=configuration, files=html, author=root)
    page = admin_client.get(f"/admin/rollouts/configversion/{version.pk}/change/")
    assert page.status_code == 200
    assert b"<script>alert(1)</script>" not in page.content
    assert b"&lt;script&gt;alert(1)&lt;/script&gt;" in page.content
    assert b"+++ v2/index.txt" in page.content
    assert b"--- v1/collector.yaml" in page.content
    assert b"total: 0" in page.content
    assert b'name="_save"' not in page.content


def test_a_version_cannot_be_changed_or_deleted_in_the_admin(admin_client, edge):
    version = edge.current_version
    assert admin_client.post(f"/admin/rollouts/configversion/{version.pk}/change/", {"note": "x"}).status_code == 403
    assert admin_client.post(f"/admin/rollouts/configversion/{version.pk}/delete/", {"post": "yes"}).status_code == 403
    version.refresh_from_db()
    assert version.note == "second"


# Configurations through the services


def test_creating_a_configuration_in_the_admin_is_audited(admin_client, root):
    response = admin_client.post(
        "/admin/rollouts/configuration/add/",
        {"name": "edge", "description": "edge collectors", "selector": "tier in (edge), env=prod", "priority": "5"},
    )
    assert response.status_code == 302
    configuration = Configuration.objects.get(name="edge")
    assert configuration.selector == {
        "matchLabels": {"env": "prod"},
        "matchExpressions": [{"key": "tier", "operator": "In", "values": ["edge"]}],
    }
    assert configuration.created_by == root
    event = AuditEvent.objects.get(action="configuration.create")
    assert (event.actor, event.target_id) == (root, str(configuration.pk))


def test_the_selector_may_be_given_in_its_json_form(admin_client):
    selector = json.dumps({"matchExpressions": [{"key": "legacy", "operator": "DoesNotExist"}]})
    response = admin_client.post(
        "/admin/rollouts/configuration/add/", {"name": "edge", "selector": selector, "priority": "0"}
    )
    assert response.status_code == 302
    assert Configuration.objects.get(name="edge").selector == {
        "matchExpressions": [{"key": "legacy", "operator": "DoesNotExist"}]
    }


def test_an_invalid_selector_is_a_form_error(admin_client):
    response = admin_client.post(
        "/admin/rollouts/configuration/add/", {"name": "edge", "selector": "tier in (edge", "priority": "0"}
    )
    assert response.status_code == 200
    assert "unclosed parenthesis" in str(response.context["adminform"].form.errors["selector"])
    assert not Configuration.objects.exists()


def test_a_taken_name_is_a_form_error(admin_client, edge):
    response = admin_client.post("/admin/rollouts/configuration/add/", {"name": "edge", "priority": "0"})
    assert response.status_code == 200
    assert "name" in response.context["adminform"].form.errors


def test_editing_a_configuration_in_the_admin_is_audited_and_moves_agents(admin_client, root, checkout_agent, edge):
    response = admin_client.post(
        f"/admin/rollouts/configuration/{edge.pk}/change/",
        {
            "name": "edge",
            "selector": "service.name=payments",
            "priority": "0",
            "description": "",
            # the read-only versions inline still posts its management form
            "versions-TOTAL_FORMS": "0",
            "versions-INITIAL_FORMS": "0",
        },
    )
    assert response.status_code == 302, response.context and response.context["adminform"].form.errors
    event = AuditEvent.objects.get(action="configuration.update")
    assert (event.actor, event.details["selector"]) == (root, {"matchLabels": {"service.name": "payments"}})
    assert not AgentDesiredConfig.objects.filter(agent=checkout_agent).exists()


def test_deleting_a_configuration_in_the_admin_goes_through_the_service(admin_client, root, checkout_agent, edge):
    confirmation = admin_client.get(f"/admin/rollouts/configuration/{edge.pk}/delete/")
    assert confirmation.status_code == 200
    assert not confirmation.context["protected"]
    assert not confirmation.context["perms_lacking"]
    response = admin_client.post(f"/admin/rollouts/configuration/{edge.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not Configuration.objects.exists()
    assert not AgentDesiredConfig.objects.exists()
    assert AuditEvent.objects.get(action="configuration.delete").actor == root


def test_deleting_selected_configurations_goes_through_the_service(admin_client, root, edge):
    response = admin_client.post(
        "/admin/rollouts/configuration/",
        {"action": "delete_selected", "_selected_action": [edge.pk], "post": "yes"},
    )
    assert response.status_code == 302
    assert not Configuration.objects.exists()
    assert AuditEvent.objects.filter(action="configuration.delete").count() == 1


def test_the_rollback_action_restores_the_previous_version(admin_client, root, checkout_agent, edge):
    response = admin_client.post(
        "/admin/rollouts/configuration/",
        {"action": "roll_back_to_previous_version", "_selected_action": [edge.pk]},
        follow=True,
    )
    assert "edge: version 3 restores version 1" in messages_of(response)
    edge.refresh_from_db()
    assert (edge.current_version.number, edge.current_version.rolled_back_from.number) == (3, 1)
    assert edge.current_version.config_hash == edge.versions.get(number=1).config_hash
    assert AgentDesiredConfig.objects.get(agent=checkout_agent).version.number == 3
    assert AuditEvent.objects.get(action="configuration.rollback").actor == root


def test_the_rollback_action_explains_when_there_is_nothing_to_roll_back_to(admin_client, root):
    configuration = services.configuration_create(name="fresh", actor=root)
    services.configuration_publish(configuration=configuration, files=COLLECTOR_V1, author=root)
    response = admin_client.post(
        "/admin/rollouts/configuration/",
        {"action": "roll_back_to_previous_version", "_selected_action": [configuration.pk]},
        follow=True,
    )
    assert "fresh: no earlier version to roll back to" in messages_of(response)
    assert configuration.versions.count() == 1


# Publishing through the admin


def test_publishing_in_the_admin_makes_the_next_version_and_is_audited(admin_client, root, checkout_agent, edge):
    files = {"collector.yaml": {"body": "receivers: {}\n", "content_type": "text/yaml"}}
    response = admin_client.post(
        "/admin/rollouts/configversion/add/",
        {"configuration": edge.pk, "files": json.dumps(files), "note": "from the admin"},
    )
    assert response.status_code == 302
    version = edge.versions.get(number=3)
    assert (version.author, version.note, version.files) == (root, "from the admin", files)
    assert AgentDesiredConfig.objects.get(agent=checkout_agent).version == version
    event = AuditEvent.objects.filter(action="configuration.publish").first()
    assert (event.actor, event.details["number"]) == (root, 3)


def test_publishing_identical_files_in_the_admin_makes_no_new_version(admin_client, edge):
    response = admin_client.post(
        "/admin/rollouts/configversion/add/",
        {"configuration": edge.pk, "files": json.dumps(COLLECTOR_V2), "note": ""},
        follow=True,
    )
    assert response.status_code == 200
    assert edge.versions.count() == 2
    assert any("identical to the current version 2" in message for message in messages_of(response))


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        pytest.param(
            json.dumps({"c.yaml": {"body": "a: [", "content_type": "text/yaml"}}),
            "file &#x27;c.yaml&#x27;: invalid YAML",
            id="yaml",
        ),
        pytest.param(
            json.dumps({"c.toml": {"body": "a = 1", "content_type": "application/toml"}}),
            "content type &#x27;application/toml&#x27; is not one of",
            id="content-type",
        ),
        pytest.param("{not json", "the files are not valid JSON", id="not-json"),
    ],
)
def test_invalid_files_are_shown_as_form_errors(admin_client, edge, files, problem):
    response = admin_client.post(
        "/admin/rollouts/configversion/add/", {"configuration": edge.pk, "files": files, "note": ""}
    )
    assert response.status_code == 200
    assert problem in response.content.decode()
    assert edge.versions.count() == 2
    assert not AuditEvent.objects.filter(action="configuration.publish", details__number=3).exists()


# Roles in the admin


def test_a_viewer_sees_the_configurations_but_cannot_change_them(edge):
    client = staff_client("victor", VIEWER)
    assert client.get("/admin/rollouts/configuration/").status_code == 200
    page = client.get(f"/admin/rollouts/configuration/{edge.pk}/change/")
    assert page.status_code == 200
    assert b'name="_save"' not in page.content
    assert client.get("/admin/rollouts/configversion/add/").status_code == 403
    response = client.post(f"/admin/rollouts/configuration/{edge.pk}/change/", {"name": "renamed", "priority": "0"})
    assert response.status_code == 403
    assert Configuration.objects.filter(name="edge").exists()


def test_an_operator_may_publish_in_the_admin(edge):
    client = staff_client("olivia", OPERATOR)
    files = {"collector.yaml": {"body": "receivers: {}\n", "content_type": "text/yaml"}}
    response = client.post(
        "/admin/rollouts/configversion/add/", {"configuration": edge.pk, "files": json.dumps(files), "note": ""}
    )
    assert response.status_code == 302
    assert edge.versions.filter(number=3, author__username="olivia").exists()


def test_a_staff_user_without_a_role_may_look_but_not_publish(edge):
    user = UserFactory(username="sam", is_staff=True)
    client = Client()
    client.force_login(user)
    assert client.get("/admin/rollouts/configuration/").status_code == 200
    files = json.dumps(COLLECTOR_V1)
    response = client.post("/admin/rollouts/configversion/add/", {"configuration": edge.pk, "files": files})
    assert response.status_code == 403
    assert ConfigVersion.objects.count() == 2


def test_a_user_who_is_not_staff_cannot_use_the_admin_whatever_their_role(edge):
    client = Client()
    user = UserFactory(username="olga")
    grant_role(user=user, role=OPERATOR)
    client.force_login(user)
    assert client.get("/admin/rollouts/configuration/").status_code == 302  # to the login page


def test_a_refusal_the_form_could_not_foresee_is_shown_and_nothing_is_saved(admin_client, monkeypatch):
    from fleet.errors import DomainError
    from rollouts.admin import configurations as rollouts_admin

    def refuse(**kwargs: Any) -> Configuration:
        Configuration.objects.create(name="half-made")  # must not survive the refusal
        raise DomainError("a configuration named 'edge' already exists", field="name")

    monkeypatch.setattr(rollouts_admin, "configuration_create", refuse)
    response = admin_client.post("/admin/rollouts/configuration/add/", {"name": "edge", "priority": "0"}, follow=True)
    assert response.status_code == 200
    assert "a configuration named 'edge' already exists" in messages_of(response)
    assert not Configuration.objects.exists()
