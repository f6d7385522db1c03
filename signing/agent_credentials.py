"""Agent credentials on OpAMP connections: signing's `CredentialAuthority` (fleet.credentials).

An agent proves itself with one of two credentials:

- a client certificate issued by our CA, verified by the TLS terminator (nginx, see
  deploy/) and forwarded in `X-Client-Cert` / `X-Client-Verify` (read by fleet.connection,
  from trusted proxies only). The app re-checks the certificate against the database
  (revoked or expired since the proxy's last CRL reload -> refused) and binds the
  connection to the certificate's instance_uid;
- an enrollment token (`Authorization: Bearer opamp_et_...`), which admits any agent until
  it expires, is revoked or has been used by `max_uses` distinct agents. Which agents a
  token may then speak for, and request certificates for, is `token_identity_check` and
  `certificate_request_from_agent`: checked before anything changes.

With OPAMP_AGENT_AUTH = "open" (the embedded default) an agent without either is admitted
as anonymous; a credential that is presented is checked all the same.

The CSR flow's parts (submitting a CSR from a connection, the certificate offer) are here
too; the session reaches them through signing.session_contributor.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.utils import timezone

from fleet.agent_labels import agent_labels_set
from fleet.credentials import (
    ANONYMOUS,
    AgentCredential,
    CredentialAuthority,
    CredentialKind,
    CredentialRefused,
    PresentedCredentials,
)
from fleet.models import Agent
from fleet.services import agent_instance_uid_move
from fleet.telemetry_settings import seal
from opamp.proto import opamp_pb2
from signing import ca as ca_module
from signing.ca import CsrRejected
from signing.certificates import certificate_request_submit
from signing.configured_ca import ca_certificate_pem
from signing.enrollment_tokens import enrollment_token_authenticate, enrollment_token_refusal, enrollment_token_use
from signing.errors import EnrollmentTokenRefused, SigningError
from signing.models import CertificateRequest, EnrollmentToken, EnrollmentTokenUse, IssuedCertificate
from signing.selectors import agent_current_certificate, certificate_for_fingerprint, valid_certificates

OPEN = "open"
REQUIRED = "required"
AUTH_MODES = (OPEN, REQUIRED)

CREDENTIAL_REQUIRED = (
    "this server requires an agent credential: an enrollment token (Authorization: Bearer ...) "
    "or a client certificate issued by its certificate authority"
)
CERTIFICATE_UNREADABLE = "the forwarded client certificate is not a readable PEM certificate"
CERTIFICATE_NOT_CURRENT = (
    "the client certificate is not a current certificate of this server (revoked, expired or unknown)"
)
CERTIFIED_AGENT = (
    "agent {uid} holds a client certificate: only that certificate, or the enrollment token that requested it, "
    "may speak for it"
)
TOKEN_GONE = "the enrollment token no longer exists"
CSR_AGENT_OF_OTHER_TOKEN = (
    "agent {uid} was enrolled with another enrollment token; only that token may request certificates for it"
)


def auth_mode() -> str:
    mode = str(settings.OPAMP_AGENT_AUTH).strip().lower()
    if mode not in AUTH_MODES:
        raise ImproperlyConfigured(f"OPAMP_AGENT_AUTH must be one of {', '.join(AUTH_MODES)}, not {mode!r}")
    return mode


def authenticate_agent(presented: PresentedCredentials, *, now: datetime | None = None) -> AgentCredential:
    """The credential a connection may proceed with, or CredentialRefused (-> 401).

    A certificate wins over a token: it is the stronger, per-agent credential, and an
    agent that enrolled keeps its token configured for a while. Database reads only.
    """
    moment = now or timezone.now()
    if presented.client_cert_pem:
        try:
            cert = x509.load_pem_x509_certificate(presented.client_cert_pem)
        except ValueError:
            raise CredentialRefused(CERTIFICATE_UNREADABLE) from None
        issued = certificate_for_fingerprint(ca_module.certificate_fingerprint(cert), moment)
        if issued is None:
            raise CredentialRefused(CERTIFICATE_NOT_CURRENT)
        return AgentCredential(
            kind=CredentialKind.CERTIFICATE,
            bound_uid=issued.instance_uid,
            fingerprint_sha256=issued.fingerprint_sha256,
            renew_after=ca_module.renewal_due_at(not_before=issued.not_before, not_after=issued.not_after),
        )
    if presented.bearer:
        try:
            # A used-up token still admits the agents it enrolled; a further agent is
            # refused on its first message (`enrollment_record`), when its uid is known.
            token = enrollment_token_authenticate(presented.bearer, now=moment, allow_used_up=True)
        except EnrollmentTokenRefused as error:
            raise CredentialRefused(error.message) from None
        return AgentCredential(kind=CredentialKind.TOKEN, token_id=token.pk, token_auto_approve=token.auto_approve)
    if auth_mode() == REQUIRED:
        raise CredentialRefused(CREDENTIAL_REQUIRED)
    return ANONYMOUS


def credential_still_valid(credential: AgentCredential, *, now: datetime | None = None) -> bool:
    """Re-check a live connection's certificate (after a revocation hint).

    Tokens are checked at connection time only: revoking a token stops new enrolments,
    and agents already admitted keep working until they reconnect.
    """
    if not credential.is_certificate:
        return True
    return certificate_for_fingerprint(credential.fingerprint_sha256, now or timezone.now()) is not None


def token_identity_check(credential: AgentCredential, instance_uid: uuid.UUID, *, now: datetime | None = None) -> None:
    """May a token connection speak for `instance_uid`? Read-only: run before anything changes.

    A token is shared by many agents, a certificate belongs to one. Once an agent holds a
    valid certificate, only that certificate or the token that requested it may speak for
    it: an agent connecting over ws:// or http:// cannot present its certificate, so the
    token it enrolled with keeps working there, and an approved certificate not yet
    delivered reaches the agent presenting the token that asked for it. Any other token is
    refused, so a token holder can neither impersonate a certified agent nor push its live
    session aside. An agent without a certificate may be spoken for by a token that
    enrolled it, or by one that may still enrol an agent (not used up, revoked or expired;
    `enrollment_record` counts the use once the message is accepted).
    """
    if credential.kind is not CredentialKind.TOKEN or credential.token_id is None:
        return
    certified = valid_certificates(now).filter(instance_uid=instance_uid)
    if certified.exists():
        if certified.filter(request__enrollment_token_id=credential.token_id).exists():
            return
        raise CredentialRefused(CERTIFIED_AGENT.format(uid=instance_uid))
    if EnrollmentTokenUse.objects.filter(token_id=credential.token_id, instance_uid=instance_uid).exists():
        return
    token = EnrollmentToken.objects.filter(pk=credential.token_id).first()
    if token is None:
        raise CredentialRefused(TOKEN_GONE)
    refusal = enrollment_token_refusal(token, now=now)
    if refusal is not None:
        raise CredentialRefused(refusal.message)


def _has_credentials(instance_uid: uuid.UUID) -> bool:
    return (
        EnrollmentTokenUse.objects.filter(instance_uid=instance_uid).exists()
        or valid_certificates().filter(instance_uid=instance_uid).exists()
    )


def agent_instance_uid_reassign(*, credential: AgentCredential, old: uuid.UUID, new: uuid.UUID) -> bool:
    """Move an agent that asked for a new instance_uid (RequestInstanceUid) to `new`.

    Only a credential that owns the old uid moves its row: the token that enrolled it (its
    enrollment moves along, so a used-up token still admits the agent under its new uid),
    or, on an open server, an anonymous agent, for an agent that no token enrolled and that
    holds no certificate. Any other requester just gets the new uid
    as a new agent, and the row it named is left alone. Audited; False when nothing moved.
    """
    with transaction.atomic():
        token_id = credential.token_id if credential.kind is CredentialKind.TOKEN else None
        if token_id is not None:
            if not EnrollmentTokenUse.objects.filter(token_id=token_id, instance_uid=old).update(instance_uid=new):
                return False
        elif credential.kind is not CredentialKind.ANONYMOUS or _has_credentials(old):
            return False
        moved = agent_instance_uid_move(old=old, new=new, details={"enrollment_token": token_id})
    return moved or token_id is not None


def enrollment_record(credential: AgentCredential, instance_uid: uuid.UUID) -> dict[str, str]:
    """Count `instance_uid` as enrolled by the connection's token.

    The same agent enrolling again is not a new use. Returns the token's labels when the
    agent has no inventory row yet (they are applied once the first report created it, by
    `enrollment_labels_apply`); an existing agent gets them here. Raises CredentialRefused
    when the token was used up by other agents or revoked since the connection began.
    """
    if credential.kind is not CredentialKind.TOKEN or credential.token_id is None:
        return {}
    token = EnrollmentToken.objects.filter(pk=credential.token_id).first()
    if token is None:
        raise CredentialRefused(TOKEN_GONE)
    known = Agent.objects.filter(instance_uid=instance_uid).exists()
    try:
        enrollment_token_use(token=token, instance_uid=instance_uid)
    except EnrollmentTokenRefused as error:
        raise CredentialRefused(error.message) from None
    return {} if known else dict(token.labels or {})


def enrollment_labels_apply(*, instance_uid: uuid.UUID, labels: dict[str, str]) -> None:
    """Apply an enrollment token's labels to a newly inventoried agent (merged, not replaced)."""
    if labels:
        agent_labels_set(instance_uid=instance_uid, labels=labels, actor=None, replace=False)


