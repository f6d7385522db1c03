"""Freezing survivors keeps collections short; the periodic sweep still frees frozen cycles."""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Iterator

import pytest

from opamp.runtime import FrozenGarbageSweeper, collect_frozen_garbage


class Node:
    def __init__(self) -> None:
        self.partner: Node | None = None


@pytest.fixture
def frozen_cycle() -> Iterator[weakref.ref[Node]]:
    """A two-object cycle that was alive when frozen and is garbage now."""
    first, second = Node(), Node()
    first.partner, second.partner = second, first
    gc.freeze()
    watched = weakref.ref(first)
    del first, second
    yield watched
    gc.unfreeze()


def test_a_cycle_that_died_frozen_survives_ordinary_collections(frozen_cycle: weakref.ref[Node]):
    gc.collect()
    assert frozen_cycle() is not None


def test_collecting_frozen_garbage_frees_it_and_freezes_the_rest_again(frozen_cycle: weakref.ref[Node]):
    assert collect_frozen_garbage() >= 2
    assert frozen_cycle() is None
    assert gc.get_freeze_count() > 0


def test_the_sweeper_logs_what_it_collected(frozen_cycle: weakref.ref[Node], caplog: pytest.LogCaptureFixture):
    sweeper = FrozenGarbageSweeper(every_seconds=0, logger=logging.getLogger("opamp.gc.sweep-test"))
    with caplog.at_level(logging.INFO, logger="opamp.gc.sweep-test"):
        assert sweeper.sweep() >= 2
    assert frozen_cycle() is None
    (record,) = [r for r in caplog.records if r.name == "opamp.gc.sweep-test"]
    assert "full collection of frozen objects" in record.getMessage()


def test_a_period_of_zero_starts_no_thread():
    sweeper = FrozenGarbageSweeper(every_seconds=0)
    sweeper.install()
    assert not sweeper.running
    sweeper.uninstall()
