"""Hints to live WebSocket sessions: "your desired state changed, look again now".

Sent on commit by whoever changed desired state, from any process (a server's request, a
Celery worker): one message on the hint stream (fleet.hints) names every affected agent,
and each server process hands it to the sessions it holds. A lost hint costs only
latency: every server process also watches the desired-state generation and re-checks on
the agent's next message. A hint for logged assignment changes carries the generation
they were logged under: the process catches up with the log once for all its hinted
agents and reads their desired configs in bulk (fleet.session), instead of once per agent.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import InMemoryChannelLayer, get_channel_layer

from fleet.hints import HintKind, hint_messages, publish


def notify_desired_state_changed(instance_uids: Iterable[uuid.UUID], *, generation: int | None = None) -> None:
    """Entry point for services (runs in on_commit callbacks); returns at once."""
    from fleet.session import runtime_if_started

    fleet = runtime_if_started()
    if fleet is not None:
        # This process learns at once; other processes within a generation re-check.
        fleet.expire_generation()
    _dispatch(hint_messages(HintKind.DESIRED, list(instance_uids), generation=generation))


def notify_credentials_revoked(instance_uids: Iterable[uuid.UUID]) -> None:
    """After a revocation commits: live sessions of these agents re-check their certificate
    and close when it no longer holds (any server process holding one; lost hints are
    covered by the re-check every new connection and HTTP request makes)."""
    _dispatch(hint_messages(HintKind.REVOKED, list(instance_uids)))


def _dispatch(messages: list[dict[str, Any]]) -> None:
    """With a network channel layer the messages leave from a thread of their own: from a
    request thread they would otherwise run on the server's event loop, behind the very
    pushes they cause. The in-process layer of the embedded default is not thread-safe
    and costs nothing per send, so it stays inline (on the server's loop)."""
    if not messages:
        return
    if isinstance(get_channel_layer(), InMemoryChannelLayer):
        async_to_sync(publish)(messages)
        return
    threading.Thread(target=async_to_sync(publish), args=(messages,), name="agent-hints", daemon=True).start()
