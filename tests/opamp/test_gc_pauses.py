import gc
import logging
import threading

import pytest

from opamp.runtime import GcPauseMonitor, freeze_after_older_collections


@pytest.fixture
def monitor():
    made = []

    def make(**kwargs):
        monitor = GcPauseMonitor(**{"log_over_seconds": 0.1, "report_every_seconds": 0, **kwargs})
        made.append(monitor)
        return monitor

    yield make
    for monitor in made:
        monitor.uninstall()


def test_a_forced_collection_is_recorded_as_generation_2(monitor):
    pauses = monitor()
    pauses.install()
    gc.collect()
    pauses.uninstall()
    gen2 = pauses.snapshot()["gen2"]
    assert gen2["collections"] >= 1
    assert gen2["total_ms"] >= 0
    assert pauses.generations[2].total_seconds > 0


def test_a_young_collection_is_recorded_by_its_generation(monitor):
    pauses = monitor()
    pauses.install()
    gc.collect(0)
    pauses.uninstall()
    assert pauses.generations[0].collections >= 1


def test_a_pause_over_the_threshold_is_counted_and_logged(monitor, caplog):
    ticks = iter([10.0, 10.25, 20.0, 20.01])
    cpu_ticks = iter([1.0, 1.2, 2.0, 2.005])
    pauses = monitor(clock=lambda: next(ticks), cpu_clock=lambda: next(cpu_ticks))
    pauses(phase="start", info={"generation": 2})
    pauses(phase="stop", info={"generation": 2, "collected": 7})
    pauses(phase="start", info={"generation": 1})
    pauses(phase="stop", info={"generation": 1, "collected": 0})
    with caplog.at_level(logging.INFO, logger="opamp.gc"):
        pauses.report()
    snapshot = pauses.snapshot()
    assert snapshot["gen2"] == {
        "collections": 1,
        "total_ms": 250.0,
        "max_ms": 250.0,
        "max_cpu_ms": 200.0,
        "over_threshold": 1,
    }
    assert snapshot["gen1"] == {
        "collections": 1,
        "total_ms": 10.0,
        "max_ms": 10.0,
        "max_cpu_ms": 5.0,
        "over_threshold": 0,
    }
    # Only this thread's lines: the process's own monitor (opamp_site.asgi, imported by other
    # tests) logs its real pauses from its report thread into the same logger.
    own = [record for record in caplog.records if record.thread == threading.get_ident()]
    warnings = [record.getMessage() for record in own if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("gc pause of 250.0 ms (200.0 ms CPU; generation 2, 7 collected)")
    assert any(record.getMessage().startswith("gc pauses {") for record in own)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="opamp.gc"):
        pauses.report()  # nothing new: no line
    assert [record for record in caplog.records if record.thread == threading.get_ident()] == []


def test_a_stop_without_its_start_is_ignored(monitor):
    pauses = monitor()
    pauses(phase="stop", info={"generation": 2, "collected": 0})
    assert pauses.generations[2].collections == 0


def test_uninstall_removes_the_callback_and_stops_the_reporter(monitor):
    pauses = monitor(report_every_seconds=0.01)
    pauses.install()
    assert pauses in gc.callbacks
    pauses.uninstall()
    assert pauses not in gc.callbacks
    assert pauses._thread is None


@pytest.fixture
def freezing_survivors():
    gc.callbacks.append(freeze_after_older_collections)
    try:
        yield
    finally:
        gc.callbacks.remove(freeze_after_older_collections)
        gc.unfreeze()


def test_what_survives_a_generation_1_collection_is_frozen(freezing_survivors):
    kept = [[index] for index in range(1000)]
    before = gc.get_freeze_count()
    gc.collect(0)
    assert gc.get_freeze_count() == before  # a young collection freezes nothing
    gc.collect(1)
    assert gc.get_freeze_count() >= before + len(kept)
