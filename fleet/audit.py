"""Who changed what: the actor a service is given, and the audit row every write leaves."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser

from fleet.models import AuditEvent

Actor: TypeAlias = AbstractBaseUser | AnonymousUser | None


def actor_user(actor: Actor) -> Any:
    """The user a row records as its author: None for the anonymous user and for the system."""
    return actor if actor is not None and getattr(actor, "is_authenticated", False) else None


def audit_record(*, actor: Actor, action: str, target: Any, details: Mapping[str, Any] | None = None) -> AuditEvent:
    return AuditEvent.objects.create(
        actor=actor_user(actor),
        action=action,
        target_type=type(target).__name__,
        target_id=str(getattr(target, "pk", target)),
        details=dict(details or {}),
    )
