"""What a feature app adds to every OpAMP session: the session contributor interface.

The session (fleet.session) handles what every agent has (identity, inventory, heartbeats,
the protocol's flags); what a feature app holds for agents is asked of its contributor,
never imported: rollouts offers remote configs (rollouts.session_contributor), signing
takes CSRs and offers certificates (signing.session_contributor); the fleet's own commands
and custom messages plug in the same way (fleet.command_contributor,
fleet.custom_message_contributor). A feature app gives its
contributor through `FleetExtension.session_contributor` (fleet.extensions); each server
process's `FleetRuntime` makes one of each, which keeps that process's state of the app
(caches, batched writes) for as long as the runtime lives. A new capability is a new
contributor, not an edit of the session.

What a contributor may add, and when the session asks for it:

- `capabilities` / `conditional_capabilities()`: server capability bits, on every reply.
- `report_steps()`: per AgentToServer field, a step run when a message carries it, after
  the message's report was written (or batched), in registration order.
- `reply_fillers()`: per part of the ServerToAgent, what to put in it. One place composes
  every reply (`AgentSession.compose`), in the fixed order of `ReplyPart`: remote config,
  then connection settings (certificates, telemetry destinations; several contributors
  fill one offer, hashed once after them), then custom messages (the server's own, then
  operators' queued ones), then the packages available (rollouts.package_contributor),
  and last a command, which only goes out in a reply nothing else filled. On a push (a
  hint) `now` is None: parts that are only given in answer to a message (a renewal
  request) are left out.
- `hint_kinds` + `on_hint()`: a hint of one of these kinds reached one of the agent's
  live sessions here; the contributor looks again before the reply is composed.
- `hint_sent_here()`: this process sent a hint of one of these kinds (a change it made).
- `agent_changed()` / `forget()`: the agent's row was rewritten (its labels may have
  changed) / the agent left this process (disconnected, or its session closed).

Per connection, a contributor keeps what it needs on the session
(`AgentSession.remembered` / `remember`, keyed by the contributor).

The hooks run on the server's event loop, on every message of every agent: they must not
block, and reach the database only through `fleet.db.db` and only when they must.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from enum import IntEnum
from typing import TYPE_CHECKING

from fleet.hint_messages import HintKind
from fleet.services import AgentSnapshot
from opamp.proto import opamp_pb2

if TYPE_CHECKING:
    from fleet.session import AgentSession


class ReplyPart(IntEnum):
    """The parts of a ServerToAgent contributors fill, in the order a reply is composed."""

    REMOTE_CONFIG = 10
    CONNECTION_SETTINGS = 20
    # The offers every contributor filled, hashed as one (fleet.connection_settings_offers).
    CONNECTION_SETTINGS_HASH = 25
    CUSTOM_MESSAGE = 30
    # Custom messages operators queued (fleet.custom_message_contributor): only when the
    # server's own (a renewal request) left the reply's one custom message free.
    QUEUED_CUSTOM_MESSAGE = 35
    # The full desired package set (rollouts.package_contributor).
    PACKAGES_AVAILABLE = 40
    # A command must travel alone (only instance_uid and capabilities beside it), so it is
    # last: it goes out only in a reply every other part left empty
    # (fleet.command_contributor), and otherwise waits for the next one.
    COMMAND = 90


# (session, message, snapshot): run when the message carries the step's field.
ReportStep = Callable[["AgentSession", opamp_pb2.AgentToServer, AgentSnapshot], Awaitable[None]]
# (session, reply, snapshot, now or None on a push) -> whether the part was filled.
ReplyFiller = Callable[["AgentSession", opamp_pb2.ServerToAgent, AgentSnapshot, "datetime | None"], Awaitable[bool]]


class SessionContributor:
    """Override what applies; every default adds nothing."""

    name = "contributor"
    # Server capability bits added to every reply.
    capabilities = 0
    # The hint kinds this contributor handles (at most one contributor per kind).
    hint_kinds: tuple[HintKind, ...] = ()

    def conditional_capabilities(self) -> int:
        """Bits added to a reply that depend on configuration (asked on every reply)."""
        return 0

    def report_steps(self) -> Sequence[tuple[str, ReportStep]]:
        """(AgentToServer field, step) pairs, in the order they run."""
        return ()

    def reply_fillers(self) -> Sequence[tuple[ReplyPart, ReplyFiller]]:
        return ()

    async def on_hint(self, session: AgentSession, snapshot: AgentSnapshot, kind: str, generation: int | None) -> None:
        """A hint of one of `hint_kinds` for the session's agent (`generation`: the desired
        state's, when the change was logged under one)."""

    def hint_sent_here(self, kind: HintKind, generation: int | None) -> None:
        """This process sent a hint of one of `hint_kinds` (fleet.notify)."""

    def agent_changed(self, instance_uid: uuid.UUID) -> None:
        """The agent's row was rewritten: anything derived from it may have changed."""

    def forget(self, instance_uid: uuid.UUID) -> None:
        """The agent left this process (disconnected, or its live session closed)."""
