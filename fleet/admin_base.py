"""What every admin of the project shares: the role rules, service refusals shown as
messages, and how documents and PEM text are displayed."""

from __future__ import annotations

import json
from typing import Any

from django.contrib import messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.utils.html import format_html

from fleet.errors import DomainError, InputProblems
from fleet.roles import can_read, can_write

# Refusals a service may raise that the admin shows as a message on the same form.
SERVICE_ERRORS = (DomainError, InputProblems)


def preformatted(text: str) -> str:
    return format_html("<pre style='white-space: pre-wrap'>{}</pre>", text) if text else "—"


def pretty_json(document: Any) -> str:
    if document in (None, {}, []):
        return "—"
    return preformatted(json.dumps(document, indent=2, sort_keys=True))


class RoleAdminMixin:
    """Viewers (and staff) see, operators (and superusers) change; the admin site itself
    only lets staff in."""

    def has_module_permission(self, request: HttpRequest) -> bool:
        return can_read(request.user)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return can_read(request.user)

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return can_write(request.user)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return can_write(request.user)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return can_write(request.user)


class ReadOnlyRoleAdminMixin(RoleAdminMixin):
    """Rows written only as a consequence of services; nobody edits them here."""

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class CreateOnlyRoleAdminMixin(RoleAdminMixin):
    """Rows operators create here (through a service) and never edit or delete here."""

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ServiceErrorsAsMessagesMixin:
    """A refusal the form could not foresee is shown as a message on the same form.

    The admin runs the form view in a transaction, so nothing of the failed attempt stays.
    """

    def changeform_view(
        self, request: HttpRequest, object_id: str | None = None, form_url: str = "", extra_context: Any = None
    ) -> HttpResponse:
        try:
            return super().changeform_view(request, object_id, form_url, extra_context)  # type: ignore[misc]
        except SERVICE_ERRORS as error:
            self.message_user(request, str(error), messages.ERROR)  # type: ignore[attr-defined]
            return HttpResponseRedirect(request.get_full_path())
