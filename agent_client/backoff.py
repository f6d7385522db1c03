"""Reconnect delays: exponential backoff with full jitter, raised to any server hint.

Full jitter (a uniform draw between 0 and the current ceiling) spreads a fleet that lost
its server at the same instant, so the reconnect storm after a server restart is a ramp
rather than a wall. A server hint (`retry_info`, `Retry-After`) is a lower bound: the
server knows its load better than the agent does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays that double from `initial` up to `maximum`, each drawn with full jitter."""

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial or self.multiplier < 1:
            raise ValueError("backoff needs 0 < initial <= maximum and multiplier >= 1")

    def ceiling(self) -> float:
        """The largest delay the next attempt may draw."""
        return min(self.maximum, self.initial * self.multiplier**self.attempt)

    def next_delay(self, *, at_least: float | None = None) -> float:
        """The delay before the next attempt; never shorter than `at_least`."""
        ceiling = self.ceiling()
        # Stop counting once the ceiling is reached so the power cannot overflow.
        if ceiling < self.maximum:
            self.attempt += 1
        delay = self.rng.uniform(0.0, ceiling)
        if at_least is not None:
            delay = max(delay, at_least)
        return delay

    def reset(self) -> None:
        """Called after a successful exchange: the next failure starts small again."""
        self.attempt = 0
