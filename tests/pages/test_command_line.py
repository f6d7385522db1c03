"""A 20-agent rollout run and watched from the command line alone: `python -m agent_client
simulate` against a live server, real Celery beat advancing the rollout, and `manage.py
rollout_watch` following it to its end with the exit status of the final state."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from agent_client.remote_config import MARKER_REJECTED
from rollouts.management.commands.rollout_watch import EXIT_ROLLED_BACK, EXIT_SUCCEEDED, NO_SUCH_ROLLOUT
from tests.support.live_server import REPO_ROOT, LiveOpampServer

AGENTS = 20
MARKER = "bad-build"


def files(body: str) -> dict[str, Any]:
    return {"collector.yaml": {"body": body, "content_type": "text/yaml"}}


@pytest.fixture
def beat_server(tmp_path: Path) -> Iterator[LiveOpampServer]:
    server = LiveOpampServer(tmp_path / "server", extra_env={"OPAMP_ROLLOUT_TICK_SECONDS": "1"})
    server.start()
    server.start_celery()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def simulator(beat_server: LiveOpampServer, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    log = (tmp_path / "simulate.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent_client",
            "simulate",
            "--server",
            beat_server.ws_url,
            "--agents",
            str(AGENTS),
            "--attr",
            "service.name=watched",
            "--fail-if-contains",
            MARKER,
            "--fail-fraction",
            "0.1",
            "--apply-delay",
            "0.2",
        ],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield process
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def watch(server: LiveOpampServer, rollout_id: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", "rollout_watch", str(rollout_id), "--interval", "0.5", "--timeout", "240"],
        cwd=REPO_ROOT,
        env=server.env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def start_rollout(server: LiveOpampServer, version: dict[str, Any], stages: list[dict[str, Any]]) -> int:
    rollout = server.api_post(
        "rollouts/",
        {
            "configuration": "watched",
            "candidate_version": version["number"],
            "stages": stages,
            "apply_timeout_seconds": 30,
        },
    )
    server.api_post(f"rollouts/{rollout['id']}/start/", {})
    return int(rollout["id"])


@pytest.mark.live_server
@pytest.mark.timeout(600)
def test_a_twenty_agent_rollout_is_run_and_watched_from_the_command_line(beat_server, simulator, tmp_path):
    server = beat_server
    server.api_post("configurations/", {"name": "watched", "selector": "service.name=watched"})
    stable = server.api_post("configurations/watched/versions/", {"files": files("receivers: {}\n")})
    server.wait_for(
        lambda: server.api("configurations/watched/versions/1/status/")["applied"] == AGENTS,
        timeout=120,
        what="the simulated fleet on version 1",
    )
    good = server.api_post(
        "configurations/watched/versions/", {"files": files("receivers: {otlp: {}}\n"), "activate": False}
    )
    rollout_id = start_rollout(server, good, [{"percent": 10}, {"percent": 100}])
    result = watch(server, rollout_id)
    assert result.returncode == EXIT_SUCCEEDED, result.stdout + result.stderr
    out = result.stdout
    assert f"rollout {rollout_id} of watched: v{stable['number']} -> v{good['number']}" in out
    assert "stage_started stage 1 (running -> running)" in out  # beat advanced it while watched
    last = [line for line in out.splitlines() if line.startswith(f"rollout {rollout_id} of")][-1]
    applied = [int(n) for n in re.findall(r"stage \d \([^)]*\): (\d+)/\1 applied, 0 failed", last)]
    assert len(applied) == 2 and sum(applied) == AGENTS, last
    assert out.rstrip().endswith(f"rollout {rollout_id} succeeded")

    bad = server.api_post(
        "configurations/watched/versions/", {"files": files(f"# {MARKER}\nreceivers: {{}}\n"), "activate": False}
    )
    rollout_id = start_rollout(server, bad, [{"percent": 50}, {"percent": 100}])
    result = watch(server, rollout_id)
    assert result.returncode == EXIT_ROLLED_BACK, result.stdout + result.stderr
    out = result.stdout
    assert "budget_exceeded" in out
    assert f"rollout {rollout_id} rolled back" in out
    error = MARKER_REJECTED.format(marker=MARKER)
    assert out.count(f": {error}") >= 1  # the failed agents, each with its error
    progress = (tmp_path / "simulate.log").read_text()
    assert progress.startswith(f"simulating {AGENTS} agents against {server.ws_url}; 2 of them fail")
    assert f"{AGENTS}/{AGENTS} connected" in progress


@pytest.mark.django_db
def test_watching_a_rollout_that_does_not_exist_is_a_usage_error():
    with pytest.raises(CommandError) as refused:
        call_command("rollout_watch", "999999")
    assert str(refused.value) == NO_SUCH_ROLLOUT.format(rollout_id=999999)
