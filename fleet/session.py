"""The OpAMP session logic, shared by the WebSocket consumer and the HTTP view.

AgentToServer in -> inventory updated -> ServerToAgent out. Transports only decode,
enforce size limits and encode; every protocol decision is made here, once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING

from django.conf import settings
from django.utils import timezone

from fleet import admission, selectors, services
from fleet.batched_writes import BatchedWrites, RowWriters
from fleet.db import db
from fleet.desired_cache import CachedDesired, DesiredConfigCache
from fleet.heartbeats import HeartbeatBuffer
from fleet.reports import AgentReport, ReportLimits, report_from_message
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
from rollouts.desired_state import (
    DesiredConfig,
    Offer,
    changes_since,
    desired_config_for_agent,
    desired_configs_for_agents,
    record_offers,
)
from signing.agent_credentials import (
    ANONYMOUS,
    CERTIFICATE_CAPABILITY,
    RENEW_MESSAGE_TYPE,
    AgentCredential,
    CredentialKind,
    CredentialRefused,
    agent_instance_uid_reassign,
    ca_configured,
    certificate_offer_for,
    certificate_request_from_agent,
    credential_still_valid,
    enrollment_labels_apply,
    enrollment_record,
    fill_certificate_offer,
    token_identity_check,
)
from signing.ca import CsrRejected
from signing.errors import SigningError

if TYPE_CHECKING:
    from fleet.hints import HintReceiver

logger = logging.getLogger(__name__)

# What this server offers today; later features add their bits here.
SERVER_CAPABILITIES = int(
    ServerCapabilities.ACCEPTS_STATUS
    | ServerCapabilities.OFFERS_REMOTE_CONFIG
    | ServerCapabilities.ACCEPTS_EFFECTIVE_CONFIG
    | ServerCapabilities.ACCEPTS_PACKAGES_STATUS
)
# With a certificate authority configured: the CSR flow and certificate offers.
CERTIFICATE_CAPABILITIES = int(
    ServerCapabilities.OFFERS_CONNECTION_SETTINGS | ServerCapabilities.ACCEPTS_CONNECTION_SETTINGS_REQUEST
)


def server_capabilities() -> int:
    return SERVER_CAPABILITIES | (CERTIFICATE_CAPABILITIES if ca_configured() else 0)


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


CERTIFIED_SESSION_LIVE = (
    "agent {uid} is connected with its client certificate; only that certificate may replace its session"
)


# The parts of an AgentToServer the agent's row stores, as `fleet.reports` reads them.
_STATE_FIELDS = (
    "agent_description",
    "health",
    "effective_config",
    "remote_config_status",
    "package_statuses",
    "custom_capabilities",
    "available_components",
    "connection_settings_status",
)
# Bumped when what a row stores for the same message changes (limits, documents).
_STATE_HASH_VERSION = b"opamp-reported-state/1"


def reported_state_hash(message: opamp_pb2.AgentToServer, capabilities: int) -> str:
    """SHA-256 of everything a full report makes the row hold: the capabilities and each
    stored part as deterministically serialized protobuf (no parsing into documents).

    Kept in the row (`Agent.reported_state_hash`), so a fresh process can tell a known
    agent's unchanged full report without reading, parsing or comparing the documents.
    """
    digest = hashlib.sha256(_STATE_HASH_VERSION)
    digest.update(capabilities.to_bytes(8, "big"))
    for name in _STATE_FIELDS:
        if message.HasField(name):
            part = getattr(message, name).SerializeToString(deterministic=True)
            digest.update(b"+%s:%d:" % (name.encode(), len(part)))
            digest.update(part)
        else:
            digest.update(b"-%s:" % name.encode())
    return digest.hexdigest()


def _reported_components(message: opamp_pb2.AgentToServer) -> tuple[str | None, dict[str, object] | None]:
    """What `_should_ask_for_components` needs, read off the message without a report."""
    if not message.HasField("available_components"):
        return None, None
    components = message.available_components
    return components.hash.hex()[:64], ({} if components.components else None)


class ProtocolError(ValueError):
    """A well-formed protobuf that breaks a protocol rule; answered with BadRequest."""


@dataclass
class LiveConnections:
    """WebSocket sessions of this process by instance_uid: to spot duplicates, and where
    the process's hint stream (fleet.hints) finds the sessions a hint names."""

    by_uid: dict[uuid.UUID, AgentSession] = field(default_factory=dict)
    # Set by the hint stream: announces a session that became an agent's live one here.
    on_claim: Callable[[uuid.UUID, AgentSession], None] | None = None

    def claim(self, instance_uid: uuid.UUID, session: AgentSession) -> AgentSession | None:
        """Register `session` for the uid; return the other live session holding it, if any."""
        holder = self.by_uid.get(instance_uid)
        if holder is not None and holder is not session and not holder.closed:
            return holder
        self.by_uid[instance_uid] = session
        if holder is not session:
            session.claimed_at = time.time()
            if self.on_claim is not None:
                self.on_claim(instance_uid, session)
        return None

    def release(self, instance_uid: uuid.UUID, session: AgentSession) -> None:
        if self.by_uid.get(instance_uid) is session:
            del self.by_uid[instance_uid]


