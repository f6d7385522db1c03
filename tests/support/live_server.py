"""A real server process for end-to-end and interop tests: migrate, then the server
(`python -m opamp_site.server`, with its resource bounds) on a free port.

The ASGI server is daphne unless OPAMP_ASGI_SERVER names another (`uvicorn`): the same
tests run under each (.ci/run runs the live tests a second time under uvicorn).

Each server gets a database of its own (a fresh PostgreSQL database under the production
profile, a SQLite file otherwise), so it never shares state with pytest-django's test
database. Tests look at the inventory through the server's REST API, as a user would.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


def _ephemeral_range_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A port nothing listens on, from below the kernel's ephemeral range.

    A port the kernel hands out for `bind(0)` comes from the ephemeral range, where every
    outgoing connection (thousands of them in a load test running beside) takes its source
    port: between this check and the server's own bind one of them can take it ("address
    already in use"). Below that range only listeners bind, and the check sees them.
    """
    top = _ephemeral_range_start()
    bottom = max(1024, top - 12000)
    for _ in range(200):
        # Not `random`: test runs seed it alike, and two runs side by side would collide.
        port = bottom + secrets.randbelow(top - bottom)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {bottom} and {top}")


def production_profile() -> bool:
    return os.environ.get("OPAMP_TEST_PROFILE", "default") == "production"


