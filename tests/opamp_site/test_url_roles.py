"""Every route of the URL conf checks roles: walked as a user without a role and as a viewer.

The walk reads `django.urls.get_resolver()`, so a route added later is walked too: each
route must yield a URL that resolves back to it (or the test fails), and is tried with
every method its view accepts. API routes: a user without a role gets 403 on all of them;
a viewer reads (never 403 on a safe method) and gets 403 on every write. Pages (the admin,
the overview): a user without a role gets no data (redirected to the login, or 403/404/405);
a viewer changes nothing.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, resolve
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient
from rest_framework.views import APIView

from fleet.models import Agent, AuditEvent
from fleet.roles import VIEWER, grant_role
from tests.fleet import factories

pytestmark = pytest.mark.django_db

API_PREFIX = "api/v1/"
SAFE = ("get", "head", "options")
# Pages anyone may see: they show no data (the login form and its way out).
PUBLIC_PAGES = {"admin:login", "admin:logout", "dashboard-login", "dashboard-logout"}
# Values tried for a URL's parameters, first match wins.
SAMPLES = ("1", str(uuid.UUID(int=1)), "json", ".json", "fleet", "agent", "x")
# Preferred values by parameter name: the agent row the fixture creates, JSON rendering.
NAMED_SAMPLES = {"instance_uid": str(uuid.UUID(int=1)), "format": "json"}
GROUP = re.compile(r"\(\?P<(?P<name>\w+)>")


@dataclass(frozen=True)
class Route:
    name: str
    url: str
    callback: Any
    methods: tuple[str, ...]

    @property
    def is_api(self) -> bool:
        return self.url.startswith("/" + API_PREFIX)


def _group_end(regex: str, start: int) -> int:
    """Index just past the group opening at `start` (parentheses balanced, escapes skipped)."""
    depth, index = 0, start
    while index < len(regex):
        char = regex[index]
        if char == "\\":
            index += 2
            continue
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    raise ValueError(f"unbalanced group in {regex!r}")


def concrete_path(regex: str) -> str:
    """A path matching `regex`: each named group replaced by the first sample it accepts."""
    while match := GROUP.search(regex):
        end = _group_end(regex, match.start())
        body = regex[match.end() : end - 1]
        candidates = (NAMED_SAMPLES.get(match["name"], ""), *SAMPLES)
        sample = next((value for value in candidates if value and re.fullmatch(body, value)), None)
        if sample is None:
            raise AssertionError(f"no sample value matches group {match['name']} ({body!r})")
        regex = regex[: match.start()] + sample + regex[end:]
    path = regex.replace("^", "").replace("\\Z", "").replace("$", "").replace("/?", "/")
    return path.replace("\\.", ".").replace("\\", "")


def _methods(callback: Any) -> tuple[str, ...]:
    actions = getattr(callback, "actions", None)
    if actions:  # a DRF viewset route: exactly the methods it maps
        return (*sorted(actions), "options")
    cls = getattr(callback, "cls", None) or getattr(callback, "view_class", None)
    if cls is not None and issubclass(cls, APIView):
        return tuple(method for method in cls.http_method_names if hasattr(cls, method) and method != "trace")
    if cls is not None:
        return tuple(method for method in ("get", "post", "put", "patch", "delete") if hasattr(cls, method))
    return ("get", "post")  # a function view (the admin's, the overview): what a browser sends


def routes() -> Iterator[Route]:
    def walk(patterns: list[Any], prefix: str, namespace: str) -> Iterator[Route]:
        for pattern in patterns:
            regex = pattern.pattern.regex.pattern
            if isinstance(pattern, URLResolver):
                inner = f"{namespace}{pattern.namespace}:" if pattern.namespace else namespace
                yield from walk(pattern.url_patterns, prefix + regex.rstrip("$").removesuffix("\\Z"), inner)
            elif isinstance(pattern, URLPattern):
                url = "/" + concrete_path(prefix + regex)
                yield Route(f"{namespace}{pattern.name}", url, pattern.callback, _methods(pattern.callback))

    yield from walk(get_resolver().url_patterns, "", "")


ROUTES = list(routes())


def test_the_walk_covers_the_api_the_admin_and_the_pages():
    for route in ROUTES:
        assert resolve(route.url.split("?")[0]).func == route.callback, route
    names = {route.name for route in ROUTES}
    assert {"agent-list", "agent-detail", "fleet-overview", "admin:index", "api-schema"} <= names
    assert sum(route.is_api for route in ROUTES) > 20


def _api_client(user: Any) -> APIClient:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


def _call(client: Any, method: str, url: str) -> Any:
    return (
        getattr(client, method)(url, data={} if method not in SAFE else None, format="json")
        if isinstance(client, APIClient)
        else getattr(client, method)(url)
    )


@pytest.fixture
def agent_row() -> Agent:
    return factories.AgentFactory(instance_uid=uuid.UUID(int=1), remote_address="198.51.100.7")


@pytest.fixture
def no_role() -> Any:
    return factories.UserFactory(username="nobody")


@pytest.fixture
def viewer() -> Any:
    # Staff, so that the admin lets the viewer in at all: what it may do there is the role's.
    user = factories.UserFactory(username="vera", is_staff=True)
    grant_role(user=user, role=VIEWER)
    return user


def _reads_nothing(response: Any) -> bool:
    if response.status_code in (401, 403, 404, 405):
        return True
    return response.status_code == 302 and "/login/" in response["Location"]


@pytest.mark.parametrize("route", [r for r in ROUTES if r.is_api], ids=lambda route: f"{route.name} {route.url}")
def test_an_api_route_refuses_a_user_without_a_role_and_lets_a_viewer_only_read(route, agent_row, no_role, viewer):
    Group.objects.get_or_create(name="operator")
    nobody, reader = _api_client(no_role), _api_client(viewer)
    view_class = getattr(route.callback, "cls", None)
    read_only = set(getattr(view_class, "read_only_methods", ()))
    events = AuditEvent.objects.count()
    for method in route.methods:
        refused = _call(nobody, method, route.url)
        assert refused.status_code == 403, (method, route.url, refused.status_code, refused.content[:200])
        response = _call(reader, method, route.url)
        if method in SAFE or method.upper() in read_only:
            assert response.status_code != 403 and response.status_code < 500, (
                method,
                route.url,
                response.content[:200],
            )
        else:
            assert response.status_code == 403, (method, route.url, response.status_code, response.content[:200])
    assert AuditEvent.objects.count() == events


@pytest.mark.parametrize("route", [r for r in ROUTES if not r.is_api], ids=lambda route: f"{route.name} {route.url}")
def test_a_page_shows_a_user_without_a_role_nothing_and_lets_a_viewer_change_nothing(route, agent_row, no_role, viewer):
    nobody = Client()
    nobody.force_login(no_role)
    reader = Client()
    reader.force_login(viewer)
    events = AuditEvent.objects.count()
    agents = list(Agent.objects.values())
    for method in route.methods:
        response = _call(nobody, method, route.url)
        if route.name not in PUBLIC_PAGES:
            assert _reads_nothing(response), (method, route.url, response.status_code)
        assert b"198.51.100.7" not in response.content
        response = _call(reader, method, route.url)
        assert response.status_code < 500, (method, route.url, response.status_code)
    assert AuditEvent.objects.count() == events
    assert list(Agent.objects.values()) == agents
