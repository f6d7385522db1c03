"""Credentials on the OpAMP endpoints, the CSR flow in the session, revocation of live sessions.

Everything goes through the real ASGI application (both transports), as an agent or the
TLS terminator in front of the app would talk to it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import pytest
from channels.db import database_sync_to_async as sync_to_async
from cryptography import x509
from cryptography.x509.oid import NameOID

from fleet.connection import AUTHORIZATION_MALFORMED
from fleet.consumers import CLOSE_CREDENTIAL_REVOKED
from fleet.credentials import SPEAKS_FOR_OTHER
from fleet.models import Agent
from fleet.session_runtime import BASE_SERVER_CAPABILITIES, reset_runtime
from opamp.capabilities import AgentCapabilities
from opamp.identifiers import uuid7
from opamp.proto import opamp_pb2
from rollouts.package_contributor import PACKAGES_CAPABILITIES
from rollouts.session_contributor import REMOTE_CONFIG_CAPABILITIES
from signing.agent_credentials import (
    CERTIFICATE_CAPABILITY,
    CERTIFICATE_NOT_CURRENT,
    CERTIFIED_AGENT,
    CREDENTIAL_REQUIRED,
    CSR_NOT_ACCEPTED,
    RENEW_MESSAGE_TYPE,
)
from signing.ca import (
    CSR_BAD_SIGNATURE,
    CSR_KEY_TYPE_NOT_ALLOWED,
    CSR_OTHER_AGENT,
    CSR_REQUESTS_CA,
    CSR_SUBJECT_ALT_NAMES,
    CSR_UNKNOWN_CRITICAL_EXTENSION,
)
from signing.certificates import certificate_request_approve, certificate_request_submit, certificate_revoke
from signing.enrollment_tokens import enrollment_token_create, enrollment_token_revoke
from signing.errors import TOKEN_EXHAUSTED, TOKEN_EXPIRED, TOKEN_REVOKED, TOKEN_UNKNOWN
from signing.models import CertificateRequest, EnrollmentToken, EnrollmentTokenUse, IssuedCertificate
from signing.session_contributor import CERTIFICATE_CAPABILITIES
from tests.fleet.asgi_clients import WsAgent, decode_http_reply, http_exchange, http_post
from tests.fleet.messages import BASE_CAPABILITIES, full_report, heartbeat
from tests.signing.csrs import UNKNOWN_EXTENSION_OID, make_csr, urn, with_broken_signature

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

PROXY = "10.0.0.5"
CSR_CAPABLE = BASE_CAPABILITIES | AgentCapabilities.ACCEPTS_OPAMP_CONNECTION_SETTINGS
SERVER_CAPABILITIES = BASE_SERVER_CAPABILITIES | REMOTE_CONFIG_CAPABILITIES | PACKAGES_CAPABILITIES


@pytest.fixture(autouse=True)
def fresh_runtime() -> Any:
    reset_runtime()
    yield
    reset_runtime()


@pytest.fixture
def required(settings: Any) -> Any:
    settings.OPAMP_AGENT_AUTH = "required"
    settings.OPAMP_TRUSTED_PROXIES = [f"{PROXY}/32"]
    return settings


def bearer(secret: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {secret}".encode())]


def forwarded(pem: str, verify: bytes = b"SUCCESS") -> list[tuple[bytes, bytes]]:
    """The headers deploy/nginx sets after verifying a client certificate."""
    return [(b"x-client-cert", quote(pem).encode()), (b"x-client-verify", verify)]


async def new_token(**overrides: Any) -> tuple[EnrollmentToken, str]:
    options: dict[str, Any] = {
        "name": "edge rollout",
        "expires_in": timedelta(hours=1),
        "max_uses": 5,
        "labels": None,
        "auto_approve": False,
        "actor": None,
        **overrides,
    }
    return await sync_to_async(enrollment_token_create)(**options)


async def issued_certificate(uid: uuid.UUID, **csr_options: Any) -> IssuedCertificate:
    request = await sync_to_async(certificate_request_submit)(
        instance_uid=uid, csr_pem=make_csr("p256", **csr_options), auto_approve=True
    )
    return await sync_to_async(IssuedCertificate.objects.get)(request=request)


def csr_message(uid: bytes, seq: int, csr: bytes) -> opamp_pb2.AgentToServer:
    message = full_report(uid, seq, capabilities=CSR_CAPABLE)
    message.connection_settings_request.opamp.certificate_request.csr = csr
    return message


# --- who may connect ----------------------------------------------------------------------


async def test_without_a_credential_http_gets_401_and_the_websocket_handshake_is_refused(required):
    uid = uuid7().bytes
    response = await http_post(full_report(uid, 1).SerializeToString())
    assert response["status"] == 401
    assert response["body"].decode().strip() == CREDENTIAL_REQUIRED
    assert response["headers_dict"][b"www-authenticate"].startswith(b"Bearer")
    accepted, _ = await WsAgent().connect()
    assert not accepted
    assert not await sync_to_async(Agent.objects.exists)()


async def test_the_open_embedded_default_admits_agents_without_a_credential():
    reply = await http_exchange(full_report(uuid7().bytes, 1))
    assert not reply.HasField("error_response")


@pytest.mark.parametrize("auth_mode", ["open", "required"])
@pytest.mark.parametrize(
    ("case", "make_secret", "message"),
    [
        ("unknown", lambda token, secret: "opamp_et_" + "x" * 43, TOKEN_UNKNOWN),
        ("not a token at all", lambda token, secret: "hunter2", TOKEN_UNKNOWN),
        (
            "revoked",
            lambda token, secret: enrollment_token_revoke(token=token, actor=None) and secret,
            TOKEN_REVOKED,
        ),
        (
            "expired",
            lambda token, secret: (
                EnrollmentToken.objects.filter(pk=token.pk).update(expires_at=token.created_at) and secret
            ),
            TOKEN_EXPIRED,
        ),
    ],
)
async def test_a_bad_token_is_refused_with_its_reason_even_on_an_open_server(
    settings: Any, auth_mode: str, case: str, make_secret: Callable[[Any, str], str], message: str
):
    settings.OPAMP_AGENT_AUTH = auth_mode
    token, secret = await new_token()
    presented = await sync_to_async(make_secret)(token, secret)
    response = await http_post(full_report(uuid7().bytes, 1).SerializeToString(), headers=bearer(presented))
    assert response["status"] == 401
    assert response["body"].decode().strip() == message
    accepted, _ = await WsAgent(headers=bearer(presented)).connect()
    assert not accepted


async def test_a_malformed_authorization_header_is_refused(required):
    response = await http_post(
        full_report(uuid7().bytes, 1).SerializeToString(), headers=[(b"authorization", b"Basic eDp5")]
    )
    assert response["status"] == 401
    assert response["body"].decode().strip() == AUTHORIZATION_MALFORMED


async def test_a_token_enrolls_each_agent_once_and_labels_the_new_ones(required):
    token, secret = await new_token(labels={"team": "edge", "env": "prod"}, max_uses=2)
    first, second = uuid7(), uuid7()
    async with WsAgent(headers=bearer(secret)) as agent:
        await agent.exchange(full_report(first.bytes, 1))
        await agent.exchange(heartbeat(first.bytes, 2))
    await http_exchange(full_report(first.bytes, 3), headers=bearer(secret))  # the same agent again
    await http_exchange(full_report(second.bytes, 1), headers=bearer(secret))

    await sync_to_async(token.refresh_from_db)()
    assert token.use_count == 2
    uses = await sync_to_async(lambda: sorted(EnrollmentTokenUse.objects.values_list("instance_uid", flat=True)))()
    assert uses == sorted([first, second])
    agent = await sync_to_async(Agent.objects.get)(instance_uid=first)
    assert agent.operator_labels == {"team": "edge", "env": "prod"}


async def test_a_used_up_token_admits_its_agents_but_no_further_one(required):
    _, secret = await new_token(max_uses=1)
    enrolled, latecomer = uuid7(), uuid7()
    await http_exchange(full_report(enrolled.bytes, 1), headers=bearer(secret))

    response = await http_post(full_report(latecomer.bytes, 1).SerializeToString(), headers=bearer(secret))
    refused = decode_http_reply(response)
    assert response["status"] == 400
    assert refused.error_response.error_message == TOKEN_EXHAUSTED
    assert not await sync_to_async(Agent.objects.filter(instance_uid=latecomer).exists)()
    # The enrolled agent is not harmed by the latecomer.
    again = await http_exchange(heartbeat(enrolled.bytes, 2), headers=bearer(secret))
    assert not again.HasField("error_response")


# --- client certificates forwarded by the TLS terminator ------------------------------------


async def test_a_forwarded_certificate_authenticates_its_agent_and_only_that_agent(required, configured_ca):
    uid, other = uuid7(), uuid7()
    certificate = await issued_certificate(uid)
    reply = await http_exchange(full_report(uid.bytes, 1), headers=forwarded(certificate.pem), client=PROXY)
    assert not reply.HasField("error_response")

    response = await http_post(
        full_report(other.bytes, 1).SerializeToString(), headers=forwarded(certificate.pem), client=PROXY
    )
    assert response["status"] == 400
    assert decode_http_reply(response).error_response.error_message == SPEAKS_FOR_OTHER.format(bound=uid, claimed=other)
    async with WsAgent(headers=forwarded(certificate.pem), client=PROXY) as agent:
        assert (await agent.exchange(full_report(uid.bytes, 2))).HasField("error_response") is False
        impersonation = await agent.exchange(full_report(other.bytes, 1))
    assert impersonation.error_response.error_message == SPEAKS_FOR_OTHER.format(bound=uid, claimed=other)
    assert not await sync_to_async(Agent.objects.filter(instance_uid=other).exists)()


async def test_certificate_headers_are_ignored_unless_they_come_from_a_trusted_proxy(required, configured_ca):
    uid = uuid7()
    certificate = await issued_certificate(uid)
    direct = await http_post(
        full_report(uid.bytes, 1).SerializeToString(), headers=forwarded(certificate.pem), client="10.0.0.99"
    )
    assert direct["status"] == 401
    assert direct["body"].decode().strip() == CREDENTIAL_REQUIRED
    accepted, _ = await WsAgent(headers=forwarded(certificate.pem), client="192.168.1.4").connect()
    assert not accepted
    # From the proxy, but the proxy says verification failed: not a credential either.
    failed = await http_post(
        full_report(uid.bytes, 1).SerializeToString(),
        headers=forwarded(certificate.pem, b"FAILED:revoked"),
        client=PROXY,
    )
    assert failed["status"] == 401


async def test_a_revoked_or_expired_certificate_is_refused_by_the_app_itself(required, configured_ca):
    revoked_uid, expired_uid = uuid7(), uuid7()
    revoked = await issued_certificate(revoked_uid)
    expired = await issued_certificate(expired_uid)
    await sync_to_async(certificate_revoke)(certificate=revoked, actor=None)
    await sync_to_async(IssuedCertificate.objects.filter(pk=expired.pk).update)(not_after=expired.not_before)
    for uid, certificate in ((revoked_uid, revoked), (expired_uid, expired)):
        response = await http_post(
            full_report(uid.bytes, 1).SerializeToString(), headers=forwarded(certificate.pem), client=PROXY
        )
        assert response["status"] == 401
        assert response["body"].decode().strip() == CERTIFICATE_NOT_CURRENT


async def test_revoking_a_certificate_drops_the_live_session_that_uses_it_and_only_that_one(required, configured_ca):
    uid, bystander_uid, token_uid = uuid7(), uuid7(), uuid7()
    certificate = await issued_certificate(uid)
    bystander_certificate = await issued_certificate(bystander_uid)
    _, secret = await new_token()
    victim = WsAgent(headers=forwarded(certificate.pem), client=PROXY)
    bystander = WsAgent(headers=forwarded(bystander_certificate.pem), client=PROXY)
    token_session = WsAgent(headers=bearer(secret))
    async with victim, bystander, token_session:
        await victim.exchange(full_report(uid.bytes, 1))
        await bystander.exchange(full_report(bystander_uid.bytes, 1))
        await token_session.exchange(full_report(token_uid.bytes, 1))

        await sync_to_async(certificate_revoke)(certificate=certificate, actor=None)

        closed = await victim.receive_close()
        assert closed["code"] == CLOSE_CREDENTIAL_REVOKED
        assert not (await bystander.exchange(heartbeat(bystander_uid.bytes, 2))).HasField("error_response")
        assert not (await token_session.exchange(heartbeat(token_uid.bytes, 2))).HasField("error_response")
    refused, _ = await WsAgent(headers=forwarded(certificate.pem), client=PROXY).connect()
    assert not refused


async def test_a_token_may_not_speak_for_an_agent_that_holds_a_certificate(required, configured_ca):
    uid = uuid7()
    certificate = await issued_certificate(uid)
    _, secret = await new_token()
    async with WsAgent(headers=forwarded(certificate.pem), client=PROXY) as agent:
        await agent.exchange(full_report(uid.bytes, 1))
        async with WsAgent(headers=bearer(secret)) as impostor:
            refused = await impostor.exchange(full_report(uid.bytes, 1))
        # The certified session was not pushed aside by the token holder.
        still = await agent.exchange(heartbeat(uid.bytes, 2))
    assert refused.error_response.error_message == CERTIFIED_AGENT.format(uid=uid)
    assert not still.HasField("error_response")


# --- the CSR flow -----------------------------------------------------------------------------


async def test_the_server_advertises_the_csr_flow_only_with_a_ca(settings, ca_files):
    reply = await http_exchange(full_report(uuid7().bytes, 1))
    assert reply.capabilities == SERVER_CAPABILITIES
    settings.OPAMP_CA_KEY_FILE, settings.OPAMP_CA_CERT_FILE = str(ca_files.key_file), str(ca_files.cert_file)
    reply = await http_exchange(full_report(uuid7().bytes, 1))
    assert reply.capabilities == SERVER_CAPABILITIES | CERTIFICATE_CAPABILITIES


async def test_a_csr_without_a_ca_is_a_bad_request():
    uid = uuid7()
    async with WsAgent() as agent:
        reply = await agent.exchange(csr_message(uid.bytes, 1, make_csr("p256")))
    assert reply.error_response.type == opamp_pb2.ServerErrorResponseType_BadRequest
    assert reply.error_response.error_message == CSR_NOT_ACCEPTED


async def test_an_auto_approving_token_gets_the_certificate_in_the_reply_to_the_csr(required, configured_ca):
    token, secret = await new_token(auto_approve=True)
    uid = uuid7()
    async with WsAgent(headers=bearer(secret)) as agent:
        reply = await agent.exchange(csr_message(uid.bytes, 1, make_csr("p256", common_name=str(uid))))
        later = await agent.exchange(heartbeat(uid.bytes, 2, capabilities=CSR_CAPABLE))

    offer = reply.connection_settings
    assert offer.hash and offer.opamp.destination_endpoint.endswith("/v1/opamp")
    assert offer.opamp.heartbeat_interval_seconds == 30
    assert offer.opamp.certificate.private_key == b""  # the agent made its key; we never send one
    assert offer.opamp.certificate.ca_cert == configured_ca.cert_file.read_bytes()
    cert = x509.load_pem_x509_certificate(offer.opamp.certificate.cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == str(uid)
    cert.verify_directly_issued_by(configured_ca.ca.cert)
    assert not later.HasField("connection_settings")  # offered once per connection

    issued = await sync_to_async(IssuedCertificate.objects.select_related("request__enrollment_token").get)(
        instance_uid=uid
    )
    assert issued.request.enrollment_token_id == token.pk
    assert issued.serial == cert.serial_number


async def test_a_pending_csr_is_answered_by_a_push_once_an_operator_approves(required, configured_ca, operator):
    _, secret = await new_token(auto_approve=False)
    uid = uuid7()
    async with WsAgent(headers=bearer(secret)) as agent:
        reply = await agent.exchange(csr_message(uid.bytes, 1, make_csr("p256")))
        assert not reply.HasField("connection_settings") and not reply.HasField("error_response")
        request = await sync_to_async(CertificateRequest.objects.get)(instance_uid=uid)
        assert request.state == CertificateRequest.State.PENDING

        await sync_to_async(certificate_request_approve)(request=request, actor=operator)
        pushed = await agent.receive()
    assert pushed.connection_settings.opamp.certificate.cert
    x509.load_pem_x509_certificate(pushed.connection_settings.opamp.certificate.cert)


async def test_an_http_agent_gets_its_certificate_on_its_next_poll_until_it_answers_the_offer(configured_ca, operator):
    uid = uuid7()
    first = await http_exchange(csr_message(uid.bytes, 1, make_csr("p256")))
    assert not first.HasField("connection_settings")
    request = await sync_to_async(CertificateRequest.objects.get)(instance_uid=uid)
    await sync_to_async(certificate_request_approve)(request=request, actor=operator)

    poll = await http_exchange(heartbeat(uid.bytes, 2, capabilities=CSR_CAPABLE))
    assert poll.connection_settings.opamp.certificate.cert
    answer = heartbeat(uid.bytes, 3, capabilities=CSR_CAPABLE)
    answer.connection_settings_status.last_connection_settings_hash = poll.connection_settings.hash
    answer.connection_settings_status.status = opamp_pb2.ConnectionSettingsStatuses_APPLIED
    await http_exchange(answer)
    quiet = await http_exchange(heartbeat(uid.bytes, 4, capabilities=CSR_CAPABLE))
    assert not quiet.HasField("connection_settings")


async def test_an_agent_that_does_not_accept_connection_settings_is_never_offered_a_certificate(configured_ca):
    uid = uuid7()
    message = full_report(uid.bytes, 1)  # no AcceptsOpAMPConnectionSettings
    message.connection_settings_request.opamp.certificate_request.csr = make_csr("p256")
    await sync_to_async(certificate_request_submit)(instance_uid=uid, csr_pem=make_csr("p256"), auto_approve=True)
    reply = await http_exchange(message)
    assert not reply.HasField("connection_settings")


SENDER = uuid.UUID("01890a5d-ac96-774b-bcce-b302099a8057")
OTHER = uuid.UUID("01890a5d-ac96-774b-bcce-b302099a8058")
REFUSED_CSRS: list[tuple[str, Callable[[], bytes], str]] = [
    ("a bad signature", lambda: with_broken_signature(make_csr(common_name=str(SENDER))), CSR_BAD_SIGNATURE),
    ("CA:true", lambda: make_csr(ca=True), CSR_REQUESTS_CA),
    ("a DNS SAN", lambda: make_csr(sans=[x509.DNSName("collector.example.com")]), CSR_SUBJECT_ALT_NAMES),
    ("another agent's uid", lambda: make_csr(sans=[urn(OTHER)]), CSR_OTHER_AGENT),
    ("an RSA-1024 key", lambda: make_csr("rsa1024"), CSR_KEY_TYPE_NOT_ALLOWED.format(key_type="rsa-1024")),
    (
        "an unknown critical extension",
        lambda: make_csr(unknown_critical_extension=True),
        CSR_UNKNOWN_CRITICAL_EXTENSION.format(oid=UNKNOWN_EXTENSION_OID.dotted_string),
    ),
]


@pytest.mark.parametrize(("case", "build", "message"), REFUSED_CSRS, ids=[case for case, _, _ in REFUSED_CSRS])
async def test_a_csr_against_policy_is_a_bad_request_with_its_reason(configured_ca, case, build, message):
    async with WsAgent() as agent:
        reply = await agent.exchange(csr_message(SENDER.bytes, 1, build()))
        after = await agent.exchange(heartbeat(SENDER.bytes, 2, capabilities=CSR_CAPABLE))
    assert reply.error_response.type == opamp_pb2.ServerErrorResponseType_BadRequest
    assert reply.error_response.error_message == message
    assert not after.HasField("error_response")  # the session goes on
    assert not await sync_to_async(IssuedCertificate.objects.filter(instance_uid=SENDER).exists)()


# --- renewal ---------------------------------------------------------------------------------


async def test_a_certificate_in_its_last_third_is_asked_to_renew_and_the_renewal_is_auto_approved(
    required, configured_ca
):
    uid = uuid7()
    current = await issued_certificate(uid)
    lifetime = current.not_after - current.not_before
    # Move the validity window so that only a quarter of it is left.
    await sync_to_async(IssuedCertificate.objects.filter(pk=current.pk).update)(
        not_before=current.not_before - lifetime * 0.75, not_after=current.not_after - lifetime * 0.75
    )
    report = full_report(uid.bytes, 1, capabilities=CSR_CAPABLE)
    report.custom_capabilities.capabilities.append(CERTIFICATE_CAPABILITY)
    async with WsAgent(headers=forwarded(current.pem), client=PROXY) as agent:
        asked = await agent.exchange(report)
        again = await agent.exchange(heartbeat(uid.bytes, 2, capabilities=CSR_CAPABLE))
        renewed = await agent.exchange(csr_message(uid.bytes, 3, make_csr("p384")))

    assert (asked.custom_message.capability, asked.custom_message.type) == (CERTIFICATE_CAPABILITY, RENEW_MESSAGE_TYPE)
    assert not again.HasField("custom_message")  # asked once
    new_cert = x509.load_pem_x509_certificate(renewed.connection_settings.opamp.certificate.cert)
    assert new_cert.serial_number != current.serial
    assert await sync_to_async(IssuedCertificate.objects.filter(instance_uid=uid).count)() == 2
