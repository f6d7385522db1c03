"""Label selectors in the database: the same table as the pure tests, and the index on PostgreSQL."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.db import connection
from django.db.models import Q
from django.utils import timezone

from fleet.label_selectors.parsing import parse_selector
from fleet.label_selectors.selector import MATCH_EVERYTHING
from fleet.models import Agent
from fleet.selector_queries import ERR_PREFIX, agents_matching, selector_q
from tests.rollouts.selector_cases import AGENTS, SelectorCase, case_params

ON_POSTGRESQL = connection.vendor == "postgresql"

# Both query forms run on PostgreSQL (key lookups work there too); elsewhere only key lookups.
QUERY_FORMS = [pytest.param("sqlite", id="key-lookups")]
if ON_POSTGRESQL:
    QUERY_FORMS.insert(0, pytest.param("postgresql", id="containment"))

GIN_INDEX = "fleet_agent_labels_gin"


@pytest.fixture
def agents_by_uid(db: Any) -> dict[uuid.UUID, str]:
    """The table's agents in the database: instance_uid -> name."""
    now = timezone.now()
    names: dict[uuid.UUID, str] = {}
    for name, labels in AGENTS.items():
        agent = Agent.objects.create(instance_uid=uuid.uuid4(), labels=labels, last_seen=now)
        names[agent.instance_uid] = name
    return names


@pytest.mark.parametrize("vendor", QUERY_FORMS)
@pytest.mark.parametrize("case", case_params())
def test_the_database_selects_exactly_the_agents_the_selector_matches(
    case: SelectorCase, vendor: str, agents_by_uid: dict[uuid.UUID, str]
) -> None:
    selector = parse_selector(case.selector)

    selected = Agent.objects.filter(selector_q(selector, vendor=vendor))

    names = {agents_by_uid[agent.instance_uid] for agent in selected}
    assert names == case.selects
    assert names == {
        agents_by_uid[agent.instance_uid] for agent in Agent.objects.all() if selector.matches(agent.labels)
    }


@pytest.mark.parametrize("case", case_params())
def test_agents_matching_selects_the_same_agents_with_the_query_form_of_the_database_in_use(
    case: SelectorCase, agents_by_uid: dict[uuid.UUID, str]
) -> None:
    selected = agents_matching(parse_selector(case.selector))

    assert {agents_by_uid[agent.instance_uid] for agent in selected} == case.selects


def test_agents_matching_narrows_a_given_queryset(agents_by_uid: dict[uuid.UUID, str]) -> None:
    edge_agents = Agent.objects.filter(labels__tier__exact="edge")

    selected = agents_matching(parse_selector("!legacy"), queryset=edge_agents)

    assert [agents_by_uid[agent.instance_uid] for agent in selected] == ["prod-edge"]


@pytest.mark.parametrize("vendor", ["postgresql", "sqlite"])
def test_the_empty_selector_is_an_empty_q(vendor: str) -> None:
    assert selector_q(MATCH_EVERYTHING, vendor=vendor) == Q()


def test_the_postgresql_form_tests_all_match_labels_in_one_containment() -> None:
    q = selector_q(parse_selector("tier=edge,env=prod"), vendor="postgresql")

    assert q == Q(labels__contains={"env": "prod", "tier": "edge"})


def test_the_postgresql_form_tests_in_as_an_or_of_containments() -> None:
    q = selector_q(parse_selector("tier in (edge,core)"), vendor="postgresql")

    assert q == Q(labels__contains={"tier": "core"}) | Q(labels__contains={"tier": "edge"})


def test_the_other_form_tests_each_label_by_a_key_lookup() -> None:
    q = selector_q(parse_selector("env=prod,tier in (edge,core)"), vendor="sqlite")

    assert q == Q(labels__env__exact="prod") & Q(labels__tier__in=["core", "edge"])


def _lookups(q: Q) -> list[str]:
    names: list[str] = []
    for child in q.children:
        if isinstance(child, Q):
            names.extend(_lookups(child))
        else:
            names.append(child[0])
    return names


@pytest.mark.parametrize("vendor", ["postgresql", "sqlite"])
def test_a_prefix_reaches_the_labels_through_a_relation(vendor: str) -> None:
    selector = parse_selector("env=prod,tier in (edge),tier notin (core),legacy,!old")

    lookups = _lookups(selector_q(selector, vendor=vendor, prefix="agent__"))

    assert lookups
    assert all(lookup.startswith("agent__labels__") for lookup in lookups)


def test_a_prefix_without_the_double_underscore_is_refused() -> None:
    with pytest.raises(ValueError) as raised:
        selector_q(MATCH_EVERYTHING, prefix="agent")

    assert str(raised.value) == ERR_PREFIX.format(prefix="'agent'")


FLEET_SIZE = 20_000
ENVS = ["prod", "staging", "dev", "qa", "perf"]
TIERS = ["edge", "core", "batch"]


@pytest.mark.django_db
@pytest.mark.skipif(not ON_POSTGRESQL, reason="the GIN index exists only on PostgreSQL")
def test_on_postgresql_match_labels_are_answered_by_the_gin_index() -> None:
    now = timezone.now()
    Agent.objects.bulk_create(
        [
            Agent(
                instance_uid=uuid.uuid4(),
                labels={"env": ENVS[i % len(ENVS)], "tier": TIERS[i % len(TIERS)], "idx": str(i)},
                last_seen=now,
            )
            for i in range(FLEET_SIZE)
        ],
        batch_size=2_000,
    )
    with connection.cursor() as cursor:
        # New GIN entries wait in the index's pending list, which the planner costs as read
        # in full; autovacuum empties it in a live database, but cannot reach rows this
        # test's open transaction inserted, so empty it here as autovacuum would.
        cursor.execute("SELECT gin_clean_pending_list(%s::regclass)", [GIN_INDEX])
        cursor.execute("ANALYZE fleet_agent")
    selector = parse_selector("env=perf,tier=batch")

    plan = agents_matching(selector).explain()
    print(f"\nEXPLAIN of {selector.to_string()!r} over {FLEET_SIZE} agents:\n{plan}")

    assert f"Bitmap Index Scan on {GIN_INDEX}" in plan
    # Every fifteenth agent is perf and batch.
    assert agents_matching(selector).count() == FLEET_SIZE // 15
