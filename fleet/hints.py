"""The hint stream: one channel-layer subscription per server process, not per socket.

A hint (fleet.hint_messages: its kind and the agents it names) travels to one well-known
group that every server process joins with one channel of its own, and each process hands
it to the live WebSocket sessions it holds (`FleetRuntime.live`, keyed by instance_uid)
and ignores the rest. A session hands a hint of a contributor's kind to that contributor
(fleet.session_contributor); revocations and takeovers are the fleet's own.

Holding a channel-layer channel per socket cost a Redis subscription to open and another
round trip to close, a receive task per socket, and a group per agent; with 18,000 agents
reconnecting to a restarted process those round trips, queued behind one lock per layer,
kept the process from ever catching up. Now a process pays one subscription for its
lifetime, and a change of 2,000 assignments is one message, not 2,000.

Hints stay hints: a lost one costs latency only (the desired-state generation log, see
rollouts.desired_cache, is checked on every agent's next message; a revoked certificate is
refused on every new connection).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, Protocol

from channels.layers import get_channel_layer

from fleet.hint_messages import HINT_GROUP, HintKind, hint_messages, publish, unpack_uids
from fleet.session_runtime import runtime

if TYPE_CHECKING:
    from fleet.session import AgentSession

logger = logging.getLogger(__name__)

# The in-memory layer forgets a group membership after a day (and a channel whose message
# expired unread); re-joining now and then keeps the process in the group on any layer.
REJOIN_SECONDS = 60.0
# New sessions are announced to the other processes in batches (a reconnect storm is a
# handful of messages a second, not one per agent).
TAKEOVER_BATCH_SECONDS = 0.05
# How long a session's handshake waits for the process's subscription the first time.
JOIN_WAIT_SECONDS = 5.0
# After a failed subscription (the layer down), how long before a new session tries again.
JOIN_RETRY_SECONDS = 5.0


class HintReceiver(Protocol):
    """What a transport holding a live session does with a hint (fleet.consumers)."""

    async def hinted(self, kind: str, generation: int | None) -> None: ...

    async def credentials_revoked(self) -> None: ...


class HintStream:
    """This process's one subscription to the hint group, and what it does with a hint."""

    def __init__(self) -> None:
        # Tells this process's own takeover announcements from the others'.
        self.origin = uuid.uuid4().hex
        self.channel_name = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._joined: asyncio.Future[None] | None = None
        self._retry_at = 0.0
        self._listener: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._claims: dict[uuid.UUID, float] = {}
        self._claims_flush: asyncio.TimerHandle | None = None

    @property
    def listening(self) -> bool:
        return self._listener is not None and not self._listener.done()

    async def start(self) -> None:
        """Subscribe once per process (per event loop: tests run one loop each); later
        calls return at once. Called by every new WebSocket session before it is accepted,
        so a hint sent after a handshake finds the process subscribed."""
        live = runtime().live
        if live.on_claim is None:
            live.on_claim = self.note_claim
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is None and time.monotonic() < self._retry_at:
                return
            self._loop = loop
            # What belonged to an earlier loop (closed: a test's) never runs again.
            self._tasks.clear()
            self._claims.clear()
            self._claims_flush = None
            self._joined = asyncio.ensure_future(self._join())
        joined = self._joined
        if joined is None or joined.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(joined), JOIN_WAIT_SECONDS)
        except TimeoutError:
            logger.warning("hint subscription not ready after %.0f s; sessions converge meanwhile", JOIN_WAIT_SECONDS)

    async def _join(self) -> None:
        layer = get_channel_layer()
        if layer is None:
            return
        try:
            channel = await layer.new_channel()
            await layer.group_add(HINT_GROUP, channel)
        except Exception:
            logger.warning("could not subscribe to hints; sessions converge on their next message", exc_info=True)
            self._loop = None
            self._retry_at = time.monotonic() + JOIN_RETRY_SECONDS
            return
        self.channel_name = channel
        self._listener = asyncio.ensure_future(self._listen(layer, channel))

    async def _listen(self, layer: Any, channel: str) -> None:
        receiving: asyncio.Future[dict[str, Any]] | None = None
        try:
            while True:
                if receiving is None:
                    receiving = asyncio.ensure_future(layer.receive(channel))
                # Waiting does not cancel the receive: cancelling it would unsubscribe.
                done, _ = await asyncio.wait({receiving}, timeout=REJOIN_SECONDS)
                if not done:
                    await self._rejoin(layer, channel)
                    continue
                finished, receiving = receiving, None
                try:
                    message = finished.result()
                except Exception:
                    logger.warning("hint receive failed; retrying", exc_info=True)
                    await asyncio.sleep(1.0)
                    continue
                try:
                    self.deliver(message)
                except Exception:
                    logger.exception("could not deliver a hint")
        finally:
            if receiving is not None:
                receiving.cancel()

    async def _rejoin(self, layer: Any, channel: str) -> None:
        try:
            await layer.group_add(HINT_GROUP, channel)
        except Exception:
            logger.warning("could not renew the hint subscription", exc_info=True)

    def deliver(self, message: dict[str, Any]) -> int:
        """Hand a hint to the sessions this process holds; how many it reached."""
        fleet = runtime()
        kind = str(message.get("kind"))
        uids = unpack_uids(message.get("uids", b""))
        live = fleet.live.by_uid
        if kind == HintKind.TAKEOVER:
            return self._taken_over(message, uids, live)
        revoked = kind == HintKind.REVOKED
        if not revoked and kind not in fleet.hint_routes:
            return 0  # a kind no contributor of this process handles
        generation = message.get("generation")
        if not isinstance(generation, int):
            generation = None
        reached = 0
        for uid in uids:
            session = live.get(uid)
            if session is None or session.closed or session.hint_receiver is None:
                continue
            receiver = session.hint_receiver
            self._spawn(receiver.credentials_revoked() if revoked else receiver.hinted(kind, generation))
            reached += 1
        return reached

    def _taken_over(self, message: dict[str, Any], uids: list[uuid.UUID], live: dict[uuid.UUID, AgentSession]) -> int:
        """The rule a process applies to its own duplicate sessions, across processes: the
        older session of the agent gives way (ties go to the larger process id)."""
        origin = str(message.get("origin", ""))
        if origin == self.origin:
            return 0  # this process applied the rule itself when the session opened
        claimed_at = message.get("claimed_at") or []
        reached = 0
        for uid, newer_at in zip(uids, claimed_at, strict=False):
            session = live.get(uid)
            if session is None or session.closed:
                continue
            if (session.claimed_at, self.origin) >= (newer_at, origin):
                continue  # ours is the newer one; the other process closes its own
            logger.info("closing %s: agent %s connected to another server process", session.remote_address, uid)
            session.taken_over_elsewhere()
            reached += 1
        return reached

    def note_claim(self, instance_uid: uuid.UUID, session: AgentSession) -> None:
        """A WebSocket session became the agent's live one here: tell the other processes."""
        if session.identity_differs:
            # A different agent behind a live uid: a process keeps its own session in that
            # case (the newcomer is given a new uid), so nothing is announced.
            return
        loop = self._loop
        if loop is None or not self.listening:
            return
        self._claims[instance_uid] = session.claimed_at
        if self._claims_flush is None:
            self._claims_flush = loop.call_later(TAKEOVER_BATCH_SECONDS, self._flush_claims)

    def _flush_claims(self) -> None:
        self._claims_flush = None
        claims, self._claims = self._claims, {}
        if not claims:
            return
        uids = list(claims)
        messages = hint_messages(HintKind.TAKEOVER, uids, origin=self.origin, claimed_at=[claims[uid] for uid in uids])
        self._spawn(publish(messages))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("a hint's delivery failed", exc_info=task.exception())

    async def drain(self) -> None:
        """Wait for the deliveries in flight (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


_stream: HintStream | None = None


def hint_stream() -> HintStream:
    global _stream
    if _stream is None:
        _stream = HintStream()
    return _stream
