"""Operator input with a NUL or a lone surrogate is refused with a 400 naming the field,
in every body, path, query parameter and cookie of the API, and nothing
is stored. A NUL in a label value or a selector string was an HTTP 500 on PostgreSQL."""

from __future__ import annotations

import json
from typing import Any

import pytest
from rest_framework.test import APIClient

from fleet.api.strict_input import UNSAFE_TEXT_DETAIL
from fleet.models import Agent, AgentCommand, AuditEvent, QueuedCustomMessage
from fleet.safe_text import NUL_PROBLEM, SURROGATE_PROBLEM
from opamp.identifiers import uuid7
from rollouts import services
from rollouts.models import Configuration
from signing.models import EnrollmentToken
from tests.rollouts.conftest import api, operator  # noqa: F401

pytestmark = pytest.mark.django_db

API = "/api/v1"
NUL = "a\x00b"
FILES = {"app.yaml": {"body": "x: 1\n", "content_type": "text/yaml"}}
PING = "io.example.ping/v1"
MESSAGE = {"selector": "env=prod", "capability": PING, "type": "ping"}


@pytest.fixture
def agent(db: Any) -> Agent:
    from django.utils import timezone

    # It accepts restarts and custom messages of PING: a request not refused would store one.
    return Agent.objects.create(
        instance_uid=uuid7(),
        last_seen=timezone.now(),
        labels={"env": "prod"},
        capabilities=0x401,
        custom_capabilities=[PING],
    )


@pytest.fixture
def configuration(db: Any) -> Configuration:
    configuration = services.configuration_create(name="edge", selector="env=prod", actor=None)
    services.configuration_publish(configuration=configuration, files=FILES, author=None)
    return configuration


# (method, url, JSON body, the field the refusal must name; " key" when a key is the culprit)
BODY_CASES: list[tuple[str, str, dict[str, Any], str]] = [
    ("put", "agents/{uid}/labels/", {"labels": {"env": NUL}}, "labels.env"),
    ("patch", "agents/{uid}/labels/", {"labels": {NUL: "x"}}, "labels.a\ufffdb key"),
    ("post", "selectors/preview/", {"selector": f"env={NUL}"}, "selector"),
    ("post", "selectors/preview/", {"selector": {"matchLabels": {"env": NUL}}}, "selector.matchLabels.env"),
    ("post", "configurations/", {"name": NUL}, "name"),
    ("post", "configurations/", {"name": "n", "description": NUL}, "description"),
    ("post", "configurations/", {"name": "n", "selector": f"env in ({NUL})"}, "selector"),
    ("patch", "configurations/edge/", {"selector": {"matchLabels": {"a": NUL}}}, "selector.matchLabels.a"),
    ("post", "configurations/edge/versions/", {"files": {NUL: FILES["app.yaml"]}}, "files.a\ufffdb key"),
    (
        "post",
        "configurations/edge/versions/",
        {"files": {"app.yaml": {"body": NUL, "content_type": "text/yaml"}}},
        "files.app.yaml.body",
    ),
    ("post", "configurations/edge/versions/", {"files": FILES, "note": NUL}, "note"),
    ("post", "configurations/edge/rollback/", {"version": 1, "note": NUL}, "note"),
    ("post", "enrollment-tokens/", {"name": NUL, "max_uses": 1}, "name"),
    ("post", "enrollment-tokens/", {"name": "t", "max_uses": 1, "labels": {"env": NUL}}, "labels.env"),
    (
        "post",
        "rollouts/",
        {"configuration": "edge", "candidate_version": 1, "stages": [{"selector": NUL}]},
        "stages[0].selector",
    ),
    ("post", "commands/restart/", {"selector": f"env={NUL}"}, "selector"),
    ("post", "commands/restart/", {"selector": {"matchLabels": {"env": NUL}}}, "selector.matchLabels.env"),
    ("post", "custom-messages/", {**MESSAGE, "capability": NUL}, "capability"),
    ("post", "custom-messages/", {**MESSAGE, "type": NUL}, "type"),
    ("post", "custom-messages/", {**MESSAGE, "data": NUL}, "data"),
    ("post", "custom-messages/", {**MESSAGE, "selector": f"env={NUL}"}, "selector"),
    ("post", "agents/{uid}/custom-messages/", {"capability": NUL}, "capability"),
    ("post", "agents/{uid}/custom-messages/", {"capability": PING, "type": NUL}, "type"),
    ("post", "agents/{uid}/custom-messages/", {"capability": PING, NUL: "x"}, "a\ufffdb key"),
    ("post", "packages/", {"name": NUL}, "name"),
    ("post", "packages/", {"name": "p", "description": NUL}, "description"),
    ("post", "package-assignments/", {"name": NUL, "package": "p", "version": "1"}, "name"),
    (
        "post",
        "package-assignments/",
        {"name": "a", "package": "p", "version": "1", "selector": f"env={NUL}"},
        "selector",
    ),
    ("post", "telemetry-settings/", {"name": NUL, "selector": "env=prod"}, "name"),
    (
        "post",
        "telemetry-settings/",
        {"name": "t", "selector": "env=prod", "own_metrics": {"destination_endpoint": f"https://a/{NUL}"}},
        "own_metrics.destination_endpoint",
    ),
    (
        "post",
        "telemetry-settings/",
        {"name": "t", "selector": "env=prod", "own_logs": {"destination_endpoint": "https://a", "headers": {NUL: "x"}}},
        "own_logs.headers.a\ufffdb key",
    ),
    (
        "patch",
        "telemetry-settings/t/",
        {"other_connections": {"db": {"destination_endpoint": "https://a", "headers": {"k": NUL}}}},
        "other_connections.db.headers.k",
    ),
]


