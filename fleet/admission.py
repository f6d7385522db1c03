"""Admission pacing: how many connecting agents a server process takes on per second.

A restarted process has its whole share of the fleet knocking at once. Taken all at once,
the first messages queue behind each other until handshakes time out, the agents retry
and every retry costs the same work again (0 of 18,000 agents were back after 300 s). So
each process admits through a token bucket (`OPAMP_ADMISSION_RATE` tokens per second, up
to `OPAMP_ADMISSION_BURST` saved), and an agent that finds it empty is told when to come
back: `error_response{type: UNAVAILABLE, retry_info}` on a WebSocket, 503 with Retry-After
over HTTP.

A known agent whose state is unchanged (a cheap reconnect, fleet.session) costs one token;
a new agent, or one whose report must be written, costs `OPAMP_ADMISSION_FULL_COST`: its
first message costs the server that many times more work, so the bucket paces work rather
than connections, and after a restart, when nearly every agent is a cheap reconnect, the
fleet comes back at the full rate while a wave of new agents cannot starve it. Which one an
agent is shows only after its snapshot is read, so every first message takes the full cost
before any database work and a cheap reconnect gets the difference back: taking one token
first and the rest later let two agents arriving together each take one and both be
refused the rest, again at every retry.

Refused agents are spread: each refusal books the time its cost will have been refilled
after the ones refused before it, and the answer adds up to half as much again at random,
so a crowd refused in the same second does not come back in the same second.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from django.conf import settings

# A refusal never asks an agent to stay away longer than this.
MAX_RETRY_AFTER_SECONDS = 300.0
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

    def refund(self, tokens: float) -> None:
        """Give back part of what `take` took (the admission turned out cheaper)."""
        if self.enabled:
            self._refill()
            self._tokens = min(self.burst, self._tokens + tokens)

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
        return min(MAX_RETRY_AFTER_SECONDS, wait + self.rng.uniform(0.0, wait / 2))


def bucket_from_settings() -> TokenBucket:
    return TokenBucket(rate=float(settings.OPAMP_ADMISSION_RATE), burst=float(settings.OPAMP_ADMISSION_BURST))


def full_admission_cost() -> float:
    """What a new or changed agent costs; never more than the bucket can hold."""
    return min(float(settings.OPAMP_ADMISSION_FULL_COST), float(settings.OPAMP_ADMISSION_BURST))
