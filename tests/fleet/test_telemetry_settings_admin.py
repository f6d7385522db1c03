"""Telemetry connection settings in the admin and on the agent's page."""

from __future__ import annotations

import pytest
from django.test import Client

from fleet.models import AuditEvent, TelemetryConnectionSettings
from fleet.roles import VIEWER, grant_role
from tests.fleet.factories import AgentFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def root() -> Client:
    client = Client()
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    return client


def form(**values: str) -> dict[str, str]:
    return {
        "name": "prod",
        "description": "",
        "selector": "env=prod",
        "priority": "5",
        "own_metrics": '{"destination_endpoint": "https://otlp.example/v1/metrics"}',
        "own_traces": "",
        "own_logs": "",
        "other_connections": "",
        "heartbeat_interval_seconds": "",
        **values,
    }


def test_an_entry_is_created_through_the_service_and_audited(root: Client):
    response = root.post("/admin/fleet/telemetryconnectionsettings/add/", form())
    assert response.status_code == 302, response.content.decode()[:2000]
    entry = TelemetryConnectionSettings.objects.get()
    assert entry.selector == {"matchLabels": {"env": "prod"}}
    assert entry.own_metrics == {"destination_endpoint": "https://otlp.example/v1/metrics"}
    assert entry.other_connections == {} and entry.own_traces is None
    assert AuditEvent.objects.filter(action="telemetry_settings.create", actor__username="root").exists()
    listing = root.get("/admin/fleet/telemetryconnectionsettings/")
    assert b"own_metrics" in listing.content and b"env=prod" in listing.content


def test_a_bad_destination_is_shown_on_the_form_and_nothing_is_saved(root: Client):
    response = root.post(
        "/admin/fleet/telemetryconnectionsettings/add/",
        form(own_logs='{"destination_endpoint": "ftp://x"}'),
        follow=True,
    )
    assert b"http:// or https://" in response.content
    assert not TelemetryConnectionSettings.objects.exists() and not AuditEvent.objects.exists()


def test_a_viewer_cannot_add_entries_and_sees_no_header_values(root: Client):
    viewer = UserFactory(username="viewer", is_staff=True)
    grant_role(user=viewer, role=VIEWER)
    client = Client()
    client.force_login(viewer)
    assert client.post("/admin/fleet/telemetryconnectionsettings/add/", form()).status_code == 403
    assert not TelemetryConnectionSettings.objects.exists()
    secret = '{"destination_endpoint": "https://o.example/v1/logs", "headers": {"X-Api-Key": "s3cret"}}'
    assert root.post("/admin/fleet/telemetryconnectionsettings/add/", form(own_logs=secret)).status_code == 302
    entry = TelemetryConnectionSettings.objects.get()
    page = client.get(f"/admin/fleet/telemetryconnectionsettings/{entry.pk}/change/")
    assert page.status_code == 200
    assert "X-Api-Key" in page.content.decode() and "s3cret" not in page.content.decode()
    assert "s3cret" in root.get(f"/admin/fleet/telemetryconnectionsettings/{entry.pk}/change/").content.decode()


STATUS = {"last_connection_settings_hash": "ab" * 32, "status": 3, "error_message": "no route to <collector>"}


def test_the_agent_admin_and_the_agent_page_show_the_reported_status(root: Client):
    agent = AgentFactory(connection_settings_status=STATUS)
    admin_page = root.get(f"/admin/fleet/agent/{agent.pk}/change/").content.decode()
    assert "connection settings status" in admin_page.lower() and "no route to &lt;collector&gt;" in admin_page
    page = root.get(f"/fleet/{agent.instance_uid}/").content.decode()
    assert 'id="connection-settings"' in page and "failed <code>abababababababab</code>" in page
    assert "no route to &lt;collector&gt;" in page
    never = AgentFactory()
    assert "not reported" in root.get(f"/fleet/{never.instance_uid}/").content.decode()
