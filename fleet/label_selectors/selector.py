"""A label selector and its requirements: the key and value rules they enforce, matching a
set of labels, and the canonical dict and short string forms they write. Built by
`fleet.label_selectors.parsing.parse_selector` from either input form.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleet.errors import InputProblems
from fleet.labels import MAX_LABEL_KEY_CHARS, MAX_LABEL_VALUE_CHARS

# Characters the short form uses as syntax. Keys may not contain them (nor whitespace), so
# every valid selector can be written in the short form; values containing them are quoted.
SYNTAX_CHARACTERS = ',()=!"'

# Every message starts with where the problem is: a dict-form path such as
# `matchExpressions[1]`, or the offending requirement of the short form in quotes.
ERR_REQUIREMENT_TYPE = "{where}: must be a mapping with key, operator and values, not {type}"
ERR_KEY_TYPE = "{where}: key {key} must be a string, not {type}"
ERR_KEY_EMPTY = "{where}: key is empty"
ERR_KEY_TOO_LONG = "{where}: key of {length} characters is longer than the limit of " + str(MAX_LABEL_KEY_CHARS)
ERR_KEY_DOUBLE_UNDERSCORE = '{where}: key {key} contains "__", which label keys may not contain'
ERR_KEY_CHARACTER = "{where}: key {key} contains {char}, which label keys may not contain"
# Django's JSON key lookups read a key that int() accepts as an array index, so such a key
# could never be selected on SQLite; rejecting it keeps both evaluations identical.
ERR_KEY_NUMBER = "{where}: key {key} is a number, which label keys may not be"
ERR_UNKNOWN_OPERATOR = "{where}: operator {operator} is not one of In, NotIn, Exists, DoesNotExist"
ERR_VALUES_REQUIRED = "{where}: operator {operator} needs at least one value"
ERR_VALUES_FORBIDDEN = "{where}: operator {operator} takes no values"
ERR_VALUE_TYPE = "{where}: value {value} must be a string, not {type}"
ERR_VALUE_TOO_LONG = "{where}: value of {length} characters is longer than the limit of " + str(MAX_LABEL_VALUE_CHARS)


class SelectorError(InputProblems):
    """A selector that is malformed or invalid; the message names the problem and where it is."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="selector")


