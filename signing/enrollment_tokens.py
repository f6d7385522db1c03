"""Enrollment tokens: shared secrets that let a bounded number of new agents enrol.

The secret is handed out once and stored only as its SHA-256. Every change is one
conditional UPDATE in a transaction and writes one audit row, so a repeated call changes
nothing the second time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from fleet.agent_labels import agent_labels_set, check_labels
from fleet.audit import Actor, actor_user, audit_record
from fleet.errors import DomainError
from fleet.models import Agent
from signing.errors import (
    TOKEN_EXHAUSTED,
    TOKEN_EXPIRED,
    TOKEN_LIFETIME_INVALID,
    TOKEN_MAX_USES_INVALID,
    TOKEN_NAME_INVALID,
    TOKEN_REVOKED,
    TOKEN_UNKNOWN,
    EnrollmentTokenRefused,
    SigningError,
)
from signing.models import EnrollmentToken, EnrollmentTokenUse

TOKEN_PREFIX = "opamp_et_"
# Characters of the secret kept for display: the fixed prefix and 8 random characters
# (48 of its 256 random bits), enough to tell tokens apart, far too few to guess the rest.
TOKEN_DISPLAY_CHARS = len(TOKEN_PREFIX) + 8


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
