"""Certificate enrollment over OpAMP: the CSR, the offer, storing, reconnecting, renewal, refusals."""

from __future__ import annotations

import asyncio
import logging
import stat
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from agent_client import Agent, AgentObserver, AgentSettings, FileState, transport_for_url
from agent_client.credentials import CredentialStore, PendingRequest, build_csr, generate_key
from agent_client.enrollment import CUSTOM_CAPABILITY, Enrollment, EnrollmentEvent, EnrollmentSettings
from agent_client.testing import FakeHttpServer, FakeWebSocketServer, HttpRequest, HttpResponse, echo_reply
from opamp.capabilities import AgentCapabilities
from opamp.identifiers import new_instance_uid
from opamp.proto import opamp_pb2 as pb
from signing.ca import check_csr
from tests.agent_client.helpers import FAST, QUIET, RetryRecorder, is_full_report, running
from tests.agent_client.pki import TOKEN, EnrollingServer, issue, issue_unchecked, new_ca, offer_for, pem, server_tls

ENROLLING = replace(
    QUIET,
    enrollment=EnrollmentSettings(token=TOKEN, renewal_check_interval=0.05, csr_retry_initial=0.05, csr_retry_max=0.1),
)
# Heartbeats every 0.05 s: time passes on the connection without a reconnect.
ENROLLING_FAST = replace(FAST, enrollment=ENROLLING.enrollment)


class Events(AgentObserver):
    def __init__(self) -> None:
        self.events: list[tuple[EnrollmentEvent, str]] = []
        self.changed = asyncio.Event()

    def on_enrollment(self, agent: Agent, event: EnrollmentEvent, detail: str) -> None:
        self.events.append((event, detail))
        self.changed.set()

    async def wait_for(self, event: EnrollmentEvent, timeout: float = 3.0) -> str:
        async with asyncio.timeout(timeout):
            while True:
                for seen, detail in self.events:
                    if seen is event:
                        return detail
                self.changed.clear()
                await self.changed.wait()


def enrolling_agent(
    url: str,
    state_dir: Path,
    settings: AgentSettings = ENROLLING,
    *,
    observer: AgentObserver | None = None,
    clock: Callable[[], datetime] | None = None,
    **transport_options: Any,
) -> Agent:
    return Agent(
        transport=transport_for_url(url, trust_env=False, **transport_options),
        state=FileState(state_dir),
        settings=settings,
        observer=observer,
        credentials=CredentialStore(state_dir),
        clock=clock,
    )


def has_csr(message: pb.AgentToServer) -> bool:
    return message.HasField("connection_settings_request")


def has_settings_status(message: pb.AgentToServer) -> bool:
    return message.HasField("connection_settings_status")


def csr_of(message: pb.AgentToServer) -> bytes:
    return message.connection_settings_request.opamp.certificate_request.csr


