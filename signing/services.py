"""Writes for signing keys, the CA, certificate requests, certificates and enrollment tokens.

Every state change is one conditional UPDATE on the old state (or a row lock) inside a
transaction and writes one audit row, so a repeated call (a double click, a retried
task) changes nothing the second time. Key and certificate files are read before any
transaction starts: no file I/O happens while a row is locked.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import tempfile
import threading
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509 import ReasonFlags
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Max
from django.utils import timezone

from fleet.agent_labels import agent_labels_set, check_labels
from fleet.audit import Actor, actor_user, audit_record
from fleet.errors import DomainError
from fleet.models import Agent
from fleet.notify import notify_certificate_issued, notify_credentials_revoked
from rollouts.models import Configuration, ConfigVersion
from signing import ca as ca_module
from signing import config_signing
from signing.ca import CaInvalid, CheckedCsr, CsrRejected, LoadedCa, RevokedEntry, check_csr
from signing.config_signing import (
    KEY_FILE_UNREADABLE,
    SignedConfig,
    SigningKeyError,
    SigningKeyPair,
    key_id_for,
    load_public_key_pem,
    sign_config,
)
from signing.errors import (
    CA_NOT_CONFIGURED,
    CA_UNUSABLE,
    CSR_RATE_LIMITED,
    SIGNING_KEY_IN_USE,
    SIGNING_KEY_RETIRED,
    TOKEN_EXHAUSTED,
    TOKEN_EXPIRED,
    TOKEN_LIFETIME_INVALID,
    TOKEN_MAX_USES_INVALID,
    TOKEN_NAME_INVALID,
    TOKEN_REVOKED,
    TOKEN_UNKNOWN,
    CertificateRequestHeld,
    CertificateRequestRejected,
    CsrRateLimited,
    EnrollmentTokenRefused,
    SigningError,
)
from signing.models import (
    REVOKED_UNSPECIFIED,
    SIGNED_FOR_DELIVERY,
    CertificateAuthority,
    CertificateRequest,
    ConfigSigning,
    EnrollmentToken,
    EnrollmentTokenUse,
    IssuedCertificate,
    SigningKey,
)

logger = logging.getLogger(__name__)

RATE_LIMIT_WINDOW = timedelta(hours=1)
SUPERSEDED_REASON = "superseded by a newer request from the same agent"
CSR_PENDING_FROM_OTHER_CREDENTIAL = (
    "agent {uid} has a certificate request pending from another credential; an operator must decide it first"
)
AUTO_APPROVAL_WITHHELD = "auto-approval withheld: this agent has a revoked certificate; an operator must approve"
TOKEN_PREFIX = "opamp_et_"
# Characters of the secret kept for display: the fixed prefix and 8 random characters
# (48 of its 256 random bits), enough to tell tokens apart, far too few to guess the rest.
TOKEN_DISPLAY_CHARS = len(TOKEN_PREFIX) + 8


class _FileCache:
    """Objects loaded from files, reloaded when a file's mtime, size or inode changes.

    Keys and certificates are read on request paths (signing, issuance, CRLs); re-reading
    and re-parsing them every time would be wasted work, and a replaced file must still be
    picked up without a restart.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, ...], tuple[tuple[int, ...], Any]] = {}

    def get(self, paths: tuple[str, ...], load: Any) -> Any:
        stamp: tuple[int, ...] = ()
        for path in paths:
            stat = os.stat(path)
            stamp += (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        with self._lock:
            cached = self._entries.get(paths)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        value = load()
        with self._lock:
            self._entries[paths] = (stamp, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_files = _FileCache()


def reset_file_cache() -> None:
    """Forget loaded keys and CA files (tests that swap settings call this)."""
    _files.clear()


def _hint_agent(instance_uid: uuid.UUID) -> None:
    """After commit, ask the agent's live session to compare its desired state again.

    A hint only: an agent that misses it picks up a new or revoked certificate on its
    next message, like any other desired-state change.
    """
    transaction.on_commit(lambda: notify_certificate_issued([instance_uid]))


# --- config signing keys ----------------------------------------------------------------


def active_signing_key_pair() -> SigningKeyPair | None:
    """The key in OPAMP_SIGNING_KEY_FILE, or None when signing is not configured."""
    path = settings.OPAMP_SIGNING_KEY_FILE
    if not path:
        return None
    try:
        pair: SigningKeyPair = _files.get((str(path),), lambda: SigningKeyPair.from_file(path))
    except OSError as error:
        raise SigningError(KEY_FILE_UNREADABLE.format(path=path, problem=type(error).__name__), status=503) from None
    except SigningKeyError as error:
        raise SigningError(str(error), status=503) from None
    return pair


@transaction.atomic
def signing_key_register(*, public_key_pem: str, actor: Actor, active: bool = False) -> SigningKey:
    """Record a public key as accepted (and, with `active`, as the one that signs).

    Only public material is accepted: anything that does not parse as an Ed25519 public key
    is refused, so a private key pasted here by mistake never reaches the database.
    """
    try:
        public_key = load_public_key_pem(public_key_pem)
    except SigningKeyError as error:
        raise SigningError(str(error), field="public_key_pem") from None
    key_id = key_id_for(public_key)
    # Store the key re-serialised, never the text given: a paste could carry more PEM
    # blocks after the public key (a private key among them).
    key, created = SigningKey.objects.get_or_create(
        key_id=key_id, defaults={"public_key_pem": config_signing.public_key_pem(public_key), "active": False}
    )
    key = SigningKey.objects.select_for_update().get(pk=key.pk)
    if key.retired_at is not None:
        raise SigningError(SIGNING_KEY_RETIRED.format(key_id=key_id), field="key_id")
    if created:
        audit_record(actor=actor, action="signing_key.register", target=key, details={"key_id": key_id})
    if active and not key.active:
        # Deactivate the others first: the partial unique index allows one active key.
        SigningKey.objects.filter(active=True).exclude(pk=key.pk).update(active=False)
        key.active = True
        key.full_clean()
        key.save(update_fields=["active"])
        audit_record(actor=actor, action="signing_key.activate", target=key, details={"key_id": key_id})
    return key


def signing_key_register_active(*, actor: Actor = None) -> SigningKey | None:
    """Make the configured key file's public key the single active key (None: not configured).

    Earlier keys become inactive but stay accepted for verification until retired.
    """
    pair = active_signing_key_pair()
    if pair is None:
        return None
    return signing_key_register(public_key_pem=pair.public_key_pem, actor=actor, active=True)


def _signs_new_versions(key: SigningKey) -> bool:
    """Whether publishing would sign with this key: it is the configured key file's, or active."""
    try:
        pair = active_signing_key_pair()
    except SigningError:
        pair = None  # an unreadable key file signs nothing; the active flag still decides
    return key.active or (pair is not None and pair.key_id == key.key_id)


@transaction.atomic
def signing_key_retire(*, key: SigningKey, actor: Actor, force: bool = False) -> bool:
    """Withdraw a key for good; False when it was already retired.

    The key that signs new versions is refused unless `force`: once it is retired every
    publish fails until OPAMP_SIGNING_KEY_FILE holds a new key, so the refusal says so.
    Activate the next key first (its file in OPAMP_SIGNING_KEY_FILE) and the old one retires
    without `force`.
    """
    locked = SigningKey.objects.select_for_update().get(pk=key.pk)
    if locked.retired_at is None and not force and _signs_new_versions(locked):
        raise SigningError(SIGNING_KEY_IN_USE.format(key_id=key.key_id), field="force", status=409)
    moved = SigningKey.objects.filter(pk=key.pk, retired_at__isnull=True).update(
        retired_at=timezone.now(), active=False
    )
    key.refresh_from_db()
    if moved:
        audit_record(actor=actor, action="signing_key.retire", target=key, details={"key_id": key.key_id})
    return bool(moved)


def sign_delivery(
    *, configuration_name: str, sequence: int, config_hash: str, issued_at: datetime | None = None
) -> SignedConfig | None:
    """An envelope for content `config_hash` under `sequence`, signed with the configured key,
    or None when no signing key is configured. A retired key refuses to sign.

    Only signs: the sequence is allocated, and the result stored, by `config_version_sign`.
    """
    pair = active_signing_key_pair()
    if pair is None:
        return None
    row = SigningKey.objects.filter(key_id=pair.key_id).values_list("active", "retired_at").first()
    if row is not None and row[1] is not None:
        raise SigningError(SIGNING_KEY_RETIRED.format(key_id=pair.key_id))
    if row is None or not row[0]:
        # First signature with a newly configured key file: publish its public half so the
        # accepted-key list matches what signs (rare: once per key change).
        signing_key_register_active(actor=None)
    return sign_config(
        key=pair,
        config_hash_hex=config_hash,
        configuration=configuration_name,
        sequence=sequence,
        issued_at=issued_at,
    )


def _lock_configuration(configuration_id: int) -> str:
    """Take the configuration's row lock (held to commit); its name.

    Every signing of the configuration allocates its sequence under this lock, so two
    concurrent transitions never issue the same one. Publishing and the rollout
    transitions take it first, before anything else they lock.
    """
    name: str = Configuration.objects.select_for_update().values_list("name", flat=True).get(pk=configuration_id)
    return name


def _top_sequence(configuration_id: int) -> int:
    top = ConfigSigning.objects.filter(configuration_id=configuration_id).aggregate(top=Max("sequence"))["top"]
    return int(top or 0)


def config_version_sign(
    *, version: ConfigVersion, reason: str, detail: str = "", issued_at: datetime | None = None
) -> ConfigSigning | None:
    """Sign `version` under its configuration's next sequence; None without a signing key.

    The signing becomes the version's newest, the one delivered from now on (copied to
    `ConfigVersion.signature`); older signings stay valid for the agents that run them.
    Runs in the caller's transaction, under the configuration's row lock.
    """
    if active_signing_key_pair() is None:
        return None  # nothing to sign with: no query, no lock
    with transaction.atomic():
        return _sign_next(version=version, reason=reason, detail=detail, issued_at=issued_at)


def _sign_next(*, version: ConfigVersion, reason: str, detail: str, issued_at: datetime | None) -> ConfigSigning | None:
    name = _lock_configuration(version.configuration_id)
    sequence = _top_sequence(version.configuration_id) + 1
    signed = sign_delivery(
        configuration_name=name, sequence=sequence, config_hash=version.config_hash, issued_at=issued_at
    )
    if signed is None:
        return None
    document = signed.to_json_bytes().decode("ascii")
    signing = ConfigSigning.objects.create(
        configuration_id=version.configuration_id,
        version=version,
        sequence=sequence,
        key_id=signed.envelope.key_id,
        issued_at=signed.envelope.issued_at_datetime,
        document=document,
        reason=reason,
        detail=detail[:200],
    )
    ConfigVersion.objects.filter(pk=version.pk).update(signature=document)
    version.signature = document
    return signing


def config_version_sign_for_delivery(*, version_id: int, detail: str = "") -> ConfigSigning | None:
    """Make sure the signing delivered with `version_id` is its configuration's newest.

    Called by every transition that makes the version what some agents should run: those
    agents run another signing of the configuration, which is lower than the newest, so
    the version's own newest signing is fresh to them only if it is the configuration's
    newest. When it is not (another version was signed since, e.g. a candidate after the
    stable version, or the stable version after the candidate when a rollout is aborted),
    the version is signed anew under the next sequence. None: nothing was signed (already
    the newest, or no signing key configured).
    """
    if active_signing_key_pair() is None:
        return None
    with transaction.atomic():
        # Not the files: they can be megabytes, and only the hash is signed.
        version = ConfigVersion.objects.only("id", "configuration_id", "config_hash").get(pk=version_id)
        _lock_configuration(version.configuration_id)
        newest = ConfigSigning.objects.filter(version_id=version_id).aggregate(top=Max("sequence"))["top"]
        if newest is not None and newest == _top_sequence(version.configuration_id):
            return None
        return _sign_next(version=version, reason=SIGNED_FOR_DELIVERY, detail=detail, issued_at=None)


# --- certificate authority --------------------------------------------------------------


def certificate_authority_load() -> LoadedCa | None:
    """The CA from OPAMP_CA_KEY_FILE / OPAMP_CA_CERT_FILE, None when not configured."""
    key_file, cert_file = settings.OPAMP_CA_KEY_FILE, settings.OPAMP_CA_CERT_FILE
    if not key_file or not cert_file:
        return None
    try:
        loaded: LoadedCa = _files.get(
            (str(key_file), str(cert_file)), lambda: ca_module.load_ca(key_file=key_file, cert_file=cert_file)
        )
    except OSError as error:
        raise SigningError(CA_UNUSABLE.format(problem=type(error).__name__), status=503) from None
    except CaInvalid as error:
        raise SigningError(CA_UNUSABLE.format(problem=error), status=503) from None
    return loaded


def _require_ca() -> LoadedCa:
    loaded = certificate_authority_load()
    if loaded is None:
        raise SigningError(CA_NOT_CONFIGURED, status=503)
    return loaded


def ca_certificate_pem() -> str | None:
    """The configured CA certificate (PEM), to hand agents as `ca_cert`; None when not configured."""
    loaded = certificate_authority_load()
    return loaded.cert_pem if loaded is not None else None


def certificate_authority_register(*, ca: LoadedCa, actor: Actor) -> CertificateAuthority:
    """Record the CA's certificate (never its key); idempotent by fingerprint."""
    with transaction.atomic():
        authority, created = CertificateAuthority.objects.get_or_create(
            fingerprint_sha256=ca.fingerprint_sha256,
            defaults={
                "subject": ca.cert.subject.rfc4514_string()[:500],
                "certificate_pem": ca.cert_pem,
                "not_before": ca.cert.not_valid_before_utc,
                "not_after": ca.cert.not_valid_after_utc,
            },
        )
        if created:
            audit_record(
                actor=actor,
                action="certificate_authority.register",
                target=authority,
                details={"subject": authority.subject, "fingerprint_sha256": authority.fingerprint_sha256},
            )
    return authority


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
    loaded = _require_ca()
    pem = _pem_bytes(csr_pem)
    stored_pem = _stored_pem(pem)
    moment = now or timezone.now()

    if stored_pem:
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
            previous.state == CertificateRequest.State.PENDING
            or _still_valid(getattr(previous, "certificate", None), moment)
        ):
            return previous

    # Parsing and the signature check are CPU work: done before the transaction starts.
    checked: CheckedCsr | None = None
    refusal: str | None = None
    try:
        checked = check_csr(pem, instance_uid=instance_uid)
    except CsrRejected as error:
        refusal = error.message

    with transaction.atomic():
        # Count and insert must not interleave between two submissions from one agent, or
        # both could pass the limit: the agent's inventory row serialises them on
        # PostgreSQL (SQLite transactions here are IMMEDIATE, so writers are serial anyway).
        Agent.objects.select_for_update().filter(instance_uid=instance_uid).values_list("pk", flat=True).first()
        recent = CertificateRequest.objects.filter(
            instance_uid=instance_uid, requested_at__gt=moment - RATE_LIMIT_WINDOW
        ).count()
        limit = settings.OPAMP_CSR_MAX_PER_HOUR
        if recent >= limit:
            raise CsrRateLimited(CSR_RATE_LIMITED.format(limit=limit))
        # A pending request is replaced only by one from the same credential (the same
        # token, or none): anyone else would lock the agent out of its own request.
        if (
            CertificateRequest.objects.filter(instance_uid=instance_uid, state=CertificateRequest.State.PENDING)
            .exclude(enrollment_token=token)
            .exists()
        ):
            raise CertificateRequestHeld(CSR_PENDING_FROM_OTHER_CREDENTIAL.format(uid=instance_uid))
        if checked is None:
            request = CertificateRequest.objects.create(
                instance_uid=instance_uid,
                csr_pem=stored_pem,
                state=CertificateRequest.State.REJECTED,
                reason=refusal or "",
                requested_at=moment,
                decided_at=moment,
                enrollment_token=token,
            )
            audit_record(
                actor=None,
                action="certificate_request.refuse",
                target=request,
                details={"instance_uid": str(instance_uid), "reason": refusal},
            )
        else:
            CertificateRequest.objects.filter(instance_uid=instance_uid, state=CertificateRequest.State.PENDING).update(
                state=CertificateRequest.State.REJECTED, reason=SUPERSEDED_REASON, decided_at=moment
            )
            withheld = auto_approve and _has_revoked_certificate(instance_uid)
            request = CertificateRequest(
                instance_uid=instance_uid,
                csr_pem=stored_pem,
                key_type=checked.key_type,
                requested_at=moment,
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
                _approve_and_issue(request=request, checked=checked, loaded=loaded, actor=None, now=moment)
    if refusal is not None:
        raise CertificateRequestRejected(refusal)
    request.refresh_from_db()
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
    loaded = _require_ca()
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


def crl_publish() -> Path | None:
    """Write a fresh CRL to OPAMP_CRL_FILE; None when no file is configured.

    Run after every revocation and periodically (a CRL past its nextUpdate makes the TLS
    terminator refuse every client certificate, so it must be re-signed well before).
    """
    if not settings.OPAMP_CRL_FILE:
        return None
    return crl_write(settings.OPAMP_CRL_FILE)


def crl_refresh_if_due(*, now: datetime | None = None) -> Path | None:
    """Re-sign OPAMP_CRL_FILE once half of its nextUpdate window has passed.

    Checked hourly by beat. Re-signing only when due (and after each revocation) keeps
    TLS-terminator reloads, which the file change triggers, to a few a day. A file that is
    missing, unreadable or not signed by the configured CA is written at once.
    """
    if not settings.OPAMP_CRL_FILE:
        return None
    loaded = _require_ca()
    moment = now or timezone.now()
    try:
        current = x509.load_pem_x509_crl(Path(settings.OPAMP_CRL_FILE).read_bytes())
        trusted = current.is_signature_valid(loaded.cert.public_key())  # type: ignore[arg-type]
        next_update = current.next_update_utc
    except (OSError, ValueError, TypeError):
        trusted, next_update = False, None
    window = timedelta(hours=settings.OPAMP_CRL_NEXT_UPDATE_HOURS)
    if trusted and next_update is not None and next_update - moment > window / 2:
        return None
    return crl_write(settings.OPAMP_CRL_FILE)


def crl_write(path: str | Path) -> Path:
    """Sign a fresh CRL and replace `path` with it atomically (a reader never sees half)."""
    target = Path(path)
    write_public_file_atomically(target, crl_pem())
    return target


def write_public_file_atomically(target: Path, data: bytes) -> None:
    """Replace `target` (mode 0644) by a rename, so a reader (nginx, a reload) never sees half."""
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def crl_pem(*, now: datetime | None = None) -> bytes:
    """A freshly signed CRL of the configured CA (PEM)."""
    loaded = _require_ca()
    moment = now or timezone.now()
    authority = CertificateAuthority.objects.filter(fingerprint_sha256=loaded.fingerprint_sha256).first()
    entries: list[RevokedEntry] = []
    if authority is not None:
        # Expired certificates are refused on their dates alone; leaving them out keeps
        # the CRL short for the TLS terminator that reloads it.
        revoked = IssuedCertificate.objects.filter(
            authority=authority, revoked_at__isnull=False, not_after__gt=moment
        ).values_list("serial_hex", "revoked_at", "revocation_reason")
        entries = [
            RevokedEntry(serial=int(serial, 16), revoked_at=revoked_at, reason=_reason_flag(reason))
            for serial, revoked_at, reason in revoked
        ]
    return ca_module.build_crl(
        entries,
        ca_key=loaded.key,
        ca_cert=loaded.cert,
        next_update_hours=settings.OPAMP_CRL_NEXT_UPDATE_HOURS,
        now=moment,
    )


def _reason_flag(reason: str) -> ReasonFlags | None:
    if not reason or reason == REVOKED_UNSPECIFIED:
        return None
    return ReasonFlags[reason]


def certificate_needs_renewal(certificate: IssuedCertificate, now: datetime | None = None) -> bool:
    """True once less than a third of the certificate's validity is left."""
    return ca_module.needs_renewal(
        not_before=certificate.not_before, not_after=certificate.not_after, now=now or timezone.now()
    )


# --- enrollment tokens ------------------------------------------------------------------


def _token_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def enrollment_labels_check(labels: Any) -> dict[str, str]:
    """The labels a token applies, checked with the same rules as operator labels."""
    if labels is None:
        return {}
    try:
        return check_labels(labels)
    except DomainError as error:
        raise SigningError(error.message, field="labels") from None


@transaction.atomic
def enrollment_token_create(
    *,
    name: str,
    expires_in: timedelta,
    max_uses: int,
    labels: Mapping[str, str] | None,
    auto_approve: bool,
    actor: Actor,
) -> tuple[EnrollmentToken, str]:
    """A new token and its secret. The secret is returned once and never stored."""
    if not isinstance(name, str) or not 0 < len(name.strip()) <= 200:
        raise SigningError(TOKEN_NAME_INVALID, field="name")
    if not isinstance(max_uses, int) or isinstance(max_uses, bool) or max_uses < 1:
        raise SigningError(TOKEN_MAX_USES_INVALID, field="max_uses")
    if expires_in <= timedelta(0):
        raise SigningError(TOKEN_LIFETIME_INVALID, field="expires_in")
    checked_labels = enrollment_labels_check(labels)
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = EnrollmentToken(
        name=name.strip(),
        token_hash=_token_hash(secret),
        prefix=secret[:TOKEN_DISPLAY_CHARS],
        created_by=actor_user(actor),
        expires_at=timezone.now() + expires_in,
        max_uses=max_uses,
        labels=checked_labels,
        auto_approve=auto_approve,
    )
    token.full_clean()
    token.save()
    audit_record(
        actor=actor,
        action="enrollment_token.create",
        target=token,
        details={
            "name": token.name,
            "prefix": token.prefix,
            "expires_at": token.expires_at.isoformat(),
            "max_uses": max_uses,
            "labels": checked_labels,
            "auto_approve": auto_approve,
        },
    )
    return token, secret


def _refusal(token: EnrollmentToken, now: datetime) -> EnrollmentTokenRefused | None:
    if token.revoked_at is not None:
        return EnrollmentTokenRefused(TOKEN_REVOKED)
    if token.expires_at <= now:
        return EnrollmentTokenRefused(TOKEN_EXPIRED)
    if token.use_count >= token.max_uses:
        return EnrollmentTokenRefused(TOKEN_EXHAUSTED)
    return None


def enrollment_token_refusal(token: EnrollmentToken, *, now: datetime | None = None) -> EnrollmentTokenRefused | None:
    """Why `token` may not enrol a further agent now (revoked, expired, used up), or None."""
    return _refusal(token, now or timezone.now())


def enrollment_token_authenticate(
    secret: str, *, now: datetime | None = None, allow_used_up: bool = False
) -> EnrollmentToken:
    """The token a secret belongs to, if it may still enrol an agent.

    With `allow_used_up`, a token that reached max_uses is returned too: the agents it
    enrolled may still connect with it (`enrollment_token_use` refuses any further agent).
    The lookup is by SHA-256 of the secret, so response time does not depend on how much
    of a guess matches a real secret; the digest comparison afterwards is constant-time.
    """
    if not isinstance(secret, str) or not secret.startswith(TOKEN_PREFIX) or len(secret) > 200:
        raise EnrollmentTokenRefused(TOKEN_UNKNOWN)
    digest = _token_hash(secret)
    token = EnrollmentToken.objects.filter(token_hash=digest).first()
    if token is None or not hmac.compare_digest(token.token_hash, digest):
        raise EnrollmentTokenRefused(TOKEN_UNKNOWN)
    refusal = _refusal(token, now or timezone.now())
    if refusal is not None and not (allow_used_up and refusal.message == TOKEN_EXHAUSTED):
        raise refusal
    return token


def enrollment_token_use(
    *, token: EnrollmentToken, instance_uid: uuid.UUID, now: datetime | None = None
) -> EnrollmentTokenUse:
    """Count one enrolment of `instance_uid` with `token` and apply the token's labels.

    The increment is a conditional UPDATE (`use_count < max_uses`, not revoked, not
    expired), so concurrent enrolments can never exceed max_uses. The same agent enrolling
    again is not a new use. Labels are applied when the agent's inventory row exists.
    """
    moment = now or timezone.now()
    with transaction.atomic():
        try:
            with transaction.atomic():
                use = EnrollmentTokenUse.objects.create(token=token, instance_uid=instance_uid)
        except IntegrityError:
            return EnrollmentTokenUse.objects.get(token=token, instance_uid=instance_uid)
        counted = EnrollmentToken.objects.filter(
            pk=token.pk, revoked_at__isnull=True, expires_at__gt=moment, use_count__lt=F("max_uses")
        ).update(use_count=F("use_count") + 1)
        if not counted:
            token.refresh_from_db()
            # Leaving the block with an exception also removes the use row created above.
            raise _refusal(token, moment) or EnrollmentTokenRefused(TOKEN_EXHAUSTED)
        audit_record(
            actor=None,
            action="enrollment_token.use",
            target=token,
            details={"instance_uid": str(instance_uid)},
        )
        if token.labels and Agent.objects.filter(instance_uid=instance_uid).exists():
            agent_labels_set(instance_uid=instance_uid, labels=token.labels, actor=None, replace=False)
    token.refresh_from_db()
    return use


@transaction.atomic
def enrollment_token_revoke(*, token: EnrollmentToken, actor: Actor) -> bool:
    """Stop a token enrolling new agents; agents already enrolled keep their credentials."""
    moved = EnrollmentToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    token.refresh_from_db()
    if moved:
        audit_record(actor=actor, action="enrollment_token.revoke", target=token, details={"prefix": token.prefix})
    return bool(moved)


def is_configured_signing_key_file(path: str | Path) -> bool:
    """Whether `path` is the file OPAMP_SIGNING_KEY_FILE names (it then becomes the active key)."""
    configured = settings.OPAMP_SIGNING_KEY_FILE
    return bool(configured) and Path(configured).resolve() == Path(path).resolve()
