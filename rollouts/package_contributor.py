"""Packages in the OpAMP session: PackagesAvailable for agents that accept packages.

Per server process (one `PackagesContributor` per FleetRuntime) it keeps:

- the package definitions (rollouts.package_assignments), checked against the packages
  token at most once per `CHECK_SECONDS`; a changed token reloads them, and every agent's
  set is recomputed in memory from the facts below, so only agents whose set changed see
  a new `all_packages_hash` and are offered anything;
- per agent, the facts its set depends on (labels, platform), read once per agent and
  forgotten when its row is rewritten here (`agent_changed`) or when the desired-state
  change log names it (an operator's label change elsewhere logs the agent:
  rollouts.fleet_extension), read at the same pace;
- what the agent last said in PackageStatuses, newer than its row while a status write
  is batched;
- what was offered to whom and when, for polling agents (rollouts.package_offers decides).

A change hints the agents it may concern (fleet.notify.notify_packages_changed: package
assignment writes, package rollout transitions): their live sessions look again at once
and push the changed set. A lost hint costs latency only: a live WebSocket agent gets a
changed set with its next message (its heartbeat), within `CHECK_SECONDS` of the change.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from django.conf import settings

from fleet.batched_reads import BatchedRead
from fleet.db import db
from fleet.hint_messages import HintKind
from fleet.services import AgentSnapshot
from fleet.session_contributor import ReplyFiller, ReplyPart, ReportStep, SessionContributor
from opamp.capabilities import AgentCapabilities, ServerCapabilities, has_capability
from opamp.proto import opamp_pb2
from rollouts.desired_state import DesiredStateChanges, changes_since
from rollouts.package_assignments import (
    AgentPackageFacts,
    PackageDefinitions,
    agent_package_facts,
    package_definitions,
    packages_token,
)
from rollouts.package_downloads import download_base_url, download_url
from rollouts.package_offers import (
    DesiredPackages,
    PackageOfferContext,
    ReportedPackages,
    fill_packages_available,
    should_offer_packages,
)

if TYPE_CHECKING:
    from fleet.session import AgentSession
    from fleet.session_runtime import FleetRuntime

PACKAGES_CAPABILITIES = int(ServerCapabilities.OFFERS_PACKAGES)
# How often a process looks for changed assignments and logged agents (two small queries).
CHECK_SECONDS = 1.0


@dataclass(frozen=True)
class _Checked:
    definitions: PackageDefinitions | None  # None: unchanged
    changes: DesiredStateChanges


def _check(generation: int, token: str | None) -> _Checked:
    changes = changes_since(generation)
    fresh = packages_token()
    # Reuse the cached definitions when the token did not move (package_definitions does).
    definitions = package_definitions(fresh) if fresh != token or not fresh else None
    return _Checked(definitions=definitions, changes=changes)


class PackagesContributor(SessionContributor):
    name = "packages"
    capabilities = PACKAGES_CAPABILITIES
    hint_kinds = (HintKind.PACKAGES,)

    def __init__(self, runtime: FleetRuntime) -> None:
        self.definitions: PackageDefinitions | None = None
        self.generation = -1  # of the desired-state change log: nothing known yet
        self.checked_at = 0.0
        # Hints received, and how many of them the definitions in hand were read after: a
        # check already under way when a hint arrives may have read before the change.
        self.hints = 0
        self.checked_hints = 0
        self.checks_started = 0
        self.checks_applied = 0
        # The check under way and the hints it covers: sessions hinted together share it.
        self.checking: asyncio.Future[None] | None = None
        self.checking_hints = -1
        self.facts: dict[uuid.UUID, AgentPackageFacts] = {}
        # Facts not in memory (a restart's reconnecting crowd), read in batches.
        self.fact_reads = BatchedRead[int, AgentPackageFacts](agent_package_facts)
        self.reported: dict[uuid.UUID, ReportedPackages] = {}
        # (definitions token, facts) the set was computed from, and the set.
        self.sets: dict[uuid.UUID, tuple[str, AgentPackageFacts, DesiredPackages]] = {}
        # Last offer to each agent from this process: (all_packages_hash hex, monotonic time).
        self.offered: dict[uuid.UUID, tuple[str, float]] = {}

    def report_steps(self) -> Sequence[tuple[str, ReportStep]]:
        return (("package_statuses", self.note_statuses),)

    def reply_fillers(self) -> Sequence[tuple[ReplyPart, ReplyFiller]]:
        return ((ReplyPart.PACKAGES_AVAILABLE, self.offer_packages),)

    async def on_hint(self, session: AgentSession, snapshot: AgentSnapshot, kind: str, generation: int | None) -> None:
        self.hints += 1  # the definitions or the agent's facts changed: look again now

    def hint_sent_here(self, kind: HintKind, generation: int | None) -> None:
        self.hints += 1

    def agent_changed(self, instance_uid: uuid.UUID) -> None:
        self.facts.pop(instance_uid, None)  # its labels or platform may have changed

    def forget(self, instance_uid: uuid.UUID) -> None:
        for kept in (self.facts, self.reported, self.sets, self.offered):
            kept.pop(instance_uid, None)

    async def note_statuses(
        self, session: AgentSession, message: opamp_pb2.AgentToServer, snapshot: AgentSnapshot
    ) -> None:
        self.reported[snapshot.instance_uid] = ReportedPackages.from_message(message.package_statuses)

    async def _current_definitions(self) -> PackageDefinitions:
        now = time.monotonic()
        fresh = self.checked_hints == self.hints
        if self.definitions is not None and fresh and now - self.checked_at <= CHECK_SECONDS:
            return self.definitions
        task = self.checking
        if task is None or task.done() or self.checking_hints != self.hints:
            self.checked_at = now
            self.checking_hints = self.hints
            task = self.checking = asyncio.ensure_future(self._check_now(self.hints))
        await asyncio.shield(task)
        assert self.definitions is not None
        return self.definitions

    async def _check_now(self, hints: int) -> None:
        self.checks_started += 1
        started = self.checks_started
        token = self.definitions.token if self.definitions is not None else None
        checked = await db(_check)(self.generation, token)
        if started > self.checks_applied:
            # Concurrent checks finish in any order: only a later-started one replaces what is held.
            self.checks_applied = started
            self.checked_hints = hints
            if checked.definitions is not None:
                self.definitions = checked.definitions
        changed = checked.changes.agent_ids
        if changed is None:
            self.facts.clear()
        elif changed:
            for uid in [uid for uid, facts in self.facts.items() if facts.agent_id in changed]:
                del self.facts[uid]
        self.generation = max(self.generation, checked.changes.generation)

    async def desired_for(self, snapshot: AgentSnapshot) -> tuple[DesiredPackages, ReportedPackages] | None:
        """The agent's desired set and what it last reported; None when its row is gone."""
        definitions = await self._current_definitions()
        uid = snapshot.instance_uid
        facts = self.facts.get(uid)
        if facts is None:
            facts = await self.fact_reads.get(snapshot.agent_id)
            if facts is None:
                return None
            self.facts[uid] = facts
        memo = self.sets.get(uid)
        if memo is not None and memo[0] == definitions.token and memo[1] is facts and definitions.token:
            desired = memo[2]
        else:
            desired = facts.desired(definitions)
            self.sets[uid] = (definitions.token, facts, desired)
        return desired, self.reported.get(uid) or facts.reported

    async def offer_packages(
        self, session: AgentSession, reply: opamp_pb2.ServerToAgent, snapshot: AgentSnapshot, now: datetime | None
    ) -> bool:
        if not has_capability(snapshot.capabilities, AgentCapabilities.ACCEPTS_PACKAGES):
            return False
        found = await self.desired_for(snapshot)
        if found is None:
            return False
        desired, reported = found
        current = desired.all_packages_hash.hex()
        uid = snapshot.instance_uid
        last = self.offered.get(uid)
        moment = time.monotonic()
        context = PackageOfferContext(
            reported=reported,
            last_offered_on_connection=session.remembered(self, ""),
            persistent_connection=session.transport == "websocket",
            offered_at=last[1] if last is not None and last[0] == current else None,
            now=moment,
            reoffer_after_seconds=settings.OPAMP_REMOTE_CONFIG_REOFFER_SECONDS,
        )
        if not should_offer_packages(desired, context):
            return False
        base = download_base_url(session.endpoint)
        urls = {
            package.file.file_id: download_url(base=base, file_id=package.file.file_id, instance_uid=uid)
            for package in desired.packages.values()
        }
        fill_packages_available(reply, desired, urls, headers={})
        session.remember(self, current)
        self.offered[uid] = (current, moment)
        return True
