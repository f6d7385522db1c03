"""Roles: `viewer` reads, `operator` changes. The same rules guard the API and the admin.

Roles are Django groups (created by migration 0002_roles and `manage.py create_roles`),
so granting one is a group membership, with no per-model permission rows to keep in step.
Superusers count as operators; staff users may read.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import Group

VIEWER = "viewer"
OPERATOR = "operator"
ROLES = (VIEWER, OPERATOR)

READ_DENIED = "reading this needs the viewer or operator role"
WRITE_DENIED = "this change needs the operator role; the viewer role may only read"

# Cached on the user object: a request asks more than once (permission, then admin checks).
_ROLES_ATTRIBUTE = "_opamp_roles"


def user_roles(user: Any) -> frozenset[str]:
    if user is None or not getattr(user, "is_authenticated", False) or not getattr(user, "is_active", False):
        return frozenset()
    cached = getattr(user, _ROLES_ATTRIBUTE, None)
    if cached is None:
        cached = frozenset(user.groups.filter(name__in=ROLES).values_list("name", flat=True))
        setattr(user, _ROLES_ATTRIBUTE, cached)
    return cached


def can_read(user: Any) -> bool:
    if user is None or not getattr(user, "is_authenticated", False) or not getattr(user, "is_active", False):
        return False
    return bool(user.is_superuser or user.is_staff or user_roles(user))


def can_write(user: Any) -> bool:
    if user is None or not getattr(user, "is_authenticated", False) or not getattr(user, "is_active", False):
        return False
    return bool(user.is_superuser or OPERATOR in user_roles(user))


def ensure_roles() -> list[str]:
    """Create the role groups that do not exist yet; return the names created."""
    return [name for name in ROLES if Group.objects.get_or_create(name=name)[1]]


def grant_role(*, user: Any, role: str) -> bool:
    """Add `user` to the group of `role`; False when they already had it."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    group, _ = Group.objects.get_or_create(name=role)
    if user.groups.filter(pk=group.pk).exists():
        return False
    user.groups.add(group)
    return True
