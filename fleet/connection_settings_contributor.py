"""Telemetry connection settings in the OpAMP session: offered by selector, hashed as one.

Each agent is offered what the operators' entries resolve to for it (fleet.connection_settings)
and what it declared it accepts: own_metrics / own_traces / own_logs for ReportsOwnMetrics /
Traces / Logs, other connections for AcceptsOtherConnectionSettings, the heartbeat interval
(in `opamp`, with no certificate) for AcceptsOpAMPConnectionSettings. The offer is added to
the reply's `connection_settings` beside whatever signing adds there (a certificate), and the
`ReplyPart.CONNECTION_SETTINGS_HASH` step here hashes the whole message once every part is
in (fleet.connection_settings_offers); an operator's heartbeat interval also wins over the
default one a certificate offer carries.

No offer loop: an agent that reported a `last_connection_settings_hash` which is, or held
(the process's ledger says), the digest of what it should have gets nothing, whatever the
status it reported: APPLIED, APPLYING, or FAILED, which is held until the settings change
rather than sent again. A WebSocket connection gets one offer of a digest; an HTTP agent one per
process until it answers. Each process reads the entries again when their revision token
moved (at most once a second, fleet.connection_settings.bump_revision): a changed entry or
a label change reaches a connected agent with its next message, and at once over a live
WebSocket, pushed on the `settings` hint the change sends.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from fleet.connection_settings import agent_labels, revision_token, settings_entries
from fleet.db import db
from fleet.hint_messages import HintKind
from fleet.services import AgentSnapshot
from fleet.session_contributor import ReplyFiller, ReplyPart, ReportStep, SessionContributor
from fleet.telemetry_settings import ResolvedSettings, SettingsEntry, fill_offers, resolve, seal, settings_digest
from opamp.capabilities import ServerCapabilities
from opamp.proto import opamp_pb2

if TYPE_CHECKING:
    from fleet.session import AgentSession
    from fleet.session_runtime import FleetRuntime

CHECK_SECONDS = 1.0
OFFERS_CONNECTION_SETTINGS = int(ServerCapabilities.OFFERS_CONNECTION_SETTINGS)
DEFAULT_ENDPOINT = "/v1/opamp"


@dataclass(frozen=True)
class Resolution:
    """What one agent should be offered, for the capabilities and endpoint it had."""

    capabilities: int
    endpoint: str
    settings: ResolvedSettings
    digest: bytes  # b"" when there is nothing to offer


def _read_entries(known_token: str | None) -> tuple[str, list[SettingsEntry] | None]:
    """The revision token, and the entries when it is not `known_token`."""
    token = revision_token()
    return token, (settings_entries() if token != known_token else None)


class TelemetrySettingsContributor(SessionContributor):
    name = "telemetry settings"
    hint_kinds = (HintKind.SETTINGS,)

    def __init__(self, runtime: FleetRuntime) -> None:
        self.ledger = runtime.settings_offers
        self.token: str | None = None
        self.entries: list[SettingsEntry] = []
        self.checked_at = float("-inf")
        self._reading: asyncio.Future[None] | None = None
        self.resolved: dict[uuid.UUID, Resolution] = {}
        # HTTP agents: the digest offered by this process and not answered yet.
        self.offered_by_poll: dict[uuid.UUID, bytes] = {}

    def report_steps(self) -> Sequence[tuple[str, ReportStep]]:
        return (("connection_settings_status", self.note_status),)

    def reply_fillers(self) -> Sequence[tuple[ReplyPart, ReplyFiller]]:
        return (
            (ReplyPart.CONNECTION_SETTINGS, self.offer_settings),
            (ReplyPart.CONNECTION_SETTINGS_HASH, self.seal_offers),
        )

    async def on_hint(self, session: AgentSession, snapshot: AgentSnapshot, kind: str, generation: int | None) -> None:
        self.checked_at = float("-inf")  # read the revision before this push is composed

    def hint_sent_here(self, kind: HintKind, generation: int | None) -> None:
        self.checked_at = float("-inf")  # this process changed them: its polling agents too

    def agent_changed(self, instance_uid: uuid.UUID) -> None:
        self.resolved.pop(instance_uid, None)

    def forget(self, instance_uid: uuid.UUID) -> None:
        # What the agent answered stays in the ledger: its next connection opens with it.
        self.resolved.pop(instance_uid, None)
        self.offered_by_poll.pop(instance_uid, None)

    async def note_status(
        self, session: AgentSession, message: opamp_pb2.AgentToServer, snapshot: AgentSnapshot
    ) -> None:
        # For every contributor's parts (signing's certificate too): they ask the ledger.
        self.ledger.reported(
            snapshot.instance_uid, bytes(message.connection_settings_status.last_connection_settings_hash)
        )

    async def refresh_if_due(self) -> None:
        """Read the revision token at most once a second (one read at a time); the entries
        and every agent's resolution again when it moved."""
        if time.monotonic() - self.checked_at <= CHECK_SECONDS:
            return
        running = self._reading
        if running is not None and not running.done() and running.get_loop() is asyncio.get_running_loop():
            await asyncio.shield(running)
            return
        self._reading = asyncio.ensure_future(self._refresh())
        await asyncio.shield(self._reading)

    async def _refresh(self) -> None:
        started = time.monotonic()
        token, entries = await db(_read_entries)(self.token)
        if entries is not None:
            self.token, self.entries = token, entries
            self.resolved.clear()
        self.checked_at = started

    async def resolution(self, session: AgentSession, snapshot: AgentSnapshot) -> Resolution:
        endpoint = session.endpoint or DEFAULT_ENDPOINT
        known = self.resolved.get(snapshot.instance_uid)
        if known is not None and known.capabilities == snapshot.capabilities and known.endpoint == endpoint:
            return known
        if self.entries:
            labels = await db(agent_labels)(snapshot.agent_id)
            settings = resolve(self.entries, labels).for_capabilities(snapshot.capabilities)
        else:
            settings = ResolvedSettings()  # no entries: no query
        digest = b"" if settings.is_empty() else settings_digest(settings, endpoint=endpoint)
        found = Resolution(capabilities=snapshot.capabilities, endpoint=endpoint, settings=settings, digest=digest)
        self.resolved[snapshot.instance_uid] = found
        return found

    async def offer_settings(
        self, session: AgentSession, reply: opamp_pb2.ServerToAgent, snapshot: AgentSnapshot, now: datetime | None
    ) -> bool:
        await self.refresh_if_due()
        if self.entries:
            # OffersConnectionSettings while there are settings to offer (signing adds it
            # too, with a certificate authority configured); known only after the refresh.
            reply.capabilities |= OFFERS_CONNECTION_SETTINGS
        found = await self.resolution(session, snapshot)
        digest = found.digest
        if not digest:
            return False
        instance_uid = snapshot.instance_uid
        if self.ledger.answered(instance_uid, digest):
            return False  # applied, being applied, or failed (held until the settings change)
        if session.transport == "http":
            if self.offered_by_poll.get(instance_uid) == digest:
                return False
            self.offered_by_poll[instance_uid] = digest
        elif session.remembered(self) == digest:
            return False  # offered on this connection; the answer is on its way
        else:
            session.remember(self, digest)
        fill_offers(reply.connection_settings, found.settings, endpoint=found.endpoint)
        self.ledger.adding(session, digest)
        return True

    async def seal_offers(
        self, session: AgentSession, reply: opamp_pb2.ServerToAgent, snapshot: AgentSnapshot, now: datetime | None
    ) -> bool:
        """Every contributor added its part: one hash over all of them, noted in the ledger."""
        if not reply.HasField("connection_settings"):
            self.ledger.discard_parts(session)
            return False
        offers = reply.connection_settings
        found = self.resolved.get(snapshot.instance_uid)
        if found is not None and found.settings.heartbeat_interval_seconds is not None and offers.HasField("opamp"):
            # Every OpAMP settings offer names the interval; the operator's, not the default.
            offers.opamp.heartbeat_interval_seconds = found.settings.heartbeat_interval_seconds
        self.ledger.sealed(session, snapshot.instance_uid, seal(offers))
        return False  # the parts were counted by their own contributors
