"""The one place where domain errors become HTTP answers.

Every refusal a service or selector can raise (DomainError, InputProblems such as a config
map that fails validation or a malformed label selector, a model that fails full_clean, a delete blocked
by a protecting reference) is answered with one body shape,
`{"detail": str, "field": str | null, "problems": [str, ...]}`: 400, or 409 for a blocked
delete, 413 for a body over DATA_UPLOAD_MAX_MEMORY_SIZE, or the status the DomainError
carries. Anything else is left to DRF's handler.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import ProtectedError, RestrictedError
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler, set_rollback

from fleet.errors import DomainError, InputProblems

STILL_REFERENCED = "this cannot be deleted while other records refer to it"
REQUEST_BODY_TOO_LARGE = "the request body is larger than {limit} bytes (DATA_UPLOAD_MAX_MEMORY_SIZE)"


def error_body(detail: str, *, field: str | None = None, problems: list[str] | None = None) -> dict[str, Any]:
    return {"detail": detail, "field": field, "problems": problems if problems is not None else [detail]}


def _django_validation_body(error: DjangoValidationError) -> dict[str, Any]:
    if hasattr(error, "error_dict"):
        problems = [f"{name}: {message}" for name, messages in error.message_dict.items() for message in messages]
        field = next(iter(error.error_dict), None)
    else:
        problems, field = list(error.messages), None
    return error_body("; ".join(problems), field=field, problems=problems)


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    response = _domain_response(exc)
    if response is None:
        return exception_handler(exc, context)
    # As DRF does for its own errors: under ATOMIC_REQUESTS nothing of a refused request stays.
    set_rollback()
    return response


def _domain_response(exc: Exception) -> Response | None:
    if isinstance(exc, DomainError):
        return Response(error_body(exc.message, field=exc.field), status=exc.status)
    if isinstance(exc, InputProblems):
        return Response(
            error_body(exc.detail, field=exc.field, problems=exc.problems), status=status.HTTP_400_BAD_REQUEST
        )
    if isinstance(exc, RequestDataTooBig):
        # Django's own answer would be an empty HTML 400.
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return Response(
            error_body(REQUEST_BODY_TOO_LARGE.format(limit=limit)), status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
        )
    if isinstance(exc, DjangoValidationError):
        return Response(_django_validation_body(exc), status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, ProtectedError | RestrictedError):
        # A delete the service did not foresee being blocked: a conflict, not a server error.
        referrers = sorted(
            {str(obj) for obj in (exc.protected_objects if isinstance(exc, ProtectedError) else exc.restricted_objects)}
        )
        return Response(error_body(STILL_REFERENCED, problems=referrers), status=status.HTTP_409_CONFLICT)
    return None
