"""A label selector as a database filter over `Agent.labels`: which agents match is one query.

On PostgreSQL every test is a JSONB containment (`@>`) or key-existence (`?`) test, the
operators the GIN index `fleet_agent_labels_gin` (jsonb_ops) answers. Other databases
(SQLite in the embedded default) have no JSON containment lookup, so there each requirement
is a JSON key lookup instead. Both give exactly `LabelSelector.matches` for string labels.
"""

from __future__ import annotations

from functools import reduce
from operator import or_

from django.db import connection, connections
from django.db.models import Q, QuerySet

from fleet.label_selectors.selector import LabelSelector, Operator, Requirement
from fleet.models import Agent

LABELS_FIELD = "labels"
POSTGRESQL = "postgresql"

ERR_PREFIX = 'prefix {prefix} must be empty or end with "__"'


def selector_q(selector: LabelSelector, *, vendor: str | None = None, prefix: str = "") -> Q:
    """A Q selecting the rows whose labels match `selector`; Q() for the empty selector.

    `prefix` reaches the labels through a relation (`prefix="agent__"` filters a model with
    a foreign key `agent`). `vendor` picks the query form; by default the default database's.
    """
    if prefix and not prefix.endswith("__"):
        raise ValueError(ERR_PREFIX.format(prefix=repr(prefix)))
    field = prefix + LABELS_FIELD
    if (vendor or connection.vendor) == POSTGRESQL:
        return _containment_q(selector, field)
    return _key_lookup_q(selector, field)


def agents_matching(selector: LabelSelector, *, queryset: QuerySet[Agent] | None = None) -> QuerySet[Agent]:
    """The agents (of `queryset`, by default all) whose labels match `selector`."""
    agents = Agent.objects.all() if queryset is None else queryset
    return agents.filter(selector_q(selector, vendor=connections[agents.db].vendor))


def _containment_q(selector: LabelSelector, field: str) -> Q:
    contains = field + "__contains"
    has_key = field + "__has_key"

    def any_value(requirement: Requirement) -> Q:
        # One containment per value, ORed: each is an index probe (BitmapOr in the plan).
        return reduce(or_, (Q(**{contains: {requirement.key: value}}) for value in requirement.values))

    # All of matchLabels in a single `labels @> {...}`: one index probe, not one per label.
    q = Q(**{contains: dict(selector.match_labels)}) if selector.match_labels else Q()
    for requirement in selector.match_expressions:
        if requirement.operator is Operator.IN:
            q &= any_value(requirement)
        elif requirement.operator is Operator.NOT_IN:
            # NOT (labels @> ...) is also true when the key is absent, as NotIn requires.
            q &= ~any_value(requirement)
        elif requirement.operator is Operator.EXISTS:
            q &= Q(**{has_key: requirement.key})
        else:
            q &= ~Q(**{has_key: requirement.key})
    return q


def _key_lookup_q(selector: LabelSelector, field: str) -> Q:
    has_key = field + "__has_key"

    # The lookup name is always spelled out: `labels__in=...` would otherwise be read as
    # the `in` lookup on the field itself when a label key is itself called "in".
    def key_lookup(key: str, lookup: str) -> str:
        return f"{field}__{key}__{lookup}"

    q = Q()
    for key, value in selector.match_labels.items():
        q &= Q(**{key_lookup(key, "exact"): value})
    for requirement in selector.match_expressions:
        key = requirement.key
        if requirement.operator is Operator.IN:
            q &= Q(**{key_lookup(key, "in"): list(requirement.values)})
        elif requirement.operator is Operator.NOT_IN:
            # A missing key extracts as NULL and NOT (NULL IN (...)) is NULL, which would drop
            # the agents without the key; negating "has the key AND in" keeps them.
            q &= ~(Q(**{has_key: key}) & Q(**{key_lookup(key, "in"): list(requirement.values)}))
        elif requirement.operator is Operator.EXISTS:
            q &= Q(**{has_key: key})
        else:
            q &= ~Q(**{has_key: key})
    return q