class FleetRuntime:
    """Per-process state shared by all sessions: agent snapshots, heartbeats, live sockets."""

    def __init__(self) -> None:
        self.snapshots: dict[uuid.UUID, AgentSnapshot] = {}
        # The buffers write overlapping rows (agents, rollout targets): one transaction at
        # a time per process (fleet.batched_writes).
        agent_rows = RowWriters()
        self.heartbeats = HeartbeatBuffer(settings.OPAMP_HEARTBEAT_FLUSH_SECONDS, writers=agent_rows)
        # Status reports (config status, health, effective config) of agents already
        # inventoried, written in batches: a crash loses at most one interval of them, and
        # the agents report them again when asked for their full state after the sequence
        # gap a restart shows (an agent's facts are in one buffer at a time, so its
        # sequence number is never written ahead of a held report).
        self.statuses = BatchedWrites[int, services.StatusWrite](
            name="status",
            flush_seconds=settings.OPAMP_STATUS_FLUSH_SECONDS,
            write=services.write_statuses,
            merge=services.StatusWrite.merged,
            writers=agent_rows,
            describe=self.describe_agent,
        )
        # What was offered to whom, written in batches: the agent's answer, not this
        # record, is what rollouts judge, and a lost record costs at most a repeated offer.
        self.offers = BatchedWrites[int, Offer](
            name="offer",
            flush_seconds=settings.OPAMP_HEARTBEAT_FLUSH_SECONDS,
            write=record_offers,
            writers=agent_rows,
            describe=self.describe_agent,
        )
        self.live = LiveConnections()
        # Admission pacing (fleet.admission): tokens per connecting agent, per process.
        self.admission = admission.bucket_from_settings()
        self.desired = DesiredConfigCache()
        self._catching_up: asyncio.Future[None] | None = None
        # (token id, agent) pairs already counted as enrolled: no write per message.
        self.enrolled: set[tuple[int, uuid.UUID]] = set()
        # The last connection-settings hash each agent reported (applied or failed), so
        # an offer is not repeated to an agent that already answered it.
        self.settings_reported: dict[uuid.UUID, bytes] = {}
        # Certificates (by fingerprint) whose renewal this process already asked for.
        self.renewal_asked: set[str] = set()
        self.limits = ReportLimits(
            max_value_chars=settings.OPAMP_MAX_ATTRIBUTE_VALUE_CHARS,
            max_attributes=settings.OPAMP_MAX_ATTRIBUTES,
            max_depth=settings.OPAMP_MAX_VALUE_DEPTH,
            max_config_bytes=settings.OPAMP_MAX_EFFECTIVE_CONFIG_BYTES,
        )

    def describe_agent(self, agent_id: int) -> str:
        """An agent (by row id) as a log line names it: its instance_uid when this process knows it."""
        uid = next((uid for uid, snapshot in self.snapshots.items() if snapshot.agent_id == agent_id), None)
        return f"agent {uid} (id {agent_id})" if uid else f"agent id {agent_id}"

    def expire_generation(self) -> None:
        """Make the next desired-state read catch up with the change log first."""
        self.desired.expire()

    async def catch_up_desired(self, *, at_least: int | None = None) -> None:
        """Bring the desired-config cache up to date with the change log: when the check
        is due, or now when a hint names a generation this process has not seen. One
        catch-up at a time; whoever arrives meanwhile awaits it rather than read the
        database on its own (a rollout stage hints thousands of agents at once)."""
        cache = self.desired
        if at_least is None and not cache.check_due():
            return
        if at_least is not None and cache.generation >= at_least:
            return
        running = self._catching_up
        if running is not None and not running.done() and running.get_loop() is asyncio.get_running_loop():
            await asyncio.shield(running)
            if at_least is None or cache.generation >= at_least:
                return
        self._catching_up = asyncio.ensure_future(self._catch_up_desired())
        await asyncio.shield(self._catching_up)

    async def _catch_up_desired(self) -> None:
        cache = self.desired
        changes = await db(changes_since)(cache.start_check())
        # The changed agents this process serves get their new desired config read now, in
        # bulk: each would otherwise read its own on its next message or hint.
        served = {
            snapshot.agent_id: uid
            for uid, snapshot in self.snapshots.items()
            if changes.agent_ids is None or snapshot.agent_id in changes.agent_ids
        }
        fresh = await db(desired_configs_for_agents)(list(served)) if served else {}
        cache.catch_up(changes)
        for agent_id, desired in fresh.items():
            # Read after the log: true as of `changes.generation`, and dropped by any later change.
            entry = CachedDesired(generation=changes.generation, agent_id=agent_id, desired=desired)
            cache.put(served[agent_id], entry)


