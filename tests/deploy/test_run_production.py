"""The one command that starts the whole production profile (`deploy/run_production.py`).

Run as a user runs it: its own process group (a terminal's foreground job), two server
processes behind nginx, an agent connecting over wss through nginx. A server process that
dies is started again and the agent comes back through nginx; Ctrl-C or a SIGTERM to the
whole group (a terminal, `timeout`, a container runtime) stops everything cleanly, with
nothing restarted on the way out.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.deploy.nginx import find_nginx
from tests.support.live_server import REPO_ROOT, ServerDatabase, free_port, production_profile
from tests.support.processes import AgentProcess

pytestmark = [
    pytest.mark.live_server,
    pytest.mark.skipif(
        not production_profile(),
        reason="needs PostgreSQL and Redis: OPAMP_TEST_PROFILE=production",
    ),
]

START_TIMEOUT_SECONDS = 180.0


def two_free_ports() -> int:
    """A port p with p + 1 free too: the profile's server processes take consecutive ports."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def children_of(pid: int) -> dict[int, str]:
    """Live child processes of `pid`: pid -> command line."""
    children = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children[int(entry.name)] = command
    return children


class Profile:
    def __init__(self, workdir: Path, database_url: str, nginx: str) -> None:
        self.workdir = workdir
        self.listen = f"127.0.0.1:{free_port()}"
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            # Shared by the profile and the management commands run beside it, as an
            # operator's environment would be.
            "DJANGO_SECRET_KEY": secrets.token_urlsafe(48),
            "PATH": f"{Path(nginx).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.stdout = workdir / "run_production.out"
        self.stderr = workdir / "run_production.err"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "deploy/run_production.py",
                "--processes",
                "2",
                "--first-port",
                str(two_free_ports()),
                "--listen",
                self.listen,
                "--workdir",
                str(workdir / "profile"),
                "--no-celery",
            ],
            cwd=REPO_ROOT,
            env=self.env,
            stdout=self.stdout.open("wb"),
            stderr=self.stderr.open("wb"),
            start_new_session=True,  # a process group of its own, as a terminal's job has
        )

    @property
    def ca_file(self) -> Path:
        return self.workdir / "profile" / "tls" / "server-ca.pem"

    def output(self) -> str:
        return f"--- stdout ---\n{self.stdout.read_text()[-3000:]}\n--- stderr ---\n{self.stderr.read_text()[-3000:]}"

    def wait_for_output(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.stdout.read_text():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no {text!r} from run_production.py\n{self.output()}")

    def server_pids(self) -> list[int]:
        return sorted(pid for pid, command in children_of(self.process.pid).items() if "opamp_site.server" in command)

    def manage(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=REPO_ROOT,
            env={**self.env, "OPAMP_VAR_DIR": str(self.workdir / "profile" / "var")},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return result.stdout

    def api_token(self) -> str:
        return self.manage("ensure_admin").split("API token:")[1].split()[0]

    def enrollment_token(self) -> str:
        """A secret an operator hands to an agent (production refuses agents without one)."""
        return self.manage("create_enrollment_token", "--name", "run-production", "--auto-approve").split()[-1]

    def stop_group(self, signum: signal.Signals) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signum)
        return self.process.wait(timeout=60)


@pytest.fixture
def profile(tmp_path: Path) -> Iterator[Profile]:
    nginx = find_nginx()
    if nginx is None:
        pytest.skip("nginx is not installed")
    database = ServerDatabase(tmp_path / "db")
    started = Profile(tmp_path, database.url, nginx)
    try:
        yield started
    finally:
        if started.process.poll() is None:
            os.killpg(started.process.pid, signal.SIGKILL)
            started.process.wait(timeout=30)
        database.drop()


def connected_agents(client: httpx.Client, token: str) -> list[dict]:
    response = client.get("/api/v1/agents/", params={"connected": "true"}, headers={"Authorization": f"Token {token}"})
    response.raise_for_status()
    return response.json()["results"]


def wait_until(predicate, *, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_the_profile_serves_agents_through_nginx_restarts_a_dead_server_and_stops_cleanly(
    profile: Profile, tmp_path: Path, signum: signal.Signals
):
    profile.wait_for_output("Ctrl-C stops", timeout=START_TIMEOUT_SECONDS)
    servers = profile.server_pids()
    assert len(servers) == 2, profile.output()
    agent = AgentProcess(
        [
            sys.executable,
            "-m",
            "agent_client",
            "run",
            "--server",
            f"wss://{profile.listen}/v1/opamp",
            "--ca-file",
            str(profile.ca_file),
            "--state-dir",
            str(tmp_path / "agent"),
            "--heartbeat",
            "1",
            "--token",
            profile.enrollment_token(),
        ],
        tmp_path / "logs",
        name="agent",
    )
    try:
        token = profile.api_token()
        with httpx.Client(base_url=f"https://{profile.listen}", verify=str(profile.ca_file), timeout=10) as client:
            wait_until(lambda: connected_agents(client, token), timeout=60, what="the agent connected")
            # Both server processes die (a crash, an OOM kill): each is started again and
            # the agent comes back through nginx, to whichever process it routes to.
            for pid in servers:
                os.kill(pid, signal.SIGKILL)
            killed_at = datetime.now(UTC)
            wait_until(
                lambda: len(set(profile.server_pids()) - set(servers)) == 2,
                timeout=90,
                what="both server processes started again",
            )
            profile.wait_for_output("server-1 exited; started it again", timeout=30)
            wait_until(
                lambda: any(
                    datetime.fromisoformat(r["last_seen"]) > killed_at for r in connected_agents(client, token)
                ),
                timeout=90,
                what="the agent heard again after the restart",
            )
    finally:
        agent.stop()
    before_stop = profile.stdout.read_text()
    assert profile.stop_group(signum) == 0, profile.output()
    # Nothing was started again on the way out, and nothing complained.
    assert "started it again" not in profile.stdout.read_text()[len(before_stop) :], profile.output()
    assert "Traceback" not in profile.stderr.read_text(), profile.output()
    assert not children_of(profile.process.pid)
