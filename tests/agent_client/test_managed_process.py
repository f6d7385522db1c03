"""The managed process on its own: started, kept running with a backoff, restarted, start-checked, stopped.

The "collector" is a small Python script written to tmp_path (tests/agent_client/managed_children.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent_client.managed_process import (
    ManagedProcess,
    ManagedProcessSettings,
    command_from_template,
    exit_reason,
)
from tests.agent_client.managed_children import (
    CRASHING,
    RUNNING,
    STUBBORN,
    eventually,
    gone,
    started_pids,
    write_child,
)


def settings_for(program: Path, **options: float) -> ManagedProcessSettings:
    # A start-check window a loaded machine's Python start-up fits in many times over.
    values = {"start_check_seconds": 2.0, "stop_grace_seconds": 2.0, "backoff_initial": 0.1, "backoff_max": 0.4}
    return ManagedProcessSettings(command=(str(program),), **{**values, **options})


@contextlib.asynccontextmanager
async def supervised(process: ManagedProcess) -> AsyncIterator[ManagedProcess]:
    process.start()
    try:
        yield process
    finally:
        async with asyncio.timeout(10):
            await process.stop()


async def test_a_running_process_is_reported_healthy_and_stopped_with_sigterm(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    changes: list[str] = []
    process = ManagedProcess(
        settings_for(write_child(tmp_path / "collector", pids, RUNNING)),
        on_change=lambda: changes.append(process.health.status),
    )
    async with supervised(process):
        await eventually(lambda: started_pids(pids), what="the first start")
        health = process.health
        assert (health.healthy, health.status, health.pid, health.last_error) == (True, "running", process.pid, "")
        assert health.start_time_unix_nano > 0 and started_pids(pids) == [process.pid]
        pid = process.pid
    assert pid is not None and gone(pid)
    assert process.pid is None
    assert (process.health.healthy, process.health.status) == (False, "stopped")
    assert process.health.start_time_unix_nano == health.start_time_unix_nano
    assert changes == ["running", "stopped"]


async def test_a_process_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    process = ManagedProcess(settings_for(write_child(tmp_path / "collector", pids, STUBBORN), stop_grace_seconds=0.3))
    async with supervised(process):
        await eventually(lambda: started_pids(pids), what="the first start")
        await asyncio.sleep(0.3)  # the SIGTERM handler is in place
        pid = process.pid
    assert pid is not None and gone(pid)


async def test_a_crashing_process_is_restarted_with_a_growing_delay_and_reported_unhealthy(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    process = ManagedProcess(settings_for(write_child(tmp_path / "collector", pids, CRASHING)))
    async with supervised(process):
        await eventually(lambda: len(started_pids(pids)) >= 4, what="four starts")
        await eventually(lambda: not process.health.healthy, what="the last exit")
        health = process.health
    assert health.status == "exited"
    assert health.last_error == "the process exited with status 1"
    assert health.pid is None and health.start_time_unix_nano > 0
    # Delays of 0.1, 0.2, 0.4, 0.4 s: four starts take at least 0.7 s, not a tight loop.
    assert process.starts >= 4


async def test_a_command_that_cannot_start_is_reported_and_retried(tmp_path: Path) -> None:
    process = ManagedProcess(settings_for(tmp_path / "missing"))
    async with supervised(process):
        await eventually(lambda: process.health.status == "cannot start", what="the failed start")
        assert process.health.last_error.startswith(f"cannot start {tmp_path / 'missing'}: ")
        assert "No such file" in process.health.last_error
    assert process.starts == 0


async def test_a_restart_starts_a_new_process_with_a_new_start_time(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    process = ManagedProcess(settings_for(write_child(tmp_path / "collector", pids, RUNNING)))
    async with supervised(process):
        await eventually(lambda: started_pids(pids), what="the first start")
        first, first_pid = process.health, process.pid
        await process.restart("asked")
        await eventually(lambda: len(started_pids(pids)) == 2, what="the second start")
        assert first_pid is not None and gone(first_pid)
        assert process.pid == started_pids(pids)[1] != first_pid
        assert process.health.healthy
        assert process.health.start_time_unix_nano > first.start_time_unix_nano
        await asyncio.sleep(0.3)
        assert len(started_pids(pids)) == 2  # the supervisor did not start a third


async def test_a_start_check_passes_when_the_process_keeps_running(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    process = ManagedProcess(settings_for(write_child(tmp_path / "collector", pids, RUNNING)))
    async with supervised(process):
        await eventually(lambda: started_pids(pids), what="the first start")
        assert await process.start_checked("new version") is None
        assert len(started_pids(pids)) == 2 and process.pid == started_pids(pids)[1]
        pid = process.pid
        assert pid is not None
        # Still supervised: a crash now is restarted.
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: len(started_pids(pids)) == 3, what="the restart after the crash")


async def test_a_failed_start_check_leaves_the_process_stopped_until_restarted(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    program = write_child(tmp_path / "collector", pids, RUNNING)
    process = ManagedProcess(settings_for(program))
    async with supervised(process):
        await eventually(lambda: started_pids(pids), what="the first start")
        write_child(program, pids, CRASHING)  # the new version
        reason = await process.start_checked("new version")
        assert reason == "the process exited with status 1 within 2 s of its start"
        await asyncio.sleep(0.5)  # longer than any retry delay
        assert len(started_pids(pids)) == 2 and process.pid is None
        assert (process.health.healthy, process.health.last_error) == (False, "the process exited with status 1")
        write_child(program, pids, RUNNING)  # switched back
        await process.restart("switched back")
        assert process.health.healthy
        await eventually(lambda: started_pids(pids)[-1:] == [process.pid], what="the start after the switch back")


async def test_a_restart_during_a_start_check_is_not_taken_for_a_failed_start(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    process = ManagedProcess(settings_for(write_child(tmp_path / "collector", pids, RUNNING)))
    async with supervised(process):
        await eventually(lambda: started_pids(pids), what="the first start")
        check = asyncio.create_task(process.start_checked("new version"))
        await eventually(lambda: len(started_pids(pids)) == 2, what="the start on the new version")
        await process.restart("the server asked")
        assert await check is None
        await eventually(lambda: len(started_pids(pids)) == 3, what="the restart's start")
        assert process.health.healthy and process.pid == started_pids(pids)[2]


async def test_a_parked_process_stays_stopped(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    process = ManagedProcess(settings_for(write_child(tmp_path / "collector", pids, RUNNING)))
    async with supervised(process):
        await eventually(lambda: started_pids(pids), what="the first start")
        pid = started_pids(pids)[0]
        await process.park("no version to run")
        await asyncio.sleep(0.5)
        assert gone(pid) and len(started_pids(pids)) == 1
        assert (process.health.status, process.health.last_error) == ("stopped", "no version to run")


def test_a_command_template_names_the_current_directory_and_the_config_directory(tmp_path: Path) -> None:
    template = ["{current}/collector", "--config", "{config_dir}/collector.yaml", "--set={{x}}"]
    command = command_from_template(template, current=tmp_path / "current", config_dir=tmp_path / "config")
    assert command == (f"{tmp_path}/current/collector", "--config", f"{tmp_path}/config/collector.yaml", "--set={x}")
    with pytest.raises(ValueError, match="needs the package"):
        command_from_template(template, current=None, config_dir=tmp_path)
    with pytest.raises(ValueError, match=r"unknown placeholder \{path\}"):
        command_from_template(["{path}"], current=None, config_dir=tmp_path)


def test_an_exit_is_told_by_its_status_or_its_signal() -> None:
    assert exit_reason(3) == "the process exited with status 3"
    assert exit_reason(-9) == "the process was killed by SIGKILL"


def test_the_settings_refuse_an_empty_command() -> None:
    with pytest.raises(ValueError, match="empty"):
        ManagedProcessSettings(command=())
