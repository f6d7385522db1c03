"""The README runs as written: `scripts/run.sh` on a fresh embedded default, then every `sh`
block of the README, in order, in one shell; TERM stops run.sh and everything it started."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.live_server import REPO_ROOT, free_port

pytestmark = pytest.mark.live_server

BLOCK = re.compile(r"^```(sh[^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
NOT_RUN = {"sh server", "sh foreground", "sh production"}
SERVER_ENV_DROPPED = ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE")
SERVER_ENV_PREFIX_DROPPED = "OPAMP_"  # the server runs on its defaults, as the README says


def readme_blocks() -> list[tuple[str, str]]:
    return [(info.strip(), body) for info, body in BLOCK.findall((REPO_ROOT / "README.md").read_text())]


def embedded_env(tmp_path: Path, port: int) -> dict[str, str]:
    """A fresh embedded default: nothing of the test profile's services leaks in."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in SERVER_ENV_DROPPED and not key.startswith(SERVER_ENV_PREFIX_DROPPED)
    }
    env.update(
        OPAMP_PORT=str(port),
        OPAMP_VAR_DIR=str(tmp_path / "var"),
        TMPDIR=str(tmp_path),
        PYTHONUNBUFFERED="1",
    )
    return env


class RunSh:
    """scripts/run.sh in a session of its own, its output collected line by line."""

    def __init__(self, env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            ["scripts/run.sh"],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"run.sh never printed {text!r}:\n{self.output}")
            time.sleep(0.2)

    def session_alive(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill_session(self) -> None:
        if self.session_alive():
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


@pytest.fixture
def run_sh(tmp_path: Path) -> Iterator[tuple[RunSh, dict[str, str]]]:
    env = embedded_env(tmp_path, free_port())
    server = RunSh(env)
    try:
        yield server, env
    finally:
        server.kill_session()


def test_the_readme_marks_every_block_it_does_not_run():
    infos = {info for info, _ in readme_blocks()}
    assert infos <= NOT_RUN | {"sh"}, infos
    for info, body in readme_blocks():
        assert "manage.py" not in body or ".venv/bin/python manage.py" in body, body
        if info != "sh production":  # a production server's address is its own
            assert ":4320" not in body, body  # the port comes from OPAMP_PORT
        if info == "sh production":
            assert body.startswith("# production profile only"), body


def test_run_sh_prints_progress_and_every_url_and_term_stops_its_children(run_sh):
    server, env = run_sh
    server.wait_for("Ctrl-C stops the server and Celery", timeout=240)
    port = env["OPAMP_PORT"]
    out = server.output
    for step in ("[1/4] installing", "[2/4] migrating", "[3/4] starting the Celery", "[4/4] starting daphne"):
        assert step in out
    for path in ("/fleet/", "/rollouts/", "/configurations/", "/certificate-requests/", "/admin/", "/api/v1/"):
        assert f"http://127.0.0.1:{port}{path}" in out, path
    assert f"ws://127.0.0.1:{port}/v1/opamp" in out and "API token:" in out
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0
    deadline = time.monotonic() + 30
    while server.session_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not server.session_alive(), "daphne or Celery outlived run.sh"
    assert "stopping daphne and Celery" in server.output


@pytest.mark.timeout(900)  # a first start installs; the walkthrough runs two rollouts at default heartbeats
def test_every_readme_shell_block_runs_in_order_against_the_running_server(run_sh, tmp_path):
    server, env = run_sh
    server.wait_for("Ctrl-C stops the server and Celery", timeout=240)
    script = "\n".join(body for info, body in readme_blocks() if info == "sh")
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = result.stdout
    assert result.returncode == 0, f"{out}\n{result.stderr}\n--- run.sh ---\n{server.output[-3000:]}"
    assert "API token works" in out
    assert re.search(r"rollout \d+ succeeded", out), out
    assert re.search(r"rollout \d+ rolled back", out), out
    assert "rollout_watch exited with 3 (3: rolled back)" in out
    assert "config rejected: contains marker bad-build" in out  # the failed agents, with their errors
    assert '"number":4' in out.replace(" ", "")  # the rollback published version 4
    assert '"connection_settings_state":"applied"' in out.replace(" ", "")  # telemetry settings
    progress = (tmp_path / "opamp-simulate.log").read_text()
    assert progress.startswith("simulating 20 agents against ws://127.0.0.1:")
    assert "20/20 connected" in progress
