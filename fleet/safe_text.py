"""The one rule for text that reaches the database: no NUL, no lone surrogates.

PostgreSQL refuses U+0000 in `text` and in `jsonb` strings (a DataError), and a lone
surrogate (U+D800-U+DFFF, which JSON's `\\ud800` escapes can produce) cannot be encoded as
UTF-8 at all. Either one in a row made the whole statement fail; in a batched write, the
whole batch. So every string from outside is made safe where it enters:

- what agents report (fleet.reports) is *replaced*: each unsafe character becomes U+FFFD,
  then the string is length-capped; the agent is still served and its report stored.
- what operators send through the API (fleet.api.strict_input) is *refused*: HTTP 400
  naming the field, nothing stored.

Pure: no Django, so the agent-facing and the operator-facing sides share it.
"""

from __future__ import annotations

import re
from typing import Any

REPLACEMENT = "\ufffd"
UNSAFE_TEXT = re.compile("[\x00\ud800-\udfff]")

NUL_PROBLEM = "must not contain the NUL character (U+0000)"
SURROGATE_PROBLEM = "must not contain a lone surrogate (U+D800 to U+DFFF)"


def text_problem(text: str) -> str | None:
    """Why `text` cannot be stored, or None when it can."""
    found = UNSAFE_TEXT.search(text)
    if found is None:
        return None
    return NUL_PROBLEM if found.group() == "\x00" else SURROGATE_PROBLEM


def safe_text(text: str) -> str:
    """`text` with every NUL and lone surrogate replaced by U+FFFD (the replacement character)."""
    return UNSAFE_TEXT.sub(REPLACEMENT, text)


def first_unsafe(value: Any, path: str = "") -> tuple[str, str] | None:
    """The first string (a key or a value) in a JSON-like document that breaks the rule:
    (its path, e.g. `labels.env` or `files[0]`, and the problem); None when all are safe."""
    if isinstance(value, str):
        problem = text_problem(value)
        return (path, problem) if problem else None
    if isinstance(value, dict):
        for key, item in value.items():
            name = str(key)
            child = f"{path}.{safe_text(name)}" if path else safe_text(name)
            problem = text_problem(name)
            if problem:
                return (child, f"key {problem}")
            found = first_unsafe(item, child)
            if found:
                return found
        return None
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = first_unsafe(item, f"{path}[{index}]")
            if found:
                return found
    return None
