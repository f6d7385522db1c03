"""What the cyclic garbage collector finds, for tests that want none of some objects there."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager


class Garbage:
    """What the collector finds from `start()` on, kept for a look (gc.DEBUG_SAVEALL); the
    collector runs only when asked."""

    def __init__(self) -> None:
        self.found: list[object] = []

    def start(self) -> None:
        """Count from here: what earlier work (the database set-up, imports, the first
        query) left is freed first."""
        gc.set_debug(0)
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)

    def collect(self) -> Counter[str]:
        """Collect, keep what was found; its count by type (for an assertion's message)."""
        gc.collect()
        self.found = list(gc.garbage)
        gc.garbage.clear()
        return Counter(type(thing).__qualname__ for thing in self.found)

    def of_types(self, *types: type) -> list[object]:
        return [thing for thing in self.found if isinstance(thing, types)]


@contextmanager
def collector_held() -> Iterator[Garbage]:
    """The collector off (it would free, unseen, what the test looks for) until the end."""
    gc.disable()
    kept = Garbage()
    try:
        yield kept
    finally:
        gc.set_debug(0)
        kept.found.clear()
        gc.garbage.clear()
        gc.enable()
        gc.collect()