def public_der(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def wait_until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def provision(state_dir: Path, ca: Any, *, now: datetime, validity: timedelta) -> tuple[bytes, x509.Certificate]:
    """A state dir that already holds a certificate issued at `now`."""
    uid = FileState(state_dir).load_instance_uid()
    if uid is None:
        uid = new_instance_uid()
        FileState(state_dir).save_instance_uid(uid)
    key = generate_key()
    pending = PendingRequest(key=key, csr_pem=build_csr(key, uid))
    cert = issue(ca, pending.csr_pem, uid, validity=validity, now=now)
    CredentialStore(state_dir).install(cert=cert, ca_cert=ca.cert, pending=pending)
    return uid, cert


# --- declaring and authenticating -------------------------------------------------------


async def test_an_enrolling_agent_declares_connection_settings_and_the_certificate_capability(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    async with running(enrolling_agent(ws_server.url, state_dir)):
        first = await ws_server.next_message()
    assert first.capabilities & AgentCapabilities.ACCEPTS_OPAMP_CONNECTION_SETTINGS
    assert first.capabilities & AgentCapabilities.REPORTS_CONNECTION_SETTINGS_STATUS
    assert CUSTOM_CAPABILITY in first.custom_capabilities.capabilities
    # The default echo server does not accept requests: nothing is asked of it.
    assert not any(has_csr(message) for message in ws_server.messages)


async def test_the_token_is_a_bearer_header_on_the_upgrade_and_on_every_post(
    http_server: FakeHttpServer, state_dir: Path
) -> None:
    settings = replace(ENROLLING_FAST)
    async with running(enrolling_agent(http_server.url, state_dir, settings)):
        for _ in range(3):
            await http_server.next_message()
    assert len(http_server.requests) >= 3
    assert all(request.headers["authorization"] == f"Bearer {TOKEN}" for request in http_server.requests)

    async with FakeWebSocketServer() as server, running(enrolling_agent(server.url, state_dir)):
        await server.next_message()
    assert server.request_headers[0]["Authorization"] == f"Bearer {TOKEN}"


async def test_a_server_that_does_not_accept_requests_is_reported_and_asked_nothing(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    events = Events()
    async with running(enrolling_agent(ws_server.url, state_dir, ENROLLING_FAST, observer=events)):
        detail = await events.wait_for(EnrollmentEvent.CSR_NOT_ACCEPTED)
        for _ in range(3):
            await ws_server.next_message()
    assert "does not accept certificate requests (needed: no certificate yet)" in detail
    assert not any(has_csr(message) for message in ws_server.messages)
    assert [event for event, _ in events.events] == [EnrollmentEvent.CSR_NOT_ACCEPTED]


# --- the whole flow ---------------------------------------------------------------------


async def test_enrollment_sends_a_csr_stores_the_certificate_reports_applied_and_reconnects(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    ca = new_ca()
    server = EnrollingServer(ca, heartbeat=7)
    ws_server.responder = server
    agent = enrolling_agent(ws_server.url, state_dir)
    async with running(agent):
        first = await ws_server.next_message()
        request = await ws_server.next_message()
        status = await ws_server.next_message()
        goodbye = await ws_server.next_message()
        again = await ws_server.next_message()

    assert is_full_report(first)
    assert not has_csr(first)  # the server had not said yet that it accepts requests
    # The request rides on its own message right after the first reply.
    assert request.sequence_num == 2
    checked = check_csr(csr_of(request), instance_uid=uuid.UUID(bytes=agent.instance_uid))
    assert checked.key_type == "ecdsa-p256"

    issued = server.issued[0]
    offer = offer_for(issued, ca)
    assert status.connection_settings_status == pb.ConnectionSettingsStatus(
        last_connection_settings_hash=offer.hash, status=pb.ConnectionSettingsStatuses_APPLIED
    )
    assert goodbye.HasField("agent_disconnect")
    assert len(ws_server.connection_times) == 2
    assert is_full_report(again)
    assert again.connection_settings_status.status == pb.ConnectionSettingsStatuses_APPLIED
    assert agent.heartbeat_interval == 7.0

    store = CredentialStore(state_dir)
    assert store.cert_file.read_bytes() == pem(issued)
    assert store.ca_file.read_bytes() == pem(ca.cert)
    key = serialization.load_pem_private_key(store.key_file.read_bytes(), password=None)
    assert public_der(key.public_key()) == public_der(issued.public_key())
    for path in (store.key_file, store.cert_file, store.ca_file, store.status_file):
        assert mode(path) == 0o600, path
    assert not store.pending_key_file.exists()
    # One request in all: the new connection has a certificate.
    assert len(server.csrs) == 1
    # Over ws:// the certificate cannot be presented, so the token still goes along.
    assert ws_server.request_headers[1]["Authorization"] == f"Bearer {TOKEN}"


async def test_a_pending_request_is_sent_once_per_connection_and_applied_when_approved(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    server = EnrollingServer(new_ca(), auto_approve=False)
    ws_server.responder = server
    events = Events()
    async with running(enrolling_agent(ws_server.url, state_dir, ENROLLING_FAST, observer=events)):
        await ws_server.next_matching(has_csr)
        for _ in range(5):  # heartbeats: no second request on this connection
            assert not has_csr(await ws_server.next_message())
        store = CredentialStore(state_dir)
        assert mode(store.pending_key_file) == 0o600
        assert mode(store.pending_csr_file) == 0o600
        assert not store.cert_file.exists()

        await ws_server.push(server.approve())
        status = await ws_server.next_matching(has_settings_status)
        await events.wait_for(EnrollmentEvent.CERTIFICATE_APPLIED)
        await wait_until(lambda: len(ws_server.connection_times) == 2)
    assert status.connection_settings_status.status == pb.ConnectionSettingsStatuses_APPLIED
    assert len(server.csrs) == 1
    assert store.cert_file.exists()
    assert not store.pending_key_file.exists()


async def test_a_pending_request_is_resent_unchanged_after_a_restart(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    ws_server.responder = EnrollingServer(new_ca(), auto_approve=False)
    async with running(enrolling_agent(ws_server.url, state_dir)):
        before = csr_of(await ws_server.next_matching(has_csr))
    async with running(enrolling_agent(ws_server.url, state_dir)):
        after = csr_of(await ws_server.next_matching(has_csr))
    assert after == before


async def test_over_http_the_certificate_arrives_in_a_later_poll_reply(
    http_server: FakeHttpServer, state_dir: Path
) -> None:
    server = EnrollingServer(new_ca(), auto_approve=False)
    approved: list[pb.ServerToAgent] = []

    def responder(message: pb.AgentToServer) -> pb.ServerToAgent:
        reply = server(message)
        if server.pending and not has_csr(message):
            approved.append(server.approve())
            reply.connection_settings.CopyFrom(approved[-1].connection_settings)
        return reply

    http_server.responder = responder
    events = Events()
    async with running(enrolling_agent(http_server.url, state_dir, ENROLLING_FAST, observer=events)):
        await events.wait_for(EnrollmentEvent.CERTIFICATE_APPLIED)
        status = await http_server.next_matching(has_settings_status)
    assert status.connection_settings_status.status == pb.ConnectionSettingsStatuses_APPLIED
    assert status.connection_settings_status.last_connection_settings_hash == approved[0].connection_settings.hash
    assert CredentialStore(state_dir).cert_file.exists()


# --- refusals ---------------------------------------------------------------------------


def refuse_every_csr(message: pb.AgentToServer) -> pb.ServerToAgent:
    if has_csr(message):
        return pb.ServerToAgent(
            instance_uid=message.instance_uid,
            error_response=pb.ServerErrorResponse(
                type=pb.ServerErrorResponseType_BadRequest, error_message="the CSR's own signature does not verify"
            ),
        )
    return EnrollingServer(new_ca())(message)


async def test_a_refused_csr_is_reported_failed_and_not_retried_on_the_same_connection(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    ws_server.responder = refuse_every_csr
    events = Events()
    async with running(enrolling_agent(ws_server.url, state_dir, ENROLLING_FAST, observer=events)):
        first_csr = csr_of(await ws_server.next_matching(has_csr))
        status = await ws_server.next_matching(has_settings_status)
        # Well past the retry backoff (0.05-0.1 s), still on the same connection: no retry.
        for _ in range(8):
            assert not has_csr(await ws_server.next_message())
        assert not CredentialStore(state_dir).pending_key_file.exists()

        await ws_server.drop_connection()
        second_csr = csr_of(await ws_server.next_matching(has_csr))
    assert status.connection_settings_status == pb.ConnectionSettingsStatus(
        status=pb.ConnectionSettingsStatuses_FAILED, error_message="the CSR's own signature does not verify"
    )
    assert "refused the certificate request: the CSR's own signature does not verify" in events.events[1][1]
    # A fresh key on the next connection.
    assert x509.load_pem_x509_csr(second_csr).public_key() != x509.load_pem_x509_csr(first_csr).public_key()


async def test_after_a_refusal_the_next_request_waits_for_its_backoff(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    ws_server.responder = refuse_every_csr
    settings = replace(
        ENROLLING_FAST, enrollment=replace(ENROLLING.enrollment, csr_retry_initial=60.0, csr_retry_max=60.0)
    )
    agent = enrolling_agent(ws_server.url, state_dir, settings)
    async with running(agent):
        await ws_server.next_matching(has_csr)
        await ws_server.next_matching(has_settings_status)
        await ws_server.drop_connection()
        await wait_until(lambda: len(ws_server.connection_times) == 2)
        for _ in range(5):
            assert not has_csr(await ws_server.next_message())
    assert agent.enrollment is not None and agent.enrollment.retry_at is not None
    assert agent.enrollment.retry_at - datetime.now(UTC) > timedelta(seconds=55)


def mismatched_key(ca: Any, csr: bytes, uid: bytes) -> x509.Certificate:
    other = generate_key()
    return issue(ca, build_csr(other, uid), uid)


def other_uid(ca: Any, csr: bytes, uid: bytes) -> x509.Certificate:
    public_key = x509.load_pem_x509_csr(csr).public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    return issue_unchecked(ca, public_key=public_key, uid=uuid.uuid4())


def wrong_ca(ca: Any, csr: bytes, uid: bytes) -> x509.Certificate:
    return issue(new_ca("impostor"), csr, uid)


def expired(ca: Any, csr: bytes, uid: bytes) -> x509.Certificate:
    return issue(ca, csr, uid, validity=timedelta(days=1), now=datetime.now(UTC) - timedelta(days=3))


@pytest.mark.parametrize(
    ("make_certificate", "reason"),
    [
        (mismatched_key, "the certificate's public key is not the key of the pending certificate request"),
        (other_uid, "not this agent's instance uid"),
        (wrong_ca, "the certificate was not issued by the offered CA"),
        (expired, "the certificate expired at"),
    ],
)
async def test_a_bad_offer_is_reported_failed_with_the_reason_and_changes_nothing(
    ws_server: FakeWebSocketServer,
    state_dir: Path,
    make_certificate: Callable[[Any, bytes, bytes], x509.Certificate],
    reason: str,
) -> None:
    ca = new_ca(now=datetime.now(UTC) - timedelta(days=10))
    ws_server.responder = EnrollingServer(ca, auto_approve=False)
    events = Events()
    agent = enrolling_agent(ws_server.url, state_dir, observer=events)
    async with running(agent):
        csr = csr_of(await ws_server.next_matching(has_csr))
        offer = offer_for(make_certificate(ca, csr, agent.instance_uid), ca)
        await ws_server.push(pb.ServerToAgent(instance_uid=agent.instance_uid, connection_settings=offer))
        status = await ws_server.next_matching(has_settings_status)
        await events.wait_for(EnrollmentEvent.CERTIFICATE_REFUSED)
    assert status.connection_settings_status.status == pb.ConnectionSettingsStatuses_FAILED
    assert status.connection_settings_status.last_connection_settings_hash == offer.hash
    assert reason in status.connection_settings_status.error_message
    store = CredentialStore(state_dir)
    assert not store.cert_file.exists()
    assert not store.key_file.exists()
    assert store.pending_key_file.exists()  # the request may still be answered properly
    assert len(ws_server.connection_times) == 1
    assert agent.heartbeat_interval == QUIET.heartbeat_interval


# --- renewal ----------------------------------------------------------------------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def test_renewal_starts_at_the_one_third_mark_and_swaps_keys_when_the_new_certificate_arrives(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    issued_at = datetime.now(UTC).replace(microsecond=0)
    ca = new_ca(now=issued_at - timedelta(days=1), days=400)
    _, old_cert = provision(state_dir, ca, now=issued_at, validity=timedelta(days=30))
    renewal_mark = old_cert.not_valid_after_utc - (old_cert.not_valid_after_utc - old_cert.not_valid_before_utc) / 3
    clock = Clock(renewal_mark - timedelta(minutes=1))
    server = EnrollingServer(ca, auto_approve=False, now=issued_at)
    ws_server.responder = server
    store = CredentialStore(state_dir)
    old_key = store.key_file.read_bytes()
    events = Events()

    async with running(enrolling_agent(ws_server.url, state_dir, ENROLLING_FAST, observer=events, clock=clock)):
        for _ in range(6):  # renewal checks run every 0.05 s; not due yet
            assert not has_csr(await ws_server.next_message())
        clock.now = renewal_mark + timedelta(minutes=1)
        request = await ws_server.next_matching(has_csr)
        assert "renewal due" in await events.wait_for(EnrollmentEvent.CSR_SENT)
        new_public = x509.load_pem_x509_csr(csr_of(request)).public_key()
        assert public_der(new_public) != public_der(old_cert.public_key())
        # Until the new certificate arrives the old pair stays in use.
        assert store.key_file.read_bytes() == old_key
        assert store.cert_file.read_bytes() == pem(old_cert)

        server.now = clock.now
        await ws_server.push(server.approve())
        await events.wait_for(EnrollmentEvent.CERTIFICATE_APPLIED)
        await wait_until(lambda: len(ws_server.connection_times) == 2)

    new_cert = x509.load_pem_x509_certificate(store.cert_file.read_bytes())
    assert new_cert == server.issued[0]
    key = serialization.load_pem_private_key(store.key_file.read_bytes(), password=None)
    assert public_der(key.public_key()) == public_der(new_public) == public_der(new_cert.public_key())
    assert not store.pending_key_file.exists()
    assert len(server.csrs) == 1


async def test_an_expired_certificate_is_replaced_through_the_token(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    issued_at = datetime.now(UTC) - timedelta(days=40)
    ca = new_ca(now=issued_at - timedelta(days=1), days=400)
    provision(state_dir, ca, now=issued_at, validity=timedelta(days=30))
    ws_server.responder = EnrollingServer(ca)
    events = Events()
    async with running(enrolling_agent(ws_server.url, state_dir, observer=events)):
        assert "not valid now" in await events.wait_for(EnrollmentEvent.CSR_SENT)
        await events.wait_for(EnrollmentEvent.CERTIFICATE_APPLIED)
    assert ws_server.request_headers[0]["Authorization"] == f"Bearer {TOKEN}"


async def test_a_renew_message_from_the_server_starts_a_renewal_with_a_new_key(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    ca = new_ca()
    _, cert = provision(state_dir, ca, now=datetime.now(UTC), validity=timedelta(days=30))
    server = EnrollingServer(ca, auto_approve=False)
    ws_server.responder = server
    events = Events()
    agent = enrolling_agent(ws_server.url, state_dir, ENROLLING_FAST, observer=events)
    async with running(agent):
        for _ in range(4):  # a fresh certificate: nothing to request
            assert not has_csr(await ws_server.next_message())
        renew = pb.ServerToAgent(instance_uid=agent.instance_uid, capabilities=server(pb.AgentToServer()).capabilities)
        renew.custom_message.capability = CUSTOM_CAPABILITY
        renew.custom_message.type = "renew"
        await ws_server.push(renew)
        request = await ws_server.next_matching(has_csr)
        # A second renew asks again, with yet another key, on the same connection.
        await ws_server.push(renew)
        again = await ws_server.next_matching(has_csr)
    assert "the server asked for a renewal" in await events.wait_for(EnrollmentEvent.CSR_SENT)
    first_key = x509.load_pem_x509_csr(csr_of(request)).public_key()
    assert public_der(first_key) != public_der(cert.public_key())
    assert csr_of(again) != csr_of(request)


# --- the server refuses the credential --------------------------------------------------


async def test_an_http_401_is_a_refused_credential_retried_only_after_the_delay(state_dir: Path) -> None:
    def unauthorized(request: HttpRequest) -> HttpResponse:
        return HttpResponse(401)

    recorder = RetryRecorder()
    settings = replace(ENROLLING, refused_credential_delay=0.4)
    async with (
        FakeHttpServer(intercept=unauthorized) as server,
        running(enrolling_agent(server.url, state_dir, settings, observer=recorder)),
    ):
        async with asyncio.timeout(2):
            await recorder.scheduled.wait()
        await asyncio.sleep(0.3)
        assert len(server.requests) == 1  # no hot loop
        await wait_until(lambda: len(server.requests) >= 2)
    assert recorder.errors[0] == "server refused the credential (HTTP 401)"
    assert recorder.delays[0] >= 0.4
    assert server.requests[0].headers["authorization"] == f"Bearer {TOKEN}"


class LogLines(logging.Handler):
    """The agent's log lines (the tests run without pytest's logging plugin)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> LogLines:
        logger = logging.getLogger("agent_client")
        self.level = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("agent_client")
        logger.removeHandler(self)
        logger.setLevel(self.level)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


async def test_a_websocket_handshake_refused_with_403_is_a_refused_credential(state_dir: Path) -> None:
    def forbidden(connection: ServerConnection, request: Request) -> Response:
        return connection.respond(403, "no\n")

    recorder = RetryRecorder()
    settings = replace(ENROLLING, refused_credential_delay=0.5)
    with LogLines() as log:
        async with (
            FakeWebSocketServer(process_request=forbidden) as server,
            running(enrolling_agent(server.url, state_dir, settings, observer=recorder)),
        ):
            async with asyncio.timeout(2):
                await recorder.scheduled.wait()
            await asyncio.sleep(0.3)
    assert recorder.errors == ["server refused the credential (HTTP 403)"]
    assert recorder.delays[0] >= 0.5
    assert "server refused the credential (HTTP 403): presented the enrollment token; retrying in" in log.text
    assert TOKEN not in log.text


# --- TLS --------------------------------------------------------------------------------


async def test_after_enrollment_the_agent_presents_its_certificate_over_wss_and_drops_the_token(
    state_dir: Path, tmp_path: Path
) -> None:
    ca = new_ca()
    tls = server_tls(tmp_path / "tls", client_ca=ca, require_client_certificate=False)
    events = Events()
    async with FakeWebSocketServer(EnrollingServer(ca), ssl_context=tls.context) as server:
        agent = enrolling_agent(server.url, state_dir, observer=events, ca_file=tls.ca_file)
        async with running(agent):
            await events.wait_for(EnrollmentEvent.CERTIFICATE_APPLIED)
            await wait_until(lambda: len(server.connection_times) == 2)
            await server.next_matching(is_full_report)
            await server.next_matching(is_full_report)

    stored = CredentialStore(state_dir).cert_file.read_bytes()
    assert server.peer_certificates[0] is None
    assert server.request_headers[0]["Authorization"] == f"Bearer {TOKEN}"
    presented = server.peer_certificates[1]
    assert presented is not None
    assert x509.load_der_x509_certificate(presented) == x509.load_pem_x509_certificate(stored)
    assert "Authorization" not in server.request_headers[1]

    # A server that requires a client certificate lets the enrolled agent in.
    strict = server_tls(tmp_path / "strict", client_ca=ca, require_client_certificate=True)
    async with (
        FakeWebSocketServer(echo_reply, ssl_context=strict.context) as server,
        running(enrolling_agent(server.url, state_dir, ca_file=strict.ca_file)),
    ):
        first = await server.next_message()
    assert first.instance_uid == agent.instance_uid
    assert server.peer_certificates == [presented]


async def test_a_refused_certificate_is_set_aside_for_the_token_which_enrolls_again(
    state_dir: Path, tmp_path: Path
) -> None:
    """A revoked certificate: the server refuses the handshake that presents it; the agent
    comes back with its token, requests a new certificate and presents that one."""
    ca = new_ca()
    _, revoked = provision(state_dir, ca, now=datetime.now(UTC), validity=timedelta(days=30))
    revoked_der = revoked.public_bytes(serialization.Encoding.DER)
    tls = server_tls(tmp_path / "tls", client_ca=ca, require_client_certificate=False)

    def refuse_the_revoked(connection: ServerConnection, request: Request) -> Response | None:
        ssl_object = connection.transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.getpeercert(binary_form=True) == revoked_der:
            return connection.respond(403, "certificate revoked\n")
        return None

    events = Events()
    settings = replace(ENROLLING, refused_credential_delay=30.0)  # the fallback must not wait for it
    async with (
        FakeWebSocketServer(EnrollingServer(ca), ssl_context=tls.context, process_request=refuse_the_revoked) as server,
        running(enrolling_agent(server.url, state_dir, settings, observer=events, ca_file=tls.ca_file)),
    ):
        assert "refused the certificate" in await events.wait_for(EnrollmentEvent.CSR_SENT)
        await events.wait_for(EnrollmentEvent.CERTIFICATE_APPLIED)
        await wait_until(lambda: len(server.connection_times) == 2)
        await server.next_matching(is_full_report)
        await server.next_matching(is_full_report)

    stored = x509.load_pem_x509_certificate(CredentialStore(state_dir).cert_file.read_bytes())
    assert stored != revoked
    token_connection, certificate_connection = server.request_headers
    assert token_connection["Authorization"] == f"Bearer {TOKEN}" and server.peer_certificates[0] is None
    assert "Authorization" not in certificate_connection
    assert server.peer_certificates[1] == stored.public_bytes(serialization.Encoding.DER)


def test_a_refused_token_brings_the_certificate_back(state_dir: Path) -> None:
    """The certificate's refusal may have been passing, the token may have expired since."""
    ca = new_ca()
    uid, _ = provision(state_dir, ca, now=datetime.now(UTC), validity=timedelta(days=30))
    enrollment = Enrollment(CredentialStore(state_dir), ENROLLING.enrollment, clock=lambda: datetime.now(UTC))

    assert enrollment.connection_refused(presented_certificate=True)
    headers, certificate = enrollment.connection_credentials(uid, secure=True)
    assert certificate is None and headers == {"Authorization": f"Bearer {TOKEN}"}

    assert enrollment.connection_refused(presented_certificate=False)
    _, certificate = enrollment.connection_credentials(uid, secure=True)
    assert certificate is not None

    without_token = Enrollment(
        CredentialStore(state_dir), replace(ENROLLING.enrollment, token=""), clock=lambda: datetime.now(UTC)
    )
    assert not without_token.connection_refused(presented_certificate=True)
    assert without_token.connection_credentials(uid, secure=True)[1] is not None


async def test_the_certificate_is_presented_over_https_too(state_dir: Path, tmp_path: Path) -> None:
    ca = new_ca()
    provision(state_dir, ca, now=datetime.now(UTC), validity=timedelta(days=30))
    tls = server_tls(tmp_path / "tls", client_ca=ca, require_client_certificate=True)
    async with (
        FakeHttpServer(EnrollingServer(ca), ssl_context=tls.context) as server,
        running(enrolling_agent(server.url, state_dir, ca_file=tls.ca_file)),
    ):
        await server.next_message()
    stored = CredentialStore(state_dir).cert_file.read_bytes()
    assert server.peer_certificates[0] == x509.load_pem_x509_certificate(stored).public_bytes(
        serialization.Encoding.DER
    )
    assert "authorization" not in server.requests[0].headers


async def test_with_send_token_with_certificate_the_token_goes_along_with_the_certificate(
    state_dir: Path, tmp_path: Path
) -> None:
    ca = new_ca()
    provision(state_dir, ca, now=datetime.now(UTC), validity=timedelta(days=30))
    tls = server_tls(tmp_path / "tls", client_ca=ca, require_client_certificate=True)
    settings = replace(ENROLLING, enrollment=replace(ENROLLING.enrollment, send_token_with_certificate=True))
    async with (
        FakeWebSocketServer(EnrollingServer(ca), ssl_context=tls.context) as server,
        running(enrolling_agent(server.url, state_dir, settings, ca_file=tls.ca_file)),
    ):
        await server.next_message()
    assert server.peer_certificates[0] is not None
    assert server.request_headers[0]["Authorization"] == f"Bearer {TOKEN}"


# --- offers without a new certificate ---------------------------------------------------


def settings_offer(digest: bytes, heartbeat: int) -> pb.ConnectionSettingsOffers:
    offer = pb.ConnectionSettingsOffers(hash=digest)
    offer.opamp.destination_endpoint = "ws://elsewhere.example/v1/opamp"
    offer.opamp.heartbeat_interval_seconds = heartbeat
    return offer


async def test_an_offer_without_a_certificate_is_applied_and_reported_once(
    ws_server: FakeWebSocketServer, state_dir: Path
) -> None:
    def offer_settings(message: pb.AgentToServer) -> pb.ServerToAgent:
        reply = echo_reply(message)
        reply.connection_settings.CopyFrom(settings_offer(b"\x07" * 32, 9))
        return reply

    ws_server.responder = offer_settings
    agent = enrolling_agent(ws_server.url, state_dir)
    async with running(agent):
        await ws_server.next_message()
        status = await ws_server.next_matching(has_settings_status)
        await asyncio.sleep(0.2)
    assert status.connection_settings_status == pb.ConnectionSettingsStatus(
        last_connection_settings_hash=b"\x07" * 32, status=pb.ConnectionSettingsStatuses_APPLIED
    )
    assert agent.heartbeat_interval == 9.0
    # The same hash again (every reply carries it) is not reported again; the URL stays.
    assert sum(has_settings_status(message) for message in ws_server.messages) == 1
    assert len(ws_server.connection_times) == 1

    # After a restart the persisted status says APPLIED: the repeated offer's interval is
    # adopted again without another report.
    await wait_until(lambda: ws_server.closed.is_set())
    ws_server.messages.clear()
    restarted = enrolling_agent(ws_server.url, state_dir)
    async with running(restarted):
        first = await ws_server.next_matching(is_full_report)
        await wait_until(lambda: restarted.heartbeat_interval == 9.0)
        await asyncio.sleep(0.1)
    assert first.connection_settings_status.last_connection_settings_hash == b"\x07" * 32
    assert [message for message in ws_server.messages if has_settings_status(message)] == [first]
