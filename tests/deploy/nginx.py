"""Real nginx as an unprivileged child process, configured by `manage.py render_nginx_config`."""

from __future__ import annotations

import contextlib
import grp
import io
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from django.core.management import call_command

from tests.deploy.pki import FrontFiles
from tests.support.live_server import free_port

NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return next((path for path in NGINX_CANDIDATES if os.access(path, os.X_OK)), None)


def worker_user() -> str | None:
    """Started by root, nginx's workers would become `nobody`, who cannot write the test's temp dirs."""
    if os.geteuid() != 0:
        return None
    return f"{pwd.getpwuid(os.getuid()).pw_name}:{grp.getgrgid(os.getgid()).gr_name}"


def children(pid: int) -> set[int]:
    """The live child processes of `pid` (Linux /proc; zombies left out)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # pid (comm) state ppid ...; comm may contain spaces and parentheses.
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(stat.parent.name))
    return found


class Nginx:
    def __init__(
        self,
        binary: str,
        workdir: Path,
        *,
        upstream: str | Sequence[str],
        tls_cert: Path,
        tls_key: Path,
        ca_cert: Path,
        crl: Path,
        max_body_bytes: int | None = None,
        package_files: tuple[str, Path] | None = None,
    ) -> None:
        """`package_files`: (OPAMP_PACKAGE_DOWNLOAD_ACCEL_PREFIX, the packages directory) the
        server hands authorised downloads to nginx with; None renders no such location."""
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.run_dir = workdir / "run"
        self.conf = workdir / "nginx.conf"
        options = [
            "--listen", f"127.0.0.1:{self.port}",
            "--tls-cert", str(tls_cert),
            "--tls-key", str(tls_key),
            "--ca-cert", str(ca_cert),
            "--crl", str(crl),
            "--standalone", str(self.run_dir),
            "--error-log-level", "info",
            "--output", str(self.conf),
        ]  # fmt: skip
        for address in [upstream] if isinstance(upstream, str) else upstream:
            options += ["--upstream", address]
        if max_body_bytes is not None:
            options += ["--max-body-bytes", str(max_body_bytes)]
        if package_files is not None:
            prefix, directory = package_files
            options += ["--package-accel-prefix", prefix, "--package-dir", str(directory)]
        else:
            options += ["--package-accel-prefix", ""]
        if user := worker_user():
            options += ["--user", user]
        call_command("render_nginx_config", *options, stdout=io.StringIO(), stderr=io.StringIO())
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def in_front(cls, binary: str, workdir: Path, files: FrontFiles, **options: Any) -> Nginx:
        """nginx with `files`' server certificate, agents' CA and CRL; `options` as above."""
        return cls(
            binary,
            workdir,
            tls_cert=files.server_cert,
            tls_key=files.server_key,
            ca_cert=files.ca_cert,
            crl=files.crl,
            **options,
        )

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def check(self) -> None:
        """`nginx -t` on the rendered file: it must be a configuration nginx accepts."""
        self._run("-t")

    def start(self) -> None:
        stderr = (self.workdir / "nginx.stderr").open("ab")
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self.conf), "-g", "daemon off;"],
            stdout=stderr,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return
            time.sleep(0.05)
        raise RuntimeError(f"nginx did not listen on {self.port} within 20 s:\n{self.log()}")

    def reload(self) -> None:
        """What an operator runs after write_crl: `nginx -s reload` with the same -c (and its pid file).

        Returns once the old workers are gone: until then they may still accept connections
        with the configuration (and the CRL) they were started with.
        """
        assert self.process is not None
        old_workers = children(self.process.pid)
        assert old_workers, "nginx has no worker process"
        self._run("-s", "reload")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            workers = children(self.process.pid)
            if workers and not workers & old_workers:
                return
            time.sleep(0.05)
        raise RuntimeError(f"the old nginx workers {sorted(old_workers)} did not exit within 20 s:\n{self.log()}")

    def _run(self, *args: str) -> None:
        result = subprocess.run([self.binary, "-c", str(self.conf), *args], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"nginx {' '.join(args)} failed ({result.returncode}):\n{result.stderr}\n{self.log()}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log(self) -> str:
        parts = []
        for path in (self.workdir / "nginx.stderr", self.run_dir / "error.log"):
            if path.exists():
                parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)