_runtime: FleetRuntime | None = None


def runtime() -> FleetRuntime:
    global _runtime
    if _runtime is None:
        _runtime = FleetRuntime()
    return _runtime


def runtime_if_started() -> FleetRuntime | None:
    """This process's runtime if it serves agents (a Celery worker builds none)."""
    return _runtime


def reset_runtime() -> None:
    """Forget every in-memory fact, as a server restart would (tests use this)."""
    global _runtime
    _runtime = None


class AgentSession:
    """One agent's conversation: a WebSocket connection, or one HTTP request."""

    def __init__(
        self,
        *,
        transport: str,
        remote_address: str,
        fleet: FleetRuntime | None = None,
        credential: AgentCredential = ANONYMOUS,
        endpoint: str = "",
    ) -> None:
        self.transport = transport
        self.remote_address = remote_address
        self.fleet = fleet or runtime()
        # Checked by the transport before the first message; binds a certificate's uid.
        self.credential = credential
        self.endpoint = endpoint
        # Look for a certificate to offer on the first message, after a CSR and on hints.
        self.certificate_check_due = True
        self.offered_settings_hash = b""
        self.identity_checked: uuid.UUID | None = None
        self.instance_uid: uuid.UUID | None = None
        self.closed = False
        # Set by the WebSocket consumer: how to drop this socket when superseded, and
        # what to do with a hint naming its agent.
        self.on_superseded: Callable[[], None] | None = None
        self.hint_receiver: HintReceiver | None = None
        # When this session became its agent's live one (wall clock: compared across
        # processes to tell the older session of a duplicate).
        self.claimed_at = 0.0
        # The agent reported identifying attributes other than the stored ones.
        self.identity_differs = False
        # A newer session of the agent opened on another process: it is still connected.
        self.taken_over = False
        self.last_sequence_num: int | None = None
        self.last_offered_hash = ""
        # Set once the admission bucket let this connection in (fleet.admission); until
        # then, when (monotonic) a refused connection was told to come back.
        self.admitted = False
        self.refused_until = 0.0

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
        if (retry_after := self._admission_refused(instance_uid)) is not None:
            return self._unavailable(message, retry_after)
        await self._check_identity(instance_uid)
        now = timezone.now()
        capabilities = known_agent_capabilities(message.capabilities)
        reply = opamp_pb2.ServerToAgent(instance_uid=message.instance_uid, capabilities=server_capabilities())

        if self.instance_uid is not None and self.instance_uid != instance_uid:
            # An agent adopting a server-assigned uid mid-connection; follow it.
            self.fleet.live.release(self.instance_uid, self)
        self.instance_uid = instance_uid

        snapshot = self.fleet.snapshots.get(instance_uid)
        if snapshot is None:
            snapshot = await db(services.agent_snapshot)(instance_uid=instance_uid)

        # A known agent whose full report hashes as the row's: nothing of it to parse or write.
        state_hash = reported_state_hash(message, capabilities) if is_full_report(message) else ""
        unchanged = snapshot is not None and bool(state_hash) and snapshot.reported_state_hash == state_hash
        if not self.admitted:
            # The full admission price was taken above, before any database work; a cheap
            # reconnect costs one token and gets the rest back.
            if unchanged:
                self.fleet.admission.refund(admission.full_admission_cost() - 1.0)
            self.admitted = True

        if unchanged:
            assert snapshot is not None
            report = AgentReport(capabilities=capabilities)
            identifying: dict[str, object] | None = snapshot.identifying_attributes
        else:
            report = report_from_message(message, self.fleet.limits, capabilities)
            identifying = report.identifying_attributes

        # The credential was checked above; its enrollment is counted before anything of
        # another session changes (an agent asking for a new uid enrols under that one).
        requests_uid = bool(message.flags & AgentToServerFlags.REQUEST_INSTANCE_UID) and (
            self.credential.bound_uid is None
        )
        enrollment_labels = {} if requests_uid else await self._enroll(instance_uid)

        new_uid = await self._new_instance_uid_if_needed(message, instance_uid, snapshot, identifying)
        if new_uid is not None:
            reply.agent_identification.new_instance_uid = new_uid.bytes
            if requests_uid and snapshot is not None:
                await db(agent_instance_uid_reassign)(credential=self.credential, old=instance_uid, new=new_uid)
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

        if unchanged:
            assert snapshot is not None
            self._note_reconnect(snapshot, now, message.sequence_num)
        elif (
            snapshot is not None
            and snapshot.connected
            and report.has_status
            and report.identifying_attributes is None
            and report.non_identifying_attributes is None
        ):
            write = services.agent_status_write(
                snapshot=snapshot, report=report, sequence_num=message.sequence_num, seen_at=now
            )
            self.fleet.statuses.note(snapshot.agent_id, write)
            self.fleet.heartbeats.forget(instance_uid)
            snapshot.last_sequence_num = message.sequence_num
        elif report.has_status or snapshot is None or not snapshot.connected or snapshot.capabilities != capabilities:
            if snapshot is not None:
                await self._write_held_status(snapshot.agent_id)
            snapshot = await db(services.agent_record_report)(
                instance_uid=instance_uid,
                report=report,
                sequence_num=message.sequence_num,
                transport=self.transport,
                remote_address=self.remote_address,
                seen_at=now,
                state_hash=state_hash,
            )
            self.fleet.heartbeats.forget(instance_uid)
            self.fleet.desired.forget(instance_uid)  # labels may have changed
        elif self.fleet.statuses.holds(snapshot.agent_id):
            beat = services.heartbeat_status_write(sequence_num=message.sequence_num, seen_at=now)
            self.fleet.statuses.note(snapshot.agent_id, beat)
            snapshot.last_sequence_num = message.sequence_num
        else:
            self.fleet.heartbeats.note(instance_uid, now, message.sequence_num)
            snapshot.last_sequence_num = message.sequence_num
        self.fleet.snapshots[instance_uid] = snapshot
        self.last_sequence_num = message.sequence_num
        if enrollment_labels:
            await db(enrollment_labels_apply)(instance_uid=instance_uid, labels=enrollment_labels)
            self.fleet.desired.forget(instance_uid)

        self._note_connection_settings_status(instance_uid, message)
        csr = message.connection_settings_request.opamp.certificate_request.csr
        if csr:
            await self._submit_csr(instance_uid, csr)

        if needs_full_state:
            reply.flags |= ServerToAgentFlags.REPORT_FULL_STATE
        if unchanged:
            components_hash, components = _reported_components(message)
        else:
            components_hash, components = report.available_components_hash, report.available_components
        if self._should_ask_for_components(capabilities, components_hash, components):
            reply.flags |= ServerToAgentFlags.REPORT_AVAILABLE_COMPONENTS
        await self._offer_desired_config(reply, snapshot)
        await self._offer_certificate(reply, snapshot)
        self._ask_for_renewal(reply, snapshot, now)
        return reply

    def _admission_refused(self, instance_uid: uuid.UUID) -> float | None:
        """Seconds the agent should wait before coming back, or None once it is let in.

        Once per connection; a polling agent this process already holds a snapshot of is
        past admission (each of its requests is a new session).
        """
        if self.admitted:
            return None
        if self.transport == "http" and instance_uid in self.fleet.snapshots:
            self.admitted = True
            return None
        now = time.monotonic()
        if now < self.refused_until:
            # More messages on a refused socket (an agent that ignores retry_info keeps
            # heartbeating): the same answer, without booking another turn.
            return self.refused_until - now
        return self.fleet.admission.take(admission.full_admission_cost())

    def _unavailable(self, message: opamp_pb2.AgentToServer, retry_after: float) -> opamp_pb2.ServerToAgent:
        self.refused_until = max(self.refused_until, time.monotonic() + retry_after)
        return error_reply(
            instance_uid=message.instance_uid,
            message=admission.UNAVAILABLE_MESSAGE,
            retry_after_seconds=retry_after,
        )

    def _note_reconnect(self, snapshot: AgentSnapshot, now: datetime, sequence_num: int) -> None:
        """A known agent reconnected with the full state its row already holds: its facts
        (connected, last_seen, sequence number, transport, address) go to a batch, like a
        heartbeat's, and to the same buffer as its other facts (see `heartbeat_status_write`)."""
        if self.fleet.statuses.holds(snapshot.agent_id):
            beat = services.heartbeat_status_write(
                sequence_num=sequence_num, seen_at=now, transport=self.transport, remote_address=self.remote_address
            )
            self.fleet.statuses.note(snapshot.agent_id, beat)
        else:
            self.fleet.heartbeats.note(
                snapshot.instance_uid,
                now,
                sequence_num,
                transport=self.transport,
                remote_address=self.remote_address,
            )
        snapshot.last_sequence_num = sequence_num
        snapshot.connected = True

    async def _write_held_status_of(self, instance_uid: uuid.UUID) -> None:
        snapshot = self.fleet.snapshots.get(instance_uid)
        if snapshot is not None:
            await self._write_held_status(snapshot.agent_id)

    async def _write_held_status(self, agent_id: int) -> None:
        """Before the full path writes the agent's row: a held status report goes first,
        so it never lands over the newer values."""
        await self.fleet.statuses.write_now(agent_id)

    async def _check_identity(self, instance_uid: uuid.UUID) -> None:
        """May this connection's credential speak for `instance_uid`? Once per connection and uid."""
        if instance_uid == self.identity_checked:
            return
        problem = self.credential.identity_problem(instance_uid)
        if problem is None and self.credential.kind is CredentialKind.TOKEN:
            try:
                await db(token_identity_check)(self.credential, instance_uid)
            except CredentialRefused as error:
                problem = error.message
        if problem:
            logger.warning("refused a message from %s: %s", self.remote_address, problem)
            raise ProtocolError(problem)
        self.identity_checked = instance_uid

    async def _enroll(self, instance_uid: uuid.UUID) -> dict[str, str]:
        """Count the agent against its enrollment token, once per process and agent.

        Returns labels still to apply (the token's, for an agent not yet inventoried).
        """
        credential = self.credential
        if credential.kind is not CredentialKind.TOKEN or credential.token_id is None:
            return {}
        key = (credential.token_id, instance_uid)
        if key in self.fleet.enrolled:
            return {}
        try:
            labels = await db(enrollment_record)(credential, instance_uid)
        except CredentialRefused as error:
            raise ProtocolError(error.message) from None
        self.fleet.enrolled.add(key)
        return labels

    async def _submit_csr(self, instance_uid: uuid.UUID, csr: bytes) -> None:
        try:
            request = await db(certificate_request_from_agent)(self.credential, instance_uid, csr)
        except CsrRejected as error:
            logger.info("refused a CSR from %s (%s): %s", instance_uid, self.remote_address, error.message)
            raise ProtocolError(error.message) from None
        except SigningError as error:
            raise ProtocolError(error.message) from None
        logger.info("CSR from %s is %s (request %s)", instance_uid, request.state, request.pk)
        self.certificate_check_due = True

    def _note_connection_settings_status(self, instance_uid: uuid.UUID, message: opamp_pb2.AgentToServer) -> None:
        if not message.HasField("connection_settings_status"):
            return
        status = message.connection_settings_status
        if status.last_connection_settings_hash:
            self.fleet.settings_reported[instance_uid] = bytes(status.last_connection_settings_hash)
        if status.status == opamp_pb2.ConnectionSettingsStatuses_FAILED:
            logger.warning("agent %s could not apply connection settings: %s", instance_uid, status.error_message)

    async def _offer_certificate(self, reply: opamp_pb2.ServerToAgent, snapshot: AgentSnapshot) -> bool:
        """Offer the agent's newest certificate when this connection does not use it yet.

        Checked on a connection's first message, after a CSR and on hints (issuance sends
        one), not on every heartbeat. Never repeated for a hash the agent already answered.
        """
        if not self.certificate_check_due or not has_capability(
            snapshot.capabilities, AgentCapabilities.ACCEPTS_OPAMP_CONNECTION_SETTINGS
        ):
            return False
        self.certificate_check_due = False
        offer = await db(certificate_offer_for)(snapshot.instance_uid, self.credential)
        if offer is None:
            return False
        offers = opamp_pb2.ConnectionSettingsOffers()
        digest = fill_certificate_offer(
            offers,
            offer,
            endpoint=self.endpoint or "/v1/opamp",
            heartbeat_seconds=int(settings.OPAMP_HEARTBEAT_INTERVAL_SECONDS),
        )
        if digest in (self.offered_settings_hash, self.fleet.settings_reported.get(snapshot.instance_uid)):
            return False
        reply.connection_settings.CopyFrom(offers)
        self.offered_settings_hash = digest
        return True

    def _ask_for_renewal(self, reply: opamp_pb2.ServerToAgent, snapshot: AgentSnapshot, now: datetime) -> None:
        """Ask an agent whose certificate has a third of its validity left for a new CSR.

        Over the custom capability the project defines for it, once per certificate and
        process; agents that renew on their own schedule simply send the CSR first.
        """
        credential = self.credential
        if credential.renew_after is None or now < credential.renew_after:
            return
        if CERTIFICATE_CAPABILITY not in snapshot.custom_capabilities or reply.HasField("custom_message"):
            return
        if credential.fingerprint_sha256 in self.fleet.renewal_asked:
            return
        self.fleet.renewal_asked.add(credential.fingerprint_sha256)
        reply.custom_message.capability = CERTIFICATE_CAPABILITY
        reply.custom_message.type = RENEW_MESSAGE_TYPE

    async def push_desired_state(self, *, generation: int | None = None) -> opamp_pb2.ServerToAgent | None:
        """A hint arrived: re-check now and return a message worth pushing, if any.

        `generation`: the hint is for an assignment change logged under it (see
        `FleetRuntime.catch_up_desired`); without one (a certificate was issued, say) the
        agent's desired config is read again on its own.
        """
        instance_uid = self.instance_uid
        if instance_uid is None or self.closed:
            return None
        snapshot = self.fleet.snapshots.get(instance_uid)
        if snapshot is None:
            return None
        if generation is None:
            self.fleet.desired.forget(instance_uid)
        else:
            await self.fleet.catch_up_desired(at_least=generation)
        self.certificate_check_due = True  # the hint may be a newly issued certificate
        reply = opamp_pb2.ServerToAgent(instance_uid=instance_uid.bytes, capabilities=server_capabilities())
        offered_config = await self._offer_desired_config(reply, snapshot)
        offered_certificate = await self._offer_certificate(reply, snapshot)
        return reply if offered_config or offered_certificate else None

    async def credential_revoked(self) -> bool:
        """A revocation hint arrived: True when this connection's certificate no longer holds."""
        if not self.credential.is_certificate:
            return False
        return not await db(credential_still_valid)(self.credential)

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
        if desired is not None and desired.config_hash == self.last_offered_hash != desired.offered_hash:
            # The stored record no longer names this connection's offer: forgotten on
            # purpose (rollouts.resend), or not written yet (then one repeated offer).
            context = replace(context, last_offered_on_connection="")
        if desired is None or not should_offer(desired, context):
            return False
        fill_remote_config(reply, desired, with_signature=wants_signature(snapshot.custom_capabilities))
        self.last_offered_hash = desired.config_hash
        self.fleet.offers.note(snapshot.agent_id, Offer(desired.config_hash, timezone.now()))
        cached = self.fleet.desired.get(snapshot.instance_uid)
        if cached is not None and cached.desired is desired:  # unless a change overtook it
            cached.desired = replace(
                desired, offered_hash=desired.config_hash, offered_at_timestamp=context.now_timestamp
            )
        return True

    async def _desired_config(self, snapshot: AgentSnapshot) -> DesiredConfig | None:
        await self.fleet.catch_up_desired()
        cache = self.fleet.desired
        cached = cache.get(snapshot.instance_uid)
        if cached is not None:
            return cached.desired
        tag = cache.generation
        desired = await db(desired_config_for_agent)(snapshot.agent_id)
        cache.put(snapshot.instance_uid, CachedDesired(generation=tag, agent_id=snapshot.agent_id, desired=desired))
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

    async def _new_instance_uid_if_needed(
        self,
        message: opamp_pb2.AgentToServer,
        instance_uid: uuid.UUID,
        snapshot: AgentSnapshot | None,
        identifying: dict[str, object] | None,
    ) -> uuid.UUID | None:
        bound = self.credential.bound_uid is not None
        if message.flags & AgentToServerFlags.REQUEST_INSTANCE_UID and not bound:
            return uuid7()
        if self.transport != "websocket":
            return None
        self.identity_differs = (
            not bound
            and identifying is not None
            and snapshot is not None
            and snapshot.identifying_attributes != identifying
        )
        other = self.fleet.live.by_uid.get(instance_uid)
        if other is None and self.identity_differs:
            # No session of the uid here: the row tells whether one is live on another
            # process. Decided before anything of this message is written, as in-process.
            if await db(selectors.agent_live_on_websocket)(instance_uid=instance_uid):
                logger.warning(
                    "duplicate instance_uid %s from %s (live on another server process): assigning a new one",
                    instance_uid,
                    self.remote_address,
                )
                return uuid7()
            return None
        if other is None or other is self or other.closed:
            return None
        if bound:
            # The certificate proves who this is: the older socket is the stale one.
            other.superseded()
            return None
        # Two live sockets with one uid: the same agent reconnecting leaves the old socket
        # to be dropped; a different agent (other identifying attributes) gets a new uid.
        if self.identity_differs:
            logger.warning("duplicate instance_uid %s from %s: assigning a new one", instance_uid, self.remote_address)
            return uuid7()
        if other.credential.is_certificate:
            # Only the certificate may replace a session the certificate proved: a holder
            # of the token that requested it (shared by many agents) may not.
            problem = CERTIFIED_SESSION_LIVE.format(uid=instance_uid)
            logger.warning("refused a message from %s: %s", self.remote_address, problem)
            raise ProtocolError(problem)
        other.superseded()
        return None

    def _should_ask_for_components(
        self, capabilities: int, reported_hash: str | None, components: dict[str, object] | None
    ) -> bool:
        if not has_capability(capabilities, AgentCapabilities.REPORTS_AVAILABLE_COMPONENTS):
            return False
        return reported_hash is not None and components is None and bool(reported_hash)

    async def _disconnect(self, instance_uid: uuid.UUID, now: datetime, sequence_num: int) -> None:
        await self._write_held_status_of(instance_uid)
        self._forget(instance_uid)
        await db(services.agent_mark_disconnected)(instance_uid=instance_uid, at=now, sequence_num=sequence_num)
        self.instance_uid = None

    def _forget(self, instance_uid: uuid.UUID) -> None:
        # A pending heartbeat must not be flushed after the disconnect: the flush marks
        # agents connected.
        self.fleet.heartbeats.forget(instance_uid)
        self.fleet.snapshots.pop(instance_uid, None)
        self.fleet.desired.forget(instance_uid)
        self.fleet.live.release(instance_uid, self)

    def superseded(self) -> None:
        """Another connection of the same agent took over; the transport closes this one."""
        self.closed = True
        if self.on_superseded is not None:
            self.on_superseded()

    def taken_over_elsewhere(self) -> None:
        """`superseded`, by a session on another server process (fleet.hints): the agent
        stays connected, so closing this one must not mark it disconnected."""
        self.taken_over = True
        self.superseded()

    async def close(self) -> None:
        """The transport closed: the agent is disconnected unless another session holds it."""
        self.closed = True
        instance_uid, self.instance_uid = self.instance_uid, None
        if instance_uid is None:
            return
        if self.fleet.live.by_uid.get(instance_uid) not in (self, None):
            return  # a newer connection of the same agent is live
        # What the agent last reported is stored before it counts as gone, and before a
        # reconnect through another server process can write newer values.
        await self._write_held_status_of(instance_uid)
        self._forget(instance_uid)
        if self.taken_over:
            return
        await db(services.agent_mark_disconnected)(
            instance_uid=instance_uid, at=timezone.now(), sequence_num=self.last_sequence_num
        )
