"""A server process's session state (`FleetRuntime`): agent snapshots, batched writes,
live sockets, admission, and the session contributors of the registered extensions.

Nothing in it is authoritative: losing it (a restart, another process answering an HTTP
poll) costs at most a ReportFullState round trip. A process that serves no agents (a
Celery worker, an API process) never builds one.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TypeVar

from django.conf import settings

from fleet import admission, extensions, notify, services
from fleet.batched_reads import BatchedRead
from fleet.batched_writes import BatchedWrites, RowWriters
from fleet.connection_settings_offers import SettingsOfferLedger
from fleet.credentials import NO_AUTHORITY, CredentialAuthority
from fleet.heartbeats import HeartbeatBuffer
from fleet.hint_messages import HintKind
from fleet.live_connections import LiveConnections
from fleet.reports import ReportLimits
from fleet.session_contributor import ReplyFiller, ReportStep, SessionContributor
from opamp.capabilities import ServerCapabilities

V = TypeVar("V")
C = TypeVar("C", bound=SessionContributor)

# What the fleet itself accepts; contributors add their bits (fleet.session_contributor).
BASE_SERVER_CAPABILITIES = int(
    ServerCapabilities.ACCEPTS_STATUS
    | ServerCapabilities.ACCEPTS_EFFECTIVE_CONFIG
    | ServerCapabilities.ACCEPTS_PACKAGES_STATUS
)


class FleetRuntime:
    """Per-process state shared by all sessions: agent snapshots, heartbeats, live sockets."""

    def __init__(self) -> None:
        self.snapshots: dict[uuid.UUID, services.AgentSnapshot] = {}
        # The buffers write overlapping rows (agents, rollout targets): one transaction at
        # a time per process (fleet.batched_writes). Contributors make theirs on the same
        # writers (`batched_writes`).
        self.agent_rows = RowWriters()
        self.heartbeats = HeartbeatBuffer(settings.OPAMP_HEARTBEAT_FLUSH_SECONDS, writers=self.agent_rows)
        # Status reports (config status, health, effective config) of agents already
        # inventoried, written in batches: a crash loses at most one interval of them, and
        # the agents report them again when asked for their full state after the sequence
        # gap a restart shows (an agent's facts are in one buffer at a time, so its
        # sequence number is never written ahead of a held report).
        self.statuses = self.batched_writes(
            name="status",
            flush_seconds=settings.OPAMP_STATUS_FLUSH_SECONDS,
            write=services.write_statuses,
            merge=services.StatusWrite.merged,
        )
        self.live = LiveConnections()
        # Snapshots of agents not in memory (a restart's reconnecting crowd), read in batches.
        self.snapshot_reads = BatchedRead[uuid.UUID, services.AgentSnapshot](services.agent_snapshots)
        # Admission pacing (fleet.admission): tokens per connecting agent, per process.
        self.admission = admission.bucket_from_settings()
        # (token id, agent) pairs already counted as enrolled: no write per message.
        self.enrolled: set[tuple[int, uuid.UUID]] = set()
        self.limits = ReportLimits(
            max_value_chars=settings.OPAMP_MAX_ATTRIBUTE_VALUE_CHARS,
            max_attributes=settings.OPAMP_MAX_ATTRIBUTES,
            max_depth=settings.OPAMP_MAX_VALUE_DEPTH,
            max_config_bytes=settings.OPAMP_MAX_EFFECTIVE_CONFIG_BYTES,
        )
        self.credentials: CredentialAuthority = extensions.credential_authority() or NO_AUTHORITY
        # Which parts each connection settings offer held (fleet.connection_settings_offers):
        # several contributors fill one offer, hashed once.
        self.settings_offers = SettingsOfferLedger()
        self.contributors = extensions.session_contributors(self)
        self._compose_contributors()
        notify.hear_hints_sent_here(self.hint_sent_here)

    def _compose_contributors(self) -> None:
        """What the sessions run per message, laid out once: tuples to loop over, no lookups."""
        contributors = self.contributors
        self.static_capabilities = BASE_SERVER_CAPABILITIES
        for contributor in contributors:
            self.static_capabilities |= contributor.capabilities
        self._conditional = tuple(
            contributor
            for contributor in contributors
            if type(contributor).conditional_capabilities is not SessionContributor.conditional_capabilities
        )
        self.report_steps: tuple[tuple[str, ReportStep], ...] = tuple(
            step for contributor in contributors for step in contributor.report_steps()
        )
        fillers = [filler for contributor in contributors for filler in contributor.reply_fillers()]
        # Stable: contributors filling the same part keep their registration order.
        self.reply_fillers: tuple[ReplyFiller, ...] = tuple(
            fill for _, fill in sorted(fillers, key=lambda filler: filler[0])
        )
        self.hint_routes: dict[str, tuple[SessionContributor, ...]] = {}
        for contributor in contributors:
            for kind in contributor.hint_kinds:
                self.hint_routes[kind] = (*self.hint_routes.get(kind, ()), contributor)

    def server_capabilities(self) -> int:
        """The capabilities of a reply: the fleet's, and every contributor's."""
        capabilities = self.static_capabilities
        for contributor in self._conditional:
            capabilities |= contributor.conditional_capabilities()
        return capabilities

    def batched_writes(
        self,
        *,
        name: str,
        flush_seconds: float,
        write: Callable[[dict[int, V]], int],
        merge: Callable[[V, V], V] | None = None,
    ) -> BatchedWrites[int, V]:
        """A buffer of per-agent writes (keyed by agent id) on this process's shared writers:
        it writes rows the others write too, so one transaction at a time."""
        return BatchedWrites[int, V](
            name=name,
            flush_seconds=flush_seconds,
            write=write,
            merge=merge,
            writers=self.agent_rows,
            describe=self.describe_agent,
        )

    def contributor(self, kind: type[C]) -> C:
        """This runtime's contributor of that class (tests and tools reach its state so)."""
        for contributor in self.contributors:
            if isinstance(contributor, kind):
                return contributor
        raise LookupError(f"no {kind.__name__} is registered")

    def describe_agent(self, agent_id: int) -> str:
        """An agent (by row id) as a log line names it: its instance_uid when this process knows it."""
        uid = next((uid for uid, snapshot in self.snapshots.items() if snapshot.agent_id == agent_id), None)
        return f"agent {uid} (id {agent_id})" if uid else f"agent id {agent_id}"

    def hint_sent_here(self, kind: HintKind, generation: int | None) -> None:
        """This process sent a hint (fleet.notify): the contributors of its kind learn at once."""
        for contributor in self.hint_routes.get(kind, ()):
            contributor.hint_sent_here(kind, generation)

    def agent_changed(self, instance_uid: uuid.UUID) -> None:
        for contributor in self.contributors:
            contributor.agent_changed(instance_uid)

    def forget(self, instance_uid: uuid.UUID) -> None:
        """The agent left this process: its snapshot, pending heartbeat and contributors' state."""
        # A pending heartbeat must not be flushed after the disconnect: the flush marks
        # agents connected.
        self.heartbeats.forget(instance_uid)
        self.snapshots.pop(instance_uid, None)
        for contributor in self.contributors:
            contributor.forget(instance_uid)


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
    notify.hear_hints_sent_here(None)
