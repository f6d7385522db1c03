"""Admission pacing: how many connecting agents a server process takes on per second.

A restarted process has its whole share of the fleet knocking at once. Taken all at once,
the first messages queue behind each other until handshakes time out, the agents retry
and every retry costs the same work again (0 of 18,000 agents were back after 300 s). So
each process admits through a token bucket (`OPAMP_ADMISSION_RATE` tokens per second, up
to `OPAMP_ADMISSION_BURST` saved), and an agent that finds it empty is told when to come
back: `error_response{type: UNAVAILABLE, retry_info}` on a WebSocket, 503 with Retry-After
over HTTP.

A connection is priced once its snapshot is read (one query shared by the agents arriving
together, fleet.batched_reads), so a refusal is booked at the price the agent will pay:
a known agent whose state is unchanged (a cheap reconnect, fleet.session) costs
`OPAMP_ADMISSION_RECONNECT_COST`; a new agent, or one whose report must be written,
`OPAMP_ADMISSION_FULL_COST`: its first message costs the server that many times more
work. So the bucket paces work rather than connections: after a restart, when nearly every
agent is a cheap reconnect, the fleet comes back at the rate the process serves
reconnects, while a wave of new agents still cannot take more than its share. (Priced at
the full cost before the snapshot was read, with the difference given back after, every
refused reconnect was booked at the full cost: an 18,000-agent restart came back at
300 / 4 = 75 agents/s, 232 s, with the process's CPU half idle.) The price is taken whole:
taking part first and the rest later let two agents arriving together each take a part
and both be refused, again at every retry.

Refused agents are spread: each refusal books the time its cost will have been refilled
after the ones refused before it, which already gives every refused agent a turn of its
own, and the answer adds up to a tenth as much again at random, so agents refused
together by different processes do not come back in step. (Half as much again stretched a
restart's last turns by half: the bucket's tokens refilled while nobody was due.)
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from django.conf import settings

# A refusal never asks an agent to stay away longer than this.
MAX_RETRY_AFTER_SECONDS = 300.0
# A refused agent's wait is lengthened by up to this share of it, at random.
JITTER_SHARE = 0.1
# Refill arithmetic on float seconds must not refuse a token that is due.
_EPSILON = 1e-9
UNAVAILABLE_MESSAGE = "the server is admitting other agents; come back after retry_info"


@dataclass
class TokenBucket:
    """`rate` tokens per second, at most `burst` saved; `rate` <= 0 admits everything."""

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self._tokens = self.burst
        self._updated = self.clock()
        # Until when the agents refused so far were told to wait (a virtual queue).
        self._booked_until = self._updated

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def _refill(self) -> float:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        return now

    def take(self, cost: float = 1.0) -> float | None:
        """Take `cost` tokens: None when admitted, else the seconds to wait (jittered)."""
        if not self.enabled:
            return None
        now = self._refill()
        if self._tokens + _EPSILON >= cost:
            self._tokens = max(0.0, self._tokens - cost)
            return None
        return self._refusal(now, cost)

    def would_refuse(self, cost: float = 1.0) -> float | None:
        """Like `take` without taking: the seconds to wait when `cost` is not there now."""
        if not self.enabled:
            return None
        now = self._refill()
        return None if self._tokens + _EPSILON >= cost else self._refusal(now, cost)

    def _refusal(self, now: float, cost: float) -> float:
        # When this agent's cost will have been refilled, after those already told to
        # come back before it (a negative balance is what earlier refusals were promised).
        self._booked_until = max(self._booked_until, now - self._tokens / self.rate) + cost / self.rate
        wait = self._booked_until - now
        return min(MAX_RETRY_AFTER_SECONDS, wait + self.rng.uniform(0.0, wait * JITTER_SHARE))


def bucket_from_settings() -> TokenBucket:
    return TokenBucket(rate=float(settings.OPAMP_ADMISSION_RATE), burst=float(settings.OPAMP_ADMISSION_BURST))


def full_admission_cost() -> float:
    """What a new or changed agent costs; never more than the bucket can hold."""
    return min(float(settings.OPAMP_ADMISSION_FULL_COST), float(settings.OPAMP_ADMISSION_BURST))


def reconnect_admission_cost() -> float:
    """What a known agent reconnecting unchanged costs; never more than the full cost."""
    return min(float(settings.OPAMP_ADMISSION_RECONNECT_COST), full_admission_cost())
