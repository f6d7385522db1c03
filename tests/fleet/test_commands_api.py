"""The commands and custom messages API: operators ask, viewers read, answers count the skipped."""

from __future__ import annotations

import base64

import pytest
from django.test import override_settings
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from fleet.models import AgentCommand, AgentCustomMessage, AuditEvent, QueuedCustomMessage
from fleet.roles import VIEWER, grant_role
from tests.fleet.factories import AgentFactory, UserFactory
from tests.fleet.messages import BASE_CAPABILITIES

pytestmark = pytest.mark.django_db

RESTARTABLE = BASE_CAPABILITIES | 0x400


@pytest.fixture
def viewer_client():
    user = UserFactory(username="viewer")
    grant_role(user=user, role=VIEWER)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


def test_an_operator_restarts_one_agent_and_a_second_ask_is_refused_as_too_soon(api_client, operator):
    agent = AgentFactory(capabilities=RESTARTABLE)
    first = api_client.post(f"/api/v1/agents/{agent.instance_uid}/restart/", {}, format="json")
    assert first.status_code == 202, first.content
    assert (first.data["requested"], first.data["commands"][0]["requested_by"]) == (1, "operator")
    again = api_client.post(f"/api/v1/agents/{agent.instance_uid}/restart/", {}, format="json")
    assert again.status_code == 200 and again.data["rate_limited"] == 1
    assert "OPAMP_RESTART_MIN_INTERVAL_SECONDS" in again.data["detail"]
    assert AgentCommand.objects.count() == 1
    listed = api_client.get(f"/api/v1/commands/?agent={agent.instance_uid}").json()
    assert listed["count"] == 1
    assert listed["results"][0]["delivered_at"] is None and listed["results"][0]["reconnected_since"] is False


def test_a_selector_restart_counts_the_agents_that_cannot_restart(api_client):
    AgentFactory(capabilities=RESTARTABLE, labels={"env": "prod"})
    AgentFactory(capabilities=BASE_CAPABILITIES, labels={"env": "prod"})
    answer = api_client.post("/api/v1/commands/restart/", {"selector": "env=prod"}, format="json")
    assert answer.status_code == 202
    assert (answer.data["requested"], answer.data["not_capable"]) == (1, 1)
    assert api_client.post("/api/v1/commands/restart/", {"selector": ""}, format="json").status_code == 400
    assert api_client.post("/api/v1/commands/restart/", {"selector": "env in ("}, format="json").status_code == 400


def test_viewers_read_commands_but_may_not_restart(viewer_client):
    agent = AgentFactory(capabilities=RESTARTABLE)
    assert viewer_client.post(f"/api/v1/agents/{agent.instance_uid}/restart/", {}, format="json").status_code == 403
    assert viewer_client.post("/api/v1/commands/restart/", {"selector": "a=b"}, format="json").status_code == 403
    assert viewer_client.get("/api/v1/commands/").status_code == 200
    assert not AgentCommand.objects.exists() and not AuditEvent.objects.exists()


def test_agents_filter_by_custom_capability(api_client):
    wanted = AgentFactory(custom_capabilities=["io.example.ping/v1", "io.opamp.certificate/v1"])
    AgentFactory(custom_capabilities=["io.example.ping/v10"])
    AgentFactory()
    found = api_client.get("/api/v1/agents/?custom_capability=io.example.ping/v1").json()
    assert [row["instance_uid"] for row in found["results"]] == [str(wanted.instance_uid)]


def test_custom_messages_go_only_to_agents_that_declared_the_capability(api_client):
    able = AgentFactory(custom_capabilities=["io.example.ping/v1"], labels={"env": "prod"})
    AgentFactory(custom_capabilities=[], labels={"env": "prod"})
    body = {"selector": {"matchLabels": {"env": "prod"}}, "capability": "io.example.ping/v1", "type": "ping"}
    answer = api_client.post(
        "/api/v1/custom-messages/", {**body, "data": base64.b64encode(b"\x00hi").decode()}, format="json"
    )
    assert answer.status_code == 202, answer.content
    assert (answer.data["queued"], answer.data["not_capable"]) == (1, 1)
    queued = QueuedCustomMessage.objects.get()
    assert (queued.agent_id, bytes(queued.data), queued.delivered_at) == (able.pk, b"\x00hi", None)
    one = api_client.post(
        f"/api/v1/agents/{able.instance_uid}/custom-messages/", {"capability": "io.other/v1"}, format="json"
    )
    assert one.status_code == 200 and one.data["not_capable"] == 1
    assert (
        api_client.post("/api/v1/custom-messages/", {**body, "data": "not base64!"}, format="json").status_code == 400
    )


@override_settings(OPAMP_CUSTOM_MESSAGE_QUEUE=2)
def test_an_agents_queue_of_custom_messages_is_bounded(api_client):
    agent = AgentFactory(custom_capabilities=["io.example.ping/v1"])
    url = f"/api/v1/agents/{agent.instance_uid}/custom-messages/"
    answers = [api_client.post(url, {"capability": "io.example.ping/v1"}, format="json").data for _ in range(3)]
    assert [answer["queued"] for answer in answers] == [1, 1, 0] and answers[2]["queue_full"] == 1


def test_an_agents_custom_messages_are_listed_newest_first(viewer_client):
    agent = AgentFactory()
    for number in range(3):
        AgentCustomMessage.objects.create(
            agent=agent,
            capability="io.example.ping/v1",
            type=f"t{number}",
            data=b"\xff",
            size=1,
            received_at=agent.last_seen,
        )
    listed = viewer_client.get(f"/api/v1/agents/{agent.instance_uid}/custom-messages/").json()
    assert [row["type"] for row in listed["results"]] == ["t2", "t1", "t0"]
    assert listed["results"][0]["data"] == base64.b64encode(b"\xff").decode()
