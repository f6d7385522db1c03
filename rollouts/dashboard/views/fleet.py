"""The fleet list: filters, every column sortable, keyset-paged on (sort key, id)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db.models import Case, F, Q, QuerySet, TextField, Value, When
from django.db.models.fields.json import KeyTextTransform
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.dateparse import parse_datetime

from fleet import selectors as fleet_selectors
from fleet.label_selectors.parsing import parse_selector
from fleet.label_selectors.selector import SelectorError
from fleet.models import Agent, RemoteConfigState, Transport
from fleet.selector_queries import selector_q
from rollouts import selectors
from rollouts.dashboard.views.shared import page, page_context
from rollouts.models import Configuration

PAGE_SIZE = 50
CONFIG_STATES = {
    "applied": RemoteConfigState.APPLIED,
    "applying": RemoteConfigState.APPLYING,
    "failed": RemoteConfigState.FAILED,
    "none": RemoteConfigState.UNSET,
}
HEALTH = {"healthy": Q(healthy=True), "unhealthy": Q(healthy=False), "unknown": Q(healthy__isnull=True)}
SEARCHED_LABELS = ("service.name", "service.instance.id", "host.name")
BAD_CURSOR = "the page link is out of date; start again from the first page"


def _fleet_filters(request: HttpRequest) -> tuple[QuerySet[Agent], dict[str, str], str]:
    """The filtered agents, the filters as given, and the first problem with them ("" if none)."""
    given = {
        key: request.GET.get(key, "").strip()
        for key in ("status", "health", "transport", "selector", "configuration", "version", "state", "drift", "q")
    }
    agents = fleet_selectors.agent_list()
    problem = ""
    if given["status"] in dict(fleet_selectors.AgentStatus.CHOICES):
        agents = agents.filter(fleet_selectors.status_q(given["status"]))
    if given["health"] in HEALTH:
        agents = agents.filter(HEALTH[given["health"]])
    if given["transport"] in Transport.values:
        agents = agents.filter(transport=given["transport"])
    if given["selector"]:
        try:
            agents = agents.filter(selector_q(parse_selector(given["selector"])))
        except SelectorError as error:
            problem = str(error)
    if given["configuration"]:
        agents = agents.filter(desired_config__configuration__name=given["configuration"])
    if given["version"].isdigit():
        agents = agents.filter(desired_config__version__number=int(given["version"]))
    if given["state"] in CONFIG_STATES:
        agents = agents.filter(remote_config_state=CONFIG_STATES[given["state"]])
    if given["drift"] == "yes":
        # Running something other than the desired version (the effective config says so).
        agents = agents.filter(pk__in=selectors.drifting_agents().values("pk"))
    if given["q"]:
        term = given["q"]
        # The names an operator knows an agent by; a whole instance uid finds that agent.
        match = Q()
        for key in SEARCHED_LABELS:
            match |= Q(**{f"labels__{key}__icontains": term})
        with contextlib.suppress(ValueError):
            match |= Q(instance_uid=uuid.UUID(term))
        agents = agents.filter(match)
    return agents, given, problem


@dataclass(frozen=True)
class Sort:
    """One sortable fleet column: the key it orders by, how a cursor spells that key, and the
    direction of the first click. The key never is NULL (Coalesce), so `(key, pk)` is a total
    order and the keyset range `(key, pk) > (value, pk)` visits every agent exactly once."""

    key: Callable[[], Any]
    kind: str  # "time" | "int" | "text": how the cursor's value is read back
    first_descending: bool = False


# Index-backed: first_seen, transport and config state ((column, id) indexes on fleet.Agent),
# last_seen (its own index; PostgreSQL sorts only the ties on id). Not index-backed, sorted
# by the database on each page: name (a JSON attribute), status (computed from presence),
# health (nullable, ordered unhealthy < unknown < healthy), configuration and desired
# version (a join). At 50,000 agents that is one sort of the filtered rows per page.
SERVICE_NAME = KeyTextTransform("service.name", "identifying_attributes")
SORTS: dict[str, Sort] = {
    "name": Sort(lambda: Coalesce(SERVICE_NAME, Value(""), output_field=TextField()), "text"),
    "status": Sort(lambda: F("status"), "text"),
    "health": Sort(
        lambda: Case(When(healthy=False, then=Value(0)), When(healthy=True, then=Value(2)), default=Value(1)), "int"
    ),
    "transport": Sort(lambda: F("transport"), "text"),
    "configuration": Sort(lambda: Coalesce(F("desired_config__configuration__name"), Value("")), "text"),
    "version": Sort(lambda: Coalesce(F("desired_config__version__number"), Value(0)), "int"),
    "state": Sort(lambda: F("remote_config_state"), "int"),
    "last_seen": Sort(lambda: F("last_seen"), "time", first_descending=True),
    "first_seen": Sort(lambda: F("first_seen"), "time", first_descending=True),
}
DEFAULT_SORT = "-last_seen"
COLUMN_LABELS = {
    "name": "agent",
    "status": "status",
    "health": "health",
    "transport": "transport",
    "configuration": "configuration",
    "version": "desired version",
    "state": "config state",
    "first_seen": "first seen",
    "last_seen": "last seen",
}


def _cursor_value(kind: str, text: str) -> Any:
    """The sort key a cursor carries, or None when the cursor is not one this page wrote."""
    if kind == "time":
        return parse_datetime(text)
    if kind == "int":
        return int(text) if text.lstrip("-").isdigit() else None
    return text


def _keyset(agents: QuerySet[Agent], *, sort: Sort, descending: bool, cursor: str) -> tuple[QuerySet[Agent], bool]:
    """Rows after `cursor` ("<key>|<pk>") in (key, pk) order: a range, never an OFFSET."""
    agents = agents.annotate(sort_key=sort.key())
    if cursor:
        value_text, _, pk_text = cursor.rpartition("|")
        value = _cursor_value(sort.kind, value_text)
        if value is None or not pk_text.isdigit():
            return agents.none(), True
        after = "lt" if descending else "gt"
        agents = agents.filter(Q(**{f"sort_key__{after}": value}) | Q(sort_key=value, **{f"pk__{after}": int(pk_text)}))
    order = ("-sort_key", "-pk") if descending else ("sort_key", "pk")
    return agents.order_by(*order), False


def _cursor_text(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


@page
def fleet_list(request: HttpRequest) -> HttpResponse:
    agents, given, problem = _fleet_filters(request)
    sort = request.GET.get("sort", DEFAULT_SORT)
    if sort.lstrip("-") not in SORTS:
        sort = DEFAULT_SORT
    descending = sort.startswith("-")
    counts = fleet_selectors.counts_by(agents, "status")
    cursor = request.GET.get("after", "")
    rows, stale = _keyset(agents, sort=SORTS[sort.lstrip("-")], descending=descending, cursor=cursor)
    window = list(rows.select_related("desired_config__configuration", "desired_config__version")[: PAGE_SIZE + 1])
    more = len(window) > PAGE_SIZE
    window = window[:PAGE_SIZE]
    next_query = ""
    if more:
        last = window[-1]
        query = request.GET.copy()
        query["after"] = f"{_cursor_text(last.sort_key)}|{last.pk}"
        next_query = query.urlencode()
    sort_links = {}
    for name, column in SORTS.items():
        query = request.GET.copy()
        query.pop("after", None)
        if sort.lstrip("-") == name:
            query["sort"] = name if descending else f"-{name}"
        else:
            query["sort"] = f"-{name}" if column.first_descending else name
        sort_links[name] = query.urlencode()
    arrow = "↓" if descending else "↑"
    columns = [
        {"label": label, "link": sort_links[name], "arrow": arrow if sort.lstrip("-") == name else ""}
        for name, label in COLUMN_LABELS.items()
    ]
    first_page = request.GET.copy()
    first_page.pop("after", None)
    return render(
        request,
        "dashboard/fleet.html",
        page_context(
            request,
            agents=window,
            given=given,
            problem=problem or (BAD_CURSOR if stale else ""),
            total=sum(counts.values()),
            counts=[(status, counts.get(status, 0)) for status, _ in fleet_selectors.AgentStatus.CHOICES],
            sort=sort,
            sort_links=sort_links,
            columns=columns,
            next_query=next_query,
            first_query=first_page.urlencode() if "after" in request.GET else "",
            statuses=[s for s, _ in fleet_selectors.AgentStatus.CHOICES],
            healths=list(HEALTH),
            transports=Transport.values,
            states=list(CONFIG_STATES),
            configurations=list(Configuration.objects.order_by("name").values_list("name", flat=True)),
        ),
    )
