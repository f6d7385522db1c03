"""What every operator page shares: the login and role check (`page`), the template context,
numbers read from a form, and files shown side by side (the agent and configuration pages).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponseBase
from django.urls import reverse

from fleet.roles import READ_DENIED, WRITE_DENIED, can_read, can_write

View = Callable[..., HttpResponseBase]


def page(view: View) -> View:
    """Log in first; reading needs a role; any POST needs the operator role (403 otherwise)."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path(), reverse("dashboard-login"))
        if not can_read(request.user):
            raise PermissionDenied(READ_DENIED)
        if request.method == "POST" and not can_write(request.user):
            raise PermissionDenied(WRITE_DENIED)
        return view(request, *args, **kwargs)

    return wrapper


def page_context(request: HttpRequest, **values: Any) -> dict[str, Any]:
    return {"can_write": can_write(request.user), **values}


def number_or(text: str | None, default: int | None) -> int | None:
    return int(text) if text and text.isdigit() else default


def files_of(document: Any) -> dict[str, str]:
    """{file name: body} from a stored version's files or an effective config document."""
    if not isinstance(document, dict):
        return {}
    files = document.get("config_map", document)
    if not isinstance(files, dict):
        return {}
    out = {}
    for name, value in files.items():
        body = value.get("body", "") if isinstance(value, dict) else value
        out[str(name)] = body if isinstance(body, str) else str(body)
    return out


def side_by_side(before: dict[str, str], after: dict[str, str]) -> list[dict[str, Any]]:
    """Per file, aligned rows (left, right, kind) for a two-column diff."""
    result = []
    for name in sorted(set(before) | set(after)):
        left, right = before.get(name, "").splitlines(), after.get(name, "").splitlines()
        rows: list[tuple[str, str, str]] = []
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=left, b=right, autojunk=False).get_opcodes():
            if tag == "equal":
                rows += [(line, line, "same") for line in left[i1:i2]]
                continue
            olds, news = left[i1:i2], right[j1:j2]
            for index in range(max(len(olds), len(news))):
                rows.append(
                    (
                        olds[index] if index < len(olds) else "",
                        news[index] if index < len(news) else "",
                        "changed"
                        if index < len(olds) and index < len(news)
                        else ("removed" if index < len(olds) else "added"),
                    )
                )
        result.append({"name": name, "rows": rows, "changed": any(kind != "same" for _, _, kind in rows)})
    return result
