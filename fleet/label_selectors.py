"""Label selectors with Kubernetes semantics: parsing, validation, matching and canonical forms.

A selector is the AND of its `matchLabels` (each key present with exactly that value) and
its `matchExpressions` (In, NotIn, Exists, DoesNotExist). NotIn also matches labels without
the key; an empty selector matches everything.

Two input forms are accepted:
- the dict form `{"matchLabels": {...}, "matchExpressions": [{"key", "operator", "values"}]}`
  (snake_case `match_labels` / `match_expressions` too), as stored and sent over the API;
- the short string form `env=prod,tier in (edge,core),!legacy`, with `key==value`,
  `key!=value` (NotIn with one value), `key notin (a,b)`, `key` (Exists) and `!key`
  (DoesNotExist). Label values can hold any text, so a value that is empty or contains
  whitespace or one of `,()=!"` is written in double quotes, with `\\` escaping `"` and `\\`.

Pure Python: the database form of a selector is in `fleet.selector_queries`.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleet.errors import InputProblems
from fleet.labels import MAX_LABEL_KEY_CHARS, MAX_LABEL_VALUE_CHARS

__all__ = [
    "MATCH_EVERYTHING",
    "LabelSelector",
    "Operator",
    "Requirement",
    "SelectorError",
    "parse_selector",
]

# Characters the short form uses as syntax. Keys may not contain them (nor whitespace), so
# every valid selector can be written in the short form; values containing them are quoted.
SYNTAX_CHARACTERS = ',()=!"'

# Every message starts with where the problem is: a dict-form path such as
# `matchExpressions[1]`, or the offending requirement of the short form in quotes.
ERR_SELECTOR_TYPE = "a selector must be a mapping, a string or None, not {type}"
ERR_UNKNOWN_FIELD = "unknown field {field}; a selector has matchLabels and matchExpressions"
ERR_BOTH_SPELLINGS = "{camel} and {snake} are the same field; give only one"
ERR_MATCH_LABELS_TYPE = "{where}: must be a mapping of label keys to values, not {type}"
ERR_MATCH_EXPRESSIONS_TYPE = "{where}: must be a list of requirements, not {type}"
ERR_REQUIREMENT_TYPE = "{where}: must be a mapping with key, operator and values, not {type}"
ERR_REQUIREMENT_FIELD = "{where}: unknown field {field}; a requirement has key, operator and values"
ERR_MISSING_FIELD = "{where}: {field} is missing"
ERR_VALUES_TYPE = "{where}: values must be a list of strings, not {type}"
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
ERR_CONFLICTING_LABEL = "{where}: label {key} cannot equal both {first} and {second}"
ERR_DANGLING_COMMA = "{where}: dangling comma"
ERR_EMPTY_REQUIREMENT = "{where}: empty requirement before the comma at position {position}"
ERR_MISSING_KEY = "{where}: expected a label key, found {found}"
ERR_EXPECTED_OPERATOR = '{where}: expected "=", "==", "!=", "in" or "notin" after key {key}, found {found}'
ERR_EXPECTED_OPEN_PARENTHESIS = '{where}: expected "(" after {operator}, found {found}'
ERR_EXPECTED_LIST_SEPARATOR = '{where}: expected "," or ")" in the value list, found {found}'
ERR_EMPTY_LIST_VALUE = "{where}: empty value in the value list"
ERR_EXPECTED_VALUE = "{where}: expected a value, found {found}"
ERR_UNCLOSED_PARENTHESIS = "{where}: unclosed parenthesis"
ERR_UNTERMINATED_QUOTE = "{where}: unterminated quoted value"
ERR_TRAILING_TEXT = "{where}: unexpected {found} after the requirement"

_END = "the end"


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


def _show(value: Any) -> str:
    """A value as it appears in a message: strings in double quotes, other values by repr."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _check_key(key: Any, where: str) -> str:
    if not isinstance(key, str):
        raise SelectorError(ERR_KEY_TYPE.format(where=where, key=_show(key), type=type(key).__name__))
    if not key:
        raise SelectorError(ERR_KEY_EMPTY.format(where=where))
    if len(key) > MAX_LABEL_KEY_CHARS:
        raise SelectorError(ERR_KEY_TOO_LONG.format(where=where, length=len(key)))
    # "__" separates parts of a Django lookup path, so such a key cannot be queried.
    if "__" in key:
        raise SelectorError(ERR_KEY_DOUBLE_UNDERSCORE.format(where=where, key=_show(key)))
    for char in key:
        if char.isspace() or char in SYNTAX_CHARACTERS:
            raise SelectorError(ERR_KEY_CHARACTER.format(where=where, key=_show(key), char=_show(char)))
    try:
        int(key)
    except ValueError:
        return key
    raise SelectorError(ERR_KEY_NUMBER.format(where=where, key=_show(key)))


