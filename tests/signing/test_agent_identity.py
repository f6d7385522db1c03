"""Who may speak for an agent: credentials are checked before anything changes.

A refused message changes nothing (no re-key, no superseded session, no audit event), and
a token requests certificates only for the agents it enrolled. Through the real ASGI
application, over both transports.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import pytest
from channels.db import database_sync_to_async as sync_to_async

from fleet.models import Agent, AuditEvent
from fleet.session_identity import CERTIFIED_SESSION_LIVE
from fleet.session_runtime import reset_runtime
from opamp.capabilities import AgentCapabilities, AgentToServerFlags
from opamp.identifiers import uuid7
from opamp.proto import opamp_pb2
from signing.agent_credentials import CERTIFIED_AGENT, CSR_AGENT_OF_OTHER_TOKEN
from signing.certificates import CSR_PENDING_FROM_OTHER_CREDENTIAL, certificate_request_approve
from signing.enrollment_tokens import enrollment_token_create
from signing.errors import TOKEN_EXHAUSTED
from signing.models import CertificateRequest, EnrollmentToken, EnrollmentTokenUse, IssuedCertificate
from tests.fleet.asgi_clients import WsAgent, decode_http_reply, http_exchange, http_post
from tests.fleet.messages import BASE_CAPABILITIES, full_report, heartbeat
from tests.signing.csrs import make_csr

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

CSR_CAPABLE = BASE_CAPABILITIES | AgentCapabilities.ACCEPTS_OPAMP_CONNECTION_SETTINGS


@pytest.fixture(autouse=True)
def fresh_runtime() -> Any:
    reset_runtime()
    yield
    reset_runtime()


@pytest.fixture
def required(settings: Any) -> Any:
    settings.OPAMP_AGENT_AUTH = "required"
    return settings


def bearer(secret: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {secret}".encode())]


async def new_token(**overrides: Any) -> tuple[EnrollmentToken, str]:
    options: dict[str, Any] = {
        "name": "edge",
        "expires_in": timedelta(hours=1),
        "max_uses": 5,
        "labels": None,
        "auto_approve": False,
        "actor": None,
        **overrides,
    }
    return await sync_to_async(enrollment_token_create)(**options)


def requesting_uid(uid: bytes, seq: int = 1) -> opamp_pb2.AgentToServer:
    message = full_report(uid, seq)
    message.flags |= AgentToServerFlags.REQUEST_INSTANCE_UID
    return message


def csr_message(uid: bytes, seq: int, csr: bytes) -> opamp_pb2.AgentToServer:
    message = full_report(uid, seq, capabilities=CSR_CAPABLE)
    message.connection_settings_request.opamp.certificate_request.csr = csr
    return message


async def refused_over_http(message: opamp_pb2.AgentToServer, **options: Any) -> opamp_pb2.ServerToAgent:
    response = await http_post(message.SerializeToString(), **options)
    assert response["status"] == 400, response
    return decode_http_reply(response)


async def audit_actions() -> list[str]:
    return await sync_to_async(lambda: list(AuditEvent.objects.order_by("id").values_list("action", flat=True)))()


async def used_up_token_and_victim() -> tuple[str, uuid.UUID, str]:
    """A token used up by its own agent, and a victim enrolled with another token."""
    _, used_up = await new_token(name="used up", max_uses=1)
    await http_exchange(full_report(uuid7().bytes, 1), headers=bearer(used_up))
    _, victims_token = await new_token(name="victim's")
    victim = uuid7()
    await http_exchange(full_report(victim.bytes, 1, service="victim"), headers=bearer(victims_token))
    return used_up, victim, victims_token


# --- RequestInstanceUid and duplicate uids: refused before anything changes -----------------


@pytest.mark.parametrize("transport", ["http", "websocket"])
async def test_a_used_up_token_cannot_rekey_an_agent_it_never_enrolled(required, transport):
    used_up, victim, _ = await used_up_token_and_victim()
    before = await audit_actions()

    if transport == "http":
        response = await http_post(requesting_uid(victim.bytes).SerializeToString(), headers=bearer(used_up))
        refused = decode_http_reply(response)
    else:
        async with WsAgent(headers=bearer(used_up)) as intruder:
            refused = await intruder.exchange(requesting_uid(victim.bytes))

    assert refused.error_response.error_message == TOKEN_EXHAUSTED
    assert not refused.HasField("agent_identification")
    assert await sync_to_async(Agent.objects.filter(instance_uid=victim).exists)()
    assert await sync_to_async(Agent.objects.count)() == 2
    assert await audit_actions() == before


async def test_a_used_up_token_claiming_a_live_uid_leaves_the_live_session_open(required):
    used_up, victim, victims_token = await used_up_token_and_victim()
    before = await audit_actions()
    async with WsAgent(headers=bearer(victims_token)) as agent:
        assert not (await agent.exchange(full_report(victim.bytes, 2, service="victim"))).HasField("error_response")
        async with WsAgent(headers=bearer(used_up)) as intruder:
            refused = await intruder.exchange(full_report(victim.bytes, 1, service="victim"))
        # The victim's socket is still open and answered.
        still = await agent.exchange(heartbeat(victim.bytes, 3))
    assert refused.error_response.error_message == TOKEN_EXHAUSTED
    assert not still.HasField("error_response")
    assert await audit_actions() == before


async def test_an_agent_asking_for_a_new_uid_keeps_its_enrollment_and_the_rekey_is_audited(required):
    token, secret = await new_token(max_uses=1)
    old = uuid7()
    await http_exchange(full_report(old.bytes, 1), headers=bearer(secret))

    reply = await http_exchange(requesting_uid(old.bytes, 2), headers=bearer(secret))
    new = uuid.UUID(bytes=reply.agent_identification.new_instance_uid)
    # The token (used up by this very agent) still admits it under its new uid.
    again = await http_exchange(full_report(new.bytes, 3), headers=bearer(secret))

    assert not again.HasField("error_response")
    assert await sync_to_async(Agent.objects.filter(instance_uid=new).exists)()
    assert not await sync_to_async(Agent.objects.filter(instance_uid=old).exists)()
    uses = await sync_to_async(lambda: list(EnrollmentTokenUse.objects.values_list("instance_uid", flat=True)))()
    assert uses == [new]
    event = await sync_to_async(AuditEvent.objects.get)(action="agent.instance_uid_change")
    assert event.details == {"old": str(old), "new": str(new), "enrollment_token": token.pk}


async def test_a_token_that_did_not_enroll_an_agent_gets_a_new_uid_but_leaves_the_agent_alone(required):
    _, victims_token = await new_token(name="victim's")
    victim = uuid7()
    await http_exchange(full_report(victim.bytes, 1, service="victim"), headers=bearer(victims_token))
    _, other = await new_token(name="other")

    reply = await http_exchange(requesting_uid(victim.bytes), headers=bearer(other))

    assert reply.agent_identification.new_instance_uid
    assert await sync_to_async(Agent.objects.filter(instance_uid=victim).exists)()
    assert not await sync_to_async(AuditEvent.objects.filter(action="agent.instance_uid_change").exists)()


# --- certificates: a token requests them only for the agents it enrolled ---------------------


async def test_another_tokens_csr_cannot_supersede_a_pending_request_or_take_the_certificate(
    required, configured_ca, operator
):
    _, manual = await new_token(name="manual", auto_approve=False)
    _, auto = await new_token(name="auto", auto_approve=True)
    agent_p = uuid7()
    reply = await http_exchange(
        csr_message(agent_p.bytes, 1, make_csr("p256", common_name=str(agent_p))), headers=bearer(manual)
    )
    assert not reply.HasField("error_response")
    pending = await sync_to_async(CertificateRequest.objects.get)(instance_uid=agent_p)

    async with WsAgent(headers=bearer(auto)) as intruder:
        refused = await intruder.exchange(csr_message(agent_p.bytes, 1, make_csr("p256", common_name=str(agent_p))))

    assert refused.error_response.error_message in (
        CSR_AGENT_OF_OTHER_TOKEN.format(uid=agent_p),
        CSR_PENDING_FROM_OTHER_CREDENTIAL.format(uid=agent_p),
    )
    assert not refused.HasField("connection_settings")
    await sync_to_async(pending.refresh_from_db)()
    assert pending.state == CertificateRequest.State.PENDING
    assert not await sync_to_async(IssuedCertificate.objects.filter(instance_uid=agent_p).exists)()
    assert await sync_to_async(CertificateRequest.objects.count)() == 1

    # P's request is still approvable, and P (with its own token) gets the certificate.
    await sync_to_async(certificate_request_approve)(request=pending, actor=operator)
    delivered = await http_exchange(heartbeat(agent_p.bytes, 2, capabilities=CSR_CAPABLE), headers=bearer(manual))
    assert delivered.connection_settings.opamp.certificate.cert


async def test_another_token_cannot_get_a_certificate_for_an_agent_without_a_request(required, configured_ca):
    _, manual = await new_token(name="manual", auto_approve=False)
    _, auto = await new_token(name="auto", auto_approve=True)
    agent_p = uuid7()
    await http_exchange(full_report(agent_p.bytes, 1), headers=bearer(manual))

    refused = await refused_over_http(
        csr_message(agent_p.bytes, 1, make_csr("p256", common_name=str(agent_p))), headers=bearer(auto)
    )

    assert refused.error_response.error_message == CSR_AGENT_OF_OTHER_TOKEN.format(uid=agent_p)
    assert not await sync_to_async(CertificateRequest.objects.exists)()


async def test_an_anonymous_csr_cannot_supersede_a_tokens_pending_request(settings, configured_ca):
    settings.OPAMP_AGENT_AUTH = "open"
    _, manual = await new_token(name="manual")
    agent_p = uuid7()
    await http_exchange(
        csr_message(agent_p.bytes, 1, make_csr("p256", common_name=str(agent_p))), headers=bearer(manual)
    )

    refused = await refused_over_http(csr_message(agent_p.bytes, 1, make_csr("p256", common_name=str(agent_p))))

    assert refused.error_response.error_message == CSR_AGENT_OF_OTHER_TOKEN.format(uid=agent_p)
    request = await sync_to_async(CertificateRequest.objects.get)(instance_uid=agent_p)
    assert request.state == CertificateRequest.State.PENDING


# --- the token that requested a certificate keeps speaking for its agent ----------------------


async def test_the_token_that_requested_a_certificate_keeps_working_for_its_agent_and_only_it(
    required, configured_ca, operator
):
    _, manual = await new_token(name="manual")
    _, other = await new_token(name="other")
    uid = uuid7()
    await http_exchange(csr_message(uid.bytes, 1, make_csr("p256", common_name=str(uid))), headers=bearer(manual))
    request = await sync_to_async(CertificateRequest.objects.get)(instance_uid=uid)
    await sync_to_async(certificate_request_approve)(request=request, actor=operator)

    # The approved certificate is delivered to the agent presenting the token that asked for it.
    delivered = await http_exchange(heartbeat(uid.bytes, 2, capabilities=CSR_CAPABLE), headers=bearer(manual))
    refused = await refused_over_http(full_report(uid.bytes, 1), headers=bearer(other))

    assert not delivered.HasField("error_response")
    assert delivered.connection_settings.opamp.certificate.cert
    assert refused.error_response.error_message == CERTIFIED_AGENT.format(uid=uid)


async def test_the_same_token_may_replace_its_own_pending_request(required, configured_ca):
    _, manual = await new_token(name="manual")
    uid = uuid7()
    await http_exchange(csr_message(uid.bytes, 1, make_csr("p256", common_name=str(uid))), headers=bearer(manual))
    reply = await http_exchange(
        csr_message(uid.bytes, 2, make_csr("p256", common_name=str(uid))), headers=bearer(manual)
    )
    assert not reply.HasField("error_response")
    states = await sync_to_async(lambda: sorted(CertificateRequest.objects.values_list("state", flat=True)))()
    assert states == [CertificateRequest.State.PENDING, CertificateRequest.State.REJECTED]


async def test_on_an_open_server_an_anonymous_agent_cannot_rekey_an_enrolled_agent(settings):
    settings.OPAMP_AGENT_AUTH = "open"
    _, secret = await new_token()
    enrolled, anonymous = uuid7(), uuid7()
    await http_exchange(full_report(enrolled.bytes, 1), headers=bearer(secret))
    await http_exchange(full_report(anonymous.bytes, 1))

    first = await http_exchange(requesting_uid(enrolled.bytes, 2))
    second = await http_exchange(requesting_uid(anonymous.bytes, 2))

    assert first.agent_identification.new_instance_uid and second.agent_identification.new_instance_uid
    assert await sync_to_async(Agent.objects.filter(instance_uid=enrolled).exists)()
    # An agent nobody enrolled is still re-keyed as it asks (the open server's default).
    moved = uuid.UUID(bytes=second.agent_identification.new_instance_uid)
    assert await sync_to_async(Agent.objects.filter(instance_uid=moved).exists)()
    assert not await sync_to_async(Agent.objects.filter(instance_uid=anonymous).exists)()


async def test_the_token_that_requested_a_certificate_cannot_push_aside_the_certified_session(settings, configured_ca):
    settings.OPAMP_AGENT_AUTH = "required"
    settings.OPAMP_TRUSTED_PROXIES = ["10.0.0.5/32"]
    _, shared = await new_token(name="shared", auto_approve=True)
    uid = uuid7()
    issued = await http_exchange(
        csr_message(uid.bytes, 1, make_csr("p256", common_name=str(uid))), headers=bearer(shared)
    )
    certificate = issued.connection_settings.opamp.certificate.cert.decode()
    forwarded = [(b"x-client-cert", quote(certificate).encode()), (b"x-client-verify", b"SUCCESS")]

    async with WsAgent(headers=forwarded, client="10.0.0.5") as agent:
        assert not (await agent.exchange(full_report(uid.bytes, 2))).HasField("error_response")
        async with WsAgent(headers=bearer(shared)) as other_holder:
            refused = await other_holder.exchange(full_report(uid.bytes, 3))
        still = await agent.exchange(heartbeat(uid.bytes, 3))

    assert refused.error_response.error_message == CERTIFIED_SESSION_LIVE.format(uid=uid)
    assert not still.HasField("error_response")
