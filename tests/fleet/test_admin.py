from __future__ import annotations

import pytest
from django.test import Client

from fleet.models import Agent, AgentCommand, AuditEvent
from tests.fleet.factories import AgentFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client_logged_in() -> Client:
    user = UserFactory(username="root", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(user)
    return client


def listed(client: Client, **params: str) -> set[str]:
    page = client.get("/admin/fleet/agent/", params)
    assert page.status_code == 200
    return {agent.identifying_attributes["service.name"] for agent in page.context["cl"].result_list}


def test_the_agent_list_filters_by_status_capability_and_attribute(admin_client_logged_in):
    AgentFactory(identifying_attributes={"service.name": "checkout"}, capabilities=0x3)
    AgentFactory(identifying_attributes={"service.name": "payments"}, capabilities=0x1, healthy=False)
    client = admin_client_logged_in
    assert listed(client) == {"checkout", "payments"}
    assert listed(client, status="unhealthy") == {"payments"}
    assert listed(client, capability="accepts_remote_config") == {"checkout"}
    assert listed(client, attr_service_name="payments") == {"payments"}


def test_the_agent_detail_shows_health_and_config_escaped_and_read_only(admin_client_logged_in):
    agent = AgentFactory(
        identifying_attributes={"service.name": "<script>alert(1)</script>"},
        health={"healthy": False, "last_error": "exporter refused"},
        effective_config={"c.yaml": {"body": "receivers: {}", "content_type": "text/yaml", "size": 14}},
    )
    page = admin_client_logged_in.get(f"/admin/fleet/agent/{agent.pk}/change/")
    assert page.status_code == 200
    assert b"exporter refused" in page.content
    assert b"receivers: {}" in page.content
    assert b"<script>alert(1)</script>" not in page.content
    assert b'name="_save"' not in page.content


def test_the_restart_action_asks_agents_that_accept_restarts_and_is_audited(admin_client_logged_in):
    able = AgentFactory(capabilities=0x401)
    AgentFactory(capabilities=0x1)
    page = admin_client_logged_in.post(
        "/admin/fleet/agent/",
        {"action": "restart_agents", "_selected_action": [str(agent.pk) for agent in Agent.objects.all()]},
        follow=True,
    )
    assert page.status_code == 200
    assert b"1 restart(s) requested" in page.content and b"do not accept restart commands" in page.content
    assert list(AgentCommand.objects.values_list("agent_id", flat=True)) == [able.pk]
    assert AuditEvent.objects.get(action="agent.restart").actor.username == "root"
