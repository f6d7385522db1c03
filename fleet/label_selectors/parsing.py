"""Reading a label selector from its dict form (as stored and sent over the API) or its short
string form (as operators write it): `parse_selector`, with errors that name the problem and
where it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fleet.label_selectors.selector import (
    ERR_REQUIREMENT_TYPE,
    MATCH_EVERYTHING,
    SYNTAX_CHARACTERS,
    LabelSelector,
    Operator,
    Requirement,
    SelectorError,
    check_key,
    check_operator,
    check_value,
    check_values,
    shown,
)

# Every message starts with where the problem is: a dict-form path such as
# `matchExpressions[1]`, or the offending requirement of the short form in quotes.
ERR_SELECTOR_TYPE = "a selector must be a mapping, a string or None, not {type}"
ERR_UNKNOWN_FIELD = "unknown field {field}; a selector has matchLabels and matchExpressions"
ERR_BOTH_SPELLINGS = "{camel} and {snake} are the same field; give only one"
ERR_MATCH_LABELS_TYPE = "{where}: must be a mapping of label keys to values, not {type}"
ERR_MATCH_EXPRESSIONS_TYPE = "{where}: must be a list of requirements, not {type}"
ERR_REQUIREMENT_FIELD = "{where}: unknown field {field}; a requirement has key, operator and values"
ERR_MISSING_FIELD = "{where}: {field} is missing"
ERR_VALUES_TYPE = "{where}: values must be a list of strings, not {type}"
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
            raise SelectorError(ERR_UNKNOWN_FIELD.format(field=shown(name)))
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
    return {check_key(key, name): check_value(value, f"{name}[{shown(key)}]") for key, value in raw.items()}


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
            raise SelectorError(ERR_REQUIREMENT_FIELD.format(where=where, field=shown(name)))
    for name in ("key", "operator"):
        if name not in item:
            raise SelectorError(ERR_MISSING_FIELD.format(where=where, field=name))
    key = check_key(item["key"], where)
    operator = check_operator(item["operator"], where)
    raw_values = item.get("values")
    if raw_values is None:
        raw_values = ()
    if not _is_list(raw_values):
        raise SelectorError(ERR_VALUES_TYPE.format(where=where, type=type(raw_values).__name__))
    values = check_values(operator, raw_values, where, indexed=True)
    return Requirement(key=key, operator=operator, values=values)


# The short string form


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
                raise SelectorError(ERR_DANGLING_COMMA.format(where=shown(text)))
            raise SelectorError(ERR_EMPTY_REQUIREMENT.format(where=shown(text), position=start + len(piece)))
        parsed = _RequirementParser(piece).parse()
        if isinstance(parsed, Requirement):
            expressions.append(parsed)
            continue
        key, value = parsed
        if key in labels and labels[key] != value:
            raise SelectorError(
                ERR_CONFLICTING_LABEL.format(
                    where=shown(piece.strip()), key=shown(key), first=shown(labels[key]), second=shown(value)
                )
            )
        labels[key] = value
    return LabelSelector(match_labels=labels, match_expressions=tuple(expressions))


class _RequirementParser:
    """Parses one requirement of the short form; errors name the requirement's text."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.position = 0
        self.where = shown(text.strip())

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
            raise SelectorError(ERR_EXPECTED_OPERATOR.format(where=self.where, key=shown(key), found=self._found()))
        self.position += len(word)
        operator = Operator.IN if word == "in" else Operator.NOT_IN
        values = self._value_list(word)
        self._expect_end()
        checked = check_values(operator, values, self.where, indexed=False)
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
        return shown(rest) if rest else _END

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
        return check_key(key, self.where)

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
        return check_value(value, self.where)

    def _value_list(self, word: str) -> list[str]:
        self._skip_whitespace()
        if self._peek() != "(":
            raise SelectorError(
                ERR_EXPECTED_OPEN_PARENTHESIS.format(where=self.where, operator=shown(word), found=self._found())
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
            values.append(check_value(value, self.where))
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