def check_label(key: Any, value: Any, *, where: str = "label") -> tuple[str, str]:
    """A label an operator sets must be one a selector can select: same key and value rules."""
    return _check_key(key, where), _check_value(value, f"{where} {key!r}")


def _check_value(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise SelectorError(ERR_VALUE_TYPE.format(where=where, value=_show(value), type=type(value).__name__))
    if len(value) > MAX_LABEL_VALUE_CHARS:
        raise SelectorError(ERR_VALUE_TOO_LONG.format(where=where, length=len(value)))
    return value


def _check_operator(operator: Any, where: str) -> Operator:
    try:
        return Operator(operator)
    except ValueError:
        raise SelectorError(ERR_UNKNOWN_OPERATOR.format(where=where, operator=_show(operator))) from None


def _check_values(operator: Operator, values: Sequence[Any], where: str, *, indexed: bool) -> tuple[str, ...]:
    """The values, sorted and unique; with `indexed`, a bad value is located as `where.values[i]`."""
    if operator in _OPERATORS_WITH_VALUES and not values:
        raise SelectorError(ERR_VALUES_REQUIRED.format(where=where, operator=operator.value))
    if operator not in _OPERATORS_WITH_VALUES and values:
        raise SelectorError(ERR_VALUES_FORBIDDEN.format(where=where, operator=operator.value))
    checked = [
        _check_value(value, f"{where}.values[{index}]" if indexed else where) for index, value in enumerate(values)
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
        _check_key(self.key, where)
        operator = _check_operator(self.operator, where)
        values = _check_values(operator, tuple(self.values), where, indexed=True)
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
            labels[_check_key(key, "matchLabels")] = _check_value(value, f"matchLabels[{_show(key)}]")
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


def parse_selector(data: Mapping[str, Any] | str | LabelSelector | None) -> LabelSelector:
    """A validated selector from its dict form, its short string form, or None (matches everything).

    Raises SelectorError naming the problem and where it is.
    """
    if data is None:
        return MATCH_EVERYTHING
    if isinstance(data, LabelSelector):
        return data
    if isinstance(data, str):
        return _parse_string(data)
    if isinstance(data, Mapping):
        return _parse_mapping(data)
    raise SelectorError(ERR_SELECTOR_TYPE.format(type=type(data).__name__))


# The dict form


_FIELDS = {"matchLabels": "match_labels", "matchExpressions": "match_expressions"}
_SNAKE_TO_CAMEL = {snake: camel for camel, snake in _FIELDS.items()}
_REQUIREMENT_FIELDS = ("key", "operator", "values")


def _parse_mapping(data: Mapping[str, Any]) -> LabelSelector:
    given: dict[str, tuple[str, Any]] = {}
    for name, value in data.items():
        camel = name if name in _FIELDS else _SNAKE_TO_CAMEL.get(name)
        if camel is None:
            raise SelectorError(ERR_UNKNOWN_FIELD.format(field=_show(name)))
        if camel in given:
            raise SelectorError(ERR_BOTH_SPELLINGS.format(camel=camel, snake=_FIELDS[camel]))
        given[camel] = (name, value)

    labels: dict[str, str] = {}
    if "matchLabels" in given:
        name, raw_labels = given["matchLabels"]
        labels = _parse_match_labels(raw_labels, name)
    expressions: list[Requirement] = []
    if "matchExpressions" in given:
        name, raw_expressions = given["matchExpressions"]
        expressions = _parse_match_expressions(raw_expressions, name)
    return LabelSelector(match_labels=labels, match_expressions=tuple(expressions))


def _parse_match_labels(raw: Any, name: str) -> dict[str, str]:
    # null is how a JSON client spells "no labels".
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise SelectorError(ERR_MATCH_LABELS_TYPE.format(where=name, type=type(raw).__name__))
    return {_check_key(key, name): _check_value(value, f"{name}[{_show(key)}]") for key, value in raw.items()}


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def _parse_match_expressions(raw: Any, name: str) -> list[Requirement]:
    if raw is None:
        return []
    if not _is_list(raw):
        raise SelectorError(ERR_MATCH_EXPRESSIONS_TYPE.format(where=name, type=type(raw).__name__))
    return [_parse_requirement_mapping(item, f"{name}[{index}]") for index, item in enumerate(raw)]


def _parse_requirement_mapping(item: Any, where: str) -> Requirement:
    if not isinstance(item, Mapping):
        raise SelectorError(ERR_REQUIREMENT_TYPE.format(where=where, type=type(item).__name__))
    for name in item:
        if name not in _REQUIREMENT_FIELDS:
            raise SelectorError(ERR_REQUIREMENT_FIELD.format(where=where, field=_show(name)))
    for name in ("key", "operator"):
        if name not in item:
            raise SelectorError(ERR_MISSING_FIELD.format(where=where, field=name))
    key = _check_key(item["key"], where)
    operator = _check_operator(item["operator"], where)
    raw_values = item.get("values")
    if raw_values is None:
        raw_values = ()
    if not _is_list(raw_values):
        raise SelectorError(ERR_VALUES_TYPE.format(where=where, type=type(raw_values).__name__))
    values = _check_values(operator, raw_values, where, indexed=True)
    return Requirement(key=key, operator=operator, values=values)


# The short string form


def _needs_quotes(value: str) -> bool:
    return not value or any(char.isspace() or char in SYNTAX_CHARACTERS for char in value)


def _format_value(value: str) -> str:
    if not _needs_quotes(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _split_requirements(text: str) -> list[tuple[int, str]]:
    """(start offset, text) of each comma-separated requirement.

    Commas inside parentheses or quotes belong to a value list or a value, not between
    requirements. An unclosed parenthesis or quote keeps the rest of the text in one piece,
    which the requirement parser then reports.
    """
    pieces: list[tuple[int, str]] = []
    start = depth = 0
    quoted = escaped = False
    for index, char in enumerate(text):
        if quoted:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            pieces.append((start, text[start:index]))
            start = index + 1
    pieces.append((start, text[start:]))
    return pieces


def _parse_string(text: str) -> LabelSelector:
    if not text.strip():
        return MATCH_EVERYTHING
    pieces = _split_requirements(text)
    labels: dict[str, str] = {}
    expressions: list[Requirement] = []
    for number, (start, piece) in enumerate(pieces):
        if not piece.strip():
            if number == len(pieces) - 1:
                raise SelectorError(ERR_DANGLING_COMMA.format(where=_show(text)))
            raise SelectorError(ERR_EMPTY_REQUIREMENT.format(where=_show(text), position=start + len(piece)))
        parsed = _RequirementParser(piece).parse()
        if isinstance(parsed, Requirement):
            expressions.append(parsed)
            continue
        key, value = parsed
        if key in labels and labels[key] != value:
            raise SelectorError(
                ERR_CONFLICTING_LABEL.format(
                    where=_show(piece.strip()), key=_show(key), first=_show(labels[key]), second=_show(value)
                )
            )
        labels[key] = value
    return LabelSelector(match_labels=labels, match_expressions=tuple(expressions))


class _RequirementParser:
    """Parses one requirement of the short form; errors name the requirement's text."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.position = 0
        self.where = _show(text.strip())

    def parse(self) -> Requirement | tuple[str, str]:
        """A Requirement, or (key, value) for an equality that belongs in matchLabels."""
        self._skip_whitespace()
        if self._peek() == "!" and not self._peek_is("!="):
            self.position += 1
            key = self._key()
            self._expect_end()
            return Requirement(key=key, operator=Operator.DOES_NOT_EXIST)
        key = self._key()
        self._skip_whitespace()
        if self._at_end():
            return Requirement(key=key, operator=Operator.EXISTS)
        if self._peek_is("==") or self._peek_is("="):
            self.position += 2 if self._peek_is("==") else 1
            value = self._single_value()
            self._expect_end()
            return key, value
        if self._peek_is("!="):
            self.position += 2
            value = self._single_value()
            self._expect_end()
            return Requirement(key=key, operator=Operator.NOT_IN, values=(value,))
        word = self._word()
        if word not in ("in", "notin"):
            raise SelectorError(ERR_EXPECTED_OPERATOR.format(where=self.where, key=_show(key), found=self._found()))
        self.position += len(word)
        operator = Operator.IN if word == "in" else Operator.NOT_IN
        values = self._value_list(word)
        self._expect_end()
        checked = _check_values(operator, values, self.where, indexed=False)
        return Requirement(key=key, operator=operator, values=checked)

    def _at_end(self) -> bool:
        return self.position >= len(self.text)

    def _peek(self) -> str:
        return self.text[self.position : self.position + 1]

    def _peek_is(self, token: str) -> bool:
        return self.text.startswith(token, self.position)

    def _skip_whitespace(self) -> None:
        while not self._at_end() and self.text[self.position].isspace():
            self.position += 1

    def _found(self) -> str:
        rest = self.text[self.position :].strip()
        return _show(rest) if rest else _END

    def _bare(self) -> str:
        start = self.position
        while not self._at_end():
            char = self.text[self.position]
            if char.isspace() or char in SYNTAX_CHARACTERS:
                break
            self.position += 1
        return self.text[start : self.position]

    def _word(self) -> str:
        start = self.position
        word = self._bare()
        self.position = start
        return word

    def _key(self) -> str:
        self._skip_whitespace()
        key = self._bare()
        if not key:
            raise SelectorError(ERR_MISSING_KEY.format(where=self.where, found=self._found()))
        return _check_key(key, self.where)

    def _quoted(self) -> str:
        # Called on the opening quote; a backslash takes the next character literally.
        index = self.position + 1
        chars: list[str] = []
        while index < len(self.text):
            char = self.text[index]
            if char == "\\" and index + 1 < len(self.text):
                chars.append(self.text[index + 1])
                index += 2
                continue
            if char == '"':
                self.position = index + 1
                return "".join(chars)
            chars.append(char)
            index += 1
        raise SelectorError(ERR_UNTERMINATED_QUOTE.format(where=self.where))

    def _single_value(self) -> str:
        # `key=` is a valid requirement for an empty value, as in Kubernetes.
        self._skip_whitespace()
        value = self._quoted() if self._peek() == '"' else self._bare()
        return _check_value(value, self.where)

    def _value_list(self, word: str) -> list[str]:
        self._skip_whitespace()
        if self._peek() != "(":
            raise SelectorError(
                ERR_EXPECTED_OPEN_PARENTHESIS.format(where=self.where, operator=_show(word), found=self._found())
            )
        self.position += 1
        self._skip_whitespace()
        if self._peek() == ")":
            self.position += 1
            return []
        values: list[str] = []
        while True:
            self._skip_whitespace()
            if self._at_end():
                raise SelectorError(ERR_UNCLOSED_PARENTHESIS.format(where=self.where))
            if self._peek() == '"':
                value = self._quoted()
            else:
                value = self._bare()
                if not value and self._peek() in (",", ")"):
                    raise SelectorError(ERR_EMPTY_LIST_VALUE.format(where=self.where))
                if not value:
                    raise SelectorError(ERR_EXPECTED_VALUE.format(where=self.where, found=self._found()))
            values.append(_check_value(value, self.where))
            self._skip_whitespace()
            if self._at_end():
                raise SelectorError(ERR_UNCLOSED_PARENTHESIS.format(where=self.where))
            if self._peek() == ")":
                self.position += 1
                return values
            if self._peek() != ",":
                raise SelectorError(ERR_EXPECTED_LIST_SEPARATOR.format(where=self.where, found=self._found()))
            self.position += 1

    def _expect_end(self) -> None:
        self._skip_whitespace()
        if not self._at_end():
            raise SelectorError(ERR_TRAILING_TEXT.format(where=self.where, found=self._found()))
