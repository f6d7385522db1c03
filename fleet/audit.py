"""Who changed what: the actor a service is given, and the audit row every write leaves."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeAlias

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser

from fleet.models import AuditEvent

Actor: TypeAlias = AbstractBaseUser | AnonymousUser | None


def actor_user(actor: Actor) -> Any:
    """The user a row records as its author: None for the anonymous user and for the system."""
    return actor if actor is not None and getattr(actor, "is_authenticated", False) else None


def _audit_event(user: Any, action: str, target: Any, details: Mapping[str, Any] | None) -> AuditEvent:
    return AuditEvent(
        actor=user,
        action=action,
        target_type=type(target).__name__,
        target_id=str(getattr(target, "pk", target)),
        details=dict(details or {}),
    )


def audit_record(*, actor: Actor, action: str, target: Any, details: Mapping[str, Any] | None = None) -> AuditEvent:
    event = _audit_event(actor_user(actor), action, target, details)
    event.save(force_insert=True)
    return event


def audit_records(*, actor: Actor, action: str, targets: Iterable[tuple[Any, Mapping[str, Any]]]) -> list[AuditEvent]:
    """One audit row per (target, details), written in one statement: an action on many
    agents at once (a selector) leaves a row on each."""
    user = actor_user(actor)
    return AuditEvent.objects.bulk_create(_audit_event(user, action, target, details) for target, details in targets)
