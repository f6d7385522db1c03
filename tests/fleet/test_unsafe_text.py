"""A NUL (or any character the database cannot store) in any string an agent reports is
replaced at the boundary: the agent is served, its report stored with U+FFFD in its place,
on both transports and on both of the paths a report takes (the full write of a first
report, the batched write of a status). CSR bytes that are not PEM text are refused
before anything is written. On PostgreSQL each of these was an HTTP 500 / WebSocket 1011,
and a NUL in a held status stopped every status write of the process."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from channels.db import database_sync_to_async as sync_to_async

from fleet.models import Agent
from fleet.safe_text import REPLACEMENT
from fleet.session_runtime import runtime
from opamp.capabilities import AgentCapabilities
from opamp.identifiers import uuid7
from opamp.proto import opamp_pb2
from signing.ca import CSR_NOT_PEM
from signing.models import CertificateRequest
from tests.fleet.asgi_clients import WsAgent, decode_http_reply, http_post
from tests.fleet.messages import BASE_CAPABILITIES, full_report, heartbeat
from tests.signing.conftest import ca_files, configured_ca, forget_loaded_files  # noqa: F401

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

NUL = "bad\x00value"
Message = opamp_pb2.AgentToServer
Exchange = Callable[[Message], Awaitable[opamp_pb2.ServerToAgent]]


def identifying_value(message: Message) -> None:
    kv = message.agent_description.identifying_attributes.add()
    kv.key, kv.value.string_value = "zone", NUL


def identifying_key(message: Message) -> None:
    kv = message.agent_description.identifying_attributes.add()
    kv.key, kv.value.string_value = NUL, "b"


def non_identifying_nested_value(message: Message) -> None:
    kv = message.agent_description.non_identifying_attributes.add()
    kv.key = "os"
    inner = kv.value.kvlist_value.values.add()
    inner.key, inner.value.string_value = "name", NUL


def health_last_error(message: Message) -> None:
    message.health.healthy = False
    message.health.last_error = NUL


def health_status(message: Message) -> None:
    message.health.status = NUL


def component_health(message: Message) -> None:
    message.health.component_health_map[NUL].last_error = NUL


def health_attribute(message: Message) -> None:
    kv = message.health.attributes.add()
    kv.key, kv.value.string_value = "detail", NUL


def effective_config_name_and_type(message: Message) -> None:
    file = message.effective_config.config_map.config_map[NUL]
    file.body, file.content_type = b"x: 1\n", NUL


def remote_config_error(message: Message) -> None:
    message.remote_config_status.last_remote_config_hash = b"\x01" * 32
    message.remote_config_status.status = opamp_pb2.RemoteConfigStatuses_FAILED
    message.remote_config_status.error_message = NUL


def package_statuses(message: Message) -> None:
    status = message.package_statuses.packages[NUL]
    status.agent_has_version, status.error_message = NUL, NUL
    message.package_statuses.error_message = NUL


def available_components(message: Message) -> None:
    message.available_components.hash = b"\x02" * 32
    details = message.available_components.components[NUL]
    kv = details.metadata.add()
    kv.key, kv.value.string_value = "version", NUL


def custom_capabilities(message: Message) -> None:
    message.custom_capabilities.capabilities.append(NUL)


def connection_settings_status(message: Message) -> None:
    message.connection_settings_status.status = opamp_pb2.ConnectionSettingsStatuses_FAILED
    message.connection_settings_status.error_message = NUL


FIELDS: list[Callable[[Message], None]] = [
    identifying_value,
    identifying_key,
    non_identifying_nested_value,
    health_last_error,
    health_status,
    component_health,
    health_attribute,
    effective_config_name_and_type,
    remote_config_error,
    package_statuses,
    available_components,
    custom_capabilities,
    connection_settings_status,
]


async def http_send(message: Message) -> opamp_pb2.ServerToAgent:
    response = await http_post(message.SerializeToString())
    assert response["status"] in (200, 400), response
    return decode_http_reply(response)


STORED_FIELDS = [
    "identifying_attributes",
    "non_identifying_attributes",
    "labels",
    "custom_capabilities",
    "health",
    "effective_config",
    "remote_config_error",
    "package_statuses",
    "available_components",
    "connection_settings_status",
]


@sync_to_async
def stored(uid: bytes) -> str:
    """The agent's stored documents as one text, to look for characters in."""
    row = Agent.objects.values(*STORED_FIELDS).get(instance_uid=uuid.UUID(bytes=uid))
    return json.dumps(row, ensure_ascii=False)


