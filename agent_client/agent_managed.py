"""Supervisor mode: the agent runs a process (`AgentSettings.managed`) and answers for it.

The process (`agent_client.managed_process.ManagedProcess`) starts when the agent starts
running, once its state is loaded (it does not wait for the server: an agent that cannot
reach its server still runs its collector), is kept running across sessions, and stops
when the agent stops. The agent's reported health is the process's (healthy while it
runs, its start time and pid, the last exit status as `last_error`), sent at once on every
change while a session is open, and in every full report.

A Restart command restarts the process and not the agent (the session goes on), and so
does an applied remote config (the process reads its files when it starts). A new
version of the package the process runs from (`ManagedProcessSettings.package`) restarts
it on that version, and it is the version's start check: `_package_runner` hands it to
`agent_client.packages.install_package`, which calls it from the install's thread.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from agent_client import report
from agent_client.agent_base import AgentBase
from agent_client.managed_process import ManagedProcess
from agent_client.packages import PackageRunner
from opamp.proto import opamp_pb2 as pb


class ManagedProcessHandling(AgentBase):
    """The managed process for `agent_client.agent.Agent`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        managed = self.settings.managed
        # Set on every change of the process's health; the session reports it.
        self._health_changed = asyncio.Event()
        self._managed = (
            ManagedProcess(managed, on_change=self._health_changed.set, log=self._log) if managed is not None else None
        )

    @property
    def managed_process(self) -> ManagedProcess | None:
        return self._managed

    def _health(self) -> pb.ComponentHealth:
        if self._managed is None:
            return super()._health()
        return report.process_health(self._managed.health)

    def _config_applied(self) -> None:
        # The process reads its config when it starts: a new one takes a restart.
        if self._managed is not None:
            self._managed.request_restart("a new remote config was applied")

    def _package_runner(self) -> PackageRunner | None:
        if self._managed is None:
            return None
        return _ThreadRunner(self._managed, asyncio.get_running_loop())

    async def _health_loop(self) -> None:
        """Report the process's health on every change (a task of the session)."""
        while True:
            await self._health_changed.wait()
            self._health_changed.clear()
            await self._send_report(health=True)


class _ThreadRunner:
    """The managed process as `install_package`'s runner: called from the install's thread,
    carried out on the agent's event loop."""

    def __init__(self, process: ManagedProcess, loop: asyncio.AbstractEventLoop) -> None:
        self._process = process
        self._loop = loop

    def runs(self, name: str) -> bool:
        return name == self._process.settings.package

    def start_checked(self, name: str, version: str, path: Path) -> str | None:
        work = self._process.start_checked(f"package {name} {version} switched to")
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def restart(self, name: str, version: str | None) -> None:
        if version is None:
            work = self._process.park(f"package {name} has no version to run")
        else:
            work = self._process.restart(f"package {name} switched back to {version}")
        asyncio.run_coroutine_threadsafe(work, self._loop).result()
