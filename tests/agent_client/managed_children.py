"""Small Python scripts that stand in for a collector in the managed-process tests.

Each one notes its pid in a log file when it starts, so a test can tell one start from the
next; `running` sleeps until stopped, `crashing` exits 1 at once, `stubborn` ignores SIGTERM.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path

RUNNING = "time.sleep(600)"
CRASHING = "sys.exit(1)"
STUBBORN = "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"


def child_script(pids: Path, body: str) -> bytes:
    """An executable script: appends its pid to `pids`, then runs `body`."""
    return (
        f"#!{sys.executable}\n"
        "import os, signal, sys, time\n"
        f"with open({str(pids)!r}, 'a') as log:\n"
        "    log.write(f'{os.getpid()}\\n')\n"
        f"{body}\n"
    ).encode()


def write_child(path: Path, pids: Path, body: str) -> Path:
    path.write_bytes(child_script(pids, body))
    path.chmod(0o755)
    return path


def started_pids(pids: Path) -> list[int]:
    """The pids of every start so far, oldest first."""
    if not pids.exists():
        return []
    return [int(line) for line in pids.read_text().split()]


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie not yet reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def eventually(check: Callable[[], object], *, timeout: float = 10.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def gone(pid: int) -> bool:
    return not alive(pid)