async def check_field_on(send: Exchange, mutate: Callable[[Message], None]) -> None:
    uid, neighbour = uuid7().bytes, uuid7().bytes
    assert not (await send(full_report(neighbour, 1))).HasField("error_response")

    first = full_report(uid, 1)
    mutate(first)  # a first report: the full path writes it at once
    reply = await send(first)
    assert not reply.HasField("error_response") and reply.instance_uid == uid
    assert REPLACEMENT in await stored(uid)

    status = heartbeat(uid, 2)
    mutate(status)  # a status of a known agent: the batched path (or the full one for a description)
    neighbour_status = heartbeat(neighbour, 2)
    neighbour_status.health.healthy = False
    for message in (status, neighbour_status):
        reply = await send(message)
        assert not reply.HasField("error_response") and reply.instance_uid == message.instance_uid
    await runtime().statuses.flush()
    assert runtime().statuses.pending_count == 0

    text = await stored(uid)
    assert "\x00" not in text and REPLACEMENT in text
    assert (await Agent.objects.aget(instance_uid=uuid.UUID(bytes=neighbour))).healthy is False


@pytest.mark.parametrize("mutate", FIELDS, ids=[field.__name__ for field in FIELDS])
async def test_a_nul_in_a_reported_field_is_replaced_over_websocket(mutate):
    async with WsAgent() as agent:
        await check_field_on(agent.exchange, mutate)


@pytest.mark.parametrize("mutate", FIELDS, ids=[field.__name__ for field in FIELDS])
async def test_a_nul_in_a_reported_field_is_replaced_over_http(mutate):
    await check_field_on(http_send, mutate)


async def effective_config_with_nul_body(send: Exchange) -> dict[str, Any]:
    uid = uuid7().bytes
    message = full_report(uid, 1)
    message.effective_config.config_map.config_map[""].body = b"a: 1\x00\n"
    assert not (await send(message)).HasField("error_response")
    row = await Agent.objects.aget(instance_uid=uuid.UUID(bytes=uid))
    return row.effective_config[""]


async def test_an_effective_config_body_with_nul_is_stored_as_base64_on_both_transports():
    async with WsAgent() as agent:
        over_websocket = await effective_config_with_nul_body(agent.exchange)
    over_http = await effective_config_with_nul_body(http_send)
    for entry in (over_websocket, over_http):
        assert entry["body_base64"] == "YTogMQAK" and "body" not in entry


CSR_CAPABLE = BASE_CAPABILITIES | AgentCapabilities.ACCEPTS_OPAMP_CONNECTION_SETTINGS
BAD_CSRS = [
    b"-----BEGIN CERTIFICATE REQUEST-----\x00\n-----END CERTIFICATE REQUEST-----\n",
    b"\x00" * 64,
    b"\xff\xfe binary",
]


@pytest.mark.parametrize("csr", BAD_CSRS, ids=["nul in pem", "only nul", "binary"])
async def test_csr_bytes_that_are_not_pem_text_are_refused_before_anything_is_stored(configured_ca, csr):  # noqa: F811
    for transport in ("websocket", "http"):
        uid = uuid7().bytes
        message = full_report(uid, 1, capabilities=CSR_CAPABLE)
        message.connection_settings_request.opamp.certificate_request.csr = csr
        if transport == "websocket":
            async with WsAgent() as agent:
                reply = await agent.exchange(message)
                after = await agent.exchange(heartbeat(uid, 2, capabilities=CSR_CAPABLE))
                assert not after.HasField("error_response")  # the session goes on
        else:
            reply = await http_send(message)
        assert reply.error_response.type == opamp_pb2.ServerErrorResponseType_BadRequest, transport
        assert reply.error_response.error_message == CSR_NOT_PEM
        requests = [r async for r in CertificateRequest.objects.filter(instance_uid=uuid.UUID(bytes=uid))]
        assert [(r.state, r.csr_pem) for r in requests] == [(CertificateRequest.State.REJECTED, "")]
