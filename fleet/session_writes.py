"""Where a message's report goes: the four write paths of the session.

- a cheap reconnect: a known agent's full report that hashes as its row's (nothing to
  parse or write but the connection's facts, batched like a heartbeat's);
- a status report of a known, connected agent that leaves its identity alone (config
  status, health, effective config): held for a batch (`FleetRuntime.statuses`);
- a heartbeat: batched (`FleetRuntime.heartbeats`, or with the agent's held status);
- everything else (a new agent, a description, changed capabilities, a reconnect whose
  state changed): the full path, one transaction on the agent's row
  (`fleet.services.agent_record_report`).

An agent's facts are in one buffer at a time, so its sequence number never reaches the
database ahead of a report that came before it (`fleet.services.heartbeat_status_write`).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING

from fleet import services
from fleet.db import db
from fleet.reports import AgentReport
from fleet.services import AgentSnapshot
from opamp.proto import opamp_pb2

if TYPE_CHECKING:
    from fleet.session import AgentSession


def note_batched_report(
    session: AgentSession,
    message: opamp_pb2.AgentToServer,
    snapshot: AgentSnapshot | None,
    report: AgentReport,
    *,
    unchanged: bool,
    now: datetime,
) -> bool:
    """Take the message down a path without a database trip, if one applies; False when
    it takes the full path (`write_full_report`)."""
    fleet = session.fleet
    if unchanged:
        assert snapshot is not None
        note_reconnect(session, snapshot, now, message.sequence_num)
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
        fleet.statuses.note(snapshot.agent_id, write)
        fleet.heartbeats.forget(snapshot.instance_uid)
        snapshot.last_sequence_num = message.sequence_num
    elif (
        report.has_status or snapshot is None or not snapshot.connected or snapshot.capabilities != report.capabilities
    ):
        return False
    elif fleet.statuses.holds(snapshot.agent_id):
        beat = services.heartbeat_status_write(sequence_num=message.sequence_num, seen_at=now)
        fleet.statuses.note(snapshot.agent_id, beat)
        snapshot.last_sequence_num = message.sequence_num
    else:
        fleet.heartbeats.note(snapshot.instance_uid, now, message.sequence_num)
        snapshot.last_sequence_num = message.sequence_num
    return True


async def write_full_report(
    session: AgentSession,
    instance_uid: uuid.UUID,
    snapshot: AgentSnapshot | None,
    report: AgentReport,
    *,
    sequence_num: int,
    now: datetime,
    state_hash: str,
) -> AgentSnapshot:
    """The full path: the agent's row in one transaction; the new snapshot."""
    fleet = session.fleet
    if snapshot is not None:
        await write_held_status(session, snapshot.agent_id)
    snapshot = await db(services.agent_record_report)(
        instance_uid=instance_uid,
        report=report,
        sequence_num=sequence_num,
        transport=session.transport,
        remote_address=session.remote_address,
        seen_at=now,
        state_hash=state_hash,
    )
    fleet.heartbeats.forget(instance_uid)
    fleet.agent_changed(instance_uid)  # labels may have changed
    return snapshot


def note_reconnect(session: AgentSession, snapshot: AgentSnapshot, now: datetime, sequence_num: int) -> None:
    """A known agent reconnected with the full state its row already holds: its facts
    (connected, last_seen, sequence number, transport, address) go to a batch, like a
    heartbeat's, and to the same buffer as its other facts (see `heartbeat_status_write`)."""
    fleet = session.fleet
    if fleet.statuses.holds(snapshot.agent_id):
        beat = services.heartbeat_status_write(
            sequence_num=sequence_num, seen_at=now, transport=session.transport, remote_address=session.remote_address
        )
        fleet.statuses.note(snapshot.agent_id, beat)
    else:
        fleet.heartbeats.note(
            snapshot.instance_uid,
            now,
            sequence_num,
            transport=session.transport,
            remote_address=session.remote_address,
        )
    snapshot.last_sequence_num = sequence_num
    snapshot.connected = True


async def write_held_status_of(session: AgentSession, instance_uid: uuid.UUID) -> None:
    snapshot = session.fleet.snapshots.get(instance_uid)
    if snapshot is not None:
        await write_held_status(session, snapshot.agent_id)


async def write_held_status(session: AgentSession, agent_id: int) -> None:
    """Before the full path writes the agent's row: a held status report goes first,
    so it never lands over the newer values."""
    await session.fleet.statuses.write_now(agent_id)