# --- the CSR flow: agent -> CSR, server -> connection_settings.opamp.certificate ---------

CSR_NOT_ACCEPTED = "this server does not issue client certificates (no certificate authority is configured)"
# The custom capability over which the server asks an agent to renew its certificate.
CERTIFICATE_CAPABILITY = "io.opamp.certificate/v1"
RENEW_MESSAGE_TYPE = "renew"


def ca_configured() -> bool:
    """Whether a CA is configured (no file I/O: decides the advertised capabilities)."""
    return bool(settings.OPAMP_CA_KEY_FILE and settings.OPAMP_CA_CERT_FILE)


def certificate_request_from_agent(
    credential: AgentCredential, instance_uid: uuid.UUID, csr_pem: bytes, *, now: datetime | None = None
) -> CertificateRequest:
    """Submit a CSR that arrived on an OpAMP connection.

    Auto-approved when the enrollment token says so, or when a valid certificate of the
    same agent authenticates the connection (a renewal: the agent already proved who it
    is; the renewal keeps the token the first certificate was requested with, so that
    token keeps speaking for the agent where the certificate cannot be presented);
    otherwise it waits for an operator. Without such a certificate, the request is refused
    when another enrollment token that may still speak for the agent enrolled it: a token
    requests certificates only for agents it enrolled, or is enrolling now. Raises
    `CsrRejected` (identity, policy, rate limit) or `SigningError` (no usable CA): the
    session answers BadRequest with the message.
    """
    if not ca_configured():
        raise SigningError(CSR_NOT_ACCEPTED, status=400)
    renewal = credential.is_certificate and credential.bound_uid == instance_uid
    token = None
    if renewal:
        token_id = (
            IssuedCertificate.objects.filter(fingerprint_sha256=credential.fingerprint_sha256)
            .values_list("request__enrollment_token", flat=True)
            .first()
        )
        token = EnrollmentToken.objects.filter(pk=token_id).first() if token_id is not None else None
    else:
        if credential.kind is CredentialKind.TOKEN and credential.token_id is not None:
            token = EnrollmentToken.objects.filter(pk=credential.token_id).first()
        _check_enrolled_by(token, instance_uid, now=now or timezone.now())
    return certificate_request_submit(
        instance_uid=instance_uid,
        csr_pem=csr_pem,
        auto_approve=renewal or (token is not None and token.auto_approve),
        token=token,
        now=now,
    )


