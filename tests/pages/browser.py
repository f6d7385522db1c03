"""Debian's chromium for the browser tests: found, or skipped (failed where it must be there);
the simulated agents they look at."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.live_server import REPO_ROOT

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CHROMIUM_MISSING = "chromium is not installed (set OPAMP_CHROMIUM or apt-get install -y chromium)"


def chromium_required() -> bool:
    names = ("OPAMP_REQUIRE_ALL_TEST_SERVICES", "CI")
    return any(os.environ.get(name, "") not in ("", "0") for name in names)


def find_chromium() -> str | None:
    for candidate in (os.environ.get("OPAMP_CHROMIUM", ""), "/usr/bin/chromium", shutil.which("chromium") or ""):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def chromium_or_skip() -> str:
    path = find_chromium()
    if path is not None:
        return path
    if chromium_required():
        pytest.fail(CHROMIUM_MISSING, pytrace=False)
    pytest.skip(CHROMIUM_MISSING)


@contextmanager
def simulating(server_url: str, agents: int, *options: str) -> Iterator[subprocess.Popen[bytes]]:
    """`agent_client simulate` of `agents` agents against the live server, with `options`,
    stopped (the agents say goodbye) on leaving."""
    process = subprocess.Popen(
        [sys.executable, "-m", "agent_client", "simulate", "--server", server_url, "--agents", str(agents), *options],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        process.terminate()
        process.wait(timeout=20)
