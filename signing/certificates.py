"""Agents' certificate requests and the certificates issued for them.

A request goes pending -> approved -> issued, or pending -> rejected; a certificate may be
revoked, for good. Every state change is one conditional UPDATE on the old state (or a row
lock) inside a transaction and writes one audit row, so a repeated call (a double click, a
retried task) changes nothing the second time. CSRs are parsed and checked, and the CA
files read, before any transaction starts.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta
from enum import StrEnum

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from fleet.audit import Actor, actor_user, audit_record
from fleet.models import Agent
from fleet.notify import notify_certificate_issued, notify_credentials_revoked
from signing import ca as ca_module
from signing.ca import CheckedCsr, CsrRejected, LoadedCa, check_csr
from signing.configured_ca import certificate_authority_register, certificate_authority_required
from signing.crl import crl_publish
from signing.errors import (
    CSR_RATE_LIMITED,
    CertificateRequestHeld,
    CertificateRequestRejected,
    CsrRateLimited,
    SigningError,
)
from signing.models import REVOKED_UNSPECIFIED, CertificateRequest, EnrollmentToken, IssuedCertificate

logger = logging.getLogger(__name__)

RATE_LIMIT_WINDOW = timedelta(hours=1)
SUPERSEDED_REASON = "superseded by a newer request from the same agent"
CSR_PENDING_FROM_OTHER_CREDENTIAL = (
    "agent {uid} has a certificate request pending from another credential; an operator must decide it first"
)
AUTO_APPROVAL_WITHHELD = "auto-approval withheld: this agent has a revoked certificate; an operator must approve"


def _hint_agent(instance_uid: uuid.UUID) -> None:
    """After commit, tell the agent's live session a certificate was issued for it (a
    `certificate` hint: signing's contributor looks for an offer).

    A hint only: an agent that misses it is offered the certificate on its next connection
    (over HTTP, its next poll).
    """
    transaction.on_commit(lambda: notify_certificate_issued([instance_uid]))


# --- certificate requests ---------------------------------------------------------------


def _pem_bytes(csr_pem: bytes | str) -> bytes:
    return csr_pem.encode("utf-8", "replace") if isinstance(csr_pem, str) else bytes(csr_pem)


def _stored_pem(pem: bytes) -> str:
    # An oversized or binary CSR is kept out of the database; the reason says what it was.
    if len(pem) > ca_module.MAX_CSR_BYTES or not ca_module.is_pem_text(pem):
        return ""
    return pem.decode("ascii", "replace")


def _still_valid(certificate: IssuedCertificate | None, now: datetime) -> bool:
    return certificate is not None and certificate.revoked_at is None and certificate.not_after > now


def _has_revoked_certificate(instance_uid: uuid.UUID) -> bool:
    return (
        IssuedCertificate.objects.filter(instance_uid=instance_uid, revoked_at__isnull=False)
        .exclude(revocation_reason=IssuedCertificate.RevocationReason.SUPERSEDED)
        .exists()
    )


def certificate_request_submit(
    *,
    instance_uid: uuid.UUID,
    csr_pem: bytes | str,
    auto_approve: bool,
    token: EnrollmentToken | None = None,
    now: datetime | None = None,
) -> CertificateRequest:
    """Record an agent's CSR; issue at once when `auto_approve`, else leave it pending.

    `instance_uid` must be the authenticated sender. Raises `CertificateRequestRejected`
    (a `CsrRejected`) when policy refuses the CSR - the refusal is stored first, so it
    counts toward the rate limit - and `CsrRateLimited` beyond OPAMP_CSR_MAX_PER_HOUR.
    An agent that re-sends the same CSR (as agents do on every reconnect until they get a
    certificate) gets its earlier pending or issued request back, not a new one. An agent
    with a revoked certificate is never auto-approved: coming back needs an operator.
    """
    loaded = certificate_authority_required()
    pem = _pem_bytes(csr_pem)
    stored_pem = _stored_pem(pem)
    moment = now or timezone.now()

    if stored_pem:
        previous = _request_for_same_csr(instance_uid=instance_uid, stored_pem=stored_pem, now=moment)
        if previous is not None:
            return previous

    # Parsing and the signature check are CPU work: done before the transaction starts.
    checked: CheckedCsr | None = None
    refusal: str | None = None
    try:
        checked = check_csr(pem, instance_uid=instance_uid)
    except CsrRejected as error:
        refusal = error.message

    with transaction.atomic():
        _refuse_over_rate_limit(instance_uid=instance_uid, now=moment)
        _refuse_when_held_by_another_credential(instance_uid=instance_uid, token=token)
        if checked is None:
            request = _record_refused(
                instance_uid=instance_uid, stored_pem=stored_pem, refusal=refusal or "", token=token, now=moment
            )
        else:
            request = _record_submitted(
                instance_uid=instance_uid,
                stored_pem=stored_pem,
                checked=checked,
                auto_approve=auto_approve,
                loaded=loaded,
                token=token,
                now=moment,
            )
    if refusal is not None:
        raise CertificateRequestRejected(refusal)
    request.refresh_from_db()
    return request


def _request_for_same_csr(*, instance_uid: uuid.UUID, stored_pem: str, now: datetime) -> CertificateRequest | None:
    """The agent's earlier request for the same CSR, when it still answers it: pending, or
    issued with a certificate that is neither revoked nor expired."""
    previous = (
        CertificateRequest.objects.filter(
            instance_uid=instance_uid,
            csr_pem=stored_pem,
            state__in=[CertificateRequest.State.PENDING, CertificateRequest.State.ISSUED],
        )
        .select_related("certificate")
        .first()
    )
    if previous is not None and (
        previous.state == CertificateRequest.State.PENDING or _still_valid(getattr(previous, "certificate", None), now)
    ):
        return previous
    return None


def _refuse_over_rate_limit(*, instance_uid: uuid.UUID, now: datetime) -> None:
    """Refuse a request beyond OPAMP_CSR_MAX_PER_HOUR from one agent (in the caller's transaction).

    Count and insert must not interleave between two submissions from one agent, or both
    could pass the limit: the agent's inventory row serialises them on PostgreSQL (SQLite
    transactions here are IMMEDIATE, so writers are serial anyway).
    """
    Agent.objects.select_for_update().filter(instance_uid=instance_uid).values_list("pk", flat=True).first()
    recent = CertificateRequest.objects.filter(
        instance_uid=instance_uid, requested_at__gt=now - RATE_LIMIT_WINDOW
    ).count()
    limit = settings.OPAMP_CSR_MAX_PER_HOUR
    if recent >= limit:
        raise CsrRateLimited(CSR_RATE_LIMITED.format(limit=limit))


def _refuse_when_held_by_another_credential(*, instance_uid: uuid.UUID, token: EnrollmentToken | None) -> None:
    """A pending request is replaced only by one from the same credential (the same token,
    or none): anyone else would lock the agent out of its own request."""
    if (
        CertificateRequest.objects.filter(instance_uid=instance_uid, state=CertificateRequest.State.PENDING)
        .exclude(enrollment_token=token)
        .exists()
    ):
        raise CertificateRequestHeld(CSR_PENDING_FROM_OTHER_CREDENTIAL.format(uid=instance_uid))


def _record_refused(
    *, instance_uid: uuid.UUID, stored_pem: str, refusal: str, token: EnrollmentToken | None, now: datetime
) -> CertificateRequest:
    """Store a CSR the policy refused, as rejected: it counts toward the rate limit and shows
    operators what was refused."""
    request = CertificateRequest.objects.create(
        instance_uid=instance_uid,
        csr_pem=stored_pem,
        state=CertificateRequest.State.REJECTED,
        reason=refusal,
        requested_at=now,
        decided_at=now,
        enrollment_token=token,
    )
    audit_record(
        actor=None,
        action="certificate_request.refuse",
        target=request,
        details={"instance_uid": str(instance_uid), "reason": refusal},
    )
    return request


def _record_submitted(
    *,
    instance_uid: uuid.UUID,
    stored_pem: str,
    checked: CheckedCsr,
    auto_approve: bool,
    loaded: LoadedCa,
    token: EnrollmentToken | None,
    now: datetime,
) -> CertificateRequest:
    """Store a CSR that passed the policy as the agent's one pending request (an earlier
    pending one is superseded), and issue at once when auto-approved."""
    CertificateRequest.objects.filter(instance_uid=instance_uid, state=CertificateRequest.State.PENDING).update(
        state=CertificateRequest.State.REJECTED, reason=SUPERSEDED_REASON, decided_at=now
    )
    withheld = auto_approve and _has_revoked_certificate(instance_uid)
    request = CertificateRequest(
        instance_uid=instance_uid,
        csr_pem=stored_pem,
        key_type=checked.key_type,
        requested_at=now,
        enrollment_token=token,
        reason=AUTO_APPROVAL_WITHHELD if withheld else "",
    )
    request.full_clean()
    request.save()
    audit_record(
        actor=None,
        action="certificate_request.submit",
        target=request,
        details={
            "instance_uid": str(instance_uid),
            "key_type": checked.key_type,
            "auto_approve": auto_approve and not withheld,
            "enrollment_token": token.pk if token is not None else None,
        },
    )
    if auto_approve and not withheld:
        _approve_and_issue(request=request, checked=checked, loaded=loaded, actor=None, now=now)
    return request


def _approve_and_issue(
    *, request: CertificateRequest, checked: CheckedCsr, loaded: LoadedCa, actor: Actor, now: datetime
) -> bool:
    """pending -> approved -> issued, inside the caller's transaction; False if not pending."""
    approved = CertificateRequest.objects.filter(pk=request.pk, state=CertificateRequest.State.PENDING).update(
        state=CertificateRequest.State.APPROVED, decided_by=actor_user(actor), decided_at=now
    )
    if not approved:
        return False
    audit_record(
        actor=actor,
        action="certificate_request.approve",
        target=request,
        details={"instance_uid": str(request.instance_uid), "automatic": actor is None},
    )
    authority = certificate_authority_register(ca=loaded, actor=None)
    issued = CertificateRequest.objects.filter(pk=request.pk, state=CertificateRequest.State.APPROVED).update(
        state=CertificateRequest.State.ISSUED
    )
    if not issued:
        return False
    cert = ca_module.issue_certificate(
        checked,
        ca_key=loaded.key,
        ca_cert=loaded.cert,
        validity=timedelta(days=settings.OPAMP_CERT_VALIDITY_DAYS),
        max_validity=timedelta(days=settings.OPAMP_CERT_MAX_VALIDITY_DAYS),
        now=now,
    )
    certificate = IssuedCertificate(
        request=request,
        authority=authority,
        serial_hex=ca_module.serial_hex(cert.serial_number),
        subject=cert.subject.rfc4514_string()[:200],
        instance_uid=request.instance_uid,
        fingerprint_sha256=ca_module.certificate_fingerprint(cert),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        pem=ca_module.certificate_pem(cert),
    )
    certificate.full_clean()
    certificate.save()
    _hint_agent(request.instance_uid)
    audit_record(
        actor=actor,
        action="certificate.issue",
        target=certificate,
        details={
            "instance_uid": str(request.instance_uid),
            "serial": certificate.serial_hex,
            "not_after": certificate.not_after.isoformat(),
        },
    )
    return True


