"""The OpAMP session logic, shared by the WebSocket consumer and the HTTP view.

AgentToServer in -> inventory updated -> ServerToAgent out. Transports only decode,
enforce size limits and encode; every protocol decision is made here, once. `_handle`
runs one message through named steps: admission, identity, the agent's snapshot, a new
instance_uid when one is due, the write path (fleet.session_writes), the contributors'
steps on the parts of the report, and the reply, composed in one place
(`compose`, in the order of fleet.session_contributor.ReplyPart). What feature apps add
comes from their contributors; this module imports none of them.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.db import InterfaceError, OperationalError
from django.utils import timezone

from fleet import admission, services
from fleet.credentials import ANONYMOUS, AgentCredential
from fleet.db import db
from fleet.protocol_errors import ProtocolError, error_reply
from fleet.reported_state import asked_flags, is_full_report, needs_full_state, reported_state_hash
from fleet.reports import AgentReport, report_from_message
from fleet.services import AgentSnapshot
from fleet.session_identity import check_identity, enroll, enrollment_due, new_instance_uid_if_needed
from fleet.session_runtime import FleetRuntime, runtime
from fleet.session_writes import note_batched_report, write_full_report, write_held_status_of
from opamp.capabilities import AgentToServerFlags, known_agent_capabilities
from opamp.identifiers import instance_uid_problem
from opamp.proto import opamp_pb2

if TYPE_CHECKING:
    from fleet.hints import HintReceiver

logger = logging.getLogger(__name__)

# The database unreachable: agents come back after this many seconds plus up to as many
# again at random, so a fleet refused together does not return together.
DATABASE_RETRY_SECONDS = 5.0
DATABASE_UNAVAILABLE_MESSAGE = "the server cannot reach its database; come back after retry_info"


class DatabaseOutageLog:
    """One warning per `every` seconds while the database is unreachable, not one per agent
    (2,000 agents meet the same outage)."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._logged_at = float("-inf")
        self._since = 0

    def note(self, error: Exception) -> None:
        self._since += 1
        now = time.monotonic()
        if now - self._logged_at < self.every:
            return
        logger.warning(
            "database unreachable (%s); %d agent message(s) answered UNAVAILABLE since the last warning",
            str(error).splitlines()[0] if str(error) else type(error).__name__,
            self._since,
        )
        self._logged_at, self._since = now, 0


database_outage_log = DatabaseOutageLog()

