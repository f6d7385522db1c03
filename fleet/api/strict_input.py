"""Operator input is refused when it breaks the text rule (fleet.safe_text), project-wide.

The rule is enforced where input enters, not per field: every API request body goes
through this JSON parser (REST_FRAMEWORK's DEFAULT_PARSER_CLASSES, and the API views' own
`parser_classes`: the API takes JSON bodies only), and every request's path, query
string and cookies through `UnsafeTextMiddleware`. So a field added tomorrow, a
JSON field or a selector string passed on unparsed, cannot reach the database with a NUL
or a lone surrogate: the request is answered 400 with the project's error body, naming
the field (`labels.env`, `files.app.yaml.body`, the query parameter), and nothing is stored.
DRF's CharField refuses both characters on its own too; JSON fields, dict fields and
URL parameters did not (a NUL in a label value was an HTTP 500 on PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from rest_framework import parsers
from rest_framework.exceptions import ParseError

from fleet.safe_text import first_unsafe, safe_text, text_problem

UNSAFE_TEXT_DETAIL = "{field} {problem}"
BODY = "body"


def unsafe_text_body(field: str, problem: str) -> dict[str, Any]:
    """The project's error body (fleet.api.exceptions.error_body's shape)."""
    detail = UNSAFE_TEXT_DETAIL.format(field=field, problem=problem)
    return {"detail": detail, "field": field, "problems": [detail]}


class UnsafeText(ParseError):
    """A request whose text breaks the rule: 400, naming the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(detail=unsafe_text_body(field or BODY, problem))


def check_document(data: Any) -> None:
    found = first_unsafe(data)
    if found is not None:
        raise UnsafeText(*found)


def first_unsafe_parameter(data: Any) -> tuple[str, str] | None:
    """Query parameters (a QueryDict): every key and every value of each."""
    for key, values in data.lists():
        problem = text_problem(key)
        if problem:
            return (safe_text(key), f"key {problem}")
        for value in values:
            if isinstance(value, str) and (problem := text_problem(value)):
                return (key, problem)
    return None


class JSONParser(parsers.JSONParser):
    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        data = super().parse(stream, media_type, parser_context)
        check_document(data)
        return data


class UnsafeTextMiddleware:
    """Refuse a NUL or lone surrogate in the path, a query parameter or a cookie: 400.

    Path parameters (a configuration's name) and filters are looked up in the database
    as given; one NUL made the lookup, and so the request, fail with a 500.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        refusal = self.refusal(request)
        if refusal is not None:
            return JsonResponse(unsafe_text_body(*refusal), status=400)
        return self.get_response(request)

    @staticmethod
    def refusal(request: HttpRequest) -> tuple[str, str] | None:
        problem = text_problem(request.path_info)
        if problem:
            return ("path", problem)
        found = first_unsafe_parameter(request.GET)
        if found is not None:
            return found
        for name, value in request.COOKIES.items():
            problem = text_problem(name) or text_problem(value)
            if problem:
                return (f"cookie {safe_text(name)}", problem)
        return None