class ApprovalOutcome(StrEnum):
    ISSUED = "issued"
    NOT_PENDING = "not pending"  # another decision came first; nothing changed
    NO_LONGER_PASSES = "no longer passes"  # the re-check failed: rejected now, with its reason


def certificate_request_approve(*, request: CertificateRequest, actor: Actor) -> ApprovalOutcome:
    """Approve a pending request and issue its certificate.

    The CSR is checked again first (policy may have changed since it arrived); if it no
    longer passes, the request is rejected with that reason instead. `request` is
    refreshed from the database either way.
    """
    loaded = certificate_authority_required()
    try:
        checked = check_csr(request.csr_pem.encode("ascii", "replace"), instance_uid=request.instance_uid)
    except CsrRejected as error:
        rejected = certificate_request_reject(request=request, actor=actor, reason=error.message)
        return ApprovalOutcome.NO_LONGER_PASSES if rejected else ApprovalOutcome.NOT_PENDING
    with transaction.atomic():
        changed = _approve_and_issue(request=request, checked=checked, loaded=loaded, actor=actor, now=timezone.now())
    request.refresh_from_db()
    return ApprovalOutcome.ISSUED if changed else ApprovalOutcome.NOT_PENDING


@transaction.atomic
def certificate_request_reject(*, request: CertificateRequest, actor: Actor, reason: str = "") -> bool:
    """Reject a pending request; False when it was not pending."""
    moved = CertificateRequest.objects.filter(pk=request.pk, state=CertificateRequest.State.PENDING).update(
        state=CertificateRequest.State.REJECTED, reason=reason, decided_by=actor_user(actor), decided_at=timezone.now()
    )
    request.refresh_from_db()
    if moved:
        audit_record(
            actor=actor,
            action="certificate_request.reject",
            target=request,
            details={"instance_uid": str(request.instance_uid), "reason": reason},
        )
    return bool(moved)


