"""What a hint is on the wire: its kind, the agents it names, and how it is sent.

A hint says "something about these agents changed, look again now", and its kind says
what: a desired remote config or package set, a certificate issued, a command or a
custom message waiting, telemetry connection settings changed, a certificate revoked, or a
newer session of the agent on another server process. It names many agents at once (their
instance_uids packed as 16-byte strings, at most `MAX_UIDS_PER_HINT` per message) and
travels to one well-known group that every server process joins (fleet.hints).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from enum import StrEnum
from typing import Any

from channels.layers import get_channel_layer

logger = logging.getLogger(__name__)

HINT_GROUP = "fleet.hints"
HINT_MESSAGE_TYPE = "fleet.hints"
# 80 KB of uids per message: a rollout stage of 18,000 agents is four messages.
MAX_UIDS_PER_HINT = 5_000


class HintKind(StrEnum):
    """What changed. The first kinds go to the session contributor that declares them
    (fleet.session_contributor); the last two the fleet handles itself."""

    CONFIG = "config"  # the agent's desired remote config may have changed
    CERTIFICATE = "certificate"  # a client certificate was issued for the agent
    COMMAND = "command"  # a command (restart) waits for the agent
    CUSTOM = "custom"  # an operator's custom message waits for the agent
    SETTINGS = "settings"  # the agent's telemetry connection settings may have changed
    PACKAGES = "packages"  # the agent's desired package set may have changed
    REVOKED = "revoked"  # a certificate of the agent was revoked
    TAKEOVER = "takeover"  # a newer session of the agent opened on another process


def pack_uids(instance_uids: Iterable[uuid.UUID]) -> bytes:
    return b"".join(uid.bytes for uid in instance_uids)


def unpack_uids(packed: bytes) -> list[uuid.UUID]:
    if len(packed) % 16:
        raise ValueError("packed instance_uids are not a multiple of 16 bytes")
    return [uuid.UUID(bytes=packed[i : i + 16]) for i in range(0, len(packed), 16)]


def hint_messages(
    kind: HintKind,
    instance_uids: Sequence[uuid.UUID],
    *,
    generation: int | None = None,
    origin: str = "",
    claimed_at: Sequence[float] = (),
) -> list[dict[str, Any]]:
    """The channel-layer messages for one hint: one per `MAX_UIDS_PER_HINT` agents."""
    messages = []
    for start in range(0, len(instance_uids), MAX_UIDS_PER_HINT):
        message: dict[str, Any] = {
            "type": HINT_MESSAGE_TYPE,
            "kind": str(kind),
            "uids": pack_uids(instance_uids[start : start + MAX_UIDS_PER_HINT]),
        }
        if generation is not None:
            message["generation"] = generation
        if origin:
            message["origin"] = origin
        if claimed_at:
            message["claimed_at"] = list(claimed_at[start : start + MAX_UIDS_PER_HINT])
        messages.append(message)
    return messages


async def publish(messages: Sequence[dict[str, Any]]) -> int:
    """Send hint messages to every server process; how many left. Never raises: the
    channel layer being down must not fail the change that caused the hint."""
    layer = get_channel_layer()
    if layer is None:
        return 0
    sent = 0
    for message in messages:
        try:
            await layer.group_send(HINT_GROUP, message)
        except Exception:
            logger.warning("channel layer unavailable; agents converge on their next message", exc_info=True)
            break
        sent += 1
    return sent
