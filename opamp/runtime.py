"""Process-level checks and tuning for servers that hold many long-lived connections."""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.internal import api_implementation


class PureProtobufBackend(RuntimeError):
    pass


def protobuf_backend() -> str:
    return str(api_implementation.Type())


def require_upb() -> None:
    """Refuse to run on the pure-Python protobuf backend (measured 19x slower than upb)."""
    backend = protobuf_backend()
    if backend == "python":
        raise PureProtobufBackend(
            "protobuf is using its pure-Python backend; install a protobuf wheel with the upb "
            "extension and unset PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"
        )


def tune_gc_for_connections(threshold: tuple[int, ...], *, freeze_survivors: bool) -> None:
    """Collections that stay short while a process holds many connections.

    Start-up's heap is frozen (never scanned again). A young collection scans the young
    objects, about 1 us each here; `threshold[0]` bounds them only where few old objects
    die: CPython counts allocations minus deallocations of any generation, so a heartbeat
    that replaces an agent's old objects with new ones adds young objects but no count
    (at 18,000 agents young collections still took up to 132 ms of CPU, BENCHMARKS.md).
    `freeze_survivors`: after each collection of generation 1, what survived it (generation
    2: a connection's session, socket and snapshot) is frozen too, so no collection scans
    the fleet. With the default (100000, 50, 1000) and no freezing, an 18,000-agent process
    made young collections of 100-445 ms CPU and a generation-1 collection of 3.6 s CPU
    (BENCHMARKS.md). What is frozen is still freed by reference counting; only a reference
    cycle that becomes garbage after it was frozen stays (`frozen` in the opamp.gc summary
    shows the count): closed sessions leave none (tests/fleet/test_session_garbage.py)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*threshold)
    if freeze_survivors and freeze_after_older_collections not in gc.callbacks:
        gc.callbacks.append(freeze_after_older_collections)


def freeze_after_older_collections(phase: str, info: dict[str, int]) -> None:
    """A `gc.callbacks` entry: freeze what survived a collection of generation 1 or 2.

    At its end generations 0 and 1 are empty, so only generation 2, the objects that
    survived it, is frozen (gc.freeze moves lists: no scan)."""
    if phase == "stop" and info["generation"] >= 1:
        gc.freeze()


def collect_frozen_garbage() -> int:
    """Unfreeze, collect every generation, freeze again; the number of objects collected.

    Frozen objects are still freed by reference counting, but a reference cycle that became
    garbage after it was frozen is never collected: this is the one full collection that
    finds those (a pause of seconds at 18,000 connections, so it runs rarely)."""
    gc.unfreeze()
    collected = gc.collect()
    gc.freeze()
    return collected


class FrozenGarbageSweeper:
    """Runs `collect_frozen_garbage` every `every_seconds` in a daemon thread, and logs it.

    The safety valve of freezing survivors (tune_gc_for_connections): what is left frozen
    and unreachable, a cycle nothing foresaw, is bounded by one period's worth instead of
    growing for the life of the process."""

    def __init__(self, *, every_seconds: float, logger: logging.Logger | None = None) -> None:
        self.every_seconds = every_seconds
        self._logger = logger or logging.getLogger("opamp.gc")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def sweep(self) -> int:
        frozen_before = gc.get_freeze_count()
        started = time.perf_counter()
        collected = collect_frozen_garbage()
        self._logger.info(
            "full collection of frozen objects: %d collected of %d frozen in %.1f ms",
            collected,
            frozen_before,
            (time.perf_counter() - started) * 1000,
        )
        return collected

    def install(self) -> None:
        if self.every_seconds > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._sweep_periodically, name="gc-frozen-sweep", daemon=True)
            self._thread.start()

    def uninstall(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _sweep_periodically(self) -> None:
        while not self._stop.wait(self.every_seconds):
            self.sweep()


@dataclass
class GenerationPauses:
    """What one generation's collections cost this process since the monitor was installed."""

    collections: int = 0
    total_seconds: float = 0.0
    max_seconds: float = 0.0
    over_threshold: int = 0
    # CPU time of the collecting thread: the pause minus the time the process waited for a
    # core (on a busy machine a wall-clock pause can be mostly that).
    max_cpu_seconds: float = 0.0


