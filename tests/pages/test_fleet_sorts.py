"""The fleet page's sortable columns: each orders correctly both ways, and paging through a
sort by keyset visits every agent exactly once, ties included."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from fleet.models import Agent
from fleet.roles import OPERATOR, grant_role
from rollouts import services
from rollouts.dashboard.views import fleet as fleet_views
from rollouts.models import AgentDesiredConfig, Configuration
from tests.fleet.factories import AgentFactory, UserFactory

pytestmark = pytest.mark.django_db

BODY = "receivers:\n  otlp: {}\n"
# Lower-case ASCII only, so Python's order is the database's under any collation.
NAMES = ["beta", "alpha", "beta", "", "gamma", "alpha", "beta", "delta", "", "alpha", "gamma", "beta", "alpha"]
HEALTH_ORDER = {False: 0, None: 1, True: 2}


@pytest.fixture
def operator() -> Client:
    user = UserFactory(username="operator")
    grant_role(user=user, role=OPERATOR)
    client = Client()
    client.force_login(user)
    return client


def publish(name: str, versions: int) -> Configuration:
    configuration = services.configuration_create(name=name, selector=f"pick={name}", actor=None)
    for number in range(versions):
        services.configuration_publish(
            configuration=configuration,
            files={"collector.yaml": {"body": BODY + f"# {number}\n", "content_type": "text/yaml"}},
            author=None,
            activate=False,
        )
    return configuration


@pytest.fixture
def agents() -> list[Agent]:
    """Agents whose every sorted column has ties and, where the key may be missing, gaps."""
    now = timezone.now()
    alpha, beta = publish("alpha", 2), publish("beta", 1)
    targets = [None, (alpha, 1), (alpha, 2), (beta, 1), (alpha, 1)]
    made = []
    for index, name in enumerate(NAMES):
        present = index % 4 != 3
        made.append(
            AgentFactory(
                identifying_attributes={"service.name": name} if name else {},
                healthy=[True, False, None][index % 3],
                transport=["websocket", "http", ""][index % 3],
                remote_config_state=index % 4,
                connected=present,
                # Two agents share each moment, so the time sorts have ties as well.
                last_seen=now - timedelta(seconds=index // 2) - (timedelta(0) if present else timedelta(days=1)),
            )
        )
        target = targets[index % len(targets)]
        if target:
            configuration, number = target
            AgentDesiredConfig.objects.create(
                agent=made[-1], configuration=configuration, version=configuration.versions.get(number=number)
            )
    for index, agent in enumerate(made):
        Agent.objects.filter(pk=agent.pk).update(first_seen=now - timedelta(minutes=index % 5))
    return list(Agent.objects.select_related("desired_config__configuration", "desired_config__version"))


def status_of(agent: Agent) -> str:
    if not agent.connected:
        return "offline"
    return "unhealthy" if agent.healthy is False else "online"


def desired(agent: Agent) -> tuple[str, int]:
    config = getattr(agent, "desired_config", None)
    return (config.configuration.name, config.version.number) if config else ("", 0)


KEYS: dict[str, Any] = {
    "name": lambda a: a.identifying_attributes.get("service.name", ""),
    "status": status_of,
    "health": lambda a: HEALTH_ORDER[a.healthy],
    "transport": lambda a: a.transport,
    "configuration": lambda a: desired(a)[0],
    "version": lambda a: desired(a)[1],
    "state": lambda a: a.remote_config_state,
    "last_seen": lambda a: a.last_seen,
    "first_seen": lambda a: a.first_seen,
}


def walk(client: Client, sort: str) -> list[int]:
    seen: list[int] = []
    query = f"sort={sort}"
    while True:
        page = client.get("/fleet/?" + query)
        assert page.status_code == 200
        assert not page.context["problem"]
        seen += [a.pk for a in page.context["agents"]]
        query = page.context["next_query"]
        if not query:
            return seen


def test_every_column_sorts_both_ways_and_paging_visits_each_agent_once(operator, agents, monkeypatch):
    assert set(KEYS) == set(fleet_views.SORTS)
    # Pages of three: every sort crosses page boundaries inside a run of equal keys.
    monkeypatch.setattr(fleet_views, "PAGE_SIZE", 3)
    for name, key in KEYS.items():
        ascending = [a.pk for a in sorted(agents, key=lambda a: (key(a), a.pk))]
        with CaptureQueriesContext(connection) as queries:
            assert walk(operator, name) == ascending, name
            assert walk(operator, f"-{name}") == ascending[::-1], name
        assert not [q["sql"] for q in queries.captured_queries if "OFFSET" in q["sql"].upper()], name


def test_each_column_header_links_its_sort_and_flips_the_current_one(operator, agents):
    page = operator.get("/fleet/", {"sort": "health"})
    links = {column["label"]: column for column in page.context["columns"]}
    assert len(links) == len(fleet_views.SORTS)
    assert links["health"]["arrow"] == "↑" and "sort=-health" in links["health"]["link"]
    assert "sort=name" in links["agent"]["link"] and not links["agent"]["arrow"]
    assert "sort=-last_seen" in links["last seen"]["link"]
    content = page.content.decode()
    for label in links:
        assert f">{label}</a>" in content


def test_an_unknown_sort_falls_back_to_last_seen_and_a_cursor_of_the_wrong_kind_is_stale(operator, agents):
    assert operator.get("/fleet/", {"sort": "-password"}).context["sort"] == fleet_views.DEFAULT_SORT
    stale = operator.get("/fleet/", {"sort": "version", "after": "abc|3"})
    assert stale.context["problem"] == fleet_views.BAD_CURSOR and not stale.context["agents"]
