"""Hints to live WebSocket sessions: "this changed for these agents, look again now".

Sent on commit by whoever made the change, from any process (a server's request, a
Celery worker): one message on the hint stream (fleet.hints) names every affected agent,
and each server process hands it to the sessions it holds. The kind says what changed
(fleet.hint_messages.HintKind), so only the session contributor that owns it looks again.
A lost hint costs only latency: every server process also watches the desired-state
generation and re-checks on the agent's next message. A hint for logged assignment
changes carries the generation they were logged under: the process catches up with the
log once for all its hinted agents and reads their desired configs in bulk
(rollouts.session_contributor), instead of once per agent.

Sending only publishes: a process that serves no agents (a Celery worker, an API process)
builds nothing of the session runtime. A process that serves agents has its
`FleetRuntime` listen here, so it learns of its own changes at once (`hear_hints_sent_here`).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import InMemoryChannelLayer, get_channel_layer

from fleet.hint_messages import HintKind, hint_messages, publish

# This process's FleetRuntime, when it has one: told of every hint sent from here.
HintListener = Callable[[HintKind, "int | None"], None]
_sent_here: HintListener | None = None


def hear_hints_sent_here(listener: HintListener | None) -> None:
    """Set (or with None, drop) the listener told of each hint this process sends, before it leaves."""
    global _sent_here
    _sent_here = listener


def notify_desired_config_changed(instance_uids: Iterable[uuid.UUID], *, generation: int | None = None) -> None:
    """The agents' desired remote config may have changed (logged under `generation`, if
    any). Entry point for services (runs in on_commit callbacks); returns at once."""
    _notify(HintKind.CONFIG, instance_uids, generation=generation)


def notify_packages_changed(instance_uids: Iterable[uuid.UUID]) -> None:
    """The agents' desired package set may have changed (an assignment, a package rollout's
    stage): their live sessions look again now rather than at the next heartbeat."""
    _notify(HintKind.PACKAGES, instance_uids)


def notify_certificate_issued(instance_uids: Iterable[uuid.UUID]) -> None:
    """A client certificate was issued for these agents: their live sessions offer it."""
    _notify(HintKind.CERTIFICATE, instance_uids)


def notify_command_waiting(instance_uids: Iterable[uuid.UUID]) -> None:
    """A command (fleet.commands) waits for these agents: their live sessions push it."""
    _notify(HintKind.COMMAND, instance_uids)


def notify_custom_message_waiting(instance_uids: Iterable[uuid.UUID]) -> None:
    """An operator's custom message (fleet.custom_messages) waits for these agents."""
    _notify(HintKind.CUSTOM, instance_uids)


def notify_connection_settings_changed(instance_uids: Iterable[uuid.UUID]) -> None:
    """The agents' telemetry connection settings (fleet.connection_settings) may have changed."""
    _notify(HintKind.SETTINGS, instance_uids)


def notify_credentials_revoked(instance_uids: Iterable[uuid.UUID]) -> None:
    """After a revocation commits: live sessions of these agents re-check their certificate
    and close when it no longer holds (any server process holding one; lost hints are
    covered by the re-check every new connection and HTTP request makes)."""
    _notify(HintKind.REVOKED, instance_uids)


def _notify(kind: HintKind, instance_uids: Iterable[uuid.UUID], *, generation: int | None = None) -> None:
    listener = _sent_here
    if listener is not None:
        # This process learns at once; other processes within a generation re-check.
        listener(kind, generation)
    _dispatch(hint_messages(kind, list(instance_uids), generation=generation))


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