def _check_enrolled_by(token: EnrollmentToken | None, instance_uid: uuid.UUID, *, now: datetime) -> None:
    """Refuse a CSR for an agent enrolled with another token that still admits it."""
    others = EnrollmentTokenUse.objects.filter(
        instance_uid=instance_uid, token__revoked_at__isnull=True, token__expires_at__gt=now
    )
    if token is not None:
        others = others.exclude(token=token)
    if others.exists():
        raise CsrRejected(CSR_AGENT_OF_OTHER_TOKEN.format(uid=instance_uid))


@dataclass(frozen=True)
class CertificateOffer:
    certificate_pem: str
    ca_pem: str


def certificate_offer_for(instance_uid: uuid.UUID, credential: AgentCredential) -> CertificateOffer | None:
    """The agent's newest valid certificate when this connection does not already use it."""
    if not ca_configured():
        return None
    current = agent_current_certificate(instance_uid)
    if current is None or current.fingerprint_sha256 == credential.fingerprint_sha256:
        return None
    ca_pem = ca_certificate_pem()
    if ca_pem is None:
        return None
    return CertificateOffer(certificate_pem=current.pem, ca_pem=ca_pem)


def fill_certificate_offer(
    offers: opamp_pb2.ConnectionSettingsOffers, offer: CertificateOffer, *, endpoint: str, heartbeat_seconds: int
) -> bytes:
    """Fill `connection_settings` with the OpAMP settings carrying the certificate; return its hash.

    No private key is ever sent: the agent generated it. The spec asks for an explicit
    heartbeat interval and a non-empty endpoint in every OpAMP settings offer, and for a
    hash over all settings, so that an agent can tell offers apart and report on one.
    """
    opamp = offers.opamp
    opamp.destination_endpoint = endpoint
    opamp.heartbeat_interval_seconds = heartbeat_seconds
    opamp.certificate.cert = offer.certificate_pem.encode("ascii")
    opamp.certificate.ca_cert = offer.ca_pem.encode("ascii")
    # The hash the whole offer has when the certificate goes alone (fleet.telemetry_settings
    # hashes every offer so): an agent reports it back, and it still names the certificate
    # after a server restart emptied the ledger of merged offers.
    return seal(offers)


class SigningAuthority(CredentialAuthority):
    """Enrollment tokens and client certificates of this server's CA, for the session."""

    def admits_anonymous(self) -> bool:
        return auth_mode() == OPEN

    def authenticate(self, presented: PresentedCredentials) -> AgentCredential:
        return authenticate_agent(presented)

    def identity_check(self, credential: AgentCredential, instance_uid: uuid.UUID) -> None:
        token_identity_check(credential, instance_uid)

    def enrollment_record(self, credential: AgentCredential, instance_uid: uuid.UUID) -> dict[str, str]:
        return enrollment_record(credential, instance_uid)

    def enrollment_labels_apply(self, *, instance_uid: uuid.UUID, labels: dict[str, str]) -> None:
        enrollment_labels_apply(instance_uid=instance_uid, labels=labels)

    def instance_uid_reassign(self, *, credential: AgentCredential, old: uuid.UUID, new: uuid.UUID) -> bool:
        return agent_instance_uid_reassign(credential=credential, old=old, new=new)

    def still_valid(self, credential: AgentCredential) -> bool:
        return credential_still_valid(credential)