class Operator(enum.StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


_OPERATORS_WITH_VALUES = frozenset({Operator.IN, Operator.NOT_IN})


def shown(value: Any) -> str:
    """A value as it appears in a message: strings in double quotes, other values by repr."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def check_key(key: Any, where: str) -> str:
    if not isinstance(key, str):
        raise SelectorError(ERR_KEY_TYPE.format(where=where, key=shown(key), type=type(key).__name__))
    if not key:
        raise SelectorError(ERR_KEY_EMPTY.format(where=where))
    if len(key) > MAX_LABEL_KEY_CHARS:
        raise SelectorError(ERR_KEY_TOO_LONG.format(where=where, length=len(key)))
    # "__" separates parts of a Django lookup path, so such a key cannot be queried.
    if "__" in key:
        raise SelectorError(ERR_KEY_DOUBLE_UNDERSCORE.format(where=where, key=shown(key)))
    for char in key:
        if char.isspace() or char in SYNTAX_CHARACTERS:
            raise SelectorError(ERR_KEY_CHARACTER.format(where=where, key=shown(key), char=shown(char)))
    try:
        int(key)
    except ValueError:
        return key
    raise SelectorError(ERR_KEY_NUMBER.format(where=where, key=shown(key)))


def check_label(key: Any, value: Any, *, where: str = "label") -> tuple[str, str]:
    """A label an operator sets must be one a selector can select: same key and value rules."""
    return check_key(key, where), check_value(value, f"{where} {key!r}")


def check_value(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise SelectorError(ERR_VALUE_TYPE.format(where=where, value=shown(value), type=type(value).__name__))
    if len(value) > MAX_LABEL_VALUE_CHARS:
        raise SelectorError(ERR_VALUE_TOO_LONG.format(where=where, length=len(value)))
    return value


def check_operator(operator: Any, where: str) -> Operator:
    try:
        return Operator(operator)
    except ValueError:
        raise SelectorError(ERR_UNKNOWN_OPERATOR.format(where=where, operator=shown(operator))) from None


def check_values(operator: Operator, values: Sequence[Any], where: str, *, indexed: bool) -> tuple[str, ...]:
    """The values, sorted and unique; with `indexed`, a bad value is located as `where.values[i]`."""
    if operator in _OPERATORS_WITH_VALUES and not values:
        raise SelectorError(ERR_VALUES_REQUIRED.format(where=where, operator=operator.value))
    if operator not in _OPERATORS_WITH_VALUES and values:
        raise SelectorError(ERR_VALUES_FORBIDDEN.format(where=where, operator=operator.value))
    checked = [
        check_value(value, f"{where}.values[{index}]" if indexed else where) for index, value in enumerate(values)
    ]
    # Values are a set: sorted and without repeats, so equal requirements compare equal.
    return tuple(sorted(set(checked)))


@dataclass(frozen=True)
class Requirement:
    """One match expression: `key` compared by `operator` with `values` (sorted, unique)."""

    key: str
    operator: Operator
    values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        where = "requirement"
        check_key(self.key, where)
        operator = check_operator(self.operator, where)
        values = check_values(operator, tuple(self.values), where, indexed=True)
        object.__setattr__(self, "operator", operator)
        object.__setattr__(self, "values", values)

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator is Operator.IN:
            return self.key in labels and labels[self.key] in self.values
        if self.operator is Operator.NOT_IN:
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator is Operator.EXISTS:
            return self.key in labels
        return self.key not in labels

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"key": self.key, "operator": self.operator.value}
        if self.values:
            data["values"] = list(self.values)
        return data

    def to_string(self) -> str:
        if self.operator is Operator.EXISTS:
            return self.key
        if self.operator is Operator.DOES_NOT_EXIST:
            return "!" + self.key
        word = "in" if self.operator is Operator.IN else "notin"
        return f"{self.key} {word} ({','.join(_format_value(value) for value in self.values)})"

    def _sort_key(self) -> tuple[str, str, tuple[str, ...]]:
        return (self.key, self.operator.value, self.values)


@dataclass(frozen=True)
class LabelSelector:
    """The AND of `match_labels` (exact key=value) and `match_expressions`.

    Stored canonically (labels sorted by key, requirements sorted and unique), so two
    selectors that say the same thing in a different order are equal and hash alike.
    `match_labels` is a private copy; treat it as read-only.
    """

    match_labels: dict[str, str] = field(default_factory=dict)
    match_expressions: tuple[Requirement, ...] = ()

    def __post_init__(self) -> None:
        labels: dict[str, str] = {}
        for key, value in self.match_labels.items():
            labels[check_key(key, "matchLabels")] = check_value(value, f"matchLabels[{shown(key)}]")
        expressions = tuple(self.match_expressions)
        for index, requirement in enumerate(expressions):
            if not isinstance(requirement, Requirement):
                raise SelectorError(
                    ERR_REQUIREMENT_TYPE.format(where=f"matchExpressions[{index}]", type=type(requirement).__name__)
                )
        object.__setattr__(self, "match_labels", dict(sorted(labels.items())))
        object.__setattr__(self, "match_expressions", tuple(sorted(set(expressions), key=Requirement._sort_key)))

    # A dict field would make the generated hash fail; hash the canonical content instead.
    def __hash__(self) -> int:
        return hash((tuple(self.match_labels.items()), self.match_expressions))

    @property
    def is_empty(self) -> bool:
        return not self.match_labels and not self.match_expressions

    def matches(self, labels: Mapping[str, str]) -> bool:
        for key, value in self.match_labels.items():
            if key not in labels or labels[key] != value:
                return False
        return all(requirement.matches(labels) for requirement in self.match_expressions)

    def to_dict(self) -> dict[str, Any]:
        """The canonical dict form (empty parts left out, as Kubernetes does): for storage and APIs."""
        data: dict[str, Any] = {}
        if self.match_labels:
            data["matchLabels"] = dict(self.match_labels)
        if self.match_expressions:
            data["matchExpressions"] = [requirement.to_dict() for requirement in self.match_expressions]
        return data

    def to_string(self) -> str:
        """The canonical short form; the empty selector is the empty string."""
        parts = [f"{key}={_format_value(value)}" for key, value in self.match_labels.items()]
        parts.extend(requirement.to_string() for requirement in self.match_expressions)
        return ",".join(parts)

    def __str__(self) -> str:
        return self.to_string()


MATCH_EVERYTHING = LabelSelector()


# Values in the short string form


def _needs_quotes(value: str) -> bool:
    return not value or any(char.isspace() or char in SYNTAX_CHARACTERS for char in value)


def _format_value(value: str) -> str:
    if not _needs_quotes(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