# --- certificates -----------------------------------------------------------------------


@transaction.atomic
def certificate_revoke(
    *,
    certificate: IssuedCertificate,
    actor: Actor,
    reason: str = REVOKED_UNSPECIFIED,
) -> bool:
    """Revoke a certificate; False (and nothing changes) when it was already revoked."""
    if reason not in IssuedCertificate.RevocationReason.values:
        raise SigningError(f"unknown revocation reason {reason!r}", field="reason")
    moved = IssuedCertificate.objects.filter(pk=certificate.pk, revoked_at__isnull=True).update(
        revoked_at=timezone.now(), revocation_reason=reason
    )
    certificate.refresh_from_db()
    if moved:
        audit_record(
            actor=actor,
            action="certificate.revoke",
            target=certificate,
            details={"instance_uid": str(certificate.instance_uid), "serial": certificate.serial_hex, "reason": reason},
        )
        instance_uid = certificate.instance_uid
        transaction.on_commit(_publish_revocation)
        transaction.on_commit(lambda: notify_credentials_revoked([instance_uid]))
    return bool(moved)


def _publish_revocation() -> None:
    """Rewrite the CRL file so the TLS terminator's next reload refuses the certificate;
    until then the app's own re-check refuses it. A failure must not undo the revocation,
    which is already committed: it is logged, and the periodic refresh writes it again."""
    try:
        crl_publish()
    except (OSError, SigningError):
        logger.exception("could not write the CRL to %s after a revocation", settings.OPAMP_CRL_FILE)


def certificate_needs_renewal(certificate: IssuedCertificate, now: datetime | None = None) -> bool:
    """True once less than a third of the certificate's validity is left."""
    return ca_module.needs_renewal(
        not_before=certificate.not_before, not_after=certificate.not_after, now=now or timezone.now()
    )