def stored_state() -> tuple[Any, ...]:
    return (
        list(Agent.objects.values_list("operator_labels", flat=True)),
        list(Configuration.objects.values_list("name", "description", "selector")),
        EnrollmentToken.objects.count(),
        AuditEvent.objects.count(),
        AgentCommand.objects.count(),
        QueuedCustomMessage.objects.count(),
    )


def assert_refused(response: Any, field: str, problem: str) -> None:
    assert response.status_code == 400, response.content
    detail = UNSAFE_TEXT_DETAIL.format(field=field, problem=problem)
    assert response.json() == {"detail": detail, "field": field, "problems": [detail]}


@pytest.mark.parametrize(("method", "url", "body", "field"), BODY_CASES)
def test_a_nul_anywhere_in_a_json_body_is_refused_naming_the_field(
    api: APIClient,  # noqa: F811
    agent: Agent,
    configuration: Configuration,
    method: str,
    url: str,
    body: dict[str, Any],
    field: str,
) -> None:
    before = stored_state()
    response = getattr(api, method)(f"{API}/{url.format(uid=agent.instance_uid)}", body, format="json")
    # A refused key is named as the field, with "key" before the problem.
    field, _, key = field.partition(" ")
    assert_refused(response, field, f"key {NUL_PROBLEM}" if key else NUL_PROBLEM)
    assert stored_state() == before


def test_a_lone_surrogate_in_a_json_body_is_refused(api: APIClient, agent: Agent) -> None:  # noqa: F811
    # json.dumps would escape it the same way: "\ud800" is valid JSON text.
    body = '{"labels": {"env": "x\\ud800"}}'
    response = api.put(f"{API}/agents/{agent.instance_uid}/labels/", body, content_type="application/json")
    assert_refused(response, "labels.env", SURROGATE_PROBLEM)


@pytest.mark.parametrize(
    ("url", "body", "field"),
    [
        ("custom-messages/", {**MESSAGE, "capability": "x\udfff"}, "capability"),
        ("custom-messages/", {**MESSAGE, "type": "\ud800"}, "type"),
        ("custom-messages/", {**MESSAGE, "data": "\ud800"}, "data"),
        ("agents/{uid}/custom-messages/", {"capability": PING, "type": "a\udc00b"}, "type"),
        ("commands/restart/", {"selector": "env=\ud800"}, "selector"),
    ],
)
def test_a_lone_surrogate_in_a_restart_or_custom_message_is_refused_and_nothing_is_queued(
    api: APIClient,  # noqa: F811
    agent: Agent,
    url: str,
    body: dict[str, Any],
    field: str,
) -> None:
    before = stored_state()
    # json.dumps escapes a lone surrogate as "\udXXX": valid JSON text, as a client would send.
    text = json.dumps(body)
    response = api.post(f"{API}/{url.format(uid=agent.instance_uid)}", text, content_type="application/json")
    assert_refused(response, field, SURROGATE_PROBLEM)
    assert stored_state() == before


def test_a_custom_message_whose_bytes_hold_a_nul_is_binary_data_not_text(api: APIClient, agent: Agent) -> None:  # noqa: F811
    # The rule is for text: `data` is base64 of the message's bytes, and those may be anything.
    response = api.post(f"{API}/custom-messages/", {**MESSAGE, "data": "AGE="}, format="json")
    assert response.status_code == 202, response.content
    assert bytes(QueuedCustomMessage.objects.get().data) == b"\x00a"


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("configurations/a%00b/", "path"),
        ("configurations/edge/versions/?ordering=%00", "ordering"),
        ("agents/?attribute=env%3Dp%00", "attribute"),
        ("agents/?capability=%00", "capability"),
        ("audit/?action=%00", "action"),
        ("enrollment-tokens/?state=a%00", "state"),
    ],
)
def test_a_nul_in_a_path_or_query_parameter_is_refused(
    api: APIClient,  # noqa: F811
    configuration: Configuration,
    url: str,
    field: str,
) -> None:
    assert_refused(api.get(f"{API}/{url}"), field, NUL_PROBLEM)


def test_a_nul_in_a_cookie_is_refused(api: APIClient) -> None:  # noqa: F811
    api.cookies["sessionid"] = "abc\x00def"
    assert_refused(api.get(f"{API}/agents/"), "cookie sessionid", NUL_PROBLEM)


def test_safe_text_passes_through_unchanged(api: APIClient, agent: Agent) -> None:  # noqa: F811
    labels = {"env": "prod ✓ \ufffd"}
    response = api.put(f"{API}/agents/{agent.instance_uid}/labels/", {"labels": labels}, format="json")
    assert response.status_code == 200, response.content
    agent.refresh_from_db()
    assert agent.operator_labels == labels
    assert json.loads(json.dumps(agent.operator_labels)) == labels