# Enrollment labels of a message that enrols nothing (never written to).
_NO_LABELS: dict[str, str] = {}


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
        # Set once the admission bucket let this connection in (fleet.admission); until
        # then, when (monotonic) a refused connection was told to come back.
        self.admitted = False
        self.refused_until = 0.0
        # What contributors remember of this connection (`remember`): made on first use,
        # so a poll that leaves nothing to remember costs nothing.
        self._memo: dict[object, Any] | None = None

    def remembered(self, key: object, default: Any = None) -> Any:
        """What `remember` kept under `key` on this connection (a contributor keys by itself)."""
        memo = self._memo
        return default if memo is None else memo.get(key, default)

    def remember(self, key: object, value: Any) -> None:
        if self._memo is None:
            self._memo = {}
        self._memo[key] = value

    async def handle(self, message: opamp_pb2.AgentToServer) -> opamp_pb2.ServerToAgent:
        """Apply one AgentToServer and build the reply; never raises for agent mistakes, nor
        while the database cannot be reached (the agent is told to come back later)."""
        try:
            return await self._handle(message)
        except ProtocolError as error:
            return error_reply(instance_uid=message.instance_uid, message=str(error))
        except (OperationalError, InterfaceError) as error:
            # PostgreSQL restarting, or the pool's timeout passed. Raised on, the error closed
            # the socket with a traceback per agent and a whole fleet reconnected the moment
            # the database was back; UNAVAILABLE brings each agent back after retry_info with
            # a full report (the session keeps nothing the message did not finish writing).
            database_outage_log.note(error)
            retry_after = DATABASE_RETRY_SECONDS * (1 + random.random())
            return self._unavailable(message, retry_after, reason=DATABASE_UNAVAILABLE_MESSAGE)

    async def _handle(self, message: opamp_pb2.AgentToServer) -> opamp_pb2.ServerToAgent:
        if problem := instance_uid_problem(message.instance_uid):
            raise ProtocolError(problem)
        instance_uid = uuid.UUID(bytes=message.instance_uid)
        if (retry_after := self._still_refused()) is not None:
            return self._unavailable(message, retry_after)
        capabilities = known_agent_capabilities(message.capabilities)
        snapshot = self.fleet.snapshots.get(instance_uid)
        if snapshot is None:
            snapshot = await self.fleet.snapshot_reads.get(instance_uid)
        # A known agent whose full report hashes as the row's: nothing of it to parse or write.
        state_hash = reported_state_hash(message, capabilities) if is_full_report(message) else ""
        unchanged = snapshot is not None and bool(state_hash) and snapshot.reported_state_hash == state_hash
        if (retry_after := self._admission_refused(instance_uid, unchanged=unchanged)) is not None:
            return self._unavailable(message, retry_after)
        if instance_uid != self.identity_checked:
            await check_identity(self, instance_uid)
        now = timezone.now()
        reply = opamp_pb2.ServerToAgent(
            instance_uid=message.instance_uid, capabilities=self.fleet.server_capabilities()
        )
        if instance_uid != self.instance_uid:
            self._follow(instance_uid)

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
        enrollment_labels = (
            await enroll(self, instance_uid) if not requests_uid and enrollment_due(self, instance_uid) else _NO_LABELS
        )
        new_uid = await new_instance_uid_if_needed(self, message, instance_uid, snapshot, identifying)
        if new_uid is not None:
            reply.agent_identification.new_instance_uid = new_uid.bytes
            await self._switch_uid(instance_uid, new_uid, reassign=requests_uid and snapshot is not None)
            return reply
        if self.transport == "websocket":
            self.fleet.live.claim(instance_uid, self)

        full_state = needs_full_state(message, snapshot)
        if message.HasField("agent_disconnect"):
            await self._disconnect(instance_uid, now, message.sequence_num)
            return reply
        if not note_batched_report(self, message, snapshot, report, unchanged=unchanged, now=now):
            snapshot = await write_full_report(
                self, instance_uid, snapshot, report, sequence_num=message.sequence_num, now=now, state_hash=state_hash
            )
        assert snapshot is not None
        self.fleet.snapshots[instance_uid] = snapshot
        self.last_sequence_num = message.sequence_num
        if enrollment_labels:
            await db(self.fleet.credentials.enrollment_labels_apply)(
                instance_uid=instance_uid, labels=enrollment_labels
            )
            self.fleet.agent_changed(instance_uid)

        for field, step in self.fleet.report_steps:
            if message.HasField(field):
                await step(self, message, snapshot)
        if flags := asked_flags(message, report, capabilities, full_state=full_state, unchanged=unchanged):
            reply.flags |= flags
        await self.compose(reply, snapshot, now)
        return reply

    async def compose(self, reply: opamp_pb2.ServerToAgent, snapshot: AgentSnapshot, now: datetime | None) -> bool:
        """Let the contributors fill the reply, part by part in `ReplyPart` order (`now`:
        None for a push); whether any part was filled."""
        filled = False
        for fill in self.fleet.reply_fillers:
            if await fill(self, reply, snapshot, now):
                filled = True
        return filled

    def _follow(self, instance_uid: uuid.UUID) -> None:
        """The connection's first message, or another uid on it."""
        if self.instance_uid is not None:
            # An agent adopting a server-assigned uid mid-connection; follow it.
            self.fleet.live.release(self.instance_uid, self)
        self.instance_uid = instance_uid

    async def _switch_uid(self, instance_uid: uuid.UUID, new_uid: uuid.UUID, *, reassign: bool) -> None:
        """The agent is given `new_uid`; `reassign`: its row moves along, when its credential owns it."""
        if reassign:
            await db(self.fleet.credentials.instance_uid_reassign)(
                credential=self.credential, old=instance_uid, new=new_uid
            )
            self.fleet.snapshots.pop(instance_uid, None)
        # The agent switches to the new uid with its next message, which arrives as
        # an unknown agent and is asked for its full state.
        self.fleet.live.release(instance_uid, self)
        self.instance_uid = new_uid

    def _still_refused(self) -> float | None:
        """A refused socket's later messages (an agent that ignores retry_info keeps
        heartbeating): the same answer, without any work or another turn booked."""
        if self.admitted:
            return None
        now = time.monotonic()
        return self.refused_until - now if now < self.refused_until else None

    def _admission_refused(self, instance_uid: uuid.UUID, *, unchanged: bool) -> float | None:
        """Seconds the agent should wait before coming back, or None once it is let in.

        Once per connection, priced by what its snapshot shows it to be (fleet.admission): a
        cheap reconnect, or the full cost. A polling agent this process already holds a
        snapshot of is past admission (each of its requests is a new session).
        """
        if self.admitted:
            return None
        if self.transport == "http" and instance_uid in self.fleet.snapshots:
            self.admitted = True
            return None
        cost = admission.reconnect_admission_cost() if unchanged else admission.full_admission_cost()
        retry_after = self.fleet.admission.take(cost)
        self.admitted = retry_after is None
        return retry_after

    def _unavailable(
        self, message: opamp_pb2.AgentToServer, retry_after: float, *, reason: str = admission.UNAVAILABLE_MESSAGE
    ) -> opamp_pb2.ServerToAgent:
        self.refused_until = max(self.refused_until, time.monotonic() + retry_after)
        return error_reply(instance_uid=message.instance_uid, message=reason, retry_after_seconds=retry_after)

    async def push_on_hint(self, kind: str, generation: int | None = None) -> opamp_pb2.ServerToAgent | None:
        """A hint of `kind` arrived: its contributors look again, and a message worth
        pushing is returned, if any.

        `generation`: the hint is for an assignment change logged under it (see
        rollouts.session_contributor); without one the contributor reads again on its own.
        """
        instance_uid = self.instance_uid
        if instance_uid is None or self.closed:
            return None
        snapshot = self.fleet.snapshots.get(instance_uid)
        if snapshot is None:
            return None
        for contributor in self.fleet.hint_routes.get(kind, ()):
            await contributor.on_hint(self, snapshot, kind, generation)
        reply = opamp_pb2.ServerToAgent(instance_uid=instance_uid.bytes, capabilities=self.fleet.server_capabilities())
        return reply if await self.compose(reply, snapshot, None) else None

    async def credential_revoked(self) -> bool:
        """A revocation hint arrived: True when this connection's certificate no longer holds."""
        if not self.credential.is_certificate:
            return False
        return not await db(self.fleet.credentials.still_valid)(self.credential)

    async def _disconnect(self, instance_uid: uuid.UUID, now: datetime, sequence_num: int) -> None:
        await write_held_status_of(self, instance_uid)
        self._forget(instance_uid)
        await db(services.agent_mark_disconnected)(instance_uid=instance_uid, at=now, sequence_num=sequence_num)
        self.instance_uid = None

    def _forget(self, instance_uid: uuid.UUID) -> None:
        self.fleet.forget(instance_uid)
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
        # The transport's callbacks point back at it (the consumer holds this session): let
        # go of them, so a closed socket is freed by reference counting, not left as a
        # cycle for the collector (at 18,000 agents, a fleet's closed sessions made gen-1
        # collections of seconds).
        self.on_superseded = None
        self.hint_receiver = None
        instance_uid, self.instance_uid = self.instance_uid, None
        if instance_uid is None:
            return
        if self.fleet.live.by_uid.get(instance_uid) not in (self, None):
            return  # a newer connection of the same agent is live
        # What the agent last reported is stored before it counts as gone, and before a
        # reconnect through another server process can write newer values.
        await write_held_status_of(self, instance_uid)
        self._forget(instance_uid)
        if self.taken_over:
            return
        await db(services.agent_mark_disconnected)(
            instance_uid=instance_uid, at=timezone.now(), sequence_num=self.last_sequence_num
        )
