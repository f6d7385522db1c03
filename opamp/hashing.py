"""Canonical SHA-256 hashes of config maps.

The hash identifies content, so it must not depend on map ordering, on protobuf's
serialisation (which is not canonical), or on Python's hash(). The encoding is a simple
length-prefixed sequence over files sorted by name: name, content type, body.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Protocol

_DOMAIN = b"opamp-config-map/v1\x00"


class ConfigFileLike(Protocol):
    # Read-only members, so frozen dataclasses and protobuf messages both conform.
    @property
    def body(self) -> bytes: ...

    @property
    def content_type(self) -> str: ...


def _length_prefixed(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def canonical_config_map_bytes(files: Mapping[str, ConfigFileLike]) -> bytes:
    parts: list[bytes] = [_DOMAIN]
    for name in sorted(files):
        file = files[name]
        parts.append(_length_prefixed(name.encode("utf-8")))
        parts.append(_length_prefixed(file.content_type.encode("utf-8")))
        parts.append(_length_prefixed(bytes(file.body)))
    return b"".join(parts)


def config_map_hash(files: Mapping[str, ConfigFileLike]) -> bytes:
    """32-byte SHA-256 over the canonical encoding of a name -> file mapping."""
    return hashlib.sha256(canonical_config_map_bytes(files)).digest()
