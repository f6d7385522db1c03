"""Supervisor mode end to end: a server process as production starts it, signing package
files with its configured key, and one `python -m agent_client run --managed-command` process
running a "collector" (a small Python script, uploaded as a package) as its child.

The collector is installed from a package assignment and started on it; the API shows the
agent healthy with the child's pid and start time. A Restart from the API restarts the child
once (a new pid, a later start time in the API's health), while the agent process keeps
running and keeps its connection. A version whose collector exits at once is reported
InstallFailed with the reason, `current` switches back, and the collector runs on the
previous version again.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from tests.agent_client.managed_children import CRASHING, RUNNING, alive, child_script, started_pids
from tests.support.live_server import LiveOpampServer
from tests.support.processes import AgentProcess, agent_client_run

pytestmark = [pytest.mark.live_server]

PACKAGE = "collector"
START_CHECK_SECONDS = 2
# Heartbeats enough for a second restart, had the command been delivered twice.
QUIET_SECONDS = 4.0


def start_agent(server: LiveOpampServer, root: Path, public_key: Path, service: str) -> AgentProcess:
    command = agent_client_run(
        server.ws_url,
        root / "state",
        "--packages-dir",
        str(root / "packages"),
        "--trusted-key",
        str(public_key),
        "--attr",
        f"service.name={service}",
        "--heartbeat",
        "1",
        "--managed-package",
        PACKAGE,
        "--managed-command",
        "{current}/" + PACKAGE,
        "--managed-start-check",
        str(START_CHECK_SECONDS),
    )
    return AgentProcess(command, root / "logs", name="agent", env=dict(os.environ))


def child_pid(health: dict[str, Any]) -> int | None:
    pid = (health.get("attributes") or {}).get("process.pid")
    return int(pid) if pid is not None else None


def test_a_restart_restarts_the_collector_once_and_a_version_that_does_not_start_is_switched_back(
    signing_server: tuple[LiveOpampServer, Path], tmp_path: Path
) -> None:
    server, public_key = signing_server
    service = f"managed-{secrets.token_hex(3)}"
    pids = tmp_path / "pids"
    server.api_post("packages/", {"name": PACKAGE, "type": "top_level"})
    server.upload_package(PACKAGE, "1.0.0", child_script(pids, RUNNING))
    server.upload_package(PACKAGE, "2.0.0", child_script(pids, CRASHING))
    agent = start_agent(server, tmp_path / "agent", public_key, service)
    try:
        rows = server.wait_for(lambda: server.agents(attribute=f"service.name={service}"), what="the agent registered")
        uid = rows[0]["instance_uid"]

        def agent_row() -> dict[str, Any]:
            return dict(server.api(f"agents/{uid}/"))

        def running_health(*, not_pids: set[int]) -> dict[str, Any] | None:
            health = agent_row().get("health") or {}
            pid = child_pid(health)
            return health if health.get("healthy") and pid is not None and pid not in not_pids else None

        server.api_post(
            "package-assignments/",
            {"name": service, "package": PACKAGE, "version": "1.0.0", "selector": f"service.name={service}"},
        )

        def package_status(wanted: str) -> dict[str, Any] | None:
            packages = (agent_row().get("package_statuses") or {}).get("packages") or {}
            status = packages.get(PACKAGE) or {}
            return status if status.get("status") == wanted else None

        installed = server.wait_for(lambda: package_status("Installed"), timeout=60, what="1.0.0 installed")
        assert installed["agent_has_version"] == "1.0.0"
        first = server.wait_for(lambda: running_health(not_pids=set()), timeout=30, what="the collector on 1.0.0")
        first_pid = child_pid(first)
        assert first["status"] == "running" and first["last_error"] == ""
        server.wait_for(lambda: started_pids(pids) == [first_pid], what="the collector's own note of its start")
        connected_at = agent_row()["connected_at"]

        # -- a Restart from the API ----------------------------------------------------------
        answer = server.api_post(f"agents/{uid}/restart/", {})
        assert answer["requested"] == 1, answer
        second = server.wait_for(
            lambda: running_health(not_pids={first_pid}), timeout=30, what="the collector restarted"
        )
        second_pid = child_pid(second)
        assert int(second["start_time_unix_nano"]) > int(first["start_time_unix_nano"])
        assert first_pid is not None and not alive(first_pid)
        time.sleep(QUIET_SECONDS)
        assert started_pids(pids) == [first_pid, second_pid]  # restarted once
        assert agent.process.poll() is None, agent.output()  # the agent itself kept running
        assert agent_row()["connected_at"] == connected_at  # on the same connection
        commands = [c for c in server.api("commands/", limit=100)["results"] if c["instance_uid"] == uid]
        assert [(c["state"], c["reconnected_since"]) for c in commands] == [("delivered", False)]

        # -- a version whose collector does not start ----------------------------------------
        server.api_post(f"package-assignments/{service}/", {"version": "2.0.0"}, method="PATCH")

        status = server.wait_for(lambda: package_status("InstallFailed"), timeout=60, what="2.0.0 reported failed")
        assert (status["agent_has_version"], status["server_offered_version"]) == ("1.0.0", "2.0.0")
        assert status["error_message"] == (
            f"start check failed: the process exited with status 1 within {START_CHECK_SECONDS} s of its start; "
            "reverted to 1.0.0"
        )
        assert os.readlink(tmp_path / "agent" / "packages" / PACKAGE / "current") == "1.0.0"
        third = server.wait_for(
            lambda: running_health(not_pids={first_pid, second_pid, *started_pids(pids)[2:3]}),
            timeout=30,
            what="the collector on 1.0.0 again",
        )
        # Started on 2.0.0 (which exited at once), then on 1.0.0 again.
        assert started_pids(pids)[:2] == [first_pid, second_pid] and len(started_pids(pids)) == 4
        assert child_pid(third) == started_pids(pids)[3] and alive(started_pids(pids)[3])
        assert agent.process.poll() is None, agent.output()
    finally:
        code = agent.stop()
    assert code == 0, agent.output()
    assert not any(alive(pid) for pid in started_pids(pids))  # the collector stopped with the agent