@dataclass(frozen=True)
class LongPause:
    generation: int
    seconds: float
    cpu_seconds: float
    collected: int
    at: float  # wall clock (time.time()) at the end of the collection


class GcPauseMonitor:
    """Times every collection through `gc.callbacks` (start to stop, per generation).

    The callback only records: it runs wherever an allocation triggers a collection, in any
    thread and possibly in the middle of a logging call, so the log lines (each pause over
    the threshold, and a summary a bench can read) are written by `report()`, which a
    daemon thread calls every `report_every_seconds`."""

    def __init__(
        self,
        *,
        log_over_seconds: float,
        report_every_seconds: float,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.thread_time,
        logger: logging.Logger | None = None,
    ) -> None:
        self.log_over_seconds = log_over_seconds
        self.report_every_seconds = report_every_seconds
        self.generations = [GenerationPauses() for _ in range(3)]
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._logger = logger or logging.getLogger("opamp.gc")
        self._started_at: float | None = None
        self._cpu_started_at = 0.0
        # Bounded, so a process that pauses long all the time does not grow a backlog.
        self._long_pauses: deque[LongPause] = deque(maxlen=100)
        self._reported_collections = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started_at = self._clock()
            self._cpu_started_at = self._cpu_clock()
            return
        if self._started_at is None:  # installed between a collection's start and stop
            return
        seconds = self._clock() - self._started_at
        cpu_seconds = self._cpu_clock() - self._cpu_started_at
        self._started_at = None
        generation = min(info["generation"], 2)
        pauses = self.generations[generation]
        pauses.collections += 1
        pauses.total_seconds += seconds
        pauses.max_seconds = max(pauses.max_seconds, seconds)
        pauses.max_cpu_seconds = max(pauses.max_cpu_seconds, cpu_seconds)
        if seconds > self.log_over_seconds:
            pauses.over_threshold += 1
            self._long_pauses.append(LongPause(generation, seconds, cpu_seconds, info.get("collected", 0), time.time()))

    def snapshot(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "frozen": gc.get_freeze_count(),
            **{
                f"gen{generation}": {
                    "collections": pauses.collections,
                    "total_ms": round(pauses.total_seconds * 1000, 1),
                    "max_ms": round(pauses.max_seconds * 1000, 1),
                    "max_cpu_ms": round(pauses.max_cpu_seconds * 1000, 1),
                    "over_threshold": pauses.over_threshold,
                }
                for generation, pauses in enumerate(self.generations)
            },
        }

    def report(self) -> None:
        while self._long_pauses:
            pause = self._long_pauses.popleft()
            self._logger.warning(
                "gc pause of %.1f ms (%.1f ms CPU; generation %d, %d collected) at %s, over %.0f ms",
                pause.seconds * 1000,
                pause.cpu_seconds * 1000,
                pause.generation,
                pause.collected,
                time.strftime("%H:%M:%S", time.gmtime(pause.at)),
                self.log_over_seconds * 1000,
            )
        collections = sum(pauses.collections for pauses in self.generations)
        if collections != self._reported_collections:
            self._reported_collections = collections
            self._logger.info("gc pauses %s", json.dumps(self.snapshot(), separators=(",", ":")))

    def install(self) -> None:
        gc.callbacks.append(self)
        if self.report_every_seconds > 0:
            self._thread = threading.Thread(target=self._report_periodically, name="gc-pause-report", daemon=True)
            self._thread.start()

    def uninstall(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _report_periodically(self) -> None:
        while not self._stop.wait(self.report_every_seconds):
            self.report()
