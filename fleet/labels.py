"""An agent's labels: its reported attributes flattened to strings, overlaid by operator labels.

Precedence on a key conflict: operator label > identifying attribute > non-identifying
attribute. Only scalar attribute values become labels (lists and maps do not select
well); numbers are written without a spurious ".0" because some clients send every
integer as a double.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MAX_LABEL_KEY_CHARS = 256
MAX_LABEL_VALUE_CHARS = 256


def label_value(value: Any) -> str | None:
    """The label form of an attribute value, or None when it cannot be a label."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value[:MAX_LABEL_VALUE_CHARS]
    return None


def merged_labels(
    *,
    identifying: Mapping[str, Any] | None,
    non_identifying: Mapping[str, Any] | None,
    operator: Mapping[str, str] | None,
) -> dict[str, str]:
    labels: dict[str, str] = {}
    for source in (non_identifying or {}, identifying or {}):
        for key, value in source.items():
            text = label_value(value)
            if text is not None and len(key) <= MAX_LABEL_KEY_CHARS:
                labels[key] = text
    labels.update(operator or {})
    return labels