class ServerDatabase:
    """A database that lives as long as the server fixture."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.name = ""
        if production_profile():
            base = urlsplit(os.environ["DATABASE_URL"])
            self.name = f"opamp_live_{secrets.token_hex(4)}"
            self._admin_url = urlunsplit(base._replace(path="/postgres"))
            self._run(f'CREATE DATABASE "{self.name}"')
            self.url = urlunsplit(base._replace(path="/" + self.name))
        else:
            self.url = f"sqlite:///{workdir / 'server.sqlite3'}"

    def _run(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self._admin_url, autocommit=True) as connection:
            connection.execute(sql)

    def drop(self) -> None:
        if self.name:
            self._run(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


class LiveOpampServer:
    """One server process by default (daphne, or OPAMP_ASGI_SERVER's); `processes=N` starts N on ports of their
    own, sharing the database and the channel layer, as N replicas behind a load balancer
    would (benchmarks spread agents over `ws_urls`). `port` is the first one's."""

    def __init__(
        self,
        workdir: Path,
        *,
        extra_env: dict[str, str] | None = None,
        processes: int = 1,
        daphne_args: Sequence[str] = (),
        first_process_env: dict[str, str] | None = None,
    ) -> None:
        if processes < 1:
            raise ValueError("a server needs at least one process")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ports = [free_port() for _ in range(processes)]
        self.daphne_args = list(daphne_args)
        self.first_process_env = dict(first_process_env or {})
        self.port = self.ports[0]
        self.database = ServerDatabase(workdir)
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "opamp_site.settings.test",
            "DATABASE_URL": self.database.url,
            "OPAMP_VAR_DIR": str(workdir / "var"),
            "OPAMP_HEARTBEAT_FLUSH_SECONDS": "0.5",
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        }
        if production_profile():
            # A Redis database of its own, so queued tasks never reach another test's worker.
            redis_base = urlsplit(os.environ["REDIS_URL"])
            self.env.setdefault(
                "CELERY_BROKER_URL", urlunsplit(redis_base._replace(path=f"/{secrets.randbelow(12) + 3}"))
            )
        # `daphne_args` are daphne's options; the uvicorn server takes the same ones.
        self.asgi_server = self.env.get("OPAMP_ASGI_SERVER") or "daphne"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.celery: subprocess.Popen[bytes] | None = None
        self.token = ""
        self.log_path = workdir / "server.log"
        self._prepare()

    def _prepare(self) -> None:
        self.manage("migrate", "--noinput", "-v0")
        self.manage("register_periodic_tasks")
        output = self.manage("ensure_admin")
        self.token = output.split("API token:")[1].split()[0]

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self.processes[0] if self.processes else None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/opamp"

    @property
    def ws_urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{port}/v1/opamp" for port in self.ports]

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/opamp"

    def manage(self, *args: str, exit_status: int = 0) -> str:
        """Run a management command with the server's settings and database; its stdout
        (it must exit with `exit_status`)."""
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != exit_status:
            raise RuntimeError(
                f"manage.py {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result.stdout

    def command(self, port: int) -> list[str]:
        """The server command for one process (tests restarting a process run it again)."""
        return [
            sys.executable,
            "-m",
            "opamp_site.server",
            "--server",
            self.asgi_server,
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            *self.daphne_args,
            "opamp_site.asgi:application",
        ]

    def start(self) -> None:
        for index, port in enumerate(self.ports):
            log_path = self.log_path if index == 0 else self.workdir / f"server-{index}.log"
            log = log_path.open("ab")
            process = subprocess.Popen(
                self.command(port),
                cwd=REPO_ROOT,
                env={**self.env, **self.first_process_env} if index == 0 else self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            self.processes.append(process)
            self._wait_listening(process, port)

    def _wait_listening(self, process: subprocess.Popen[bytes], port: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"server did not listen on {port} within 30 s:\n{self.log()}")

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes = []

    def start_celery(self) -> None:
        """A real Celery worker with beat in one process (django-celery-beat's scheduler)."""
        log = (self.workdir / "celery.log").open("ab")
        self.celery = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "opamp_site",
                "worker",
                "-B",
                "--pool=solo",
                "--loglevel=INFO",
                "--schedule",
                str(self.workdir / "celerybeat-schedule"),
            ],
            cwd=REPO_ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def stop_celery(self) -> None:
        if self.celery and self.celery.poll() is None:
            self.celery.send_signal(signal.SIGTERM)
            try:
                self.celery.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.celery.kill()
                self.celery.wait()
        self.celery = None

    def celery_log(self) -> str:
        path = self.workdir / "celery.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def restart(self, *, fresh_database: bool = False) -> None:
        """Restart the process; with `fresh_database`, it also loses everything it knew."""
        self.stop()
        if fresh_database:
            self.database.drop()
            self.database = ServerDatabase(self.workdir / f"db-{secrets.token_hex(2)}")
            self.env["DATABASE_URL"] = self.database.url
            self._prepare()
        self.start()

    def close(self) -> None:
        self.stop_celery()
        self.stop()
        self.database.drop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def api_post(self, path: str, payload: Any, *, method: str = "POST") -> Any:
        response = httpx.request(
            method,
            f"http://127.0.0.1:{self.port}/api/v1/{path.lstrip('/')}",
            json=payload,
            headers={"Authorization": f"Token {self.token}"},
            timeout=30,
        )
        if response.status_code >= 400:
            raise AssertionError(f"{method} {path} -> {response.status_code}: {response.text}")
        return response.json() if response.content else None

    def api(self, path: str, **params: Any) -> Any:
        response = httpx.get(
            f"http://127.0.0.1:{self.port}/api/v1/{path.lstrip('/')}",
            params=params,
            headers={"Authorization": f"Token {self.token}"},
            timeout=10,
        )
        response.raise_for_status()
        return response.json()

    def upload_package(self, name: str, version: str, body: bytes, *, timeout: float = 30) -> dict[str, Any]:
        """Create `version` of package `name` and upload its file (the server signs it with
        its configured key); the file as the API shows it."""
        self.api_post(f"packages/{name}/versions/", {"version": version})
        response = httpx.post(
            f"http://127.0.0.1:{self.port}/api/v1/packages/{name}/versions/{version}/files/",
            content=body,
            headers={"Authorization": f"Token {self.token}", "Content-Type": "application/octet-stream"},
            timeout=timeout,
        )
        assert response.status_code == 201, response.text
        return dict(response.json())

    def agents(self, **params: Any) -> list[dict[str, Any]]:
        return list(self.api("agents/", limit=1000, **params)["results"])

    def wait_for(self, predicate: Any, *, timeout: float = 30, interval: float = 0.2, what: str = "condition") -> Any:
        """Poll `predicate()` until it returns something truthy; fail with the server log."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(
            f"timed out waiting for {what}; last value {last!r}\n--- server log ---\n{self.log()[-4000:]}"
        )
