from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone
from rest_framework.test import APIClient

from tests.fleet.factories import AgentFactory

pytestmark = pytest.mark.django_db


def test_the_agent_list_requires_authentication():
    assert APIClient().get("/api/v1/agents/").status_code == 401


def test_a_bad_token_is_refused():
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-token")
    assert client.get("/api/v1/agents/").status_code == 401


def test_the_agent_list_is_paginated(api_client):
    AgentFactory.create_batch(5)
    page = api_client.get("/api/v1/agents/", {"limit": 2}).json()
    assert page["count"] == 5
    assert len(page["results"]) == 2
    assert page["next"]


def test_agents_are_filtered_by_status(api_client):
    online = AgentFactory()
    unhealthy = AgentFactory(healthy=False)
    offline = AgentFactory(last_seen=timezone.now() - timedelta(hours=1))
    disconnected = AgentFactory(connected=False)

    def uids(status: str) -> set[str]:
        return {a["instance_uid"] for a in api_client.get("/api/v1/agents/", {"status": status}).json()["results"]}

    assert uids("online") == {str(online.instance_uid)}
    assert uids("unhealthy") == {str(unhealthy.instance_uid)}
    assert uids("offline") == {str(offline.instance_uid), str(disconnected.instance_uid)}


@override_settings(OPAMP_HEARTBEAT_INTERVAL_SECONDS=10, OPAMP_OFFLINE_AFTER_MISSED_HEARTBEATS=3)
def test_the_offline_timeout_follows_the_heartbeat_interval(api_client):
    recent = AgentFactory(last_seen=timezone.now() - timedelta(seconds=20))
    AgentFactory(last_seen=timezone.now() - timedelta(seconds=60))
    results = api_client.get("/api/v1/agents/", {"status": "online"}).json()["results"]
    assert [a["instance_uid"] for a in results] == [str(recent.instance_uid)]


def test_agents_are_filtered_by_capability(api_client):
    accepts = AgentFactory(capabilities=0x3)
    AgentFactory(capabilities=0x1)
    results = api_client.get("/api/v1/agents/", {"capability": "accepts_remote_config"}).json()["results"]
    assert [a["instance_uid"] for a in results] == [str(accepts.instance_uid)]
    assert results[0]["capability_names"] == ["reports_status", "accepts_remote_config"]


def test_an_unknown_capability_filter_is_a_clear_400(api_client):
    response = api_client.get("/api/v1/agents/", {"capability": "flies"})
    assert response.status_code == 400
    assert "unknown capability" in str(response.json())


def test_agents_are_filtered_by_attribute(api_client):
    wanted = AgentFactory(identifying_attributes={"service.name": "checkout"})
    AgentFactory(identifying_attributes={"service.name": "payments"})
    linux = api_client.get("/api/v1/agents/", {"attribute": "os.type=linux"}).json()["count"]
    results = api_client.get("/api/v1/agents/", {"attribute": "service.name=checkout"}).json()["results"]
    assert [a["instance_uid"] for a in results] == [str(wanted.instance_uid)]
    assert linux == 2


def test_a_malformed_attribute_filter_is_a_clear_400(api_client):
    response = api_client.get("/api/v1/agents/", {"attribute": "no-equals-sign"})
    assert response.status_code == 400
    assert "expected key=value" in str(response.json())


def test_the_detail_view_has_the_health_tree_and_effective_config(api_client):
    agent = AgentFactory(
        health={"healthy": True, "components": {"exporter/otlp": {"healthy": False, "last_error": "refused"}}},
        effective_config={"collector.yaml": {"content_type": "text/yaml", "body": "a: 1", "size": 4}},
        last_sequence_num=-1,
    )
    data = api_client.get(f"/api/v1/agents/{agent.instance_uid}/").json()
    assert data["health"]["components"]["exporter/otlp"]["last_error"] == "refused"
    assert data["effective_config"]["collector.yaml"]["body"] == "a: 1"
    assert data["last_sequence_num"] == str(2**64 - 1)


def test_the_list_leaves_out_the_heavy_documents(api_client):
    AgentFactory(health={"healthy": True})
    result = api_client.get("/api/v1/agents/").json()["results"][0]
    assert "health" not in result and "effective_config" not in result


def test_the_api_is_read_only(api_client):
    agent = AgentFactory()
    assert api_client.delete(f"/api/v1/agents/{agent.instance_uid}/").status_code == 405
    assert api_client.post("/api/v1/agents/", {}).status_code == 405


def test_the_openapi_schema_describes_the_agents_endpoint(api_client):
    response = api_client.get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    schema = response.json()
    assert "/api/v1/agents/" in schema["paths"]
    parameters = {p["name"] for p in schema["paths"]["/api/v1/agents/"]["get"]["parameters"]}
    assert {"status", "capability", "attribute", "limit", "offset"} <= parameters


def test_seen_after_takes_any_offset_python_parses_and_refuses_a_date_utc_cannot_hold(api_client):
    """An offset beyond PostgreSQL's +-15:59 reached the database as given (a 500); the
    value is compared in UTC now, and one that leaves the calendar in UTC is a clear 400."""
    seen = AgentFactory(last_seen=timezone.now())
    found = api_client.get("/api/v1/agents/", {"seen_after": "0366-02-26T23:20:14-16:35"})
    assert found.status_code == 200, found.content
    assert [a["instance_uid"] for a in found.json()["results"]] == [str(seen.instance_uid)]
    for edge in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
        refused = api_client.get("/api/v1/agents/", {"seen_after": edge})
        assert refused.status_code == 400, edge
        assert "seen_after" in refused.json()
