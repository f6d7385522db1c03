"""Label selectors in pure Python: parsing both forms, Kubernetes matching, errors, canonical forms."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet.label_selectors.parsing import parse_selector
from fleet.label_selectors.selector import MATCH_EVERYTHING, LabelSelector, Operator, Requirement, SelectorError
from tests.rollouts.selector_cases import AGENTS, SelectorCase, case_params


@pytest.mark.parametrize("case", case_params())
def test_selector_matches_exactly_the_agents_in_the_table(case: SelectorCase) -> None:
    selector = parse_selector(case.selector)

    assert {name for name, labels in AGENTS.items() if selector.matches(labels)} == case.selects


@pytest.mark.parametrize(
    ("operator", "values", "labels", "expected"),
    [
        pytest.param(Operator.IN, ("a", "b"), {"k": "a"}, True, id="in-with-a-listed-value"),
        pytest.param(Operator.IN, ("a", "b"), {"k": "c"}, False, id="in-with-another-value"),
        pytest.param(Operator.IN, ("a",), {}, False, id="in-without-the-key"),
        pytest.param(Operator.NOT_IN, ("a", "b"), {"k": "a"}, False, id="notin-with-a-listed-value"),
        pytest.param(Operator.NOT_IN, ("a", "b"), {"k": "c"}, True, id="notin-with-another-value"),
        pytest.param(Operator.NOT_IN, ("a",), {}, True, id="notin-without-the-key"),
        pytest.param(Operator.EXISTS, (), {"k": ""}, True, id="exists-with-an-empty-value"),
        pytest.param(Operator.EXISTS, (), {"other": "k"}, False, id="exists-without-the-key"),
        pytest.param(Operator.DOES_NOT_EXIST, (), {"k": "a"}, False, id="doesnotexist-with-the-key"),
        pytest.param(Operator.DOES_NOT_EXIST, (), {}, True, id="doesnotexist-without-the-key"),
    ],
)
def test_each_operator_follows_kubernetes_semantics(
    operator: Operator, values: tuple[str, ...], labels: dict[str, str], expected: bool
) -> None:
    requirement = Requirement(key="k", operator=operator, values=values)

    assert requirement.matches(labels) is expected
    assert LabelSelector(match_expressions=(requirement,)).matches(labels) is expected


@pytest.mark.parametrize("data", ["", "   ", None, {}, {"matchLabels": None, "matchExpressions": None}])
def test_an_empty_selector_is_empty_and_matches_any_labels(data: Any) -> None:
    selector = parse_selector(data)

    assert selector == MATCH_EVERYTHING
    assert selector.is_empty
    assert selector.matches({}) and selector.matches({"env": "prod"})
    assert selector.to_dict() == {}
    assert selector.to_string() == ""


def test_a_selector_with_any_requirement_is_not_empty() -> None:
    assert not parse_selector("env=prod").is_empty
    assert not parse_selector("!legacy").is_empty


@pytest.mark.parametrize(
    ("text", "data"),
    [
        ("env=prod", {"matchLabels": {"env": "prod"}}),
        ("env==prod", {"matchLabels": {"env": "prod"}}),
        ("env!=prod", {"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["prod"]}]}),
        ("tier in (edge,core)", {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["core", "edge"]}]}),
        ("tier notin (edge)", {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["edge"]}]}),
        ("legacy", {"matchExpressions": [{"key": "legacy", "operator": "Exists"}]}),
        ("!legacy", {"matchExpressions": [{"key": "legacy", "operator": "DoesNotExist"}]}),
        ("  env = prod ,  tier in ( edge , core ) ,  ! legacy  ", "env=prod,tier in (edge,core),!legacy"),
        (
            "env=prod,tier in (edge,core),!legacy",
            {
                "match_labels": {"env": "prod"},
                "match_expressions": [
                    {"key": "legacy", "operator": "DoesNotExist", "values": []},
                    {"key": "tier", "operator": "In", "values": ["edge", "core", "edge"]},
                ],
            },
        ),
    ],
)
def test_the_string_and_the_dict_form_parse_to_the_same_selector(text: str, data: Any) -> None:
    assert parse_selector(text) == parse_selector(data)


def test_the_canonical_dict_form_is_sorted_and_leaves_out_empty_parts() -> None:
    selector = parse_selector("tier in (edge,core,edge),env=prod,!legacy,app=x")

    assert json.dumps(selector.to_dict()) == json.dumps(
        {
            "matchLabels": {"app": "x", "env": "prod"},
            "matchExpressions": [
                {"key": "legacy", "operator": "DoesNotExist"},
                {"key": "tier", "operator": "In", "values": ["core", "edge"]},
            ],
        }
    )


def test_the_canonical_string_form_is_sorted_and_quotes_values_only_when_needed() -> None:
    selector = parse_selector('tier in (edge,"a b"),env=prod,!legacy,region="",k!=v')

    assert selector.to_string() == 'env=prod,region="",k notin (v),!legacy,tier in ("a b",edge)'


def test_selectors_that_differ_only_in_order_are_equal_and_hash_alike() -> None:
    first = parse_selector("env=prod,tier in (edge,core),!legacy")
    second = parse_selector("!legacy, tier in (core, edge, core), env=prod")

    assert first == second
    assert hash(first) == hash(second)
    assert len({first, second}) == 1


def test_match_labels_is_a_copy_of_the_callers_dict() -> None:
    labels = {"env": "prod"}
    selector = LabelSelector(match_labels=labels)
    labels["env"] = "dev"

    assert selector.match_labels == {"env": "prod"}


@pytest.mark.parametrize("case", case_params())
def test_every_table_selector_survives_the_string_and_the_dict_round_trip(case: SelectorCase) -> None:
    selector = parse_selector(case.selector)

    assert parse_selector(selector.to_string()) == selector
    assert parse_selector(selector.to_dict()) == selector
    assert parse_selector(json.loads(json.dumps(selector.to_dict()))) == selector


def test_a_parsed_selector_is_returned_unchanged() -> None:
    selector = parse_selector("env=prod")

    assert parse_selector(selector) is selector


LONG = "k" * 257

PARSE_ERRORS = [
    # The dict form
    ([1], "a selector must be a mapping, a string or None, not list"),
    ({"selector": {}}, 'unknown field "selector"; a selector has matchLabels and matchExpressions'),
    ({"matchLabels": {}, "match_labels": {}}, "matchLabels and match_labels are the same field; give only one"),
    ({"matchLabels": ["env"]}, "matchLabels: must be a mapping of label keys to values, not list"),
    ({"matchLabels": {"env": 5}}, 'matchLabels["env"]: value 5 must be a string, not int'),
    ({"matchLabels": {"env": True}}, 'matchLabels["env"]: value True must be a string, not bool'),
    ({"match_labels": {"": "x"}}, "match_labels: key is empty"),
    ({"matchLabels": {"a__b": "x"}}, 'matchLabels: key "a__b" contains "__", which label keys may not contain'),
    (
        {"matchLabels": {"env": "v" * 257}},
        'matchLabels["env"]: value of 257 characters is longer than the limit of 256',
    ),
    ({"matchExpressions": {"key": "env"}}, "matchExpressions: must be a list of requirements, not dict"),
    ({"matchExpressions": ["env"]}, "matchExpressions[0]: must be a mapping with key, operator and values, not str"),
    (
        {"matchExpressions": [{"key": "a", "operator": "Exists"}, {"key": "b", "operator": "Foo"}]},
        'matchExpressions[1]: operator "Foo" is not one of In, NotIn, Exists, DoesNotExist',
    ),
    (
        {"matchExpressions": [{"key": "a", "operator": "in", "values": ["x"]}]},
        'matchExpressions[0]: operator "in" is not one of In, NotIn, Exists, DoesNotExist',
    ),
    (
        {"matchExpressions": [{"key": "a", "operator": "In"}]},
        "matchExpressions[0]: operator In needs at least one value",
    ),
    (
        {"matchExpressions": [{"key": "a", "operator": "NotIn", "values": []}]},
        "matchExpressions[0]: operator NotIn needs at least one value",
    ),
    (
        {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]},
        "matchExpressions[0]: operator Exists takes no values",
    ),
    (
        {"matchExpressions": [{"key": "a", "operator": "DoesNotExist", "values": ["x"]}]},
        "matchExpressions[0]: operator DoesNotExist takes no values",
    ),
    (
        {"matchExpressions": [{"key": "a", "operator": "In", "values": ["x", 2]}]},
        "matchExpressions[0].values[1]: value 2 must be a string, not int",
    ),
    (
        {"matchExpressions": [{"key": "a", "operator": "In", "values": "x,y"}]},
        "matchExpressions[0]: values must be a list of strings, not str",
    ),
    ({"matchExpressions": [{"operator": "Exists"}]}, "matchExpressions[0]: key is missing"),
    ({"matchExpressions": [{"key": "a"}]}, "matchExpressions[0]: operator is missing"),
    (
        {"matchExpressions": [{"key": "a", "operator": "Exists", "value": "x"}]},
        'matchExpressions[0]: unknown field "value"; a requirement has key, operator and values',
    ),
    (
        {"matchExpressions": [{"key": "a b", "operator": "Exists"}]},
        'matchExpressions[0]: key "a b" contains " ", which label keys may not contain',
    ),
    (
        {"matchExpressions": [{"key": 7, "operator": "Exists"}]},
        "matchExpressions[0]: key 7 must be a string, not int",
    ),
    (
        {"matchExpressions": [{"key": LONG, "operator": "Exists"}]},
        "matchExpressions[0]: key of 257 characters is longer than the limit of 256",
    ),
    # The short form
    ("tier in (", '"tier in (": unclosed parenthesis'),
    ("env=prod,tier in (edge,core", '"tier in (edge,core": unclosed parenthesis'),
    ("env=prod,", '"env=prod,": dangling comma'),
    (",env=prod", '",env=prod": empty requirement before the comma at position 0'),
    ("env=prod,,tier=edge", '"env=prod,,tier=edge": empty requirement before the comma at position 9'),
    ("tier in ()", '"tier in ()": operator In needs at least one value'),
    ("tier notin ()", '"tier notin ()": operator NotIn needs at least one value'),
    ("tier in (edge,)", '"tier in (edge,)": empty value in the value list'),
    ("tier in ((edge))", '"tier in ((edge))": expected a value, found "(edge))"'),
    ("tier in (edge core)", '"tier in (edge core)": expected "," or ")" in the value list, found "core)"'),
    ("tier in edge", '"tier in edge": expected "(" after "in", found "edge"'),
    (
        "tier IN (edge)",
        '"tier IN (edge)": expected "=", "==", "!=", "in" or "notin" after key "tier", found "IN (edge)"',
    ),
    ("tier > 3", '"tier > 3": expected "=", "==", "!=", "in" or "notin" after key "tier", found "> 3"'),
    ("=prod", '"=prod": expected a label key, found "=prod"'),
    ("!", '"!": expected a label key, found the end'),
    ("env=prod x", '"env=prod x": unexpected "x" after the requirement'),
    ("!env=prod", '"!env=prod": unexpected "=prod" after the requirement'),
    ('env="prod', '"env=\\"prod": unterminated quoted value'),
    ("a__b=x", '"a__b=x": key "a__b" contains "__", which label keys may not contain'),
    ("42=x", '"42=x": key "42" is a number, which label keys may not be'),
    ("env=prod,env=dev", '"env=dev": label "env" cannot equal both "prod" and "dev"'),
    (f"{LONG}=x", f'"{LONG}=x": key of 257 characters is longer than the limit of 256'),
]


@pytest.mark.parametrize(("data", "message"), PARSE_ERRORS, ids=[message[:80] for _, message in PARSE_ERRORS])
def test_a_bad_selector_is_rejected_with_a_message_naming_the_problem_and_where(data: Any, message: str) -> None:
    with pytest.raises(SelectorError) as raised:
        parse_selector(data)

    assert str(raised.value) == message


def test_selector_error_is_a_value_error() -> None:
    assert issubclass(SelectorError, ValueError)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Requirement(key="env", operator=Operator.IN), "requirement: operator In needs at least one value"),
        (
            lambda: Requirement(key="env", operator="Near", values=("x",)),  # type: ignore[arg-type]
            'requirement: operator "Near" is not one of In, NotIn, Exists, DoesNotExist',
        ),
        (
            lambda: Requirement(key="a__b", operator=Operator.EXISTS),
            'requirement: key "a__b" contains "__", which label keys may not contain',
        ),
        (lambda: LabelSelector(match_labels={"env": 1}), 'matchLabels["env"]: value 1 must be a string, not int'),  # type: ignore[dict-item]
    ],
)
def test_a_selector_built_directly_is_validated_too(build: Any, message: str) -> None:
    with pytest.raises(SelectorError) as raised:
        build()

    assert str(raised.value) == message


def test_a_requirement_built_from_an_operator_name_holds_the_operator() -> None:
    requirement = Requirement(key="env", operator="NotIn", values=("b", "a", "b"))  # type: ignore[arg-type]

    assert requirement.operator is Operator.NOT_IN
    assert requirement.values == ("a", "b")


# Properties over random selectors and labels. Small pools of keys and values make label
# dicts and requirements collide often, so every operator is exercised on both outcomes.

SMALL_KEYS = st.sampled_from(["env", "tier", "service.name", "app.kubernetes.io/name"])
SMALL_VALUES = st.sampled_from(["prod", "edge", "", "a b"])
# Values that stress the short form: its syntax characters, quotes, backslashes, whitespace.
AWKWARD_VALUES = st.text(alphabet=st.sampled_from(list('ab ,()=!"\\\t{}é')), max_size=6)


def _is_valid_key(key: str) -> bool:
    try:
        Requirement(key=key, operator=Operator.EXISTS)
    except SelectorError:
        return False
    return True


ANY_KEYS = st.text(alphabet=st.sampled_from(list("ab1._-/:{}é")), min_size=1, max_size=8).filter(_is_valid_key)


def selectors(keys: st.SearchStrategy[str], values: st.SearchStrategy[str]) -> st.SearchStrategy[LabelSelector]:
    with_values = st.builds(
        Requirement,
        key=keys,
        operator=st.sampled_from([Operator.IN, Operator.NOT_IN]),
        values=st.lists(values, min_size=1, max_size=3).map(tuple),
    )
    without_values = st.builds(
        Requirement, key=keys, operator=st.sampled_from([Operator.EXISTS, Operator.DOES_NOT_EXIST])
    )
    return st.builds(
        LabelSelector,
        match_labels=st.dictionaries(keys, values, max_size=3),
        match_expressions=st.lists(st.one_of(with_values, without_values), max_size=4).map(tuple),
    )


def matching_by_set_algebra(selector: LabelSelector, population: list[dict[str, str]]) -> set[int]:
    """Which label dicts match, computed a second way: one set per requirement, intersected."""
    everyone = set(range(len(population)))

    def having(key: str, allowed: set[str] | None = None) -> set[int]:
        return {
            index
            for index, labels in enumerate(population)
            if key in labels and (allowed is None or labels[key] in allowed)
        }

    chosen = set(everyone)
    data = selector.to_dict()
    for key, value in data.get("matchLabels", {}).items():
        chosen &= having(key, {value})
    for expression in data.get("matchExpressions", []):
        key, values = expression["key"], set(expression.get("values", []))
        chosen &= {
            "In": having(key, values),
            "NotIn": everyone - having(key, values),
            "Exists": having(key),
            "DoesNotExist": everyone - having(key),
        }[expression["operator"]]
    return chosen


@given(
    selector=selectors(SMALL_KEYS, SMALL_VALUES),
    population=st.lists(st.dictionaries(SMALL_KEYS, SMALL_VALUES, max_size=4), max_size=8),
)
def test_matches_agrees_with_a_set_algebra_reference(selector: LabelSelector, population: list[dict[str, str]]) -> None:
    matched = {index for index, labels in enumerate(population) if selector.matches(labels)}

    assert matched == matching_by_set_algebra(selector, population)


@given(selector=selectors(ANY_KEYS, AWKWARD_VALUES))
def test_any_selector_survives_the_string_and_the_dict_round_trip(selector: LabelSelector) -> None:
    assert parse_selector(selector.to_string()) == selector
    assert parse_selector(selector.to_dict()) == selector
    assert parse_selector(json.loads(json.dumps(selector.to_dict()))) == selector
