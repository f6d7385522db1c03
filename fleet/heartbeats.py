"""Batched writes of high-rate per-agent facts (last_seen, last_sequence_num).

A heartbeat must not cost a row write: 20,000 agents every 30 s is ~670 writes/s, about a
third of what single-row ORM updates reach on PostgreSQL here, while one
`UPDATE ... FROM unnest(...)` per batch writes 120,000+ rows/s. Each server process keeps
the newest facts per agent in memory and flushes them every OPAMP_HEARTBEAT_FLUSH_SECONDS.
A heartbeat also marks the agent connected, so an agent that a stale-session sweep marked
disconnected becomes visible again with its next heartbeat. A crash loses at most one
interval of facts; the next message then shows a sequence gap
and the agent is asked for its full state, which is the protocol's own recovery path.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime

from fleet.batched_writes import BatchedWrites, RowWriters
from fleet.db import bulk_update_from_unnest
from fleet.models import Agent, stored_remote_address, uint64_to_db

logger = logging.getLogger(__name__)

# transport / address are NULL for a plain heartbeat: only a cheap reconnect (fleet.session)
# carries them.
_POSTGRES_FLUSH_SQL = """
    UPDATE fleet_agent AS a
    SET last_seen = GREATEST(a.last_seen, v.seen),
        last_sequence_num = v.seq,
        connected = TRUE,
        connected_at = CASE WHEN a.connected THEN a.connected_at ELSE v.seen END,
        transport = COALESCE(v.transport, a.transport),
        remote_address = COALESCE(v.address, a.remote_address)
    FROM unnest(%s::uuid[], %s::timestamptz[], %s::bigint[], %s::text[], %s::text[])
        AS v(uid, seen, seq, transport, address)
    WHERE a.instance_uid = v.uid
"""


@dataclass(frozen=True)
class Heartbeat:
    seen_at: datetime
    sequence_num: int
    # Set by a reconnect admitted without a row write: the new connection's facts.
    transport: str | None = None
    remote_address: str | None = None

    def merged(self, newer: Heartbeat) -> Heartbeat:
        """`newer` follows this one: its time and sequence number, and the connection facts
        of whichever carries them (a heartbeat after a reconnect must not drop them)."""
        if newer.transport is not None or self.transport is None:
            return newer
        return Heartbeat(newer.seen_at, newer.sequence_num, self.transport, self.remote_address)


def write_heartbeats(beats: dict[uuid.UUID, Heartbeat]) -> int:
    """One statement on PostgreSQL; bulk_update on other databases (the embedded SQLite)."""
    if not beats:
        return 0
    uids = list(beats)
    columns = [
        uids,
        [beats[u].seen_at for u in uids],
        [uint64_to_db(beats[u].sequence_num) for u in uids],
        [beats[u].transport for u in uids],
        [beats[u].remote_address for u in uids],
    ]
    return bulk_update_from_unnest([_POSTGRES_FLUSH_SQL], columns, fallback=lambda: _write_heartbeats_orm(beats))


def _write_heartbeats_orm(beats: dict[uuid.UUID, Heartbeat]) -> int:
    fields = ["last_seen", "last_sequence_num", "connected", "connected_at", "transport", "remote_address"]
    agents = list(Agent.objects.filter(instance_uid__in=list(beats)).only("id", "instance_uid", *fields))
    for agent in agents:
        beat = beats[agent.instance_uid]
        agent.last_seen = max(agent.last_seen, beat.seen_at)
        agent.last_sequence_num = uint64_to_db(beat.sequence_num)
        if not agent.connected:
            agent.connected, agent.connected_at = True, beat.seen_at
        if beat.transport is not None:
            agent.transport = beat.transport
        if beat.remote_address is not None:
            agent.remote_address = beat.remote_address
    Agent.objects.bulk_update(agents, fields, batch_size=500)
    return len(agents)


class HeartbeatBuffer(BatchedWrites[uuid.UUID, Heartbeat]):
    """Newest heartbeat per agent, flushed periodically by one task per event loop."""

    def __init__(self, flush_seconds: float, *, writers: RowWriters | None = None) -> None:
        super().__init__(
            name="heartbeat",
            flush_seconds=flush_seconds,
            write=write_heartbeats,
            merge=Heartbeat.merged,
            writers=writers,
            describe=lambda uid: f"agent {uid}",
        )

    def note(  # type: ignore[override]
        self,
        instance_uid: uuid.UUID,
        seen_at: datetime,
        sequence_num: int,
        *,
        transport: str | None = None,
        remote_address: str | None = None,
    ) -> None:
        """A heartbeat; with `transport` and `remote_address`, a reconnect's facts."""
        address = stored_remote_address(remote_address) if remote_address is not None else None
        super().note(instance_uid, Heartbeat(seen_at, sequence_num, transport, address))
