"""Reads of signing keys, certificate requests, certificates and enrollment tokens."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.conf import settings
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from opamp.config_signature import SigningKeyError, load_public_key_pem, load_public_keys_dir
from signing.models import CertificateRequest, EnrollmentToken, IssuedCertificate, SigningKey


def signing_key_list() -> QuerySet[SigningKey]:
    return SigningKey.objects.all()


def trusted_public_keys() -> dict[str, Ed25519PublicKey]:
    """Every key a signature may be made with: registered and not retired, plus
    OPAMP_SIGNING_EXTRA_PUBLIC_KEYS_DIR. This is the set agents should be given to trust."""
    keys: dict[str, Ed25519PublicKey] = {}
    extra_dir = settings.OPAMP_SIGNING_EXTRA_PUBLIC_KEYS_DIR
    if extra_dir:
        keys.update(load_public_keys_dir(extra_dir))
    for key_id, pem in SigningKey.objects.filter(retired_at__isnull=True).values_list("key_id", "public_key_pem"):
        try:
            keys[key_id] = load_public_key_pem(pem)
        except SigningKeyError:
            continue
    retired = set(SigningKey.objects.filter(retired_at__isnull=False).values_list("key_id", flat=True))
    # A key retired in the database stays untrusted even if its file is still in the directory.
    return {key_id: key for key_id, key in keys.items() if key_id not in retired}


def certificate_request_list() -> QuerySet[CertificateRequest]:
    return CertificateRequest.objects.select_related("decided_by", "enrollment_token", "certificate")


def pending_certificate_requests() -> QuerySet[CertificateRequest]:
    return certificate_request_list().filter(state=CertificateRequest.State.PENDING)


def issued_certificate_list() -> QuerySet[IssuedCertificate]:
    return IssuedCertificate.objects.select_related("authority", "request")


def valid_certificates(now: datetime | None = None) -> QuerySet[IssuedCertificate]:
    """Certificates neither revoked nor outside their validity window."""
    moment = now or timezone.now()
    return issued_certificate_list().filter(revoked_at__isnull=True, not_before__lte=moment, not_after__gt=moment)


def agent_current_certificate(instance_uid: uuid.UUID, now: datetime | None = None) -> IssuedCertificate | None:
    """The newest valid certificate of an agent: what its connection settings should carry."""
    return valid_certificates(now).filter(instance_uid=instance_uid).order_by("-not_after", "-id").first()


def certificate_for_fingerprint(fingerprint_sha256: str, now: datetime | None = None) -> IssuedCertificate | None:
    """The valid certificate a client presented (by SHA-256 of its DER), or None.

    For the app-side re-check behind the TLS terminator: None means refuse, and the
    returned row's instance_uid is the only uid that connection may speak as.
    """
    return valid_certificates(now).filter(fingerprint_sha256=fingerprint_sha256.lower().replace(":", "")).first()


def certificates_expiring_within(
    queryset: QuerySet[IssuedCertificate], days: int, now: datetime | None = None
) -> QuerySet[IssuedCertificate]:
    """The certificates of `queryset` not yet expired whose validity ends within `days` days.

    By dates alone: combine with a revocation filter to leave revoked ones out.
    """
    moment = now or timezone.now()
    return queryset.filter(not_after__gt=moment, not_after__lte=moment + timedelta(days=days))


def certificate_is_revoked(serial_hex: str) -> bool:
    return IssuedCertificate.objects.filter(serial_hex=serial_hex.lower(), revoked_at__isnull=False).exists()


def enrollment_token_list() -> QuerySet[EnrollmentToken]:
    return EnrollmentToken.objects.select_related("created_by")


class TokenState:
    """What an enrollment token can do now, derived from its row and the clock, never stored.

    When several apply, the first of revoked, expired, exhausted wins: the order in which
    `enrollment_tokens.enrollment_token_authenticate` names the reason for a refusal.
    """

    ACTIVE = "active"
    EXPIRED = "expired"
    EXHAUSTED = "exhausted"
    REVOKED = "revoked"
    CHOICES = [(ACTIVE, ACTIVE), (EXPIRED, EXPIRED), (EXHAUSTED, EXHAUSTED), (REVOKED, REVOKED)]


def enrollment_token_state(token: EnrollmentToken, now: datetime | None = None) -> str:
    moment = now or timezone.now()
    if token.revoked_at is not None:
        return TokenState.REVOKED
    if token.expires_at <= moment:
        return TokenState.EXPIRED
    if token.use_count >= token.max_uses:
        return TokenState.EXHAUSTED
    return TokenState.ACTIVE


def enrollment_token_state_q(state: str, now: datetime | None = None) -> Q:
    """`enrollment_token_state` as a database condition."""
    moment = now or timezone.now()
    not_revoked = Q(revoked_at__isnull=True)
    unexpired = not_revoked & Q(expires_at__gt=moment)
    conditions = {
        TokenState.REVOKED: Q(revoked_at__isnull=False),
        TokenState.EXPIRED: not_revoked & Q(expires_at__lte=moment),
        TokenState.EXHAUSTED: unexpired & Q(use_count__gte=F("max_uses")),
        TokenState.ACTIVE: unexpired & Q(use_count__lt=F("max_uses")),
    }
    if state not in conditions:
        raise ValueError(f"unknown enrollment token state {state!r}")
    return conditions[state]
