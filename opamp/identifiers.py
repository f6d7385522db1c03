"""Instance UIDs: 16 bytes, UUIDv7 when we generate them (time-ordered, RFC 9562)."""

from __future__ import annotations

import os
import time
import uuid

INSTANCE_UID_LENGTH = 16


def uuid7(*, unix_ms: int | None = None) -> uuid.UUID:
    """A UUIDv7: 48-bit Unix milliseconds, version 7, 74 random bits, RFC 4122 variant.

    Python 3.11's uuid module has no uuid7, so it is built here from os.urandom.
    """
    millis = int(time.time() * 1000) if unix_ms is None else unix_ms
    rand = int.from_bytes(os.urandom(10), "big")
    value = (millis & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # rand_b, 62 bits
    return uuid.UUID(int=value)


def new_instance_uid() -> bytes:
    return uuid7().bytes


def instance_uid_problem(raw: bytes) -> str | None:
    """Why `raw` is not an acceptable instance_uid, or None when it is."""
    if len(raw) != INSTANCE_UID_LENGTH:
        return f"instance_uid must be {INSTANCE_UID_LENGTH} bytes, got {len(raw)}"
    if not any(raw):
        return "instance_uid must not be all zero"
    return None
