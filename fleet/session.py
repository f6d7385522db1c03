"""The OpAMP session logic, shared by the WebSocket consumer and the HTTP view.

AgentToServer in -> inventory updated -> ServerToAgent out. Transports only decode,
enforce size limits and encode; every protocol decision is made here, once.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime

from django.conf import settings
from django.utils import timezone

from fleet import services
from fleet.db import db
from fleet.heartbeats import HeartbeatBuffer
from fleet.reports import ReportLimits, report_from_message
from fleet.services import AgentSnapshot
from opamp.capabilities import (
    AgentCapabilities,
    AgentToServerFlags,
    ServerCapabilities,
    ServerToAgentFlags,
    has_capability,
    known_agent_capabilities,
)
from opamp.identifiers import instance_uid_problem, uuid7
from opamp.proto import opamp_pb2
from rollouts.delivery import OfferContext, fill_remote_config, should_offer, wants_signature
from rollouts.desired_state import DesiredConfig, current_generation, desired_config_for_agent, record_offer

logger = logging.getLogger(__name__)

# What this server offers today; later features add their bits here.
SERVER_CAPABILITIES = int(
    ServerCapabilities.ACCEPTS_STATUS
    | ServerCapabilities.OFFERS_REMOTE_CONFIG
    | ServerCapabilities.ACCEPTS_EFFECTIVE_CONFIG
    | ServerCapabilities.ACCEPTS_PACKAGES_STATUS
)
# How often a process re-reads the desired-state generation (one query, for all agents).
GENERATION_CHECK_SECONDS = 1.0


def error_reply(
    *, instance_uid: bytes, message: str, retry_after_seconds: float | None = None
) -> opamp_pb2.ServerToAgent:
    """A ServerToAgent carrying only error_response (the spec forbids anything else beside it)."""
    reply = opamp_pb2.ServerToAgent(instance_uid=instance_uid)
    if retry_after_seconds is None:
        reply.error_response.type = opamp_pb2.ServerErrorResponseType_BadRequest
    else:
        reply.error_response.type = opamp_pb2.ServerErrorResponseType_Unavailable
        reply.error_response.retry_info.retry_after_nanoseconds = int(retry_after_seconds * 1e9)
    reply.error_response.error_message = message
    return reply


# What a full report carries for each capability that promises it.
_FULL_REPORT_PARTS = (
    (AgentCapabilities.REPORTS_HEALTH, "health"),
    (AgentCapabilities.REPORTS_EFFECTIVE_CONFIG, "effective_config"),
    (AgentCapabilities.REPORTS_REMOTE_CONFIG, "remote_config_status"),
    (AgentCapabilities.REPORTS_PACKAGE_STATUSES, "package_statuses"),
    (AgentCapabilities.REPORTS_AVAILABLE_COMPONENTS, "available_components"),
)


def is_full_report(message: opamp_pb2.AgentToServer) -> bool:
    """True when the message carries the description and every part its capabilities promise.

    Such a message leaves nothing to ask for, so a new agent's first full report is not
    answered with ReportFullState (which would double the work of a reconnect storm).
    """
    if not message.HasField("agent_description"):
        return False
    return all(
        message.HasField(part)
        for capability, part in _FULL_REPORT_PARTS
        if has_capability(message.capabilities, capability)
    )


class ProtocolError(ValueError):
    """A well-formed protobuf that breaks a protocol rule; answered with BadRequest."""


@dataclass
class LiveConnections:
    """WebSocket sessions of this process by instance_uid, to spot duplicates."""

    by_uid: dict[uuid.UUID, AgentSession] = field(default_factory=dict)

    def claim(self, instance_uid: uuid.UUID, session: AgentSession) -> AgentSession | None:
        """Register `session` for the uid; return the other live session holding it, if any."""
        holder = self.by_uid.get(instance_uid)
        if holder is not None and holder is not session and not holder.closed:
            return holder
        self.by_uid[instance_uid] = session
        return None

    def release(self, instance_uid: uuid.UUID, session: AgentSession) -> None:
        if self.by_uid.get(instance_uid) is session:
            del self.by_uid[instance_uid]


class FleetRuntime:
    """Per-process state shared by all sessions: agent snapshots, heartbeats, live sockets."""

    def __init__(self) -> None:
        self.snapshots: dict[uuid.UUID, AgentSnapshot] = {}
        self.heartbeats = HeartbeatBuffer(settings.OPAMP_HEARTBEAT_FLUSH_SECONDS)
        self.live = LiveConnections()
        # Desired config per agent, tagged with the generation it was read at.
        self.desired: dict[uuid.UUID, tuple[int, DesiredConfig | None]] = {}
        self.generation = -1
        self.generation_checked_at = 0.0
        self.limits = ReportLimits(
            max_value_chars=settings.OPAMP_MAX_ATTRIBUTE_VALUE_CHARS,
            max_attributes=settings.OPAMP_MAX_ATTRIBUTES,
            max_depth=settings.OPAMP_MAX_VALUE_DEPTH,
            max_config_bytes=settings.OPAMP_MAX_EFFECTIVE_CONFIG_BYTES,
        )

    def expire_generation(self) -> None:
        """Make the next desired-state read re-check the generation counter."""
        self.generation_checked_at = 0.0


_runtime: FleetRuntime | None = None


def runtime() -> FleetRuntime:
    global _runtime
    if _runtime is None:
        _runtime = FleetRuntime()
    return _runtime


def reset_runtime() -> None:
    """Forget every in-memory fact, as a server restart would (tests use this)."""
    global _runtime
    _runtime = None


class AgentSession:
    """One agent's conversation: a WebSocket connection, or one HTTP request."""

    def __init__(self, *, transport: str, remote_address: str, fleet: FleetRuntime | None = None) -> None:
        self.transport = transport
        self.remote_address = remote_address
        self.fleet = fleet or runtime()
        self.instance_uid: uuid.UUID | None = None
        self.closed = False
        # Set by the WebSocket consumer: how to drop this socket when superseded.
        self.on_superseded: Callable[[], None] | None = None
        self.last_sequence_num: int | None = None
        self.last_offered_hash = ""

    async def handle(self, message: opamp_pb2.AgentToServer) -> opamp_pb2.ServerToAgent:
        """Apply one AgentToServer and build the reply; never raises for agent mistakes."""
        try:
            return await self._handle(message)
        except ProtocolError as error:
            return error_reply(instance_uid=message.instance_uid, message=str(error))

    async def _handle(self, message: opamp_pb2.AgentToServer) -> opamp_pb2.ServerToAgent:
        problem = instance_uid_problem(message.instance_uid)
        if problem:
            raise ProtocolError(problem)
        instance_uid = uuid.UUID(bytes=message.instance_uid)
        now = timezone.now()
        capabilities = known_agent_capabilities(message.capabilities)
        reply = opamp_pb2.ServerToAgent(instance_uid=message.instance_uid, capabilities=SERVER_CAPABILITIES)

        if self.instance_uid is not None and self.instance_uid != instance_uid:
            # An agent adopting a server-assigned uid mid-connection; follow it.
            self.fleet.live.release(self.instance_uid, self)
        self.instance_uid = instance_uid

        snapshot = self.fleet.snapshots.get(instance_uid)
        if snapshot is None:
            snapshot = await db(services.agent_snapshot)(instance_uid=instance_uid)

        report = report_from_message(message, self.fleet.limits, capabilities)

        new_uid = self._new_instance_uid_if_needed(message, instance_uid, snapshot, report.identifying_attributes)
        if new_uid is not None:
            reply.agent_identification.new_instance_uid = new_uid.bytes
            if message.flags & AgentToServerFlags.REQUEST_INSTANCE_UID and snapshot is not None:
                await db(services.agent_change_instance_uid)(old=instance_uid, new=new_uid)
                self.fleet.snapshots.pop(instance_uid, None)
                snapshot = None
            # The agent switches to the new uid with its next message, which arrives as
            # an unknown agent and is asked for its full state.
            self.fleet.live.release(instance_uid, self)
            self.instance_uid = new_uid
            return reply

        if self.transport == "websocket":
            self.fleet.live.claim(instance_uid, self)

        needs_full_state = self._needs_full_state(message, snapshot)
        if message.HasField("agent_disconnect"):
            await self._disconnect(instance_uid, now, message.sequence_num)
            return reply

        if (
            snapshot is not None
            and snapshot.connected
            and report.has_status
            and report.identifying_attributes is None
            and report.non_identifying_attributes is None
        ):
            snapshot = await db(services.agent_record_status)(
                snapshot=snapshot, report=report, sequence_num=message.sequence_num, seen_at=now
            )
            self.fleet.heartbeats.forget(instance_uid)
        elif report.has_status or snapshot is None or not snapshot.connected or snapshot.capabilities != capabilities:
            snapshot = await db(services.agent_record_report)(
                instance_uid=instance_uid,
                report=report,
                sequence_num=message.sequence_num,
                transport=self.transport,
                remote_address=self.remote_address,
                seen_at=now,
            )
            self.fleet.heartbeats.forget(instance_uid)
            self.fleet.desired.pop(instance_uid, None)  # labels may have changed
        else:
            self.fleet.heartbeats.note(instance_uid, now, message.sequence_num)
            snapshot.last_sequence_num = message.sequence_num
        self.fleet.snapshots[instance_uid] = snapshot
        self.last_sequence_num = message.sequence_num

        if needs_full_state:
            reply.flags |= ServerToAgentFlags.REPORT_FULL_STATE
        if self._should_ask_for_components(capabilities, report.available_components_hash, report.available_components):
            reply.flags |= ServerToAgentFlags.REPORT_AVAILABLE_COMPONENTS
        await self._offer_desired_config(reply, snapshot)
        return reply

    async def push_desired_state(self) -> opamp_pb2.ServerToAgent | None:
        """A hint arrived: re-check now and return a message worth pushing, if any."""
        instance_uid = self.instance_uid
        if instance_uid is None or self.closed:
            return None
        snapshot = self.fleet.snapshots.get(instance_uid)
        if snapshot is None:
            return None
        self.fleet.desired.pop(instance_uid, None)
        reply = opamp_pb2.ServerToAgent(instance_uid=instance_uid.bytes, capabilities=SERVER_CAPABILITIES)
        return reply if await self._offer_desired_config(reply, snapshot) else None

    async def _offer_desired_config(self, reply: opamp_pb2.ServerToAgent, snapshot: AgentSnapshot) -> bool:
        if not has_capability(snapshot.capabilities, AgentCapabilities.ACCEPTS_REMOTE_CONFIG):
            return False
        desired = await self._desired_config(snapshot)
        context = OfferContext(
            capabilities=snapshot.capabilities,
            reported_hash=snapshot.remote_config_hash,
            last_offered_on_connection=self.last_offered_hash,
            persistent_connection=self.transport == "websocket",
            now_timestamp=time.time(),
            reoffer_after_seconds=settings.OPAMP_REMOTE_CONFIG_REOFFER_SECONDS,
        )
        if desired is None or not should_offer(desired, context):
            return False
        fill_remote_config(reply, desired, with_signature=wants_signature(snapshot.custom_capabilities))
        self.last_offered_hash = desired.config_hash
        await db(record_offer)(agent_id=snapshot.agent_id, config_hash=desired.config_hash)
        self.fleet.desired[snapshot.instance_uid] = (
            self.fleet.generation,
            replace(desired, offered_hash=desired.config_hash, offered_at_timestamp=context.now_timestamp),
        )
        return True

    async def _desired_config(self, snapshot: AgentSnapshot) -> DesiredConfig | None:
        fleet = self.fleet
        if time.monotonic() - fleet.generation_checked_at > GENERATION_CHECK_SECONDS:
            fleet.generation = await db(current_generation)()
            fleet.generation_checked_at = time.monotonic()
        cached = fleet.desired.get(snapshot.instance_uid)
        if cached is not None and cached[0] == fleet.generation:
            return cached[1]
        desired = await db(desired_config_for_agent)(snapshot.agent_id)
        fleet.desired[snapshot.instance_uid] = (fleet.generation, desired)
        return desired

    def _needs_full_state(self, message: opamp_pb2.AgentToServer, snapshot: AgentSnapshot | None) -> bool:
        """Ask for everything when our picture of the agent may be incomplete or stale."""
        if is_full_report(message):
            return False  # whatever we missed, this message replaces it
        if snapshot is None:
            return True  # an agent the server holds no state for
        if message.sequence_num != snapshot.last_sequence_num + 1:
            return True  # a gap: some report may be missing (or the process restarted)
        # A snapshot loaded from the database may trail the agent by one heartbeat flush,
        # but reports are written before they are answered, so a contiguous sequence
        # number proves nothing was missed. What remains: a description never received.
        return not snapshot.description_received and not message.HasField("agent_description")

    def _new_instance_uid_if_needed(
        self,
        message: opamp_pb2.AgentToServer,
        instance_uid: uuid.UUID,
        snapshot: AgentSnapshot | None,
        identifying: dict[str, object] | None,
    ) -> uuid.UUID | None:
        if message.flags & AgentToServerFlags.REQUEST_INSTANCE_UID:
            return uuid7()
        if self.transport != "websocket":
            return None
        other = self.fleet.live.by_uid.get(instance_uid)
        if other is None or other is self or other.closed:
            return None
        # Two live sockets with one uid: the same agent reconnecting leaves the old socket
        # to be dropped; a different agent (other identifying attributes) gets a new uid.
        if identifying is not None and snapshot is not None and snapshot.identifying_attributes != identifying:
            logger.warning("duplicate instance_uid %s from %s: assigning a new one", instance_uid, self.remote_address)
            return uuid7()
        other.superseded()
        return None

    def _should_ask_for_components(
        self, capabilities: int, reported_hash: str | None, components: dict[str, object] | None
    ) -> bool:
        if not has_capability(capabilities, AgentCapabilities.REPORTS_AVAILABLE_COMPONENTS):
            return False
        return reported_hash is not None and components is None and bool(reported_hash)

    async def _disconnect(self, instance_uid: uuid.UUID, now: datetime, sequence_num: int) -> None:
        self._forget(instance_uid)
        await db(services.agent_mark_disconnected)(instance_uid=instance_uid, at=now, sequence_num=sequence_num)
        self.instance_uid = None

    def _forget(self, instance_uid: uuid.UUID) -> None:
        # A pending heartbeat must not be flushed after the disconnect: the flush marks
        # agents connected.
        self.fleet.heartbeats.forget(instance_uid)
        self.fleet.snapshots.pop(instance_uid, None)
        self.fleet.desired.pop(instance_uid, None)
        self.fleet.live.release(instance_uid, self)

    def superseded(self) -> None:
        """Another connection of the same agent took over; the transport closes this one."""
        self.closed = True
        if self.on_superseded is not None:
            self.on_superseded()

    async def close(self) -> None:
        """The transport closed: the agent is disconnected unless another session holds it."""
        self.closed = True
        instance_uid, self.instance_uid = self.instance_uid, None
        if instance_uid is None:
            return
        if self.fleet.live.by_uid.get(instance_uid) not in (self, None):
            return  # a newer connection of the same agent is live
        self._forget(instance_uid)
        await db(services.agent_mark_disconnected)(
            instance_uid=instance_uid, at=timezone.now(), sequence_num=self.last_sequence_num
        )
