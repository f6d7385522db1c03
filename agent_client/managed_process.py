"""The process an agent in supervisor mode runs: started, kept running, restarted, stopped.

An OpAMP supervisor runs its collector as a child process; `ManagedProcess` is that child's
keeper. `start()` starts it at once and supervises it (an asyncio task): a process that
exits unexpectedly is started again after a delay that doubles from `backoff_initial` to
`backoff_max` with each exit in a row (a process that ran for at least the start-check
window starts the count over). `restart()` (the server's Restart command) stops it and
starts it again; `start_checked()` (a new package version switched to) does the same and
then watches it for `start_check_seconds`: it passes when the process is still running
then, and fails with the exit status otherwise, leaving the process stopped for the
caller (the package install) to switch back and `restart()` it on the previous version,
or to `park()` it when there is none. `stop()` ends the supervision and the process.

A process is stopped with SIGTERM, then SIGKILL after `stop_grace_seconds`. It runs in a
session of its own (its own process group, which both signals reach), so a Ctrl-C meant
for the agent reaches it only through the agent's orderly stop.

`health` is what the agent reports as its ComponentHealth: healthy while the process runs,
its start time, its pid, and the last exit status as `last_error`; `on_change` is called
on every change, so the agent can report it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = [
    "DEFAULT_START_CHECK_SECONDS",
    "ManagedProcess",
    "ManagedProcessSettings",
    "ProcessHealth",
    "command_from_template",
    "exit_reason",
]

logger = logging.getLogger("agent_client")

DEFAULT_START_CHECK_SECONDS = 3.0

STATUS_NOT_STARTED = "not started"
STATUS_RUNNING = "running"
STATUS_EXITED = "exited"
STATUS_CANNOT_START = "cannot start"
STATUS_STOPPED = "stopped"

CANNOT_START = "cannot start {program}: {error}"
EXITED_IN_WINDOW = "{reason} within {seconds:g} s of its start"
STOPPED_IN_WINDOW = "the process was stopped within {seconds:g} s of its start"

# The placeholders a command template may use (see `command_from_template`).
PLACEHOLDERS = ("current", "config_dir")


@dataclass(frozen=True)
class ManagedProcessSettings:
    """The process an agent runs (`command`, its argv) and how it is kept running.

    `package` names the package the process runs from: installing a version of it restarts
    the process on that version, and the process deciding whether the version starts is
    the package's start check (`agent_client.packages.install_package`).
    """

    command: tuple[str, ...]
    package: str | None = None
    # Seconds a (re)started process must stay up for a new package version to count as started.
    start_check_seconds: float = DEFAULT_START_CHECK_SECONDS
    # Seconds between SIGTERM and SIGKILL when the process is stopped.
    stop_grace_seconds: float = 5.0
    backoff_initial: float = 1.0
    backoff_max: float = 30.0

    def __post_init__(self) -> None:
        if not self.command or not self.command[0]:
            raise ValueError("the managed command is empty")
        for name in ("start_check_seconds", "stop_grace_seconds", "backoff_initial"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max must not be below backoff_initial")


@dataclass(frozen=True)
class ProcessHealth:
    """The managed process as the agent reports it (times in Unix nanoseconds)."""

    healthy: bool
    status: str
    last_error: str = ""
    start_time_unix_nano: int = 0
    status_time_unix_nano: int = 0
    pid: int | None = None


def command_from_template(template: Sequence[str], *, current: Path | None, config_dir: Path) -> tuple[str, ...]:
    """`template` with `{current}` (the managed package's `current` directory) and
    `{config_dir}` (where the applied config files are) replaced; `{{` and `}}` are literal
    braces. ValueError for another placeholder, or `{current}` without a managed package."""
    values = {"config_dir": str(config_dir)}
    if current is not None:
        values["current"] = str(current)
    command = []
    for part in template:
        try:
            command.append(part.format_map(values))
        except KeyError as error:
            name = error.args[0]
            if name == "current":
                raise ValueError("{current} needs the package the process runs from") from None
            raise ValueError(f"unknown placeholder {{{name}}} (known: {', '.join(PLACEHOLDERS)})") from None
        except (ValueError, IndexError) as error:
            raise ValueError(f"bad template {part!r}: {error}") from None
    return tuple(command)


def exit_reason(returncode: int) -> str:
    """A process's exit as a sentence: its status, or the signal that ended it."""
    if returncode >= 0:
        return f"the process exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"the process was killed by {name}"


class ManagedProcess:
    """One supervised child process (see the module's docstring)."""

    def __init__(
        self,
        settings: ManagedProcessSettings,
        *,
        on_change: Callable[[], None] | None = None,
        log: logging.LoggerAdapter[logging.Logger] | logging.Logger = logger,
    ) -> None:
        self.settings = settings
        self._on_change = on_change or (lambda: None)
        self._log = log
        self._process: asyncio.subprocess.Process | None = None
        self._health = ProcessHealth(healthy=False, status=STATUS_NOT_STARTED, status_time_unix_nano=time.time_ns())
        # One start or stop at a time: a restart, a start check and the supervisor's own
        # restart never interleave their signals and spawns.
        self._control = asyncio.Lock()
        # Parked: a process that is not running stays so until someone starts it (a start
        # check judging a new version, a package with no version left, the agent stopping).
        self._parked = False
        self._wake = asyncio.Event()
        self._exits_in_a_row = 0
        self._retry_at = 0.0  # event loop time
        self._started_at = 0.0  # event loop time of the last start
        # The last process stopped on purpose (a restart, a park, the agent stopping), so an
        # exit it caused is not taken for a crash.
        self._stopped_on_purpose: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._requests: set[asyncio.Task[None]] = set()
        # Times the process was started, first start included.
        self.starts = 0

    @property
    def health(self) -> ProcessHealth:
        return self._health

    @property
    def pid(self) -> int | None:
        """The running process's pid; None when none runs."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the process and supervise it (call within the running event loop)."""
        if self._supervisor is None:
            self._parked = False
            self._supervisor = asyncio.create_task(self._supervise(), name="managed process")

    async def stop(self) -> None:
        """Stop supervising, then stop the process (SIGTERM, SIGKILL after the grace)."""
        tasks = [task for task in (self._supervisor, *self._requests) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._supervisor = None
        async with self._control:
            self._parked = True
            if await self._terminate():
                self._log.info("stopped the managed process")
            self._set_health(self._not_running(STATUS_STOPPED))

    def request_restart(self, reason: str) -> None:
        """`restart()` in a task of its own: the caller does not wait for the stop's grace."""
        task = asyncio.create_task(self.restart(reason), name="managed process restart")
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    async def restart(self, reason: str) -> None:
        """Stop the process (if it runs) and start it again, supervised."""
        async with self._control:
            self._log.info("restarting the managed process: %s", reason)
            self._parked = False
            self._exits_in_a_row = 0
            await self._terminate()
            await self._spawn()
        self._wake.set()

    async def park(self, reason: str) -> None:
        """Stop the process and leave it stopped (`reason` is reported) until `restart()`."""
        async with self._control:
            self._parked = True
            await self._terminate()
            self._log.warning("the managed process stays stopped: %s", reason)
            self._set_health(self._not_running(STATUS_STOPPED, reason))
        self._wake.set()

    async def start_checked(self, reason: str) -> str | None:
        """Restart the process and watch it through the start-check window: None when it
        still runs then (it stays supervised), else why not (it is left stopped)."""
        async with self._control:
            self._log.info("restarting the managed process: %s", reason)
            # Whatever becomes of the process now is the check's to judge: not restarted.
            self._parked = True
            self._exits_in_a_row = 0
            await self._terminate()
            await self._spawn()
            process = self._process
        self._wake.set()
        if process is None:
            return self._health.last_error
        seconds = self.settings.start_check_seconds
        deadline = asyncio.get_running_loop().time() + seconds
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await process.wait()
            async with self._control:
                if process.returncode is None:
                    if self._process is process:
                        self._parked = False
                    return None
                replacement = self._process
                if process is not self._stopped_on_purpose:
                    if replacement is process:
                        self._exited(process)
                    return EXITED_IN_WINDOW.format(reason=exit_reason(process.returncode), seconds=seconds)
                if replacement is None:
                    return STOPPED_IN_WINDOW.format(seconds=seconds)
                # A restart (the server's Restart command) ended it, not the version: the
                # process started in its place runs the same version and is judged instead.
                self._parked = True
                process = replacement

    # -- supervision ---------------------------------------------------------------------

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            process = self._process
            if process is not None:
                # Every deliberate stop ends this wait too: the loop then looks again.
                await process.wait()
                async with self._control:
                    if self._process is process:
                        self._exited(process)
                continue
            wait = None if self._parked else self._retry_at - loop.time()
            if wait is None or wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                continue
            async with self._control:
                if self._process is None and not self._parked:
                    await self._spawn()

    async def _spawn(self) -> None:
        """Start the process (under `_control`); a failure is reported and retried later."""
        loop = asyncio.get_running_loop()
        command = self.settings.command
        try:
            process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, start_new_session=True
            )
        except OSError as error:
            reason = CANNOT_START.format(program=command[0], error=error)
            delay = self._schedule_retry()
            self._log.error("%s; trying again in %.1f s", reason, delay)
            self._set_health(self._not_running(STATUS_CANNOT_START, reason))
            return
        self._process = process
        self._started_at = loop.time()
        self.starts += 1
        now = time.time_ns()
        self._log.info("started the managed process (pid %d): %s", process.pid, " ".join(command))
        running = ProcessHealth(healthy=True, status=STATUS_RUNNING, pid=process.pid)
        self._set_health(replace(running, start_time_unix_nano=now, status_time_unix_nano=now))

    def _exited(self, process: asyncio.subprocess.Process) -> None:
        """Note an exit nobody asked for (under `_control`)."""
        assert process.returncode is not None
        self._process = None
        if asyncio.get_running_loop().time() - self._started_at >= self.settings.start_check_seconds:
            self._exits_in_a_row = 0  # it had started: a crash after a while is retried quickly
        reason = exit_reason(process.returncode)
        delay = self._schedule_retry()
        then = "" if self._parked else f"; restarting in {delay:.1f} s"
        self._log.warning("the managed process (pid %d) stopped: %s%s", process.pid, reason, then)
        self._set_health(self._not_running(STATUS_EXITED, reason))

    def _schedule_retry(self) -> float:
        settings = self.settings
        delay = min(settings.backoff_max, settings.backoff_initial * 2.0 ** min(self._exits_in_a_row, 32))
        self._exits_in_a_row += 1
        self._retry_at = asyncio.get_running_loop().time() + delay
        return delay

    async def _terminate(self) -> bool:
        """Stop the process (under `_control`): SIGTERM, SIGKILL after the grace. False when
        none was running."""
        process = self._process
        if process is None:
            return False
        if process.returncode is None:
            self._stopped_on_purpose = process
            self._signal(process, signal.SIGTERM)
            try:
                async with asyncio.timeout(self.settings.stop_grace_seconds):
                    await process.wait()
            except TimeoutError:
                self._log.warning(
                    "the managed process (pid %d) ignored SIGTERM for %g s: killing it",
                    process.pid,
                    self.settings.stop_grace_seconds,
                )
                self._signal(process, signal.SIGKILL)
                await process.wait()
        # Only now: a stop cut short leaves the process known, for `stop()` to finish.
        self._process = None
        return True

    @staticmethod
    def _signal(process: asyncio.subprocess.Process, signum: signal.Signals) -> None:
        # The process leads a group of its own (start_new_session): its children go too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)

    def _not_running(self, status: str, reason: str = "") -> ProcessHealth:
        """Not running since now; the start time stays the last start's."""
        return ProcessHealth(
            healthy=False,
            status=status,
            last_error=reason,
            start_time_unix_nano=self._health.start_time_unix_nano,
            status_time_unix_nano=time.time_ns(),
        )

    def _set_health(self, health: ProcessHealth) -> None:
        self._health = health
        self._on_change()
