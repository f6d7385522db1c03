"""The API's permission class: the role rules of `fleet.roles` as DRF applies them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rest_framework.permissions import SAFE_METHODS, BasePermission

from fleet.roles import READ_DENIED, WRITE_DENIED, can_read, can_write

if TYPE_CHECKING:
    # Typing only: rest_framework.views imports this module (DEFAULT_PERMISSION_CLASSES).
    from rest_framework.request import Request
    from rest_framework.views import APIView


class RolePermission(BasePermission):
    """Safe methods need a role that can read; everything else needs the operator role.

    A view may name further methods that only read in `read_only_methods`. Anonymous
    requests are refused before any role is looked at, so DRF answers 401 (with the
    authentication challenge) rather than 403.
    """

    message = READ_DENIED

    def has_permission(self, request: Request, view: APIView) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return False
        if request.method in SAFE_METHODS or request.method in getattr(view, "read_only_methods", ()):
            self.message = READ_DENIED
            return can_read(user)
        self.message = WRITE_DENIED
        return can_write(user)
