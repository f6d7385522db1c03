"""One table of selectors and the agents each selects, shared by the pure and the database tests.

The same table run through `LabelSelector.matches` and through `agents_matching` proves
the two evaluations agree, including on the corners (NotIn without the key, empty values,
keys named like Django lookups, values that need quoting in the short form).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest

AGENTS: dict[str, dict[str, str]] = {
    "prod-edge": {
        "env": "prod",
        "tier": "edge",
        "service.name": "collector",
        "app.kubernetes.io/name": "otelcol",
    },
    "prod-core": {
        "env": "prod",
        "tier": "core",
        "service.name": "collector",
        "deployment.environment": "production",
    },
    "prod-legacy": {"env": "prod", "tier": "edge", "legacy": "true"},
    "staging-core": {"env": "staging", "tier": "core", "service.name": "gateway"},
    "dev-untiered": {"env": "dev", "region": ""},
    "unlabelled": {},
    # Label keys that are also Django lookup names must still be read as keys.
    "lookup-named-keys": {"in": "x", "contains": "y", "exact": "z", "has_key": "w"},
    "odd-values": {"env": "prod,eu", "os.description": "Ubuntu 22.04 LTS", "quote": 'say "hi"', "idx": "5"},
}

EVERYONE = frozenset(AGENTS)


def everyone_but(*names: str) -> frozenset[str]:
    return EVERYONE - set(names)


@dataclass(frozen=True)
class SelectorCase:
    id: str
    selector: Mapping[str, Any] | str | None
    selects: frozenset[str]


def _case(id: str, selector: Mapping[str, Any] | str | None, *selects: str) -> SelectorCase:
    return SelectorCase(id=id, selector=selector, selects=frozenset(selects))


CASES: list[SelectorCase] = [
    SelectorCase("the empty string selects everyone", "", EVERYONE),
    SelectorCase("the empty dict selects everyone", {}, EVERYONE),
    SelectorCase("no selector selects everyone", None, EVERYONE),
    SelectorCase(
        "empty matchLabels and matchExpressions select everyone", {"matchLabels": {}, "matchExpressions": []}, EVERYONE
    ),
    _case("a label equality selects agents with that exact value", "env=prod", "prod-edge", "prod-core", "prod-legacy"),
    _case("a double equals sign means the same as one", "env==staging", "staging-core"),
    _case("label values are case sensitive", "env=Prod"),
    _case(
        "matchLabels requires every label", {"matchLabels": {"env": "prod", "tier": "edge"}}, "prod-edge", "prod-legacy"
    ),
    _case("equalities in the short form are ANDed", "env=prod, tier=edge", "prod-edge", "prod-legacy"),
    _case("keys may contain dots and slashes", "app.kubernetes.io/name=otelcol", "prod-edge"),
    _case(
        "in selects agents whose value is in the list",
        "service.name in (collector, gateway)",
        "prod-edge",
        "prod-core",
        "staging-core",
    ),
    _case("in never selects agents without the key", "missing in (a,b)"),
    _case(
        "notin selects agents whose value is not in the list and agents without the key",
        "tier notin (edge)",
        "prod-core",
        "staging-core",
        "dev-untiered",
        "unlabelled",
        "lookup-named-keys",
        "odd-values",
    ),
    _case(
        "not equals is notin with one value",
        "tier!=edge",
        "prod-core",
        "staging-core",
        "dev-untiered",
        "unlabelled",
        "lookup-named-keys",
        "odd-values",
    ),
    SelectorCase("notin over a key nobody has selects everyone", "missing notin (a)", EVERYONE),
    _case(
        "notin with several values excludes each of them",
        {"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["prod", "staging"]}]},
        "dev-untiered",
        "unlabelled",
        "lookup-named-keys",
        "odd-values",
    ),
    _case("a bare key selects agents that have it", "legacy", "prod-legacy"),
    _case("an exclamation mark selects agents without the key", "!legacy", *everyone_but("prod-legacy")),
    _case(
        "DoesNotExist selects agents without the key",
        {"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]},
        "dev-untiered",
        "unlabelled",
        "lookup-named-keys",
        "odd-values",
    ),
    _case(
        "Exists counts a key with an empty value",
        {"matchExpressions": [{"key": "region", "operator": "Exists"}]},
        "dev-untiered",
    ),
    _case("an empty value is selected by key equals nothing", "region=", "dev-untiered"),
    _case("an empty value can be quoted", 'region=""', "dev-untiered"),
    _case("every requirement is ANDed", "env=prod,tier in (edge,core),!legacy", "prod-edge", "prod-core"),
    _case("in and notin combine", "env in (prod,staging),tier notin (core)", "prod-edge", "prod-legacy"),
    _case(
        "matchLabels and every expression in the dict form are ANDed",
        {
            "matchLabels": {"env": "prod"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["edge"]},
                {"key": "legacy", "operator": "Exists"},
                {"key": "service.name", "operator": "DoesNotExist"},
                {"key": "legacy", "operator": "NotIn", "values": ["false"]},
            ],
        },
        "prod-legacy",
    ),
    _case("a snake case dict form is accepted", {"match_labels": {"env": "staging"}}, "staging-core"),
    _case("contradicting requirements select nobody", "env=prod,env notin (prod)"),
    _case("a quoted value may contain a comma", 'env="prod,eu"', "odd-values"),
    _case("quoted values in a list may contain spaces", 'os.description in ("Ubuntu 22.04 LTS", other)', "odd-values"),
    _case("a backslash escapes a quote inside a quoted value", 'quote="say \\"hi\\""', "odd-values"),
    _case("a value that looks like a number is still a string", {"matchLabels": {"idx": "5"}}, "odd-values"),
    _case("keys named like Django lookups are label keys", "in=x,contains=y,exact=z,has_key=w", "lookup-named-keys"),
    _case(
        "in over a key named like a lookup reads the label",
        {"matchExpressions": [{"key": "in", "operator": "In", "values": ["x", "q"]}]},
        "lookup-named-keys",
    ),
    _case(
        "notin over a key named like a lookup reads the label", "contains notin (y)", *everyone_but("lookup-named-keys")
    ),
    _case("exists over a key named like a lookup reads the label", "exact", "lookup-named-keys"),
]


def case_params() -> list[Any]:
    return [pytest.param(case, id=case.id.replace(" ", "-")) for case in CASES]
