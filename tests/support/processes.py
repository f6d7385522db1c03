"""Agent processes under test: start, follow their JSON-lines output, stop."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.support.live_server import REPO_ROOT


def agent_client_run(server_url: str, state_dir: Path, *options: str) -> list[str]:
    """The command line of `python -m agent_client run` against `server_url`, keeping its
    state in `state_dir`, with `options` after."""
    return [
        sys.executable,
        "-m",
        "agent_client",
        "run",
        "--server",
        server_url,
        "--state-dir",
        str(state_dir),
        *options,
    ]


class AgentProcess:
    """A subprocess printing one JSON object per line on stdout (the interop runners do)."""

    def __init__(self, command: Sequence[str], workdir: Path, *, name: str, env: dict[str, str] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.stdout_path = workdir / f"{name}.out"
        self.stderr_path = workdir / f"{name}.err"
        self.process = subprocess.Popen(
            list(command),
            cwd=REPO_ROOT,
            env=env,
            stdout=self.stdout_path.open("wb"),
            stderr=self.stderr_path.open("wb"),
        )

    def events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.stdout_path.read_text(errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events

    def output(self) -> str:
        return (
            f"--- {self.name} stdout ---\n{self.stdout_path.read_text(errors='replace')[-3000:]}\n"
            f"--- {self.name} stderr ---\n{self.stderr_path.read_text(errors='replace')[-3000:]}"
        )

    def wait_for_event(
        self, predicate: Callable[[dict[str, Any]], bool], *, after: int = 0, timeout: float = 30, what: str = "event"
    ) -> dict[str, Any]:
        """The first event (from index `after`) matching `predicate`; fails with the output."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events()[after:]:
                if predicate(event):
                    return event
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{self.name}: no {what} within {timeout} s (exit {self.process.poll()})\n{self.output()}")

    def wait_for_output(self, text: str, *, timeout: float = 30) -> None:
        """Wait until `text` appears in the process's stdout or stderr (its log lines)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.stdout_path.read_text(errors="replace") or text in self.stderr_path.read_text(
                errors="replace"
            ):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(
            f"{self.name}: no {text!r} within {timeout} s (exit {self.process.poll()})\n{self.output()}"
        )

    def stop(self, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)
