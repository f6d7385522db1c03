"""Debian's chromium for the browser tests: found, or skipped (failed where it must be there)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

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
