"""Rollouts' part in the OpAMP session: offering each agent its desired remote config.

Per server process (one `RemoteConfigContributor` per FleetRuntime) it keeps the cache of
its agents' desired configs (rollouts.desired_cache), catches it up with the desired-state
log, and notes what it offered in batches. When to offer is rollouts.delivery's rule.

Offers are recorded in batches: the agent's answer, not this record, is what rollouts
judge, and a lost record costs at most a repeated offer. The batch writes rows the
fleet's buffers write too, so it is made on the runtime's shared writers.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING

from django.conf import settings
from django.utils import timezone

from fleet.batched_reads import BatchedRead
from fleet.db import db
from fleet.hint_messages import HintKind
from fleet.services import AgentSnapshot
from fleet.session_contributor import ReplyFiller, ReplyPart, SessionContributor
from opamp.capabilities import AgentCapabilities, ServerCapabilities, has_capability
from opamp.proto import opamp_pb2
from rollouts.delivery import OfferContext, fill_remote_config, should_offer, wants_signature
from rollouts.desired_cache import CachedDesired, DesiredConfigCache
from rollouts.desired_state import (
    DesiredConfig,
    Offer,
    changes_since,
    desired_configs_for_agents,
    record_offers,
)

if TYPE_CHECKING:
    from fleet.session import AgentSession
    from fleet.session_runtime import FleetRuntime

REMOTE_CONFIG_CAPABILITIES = int(ServerCapabilities.OFFERS_REMOTE_CONFIG)


class RemoteConfigContributor(SessionContributor):
    name = "rollouts"
    capabilities = REMOTE_CONFIG_CAPABILITIES
    hint_kinds = (HintKind.CONFIG,)

    def __init__(self, runtime: FleetRuntime) -> None:
        self.snapshots = runtime.snapshots
        self.desired = DesiredConfigCache()
        # Desired configs not in the cache (a restart's reconnecting crowd), read in batches.
        self.desired_reads = BatchedRead[int, DesiredConfig | None](desired_configs_for_agents)
        self._catching_up: asyncio.Future[None] | None = None
        # What was offered to whom, written in batches: the agent's answer, not this
        # record, is what rollouts judge, and a lost record costs at most a repeated offer.
        self.offers = runtime.batched_writes(
            name="offer", flush_seconds=settings.OPAMP_HEARTBEAT_FLUSH_SECONDS, write=record_offers
        )

    def reply_fillers(self) -> Sequence[tuple[ReplyPart, ReplyFiller]]:
        return ((ReplyPart.REMOTE_CONFIG, self.offer_desired_config),)

    async def on_hint(self, session: AgentSession, snapshot: AgentSnapshot, kind: str, generation: int | None) -> None:
        """`generation`: the hint is for an assignment change logged under it (see
        `catch_up`); without one the agent's desired config is read again on its own."""
        if generation is None:
            self.desired.forget(snapshot.instance_uid)
        else:
            await self.catch_up(at_least=generation)

    def hint_sent_here(self, kind: HintKind, generation: int | None) -> None:
        # This process changed assignments: the next desired-state read catches up with
        # the change log first.
        self.desired.expire()

    def agent_changed(self, instance_uid: uuid.UUID) -> None:
        self.desired.forget(instance_uid)  # its labels may have changed

    def forget(self, instance_uid: uuid.UUID) -> None:
        self.desired.forget(instance_uid)

    async def catch_up(self, *, at_least: int | None = None) -> None:
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
        self._catching_up = asyncio.ensure_future(self._catch_up())
        await asyncio.shield(self._catching_up)

    async def _catch_up(self) -> None:
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

    async def offer_desired_config(
        self, session: AgentSession, reply: opamp_pb2.ServerToAgent, snapshot: AgentSnapshot, now: datetime | None
    ) -> bool:
        if not has_capability(snapshot.capabilities, AgentCapabilities.ACCEPTS_REMOTE_CONFIG):
            return False
        desired = await self._desired_config(snapshot)
        # The hash last offered on this connection.
        last_offered: str = session.remembered(self, "")
        context = OfferContext(
            capabilities=snapshot.capabilities,
            reported_hash=snapshot.remote_config_hash,
            last_offered_on_connection=last_offered,
            persistent_connection=session.transport == "websocket",
            now_timestamp=time.time(),
            reoffer_after_seconds=settings.OPAMP_REMOTE_CONFIG_REOFFER_SECONDS,
        )
        if desired is not None and desired.config_hash == last_offered != desired.offered_hash:
            # The stored record no longer names this connection's offer: forgotten on
            # purpose (rollouts.resend), or not written yet (then one repeated offer).
            context = replace(context, last_offered_on_connection="")
        if desired is None or not should_offer(desired, context):
            return False
        fill_remote_config(reply, desired, with_signature=wants_signature(snapshot.custom_capabilities))
        session.remember(self, desired.config_hash)
        self.offers.note(snapshot.agent_id, Offer(desired.config_hash, timezone.now(), desired.version_id))
        cached = self.desired.get(snapshot.instance_uid)
        if cached is not None and cached.desired is desired:  # unless a change overtook it
            cached.desired = replace(
                desired, offered_hash=desired.config_hash, offered_at_timestamp=context.now_timestamp
            )
        return True

    async def _desired_config(self, snapshot: AgentSnapshot) -> DesiredConfig | None:
        cache = self.desired
        if cache.check_due():
            await self.catch_up()
        cached = cache.get(snapshot.instance_uid)
        if cached is not None:
            return cached.desired
        tag = cache.generation
        desired = await self.desired_reads.get(snapshot.agent_id)
        cache.put(snapshot.instance_uid, CachedDesired(generation=tag, agent_id=snapshot.agent_id, desired=desired))
        return desired
