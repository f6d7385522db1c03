"""Telemetry connection settings: documents, resolution by priority, the API, and the
offer in the session (hash, no loop, held failure, the heartbeat interval on its own)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from channels.db import database_sync_to_async
from rest_framework.test import APIClient

from fleet.agent_labels import agent_labels_set
from fleet.connection_settings import revision_token, telemetry_settings_create, telemetry_settings_update
from fleet.label_selectors.parsing import parse_selector
from fleet.models import Agent, AuditEvent, TelemetryConnectionSettings
from fleet.roles import VIEWER, grant_role
from fleet.session_runtime import reset_runtime
from fleet.telemetry_settings import (
    SettingsEntry,
    SettingsProblems,
    check_destination,
    check_other_connections,
    offers_hash,
    resolve,
    settings_digest,
)
from opamp.capabilities import AgentCapabilities, ServerCapabilities
from opamp.identifiers import uuid7
from opamp.proto import opamp_pb2
from tests.fleet.asgi_clients import WsAgent, http_exchange
from tests.fleet.factories import AgentFactory, UserFactory
from tests.fleet.messages import BASE_CAPABILITIES, full_report, heartbeat

METRICS = {"destination_endpoint": "https://otlp.example:4318/v1/metrics", "headers": {"Authorization": "Bearer m"}}
LOGS = {"destination_endpoint": "https://logs.example/v1/logs", "tls": {"insecure_skip_verify": True}}
TELEMETRY_CAPABLE = int(
    BASE_CAPABILITIES
    | AgentCapabilities.REPORTS_OWN_METRICS
    | AgentCapabilities.REPORTS_OWN_LOGS
    | AgentCapabilities.ACCEPTS_OTHER_CONNECTION_SETTINGS
)
HEARTBEAT_CAPABLE = int(BASE_CAPABILITIES | AgentCapabilities.ACCEPTS_OPAMP_CONNECTION_SETTINGS)


@pytest.fixture(autouse=True)
def fresh_runtime() -> Any:
    reset_runtime()
    yield
    reset_runtime()


def entry(name: str, priority: int, selector: str = "", **values: Any) -> SettingsEntry:
    return SettingsEntry(
        name=name,
        priority=priority,
        matches=parse_selector(selector).matches,
        own={key: values.get(key) for key in ("own_metrics", "own_traces", "own_logs")},
        other_connections=values.get("other_connections", {}),
        heartbeat_interval_seconds=values.get("heartbeat_interval_seconds"),
    )


# -- documents and resolution ------------------------------------------------------------


def test_a_destination_is_made_canonical():
    document = check_destination(
        {"destination_endpoint": "https://a.example/v1", "headers": {"b": "2", "a": "1"}, "tls": {}}, where="own_logs"
    )
    assert document == {"destination_endpoint": "https://a.example/v1", "headers": {"a": "1", "b": "2"}}


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({"destination_endpoint": "ftp://a.example"}, "http:// or https://"),
        ({"destination_endpoint": "https://"}, "with a host"),
        ({"destination_endpoint": "https://a.example", "headers": {"bad name": "x"}}, "not a valid header name"),
        ({"destination_endpoint": "https://a.example", "headers": {"a": "x\r\ny"}}, "control characters"),
        ({"destination_endpoint": "https://a.example\x00"}, "NUL"),
        ({"destination_endpoint": "https://a.example", "headers": {"a": "\ud800"}}, "surrogate"),
        ({"destination_endpoint": "https://a.example", "tls": {"ca_pem": "nope"}}, "PEM"),
        ({"destination_endpoint": "https://a.example", "tls": {"cert": "x"}}, "client certificates are not offered"),
        ({"destination_endpoint": "https://a.example", "proxy": "x"}, "unknown field"),
    ],
)
def test_bad_destinations_are_refused_with_the_reason(value: Any, problem: str):
    with pytest.raises(SettingsProblems) as refused:
        check_destination(value, where="own_metrics")
    assert problem in " ".join(refused.value.problems)


def test_other_connections_are_checked_by_name():
    with pytest.raises(SettingsProblems, match=r"other_connections\.db\.destination_endpoint"):
        check_other_connections({"db": {"destination_endpoint": "nope"}})
    assert check_other_connections({"b": {"destination_endpoint": "http://b"}, "a": LOGS}).keys() == {"a", "b"}


def test_each_field_comes_from_the_highest_priority_matching_entry():
    entries = [
        entry("base", 0, own_metrics=METRICS, own_logs=LOGS, heartbeat_interval_seconds=60),
        entry("prod", 10, "env=prod", own_metrics={"destination_endpoint": "https://prod/v1"}),
        entry("dev", 20, "env=dev", heartbeat_interval_seconds=5),
        entry("aa", 10, "env=prod", own_metrics={"destination_endpoint": "https://tie/v1"}),
    ]
    prod = resolve(entries, {"env": "prod"})
    # Ties go by name: "aa" before "prod".
    assert prod.own["own_metrics"]["destination_endpoint"] == "https://tie/v1"
    assert prod.own["own_logs"] == LOGS and prod.heartbeat_interval_seconds == 60
    dev = resolve(entries, {"env": "dev"})
    assert dev.own["own_metrics"] == METRICS and dev.heartbeat_interval_seconds == 5
    assert resolve(entries[1:3], {"env": "test"}).is_empty()


def test_only_what_the_agent_accepts_is_offered():
    resolved = resolve(
        [entry("a", 0, own_metrics=METRICS, own_traces=METRICS, heartbeat_interval_seconds=9, other_connections={})],
        {},
    )
    narrowed = resolved.for_capabilities(TELEMETRY_CAPABLE)
    assert set(narrowed.own) == {"own_metrics"} and narrowed.heartbeat_interval_seconds is None


def test_the_same_settings_give_the_same_hash():
    one = resolve([entry("a", 0, own_metrics=METRICS, own_logs=LOGS)], {})
    again = resolve([entry("b", 5, own_logs=dict(LOGS), own_metrics=dict(METRICS))], {})
    assert settings_digest(one, endpoint="/v1/opamp") == settings_digest(again, endpoint="/v1/opamp")
    other = resolve([entry("a", 0, own_metrics=LOGS)], {})
    assert settings_digest(one, endpoint="/v1/opamp") != settings_digest(other, endpoint="/v1/opamp")


# -- the API -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_operators_write_viewers_read_and_writes_are_audited(api_client: APIClient):
    created = api_client.post(
        "/api/v1/telemetry-settings/",
        {"name": "prod", "selector": "env=prod", "priority": 5, "own_metrics": METRICS},
        format="json",
    )
    assert created.status_code == 201, created.content
    assert created.json()["own_metrics"]["headers"] == {"Authorization": "Bearer m"}
    changed = api_client.patch(
        "/api/v1/telemetry-settings/prod/", {"heartbeat_interval_seconds": 15, "own_metrics": None}, format="json"
    )
    assert changed.status_code == 200 and changed.json()["own_metrics"] is None
    assert changed.json()["heartbeat_interval_seconds"] == 15
    actions = list(AuditEvent.objects.order_by("id").values_list("action", flat=True))
    assert actions == ["telemetry_settings.create", "telemetry_settings.update"]
    assert "Bearer" not in str(AuditEvent.objects.first().details)  # header values stay out

    viewer = UserFactory(username="viewer")
    grant_role(user=viewer, role=VIEWER)
    client = APIClient()
    client.force_authenticate(viewer)
    listed = client.get("/api/v1/telemetry-settings/")
    assert listed.status_code == 200 and listed.json()["results"][0]["name"] == "prod"
    api_client.patch("/api/v1/telemetry-settings/prod/", {"own_logs": {**LOGS, "headers": {"K": "v1"}}}, format="json")
    # Header values may be credentials: a viewer sees their names only, an operator all.
    assert client.get("/api/v1/telemetry-settings/prod/").json()["own_logs"]["headers"] == {"K": "(hidden)"}
    assert api_client.get("/api/v1/telemetry-settings/prod/").json()["own_logs"]["headers"] == {"K": "v1"}
    assert (
        client.post("/api/v1/telemetry-settings/", {"name": "x", "selector": "a=b"}, format="json").status_code == 403
    )
    assert client.delete("/api/v1/telemetry-settings/prod/").status_code == 403
    assert api_client.delete("/api/v1/telemetry-settings/prod/").status_code == 204
    assert not TelemetryConnectionSettings.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "a", "selector": "env=prod", "own_logs": {"destination_endpoint": "nope"}}, "own_logs"),
        ({"name": "a", "selector": "env=prod", "heartbeat_interval_seconds": 0}, "heartbeat_interval_seconds"),
        ({"name": "a", "selector": "env in (", "own_logs": LOGS}, "selector"),
        ({"name": "a", "selector": "env=prod", "own_logz": LOGS}, "own_logz"),
        ({"name": "a/b", "selector": "env=prod"}, "name"),
    ],
)
def test_invalid_settings_are_refused_with_400_naming_the_field(api_client: APIClient, body: Any, field: str):
    answer = api_client.post("/api/v1/telemetry-settings/", body, format="json")
    assert answer.status_code == 400, answer.content
    assert field in str(answer.json())
    assert not TelemetryConnectionSettings.objects.exists()


@pytest.mark.django_db
def test_settings_without_a_selector_are_for_every_agent(api_client: APIClient):
    created = api_client.post("/api/v1/telemetry-settings/", {"name": "all", "own_logs": LOGS}, format="json")
    assert created.status_code == 201, created.content
    assert created.json()["selector"] == {}
    cleared = api_client.patch("/api/v1/telemetry-settings/all/", {"selector": None}, format="json")
    assert cleared.status_code == 200 and cleared.json()["selector"] == {}


@pytest.mark.django_db
def test_a_taken_name_is_refused(api_client: APIClient):
    telemetry_settings_create(name="a", actor=None, selector={}, own_logs=LOGS)
    answer = api_client.post("/api/v1/telemetry-settings/", {"name": "a", "selector": "x=y"}, format="json")
    assert answer.status_code == 400 and "already exist" in answer.json()["detail"]


@pytest.mark.django_db
def test_the_agent_api_shows_the_reported_status(api_client: APIClient):
    agent = AgentFactory(
        connection_settings_status={"last_connection_settings_hash": "ab" * 32, "status": 3, "error_message": "bad"}
    )
    body = api_client.get(f"/api/v1/agents/{agent.instance_uid}/").json()
    assert body["connection_settings_status"]["error_message"] == "bad"
    assert body["connection_settings_state"] == "failed"


# -- the session -------------------------------------------------------------------------


def status_of(uid: bytes, seq: int, offer_hash: bytes, state: int, capabilities: int, error: str = ""):
    message = heartbeat(uid, seq, capabilities=capabilities)
    message.connection_settings_status.last_connection_settings_hash = offer_hash
    message.connection_settings_status.status = state
    message.connection_settings_status.error_message = error
    return message


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_websocket_agent_is_offered_its_settings_once_and_not_again_after_applying():
    await database_sync_to_async(telemetry_settings_create)(
        name="prod", actor=None, selector={"matchLabels": {"env": "prod"}}, own_metrics=METRICS, own_traces=METRICS
    )
    uid = uuid7().bytes
    async with WsAgent() as agent:
        first = await agent.exchange(full_report(uid, 1, capabilities=TELEMETRY_CAPABLE))
        assert not first.HasField("connection_settings")  # no labels yet: not selected
        await database_sync_to_async(agent_labels_set)(
            instance_uid=uuid.UUID(bytes=uid), labels={"env": "prod"}, actor=None
        )
        # The label change is pushed over the live socket (a `settings` hint).
        offered = (await agent.receive()).connection_settings
        assert offered.own_metrics.destination_endpoint == METRICS["destination_endpoint"]
        assert [(h.key, h.value) for h in offered.own_metrics.headers.headers] == [("Authorization", "Bearer m")]
        assert not offered.HasField("own_traces")  # the agent does not report its own traces
        assert offered.hash == offers_hash(offered) and len(offered.hash) == 32
        # Not again on the same connection while the answer is on its way, nor after it.
        for seq in (2, 3):
            reply = await agent.exchange(heartbeat(uid, seq, capabilities=TELEMETRY_CAPABLE))
            assert not reply.HasField("connection_settings")
        applied = status_of(uid, 4, offered.hash, opamp_pb2.ConnectionSettingsStatuses_APPLIED, TELEMETRY_CAPABLE)
        assert not (await agent.exchange(applied)).HasField("connection_settings")
    # A new connection reporting the hash it holds gets nothing either.
    async with WsAgent() as agent:
        report = full_report(uid, 5, capabilities=TELEMETRY_CAPABLE)
        report.connection_settings_status.last_connection_settings_hash = offered.hash
        report.connection_settings_status.status = opamp_pb2.ConnectionSettingsStatuses_APPLIED
        assert not (await agent.exchange(report)).HasField("connection_settings")
    stored = (await database_sync_to_async(_agent)(uid)).connection_settings_status
    assert stored["last_connection_settings_hash"] == offered.hash.hex() and stored["status"] == 1


def _agent(uid: bytes) -> Any:
    return Agent.objects.get(instance_uid=uuid.UUID(bytes=uid))


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_polling_agent_is_not_offered_in_a_loop_and_a_failure_is_held_until_the_settings_change():
    await database_sync_to_async(telemetry_settings_create)(name="all", actor=None, selector={}, own_logs=LOGS)
    uid = uuid7().bytes
    offered = (await http_exchange(full_report(uid, 1, capabilities=TELEMETRY_CAPABLE))).connection_settings
    assert offered.own_logs.tls.insecure_skip_verify
    # No answer yet: this process does not offer the same digest on every poll.
    assert not (await http_exchange(heartbeat(uid, 2, capabilities=TELEMETRY_CAPABLE))).HasField("connection_settings")
    failed = status_of(uid, 3, offered.hash, opamp_pb2.ConnectionSettingsStatuses_FAILED, TELEMETRY_CAPABLE, "no")
    assert not (await http_exchange(failed)).HasField("connection_settings")
    for seq in range(4, 7):
        assert not (await http_exchange(heartbeat(uid, seq, capabilities=TELEMETRY_CAPABLE))).HasField(
            "connection_settings"
        )
    entry_row = await TelemetryConnectionSettings.objects.aget(name="all")
    await database_sync_to_async(telemetry_settings_update)(
        entry=entry_row, actor=None, own_logs={"destination_endpoint": "https://logs2.example/v1/logs"}
    )
    reset_runtime()  # as another process would (the revision is read at most once a second)
    again = (await http_exchange(heartbeat(uid, 7, capabilities=TELEMETRY_CAPABLE))).connection_settings
    assert again.own_logs.destination_endpoint == "https://logs2.example/v1/logs" and again.hash != offered.hash


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_the_heartbeat_interval_is_offered_on_its_own_without_a_certificate():
    await database_sync_to_async(telemetry_settings_create)(
        name="slow", actor=None, selector={}, heartbeat_interval_seconds=45
    )
    uid = uuid7().bytes
    async with WsAgent() as agent:
        reply = await agent.exchange(full_report(uid, 1, capabilities=HEARTBEAT_CAPABLE))
    assert reply.capabilities & ServerCapabilities.OFFERS_CONNECTION_SETTINGS
    settings = reply.connection_settings
    assert settings.opamp.heartbeat_interval_seconds == 45 and settings.opamp.destination_endpoint
    assert not settings.opamp.HasField("certificate") and not settings.HasField("own_metrics")
    # An agent that does not accept OpAMP connection settings is not offered it.
    other = await http_exchange(full_report(uuid7().bytes, 1, capabilities=TELEMETRY_CAPABLE))
    assert not other.HasField("connection_settings")


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_report_that_changes_the_labels_is_answered_with_the_settings_it_now_gets():
    await database_sync_to_async(telemetry_settings_create)(
        name="node-2", actor=None, selector={"matchLabels": {"host.name": "node-2"}}, own_logs=LOGS
    )
    uid = uuid7().bytes
    assert not (await http_exchange(full_report(uid, 1, capabilities=TELEMETRY_CAPABLE))).HasField(
        "connection_settings"
    )
    moved = full_report(uid, 2, capabilities=TELEMETRY_CAPABLE)
    moved.agent_description.non_identifying_attributes[0].value.string_value = "node-2"
    reply = await http_exchange(moved)
    assert reply.connection_settings.own_logs.destination_endpoint == LOGS["destination_endpoint"]


@pytest.mark.django_db
def test_only_a_label_change_that_changes_an_agents_settings_moves_the_revision():
    telemetry_settings_create(name="prod", actor=None, selector={"matchLabels": {"env": "prod"}}, own_logs=LOGS)
    agent = AgentFactory(labels={"env": "dev"})
    token = revision_token()
    agent_labels_set(instance_uid=agent.instance_uid, labels={"team": "a"}, actor=None)
    assert revision_token() == token
    agent_labels_set(instance_uid=agent.instance_uid, labels={"env": "prod"}, actor=None)
    assert revision_token() != token
